"""Tests of cpl_mini.data: safe CIFAR reading, the device loader, toy 2-D sets.

The CIFAR tests build small archives in the exact official layout (Python-2-era pickles written
opcode by opcode, as the official files are), so they need no download; one module fixture reads the
real offline archive (``$CPL_MINI_DATA`` or ``<repo>/../shared/data``).
"""
import dataclasses
import hashlib
import io
import os
import pickle
import shlex
import struct
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cpl_mini import data as D
from cpl_mini.data import (
    CIFAR_CLASSES, ArchiveChecksumWarning, CifarData, CorruptArchiveError, DeviceLoader,
    cifar_loaders, default_data_root, load_cifar, make_circles, make_moons, make_spirals,
)

REPO = Path(__file__).resolve().parents[1]
C10 = "cifar-10-batches-py"
C10_ARCHIVE = "cifar-10-python.tar.gz"


# ----------------------------------------------------------------------------------------------------
# Building archives in the official layout
# ----------------------------------------------------------------------------------------------------
def py2_pickle(obj) -> bytes:
    """Protocol-2 pickle as Python 2 + numpy 1.x wrote the official batches.

    Strings are Python-2 ``str`` (BINSTRING opcodes, read back as ``bytes`` with ``encoding="bytes"``);
    arrays go through ``numpy.core.multiarray._reconstruct`` with their raw bytes as one string.
    """
    out = [b"\x80\x02"]

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
        elif isinstance(o, bytes):
            out.append(b"U" + bytes([len(o)]) + o if len(o) < 256 else b"T" + struct.pack("<I", len(o)) + o)
        elif isinstance(o, np.ndarray):
            assert o.dtype == np.uint8 and o.ndim == 2 and o.flags.c_contiguous
            out.append(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n")
            emit(0)
            out.append(b"\x85")            # TUPLE1 (0,)
            emit(b"b")
            out.append(b"\x87R(")          # TUPLE3, REDUCE, MARK of the state
            emit(1)
            emit(o.shape[0])
            emit(o.shape[1])
            out.append(b"\x86cnumpy\ndtype\n")
            emit(b"u1")
            emit(0)
            emit(1)
            out.append(b"\x87R(")          # dtype('u1', 0, 1), then its state
            emit(3)
            emit(b"|")
            out.append(b"NNN")
            emit(-1)
            emit(-1)
            emit(0)
            out.append(b"tb\x89")          # BUILD the dtype, is_fortran False
            emit(o.tobytes())
            out.append(b"tb")              # BUILD the array
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
    files: dict          # member file name -> bytes
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
        files[f"data_batch_{i}"] = py2_pickle({
            b"batch_label": f"training batch {i} of 5".encode(), b"labels": [int(v) for v in y],
            b"data": rows_of(x), b"filenames": [f"img_{i}_{k}.png".encode() for k in range(n_per_batch)]})
        xs.append(x)
        ys.append(y)
    tx = rng.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8)
    ty = rng.integers(0, 10, n_test)
    files["test_batch"] = py2_pickle({b"batch_label": b"testing batch 1 of 1",
                                      b"labels": [int(v) for v in ty], b"data": rows_of(tx),
                                      b"filenames": [b"t.png"] * n_test})
    files["batches.meta"] = py2_pickle({b"num_cases_per_batch": 10000, b"num_vis": 3072,
                                        b"label_names": [c.encode() for c in CIFAR_CLASSES]})
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


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tensors are small: one intra-op thread is as fast and kinder to a shared CPU."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def syn():
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


def test_cifar100_fine_labels(tmp_path):
    rng = np.random.default_rng(1)
    x, tx = (rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8) for n in (11, 5))
    fine, tfine = rng.integers(0, 100, 11), rng.integers(0, 100, 5)
    names = [f"class_{k:02d}" for k in range(100)]
    files = {
        "train": py2_pickle({b"data": rows_of(x), b"fine_labels": [int(v) for v in fine],
                             b"coarse_labels": [int(v) // 5 for v in fine]}),
        "test": py2_pickle({b"data": rows_of(tx), b"fine_labels": [int(v) for v in tfine],
                            b"coarse_labels": [int(v) // 5 for v in tfine]}),
        "meta": py2_pickle({b"fine_label_names": [n.encode() for n in names],
                            b"coarse_label_names": [f"super_{k}".encode() for k in range(20)]}),
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
        m.setattr(D, "_read_archive", boom)
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
    assert sum(k[1] == str(path.resolve()) for k in D._CACHE) == 1  # the stale split was dropped


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
    with pytest.raises(pickle.UnpicklingError, match=r"refused to load the global .*(system|open)"):
        load_cifar(root=tmp_path, download=False)
    assert not marker.exists()


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


@pytest.mark.parametrize("damage, match", [
    ("missing_member", "missing member.*test_batch"),
    ("bad_shape", r"data_batch_3.*\(N, 3072\)"),
    ("bad_labels", "data_batch_4: 7 images but labels"),
])
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
    monkeypatch.setitem(D._SPECS, "cifar10", dataclasses.replace(D._SPECS["cifar10"], md5=md5))
    root = tmp_path / "root"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # verified download: no checksum warning
        data = load_cifar(root=root, url=src.as_uri())
    assert_matches(data, syn)
    assert sorted(p.name for p in root.iterdir()) == [C10_ARCHIVE]
    assert (root / C10_ARCHIVE).read_bytes() == src.read_bytes()


def test_download_with_wrong_md5(tmp_path, syn, monkeypatch):
    src = write_tar(tmp_path / "mirror.tar.gz", C10, syn.files)
    monkeypatch.setitem(D._SPECS, "cifar10", dataclasses.replace(D._SPECS["cifar10"], md5="0" * 32))
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
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        data = load_cifar("cifar10", root=root, download=False, cache=False)
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


def test_real_loaders(real):
    data, _ = real
    train, test = cifar_loaders(data, batch_size=128, std=True, limit_train=512, limit_test=300)
    mean = real_mean(data)
    assert torch.allclose(train.mean.flatten().double(), mean, atol=1e-6)
    assert torch.allclose(train.std.flatten(), torch.tensor([0.247, 0.243, 0.261]), atol=5e-3)
    assert torch.equal(test.mean, train.mean) and torch.equal(test.std, train.std)
    assert (len(train), len(test)) == (4, 1)
    x, y = next(iter(train))
    assert x.shape == (128, 3, 32, 32) and y.shape == (128,)


# ----------------------------------------------------------------------------------------------------
# DeviceLoader
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (103, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (103,), generator=g)
    return x, y


def reference(u: torch.Tensor, mean, std=None) -> torch.Tensor:
    """Normalisation computed independently in float64."""
    x = u.double() / 255 - mean.double().view(1, -1, 1, 1)
    return x if std is None else x / std.double().view(1, -1, 1, 1)


def test_eval_loader_in_order(images):
    x, y = images
    loader = DeviceLoader(x, y, 25, train=False, std=True)
    assert len(loader) == 5 and not loader.drop_last and not loader.augment
    mean = x.double().mean(dim=(0, 2, 3)) / 255
    std = (x.double() / 255).permute(1, 0, 2, 3).reshape(3, -1).std(dim=1, unbiased=False)
    assert torch.allclose(loader.mean.flatten().double(), mean, atol=1e-7)
    assert torch.allclose(loader.std.flatten().double(), std, atol=1e-7)
    batches = list(loader)
    assert [b[0].shape[0] for b in batches] == [25, 25, 25, 25, 3]
    for xb, yb in batches:
        assert xb.dtype == torch.float32 and yb.dtype == torch.int64
        assert xb.is_contiguous(memory_format=torch.channels_last)
    xs = torch.cat([b[0] for b in batches])
    assert torch.allclose(xs.double(), reference(x, mean, std), atol=1e-5)
    assert torch.equal(torch.cat([b[1] for b in batches]), y)


def test_no_std_and_channels_first(images):
    x, y = images
    loader = DeviceLoader(x, y, 50, train=False, channels_last=False, mean=[0.5, 0.25, 0.0])
    assert loader.std is None and loader.lipschitz_factor == 1.0
    xb, _ = next(iter(loader))
    assert xb.is_contiguous()
    assert torch.allclose(xb.double(), reference(x[:50], torch.tensor([0.5, 0.25, 0.0])), atol=1e-6)


def test_train_epochs_are_seeded(images):
    x, y = images
    def run(epoch, seed=0):
        loader = DeviceLoader(x, y, 16, train=True, seed=seed)
        loader.set_epoch(epoch)
        return list(loader)

    a, b, c, d = run(3), run(3), run(4), run(3, seed=1)
    assert len(a) == 103 // 16  # drop_last for train
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    assert not torch.equal(a[0][0], c[0][0]) and not torch.equal(a[0][0], d[0][0])
    # resuming: a loader iterated through epochs 0..3 gives the same epoch 3 as a fresh one
    loader = DeviceLoader(x, y, 16, train=True)
    for _ in range(3):
        list(loader)
    assert loader.epoch == 3
    assert all(torch.equal(p[0], q[0]) for p, q in zip(list(loader), a))


def test_permutation_without_augmentation(images):
    x, y = images
    loader = DeviceLoader(x, y, 20, train=True, augment=False, drop_last=False, std=True)
    plan = loader.plan(2)
    assert torch.equal(torch.sort(plan.order).values, torch.arange(103))
    loader.set_epoch(2)
    batches = list(loader)
    xs, ys = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    assert torch.equal(ys, y[plan.order])
    assert torch.allclose(xs.double(), reference(x[plan.order], loader.mean, loader.std), atol=1e-5)


def test_augmentation_matches_an_independent_crop(images):
    x, y = images
    loader = DeviceLoader(x, y, 32, train=True, seed=7)
    loader.set_epoch(5)
    batches = list(loader)
    plan = loader.plan(5)
    padded = F.pad(x.double(), (4, 4, 4, 4), mode="reflect")  # (N, 3, 40, 40)
    for p in range(len(batches) * 32):
        k, dy, dx, flip = (int(t[p]) for t in (plan.order, plan.dy, plan.dx, plan.flip))
        ref = padded[k, :, dy:dy + 32, dx:dx + 32]
        if flip:
            ref = ref.flip(-1)
        ref = ref / 255 - loader.mean.double()
        got = batches[p // 32][0][p % 32]
        assert torch.allclose(got.double(), ref, atol=1e-6), p
        assert batches[p // 32][1][p % 32] == y[k]
    # the draws cover what they should
    zeros = torch.zeros(4000, 3, 8, 8, dtype=torch.uint8)
    big = DeviceLoader(zeros, torch.zeros(4000, dtype=torch.long), 100, train=True).plan(0)
    assert set(big.dy.tolist()) == set(range(9)) == set(big.dx.tolist())
    assert abs(big.flip.float().mean().item() - 0.5) < 0.05


def test_flip_and_crop_on_a_known_picture():
    """A picture whose pixel value is its column: crops shift, flips reverse the column ramp."""
    cols = torch.arange(32, dtype=torch.uint8).expand(1, 3, 32, 32).repeat(64, 1, 1, 1)
    loader = DeviceLoader(cols, torch.zeros(64, dtype=torch.long), 64, train=True, mean=[0, 0, 0], seed=3)
    xb, _ = next(iter(loader))
    plan = loader.plan(0)
    v = (xb * 255).round().long()[:, 0, 0, :]  # (64, 32) column values of row 0
    for p in range(64):
        dx = int(plan.dx[p])
        want = [abs(j + dx - 4) if j + dx - 4 < 32 else 62 - (j + dx - 4) for j in range(32)]
        if plan.flip[p]:
            want = want[::-1]
        assert v[p].tolist() == want
    assert plan.flip.any() and not plan.flip.all()


def test_world_size_shards(images):
    x, y = images
    one = DeviceLoader(x, y, 24, train=True, seed=2)
    one.set_epoch(1)
    glob = list(one)
    for world in (2, 4):
        shards = []
        for rank in range(world):
            loader = DeviceLoader(x, y, 24, train=True, seed=2, rank=rank, world_size=world)
            loader.set_epoch(1)
            shards.append(list(loader))
            assert len(loader) == len(one)
            assert all(b[0].shape[0] == 24 // world for b in shards[-1])
        for b, (gx, gy) in enumerate(glob):
            assert torch.equal(torch.cat([s[b][0] for s in shards]), gx)
            assert torch.equal(torch.cat([s[b][1] for s in shards]), gy)
    # eval with a final partial batch: shards still cover every row once, in order
    parts = [list(DeviceLoader(x, y, 40, train=False, rank=r, world_size=2)) for r in range(2)]
    ys = torch.cat([torch.cat([parts[r][b][1] for r in range(2)]) for b in range(3)])
    assert torch.equal(ys, y)
    with pytest.raises(ValueError, match="divisible"):
        DeviceLoader(x, y, 25, train=True, world_size=2)


def test_lipschitz_factor(images):
    x, y = images
    loader = DeviceLoader(x, y, 10, train=False, std=[0.5, 0.2, 0.25])
    assert loader.lipschitz_factor == pytest.approx(5.0)
    # the map u -> (u - mean) / std has l2 Lipschitz constant 1 / min(std), attained in channel 1
    std = loader.std.double()
    f = lambda u: (u - loader.mean.double()) / std
    g = torch.Generator().manual_seed(0)
    a = torch.rand(50, 3, 32, 32, generator=g, dtype=torch.float64)
    b = torch.rand(50, 3, 32, 32, generator=g, dtype=torch.float64)
    ratio = (f(a) - f(b)).flatten(1).norm(dim=1) / (a - b).flatten(1).norm(dim=1)
    assert (ratio <= loader.lipschitz_factor + 1e-9).all()
    d = torch.zeros(3, 32, 32, dtype=torch.float64)
    d[1, 4, 4] = 0.1
    assert (f(a[0] + d) - f(a[0])).norm() / d.norm() == pytest.approx(loader.lipschitz_factor)


def test_limit_and_bad_input(images):
    x, y = images
    loader = DeviceLoader(x, y, 10, train=False, limit=30)
    assert loader.num_examples == 30 and len(loader) == 3
    assert torch.allclose(loader.mean.flatten().double(), x.double().mean(dim=(0, 2, 3)) / 255, atol=1e-7)
    with pytest.raises(ValueError, match="uint8"):
        DeviceLoader(x.float() / 255, y, 10, train=False)
    with pytest.raises(ValueError, match="drop_last"):
        DeviceLoader(x, y, 200, train=True)


def test_cifar_loaders_share_train_statistics(tmp_path, syn):
    write_folder(tmp_path, C10, syn.files)
    data = load_cifar(root=tmp_path, download=False)
    train, test = cifar_loaders(data, batch_size=8, std=True, test_batch_size=4)
    assert train.train and train.augment and not test.train and not test.augment
    assert torch.equal(test.mean, train.mean) and torch.equal(test.std, train.std)
    assert test.lipschitz_factor == train.lipschitz_factor == pytest.approx(1 / train.std.min().item())
    xs = torch.cat([b[0] for b in test])
    assert torch.allclose(xs.double(), reference(torch.from_numpy(syn.test_x), train.mean, train.std),
                          atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(images):
    x, y = images
    cpu = DeviceLoader(x, y, 16, train=True, seed=4, std=True)
    gpu = DeviceLoader(x, y, 16, train=True, seed=4, std=True, device="cuda")
    for (a, ya), (b, yb) in zip(cpu, gpu):
        assert b.device.type == "cuda" and yb.device.type == "cuda"
        assert torch.allclose(a, b.cpu(), atol=1e-6) and torch.equal(ya, yb.cpu())


# ----------------------------------------------------------------------------------------------------
# Toy 2-D sets
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [make_moons, make_circles, make_spirals])
@pytest.mark.parametrize("n", [200, 201])
def test_toy_shapes_balance_seed(make, n):
    X, y = make(n, seed=1)
    assert X.shape == (n, 2) and X.dtype == torch.float32 and y.shape == (n,) and y.dtype == torch.int64
    counts = torch.bincount(y, minlength=2)
    assert counts.sum() == n and abs(int(counts[0]) - int(counts[1])) <= 1
    X2, y2 = make(n, seed=1)
    assert torch.equal(X, X2) and torch.equal(y, y2)
    assert not torch.equal(X, make(n, seed=2)[0])


def test_toy_curves_without_noise():
    X, y = make_moons(100, noise=0.0)
    X = X.double()
    a, b = X[y == 0], X[y == 1]
    one = torch.ones(50, dtype=torch.float64)
    assert torch.allclose(a.norm(dim=1), one, atol=1e-6) and (a[:, 1] >= -1e-6).all()
    c = b - torch.tensor([1.0, 0.5], dtype=torch.float64)
    assert torch.allclose(c.norm(dim=1), one, atol=1e-6) and (c[:, 1] <= 1e-6).all()

    X, y = make_circles(100, noise=0.0, factor=0.3)
    r = X.double().norm(dim=1)
    assert torch.allclose(r[y == 0], torch.ones(50, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(r[y == 1], torch.full((50,), 0.3, dtype=torch.float64), atol=1e-6)

    turns = 1.5
    X, y = make_spirals(100, noise=0.0, turns=turns)
    X = X.double()
    X = torch.where((y == 1)[:, None], -X, X)  # class 1 is class 0 turned by pi
    r = X.norm(dim=1)
    theta = 2 * np.pi * turns * r
    assert torch.allclose(X, torch.stack([r * theta.cos(), r * theta.sin()], 1), atol=1e-5)
