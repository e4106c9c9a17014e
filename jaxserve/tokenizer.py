"""Text <-> token ids and chat templates, from an HF tokenizer directory or GGUF metadata.

`tokenizers` does the work; this module assembles its pipeline (for GGUF, the way llama.cpp
would) and owns BOS handling, so BOS is added exactly once whatever the post-processor does.
"""
from __future__ import annotations

import datetime
import json
import logging
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend

from jaxserve.errors import JaxServeError

logger = logging.getLogger(__name__)


class TokenizerError(JaxServeError, ValueError):
    """A tokenizer file is unusable, or chat messages / template are invalid (one-line message)."""


# llama.cpp token types (tokenizer.ggml.token_type) that matter here.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4

# Pre-tokenizer split regexes, written the way HF tokenizer.json files spell them.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
# tokenizer.ggml.pre -> regexes applied in sequence (llama.cpp's grouping). The digit-first
# group is how StarCoder-family vocabularies (SmolLM included) were trained: every digit alone.
_PRE_SPLITS = {
    **dict.fromkeys(("default", "gpt2", "mpt", "olmo", "jais"), (_GPT2,)),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                     "minerva"), (r"\p{N}", _GPT2)),
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "falcon3", "dbrx", "smaug-bpe",
                     "pixtral"), (_LLAMA3,)),
    **dict.fromkeys(("qwen2", "stablelm2", "deepseek-r1-qwen", "megrez"), (_QWEN2,)),
}


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special-token facts and chat template of one model."""

    def __init__(self, backend: _Backend, *, bos_token_id=None, eos_token_ids=(),
                 pad_token_id=None, add_bos_token=False, chat_template=None, vocab_size=None):
        self._backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(dict.fromkeys(int(i) for i in eos_token_ids))
        self.pad_token_id = pad_token_id
        self.add_bos_token = bool(add_bos_token)
        self.chat_template = chat_template
        # Largest id + 1, not a count: ids are what index the embedding table.
        self.vocab_size = vocab_size or max(backend.get_vocab(with_added_tokens=True).values()) + 1
        self._template = (None, None)  # (source, compiled): compiled lazily, redone if replaced

    @classmethod
    def from_hf_dir(cls, path) -> "Tokenizer":
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise TokenizerError(f"no tokenizer.json in {path}")
        try:
            backend = _Backend.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # the Rust error text is multi-line; keep the first line
            raise TokenizerError(f"cannot read {path}/tokenizer.json: {str(e).splitlines()[0]}") \
                from None
        cfg = _read_json(path / "tokenizer_config.json")
        gen = _read_json(path / "generation_config.json")
        model_cfg = _read_json(path / "config.json")
        tok_id = lambda key: _token_id(backend, cfg.get(key))  # noqa: E731
        eos = [tok_id("eos_token"), *cfg.get("eos_token_ids", ()),
               *_as_list(gen.get("eos_token_id")), *_as_list(model_cfg.get("eos_token_id"))]
        bos = _first(tok_id("bos_token"), gen.get("bos_token_id"), model_cfg.get("bos_token_id"))
        add_bos = cfg.get("add_bos_token")
        if add_bos is None:  # no explicit flag: trust the post-processor (e.g. Llama 3 adds BOS)
            probe = backend.encode("", add_special_tokens=True).ids
            add_bos = bos is not None and probe[:1] == [bos]
        return cls(backend, bos_token_id=bos, eos_token_ids=[i for i in eos if i is not None],
                   pad_token_id=_first(tok_id("pad_token"), gen.get("pad_token_id")),
                   add_bos_token=add_bos, chat_template=_hf_chat_template(path, cfg))

    @classmethod
    def from_gguf(cls, reader) -> "Tokenizer":
        meta = lambda key, default=None: _gguf_value(reader, "tokenizer." + key, default)  # noqa
        kind, tokens = meta("ggml.model"), meta("ggml.tokens")
        if not tokens:
            raise TokenizerError("GGUF file has no tokenizer.ggml.tokens")
        types = meta("ggml.token_type") or [_NORMAL] * len(tokens)
        if kind == "gpt2":
            backend = _gguf_byte_level(tokens, meta("ggml.merges") or [],
                                       meta("ggml.pre", "default"))
            default_add_bos = False
        elif kind == "llama":
            scores = meta("ggml.scores") or [0.0] * len(tokens)
            backend = _gguf_sentencepiece(tokens, scores, meta("ggml.merges"),
                                          meta("ggml.unknown_token_id"),
                                          meta("ggml.add_space_prefix", True))
            default_add_bos = True  # llama.cpp's default for SentencePiece vocabularies
        else:
            raise TokenizerError(f"unsupported GGUF tokenizer model {kind!r} "
                                 "(supported: gpt2, llama)")
        _add_special_tokens(backend, tokens, types)
        eos = [meta("ggml." + k) for k in ("eos_token_id", "eot_token_id", "eom_token_id")]
        return cls(backend, bos_token_id=meta("ggml.bos_token_id"),
                   eos_token_ids=[i for i in eos if i is not None],
                   pad_token_id=meta("ggml.padding_token_id"),
                   add_bos_token=meta("ggml.add_bos_token", default_add_bos),
                   chat_template=meta("chat_template"), vocab_size=len(tokens))

    def save(self, directory) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        name = lambda i: None if i is None else self._backend.id_to_token(i)  # noqa: E731
        backend = self._backend
        if self.add_bos_token and self.bos_token_id is not None and backend.post_processor is None:
            # We ignore post-processors, but other readers (transformers) need one to add BOS.
            backend, bos = _Backend.from_str(backend.to_str()), name(self.bos_token_id)
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, self.bos_token_id)])
        backend.save(str(directory / "tokenizer.json"))
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",  # lets transformers open it too
            "add_bos_token": self.add_bos_token,
            "bos_token": name(self.bos_token_id),
            "eos_token": name(self.eos_token_ids[0]) if self.eos_token_ids else None,
            "pad_token": name(self.pad_token_id),
            # HF has room for one eos token only; keep every stop id so we read them all back.
            "eos_token_ids": list(self.eos_token_ids),
            "chat_template": self.chat_template,
        }
        cfg = {k: v for k, v in cfg.items() if v is not None}
        (directory / "tokenizer_config.json").write_text(
            json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # The backend's post-processor is bypassed: BOS is ours to add, so never twice.
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        _check_messages(messages)
        if not self.chat_template:
            raise TokenizerError("this model has no chat template")
        context = {"messages": messages, "add_generation_prompt": add_generation_prompt}
        for key, token_id in (("bos_token", self.bos_token_id), ("pad_token", self.pad_token_id),
                              ("eos_token", self.eos_token_ids[0] if self.eos_token_ids else None)):
            if token_id is not None:  # missing tokens stay undefined, as in transformers
                context[key] = self._backend.id_to_token(token_id)
        try:
            return self._compiled_template().render(**context)
        except jinja2.TemplateError as e:
            raise TokenizerError(f"chat template failed: {e}") from None

    def encode_chat(self, messages, add_generation_prompt: bool = True) -> list[int]:
        # The template writes any BOS itself; adding one here would double it.
        return self.encode(self.apply_chat_template(messages, add_generation_prompt),
                           add_special_tokens=False)

    def _compiled_template(self) -> jinja2.Template:
        if self._template[0] != self.chat_template:
            # Same environment settings as transformers, so templates render byte-identically.
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
            env.filters["tojson"] = _tojson
            env.globals["raise_exception"] = _raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
            try:
                self._template = (self.chat_template, env.from_string(self.chat_template))
            except jinja2.TemplateError as e:
                raise TokenizerError(f"chat template does not parse: {e}") from None
        return self._template[1]


def _gguf_value(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _gguf_byte_level(tokens, merges, pre) -> _Backend:
    """GPT-2 style byte-level BPE; tokens are already spelled in the byte-to-unicode alphabet."""
    regexes = _PRE_SPLITS.get(pre)
    if regexes is None:
        logger.warning("unknown tokenizer.ggml.pre %r; using the GPT-2 pre-tokenizer", pre)
        regexes = _PRE_SPLITS["gpt2"]
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = _Backend(models.BPE(vocab=_vocab(tokens), merges=pairs, fuse_unk=False))
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return backend


def _gguf_sentencepiece(tokens, scores, merges, unk_id, add_space_prefix) -> _Backend:
    """SentencePiece BPE ("llama"): '▁' for spaces, <0xNN> tokens for bytes not in the vocab."""
    pairs = ([tuple(m.split(" ", 1)) for m in merges] if merges
             else _merges_from_scores(tokens, scores))
    unk = tokens[unk_id] if unk_id is not None and unk_id < len(tokens) else None
    backend = _Backend(models.BPE(vocab=_vocab(tokens), merges=pairs, unk_token=unk,
                                  fuse_unk=True, byte_fallback=True))
    # A normalizer (not Metaspace) because llama.cpp prefixes a space to *every* text run that
    # starts the input or follows a special token, even one already starting with a space.
    # tokenizers normalizes exactly those runs, so this matches (as does Llama 2's tokenizer.json).
    backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁")] * add_space_prefix + [normalizers.Replace(" ", "▁")])
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + [decoders.Strip(" ", 1, 0)] * add_space_prefix)
    return backend


def _merges_from_scores(tokens, scores):
    """SentencePiece stores no merges: llama.cpp always joins the adjacent pair whose result has
    the highest score, which is a BPE whose merges are ranked by the merged token's score."""
    vocab = _vocab(tokens)
    ranked = []
    for token, i in vocab.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[i], vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _vocab(tokens):
    # Reversed so that, should a file repeat a token, its first id wins (as in llama.cpp).
    return {t: i for i, t in reversed(list(enumerate(tokens)))}


def _add_special_tokens(backend, tokens, types):
    """CONTROL/UNKNOWN tokens are special (matched whole, skipped on decode); USER_DEFINED ones
    are matched whole but decoded as text, as llama.cpp does."""
    special = [AddedToken(t, special=True, normalized=False)
               for t, k in zip(tokens, types) if k in (_CONTROL, _UNKNOWN)]
    user = [AddedToken(t, special=False, normalized=False)
            for t, k in zip(tokens, types) if k == _USER_DEFINED]
    backend.add_special_tokens(special)
    backend.add_tokens(user)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TokenizerError(f"cannot read {path}: {e}") from None


def _as_list(value):  # config eos_token_id may be an int or a list
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def _first(*values):
    return next((v for v in values if v is not None), None)


def _token_id(backend, token):
    """tokenizer_config.json spells special tokens as a string or an AddedToken dict."""
    if isinstance(token, dict):
        token = token.get("content")
    return None if token is None else backend.token_to_id(token)


def _hf_chat_template(path: Path, cfg: dict):
    template = cfg.get("chat_template")
    if isinstance(template, list):  # older format: named templates; use the default one
        template = {t.get("name"): t.get("template") for t in template}.get("default")
    if template is None and (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text(encoding="utf-8")
    if template is None:
        template = _read_json(path / "chat_template.json").get("chat_template")
    return template


def _check_messages(messages):
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TokenizerError("messages must be a non-empty list of {'role', 'content'} dicts")
    for n, message in enumerate(messages):
        if not isinstance(message, dict):
            raise TokenizerError(f"messages[{n}] must be a dict, got {type(message).__name__}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise TokenizerError(f"messages[{n}].{key} must be a string")
        if not message["role"]:
            raise TokenizerError(f"messages[{n}].role must not be empty")


def _raise_exception(message):
    raise TokenizerError(f"chat template rejected the messages: {message}")


def _tojson(value, indent=None, ensure_ascii=False, sort_keys=False):
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)
