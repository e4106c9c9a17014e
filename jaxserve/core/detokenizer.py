"""Incremental detokenization and stop strings, per request, on the host.

Decoding token by token breaks multi-byte characters (a UTF-8 character may span tokens) and
tokenizers that merge spaces across tokens. So we decode a short window that starts a few tokens
back and emit only text past what was already emitted, holding back a trailing U+FFFD (an
incomplete character) until the next token completes it.
"""
from __future__ import annotations

REPLACEMENT = "\ufffd"
LOOKBACK = 6  # tokens of left context re-decoded so merges and byte sequences resolve


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids=(), stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = stop
        # The prompt's tail is left context only (SentencePiece drops a leading space without it).
        self.ids: list[int] = list(prompt_token_ids[-LOOKBACK:])
        self.prefix_offset = 0              # window start in ids
        self.read_offset = len(self.ids)    # ids before this are already emitted as text
        self.text = ""
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Appends one token; returns the text it completes (possibly "")."""
        self.ids.append(token_id)
        if self.tokenizer is None or self.stopped:
            return ""
        before = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        after = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return ""  # nothing new yet, or a character is still incomplete
        delta = after[len(before):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._apply_stop(delta)

    def flush(self) -> str:
        """At finish: the text still held back (a cut-off character), so the deltas add up to
        decode(all output ids)."""
        if self.tokenizer is None or self.stopped or self.read_offset == len(self.ids):
            return ""
        before = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        after = self.tokenizer.decode(self.ids[self.prefix_offset:])
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._apply_stop(after[len(before):]) if len(after) > len(before) else ""

    def _apply_stop(self, delta: str) -> str:
        """Cuts the text at the first stop string (excluded); delta is trimmed to match."""
        if not self.stop:
            self.text += delta
            return delta
        longest = max(len(s) for s in self.stop)
        search_from = max(0, len(self.text) - longest + 1)
        combined = self.text + delta
        hits = [i for i in (combined.find(s, search_from) for s in self.stop) if i != -1]
        if not hits:
            self.text = combined
            return delta
        cut = min(hits)
        self.stopped = True
        emitted = combined[len(self.text):cut] if cut > len(self.text) else ""
        self.text = combined[:cut]
        return emitted
