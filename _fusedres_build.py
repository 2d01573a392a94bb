"""PEP 517 build backend of fusedres: setuptools' own, plus the decision whether to build the CUDA extension.

Shared with setup.py:
* `cuda_decision()` — build `fusedres._C` or not: FUSEDRES_BUILD_CUDA=1 requires it, =0 skips it, unset builds
  it when nvcc is found (CUDA_HOME / CUDA_PATH first, then PATH);
* `find_tool()` — cmake / ninja on PATH or beside the running Python.

Only when the extension will be built does the backend ask the (isolated) build environment for pybind11,
and for cmake and ninja where the machine has none — so a machine without a CUDA toolkit installs the pure
package without fetching any of them, and `pip install --no-build-isolation` (where pip skips these hooks)
uses what is installed.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig

from setuptools import build_meta as _orig
from setuptools.build_meta import *  # noqa: F401,F403  (the standard hooks)

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
MIN_CMAKE = (3, 18)


class CudaBuildError(RuntimeError):
    """FUSEDRES_BUILD_CUDA=1 but the CUDA extension cannot be built."""


def _real_nvcc(nvcc: str) -> str:
    """The toolkit's own nvcc behind a wrapper script: `nvcc -dryrun` prints `TOP=<toolkit root>/bin/..`."""
    try:
        out = subprocess.run([nvcc, "-dryrun", "fusedres_probe.cu"], capture_output=True, text=True, timeout=60)
        for line in (out.stdout + out.stderr).splitlines():
            m = re.search(r"\bTOP=(\S+)", line)
            if m:
                cand = os.path.join(os.path.realpath(m.group(1)), "bin", "nvcc")
                if os.path.isfile(cand):
                    return cand
    except (OSError, subprocess.SubprocessError):
        pass
    return os.path.realpath(nvcc)


def find_nvcc() -> str | None:
    """nvcc from CUDA_HOME or CUDA_PATH when set, else from PATH; resolved through wrapper scripts."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root:
            cand = os.path.join(root, "bin", "nvcc")
            if os.path.isfile(cand) and os.access(cand, os.X_OK):
                return _real_nvcc(cand)
    found = shutil.which("nvcc")
    return _real_nvcc(found) if found else None


def cuda_decision() -> tuple[str | None, str]:
    """(nvcc to build the extension with, "") or (None, why the CUDA build is skipped)."""
    flag = os.environ.get("FUSEDRES_BUILD_CUDA", "").strip().lower()
    if flag in _FALSE:
        return None, "FUSEDRES_BUILD_CUDA=0"
    nvcc = find_nvcc()
    if nvcc is None:
        if flag in _TRUE:
            raise CudaBuildError("FUSEDRES_BUILD_CUDA=1 but no nvcc was found: set CUDA_HOME to the CUDA toolkit "
                                 "or put nvcc on PATH")
        return None, "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH to build it)"
    return nvcc, ""


def _version(tool: str) -> tuple[int, ...]:
    try:
        out = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    m = re.search(r"(\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else ()


def find_tool(name: str, min_version: tuple[int, ...] = ()) -> str | None:
    """`name` on PATH or in the running Python's scripts directories, at least `min_version`."""
    dirs = [os.path.dirname(sys.executable), sysconfig.get_path("scripts")]
    for cand in [shutil.which(name)] + [shutil.which(name, path=d) for d in dirs if d]:
        if cand and (not min_version or _version(cand) >= min_version):
            return cand
    return None


def _native_requires() -> list[str]:
    try:
        nvcc, _ = cuda_decision()
    except CudaBuildError:
        return []  # setup.py reports it
    if nvcc is None:
        return []
    reqs = ["pybind11>=2.10"]
    if find_tool("cmake", MIN_CMAKE) is None:
        reqs.append("cmake>=%d.%d" % MIN_CMAKE)
    if find_tool("ninja") is None:
        reqs.append("ninja")
    return reqs


def get_requires_for_build_wheel(config_settings=None):
    return _orig.get_requires_for_build_wheel(config_settings) + _native_requires()


def get_requires_for_build_editable(config_settings=None):
    return _orig.get_requires_for_build_editable(config_settings) + _native_requires()
