"""`python -m llm.serve`: load a model and serve it over HTTP (OpenAI-compatible API).

    python -m llm.serve --model path/to/model --port 8000 --max-batch 16 --max-queue 64
    LLM_API_KEY=secret python -m llm.serve          # require "Authorization: Bearer secret"
    torchrun --nproc-per-node 2 -m llm.serve --tp 2 --device cuda   # tensor parallel: rank 0 serves
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from llm.model.checkpoint.common import WEIGHT_MODES

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# The engine thread makes many short GIL-releasing backend calls while the event-loop thread
# serves HTTP; a shorter switch interval (default 5 ms) lets the engine thread get the GIL back
# sooner after each call (measured on 2 CPU cores: 64 concurrent requests 56 s -> 46 s).
GIL_SWITCH_INTERVAL_S = 0.0005



# Idle keep-alive connections are closed after this long. Longer than the 5 s that HTTP clients
# (httpx, hence the openai package) keep idle connections, so a client never reuses a connection
# the server is closing at that moment (uvicorn's own default is also 5 s: a request sent on such
# a connection fails with a read error; seen in tests/serve/test_concurrency.py).
KEEP_ALIVE_S = 65

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m llm.serve", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None,
                   help="HF directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--served-model-name", default=None,
                   help="the id clients send as 'model' (default: the model's file/dir name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--backend", default="torch")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--tt-device", default=None, choices=["auto", "ttnn", "emulator"],
                   help="tt backend: auto (default) = real ttnn on a usable device, else the "
                        "emulator; ttnn = real or an error; emulator = always emulated")
    p.add_argument("--weights", default="auto", choices=["auto", *WEIGHT_MODES],
                   help="how the weights are held, as `LLM(weights=)` (README): auto, dequantize, "
                        "stored (a GGUF's blocks), int8 / int4 / int4_mix (an HF model quantized "
                        "at load; int4_mix: v_proj and down_proj in int8)")
    p.add_argument("--int4-group", type=int, default=None, metavar="G",
                   help="with --weights int4 / int4_mix: columns a group (a multiple of 32 "
                        "dividing every matrix's in_features; default 128, or 64 / 32 where 128 "
                        "does not divide it; 32 loses the least)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch on the CPU: intra-op threads (default: the cores other processes "
                        "leave free, per call); fixed N makes outputs bit-identical run to run")
    p.add_argument("--max-batch", type=int, default=8, help="decode slots")
    p.add_argument("--max-seq-len", type=int, default=None, help="prompt + completion limit")
    p.add_argument("--num-blocks", type=int, default=None, help="KV pages in the pool")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests allowed to wait beyond the active ones (then 429)")
    p.add_argument("--prefill-chunk", type=int, default=256,
                   help="prompt tokens prefilled per scheduler step")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="turn off automatic prefix caching (reuse of the KV pages of prompt "
                        "prefixes earlier requests computed; outputs are identical either way)")
    p.add_argument("--api-key", default=os.environ.get("LLM_API_KEY"),
                   help="require this Bearer token (default: $LLM_API_KEY; none = open)")
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel ranks (start with `torchrun --nproc-per-node N -m "
                        "llm.serve --tp N`); rank 0 serves HTTP, the others follow")
    p.add_argument("--body-timeout", type=float, default=30.0, metavar="S",
                   help="seconds a client may take to send a request body (then 408)")
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    if not args.body_timeout > 0:
        p.error(f"--body-timeout must be > 0 seconds, got {args.body_timeout}")
    return args


def served_name(args: argparse.Namespace) -> str:
    if args.served_model_name:
        return args.served_model_name
    return DEFAULT_MODEL_NAME if args.model is None else Path(args.model).stem


def backend_options(args: argparse.Namespace) -> dict[str, str | int]:
    """The backend's own options from the command line (--tt-device for the tt backend,
    --threads for torch)."""
    options: dict[str, str | int] = {}
    if args.tt_device is not None:
        if args.backend != "tt":
            raise ValueError("--tt-device applies to --backend tt only")
        options["implementation"] = args.tt_device
    if args.threads is not None:
        if args.backend != "torch":
            raise ValueError("--threads applies to --backend torch only")
        options["threads"] = args.threads
    return options


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import uvicorn

    import llm
    from llm.engine.async_engine import AsyncEngine
    from llm.engine.scheduler import SchedulerConfig
    from llm.serve.app import ServerConfig, create_app

    try:
        sched = SchedulerConfig(max_active=args.max_batch, max_queue=args.max_queue,
                                prefill_chunk=args.prefill_chunk,
                                prefix_cache=not args.no_prefix_cache)
        model = llm.LLM(args.model, backend=args.backend, device=args.device, dtype=args.dtype,
                        max_batch=args.max_batch, max_seq_len=args.max_seq_len,
                        num_blocks=args.num_blocks, tensor_parallel=args.tp,
                        progress=args.tp == 1, backend_options=backend_options(args),
                        weights=args.weights, int4_group=args.int4_group)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not model.is_leader:
        try:
            model.follow()  # until the leader's server stops
        except KeyboardInterrupt:  # Ctrl-C reaches every rank of the process group
            return 130
        return 0
    wb = model.backend.weight_bytes  # what the weights hold on the device, as loaded
    share = " a rank" if args.tp > 1 else ""  # each rank holds its slices
    print(model.backend.describe() + (f"; weights {wb / 1e6:.0f} MB{share}" if wb is not None
                                      else ""), file=sys.stderr)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    engine = AsyncEngine(model, sched)
    app = create_app(engine, ServerConfig(model_name=served_name(args), api_key=args.api_key,
                                          body_timeout_s=args.body_timeout))
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again: this handler turns
    # that into an exception, so that the engine and the followers are released below
    signal.signal(signal.SIGTERM, _terminated)
    code = 0
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                    timeout_keep_alive=KEEP_ALIVE_S)
    except Terminated:  # a requested, graceful stop: status 0
        pass
    except KeyboardInterrupt:
        code = 130
    finally:
        engine.shutdown()
        try:
            model.close()  # releases tensor-parallel followers
        except RuntimeError as e:  # a follower already gone (Ctrl-C reached it first)
            print(f"closing the tensor-parallel group: {e}".splitlines()[0], file=sys.stderr)
    return code


class Terminated(Exception):
    """SIGTERM arrived (see `main`)."""


def _terminated(signum: int, frame: object) -> None:
    raise Terminated


if __name__ == "__main__":
    sys.exit(main())
