"""`cultengine serve` under hostile or greedy clients: no request stalls the others, exceeds the server's
limits or escapes them, and every refusal is an OpenAI-style 4xx body.

The engine loop's fairness is checked by counting, never by timing: requests are queued behind a gate (a
command that blocks the engine thread), so all of them are admitted in the same loop iteration, and the
order in which their results resolve is recorded.
"""

from __future__ import annotations

import base64
import io
import random
import subprocess
import sys
import threading
from concurrent.futures import CancelledError, Future

import httpx
import pytest
from PIL import Image

from cultengine import Engine, SamplingParams
from cultengine.engine import RequestError
from cultengine.serve.app import BackgroundServer, ServeConfig, build_app
from cultengine.serve.loop import PREPARE_BYTES_PER_PIXEL, EngineLoop, ImageMemory, ServerBusy, pixel_bytes

MODEL = "tiny"
TIMEOUT = 60


@pytest.fixture(scope="module")
def reference(tiny_llama) -> Engine:
    return Engine(tiny_llama)


def _gated(loop: EngineLoop):
    """Block the engine thread until the returned event is set: what is submitted meanwhile is admitted
    together, in submission order."""
    gate, blocked = threading.Event(), threading.Event()

    def wait():
        blocked.set()
        gate.wait(TIMEOUT)

    loop._inbox.put(wait)
    assert blocked.wait(TIMEOUT)
    return gate


def _submit_all(loop: EngineLoop, jobs: list[tuple[dict, SamplingParams]]):
    """Submit every job behind a gate; returns their `Admitted` and the order results resolved in, as
    (job index, result index)."""
    order: list[tuple[int, int]] = []
    lock = threading.Lock()
    gate = _gated(loop)
    try:
        futures = [loop.generate(req, params, params.max_tokens) for req, params in jobs]
    finally:
        gate.set()
    admitted = [f.result(TIMEOUT) for f in futures]
    for j, a in enumerate(admitted):
        for k, f in enumerate(a.results):

            def done(_f: Future, key=(j, k)) -> None:
                with lock:
                    order.append(key)

            f.add_done_callback(done)
    for a in admitted:
        for f in a.results:
            f.result(TIMEOUT)
    return admitted, order


# ------------------------------------------------------------------------------------------------
# A. One request cannot stall the others
# ------------------------------------------------------------------------------------------------
def test_a_request_admitted_after_a_large_one_is_served_before_it_ends(tiny_llama):
    """n=96 samples of max_tokens=1, then a 3-token request: the small one finishes while most of the
    large one's samples are still to run (FIFO admission put it behind all 96)."""
    loop = EngineLoop(Engine(tiny_llama, max_num_seqs=4))
    try:
        large = ({"prompt": "Name a country."}, SamplingParams(n=96, max_tokens=1, temperature=1.0, seed=1))
        small = ({"prompt": "Tell me a story."}, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
        _, order = _submit_all(loop, [large, small])
        assert len(order) == 97
        small_at = order.index((1, 0))
        # The small request's 3 tokens take 3 steps; each step finishes at most max_num_seqs (4) of the large
        # one's samples, with at most max_in_scheduler (8) of them ahead of it when both were admitted.
        assert small_at <= 8 + 3 * 4, order
        assert loop.stats()["requests_running"] == 0 and not loop._owner and not loop._feeding
    finally:
        loop.close()


@pytest.mark.parametrize("case", range(6))
def test_round_robin_feeding_is_exact_and_bounded(tiny_llama, reference, case):
    """Random mixes of requests (n, lengths, seeds) under random scheduler sizes: every sample is the one
    Engine.generate gives for the same seed, the loop never keeps more than `max_in_scheduler` sequences (plus
    each request's first) in the scheduler, and nothing stays behind."""
    rng = random.Random(case)
    engine = Engine(tiny_llama, max_num_seqs=rng.randint(1, 4))
    loop = EngineLoop(engine, max_in_scheduler=rng.randint(1, 6))
    held: list[int] = []
    real_step = engine.step

    def watched_step():
        held.append(len(loop._owner))
        return real_step()

    engine.step = watched_step
    jobs = []
    for i in range(rng.randint(2, 5)):
        params = SamplingParams(
            n=rng.choice([1, 1, 2, 7, 13]),
            max_tokens=rng.randint(1, 5),
            temperature=rng.choice([0.0, 0.9]),
            seed=rng.randint(0, 1000),
            ignore_eos=rng.random() < 0.5,
        )
        jobs.append(({"prompt": rng.choice(["Hello", "The weather in Lima", "Une histoire"]) + f" {i}"}, params))
    try:
        admitted, order = _submit_all(loop, jobs)
        got = [[f.result() for f in a.results] for a in admitted]
        want = [reference.generate([req], params, use_tqdm=False)[0].samples for req, params in jobs]
        for g, w in zip(got, want, strict=True):
            assert [s.token_ids for s in g] == [s.token_ids for s in w]
            assert [s.text for s in g] == [s.text for s in w]
        assert sorted(order) == sorted((j, k) for j, (_, p) in enumerate(jobs) for k in range(p.n))
        assert held and max(held) <= loop.max_in_scheduler + len(jobs)
        assert loop.stats()["requests_running"] == 0 and not loop._owner and not loop._jobs
        assert not engine.scheduler.has_unfinished()
    finally:
        loop.close()


def test_aborting_a_large_request_drops_its_held_back_samples(tiny_llama):
    loop = EngineLoop(Engine(tiny_llama, max_num_seqs=2), max_in_scheduler=2)
    try:
        gate = _gated(loop)
        try:
            future = loop.generate({"prompt": "Hi"}, SamplingParams(n=50, max_tokens=4, ignore_eos=True), 4)
        finally:
            gate.set()
        admitted = future.result(TIMEOUT)
        loop.abort(admitted.request_id)
        for f in admitted.results:
            with pytest.raises(Exception):  # noqa: B017 - cancelled or finished before the abort: both fine
                f.result(TIMEOUT)
                raise RuntimeError("finished before the abort")
        after = loop.generate({"prompt": "Hi"}, SamplingParams(max_tokens=2), 2).result(TIMEOUT)
        assert len(after.results[0].result(TIMEOUT).token_ids) >= 1
        loop.close()
        assert not loop._owner and not loop._feeding and not loop.engine.scheduler.has_unfinished()
    finally:
        loop.close()


# ------------------------------------------------------------------------------------------------
# A. Per-request limits: n, choices, max_tokens, prompt characters and tokens
# ------------------------------------------------------------------------------------------------
LIMITS = dict(
    max_n=3, max_choices=4, max_tokens=5, max_prompt_chars=120, max_prompt_tokens=30, max_images_per_request=1
)


@pytest.fixture(scope="module")
def limited(tiny_llama):
    loop = EngineLoop(Engine(tiny_llama))
    try:
        with BackgroundServer(build_app(loop, ServeConfig(model_name=MODEL, **LIMITS))) as url:
            yield url, loop
    finally:
        loop.close()


def _expected_refusal(reference: Engine, path: str, body: dict) -> str | None:
    """The param a server with LIMITS must name in its 400, or None if the request is within them."""
    n = body.get("n")
    if n is not None and n > LIMITS["max_n"]:
        return "n"
    if path == "/v1/score":
        if len(body["choices"]) > LIMITS["max_choices"]:
            return "choices"
    else:
        prompts = body["prompt"] if isinstance(body.get("prompt"), list) else [None]
        if (n or 1) * len(prompts) > LIMITS["max_choices"]:
            return "n"
    if (body.get("max_tokens") or 0) > LIMITS["max_tokens"]:
        return "max_tokens"
    texts = body["prompt"] if path == "/v1/completions" else [m["content"] for m in body["messages"]]
    texts = [texts] if isinstance(texts, str) else texts
    if sum(map(len, texts)) + sum(map(len, body.get("choices", []))) > LIMITS["max_prompt_chars"]:
        return "prompt" if path == "/v1/completions" else "messages"
    requests = [{"prompt": t} for t in texts] if path == "/v1/completions" else [{"messages": body["messages"]}]
    if any(len(p.prompt_ids) > LIMITS["max_prompt_tokens"] for p in reference.prepare(requests)):
        return "tokens"
    return None


def _random_body(rng: random.Random) -> tuple[str, dict]:
    words = ["fox", "Lima", "festival", "rain", "ceremony", "tea"]

    def text() -> str:
        return " ".join(rng.choice(words) for _ in range(rng.choice([1, 3, 8, 25])))

    path = rng.choice(["/v1/completions", "/v1/chat/completions", "/v1/score"])
    body: dict = {"model": MODEL}
    if path == "/v1/score":
        body["messages"] = [{"role": "user", "content": text()}]
        body["choices"] = [rng.choice(words) for _ in range(rng.choice([1, 2, 4, 5, 9]))]
        return path, body
    if path == "/v1/completions":
        body["prompt"] = text() if rng.random() < 0.5 else [text() for _ in range(rng.choice([1, 2, 3]))]
    else:
        body["messages"] = [{"role": "user", "content": text()}]
    if rng.random() < 0.7:
        body["n"] = rng.choice([1, 2, 3, 4, 10_000, 10**30])
    if rng.random() < 0.7:
        body["max_tokens"] = rng.choice([1, 3, 5, 6, 2**40])
    body["temperature"] = 0
    return path, body


def test_limits_fuzz_each_request_is_run_or_refused_by_name(limited, reference):
    rng = random.Random(25)
    seen = set()
    for _ in range(40):
        path, body = _random_body(rng)
        refusal = _expected_refusal(reference, path, body)
        seen.add(refusal)
        resp = httpx.post(limited[0] + path, json=body, timeout=TIMEOUT)
        if refusal is None:
            assert resp.status_code == 200, (body, resp.text)
            if path != "/v1/score":
                usage = resp.json()["usage"]
                choices = resp.json()["choices"]
                assert all(c["finish_reason"] in ("stop", "length") for c in choices)
                assert usage["completion_tokens"] <= LIMITS["max_tokens"] * len(choices)
            continue
        assert resp.status_code == 400, (body, resp.text)
        error = resp.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"]
        if refusal == "tokens":
            assert "--max-prompt-tokens" in error["message"]
        else:
            assert error["param"] == refusal, (body, error)
    assert {None, "n", "max_tokens", "choices", "tokens"} <= seen  # the draws reached every limit
    assert httpx.get(limited[0] + "/health", timeout=TIMEOUT).json() == {"status": "ok"}
    assert limited[1].stats()["requests_running"] == 0


def test_unset_max_tokens_is_capped_by_the_server_limit(limited):
    body = {"model": MODEL, "prompt": "fox", "temperature": 0, "ignore_eos": True}
    resp = httpx.post(limited[0] + "/v1/completions", json=body, timeout=TIMEOUT)
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] == LIMITS["max_tokens"]
    assert resp.json()["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(
    "field,value",
    [("max_n", 0), ("max_choices", -1), ("max_tokens", 0), ("max_prompt_chars", 1.5), ("max_prompt_tokens", True)],
)
def test_serve_config_refuses_bad_limits(field, value):
    with pytest.raises(ValueError, match=field):
        ServeConfig(model_name="m", **{field: value})


@pytest.mark.parametrize(
    "flag", ["--max-n", "--max-choices", "--max-tokens", "--max-prompt-chars", "--max-image-memory"]
)
def test_serve_command_refuses_bad_limits_before_loading(tmp_path, flag):
    proc = subprocess.run(
        [sys.executable, "-m", "cultengine.cli", "serve", "--model", str(tmp_path), flag, "0"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 2 and f"{flag} must be >= 1" in proc.stderr


# ------------------------------------------------------------------------------------------------
# E. Image memory is bounded across the requests in flight, not only per request
# ------------------------------------------------------------------------------------------------
def _png(size: tuple[int, int], color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _image_request(image: bytes) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image", "image": image}, "What is shown?"]}]}


def test_image_memory_refuses_what_does_not_fit_and_takes_nothing():
    memory = ImageMemory(100)
    memory.reserve(60)
    with pytest.raises(ServerBusy, match="--max-image-memory"):
        memory.reserve(41)
    assert memory.used == 60
    memory.reserve(40)
    memory.release(100)
    assert memory.used == 0
    with pytest.raises(ValueError, match="max_image_memory"):
        ImageMemory(0)


def test_requests_in_flight_share_one_image_memory_budget(tiny_llama):
    """Capacity for one request being prepared beside one admitted: while the engine thread is held, a
    second image request is refused; once the first finishes the same request is admitted; every path out
    (finish, abort, a prepare failure, a refusal by the scheduler) gives its bytes back."""
    engine = Engine(tiny_llama)
    image = _png((64, 48))
    estimate = 64 * 48 * PREPARE_BYTES_PER_PIXEL
    (prep,) = engine.prepare([_image_request(image)])
    kept = pixel_bytes(prep)
    assert 0 < kept < estimate
    loop = EngineLoop(engine, max_image_memory=estimate + kept - 1)
    params = SamplingParams(max_tokens=3, temperature=0)
    try:
        gate = _gated(loop)
        try:
            first = loop.generate(_image_request(image), params, 3, image_pixels=64 * 48)
            assert loop.image_memory.used == kept  # the estimate traded for the processed pixels
            with pytest.raises(ServerBusy):
                loop.generate(_image_request(image), params, 3, image_pixels=64 * 48)
            assert loop.image_memory.used == kept
            text_only = loop.generate({"prompt": "Name a country."}, params, 3)  # holds no image memory
        finally:
            gate.set()
        for f in (first, text_only):
            for r in f.result(TIMEOUT).results:
                r.result(TIMEOUT)
        assert loop.image_memory.used == 0
        again = loop.generate(_image_request(image), params, 3, image_pixels=64 * 48).result(TIMEOUT)
        again.results[0].result(TIMEOUT)
        assert loop.image_memory.used == 0

        gate = _gated(loop)  # aborted while running
        try:
            held = loop.generate(_image_request(image), SamplingParams(max_tokens=50), 50, image_pixels=64 * 48)
        finally:
            gate.set()
        loop.abort(held.result(TIMEOUT).request_id)
        with pytest.raises(CancelledError):
            held.result(TIMEOUT).results[0].result(TIMEOUT)
        _gated(loop).set()  # the abort has run
        assert loop.image_memory.used == 0

        with pytest.raises(RequestError):  # not an image: the engine's error, nothing kept
            loop.generate(_image_request(b"not a png"), params, 3, image_pixels=64 * 48)
        assert loop.image_memory.used == 0
        refused = loop.generate(_image_request(image), params, 10**6, image_pixels=64 * 48)
        with pytest.raises(RequestError):  # the scheduler refuses max_tokens past the context
            refused.result(TIMEOUT)
        assert loop.image_memory.used == 0
        assert loop.stats()["image_memory_capacity"] == estimate + kept - 1
    finally:
        loop.close()


def test_a_request_past_the_image_memory_gets_503_with_retry_after(tiny_llama):
    image = _png((64, 48))
    loop = EngineLoop(Engine(tiny_llama), max_image_memory=1000)
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    body = {
        "model": MODEL,
        "max_tokens": 2,
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What?"}],
            }
        ],
    }
    try:
        with BackgroundServer(build_app(loop, ServeConfig(model_name=MODEL))) as base:
            resp = httpx.post(base + "/v1/chat/completions", json=body, timeout=TIMEOUT)
            assert resp.status_code == 503, resp.text
            assert resp.headers["retry-after"] == "1"
            error = resp.json()["error"]
            assert error["code"] == "overloaded" and "--max-image-memory" in error["message"]
            text = httpx.post(
                base + "/v1/completions", json={"model": MODEL, "prompt": "fox", "max_tokens": 2}, timeout=TIMEOUT
            )
            assert text.status_code == 200, text.text
            metrics = httpx.get(base + "/metrics", timeout=TIMEOUT).text
            assert "cultengine_image_memory_bytes 0" in metrics
            assert "cultengine_image_memory_capacity_bytes 1000" in metrics
        assert loop.image_memory.used == 0
    finally:
        loop.close()
