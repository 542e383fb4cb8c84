r"""The training loop of a CPL network on CIFAR-10/100 with the paper's recipe.

Recipe: Adam (lr ``1e-3``, no weight decay), batch 256, the piecewise-linear schedule
``[0, 2T/5, 4T/5, T] -> [0, lr, lr/20, 0]`` over the ``T`` optimisation steps (:func:`lr_at`), the
multi-class hinge loss ``multi_margin_loss(margin=0.7)`` (:func:`margin_loss`), augmentation by 4-pixel
reflect-padded random crops and horizontal flips (on the device). The network takes raw ``[0, 1]``
pixels: its first layer subtracts the per-channel mean of the training pictures (and divides by their
std with ``std_normalize``), so the statistics travel with the weights and the certificate includes them.

Your own network: ``train(config, model=factory)`` with a factory ``factory(config) -> nn.Module``
(called after seeding: a reproducible initialisation, rebuilt on an exact resume) or an ``nn.Module``;
the run puts the same input normalisation in front of it, checks once before training that it can be
certified, and records its architecture (:mod:`cpl_mini.custom`). Command line: ``--model
MODULE:FUNCTION``.

A run, step by step (:func:`train`): set-up (device, autocast dtype, processes); continue the run folder's
checkpoint when there is one (a finished run is returned as recorded, nothing rewritten); epochs of
optimisation steps, each returning its mean loss reduced over all processes; after each epoch the
evaluation of clean and certified accuracy with sound norms in float32 (never compiled), the checkpoint
and ``results.json`` (:mod:`cpl_mini.runs`). A NaN/inf loss on any process stops every process with a
clear message, keeping the last good checkpoint.

Fast path (the default): the data set lives on the device; channels-last memory format; bf16 autocast
where the hardware computes in bf16 (CUDA compute capability >= 8.0; CPUs with AVX512-BF16 or AMX-BF16;
fp16 with a gradient scaler on older GPUs), the norm computations in float32; on CPUs the glibc
allocator keeps freed memory (:func:`cpl_mini.allocator.tune_cpu_allocator`); ``torch.compile`` of the
step when the run is long enough to repay it (:func:`compile_decision`).

Several processes: ``torchrun --nproc_per_node=N -m cpl_mini.train ...`` (DistributedDataParallel; each
process takes its shard of every global batch). Command line: ``python -m cpl_mini.train --help``
(:mod:`cpl_mini.cli`).
"""

import contextlib
import dataclasses
import math
import pathlib
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import __version__
from .certify import DEFAULT_EPS, certified_accuracy, eps_label
from .custom import ModelArg, architecture, check_certifiable, import_factory, network_label
from .fastpath import ProcessSetup, autocast_dtype, compile_decision, cpu_info, device_name, process_setup
from .models import count_parameters
from .records import read_results
from .runs import (  # noqa: F401  (book_config, load_run_model: re-exported, they lived here before)
    CheckpointError,
    TrainConfig,
    book_config,
    check_same_run,
    load_checkpoint,
    load_model_state,
    load_run_model,
    resolve_device,
    restore_rng_state,
    rng_state,
    run_loaders,
    run_network,
    save_checkpoint,
    write_results,
)

__all__ = [
    "lr_at",
    "margin_loss",
    "cpu_info",
    "autocast_dtype",
    "device_name",
    "make_train_step",
    "compile_decision",
    "train",
    "main",
]

#: Eager steps timed at the start of a run before ``compile="auto"`` decides (after one warm-up step).
PROBE_STEPS = 5


def lr_at(step: float, total_steps: int, lr: float) -> float:
    """Piecewise-linear schedule: 0 -> lr at 2T/5 -> lr/20 at 4T/5 -> 0 at T, evaluated mid-step."""
    t = total_steps
    return float(np.interp(step + 0.5, [0, 2 * t / 5, 4 * t / 5, t], [0.0, lr, lr / 20, 0.0]))


def margin_loss(logits: torch.Tensor, labels: torch.Tensor, margin: float = 0.7) -> torch.Tensor:
    """Multi-class hinge loss ``mean_i sum_{j != y_i} max(0, margin - (f_y - f_j)) / K``.

    ``logits``: ``(N, K)`` (computed in float32), ``labels``: ``(N,)``; returns a scalar.
    """
    return F.multi_margin_loss(logits.float(), labels, margin=margin)


# -- set-up ------------------------------------------------------------------------------------------
def _check_data(data, config: TrainConfig) -> None:
    """Labels in ``[0, num_classes)`` (checked once per split) and at least one full training batch."""
    k = config.num_classes
    for split, labels in (("training", data.train_labels), ("test", data.test_labels)):
        labels = torch.as_tensor(labels)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= k):
            raise ValueError(
                f"the {split} labels must lie in [0, {k}) for {config.dataset}, found values "
                f"from {int(labels.min())} to {int(labels.max())}; check the data set"
            )
    n = len(data.train_labels)
    n = n if config.limit_train is None else min(config.limit_train, n)
    if n < config.batch_size:
        what = f"--limit-train {config.limit_train} leaves" if config.limit_train else "the data set has"
        raise ValueError(
            f"{what} {n} training images, fewer than one batch of {config.batch_size} (every "
            f"training batch is full): use --limit-train {config.batch_size} or more, or a "
            "smaller --batch-size"
        )


# -- the step ----------------------------------------------------------------------------------------
def make_train_step(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    margin: float,
    amp_dtype: Optional[torch.dtype],
    device: torch.device,
    scaler: Optional["torch.amp.GradScaler"] = None,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The training step ``(x, y) -> loss``: forward under autocast ``amp_dtype`` (none for float32),
    :func:`margin_loss` in float32, backward (through ``scaler`` for fp16), optimiser step.

    ``x``: ``(B, 3, H, W)`` pixels, ``y``: ``(B,)`` labels; the learning rate is the optimiser's.
    ``torch.compile`` accepts the returned function as it is.
    """

    def step(x, y):
        optimizer.zero_grad(set_to_none=True)
        ctx = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
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


# -- a run in memory ---------------------------------------------------------------------------------
@dataclasses.dataclass
class _Run:
    config: TrainConfig
    setup: ProcessSetup
    model: nn.Sequential
    optimizer: torch.optim.Optimizer
    scaler: Optional["torch.amp.GradScaler"]
    train_loader: object
    test_loader: object
    eager_step: Callable
    step_fn: Callable
    total_steps: int
    step: int = 0
    start_epoch: int = 0
    history: List[dict] = dataclasses.field(default_factory=list)
    compile_info: Dict[str, object] = dataclasses.field(default_factory=dict)
    probe: Optional[List[float]] = None
    results_path: Optional[pathlib.Path] = None
    ckpt_path: Optional[pathlib.Path] = None

    @property
    def cpl_layers(self) -> int:
        """The layers the compile cost grows with: the CPL layers, or your network's modules with weights."""
        cfg = self.model.config
        if "depth" in cfg:
            return cfg["depth"] + cfg["depth_linear"]
        return sum(1 for m in self.model.modules() if next(m.parameters(recurse=False), None) is not None)


def _build(
    config: TrainConfig,
    setup: ProcessSetup,
    data,
    state: Optional[dict],
    out: pathlib.Path,
    own: Optional[ModelArg],
) -> _Run:
    """Data, network (normalisation statistics from the training pictures; your own ``own`` checked to be
    certifiable), optimiser, scaler, loaders, step; then the checkpoint's state when continuing."""
    from .cifar import load_cifar
    from .loader import channel_stats

    dev = setup.device
    if data is None:
        data = load_cifar(config.dataset, root=config.data_root)
    _check_data(data, config)
    torch.manual_seed(config.seed)
    # the statistics of the training pictures; a checkpoint brings its own (placeholders until loaded)
    mean, std = (None, None) if state is not None else channel_stats(data.train_images)
    model = run_network(config, mean, std, model=own).to(dev)
    if own is not None:
        check_certifiable(model, config.num_classes, tuple(data.train_images.shape[1:]))
    if setup.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    scaler = torch.amp.GradScaler(dev.type) if setup.amp_dtype == torch.float16 else None
    train_loader, test_loader = run_loaders(data, config, dev, setup.channels_last, setup.rank, setup.world)
    net = model
    if setup.distributed:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    step = make_train_step(net, optimizer, config.margin, setup.amp_dtype, dev, scaler)
    run = _Run(
        config,
        setup,
        model,
        optimizer,
        scaler,
        train_loader,
        test_loader,
        step,
        step,
        total_steps=len(train_loader) * config.epochs,
        results_path=out / "results.json",
        ckpt_path=out / "checkpoint.pt",
    )
    if state is not None:
        _resume(run, state)
    return run


def _resume(run: _Run, state: dict) -> None:
    """Weights (normalisation statistics included; the architecture checked), optimiser, gradient scaler,
    this process's random generators (when the checkpoint has one state per process), history, step."""
    load_model_state(run.model, state, source=str(run.ckpt_path))
    rng = state.get("rng")
    if rng and len(rng) == run.setup.world:
        restore_rng_state(rng[run.setup.rank], run.setup.device)
    run.optimizer.load_state_dict(state["optimizer"])
    if run.scaler is not None and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    run.history, run.start_epoch, run.step = list(state["history"]), int(state["epoch"]), int(state["step"])


def _start_compile(run: _Run, log: Callable) -> None:
    """Resolve ``config.compile`` now (``"on"``/``"off"``) or schedule the timing of the first steps."""
    setting = run.config.compile
    remaining = run.total_steps - run.step
    if setting == "auto":
        if remaining > PROBE_STEPS + 1 and run.setup.device.type in ("cpu", "cuda"):
            run.probe = []
            run.compile_info = {"setting": "auto", "compiled": False, "reason": "deciding"}
            return
        decision = compile_decision(remaining, None, run.cpl_layers, run.setup.device.type)
    else:
        decision = {"compile": setting == "on", "reason": f"compile={setting}"}
    _apply_compile(run, decision, log)


def _apply_compile(run: _Run, decision: Dict[str, object], log: Callable) -> None:
    run.probe = None
    run.compile_info = {
        "setting": run.config.compile,
        "compiled": bool(decision["compile"]),
        **{k: v for k, v in decision.items() if k != "compile"},
    }
    if decision["compile"]:
        run.step_fn = torch.compile(run.eager_step)
    if run.setup.is_main:
        log(f"torch.compile: {'on' if decision['compile'] else 'off'} ({decision['reason']})")


def _observe_step(run: _Run, seconds: float, log: Callable) -> None:
    """Collect the eager step times of ``compile="auto"``; decide after the warm-up and PROBE_STEPS steps
    (on the slowest process's median, so that all processes decide alike)."""
    run.probe.append(seconds)
    if len(run.probe) < PROBE_STEPS + 1:
        return
    median = torch.tensor(statistics.median(run.probe[1:]), dtype=torch.float64, device=run.setup.device)
    if run.setup.distributed:
        import torch.distributed as dist

        dist.all_reduce(median, op=dist.ReduceOp.MAX)
    decision = compile_decision(
        run.total_steps - run.step - 1, float(median), run.cpl_layers, run.setup.device.type
    )  # the steps after this one
    _apply_compile(run, decision, log)


# -- one epoch ---------------------------------------------------------------------------------------
def _reduced_mean(total: torch.Tensor, count: int, setup: ProcessSetup) -> float:
    """The mean loss over the steps so far, averaged over all processes (the same value everywhere)."""
    mean = total / max(count, 1)
    if setup.distributed:
        import torch.distributed as dist

        mean = mean.clone()
        dist.all_reduce(mean)
        mean = mean / setup.world
    return float(mean.item())


def _train_epoch(run: _Run, epoch: int, progress: bool = True, log: Callable = print) -> float:
    """One epoch of optimisation steps; returns its mean loss reduced over all processes.

    Every 20 steps and at the end the loss is reduced; every process stops the epoch at the first
    non-finite value (all see the same value, so all stop at the same step) and it is returned.
    """
    from tqdm.auto import tqdm

    config, setup = run.config, run.setup
    run.model.train()
    run.train_loader.set_epoch(epoch)
    steps = len(run.train_loader)
    total, count, value = torch.zeros((), device=setup.device), 0, float("nan")
    bar = tqdm(
        run.train_loader,
        desc=f"epoch {epoch + 1}/{config.epochs}",
        leave=False,
        disable=not (progress and setup.is_main),
        total=steps,
    )
    for x, y in bar:
        lr = lr_at(run.step, run.total_steps, config.lr)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        t = time.perf_counter()
        loss = run.step_fn(x, y)
        if run.probe is not None:
            if setup.device.type == "cuda":
                torch.cuda.synchronize(setup.device)
            _observe_step(run, time.perf_counter() - t, log)
        total += loss.detach()
        count += 1
        run.step += 1
        if count % 20 == 0 or count == steps:
            value = _reduced_mean(total, count, setup)
            if not math.isfinite(value):
                break
            bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}")
    return value


# -- end of an epoch ---------------------------------------------------------------------------------
def _evaluate(run: _Run) -> Dict[str, float]:
    """Clean and certified accuracy (sound norms, float32, eager). A test loader sharded over the
    processes is evaluated by all of them and the radii gathered; otherwise by the main process."""
    setup, loader = run.setup, run.test_loader
    sharded = setup.distributed and getattr(loader, "world_size", 1) > 1
    if not (sharded or setup.is_main):
        return {}
    res = certified_accuracy(run.model, loader, eps=DEFAULT_EPS, input_lipschitz=1.0)
    radii = res["radii"]
    if sharded:
        radii = torch.cat(_gathered(radii, setup))
    entry = {"clean_acc": (radii > 0).float().mean().item()}
    entry["certified"] = {eps_label(e): (radii > e).float().mean().item() for e in DEFAULT_EPS}
    entry.update(eval_images=int(radii.numel()), lipschitz=float(res["lipschitz"]))
    return entry


def _end_of_epoch(run: _Run, epoch: int, loss: float, seconds: float, log: Callable) -> None:
    """Evaluation when due, the history entry, the checkpoint and the record (main process)."""
    config = run.config
    entry = {
        "epoch": epoch + 1,
        "loss": loss,
        "lr_end": lr_at(run.step - 1, run.total_steps, config.lr),
        "train_seconds": seconds,
    }
    if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:
        te = time.time()
        entry.update(_evaluate(run))
        entry["eval_seconds"] = time.time() - te
    entry["seconds"] = seconds + entry.get("eval_seconds", 0.0)
    run.history.append(entry)
    rng = _gathered(rng_state(run.setup.device), run.setup)
    if not run.setup.is_main:
        return
    save_checkpoint(
        run.ckpt_path, run.model, run.optimizer, epoch + 1, config, run.history, run.step, run.scaler, rng
    )
    write_results(run.results_path, _record(run, "running"))
    msg = f"epoch {epoch + 1}/{config.epochs}: loss {loss:.4f}"
    if "clean_acc" in entry:
        certified = " ".join(f"{k} {100 * v:.2f}%" for k, v in entry["certified"].items())
        msg += f" | clean {100 * entry['clean_acc']:.2f}% | certified {certified}"
    log(msg + f" | {entry['seconds']:.0f} s")


def _gathered(value: object, setup: ProcessSetup) -> List[object]:
    """``[value of process 0, value of process 1, ...]`` (every process takes part)."""
    if not setup.distributed:
        return [value]
    import torch.distributed as dist

    parts = [None] * setup.world
    dist.all_gather_object(parts, value)
    return parts


def _record(run: _Run, status: str, message: Optional[str] = None) -> Dict[str, object]:
    """The content of ``results.json``."""
    history, dev = run.history, run.setup.device
    final = None
    if history and "clean_acc" in history[-1]:
        final = {k: history[-1][k] for k in ("clean_acc", "certified")}
    return {
        "status": status,
        "message": message,
        "config": dataclasses.asdict(run.config),
        "network": network_label(run.model),
        "architecture": architecture(run.model),
        "cpl_mini_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "device": device_name(dev),
        "device_type": dev.type,
        "threads": torch.get_num_threads(),
        "processes": run.setup.world,
        "autocast": str(run.setup.amp_dtype).replace("torch.", "") if run.setup.amp_dtype else "off",
        "channels_last": run.setup.channels_last,
        "compile": run.compile_info,
        "parameters": count_parameters(run.model),
        "epochs_completed": len(history),
        "history": history,
        "final": final,
        "wall_time_s": sum(h["seconds"] for h in history),
    }


def _diverged_message(run: _Run, loss: float, epoch: int) -> str:
    kept = run.history[-1]["epoch"] if run.history else run.start_epoch
    where = (
        f"the last good checkpoint (epoch {kept}) is kept in {run.ckpt_path}"
        if kept
        else "no epoch finished, so there is no checkpoint"
    )
    return (
        f"the loss became {loss} in epoch {epoch + 1} (step {run.step}); training stopped on every "
        f"process and {where}. CPL runs are known to diverge occasionally in long trainings: rerun "
        "with another --seed, or a lower --lr."
    )


# -- the whole run -----------------------------------------------------------------------------------
def train(
    config: TrainConfig,
    data=None,
    progress: bool = True,
    log: Callable = print,
    stop_after_epoch: Optional[int] = None,
    model: Optional[ModelArg] = None,
) -> Dict[str, object]:
    """Run or continue a training run; returns the record also written to ``results.json``.

    Args:
        config: a :class:`~cpl_mini.runs.TrainConfig`. If ``config.out`` holds a checkpoint, the run
            continues from it exactly (its identity fields and architecture must match, else
            ``CheckpointError``); a finished run returns its stored record and writes nothing.
        data: an optional already loaded :class:`cpl_mini.cifar.CifarData` (else read from
            ``config.data_root``).
        progress: show progress bars.
        log: where the messages go (``print``).
        stop_after_epoch: stop (status ``"stopped"``) once this epoch is done; calling ``train`` again
            with the same config (and ``model``) continues exactly.
        model: your own network instead of ``cpl_network(config.size)``: a factory
            ``model(config) -> nn.Module`` (preferred: called after ``torch.manual_seed(config.seed)``) or
            an ``nn.Module``. It receives normalised pictures ``(N, 3, 32, 32)``, must return
            ``(N, num_classes)`` logits and be certifiable (``cpl_mini.bounds``), checked before
            training (``ValueError``). ``config.model`` (``--model``) only records the factory's name;
            ``train`` never imports it.
    Status in the record: ``finished``, ``stopped``, ``nan`` (the loss diverged), ``interrupted``
    (``KeyboardInterrupt``) or ``failed`` (another exception); both re-raised once the record is written.
    """
    if config.model is not None and model is None:
        raise ValueError(
            f"config.model is {config.model!r}: pass the factory itself as model= (train imports no code; "
            "the command line's --model does)"
        )
    setup = process_setup(config)
    out = pathlib.Path(config.out)
    ckpt_path, results_path = out / "checkpoint.pt", out / "results.json"
    state = None
    if ckpt_path.exists():
        state = load_checkpoint(ckpt_path, map_location=setup.device)
        check_same_run(state["config"], config, ckpt_path)
        stored = read_results(results_path)
        if state["epoch"] >= config.epochs and stored and stored.get("status") == "finished":
            if setup.is_main:
                log(f"{out}: the run is finished; its record is returned unchanged")
            return stored
    run = _build(config, setup, data, state, out, model)
    if state is not None and setup.is_main:
        log(f"continuing {out} from epoch {run.start_epoch}")
    try:
        return _train_epochs(run, progress, log, stop_after_epoch)
    except (KeyboardInterrupt, Exception) as exc:  # the record says what happened, then the error goes on
        if setup.is_main:
            done = run.history[-1]["epoch"] if run.history else 0
            interrupted = isinstance(exc, KeyboardInterrupt)
            what = "interrupted" if interrupted else f"failed ({type(exc).__name__}: {exc})"
            message = f"{what} after {done} complete epoch(s); run the same command again to continue"
            message += " from the last checkpoint"
            write_results(results_path, _record(run, "interrupted" if interrupted else "failed", message))
        raise


def _train_epochs(run: _Run, progress: bool, log: Callable, stop_after_epoch: Optional[int]) -> Dict:
    config, setup = run.config, run.setup
    last_epoch = config.epochs if stop_after_epoch is None else min(config.epochs, stop_after_epoch)
    if setup.is_main and run.start_epoch < last_epoch:
        amp = str(setup.amp_dtype).replace("torch.", "") if setup.amp_dtype else "off"
        log(
            f"training {network_label(run.model)} ({count_parameters(run.model) / 1e6:.1f}M parameters) on "
            f"{setup.device.type} [{device_name(setup.device)}], {run.train_loader.num_examples} train "
            f"images, batch {config.batch_size}, {config.epochs} epochs, autocast {amp}, "
            f"channels_last {setup.channels_last}"
        )
    if run.start_epoch < last_epoch:
        _start_compile(run, log)
    status, message = "running", None
    for epoch in range(run.start_epoch, last_epoch):
        t0 = time.time()
        loss = _train_epoch(run, epoch, progress, log)
        if not math.isfinite(loss):
            status, message = "nan", _diverged_message(run, loss, epoch)
            if setup.is_main:
                log("ERROR: " + message)
            break
        _end_of_epoch(run, epoch, loss, time.time() - t0, log)
    if setup.distributed:
        import torch.distributed as dist

        dist.barrier()
    if status == "running":
        status = "finished" if len(run.history) >= config.epochs else "stopped"
    results = _record(run, status, message)
    if setup.is_main:
        write_results(run.results_path, results)
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m cpl_mini.train``: exit 0 when the run finished or stopped, 2 on bad input, 3 when the
    loss diverged, 130 when interrupted."""
    from .cli import parse_train_args

    config, progress = parse_train_args(argv)
    try:
        model = import_factory(config.model) if config.model else None  # named by the user's command line
        results = train(config, progress=progress, model=model)
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"interrupted: run the same command again to continue {config.out} from its last checkpoint",
            file=sys.stderr,
        )
        return 130
    return 3 if results.get("status") == "nan" else 0


if __name__ == "__main__":
    sys.exit(main())
