# cython: language_level=3
"""Layer kernels: locally connected, fully connected, pooling (float32, channels-last).

Three layers, as in scikit-learn's ``_cython_blas``/``_loss``:

1. ``noexcept nogil`` C functions on raw pointers into caller-allocated, C-contiguous arrays;
   each docstring is its formula.  They never raise.
2. :func:`_gemm`, a row-major wrapper over ``scipy.linalg.cython_blas.sgemm`` (column-major
   BLAS sees the transpose of every row-major matrix, so operands are swapped).
3. ``def`` entry points on flat typed memoryviews that release the GIL; the Python layer
   (:mod:`dbmpi.kernels`) checks shapes and dtypes and allocates outputs before calling them.

Shapes: ``x (n, h, w, c)``; locally connected weights ``(ho, wo, k*k*c, f)`` with the patch in
``(ky, kx, c)`` order and biases ``(ho, wo, f)``; fully connected weights ``(units, inputs)``.
Activation codes: 0 linear, 1 relu, 2 sigmoid, 3 tanh.
"""

cimport numpy as cnp
from libc.math cimport expf, log, sqrtf
from libc.string cimport memcpy, memset
from scipy.linalg.cython_blas cimport sgemm


# weight rows a forward pass streams per location (x 64 bytes: 12 KB of a 32 KB L1)
cdef enum:
    _FWD_PANEL_ROWS = 192

cdef extern from "vmath.h" nogil:
    void dbmpi_sigmoid(float* y, Py_ssize_t size)
    void dbmpi_tanh(float* y, Py_ssize_t size)
    void dbmpi_max_step(const float* x, float* y, int* arg, int c, int a)
    double dbmpi_sum_sq(const float* x, Py_ssize_t n)


cdef extern from "microgemm.h" nogil:
    int DBMPI_VW
    int DBMPI_RB
    void dbmpi_mgemm(int m, int n, int k, const float* a, Py_ssize_t rsa, Py_ssize_t csa,
                     const float* b, Py_ssize_t ldb, float beta, float* c, Py_ssize_t ldc,
                     const float* pf, Py_ssize_t pfn)
    void dbmpi_dots(int n, int u, int k, const float* x, Py_ssize_t ldx, const float* w,
                    Py_ssize_t ldw, float beta, float* y, Py_ssize_t ldy)
    void dbmpi_mgemm_seg(int m, int n, int nseg, Py_ssize_t sstride, int k, const float* a,
                         Py_ssize_t rsa, Py_ssize_t csa, const float* b, Py_ssize_t ldb,
                         float beta, float* c, Py_ssize_t ldc, const float* bias, int relu,
                         const float* pf, Py_ssize_t pfn)


# ---- layer 2: BLAS -------------------------------------------------------------------------

cdef inline void _gemm(bint ta, bint tb, int m, int n, int k, float alpha,
                       const float* a, int lda, const float* b, int ldb, float beta,
                       float* c, int ldc) noexcept nogil:
    """Row-major C(m, n) = alpha * op(A)(m, k) @ op(B)(k, n) + beta * C.

    Column-major BLAS computes C^T = op(B)^T @ op(A)^T, so B goes first."""
    cdef char transa = b'T' if tb else b'N'
    cdef char transb = b'T' if ta else b'N'
    sgemm(&transa, &transb, &n, &m, &k, &alpha, <float*>b, &ldb, <float*>a, &lda, &beta,
          c, &ldc)


# ---- layer 1: C kernels --------------------------------------------------------------------

cdef void _act_forward(float* y, Py_ssize_t size, int act) noexcept nogil:
    """y = act(y), in place."""
    cdef Py_ssize_t t
    if act == 1:
        for t in range(size):       # branch-free, so it vectorizes
            y[t] = y[t] if y[t] > 0 else 0
    elif act == 2:
        dbmpi_sigmoid(y, size)
    elif act == 3:
        dbmpi_tanh(y, size)


cdef void _act_backward(const float* y, const float* dy, float* dz, Py_ssize_t size,
                        int act) noexcept nogil:
    """dz = dy * act'(z), from the activation's output y."""
    cdef Py_ssize_t t
    if act == 0:
        if dz != dy:                # linear: the caller may pass dy itself as dz
            memcpy(dz, dy, size * sizeof(float))
    elif act == 1:
        for t in range(size):
            dz[t] = dy[t] if y[t] > 0 else 0
    elif act == 2:
        for t in range(size):
            dz[t] = dy[t] * y[t] * (1 - y[t])
    else:
        for t in range(size):
            dz[t] = dy[t] * (1 - y[t] * y[t])


cdef void _act_forward_rows(float* y, Py_ssize_t ys, int n, Py_ssize_t size,
                            int act) noexcept nogil:
    """_act_forward per sample: y may be a row range of a larger batch (sample stride ys)."""
    cdef int s
    if ys == size:
        _act_forward(y, n * size, act)
        return
    for s in range(n):
        _act_forward(y + s * ys, size, act)


cdef void _act_backward_rows(const float* y, Py_ssize_t ys, const float* dy,
                             Py_ssize_t dys, float* dz, int n, Py_ssize_t size,
                             Py_ssize_t dzs, int act) noexcept nogil:
    """_act_backward per sample: size values of each of the n samples, whose starts in y,
    dy and dz lie ys, dys and dzs apart (row ranges of larger arrays)."""
    cdef int s
    for s in range(n):
        _act_backward(y + s * ys, dy + s * dys, dz + s * dzs, size, act)


cdef void _gather(const float* x, Py_ssize_t xs, int n, int h, int w, int c, int k, int stride,
                  int pad, int i, int j, float* p) noexcept nogil:
    """p[s, (ky*k + kx)*c + ch] = x[s, i*stride - pad + ky, j*stride - pad + kx, ch], 0 outside;
    samples of x start xs apart."""
    cdef Py_ssize_t kc = k * c, kkc = k * kc, s
    cdef int r0 = i * stride - pad, c0 = j * stride - pad, ky, row
    cdef int lo = -c0 if c0 < 0 else 0
    cdef int hi = w - c0 if w - c0 < k else k
    cdef float* dst
    for s in range(n):
        for ky in range(k):
            row = r0 + ky
            dst = p + s * kkc + ky * kc
            if row < 0 or row >= h or hi <= lo:
                memset(dst, 0, kc * sizeof(float))
                continue
            if lo > 0:
                memset(dst, 0, lo * c * sizeof(float))
            if hi < k:
                memset(dst + hi * c, 0, (k - hi) * c * sizeof(float))
            memcpy(dst + lo * c, x + s * xs + (row * <Py_ssize_t>w + c0 + lo) * c,
                   (hi - lo) * c * sizeof(float))


cdef inline void _lc_forward_location(int n, int f, int k, int kc, Py_ssize_t sstride,
                                      const float* a, Py_ssize_t rsa, Py_ssize_t csa,
                                      const float* wl, const float* bl, bint relu, float* yl,
                                      Py_ssize_t ld, Py_ssize_t pfn) noexcept nogil:
    """One location's product in passes of a few patch rows, accumulated in y (bias and
    relu on the last pass): the weight panel a pass streams (rows x 2 vectors) then stays
    in L1 across the row blocks of the batch.  At 16 channels and field 5 (400 weight rows,
    a 25 KB panel against a 32 KB L1 shared with the patch) this is 4-10% faster than one
    pass, measured in one process against the single-pass build.  pfn floats of the next
    location's weights (which follow wl) are prefetched, shared out over the passes."""
    cdef int r0 = 0, rows, step = _FWD_PANEL_ROWS // kc if kc < _FWD_PANEL_ROWS else 1
    cdef Py_ssize_t wrow = <Py_ssize_t>kc * f
    while r0 < k:
        rows = step if r0 + step < k else k - r0
        dbmpi_mgemm_seg(n, f, rows, sstride, kc, a + r0 * sstride, rsa, csa, wl + r0 * wrow, f,
                        1.0 if r0 > 0 else 0.0, yl, ld, bl if r0 + rows == k else NULL,
                        relu and r0 + rows == k, wl + k * wrow + r0 * wrow, pfn * rows // k)
        r0 += rows


cdef void lc_forward_c(const float* x, Py_ssize_t xs, const float* xt, const float* wt,
                       const float* b, float* y, Py_ssize_t ys, float* p, int n, int npad,
                       int h, int w, int c, int k, int stride, int pad, int ho, int wo, int f,
                       int act) noexcept nogil:
    """y[s,i,j,:] = act(patch(x)[s,i,j,:] @ wt[i,j] + b[i,j]); p is an (n, k*k*c) buffer.
    Samples of x and y start xs and ys apart (x and y may be rows of larger batches).

    Filter counts that are multiples of the vector width (8 floats with AVX2) use the
    register-blocked microgemm.h, others BLAS on gathered patches.  The microkernel reads
    patches in place (implicit GEMM: a patch's k rows are k contiguous segments), from x when
    xt is NULL (then pad is 0), else from xt, x batch-last and zero-padded (see
    _image_batch_last), where every location is interior."""
    cdef int i, j, s, kkc = k * k * c
    cdef Py_ssize_t loc, wsize = <Py_ssize_t>kkc * f, wp = w + 2 * pad, ld = ys
    cdef Py_ssize_t pfn      # the next location's weights are fetched while this one runs
    for i in range(ho):
        for j in range(wo):
            loc = i * wo + j
            pfn = wsize if loc + 1 < ho * wo else 0
            if f % DBMPI_VW == 0 and xt != NULL:
                _lc_forward_location(n, f, k, k * c, wp * c * npad,
                                     xt + ((i * stride) * wp + j * stride) * c * npad, 1, npad,
                                     wt + loc * wsize, b + loc * f, act == 1, y + loc * f, ld,
                                     pfn)
            elif f % DBMPI_VW == 0:
                _lc_forward_location(n, f, k, k * c, w * c,
                                     x + ((i * stride) * <Py_ssize_t>w + j * stride) * c,
                                     xs, 1, wt + loc * wsize, b + loc * f,
                                     act == 1, y + loc * f, ld, pfn)
            else:
                _gather(x, xs, n, h, w, c, k, stride, pad, i, j, p)
                for s in range(n):
                    memcpy(y + s * <Py_ssize_t>ld + loc * f, b + loc * f, f * sizeof(float))
                _gemm(False, False, n, f, kkc, 1.0, p, kkc, wt + loc * kkc * f, f, 1.0,
                      y + loc * f, ld)
    if f % DBMPI_VW != 0 or act != 1:      # relu is fused into the microkernel's epilogue
        _act_forward_rows(y, ys, n, <Py_ssize_t>ho * wo * f, act)


cdef inline void _fill(float* y, float v, Py_ssize_t size) noexcept nogil:
    cdef Py_ssize_t t
    for t in range(size):
        y[t] = v


cdef inline void _scale(float* y, float beta, Py_ssize_t size) noexcept nogil:
    """y *= beta, where beta = 0 overwrites (whatever y held, NaN included)."""
    cdef Py_ssize_t t
    if beta == 0:
        memset(y, 0, size * sizeof(float))
    elif beta != 1:
        for t in range(size):
            y[t] *= beta


cdef void _to_batch_last(const float* src, float* dst, int n, int npad, Py_ssize_t count,
                         Py_ssize_t sstride, int block=64) noexcept nogil:
    """dst[t*npad + s] = src[s*sstride + t] for t < count, s < n (padding columns untouched).

    Blocked by ``block`` columns so the strided writes stay in L1; when npad is a multiple
    of 1024 those writes all fall in one cache set, so a block of 8 (L1's ways) is needed."""
    cdef Py_ssize_t t0 = 0, t, t1, s
    while t0 < count:
        t1 = t0 + block if t0 + block < count else count
        for s in range(n):
            for t in range(t0, t1):
                dst[t * npad + s] = src[s * sstride + t]
        t0 = t1


cdef void _from_batch_last(const float* src, float* dst, int n, int npad, Py_ssize_t count,
                           Py_ssize_t sstride) noexcept nogil:
    """dst[s*sstride + t] = src[t*npad + s] for t < count, s < n: _to_batch_last undone."""
    cdef Py_ssize_t t, s
    for s in range(n):
        for t in range(count):
            dst[s * sstride + t] = src[t * npad + s]


cdef void _image_batch_last(const float* x, Py_ssize_t xs, float* xt, int n, int npad, int h,
                            int w, int c, int pad, bint back) noexcept nogil:
    """xt[((r + pad)*wp + col + pad)*c + ch, s] = x[s, r, col, ch], wp = w + 2*pad, row by
    row (the caller zeroes xt: its padding rows and columns stay zero); samples of x start
    xs apart.  ``back``: the other way, x from xt (then x is the writable input gradient)."""
    cdef Py_ssize_t wc = <Py_ssize_t>w * c, wp = w + 2 * pad
    cdef int r
    cdef float* rowt
    for r in range(h):
        rowt = xt + ((r + pad) * wp + pad) * c * <Py_ssize_t>npad
        if back:
            _from_batch_last(rowt, <float*>x + r * wc, n, npad, wc, xs)
        else:
            _to_batch_last(x + r * wc, rowt, n, npad, wc, xs)


cdef void lc_backward_c(const float* x, Py_ssize_t xs, const float* xt, const float* wt,
                        const float* y,
                        Py_ssize_t ys, const float* dy, Py_ssize_t dys, int act, float* dzr,
                        float* dxt, float* dw, float* db, float* p, float* dztl, int n,
                        int npad, int h, int w, int c, int k, int stride, int pad, int ho,
                        int wo, int f, bint need_dx, float beta) noexcept nogil:
    """With dz = dy * act'(z) (from the output y): dw[i,j] = beta*dw[i,j] + patch^T @
    dz[:,i,j,:]; db[i,j] = beta*db[i,j] + sum_s dz[s,i,j,:]; dxt += dz[:,i,j,:]^T-scatter of
    wt[i,j] @ dz[:,i,j,:]^T, batch-last.  x, y and dy: samples xs, ys and dys apart.

    dz is made one output row at a time, into dzr (n rows of wo*f, padded by 16 floats where
    wo*f is a multiple of 512), which stays in L2, and for the input gradient one location
    at a time, transposed, into dztl (f, npad; its padding columns zeroed by the caller):
    y and dy are read once, a row of each sample at a time (runs the hardware prefetchers
    follow), and no dz array is written and read back.

    Each location's input gradient is taken before its dw, so dw may be wt itself: with
    dy scaled by -learning_rate and beta = 1 (or 1 - learning_rate*l2), one SGD step lands
    in the weights with no gradient array and no extra pass over the parameters.

    The input gradient is accumulated batch-last, dxt ((h + 2*pad), (w + 2*pad), c, npad)
    zeroed by the caller: the k rows of a patch are then k runs of k*c contiguous rows of
    dxt, so each is one product wt-rows @ dztl with no transpose of the weights and no
    scatter.  npad is n rounded up to the vector width.  p is an (n, k*k*c) buffer, or
    (k*k*c, npad) with xt, which is as for lc_forward_c."""
    cdef int i, j, s, t, ky, kkc = k * k * c, kc = k * c, ld = wo * f
    # dzr's sample stride: a multiple of 2 KB would put the n lines a product step reads
    # (one per sample) in too few of L1's sets
    cdef int ldr = ld + 16 if ld % 512 == 0 else ld
    cdef Py_ssize_t loc, wp = w + 2 * pad, nloc = ho * wo
    cdef const float* dzl
    cdef bint micro = f % DBMPI_VW == 0
    cdef const float* xl
    cdef float* dbl
    cdef float* dwl
    cdef const float* wl
    cdef const float* nxt          # prefetched during dw: what the next location reads first
    cdef Py_ssize_t pfn
    for i in range(ho):
        _act_backward_rows(y + i * <Py_ssize_t>ld, ys, dy + i * <Py_ssize_t>ld, dys, dzr, n,
                           ld, ldr, act)
        for j in range(wo):
            loc = i * wo + j
            dzl = dzr + j * f          # this location's dz: n rows ldr apart
            wl = wt + loc * kkc * f
            dwl = dw + loc * kkc * f
            nxt = (wt if need_dx else <const float*>dw) + (loc + 1) * kkc * f
            pfn = kkc * f if loc + 1 < nloc else 0
            if need_dx:
                for t in range(f):
                    for s in range(n):
                        dztl[t * npad + s] = dzl[s * ldr + t]
                for ky in range(k):     # patch row ky: rows ky*kc.. of wt[i,j] into dxt
                    dbmpi_mgemm(kc, npad, f, wl + ky * kc * f, f, 1, dztl, npad, 1.0,
                                dxt + ((i * stride + ky) * wp + j * stride) * c * npad, npad,
                                dwl + ky * kc * f, kc * f)
            if micro and xt != NULL:
                # patch^T, batch-last: k runs of k*c rows of xt, copied so the k segments
                # make one product of k*k*c rows (the segments alone are too short)
                for ky in range(k):
                    memcpy(p + ky * kc * npad,
                           xt + ((i * stride + ky) * wp + j * stride) * c * npad,
                           kc * npad * sizeof(float))
                dbmpi_mgemm(kkc, f, n, p, npad, 1, dzl, ldr, beta, dwl, f, nxt, pfn)
            elif micro:
                xl = x + ((i * stride) * <Py_ssize_t>w + j * stride) * c
                for ky in range(k):     # dw rows of patch row ky: x segment ky, transposed
                    dbmpi_mgemm(kc, f, n, xl + ky * <Py_ssize_t>w * c, 1, xs, dzl, ldr, beta,
                                dwl + ky * kc * f, f, nxt + ky * kc * f, pfn // k)
            else:
                _gather(x, xs, n, h, w, c, k, stride, pad, i, j, p)
                _gemm(True, False, kkc, f, n, 1.0, p, kkc, dzl, ldr, beta, dwl, f)
            dbl = db + loc * f
            _scale(dbl, beta, f)
            for s in range(n):
                for t in range(f):
                    dbl[t] += dzl[s * ldr + t]


cdef enum:
    _THIN_UNITS = 16     # up to this many units a layer's products are dot products (dbmpi_dots)


cdef inline bint _fc_transposed(int n, int u) noexcept nogil:
    return u > _THIN_UNITS and u >= n


cdef void fc_product_c(const float* x, const float* wt, Py_ssize_t ldw, float* y, float* yt,
                       int n, int d, int u, float beta) noexcept nogil:
    """One column block's share of a fully connected layer's product: y (n, u) = beta*y +
    x @ wt^T, x (n, d) contiguous, wt (u, d) with rows ldw apart (the columns of a wider
    layer's weights that the block's inputs meet).
    Blocks are summed with beta = 1 (a partition's input, as it arrives from each owner).

    A thin layer (at most _THIN_UNITS units: a softmax's classes, or a partition's share of
    them) takes dot products along d, where BLAS ran at 16 GFLOP/s (dbmpi_dots).  With more
    units than samples the product goes into yt (u, n), transposed, yt = wt @ x^T (finished
    by fc_finish_c): OpenBLAS runs that orientation (the batch as the column-major M side)
    6-30% faster there; otherwise the direct product is faster (scipy's OpenBLAS 0.3.30,
    batches 32 and 128)."""
    if u <= _THIN_UNITS:
        dbmpi_dots(n, u, d, x, d, wt, ldw, beta, y, u)
    elif u < n:
        _gemm(False, True, n, u, d, 1.0, x, d, wt, <int>ldw, beta, y, u)
    else:
        _gemm(False, True, u, n, d, 1.0, wt, <int>ldw, x, d, beta, yt, n)


cdef void fc_finish_c(const float* b, float* y, const float* yt, int n, int u,
                      int act) noexcept nogil:
    """y = act(product + b), the product summed by fc_product_c (in yt where transposed)."""
    cdef Py_ssize_t s0 = 0, s1, s, t
    cdef int block = 8
    if not _fc_transposed(n, u):
        for s in range(n):
            for t in range(u):
                y[s * u + t] += b[t]
    else:
        while s0 < n:                   # 8 samples at a time: the strided reads stay in L1
            s1 = s0 + block if s0 + block < n else n
            for t in range(u):
                for s in range(s0, s1):
                    y[s * u + t] = yt[t * n + s] + b[t]
            s0 = s1
    _act_forward(y, <Py_ssize_t>n * u, act)


cdef void fc_backward_block_c(const float* x, const float* wt, float* dw, Py_ssize_t ldw,
                              const float* dz, float* dx, int n, int d, int u,
                              bint need_dx, float beta) noexcept nogil:
    """One column block of a fully connected layer's backward pass (x, wt, ldw, d as in
    fc_product_c; dw the same columns of the weights' gradient): dx (n, d) = dz @ wt;
    dw = beta*dw + dz^T @ x.  dx comes first, so dw may be wt itself (see lc_backward_c).
    A thin layer's products go through the register-blocked kernel (microgemm.h): BLAS
    spent most of the time on packing for k = u or m = u of 5 or 10."""
    if u <= _THIN_UNITS and d % DBMPI_VW == 0:
        if need_dx:
            dbmpi_mgemm(n, d, u, dz, u, 1, wt, ldw, 0.0, dx, d, NULL, 0)
        dbmpi_mgemm(u, d, n, dz, 1, u, x, d, beta, dw, ldw, NULL, 0)
        return
    if need_dx:
        _gemm(False, False, n, d, u, 1.0, dz, u, wt, <int>ldw, 0.0, dx, d)
    _gemm(True, False, u, d, n, 1.0, dz, u, x, d, beta, dw, <int>ldw)


cdef void fc_bias_grad_c(const float* dz, float* db, int n, int u, float beta) noexcept nogil:
    """db = beta*db + sum_s dz[s]."""
    cdef int s, t
    _scale(db, beta, u)
    for s in range(n):
        for t in range(u):
            db[t] += dz[s * <Py_ssize_t>u + t]


cdef void max_pool_c(const float* x, Py_ssize_t xs, float* y, Py_ssize_t ys, int* arg, int n,
                     int h, int w, int c, int size, int stride, int ho, int wo) noexcept nogil:
    """y[s,i,j,ch] = max over the window; arg = ky*size + kx of the (first) maximum.
    Samples of x and y start xs and ys apart (row ranges of larger batches); arg is contiguous.

    Channels innermost and branch-free (selects, not jumps), so the compiler vectorizes."""
    cdef int s, i, j, ky, kx
    cdef Py_ssize_t o, src
    cdef const float* xq
    cdef float* yq
    cdef int* aq
    for s in range(n):
        xq, yq, aq = x + s * xs, y + s * ys, arg + s * <Py_ssize_t>ho * wo * c
        for i in range(ho):
            for j in range(wo):
                o = (i * <Py_ssize_t>wo + j) * c
                src = ((i * stride) * <Py_ssize_t>w + j * stride) * c
                memcpy(yq + o, xq + src, c * sizeof(float))
                memset(aq + o, 0, c * sizeof(int))
                for ky in range(size):
                    for kx in range(size):
                        if ky == 0 and kx == 0:
                            continue
                        src = ((i * stride + ky) * <Py_ssize_t>w + j * stride + kx) * c
                        dbmpi_max_step(xq + src, yq + o, aq + o, c, ky * size + kx)


cdef void max_pool_back_c(const float* dy, Py_ssize_t dys, const int* arg, float* dx, int n,
                          int h, int w, int c, int size, int stride, int ho, int wo,
                          bint tiled) noexcept nogil:
    """dx[window position arg] += dy; dx must be zeroed by the caller.  Samples of dy start
    dys apart; arg and dx are contiguous.

    tiled (stride == size: the windows do not overlap) writes every element of each window
    instead, dy where it was the maximum and 0 elsewhere (selects, so it vectorizes), and
    the caller zeroes only what no window covers."""
    cdef int s, i, j, ch, a, ky, kx
    cdef Py_ssize_t o, src, od
    for s in range(n):
        for i in range(ho):
            for j in range(wo):
                o = ((s * ho + i) * <Py_ssize_t>wo + j) * c
                od = s * dys + (i * <Py_ssize_t>wo + j) * c
                if tiled:
                    for ky in range(size):
                        for kx in range(size):
                            src = ((s * h + i * stride + ky) * <Py_ssize_t>w + j * stride
                                   + kx) * c
                            a = ky * size + kx
                            for ch in range(c):
                                dx[src + ch] = dy[od + ch] if arg[o + ch] == a else 0
                    continue
                for ch in range(c):
                    a = arg[o + ch]
                    dx[((s * h + i * stride + a // size) * <Py_ssize_t>w + j * stride
                        + a % size) * c + ch] += dy[od + ch]


cdef void l2_pool_c(const float* x, Py_ssize_t xs, float* y, Py_ssize_t ys, int n, int h, int w,
                    int c, int size, int stride, int ho, int wo, float eps) noexcept nogil:
    """y[s,i,j,ch] = sqrt(sum over the window of x^2 + eps); samples xs and ys apart."""
    cdef int s, i, j, ky, kx, ch
    cdef Py_ssize_t o, src
    cdef float v
    cdef const float* xq
    cdef float* yq
    for s in range(n):
        xq, yq = x + s * xs, y + s * ys
        for i in range(ho):
            for j in range(wo):
                o = (i * <Py_ssize_t>wo + j) * c
                for ch in range(c):
                    yq[o + ch] = eps
                for ky in range(size):
                    for kx in range(size):
                        src = ((i * stride + ky) * <Py_ssize_t>w + j * stride + kx) * c
                        for ch in range(c):
                            v = xq[src + ch]
                            yq[o + ch] += v * v
                for ch in range(c):
                    yq[o + ch] = sqrtf(yq[o + ch])


cdef void l2_pool_back_c(const float* x, Py_ssize_t xs, const float* y, Py_ssize_t ys,
                         const float* dy, Py_ssize_t dys, float* dx, float* r, int n, int h,
                         int w, int c, int size, int stride, int ho, int wo,
                         bint tiled) noexcept nogil:
    """dx[window] += dy * x / y (r: c floats of scratch for dy / y, one division a window).
    Samples of x, y and dy start xs, ys and dys apart; dx is contiguous.

    tiled (stride == size: the windows do not overlap) writes dx instead of adding to it,
    so the caller zeroes only what no window covers; otherwise dx must be zeroed."""
    cdef int s, i, j, ky, kx, ch
    cdef Py_ssize_t o, src
    cdef const float* xq
    cdef const float* yq
    cdef const float* dyq
    cdef float* dxq
    for s in range(n):
        xq, yq, dyq = x + s * xs, y + s * ys, dy + s * dys
        dxq = dx + s * <Py_ssize_t>h * w * c
        for i in range(ho):
            for j in range(wo):
                o = (i * <Py_ssize_t>wo + j) * c
                for ch in range(c):
                    r[ch] = dyq[o + ch] / yq[o + ch]
                for ky in range(size):
                    for kx in range(size):
                        src = ((i * stride + ky) * <Py_ssize_t>w + j * stride + kx) * c
                        if tiled:
                            for ch in range(c):
                                dxq[src + ch] = r[ch] * xq[src + ch]
                        else:
                            for ch in range(c):
                                dxq[src + ch] += r[ch] * xq[src + ch]


cdef void _box_sum(const float* a, float* out, float* tmp, int h, int w,
                   int size) noexcept nogil:
    """out[i,j] = sum of a over rows i-r..i+r and columns j-r..j+r inside the (h, w) plane
    (zero outside, r = size // 2); tmp is h*w floats.  Rows first, whole rows at a time."""
    cdef int r = size // 2, i, j, t, lo, hi
    cdef float acc
    cdef float* row
    for i in range(h):
        row = tmp + i * <Py_ssize_t>w
        memset(row, 0, w * sizeof(float))
        lo = i - r if i - r > 0 else 0
        hi = i + r + 1 if i + r + 1 < h else h
        for t in range(lo, hi):
            for j in range(w):
                row[j] += a[t * <Py_ssize_t>w + j]
    for i in range(h):
        row = tmp + i * <Py_ssize_t>w
        for j in range(w):
            lo = j - r if j - r > 0 else 0
            hi = j + r + 1 if j + r + 1 < w else w
            acc = 0
            for t in range(lo, hi):
                acc += row[t]
            out[i * <Py_ssize_t>w + j] = acc


cdef void lcn_forward_c(const float* x, float* y, float* v, float* d, float* scratch, int n,
                        int h, int w, int c, int size, float eps) noexcept nogil:
    """v = x - box(sum_c x)/m; d = sqrt(box(sum_c v^2)/m + eps); y = v/d, with m = size^2*c
    and the box over size x size pixels (zero padded); scratch is 3*h*w floats."""
    cdef Py_ssize_t hw = <Py_ssize_t>h * w, p, o
    cdef int s, ch
    cdef float m = <float>size * size * c, acc, t, inv
    cdef float* sums = scratch
    cdef float* box = scratch + hw
    cdef float* tmp = scratch + 2 * hw
    cdef const float* xs
    cdef float* vs
    cdef float* ys
    cdef float* ds
    for s in range(n):
        xs, vs, ys, ds = x + s * hw * c, v + s * hw * c, y + s * hw * c, d + s * hw
        for p in range(hw):
            acc = 0
            for ch in range(c):
                acc += xs[p * c + ch]
            sums[p] = acc
        _box_sum(sums, box, tmp, h, w, size)
        for p in range(hw):
            o = p * c
            acc = 0
            for ch in range(c):
                t = xs[o + ch] - box[p] / m
                vs[o + ch] = t
                acc += t * t
            sums[p] = acc
        _box_sum(sums, box, tmp, h, w, size)
        for p in range(hw):
            ds[p] = sqrtf(box[p] / m + eps)
            inv = 1 / ds[p]
            o = p * c
            for ch in range(c):
                ys[o + ch] = vs[o + ch] * inv


cdef void lcn_backward_c(const float* dy, const float* v, const float* d, float* dx,
                         float* scratch, int n, int h, int w, int c, int size) noexcept nogil:
    """dd = -sum_c(dy v)/d^2; dv = dy/d + v*box(dd/d)/m; dx = dv - box(sum_c dv)/m (the box
    filter is symmetric, so it is its own transpose); scratch is 3*h*w floats."""
    cdef Py_ssize_t hw = <Py_ssize_t>h * w, p, o
    cdef int s, ch
    cdef float m = <float>size * size * c, acc, t, inv, g
    cdef float* sums = scratch
    cdef float* box = scratch + hw
    cdef float* tmp = scratch + 2 * hw
    cdef const float* dys
    cdef const float* vs
    cdef const float* ds
    cdef float* dxs
    for s in range(n):
        dys, vs, ds, dxs = dy + s * hw * c, v + s * hw * c, d + s * hw, dx + s * hw * c
        for p in range(hw):
            o = p * c
            acc = 0
            for ch in range(c):
                acc += dys[o + ch] * vs[o + ch]
            sums[p] = -acc / (ds[p] * ds[p] * ds[p])      # dd / d
        _box_sum(sums, box, tmp, h, w, size)
        for p in range(hw):
            inv = 1 / ds[p]
            g = box[p] / m
            o = p * c
            acc = 0
            for ch in range(c):
                t = dys[o + ch] * inv + vs[o + ch] * g
                dxs[o + ch] = t
                acc += t
            sums[p] = acc
        _box_sum(sums, box, tmp, h, w, size)
        for p in range(hw):
            g = box[p] / m
            o = p * c
            for ch in range(c):
                dxs[o + ch] -= g


# ---- layer 3: entry points (GIL released; the Python layer has checked everything) ---------

cnp.import_array()


def data_address(cnp.ndarray a):
    """Where ``a``'s data start (dbmpi.aligned's placing: 0.1 us against ctypes' 2 us)."""
    return <size_t>cnp.PyArray_DATA(a)


def lc_forward(const float[::1] x, Py_ssize_t xs, float[::1] xt, const float[::1] wt,
               const float[::1] b, float[::1] y, Py_ssize_t ys, float[::1] p, int n, int npad,
               int h, int w, int c, int k, int stride, int pad, int ho, int wo, int f, int act,
               bint batch_last):
    """x and y: samples xs and ys apart; batch_last: xt is a zeroed
    (h + 2*pad)*(w + 2*pad)*c*npad buffer to use."""
    with nogil:
        if batch_last:
            _image_batch_last(&x[0], xs, &xt[0], n, npad, h, w, c, pad, False)
        lc_forward_c(&x[0], xs, &xt[0] if batch_last else NULL, &wt[0], &b[0], &y[0], ys,
                     &p[0], n, npad, h, w, c, k, stride, pad, ho, wo, f, act)


def lc_backward(const float[::1] x, Py_ssize_t xs, float[::1] xt, const float[::1] wt,
                const float[::1] y, Py_ssize_t ys, const float[::1] dy, Py_ssize_t dys,
                float[::1] dz, float[::1] dxt, float[::1] dx, float[::1] dw, float[::1] db,
                float[::1] p, float[::1] dzt, int n, int npad, int h, int w, int c, int k,
                int stride, int pad, int ho, int wo, int f, int act, bint need_dx,
                bint batch_last, float beta):
    """x, y and dy: samples xs, ys and dys apart; dz: n*(wo*f + 16) floats of scratch; dzt:
    f*npad floats, zeroed (only with need_dx)."""
    with nogil:
        if batch_last:
            _image_batch_last(&x[0], xs, &xt[0], n, npad, h, w, c, pad, False)
        lc_backward_c(&x[0], xs, &xt[0] if batch_last else NULL, &wt[0], &y[0], ys, &dy[0],
                      dys, act, &dz[0], &dxt[0], &dw[0], &db[0], &p[0], &dzt[0], n, npad, h, w,
                      c, k, stride, pad, ho, wo, f, need_dx, beta)
        if need_dx:
            _image_batch_last(&dx[0], <Py_ssize_t>h * w * c, &dxt[0], n, npad, h, w, c, pad,
                              True)


# Fully connected: a layer's input may come as column blocks (a partition's, from each
# owner): fc_product and fc_backward_block once per block, w0 = the block's first column.
def fc_product(const float[::1] x, const float[::1] wt, Py_ssize_t w0, Py_ssize_t ldw,
               float[::1] y, float[::1] yt, int n, int d, int u, float beta):
    with nogil:
        fc_product_c(&x[0], &wt[w0], ldw, &y[0], &yt[0], n, d, u, beta)


def fc_finish(const float[::1] b, float[::1] y, const float[::1] yt, int n, int u, int act):
    with nogil:
        fc_finish_c(&b[0], &y[0], &yt[0], n, u, act)


def fc_dz(const float[::1] y, const float[::1] dy, float[::1] dz, float[::1] db, int n, int u,
          int act, float beta):
    """dz = dy * act'(y) (dz may be dy for a linear layer), and the bias gradient."""
    with nogil:
        _act_backward(&y[0], &dy[0], &dz[0], <Py_ssize_t>n * u, act)
        fc_bias_grad_c(&dz[0], &db[0], n, u, beta)


def fc_backward_block(const float[::1] x, const float[::1] wt, float[::1] dw, Py_ssize_t w0,
                      Py_ssize_t ldw, const float[::1] dz, float[::1] dx, int n, int d, int u,
                      bint need_dx, float beta):
    with nogil:
        fc_backward_block_c(&x[0], &wt[w0], &dw[w0], ldw, &dz[0], &dx[0], n, d, u, need_dx,
                            beta)


def copy_samples(const float[:, :, :, :] src, float[:, :, :, :] dst, bint add):
    """dst (+)= src, (n, h, w, c) arrays whose every sample is contiguous (their samples may
    lie any distance apart: rows of larger batches).  False, touching nothing, where the
    shapes differ or a sample is not contiguous."""
    cdef Py_ssize_t s, t, n = src.shape[0], count = src.shape[1] * src.shape[2] * src.shape[3]
    cdef const float* a
    cdef float* b
    cdef int i
    for i in range(4):
        if src.shape[i] != dst.shape[i]:
            return False
    if (src.strides[3] != 4 or src.strides[2] != src.shape[3] * 4
            or src.strides[1] != src.shape[2] * src.shape[3] * 4 or dst.strides[3] != 4
            or dst.strides[2] != dst.shape[3] * 4
            or dst.strides[1] != dst.shape[2] * dst.shape[3] * 4):
        return False
    if n == 0 or count == 0:
        return True
    with nogil:
        for s in range(n):
            a = <const float*>(<const char*>&src[0, 0, 0, 0] + s * src.strides[0])
            b = <float*>(<char*>&dst[0, 0, 0, 0] + s * dst.strides[0])
            if add:
                for t in range(count):
                    b[t] += a[t]
            else:
                memcpy(b, a, count * sizeof(float))
    return True


# Pools: x, y and dy are samples xs, ys and dys apart (row ranges of larger batches).
def max_pool(const float[::1] x, Py_ssize_t xs, float[::1] y, Py_ssize_t ys, int[::1] arg,
             int n, int h, int w, int c, int size, int stride, int ho, int wo):
    with nogil:
        max_pool_c(&x[0], xs, &y[0], ys, &arg[0], n, h, w, c, size, stride, ho, wo)


def max_pool_back(const float[::1] dy, Py_ssize_t dys, const int[::1] arg, float[::1] dx,
                  int n, int h, int w, int c, int size, int stride, int ho, int wo, bint tiled):
    with nogil:
        max_pool_back_c(&dy[0], dys, &arg[0], &dx[0], n, h, w, c, size, stride, ho, wo, tiled)


def l2_pool(const float[::1] x, Py_ssize_t xs, float[::1] y, Py_ssize_t ys, int n, int h, int w,
            int c, int size, int stride, int ho, int wo, float eps):
    with nogil:
        l2_pool_c(&x[0], xs, &y[0], ys, n, h, w, c, size, stride, ho, wo, eps)


def l2_pool_back(const float[::1] x, Py_ssize_t xs, const float[::1] y, Py_ssize_t ys,
                 const float[::1] dy, Py_ssize_t dys, float[::1] dx, float[::1] r, int n, int h,
                 int w, int c, int size, int stride, int ho, int wo, bint tiled):
    with nogil:
        l2_pool_back_c(&x[0], xs, &y[0], ys, &dy[0], dys, &dx[0], &r[0], n, h, w, c, size,
                       stride, ho, wo, tiled)


cdef double softmax_xent_c(const float* z, const Py_ssize_t* y, float* dz, int n,
                           int k) noexcept nogil:
    """Mean over rows of log(sum exp z) - z[y]; dz = (softmax(z) - onehot(y)) / n."""
    cdef int s, t
    cdef float m, e
    cdef double tot, loss = 0
    cdef const float* zs
    cdef float* ds
    for s in range(n):
        zs = z + s * <Py_ssize_t>k
        ds = dz + s * <Py_ssize_t>k
        m = zs[0]
        for t in range(1, k):
            m = zs[t] if zs[t] > m else m
        tot = 0
        for t in range(k):
            e = expf(zs[t] - m)
            ds[t] = e
            tot += e
        loss += log(tot) - (zs[y[s]] - m)
        for t in range(k):
            ds[t] = <float>(ds[t] / tot / n)
        ds[y[s]] -= <float>(1.0 / n)
    return loss / n


def softmax_xent(const float[::1] z, const Py_ssize_t[::1] y, float[::1] dz, int n, int k):
    cdef double loss
    with nogil:
        loss = softmax_xent_c(&z[0], &y[0], &dz[0], n, k)
    return loss


# ---- update rules (parameter-server shards apply these once per push) ----------------------

cdef bint all_finite_c(const float* g, Py_ssize_t n) noexcept nogil:
    """Whether every g[i] is finite: no element has an all-ones exponent (NaN or +-Inf)."""
    cdef const unsigned int* u = <const unsigned int*>g
    cdef Py_ssize_t i
    cdef unsigned int bad = 0
    for i in range(n):       # an integer OR-reduction: vectorizes, no early exit needed
        bad |= (u[i] & 0x7f800000u) == 0x7f800000u
    return bad == 0


cdef void sgd_c(float* p, const float* g, Py_ssize_t n, float lr) noexcept nogil:
    """p -= lr * g."""
    cdef Py_ssize_t i
    for i in range(n):
        p[i] -= lr * g[i]


cdef void adagrad_c(float* p, float* acc, const float* g, Py_ssize_t n, float lr,
                    float eps) noexcept nogil:
    """acc += g^2; p -= lr * g / (sqrt(acc) + eps), in one pass."""
    cdef Py_ssize_t i
    cdef float a
    for i in range(n):
        a = acc[i] + g[i] * g[i]
        acc[i] = a
        p[i] -= lr * g[i] / (sqrtf(a) + eps)


def all_finite(const float[::1] g):
    cdef bint ok
    with nogil:
        ok = all_finite_c(&g[0], g.shape[0]) if g.shape[0] else True
    return ok


def sum_sq(const float[::1] x):
    """sum of x**2 in double, one pass, no temporary (see dbmpi_sum_sq in vmath.h)."""
    cdef double s = 0.0
    if x.shape[0]:
        with nogil:
            s = dbmpi_sum_sq(&x[0], x.shape[0])
    return s


def sgd_update(float[::1] p, const float[::1] g, float lr):
    with nogil:
        sgd_c(&p[0], &g[0], p.shape[0], lr)


def adagrad_update(float[::1] p, float[::1] acc, const float[::1] g, float lr, float eps):
    with nogil:
        adagrad_c(&p[0], &acc[0], &g[0], p.shape[0], lr, eps)


cdef void adagrad_delta_c(float* acc, const float* g, float* delta, Py_ssize_t n, float lr,
                          float eps) noexcept nogil:
    """acc += g^2; delta = lr * g / (sqrt(acc) + eps)  (the caller subtracts delta)."""
    cdef Py_ssize_t i
    cdef float a
    for i in range(n):
        a = acc[i] + g[i] * g[i]
        acc[i] = a
        delta[i] = lr * g[i] / (sqrtf(a) + eps)


def adagrad_delta(float[::1] acc, const float[::1] g, float[::1] delta, float lr, float eps):
    with nogil:
        adagrad_delta_c(&acc[0], &g[0], &delta[0], acc.shape[0], lr, eps)


VECTOR_WIDTH = DBMPI_VW   # floats per vector in microgemm.h: batch-last buffers pad to it
ROW_BLOCK = DBMPI_RB      # rows of the microkernel's full blocks


def lcn_forward(const float[::1] x, float[::1] y, float[::1] v, float[::1] d,
                float[::1] scratch, int n, int h, int w, int c, int size, float eps):
    with nogil:
        lcn_forward_c(&x[0], &y[0], &v[0], &d[0], &scratch[0], n, h, w, c, size, eps)


def lcn_backward(const float[::1] dy, const float[::1] v, const float[::1] d, float[::1] dx,
                 float[::1] scratch, int n, int h, int w, int c, int size):
    with nogil:
        lcn_backward_c(&dy[0], &v[0], &d[0], &dx[0], &scratch[0], n, h, w, c, size)
