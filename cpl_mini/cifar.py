"""CIFAR-10/100 read safely from the official python archives.

:func:`load_cifar` reads the official *python* release of CIFAR-10 or CIFAR-100 (or the offline copy in
``shared/data``, which has the same layout) and returns a :class:`CifarData` whose images are uint8
tensors of shape ``(N, 3, 32, 32)``. Each batch file holds a row of 3072 bytes per image: 1024 red, then
1024 green, then 1024 blue values, each plane in row-major order, so ``row.reshape(3, 32, 32)`` is the
channel-first picture.

Files from the internet must neither run code nor exhaust memory, whatever they say. The pickles are read
by a restricted unpickler that admits only what a numpy array needs (else :class:`UnsafePickleError`), and
each file is checked against the format before anything is allocated: a batch of ``N`` rows (CIFAR-10:
five training batches and a test batch of 10000; CIFAR-100: 50000 training and 10000 test rows, fine and
coarse labels) may ask for one uint8 array ``(N, 3072)`` and integer label arrays ``(N,)``, each payload
exactly ``prod(shape) * itemsize`` bytes; sizes, opcode counts and tar members are capped (constants
below). Anything else raises :class:`CorruptArchiveError` naming the file (and the tar member).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import pickle
import posixpath
import tarfile
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from .safe_pickle import ROW_BYTES, CorruptArchiveError, PickleBudget, UnsafePickleError, load_pickle

__all__ = [
    "CIFAR_CLASSES",
    "CifarData",
    "CorruptArchiveError",
    "UnsafePickleError",
    "ArchiveChecksumWarning",
    "default_data_root",
    "load_cifar",
    "clear_cache",
]

#: The ten class names of CIFAR-10, in the order of the labels 0..9.
CIFAR_CLASSES: Tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

# A file of N rows may have N (2 * _ROW + _ROW_SLACK) + _FILE_SLACK bytes (a Python-3 protocol-2 re-pickle
# spells a byte >= 128 with two), 8 N + 4096 pickle opcodes and memo slots; the archive their sum + 8 MiB.
_ROW = ROW_BYTES  # bytes of one picture: 3 planes of 32 x 32
_ROW_SLACK = 512  # labels, file names and pickle overhead, per row
_FILE_SLACK = 1 << 20  # per file; also the most a meta file or an extra member may take
_OTHER_TOTAL = 4 << 20  # all extra members together (readme.html, ...)
_STREAM_SLACK = 8 << 20  # tar headers, padding and extra members of the whole archive
_MAX_MEMBERS = 64
_EXTENDED_MAX = 64 << 10  # pax header or GNU long name


# ---- The data container and the two formats ------------------------------------------------
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
        return (
            f"CifarData(name={self.name!r}, train={len(self.train_labels)}, "
            f"test={len(self.test_labels)}, classes={len(self.classes)})"
        )


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
    labels: Tuple[Tuple[bytes, int], ...]  # (key, number of classes); the first gives CifarData's labels
    names_key: bytes
    train_rows: int  # rows of each training file
    test_rows: int  # rows of each test file

    def needed(self) -> List[str]:
        return [*self.train_files, *self.test_files, self.meta_file]

    def rows(self, fname: str) -> Optional[int]:  # None: the meta file
        if fname in self.train_files:
            return self.train_rows
        return self.test_rows if fname in self.test_files else None

    def cap(self, fname: str) -> int:  # the most bytes the file may have
        rows = self.rows(fname)
        return _FILE_SLACK if rows is None else rows * (2 * _ROW + _ROW_SLACK) + _FILE_SLACK


_SPECS: Dict[str, _Spec] = {
    "cifar10": _Spec(
        "CIFAR-10",
        "cifar-10-batches-py",
        "cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        meta_file="batches.meta",
        labels=((b"labels", 10),),
        names_key=b"label_names",
        train_rows=10000,
        test_rows=10000,
    ),
    "cifar100": _Spec(
        "CIFAR-100",
        "cifar-100-python",
        "cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        train_files=("train",),
        test_files=("test",),
        meta_file="meta",
        labels=((b"fine_labels", 100), (b"coarse_labels", 20)),
        names_key=b"fine_label_names",
        train_rows=50000,
        test_rows=10000,
    ),
}

# md5 of known, deliberately different copies -> description for the warning.
_KNOWN_COPIES: Dict[str, str] = {
    "04e799a5afef87acf840ae5df223ebd0": (
        "the known offline copy decoded from a quality-75 JPEG CIFAR-10 (pixel values differ slightly "
        "from the "
        "official release, so accuracies can differ by a fraction of a point)"
    )
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


# ---- One file: a batch (pixels and labels) or the meta file (class names) --------------------------
def _labels(value, key: bytes, rows: int, classes: int, where: str) -> np.ndarray:
    try:
        lab = np.asarray(value) if isinstance(value, (list, tuple, np.ndarray)) else None
    except (ValueError, TypeError, OverflowError):
        lab = None
    if lab is None or lab.dtype.kind not in "iu":
        raise CorruptArchiveError(f"{where}: {key!r} should be a list of {rows} integer labels")
    if lab.shape != (rows,):
        raise CorruptArchiveError(f"{where}: {rows} images but labels {key!r} of shape {lab.shape}")
    if lab.size and (lab.min() < 0 or lab.max() >= classes):
        raise CorruptArchiveError(
            f"{where}: labels {key!r} outside [0, {classes}) (min {lab.min()}, max {lab.max()})"
        )
    return lab.astype(np.int64)


def _parse(payload: bytes, fname: str, spec: _Spec, where: str):
    """Unpickle and check one file: ``(data (N, 3072) uint8, labels (N,) int64)``, or the class names."""
    rows = spec.rows(fname)
    obj = load_pickle(payload, PickleBudget(where, rows, spec.title))
    if rows is None:
        names = obj.get(spec.names_key)
        count = spec.labels[0][1]
        if (
            not isinstance(names, (list, tuple))
            or len(names) != count
            or not all(isinstance(n, (bytes, str)) for n in names)
        ):
            raise CorruptArchiveError(f"{where}: should hold a {spec.names_key!r} list of {count} names")
        return [n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names]
    data = obj.get(b"data")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.shape != (rows, _ROW):
        got = f"{type(data).__name__} {getattr(data, 'dtype', '')} {tuple(getattr(data, 'shape', ()))}"
        raise CorruptArchiveError(
            f"{where}: b'data' should be a uint8 array (N, 3072) with N = {rows}, got {got}"
        )
    labels = [_labels(obj.get(key), key, rows, classes, where) for key, classes in spec.labels]
    return data, labels[0]


# ---- Reading folders and archives ------------------------------------------------------------------
def _read_folder(folder: Path, spec: _Spec) -> Dict[str, object]:
    out = {}
    for fname in spec.needed():
        path, cap = folder / fname, spec.cap(fname)
        with open(path, "rb") as f:
            payload = f.read(min(os.fstat(f.fileno()).st_size, cap) + 1)
        if len(payload) > cap:
            raise CorruptArchiveError(f"{path} has more than the {cap} bytes a {spec.title} {fname} may have")
        out[fname] = _parse(payload, fname, spec, str(path))
    return out


class _MeteredReader(io.RawIOBase):
    """Read-only file wrapper: feeds every byte read to ``md5`` (if given), refuses to pass ``limit``."""

    def __init__(self, f, md5=None, limit: Optional[int] = None, what: str = ""):
        self._f, self.md5, self.limit, self.what, self.total = f, md5, limit, what, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self._f.readinto(b)
        if n:
            self.total += n
            if self.limit is not None and self.total > self.limit:
                raise CorruptArchiveError(
                    f"it decompresses to more than {self.limit} bytes, more than "
                    f"{self.what} can hold (refused before reading further)"
                )
            if self.md5 is not None:
                self.md5.update(memoryview(b)[:n])
        return n


class _BoundedTarInfo(tarfile.TarInfo):
    """``TarInfo`` whose per-header hook refuses sparse members and oversized extended headers (tarfile
    would read a pax header or GNU long name whole into memory, a sparse map block by block)."""

    def _proc_member(self, tar):
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise CorruptArchiveError(f"member {self.name} is a sparse file (never part of CIFAR)")
        if self.type in self.EXTENDED and self.size > _EXTENDED_MAX:
            raise CorruptArchiveError(
                f"an extended tar header before offset {self.offset} claims "
                f"{self.size} bytes (at most {_EXTENDED_MAX})"
            )
        return super()._proc_member(tar)

    EXTENDED = frozenset(
        {
            tarfile.XHDTYPE,
            tarfile.XGLTYPE,
            tarfile.SOLARIS_XHDTYPE,
            tarfile.GNUTYPE_LONGNAME,
            tarfile.GNUTYPE_LONGLINK,
        }
    )


def _read_members(tf: tarfile.TarFile, spec: _Spec) -> Dict[str, object]:
    """Unpickle the needed members of an open tar stream, refusing any size the format does not allow."""
    wanted = {f"{spec.folder}/{f}": f for f in spec.needed()}
    out: Dict[str, object] = {}
    other = 0
    for count, member in enumerate(tf, 1):
        if count > _MAX_MEMBERS:
            raise CorruptArchiveError(f"more than {_MAX_MEMBERS} tar members (an official one has about 10)")
        key = wanted.get(posixpath.normpath(member.name))
        if key is None or not member.isfile():
            other += member.size
            if member.size > _FILE_SLACK or other > _OTHER_TOTAL:
                raise CorruptArchiveError(
                    f"unexpected member {member.name} of {member.size} bytes (a "
                    f"{spec.title} archive has only small extra files)"
                )
            continue
        cap = spec.cap(key)
        if member.size > cap:
            raise CorruptArchiveError(
                f"member {member.name} claims {member.size} bytes, more than a "
                f"{spec.title} {key} can take ({cap}); refused before reading it"
            )
        if key in out:
            raise CorruptArchiveError(f"member {member.name} appears twice")
        payload = tf.extractfile(member).read()
        if len(payload) != member.size:
            raise EOFError(f"member {member.name} is cut short")
        out[key] = _parse(payload, key, spec, f"member {member.name}")
    missing = [m for m, f in wanted.items() if f not in out]
    if missing:
        raise CorruptArchiveError(f"missing member(s) {', '.join(missing)}")
    return out


def _read_archive(path: Path, spec: _Spec) -> Dict[str, object]:
    """Unpickle the needed members straight from the tar.gz in one forward pass; check its md5 (a warning).

    ``gzip`` (not tarfile's own stream) does the decompression because it checks the CRC-32 at the
    end: tarfile alone accepts a flipped bit inside the compressed data and returns wrong pixels.
    """
    limit = sum(spec.cap(f) for f in spec.needed()) + _STREAM_SLACK
    size = path.stat().st_size
    if size > limit:
        raise CorruptArchiveError(f"it has {size} bytes, more than a {spec.title} archive may have ({limit})")
    with open(path, "rb", buffering=0) as raw:
        hashing = _MeteredReader(raw, md5=hashlib.md5())
        with gzip.GzipFile(fileobj=io.BufferedReader(hashing, 1 << 20), mode="rb") as gz:
            stream = _MeteredReader(gz, limit=limit, what=f"a {spec.title} archive")
            with tarfile.open(fileobj=stream, mode="r|", tarinfo=_BoundedTarInfo) as tf:
                out = _read_members(tf, spec)
            while stream.read(1 << 20):  # to the end of the gzip stream, so that its CRC is checked
                pass
        while raw.read(1 << 20):  # the rest of the file (if any), for the md5
            pass
    digest = hashing.md5.hexdigest()
    if digest != spec.md5:
        known = _KNOWN_COPIES.get(digest)
        what = (
            f"It is {known}."
            if known
            else (
                "It is not a known copy: if results look wrong, delete it "
                f"and download the official archive ({spec.url})."
            )
        )
        warnings.warn(
            f"{path} has md5 {digest}, not the official {spec.md5}. {what}",
            ArchiveChecksumWarning,
            stacklevel=4,
        )
    return out


def _assemble(files: Dict[str, object], spec: _Spec, name: str) -> CifarData:
    def split(fnames):
        batches = [files[f] for f in fnames]
        images = np.concatenate([b[0] for b in batches]).reshape(-1, 3, 32, 32)  # a fresh, writable copy
        return torch.from_numpy(images), torch.from_numpy(np.concatenate([b[1] for b in batches]))

    tr_x, tr_y = split(spec.train_files)
    te_x, te_y = split(spec.test_files)
    return CifarData(tr_x, tr_y, te_x, te_y, list(files[spec.meta_file]), name)


# ---- Cache, messages, download ---------------------------------------------------------------------
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
        f"{path} cannot be read as {spec.title} ({reason}). It is truncated, damaged or not a genuine "
        f"{spec.title} file: delete it and download it again (load_cifar(download=True) fetches {spec.url})."
    )


def _not_found(root: Path, spec: _Spec, url: str, why: str) -> FileNotFoundError:
    also = "" if url == spec.url else f" (or the official {spec.url})"
    return FileNotFoundError(
        f"{spec.title} not found: looked in {root} for the folder {spec.folder}/ or the archive "
        f"{spec.archive}; {why}. To provide it, download {url}{also} by hand into {root} (keep the name "
        f"{spec.archive}; it is read without extracting), or set the environment variable CPL_MINI_DATA "
        f"(or pass root=...) to a folder that holds it."
    )


def _download(url: str, dest: Path, md5: str, spec: _Spec) -> None:
    """Fetch ``url`` to ``dest``: temp file in the same folder, md5 check, then an atomic rename."""
    import tempfile
    import urllib.error
    import urllib.request

    from tqdm.auto import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    tmp, h, what = Path(tmp_name), hashlib.md5(), f"downloading {url} failed"
    try:
        with open(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=60) as response:
                    what = f"the download of {url} broke off"
                    total = int(response.headers.get("Content-Length") or 0) or None
                    with tqdm(
                        total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name
                    ) as bar:
                        for chunk in iter(lambda: response.read(1 << 20), b""):
                            out.write(chunk)
                            h.update(chunk)
                            bar.update(len(chunk))
            except (urllib.error.URLError, OSError, EOFError, ValueError) as exc:
                raise _not_found(dest.parent, spec, url, f"{what} ({exc})") from exc
        if h.hexdigest() != md5:
            raise CorruptArchiveError(
                f"the file downloaded from {url} has md5 {h.hexdigest()}, not the expected {md5}: it was "
                f"deleted. Try again, or download it by hand into {dest.parent} (name {dest.name})."
            )
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---- load_cifar ------------------------------------------------------------------------------------
def _load(path: Path, files: List[Path], read, spec: _Spec, key_name: str, cache: bool) -> CifarData:
    """``read(path, spec)`` (folder or archive) cached by the ``files``' times and sizes; damage becomes
    CorruptArchiveError."""
    import zlib

    key = (key_name, str(path.resolve()), tuple((f.stat().st_mtime_ns, f.stat().st_size) for f in files))
    if cache and key in _CACHE:
        return _CACHE[key]
    try:
        data = _assemble(read(path, spec), spec, key_name)
    except (UnsafePickleError, PermissionError):
        raise
    except (
        CorruptArchiveError,
        tarfile.TarError,
        zlib.error,
        pickle.UnpicklingError,
        EOFError,
        OSError,
        ValueError,
        TypeError,
        KeyError,
        AttributeError,
    ) as exc:
        # tarfile.ReadError, gzip.BadGzipFile (an OSError: bad header or CRC), zlib.error, EOFError
        reason = str(exc) if isinstance(exc, CorruptArchiveError) else f"{type(exc).__name__}: {exc}"
        digest = _md5(path) if path.is_file() else spec.md5
        if digest != spec.md5:
            reason += f"; its md5 {digest} is not the official {spec.md5}"
        raise _corrupt(path, reason, spec) from exc
    if cache:
        _cache_put(key, data)
    return data


def load_cifar(
    name: str = "cifar10",
    root: Optional[Union[str, os.PathLike]] = None,
    download: bool = True,
    url: Optional[str] = None,
    *,
    cache: bool = True,
) -> CifarData:
    """Load CIFAR-10 or CIFAR-100 (fine labels) as uint8 tensors.

    Looks in ``root`` (default :func:`default_data_root`) for the extracted folder
    (``cifar-10-batches-py/`` or ``cifar-100-python/``), then for the official archive
    (``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``), whose members are read straight from the
    tar.gz. If neither is there and ``download`` is true, the archive is downloaded from the official
    address (or ``url``), checked against its md5 and kept under its official name. Every file is
    checked against the format before anything is allocated (see the module's docstring).

    Args:
        name: ``"cifar10"`` or ``"cifar100"``.
        root: data folder (may also be the extracted folder itself).
        download: fetch the archive when it is missing.
        url: download address instead of the official one (e.g. a ``file://`` mirror).
        cache: reuse the result of an earlier call for the same unchanged file (same object).

    Returns:
        :class:`CifarData` with images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)`` int64
        (50000 / 10000 for both data sets).

    Raises:
        FileNotFoundError: data absent and not downloadable (the message says where to put it).
        CorruptArchiveError: the file is truncated or damaged, or its content does not fit the format
            (wrong row count, labels out of range, sizes or arrays the format does not allow).
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

    if folder.is_dir() and all((folder / f).is_file() for f in spec.needed()):
        return _load(folder, [folder / f for f in spec.needed()], _read_folder, spec, key_name, cache)
    if not archive.is_file():
        if folder.is_dir():
            missing = [f for f in spec.needed() if not (folder / f).is_file()]
            raise _corrupt(folder, f"incomplete extracted folder, missing {', '.join(missing)}", spec)
        if not download:
            raise _not_found(root, spec, url, "download=False, so nothing was fetched")
        _download(url, archive, spec.md5, spec)
    return _load(archive, [archive], _read_archive, spec, key_name, cache)
