"""The native CPU decode attention (decode_attention.cc), built on first use and called through XLA's FFI.

The C++ source is compiled with the machine's g++ against the FFI headers jaxlib ships, into a
cache keyed by the source, the jax version and the CPU (it is built with -march=native). The build
writes a temporary file and renames it, so concurrent processes never load a half-written library.
Where no compiler is found or the build fails, `available()` is False, a warning says why once, and
the engine keeps the XLA path. JAXSERVE_NATIVE=0 turns it off.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode_attention.cc")
TARGET = "jaxserve_decode_attention"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-fPIC", "-shared", "-fopenmp-simd", "-fno-math-errno", "-DNDEBUG")


class NativeUnavailableError(RuntimeError):
    pass


def _cache_dir() -> Path:
    root = os.environ.get("JAXSERVE_NATIVE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "jaxserve", "native")
    return Path(root)


def _cpu_fingerprint() -> bytes:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return b""
    return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))})).encode()


def _build() -> Path:
    """Compiles the library unless the cache has it; returns its path."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise NativeUnavailableError("no C++ compiler (g++) on PATH")
    key = hashlib.sha256(SOURCE.read_bytes() + jax.__version__.encode() + " ".join(FLAGS).encode()
                         + _cpu_fingerprint()).hexdigest()[:16]
    out = _cache_dir() / f"decode_attention-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise NativeUnavailableError(f"{compiler} failed: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.cache
def load() -> None:
    """Builds (once per machine), loads and registers the FFI target; raises NativeUnavailableError."""
    if os.environ.get("JAXSERVE_NATIVE", "1") == "0":
        raise NativeUnavailableError("turned off by JAXSERVE_NATIVE=0")
    library = ctypes.cdll.LoadLibrary(str(_build()))
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.JaxserveDecodeAttention), platform="cpu")


@functools.cache
def available() -> bool:
    try:
        load()
    except (NativeUnavailableError, OSError) as error:
        log.warning("native CPU attention unavailable, using the XLA path: %s", error)
        return False
    return True


def decode_attention(qg, k_pages, v_pages, layer, tables, position, decode_ids, num_decode, *,
                     sliding_window: int | None, soft_cap: float | None):
    """qg [T, kv_heads, group, head_dim] float32 -> the same shape, attention of the `num_decode`
    single-token queries `decode_ids` over their sequences' pages (tables [T, width]); other rows zero."""
    load()
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(qg.shape, jnp.float32))
    i32 = lambda x: jnp.asarray(x, jnp.int32)  # noqa: E731
    return call(qg.astype(jnp.float32), k_pages, v_pages, i32(layer), i32(tables), i32(position), i32(decode_ids),
                i32(num_decode), sliding_window=np.int64(sliding_window or 0), soft_cap=np.float32(soft_cap or 0.0))
