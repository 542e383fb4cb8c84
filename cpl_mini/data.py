"""Data: CIFAR-10/100 read safely from the official archive, a device-resident loader, toy 2-D sets.

CIFAR
-----
:func:`load_cifar` reads the official *python* release of CIFAR-10 or CIFAR-100 (or the offline copy in
``shared/data``, which has the same layout) and returns a :class:`CifarData` whose images are uint8
tensors of shape ``(N, 3, 32, 32)``. Each batch file holds a row of 3072 bytes per image: 1024 red, then
1024 green, then 1024 blue values, each plane in row-major order, so ``row.reshape(3, 32, 32)`` is the
channel-first picture.

The batches are Python pickles. They are read with a restricted unpickler that admits only the few
globals a numpy array needs, so a tampered archive cannot run code (:class:`UnsafePickleError`).

Loader
------
:class:`DeviceLoader` keeps a whole uint8 split on the training device (150 MB for CIFAR-10 train) and
builds each batch there, augmentation included, with a few indexing kernels instead of a worker pool:

.. math::  x = (u / 255 - \\mu) \\oslash \\sigma ,

with ``u`` the uint8 picture, ``mu`` the per-channel mean and ``sigma`` the per-channel std (only when
asked for; otherwise ``sigma = 1``). Dividing by ``sigma`` multiplies the Lipschitz constant of
"normalise, then network" by ``1 / min(sigma)``: :attr:`DeviceLoader.lipschitz_factor`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import os
import pickle
import posixpath
import warnings
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple, Union

import numpy as np
import torch

__all__ = [
    "CIFAR_CLASSES",
    "CifarData",
    "CorruptArchiveError",
    "UnsafePickleError",
    "ArchiveChecksumWarning",
    "default_data_root",
    "load_cifar",
    "clear_cache",
    "DeviceLoader",
    "EpochPlan",
    "cifar_loaders",
    "make_moons",
    "make_circles",
    "make_spirals",
]

CIFAR_CLASSES: Tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)

PathLike = Union[str, os.PathLike]


# ----------------------------------------------------------------------------------------------------
# Errors and the data container
# ----------------------------------------------------------------------------------------------------
class CorruptArchiveError(ValueError):
    """The archive or folder exists but cannot be read as CIFAR (truncated, damaged, wrong content)."""


class UnsafePickleError(pickle.UnpicklingError):
    """A batch file's pickle asked for a global that the CIFAR format never needs (refused, not run)."""


class ArchiveChecksumWarning(UserWarning):
    """A local archive's md5 is not the official one (it was read all the same)."""


@dataclasses.dataclass(repr=False)
class CifarData:
    """A CIFAR split pair in memory.

    Attributes:
        train_images: uint8 tensor ``(N_train, 3, 32, 32)``, channel-first.
        train_labels: int64 tensor ``(N_train,)``, values in ``[0, len(classes))``.
        test_images: uint8 tensor ``(N_test, 3, 32, 32)``.
        test_labels: int64 tensor ``(N_test,)``.
        classes: class names, ``classes[k]`` is label ``k`` (fine labels for CIFAR-100).
        name: ``"cifar10"`` or ``"cifar100"``.

    :func:`load_cifar` caches and returns the same object on repeated calls: treat it as read-only.
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: List[str]
    name: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __repr__(self) -> str:
        return (f"CifarData(name={self.name!r}, train={len(self.train_labels)}, "
                f"test={len(self.test_labels)}, classes={len(self.classes)})")


@dataclasses.dataclass(frozen=True)
class _Spec:
    title: str
    folder: str
    archive: str
    md5: str
    url: str
    train_files: Tuple[str, ...]
    test_files: Tuple[str, ...]
    meta_file: str
    label_key: bytes
    names_key: bytes


_SPECS: Dict[str, _Spec] = {
    "cifar10": _Spec(
        title="CIFAR-10",
        folder="cifar-10-batches-py",
        archive="cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        meta_file="batches.meta",
        label_key=b"labels",
        names_key=b"label_names",
    ),
    "cifar100": _Spec(
        title="CIFAR-100",
        folder="cifar-100-python",
        archive="cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        train_files=("train",),
        test_files=("test",),
        meta_file="meta",
        label_key=b"fine_labels",
        names_key=b"fine_label_names",
    ),
}

# md5 of known, deliberately different copies: name -> (md5, description for the warning).
_KNOWN_COPIES: Dict[str, Tuple[str, str]] = {
    "cifar10": ("04e799a5afef87acf840ae5df223ebd0",
                "the known offline copy decoded from a quality-75 JPEG CIFAR-10 (pixel values differ "
                "slightly from the official release, so accuracies can differ by a fraction of a point)"),
}


def default_data_root() -> Path:
    """Folder where :func:`load_cifar` looks for (and downloads) data.

    ``$CPL_MINI_DATA`` if set and non-empty, else ``$XDG_CACHE_HOME/cpl_mini``, else ``~/.cache/cpl_mini``.
    """
    env = os.environ.get("CPL_MINI_DATA")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME")
    base = Path(cache).expanduser() if cache else Path.home() / ".cache"
    return base / "cpl_mini"


# ----------------------------------------------------------------------------------------------------
# Restricted unpickling
# ----------------------------------------------------------------------------------------------------
def _numpy_reconstruct():
    try:  # numpy >= 2 (and 1.26, which has the alias)
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # pragma: no cover - older numpy
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _codecs_encode():
    import _codecs
    return _codecs.encode


# The only globals the CIFAR pickles (Python 2 originals, Python 3 re-pickles) refer to.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): _codecs_encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` admits only numpy-array reconstruction."""

    def find_class(self, module: str, name: str):
        resolve = _ALLOWED_GLOBALS.get((module, name))
        if resolve is None:
            raise UnsafePickleError(
                f"refused to load the global {module}.{name}: a CIFAR batch only needs numpy array "
                "reconstruction, so this file is not a genuine CIFAR batch (it could run code). "
                "Delete it and download the archive again.")
        return resolve()


def _unpickle(fileobj) -> dict:
    obj = _RestrictedUnpickler(fileobj, encoding="bytes").load()
    if not isinstance(obj, dict):
        raise CorruptArchiveError(f"expected a dict, got {type(obj).__name__}")
    return obj


# ----------------------------------------------------------------------------------------------------
# Reading folders and archives
# ----------------------------------------------------------------------------------------------------
_CACHE: Dict[tuple, CifarData] = {}


def _cache_put(key: tuple, data: CifarData) -> None:
    """Keep one entry per (data set, path): a changed file replaces its stale split in memory."""
    for old in [k for k in _CACHE if k[:2] == key[:2]]:
        del _CACHE[old]
    _CACHE[key] = data


def clear_cache() -> None:
    """Forget the CIFAR splits :func:`load_cifar` keeps in memory."""
    _CACHE.clear()


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _corrupt(path: Path, reason: str, spec: _Spec) -> CorruptArchiveError:
    return CorruptArchiveError(
        f"{path} cannot be read as {spec.title} ({reason}). It is probably truncated or damaged: "
        f"delete it and download it again (load_cifar(download=True) fetches {spec.url}).")


def _needed(spec: _Spec) -> List[str]:
    return [*spec.train_files, *spec.test_files, spec.meta_file]


def _read_folder(folder: Path, spec: _Spec) -> Dict[str, dict]:
    out = {}
    for fname in _needed(spec):
        with open(folder / fname, "rb") as f:
            out[fname] = _unpickle(f)
    return out


class _HashingReader(io.RawIOBase):
    """Read-only file wrapper that feeds every byte read to an md5 (one pass: hash and decode)."""

    def __init__(self, f):
        self._f = f
        self.md5 = hashlib.md5()

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self._f.readinto(b)
        if n:
            self.md5.update(memoryview(b)[:n])
        return n


def _read_archive(path: Path, spec: _Spec) -> Tuple[Dict[str, dict], str]:
    """Unpickle the needed members straight from the tar.gz in one forward pass; also return its md5.

    ``gzip`` (not tarfile's own stream) does the decompression because it checks the CRC-32 at the
    end: tarfile alone accepts a flipped bit inside the compressed data and returns wrong pixels.
    """
    import gzip
    import tarfile

    wanted = {f"{spec.folder}/{f}": f for f in _needed(spec)}
    out: Dict[str, dict] = {}
    with open(path, "rb", buffering=0) as raw:
        hashing = _HashingReader(raw)
        with gzip.GzipFile(fileobj=io.BufferedReader(hashing, 1 << 20), mode="rb") as gz:
            with tarfile.open(fileobj=gz, mode="r|") as tf:
                for member in tf:
                    key = wanted.get(posixpath.normpath(member.name))
                    if key is None or not member.isfile():
                        continue
                    payload = tf.extractfile(member).read()
                    if len(payload) != member.size:
                        raise EOFError(f"member {member.name} is cut short")
                    out[key] = _unpickle(io.BytesIO(payload))
            while gz.read(1 << 20):  # to the end of the gzip stream, so that its CRC is checked
                pass
        while raw.read(1 << 20):  # the rest of the file (if any), for the md5
            pass
    missing = [m for m, f in wanted.items() if f not in out]
    if missing:
        raise CorruptArchiveError(f"missing member(s) {', '.join(missing)}")
    return out, hashing.md5.hexdigest()


def _assemble(files: Dict[str, dict], spec: _Spec, name: str) -> CifarData:
    meta = files[spec.meta_file]
    names = meta.get(spec.names_key)
    if not isinstance(names, (list, tuple)) or not names:
        raise CorruptArchiveError(f"{spec.meta_file} has no {spec.names_key!r} list")
    classes = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]

    def split(fnames):
        datas, labels = [], []
        for fname in fnames:
            batch = files[fname]
            data, lab = batch.get(b"data"), batch.get(spec.label_key)
            if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
                    or data.shape[1] != 3072:
                got = (f"{type(data).__name__} {getattr(data, 'dtype', '')} "
                       f"{tuple(getattr(data, 'shape', ()))}")
                raise CorruptArchiveError(f"{fname}: b'data' should be a uint8 array (N, 3072), got {got}")
            if lab is None:
                raise CorruptArchiveError(f"{fname}: no {spec.label_key!r} entry")
            lab = np.asarray(lab, dtype=np.int64)
            if lab.shape != (data.shape[0],):
                raise CorruptArchiveError(
                    f"{fname}: {data.shape[0]} images but labels of shape {lab.shape}")
            if lab.size and (lab.min() < 0 or lab.max() >= len(classes)):
                raise CorruptArchiveError(f"{fname}: labels outside [0, {len(classes)})")
            datas.append(data)
            labels.append(lab)
        data = np.concatenate(datas)  # a fresh, writable copy
        images = torch.from_numpy(data.reshape(-1, 3, 32, 32))
        return images, torch.from_numpy(np.concatenate(labels))

    tr_x, tr_y = split(spec.train_files)
    te_x, te_y = split(spec.test_files)
    return CifarData(tr_x, tr_y, te_x, te_y, classes, name)


def _file_key(path: Path) -> Tuple[int, int]:
    st = path.stat()
    return st.st_mtime_ns, st.st_size


def _not_found(root: Path, spec: _Spec, url: str, why: str) -> FileNotFoundError:
    also = "" if url == spec.url else f" (or the official {spec.url})"
    return FileNotFoundError(
        f"{spec.title} not found: looked in {root} for the folder {spec.folder}/ or the archive "
        f"{spec.archive}; {why}. To provide it, download {url}{also} by hand into {root} (keep the name "
        f"{spec.archive}; it is read without extracting), or set the environment variable CPL_MINI_DATA "
        f"(or pass root=...) to a folder that holds it.")


def _download(url: str, dest: Path, md5: str, spec: _Spec) -> None:
    """Fetch ``url`` to ``dest``: temp file in the same folder, md5 check, then an atomic rename."""
    import tempfile
    import urllib.error
    import urllib.request

    from tqdm.auto import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with open(fd, "wb") as out:
            try:
                response = urllib.request.urlopen(url, timeout=60)
            except (urllib.error.URLError, OSError, ValueError) as exc:
                raise _not_found(dest.parent, spec, url, f"downloading {url} failed ({exc})") from exc
            h = hashlib.md5()
            try:
                with response:
                    total = int(response.headers.get("Content-Length") or 0) or None
                    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                              desc=dest.name) as bar:
                        for chunk in iter(lambda: response.read(1 << 20), b""):
                            out.write(chunk)
                            h.update(chunk)
                            bar.update(len(chunk))
            except (urllib.error.URLError, OSError, EOFError) as exc:
                raise _not_found(dest.parent, spec, url,
                                 f"the download of {url} broke off ({exc})") from exc
        digest = h.hexdigest()
        if digest != md5:
            raise CorruptArchiveError(
                f"the file downloaded from {url} has md5 {digest}, not the expected {md5}: it was "
                f"deleted. Try again, or download it by hand into {dest.parent} (name {dest.name}).")
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_cifar(name: str = "cifar10", root: Optional[PathLike] = None, download: bool = True,
               url: Optional[str] = None, *, cache: bool = True) -> CifarData:
    """Load CIFAR-10 or CIFAR-100 (fine labels) as uint8 tensors.

    Looks in ``root`` (default :func:`default_data_root`) for the extracted folder
    (``cifar-10-batches-py/`` or ``cifar-100-python/``), then for the official archive
    (``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``), whose members are read straight from the
    tar.gz. If neither is there and ``download`` is true, the archive is downloaded from the official
    address (or ``url``), checked against its md5 and kept under its official name.

    Args:
        name: ``"cifar10"`` or ``"cifar100"``.
        root: data folder (may also be the extracted folder itself).
        download: fetch the archive when it is missing.
        url: download address instead of the official one (e.g. a ``file://`` mirror).
        cache: reuse the result of an earlier call for the same unchanged file (same object).

    Returns:
        :class:`CifarData` with images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)`` int64
        (CIFAR-10: 50000 / 10000).

    Raises:
        FileNotFoundError: data absent and not downloadable (the message says where to put it).
        CorruptArchiveError: the file is truncated or damaged, or its content has the wrong shapes.
        UnsafePickleError: a batch pickle refers to anything but numpy array reconstruction.

    Warns:
        ArchiveChecksumWarning: a local archive's md5 is not the official one (once per load).
    """
    key_name = str(name).lower().replace("-", "").replace("_", "")
    if key_name not in _SPECS:
        raise ValueError(f"unknown data set {name!r}: choose 'cifar10' or 'cifar100'")
    spec = _SPECS[key_name]
    root = Path(root).expanduser() if root is not None else default_data_root()
    url = url or spec.url

    folder = root if root.name == spec.folder else root / spec.folder
    archive = root / spec.archive

    # 1. the extracted folder, when complete
    if folder.is_dir() and all((folder / f).is_file() for f in _needed(spec)):
        resolved = folder.resolve()
        key = (key_name, str(resolved), tuple(_file_key(folder / f) for f in _needed(spec)))
        if cache and key in _CACHE:
            return _CACHE[key]
        try:
            data = _assemble(_read_folder(folder, spec), spec, key_name)
        except UnsafePickleError:
            raise
        except CorruptArchiveError as exc:
            raise _corrupt(folder, str(exc), spec) from exc
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, AttributeError) as exc:
            raise _corrupt(folder, f"{type(exc).__name__}: {exc}", spec) from exc
        if cache:
            _cache_put(key, data)
        return data

    # 2. the archive, downloaded if needed
    if not archive.is_file():
        if folder.is_dir():
            missing = [f for f in _needed(spec) if not (folder / f).is_file()]
            raise _corrupt(folder, f"incomplete extracted folder, missing {', '.join(missing)}", spec)
        if not download:
            raise _not_found(root, spec, url, "download=False, so nothing was fetched")
        _download(url, archive, spec.md5, spec)

    resolved = archive.resolve()
    key = (key_name, str(resolved), _file_key(archive))
    if cache and key in _CACHE:
        return _CACHE[key]
    import tarfile
    import zlib

    try:
        files, digest = _read_archive(archive, spec)
        data = _assemble(files, spec, key_name)
    except (UnsafePickleError, PermissionError):
        raise
    except (CorruptArchiveError, tarfile.TarError, zlib.error, pickle.UnpicklingError, EOFError,
            OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        # tarfile.ReadError, gzip.BadGzipFile (an OSError: bad header or CRC), zlib.error, EOFError
        # (truncation), shape errors from _assemble (CorruptArchiveError)
        reason = str(exc) if isinstance(exc, CorruptArchiveError) else f"{type(exc).__name__}: {exc}"
        raise _corrupt(archive, _with_md5(reason, _md5(archive), spec), spec) from exc
    if digest != spec.md5:
        known = _KNOWN_COPIES.get(key_name)
        if known is not None and digest == known[0]:
            what = f"It is {known[1]}."
        else:
            what = ("It is not a known copy: if results look wrong, delete it and download the "
                    f"official archive ({spec.url}).")
        warnings.warn(f"{archive} has md5 {digest}, not the official {spec.md5}. {what}",
                      ArchiveChecksumWarning, stacklevel=2)
    if cache:
        _cache_put(key, data)
    return data


def _with_md5(reason: str, digest: str, spec: _Spec) -> str:
    if digest == spec.md5:
        return reason
    return f"{reason}; its md5 {digest} is not the official {spec.md5}"


# ----------------------------------------------------------------------------------------------------
# Device-resident loader
# ----------------------------------------------------------------------------------------------------
class EpochPlan(NamedTuple):
    """The random draws of one epoch (CPU tensors, indexed by position in the epoch).

    ``order[p]`` is the example seen at position ``p``; ``dy[p]``, ``dx[p]`` in ``[0, 2 * padding]`` the
    top-left corner of its crop inside the reflect-padded picture; ``flip[p]`` whether the crop is then
    mirrored left-right. ``dy``, ``dx``, ``flip`` are ``None`` without augmentation.
    """

    order: torch.Tensor
    dy: Optional[torch.Tensor]
    dx: Optional[torch.Tensor]
    flip: Optional[torch.Tensor]


def _channel_stats(images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact per-channel mean and (population) std of ``images / 255`` from the 256-bin histograms."""
    values = torch.arange(256, dtype=torch.float64, device=images.device) / 255.0
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].reshape(-1), minlength=256).to(torch.float64)
        n = counts.sum()
        m = (counts * values).sum() / n
        var = (counts * (values - m) ** 2).sum() / n
        means.append(m)
        stds.append(var.sqrt())
    return torch.stack(means), torch.stack(stds)


def _reflect(i: torch.Tensor, size: int) -> torch.Tensor:
    """Map padded coordinates (``-pad .. size - 1 + pad``) to the source, as ``F.pad(mode='reflect')``."""
    i = i.abs()
    return torch.where(i > size - 1, 2 * (size - 1) - i, i)


def _epoch_seed(seed: int, epoch: int) -> int:
    state = np.random.SeedSequence([int(seed) & (2 ** 64 - 1), int(epoch) & (2 ** 64 - 1)])
    return int(state.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


class DeviceLoader:
    """Batches of a uint8 image split that lives on ``device``; augmentation done there, in batch.

    Each batch is ``(x, y)``: ``x`` float32 ``(B, C, H, W)`` equal to ``(u / 255 - mean) / std``
    (``std`` only when given), in ``torch.channels_last`` memory format by default; ``y`` int64 ``(B,)``.

    With ``train=True`` every epoch has a fresh permutation and (by default) the standard CIFAR
    augmentation: a random ``H x W`` crop of the picture reflect-padded by ``padding`` pixels, then a
    left-right flip with probability 1/2. All draws of epoch ``e`` depend on ``(seed, e)`` only
    (:meth:`plan`), so resuming at epoch ``e`` reproduces an uninterrupted run. ``iter(loader)`` uses
    the current :attr:`epoch` and then advances it by one; :meth:`set_epoch` pins it (as with
    ``DistributedSampler``).

    Distributed data parallel: every process draws the same global order and cuts the same global
    batches of ``batch_size`` rows; process ``rank`` yields its contiguous ``batch_size // world_size``
    rows of each, so the shards of all ranks concatenate to the one-process batch.

    Args:
        images: uint8 ``(N, C, H, W)`` tensor (or numpy array).
        labels: integer ``(N,)``.
        batch_size: global batch size (all ranks together).
        train: shuffle every epoch; default for ``augment`` and ``drop_last``.
        device: where data and batches live (default: the device of ``images``).
        mean: per-channel mean on the ``[0, 1]`` scale; default: the mean of ``images`` (all N, before
            ``limit``).
        std: ``None``/``False``: do not divide; ``True``: the std of ``images``; or per-channel values.
        augment: random crop + flip (default: ``train``).
        seed: seed of all draws.
        drop_last: drop a final partial batch (default: ``train``).
        channels_last: return ``x`` in ``torch.channels_last`` format (else contiguous NCHW).
        rank, world_size: shard of each global batch this process yields.
        limit: use only the first ``limit`` examples.
        padding: reflect padding of the random crop (4 for CIFAR).
    """

    def __init__(self, images, labels, batch_size: int, *, train: bool,
                 device: Optional[Union[str, torch.device]] = None,
                 mean=None, std=None, augment: Optional[bool] = None, seed: int = 0,
                 drop_last: Optional[bool] = None, channels_last: bool = True,
                 rank: int = 0, world_size: int = 1, limit: Optional[int] = None,
                 padding: int = 4):
        images = torch.as_tensor(images)
        labels = torch.as_tensor(labels)
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be a uint8 tensor (N, C, H, W); got {images.dtype} of shape "
                             f"{tuple(images.shape)} (convert float pictures with (x * 255).round().byte())")
        if labels.ndim != 1 or labels.shape[0] != images.shape[0] or labels.is_floating_point():
            raise ValueError(f"labels must be an integer tensor of shape ({images.shape[0]},); got "
                             f"{labels.dtype} of shape {tuple(labels.shape)}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is the global batch: it must be divisible by "
                             f"world_size {world_size}")
        self.device = torch.device(device) if device is not None else images.device
        self.train = bool(train)
        self.augment = self.train if augment is None else bool(augment)
        self.drop_last = self.train if drop_last is None else bool(drop_last)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.channels_last = bool(channels_last)
        self.rank, self.world_size = int(rank), int(world_size)
        self.padding = int(padding)
        self.epoch = 0
        C, H, W = images.shape[1:]
        if self.augment and not 0 <= self.padding < min(H, W):
            raise ValueError(f"reflect padding {self.padding} must be smaller than the picture ({H}x{W})")

        images = images.to(self.device)
        stats = None
        if mean is None or std is True:
            stats = _channel_stats(images)
        self._mean = self._channel_tensor(stats[0] if mean is None else mean, C, "mean")
        if std is None or std is False:
            self._std = None
        else:
            self._std = self._channel_tensor(stats[1] if std is True else std, C, "std")
            if not bool((self._std > 0).all()):
                raise ValueError(f"std must be positive, got {self._std.flatten().tolist()}")

        if limit is not None:
            images, labels = images[:int(limit)], labels[:int(limit)]
        self.num_examples = int(images.shape[0])
        if self.drop_last and self.num_examples < self.batch_size:
            raise ValueError(f"only {self.num_examples} examples for batch_size {self.batch_size} with "
                             "drop_last=True: no batch at all; lower batch_size or pass drop_last=False")
        # (N, H, W, C) storage: gathers then give channels_last batches with no extra copy.
        self._nhwc = images.permute(0, 2, 3, 1).contiguous()
        self._labels = labels.to(device=self.device, dtype=torch.int64)
        self._arange_h = torch.arange(H, device=self.device)
        self._arange_w = torch.arange(W, device=self.device)
        self._mean_row = self._mean.view(C).repeat(H * W)
        self._std_row = None if self._std is None else self._std.view(C).repeat(H * W)

    def _channel_tensor(self, value, C: int, what: str) -> torch.Tensor:
        t = torch.as_tensor(value, dtype=torch.float32).flatten().to(self.device)
        if t.numel() != C:
            raise ValueError(f"{what} needs one value per channel ({C}), got {t.numel()}")
        return t.view(C, 1, 1)

    # -- properties --------------------------------------------------------------------------------
    @property
    def mean(self) -> torch.Tensor:
        """Per-channel mean subtracted, shape ``(C, 1, 1)`` on the device (``[0, 1]`` scale)."""
        return self._mean

    @property
    def std(self) -> Optional[torch.Tensor]:
        """Per-channel divisor, shape ``(C, 1, 1)``, or ``None`` when not dividing."""
        return self._std

    @property
    def lipschitz_factor(self) -> float:
        """Lipschitz constant (l2) of the normalisation ``u -> (u - mean) / std``: ``1 / min(std)``, or 1."""
        if self._std is None:
            return 1.0
        return float(1.0 / self._std.min().item())

    def __len__(self) -> int:
        n, b = self.num_examples, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` use the draws of ``epoch``."""
        self.epoch = int(epoch)

    def __repr__(self) -> str:
        return (f"DeviceLoader(n={self.num_examples}, batch_size={self.batch_size}, train={self.train}, "
                f"augment={self.augment}, device={self.device}, epoch={self.epoch}, "
                f"rank={self.rank}/{self.world_size})")

    # -- draws -------------------------------------------------------------------------------------
    def plan(self, epoch: int) -> EpochPlan:
        """The order and augmentation draws of ``epoch`` (a function of ``(seed, epoch)`` only)."""
        n = self.num_examples
        if not self.train and not self.augment:
            return EpochPlan(torch.arange(n), None, None, None)
        g = torch.Generator(device="cpu")
        g.manual_seed(_epoch_seed(self.seed, epoch))
        order = torch.randperm(n, generator=g) if self.train else torch.arange(n)
        if not self.augment:
            return EpochPlan(order, None, None, None)
        span = 2 * self.padding + 1
        dy = torch.randint(0, span, (n,), generator=g)
        dx = torch.randint(0, span, (n,), generator=g)
        flip = torch.randint(0, 2, (n,), generator=g).bool()
        return EpochPlan(order, dy, dx, flip)

    # -- iteration ---------------------------------------------------------------------------------
    def __iter__(self):
        epoch = self.epoch
        self.epoch += 1
        return self._batches(epoch)

    def _shard(self, start: int, stop: int) -> Tuple[int, int]:
        if self.world_size == 1:
            return start, stop
        if stop - start == self.batch_size:
            per = self.batch_size // self.world_size
            return start + self.rank * per, start + (self.rank + 1) * per
        # final partial batch: split as torch.tensor_split does (some ranks may get one row less)
        size = stop - start
        q, r = divmod(size, self.world_size)
        lo = start + self.rank * q + min(self.rank, r)
        return lo, lo + q + (1 if self.rank < r else 0)

    def _batches(self, epoch: int):
        plan = self.plan(epoch)
        sequential = not self.train
        order = None if sequential else plan.order.to(self.device)
        if self.augment:
            dy, dx, flip = (t.to(self.device) for t in (plan.dy, plan.dx, plan.flip))
        for b in range(len(self)):
            start = b * self.batch_size
            lo, hi = self._shard(start, min(start + self.batch_size, self.num_examples))
            if sequential:
                idx = slice(lo, hi)
            else:
                idx = order[lo:hi]
            if self.augment:
                x = self._crop_flip(idx, dy[lo:hi], dx[lo:hi], flip[lo:hi])
            else:
                x = self._nhwc[idx]
            y = self._labels[idx]
            yield self._normalise(x), y

    def _crop_flip(self, idx, dy, dx, flip) -> torch.Tensor:
        """Gather crops of the reflect-padded pictures, flipped where ``flip``: one indexing kernel."""
        H, W = self._nhwc.shape[1:3]
        p = self.padding
        rows = _reflect(dy[:, None] + self._arange_h[None, :] - p, H)                      # (B, H)
        cols_src = torch.where(flip[:, None], (W - 1) - self._arange_w[None, :], self._arange_w[None, :])
        cols = _reflect(dx[:, None] + cols_src - p, W)                                    # (B, W)
        if isinstance(idx, slice):
            idx = torch.arange(idx.start, idx.stop, device=self.device)
        return self._nhwc[idx[:, None, None], rows[:, :, None], cols[:, None, :]]         # (B, H, W, C)

    def _normalise(self, x_nhwc: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x_nhwc.shape
        # On the flat (B, H*W*C) view the per-channel constants are a plain row vector: fast kernels.
        x = x_nhwc.reshape(B, H * W * C).float().div_(255.0).sub_(self._mean_row)
        if self._std_row is not None:
            x.div_(self._std_row)
        x = x.view(B, H, W, C).permute(0, 3, 1, 2)  # NCHW shape with channels_last strides
        if not self.channels_last:
            x = x.contiguous()
        return x


def cifar_loaders(data: CifarData, batch_size: int = 256, device=None, seed: int = 0, std=False,
                  limit_train: Optional[int] = None, limit_test: Optional[int] = None,
                  test_batch_size: int = 500, **kwargs) -> Tuple[DeviceLoader, DeviceLoader]:
    """Train loader (shuffled, augmented) and test loader (in order) for ``data``.

    Both subtract the per-channel mean of the training pictures and, when ``std`` is true, divide by
    their std (then the certified radius must use ``train_loader.lipschitz_factor``). Extra keyword
    arguments (``rank``, ``world_size``, ``channels_last``, ...) go to both loaders.
    """
    train = DeviceLoader(data.train_images, data.train_labels, batch_size, train=True, device=device,
                         seed=seed, std=std, limit=limit_train, **kwargs)
    test = DeviceLoader(data.test_images, data.test_labels, test_batch_size, train=False,
                        device=device, seed=seed, mean=train.mean, std=train.std, limit=limit_test,
                        **kwargs)
    return train, test


# ----------------------------------------------------------------------------------------------------
# Toy 2-D data
# ----------------------------------------------------------------------------------------------------
def _split_counts(n: int) -> Tuple[int, int]:
    if n < 2:
        raise ValueError(f"need n >= 2 points (one per class), got {n}")
    return n - n // 2, n // 2


def _finish(X0, X1, noise: float, g: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    X = torch.cat([X0, X1]).to(torch.float64)
    y = torch.cat([torch.zeros(len(X0), dtype=torch.int64), torch.ones(len(X1), dtype=torch.int64)])
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    if noise:
        X = X + noise * torch.randn(X.shape, generator=g, dtype=torch.float64)
    perm = torch.randperm(len(y), generator=g)
    return X[perm].to(torch.float32), y[perm]


def make_moons(n: int, noise: float = 0.1, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Two interleaved half circles.

    Class 0: ``(cos t, sin t)``, class 1: ``(1 - cos t, 1/2 - sin t)``, ``t`` evenly spaced in
    ``[0, pi]``, plus Gaussian noise of std ``noise``; shuffled.

    Returns:
        ``X`` float32 ``(n, 2)``, ``y`` int64 ``(n,)`` with ``ceil(n/2)`` zeros and ``floor(n/2)`` ones.
    """
    n0, n1 = _split_counts(n)
    g = torch.Generator().manual_seed(int(seed))
    t0 = torch.linspace(0, math.pi, n0, dtype=torch.float64)
    t1 = torch.linspace(0, math.pi, n1, dtype=torch.float64)
    X0 = torch.stack([t0.cos(), t0.sin()], 1)
    X1 = torch.stack([1 - t1.cos(), 0.5 - t1.sin()], 1)
    return _finish(X0, X1, noise, g)


def make_circles(n: int, noise: float = 0.05, factor: float = 0.5,
                 seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Two concentric circles: class 0 of radius 1, class 1 of radius ``factor`` (``0 < factor < 1``).

    Angles evenly spaced in ``[0, 2 pi)``, Gaussian noise of std ``noise``; shuffled.

    Returns:
        ``X`` float32 ``(n, 2)``, ``y`` int64 ``(n,)`` (balanced).
    """
    if not 0 < factor < 1:
        raise ValueError(f"factor must be in (0, 1), got {factor}")
    n0, n1 = _split_counts(n)
    g = torch.Generator().manual_seed(int(seed))
    a0 = torch.arange(n0, dtype=torch.float64) * (2 * math.pi / n0)
    a1 = torch.arange(n1, dtype=torch.float64) * (2 * math.pi / n1)
    X0 = torch.stack([a0.cos(), a0.sin()], 1)
    X1 = factor * torch.stack([a1.cos(), a1.sin()], 1)
    return _finish(X0, X1, noise, g)


def make_spirals(n: int, noise: float = 0.1, turns: float = 1.5,
                 seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Two interleaved Archimedean spirals.

    Class 0: ``r (cos theta, sin theta)`` with ``r`` evenly spaced in ``[0.1, 1]`` and
    ``theta = 2 pi turns r``; class 1 is class 0 turned by ``pi`` (``-x``). Gaussian noise of std
    ``noise`` (relative to the outer radius 1); shuffled.

    Returns:
        ``X`` float32 ``(n, 2)``, ``y`` int64 ``(n,)`` (balanced).
    """
    n0, n1 = _split_counts(n)
    g = torch.Generator().manual_seed(int(seed))

    def arm(m):
        r = torch.linspace(0.1, 1.0, m, dtype=torch.float64)
        th = 2 * math.pi * turns * r
        return torch.stack([r * th.cos(), r * th.sin()], 1)

    return _finish(arm(n0), -arm(n1), noise, g)
