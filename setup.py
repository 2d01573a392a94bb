"""Build script: the pure-Python package, plus — when a CUDA toolkit is found — the native modules
`fusedres._C` (CUDA kernels) and `fusedres._C_host` (their CPU test harness), built by CMake from
CMakeLists.txt into the package directory, for `pip install .` and `pip install -e .` alike.

Environment:
  FUSEDRES_BUILD_CUDA   1: the CUDA build is required (error without nvcc); 0: skipped; unset: built when
                        nvcc is found (CUDA_HOME / CUDA_PATH, else PATH)
  FUSEDRES_CUDA_ARCHS   GPU architectures, default "80;90" (SASS for each, PTX for the newest)
  FUSEDRES_WERROR       1: compiler warnings are errors (CI)
  FUSEDRES_BUILD_JOBS   parallel compile jobs (default: ninja's choice)
  CMAKE_ARGS            extra arguments for the CMake configure step
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)
from _fusedres_build import MIN_CMAKE, cuda_decision, find_tool  # noqa: E402

NATIVE_MODULES = ("fusedres._C", "fusedres._C_host")
_BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install"}


class CMakeExtension(Extension):
    """A module whose build is CMakeLists.txt's (one CMake run builds all of NATIVE_MODULES)."""

    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configures and builds CMakeLists.txt with the CMake library output directory set to where setuptools
    expects the modules (the build tree, or the source tree for in-place/editable builds)."""

    def build_extension(self, ext):
        target = self.get_ext_fullpath(ext.name)
        if getattr(self, "_fusedres_built", False):
            if not os.path.exists(target):
                raise RuntimeError(f"CMake did not produce {target}")
            return
        nvcc, _ = cuda_decision()
        cmake = find_tool("cmake", MIN_CMAKE)
        if cmake is None:
            raise RuntimeError("fusedres: building the CUDA extension needs CMake >= %d.%d (pip install cmake), "
                               "or set FUSEDRES_BUILD_CUDA=0 to install without it" % MIN_CMAKE)
        try:
            import pybind11
        except ImportError as e:
            raise RuntimeError("fusedres: building the CUDA extension needs pybind11 (pip install pybind11), or set "
                               "FUSEDRES_BUILD_CUDA=0 to install without it") from e
        extdir = os.path.abspath(os.path.dirname(target))
        build_dir = os.path.abspath(os.path.join(self.build_temp, "cmake"))
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}",
            f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_CUDA_COMPILER={nvcc}",
        ]
        ninja = find_tool("ninja")
        if ninja:
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        args += shlex.split(os.environ.get("CMAKE_ARGS", ""))
        build = [cmake, "--build", build_dir]
        jobs = os.environ.get("FUSEDRES_BUILD_JOBS") or os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL")
        if jobs or not ninja:
            build += ["-j", jobs or str(os.cpu_count() or 1)]
        print(f"fusedres: building the CUDA extension with {nvcc} (CMake build dir {build_dir})", file=sys.stderr)
        os.makedirs(build_dir, exist_ok=True)
        configure = [cmake, "-S", ROOT, "-B", build_dir, *args]
        if subprocess.run(configure).returncode != 0:
            # A stale cache (another generator, a moved tree) is the usual cause: start the build dir afresh.
            shutil.rmtree(build_dir, ignore_errors=True)
            subprocess.run(configure, check=True)
        subprocess.run(build, check=True)
        self._fusedres_built = True
        if not os.path.exists(target):
            raise RuntimeError(f"CMake did not produce {target}")


def _ext_modules():
    nvcc, why = cuda_decision()
    if nvcc is None:
        if _BUILD_COMMANDS.intersection(sys.argv[1:]):
            print(f"fusedres: CUDA backend skipped ({why}); installing the Triton/reference package only",
                  file=sys.stderr)
        return []
    return [CMakeExtension(name) for name in NATIVE_MODULES]


setup(ext_modules=_ext_modules(), cmdclass={"build_ext": CMakeBuild})
