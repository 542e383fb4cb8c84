r"""Throughput of a CPL training step, of inference and of certification: cpl_mini against a plain reference.

Measures, on random data of CIFAR shape (the same seed in every variant):

* **train img/s**: one full training step (forward, multi-margin loss, backward, Adam step, one power
  iteration per CPL layer with the persistent vector) at ``--batch`` (256); median over ``--steps``
  steps after ``--warmup`` warm-up steps; "s/epoch" is ``50000 / (img/s)``;
* **inference img/s**: evaluation mode, float32, batch ``--infer-batch`` (500), cached norms;
* **certify 10k**: wall time of ``cpl_mini.certify.certified_accuracy`` on ``--certify-n`` (10,000)
  images with sound norms, the norm computation of every layer included (fresh model, empty cache).

Variants (each in its own subprocess: ``mallopt`` is process-wide, so the plain reference keeps glibc's
default allocator while cpl_mini's variants call :func:`cpl_mini.allocator.tune_cpu_allocator`):

==============  ===========================================================================================
``plain``       the paper's formula written out below (:class:`PlainCPLConv`, :class:`PlainCPLDense`):
                NCHW float32, ``conv2d`` then ``conv_transpose2d``, one power iteration a step with a
                persistent vector, glibc defaults, no channels-last, no autocast
``default``     cpl_mini's training path as ``python -m cpl_mini.train`` runs it, eager: the network with its
                input normalisation layer, allocator tuned (CPU), layout ``use_channels_last("auto")``
                (channels-last on CUDA and CPUs), autocast ``auto`` (bf16 on CUDA compute capability >= 8.0
                and on CPUs with avx512_bf16 or amx_bf16, fp16 on older GPUs, else float32), the step of
                :func:`cpl_mini.train.make_train_step`
``f32-nchw``    cpl_mini, allocator tuned, NCHW, float32
``f32-cl``      cpl_mini, allocator tuned, channels-last, float32
``bf16-cl``     cpl_mini, allocator tuned, channels-last, bf16 autocast (forced; very slow on CPUs
                without avx512_bf16, where autocast ``auto`` never picks it)
``compile``     ``default`` plus ``torch.compile`` of the step (``--compile`` adds it; the first step, with
                the compile time, reported apart): what ``python -m cpl_mini.train --compile auto`` (the
                default) switches to when the run is long enough to repay the compile time
``certify``     the certification timing only (cpl_mini, float32, layout as ``default``)
==============  ===========================================================================================

Usage (the lead's full run; the S network takes a few minutes on 2 CPU cores)::

    python benchmarks/train_step.py --size S --steps 5
    python benchmarks/train_step.py --size XS --steps 3 --certify-n 2000      # quick check
    python benchmarks/train_step.py --size S --steps 20 --device cuda --compile

Not part of the test suite. See ``benchmarks/README.md``.
"""

import argparse
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

ALL_VARIANTS = ("plain", "default", "f32-nchw", "f32-cl", "bf16-cl", "compile", "certify")
DEFAULT_VARIANTS = ("plain", "default", "f32-nchw", "f32-cl", "bf16-cl", "certify")


# ---------------------------------------------------------------------------------------------
# The plain reference, straight from the paper's formula  z = x - (2 / ||W||^2) W^T relu(W x + b)
# ---------------------------------------------------------------------------------------------
class _PlainCPL(nn.Module):
    """Shared: ``||W||`` by one power iteration a training step from a persistent vector ``u``
    (differentiable estimate ``||W u||``); in eval mode 100 iterations, cached (the official code)."""

    def norm(self):
        if not self.training and self.cached is not None:
            return self.cached
        with torch.no_grad():
            for _ in range(1 if self.training else 100):
                v = self.adj(self.op(self.u))
                self.u.copy_(v / v.norm())
        sigma = self.op(self.u).norm()
        self.cached = None if self.training else sigma.detach()
        return sigma

    def forward(self, x):
        h = 2.0 / self.norm() ** 2
        return x - h * self.adj(F.relu(self.op(x, self.bias)))


class PlainCPLConv(_PlainCPL):
    def __init__(self, c, inner=5, n=32):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(inner, c, 3, 3))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        self.bias = nn.Parameter(torch.empty(inner).uniform_(-((c * 9) ** -0.5), (c * 9) ** -0.5))
        self.register_buffer("u", torch.randn(1, c, n, n))
        self.cached = None

    def op(self, x, b=None):
        return F.conv2d(x, self.weight, b, padding=1)

    def adj(self, y):
        return F.conv_transpose2d(y, self.weight, padding=1)


class PlainCPLDense(_PlainCPL):
    def __init__(self, d, inner):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(inner, d))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        self.bias = nn.Parameter(torch.empty(inner).uniform_(-(d**-0.5), d**-0.5))
        self.register_buffer("u", torch.randn(1, d))
        self.cached = None

    def op(self, x, b=None):
        return F.linear(x, self.weight, b)

    def adj(self, y):
        return F.linear(y, self.weight.t())


class PlainCPLNet(nn.Module):
    """Pad 3 -> C channels, ``depth`` conv CPL, sum-of-4x4 / 4 pooling, flatten, dense CPL, first 10."""

    def __init__(self, depth, depth_linear, c, features, n=32, classes=10):
        super().__init__()
        self.c, self.classes = c, classes
        self.convs = nn.Sequential(*[PlainCPLConv(c, 5, n) for _ in range(depth)])
        self.dense = nn.Sequential(*[PlainCPLDense(c * (n // 4) ** 2, features) for _ in range(depth_linear)])

    def forward(self, x):
        x = self.convs(F.pad(x, (0, 0, 0, 0, 0, self.c - x.shape[1])))
        x = F.avg_pool2d(x, 4, divisor_override=4).flatten(1)
        return self.dense(x)[:, : self.classes]


# ---------------------------------------------------------------------------------------------
# measurement (one variant per process)
# ---------------------------------------------------------------------------------------------
def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timed(fn, dev, n, warmup):
    """Median and all wall times of ``n`` calls of ``fn`` after ``warmup`` calls (first call timed apart)."""
    first = None
    for i in range(warmup):
        _sync(dev)
        t = time.perf_counter()
        fn()
        _sync(dev)
        if i == 0:
            first = time.perf_counter() - t
    times = []
    for _ in range(n):
        _sync(dev)
        t = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t)
    return statistics.median(times), times, first


def _random_batch(n, dev, seed, channels_last):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, 3, 32, 32, generator=g) - 0.5).to(dev)  # CIFAR-like range after mean subtraction
    y = torch.randint(0, 10, (n,), generator=g).to(dev)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def _peak_memory_mib(dev):
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_variant(name, args):
    """Measure one variant in this process; returns a dict."""
    from cpl_mini.models import SIZES, count_parameters, cpl_network, use_channels_last
    from cpl_mini.train import autocast_dtype, make_train_step

    dev = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = {"variant": name}
    size = args.size.upper()
    if name != "plain" and dev.type == "cpu":
        from cpl_mini.allocator import tune_cpu_allocator

        out["allocator_tuned"] = tune_cpu_allocator()

    if name == "certify":
        from cpl_mini.certify import certified_accuracy

        cl = use_channels_last("auto", dev)
        model = cpl_network(size, mean=torch.zeros(3)).to(dev).eval()
        if cl:
            model = model.to(memory_format=torch.channels_last)
        x, y = _random_batch(args.certify_n, dev, 1, channels_last=cl)
        _sync(dev)
        t = time.perf_counter()
        for layer in model:  # the sound norms alone (then cached)
            if hasattr(layer, "eval_spectral_norm"):
                layer.eval_spectral_norm()
        _sync(dev)
        t_norm = time.perf_counter() - t
        for layer in model:
            if hasattr(layer, "reset_norm_cache"):
                layer.reset_norm_cache()
        _sync(dev)
        t = time.perf_counter()
        res = certified_accuracy(model, (x, y), batch_size=args.infer_batch)
        _sync(dev)
        out.update(
            certify_s=time.perf_counter() - t,
            norms_s=t_norm,
            certify_n=args.certify_n,
            channels_last=cl,
            lipschitz=res["lipschitz"],
            parameters=count_parameters(model),
            peak_mem_mib=_peak_memory_mib(dev),
        )
        return out

    if name == "plain":
        model = PlainCPLNet(*SIZES[size]).to(dev)
        channels_last, amp = False, None
    else:
        model = cpl_network(size, mean=torch.zeros(3)).to(dev)  # the training network: normalisation first
        channels_last = name in ("f32-cl", "bf16-cl") or (
            name in ("default", "compile") and use_channels_last("auto", dev)
        )
        amp = {
            "default": autocast_dtype(dev, "auto"),
            "compile": autocast_dtype(dev, "auto"),
            "bf16-cl": torch.bfloat16,
        }.get(name)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
    out.update(
        parameters=count_parameters(model),
        channels_last=channels_last,
        autocast=str(amp).replace("torch.", "") if amp else "off",
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = _random_batch(args.batch, dev, 0, channels_last)

    if name == "plain":

        def step():
            opt.zero_grad(set_to_none=True)
            loss = F.multi_margin_loss(model(x), y, margin=0.7)
            loss.backward()
            opt.step()
    else:
        scaler = torch.amp.GradScaler(dev.type) if amp == torch.float16 else None  # GPUs before Ampere
        step_fn = make_train_step(model, opt, 0.7, amp, dev, scaler)
        if name == "compile":
            step_fn = torch.compile(step_fn)

        def step():
            step_fn(x, y)

    model.train()
    warmup = max(args.warmup, 2) if name == "compile" else args.warmup
    med, times, first = _timed(step, dev, args.steps, warmup)
    out.update(
        train_step_s=med,
        train_img_s=args.batch / med,
        epoch_s=50000 * med / args.batch,
        train_times=times,
        first_step_s=first,
    )

    if args.infer_steps and name != "compile":
        model.eval()
        xi, _ = _random_batch(args.infer_batch, dev, 2, channels_last)
        with torch.no_grad():
            model(xi[:2])  # norms cached (sound FFT / SVD for cpl_mini, 100 iterations for plain)

            def infer():
                model(xi)

            med_i, times_i, _ = _timed(infer, dev, args.infer_steps, 1)
        out.update(infer_img_s=args.infer_batch / med_i, infer_times=times_i)
    out["peak_mem_mib"] = _peak_memory_mib(dev)
    return out


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------
def machine(dev):
    from cpl_mini.train import cpu_info

    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
    else:
        name, cpu_flags = cpu_info()
        flags = [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni") if f in cpu_flags]
        name += f" [{', '.join(flags) or 'no avx512'}]"
    return (
        f"{name} | {os.cpu_count()} logical CPUs | torch {torch.__version__} threads "
        f"{torch.get_num_threads()} | Python {platform.python_version()}"
    )


def _fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def table(results, args):
    lines = [
        f"| variant | autocast | channels-last | train img/s (batch {args.batch}) | s per 50k epoch | "
        f"speed-up vs plain | inference img/s (batch {args.infer_batch}, f32) | peak MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = next((r.get("train_img_s") for r in results if r["variant"] == "plain"), None)
    base_i = next((r.get("infer_img_s") for r in results if r["variant"] == "plain"), None)
    for r in results:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error'][:120]} |||||||")
            continue
        if r["variant"] == "certify":
            continue
        up = f"{r['train_img_s'] / base:.2f}x" if base else "-"
        inf = _fmt(r.get("infer_img_s"), ".0f")
        if base_i and r.get("infer_img_s"):
            inf += f" ({r['infer_img_s'] / base_i:.2f}x)"
        compiled = r["variant"] == "compile" and r.get("first_step_s")
        extra = f" (first step {r['first_step_s']:.0f} s)" if compiled else ""
        lines.append(
            f"| {r['variant']}{extra} | {r['autocast']} | {'yes' if r['channels_last'] else 'no'} | "
            f"{r['train_img_s']:.1f} | {r['epoch_s']:.0f} | {up} | {inf} | "
            f"{_fmt(r.get('peak_mem_mib'), '.0f')} |"
        )
    for r in results:
        if r["variant"] == "certify" and "error" not in r:
            lines.append("")
            layout = "channels-last" if r.get("channels_last") else "NCHW"
            lines.append(
                f"Certification of {r['certify_n']} images (sound norms, float32, {layout}, batch "
                f"{args.infer_batch}): {r['certify_s']:.1f} s in all, of which {r['norms_s']:.1f} s "
                f"for the sound norms of all layers (Lipschitz bound {r['lipschitz']:.6f})."
            )
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="S", help="XS, CPU, S, M, L, XL (default S)")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per variant (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--infer-batch", type=int, default=500)
    p.add_argument("--infer-steps", type=int, default=3, help="timed inference batches (0: skip)")
    p.add_argument("--certify-n", type=int, default=10000, help="images for the certification timing")
    p.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help=f"comma-separated, from {', '.join(ALL_VARIANTS)}",
    )
    p.add_argument("--compile", action="store_true", help="add the torch.compile variant")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="also write all measurements to this file")
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # internal: measure one variant
    args = p.parse_args(argv)
    from cpl_mini.models import SIZES

    if args.size.upper() not in SIZES:
        p.error(f"unknown size {args.size!r}; choose one of {sorted(SIZES)}")
    args.size = args.size.upper()

    if args.variant:  # child process
        try:
            res = run_variant(args.variant, args)
        except Exception as exc:  # reported in the table, the other variants still run
            res = {"variant": args.variant, "error": f"{type(exc).__name__}: {exc}"}
        print("RESULT " + json.dumps(res), flush=True)
        return 0

    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.compile and "compile" not in variants:
        variants.append("compile")
    bad = [v for v in variants if v not in ALL_VARIANTS]
    if bad:
        p.error(f"unknown variants {bad}; choose from {ALL_VARIANTS}")
    print(f"machine: {machine(dev)}")
    print(
        f"network CPL-{args.size.upper()}, batch {args.batch}, {args.steps} timed steps after "
        f"{args.warmup} warm-up, random data of CIFAR shape; each variant in its own process",
        flush=True,
    )
    results = []
    for v in variants:
        cmd = [sys.executable, os.path.abspath(__file__), "--variant", v] + [
            a for a in (argv if argv is not None else sys.argv[1:])
        ]
        env = dict(os.environ)
        env.pop("GLIBC_TUNABLES", None) if v == "plain" else None  # the reference: glibc defaults
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("RESULT ")), None)
        if line is None:
            res = {"variant": v, "error": f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}"}
        else:
            res = json.loads(line[len("RESULT ") :])
        res["process_s"] = time.perf_counter() - t
        results.append(res)
        if "error" in res:
            print(f"  {v}: FAILED {res['error']}", flush=True)
        elif v == "certify":
            print(
                f"  {v}: {res['certify_s']:.1f} s for {res['certify_n']} images "
                f"(norms {res['norms_s']:.1f} s)",
                flush=True,
            )
        else:
            print(
                f"  {v}: {res['train_img_s']:.1f} train img/s, inference "
                f"{_fmt(res.get('infer_img_s'), '.0f')} img/s ({res['process_s']:.0f} s)",
                flush=True,
            )
    print()
    print(table(results, args))
    if args.json:
        pathlib.Path(args.json).write_text(
            json.dumps({"machine": machine(dev), "args": vars(args), "results": results}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
