"""Ragged paged attention: one contract (see common.py), three implementations — a Mosaic TPU
kernel (tpu.py), a Pallas GPU kernel (gpu.py) and the pure-JAX reference (reference.py). The
runtime's XLA path lives in jaxserve/ops/attention.py."""
from pallas_kernels.ragged_paged_attention.reference import ragged_paged_attention_reference

__all__ = ["ragged_paged_attention_reference"]
