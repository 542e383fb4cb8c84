"""The fast path a machine gets: its CPU, the autocast dtype, whether ``torch.compile`` pays, and the
set-up of a training process (``process_setup``: device, process group, autocast, memory layout).

The training loop (:mod:`cpl_mini.train`) asks this module three questions about the hardware at hand:
which CPU it is (:func:`cpu_info`, ``/proc/cpuinfo`` read once), which reduced precision the hardware
computes in natively (:func:`autocast_dtype`: bf16 on CUDA compute capability >= 8.0 and on CPUs with
AVX512-BF16 or AMX-BF16, fp16 with a gradient scaler on older GPUs, float32 elsewhere), and whether
compiling the training step repays its compile time in the rest of a run (:func:`compile_decision`,
decided from the run's size and its measured eager step time). Certification never uses any of this:
it runs in float32 or float64 with sound norms (:mod:`cpl_mini.certify`).
"""

import dataclasses
import functools
import os
import platform
from typing import Dict, FrozenSet, Optional, Tuple

import torch

from .allocator import tune_cpu_allocator
from .models import use_channels_last

__all__ = [
    "COMPILE_COST_S",
    "COMPILE_SAVING",
    "COMPILE_MARGIN",
    "COMPILE_MIN_STEPS",
    "cpu_info",
    "autocast_dtype",
    "device_name",
    "compile_decision",
    "ProcessSetup",
    "process_setup",
]

#: torch.compile's measured cost and gain (AMD EPYC Zen 4 with AVX512-BF16, 2 threads, bf16 autocast):
#: first compiled step 42 s for the CPU network (11 CPL layers) and 92 s for S (27 CPL layers), a
#: line through both: ``8 s + 3.2 s`` per CPL layer. Steps got faster by 1.34x (CPU network) and 1.24x
#: (S): the smaller gain, a saving of 19 % of the eager time, is the one assumed.
COMPILE_COST_S = (8.0, 3.2)
COMPILE_SAVING = 0.19
#: Compile only when the expected saving is at least this multiple of the estimated compile cost.
COMPILE_MARGIN = 2.0
#: Runs with fewer remaining steps stay eager whatever their step time: the first steps of a run are
#: timed on a machine that may be busy, which makes eager steps look slow while the compilation would
#: be as slowed down (seen: a 192-step test run compiled on a 2-core machine at load 15).
COMPILE_MIN_STEPS = 500


@functools.lru_cache(maxsize=1)
def cpu_info() -> Tuple[str, FrozenSet[str]]:
    """``(model name, flags)`` of this machine's CPU, from ``/proc/cpuinfo`` read once per process
    (``platform.processor()`` and no flags where that file does not exist)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())  # the first processor's lines
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    return name, frozenset(fields.get("flags", "").split())


def autocast_dtype(device: torch.device, amp: str = "auto") -> Optional[torch.dtype]:
    """The autocast dtype for ``device`` (``None`` for float32).

    ``"auto"``: bf16 where the hardware computes in it, that is CUDA compute capability >= 8.0 (Ampere
    and later; ``torch.cuda.is_bf16_supported()`` also counts emulation, as on a T4 or V100) and CPUs
    with the ``avx512_bf16`` or ``amx_bf16`` flag; fp16 (with a gradient scaler) on older GPUs; float32
    elsewhere.
    """
    if amp == "off":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return torch.bfloat16 if major >= 8 else torch.float16
    if device.type == "cpu":
        flags = cpu_info()[1]
        return torch.bfloat16 if "avx512_bf16" in flags or "amx_bf16" in flags else None
    return None


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name and the number of threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_info()[0]} ({torch.get_num_threads()} threads)"


def compile_decision(
    remaining_steps: int, eager_step_s: Optional[float], cpl_layers: int, device_type: str = "cpu"
) -> Dict[str, object]:
    """Whether ``torch.compile`` of the step pays for itself in the rest of the run.

    Estimated cost ``8 s + 3.2 s x cpl_layers`` (``COMPILE_COST_S``), expected saving
    ``COMPILE_SAVING x remaining_steps x eager_step_s`` (19 % of the eager time); compile only when the
    saving is at least twice the cost. Never on MPS, nor when fewer than ``COMPILE_MIN_STEPS`` (500)
    steps remain.
    Returns ``{"compile", "reason", "estimated_cost_s", "expected_saving_s", "eager_step_s"}``.
    """
    cost = COMPILE_COST_S[0] + COMPILE_COST_S[1] * cpl_layers
    out = {
        "compile": False,
        "estimated_cost_s": round(cost, 1),
        "eager_step_s": None if eager_step_s is None else round(eager_step_s, 4),
        "expected_saving_s": None,
    }
    if device_type not in ("cpu", "cuda"):
        return {**out, "reason": f"torch.compile is not used on {device_type}"}
    if eager_step_s is None or remaining_steps < COMPILE_MIN_STEPS:
        reason = f"{remaining_steps} steps: too short to repay a compilation (compile cost ~{cost:.0f} s)"
        return {**out, "reason": reason}
    saving = COMPILE_SAVING * remaining_steps * eager_step_s
    out.update(compile=saving >= COMPILE_MARGIN * cost, expected_saving_s=round(saving, 1))
    verdict = "compile" if out["compile"] else "stay eager"
    out["reason"] = (
        f"{remaining_steps} steps of {eager_step_s:.3f} s: expected saving {saving:.0f} s vs "
        f"compile cost ~{cost:.0f} s -> {verdict}"
    )
    return out


@dataclasses.dataclass
class ProcessSetup:
    """Where and how this process trains: device, process group, autocast dtype, memory layout."""

    device: torch.device
    rank: int = 0
    world: int = 1
    amp_dtype: Optional[torch.dtype] = None
    channels_last: bool = False

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def process_setup(config) -> ProcessSetup:
    """Threads, device (checked to exist), allocator, process group (``torchrun`` sets ``WORLD_SIZE``,
    ``RANK``, ``LOCAL_RANK``), autocast dtype and memory layout for ``config`` (a
    :class:`~cpl_mini.runs.TrainConfig`)."""
    from .runs import resolve_device  # late import: the run machinery is above this module

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and config.batch_size % world:
        raise ValueError(f"batch size {config.batch_size} must be divisible by the {world} processes")
    if config.threads:
        torch.set_num_threads(config.threads)
    dev = resolve_device(config.device)
    if dev.type == "cuda" and world > 1 and dev.index is None:
        dev = torch.device("cuda", local_rank)
    if dev.type == "cpu":
        tune_cpu_allocator()
    if world > 1:
        import torch.distributed as dist

        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return ProcessSetup(
        dev, rank, world, autocast_dtype(dev, config.amp), use_channels_last(config.channels_last, dev)
    )
