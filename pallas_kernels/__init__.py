"""Pallas kernels for jaxserve, one sub-package per kernel (TPU Mosaic, GPU), each with a pure-JAX
reference beside it. The runtime's dispatch lives in `jaxserve/ops/`; kernels arrive with the kernels issue.
moe/: the grouped matmul of MoE dispatch (gmm), rows sorted by expert."""
