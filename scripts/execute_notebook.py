"""Execute chapter notebooks in place, the way their committed outputs are made.

    python scripts/execute_notebook.py book/05_convex_potential_layer.ipynb [more.ipynb ...] [--quick]

Runs each notebook top to bottom in its own folder with a fresh kernel (nbclient), without per-cell
timing metadata, and writes the outputs back. ``--quick`` sets CPL_MINI_QUICK=1 (what CI uses); the
committed outputs come from full mode.
"""
import argparse
import os
import pathlib
import sys
import time

import nbformat
from nbclient import NotebookClient


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="+", type=pathlib.Path)
    parser.add_argument("--quick", action="store_true", help="quick mode (CPL_MINI_QUICK=1)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed per cell")
    args = parser.parse_args(argv)
    if args.quick:
        os.environ["CPL_MINI_QUICK"] = "1"
    else:
        os.environ.pop("CPL_MINI_QUICK", None)
    for path in args.notebooks:
        nb = nbformat.read(path, as_version=4)
        start = time.time()
        client = NotebookClient(nb, timeout=args.timeout, kernel_name="python3", record_timing=False,
                                store_widget_state=False,
                                resources={"metadata": {"path": str(path.parent.resolve())}})
        client.execute()
        nb.metadata.pop("widgets", None)  # saved widget state makes the HTML load widget scripts from a CDN
        tmp = path.with_suffix(".ipynb.tmp")
        nbformat.write(nb, tmp)
        os.replace(tmp, path)
        print(f"{path}: executed in {time.time() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
