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

from ..console import add_tensor_parallel, add_threads


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
    p.add_argument(
        "--max-image-pixels-per-request",
        type=int,
        default=128_000_000,
        help="most decoded pixels of one request's images together (from their headers, before decoding)",
    )
    p.add_argument("--max-n", type=int, default=128, help="largest n (samples per prompt) of one request")
    p.add_argument(
        "--max-choices",
        type=int,
        default=256,
        help="most choices in one response: n x prompts of a completion, or the choices of /v1/score",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="largest max_tokens of a request (default: up to the context's end)",
    )
    p.add_argument(
        "--max-prompt-chars", type=int, default=1 << 20, help="most characters of prompt text in one request"
    )
    p.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=None,
        help="most prompt tokens of one request, images expanded (default: the context)",
    )
    p.add_argument(
        "--max-image-memory",
        type=int,
        default=8 << 30,
        help="bytes of image data all requests in flight may hold together (decoded and processed); a request "
        "that does not fit gets 503 (default 8 GiB)",
    )
    g = p.add_argument_group("engine")
    g.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    g.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    g.add_argument("--backend", default=None, help="torch | triton | flash (default: triton on CUDA, torch on CPU)")
    g.add_argument("--max-num-seqs", type=int, default=256, help="sequences the engine runs at once")
    g.add_argument("--max-num-batched-tokens", type=int, default=8192, help="tokens per engine step")
    g.add_argument("--max-model-len", type=int, default=None, help="longest sequence (default: the model's context)")
    g.add_argument("--kv-cache-memory", type=int, default=None, help="bytes of KV cache (default: sized by the engine)")
    g.add_argument("--no-prefix-caching", action="store_true", help="recompute shared prompt prefixes")
    g.add_argument(
        "--image-backend",
        choices=("pil", "torchvision"),
        default=None,
        help="the image processors' path (default: what transformers would pick here)",
    )
    g.add_argument(
        "--chat-template", default=None, help="which of the checkpoint's named chat templates (default: its default)"
    )
    g.add_argument(
        "--generation-config",
        choices=("auto", "none"),
        default="auto",
        help="auto: generation_config.json's temperature/top_p/top_k are the defaults of requests that leave "
        "them unset; none: ignore them",
    )
    add_threads(g)
    add_tensor_parallel(g)
    g.add_argument("--no-cuda-graphs", action="store_true", help="run decode steps eagerly (CUDA)")
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    media = args.allowed_local_media_path
    if media is not None and not media.is_dir():
        print(f"--allowed-local-media-path {media}: not a directory", file=sys.stderr)
        return 2
    limits = ("max_request_bytes", "max_image_pixels_per_request", "max_n", "max_choices", "max_tokens")
    for name in (*limits, "max_prompt_chars", "max_prompt_tokens", "max_image_memory"):
        value = getattr(args, name)
        if value is not None and value < 1:
            print(f"--{name.replace('_', '-')} must be >= 1, got {value}", file=sys.stderr)
            return 2
    if args.max_images_per_request < 0:
        print(f"--max-images-per-request must be >= 0, got {args.max_images_per_request}", file=sys.stderr)
        return 2
    try:
        import uvicorn
    except ImportError:
        print("cultengine serve needs FastAPI and uvicorn: pip install 'cultengine[serve]'", file=sys.stderr)
        return 2
    import torch

    from ..engine import Engine
    from .app import ServeConfig, build_app
    from .loop import EngineLoop

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
        tensor_parallel_size=args.tensor_parallel_size,
        image_backend=args.image_backend,
        chat_template=args.chat_template,
        generation_config=args.generation_config,
    )
    config = ServeConfig(
        model_name=args.served_model_name or Path(args.model).resolve().name,
        api_key=args.api_key,
        allowed_local_media_path=media.resolve() if media else None,
        max_request_bytes=args.max_request_bytes,
        max_images_per_request=args.max_images_per_request,
        max_image_pixels_per_request=args.max_image_pixels_per_request,
        max_n=args.max_n,
        max_choices=args.max_choices,
        max_tokens=args.max_tokens,
        max_prompt_chars=args.max_prompt_chars,
        max_prompt_tokens=args.max_prompt_tokens,
    )
    if not config.api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach it can use it", file=sys.stderr)
    loop = EngineLoop(engine, max_image_memory=args.max_image_memory)
    try:
        print(f"cultengine serve: model {config.model_name!r} on http://{args.host}:{args.port}/v1", flush=True)
        uvicorn.run(
            build_app(loop, config), host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5
        )
    finally:
        loop.close()
    return 0
