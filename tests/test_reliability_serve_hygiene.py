"""The server's edges: bounded /metrics labels whatever paths clients send, the API schema behind the key,
the choices Engine.score refuses refused by /v1/score alike, and every malformed body or bad local file
path an OpenAI-style 4xx JSON body, never a plain-text 500."""

from __future__ import annotations

import json
import os
import random

import httpx
import pytest

from cultengine import Engine
from cultengine.serve.app import BackgroundServer, ServeConfig, build_app
from cultengine.serve.loop import EngineLoop
from tiny_checkpoints import IMAGE_TOKEN

MODEL, KEY, TIMEOUT = "tiny", "sekrit", 60
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    media = tmp_path_factory.mktemp("media")
    loop = EngineLoop(Engine(tiny_llama))
    config = ServeConfig(model_name=MODEL, api_key=KEY, allowed_local_media_path=media.resolve())
    try:
        with BackgroundServer(build_app(loop, config)) as url:
            yield url, media
    finally:
        loop.close()


def _is_openai_error(resp: httpx.Response, low: int = 400, high: int = 499) -> dict:
    assert low <= resp.status_code <= high, (resp.status_code, resp.text[:300])
    assert resp.headers["content-type"].startswith("application/json"), resp.text[:300]
    error = resp.json()["error"]
    assert isinstance(error["message"], str) and error["message"] and error["type"]
    return error


def test_metrics_labels_stay_bounded_whatever_paths_are_sent(server):
    url, _ = server
    for i in range(300):
        httpx.get(f"{url}/no/such/path/{i}", timeout=TIMEOUT)
        httpx.get(f"{url}/v1/models/name-{i}", headers=AUTH, timeout=TIMEOUT)
    text = httpx.get(f"{url}/metrics", timeout=TIMEOUT).text
    lines = [line for line in text.splitlines() if line.startswith("cultengine_http_requests_total")]
    endpoints = {line.split('endpoint="')[1].split('"')[0] for line in lines}
    assert "other" in endpoints and "/v1/models/{name:path}" in endpoints
    assert not any("no/such" in e or "name-" in e for e in endpoints)
    assert len(lines) < 20
    assert len(text) < 20_000


def test_the_api_schema_needs_the_key(server):
    url, _ = server
    _is_openai_error(httpx.get(f"{url}/openapi.json", timeout=TIMEOUT), 401, 401)
    assert httpx.get(f"{url}/openapi.json", headers=AUTH, timeout=TIMEOUT).json()["info"]["title"] == "cultengine"


def test_score_refuses_a_choice_holding_the_image_placeholder(server):
    url, _ = server
    body = {"model": MODEL, "prompt": "Which?", "choices": ["a", f"b {IMAGE_TOKEN}"]}
    error = _is_openai_error(httpx.post(f"{url}/v1/score", json=body, headers=AUTH, timeout=TIMEOUT))
    assert "image placeholder" in error["message"]


def _deep(depth: int) -> bytes:
    return b'{"model": "tiny", "messages": ' + b"[" * depth + b"]" * depth + b"}"


MALFORMED = [
    _deep(100_000),  # past the JSON parser's recursion limit
    b'{"model": "tiny", "prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}",  # past int's digit limit
    b'{"model": "tiny", "prompt": "hi", "temperature": 1e999}',  # infinity
    b'{"model": "tiny", "prompt": "hi", "n": 1e30}',
    b'{"model": "tiny", "prompt": "\xff\xfe bad utf-8"}',
    b'{"model": "tiny", "prompt": "hi"',  # cut short
    b"\x00\x01\x02",
    b"",
    b"[]",
    b'"just a string"',
    b'{"model": "tiny", "prompt": {"nested": ["x"]}}',
    b'{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
    b'{"model": "tiny", "messages": "hello"}',
]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/v1/score"])
@pytest.mark.parametrize("body", MALFORMED, ids=range(len(MALFORMED)))
def test_malformed_bodies_get_openai_4xx(server, path, body):
    url, _ = server
    headers = {**AUTH, "Content-Type": "application/json"}
    _is_openai_error(httpx.post(url + path, content=body, headers=headers, timeout=TIMEOUT))


def test_fuzzed_bodies_never_get_a_500(server):
    """Random mutations of valid bodies: each is served or refused with a 4xx JSON error."""
    url, _ = server
    rng = random.Random(7)
    valid = {
        "/v1/completions": {"model": MODEL, "prompt": "Hi", "max_tokens": 2},
        "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
        "/v1/score": {"model": MODEL, "prompt": "Hi", "choices": ["a", "b"]},
    }
    junk = [None, True, -1, 0, 2**70, 1.5, -1e308, "", "x" * 50, [], [None], {}, {"a": 1}, [[[]]]]
    for _ in range(150):
        path = rng.choice(list(valid))
        body = json.loads(json.dumps(valid[path]))
        for _ in range(rng.choice([1, 2, 3])):
            key = rng.choice([*body, "temperature", "top_p", "seed", "n", "stop", "logprobs", "images"])
            body[key] = rng.choice(junk)
        resp = httpx.post(url + path, json=body, headers=AUTH, timeout=TIMEOUT)
        if resp.status_code != 200:
            _is_openai_error(resp)
    assert httpx.get(url + "/health", timeout=TIMEOUT).status_code == 200


def test_unknown_routes_and_methods_are_openai_errors(server):
    url, _ = server
    assert "no such endpoint" in _is_openai_error(httpx.get(url + "/v2/nothing", timeout=TIMEOUT))["message"]
    _is_openai_error(httpx.get(url + "/v1/score", headers=AUTH, timeout=TIMEOUT))  # 405


def _image_url_request(path: str) -> dict:
    return {
        "model": MODEL,
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file://" + path}}, "x"]},
        ],
    }


def test_bad_local_image_paths_get_4xx(server):
    url, media = server
    (media / "loop_a").symlink_to(media / "loop_b")
    (media / "loop_b").symlink_to(media / "loop_a")
    os.mkfifo(media / "pipe.png")
    for path in ["a\u0000b.png", "x" * 5000 + ".png", str(media / "loop_a"), str(media / "pipe.png"), "/etc/passwd"]:
        body = _image_url_request(path)
        body["messages"][0]["content"][1] = {"type": "text", "text": "What is it?"}
        resp = httpx.post(url + "/v1/chat/completions", json=body, headers=AUTH, timeout=TIMEOUT)
        _is_openai_error(resp)
