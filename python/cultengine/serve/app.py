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
import base64
import binascii
import hmac
import io
import json
import queue
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import RequestError
from ..outputs import Sample
from ..paths import OutsideFolder, confined
from ..sampling import SamplingParams
from . import metrics
from .loop import Admitted, EngineLoop, ServerBusy


@dataclass(frozen=True)
class ServeConfig:
    """What the HTTP layer enforces: the served name, auth, media access and request limits."""

    model_name: str
    api_key: str | None = None
    allowed_local_media_path: Path | None = None  # resolved directory; None = no local files
    max_request_bytes: int = 32 << 20
    max_images_per_request: int = 8
    # decoded pixels of one request's images, summed (read from their headers before decoding): 8 photos of
    # 16 MP; each image alone is also held to cultengine.image.MAX_IMAGE_PIXELS
    max_image_pixels_per_request: int = 128_000_000
    max_n: int = 128  # samples per prompt (OpenAI's limit)
    max_choices: int = 256  # choices in one response: n x prompts (completions), or /v1/score's choices
    max_tokens: int | None = None  # largest max_tokens; None: up to the end of the context
    max_prompt_chars: int = 1 << 20  # characters of prompt text in one request (before tokenizing)
    max_prompt_tokens: int | None = None  # prompt tokens of one request, images expanded; None: the context

    def __post_init__(self):
        for name in (
            "max_request_bytes",
            "max_images_per_request",
            "max_image_pixels_per_request",
            "max_n",
            "max_choices",
            "max_prompt_chars",
        ):
            _positive(name, getattr(self, name), allow_zero=name == "max_images_per_request")
        for name in ("max_tokens", "max_prompt_tokens"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))


def _positive(name: str, value, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        raise ValueError(f"ServeConfig.{name} must be an integer >= {0 if allow_zero else 1}, got {value!r}")


class APIError(Exception):
    """An OpenAI-style error response."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# ---------------------------------------------------------------------------------------------
# Request bodies. Unknown fields are accepted and ignored, as OpenAI clients send many.
# ---------------------------------------------------------------------------------------------
class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = None
    temperature: float | None = None  # None = 1.0, the OpenAI default
    top_p: float | None = None
    top_k: int | None = None  # extension (vLLM's), -1 = off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float | None = None  # extension (vLLM's); None = the checkpoint's default, else off
    seed: int | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # extension
    ignore_eos: bool = False  # extension
    skip_special_tokens: bool = True  # extension
    stream: bool = False
    stream_options: dict | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[dict]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    logprobs: int | None = None  # alternatives per token (0..20)
    echo: bool = False


class ScoreRequest(BaseModel):
    """`messages` (chat-templated, with the generation prompt) or `prompt` (+ `images`: URLs as in
    `image_url`) is the context; each of `choices` is scored as its continuation."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[dict] | None = None
    prompt: str | None = None
    images: list[str] | None = None
    choices: list[str]


# ---------------------------------------------------------------------------------------------
# Media and messages
# ---------------------------------------------------------------------------------------------
_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,(?P<data>.*)", re.S)


def load_image_url(url: str, config: ServeConfig) -> bytes:
    """The bytes behind an `image_url`: a base64 `data:` URL, or a `file://` URL (or plain path) inside
    `--allowed-local-media-path`. The engine never fetches anything, so http(s) URLs are refused."""
    if not isinstance(url, str) or not url:
        raise APIError(400, "an image URL must be a non-empty string", param="image_url")
    if url.startswith("data:"):
        m = _DATA_URL.fullmatch(url)
        if m is None:
            raise APIError(400, "malformed data URL: expected data:image/<type>;base64,<data>", param="image_url")
        if m["mime"] and not m["mime"].startswith("image/"):
            raise APIError(400, f"data URL of type {m['mime']!r} is not an image", param="image_url")
        try:
            return base64.b64decode(m["data"], validate=True)
        except (binascii.Error, ValueError) as e:
            raise APIError(400, f"malformed data URL: invalid base64 ({e})", param="image_url") from e
    if re.match(r"https?://", url, re.I):
        raise APIError(
            400,
            "remote image URLs are not fetched by this server: send the image as a base64 "
            "data: URL (or a file:// URL under --allowed-local-media-path)",
            param="image_url",
        )
    if re.match(r"[a-z][a-z0-9+.-]*://", url, re.I) and not url.lower().startswith("file://"):
        raise APIError(400, f"unsupported image URL scheme in {url[:40]!r}", param="image_url")
    return _read_local(url[len("file://") :] if url.lower().startswith("file://") else url, config)


def _read_local(path: str, config: ServeConfig) -> bytes:
    root = config.allowed_local_media_path
    if root is None:
        raise APIError(
            400,
            "local image files are disabled; start the server with --allowed-local-media-path "
            "DIR or send a base64 data: URL",
            param="image_url",
        )
    try:  # an absolute path is fine where it resolves inside; a NUL byte, long name or loop is a 400, not a 500
        resolved = confined(root, path, allow_absolute=True)
        regular = resolved.is_file()  # False for a FIFO or device: their read would block
    except OutsideFolder:
        raise APIError(
            403, f"{path!r} is outside the allowed local media path", type_="permission_error", param="image_url"
        ) from None
    except (OSError, ValueError) as e:
        raise APIError(400, f"local image path cannot be read: {e}", param="image_url") from None
    if not regular:
        raise APIError(
            400, f"local image {path!r} is not a regular file under the allowed media path", param="image_url"
        )
    return resolved.read_bytes()


def check_image_pixels(images: list[bytes], config: ServeConfig, param: str) -> int:
    """The pixels of `images` together, refused (400) past the per-request limit; sizes come from the
    headers, so nothing is decoded (an undecodable image is the engine's error to report)."""
    total = 0
    for data in images:
        try:
            with Image.open(io.BytesIO(data)) as img:
                total += img.size[0] * img.size[1]
        except Exception:  # noqa: BLE001 - not an image: the engine names it
            continue
        if total > config.max_image_pixels_per_request:
            raise APIError(
                400,
                f"the request's images hold over {config.max_image_pixels_per_request:,} pixels together "
                "(--max-image-pixels-per-request)",
                param=param,
            )
    return total


def to_engine_messages(messages: list[dict], config: ServeConfig) -> tuple[list[dict], int]:
    """OpenAI chat messages -> the engine's (text parts and images as bytes) and their images' pixels;
    checks the image limits."""
    out, images = [], 0
    loaded: list[bytes] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a 'role'", param="messages")
        content = msg.get("content")
        if content is None or isinstance(content, str):
            out.append({"role": msg["role"], "content": content})
            continue
        if not isinstance(content, list):
            raise APIError(400, f"messages[{i}].content must be a string or a list of parts", param="messages")
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                spec = part.get("image_url")
                url = spec.get("url") if isinstance(spec, dict) else spec
                images += 1
                if images > config.max_images_per_request:
                    raise APIError(
                        400,
                        f"more than {config.max_images_per_request} images in one request (--max-images-per-request)",
                        param="messages",
                    )
                loaded.append(load_image_url(url, config))
                parts.append({"type": "image", "image": loaded[-1]})
            else:
                raise APIError(
                    400,
                    f"messages[{i}]: unsupported content part {str(part)[:80]!r} (text and "
                    "image_url parts are supported)",
                    param="messages",
                )
        out.append({"role": msg["role"], "content": parts})
    return out, check_image_pixels(loaded, config, "messages")


# ---------------------------------------------------------------------------------------------
# Sampling parameters and responses
# ---------------------------------------------------------------------------------------------
# OpenAI (and vLLM) fields the engine does not implement, with the values that mean "off": any other
# value is refused rather than silently ignored, since ignoring it would change the output.
_UNSUPPORTED = {
    "min_p": (0,),
    "logit_bias": ({},),
    "best_of": (1,),
    "use_beam_search": (False,),
    "suffix": ("",),
    "tools": ([],),
    "functions": ([],),
    "response_format": ({"type": "text"},),
}


def _text_chars(messages: list) -> int:
    """Characters of the text in chat messages (string contents and text parts)."""
    total = 0
    for msg in messages:
        content = msg.get("content") if isinstance(msg, dict) else None
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(p["text"]) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return total


def check_limits(
    config: ServeConfig,
    *,
    n: int | None = None,
    prompts: int = 1,
    choices: int | None = None,
    max_tokens: int | None = None,
    prompt_chars: int = 0,
    param: str = "messages",
) -> None:
    """The per-request limits of `config` (400 naming the field and the server option)."""
    if n is not None and n > config.max_n:
        raise APIError(400, f"n must be at most {config.max_n} on this server (--max-n), got {n}", param="n")
    total = choices if choices is not None else (1 if n is None else n) * prompts
    if total > config.max_choices:
        what = "choices" if choices is not None else f"n x prompts = {n or 1} x {prompts}"
        raise APIError(
            400,
            f"{what} asks for {total} choices; this server returns at most {config.max_choices} (--max-choices)",
            param="choices" if choices is not None else "n",
        )
    if max_tokens is not None and config.max_tokens is not None and max_tokens > config.max_tokens:
        raise APIError(
            400,
            f"max_tokens must be at most {config.max_tokens} on this server (--max-tokens), got {max_tokens}",
            param="max_tokens",
        )
    if prompt_chars > config.max_prompt_chars:
        raise APIError(
            400,
            f"the request's text is {prompt_chars:,} characters; this server takes at most "
            f"{config.max_prompt_chars:,} (--max-prompt-chars)",
            param=param,
        )


# OpenAI's default sampling, for what neither the request nor the checkpoint's generation_config.json sets
OPENAI_DEFAULTS = {"temperature": 1.0}


def sampling_params(
    body: _Sampling, max_tokens: int | None, top_logprobs: int | None = None, defaults: dict | None = None
) -> SamplingParams:
    """The engine's parameters; `max_tokens=None` (up to the context's end) is validated as 1;
    `top_logprobs`: alternatives per generated token (None: none gathered); `defaults`: the checkpoint's
    sampling defaults (`Engine.sampling_defaults`), for fields the request leaves unset."""
    for name, off in _UNSUPPORTED.items():
        value = (body.model_extra or {}).get(name)
        if value is not None and value not in off:
            raise APIError(400, f"{name}={value!r} is not supported by this server", param=name)
    if max_tokens is not None and max_tokens < 1:
        raise APIError(400, f"max_tokens must be >= 1, got {max_tokens}", param="max_tokens")
    try:
        return SamplingParams(
            max_tokens=max_tokens or 1,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            repetition_penalty=body.repetition_penalty,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            seed=body.seed,
            n=1 if body.n is None else body.n,
            stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []),
            stop_token_ids=list(body.stop_token_ids or []),
            ignore_eos=body.ignore_eos,
            skip_special_tokens=body.skip_special_tokens,
            logprobs=top_logprobs,
        ).with_defaults({**OPENAI_DEFAULTS, **(defaults or {})})
    except ValueError as e:
        raise APIError(400, str(e), param=str(e).split()[0]) from e


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
        check_limits(config, n=body.n, max_tokens=max_tokens, prompt_chars=_text_chars(body.messages))
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
        chars = len(body.prompt or "") + _text_chars(body.messages or []) + sum(map(len, body.choices))
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
