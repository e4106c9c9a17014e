"""Backend dispatch for the model's heavy ops (attention over the paged KV cache)."""
