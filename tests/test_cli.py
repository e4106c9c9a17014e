"""The `jaxserve` command as users run it: real subprocesses, real model, one-line errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_models import make_hf_model, save_safetensors, write_gguf

JAXSERVE = [str(Path(sys.executable).parent / "jaxserve")]


def run(*args, timeout=600):
    return subprocess.run(JAXSERVE + list(args), capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(res, match: str):
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("jaxserve: error:") and match in lines[0], lines[0]


@pytest.mark.slow
def test_default_model_answers_paris():
    res = run("generate", "--model", "smollm2-135m", "--chat", "--prompt", "What is the capital of France?",
              "--temperature", "0")
    assert res.returncode == 0, res.stderr
    assert "Paris" in res.stdout


@pytest.mark.slow
def test_json_output_one_object_per_prompt():
    res = run("generate", "--prompt", "Hello", "--prompt", "The sky is", "--max-tokens", "5",
              "--temperature", "0", "--ignore-eos", "--json")
    assert res.returncode == 0, res.stderr
    objs = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(objs) == 2
    for o in objs:
        assert len(o["token_ids"]) == 5 and isinstance(o["text"], str) and o["text"]


@pytest.fixture(scope="module")
def tiny_with_tokenizer(tmp_path_factory, smollm2_gguf):
    """A tiny random Llama sharing SmolLM2's vocabulary and tokenizer, with a 64-token context."""
    from jaxserve.checkpoint.gguf_io import open_gguf
    from jaxserve.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(open_gguf(smollm2_gguf))
    model = make_hf_model("llama", vocab_size=49152, hidden_size=16, intermediate_size=32,
                          max_position_embeddings=64, num_hidden_layers=1)
    return save_safetensors(model, tmp_path_factory.mktemp("tiny"), tokenizer=tok)


@pytest.mark.parametrize("args,match", [
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["--max-tokens", "0"], "max_tokens must be an integer >= 1"),
    (["--top-k", "-7"], "top_k must be an integer >= -1"),
])
def test_invalid_sampling_parameters(tiny_with_tokenizer, args, match):
    assert_one_line_error(run("generate", "--model", str(tiny_with_tokenizer), "--prompt", "hi", *args), match)


def test_prompt_longer_than_context(tiny_with_tokenizer):
    res = run("generate", "--model", str(tiny_with_tokenizer), "--prompt", "word " * 100, "--max-num-batched-tokens", "16")
    assert_one_line_error(res, "more than the model context of 64")


def test_missing_checkpoint():
    assert_one_line_error(run("generate", "--model", "/nonexistent/model", "--prompt", "hi"),
                          "is neither a known name")


def bad_checkpoints(root: Path):
    """(path, expected message) for each way a checkpoint can be broken."""
    hf = make_hf_model("llama", seed=0)
    garbage = root / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    truncated = save_safetensors(hf, root / "truncated")
    st = truncated / "model.safetensors"
    st.write_bytes(st.read_bytes()[:4000])
    gpt2 = save_safetensors(hf, root / "gpt2")
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
    unknown_type = write_gguf(hf, root / "unknown_type.gguf")
    from test_gguf import corrupt_tensor_type
    corrupt_tensor_type(unknown_type, "blk.0.attn_q.weight", 250)
    orbax = root / "orbax"
    res = run("convert", str(save_safetensors(hf, root / "src")), str(orbax))
    assert res.returncode == 0, res.stderr
    (orbax / "model_config.json").write_text("{not json")
    return [(garbage, "not a valid GGUF file"), (truncated, "is corrupt"), (gpt2, "unsupported architecture 'gpt2'"),
            (unknown_type, "unknown GGUF tensor type"), (orbax, "corrupt jaxserve checkpoint")]


def test_broken_checkpoints(tmp_path):
    for path, match in bad_checkpoints(tmp_path):
        assert_one_line_error(run("generate", "--model", str(path), "--prompt", "hi"), match)


def test_convert_then_generate_and_refuse_overwrite(tmp_path):
    gguf_path = write_gguf(make_hf_model("qwen2", seed=1), tmp_path / "q.gguf")
    res = run("convert", str(gguf_path), str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "out" / "jaxserve.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temporary left behind
    assert_one_line_error(run("convert", str(gguf_path), str(tmp_path / "out")), "already exists")
    res = run("generate", "--model", str(tmp_path / "out"), "--prompt", "hi", "--max-num-batched-tokens", "16")
    assert_one_line_error(res, "no tokenizer")  # the tiny GGUF has no vocabulary; token prompts still work


def test_serve_help_explains_every_option_with_its_default():
    res = run("serve", "--help", timeout=120)
    assert res.returncode == 0, res.stderr
    text = " ".join(res.stdout.split("options:", 1)[1].split())  # argparse wraps lines
    for option, default in (("--host HOST", "127.0.0.1"), ("--port PORT", "50051"),
                            ("--max-num-seqs MAX_NUM_SEQS", "64"), ("--max-queued-requests MAX_QUEUED_REQUESTS", "1024"),
                            ("--drain-timeout DRAIN_TIMEOUT", "30.0"), ("--max-num-batched-tokens MAX_NUM_BATCHED_TOKENS", "512")):
        start = text.index(option) + len(option)
        end = text.find(" --", start)
        described = text[start:end if end >= 0 else len(text)]
        assert len(described) > 20 and f"(default: {default})" in described, (option, described)


@pytest.mark.slow
def test_first_use_keeps_stdout_for_the_answer(tmp_path, smollm2_gguf):
    """The first run converts the default model into the cache; what it says about that goes to
    stderr, so stdout is exactly the --json objects."""
    cached = tmp_path / "smollm2-135m" / smollm2_gguf.name
    cached.parent.mkdir(parents=True)
    cached.symlink_to(smollm2_gguf)  # the download is spared; the conversion is not
    from jaxserve.checkpoint.registry import cache_dir

    env = {**os.environ, "JAXSERVE_CACHE": str(tmp_path), "JAX_COMPILATION_CACHE_DIR": str(cache_dir() / "xla")}
    res = subprocess.run(JAXSERVE + ["generate", "--prompt", "Hi", "--max-tokens", "2", "--temperature", "0", "--json"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "smollm2-135m" / "orbax" / "jaxserve.json").exists()  # it did convert
    assert [len(json.loads(line)["token_ids"]) for line in res.stdout.splitlines()] == [2]
