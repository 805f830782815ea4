import gzip
import struct

import h5py
import numpy as np
import pytest

from dbmpi.data import DataError, check_file, make_idx, make_synthetic, open_split, read_idx


def test_digits(digits_path):
    info = check_file(digits_path, classes=10, input_shape=(1, 8, 8))
    assert info["train"] + info["test"] == 1797 and info["classes"] == 10
    s = open_split(digits_path, "train")
    x, y = s.take([5, 1, 5])
    assert x.shape == (3, 1, 8, 8) and x.dtype == np.float32 and np.array_equal(x[0], x[2])
    assert 0 <= x.min() and x.max() <= 1


def test_reads_without_cache_match_cached(digits_path):
    cached = open_split(digits_path, "test", indices=np.arange(10, 60))
    direct = open_split(digits_path, "test", indices=np.arange(10, 60), cache_mb=0)
    pos = [7, 3, 3, 40, 0]
    for a, b in zip(cached.take(pos), direct.take(pos)):
        assert np.array_equal(a, b)


def test_synthetic(tmp_path):
    p = tmp_path / "s.h5"
    make_synthetic(p, size=20, count=300, test_count=100, progress=False)
    info = check_file(p, 10, (1, 20, 20))
    assert (info["train"], info["test"]) == (300, 100)
    x, y = open_split(p, "train").all()
    assert set(np.unique(y)) <= set(range(10)) and x.std() > 0.1


def _write_idx(path, arr, code):
    with gzip.open(path, "wb") if str(path).endswith(".gz") else open(path, "wb") as f:
        f.write(bytes([0, 0, code, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape))
        f.write(arr.tobytes())


def test_idx_converter(tmp_path):
    rng = np.random.default_rng(0)
    xi = rng.integers(0, 256, (12, 5, 4), dtype=np.uint8)
    yi = rng.integers(0, 3, 12).astype(np.uint8)
    files = {}
    for name, arr in [("tri.gz", xi), ("trl", yi), ("tei", xi[:4]), ("tel.gz", yi[:4])]:
        files[name] = tmp_path / name
        _write_idx(files[name], arr, 0x08)
    out = tmp_path / "m.h5"
    make_idx(out, files["tri.gz"], files["trl"], files["tei"], files["tel.gz"])
    info = check_file(out)
    assert info["shape"] == [1, 5, 4] and info["classes"] == int(yi.max()) + 1
    x, y = open_split(out, "train").all()
    assert np.allclose(x[:, 0] * 255, xi) and np.array_equal(y, yi)
    bad = tmp_path / "bad"
    bad.write_bytes(open(files["trl"], "rb").read()[:-3])
    with pytest.raises(DataError, match="bad: IDX data has"):
        read_idx(bad)


def _copy(digits_path, tmp_path, edit):
    p = tmp_path / "d.h5"
    p.write_bytes(digits_path.read_bytes())
    with h5py.File(p, "a") as f:
        edit(f)
    return p


@pytest.mark.parametrize("edit,match", [
    (lambda f: f.__delitem__("test"), "group 'test' is missing"),
    (lambda f: f["train"].__delitem__("y"), "'train/y' is missing"),
    (lambda f: f.attrs.__delitem__("classes"), "'classes' is missing"),
    (lambda f: f["train"]["x"].__setitem__((3, 0, 0, 0), np.nan), r"'train/x'\[3\] holds NaN"),
    (lambda f: f["test"]["y"].__setitem__(7, 12), r"'test/y'\[7\] = 12 is out of range"),
    (lambda f: (f["test"].__delitem__("x"), f["test"].create_dataset("x", data=np.zeros((449, 8, 8), np.float32))), "'test/x' has shape"),
    (lambda f: (f["test"].__delitem__("x"), f["test"].create_dataset("x", data=np.zeros((449, 1, 8, 8)))), "dtype float64"),
    (lambda f: (f["test"].__delitem__("y"), f["test"].create_dataset("y", data=np.zeros(3, np.int32))), "449 samples but 'test/y' has 3"),
])
def test_bad_files(digits_path, tmp_path, edit, match):
    p = _copy(digits_path, tmp_path, edit)
    with pytest.raises(DataError, match=f"{p.name}.*{match}|{match}"):
        check_file(p, 10)


def test_missing_truncated_mismatched(digits_path, tmp_path):
    with pytest.raises(DataError, match="nope.h5: dataset file not found"):
        check_file(tmp_path / "nope.h5")
    t = tmp_path / "t.h5"
    t.write_bytes(digits_path.read_bytes()[:20000])
    with pytest.raises(DataError, match="t.h5: .*truncated"):
        check_file(t)
    with pytest.raises(DataError, match="model.input_shape is \\[1, 16, 16\\]"):
        check_file(digits_path, 10, (1, 16, 16))
    with pytest.raises(DataError, match="softmax has 4 classes"):
        check_file(digits_path, 4)


def test_ranks_reading_the_same_samples_share_one_cache_per_node(digits_path):
    """A replica's partitions all read every sample: on one node they hold one cache, in
    MPI shared memory, read once; what they see is what a private cache holds."""
    import json

    from conftest import ROOT, run_mpi
    r = run_mpi(2, ROOT / "tests" / "mpi_shared_cache.py", digits_path, module=False,
                timeout=60)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert [d["shared"] for d in res] == [True, True]
    assert all(d["same"] and not d["writable"] for d in res)
    assert [d["seen"] for d in res] == [1234.5, 1234.5]      # one memory
    assert [d["uncached_shared"] for d in res] == [False, False]
    assert res[0]["labels"] == res[1]["labels"]


def test_write_dataset_replaces_whole_or_not_at_all(tmp_path):
    """A write that fails leaves the previous file as it was and no temporary beside it; a
    write that succeeds replaces it."""
    from dbmpi.data import write_dataset
    p = tmp_path / "d.h5"
    x = np.zeros((4, 1, 2, 2), np.float32)
    write_dataset(p, (x, [0, 1, 0, 1]), (x[:2], [1, 0]), 2, "first")
    before = p.read_bytes()
    with pytest.raises(ValueError):
        write_dataset(p, (x, [0, 1, 0, 1]), (np.array([["not a number"]]), [1]), 2, "second")
    assert p.read_bytes() == before
    assert sorted(q.name for q in tmp_path.iterdir()) == ["d.h5"]
    write_dataset(p, (x, [0, 1, 0, 1]), (x[:1], [1]), 2, "third")
    info = check_file(p, classes=2)
    assert info["source"] == "third" and info["test"] == 1
    assert sorted(q.name for q in tmp_path.iterdir()) == ["d.h5"]
