"""Pure layer math: weight matmuls, RMSNorm, rotary embeddings, SwiGLU.

Activations (the residual stream) are float32 whatever the weights' dtype; a matmul feeds the weight's
dtype to the dot and accumulates in float32. With bfloat16 weights that is the fast kind of dot on
CPUs with AVX512-BF16 (XLA:CPU ~1.8x float32), and the MXU/tensor-core kind on accelerators.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.config import ModelConfig


def weight(w):
    """A stored weight as the model computes with it: uint16 arrays are bfloat16 bits (see
    `as_stored`); anything else is already itself."""
    return jax.lax.bitcast_convert_type(w, jnp.bfloat16) if w.dtype == jnp.uint16 else w


def as_stored(w):
    """How a stacked layer weight is held on CPU: XLA:CPU converts a bfloat16 array that enters a
    while loop (the layer scan) to float32 and back on every call, doubling decode time; its uint16
    bits pass through untouched and `weight` reinterprets each layer's slice for free."""
    return jax.lax.bitcast_convert_type(w, jnp.uint16) if w.dtype == jnp.bfloat16 else w


def dense(x, w):
    """x [..., in] @ w [in, out] -> float32 [..., out]: x rounded to w's dtype, float32 accumulation."""
    return jnp.matmul(x.astype(w.dtype), w, preferred_element_type=jnp.float32)


def dense_transposed(x, w):
    """x [..., in] @ w[out, in].T -> float32 [..., out] (tied embeddings as the LM head), contracting
    w's last axis in place: a transposed bfloat16 operand made XLA:CPU copy all of it per call."""
    dims = (((x.ndim - 1,), (1,)), ((), ()))
    return jax.lax.dot_general(x.astype(w.dtype), w, dims, preferred_element_type=jnp.float32)


def rms_norm(x, gain, eps: float):
    """Normalizes in float32 (as the HF reference does) and casts back."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return gain * x32.astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse RoPE frequencies [head_dim // 2], float32, with the config's scaling applied."""
    d = cfg.head_dim
    inv = (1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d)))
    inv = inv.astype(np.float32)
    if cfg.rope_freq_factors is not None:
        inv = inv / np.asarray(cfg.rope_freq_factors, np.float32)
    s = cfg.rope_scaling
    if s is None:
        return inv
    if s.kind == "linear":
        return (inv / s.factor).astype(np.float32)
    # llama3: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    old = s.original_max_position_embeddings
    low_wavelen, high_wavelen = old / s.low_freq_factor, old / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, blended, scaled).astype(np.float32)


def rope_cos_sin(positions, inv_freq):
    """positions [T] int32 -> cos, sin [T, head_dim] float32 (halves repeated, HF layout)."""
    freqs = positions.astype(jnp.float32)[:, None] * inv_freq  # [T, head_dim // 2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
    """x [T, heads, head_dim]; rotates the two halves of each head (non-interleaved)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, None, :].astype(x.dtype), sin[:, None, :].astype(x.dtype)
    return x * cos + rotated * sin


def swiglu(x, w_gate, w_up, w_down):
    return dense(jax.nn.silu(dense(x, w_gate)) * dense(x, w_up), w_down)
