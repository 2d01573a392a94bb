"""scripts/env.sh reports set-up progress: one line per step with the seconds since set-up started, and nothing
once the stamp says the install is current. A stub interpreter stands in for the venv's python, so no pip runs."""
import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["upgrading pip", "installing requirements-dev.txt", "installing fusedres", "checking the install",
         "set-up done"]


def source_env(venv):
    env = dict(os.environ, FUSEDRES_VENV=str(venv))
    return subprocess.run(["bash", "-c", f"source {ROOT / 'scripts/env.sh'}"], env=env, capture_output=True,
                          text=True, timeout=60)


def test_env_sh_prints_each_step_with_elapsed_time(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    stub = venv / "bin/python"
    stub.write_text("#!/bin/sh\necho \"$@\" >> \"$(dirname \"$0\")/calls\"\n")
    stub.chmod(0o755)
    first = source_env(venv)
    assert first.returncode == 0, first.stderr
    lines = [ln for ln in first.stdout.splitlines() if re.match(r"\[fusedres\] +\d+s ", ln)]
    assert [re.sub(r"\[fusedres\] +\d+s ", "", ln).split(" (")[0] for ln in lines] == STEPS, first.stdout
    calls = (venv / "bin/calls").read_text().splitlines()
    assert [c.split()[:3] for c in calls[:3]] == [["-m", "pip", "install"]] * 3
    again = source_env(venv)
    assert again.returncode == 0 and again.stdout == ""  # current install: silent
