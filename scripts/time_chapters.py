"""Time every chapter in quick and full mode on this machine and write the table of the teaching page.

    python scripts/time_chapters.py --out book/chapter_times.md                  # all chapters, both modes
    python scripts/time_chapters.py --modes quick --chapters 01,02 --out FILE    # some of them
    python scripts/time_chapters.py --update --chapters 08 --out book/chapter_times.md
    python scripts/time_chapters.py --note "a T4 on Colab" --out FILE

Each chapter is executed top to bottom in a fresh kernel (nbclient), like ``scripts/execute_notebook.py``,
but on a *copy* in a temporary folder: the committed notebooks are never touched. The chapters of one
call run in order in the same folder, so chapter 9 finds the run that chapter 8 trained there, as a
reader's would (``--runs DIR`` copies an existing run folder in first: chapters 8 and 9 then load it).
Quick mode sets ``CPL_MINI_QUICK=1``; full mode unsets it. The time is the wall-clock time of the whole
notebook, kernel start included.

The output is a markdown table (chapter x mode) headed by the machine it was measured on: CPU model,
cores, GPU, torch version, date. A cell not measured says "not measured yet"; a chapter that failed says
so. ``--update`` keeps the cells measured by an earlier call on the same machine (read from the data
line at the top of FILE).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import re
import shutil
import sys
import tempfile
import time

from cpl_mini.records import read_results, run_summary

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODES = ("quick", "full")
NOT_MEASURED = "not measured yet"
DATA_LINE = re.compile(r"^<!-- time_chapters data: (?P<json>\{.*\}) -->$", re.M)


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), or what the platform reports."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return re.sub(r"\s+", " ", line.split(":", 1)[1]).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine(threads: int = 0) -> dict:
    """What the times depend on: CPU, cores, threads of the kernels, GPU, torch and Python, date, load."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    try:
        isa = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", "DEFAULT", ...
    except AttributeError:  # older torch
        isa = ""
    return {
        "cpu": cpu_model() + (f" ({isa})" if isa and isa != "DEFAULT" else ""),
        "cores": os.cpu_count() or 0,
        "threads": threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or torch.get_num_threads(),
        "load": round(os.getloadavg()[0], 1) if hasattr(os, "getloadavg") else None,
        "gpu": gpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }


def chapter_title(path: pathlib.Path) -> str:
    """ "5. The Convex Potential Layer" from the notebook's first ``# `` heading and its file name."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("# "):
                    title = re.sub(r"^\d+\.\s*", "", line[2:].strip())
                    return f"{int(path.name[:2])}. {title}"
    return f"{int(path.name[:2])}. {path.stem[3:].replace('_', ' ')}"


def kernel_env(quick: bool, threads: int = 0) -> dict:
    """The kernel's environment: this one, with CPL_MINI_QUICK set (quick) or unset (full)."""
    env = dict(os.environ)
    env.pop("CPL_MINI_QUICK", None)
    if quick:
        env["CPL_MINI_QUICK"] = "1"
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def execute(path: pathlib.Path, quick: bool, timeout: int, threads: int = 0) -> float:
    """Execute the notebook at ``path`` in place (a copy) and return the wall-clock seconds."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        record_timing=False,
        store_widget_state=False,
        resources={"metadata": {"path": str(path.parent)}},
    )
    start = time.perf_counter()
    client.execute(env=kernel_env(quick, threads))  # passed on to the kernel's start
    seconds = time.perf_counter() - start
    nbformat.write(nb, path)
    return seconds


def format_seconds(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    return f"{minutes:.1f} min" if minutes < 10 else f"{minutes:.0f} min"


def _threads(n) -> str:
    return f"{n} torch thread{'s' if n != 1 else ''}" if n else "torch's default threads"


def _load(load) -> str:
    return f", load average {load} when it started" if load is not None else ""


def run_rows(results: pathlib.Path) -> list:
    """One row per finished training run recorded in ``results/*.json`` (chapter 8's runs): network,
    epochs, machine, path, the median time of a training epoch and the run's wall time."""
    rows = []
    for path in sorted(results.glob("*.json")):
        record = read_results(path)
        if record is None or record.get("status") != "finished":
            continue
        row = run_summary(record)
        rows.append(
            f"| `{path.name}` | {row['network']} ({row['params_m']:.1f}M) | {row['epochs']} "
            f"| {row['machine']}, {row['path']} | {format_seconds(60 * row['epoch_min'])} "
            f"| {format_seconds(60 * row['minutes'])} |"
        )
    return rows


def render(chapters: list, times: dict, info: dict, note: str = "", runs: tuple = ()) -> str:
    """The markdown table; ``times[(stem, mode)]`` is seconds, or a string saying what went wrong; ``runs``
    are rows of :func:`run_rows`, put in a second table."""

    def cell(stem, mode):
        value = times.get(f"{stem}|{mode}")
        if value is None:
            return NOT_MEASURED
        return format_seconds(value) if isinstance(value, (int, float)) else str(value)

    data = {"machine": info, "note": note, "times": times}
    lines = [
        f"<!-- time_chapters data: {json.dumps(data, sort_keys=True)} -->",
        "<!-- Written by scripts/time_chapters.py: run it again rather than editing this file. -->",
        "",
        f"Measured with `scripts/time_chapters.py` on {info['date']}: **{info['cpu']}**, {info['cores']} "
        f"cores ({_threads(info.get('threads'))}), {info['gpu']}, torch {info['torch']}, "
        f"Python {info['python']}{_load(info.get('load'))}." + (f" {note}" if note else ""),
        "",
        "| chapter | quick mode (`CPL_MINI_QUICK=1`) | full mode |",
        "|---|---|---|",
    ]
    lines += [f"| {title} | {cell(stem, 'quick')} | {cell(stem, 'full')} |" for stem, title in chapters]
    if runs:
        lines += [
            "",
            "The training runs of chapter 8, read from their records in `book/results/` (each names the "
            "machine it trained on; the wall time counts every epoch, evaluations included):",
            "",
            "| record | network | epochs | machine, path | one training epoch (median) | wall time |",
            "|---|---|---|---|---|---|",
            *runs,
        ]
    return "\n".join(lines) + "\n"


def previous(out: pathlib.Path, info: dict) -> dict:
    """The times of an earlier call on the same machine (CPU, cores, GPU, torch), for ``--update``."""
    if not out.exists():
        return {}
    match = DATA_LINE.search(out.read_text(encoding="utf-8"))
    if match is None:
        return {}
    data = json.loads(match["json"])
    same = all(data["machine"].get(k) == info[k] for k in ("cpu", "cores", "gpu", "torch"))
    if not same:
        raise SystemExit(
            f"{out} was measured on another machine ({data['machine']}); drop --update to start a new table"
        )
    return data.get("times", {})


def select(book: pathlib.Path, only) -> list:
    paths = sorted(book.glob("[0-9][0-9]_*.ipynb"))
    if only:
        wanted = {n.strip().zfill(2) for n in only.split(",") if n.strip()}
        unknown = wanted - {p.name[:2] for p in paths}
        if unknown:
            raise SystemExit(f"no chapter numbered {', '.join(sorted(unknown))} in {book}")
        return [p for p in paths if p.name[:2] in wanted]
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=pathlib.Path, required=True, help="markdown file to write")
    parser.add_argument("--modes", default="quick,full", help="quick, full or quick,full (default)")
    parser.add_argument("--chapters", help="comma-separated chapter numbers (default: all)")
    parser.add_argument("--book", type=pathlib.Path, default=ROOT / "book", help="folder of the chapters")
    parser.add_argument("--runs", type=pathlib.Path, help="a run folder (runs/) to copy in first")
    parser.add_argument("--note", default="", help="a sentence added under the machine line")
    parser.add_argument("--update", action="store_true", help="keep earlier cells measured on this machine")
    parser.add_argument("--threads", type=int, help="torch threads of each kernel (OMP_NUM_THREADS)")
    parser.add_argument("--timeout", type=int, default=7200, help="seconds allowed per cell")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - set(MODES):
        parser.error(f"--modes takes quick, full or quick,full, not {args.modes!r}")
    every = sorted(args.book.glob("[0-9][0-9]_*.ipynb"))
    todo = select(args.book, args.chapters)
    info = machine(args.threads or 0)
    times = previous(args.out, info) if args.update else {}
    for mode in modes:
        with tempfile.TemporaryDirectory(prefix=f"time_chapters_{mode}_") as work:
            work = pathlib.Path(work)
            if (args.book / "results").is_dir():
                shutil.copytree(args.book / "results", work / "results")
            if args.runs:
                shutil.copytree(args.runs, work / "runs")
            for path in todo:
                copy = work / path.name
                shutil.copy2(path, copy)
                key = f"{path.stem}|{mode}"
                try:
                    times[key] = round(execute(copy, mode == "quick", args.timeout, args.threads or 0), 1)
                except Exception as exc:  # a failing chapter is reported in the table, the others still run
                    times[key] = f"failed ({type(exc).__name__})"
                print(f"{path.name} {mode}: {times[key]}", file=sys.stderr)
    chapters = [(p.stem, chapter_title(p)) for p in every]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    runs = run_rows(args.book / "results")
    args.out.write_text(render(chapters, times, info, args.note, runs), encoding="utf-8")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
