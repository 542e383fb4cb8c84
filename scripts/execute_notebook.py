"""Execute chapter notebooks in place, the way their committed outputs are made.

    python scripts/execute_notebook.py book/05_convex_potential_layer.ipynb [more.ipynb ...] [--quick]

Runs each notebook top to bottom in its own folder with a fresh kernel (nbclient), without per-cell
timing metadata, and writes the outputs back. ``--quick`` sets CPL_MINI_QUICK=1 (what CI uses); the
committed outputs come from full mode.

``--plain`` runs the code cells in one Python process without Jupyter (IPython magics such as
``%pip`` are skipped, figures go to the Agg backend) and writes nothing back: a check that a chapter
runs, for machines that have PyTorch but no Jupyter (a bare GPU server).
"""

import argparse
import os
import pathlib
import sys
import time


def run_plain(path):
    """Execute the code cells of ``path`` in order in a fresh namespace, from the notebook's folder."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = json.loads(pathlib.Path(path).read_text(encoding="utf-8"))["cells"]
    namespace = {"__name__": "__main__"}
    start, here = time.time(), os.getcwd()
    os.chdir(pathlib.Path(path).resolve().parent)
    plt.show = lambda *a, **k: plt.close("all")
    try:
        for i, cell in enumerate(cells):
            if cell["cell_type"] != "code":
                continue
            source = "".join(cell["source"])
            lines = [ln for ln in source.splitlines() if not ln.lstrip().startswith(("%", "!"))]
            try:
                exec(compile("\n".join(lines), f"{path}[cell {i}]", "exec"), namespace)
            except Exception:
                print(f"{path}: cell {i} failed", file=sys.stderr)
                raise
    finally:
        os.chdir(here)
        plt.close("all")
    print(f"{path}: ran in {time.time() - start:.0f} s (plain Python, nothing written)", file=sys.stderr)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("notebooks", nargs="+", type=pathlib.Path)
    parser.add_argument("--quick", action="store_true", help="quick mode (CPL_MINI_QUICK=1)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed per cell")
    parser.add_argument("--plain", action="store_true", help="run without Jupyter; write nothing back")
    args = parser.parse_args(argv)
    if args.quick:
        os.environ["CPL_MINI_QUICK"] = "1"
    else:
        os.environ.pop("CPL_MINI_QUICK", None)
    if not args.plain:
        import nbformat
        from nbclient import NotebookClient
    for path in args.notebooks:
        if args.plain:
            run_plain(path)
            continue
        nb = nbformat.read(path, as_version=4)
        start = time.time()
        client = NotebookClient(
            nb,
            timeout=args.timeout,
            kernel_name="python3",
            record_timing=False,
            store_widget_state=False,
            resources={"metadata": {"path": str(path.parent.resolve())}},
        )
        client.execute()
        nb.metadata.pop("widgets", None)  # saved widget state makes the HTML load widget scripts from a CDN
        tmp = path.with_suffix(".ipynb.tmp")
        nbformat.write(nb, tmp)
        os.replace(tmp, path)
        print(f"{path}: executed in {time.time() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
