"""fusedres-bench parses its arguments before importing torch, refuses timed levels without CUDA with one line,
and the Triton interpreter announces itself once."""
import os
import subprocess
import sys
import time
import warnings

import pytest
import torch

from fusedres.bench import cli

PROBE = """
import sys, time
t = time.perf_counter()
from fusedres.bench import cli
try:
    cli.main(sys.argv[1:])
except SystemExit as e:
    code = e.code
else:
    code = None
print("TORCH_IMPORTED" if "torch" in sys.modules else "NO_TORCH", code, f"{time.perf_counter() - t:.3f}",
      file=sys.stderr)
"""


def run_cli(*args):
    return subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))


@pytest.mark.parametrize("args,code,says", [
    (["--help"], 0, "usage: fusedres-bench"),
    (["--level", "kernal"], 2, "unknown level kernal; choose from"),
    (["--batch", "0"], 2, "must be >= 1"),
    (["--against", "x.json"], 2, "--against needs --compare"),
    (["--demo-size", "2,4,8,8"], 2, "expected N,3,H,W"),
])
def test_help_and_argument_errors_do_not_import_torch(args, code, says):
    proc = run_cli(*args)
    marker, rc, seconds = proc.stderr.strip().splitlines()[-1].split()
    assert marker == "NO_TORCH" and rc == str(code), proc.stderr
    assert says in proc.stdout + proc.stderr
    # the work itself is argparse only; the bound is generous for a loaded 2-core machine
    assert float(seconds) < 5.0, seconds


def test_python_dash_m_help_is_fast_end_to_end():
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "fusedres.bench", "--help"],
                          capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0 and "--demo-model" in proc.stdout
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert "torch" not in imported and "fusedres.bench.vocab" in imported
    assert elapsed < 20.0, elapsed  # interpreter start-up only; torch alone takes longer than this bound allows


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
@pytest.mark.parametrize("level", ["kernels", "models,blocks", "all", "demo,kernels"])
def test_timed_levels_without_cuda_exit_nonzero_with_one_line(level, capsys):
    assert cli.main(["--level", level]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    [line] = captured.err.strip().splitlines()
    assert line.startswith(f"fusedres-bench: --level {level.replace('demo,', '')} is timed on a CUDA GPU")
    assert "--level demo" in line


def test_refusal_rule():
    assert cli.refuse_timed(("auto",), cuda=False) is None
    assert cli.refuse_timed(("demo",), cuda=False) is None
    assert cli.refuse_timed(("kernels",), cuda=True) is None
    assert "--level all" in cli.refuse_timed(("all", "demo"), cuda=False)


def test_interpreter_warns_once(monkeypatch):
    import fusedres.triton as ft

    monkeypatch.setattr(ft, "_warned", [False])
    x = torch.randn(2, 3, 4, 4)
    with pytest.warns(UserWarning, match="TRITON_INTERPRET=1 runs the Triton kernels on the CPU"):
        assert ft.device_reasons(x, interpret=True) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ft.device_reasons(x, interpret=True) == []  # once per process
        assert ft.device_reasons(x, interpret=False)  # refused: nothing is launched, nothing said


def test_package_loads_on_first_use_and_submodules_do_not_hide_functions():
    code = ("import sys\n"
            "import fusedres\n"
            "assert 'torch' not in sys.modules, 'import fusedres alone must not import torch'\n"
            "import fusedres.fold, fusedres.convert\n"
            "assert callable(fusedres.fold) and callable(fusedres.convert) and callable(fusedres.explain)\n"
            "import torch; assert callable(torch.ops.fusedres.bn_act_train)\n"
            "assert set(fusedres.__all__) <= set(dir(fusedres))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
