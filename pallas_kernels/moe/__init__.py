"""Grouped matrix multiply, the MoE dispatch kernel: one contract (see common.py), three
implementations — a Mosaic TPU kernel (tpu.py), a Pallas GPU kernel (gpu.py) and the pure-JAX
reference (reference.py). The kernels load on first use: Pallas' TPU and Triton modules cost
~0.15 s to import, which a process that never calls them should not pay."""
from __future__ import annotations

import importlib

from pallas_kernels.moe.common import make_group_metadata
from pallas_kernels.moe.reference import gmm_reference

__all__ = ["gmm_gpu", "gmm_reference", "gmm_tpu", "make_group_metadata"]
_LAZY = {"gmm_tpu": "pallas_kernels.moe.tpu", "gmm_gpu": "pallas_kernels.moe.gpu"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
