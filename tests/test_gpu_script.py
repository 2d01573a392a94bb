"""scripts/gpu.sh's control flow, on the CPU (--dry-run: every step prints its command instead of running it):
priority order, per-step budgets, the shared deadline, and results in $OUT after every step even when the
call is killed."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu.sh"
ORDER = ["build", "ops", "train", "train_bn", "train_conv", "kernels", "tests", "memcheck", "racecheck", "blocks",
         "preact"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="gpu.sh needs bash and coreutils' timeout")


def _env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BUDGET_", "DRY_", "STEPS", "GPU_BUDGET"))}
    env.update(OUT=str(tmp_path / "out"), TMPDIR=str(tmp_path), **extra)
    return env


def _log(tmp_path, name) -> str:
    with tarfile.open(tmp_path / "out" / "results.tar.gz") as tar:
        member = next(m for m in tar.getmembers() if Path(m.name).name == name)
        return tar.extractfile(member).read().decode()


def _summary(tmp_path) -> dict[str, str]:
    lines = (tmp_path / "out" / "summary.txt").read_text().splitlines()
    return {ln.split()[0]: ln for ln in lines if ln.split() and ln.split()[0] in ORDER + ["interrupted"]}


def test_dry_run_keeps_priority_budgets_and_the_deadline(tmp_path):
    # train overruns its own 2 s budget and the next step still runs; train_bn (budget 1000 s) is cut by the
    # shared 10 s deadline, after which every lower-priority step is skipped
    env = _env(tmp_path, GPU_BUDGET_S="10", MIN_STEP_S="2", DRY_HANG="train train_bn", BUDGET_train="2",
               BUDGET_train_bn="1000")
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr  # a cut step counts as a failure
    s = _summary(tmp_path)
    assert list(s) == ORDER
    for name in ("build", "ops"):
        assert "rc=0" in s[name] and "would run:" in s[name]
    assert "pytest tests/test_cuda_backend.py" in s["ops"]
    assert "rc=124" in s["train"] and "stopped after 2s" in s["train"]
    assert "rc=124" in s["train_bn"] and "stopped after" in s["train_bn"]
    for name in ORDER[4:]:
        assert "skipped: out of time" in s[name]
    train_log = _log(tmp_path, "train.log")
    assert "fusedres.bench --level models --models resnet50 --modes train --batch 256" in train_log
    out = tmp_path / "out"
    assert "DRY RUN" in (out / "summary.txt").read_text()
    with tarfile.open(out / "results.tar.gz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {"build.log", "ops.log", "train.log", "train_bn.log", "summary.txt", "env.txt"} <= names
    assert len(list(out.iterdir())) <= 8  # what the device tool returns
    assert not list(tmp_path.glob("fusedres-gpu.*"))  # the work folder is cleaned up


def test_steps_selects_and_unknown_arguments_fail(tmp_path):
    env = _env(tmp_path, STEPS="ops kernels")
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert list(_summary(tmp_path)) == ["ops", "kernels"]
    bad = subprocess.run(["bash", str(SCRIPT), "--bogus"], env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown argument" in bad.stderr


def test_a_killed_run_leaves_the_finished_steps_in_out(tmp_path):
    env = _env(tmp_path, DRY_STEP_S="0", DRY_HANG="train", BUDGET_train="60")
    proc = subprocess.Popen(["bash", str(SCRIPT), "--dry-run"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    summary = tmp_path / "out" / "summary.txt"
    try:
        deadline = time.time() + 30
        while time.time() < deadline and not (summary.exists() and "ops" in _summary(tmp_path)):
            time.sleep(0.2)
        time.sleep(1)  # well inside the hanging train step
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # as the device tool does at its limit: no trap runs
        proc.wait(timeout=10)
    s = _summary(tmp_path)
    assert list(s) == ["build", "ops"] and "rc=0" in s["ops"]
    with tarfile.open(tmp_path / "out" / "results.tar.gz") as tar:
        assert "ops.log" in {Path(n).name for n in tar.getnames()}
