"""demos/eval.py: perplexity and agreement on a text, against this engine in fp32 and against
transformers, on a small random Hugging Face model with a tokenizer (built here)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import transformers
from test_tokenizer import _tokenizer_json_dir

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def eval_demo():
    spec = importlib.util.spec_from_file_location("eval_demo", ROOT / "demos" / "eval.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["eval_demo"] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    return module


def model_dir(tmp_path: Path, hidden: int = 64) -> Path:
    """A random 2-layer Llama with 4 heads of hidden / 4 and a tokenizer, saved under tmp_path."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=hidden,
                                      intermediate_size=2 * hidden,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=256)
    d = tmp_path / "hf"
    transformers.LlamaForCausalLM(config).save_pretrained(d)
    return _tokenizer_json_dir(d, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})


def test_fp32_engine_agrees_with_itself_and_with_transformers(tmp_path, eval_demo) -> None:
    d = model_dir(tmp_path)
    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat and the dog sat on the log " * 8)
    out = tmp_path / "r.json"
    for reference in ("dequantized", "transformers"):
        assert eval_demo.main(["--model", str(d), "--text", str(text), "--weights", "dequantize",
                               "--reference", reference, "--window", "24",
                               "--json", str(out)]) == 0
        r = json.loads(out.read_text())
        assert r["tokens"] > 40 and r["top1"] == 1.0 and r["top5"] == 1.0
        assert r["ppl"] == pytest.approx(r["ppl_reference"], rel=1e-4)
    assert eval_demo.main(["--model", str(d), "--text", str(text), "--weights", "int4",
                           "--window", "24", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["top1"] < 1.0 and r["ppl"] != r["ppl_reference"]
    assert eval_demo.main(["--model", str(d), "--text", str(text), "--weights", "int4",
                           "--int4-group", "32", "--window", "24", "--json", str(out)]) == 0
    g32 = json.loads(out.read_text())  # default groups here: 64, and 128 for down_proj
    assert g32["weights"] == "int4_g32" and g32["ppl"] != r["ppl"]


def test_bad_input_is_a_clear_error(tmp_path, eval_demo, capsys) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    d = model_dir(tmp_path)
    assert eval_demo.main(["--model", str(d), "--text", str(empty), "--window", "64"]) == 2
    assert "too short to score" in capsys.readouterr().err
    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat " * 4)
    for weights, group, error in (("int8", "32", "int4_group applies to weights='int4'"),
                                  ("int4", "48", "int4_group must be a positive multiple of 32"),
                                  ("int4", "128", "in_features 64 is no multiple of the int4 "
                                                  "group 128")):
        assert eval_demo.main(["--model", str(d), "--text", str(text), "--weights", weights,
                               "--int4-group", group]) == 2
        assert error in capsys.readouterr().err
    binary = tmp_path / "bin.dat"
    binary.write_bytes(b"ok \xd0\x00\xff\xfe")
    assert eval_demo.main(["--model", str(d), "--text", str(binary)]) == 2
    assert f"{binary}: not UTF-8 text" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert eval_demo.main(["--model", str(d), "--text", str(text), "--device", "cuda",
                               "--window", "64"]) == 2
        assert "device 'cuda': this machine has 0 CUDA device(s)" in capsys.readouterr().err
    for flags, error in ((["--max-tokens", "-5"], "--max-tokens must be at least 2, got -5"),
                         (["--window", "100000"], "--window 100000 is longer than the model's "
                                                  "context")):
        assert eval_demo.main(["--model", str(d), "--text", str(text), *flags]) == 2
        assert error in capsys.readouterr().err


def test_default_model_as_stored_agrees_with_its_dequantized_weights(tmp_path, eval_demo) -> None:
    """Issue 15's CPU target: the default model (Q4_1 as stored, the C kernels in float32)
    teacher-forced over >= 500 tokens of real text picks the dequantized float32 model's top-1
    token at >= 0.99 of the positions, at the same perplexity to 1e-3."""
    out = tmp_path / "r.json"
    assert eval_demo.main(["--text", str(ROOT / "demos" / "data" / "eval_text.txt"),
                           "--weights", "stored", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["tokens"] >= 500 and r["reference"] == "dequantized"
    assert r["top1"] >= 0.99 and r["top5"] >= 0.99, r
    assert r["ppl"] == pytest.approx(r["ppl_reference"], rel=1e-3)
