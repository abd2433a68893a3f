"""Compile fused_step.cpp once per machine with the system's C++ compiler and load it.

The library is built for this CPU (-march=native: AVX-512, AVX2, ...) into
the user cache dir, keyed by the source, the compiler and the CPU, so a
later run (or sweep job) loads it at once. Parallel builds are safe: each
writes its own temporary file and renames it into place.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
from pathlib import Path

from cnnexp.cpu import cache_dir, cpu_flags

SOURCE = Path(__file__).with_name("fused_step.cpp")
FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno"]


class BuildError(RuntimeError):
    """The compiled step could not be built here (no compiler, a failed compile)."""


def compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def library_path(cxx: str) -> Path:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    key = hashlib.sha1("\n".join([SOURCE.read_text(), " ".join(FLAGS), cxx, *version, cpu_flags()]).encode())
    return cache_dir() / "kernels" / f"fused_step-{key.hexdigest()[:16]}.so"


@functools.lru_cache(maxsize=1)
def load() -> ctypes.CDLL:
    """The compiled library (built on first use); BuildError says why not."""
    if platform.system() == "Windows":
        raise BuildError("the compiled step is built for Linux and macOS only")
    cxx = compiler()
    if cxx is None:
        raise BuildError("no C++ compiler found (install g++ or set CXX)")
    path = library_path(cxx)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        result = subprocess.run([cxx, *FLAGS, "-o", str(tmp), str(SOURCE)], capture_output=True, text=True)
        if result.returncode != 0:
            tmp.unlink(missing_ok=True)
            first = (result.stderr.strip().splitlines() or ["no output"])[0]
            raise BuildError(f"compiling {SOURCE.name} with {cxx} failed: {first}")
        tmp.replace(path)
    lib = ctypes.CDLL(str(path))
    vp, fp, ip = ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p
    lib.cnx_create.restype = vp
    lib.cnx_create.argtypes = [ip, fp, fp, fp, ctypes.c_long]
    lib.cnx_destroy.argtypes = [vp]
    lib.cnx_step.restype = None
    lib.cnx_step.argtypes = [vp, vp, ctypes.c_int, fp, fp, vp, ctypes.c_int, fp, ctypes.c_float, ctypes.c_float,
                             ctypes.c_float, ctypes.c_int]
    lib.cnx_vector_width.restype = ctypes.c_int
    return lib
