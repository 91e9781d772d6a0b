"""What a request to `cultengine serve` may ask, checked before it reaches the engine: the server's limits
(`ServeConfig`), OpenAI-style errors (`APIError`), the request bodies, image URLs and local media, and the
engine's sampling parameters.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass
from pathlib import Path

from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict

from ..paths import OutsideFolder, confined
from ..sampling import SamplingParams


@dataclass(frozen=True)
class ServeConfig:
    """What the HTTP layer enforces: the served name, auth, media access and request limits."""

    model_name: str
    api_key: str | None = None
    allowed_local_media_path: Path | None = None  # resolved directory; None = no local files
    max_request_bytes: int = 32 << 20
    max_images_per_request: int = 8
    # decoded pixels of one request's images, summed (read from their headers before decoding): 8 photos of
    # 16 MP; each image alone is also held to cultengine.image_files.MAX_IMAGE_PIXELS
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


def text_chars(messages: list) -> int:
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
