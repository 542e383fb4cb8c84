"""Tests of cpl_mini.cifar: reading CIFAR safely from the official archives, with bounded memory.

The CIFAR tests build small archives in the exact official layout (Python-2-era pickles written
opcode by opcode, as the official files are), so they need no download; for them the format's row counts
are shrunk to the synthetic ones (:func:`use_rows`). The format checks themselves are tested at the real
sizes, hostile files in a subprocess whose peak memory is measured, and one module fixture reads the real
offline archive (``$CPL_MINI_DATA`` or ``<repo>/../shared/data``).
"""

import dataclasses
import gzip
import hashlib
import io
import json
import os
import pickle
import re
import shlex
import struct
import subprocess
import sys
import tarfile
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from cpl_mini import cifar as C
from cpl_mini.cifar import (
    CIFAR_CLASSES,
    ArchiveChecksumWarning,
    CifarData,
    CorruptArchiveError,
    UnsafePickleError,
    clear_cache,
    default_data_root,
    load_cifar,
)

REPO = Path(__file__).resolve().parents[1]
C10 = "cifar-10-batches-py"
C10_ARCHIVE = "cifar-10-python.tar.gz"


# ----------------------------------------------------------------------------------------------------
# Building archives in the official layout
# ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Claim:
    """An array as a pickle may describe it: any ``shape``, any ``payload``, any ``_reconstruct`` shape."""

    shape: tuple
    payload: bytes
    recon: tuple = (0,)


def py2_pickle(obj) -> bytes:
    """Protocol-2 pickle as Python 2 + numpy 1.x wrote the official batches.

    Strings are Python-2 ``str`` (BINSTRING opcodes, read back as ``bytes`` with ``encoding="bytes"``);
    arrays go through ``numpy.core.multiarray._reconstruct`` with their raw bytes as one string
    (a :class:`Claim` is written the same way with whatever shape and payload it says).
    """
    out = [b"\x80\x02"]

    def emit_tuple(items):
        if 1 <= len(items) <= 3:
            for v in items:
                emit(v)
            out.append(b"\x85\x86\x87"[len(items) - 1 : len(items)])  # TUPLE1/2/3
        else:
            out.append(b"(")
            for v in items:
                emit(v)
            out.append(b"t")

    def emit(o):
        if isinstance(o, dict):
            out.append(b"}(")
            for k, v in o.items():
                emit(k)
                emit(v)
            out.append(b"u")
        elif isinstance(o, list):
            out.append(b"](")
            for v in o:
                emit(v)
            out.append(b"e")
        elif o is None:
            out.append(b"N")
        elif isinstance(o, int):
            out.append(b"K" + bytes([o]) if 0 <= o < 256 else b"J" + struct.pack("<i", o))
        elif isinstance(o, float):
            out.append(b"G" + struct.pack(">d", o))
        elif isinstance(o, bytes):
            out.append(b"U" + bytes([len(o)]) + o if len(o) < 256 else b"T" + struct.pack("<I", len(o)) + o)
        elif isinstance(o, (np.ndarray, Claim)):
            if isinstance(o, np.ndarray):
                assert o.dtype == np.uint8 and o.ndim == 2 and o.flags.c_contiguous
                o = Claim(o.shape, o.tobytes())
            out.append(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n")
            emit_tuple(o.recon)  # (0,)
            emit(b"b")
            out.append(b"\x87R(")  # TUPLE3, REDUCE, MARK of the state
            emit(1)
            emit_tuple(o.shape)
            out.append(b"cnumpy\ndtype\n")
            emit(b"u1")
            emit(0)
            emit(1)
            out.append(b"\x87R(")  # dtype('u1', 0, 1), then its state
            emit(3)
            emit(b"|")
            out.append(b"NNN")
            emit(-1)
            emit(-1)
            emit(0)
            out.append(b"tb\x89")  # BUILD the dtype, is_fortran False
            emit(o.payload)
            out.append(b"tb")  # BUILD the array
        else:
            raise TypeError(type(o))

    emit(obj)
    out.append(b".")
    return b"".join(out)


def rows_of(images: np.ndarray) -> np.ndarray:
    """(N, 3, 32, 32) -> (N, 3072) rows: the red plane, then green, then blue, each row-major."""
    return np.stack([np.concatenate([img[0].ravel(), img[1].ravel(), img[2].ravel()]) for img in images])


@dataclasses.dataclass
class Synthetic:
    files: dict  # member file name -> bytes
    train_x: np.ndarray  # (N, 3, 32, 32) uint8
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: list


def synthetic_cifar10(n_per_batch=7, n_test=9, seed=0) -> Synthetic:
    rng = np.random.default_rng(seed)
    files, xs, ys = {}, [], []
    for i in range(1, 6):
        x = rng.integers(0, 256, (n_per_batch, 3, 32, 32), dtype=np.uint8)
        y = rng.integers(0, 10, n_per_batch)
        files[f"data_batch_{i}"] = py2_pickle(
            {
                b"batch_label": f"training batch {i} of 5".encode(),
                b"labels": [int(v) for v in y],
                b"data": rows_of(x),
                b"filenames": [f"img_{i}_{k}.png".encode() for k in range(n_per_batch)],
            }
        )
        xs.append(x)
        ys.append(y)
    tx = rng.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8)
    ty = rng.integers(0, 10, n_test)
    files["test_batch"] = py2_pickle(
        {
            b"batch_label": b"testing batch 1 of 1",
            b"labels": [int(v) for v in ty],
            b"data": rows_of(tx),
            b"filenames": [b"t.png"] * n_test,
        }
    )
    files["batches.meta"] = py2_pickle(
        {b"num_cases_per_batch": 10000, b"num_vis": 3072, b"label_names": [c.encode() for c in CIFAR_CLASSES]}
    )
    return Synthetic(files, np.concatenate(xs), np.concatenate(ys), tx, ty, list(CIFAR_CLASSES))


def write_tar(path: Path, folder: str, files: dict) -> Path:
    """A tar.gz packed like the official one: the folder entry, then its members."""
    with tarfile.open(path, "w:gz") as tf:
        d = tarfile.TarInfo(folder)
        d.type, d.mode = tarfile.DIRTYPE, 0o755
        tf.addfile(d)
        for name, payload in {**files, "readme.html": b"<html></html>"}.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    return path


def write_folder(root: Path, folder: str, files: dict) -> Path:
    (root / folder).mkdir(parents=True)
    for name, payload in files.items():
        (root / folder / name).write_bytes(payload)
    return root / folder


def assert_matches(data: CifarData, syn: Synthetic):
    assert data.train_images.dtype == torch.uint8 and data.train_labels.dtype == torch.int64
    assert data.train_images.shape == (len(syn.train_y), 3, 32, 32)
    assert torch.equal(data.train_images, torch.from_numpy(syn.train_x))
    assert torch.equal(data.train_labels, torch.from_numpy(syn.train_y).long())
    assert torch.equal(data.test_images, torch.from_numpy(syn.test_x))
    assert torch.equal(data.test_labels, torch.from_numpy(syn.test_y).long())
    assert data.classes == syn.classes


def use_rows(monkeypatch, name: str, train_rows: int, test_rows: int) -> None:
    """Shrink the row counts the format demands to those of a synthetic data set (for this test only)."""
    monkeypatch.setitem(
        C._SPECS, name, dataclasses.replace(C._SPECS[name], train_rows=train_rows, test_rows=test_rows)
    )


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tensors are small: one intra-op thread is as fast and kinder to a shared CPU."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def syn(monkeypatch):
    use_rows(monkeypatch, "cifar10", 7, 9)
    return synthetic_cifar10()


# ----------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------
def test_archive_roundtrip(tmp_path, syn):
    write_tar(tmp_path / C10_ARCHIVE, C10, syn.files)
    with pytest.warns(ArchiveChecksumWarning, match="not a known copy") as rec:
        data = load_cifar("cifar10", root=tmp_path, download=False)
    assert len([r for r in rec if r.category is ArchiveChecksumWarning]) == 1
    assert_matches(data, syn)
    assert data.name == "cifar10" and "train=35" in repr(data)
    # pixel (c, i, j) of picture k is byte c*1024 + 32*i + j of its row, checked at one spot
    row = rows_of(syn.train_x[3:4])[0]
    assert data.train_images[3, 2, 5, 7] == row[2 * 1024 + 32 * 5 + 7]


def test_folder_roundtrip(tmp_path, syn):
    folder = write_folder(tmp_path, C10, syn.files)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no checksum warning for a folder
        assert_matches(load_cifar(root=tmp_path, download=False), syn)
        assert_matches(load_cifar(root=folder, download=False, cache=False), syn)  # root = the folder


def test_python3_pickles_are_read_too(tmp_path, syn):
    """Batches re-pickled by Python 3 (protocol 2 uses _codecs.encode; 4 uses numpy._core)."""
    files = dict(syn.files)
    for proto, name in [(2, "data_batch_1"), (4, "data_batch_2")]:
        d = pickle.loads(files[name], encoding="bytes")
        files[name] = pickle.dumps(d, protocol=proto)
    assert b"_codecs" in files["data_batch_1"] and b"numpy._core" in files["data_batch_2"]
    write_folder(tmp_path, C10, files)
    assert_matches(load_cifar(root=tmp_path, download=False), syn)


def test_cifar100_fine_labels(tmp_path, monkeypatch):
    use_rows(monkeypatch, "cifar100", 11, 5)
    rng = np.random.default_rng(1)
    x, tx = (rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8) for n in (11, 5))
    fine, tfine = rng.integers(0, 100, 11), rng.integers(0, 100, 5)
    names = [f"class_{k:02d}" for k in range(100)]
    files = {
        "train": py2_pickle(
            {
                b"data": rows_of(x),
                b"fine_labels": [int(v) for v in fine],
                b"coarse_labels": [int(v) // 5 for v in fine],
            }
        ),
        "test": py2_pickle(
            {
                b"data": rows_of(tx),
                b"fine_labels": [int(v) for v in tfine],
                b"coarse_labels": [int(v) // 5 for v in tfine],
            }
        ),
        "meta": py2_pickle(
            {
                b"fine_label_names": [n.encode() for n in names],
                b"coarse_label_names": [f"super_{k}".encode() for k in range(20)],
            }
        ),
    }
    write_tar(tmp_path / "cifar-100-python.tar.gz", "cifar-100-python", files)
    with pytest.warns(ArchiveChecksumWarning):
        data = load_cifar("cifar100", root=tmp_path, download=False)
    assert_matches(data, Synthetic(files, x, fine, tx, tfine, names))
    assert data.num_classes == 100


def test_cache_and_reload(tmp_path, syn, monkeypatch):
    path = write_tar(tmp_path / C10_ARCHIVE, C10, syn.files)
    with pytest.warns(ArchiveChecksumWarning):
        first = load_cifar(root=tmp_path, download=False)

    def boom(*a, **k):
        raise AssertionError("read again")

    with monkeypatch.context() as m:
        m.setattr(C, "_read_archive", boom)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a cache hit warns no more
            assert load_cifar(root=tmp_path, download=False) is first
    # a changed file is read again
    other = synthetic_cifar10(seed=5)
    write_tar(path, C10, other.files)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.warns(ArchiveChecksumWarning):
        assert_matches(load_cifar(root=tmp_path, download=False), other)
    assert sum(k[1] == str(path.resolve()) for k in C._CACHE) == 1  # the stale split was dropped


def test_default_data_root(monkeypatch, tmp_path):
    monkeypatch.setenv("CPL_MINI_DATA", str(tmp_path / "d"))
    assert default_data_root() == tmp_path / "d"
    monkeypatch.delenv("CPL_MINI_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_data_root() == tmp_path / "xdg" / "cpl_mini"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_data_root() == tmp_path / "home" / ".cache" / "cpl_mini"


def test_unknown_name():
    with pytest.raises(ValueError, match="cifar100"):
        load_cifar("mnist")


# ----------------------------------------------------------------------------------------------------
# Hostile and damaged files
# ----------------------------------------------------------------------------------------------------
class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"echo pwned > {shlex.quote(str(self.marker))}",)


class _OpensFile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("payload", [_RunsShell, _OpensFile])
@pytest.mark.parametrize("form", ["archive", "folder"])
def test_hostile_pickle_is_refused_and_not_run(tmp_path, syn, payload, form):
    marker = tmp_path / "marker"
    files = dict(syn.files)
    files["data_batch_2"] = pickle.dumps({b"labels": [0], b"data": payload(marker)}, protocol=2)
    if form == "archive":
        write_tar(tmp_path / C10_ARCHIVE, C10, files)
    else:
        write_folder(tmp_path, C10, files)
    with pytest.raises(pickle.UnpicklingError, match=r"refused to load the global .*(system|open)") as e:
        load_cifar(root=tmp_path, download=False)
    assert not marker.exists()
    assert isinstance(e.value, UnsafePickleError) and f"{C10}/data_batch_2: refused" in str(e.value)


def test_allowed_module_but_not_allowed_name(tmp_path, syn):
    files = dict(syn.files)
    files["test_batch"] = b"\x80\x02cnumpy\nload\nU\x04evilq\x00\x85R."
    write_folder(tmp_path, C10, files)
    with pytest.raises(pickle.UnpicklingError, match="numpy.load"):
        load_cifar(root=tmp_path, download=False)


def test_truncated_archive(tmp_path, syn):
    path = write_tar(tmp_path / C10_ARCHIVE, C10, syn.files)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CorruptArchiveError, match=rf"{C10_ARCHIVE}.*delete it and download it again") as e:
        load_cifar(root=tmp_path, download=False)
    assert isinstance(e.value, ValueError) and str(path) in str(e.value)


def test_flipped_bit_is_caught_by_the_gzip_crc(tmp_path, syn):
    """tarfile's own gzip stream does not check the CRC; a flipped bit must not give silent garbage."""
    path = write_tar(tmp_path / C10_ARCHIVE, C10, syn.files)
    raw = bytearray(path.read_bytes())
    for k, pos in enumerate(range(200, len(raw) - 8, len(raw) // 5)):
        bad = bytearray(raw)
        bad[pos] ^= 1 << (k % 8)
        path.write_bytes(bytes(bad))
        with pytest.raises(CorruptArchiveError, match=C10_ARCHIVE):
            load_cifar(root=tmp_path, download=False, cache=False)


def test_not_an_archive(tmp_path):
    (tmp_path / C10_ARCHIVE).write_bytes(b"<html>404 not found</html>")
    with pytest.raises(CorruptArchiveError, match="delete it"):
        load_cifar(root=tmp_path, download=False)


@pytest.mark.parametrize(
    "damage, match",
    [
        ("missing_member", "missing member.*test_batch"),
        ("bad_shape", r"data_batch_3.*\(N, 3072\)"),
        ("bad_labels", "data_batch_4: 7 images but labels"),
    ],
)
def test_wrong_content(tmp_path, syn, damage, match):
    files = dict(syn.files)
    if damage == "missing_member":
        del files["test_batch"]
    elif damage == "bad_shape":
        files["data_batch_3"] = py2_pickle({b"labels": [1] * 7, b"data": np.zeros((7, 3000), np.uint8)})
    else:
        files["data_batch_4"] = py2_pickle({b"labels": [1] * 6, b"data": np.zeros((7, 3072), np.uint8)})
    write_tar(tmp_path / C10_ARCHIVE, C10, files)
    with pytest.raises(CorruptArchiveError, match=match):
        load_cifar(root=tmp_path, download=False)


def test_incomplete_folder(tmp_path, syn):
    files = dict(syn.files)
    del files["data_batch_5"]
    write_folder(tmp_path, C10, files)
    with pytest.raises(CorruptArchiveError, match="missing data_batch_5"):
        load_cifar(root=tmp_path, download=False)


# ----------------------------------------------------------------------------------------------------
# Missing data and download
# ----------------------------------------------------------------------------------------------------
def test_missing_without_download(tmp_path):
    root = tmp_path / "empty"
    with pytest.raises(FileNotFoundError) as e:
        load_cifar(root=root, download=False)
    msg = str(e.value)
    assert str(root) in msg and C10_ARCHIVE in msg and "CPL_MINI_DATA" in msg and "download=False" in msg


def test_unreachable_url(tmp_path):
    root = tmp_path / "root"
    url = (tmp_path / "nowhere" / C10_ARCHIVE).as_uri()
    with pytest.raises(FileNotFoundError) as e:
        load_cifar(root=root, url=url)
    msg = str(e.value)
    assert str(root) in msg and C10_ARCHIVE in msg and url in msg and "by hand" in msg
    assert list(root.iterdir()) == []  # no temp file left


def test_download_from_file_url(tmp_path, syn, monkeypatch):
    src = write_tar(tmp_path / "mirror.tar.gz", C10, syn.files)
    md5 = hashlib.md5(src.read_bytes()).hexdigest()
    monkeypatch.setitem(C._SPECS, "cifar10", dataclasses.replace(C._SPECS["cifar10"], md5=md5))
    root = tmp_path / "root"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # verified download: no checksum warning
        data = load_cifar(root=root, url=src.as_uri())
    assert_matches(data, syn)
    assert sorted(p.name for p in root.iterdir()) == [C10_ARCHIVE]
    assert (root / C10_ARCHIVE).read_bytes() == src.read_bytes()


def test_download_with_wrong_md5(tmp_path, syn, monkeypatch):
    src = write_tar(tmp_path / "mirror.tar.gz", C10, syn.files)
    monkeypatch.setitem(C._SPECS, "cifar10", dataclasses.replace(C._SPECS["cifar10"], md5="0" * 32))
    root = tmp_path / "root"
    with pytest.raises(CorruptArchiveError, match="md5"):
        load_cifar(root=root, url=src.as_uri())
    assert list(root.iterdir()) == []


# ----------------------------------------------------------------------------------------------------
# The real offline archive
# ----------------------------------------------------------------------------------------------------
def _real_root():
    for cand in (os.environ.get("CPL_MINI_DATA"), REPO.parent / "shared" / "data"):
        if cand and (Path(cand) / C10_ARCHIVE).is_file():
            return Path(cand)
    return None


@pytest.fixture(scope="module")
def real():
    root = _real_root()
    if root is None:
        pytest.skip(f"no {C10_ARCHIVE} under $CPL_MINI_DATA or {REPO.parent / 'shared' / 'data'}")
    clear_cache()  # read it now (and keep it for the other test modules of this run)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        data = load_cifar("cifar10", root=root, download=False)
    return data, [r for r in rec if issubclass(r.category, ArchiveChecksumWarning)]


_REAL_MEAN = {}


def real_mean(data):
    """Per-channel mean of the training pictures on the [0, 1] scale, from exact integer sums."""
    if "m" not in _REAL_MEAN:
        n = data.train_images.shape[0]
        sums = data.train_images.numpy().reshape(n, 3, 1024).sum(axis=(0, 2), dtype=np.int64)
        _REAL_MEAN["m"] = torch.from_numpy(sums).double() / (n * 1024 * 255)
    return _REAL_MEAN["m"]


def test_real_archive(real):
    data, warned = real
    assert data.train_images.shape == (50000, 3, 32, 32) and data.train_images.dtype == torch.uint8
    assert data.test_images.shape == (10000, 3, 32, 32)
    assert data.classes == list(CIFAR_CLASSES)
    assert torch.equal(torch.bincount(data.train_labels, minlength=10), torch.full((10,), 5000))
    assert torch.equal(torch.bincount(data.test_labels, minlength=10), torch.full((10,), 1000))
    # Per-channel means (exact integer sums) match the published CIFAR-10 values: a wrong pixel layout
    # (e.g. channels interleaved) would mix them.
    mean = real_mean(data)
    assert torch.allclose(mean, torch.tensor([0.4914, 0.4822, 0.4465], dtype=torch.float64), atol=3e-3)
    # one warning at most, naming the offline copy when it is that one (no warning: the official file)
    assert len(warned) <= 1
    if warned and "04e799a5afef87acf840ae5df223ebd0" in str(warned[0].message):
        assert "known offline copy" in str(warned[0].message) and "JPEG" in str(warned[0].message)


# ----------------------------------------------------------------------------------------------------
# The format is checked before anything is allocated, at the real sizes
# ----------------------------------------------------------------------------------------------------
OFFICIAL_ROWS = 10000  # of every CIFAR-10 batch


def gz_tar(*parts: bytes) -> bytes:
    """gzip of raw tar blocks (headers from ``TarInfo.tobuf``, padded payloads), then the end marker."""
    return gzip.compress(b"".join(parts) + bytes(1024), compresslevel=1)


def tar_member(name: str, payload: bytes, size=None, kind=tarfile.REGTYPE) -> bytes:
    """One tar member whose header may claim any ``size`` (GNU format: base-256 for huge sizes)."""
    info = tarfile.TarInfo(name)
    info.size, info.type = len(payload) if size is None else size, kind
    return info.tobuf(format=tarfile.GNU_FORMAT) + payload + bytes(-len(payload) % 512)


def official_batch(rows=OFFICIAL_ROWS, labels=None) -> bytes:
    """A CIFAR-10 training batch of ``rows`` black pictures (the official opcodes)."""
    labels = [k % 10 for k in range(rows)] if labels is None else labels
    return py2_pickle(
        {
            b"batch_label": b"training batch 1 of 5",
            b"labels": labels,
            b"data": np.zeros((rows, 3072), np.uint8),
        }
    )


def only_data_batch_1(root: Path, payload: bytes, form: str) -> Path:
    """A CIFAR-10 whose data_batch_1 is ``payload`` (the other files are empty: never reached)."""
    if form == "folder":
        write_folder(root, C10, {f: b"" for f in C._SPECS["cifar10"].needed()})
        (root / C10 / "data_batch_1").write_bytes(payload)
    else:
        (root / C10_ARCHIVE).write_bytes(gz_tar(tar_member(f"{C10}/data_batch_1", payload)))
    return root


@pytest.mark.parametrize("form", ["archive", "folder"])
@pytest.mark.parametrize(
    "damage, match",
    [
        ("9999 rows", r"data_batch_1: refused a uint8 array of shape \(9999, 3072\) .*N = 10000"),
        ("label 10", r"data_batch_1: labels b'labels' outside \[0, 10\) \(min 0, max 10\)"),
        ("label -1", r"data_batch_1: labels b'labels' outside \[0, 10\) \(min -1, max 9\)"),
        ("9999 labels", r"data_batch_1: 10000 images but labels b'labels' of shape \(9999,\)"),
    ],
    ids=["9999 rows", "label 10", "label -1", "9999 labels"],
)
def test_batches_must_fit_the_official_format(tmp_path, form, damage, match):
    rows = 9999 if damage == "9999 rows" else OFFICIAL_ROWS
    labels = [k % 10 for k in range(rows)]
    if damage.startswith("label "):
        labels[1234] = int(damage.split()[1])
    elif damage == "9999 labels":
        labels = labels[:9999]
    only_data_batch_1(tmp_path, official_batch(rows, labels), form)
    with pytest.raises(CorruptArchiveError, match=match) as e:
        load_cifar(root=tmp_path, download=False)
    named = tmp_path / C10_ARCHIVE if form == "archive" else tmp_path / C10 / "data_batch_1"
    assert str(named) in str(e.value)


def test_cifar100_coarse_labels_are_checked_too(tmp_path, monkeypatch):
    use_rows(monkeypatch, "cifar100", 3, 2)

    def batch(n, coarse):
        return py2_pickle(
            {b"data": np.zeros((n, 3072), np.uint8), b"fine_labels": [99] * n, b"coarse_labels": coarse}
        )

    files = {
        "train": batch(3, [19, 0, 20]),
        "test": batch(2, [0, 0]),
        "meta": py2_pickle({b"fine_label_names": [b"x"] * 100}),
    }
    write_folder(tmp_path, "cifar-100-python", files)
    with pytest.raises(CorruptArchiveError, match=r"train: labels b'coarse_labels' outside \[0, 20\)"):
        load_cifar("cifar100", root=tmp_path, download=False)
    files["train"] = py2_pickle({b"data": np.zeros((3, 3072), np.uint8), b"fine_labels": [99] * 3})
    (tmp_path / "cifar-100-python" / "train").write_bytes(files["train"])
    with pytest.raises(CorruptArchiveError, match=r"b'coarse_labels' should be a list of 3 integer labels"):
        load_cifar("cifar100", root=tmp_path, download=False)


def test_unexpected_large_member_is_refused(tmp_path, syn):
    members = [tar_member(f"{C10}/{name}", payload) for name, payload in syn.files.items()]
    members.insert(2, tar_member(f"{C10}/extra.bin", bytes(2 << 20)))
    (tmp_path / C10_ARCHIVE).write_bytes(gz_tar(*members))
    with pytest.raises(CorruptArchiveError, match=rf"unexpected member {C10}/extra.bin of 2097152 bytes"):
        load_cifar(root=tmp_path, download=False)


def test_member_claiming_a_huge_size_is_refused(tmp_path, syn):
    members = [tar_member(f"{C10}/{name}", payload) for name, payload in syn.files.items()]
    members[3] = tar_member(f"{C10}/data_batch_4", b"tiny", size=10**12)
    (tmp_path / C10_ARCHIVE).write_bytes(gz_tar(*members))
    with pytest.raises(
        CorruptArchiveError,
        match=r"member cifar-10-batches-py/data_batch_4 claims "
        r"1000000000000 bytes, more than a CIFAR-10 data_batch_4",
    ):
        load_cifar(root=tmp_path, download=False)


def test_data_past_the_tar_end_is_bounded(tmp_path, syn):
    """A gzip stream that goes on after the tar's end (a compression bomb) is cut at the format's size."""
    members = [tar_member(f"{C10}/{name}", payload) for name, payload in syn.files.items()]
    limit = sum(C._SPECS["cifar10"].cap(f) for f in C._SPECS["cifar10"].needed()) + (8 << 20)
    tail = bytes(limit + (1 << 20))
    stream = b"".join(members) + bytes(1024) + tail
    (tmp_path / C10_ARCHIVE).write_bytes(gzip.compress(stream, compresslevel=1))
    with pytest.raises(CorruptArchiveError, match=rf"{C10_ARCHIVE} .*decompresses to more than {limit} "):
        load_cifar(root=tmp_path, download=False)


@pytest.mark.parametrize(
    "damage, match",
    [
        ("65 members", r"more than 64 tar members"),
        ("twice", rf"member {C10}/data_batch_2 appears twice"),
        ("sparse", rf"member {C10}/data_batch_2 is a sparse file"),
    ],
)
def test_tar_layouts_the_format_never_uses(tmp_path, syn, damage, match):
    members = [tar_member(f"{C10}/{name}", payload) for name, payload in syn.files.items()]
    if damage == "65 members":
        members = [tar_member(f"{C10}/note{k}.txt", b"x") for k in range(65)] + members
    elif damage == "twice":
        members.insert(2, members[1])
    else:
        members[1] = tar_member(f"{C10}/data_batch_2", syn.files["data_batch_2"], kind=tarfile.GNUTYPE_SPARSE)
    (tmp_path / C10_ARCHIVE).write_bytes(gz_tar(*members))
    with pytest.raises(CorruptArchiveError, match=match):
        load_cifar(root=tmp_path, download=False)


def test_oversized_folder_file_is_refused(tmp_path, syn):
    files = dict(syn.files)
    cap = C._SPECS["cifar10"].cap("data_batch_3")
    files["data_batch_3"] = files["data_batch_3"] + bytes(cap)  # a valid pickle, then padding
    write_folder(tmp_path, C10, files)
    with pytest.raises(CorruptArchiveError, match=rf"{C10}/data_batch_3 has more than the {cap} bytes"):
        load_cifar(root=tmp_path, download=False)


@pytest.mark.parametrize(
    "damage, match",
    [
        ("two pixel arrays", r"holds more arrays than a CIFAR batch"),
        ("5000 opcodes", r"has more than 4152 pickle opcodes"),
        ("dtype with fields", r"refused a dtype state that is not numpy's own"),
        ("float labels", r"b'labels' should be a list of 7 integer labels"),
    ],
)
def test_pickles_the_format_never_uses(tmp_path, syn, damage, match):
    """With 7 rows a batch may hold one (7, 3072) uint8 array, 8 * 7 + 4096 opcodes, integer labels."""
    pixels = np.zeros((7, 3072), np.uint8)
    batch = {b"labels": [1] * 7, b"data": pixels}
    if damage == "two pixel arrays":
        batch[b"more"] = pixels
    elif damage == "5000 opcodes":
        batch[b"filenames"] = [None] * 5000
    elif damage == "float labels":
        batch[b"labels"] = [0.5] * 7
    payload = py2_pickle(batch)
    if damage == "dtype with fields":
        payload = payload.replace(b"U\x01|NNN", b"U\x01|N]NN")
    files = {**syn.files, "data_batch_2": payload}
    write_folder(tmp_path, C10, files)
    with pytest.raises(CorruptArchiveError, match=rf"{C10}/data_batch_2: .*{match}"):
        load_cifar(root=tmp_path, download=False)


# ----------------------------------------------------------------------------------------------------
# Hostile files: refused quickly, with a small peak memory (measured in a subprocess)
# ----------------------------------------------------------------------------------------------------
def ops_of(claim: Claim) -> bytes:
    """The opcodes of one array alone (no protocol header, no STOP)."""
    return py2_pickle(claim)[2:-1]


def batch_with(data_ops: bytes, proto: bytes = b"\x80\x02") -> bytes:
    """A batch pickle ``{b'labels': [1], b'data': <data_ops>}`` with ``data_ops`` given as raw opcodes."""
    return proto + b"}(U\x06labels](K\x01eU\x04data" + data_ops + b"u."


def hex_bomb(levels: int) -> bytes:
    """``_codecs.encode(... _codecs.encode(b'ab', 'hex') ..., 'hex')``: doubles ``levels`` times."""
    ops = b"U\x02ab"
    for _ in range(levels):
        ops = b"c_codecs\nencode\n(" + ops + b"X\x03\x00\x00\x00hextR"
    return batch_with(ops)


def object_array(n: int) -> bytes:
    """numpy's own opcodes for an object array of ``n`` entries whose state carries an empty list."""
    return batch_with(
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R("
        b"K\x01J" + struct.pack("<i", n) + b"\x85cnumpy\ndtype\nU\x02O8K\x00K\x01\x87R("
        b"K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK?tb\x89](etb"
    )


BOMB = 256 << 20  # bytes of zeros behind a tar header that claims them


@pytest.fixture(scope="module")
def zeros_gz():
    """A gzip member of BOMB zero bytes (1 MB on disk); gzip members concatenate into one stream."""
    c = zlib.compressobj(1, zlib.DEFLATED, 31)
    chunk = bytes(1 << 20)
    return b"".join([c.compress(chunk) for _ in range(BOMB >> 20)] + [c.flush()])


# name -> (data_batch_1 pickle, or a builder of the tar.gz from BOMB zeros, expected message)
HOSTILE = {
    "state asks for (10**9,)": (
        batch_with(ops_of(Claim((10**9,), b"abcd"))),
        r"refused a uint8 array of shape \(1000000000,\) \(1000000000 bytes\) before "
        r"allocating it",
    ),
    "state asks for (10000, 10**6)": (
        batch_with(ops_of(Claim((10000, 10**6), b"abcd"))),
        r"refused a uint8 array of shape \(10000, 1000000\)",
    ),
    "payload shorter than shape": (
        batch_with(ops_of(Claim((10000, 3072), b"abcd"))),
        r"payload holds 4 bytes, not the 30720000 bytes that shape needs",
    ),
    "_reconstruct asks for (10**9,)": (
        batch_with(ops_of(Claim((1,), b"a", recon=(10**9,)))),
        r"refused numpy's _reconstruct with other arguments",
    ),
    "numpy.ndarray called": (
        batch_with(
            b"cnumpy\nndarray\n(J" + struct.pack("<i", 10**9) + b"tcnumpy\ndtype\nU\x02u1K\x00K\x01\x87R\x86R"
        ),
        r"calls numpy.ndarray itself",
    ),
    "bytes8 claims 10**9": (
        batch_with(b"\x8e" + (10**9).to_bytes(8, "little") + b"abcd", b"\x80\x04"),
        r"not a valid pickle \(expected 1000000000 bytes in a bytes8, but only \d+ ",
    ),
    "tar member of 256 MiB": (
        lambda z: gzip.compress(tar_member(f"{C10}/data_batch_1", b"", size=BOMB)) + z,
        rf"member {C10}/data_batch_1 claims {BOMB} bytes",
    ),
    "pax header of 256 MiB": (
        lambda z: gzip.compress(tar_member("././@PaxHeader", b"", size=BOMB, kind=tarfile.XHDTYPE)) + z,
        rf"an extended tar header before offset 0 claims {BOMB} bytes",
    ),
    # last: they touch memory when let through (ru_maxrss is a high-water mark, so it would hide later cases)
    "hex bomb": (hex_bomb(28), r"refused _codecs.encode other than str -> latin-1"),
    "memo slot 2**26": (batch_with(b"Nr" + struct.pack("<I", 2**26)), r"asks for memo slot 67108864"),
    "object array": (object_array(10**8), r"refused the dtype 'O8'"),  # numpy itself crashes on this one
}

CHILD = r"""
import json, resource, sys, time, tracemalloc
from cpl_mini import cifar

def vm_kb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmSize:"))

# Address space: what is mapped now + 1.5 GB, so that a broken guard fails with MemoryError, not the machine.
resource.setrlimit(resource.RLIMIT_AS, ((vm_kb() + 1_500_000) * 1024, resource.RLIM_INFINITY))
results = {}
for root in sys.argv[1:]:
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        cifar.load_cifar(root=root, download=False, cache=False)
        error = None
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
    seconds = time.perf_counter() - t0
    traced_mb = tracemalloc.get_traced_memory()[1] / 1e6
    tracemalloc.stop()
    rss_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1e3
    results[root] = dict(error=error, seconds=seconds, traced_mb=traced_mb, rss_mb=rss_mb)
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def hostile_results(tmp_path_factory, zeros_gz):
    if not sys.platform.startswith("linux"):
        pytest.skip("measures memory with /proc and resource limits (Linux)")
    roots = {}
    for k, (name, (made, _)) in enumerate(HOSTILE.items()):
        root = tmp_path_factory.mktemp(f"hostile{k}")
        if callable(made):
            (root / C10_ARCHIVE).write_bytes(made(zeros_gz))
        else:
            only_data_batch_1(root, made, "folder")
        roots[name] = str(root)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, *roots.values()],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=str(REPO),
    )
    assert proc.returncode == 0, f"the reading process died (rc {proc.returncode}): {proc.stderr[-2000:]}"
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    return {name: results[root] for name, root in roots.items()}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_file_is_refused_with_bounded_memory(hostile_results, case):
    """Refused with a CorruptArchiveError naming the file (and member) and what it asked for; < 300 MB
    allocated (tracemalloc: Python and numpy) and resident (ru_maxrss); quickly."""
    r = hostile_results[case]
    error = r["error"] or "accepted"
    assert error.startswith("CorruptArchiveError: "), error
    assert (
        f"{C10}/data_batch_1: " in error
        or f"{C10_ARCHIVE} cannot be read as CIFAR-10 (member" in error
        or f"{C10_ARCHIVE} cannot be read as CIFAR-10 (an extended tar header" in error
    ), error
    assert re.search(HOSTILE[case][1], error), error
    assert r["traced_mb"] < 300 and r["rss_mb"] < 300, r
    assert r["seconds"] < 10, r
