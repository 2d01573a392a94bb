"""The README as a user meets it: its Python blocks run as written (in order, one namespace, as a user pasting
them would) on this machine's device, its flag table is the CLI parser's, and its first commands are the two
scripts."""
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from fusedres.bench.cli import flag_table

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DEVICE_LINE = 'device = "cpu"  # on a CUDA GPU: device = "cuda"'


def blocks(lang):
    return re.findall(rf"^```{lang}\n(.*?)^```", README, flags=re.S | re.M)


def test_python_blocks_run_as_written(tmp_path):
    code = "\n".join(blocks("python"))
    assert code.count(DEVICE_LINE) == 1  # the one line a GPU user changes
    if torch.cuda.is_available():
        code = code.replace(DEVICE_LINE, 'device = "cuda"')
    script = tmp_path / "readme.py"
    script.write_text(code)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user runs it: no interpreter
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"^loss \d+\.\d{3}$", proc.stdout, flags=re.M), proc.stdout
    assert "fusedres.convert: fused 16 blocks, 1 stem, 53 BN layers" in proc.stdout  # the comment in the README
    assert "fusedres.convert: fused 16 blocks, 1 stem, 53 BN layers" in README


def test_flag_table_is_the_parsers():
    table = re.search(r"<!-- flag-table:[^\n]*-->\n(.*?)<!-- /flag-table -->", README, flags=re.S).group(1)
    assert table == flag_table(), ("README flag table is stale; regenerate it with "
                                   "python -c 'from fusedres.bench.cli import flag_table; print(flag_table())'")
    for flag in ("--demo-model", "--demo-size", "--level", "--out"):
        assert f"`{flag} " in table
    assert "preact_resnet164" in table and "preact_resnet1001" in table


def test_first_commands_are_the_two_scripts():
    first = blocks("bash")[0].splitlines()
    assert [line.split("#")[0].strip() for line in first[:2]] == ["bash scripts/bench.sh", "bash scripts/test.sh"]


def test_linked_docs_exist():
    for link in re.findall(r"\]\((docs/[^)#]+)", README):
        assert (ROOT / link).is_file(), link
