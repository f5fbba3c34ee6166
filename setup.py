"""pip install --no-build-isolation .  (from the repository root; see README.md, "Python").

Builds the extension mambacpp._core with CMake (the same build as the C++ library: configure,
then only the targets the module needs) and installs the package python/mambacpp. No PyPI
access is needed: setuptools, numpy, pybind11 and the C++ dependencies come from Debian
(scripts/install-deps.sh).

Environment variables:
  MAMBACPP_CMAKE_BUILD_DIR  reuse an already configured CMake build folder (e.g. build/): only the
                            extension target is (re)built there. Default: a private folder under
                            setuptools' build directory, configured with -DMAMBA_PYTHON=ON.
  MAMBACPP_CMAKE_ARGS       extra arguments for the CMake configure step.
  MAMBACPP_BUILD_JOBS       parallel build jobs (default: the CPU count).
"""

import glob
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


def _version():
    with open(os.path.join(ROOT, "CMakeLists.txt")) as f:
        for line in f:
            if line.startswith("project(mambacpp VERSION"):
                return line.split("VERSION")[1].split()[0]
    raise RuntimeError("no project version in CMakeLists.txt")


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        build_dir = os.environ.get("MAMBACPP_CMAKE_BUILD_DIR")
        jobs = os.environ.get("MAMBACPP_BUILD_JOBS", str(os.cpu_count() or 2))
        if build_dir:
            build_dir = os.path.abspath(build_dir)
            if not os.path.exists(os.path.join(build_dir, "CMakeCache.txt")):
                raise RuntimeError(f"MAMBACPP_CMAKE_BUILD_DIR={build_dir} is not a configured CMake build folder")
        else:
            build_dir = os.path.abspath(os.path.join(self.build_temp, "cmake"))
            os.makedirs(build_dir, exist_ok=True)
            cmd = [
                "cmake", "-S", ROOT, "-B", build_dir, "-DCMAKE_BUILD_TYPE=Release",
                "-DMAMBA_PYTHON=ON", f"-DPython3_EXECUTABLE={sys.executable}",
                "-DMAMBA_BUILD_TESTS=OFF", "-DMAMBA_BUILD_BENCH=OFF",
            ] + shlex.split(os.environ.get("MAMBACPP_CMAKE_ARGS", ""))
            subprocess.check_call(cmd)
        subprocess.check_call(["cmake", "--build", build_dir, "--target", "_core", "-j", jobs])
        suffix = sysconfig.get_config_var("EXT_SUFFIX")
        built = os.path.join(build_dir, "python", "mambacpp", "_core" + suffix)
        if not os.path.exists(built):
            found = glob.glob(os.path.join(build_dir, "python", "mambacpp", "_core*"))
            raise RuntimeError(
                f"the CMake build in {build_dir} made {found or 'no extension'}, not _core{suffix} "
                f"for this Python ({sys.executable}); configure it with -DPython3_EXECUTABLE={sys.executable} "
                "or unset MAMBACPP_CMAKE_BUILD_DIR"
            )
        dest = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copyfile(built, dest)


setup(
    name="mambacpp",
    version=_version(),
    description="Mamba selective state-space models on the CPU (mamba.cpp), with PyTorch drop-ins for mamba_ssm",
    license="MIT",
    packages=["mambacpp"],
    package_dir={"": "python"},
    ext_modules=[Extension("mambacpp._core", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.8",
    install_requires=["numpy"],
    zip_safe=False,
)
