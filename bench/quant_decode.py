"""Decode with weights quantized as stored (Q4_0, Q8_0, Q4_K, ...) against the same model in bf16.

    python bench/quant_decode.py --configs 8b --formats bf16,q4_0,q8_0,q4_k --batches 1,8
    python bench/quant_decode.py --configs 8b --formats q4_0 --batches 1,8 --kernels
    python bench/quant_decode.py --gguf /tmp/lw/8b-Q4_0.gguf,/tmp/lw/8b-Q8_0.gguf --batches 1
    python bench/quant_decode.py --configs 8b,1b --formats q4_0,q4_0/q6_k --batches 1 \
        --v1-formats q6_k

--formats A/B: the linears in A, the LM head (the tied embedding where the config ties them) in
B, as llama.cpp's Q4_0 files keep it in Q6_K; q4_k_m, q5_k_m: the formats llama-quantize gives
each tensor in those mixes (attn_v and ffn_down in Q6_K in half the layers, the head in Q6_K).
--v1-formats: decode again with the first kernel (kernels/qgemv.py) for these formats' one-row
GEMVs instead of the v2 kernel (graphs captured again), to time the two on the same model in one
call. --dense-batches: likewise with batches above 16 dequantized per call (the rule before the
tensor-core kernels took 17..64 rows); --qmma-batches: with them on qmma's 32-/64-row kernels.
--triton-too, --split-rows, --unfused-silu, --eight-warps, --occupancy: likewise with one rule of
the tensor-core kernel (kernels/qmma.py) changed: off, split-K only from some rows, SiLU*up after
the kernel (and so CTAs of 32 rows everywhere), 8 warps on every launch, registers fitted to more
CTAs an SM.

--kernels: instead of decode, the quantized GEMV alone at every linear shape of the configs, per
kernel variant (--variants: v1 = kernels/qgemv.py's first kernel with its default config,
w:BLOCK_N:BLOCK_G:WARPS[:FLAGS] = the v2 kernel (FLAGS: m = 4-bit codes as 0.5 + q / 256, p =
codes prefetched before the PDL wait and one chunk ahead, sN = the chunk loop pipelined N stages
deep through shared memory instead, tN = N row tiles a program, x read once, e.g. w:8:32:4:ms4,
w:4:128:4:pt4), g:... = the same with SiLU*up in its
epilogue (`qgemv_silu_mul`; the weight read as a fused gate/up one, no error column),
tc:BLOCK_N:WARPS[:STAGES[:FLAG...]] = the tensor-core kernel (FLAGs: x = 4-bit codes converted
through float32 instead of by byte permutes; o = the kernel before v4, `qgemm_tc(v4=False)`;
sS = split-K into S programs along K; pP = split-K by `QGemmTcRule`: K halved until the grid
has >= P programs; e.g. tc:64:4:3:s4, tc:64:4:3:p264; the row's variant names the split that
ran), auto = what `qgemv` picks (batches up to 16), lin = what the engine's `QuantLinear` does at
any batch (above 16: `qgemm_batch` up to 64 rows, then dq), dq = dequantize-then-matmul (a dense
copy for the call, cuBLAS), bf16 = F.linear on a dense bf16 weight); microseconds per call
as a CUDA graph over copies of the weight that together exceed the L2 several times, GB/s of
stored bytes, and the error against x @ dequantize(W).T in float64.

Random planes with the shapes of real models (every 2-D weight in the format; norms in bf16), run
through the torch backend with CUDA graphs: decode-sized batches go through the Triton GEMV that
dequantizes in registers (kernels/qgemv.py). Per format and batch: ms per decode step, tok/s, and
% of the roofline, whose bytes are the weights as stored plus the KV cache (bench/common.step_bytes)
over a large copy's bandwidth measured in the same run. Checks first, per format: greedy tokens
of the graphs equal eager decode, and decode logits within bf16 noise of a bf16 model built from
the same (dequantized) weights.
"""

from __future__ import annotations

import re
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench  # noqa: E402, F401  (sets Triton's interpreter where there is no GPU)
from bench.common import (
    SHAPES,
    configs_for,
    copy_bandwidth,
    csv,
    decode_step_ms,
    device_for,
    fmt,
    parser,
    print_table,
    random_checkpoint,
    random_prompts,
    step_bytes,
)
from llm.backends.torch.runner import TorchBackend
from llm.engine.contract.backend import DecodeInput, PrefillInput, SequenceSampling
from llm.engine.contract.sampling_params import SamplingParams
from llm.engine.paged_kv import PageTable, PageTableSpec
from llm.model.checkpoint.common import Checkpoint
from llm.model.checkpoint.load import int4_group, matrix_mode
from llm.model.config import RuntimeConfig
from llm.model.quant.registry import get_format
from llm.model.quant.tensor import QuantizedTensor

GREEDY = SequenceSampling(SamplingParams(), 0)
DEFAULT_VARIANTS = ("bf16,v1,auto,w:4:128:4,w:4:128:4:m,w:8:64:4,w:8:64:4:m,w:2:128:4,"
                    "tc:16:1,tc:32:2")


def linear_shapes(config) -> dict[str, tuple[int, int]]:
    """name -> (N, K) of the model's linears as the backend fuses them (q/k/v, gate/up), a
    16384-row chunk of the LM head (the shape earlier sweeps timed) and the whole head (one
    launch on a GPU)."""
    h, hd = config.hidden_size, config.head_dim or config.hidden_size // config.num_heads
    qkv = (config.num_heads + 2 * config.num_kv_heads) * hd
    return {"qkv": (qkv, h), "o": (h, config.num_heads * hd),
            "gate_up": (2 * config.intermediate_size, h), "down": (h, config.intermediate_size),
            "head_chunk": (16384, h), "head": (config.vocab_size, h)}


def w_config(fields: list[str]):
    """BLOCK_N, BLOCK_G, WARPS[, FLAGS] of a w: / g: variant (see the module docstring) -> the
    v2 kernel's QGemvWConfig."""
    from llm.backends.torch.kernels.qgemv_config import QGemvWConfig

    flags = fields[3] if len(fields) > 3 else ""
    stages, tiles = re.search(r"s(\d+)", flags), re.search(r"t(\d+)", flags)
    try:
        return QGemvWConfig(int(fields[0]), int(fields[1]), int(fields[2]), magic="m" in flags,
                            prefetch="p" in flags, num_stages=int(stages[1]) if stages else 1,
                            tiles=int(tiles[1]) if tiles else 1)
    except (ValueError, IndexError) as e:
        raise SystemExit(f"one-row config {':'.join(fields)!r}: {e}") from None


def variant_call(v: str, x: torch.Tensor):
    """The GEMV of --variants entry `v` as a function of the weight."""
    from llm.backends.torch.kernels.qgemv import qgemm_tc, qgemv, qgemv_silu_mul
    from llm.backends.torch.kernels.qgemv_config import qgemv_config

    f = v.split(":")
    if f[0] == "bf16":
        return lambda w: torch.nn.functional.linear(x, w)
    if f[0] == "v1":
        return lambda w: qgemv(x, w, config=qgemv_config(x.shape[0], *w.shape))
    if f[0] == "auto":
        return lambda w: qgemv(x, w)
    if f[0] in ("lin", "dq"):  # the engine's route at any batch / dequantize-then-matmul
        from llm.backends.torch.kernels.dequant import dequantize_dense
        from llm.backends.torch.weight import QuantLinear

        if f[0] == "lin":
            return lambda w: QuantLinear(w, x.dtype)(x)
        return lambda w: torch.nn.functional.linear(x, dequantize_dense(w, x.dtype))
    if f[0] in ("w", "g"):  # g: w is a fused gate/up weight, silu(gate) * up in the epilogue
        cfg = w_config(f[1:])
        if f[0] == "g":
            return lambda w: qgemv_silu_mul(x, w, config=cfg)
        return lambda w: qgemv(x, w, config=cfg)
    if f[0] == "tc":
        rule = tc_rule(f[1:])
        fast = "x" not in f[4:]
        v4 = "o" not in f[4:]
        return lambda w: qgemm_tc(x, w, block_n=rule.block_n, num_warps=rule.num_warps,
                                  num_stages=rule.num_stages, fast=fast, v4=v4,
                                  split_k=rule.split_for(*w.shape))
    raise SystemExit(f"unknown variant {v!r}")


def tc_rule(fields: list[str]):
    """BLOCK_N, WARPS[, STAGES[, FLAG...]] (see the module docstring) -> the QGemmTcRule (flags
    x and o are the caller's)."""
    from llm.backends.torch.kernels.qgemv_config import QGemmTcRule

    try:
        rule = QGemmTcRule(*(int(v) for v in fields[:3]))
        for flag in fields[3:]:
            if flag[:1] == "s":
                rule = replace(rule, split_k=int(flag[1:]))
            elif flag[:1] == "p":
                rule = replace(rule, programs=int(flag[1:]))
            elif flag not in ("x", "o"):
                raise ValueError(f"unknown flag {flag!r}")
    except ValueError as e:
        raise SystemExit(f"tensor-core config {':'.join(fields)!r}: {e}") from None
    return rule


def variant_name(v: str, n: int, k: int) -> str:
    """--variants entry v as a table row names it: tc ones with the splits that ran."""
    from llm.backends.torch.kernels.splitk import split_groups

    if not v.startswith("tc:"):
        return v
    return f"{v} (s{split_groups(k // 32, tc_rule(v.split(':')[1:]).split_for(n, k))[1]})"


def kernel_sweep(args, device: torch.device) -> int:
    """The --kernels table (see the module docstring)."""
    from bench.common import graph_us, l2_bytes

    mixes = [f for f in csv(args.formats) if f in MIXES]
    if mixes:
        raise SystemExit(f"--kernels times one format at a time; {mixes[0]} is {MIXES[mixes[0]]} "
                         "with q6_k: pass those")
    bw = copy_bandwidth(device)
    g = torch.Generator(device=device).manual_seed(0)
    rows = []
    for name in csv(args.configs):
        for lin, (n, k) in linear_shapes(SHAPES[name]).items():
            if args.linears and lin not in csv(args.linears):
                continue
            for fmt_name in [f for f in csv(args.formats) if f != "bf16"]:
                w0 = random_quantized(fmt_name, n, k, g, device)
                ws = weight_copies(w0, l2_bytes(device))
                wd = w0.dequantize(torch.float32)
                dense = [wd.to(torch.bfloat16)
                         for _ in range(max(2, -(-4 * l2_bytes(device) // (2 * n * k))))]
                for b in csv(args.batches, int):
                    x = (torch.randn(b, k, device=device) * 0.5).to(torch.bfloat16)
                    ref = x.double() @ wd.double().T
                    for v in csv(args.variants):
                        if (v.startswith("w:") and b > 4) or (v.startswith("tc:") and b == 1):
                            continue  # the v2 CUDA-core kernel is for 1..4 rows, tc for 2..16
                        call = variant_call(v, x)
                        mats, nbytes = (dense, 2 * n * k) if v == "bf16" else (ws, w0.nbytes)
                        try:
                            out = call(mats[0])
                            err = float((out.double() - ref).norm() / ref.norm()) \
                                if out.shape == ref.shape else float("nan")  # g: [1, N / 2]
                            us = graph_us([lambda w=w, call=call: call(w) for w in mats], device)
                        except Exception as e:  # noqa: BLE001  (report it and go on)
                            rows.append([name, lin, fmt_name, b, v, "-", "-", "-",
                                         type(e).__name__])
                            print(rows[-1], str(e)[:400], flush=True)
                            continue
                        rows.append([name, lin, fmt_name, b, variant_name(v, n, k), fmt(us, 1),
                                     fmt(nbytes / us / 1e3, 0),
                                     fmt(100 * nbytes / (us * 1e-6) / bw, 0), f"{err:.1e}"])
                        print(rows[-1], flush=True)
                del ws, wd, dense
                torch.cuda.empty_cache()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    print_table(["config", "linear", "weights", "batch", "variant", "us", "GB/s", "% copy",
                 "rel err"], rows)
    return 0


def weight_copies(w0: QuantizedTensor, l2: int) -> list[QuantizedTensor]:
    """w0 and clones of its planes, together > 4x the L2 (`l2` bytes; at least 2): a timing
    graph cycling over them reads each from memory, not from the L2."""
    copies = max(2, -(-4 * l2 // w0.nbytes))
    return [w0] + [QuantizedTensor(w0.format, w0.shape, {p: t.clone() for p, t in
                                                         w0.planes.items()})
                   for _ in range(copies - 1)]


def random_quantized(fmt_name: str, n: int, k: int, g: torch.Generator,
                     device: torch.device) -> QuantizedTensor:
    """Planes of random codes with small finite scales (what a decode step reads is the same
    whatever the values)."""
    planes = {}
    for p in get_format(fmt_name).planes:
        shape = (n, p.width(k))
        if p.dtype.is_floating_point:  # scales: fp16 (GGUF), bf16 (int4_g<G>)
            planes[p.name] = (torch.rand(shape, generator=g, device=device) * 2e-3).to(p.dtype)
        else:
            bits = torch.randint(0, 256, shape, generator=g, device=device, dtype=torch.int32)
            if p.name in ("scales", "mins") and p.dtype == torch.uint8:
                bits &= 63
            planes[p.name] = bits.to(torch.uint8).view(p.dtype)
    return QuantizedTensor(fmt_name, (n, k), planes)


def scaled(w: QuantizedTensor) -> QuantizedTensor:
    """`w` with its scale planes (d, m, dmin: fp16, or bf16 for int4_g<G>) multiplied by one
    factor so that the weights' standard deviation is 1 / sqrt(in_features), as the dense
    model's: a random model with larger weights is chaotic, and its logits would not tell a
    kernel error from rounding."""
    sample = w.slice_rows(0, min(64, w.out_features)).dequantize()
    factor = float(w.in_features ** -0.5 / sample.std())
    planes = {k: (v.float() * factor).to(v.dtype) if v.dtype.is_floating_point else v
              for k, v in w.planes.items()}
    return QuantizedTensor(w.format, w.shape, planes)


def head_name(dense: Checkpoint) -> str:
    """The tensor the LM head multiplies by: lm_head.weight, or the tied embedding."""
    return "lm_head.weight" if "lm_head.weight" in dense.tensors else "model.embed_tokens.weight"


# llama-quantize's K-quant mixes: body format; attn_v and ffn_down in Q6_K in its use_more_bits
# layers (the first and last eighth, and every third between), the LM head in Q6_K; and our
# weights="int4_mix" (llm.model.checkpoint.load.matrix_mode: v_proj, down_proj, embedding and
# head int8, the rest int4 in the loader's groups: `int4_group`)
MIXES = {"q4_k_m": "q4_k", "q5_k_m": "q5_k", "int4_mix": "int4"}


def _mix_format(mix: str, name: str, layers: int, head: str, k: int) -> str:
    """The format llama-quantize gives tensor `name` (canonical, k columns) in the mix `mix`;
    head: the tensor the LM head multiplies by (the tied embedding, where there is no
    lm_head.weight, takes the head's Q6_K as llama-quantize gives token_embd without an output
    tensor). int4_mix: as the loader quantizes (`matrix_mode`, `int4_group`)."""
    if mix == "int4_mix":
        if matrix_mode(name, mix) == "int8":  # the head / tied embedding among them
            return "int8"
        return f"int4_g{int4_group(name, k)}"
    if name == head:
        return "q6_k"
    if name.endswith(("v_proj.weight", "down_proj.weight")):
        i = int(name.split(".")[2])
        if i < layers // 8 or i >= 7 * layers // 8 or (i - layers // 8) % 3 == 2:
            return "q6_k"
    return MIXES[mix]


def quantized_checkpoint(dense: Checkpoint, fmt_name: str, device: torch.device) -> Checkpoint:
    """Every 2-D weight in random planes of `fmt_name`; "A/B": the LM head's in B; a mix of
    MIXES (q4_k_m, q5_k_m): the formats llama-quantize gives each tensor."""
    body, _, head = fmt_name.partition("/")
    g = torch.Generator(device=device).manual_seed(0)

    def fmt_of(name: str, k: int) -> str:
        if fmt_name in MIXES:
            return _mix_format(fmt_name, name, dense.config.num_layers, head_name(dense), k)
        return head if head and name == head_name(dense) else body

    tensors = {name: scaled(random_quantized(fmt_of(name, t.shape[1]), *t.shape, g, device))
               if t.dim() == 2 else t for name, t in dense.tensors.items()}
    return Checkpoint(dense.config, tensors, dense.source)


def greedy(backend: TorchBackend, prompts: list[list[int]], steps: int, eager: bool,
           forced: list[list[int]] | None = None) -> tuple[list[list[int]], torch.Tensor | None]:
    """Greedy tokens of every prompt (graphs, or eager model.decode) and, eager, the last
    step's logits [B, V]. forced: feed these tokens instead (the same history for two models
    whose near-tied random logits may pick different tokens)."""
    rt = backend.runtime
    pages = PageTable(PageTableSpec(rt.total_blocks, rt.block_size, rt.blocks_per_seq),
                      rt.max_batch)
    out = []
    for slot, p in enumerate(prompts):
        pages.reserve(slot, len(p) + steps + 1)
        first = backend.prefill(PrefillInput(slot, p, 0, pages.row(slot), GREEDY))
        out.append([first if forced is None else forced[slot][0]])
    slots, logits = list(range(len(prompts))), None
    for i in range(steps):
        pos = [len(p) + i for p in prompts]
        if eager:
            dev = backend.device
            logits = backend.model.decode(
                torch.tensor([o[-1] for o in out], device=dev), torch.tensor(pos, device=dev),
                torch.tensor(pages.table(slots), device=dev), backend.cache, max(pos))
            nxt = logits.argmax(-1).tolist()
        else:
            nxt = backend.decode(DecodeInput(slots, [o[-1] for o in out], pos,
                                             pages.table(slots), [GREEDY] * len(slots)))
        for j, (o, t) in enumerate(zip(out, nxt)):
            o.append(t if forced is None else forced[j][i + 1])
    return out, logits


def check(backend: TorchBackend, ck: Checkpoint, rt: RuntimeConfig) -> str:
    """Greedy tokens of the CUDA graphs against eager decode, and the last eager step's logits
    against a bf16 model of the same (dequantized) weights fed the same tokens."""
    prompts = random_prompts(4, 16, ck.config.vocab_size)
    graphs, _ = greedy(backend, prompts, 4, eager=False)
    eager, logits = greedy(backend, prompts, 4, eager=True)
    dev = backend.device
    ref_ck = Checkpoint(ck.config, {k: v.to(dev).dequantize(torch.float32).bfloat16()
                                    if isinstance(v, QuantizedTensor) else v
                                    for k, v in ck.tensors.items()}, ck.source)
    ref = TorchBackend(ref_ck, rt, cuda_graphs=False)
    _, ref_logits = greedy(ref, prompts, 4, eager=True, forced=eager)
    ref.close()
    rel = float((logits.float() - ref_logits.float()).norm() / ref_logits.float().norm())
    return f"graphs==eager {graphs == eager}, logits vs bf16 {rel:.4f}"


def decode_rows(backend: TorchBackend, name: str, fmt_name: str, args, bw: float,
                note: str) -> list[list]:
    """One table row per batch of --batches: ms per step, tok/s, % roofline, weight GB."""
    rows = []
    for b in csv(args.batches, int):
        ms = decode_step_ms(backend, b, args.prompt_len, args.steps)
        roof = step_bytes(backend.model, b, args.prompt_len + args.steps // 2) / bw * 1e3
        rows.append([name, fmt_name, b, fmt(ms, 3), fmt(1e3 / ms), fmt(b * 1e3 / ms),
                     fmt(100 * roof / ms), fmt(backend.model.weight_bytes / 1e9, 2), note])
        print(rows[-1], flush=True)
    return rows


def tc_config_rows(backend: TorchBackend, name: str, fmt_name: str, args, bw: float) -> list:
    """--tc-configs: decode again with each BLOCK_N:WARPS:STAGES[:sS|:pP] as the tensor-core
    kernel's rule for every shape (graphs captured again), then the default rule restored."""
    from llm.backends.torch.kernels import qgemv
    from llm.backends.torch.kernels.qgemv_config import qgemm_tc_config

    rows, default = [], qgemv.qgemm_tc_config
    for cfg in csv(args.tc_configs):
        rule = tc_rule(cfg.split(":"))
        qgemv.qgemm_tc_config = lambda m, n, k, r=rule: qgemm_tc_config(m, n, k, r)
        try:
            backend.graphs.capture()
            rows += decode_rows(backend, name, fmt_name, args, bw, f"tc {cfg}")
        finally:
            qgemv.qgemm_tc_config = default
    if rows:
        backend.graphs.capture()
    return rows


def w_rule_rows(backend: TorchBackend, name: str, fmt_name: str, args, bw: float) -> list:
    """--w-rules: decode with each rule set in place of `qgemv_w_config`'s one-row choice for
    its shapes, then with the default again, --w-repeats times (graphs captured again each
    time), so that the sets and the default alternate in one process."""
    from llm.backends.torch.kernels import qgemv_words

    sets = [parse_w_rules(s) for s in csv(args.w_rules)]
    if not sets or backend.graphs is None:
        return []
    rows, default = [], qgemv_words.qgemv_w_config
    for _ in range(args.w_repeats):
        for text, table in zip(csv(args.w_rules), sets):
            used = set()

            def rule(m, n, k, f, t=table, used=used):
                if m == 1 and (f, n, k) in t:
                    used.add((f, n, k))
                    return t[(f, n, k)]
                return default(m, n, k, f)

            qgemv_words.qgemv_w_config = rule
            try:
                backend.graphs.capture()
                unused = " ".join(f"{f}:{n}x{k}" for f, n, k in table.keys() - used)
                note = f"rules {text}" + (f" (never asked: {unused})" if unused else "")
                rows += decode_rows(backend, name, fmt_name, args, bw, note)
            finally:
                qgemv_words.qgemv_w_config = default
        backend.graphs.capture()
        rows += decode_rows(backend, name, fmt_name, args, bw, "default rule")
    return rows


def parse_w_rules(text: str) -> dict:
    """'FMT:NxK=BLOCK_N:BLOCK_G:WARPS[:FLAGS]+...' -> {(fmt, n, k): QGemvWConfig}."""
    table = {}
    for entry in text.split("+"):
        where, _, cfg = entry.partition("=")
        m = re.fullmatch(r"(\w+):(\d+)x(\d+)", where)
        if m is None or not cfg:
            raise SystemExit(f"--w-rules entry {entry!r}: expected FMT:NxK=BLOCK_N:BLOCK_G:WARPS"
                             "[:FLAGS], e.g. q4_0:16384x2048=16:64:4:ms3")
        table[(m[1], int(m[2]), int(m[3]))] = w_config(cfg.split(":"))
    return table


def v1_rows(backend: TorchBackend, name: str, fmt_name: str, args, bw: float) -> list:
    """--v1-formats: decode again with the v2 one-row kernel off for those formats (`qgemv` and
    `qgemv_silu_mul` then take the first kernel; graphs captured again), then restored."""
    from llm.backends.torch.kernels import qgemv

    off = set(csv(args.v1_formats))
    if not off & set(fmt_name.split("/")) or backend.graphs is None:
        return []
    rule = qgemv.words_kernel_runs
    qgemv.words_kernel_runs = lambda x, w: w.format not in off and rule(x, w)
    try:
        backend.graphs.capture()
        rows = decode_rows(backend, name, fmt_name, args, bw, f"v1 for {args.v1_formats}")
    finally:
        qgemv.words_kernel_runs = rule
    backend.graphs.capture()
    return rows


def patched_rows(backend: TorchBackend, name: str, fmt_name: str, args, bw: float,
                 module, attr: str, value, note: str) -> list:
    """Decode again with `module.attr` replaced by `value` (graphs captured again), then the
    original restored and the graphs captured again: an A/B of one rule in one process (each
    variant of --split-rows captures twice)."""
    rule = getattr(module, attr)
    setattr(module, attr, value)
    try:
        backend.graphs.capture()
        rows = decode_rows(backend, name, fmt_name, args, bw, note)
    finally:
        setattr(module, attr, rule)
    backend.graphs.capture()
    return rows


def unchained_rows(backend: TorchBackend, name: str, fmt_name: str, args, bw: float) -> list:
    """--unchained: decode again with every norm a launch of its own (`Transformer.chained_norms`
    False: DecoderLayer.decode), then with the norms in o's and down's epilogue in every layer
    (`qgemv.norm_epilogue` patched to always), then as the engine runs it again (its rule),
    graphs captured again each time: the A/B of the norms in the epilogues in one process."""
    from llm.backends.torch.kernels import qgemv

    if not args.unchained or backend.graphs is None:
        return []
    rows, rule, was = [], qgemv.norm_epilogue, backend.model.chained_norms
    for chained, taken, note in ((False, rule, "norms apart"),
                                 (True, lambda *a: True, "norms in the epilogues always"),
                                 (True, rule, "the engine's rule, again")):
        backend.model.chained_norms = chained
        qgemv.norm_epilogue = taken
        try:
            backend.graphs.capture()
            rows += decode_rows(backend, name, fmt_name, args, bw, note)
        finally:
            qgemv.norm_epilogue = rule
            backend.model.chained_norms = was
    return rows


def tc_takes(fmt_name: str) -> bool:
    """Whether --formats entry `fmt_name` (A or A/B) has a format or mix the tensor-core kernel
    (kernels/qmma.py) takes."""
    from llm.backends.torch.kernels import qmma

    return bool((set(qmma.FORMATS) | set(MIXES)) & set(fmt_name.split("/")))


def triton_rows(backend: TorchBackend, name: str, fmt_name: str, args, bw: float) -> list:
    """--triton-too: decode again with the tensor-core kernel (kernels/qmma.py) off, i.e.
    `qgemv`'s Triton kernels only: the A/B of that kernel in one process."""
    from llm.backends.torch.kernels import qgemv

    if not args.triton_too or backend.graphs is None or not tc_takes(fmt_name):
        return []
    return patched_rows(backend, name, fmt_name, args, bw, qgemv, "qmma_runs",
                        lambda *a, **k: False, "Triton only")


def split_rows(backend: TorchBackend, name: str, fmt_name: str, args, bw: float) -> list:
    """--split-rows: decode again with the tensor-core kernel's split-K (`qmma.k_splits`) only
    from each of these rows of x (17: never, the ring depth then `ring_stages` without splits):
    the A/B of split-K in one process."""
    from llm.backends.torch.kernels import qmma

    if not args.split_rows or backend.graphs is None:
        return []
    rule, rows = qmma.k_splits, []
    for least in csv(args.split_rows, int):
        rows += patched_rows(
            backend, name, fmt_name, args, bw, qmma, "k_splits",
            lambda m, *a, least=least, **k: rule(m, *a, **k) if m >= least else 1,
            f"split-K from {least} rows" if least <= 16 else "no split-K")
    return rows


def dense_batch_rows(backend: TorchBackend, name: str, fmt_name: str, args, bw: float) -> list:
    """--dense-batches: decode again with batches above 16 dequantizing each matrix for the call
    and multiplying by cuBLAS (`weight.TC_BATCH_ROWS` 16, the rule before `qgemm_batch`)."""
    from llm.backends.torch import weight

    if not args.dense_batches or backend.graphs is None:
        return []
    return patched_rows(backend, name, fmt_name, args, bw, weight, "TC_BATCH_ROWS", 16,
                        "batches > 16 dequantized per call")


def qmma_batch_rows(backend: TorchBackend, name: str, fmt_name: str, args, bw: float) -> list:
    """--qmma-batches: decode again with batches of 17..64 rows on qmma's `_m32` / `_m64`
    kernels (`qmma.mma_rows` extended to 64 rows) instead of the Triton tensor-core kernel."""
    from llm.backends.torch.kernels import qmma

    if not args.qmma_batches or backend.graphs is None:
        return []
    rule = qmma.mma_rows
    return patched_rows(backend, name, fmt_name, args, bw, qmma, "mma_rows",
                        lambda f, m, n, k: rule(f, min(m, 16), n, k) and m <= qmma.MAX_ROWS,
                        "batches > 16 on qmma's 32- / 64-row kernels")


def unfused_silu_rows(backend: TorchBackend, name: str, fmt_name: str, args, bw: float) -> list:
    """--unfused-silu: decode again with the tensor-core kernel's SiLU*up epilogue off
    (`qmma.glu_epilogue` False: the gate/up product, then `silu_mul`)."""
    from llm.backends.torch.kernels import qmma

    if not args.unfused_silu or backend.graphs is None or not tc_takes(fmt_name):
        return []
    return patched_rows(backend, name, fmt_name, args, bw, qmma, "glu_epilogue",
                        lambda *a, **k: False, "SiLU*up after the kernel")


def eight_warps_rows(backend: TorchBackend, name: str, fmt_name: str, args, bw: float) -> list:
    """--eight-warps: decode again with every tensor-core launch at 8 warps (`qmma.cta_warps`
    WARPS: the rule before four warps on the wide 16-row launches), an A/B of that rule."""
    from llm.backends.torch.kernels import qmma

    if not args.eight_warps or backend.graphs is None or not tc_takes(fmt_name):
        return []
    return patched_rows(backend, name, fmt_name, args, bw, qmma, "cta_warps",
                        lambda *a, **k: qmma.WARPS, "8 warps everywhere")


def _cols_launch(spec: str) -> tuple[int, int, dict]:
    """RB:W[:x][:aN][:s] -> (rb, warps, cols_matmul's keywords)."""
    rb, wp, *flags = spec.split(":")
    na = next((int(f[1:]) for f in flags if f.startswith("a")), 1)
    return int(rb), int(wp), {"xp": "x" in flags, "na": na, "sa": "s" in flags}


def cols_rows(backend: TorchBackend, name: str, fmt_name: str, args, bw: float) -> list:
    """--cols V1,V2..: decode again for each variant V = MODE:RB:W[:flags][+RB:W[:flags]], one-row
    Q4_0 gate/up by bench/q4_0_cols.cu's kernel (MODE glu: SiLU*up in its epilogue; plain: the
    product, then silu_mul), and after a '+' every plain one-row Q4_0 `qgemv` call (the LM head,
    and QKV where its RoPE epilogue is not taken) by its plain kernel too; flags x (x loaded
    ahead), aN (N accumulators), s (sums of x by ALU).
    Graphs captured again for each, then the engine's kernels again."""
    from bench import q4_cols_explore
    from llm.backends.torch.kernels import qgemv
    from llm.backends.torch.kernels.pdl import use_pdl
    from llm.backends.torch.kernels.silu_mul import silu_mul as act

    if not args.cols or backend.graphs is None or fmt_name != "q4_0":
        return []
    silu_mul, gemv = qgemv.qgemv_silu_mul, qgemv.qgemv

    def one_row(x, w, bias) -> bool:
        return (x.dim() == 2 and x.shape[0] == 1 and x.dtype == torch.bfloat16 and bias is None
                and w.format == "q4_0" and w.shape[1] % 256 == 0 and x.stride(1) == 1)

    rows = []
    for variant in csv(args.cols):
        gu, *hd = variant.split("+")
        mode, gu = gu.split(":", 1)
        rb, wp, kw = _cols_launch(gu)

        def cols_silu_mul(x, w, bias=None, config=None, pdl=None, rb=rb, wp=wp, kw=kw,
                          mode=mode):
            rows = (32 if mode == "glu" else 16) * rb  # rows of w a CTA
            if config is None and one_row(x, w, bias) and w.shape[0] % rows == 0 and (
                    mode != "glu" or wp % 2 == 0):
                on = use_pdl(x, pdl)
                if mode == "glu":
                    return q4_cols_explore.cols_matmul(x, w, rb, wp, on, glu=True, **kw)
                return act(q4_cols_explore.cols_matmul(x, w, rb, wp, on, **kw))
            return silu_mul(x, w, bias, config, pdl)

        qgemv.qgemv_silu_mul = cols_silu_mul
        if hd:
            hrb, hwp, hkw = _cols_launch(hd[0])

            def cols_gemv(x, w, bias=None, config=None, pdl=None, variant="auto", hrb=hrb,
                          hwp=hwp, hkw=hkw):
                if (config is None and variant == "auto" and one_row(x, w, bias)
                        and w.shape[0] % (16 * hrb) == 0):
                    return q4_cols_explore.cols_matmul(x, w, hrb, hwp, use_pdl(x, pdl), **hkw)
                return gemv(x, w, bias, config, pdl, variant)

            qgemv.qgemv = cols_gemv
        try:
            backend.graphs.capture()
            rows += decode_rows(backend, name, fmt_name, args, bw, f"cols {variant}")
        finally:
            qgemv.qgemv_silu_mul, qgemv.qgemv = silu_mul, gemv
    backend.graphs.capture()
    return rows + decode_rows(backend, name, fmt_name, args, bw, "the engine's kernels again")


def occupancy_rows(backend: TorchBackend, name: str, fmt_name: str, args, bw: float) -> list:
    """--occupancy N: decode again with each tensor-core launch's registers fitted to N CTAs of
    256 threads an SM (`qmma_matmul(occupancy=N)`) where that many of its CTAs' shared memory
    fit an SM, else the engine's fit: an A/B of the occupancy."""
    from llm.backends.torch.kernels import qgemv, qmma

    if not args.occupancy or backend.graphs is None or not tc_takes(fmt_name):
        return []
    engine = qgemv.qmma_matmul

    def launch(x, w, pdl=None, glu=False):
        (m, k), n = x.shape, w.shape[0]
        _, warps, _, stages = qmma.launch_shape(m, n, k, x.device, glu)
        ctas = args.occupancy * 8 // warps  # the bound counts CTAs of 8 warps (256 threads)
        smem = qmma.shared_bytes(w.format, m, warps, stages) + 1024  # + the CTA's reserved KB
        per_sm = getattr(torch.cuda.get_device_properties(x.device),
                         "shared_memory_per_multiprocessor", 228 * 1024)
        occupancy = args.occupancy if ctas * smem <= per_sm else qmma.OCCUPANCY
        return engine(x, w, pdl, glu=glu, occupancy=occupancy)

    return patched_rows(backend, name, fmt_name, args, bw, qgemv, "qmma_matmul", launch,
                        f"occupancy {args.occupancy} where it fits")


def gguf_rows(args, device: torch.device, bw: float) -> list[list]:
    """--gguf: each file's tensors as stored (weights="stored"; dense ones in bf16)."""
    from pathlib import Path

    from llm.model.checkpoint.load import load_checkpoint

    rows = []
    for path in csv(args.gguf):
        ck = load_checkpoint(path, progress=False, weights="stored")
        ck = Checkpoint(ck.config, {k: v if isinstance(v, QuantizedTensor)
                                    else v.to(device, torch.bfloat16)
                                    for k, v in ck.tensors.items()}, ck.source)
        formats = sorted({v.format for v in ck.tensors.values()
                          if isinstance(v, QuantizedTensor)})
        rt = RuntimeConfig(device=str(device), dtype="bfloat16",
                           max_batch=max(*csv(args.batches, int), 4),
                           max_seq_len=args.prompt_len + args.steps + 64, block_size=32)
        backend = TorchBackend(ck, rt, cuda_graphs=device.type == "cuda")
        label = "+".join(formats)
        rows += decode_rows(backend, Path(path).name, label, args, bw, check(backend, ck, rt))
        rows += v1_rows(backend, Path(path).name, "/".join(formats), args, bw)
        rows += unchained_rows(backend, Path(path).name, "/".join(formats), args, bw)
        backend.close()
        del ck, backend
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--configs", default="1b", help="comma list of: " + ", ".join(SHAPES))
    p.add_argument("--formats", default="bf16,q4_0,q8_0,q4_k",
                   help="comma list: bf16 (dense baseline), quantized formats (A/B: the LM "
                        "head in B) and llama-quantize's mixes q4_k_m, q5_k_m")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--kernels", action="store_true", help="the GEMV alone per shape and variant")
    p.add_argument("--variants", default=DEFAULT_VARIANTS)
    p.add_argument("--tc-configs", default="",
                   help="comma list of BLOCK_N:WARPS:STAGES[:sS|:pP] (split-K: S programs "
                        "along K, or K halved until the grid has >= P programs): decode again "
                        "with each as the tensor-core kernel's rule (batches 2..16) instead of "
                        "the default (qgemv_config.TC_RULE)")
    p.add_argument("--v1-formats", default="",
                   help="comma list of formats: decode again with the first kernel for their "
                        "one-row GEMVs (e.g. q6_k: the LM head of --formats q4_0/q6_k)")
    p.add_argument("--linears", default="",
                   help="--kernels: comma list of the shapes to time (qkv, o, gate_up, down, "
                        "head_chunk, head; default all)")
    p.add_argument("--w-rules", default="",
                   help="comma list of rule sets, each '+'-joined FMT:NxK=BLOCK_N:BLOCK_G:WARPS"
                        "[:FLAGS] (one-row v2 configs for those shapes, e.g. "
                        "q4_0:16384x2048=16:64:4:ms3): decode again with each set in place of "
                        "qgemv_w_config's choice, then with the default, --w-repeats times")
    p.add_argument("--w-repeats", type=int, default=2)
    p.add_argument("--triton-too", action="store_true",
                   help="decode again with the CUDA tensor-core kernel (kernels/qmma.py) off, "
                   "for the formats and mixes it takes (A/B)")
    p.add_argument("--split-rows", default="",
                   help="comma list of rows of x: decode again with the tensor-core kernel's "
                        "split-K only from that many rows (17: never), an A/B of split-K")
    p.add_argument("--dense-batches", action="store_true",
                   help="decode again with batches above 16 rows dequantizing each matrix for "
                        "the call (cuBLAS), the rule before the tensor-core kernel took 17..64")
    p.add_argument("--qmma-batches", action="store_true",
                   help="decode again with batches of 17..64 rows on the CUDA tensor-core "
                        "kernel's 32- / 64-row launches instead of the Triton one")
    p.add_argument("--unfused-silu", action="store_true",
                   help="decode again with the tensor-core kernel's SiLU*up epilogue off "
                        "(qmma.glu_epilogue False), an A/B of that epilogue")
    p.add_argument("--eight-warps", action="store_true",
                   help="decode again with the tensor-core kernel at 8 warps on every launch "
                        "(qmma.cta_warps 8), an A/B of four warps on the wide 16-row launches")
    p.add_argument("--occupancy", type=int, choices=(3, 4), default=None,
                   help="decode again with the tensor-core kernel's registers fitted to this "
                        "many CTAs an SM where their shared memory fits (qmma_matmul "
                        "occupancy), an A/B of the engine's 2")
    p.add_argument("--cols", default="",
                   help="MODE:RB:W[:flags][+RB:W[:flags]],..: also decode with bench/"
                        "q4_0_cols.cu's one-row kernel for Q4_0 gate/up (MODE glu or plain) "
                        "and, after '+', the plain one-row GEMVs (see cols_rows)")
    p.add_argument("--unchained", action="store_true",
                   help="decode again with each norm a launch of its own, then with the norms "
                        "in the o / down GEMVs' epilogue everywhere, then by the engine's rule")
    p.add_argument("--gguf", default=None,
                   help="comma list of GGUF files to decode as stored, instead of random planes "
                        "(e.g. the files ../shared/peers/llamacpp/bench.sh gave llama.cpp)")
    args = p.parse_args(argv)
    device = device_for(args)
    if args.kernels:
        return kernel_sweep(args, device)
    bw = copy_bandwidth(device)
    rows = gguf_rows(args, device, bw) if args.gguf else []
    for name in [] if args.gguf else configs_for(args, csv(args.configs)):
        config = SHAPES[name]
        rt = RuntimeConfig(device=str(device), dtype="bfloat16",
                           max_batch=max(*csv(args.batches, int), 4),
                           max_seq_len=args.prompt_len + args.steps + 64, block_size=32)
        dense = random_checkpoint(config, device, torch.bfloat16)
        for fmt_name in csv(args.formats):
            try:
                ck = dense if fmt_name == "bf16" else quantized_checkpoint(dense, fmt_name, device)
            except ValueError as e:  # the 'tiny' shapes (64 wide) hold no 256-wide K-quant block
                if not args.smoke:
                    raise
                print(f"--smoke: {fmt_name} skipped: {e}")
                continue
            backend = TorchBackend(ck, rt, cuda_graphs=device.type == "cuda")
            note = "" if fmt_name == "bf16" else check(backend, ck, rt)
            rows += decode_rows(backend, name, fmt_name, args, bw, note)
            if fmt_name != "bf16" and backend.graphs is not None:
                rows += tc_config_rows(backend, name, fmt_name, args, bw)
                rows += v1_rows(backend, name, fmt_name, args, bw)
                rows += triton_rows(backend, name, fmt_name, args, bw)
                rows += split_rows(backend, name, fmt_name, args, bw)
                rows += unfused_silu_rows(backend, name, fmt_name, args, bw)
                rows += dense_batch_rows(backend, name, fmt_name, args, bw)
                rows += qmma_batch_rows(backend, name, fmt_name, args, bw)
                rows += eight_warps_rows(backend, name, fmt_name, args, bw)
                rows += occupancy_rows(backend, name, fmt_name, args, bw)
                rows += w_rule_rows(backend, name, fmt_name, args, bw)
                rows += unchained_rows(backend, name, fmt_name, args, bw)
                rows += cols_rows(backend, name, fmt_name, args, bw)
            backend.close()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    print_table(["config", "weights", "batch", "ms/step", "tok/s/user", "tok/s total",
                 "% roofline", "weight GB", "check"], rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
