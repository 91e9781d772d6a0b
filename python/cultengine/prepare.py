"""Request preparation: a request (prompt or chat messages, images, choices) -> the token ids and image spans the
scheduler takes. Chat templates render here (`chat.py`), images are decoded and processed by the family's
processor (in threads), prompts are tokenized by the Rust tokenizer and image placeholders expanded.

Nothing here reads engine state that changes while steps run, so a server prepares requests on its callers'
threads while the engine steps.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .chat import render_chat
from .errors import CheckpointError
from .image_files import load_image
from .models import ImageFeatures
from .outputs import ScoreOutput
from .tokenizer_files import chat_adds_special_tokens


class RequestError(ValueError):
    """A request the engine cannot run; reported on that request's output, never raised for a batch."""


@dataclass
class Prepared:
    """A request turned into what the scheduler takes: token ids and the runs that take image embeddings."""

    prompt_ids: list[int]
    image_spans: list[tuple[int, int, int, int, bool]]  # (start, length, content hash, first embedding, atomic)
    images: dict[int, ImageFeatures] = field(default_factory=dict)  # by content hash
    image_starts: list[tuple[int, ImageFeatures]] = field(default_factory=list)  # where each image's tokens begin
    positions: list[int] = field(default_factory=list)  # the family's position rows, flattened (none: plain)
    position_delta: int = 0  # what decode adds to a position after them


Request = dict | str  # {"prompt", "images"} | {"messages"} | vLLM's {"prompt", "multi_modal_data"} | a prompt string

# Every key a request may hold: the prompt or chat messages, images (or vLLM's multi_modal_data), the choices of
# a scoring request, and the image options a family reads (Qwen's pixel bounds). Anything else is refused.
REQUEST_KEYS = ("prompt", "messages", "images", "multi_modal_data", "choices", "min_pixels", "max_pixels")


class Preparer:
    """Turns a checkpoint's requests into `Prepared` ones: its chat template, its family's image processor and
    placeholder, its tokenizer."""

    def __init__(self, checkpoint, family, tokenizer, template_name: str | None, image_options: dict | None):
        """`template_name`: one of the checkpoint's named chat templates (None: its default); `image_options`:
        defaults for the request keys the family reads."""
        unknown = set(image_options or {}) - set(family.image_options)
        if unknown:
            raise ValueError(
                f"image_options {sorted(unknown)} are not read by this model family (it reads: "
                f"{', '.join(family.image_options) or 'none'})"
            )
        self.checkpoint, self.family, self.tokenizer = checkpoint, family, tokenizer
        self.image_options = dict(image_options or {})
        self.templates = checkpoint.templates
        if template_name is not None and self.templates is None:
            raise CheckpointError(f"{checkpoint.path}: chat_template={template_name!r} asked for, but it has none")
        self.chat_template = None if self.templates is None else self.templates.pick(template_name)
        self.template_source = None if self.templates is None else self.templates.source
        placeholder = family.placeholder_id
        self.image_token = None if placeholder is None else tokenizer.id_to_token(placeholder)

    def prepare(self, requests: list[dict]) -> list[Prepared | Exception]:
        """Render, load images and tokenize every request; a failure becomes that request's error."""
        parsed: list[tuple[str, list, bool, dict] | Exception] = []
        for req in requests:
            try:
                parsed.append(self._prompt_and_images(req))
            except Exception as e:  # noqa: BLE001 - whatever one request raises is that request's error
                parsed.append(e if isinstance(e, RequestError) else RequestError(describe(e)))
        images = self._preprocess([(src, p[3]) for p in parsed if not isinstance(p, Exception) for src in p[1]])
        prepared: list[Prepared | Exception | None] = []
        # Raw prompts get the tokenizer's special tokens (BOS); chat prompts as transformers' processor or
        # tokenizer encodes them (tokenizer_files.chat_adds_special_tokens).
        by_special: dict[bool, list[int]] = {True: [], False: []}
        for i, p in enumerate(parsed):
            if not isinstance(p, Exception):
                p = next(
                    (images[k] for k in (_image_key(src, p[3]) for src in p[1]) if isinstance(images[k], Exception)), p
                )
            prepared.append(p if isinstance(p, Exception) else None)
            if not isinstance(p, Exception):
                by_special[p[2]].append(i)
        for flag, idx in by_special.items():
            texts = [
                self.family.expand_text(
                    parsed[i][0], [images[_image_key(src, parsed[i][3])][0] for src in parsed[i][1]]
                )
                for i in idx
            ]
            for i, ids in zip(idx, self._encode_texts(texts, flag, idx, prepared), strict=True):
                if ids is None:
                    continue
                try:
                    prepared[i] = self._expand(ids, [images[_image_key(src, parsed[i][3])] for src in parsed[i][1]])
                except Exception as e:  # noqa: BLE001 - whatever one request raises is that request's error
                    prepared[i] = e if isinstance(e, RequestError) else RequestError(describe(e))
        return prepared

    def choices_problem(self, choices) -> str | None:
        """Why `choices` cannot be scored (None: they can): a scoring request's choices are a non-empty list
        of non-empty strings, none holding the image placeholder (a choice continues the context as text)."""
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
            return "a scoring request needs a non-empty 'choices' list of non-empty strings"
        if self.image_token and any(self.image_token in c for c in choices):
            return f"a choice contains the image placeholder {self.image_token!r}"
        return None

    def encode_choices(self, choice_texts: list[tuple[int, int, str]], outputs: list[ScoreOutput]) -> list:
        texts = [c for _, _, c in choice_texts]
        try:
            return self.tokenizer.encode_batch(texts, add_special_tokens=False)
        except Exception:  # noqa: BLE001 - find the culprit, keep the rest
            out = []
            for i, _, text in choice_texts:
                try:
                    out.append(self.tokenizer.encode(text, add_special_tokens=False))
                except Exception as e:  # noqa: BLE001
                    outputs[i].error = outputs[i].error or f"choice {text!r} cannot be tokenized: {describe(e)}"
                    out.append([])
            return out

    def image_processor(self, src, options: dict | None = None) -> ImageFeatures:
        """One image source (path, bytes or PIL image) to its family's features."""
        return self.family.process_image(load_image(src), options or {})

    def _encode_texts(self, texts: list[str], add_special: bool, idx: list[int], prepared: list) -> list:
        """Token ids of each text (batched); a text the tokenizer rejects makes that request's error."""
        try:
            return self.tokenizer.encode_batch(texts, add_special_tokens=add_special)
        except Exception:  # noqa: BLE001 - find the culprit, keep the rest
            out = []
            for i, text in zip(idx, texts, strict=True):
                try:
                    out.append(self.tokenizer.encode(text, add_special_tokens=add_special))
                except Exception as e:  # noqa: BLE001
                    prepared[i] = RequestError(f"the prompt cannot be tokenized: {describe(e)}")
                    out.append(None)
            return out

    def _expand(self, ids: list[int], imgs: list[tuple[ImageFeatures, int]]) -> Prepared:
        """Replace each image placeholder with its family's tokens; the embedding runs become image spans."""
        if not imgs and (self.family.placeholder_id is None or self.family.placeholder_id not in ids):
            return self.from_token_ids(ids)
        if self.family.placeholder_id is None:
            raise RequestError("this model takes no images")
        try:
            expanded, starts = self.tokenizer.expand_placeholders(
                ids, self.family.placeholder_id, [f.token_ids for f, _ in imgs]
            )
        except ValueError as e:
            raise RequestError(f"{e} (image placeholder token {self.image_token!r})") from e
        spans, atomic = [], self.family.capabilities.atomic_images
        for start, (feats, h) in zip(starts, imgs, strict=True):
            first = 0
            for offset, n in feats.embedding_runs:
                spans.append((start + offset, n, h, first, atomic))
                first += n
        return self._positioned(
            Prepared(
                prompt_ids=list(expanded),
                image_spans=spans,
                images={h: f for f, h in imgs},
                image_starts=[(start, f) for start, (f, _) in zip(starts, imgs, strict=True)],
            )
        )

    def from_token_ids(self, ids: list[int]) -> Prepared:
        """A text-only prompt given as token ids, as the scheduler takes it."""
        return self._positioned(Prepared(prompt_ids=list(ids), image_spans=[]))

    def _positioned(self, prep: Prepared) -> Prepared:
        """`prep` with the family's explicit position rows and decode delta, where it has them (Qwen's M-RoPE)."""
        positions = self.family.positions(prep.prompt_ids, prep.image_starts)
        if positions is not None:
            prep.positions = np.ascontiguousarray(positions[0], dtype=np.int64).ravel().tolist()
            prep.position_delta = int(positions[1])
        return prep

    def _preprocess(self, sources: list[tuple]) -> dict:
        """(features, content hash), or the error, of each distinct image: decoded once, in threads."""
        distinct = {_image_key(src, opts): (src, opts) for src, opts in sources}

        def one(item):
            src, opts = item
            try:
                feats = self.image_processor(src, opts)
                return feats, feats.content_hash()
            except Exception as e:  # noqa: BLE001 - a bad image is its request's error
                return e if isinstance(e, RequestError) else RequestError(describe(e))

        if len(distinct) < 2:
            return {k: one(item) for k, item in distinct.items()}
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            return dict(zip(distinct, pool.map(one, distinct.values()), strict=True))

    def _prompt_and_images(self, req: dict) -> tuple[str, list, bool, dict]:
        """(text, image sources, add special tokens, image options) of one request."""
        if isinstance(req, dict) and "multi_modal_data" in req:  # vLLM's form
            req = {**req, "images": _vllm_images(req["multi_modal_data"], req.get("images"))}
        if not isinstance(req, dict):
            raise RequestError(f"a request is a dict with 'prompt' or 'messages', got {type(req).__name__}")
        if unknown := [k for k in req if k not in REQUEST_KEYS]:  # a typo or another engine's key: never ignored
            raise RequestError(
                f"unknown request key(s) {', '.join(map(repr, unknown))}; a request takes {', '.join(REQUEST_KEYS)}"
            )
        if "messages" in req and "prompt" in req:  # neither may silently win over the other
            raise RequestError("a request takes 'prompt' or 'messages', not both")
        if "messages" in req:
            text, images = render_chat(
                self.chat_template,
                req["messages"],
                self.checkpoint.special_tokens,
                template_name=f"the chat template of {self.checkpoint.path} ({self.templates.source})"
                if self.templates
                else "the chat template",
            )
            special = chat_adds_special_tokens(text, self.templates, self.checkpoint.special_tokens)
        elif "prompt" in req:
            if not isinstance(req["prompt"], str):
                raise RequestError("'prompt' must be a string")
            text, images, special = req["prompt"], req.get("images") or [], True
            if not isinstance(images, list | tuple):
                raise RequestError(f"'images' must be a list, got {type(images).__name__}")
        else:
            raise RequestError("a request needs 'prompt' (with images) or 'messages'")
        options = {**self.image_options, **{k: req[k] for k in self.family.image_options if k in req}}
        return text, list(images), special, self.family.request_image_options(options, len(images))


def _image_key(src, options: dict):
    """Identity of an image source within one call: a file is read once however often it is named."""
    key = ("path", os.fspath(src)) if isinstance(src, str | os.PathLike) else ("object", id(src))
    return key + tuple(sorted(options.items()))


def as_list(requests) -> list:
    """One request or a list of them (a dict or a string alone is one request, not an iterable); a
    string is a prompt."""
    requests = [requests] if isinstance(requests, dict | str) else list(requests)
    return [{"prompt": r} if isinstance(r, str) else r for r in requests]


def _vllm_images(data, images) -> list:
    if images:
        raise RequestError("give images either as 'images' or in 'multi_modal_data', not both")
    if not isinstance(data, dict) or set(data) - {"image"}:
        kinds = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise RequestError(f"multi_modal_data takes {{'image': image or [images]}}, got {kinds} (no video or audio)")
    image = data.get("image")
    return list(image) if isinstance(image, list | tuple) else [image]


def describe(e: BaseException) -> str:
    """A one-line message for an error raised while preparing one request."""
    text = str(e)
    if isinstance(e, RequestError | ValueError | OSError) and text:
        return text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
