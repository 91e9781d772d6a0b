"""The OpenAI-compatible HTTP layer of `cultengine serve` (FastAPI), on top of an `EngineLoop`.

Endpoints: `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions`, `POST /v1/score`
(per-choice log-likelihoods), `GET /health`, `GET /metrics` (Prometheus text).

`stream=true` sends the role chunk at once, then each choice's text as the engine's steps release it (the
scheduler's incremental detokenizer holds back what may begin a stop string), then the finish reason and
`[DONE]`; a choice's log-probabilities come with its last chunk. `logprobs` carry the sampled token's
log-probability and the `top_logprobs` (chat) / `logprobs` (completions) most likely tokens at each
position (at most 20).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import queue
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from functools import partial
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import RequestError
from ..outputs import Sample
from . import metrics
from .loop import Admitted, EngineLoop, ServerBusy
from .requests import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    ScoreRequest,
    ServeConfig,
    check_image_pixels,
    check_limits,
    load_image_url,
    sampling_params,
    text_chars,
    to_engine_messages,
)


def _token(text: str, logprob: float) -> dict:
    # `bytes` is null for a token that is only part of a UTF-8 character (alone it decodes to U+FFFD).
    return {"token": text, "logprob": logprob, "bytes": None if "\ufffd" in text else list(text.encode())}


def _alternatives(sample: Sample, k: int, token_texts) -> list[list[tuple[str, float]]]:
    """Each position's k most likely tokens as (text, log-prob), most likely first."""
    out = []
    for top in sample.top_logprobs or [{} for _ in sample.token_ids]:
        best = sorted(top.items(), key=lambda kv: -kv[1])[:k]
        out.append(list(zip(token_texts([t for t, _ in best]), [lp for _, lp in best], strict=True)))
    return out


def chat_logprobs(texts: list[str], sample: Sample, k: int, token_texts) -> dict:
    """OpenAI's chat `logprobs` (`texts`: each token's text), with `k` alternatives per token."""
    alts = _alternatives(sample, k, token_texts)
    content = [
        {**_token(t, lp), "top_logprobs": [_token(a, alp) for a, alp in alt]}
        for t, lp, alt in zip(texts, sample.logprobs, alts, strict=True)
    ]
    return {"content": content}


def completion_logprobs(texts: list[str], sample: Sample, k: int, token_texts) -> dict:
    offsets, pos = [], 0
    for t in texts:
        offsets.append(pos)
        pos += len(t)
    top = [dict(alt) for alt in _alternatives(sample, k, token_texts)] if k else None
    return {"tokens": texts, "token_logprobs": sample.logprobs, "top_logprobs": top, "text_offset": offsets}


def _usage(prompt_tokens: int, samples: list[Sample]) -> dict:
    completion = sum(len(s.token_ids) for s in samples)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


# ---------------------------------------------------------------------------------------------
# The application
# ---------------------------------------------------------------------------------------------
class _Guard:
    """ASGI middleware (plain ASGI: it must not wrap streaming responses in a task group): the bearer
    token on /v1/* and the API schema (401), bodies over `max_bytes` (413), and a count of responses by
    route and status (`label` maps a path to its route, so a client sending random paths adds no labels)."""

    def __init__(self, app, config: ServeConfig, counts: Counter, label: Callable[[str], str]):
        self.app, self.max_bytes, self.counts, self.label = app, config.max_request_bytes, counts, label
        self.expected = f"Bearer {config.api_key}".encode() if config.api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, headers = self.label(scope["path"]), dict(scope["headers"])
        if self.expected and (path.startswith("/v1/") or path == "/openapi.json"):
            if not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
                error = APIError(
                    401,
                    "missing or wrong API key (send 'Authorization: Bearer <key>')",
                    type_="authentication_error",
                    code="invalid_api_key",
                )
                return await self._reply(path, error, send)
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large(path, send)
        received = 0
        refused = False  # the 413 went out: the app reads a disconnect and its replies are dropped

        async def limited_receive():
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes and not refused:
                    refused = True
                    await self._too_large(path, send)
                if refused:
                    return {"type": "http.disconnect"}
            return message

        async def counting_send(message):
            if refused:
                return
            if message["type"] == "http.response.start":
                self.counts[(path, message["status"])] += 1
            await send(message)

        await self.app(scope, limited_receive, counting_send)

    async def _too_large(self, path, send):
        await self._reply(
            path, APIError(413, f"request body larger than {self.max_bytes} bytes (--max-request-bytes)"), send
        )

    async def _reply(self, path, error: APIError, send):
        self.counts[(path, error.status)] += 1
        await error.response()({"type": "http"}, None, send)


def _route_of(app: FastAPI, path: str) -> str:
    """The route `path` matches, as declared (`/v1/models/{name:path}`); "other" for none."""
    for route in app.routes:
        regex = getattr(route, "path_regex", None)
        if regex is not None and regex.match(path):
            return route.path
    return "other"


def build_app(loop: EngineLoop, config: ServeConfig) -> FastAPI:
    """The FastAPI application serving `loop`'s engine under `config`."""
    app = FastAPI(title="cultengine", docs_url=None, redoc_url=None)
    http_counts: Counter = Counter()
    app.add_middleware(_Guard, config=config, counts=http_counts, label=lambda path: _route_of(app, path))

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        # FastAPI's own refusals (no such route, wrong method, a body it cannot parse: invalid UTF-8, JSON
        # nested past the parser's depth, a number of thousands of digits) in the OpenAI shape, not {"detail"}.
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404:
            detail = f"no such endpoint: {request.method} {request.url.path[:200]}"
        return APIError(exc.status_code, detail, code=None if exc.status_code < 500 else "server_error").response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):  # a bug: still a JSON body, never plain text
        return APIError(500, f"{type(exc).__name__}: {exc}"[:2000], type_="server_error").response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return APIError(400, f"{loc or 'body'}: {first.get('msg', 'invalid request')}", param=loc or None).response()

    limits = {"max_tokens_limit": config.max_tokens, "max_prompt_tokens": config.max_prompt_tokens}

    def check_model(name: str) -> None:
        if name != config.model_name:
            raise APIError(
                404,
                f"model {name!r} does not exist; this server serves {config.model_name!r}",
                param="model",
                code="model_not_found",
            )

    async def admit(*submits: Callable[[], Future]) -> list[Admitted]:
        """Prepare requests (in worker threads: images are decoded there) and queue them all before
        waiting, so they join the same step; if one is refused, the others are aborted."""
        futures, error = [], None
        for submit in submits:
            try:
                futures.append(await run_in_threadpool(submit))
            except (RequestError, APIError) as e:
                error = e
                break
            except ServerBusy as e:
                error = APIError(503, str(e), type_="server_error", code="overloaded", headers={"Retry-After": "1"})
                break
        admitted = []
        for future in futures:
            try:
                admitted.append(await asyncio.wrap_future(future))
            except RequestError as e:
                error = error or e
            except Exception as e:  # an engine failure, not the request's fault
                error = error or APIError(500, f"{type(e).__name__}: {e}", type_="server_error")
        if error is not None:
            for a in admitted:
                loop.abort(a.request_id)
            raise error if isinstance(error, APIError) else APIError(400, str(error))
        return admitted

    async def results(request: Request, admitted: list[Admitted]) -> list:
        """Every result of the admitted requests, in order; a client that goes away aborts them all."""
        everything = asyncio.gather(*(asyncio.wrap_future(f) for a in admitted for f in a.results))
        try:
            while not (await asyncio.wait({everything}, timeout=0.25))[0]:
                if await request.is_disconnected():
                    raise APIError(499, "the client closed the request", code="client_closed_request")
        except BaseException:  # gone, or this task was cancelled (a stream's connection closed)
            everything.cancel()
            for a in admitted:
                loop.abort(a.request_id)
            raise
        try:
            return everything.result()
        except RuntimeError as e:  # the engine step failed (the server goes on)
            raise APIError(500, str(e), type_="server_error") from e

    async def streamed(request: Request, admitted: list[Admitted]):
        """Yields ("text", request index, sample index, text) as the admitted requests' samples grow, then
        ("done", samples) once all are finished; a client that goes away aborts them all."""
        everything = asyncio.gather(*(asyncio.wrap_future(f) for a in admitted for f in a.results))
        checked = time.monotonic()

        def drained():
            for i, a in enumerate(admitted):
                while True:
                    try:
                        k, text = a.stream.get_nowait()
                    except queue.Empty:
                        break
                    yield "text", i, k, text

        try:
            while True:
                for item in drained():
                    yield item
                if everything.done():
                    break
                await asyncio.wait({everything}, timeout=0.02)
                if time.monotonic() - checked > 0.25:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        raise APIError(499, "the client closed the request", code="client_closed_request")
        except BaseException:  # gone, or this task was cancelled (the connection closed)
            everything.cancel()
            for a in admitted:
                loop.abort(a.request_id)
            raise
        try:
            samples = everything.result()
        except RuntimeError as e:  # the engine step failed (the server goes on)
            raise APIError(500, str(e), type_="server_error") from e
        for item in drained():
            yield item
        yield "done", samples

    @app.get("/health")
    async def health():
        if not loop.alive:
            return JSONResponse({"status": "the engine loop has stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics_endpoint():
        histograms = {
            "cultengine_time_to_first_token_seconds": (loop.ttft, "Request arrival to its first generated token."),
            "cultengine_time_per_output_token_seconds": (loop.tpot, "Time per generated token after the first."),
        }
        return PlainTextResponse(
            metrics.render(loop.stats(), dict(http_counts), histograms), media_type="text/plain; version=0.0.4"
        )

    model_card = {
        "id": config.model_name,
        "object": "model",
        "created": int(time.time()),
        "owned_by": "cultengine",
        "max_model_len": loop.max_model_len,
    }

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        check_model(name)
        return model_card

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        k = body.top_logprobs or 0
        max_tokens = body.max_tokens if body.max_completion_tokens is None else body.max_completion_tokens
        check_limits(config, n=body.n, max_tokens=max_tokens, prompt_chars=text_chars(body.messages))
        params = sampling_params(body, max_tokens, k if body.logprobs else None, loop.engine.sampling_defaults)

        def submit():
            messages, pixels = to_engine_messages(body.messages, config)
            return loop.generate(
                {"messages": messages}, params, max_tokens, stream=bool(body.stream), image_pixels=pixels, **limits
            )

        (admitted,) = await admit(submit)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "created": now, "model": config.model_name}

        def choice(i: int, s: Sample) -> dict:
            lp = chat_logprobs(loop.token_texts(s.token_ids), s, k, loop.token_texts) if body.logprobs else None
            return {
                "index": i,
                "message": {"role": "assistant", "content": s.text},
                "logprobs": lp,
                "finish_reason": s.finish_reason,
            }

        if not body.stream:
            samples = await results(request, [admitted])
            return {
                **head,
                "object": "chat.completion",
                "choices": [choice(k, s) for k, s in enumerate(samples)],
                "usage": _usage(admitted.prompt_tokens, samples),
            }

        async def events():
            chunk = {**head, "object": "chat.completion.chunk"}
            yield _sse(
                {
                    **chunk,
                    "choices": [
                        {
                            "index": k,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                        for k in range(params.n)
                    ],
                }
            )
            sent = [""] * params.n

            def delta(i: int, text: str, lp=None) -> str:
                sent[i] += text
                return _sse(
                    {
                        **chunk,
                        "choices": [{"index": i, "delta": {"content": text}, "logprobs": lp, "finish_reason": None}],
                    }
                )

            try:
                async for item in streamed(request, [admitted]):
                    if item[0] == "text":
                        yield delta(item[2], item[3])
                    else:
                        samples = item[1]
            except APIError as e:
                yield _sse(e.body())
                return
            for i, s in enumerate(samples):
                # What the steps held back (a possible stop string's start), and the log-probs, at the end.
                lp = chat_logprobs(loop.token_texts(s.token_ids), s, k, loop.token_texts) if body.logprobs else None
                if s.text[len(sent[i]) :] or lp:
                    yield delta(i, s.text[len(sent[i]) :], lp)
                yield _sse(
                    {
                        **chunk,
                        "choices": [{"index": i, "delta": {}, "logprobs": None, "finish_reason": s.finish_reason}],
                    }
                )
            if (body.stream_options or {}).get("include_usage"):
                yield _sse({**chunk, "choices": [], "usage": _usage(admitted.prompt_tokens, samples)})
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        if body.echo:
            raise APIError(400, "echo is not supported", param="echo")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise APIError(400, "prompt must be a string or a non-empty list of strings", param="prompt")
        if not all(isinstance(p, str) for p in prompts):
            raise APIError(400, "prompt must be a string or a list of strings", param="prompt")
        check_limits(
            config,
            n=body.n,
            prompts=len(prompts),
            max_tokens=body.max_tokens,
            prompt_chars=sum(map(len, prompts)),
            param="prompt",
        )
        params = sampling_params(body, body.max_tokens, body.logprobs, loop.engine.sampling_defaults)
        submits = (
            partial(loop.generate, {"prompt": p}, params, body.max_tokens, stream=bool(body.stream), **limits)
            for p in prompts
        )
        admitted = await admit(*submits)
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "created": now, "model": config.model_name}
        want_lp = body.logprobs is not None
        prompt_tokens = sum(a.prompt_tokens for a in admitted)

        def choice(k: int, s: Sample) -> dict:
            return {
                "index": k,
                "text": s.text,
                "logprobs": completion_logprobs(loop.token_texts(s.token_ids), s, body.logprobs or 0, loop.token_texts)
                if want_lp
                else None,
                "finish_reason": s.finish_reason,
            }

        if not body.stream:
            samples = await results(request, admitted)
            return {
                **head,
                "object": "text_completion",
                "choices": [choice(k, s) for k, s in enumerate(samples)],
                "usage": _usage(prompt_tokens, samples),
            }

        async def events():
            sent: dict[int, str] = {}

            def piece(index: int, text: str, finish_reason=None, logprobs=None) -> str:
                sent[index] = sent.get(index, "") + text
                return _sse(
                    {
                        **head,
                        "object": "text_completion",
                        "choices": [
                            {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
                        ],
                    }
                )

            try:
                async for item in streamed(request, admitted):
                    if item[0] == "text":
                        yield piece(item[1] * params.n + item[2], item[3])
                    else:
                        samples = item[1]
            except APIError as e:
                yield _sse(e.body())
                return
            for index, s in enumerate(samples):
                full = choice(index, s)
                yield piece(index, s.text[len(sent.get(index, "")) :], s.finish_reason, full["logprobs"])
            if (body.stream_options or {}).get("include_usage"):
                yield _sse(
                    {**head, "object": "text_completion", "choices": [], "usage": _usage(prompt_tokens, samples)}
                )
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/score")
    async def score(body: ScoreRequest, request: Request):
        check_model(body.model)
        if (body.messages is None) == (body.prompt is None):
            raise APIError(400, "a score request needs exactly one of 'messages' or 'prompt'")
        if body.messages is not None and body.images:
            raise APIError(
                400, "'images' goes with 'prompt'; put images into 'messages' as image_url parts", param="images"
            )
        chars = len(body.prompt or "") + text_chars(body.messages or []) + sum(map(len, body.choices))
        check_limits(
            config, choices=len(body.choices), prompt_chars=chars, param="messages" if body.messages else "prompt"
        )
        if len(body.images or []) > config.max_images_per_request:
            raise APIError(
                400,
                f"more than {config.max_images_per_request} images in one request (--max-images-per-request)",
                param="images",
            )

        def submit():
            if body.messages is not None:
                messages, pixels = to_engine_messages(body.messages, config)
                req: dict[str, Any] = {"messages": messages}
            else:
                images = [load_image_url(u, config) for u in body.images or []]
                pixels = check_image_pixels(images, config, "images")
                req = {"prompt": body.prompt, "images": images}
            return loop.score(
                {**req, "choices": body.choices}, max_prompt_tokens=config.max_prompt_tokens, image_pixels=pixels
            )

        (admitted,) = await admit(submit)
        scores = await results(request, [admitted])
        best = max(range(len(scores)), key=lambda j: scores[j].logprob)
        return {
            "id": f"score-{uuid.uuid4().hex}",
            "object": "score",
            "created": int(time.time()),
            "model": config.model_name,
            "best": best,
            "choices": [
                {
                    "index": j,
                    "text": c.text,
                    "logprob": c.logprob,
                    "num_tokens": c.num_tokens,
                    "is_greedy": c.is_greedy,
                    "token_logprobs": c.token_logprobs,
                }
                for j, c in enumerate(scores)
            ],
            "usage": {"prompt_tokens": admitted.prompt_tokens, "choice_tokens": sum(c.num_tokens for c in scores)},
        }

    return app


class BackgroundServer:
    """Serve `app` with uvicorn on a thread (tests, benchmarks): `with BackgroundServer(app) as url: ...`.

    `port=0` takes a free port; `url` is `http://host:port`.
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        self.server = uvicorn.Server(
            uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
        )
        self._thread = threading.Thread(target=self.server.run, name="cultengine-http", daemon=True)
        self.host = host
        self.url = ""

    def __enter__(self) -> str:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{self.host}:{port}"
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)
