"""Engine options several test modules share, and running a batch of prompts through an engine."""


def run_batch(engine, prompts, params) -> list[list[int]]:
    """All prompts queued at once, stepped to the end: each prompt's generated token ids, in order."""
    ids = [engine.add_request(p, params) for p in prompts]
    tokens = {i: [] for i in ids}
    for d in engine.run_to_completion():
        tokens[d.request_id] += d.new_token_ids
    return [tokens[i] for i in ids]


# The shared server: 8 running + 56 queued = room for exactly 64 requests in flight. Its engine
# options are SERVER_ENGINE's, which test_async_engine's engine uses too, so the server's start-up
# loads the step programs that test compiled (the persistent compilation cache, conftest.py).
SERVER_ENGINE = dict(max_num_seqs=8, max_num_batched_tokens=64, kv_cache_memory=256 << 20, max_model_len=512)
SERVER_ARGS = ("--max-num-seqs", "8", "--max-queued-requests", "56", "--max-num-batched-tokens", "64",
               "--kv-cache-memory", "256M", "--max-model-len", "512")
# Engine options several SmolLM2 tests share for the same reason (test_mesh, test_server_lifecycle).
SMALL_ENGINE = dict(max_num_batched_tokens=32, max_num_seqs=8, kv_cache_memory=64 << 20)
SMALL_ARGS = ("--max-num-batched-tokens", "32", "--max-num-seqs", "8", "--kv-cache-memory", "64M")
