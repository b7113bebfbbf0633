"""Prompts and memory with weights quantized as stored, against the same model in bf16.

    python bench/quant_prefill.py --configs 8b --formats q4_0 --tokens 2048
    python bench/quant_prefill.py --configs 8b --formats q4_0,q4_k_m --tokens 2048 --chunk 256

Per config: the time to first token of one --tokens prompt (CUDA events around the eager prefill
and the greedy choice of its first token, median of --reps; bench/prefill_profile.py's measure)
for the dense bf16 model and for each format, whose prompt layers are dequantized one at a time
into a dense bf16 copy for cuBLAS (kernels/dequant.py; row "torch dequantize": the same through
`dequantize(float32).to(bf16)`, the path before that kernel, which computes identical logits);
--chunk N: the prompt in calls of N tokens, as the engine's scheduler runs it
(`SchedulerConfig.prefill_chunk`, 256), each quantized call dequantizing every layer again (no
"torch dequantize" row then); --fused BM:BN:BK:WARPS:STAGES[:n] (comma list; n: the weight
tile put in column order): each format again with calls of more than 64 rows on
kernels/qgemm_prefill.py's GEMM in that launch, which dequantizes its weight tiles in registers
instead of writing a dense copy (row "fused ...", logits compared with the dense path's);
and the GPU memory the quantized weights take once the backend holds them (allocated bytes less
the KV cache) against the bytes of the same tensors in a GGUF file (gguf's block sizes; norms
as F32, as llama.cpp writes them). Random planes with the shapes of real models
(bench/quant_decode.py).
"""

from __future__ import annotations

import gc
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench  # noqa: E402, F401  (sets Triton's interpreter where there is no GPU)
from bench.common import (  # noqa: E402
    SHAPES,
    configs_for,
    csv,
    device_for,
    fmt,
    parser,
    print_table,
    random_checkpoint,
    random_prompts,
)
from bench.prefill_profile import measure, prefill_fn  # noqa: E402
from bench.quant_decode import quantized_checkpoint  # noqa: E402
from llm.backends.torch.kernels import dequant  # noqa: E402
from llm.backends.torch.runner import TorchBackend  # noqa: E402
from llm.model.checkpoint.common import Checkpoint  # noqa: E402
from llm.model.config import RuntimeConfig  # noqa: E402
from llm.model.quant.tensor import QuantizedTensor  # noqa: E402


def gguf_bytes(ck: Checkpoint) -> int:
    """Bytes of ck's tensors as a GGUF stores them: quantized ones in their ggml blocks, the
    rest (norm vectors) as F32."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    total = 0
    for t in ck.tensors.values():
        if isinstance(t, QuantizedTensor):
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType[t.format.upper()]]
            total += t.out_features * t.in_features // block * size
        else:
            total += 4 * t.numel()
    return total


def allocated(device: torch.device) -> int:
    """Bytes allocated on the GPU (0 on the CPU of --smoke, where memory is not measured)."""
    gc.collect()
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    return torch.cuda.memory_allocated(device)


def chunked_fn(backend: TorchBackend, prompt: list[int], chunk: int):
    """A call that enqueues the prefill of `prompt` in calls of `chunk` tokens (each at its
    start position, the earlier ones' K/V in the cache) and its greedy first token."""
    model, device = backend.model, backend.device
    row = torch.arange(1, backend.runtime.blocks_per_seq + 1, device=device)
    parts = [(i, torch.tensor(prompt[i:i + chunk], device=device))
             for i in range(0, len(prompt), chunk)]

    def run() -> torch.Tensor:
        for start, tokens in parts:
            logits = model.prefill(tokens, start, row, backend.cache)
        return model.lm_head.argmax(logits[None])

    return run


def ttft(backend: TorchBackend, prompt: list[int], reps: int,
         chunk: int = 0) -> tuple[float, torch.Tensor]:
    """(median ms of prefill + first token, the prompt's last logits); chunk: the prompt in
    calls of that many tokens (0: one call)."""
    backend.prefill_graphs = None
    run = chunked_fn(backend, prompt, chunk) if chunk else prefill_fn(backend, prompt, graph=False)
    ms, _ = measure(run, backend.device, reps)
    row = torch.arange(1, backend.runtime.blocks_per_seq + 1, device=backend.device)
    logits = backend.model.prefill(torch.tensor(prompt, device=backend.device), 0, row,
                                   backend.cache)
    return ms, logits.float()


def fused_launch(text: str) -> dict:
    """BM:BN:BK:WARPS:STAGES[:n] -> qgemm_prefill's launch keywords (n: `natural`)."""
    fields = text.split(":")
    bm, bn, bk, warps, stages = (int(v) for v in fields[:5])
    return {"block_m": bm, "block_n": bn, "block_k": bk, "num_warps": warps,
            "num_stages": stages, "natural": fields[5:] == ["n"]}


@contextmanager
def fused_prompts(launch: dict):
    """QuantLinear's calls of more than TC_BATCH_ROWS rows on `qgemm_prefill` in `launch`."""
    from llm.backends.torch import weight
    from llm.backends.torch.kernels.qgemm_prefill import prefill_kernel_takes, qgemm_prefill

    real = weight.QuantLinear.__call__

    def call(self, x, bias=None):
        if x.is_cuda and x.dim() == 2 and x.shape[0] > weight.TC_BATCH_ROWS and \
                prefill_kernel_takes(x, self.weight):
            return qgemm_prefill(x, self.weight, bias, **launch)
        return real(self, x, bias)

    weight.QuantLinear.__call__ = call
    try:
        yield
    finally:
        weight.QuantLinear.__call__ = real


def torch_dequantize(w: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    """The prompt path before kernels/dequant.py."""
    return w.dequantize(torch.float32).to(dtype)


@torch.inference_mode()
def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--configs", default="8b", help="comma list of: " + ", ".join(SHAPES))
    p.add_argument("--formats", default="q4_0", help="comma list of quantized formats")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--fused", default="",
                   help="comma list of BM:BN:BK:WARPS:STAGES launches of the fused prompt GEMM")
    p.add_argument("--chunk", type=int, default=0,
                   help="prefill in calls of this many tokens, as the engine's scheduler does "
                        "(0: the whole prompt in one call)")
    args = p.parse_args(argv)
    if args.chunk < 0:
        raise SystemExit(f"--chunk: tokens a prefill call (0: the whole prompt), got {args.chunk}")
    device = device_for(args)
    rows = []
    for name in configs_for(args, csv(args.configs)):
        config = SHAPES[name]
        rt = RuntimeConfig(device=str(device), dtype="bfloat16", max_batch=1,
                           max_seq_len=args.tokens + 64, block_size=32)
        prompt = random_prompts(1, args.tokens, config.vocab_size)[0]
        base = allocated(device)
        dense = random_checkpoint(config, device, torch.bfloat16)
        backend = TorchBackend(dense, rt, cuda_graphs=False)
        bf16_ms, _ = ttft(backend, prompt, args.reps, args.chunk)
        rows.append([name, "bf16", fmt(bf16_ms, 2), "1.00", fmt(backend.weight_bytes / 1e9, 2),
                     "-", "-", ""])
        print(rows[-1], flush=True)
        backend.close()
        for fmt_name in csv(args.formats):
            ck = quantized_checkpoint(dense, fmt_name, device)
            file_bytes = gguf_bytes(ck)
            backend = TorchBackend(ck, rt, cuda_graphs=False)
            del ck
            cache = sum(t.numel() * t.element_size() for t in backend.cache.k + backend.cache.v)
            held = allocated(device) - base - cache - sum(  # the dense checkpoint is still held
                t.numel() * t.element_size() for t in dense.tensors.values() if t.dim() == 2)
            ms, logits = ttft(backend, prompt, args.reps, args.chunk)
            gpu = device.type == "cuda"
            rows.append([name, fmt_name, fmt(ms, 2), f"{ms / bf16_ms:.2f}",
                         fmt(backend.weight_bytes / 1e9, 2), fmt(held / 1e9, 2) if gpu else "-",
                         f"{held / file_bytes:.3f}" if gpu else "-",
                         f"chunks of {args.chunk}" if args.chunk else ""])
            for launch in csv(args.fused):
                with fused_prompts(fused_launch(launch)):
                    f_ms, f_logits = ttft(backend, prompt, args.reps, args.chunk)
                err = ((f_logits - logits).norm() / logits.norm()).item()
                rows.append([name, f"{fmt_name} fused {launch}", fmt(f_ms, 2),
                             f"{f_ms / bf16_ms:.2f}", "-", "-", "-", f"logits rel. diff {err:.1e}"])
                print(rows[-1], flush=True)
            if not args.chunk:
                dequant.dequantize_dense, kernel = torch_dequantize, dequant.dequantize_dense
                try:
                    torch_ms, torch_logits = ttft(backend, prompt, args.reps)
                finally:
                    dequant.dequantize_dense = kernel
                same = torch.equal(logits, torch_logits)
                rows[-1][-1] = f"logits equal to torch dequantize {same}"
                rows.append([name, f"{fmt_name} torch dequantize", fmt(torch_ms, 2),
                             f"{torch_ms / bf16_ms:.2f}", "-", "-", "-", ""])
            print(rows[-2:], flush=True)
            backend.close()
        del dense
    print_table(["config", "weights", f"TTFT {args.tokens} ms", "x bf16", "weight GB (model)",
                 "GPU GB held", "held / GGUF bytes", "check"], rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
