/* Vectorized activations: sigmoid and tanh over arrays, DBMPI_VW floats at a time.
 *
 * expf per element costs ~5 ns in libm; this exp is the Cephes single-precision one
 * (Cody-Waite reduction x = n ln2 + r, degree-6 polynomial for e^r on |r| <= ln2/2,
 * 2^n built in the exponent bits), within 2 ulp of expf on [-87, 88], on GCC vectors.
 */
#ifndef DBMPI_VMATH_H
#define DBMPI_VMATH_H

#include "microgemm.h"
#include <math.h>

static inline dbmpi_vec dbmpi_vsel(dbmpi_ivec m, dbmpi_vec a, dbmpi_vec b)
{   /* m ? a : b, lane by lane (m is all ones or all zeros) */
    return (dbmpi_vec)(((dbmpi_ivec)a & m) | ((dbmpi_ivec)b & ~m));
}

static inline dbmpi_vec dbmpi_vexp(dbmpi_vec x)
{
    const dbmpi_vec hi = (dbmpi_vec){0} + 88.3762626647949f, lo = (dbmpi_vec){0} - 87.3365447504f;
    x = dbmpi_vsel(x > hi, hi, x);
    x = dbmpi_vsel(x < lo, lo, x);
    const dbmpi_vec magic = (dbmpi_vec){0} + 12582912.0f;     /* 1.5 * 2^23: round to nearest */
    dbmpi_vec n = (x * 1.44269504088896341f + magic) - magic;
    dbmpi_vec r = x - n * 0.693359375f + n * 2.12194440e-4f;
    dbmpi_vec p = (dbmpi_vec){0} + 1.9875691500E-4f;
    p = p * r + 1.3981999507E-3f;
    p = p * r + 8.3334519073E-3f;
    p = p * r + 4.1665795894E-2f;
    p = p * r + 1.6666665459E-1f;
    p = p * r + 5.0000001201E-1f;
    p = p * r * r + r + 1.0f;
    dbmpi_ivec e = (__builtin_convertvector(n, dbmpi_ivec) + 127) << 23;
    return p * (dbmpi_vec)e;
}

/* y = 1 / (1 + e^-y), in place. */
static inline void dbmpi_sigmoid(float *y, ptrdiff_t size)
{
    ptrdiff_t t = 0;
    for (; t + DBMPI_VW <= size; t += DBMPI_VW)
        dbmpi_st(y + t, 1.0f / (1.0f + dbmpi_vexp(-dbmpi_ld(y + t))));
    for (; t < size; t++)
        y[t] = 1.0f / (1.0f + expf(-y[t]));
}

/* tanh: 1 - 2 / (e^2y + 1), and for |y| < 0.625, where that cancels, Cephes' odd polynomial. */
static inline dbmpi_vec dbmpi_vtanh(dbmpi_vec y)
{
    dbmpi_vec z = y * y;
    dbmpi_vec p = (dbmpi_vec){0} - 5.70498872745E-3f;
    p = p * z + 2.06390887954E-2f;
    p = p * z - 5.37397155531E-2f;
    p = p * z + 1.33314422036E-1f;
    p = p * z - 3.33332819422E-1f;
    p = p * z * y + y;
    dbmpi_vec big = 1.0f - 2.0f / (dbmpi_vexp(2.0f * y) + 1.0f);
    return dbmpi_vsel(z < 0.390625f, p, big);
}

/* y = tanh(y), in place. */
static inline void dbmpi_tanh(float *y, ptrdiff_t size)
{
    ptrdiff_t t = 0;
    for (; t + DBMPI_VW <= size; t += DBMPI_VW)
        dbmpi_st(y + t, dbmpi_vtanh(dbmpi_ld(y + t)));
    for (; t < size; t++)
        y[t] = tanhf(y[t]);
}

/* One window position of a max pool over c channels: where x > y, y = x and arg = a.
 * Branch-free with restrict pointers, so it vectorizes (one compare, two blends). */
static inline void dbmpi_max_step(const float *restrict x, float *restrict y,
                                  int *restrict arg, int c, int a)
{
    for (int ch = 0; ch < c; ch++) {
        int gt = x[ch] > y[ch];
        y[ch] = gt ? x[ch] : y[ch];
        arg[ch] = gt ? a : arg[ch];
    }
}

static inline double dbmpi_sum_sq(const float *x, ptrdiff_t n)
{   /* sum of x[i]^2 in one pass and no allocation: squares summed in 4 float vectors over
     * chunks of 256 (AVX2) values, each chunk's sum added in double, so the error stays
     * near double's over millions of terms (a float dot drifts by ~1e-5 relative). */
    const ptrdiff_t chunk = 32 * DBMPI_VW;
    double total = 0.0;
    ptrdiff_t i = 0;
    for (; i + chunk <= n; i += chunk) {
        dbmpi_vec a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        for (ptrdiff_t j = i; j < i + chunk; j += 4 * DBMPI_VW) {
            dbmpi_vec v0 = dbmpi_ld(x + j), v1 = dbmpi_ld(x + j + DBMPI_VW);
            dbmpi_vec v2 = dbmpi_ld(x + j + 2 * DBMPI_VW), v3 = dbmpi_ld(x + j + 3 * DBMPI_VW);
            a0 += v0 * v0; a1 += v1 * v1; a2 += v2 * v2; a3 += v3 * v3;
        }
        a0 = (a0 + a1) + (a2 + a3);
        for (int l = 0; l < DBMPI_VW; l++)
            total += a0[l];
    }
    for (; i < n; i++)
        total += (double)x[i] * x[i];
    return total;
}

#endif
