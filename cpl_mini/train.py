"""Train a CPL network on CIFAR-10/100 with the paper's recipe; ``python -m cpl_mini.train --help``.

Recipe (REFERENCE.md): Adam (lr 1e-3, no weight decay), batch 256, the piecewise-linear schedule
``[0, 2T/5, 4T/5, T] -> [0, lr, lr/20, 0]`` over the T optimisation steps, the multi-class hinge
loss ``multi_margin_loss(margin=0.7)``, augmentation by 4-pixel reflect-padded random crops and
horizontal flips (on the device), mean subtraction.

Fast path (the default): the data set lives on the device; channels-last memory format; bf16
autocast where the hardware supports it (CUDA with bf16, CPUs with AVX512-BF16) with the norm
computations in float32; on CPUs the glibc allocator keeps freed memory
(:func:`cpl_mini.allocator.tune_cpu_allocator`); ``--compile`` adds ``torch.compile``.

Every epoch: evaluation of clean and certified accuracy with sound norms (float32), an atomic
checkpoint (``checkpoint.pt``) and ``results.json``. ``--resume`` continues a run exactly.
A NaN/inf loss stops the run with a clear message, keeping the last good checkpoint.
Several processes: ``torchrun --nproc_per_node=N -m cpl_mini.train ...`` (DistributedDataParallel;
each process takes its shard of every global batch).
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import pathlib
import platform
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from . import __version__
from .allocator import tune_cpu_allocator
from .certify import DEFAULT_EPS, certified_accuracy
from .models import count_parameters, cpl_network

__all__ = ["TrainConfig", "book_config", "use_channels_last", "lr_at", "margin_loss", "train", "load_checkpoint",
           "load_run_model",
           "CheckpointError", "NonFiniteLossError", "main"]

CHECKPOINT_FORMAT = "cpl_mini-checkpoint-v1"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: corrupt, truncated, or not written by cpl_mini."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a run (saved in the checkpoint and in results.json)."""
    dataset: str = "cifar10"
    size: str = "S"
    epochs: int = 10
    batch_size: int = 256
    lr: float = 1e-3
    margin: float = 0.7
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"  # auto | bf16 | fp16 | off
    channels_last: object = "auto"  # "auto" | True | False (see use_channels_last)
    compile: bool = False
    augment: bool = True
    std_normalize: bool = False
    limit_train: int = None
    limit_test: int = None
    eval_every: int = 1
    out: str = "runs/cifar10-S"
    data_root: str = None
    head: str = "first"
    threads: int = None


def book_config(device=None, quick=None, runs_dir="runs"):
    """The run that the book's CIFAR-10 chapters train (and later certify), by mode and device.

    * quick mode (CI): the tiny ``XS`` network, 2 epochs on 2,048 training and 500 test images;
    * a CUDA GPU: the paper's ``S`` network, 30 epochs of the full data (the CLI runs the full 200);
    * otherwise (a CPU): the book's ``CPU`` network, 10 epochs of the full data.

    Calling :func:`train` with it resumes the run folder when it exists, so a finished run is loaded,
    not retrained.
    """
    from .utils import device as pick_device
    from .utils import quick_mode

    quick = quick_mode() if quick is None else quick
    device = pick_device() if device is None else torch.device(device)
    runs_dir = pathlib.Path(runs_dir)
    if quick:
        return TrainConfig(size="XS", epochs=2, batch_size=128, limit_train=2048, limit_test=500,
                           out=str(runs_dir / "cifar10-XS-quick"))
    if device.type == "cuda":
        return TrainConfig(size="S", epochs=30, out=str(runs_dir / "cifar10-S-gpu"))
    return TrainConfig(size="CPU", epochs=10, out=str(runs_dir / "cifar10-CPU"))


def lr_at(step, total_steps, lr):
    """Piecewise-linear schedule: 0 -> lr at 2T/5 -> lr/20 at 4T/5 -> 0 at T, evaluated mid-step."""
    t = total_steps
    return float(np.interp(step + 0.5, [0, 2 * t / 5, 4 * t / 5, t], [0.0, lr, lr / 20, 0.0]))


def margin_loss(logits, labels, margin=0.7):
    """Multi-class hinge loss ``mean_i sum_{j != y_i} max(0, margin - (f_y - f_j)) / K``."""
    return F.multi_margin_loss(logits.float(), labels, margin=margin)


def _cpu_has_bf16():
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return False


def use_channels_last(setting, device):
    """Resolve the ``channels_last`` setting: ``"auto"`` means the layout that measured faster.

    Channels-last suits the convolution kernels of GPUs and of CPUs (measured 1.1-1.3x on training and
    1.4x on inference for the book's networks, channel counts multiples of 16; see
    ``benchmarks/RESULTS.md`` for the one case, S with 45 channels on an AVX2-only CPU, where NCHW won).
    """
    if setting == "auto" or setting is None:
        return torch.device(device).type in ("cuda", "cpu")
    return bool(setting)


def autocast_dtype(device, amp="auto"):
    """The autocast dtype for ``device`` (``None`` for float32)."""
    if amp == "off":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return torch.bfloat16 if _cpu_has_bf16() else None
    return None


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def _atomic_write_bytes(path, write):
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_checkpoint(path, model, optimizer, epoch, config, history, step):
    state = {
        "format": CHECKPOINT_FORMAT,
        "version": __version__,
        "config": dataclasses.asdict(config),
        "epoch": epoch,
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "history": history,
    }
    _atomic_write_bytes(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint safely (``weights_only=True``: loading cannot run code); clear errors otherwise."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}; train first with `python -m cpl_mini.train --out {path.parent}`")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, foreign pickle with code, ...
        raise CheckpointError(
            f"cannot read checkpoint {path}: it is corrupt, truncated or not a cpl_mini checkpoint "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). Delete it and train again, "
            "or resume from another copy.") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a cpl_mini checkpoint (expected format {CHECKPOINT_FORMAT!r}).")
    return state


def _write_results(path, config, history, device, wall, status, n_params, final=None, message=None):
    results = {
        "status": status,
        "message": message,
        "config": dataclasses.asdict(config),
        "cpl_mini_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "device": device_name(device),
        "device_type": device.type,
        "threads": torch.get_num_threads(),
        "parameters": n_params,
        "epochs_completed": len(history),
        "history": history,
        "final": final,
        "wall_time_s": wall,
    }
    text = json.dumps(results, indent=2)
    _atomic_write_bytes(path, lambda tmp: pathlib.Path(tmp).write_text(text))
    return results


def _progress(iterable, **kw):
    from tqdm.auto import tqdm

    return tqdm(iterable, **kw)


def _dist_info():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return world, rank, local


def _evaluate(model, test_loader):
    res = certified_accuracy(model, test_loader, eps=DEFAULT_EPS)
    return {"clean_acc": res["accuracy"],
            **{f"cert_{round(e * 255)}": v for e, v in res["certified"].items()}}


def train(config, data=None, progress=True, log=print, stop_after_epoch=None):
    """Run (or resume) a training run; returns the results dict also written to ``results.json``.

    Args:
        config: a :class:`TrainConfig`.
        data: an optional already loaded :class:`cpl_mini.data.CifarData` (else read from
            ``config.data_root``).
        progress: show tqdm progress bars.
        stop_after_epoch: stop (as if interrupted) once this epoch is done; calling ``train`` again
            with the same config resumes from the checkpoint exactly.
    """
    from .data import load_cifar
    from .utils import device as pick_device

    world, rank, local_rank = _dist_info()
    distributed = world > 1
    if config.threads:
        torch.set_num_threads(config.threads)
    if config.device == "auto":
        dev = pick_device()
        if dev.type == "cuda" and distributed:
            dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device(config.device)
    if dev.type == "cpu":
        tune_cpu_allocator()
    if distributed:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if config.batch_size % world:
            raise ValueError(f"batch size {config.batch_size} must be divisible by the {world} processes")
    is_main = rank == 0

    out = pathlib.Path(config.out)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
    ckpt_path, results_path = out / "checkpoint.pt", out / "results.json"

    torch.manual_seed(config.seed)
    model = cpl_network(config.size, num_classes=100 if config.dataset == "cifar100" else 10, head=config.head)
    model.to(dev)
    channels_last = use_channels_last(config.channels_last, dev)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    history, start_epoch, step = [], 0, 0
    if ckpt_path.exists():
        state = load_checkpoint(ckpt_path, map_location=dev)
        saved = state["config"]
        for key in ("size", "dataset", "batch_size", "seed", "epochs", "lr", "margin", "head"):
            if saved.get(key) != getattr(config, key):
                raise CheckpointError(
                    f"{ckpt_path} belongs to a run with {key}={saved.get(key)!r}, not {getattr(config, key)!r}; "
                    "use another --out folder or the same settings to resume.")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history, start_epoch, step = state["history"], state["epoch"], state["step"]
        if is_main:
            log(f"resuming {out} from epoch {start_epoch}")

    if data is None:
        data = load_cifar(config.dataset, root=config.data_root)
    train_loader, test_loader = _loaders(data, config, dev, rank, world)
    steps_per_epoch = len(train_loader)
    total_steps = steps_per_epoch * config.epochs

    amp_dtype = autocast_dtype(dev, config.amp)
    scaler = torch.amp.GradScaler(dev.type) if amp_dtype == torch.float16 else None
    net = model
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    step_fn = _make_step(net, optimizer, config.margin, amp_dtype, dev, scaler)
    if config.compile:
        step_fn = torch.compile(step_fn)
    n_params = count_parameters(model)
    last_epoch = config.epochs if stop_after_epoch is None else min(config.epochs, stop_after_epoch)
    if is_main and start_epoch < last_epoch:
        log(f"training CPL-{model.config['size']} ({n_params / 1e6:.1f}M parameters) on {dev.type} "
            f"[{device_name(dev)}], {train_loader.num_examples} train images, batch {config.batch_size}, {config.epochs} epochs, "
            f"autocast {amp_dtype if amp_dtype else 'off'}, channels_last {channels_last}")

    status, message = "running", None
    for epoch in range(start_epoch, last_epoch):
        t0 = time.time()
        model.train()
        train_loader.set_epoch(epoch)
        total, count = torch.zeros((), device=dev), 0
        bar = _progress(train_loader, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False,
                        disable=not (progress and is_main), total=steps_per_epoch)
        for x, y in bar:
            lr = lr_at(step, total_steps, config.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = step_fn(x, y)
            total += loss.detach()
            count += 1
            step += 1
            if count % 20 == 0 or count == steps_per_epoch:
                mean = total / count
                if distributed:  # every process must see the same value, or they stop at different steps
                    dist.all_reduce(mean)
                    mean = mean / world
                value = mean.item()
                if not math.isfinite(value):
                    break
                bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}")
        mean_loss = (total / max(count, 1)).item()
        if not math.isfinite(mean_loss):
            status = "nan"
            message = (f"the loss became {mean_loss} in epoch {epoch + 1} (step {step}); training stopped. "
                       f"The last good checkpoint (epoch {start_epoch if not history else history[-1]['epoch']}) is kept in "
                       f"{ckpt_path}. CPL runs are known to diverge occasionally in long trainings: rerun with "
                       "another --seed, or a lower --lr.")
            if is_main:
                log("ERROR: " + message)
                _write_results(results_path, config, history, dev, sum(h["seconds"] for h in history), status,
                               n_params, message=message)
            break
        entry = {"epoch": epoch + 1, "loss": mean_loss, "lr_end": lr_at(step - 1, total_steps, config.lr),
                 "train_seconds": time.time() - t0}
        if is_main and ((epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs):
            te = time.time()
            entry.update(_evaluate(model, test_loader))
            entry["eval_seconds"] = time.time() - te
        entry["seconds"] = time.time() - t0
        history.append(entry)
        if is_main:
            save_checkpoint(ckpt_path, model, optimizer, epoch + 1, config, history, step)
            _write_results(results_path, config, history, dev, sum(h["seconds"] for h in history), "running", n_params)
            msg = f"epoch {epoch + 1}/{config.epochs}: loss {mean_loss:.4f}"
            if "clean_acc" in entry:
                msg += (f" | clean {100 * entry['clean_acc']:.2f}% | certified 36/255 {100 * entry['cert_36']:.2f}%"
                        f" 72/255 {100 * entry['cert_72']:.2f}% 108/255 {100 * entry['cert_108']:.2f}%")
            log(msg + f" | {entry['seconds']:.0f} s")
    if distributed:
        import torch.distributed as dist

        dist.barrier()
    wall = sum(h["seconds"] for h in history)
    if status == "running":
        status = "finished" if len(history) >= config.epochs else "stopped"
    final = None
    if history and "clean_acc" in history[-1]:
        final = {k: history[-1][k] for k in ("clean_acc", "cert_36", "cert_72", "cert_108")}
    results = {}
    if is_main:
        results = _write_results(results_path, config, history, dev, wall, status, n_params, final, message)
    if status == "nan" and not is_main:
        raise NonFiniteLossError("non-finite loss")
    return results


def _loaders(data, config, dev, rank=0, world=1):
    """Train loader (this process's shard of each global batch) and the whole test set."""
    from .data import DeviceLoader

    train_loader = DeviceLoader(data.train_images, data.train_labels, config.batch_size, train=True, device=dev,
                                seed=config.seed, std=bool(config.std_normalize), augment=config.augment,
                                limit=config.limit_train, rank=rank, world_size=world,
                                channels_last=use_channels_last(config.channels_last, dev))
    test_loader = DeviceLoader(data.test_images, data.test_labels, 500, train=False, device=dev,
                               mean=train_loader.mean, std=train_loader.std, limit=config.limit_test,
                               channels_last=use_channels_last(config.channels_last, dev))
    return train_loader, test_loader


def _make_step(net, optimizer, margin, amp_dtype, dev, scaler):
    def step(x, y):
        optimizer.zero_grad(set_to_none=True)
        ctx = torch.autocast(dev.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
        with ctx:
            logits = net(x)
        loss = margin_loss(logits, y, margin)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        return loss
    return step


def load_run_model(run_dir, data_root=None, device=None, limit_test=None, data=None):
    """``(model, test_loader, config)`` from a run folder, ready to certify (eval mode, float32)."""
    from .data import load_cifar
    from .utils import device as pick_device

    run_dir = pathlib.Path(run_dir)
    state = load_checkpoint(run_dir / "checkpoint.pt")
    cfg = state["config"]
    dev = torch.device(device) if device else pick_device()
    if dev.type == "cpu":
        tune_cpu_allocator()
    model = cpl_network(cfg["size"], num_classes=100 if cfg["dataset"] == "cifar100" else 10, head=cfg.get("head", "first"))
    model.load_state_dict(state["model"])
    model.to(dev).eval()
    if use_channels_last(cfg.get("channels_last", "auto"), dev):
        model.to(memory_format=torch.channels_last)
    if data is None:
        data = load_cifar(cfg["dataset"], root=data_root or cfg.get("data_root"))
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in cfg.items() if k in known})
    if limit_test is not None:
        config.limit_test = limit_test
    _, test_loader = _loaders(data, config, dev)
    return model, test_loader, cfg


def _bool(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _auto_bool(text):
    return "auto" if text.lower() == "auto" else _bool(text)


def build_parser():
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m cpl_mini.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default=d.dataset, choices=["cifar10", "cifar100"])
    p.add_argument("--size", default=d.size, help="XS, S, M, L, XL (default S)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch size")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--margin", type=float, default=d.margin)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="auto (cuda, mps, cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--amp", default=d.amp, choices=["auto", "bf16", "fp16", "off"],
                   help="autocast: auto = bf16 where supported (default)")
    p.add_argument("--channels-last", type=_auto_bool, default=d.channels_last,
                   help="auto (default: the layout measured faster on this device), true or false")
    p.add_argument("--compile", action="store_true", help="torch.compile the training step")
    p.add_argument("--augment", type=_bool, default=d.augment)
    p.add_argument("--std-normalize", action="store_true", help="divide inputs by the std (certificates account for it)")
    p.add_argument("--limit-train", type=int, default=None, help="use the first N training images")
    p.add_argument("--limit-test", type=int, default=None, help="use the first N test images")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="evaluate every N epochs (and at the end)")
    p.add_argument("--head", default=d.head, choices=["first", "lln"])
    p.add_argument("--out", default=d.out, help="run folder (checkpoint.pt, results.json)")
    p.add_argument("--data-root", default=None, help="CIFAR folder (default: $CPL_MINI_DATA, then the user cache)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k != "no_progress"})
    try:
        results = train(cfg, progress=not args.no_progress)
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if results.get("status") == "nan":
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
