"""A training run as a thing on disk: its configuration, its checkpoint, its record, its model.

A run lives in one folder (``TrainConfig.out``) holding

* ``checkpoint.pt``: everything needed to continue the run exactly (:func:`save_checkpoint`), written
  atomically (temporary file, ``fsync``, rename, ``fsync`` of the folder) and checked on reading (the
  CRC-32 of every record of the zip archive ``torch.save`` writes, the format tag, ``weights_only``
  unpickling that cannot run code);
* ``results.json``: the human-readable record (status, configuration, network and architecture,
  per-epoch history, final certified accuracies keyed by their radius as text, ``"36/255"``, the
  machine and versions that produced it). A finished run's record is never rewritten;
  :func:`cpl_mini.records.read_results` reads it back, upgrading the records of earlier versions.

The fields of :class:`TrainConfig` carry their command-line help and whether they belong to the run's
*identity*: continuing a run with a different value of an identity field (its size, schedule, data,
augmentation, ...) is refused, while the fields that only say where or how fast it runs (device,
threads, compilation, memory layout, evaluation frequency) may change when a run is continued.
:func:`load_run_model` rebuilds the trained network from the checkpoint alone (the input
normalisation's statistics travel in its ``state_dict``); a run of your own network
(:mod:`cpl_mini.custom`) needs your ``model=`` again: a checkpoint never names code to import.
"""

import dataclasses
import json
import os
import pathlib
import zipfile
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from . import __version__
from .allocator import tune_cpu_allocator
from .custom import MODEL_SPEC, ModelArg, architecture, architecture_difference, own_network
from .models import SIZES, cpl_network, parse_size, use_channels_last

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "TrainConfig",
    "book_config",
    "identity_fields",
    "check_same_run",
    "resolve_device",
    "run_network",
    "save_checkpoint",
    "load_checkpoint",
    "load_model_state",
    "write_results",
    "rng_state",
    "restore_rng_state",
    "load_run_model",
]

CHECKPOINT_FORMAT = "cpl_mini-checkpoint-v2"
PathLike = Union[str, os.PathLike]

_SWITCHES = ("auto", "on", "off")
_ON = ("on", "true", "yes", "1")
_OFF = ("off", "false", "no", "0")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: corrupt, truncated, not written by cpl_mini, or of another run."""


def _field(default, help: str, identity: bool = False, choices=None, kind=None):
    """A dataclass field whose metadata drives the command line and the resume check."""
    meta = {"help": help, "identity": identity, "choices": choices, "kind": kind}
    return dataclasses.field(default=default, metadata=meta)


def _switch(value, name: str) -> str:
    """Normalise an auto/on/off setting (also true/false, yes/no, 1/0 and Python bools)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    text = str(value).strip().lower()
    if text == "auto":
        return "auto"
    if text in _ON:
        return "on"
    if text in _OFF:
        return "off"
    raise ValueError(f"{name} must be auto, on or off (or true/false), got {value!r}")


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a run (saved in the checkpoint and in ``results.json``).

    Field metadata: ``help`` (command-line help), ``identity`` (resuming with another value is
    refused), ``choices``. Values are checked and normalised on construction (``ValueError``).
    """

    dataset: str = _field("cifar10", "data set", identity=True, choices=("cifar10", "cifar100"))
    size: str = _field(
        "S",
        "network size: a name of cpl_mini.models.SIZES (" + ", ".join(SIZES) + ") or four numbers "
        "depth,depth_linear,channels,features as 20,7,45,2048, (20, 7, 45, 2048) or 20x7x45x2048; "
        "not used with --model",
        identity=True,
    )
    model: Optional[str] = _field(
        None,
        "your own network instead of a CPL one: MODULE:FUNCTION names a function config -> nn.Module in "
        "your code (e.g. mynets:make_net), called after seeding; it receives normalised pictures",
        identity=True,
    )
    epochs: int = _field(10, "number of epochs, at least 1", identity=True)
    batch_size: int = _field(256, "global batch size (all processes together)", identity=True)
    lr: float = _field(1e-3, "peak learning rate of Adam (piecewise-linear schedule)", identity=True)
    margin: float = _field(0.7, "margin of the multi-class hinge loss", identity=True)
    seed: int = _field(0, "seed of the initialisation, the order and the augmentation", identity=True)
    device: str = _field("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, ...")
    amp: str = _field(
        "auto",
        "autocast dtype: auto = bf16 on CUDA compute capability >= 8.0 and on CPUs "
        "with AVX512-BF16/AMX-BF16, fp16 with a gradient scaler on older GPUs, else off",
        identity=True,
        choices=("auto", "bf16", "fp16", "off"),
    )
    channels_last: str = _field(
        "auto",
        "channels-last memory layout: auto = the layout measured faster on this device",
        choices=_SWITCHES,
        kind="switch",
    )
    compile: str = _field(
        "auto",
        "torch.compile the training step: auto = only when the run is long "
        "enough to repay the compile time (decided on the first steps)",
        choices=_SWITCHES,
        kind="switch",
    )
    augment: bool = _field(True, "random 4-pixel reflect-padded crops and horizontal flips", identity=True)
    std_normalize: bool = _field(
        False,
        "also divide the inputs by the per-channel std of the training "
        "pictures (the certificate includes the factor 1/min(std))",
        identity=True,
    )
    limit_train: Optional[int] = _field(
        None, "train on the first N training images only (at least one batch)", identity=True
    )
    limit_test: Optional[int] = _field(None, "evaluate on the first N test images only", identity=True)
    eval_every: int = _field(1, "evaluate every N epochs (and after the last one)")
    out: str = _field(
        "runs/cifar10-S", "run folder (checkpoint.pt, results.json); an existing run in it is continued"
    )
    data_root: Optional[str] = _field(None, "folder holding the CIFAR archive")
    head: str = _field(
        "first",
        "head: the first K coordinates (paper) or a row-normalised linear layer",
        identity=True,
        choices=("first", "lln"),
    )
    threads: Optional[int] = _field(None, "CPU threads")

    def __post_init__(self):
        self.channels_last = _switch(self.channels_last, "channels_last")
        self.compile = _switch(self.compile, "compile")
        self.size, (_, _, channels, _) = parse_size(self.size)
        if channels < 3:
            raise ValueError(
                f"size {self.size}: the channels ({channels}) must be >= the pictures' 3 channels"
            )
        if self.model is not None and not (isinstance(self.model, str) and MODEL_SPEC.fullmatch(self.model)):
            raise ValueError(f"model must be MODULE:FUNCTION (e.g. mynets:make_net), got {self.model!r}")
        for f in dataclasses.fields(self):
            value, choices = getattr(self, f.name), f.metadata.get("choices")
            if choices and value not in choices:
                raise ValueError(f"{f.name} must be one of {', '.join(choices)}, got {value!r}")
        for name in ("epochs", "batch_size", "eval_every", "limit_train", "limit_test", "threads"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if not self.margin >= 0:
            raise ValueError(f"margin must be >= 0, got {self.margin!r}")
        for name in ("augment", "std_normalize"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    @property
    def num_classes(self) -> int:
        return 100 if self.dataset == "cifar100" else 10

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "TrainConfig":
        """A config from a saved dict (keys this version does not know are ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def identity_fields() -> List[str]:
    """Names of the :class:`TrainConfig` fields that define a run (a resume must keep them)."""
    return [f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("identity")]


def book_config(
    device: Union[str, torch.device, None] = None,
    quick: Optional[bool] = None,
    runs_dir: PathLike = "runs",
    cpu_bf16: Optional[bool] = None,
) -> TrainConfig:
    """The run that the book's CIFAR-10 chapters train (and later certify), by mode and device.

    * quick mode (CI): the tiny ``XS`` network, 2 epochs on 2,048 training and 500 test images;
    * a CUDA GPU: the paper's ``S`` network, 30 epochs of the full data (the CLI runs the full 200);
    * a CPU that computes in bf16 natively (AVX512-BF16 or AMX, ``cpu_bf16=None`` detects it): the
      paper's ``S`` network, 20 epochs, evaluated every 4 (the run whose record is
      ``book/results/cifar10-S-20ep.json``);
    * another CPU: the book's smaller ``CPU`` network, 20 epochs (without native bf16 an epoch of S
      took 18 minutes on two AVX2 cores; the record is ``book/results/cifar10-CPU-20ep.json``).

    Calling :func:`cpl_mini.train.train` with it continues the run folder when it exists, so a finished
    run is loaded, not retrained.
    """
    from .fastpath import autocast_dtype
    from .utils import device as pick_device
    from .utils import quick_mode

    quick = quick_mode() if quick is None else quick
    device = pick_device() if device is None else torch.device(device)
    runs_dir = pathlib.Path(runs_dir)
    if quick:
        return TrainConfig(
            size="XS",
            epochs=2,
            batch_size=128,
            limit_train=2048,
            limit_test=500,
            out=str(runs_dir / "cifar10-XS-quick"),
        )
    if device.type == "cuda":
        return TrainConfig(size="S", epochs=30, out=str(runs_dir / "cifar10-S-gpu"))
    if cpu_bf16 is None:
        cpu_bf16 = autocast_dtype(torch.device("cpu")) == torch.bfloat16
    if cpu_bf16:
        return TrainConfig(size="S", epochs=20, eval_every=4, out=str(runs_dir / "cifar10-S-20ep"))
    return TrainConfig(size="CPU", epochs=20, out=str(runs_dir / "cifar10-CPU-20ep"))


def check_same_run(saved: Dict[str, Any], config: TrainConfig, path: PathLike) -> None:
    """Refuse (``CheckpointError`` naming the field) to continue the run saved at ``path`` with ``config``
    when an identity field differs."""
    before = TrainConfig.from_dict(saved)
    for name in identity_fields():
        old, new = getattr(before, name), getattr(config, name)
        if old != new:
            flag = "--" + name.replace("_", "-")
            raise CheckpointError(
                f"{path} belongs to a run with {name}={old!r}, not {new!r}: to continue it, keep {flag} "
                f"as it was; to start a new run, use another --out folder."
            )


def resolve_device(setting: Union[str, torch.device, None] = "auto") -> torch.device:
    """``"auto"`` (CUDA, then MPS, then CPU) or an explicit device, checked to exist (``ValueError``)."""
    from .utils import device as pick_device

    if setting is None or str(setting) == "auto":
        return pick_device()
    try:
        dev = torch.device(setting)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {setting!r} ({exc}); use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {setting!r}: this PyTorch build has no CUDA or no GPU is visible; "
                "use --device cpu (or auto)"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {setting!r}: only {torch.cuda.device_count()} GPU(s) are visible")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {setting!r}: MPS is not available here; use --device cpu (or auto)")
    return dev


def run_network(
    config: TrainConfig,
    mean: Optional[torch.Tensor] = None,
    std: Optional[torch.Tensor] = None,
    model: Optional[ModelArg] = None,
) -> nn.Sequential:
    """The network of a run, an input normalisation as its first layer, so that it takes raw ``[0, 1]``
    pixels: ``cpl_network(config.size, ...)``, or with ``model`` (an ``nn.Module`` or a factory
    ``model(config)``) :func:`cpl_mini.custom.own_network`, ``nn.Sequential(normalisation, net)``.

    ``mean``/``std`` are the per-channel statistics of the training pictures (``std`` only used with
    ``config.std_normalize``); when omitted, placeholders of the right shape are used, to be
    overwritten by a checkpoint's ``state_dict`` (:func:`load_model_state`).
    """
    if model is not None:
        return own_network(model, config, mean, std)
    mean = torch.zeros(3) if mean is None else mean
    std = (torch.ones(3) if std is None else std) if config.std_normalize else None
    return cpl_network(config.size, num_classes=config.num_classes, head=config.head, mean=mean, std=std)


def run_loaders(
    data, config: TrainConfig, device: torch.device, channels_last: bool, rank: int = 0, world_size: int = 1
):
    """The train and test loaders of a run (:func:`cpl_mini.loader.cifar_loaders`): raw ``[0, 1]``
    pixels (the network normalises them), the run's seed, limits and augmentation; under DDP process
    ``rank`` of ``world_size`` gets its shard of each global batch and of the test set."""
    from .loader import cifar_loaders

    return cifar_loaders(
        data,
        batch_size=config.batch_size,
        device=device,
        seed=config.seed,
        normalize=False,
        limit_train=config.limit_train,
        limit_test=config.limit_test,
        augment=config.augment,
        channels_last=channels_last,
        rank=rank,
        world_size=world_size,
        shard_test=True,
    )


# -- files --------------------------------------------------------------------------------------------
def _fsync_dir(folder: pathlib.Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: PathLike, write: Callable[[pathlib.Path], None]) -> None:
    """Write through ``write(tmp)``, fsync the file, rename it over ``path``, fsync the folder."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_checkpoint(
    path: PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    config: TrainConfig,
    history: List[dict],
    step: int,
    scaler: Optional["torch.amp.GradScaler"] = None,
    rng: Optional[List[Dict[str, Any]]] = None,
) -> None:
    """Write the checkpoint of a run after ``epoch`` epochs (``step`` optimisation steps), atomically.

    Format ``cpl_mini-checkpoint-v2``: ``format``, ``version`` (cpl_mini), ``config`` (the
    :class:`TrainConfig` as a dict), ``model_config`` (``model.config``: the network's shape, classes,
    head and input normalisation), ``architecture`` (:func:`~cpl_mini.architecture`: class name,
    names and shapes of the parameters and buffers), ``epoch``, ``step``, ``model`` (``state_dict``,
    normalisation statistics included), ``optimizer``, ``scaler`` (the fp16 gradient scaler's state, or
    ``None``), ``rng`` (``None`` or one ``rng_state`` per process, for layers that draw random
    numbers, such as dropout), ``history`` (one dict per epoch). Readers accept checkpoints without
    ``architecture`` or ``rng`` (earlier versions).
    """
    state = {
        "format": CHECKPOINT_FORMAT,
        "version": __version__,
        "config": dataclasses.asdict(config),
        "model_config": getattr(model, "config", None),
        "architecture": architecture(model),
        "epoch": int(epoch),
        "step": int(step),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "history": history,
        "rng": rng,
    }
    _atomic_write(path, lambda tmp: torch.save(state, tmp))


def _first_line(exc: BaseException) -> str:
    lines = str(exc).splitlines()
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__


def _corrupt(path: pathlib.Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"cannot read checkpoint {path}: it is corrupt, truncated or not a cpl_mini "
        f"checkpoint ({why}). Delete it and train again, or resume from another copy."
    )


def load_checkpoint(path: PathLike, map_location: Union[str, torch.device, None] = "cpu") -> Dict[str, Any]:
    """Load a checkpoint safely: every zip record's CRC-32 checked, ``weights_only=True`` (loading
    cannot run code), the format tag checked. Raises ``FileNotFoundError`` or :class:`CheckpointError`."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"no checkpoint at {path}; train first with `python -m cpl_mini.train --out {path.parent}`"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise _corrupt(path, _first_line(exc)) from None
    if bad is not None:
        raise _corrupt(path, f"the CRC-32 of record {bad!r} does not match its bytes")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # a foreign pickle with code, a truncated record, ...
        raise _corrupt(path, _first_line(exc)) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else None
        raise CheckpointError(
            f"{path} is not a cpl_mini checkpoint of format {CHECKPOINT_FORMAT!r}"
            + (f" (it is {found!r})" if found else "")
        )
    return state


def load_model_state(model: nn.Module, checkpoint: Dict[str, Any], source: str = "the checkpoint") -> None:
    """Load ``checkpoint["model"]`` into ``model`` after checking that both describe the same network
    (``model.config`` against ``checkpoint["model_config"]``: shape, number of classes, head, input
    normalisation; then the architectures' fingerprints, :func:`~cpl_mini.architecture`);
    ``CheckpointError`` naming the first difference otherwise."""
    saved, have = checkpoint.get("model_config"), getattr(model, "config", None)
    if saved is not None and have is not None:
        for key in sorted(set(saved) | set(have)):
            if saved.get(key) != have.get(key):
                raise CheckpointError(
                    f"{source} holds a network with {key}={saved.get(key)!r}, but this network has "
                    f"{key}={have.get(key)!r}; build it with the checkpoint's settings "
                    "(cpl_mini.runs.load_run_model does)."
                )
    saved_architecture = checkpoint.get("architecture")
    difference = saved_architecture and architecture_difference(saved_architecture, architecture(model))
    if difference:
        raise CheckpointError(
            f"{source} holds another architecture: it has {difference}; continue or load it with the "
            "network it was trained with (the same model factory and settings)."
        )
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{source} does not fit this network: {_first_line(exc)}") from None


def write_results(path: PathLike, results: Dict[str, Any]) -> None:
    """Write a run's record as indented JSON, atomically."""
    text = json.dumps(results, indent=2)
    _atomic_write(path, lambda tmp: tmp.write_text(text))


def rng_state(device: Union[str, torch.device]) -> Dict[str, Any]:
    """The global random generators' states this process trains with: ``{"cpu": ByteTensor, "cuda":
    ByteTensor or None}`` (the CUDA generator of ``device`` when it is a GPU)."""
    device = torch.device(device)
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def restore_rng_state(state: Dict[str, Any], device: Union[str, torch.device]) -> None:
    """Set the global random generators back to an ``rng_state`` (the CUDA one when both are GPUs)."""
    device = torch.device(device)
    torch.set_rng_state(state["cpu"].cpu())
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def _custom_run_error(path: pathlib.Path, state: Dict[str, Any], config: TrainConfig) -> ValueError:
    label = (state.get("model_config") or {}).get("network", "your own network")
    named = f" (trained with --model {config.model})" if config.model else ""
    return ValueError(
        f"{path} holds {label}{named}: pass model= (the factory config -> nn.Module it was trained with, "
        "or an instance of that network) to load it; code named in a checkpoint is never imported"
    )


def load_run_model(
    run_dir: PathLike,
    data_root: Optional[PathLike] = None,
    device: Union[str, torch.device, None] = None,
    limit_test: Optional[int] = None,
    data=None,
    model: Optional[ModelArg] = None,
) -> Tuple[nn.Sequential, Any, TrainConfig]:
    """``(model, test_loader, config)`` from a run folder, ready to certify.

    The model (evaluation mode, float32) is rebuilt from the checkpoint alone, its input
    normalisation included, so it takes raw ``[0, 1]`` pixels and gives the same logits whatever copy
    of CIFAR is present; ``test_loader`` yields raw pixels of the test split (the first ``limit_test``
    images when given, else the run's own limit). ``data``: an already loaded ``CifarData``.
    A run of your own network needs ``model``, the factory ``model(config) -> nn.Module`` it was trained
    with or an instance of it (``ValueError`` without it: nothing named in a checkpoint is imported);
    its architecture is checked against the checkpoint's (``CheckpointError``).
    """
    from .cifar import load_cifar

    run_dir = pathlib.Path(run_dir)
    path = run_dir / "checkpoint.pt"
    state = load_checkpoint(path)
    config = TrainConfig.from_dict(state["config"])
    if limit_test is not None:
        config = dataclasses.replace(config, limit_test=limit_test)
    dev = resolve_device(device)
    if dev.type == "cpu":
        tune_cpu_allocator()
    custom = config.model is not None or "class" in (state.get("model_config") or {})
    if custom and model is None:
        raise _custom_run_error(path, state, config)
    net = run_network(config, model=model)
    load_model_state(net, state, source=str(path))
    net.to(dev).eval()
    channels_last = use_channels_last(config.channels_last, dev)
    if channels_last:
        net.to(memory_format=torch.channels_last)
    if data is None:
        data = load_cifar(config.dataset, root=data_root or config.data_root)
    if data.num_classes != config.num_classes:
        raise ValueError(
            f"the run was trained on {config.dataset} ({config.num_classes} classes), "
            f"the data given has {data.num_classes} classes"
        )
    _, test_loader = run_loaders(data, config, dev, channels_last)
    return net, test_loader, config
