"""Running a batch of prompts through an engine, for tests that compare engines."""


def run_batch(engine, prompts, params) -> list[list[int]]:
    """All prompts queued at once, stepped to the end: each prompt's generated token ids, in order."""
    ids = [engine.add_request(p, params) for p in prompts]
    tokens = {i: [] for i in ids}
    while engine.has_unfinished():
        for d in engine.step():
            tokens[d.request_id] += d.new_token_ids
    return [tokens[i] for i in ids]
