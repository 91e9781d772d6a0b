"""`cultengine serve` against real clients on 127.0.0.1: the `openai` client, raw HTTP (httpx), a subprocess.

The reference is a second `Engine` on the same tiny checkpoint, run offline: the server's outputs must be
the ones `Engine.generate` / `Engine.score` give for the same requests and seeds.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

import cultengine
from cultengine import Engine, SamplingParams
from cultengine.serve.app import BackgroundServer, ServeConfig, build_app
from cultengine.serve.loop import EngineLoop

API_KEY = "test-key"
MODEL = "tiny"
TIMEOUT = 60  # seconds: every client call and every wait below is bounded


def png(color: tuple[int, int, int], size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def data_url(image: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(image).decode()


def image_message(image_url: str, text: str) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": text}],
        }
    ]


def engine_message(image: bytes, text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("media")
    (root / "allowed").mkdir()
    (root / "allowed" / "red.png").write_bytes(png((200, 10, 10)))
    (root / "secret.png").write_bytes(png((0, 0, 0)))
    (root / "allowed" / "link.png").symlink_to(root / "secret.png")
    return root


@pytest.fixture(scope="module")
def server(tiny_llama, media):
    """(base URL, EngineLoop) of a server on 127.0.0.1 with auth, a media directory and small limits."""
    loop = EngineLoop(Engine(tiny_llama))
    config = ServeConfig(
        model_name=MODEL,
        api_key=API_KEY,
        allowed_local_media_path=(media / "allowed").resolve(),
        max_request_bytes=1 << 20,
        max_images_per_request=2,
    )
    try:
        with BackgroundServer(build_app(loop, config)) as url:
            yield url, loop
    finally:
        loop.close()


@pytest.fixture(scope="module")
def reference(tiny_llama) -> Engine:
    return Engine(tiny_llama)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=API_KEY, max_retries=0, timeout=TIMEOUT)


def post(server, path: str, body=None, key: str | None = API_KEY, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server[0] + path, json=body, headers=headers, timeout=TIMEOUT, **kw)


def metrics(server) -> dict[str, float]:
    text = httpx.get(server[0] + "/metrics", timeout=TIMEOUT).text
    return {
        name: float(value)
        for name, value in (line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    }


def settled(server, condition) -> dict[str, float]:
    """/metrics once `condition` holds (the engine loop publishes its figures after each step), or the last
    reading at the deadline."""
    deadline = time.monotonic() + TIMEOUT
    while not condition(m := metrics(server)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return m


# ------------------------------------------------------------------------------------------------
# OpenAI endpoints == Engine.generate
# ------------------------------------------------------------------------------------------------
def test_models_lists_the_served_name(client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_chat_with_image_n_seed_logprobs_match_engine_generate(client, reference):
    image = png((200, 10, 10))
    resp = client.chat.completions.create(
        model=MODEL,
        messages=image_message(data_url(image), "What is this dish?"),
        max_tokens=12,
        temperature=0.8,
        top_p=0.9,
        seed=7,
        n=3,
        logprobs=True,
    )
    (ref,) = reference.generate(
        [{"messages": engine_message(image, "What is this dish?")}],
        SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=7, n=3),
        use_tqdm=False,
    )
    assert ref.error is None
    assert [c.index for c in resp.choices] == [0, 1, 2]
    for choice, sample in zip(resp.choices, ref.samples, strict=True):
        assert choice.message.role == "assistant"
        assert choice.message.content == sample.text
        assert choice.finish_reason == sample.finish_reason
        lps = [t.logprob for t in choice.logprobs.content]
        assert lps == pytest.approx(sample.logprobs, abs=1e-4)
        assert all(t.top_logprobs == [] for t in choice.logprobs.content)
    assert len({c.message.content for c in resp.choices}) > 1  # n samples differ
    assert resp.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert resp.usage.completion_tokens == sum(len(s.token_ids) for s in ref.samples)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens

    again = client.chat.completions.create(
        model=MODEL,
        messages=image_message(data_url(image), "What is this dish?"),
        max_tokens=12,
        temperature=0.8,
        top_p=0.9,
        seed=7,
        n=3,
    )
    assert [c.message.content for c in again.choices] == [c.message.content for c in resp.choices]


def test_top_logprobs_match_engine_generate(client, reference):
    resp = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me a story."}],
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    (ref,) = reference.generate(
        [{"messages": [{"role": "user", "content": "Tell me a story."}]}],
        SamplingParams(max_tokens=6, temperature=0, logprobs=3),
        use_tqdm=False,
    )
    content = resp.choices[0].logprobs.content
    assert len(content) == len(ref.token_ids)
    for tok, top in zip(content, ref.samples[0].top_logprobs, strict=True):
        want = sorted(top.values(), reverse=True)[:3]
        assert [t.logprob for t in tok.top_logprobs] == pytest.approx(want, abs=1e-4)
    comp = client.completions.create(model=MODEL, prompt="Tell me", max_tokens=4, temperature=0, logprobs=2)
    # text -> log-prob, as OpenAI's completions give it (two ids of one text collapse into one entry)
    assert all(1 <= len(d) <= 2 for d in comp.choices[0].logprobs.top_logprobs)


def test_completions_prompt_list_stop_and_logprobs_match_engine_generate(client, reference):
    prompts = ["The quick brown fox", "Un café au lait"]
    resp = client.completions.create(
        model=MODEL, prompt=prompts, max_tokens=10, temperature=0, logprobs=0, n=2, stop=["\n"]
    )
    refs = reference.generate(
        [{"prompt": p} for p in prompts], SamplingParams(max_tokens=10, temperature=0, n=2, stop=["\n"]), use_tqdm=False
    )
    expected = [s for r in refs for s in r.samples]
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    assert [c.text for c in resp.choices] == [s.text for s in expected]
    for choice, sample in zip(resp.choices, expected, strict=True):
        assert choice.logprobs.token_logprobs == pytest.approx(sample.logprobs, abs=1e-4)
        assert len(choice.logprobs.tokens) == len(sample.token_ids)
    assert resp.usage.prompt_tokens == sum(len(r.prompt_token_ids) for r in refs)


def test_max_tokens_default_runs_to_the_end_of_the_context(client, reference):
    resp = client.completions.create(
        model=MODEL, prompt="The quick brown fox", temperature=0, extra_body={"ignore_eos": True}
    )
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.prompt_tokens + resp.usage.completion_tokens == reference.max_model_len


def test_streaming_chat_and_completions(client):
    image = data_url(png((10, 200, 10)))
    kwargs = dict(
        model=MODEL, messages=image_message(image, "Describe it."), max_tokens=10, temperature=0.7, seed=3, n=2
    )
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert [c.delta.role for c in chunks[0].choices] == ["assistant", "assistant"]
    texts, finish, pieces = ["", ""], [None, None], [0, 0]
    for chunk in chunks[1:-1]:
        (c,) = chunk.choices
        texts[c.index] += c.delta.content or ""
        pieces[c.index] += bool(c.delta.content)
        finish[c.index] = c.finish_reason or finish[c.index]
    assert texts == [c.message.content for c in whole.choices]
    assert max(pieces) > 1, pieces  # the text arrives as it is generated, not at the end
    assert finish == [c.finish_reason for c in whole.choices]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens

    plain = client.completions.create(model=MODEL, prompt="Hello", max_tokens=6, temperature=0)
    streamed = list(client.completions.create(model=MODEL, prompt="Hello", max_tokens=6, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == plain.choices[0].text


def test_sse_wire_format_ends_with_done(server):
    with httpx.stream(
        "POST",
        server[0] + "/v1/chat/completions",
        timeout=TIMEOUT,
        headers={"Authorization": f"Bearer {API_KEY}"},
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True},
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"


def test_local_files_only_under_the_allowed_path(client, media):
    allowed = media / "allowed" / "red.png"
    by_file = client.chat.completions.create(
        model=MODEL, messages=image_message(allowed.as_uri(), "What?"), max_tokens=8, temperature=0
    )
    by_data = client.chat.completions.create(
        model=MODEL, messages=image_message(data_url(allowed.read_bytes()), "What?"), max_tokens=8, temperature=0
    )
    assert by_file.choices[0].message.content == by_data.choices[0].message.content
    for outside in [
        (media / "secret.png").as_uri(),
        "file://" + str(media / "allowed" / ".." / "secret.png"),
        (media / "allowed" / "link.png").as_uri(),
        str(media / "secret.png"),
    ]:
        with pytest.raises(openai.PermissionDeniedError, match="outside the allowed local media path"):
            client.chat.completions.create(model=MODEL, messages=image_message(outside, "What?"), max_tokens=4)


# ------------------------------------------------------------------------------------------------
# /v1/score == Engine.score
# ------------------------------------------------------------------------------------------------
def test_score_matches_engine_score(server, reference):
    image = png((30, 60, 200))
    choices = ["Japan", "Peru", "Ghana", "India"]
    by_prompt = post(
        server,
        "/v1/score",
        {"model": MODEL, "prompt": "<image>\nWhich country? Answer:", "images": [data_url(image)], "choices": choices},
    )
    by_chat = post(
        server,
        "/v1/score",
        {"model": MODEL, "messages": image_message(data_url(image), "Which country?"), "choices": choices},
    )
    refs = reference.score(
        [
            {"prompt": "<image>\nWhich country? Answer:", "images": [image], "choices": choices},
            {"messages": engine_message(image, "Which country?"), "choices": choices},
        ],
        use_tqdm=False,
    )
    for resp, ref in zip([by_prompt, by_chat], refs, strict=True):
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["best"] == ref.best
        assert [c["text"] for c in body["choices"]] == choices
        for got, want in zip(body["choices"], ref.choices, strict=True):
            assert got["logprob"] == pytest.approx(want.logprob, abs=1e-4)
            assert got["num_tokens"] == want.num_tokens and got["is_greedy"] == want.is_greedy
            assert got["token_logprobs"] == pytest.approx(want.token_logprobs, abs=1e-4)


# ------------------------------------------------------------------------------------------------
# Concurrency and disconnects
# ------------------------------------------------------------------------------------------------
def _workload(i: int) -> tuple[str, dict]:
    """Request i of the concurrent test: chats with one of 4 images (seeded sampling), completions, scores."""
    image = data_url(png(((i % 4) * 60, 100, 50)))
    if i % 4 == 3:
        return "/v1/score", {
            "model": MODEL,
            "messages": image_message(image, f"Question {i // 4}?"),
            "choices": ["yes", "no", "maybe"],
        }
    if i % 4 == 2:
        return "/v1/completions", {
            "model": MODEL,
            "prompt": f"Story {i}:",
            "max_tokens": 4 + i % 7,
            "temperature": 1.0,
            "seed": i,
        }
    return "/v1/chat/completions", {
        "model": MODEL,
        "messages": image_message(image, f"Describe {i}."),
        "max_tokens": 4 + i % 9,
        "temperature": 0.9,
        "seed": 100 + i,
        "stream": i % 8 == 0,
    }


def _answer(server, path: str, body: dict):
    resp = post(server, path, body)
    assert resp.status_code == 200, resp.text
    if body.get("stream"):
        events = [line[len("data: ") :] for line in resp.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[1:-1]]
        return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    body_out = resp.json()
    if path == "/v1/score":
        return [round(c["logprob"], 3) for c in body_out["choices"]]
    return body_out["choices"][0].get("text") or body_out["choices"][0]["message"]["content"]


def test_64_concurrent_clients_each_answered_once_identical_to_sequential(server):
    requests = [_workload(i) for i in range(64)]
    sequential = [_answer(server, path, body) for path, body in requests]
    before = metrics(server)
    answered: dict[int, object] = {}
    lock = threading.Lock()

    def one(i: int) -> None:
        result = _answer(server, *requests[i])
        with lock:
            assert i not in answered
            answered[i] = result

    with ThreadPoolExecutor(max_workers=64) as pool:
        futures = [pool.submit(one, i) for i in range(64)]
        for f in futures:
            f.result(timeout=TIMEOUT)
    assert sorted(answered) == list(range(64))
    assert [answered[i] for i in range(64)] == sequential
    after = settled(server, lambda m: m["cultengine_requests_running"] == 0)
    assert after["cultengine_requests_admitted_total"] - before["cultengine_requests_admitted_total"] == 64
    assert after["cultengine_prefix_cache_hit_tokens_total"] > before["cultengine_prefix_cache_hit_tokens_total"]
    assert after["cultengine_requests_running"] == 0 and after["cultengine_kv_blocks_used"] == 0


def test_client_disconnecting_mid_stream_aborts_and_frees_blocks(server):
    before = metrics(server)
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell a long story."}],
        "max_tokens": 200,
        "n": 64,
        "temperature": 1.0,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.Client(timeout=TIMEOUT) as http:
        with http.stream(
            "POST",
            server[0] + "/v1/chat/completions",
            headers={"Authorization": f"Bearer {API_KEY}"},
            json=body,
        ) as r:
            lines = r.iter_lines()  # (dropping this iterator would close the connection)
            assert next(lines).startswith("data: ")  # the role chunk: the request is admitted and running
            running = settled(server, lambda m: m["cultengine_kv_blocks_used"] > 0)
            assert running["cultengine_kv_blocks_used"] > 0 and running["cultengine_requests_running"] == 1
        # leaving the block closes the connection mid-stream
    aborted = before["cultengine_requests_aborted_total"] + 1
    now = settled(server, lambda m: m["cultengine_requests_aborted_total"] == aborted)
    assert now["cultengine_requests_aborted_total"] == before["cultengine_requests_aborted_total"] + 1
    assert now["cultengine_kv_blocks_used"] == 0 and now["cultengine_requests_running"] == 0
    assert now["cultengine_generation_tokens_total"] - before["cultengine_generation_tokens_total"] < 64 * 200


def test_client_giving_up_on_a_plain_request_aborts_it(server):
    before = metrics(server)
    body = _chat(max_tokens=230, n=128, temperature=1.0, ignore_eos=True)  # about a second of work
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            server[0] + "/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=httpx.Timeout(TIMEOUT, read=0.2),
        )
    aborted = before["cultengine_requests_aborted_total"] + 1
    now = settled(
        server, lambda m: m["cultengine_requests_aborted_total"] == aborted and m["cultengine_requests_running"] == 0
    )
    assert now["cultengine_requests_aborted_total"] == aborted
    assert now["cultengine_kv_blocks_used"] == 0
    assert now["cultengine_generation_tokens_total"] - before["cultengine_generation_tokens_total"] < 128 * 230
    assert now['cultengine_http_requests_total{endpoint="/v1/chat/completions",status="499"}'] >= 1


def test_a_failed_engine_step_is_a_500_and_the_server_goes_on(server):
    engine = server[1].engine
    real_step = engine.step

    def failing_step():
        engine.step = real_step  # fail once
        raise RuntimeError("injected device error")

    engine.step = failing_step
    try:
        resp = post(server, "/v1/chat/completions", _chat(max_tokens=8))
    finally:
        engine.step = real_step
    assert resp.status_code == 500 and "injected device error" in resp.json()["error"]["message"]
    after = settled(server, lambda m: m["cultengine_requests_running"] == 0)
    assert after["cultengine_engine_step_errors_total"] >= 1 and after["cultengine_kv_blocks_used"] == 0
    assert httpx.get(server[0] + "/health", timeout=TIMEOUT).json() == {"status": "ok"}
    assert post(server, "/v1/chat/completions", _chat()).status_code == 200


# ------------------------------------------------------------------------------------------------
# Bad requests: a 4xx each, with an OpenAI-style body, and the server keeps serving
# ------------------------------------------------------------------------------------------------
def _chat(**changes) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **changes}


BAD_REQUESTS = [
    ("/v1/chat/completions", _chat(model="gpt-4o"), 404, "does not exist"),
    ("/v1/chat/completions", _chat(max_tokens=-3), 400, "max_tokens must be >= 1"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens must be >= 1"),
    ("/v1/chat/completions", _chat(temperature=-1), 400, "temperature"),
    ("/v1/chat/completions", _chat(n=0), 400, "n must be"),
    ("/v1/chat/completions", _chat(min_p=0.5), 400, "min_p=0.5 is not supported"),
    ("/v1/chat/completions", _chat(presence_penalty=2.5), 400, "presence_penalty must be in"),
    ("/v1/chat/completions", _chat(repetition_penalty=0), 400, "repetition_penalty must be > 0"),
    ("/v1/chat/completions", _chat(response_format={"type": "json_object"}), 400, "response_format"),
    ("/v1/chat/completions", _chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools"),
    ("/v1/chat/completions", _chat(top_logprobs=2), 400, "top_logprobs needs logprobs=true"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 30}, 400, "logprobs must be in"),
    (
        "/v1/chat/completions",
        _chat(messages=image_message("data:image/png;base64,@@@not-base64", "x")),
        400,
        "malformed data URL",
    ),
    ("/v1/chat/completions", _chat(messages=image_message("data:image/png,rawbytes", "x")), 400, "malformed data URL"),
    (
        "/v1/chat/completions",
        _chat(messages=image_message(data_url(b"not an image at all"), "x")),
        400,
        "cannot read image",
    ),
    (
        "/v1/chat/completions",
        _chat(messages=image_message("https://example.com/cat.png", "x")),
        400,
        "remote image URLs are not fetched",
    ),
    (
        "/v1/chat/completions",
        _chat(
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": data_url(png((1, 2, 3)))}} for _ in range(3)
                    ],
                }
            ]
        ),
        400,
        "more than 2 images",
    ),
    (
        "/v1/chat/completions",
        _chat(messages=[{"role": "user", "content": [{"type": "input_audio"}]}]),
        400,
        "unsupported content part",
    ),
    ("/v1/chat/completions", {"model": MODEL}, 400, "messages"),
    ("/v1/completions", {"model": MODEL, "prompt": "word " * 400, "max_tokens": 4}, 400, ""),
    ("/v1/completions", {"model": MODEL, "prompt": "<image> two placeholders <image>"}, 400, "placeholder"),
    ("/v1/score", {"model": MODEL, "prompt": "Q:", "choices": []}, 400, "choices"),
    (
        "/v1/score",
        {"model": MODEL, "prompt": "Q:", "messages": [{"role": "user", "content": "Q"}], "choices": ["a"]},
        400,
        "exactly one of",
    ),
    (
        "/v1/score",
        {"model": MODEL, "prompt": "Q:", "images": ["file:///etc/passwd"], "choices": ["a"]},
        403,
        "outside the allowed local media path",
    ),
]


@pytest.mark.parametrize("path,body,status,message", BAD_REQUESTS)
def test_bad_request_is_4xx_and_server_keeps_serving(server, path, body, status, message):
    resp = post(server, path, body)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert message in error["message"] and error["type"]
    assert httpx.get(server[0] + "/health", timeout=TIMEOUT).json() == {"status": "ok"}
    ok = post(server, "/v1/chat/completions", _chat(temperature=0))
    assert ok.status_code == 200


def test_malformed_json_and_oversized_bodies(server):
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    bad = httpx.post(server[0] + "/v1/chat/completions", content=b"{not json", headers=headers, timeout=TIMEOUT)
    assert bad.status_code == 400 and "error" in bad.json()
    big = post(server, "/v1/chat/completions", _chat(messages=[{"role": "user", "content": "x" * (2 << 20)}]))
    assert big.status_code == 413 and "larger than" in big.json()["error"]["message"]

    def chunked():
        yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
        for _ in range(40):
            yield b"y" * 65536
        yield b'"}]}'

    streamed = httpx.post(server[0] + "/v1/chat/completions", content=chunked(), headers=headers, timeout=TIMEOUT)
    assert streamed.status_code == 413
    assert post(server, "/v1/chat/completions", _chat()).status_code == 200


def test_api_key_required_on_v1(server):
    wrong = openai.OpenAI(base_url=server[0] + "/v1", api_key="wrong", max_retries=0, timeout=TIMEOUT)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert post(server, "/v1/chat/completions", _chat(), key=None).status_code == 401
    assert post(server, "/v1/score", {"model": MODEL, "prompt": "Q", "choices": ["a"]}, key="nope").status_code == 401
    assert httpx.get(server[0] + "/health", timeout=TIMEOUT).status_code == 200


# ------------------------------------------------------------------------------------------------
# The command line
# ------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cultengine_serve_command(tiny_llama):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(cultengine.__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cultengine.cli",
            "serve",
            "--model",
            str(tiny_llama),
            "--port",
            str(port),
            "--api-key",
            "k",
            "--device",
            "cpu",
            "--served-model-name",
            "m",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        base, deadline = f"http://127.0.0.1:{port}", time.monotonic() + TIMEOUT
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "cultengine serve did not come up"
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        cli = openai.OpenAI(base_url=base + "/v1", api_key="k", max_retries=0, timeout=TIMEOUT)
        assert [m.id for m in cli.models.list().data] == ["m"]
        out = cli.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert out.usage.completion_tokens >= 1
    finally:
        proc.terminate()
        proc.wait(timeout=TIMEOUT)
    assert proc.returncode in (0, -15), proc.stdout.read()
