"""The README's example of a user's own network runs as it is written."""

import os
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
SECTION = "### Your own network, trained, certified and exported"


def own_network_example() -> str:
    text = README.read_text()
    assert SECTION in text, "the README lost its section on a user's own network"
    block = re.search(r"```python\n(.*?)```", text[text.index(SECTION) :], re.S)
    assert block, "no python block in the README's section on a user's own network"
    return block.group(1)


def test_example_is_a_dozen_lines():
    lines = [line for line in own_network_example().splitlines() if line.strip()]
    assert len(lines) <= 15


@pytest.mark.skipif(not os.environ.get("CPL_MINI_DATA"), reason="needs the CIFAR-10 archive (CPL_MINI_DATA)")
def test_own_network_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(own_network_example(), str(README), "exec"), namespace)
    record = namespace["train"](namespace["config"], model=namespace["my_net"], progress=False)
    assert record["status"] == "finished" and record["network"].startswith("custom")
    assert (tmp_path / "runs" / "my-net" / "checkpoint.pt").exists()
    printed = capsys.readouterr().out
    assert "0.1411764705882353" in printed  # the certified accuracies, keyed by the radii 36/255, ...
    program, x = namespace["program"], namespace["torch"].rand(1, 3, 32, 32)  # exported for batch 1
    model = namespace["model"]
    assert (program.module()(x) - model(x)).abs().max().item() < 1e-5
