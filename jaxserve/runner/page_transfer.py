"""Moving a request's KV pages between engines: gather them out of one engine's pool, write them
into another's. Both are compiled per page-count bucket (powers of two), padded with the null page,
so a transfer never traces at serving time.

    gather: pool [layers, pages, page_slots, kv_heads, ...] x page ids [n] -> arrays [layers, n, ...]
    scatter: pool x arrays [layers, n, ...] x destination page ids [n] -> pool (donated)

The arrays are the pool's page arrays (codes, and block scales for 4-bit formats) in its own
format; channel scales and key centres are not sent: both sides calibrate the same ones, which the
KV spec digest checks (`kv_spec`). Optionally the wire is narrower than the pool ("int8": float
pages sent as int8 codes with one float32 scale per [layer, page, slot, kv head] vector, and
dequantized when written), for pools of float pages.
"""
from __future__ import annotations

import functools
import hashlib

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.kv_quant import KVPages

WIRE_FORMATS = ("auto", "int8")  # auto: the pool's own format, bit for bit
_PAGE_FIELDS = ("k", "v", "k_scale", "v_scale")


def page_bucket(num_pages: int) -> int:
    """The padded page count of a transfer: the next power of two."""
    return 1 << max(0, num_pages - 1).bit_length()


def kv_spec(kv: KVPages, wire: str) -> str:
    """What both sides of a transfer must agree on: the page format and shapes per layer, and the
    calibrated channel scales (a digest of their values). Compared when prefill and decode connect."""
    h = hashlib.sha256()
    for name in _PAGE_FIELDS:
        a = getattr(kv, name)
        if a is not None:  # the page count is each pool's own and the kv heads may split differently
            h.update(f"{name}:{a.dtype}:{(a.shape[0],) + a.shape[2:]};".encode())
    for name in ("k_chan", "v_chan", "k_center"):
        a = getattr(kv, name)
        if a is not None:
            h.update(np.asarray(jax.device_get(a), np.float32).tobytes())
    return f"{kv.format.name}/ps{kv.page_size}/wire-{wire}/{h.hexdigest()[:16]}"


def _page_arrays(kv: KVPages) -> tuple:
    return tuple(getattr(kv, f) for f in _PAGE_FIELDS if getattr(kv, f) is not None)


def _to_wire(arrays, wire: str):
    if wire == "auto":
        return tuple(arrays)
    out = []
    for a in arrays:  # [layers, n, slots, heads, head_dim] float -> int8 codes and a scale per vector
        a32 = a.astype(jnp.float32)
        scale = jnp.max(jnp.abs(a32), axis=-1, keepdims=True) / 127.0
        codes = jnp.round(a32 / jnp.where(scale == 0, 1.0, scale)).astype(jnp.int8)
        out += [codes, scale]
    return tuple(out)


def _from_wire(arrays, like, wire: str):
    if wire == "auto":
        return tuple(arrays)
    return tuple((arrays[2 * i].astype(jnp.float32) * arrays[2 * i + 1]).astype(a.dtype) for i, a in enumerate(like))


def _gather(kv: KVPages, pages, wire: str):
    return _to_wire(tuple(a[:, pages] for a in _page_arrays(kv)), wire)


def _scatter(kv: KVPages, pages, arrays, wire: str) -> KVPages:
    """pages [n]: destination of each transferred page (the null page: skip it)."""
    written = [a.at[:, pages].set(x) for a, x in zip(_page_arrays(kv), _from_wire(arrays, _page_arrays(kv), wire))]
    return kv.replace(**dict(zip([f for f in _PAGE_FIELDS if getattr(kv, f) is not None], written)))


class PageMover:
    """The gather and scatter programs of one engine's pool, by bucket. `sharding` is where the
    transferred arrays live on this engine (the pool's page layout: kv heads split like the pool)."""

    def __init__(self, kv: KVPages, wire: str, sharding, state_sharding=None):
        if wire not in WIRE_FORMATS:
            raise ValueError(f"kv transfer format must be one of {', '.join(WIRE_FORMATS)}; got {wire!r}")
        if wire != "auto" and kv.format.quantized:
            raise ValueError(f"--kv-transfer-dtype {wire} narrows float pages; the pool is already {kv.format.name}")
        self.wire, self.sharding, self.spec = wire, sharding, kv_spec(kv, wire)
        place = {} if sharding is None else {"out_shardings": sharding}
        keep = {} if state_sharding is None else {"out_shardings": state_sharding}
        self._gather = jax.jit(functools.partial(_gather, wire=wire), **place)
        self._scatter = jax.jit(functools.partial(_scatter, wire=wire), donate_argnums=0, **keep)
        self._compiled_gather: dict[int, object] = {}   # bucket -> program
        self._compiled_scatter: dict[int, object] = {}
        self.compile_count = 0

    def compile(self, kv: KVPages, max_pages: int) -> None:
        """Every bucket up to max_pages ahead of time, as the step programs are: a transfer never
        compiles while serving (an export or import of a new size would stall its engine's steps)."""
        n = 1
        while True:
            ids = jax.ShapeDtypeStruct((n,), jnp.int32)
            gather = self._gather.lower(kv, ids).compile()
            wire = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self.sharding) for a in gather.out_info]
            self._compiled_gather[n] = gather
            self._compiled_scatter[n] = self._scatter.lower(kv, ids, tuple(wire)).compile()
            self.compile_count += 2
            if n >= max_pages:
                return
            n *= 2

    def gather(self, kv: KVPages, pages: list[int]) -> tuple[list, int]:
        """The pages' arrays (dispatched, not waited for), padded to a bucket; and the bucket."""
        n = page_bucket(len(pages))
        ids = np.zeros(n, np.int32)
        ids[:len(pages)] = pages
        return list(self._compiled_gather.get(n, self._gather)(kv, ids)), n

    def scatter(self, kv: KVPages, arrays, first_page: int, page_ids) -> KVPages:
        """Writes transferred pages first_page.. into page_ids; the rest go to the null page."""
        n = arrays[0].shape[1]
        dest = np.zeros(n, np.int32)
        dest[first_page:first_page + len(page_ids)] = page_ids
        return self._compiled_scatter.get(n, self._scatter)(kv, dest, tuple(arrays))

    def place(self, arrays) -> list:
        """Arrays from elsewhere (another mesh, another process) -> this pool's layout (async)."""
        return list(arrays) if self.sharding is None else [jax.device_put(a, self.sharding) for a in arrays]
