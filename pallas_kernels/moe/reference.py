"""The pure-JAX reference for the grouped matmul (contract: common.py): XLA's ragged_dot, with the
rows past sum(group_sizes) zeroed explicitly. ragged_dot leaves them zero on CPU today, but its
documentation does not promise what they hold, and the contract does. Dots at HIGHEST precision:
on a GPU, XLA's default for float32 is tf32."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def gmm_reference(lhs, rhs, group_sizes, preferred_element_type=jnp.float32):
    """lhs [M, K], rhs [G, K, N], group_sizes [G] int32 -> [M, N] in preferred_element_type."""
    group_sizes = jnp.asarray(group_sizes, jnp.int32)
    out = jax.lax.ragged_dot(lhs, rhs, group_sizes, precision=jax.lax.Precision.HIGHEST,
                             preferred_element_type=preferred_element_type)
    owned = jnp.arange(lhs.shape[0]) < jnp.sum(group_sizes)  # [M]
    return jnp.where(owned[:, None], out, jnp.zeros((), out.dtype))
