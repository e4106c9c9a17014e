"""On-device sampling: greedy, temperature, top-k, top-p, with per-request seeded keys."""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class SamplingArrays(NamedTuple):
    """Per-row sampling settings, [B] each; built on the host from SamplingParams."""
    temperature: jax.Array  # float32; 0 = greedy
    top_k: jax.Array        # int32; 0 = off
    top_p: jax.Array        # float32
    seed: jax.Array         # int32

    @classmethod
    def from_params(cls, params, batch: int) -> "SamplingArrays":
        """params: list of SamplingParams (rows past len(params) are padding, sampled greedily)."""
        pad = batch - len(params)
        seeds = [p.seed if p.seed is not None else np.random.randint(0, 2**31 - 1) for p in params]
        return cls(
            jnp.asarray([p.temperature for p in params] + [0.0] * pad, jnp.float32),
            jnp.asarray([max(p.top_k, 0) for p in params] + [0] * pad, jnp.int32),
            jnp.asarray([p.top_p for p in params] + [1.0] * pad, jnp.float32),
            jnp.asarray(seeds + [0] * pad, jnp.int32),
        )


def _filter_logits(logits, top_k, top_p):
    """Masks one row's logits [V] outside its top-k and top-p sets with -inf."""
    vocab = logits.shape[-1]
    ranked = jnp.sort(logits)[::-1]  # descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = ranked[k - 1]
    probs = jax.nn.softmax(ranked)
    # Keep the smallest prefix whose mass reaches top_p: a token is kept if the mass before it < top_p.
    mass_before = jnp.cumsum(probs) - probs
    n_p = jnp.maximum(jnp.sum(mass_before < top_p), 1)
    threshold = jnp.maximum(kth, ranked[n_p - 1])
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def sample(logits, sampling: SamplingArrays, positions):
    """logits [B, V] float32; positions [B] (the position of the sampled token, mixed into the key
    so a seeded request draws the same tokens whatever batch it is in) -> tokens [B] int32."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(row, temperature, top_k, top_p, seed, position):
        scaled = _filter_logits(row / jnp.maximum(temperature, 1e-6), top_k, top_p)
        key = jax.random.fold_in(jax.random.key(seed), position)
        return jax.random.categorical(key, scaled).astype(jnp.int32)

    def draw_all():
        drawn = jax.vmap(draw)(logits, *sampling, positions)
        return jnp.where(sampling.temperature == 0, greedy, drawn)

    # An all-greedy batch skips the per-row sorts.
    return jax.lax.cond(jnp.all(sampling.temperature == 0), lambda: greedy, draw_all)
