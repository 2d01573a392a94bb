"""The environment a result was measured in: device, driver, library versions, git commit, date."""
from __future__ import annotations

import datetime
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]



def default_out() -> Path:
    """benchmarks/results of the source checkout, else of the working directory (an installed package)."""
    root = REPO if (REPO / "benchmarks").is_dir() else Path.cwd()
    return root / "benchmarks" / "results"

def _version(dist: str) -> str | None:
    """A package's version without importing it (importing triton here could preempt TRITON_INTERPRET)."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out or None


def git_commit(repo: Path = REPO) -> tuple[str | None, bool | None]:
    """HEAD of the checkout fusedres runs from, and whether its tracked files have local changes."""
    commit = _run(["git", "-C", str(repo), "rev-parse", "HEAD"])
    if commit is None:
        return None, None
    status = _run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"])
    return commit, bool(status)


def driver_version() -> str | None:
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.splitlines()[0].strip() if out else None


def environment() -> dict:
    cuda = torch.cuda.is_available()
    commit, dirty = git_commit()
    import fusedres

    return {
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.machine()})",
        "driver": driver_version() if cuda else None,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dirty": dirty,
        "python": platform.python_version(),
        "torchvision": _version("torchvision"),
        "fusedres": fusedres.__version__,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
    }


def result_stem(meta: dict) -> str:
    """File stem for a run: date, device, commit and levels, e.g.
    20261123-104000_nvidia-h100-80gb-hbm3_af03483_kernels-models."""
    date = re.sub(r"[^0-9T]", "", (meta.get("date") or "")[:19]).replace("T", "-") or "undated"
    device = re.sub(r"[^a-z0-9]+", "-", (meta.get("device") or "unknown").lower()).strip("-")
    commit = (meta.get("commit") or "")[:7] or "nocommit"
    commit += "-dirty" if meta.get("dirty") else ""
    levels = "-".join(meta.get("levels") or ())
    return f"{date}_{device}_{commit}" + (f"_{levels}" if levels else "")
