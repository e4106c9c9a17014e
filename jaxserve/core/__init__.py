"""Host bookkeeping, pure Python (never imports jax): requests, the block manager (KV pages and
the prefix cache), the scheduler, incremental detokenization, and the step contract (plan.py)."""
