"""Compile fused_step.cpp once per CPU with the system's C++ compiler and load it.

The library is built for this CPU (-march=native: AVX-512, AVX2, NEON, ...)
into the user cache dir, named by the source, the flags and the CPU's
feature line, so a later run (or sweep job) loads it at once, and a node
without a compiler still uses a library another node with the same CPU built
in a shared cache. The library checks at load time that this CPU has the
features it was compiled for.

Builds are serialised by a lock file in the cache dir (a sweep's jobs, or
nodes sharing a home directory, build once and the others wait), each build
writes a temp file with a name no other process uses and renames it into
place, and a build that failed is remembered per compiler, so it is not
retried on every run. GCC and Clang both build it.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import uuid
from contextlib import contextmanager, suppress
from pathlib import Path

from cnnexp.cpu import cache_dir, cpu_flags

log = logging.getLogger("cnnexp")

SOURCE = Path(__file__).with_name("fused_step.cpp")
ARCH_FLAG = "-mcpu=native" if platform.machine().lower() in ("arm64", "aarch64") else "-march=native"
FLAGS = ["-O3", ARCH_FLAG, "-std=c++17", "-shared", "-fPIC", "-fno-math-errno"]
BUILD_NOTICE = "Building the compiled CPU step (once per CPU, ~10 s)"
ERROR_BUFFER = 512  # bytes for cnx_create's reason


class BuildError(RuntimeError):
    """The compiled step cannot be used here (no compiler, a failed compile, an unusable cache)."""


def compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def library_path() -> Path:
    """Where the library for this source and CPU lives (found without a compiler)."""
    key = hashlib.sha1("\n".join([SOURCE.read_text(), " ".join(FLAGS), cpu_flags()]).encode())
    return cache_dir() / "kernels" / f"fused_step-{key.hexdigest()[:16]}.so"


@functools.lru_cache(maxsize=1)
def load() -> ctypes.CDLL:
    """The compiled library (built on first use); BuildError says why not."""
    if platform.system() == "Windows":
        raise BuildError("the compiled step is built for Linux and macOS only")
    path = library_path()
    if not path.is_file():
        build_once(path)
    try:
        return open_library(path)
    except OSError as err:  # a damaged file in the cache: build it again, once
        log.warning("The compiled CPU step in the cache cannot be loaded (%s); building it again.", err)
        build_once(path, replace=True)
        try:
            return open_library(path)
        except OSError as err:
            raise BuildError(f"{path} cannot be loaded ({err})") from None


def build_once(path: Path, replace: bool = False) -> None:
    """Build the library into `path` unless another process has (or has failed to) meanwhile."""
    cxx = compiler()
    if cxx is None:
        raise BuildError("no C++ compiler found (install g++ or clang++, or set CXX)")
    failed = path.with_name(f"{path.stem}-{_compiler_key(cxx)}.failed")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _build_lock(path.parent):
            if replace:
                path.unlink(missing_ok=True)
            if path.is_file():  # built by another process while this one waited
                return
            if failed.is_file():  # this compiler failed on this source before: do not try on every run
                raise BuildError(failed.read_text().strip())
            log.info("%s with %s ...", BUILD_NOTICE, Path(cxx).name)
            try:
                build_library(cxx, path)
            except BuildError as err:
                with suppress(OSError):  # a read-only cache only means trying again next time
                    failed.write_text(f"{err}\n")
                raise
    except OSError as err:
        raise BuildError(f"the cache dir {path.parent} cannot be written ({err.strerror or err}); set "
                         "CNNEXP_CACHE_DIR to a writable directory") from None


def build_library(cxx: str, path: Path) -> None:
    """Compile the source with `cxx` into `path`; a temp file with a unique name is
    renamed into place, so a reader never sees half a library."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp")
    try:
        try:
            result = subprocess.run([cxx, *FLAGS, "-o", str(tmp), str(SOURCE)], capture_output=True, text=True)
        except OSError as err:  # the compiler itself could not be started
            raise BuildError(f"{cxx} could not be run ({err})") from None
        if result.returncode != 0:
            first = (result.stderr.strip().splitlines() or ["no output"])[0]
            raise BuildError(f"compiling {SOURCE.name} with {cxx} failed: {first}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def open_library(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    vp, fp, ip = ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p
    lib.cnx_cpu_supported.restype = ctypes.c_int
    if not lib.cnx_cpu_supported():
        raise BuildError(f"{path} was built for CPU features this CPU lacks; delete it, or set CNNEXP_CACHE_DIR "
                         "to a cache of this machine's own")
    lib.cnx_create.restype = vp
    lib.cnx_create.argtypes = [ip, ctypes.c_long, fp, fp, fp, ctypes.c_long, ctypes.c_char_p, ctypes.c_int]
    lib.cnx_destroy.argtypes = [vp]
    lib.cnx_step.restype = ctypes.c_int
    lib.cnx_step.argtypes = [vp, vp, ctypes.c_int, fp, fp, vp, ctypes.c_int, fp, ctypes.c_float, ctypes.c_float,
                             ctypes.c_float, ctypes.c_int]
    lib.cnx_vector_width.restype = ctypes.c_int
    return lib


def _compiler_key(cxx: str) -> str:
    """The compiler's path and version, which a remembered failure belongs to."""
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    except OSError:
        version = []
    return hashlib.sha1("\n".join([cxx, *version]).encode()).hexdigest()[:12]


@contextmanager
def _build_lock(directory: Path):
    """One build at a time in this cache dir (other processes wait for it)."""
    fd = os.open(directory / ".build.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
