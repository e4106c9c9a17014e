"""jaxserve.tokenizer against transformers' tokenizers, on a real GGUF and on small GGUFs we write.

transformers is the reference, with one known, deliberate difference: its GGUF loader gives
tokenizer.ggml.pre = "smollm" (and the rest of the StarCoder family) plain GPT-2 splitting, while
llama.cpp and SmolLM2's own tokenizer.json split every digit off first. We follow llama.cpp, so for
those files the reference is transformers' tokenizer with the tokenizer.json pre-tokenizer put back.
"""
import copy
import json
import logging
import os
import re
from pathlib import Path

import gguf
import pytest

from jaxserve.tokenizer import Tokenizer, TokenizerError

DIGIT_SPLIT_PRES = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}

TEXTS = [
    "Hello, world!", "hello world", "The quick brown fox jumps over the lazy dog.",
    "12345", "3.14159", "pi = 3.14159265358979", "Call 555-0123 or +1 (800) 123-4567.",
    "In 2024 there were 1,000,000 users", "a  1", "x\n\n2", "tab\t\t42", "0x1F600 1e-9",
    "    indented", "trailing   ", "many     spaces   between", "line1\nline2\r\nline3\n\n\n",
    "def f(x):\n    return x ** 2  # square\n", "for (int i = 0; i < n; ++i) { a[i] = i; }",
    '{"key": [1, 2, 3], "nested": {"a": null}}', "<div class=\"x\">Hi</div>",
    "I'm sure they'll've done it; it's John's.", "IT'S LOUD, WE'RE HERE",
    "Café naïve résumé façade Ångström", "Straße über Größe", "Привет, мир!",
    "你好，世界！今天天气很好。", "日本語のテキストです。カタカナ", "한국어 문장", "مرحبا بالعالم",
    "emoji 😀🎉👍🏽 and 👨‍👩‍👧", "math ∑∫√∞ ≠ ≤", "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>assistant\n", "<|endoftext|>",
    "text<|im_end|>more text", "", " ", "\n", "🎉",
]


def _divergent(text):
    """Where GPT-2 splitting and digit-first splitting differ: a whitespace run before a digit."""
    return re.search(r"\s\s\d", text) is not None


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def gguf_path(smollm2_gguf):
    """The real SmolLM2 GGUF (fetched into the cache once), or $JAXSERVE_TEST_GGUF."""
    return Path(os.environ.get("JAXSERVE_TEST_GGUF") or smollm2_gguf)


@pytest.fixture(scope="module")
def reader(gguf_path):
    return gguf.GGUFReader(gguf_path)


@pytest.fixture(scope="module")
def tok(reader):
    return Tokenizer.from_gguf(reader)


@pytest.fixture(scope="module")
def hf(gguf_path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


def _reference_backend(hf, pre):
    """transformers' backend tokenizer, with SmolLM2's tokenizer.json pre-tokenizer where needed."""
    from tokenizers import Tokenizer as Backend, pre_tokenizers
    backend = Backend.from_str(hf.backend_tokenizer.to_str())
    if pre in DIGIT_SPLIT_PRES:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    return backend


@pytest.fixture(scope="module")
def reference(hf, reader):
    return _reference_backend(hf, reader.fields["tokenizer.ggml.pre"].contents())


CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi! 你好"}],
    [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Another, please.\nJust one word."}],
]


# ------------------------------------------------------------------ the real GGUF
def test_special_token_facts_match_transformers(tok, hf, reader):
    assert tok.bos_token_id == hf.bos_token_id
    assert tok.eos_token_ids[0] == hf.eos_token_id
    assert tok.pad_token_id == hf.pad_token_id
    assert tok.vocab_size == len(reader.fields["tokenizer.ggml.tokens"].data) == len(hf)
    assert tok.add_bos_token == bool(reader.fields["tokenizer.ggml.add_bos_token"].contents())
    assert tok.chat_template == hf.chat_template


def test_encode_matches_reference(tok, hf, reference):
    assert len(TEXTS) >= 30
    for text in TEXTS:
        expected = reference.encode(text, add_special_tokens=False).ids
        assert tok.encode(text, add_special_tokens=False) == expected, text
        bos = [hf.bos_token_id] if tok.add_bos_token else []
        assert tok.encode(text) == bos + expected, text


def test_plain_transformers_differs_only_on_digit_splitting(tok, hf, reader):
    differing = [t for t in TEXTS if tok.encode(t, False) != hf.encode(t, add_special_tokens=False)]
    assert all(_divergent(t) for t in differing), differing
    if reader.fields["tokenizer.ggml.pre"].contents() in DIGIT_SPLIT_PRES:
        assert tok.encode("a  1", False)[-1] == tok.encode("1", False)[0]  # "1" was split off


def test_decode_round_trip_and_matches_transformers(tok, hf):
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids, skip_special_tokens=False) == text
        for skip in (True, False):
            assert tok.decode(ids, skip) == hf.decode(ids, skip_special_tokens=skip), text
    assert tok.decode(tok.encode("<|im_start|>user\nhi<|im_end|>")) == "user\nhi"


def test_decode_multibyte_utf8(tok, hf):
    ids = tok.encode("😀中")
    assert len(ids) > 2  # the emoji is several byte tokens, so the pieces must be joined as bytes
    assert tok.decode(ids) == "😀中"
    assert tok.decode(ids[:1]) == hf.decode(ids[:1])  # half a character decodes like transformers
    assert tok.decode(iter(ids)) == "😀中"  # any iterable of ints (e.g. numpy rows) is accepted


@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=["user", "system+user", "multi-turn"])
def test_chat_template_matches_transformers(tok, hf, conversation):
    for gen in (True, False):
        text = tok.apply_chat_template(conversation, add_generation_prompt=gen)
        expected = hf.apply_chat_template(conversation, tokenize=False, add_generation_prompt=gen)
        assert text == expected
    text, ids = tok.apply_chat_template(conversation), tok.encode_chat(conversation)
    assert ids == hf.encode(text, add_special_tokens=False)
    assert ids.count(tok.bos_token_id) == text.count(hf.bos_token)  # no extra BOS from encode_chat


# Multi-line, indented, with {%- %} and plain tags: checks the jinja whitespace settings, tojson
# (non-ASCII kept), loop controls and raise_exception behave as in transformers.
CUSTOM_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {%- set system = messages[0]['content'] %}
    {%- set rest = messages[1:] %}
{%- else %}
    {%- set system = 'default' %}
    {%- set rest = messages %}
{%- endif %}
{{ bos_token }}<<SYS>>{{ system }}<</SYS>>
{% for m in rest %}
  {% if m['role'] not in ['user', 'assistant'] %}
    {{ raise_exception('bad role ' + m['role']) }}
  {% endif %}
  {% if m['content'] == 'STOP' %}{% break %}{% endif %}
  [{{ m['role'] | upper }}] {{ m | tojson }}
  {% if loop.last %}{{ eos_token }}{% endif %}
{% endfor %}
{% if add_generation_prompt %}
[ASSISTANT]
{% endif %}"""


def test_custom_template_renders_like_transformers(tok, hf):
    custom = copy.copy(tok)
    custom.chat_template = CUSTOM_TEMPLATE
    for conversation in CONVERSATIONS + [[{"role": "user", "content": "a"},
                                          {"role": "user", "content": "STOP"}]]:
        for gen in (True, False):
            expected = hf.apply_chat_template(conversation, chat_template=CUSTOM_TEMPLATE,
                                              tokenize=False, add_generation_prompt=gen)
            assert custom.apply_chat_template(conversation, gen) == expected
    with pytest.raises(TokenizerError, match="bad role tool"):
        custom.apply_chat_template([{"role": "tool", "content": "x"}])
    assert tok.apply_chat_template(CONVERSATIONS[0]).startswith("<|im_start|>")  # original intact


def test_save_then_from_hf_dir_is_identical(tok, tmp_path):
    tok.save(tmp_path)
    back = Tokenizer.from_hf_dir(tmp_path)
    for attr in ("vocab_size", "bos_token_id", "eos_token_ids", "pad_token_id", "add_bos_token",
                 "chat_template"):
        assert getattr(back, attr) == getattr(tok, attr), attr
    for text in TEXTS:
        assert back.encode(text) == tok.encode(text), text
        assert back.decode(back.encode(text)) == tok.decode(tok.encode(text))
    for conversation in CONVERSATIONS:
        assert back.apply_chat_template(conversation) == tok.apply_chat_template(conversation)


def test_saved_dir_loads_in_transformers(tok, tmp_path):
    from transformers import AutoTokenizer
    tok.save(tmp_path)
    hf_saved = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert hf_saved.encode(text) == tok.encode(text), text


def test_from_hf_dir_reads_stop_ids_and_bos_from_post_processor(tok, tmp_path):
    from tokenizers import Tokenizer as Backend, processors
    tok.save(tmp_path)
    bos, eos = (tok._backend.id_to_token(i) for i in (tok.bos_token_id, tok.eos_token_ids[0]))
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del cfg["add_bos_token"], cfg["eos_token_ids"]
    cfg["eos_token"] = {"content": eos, "special": True}  # the AddedToken dict form
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 0]}))
    backend = Backend.from_file(str(tmp_path / "tokenizer.json"))
    backend.post_processor = processors.TemplateProcessing(  # Llama 3 style: adds BOS itself
        single=f"{bos} $A", special_tokens=[(bos, tok.bos_token_id)])
    backend.save(str(tmp_path / "tokenizer.json"))
    back = Tokenizer.from_hf_dir(tmp_path)
    assert back.eos_token_ids == (tok.eos_token_ids[0], 7, 0)
    assert back.add_bos_token
    assert back.encode("hi") == [tok.bos_token_id, *tok.encode("hi", False)]  # BOS exactly once
    assert back.encode_chat(CONVERSATIONS[0]) == tok.encode_chat(CONVERSATIONS[0])


# ------------------------------------------------------------------ errors
USER = {"role": "user", "content": "a"}
BAD_MESSAGES = [
    ("not a list", "non-empty list"), ([], "non-empty list"),
    (["hi"], r"messages\[0\] must be a dict"), ([{"role": "user"}], r"messages\[0\]\.content"),
    ([USER, {"role": "user", "content": None}], r"messages\[1\]\.content"),
    ([{"role": 1, "content": "x"}], r"messages\[0\]\.role"),
    ([USER, {"role": "", "content": "x"}], r"messages\[1\]\.role must not be empty"),
]


@pytest.mark.parametrize("messages,match", BAD_MESSAGES)
def test_bad_messages_raise(tok, messages, match):
    with pytest.raises(TokenizerError, match=match):
        tok.apply_chat_template(messages)
    with pytest.raises(TokenizerError):
        tok.encode_chat(messages)


def test_template_problems_raise(tok, tmp_path):
    user = CONVERSATIONS[0]
    for template, match in ((None, "no chat template"), ("{% if %}", "does not parse"),
                            ("{{ raise_exception('only system roles') }}", "only system roles")):
        tok.save(tmp_path)
        cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
        cfg.pop("chat_template")
        if template is not None:
            cfg["chat_template"] = template
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
        with pytest.raises(TokenizerError, match=match):
            Tokenizer.from_hf_dir(tmp_path).apply_chat_template(user)


def test_bad_files_raise(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot read"):
        Tokenizer.from_hf_dir(tmp_path)
    path = _write_gguf(tmp_path / "bert.gguf", "bert", ["[PAD]", "a"], [3, 1])
    with pytest.raises(TokenizerError, match="unsupported GGUF tokenizer model 'bert'"):
        Tokenizer.from_gguf(gguf.GGUFReader(path))


# ------------------------------------------------------------------ small GGUFs we write
def _write_gguf(path, model, tokens, types, scores=None, merges=None, pre=None, **ids):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if scores is not None:
        w.add_token_scores(scores)
    if merges is not None:
        w.add_token_merges(merges)
    for key, value in ids.items():  # e.g. bos_token_id=1 -> add_bos_token_id(1)
        getattr(w, f"add_{key}")(value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _byte_alphabet():
    """GPT-2's byte -> printable character table, in byte order."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b], extra = chr(256 + extra), extra + 1
    return [chars[b] for b in range(256)]


# Merges chosen so each pre-tokenizer regex gives different ids: digit runs, spaces, contractions.
TINY_MERGES = ["S o", "Ġ Ġ", "ĠĠ Ġ", "Ċ Ċ", "1 2", "12 3", "4 5", "45 6", "Ġ 1", "' s", "' S",
               "Ġ t", "Ġt h", "Ġth e", "h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or",
               "l d", "Ġwor ld", "Ġ \u0109", "Ċ Ġ"]


@pytest.mark.parametrize("pre", ["default", "gpt2", "llama-bpe", "llama3", "qwen2", "smollm",
                                 "some-future-pre"])
def test_byte_level_pre_tokenizers_match_transformers(pre, tmp_path, caplog):
    from transformers import AutoTokenizer
    merged = list(dict.fromkeys(m.replace(" ", "") for m in TINY_MERGES))
    tokens = ["<|endoftext|>", "<think>", *_byte_alphabet(), *merged]
    path = _write_gguf(tmp_path / "tiny.gguf", "gpt2", tokens, [3, 4] + [1] * (len(tokens) - 2),
                       merges=TINY_MERGES, pre=pre, eos_token_id=0)
    with caplog.at_level(logging.WARNING, logger="jaxserve.tokenizer"):
        ours = Tokenizer.from_gguf(gguf.GGUFReader(path))
    assert ("unknown tokenizer.ggml.pre" in caplog.text) == (pre == "some-future-pre")
    hf = AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    reference = _reference_backend(hf, pre)
    texts = TEXTS + ["hello world 123456", "the  1234567 world", "IT'S it's it'Sound",
                     "x<think>y\n\n z"]
    for text in texts:
        ids = ours.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False).ids, (pre, text)
        assert ours.decode(ids, skip_special_tokens=False) == text
    assert ours.encode("<think>")[0] == 1 and ours.decode([1]) == "<think>"  # USER_DEFINED: kept
    if pre == "smollm":
        assert ours.encode("the  1") == ours.encode("the  ") + ours.encode("1")


def _tiny_spm(tmp_path):
    tokens = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)]]
    types = [2, 3, 3] + [6] * 256
    pieces = ["▁", "e", "h", "t", "r", "i", "o", "w", "l", "d", "n", "a", "th", "he", "▁t", "▁th",
              "▁the", "er", "▁h", "▁hi", "ere", "▁there", "ll", "llo", "▁w", "or", "▁wor", "ld",
              "▁world", "é", "<tool>"]
    scores = [0.0] * len(tokens) + [-float(k) for k in range(len(pieces))]
    types += [4 if p == "<tool>" else 1 for p in pieces]
    return _write_gguf(tmp_path / "spm.gguf", "llama", tokens + pieces, types, scores=scores,
                       bos_token_id=1, eos_token_id=2, unk_token_id=0, add_bos_token=True)


def test_sentencepiece_gguf(tmp_path):
    from transformers import AutoTokenizer
    path = _tiny_spm(tmp_path)
    ours = Tokenizer.from_gguf(gguf.GGUFReader(path))
    hf = AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    piece = ours._backend.id_to_token
    assert [piece(i) for i in ours.encode("hi there world")] == ["<s>", "▁hi", "▁the", "r", "e",
                                                                 "▁world"]
    # Plain text: same as transformers (merges recovered from scores, byte fallback for "c", "ü").
    for text in ["hi there world", "the  hello\nworld", "café ü 😀", "", "hello\n\nworld  "]:
        ids = ours.encode(text)
        assert ids == hf.encode(text), text
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True) == text
    # llama.cpp adds the dummy-prefix space to every text run that starts the input or follows a
    # special token, even one already starting with a space; transformers' Metaspace does not.
    assert [piece(i) for i in ours.encode(" hi")] == ["<s>", "▁", "▁hi"]
    assert [piece(i) for i in ours.encode("<s>hi</s>", False)] == ["<s>", "▁hi", "</s>"]
    assert ours.decode(ours.encode(" hi")) == " hi"
    assert ours.encode("x", add_special_tokens=False)[0] != 1 and ours.encode("x")[0] == 1
    ours.save(tmp_path / "saved")
    back = Tokenizer.from_hf_dir(tmp_path / "saved")
    assert back.add_bos_token and back.eos_token_ids == (2,)
    hf_saved = AutoTokenizer.from_pretrained(tmp_path / "saved")
    for text in ["hi there world", " hi", "<s>hi<tool>there", "café ü 😀"]:
        assert back.encode(text) == ours.encode(text), text
        assert hf_saved.encode(text) == ours.encode(text), text
