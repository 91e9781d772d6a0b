"""`cultengine serve`: an OpenAI-compatible HTTP server with a `/v1/score` endpoint.

`loop.py` runs the engine (one step loop, continuous batching across HTTP requests), `app.py` is the
FastAPI layer, `metrics.py` the Prometheus text. This module only holds the command line, so that
`cultengine --help` imports neither FastAPI nor the engine.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..console import add_threads


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server (+ /v1/score) for a checkpoint",
        description="Serve a checkpoint over an OpenAI-compatible HTTP API: /v1/chat/completions, "
        "/v1/completions, /v1/models, /v1/score (choice log-likelihoods), /health, /metrics.",
    )
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument(
        "--served-model-name",
        default=None,
        help="the name clients send as 'model' (default: the checkpoint directory's name)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument(
        "--api-key",
        default=os.environ.get("CULTENGINE_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $CULTENGINE_API_KEY, else none)",
    )
    p.add_argument(
        "--allowed-local-media-path",
        type=Path,
        default=None,
        help="directory whose files may be named by file:// image URLs (default: none)",
    )
    p.add_argument("--max-request-bytes", type=int, default=32 << 20, help="largest request body (default 32 MiB)")
    p.add_argument("--max-images-per-request", type=int, default=8, help="more images in one request are refused")
    g = p.add_argument_group("engine")
    g.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    g.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    g.add_argument("--backend", default=None, help="torch | triton | flash (default: triton on CUDA, torch on CPU)")
    g.add_argument("--max-num-seqs", type=int, default=256, help="sequences the engine runs at once")
    g.add_argument("--max-num-batched-tokens", type=int, default=8192, help="tokens per engine step")
    g.add_argument("--max-model-len", type=int, default=None, help="longest sequence (default: the model's context)")
    g.add_argument("--kv-cache-memory", type=int, default=None, help="bytes of KV cache (default: sized by the engine)")
    g.add_argument("--no-prefix-caching", action="store_true", help="recompute shared prompt prefixes")
    add_threads(g)
    g.add_argument("--no-cuda-graphs", action="store_true", help="run decode steps eagerly (CUDA)")
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        print("cultengine serve needs FastAPI and uvicorn: pip install 'cultengine[serve]'", file=sys.stderr)
        return 2
    import torch

    from ..engine import Engine
    from .app import ServeConfig, build_app
    from .loop import EngineLoop

    media = args.allowed_local_media_path
    if media is not None and not media.is_dir():
        print(f"--allowed-local-media-path {media}: not a directory", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    engine = Engine(
        args.model,
        device=device,
        dtype=args.dtype,
        attention_backend=args.backend,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        kv_cache_memory=args.kv_cache_memory,
        enable_prefix_caching=not args.no_prefix_caching,
        cuda_graphs=not args.no_cuda_graphs,
        threads=args.threads,
    )
    config = ServeConfig(
        model_name=args.served_model_name or Path(args.model).resolve().name,
        api_key=args.api_key,
        allowed_local_media_path=media.resolve() if media else None,
        max_request_bytes=args.max_request_bytes,
        max_images_per_request=args.max_images_per_request,
    )
    if not config.api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach it can use it", file=sys.stderr)
    loop = EngineLoop(engine)
    try:
        print(f"cultengine serve: model {config.model_name!r} on http://{args.host}:{args.port}/v1", flush=True)
        uvicorn.run(
            build_app(loop, config), host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5
        )
    finally:
        loop.close()
    return 0
