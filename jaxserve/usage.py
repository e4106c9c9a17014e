"""Usage: the token counts of one request, as the engine, the server and the client report them.
Plain data with no imports, so the client library can share it without any engine code."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int  # prompt tokens served from the prefix cache
