"""The small things a new user trips on: the Python API's progress bar only on a terminal, decoded tokens beside
the top log-probabilities (as vLLM's `Logprob.decoded_token`), unknown request keys refused, one `--device`
rule for every command, and strict JSON on the studies' stdout."""

from __future__ import annotations

import io
import json
import math
import pickle

import pytest

import cultengine
from cultengine import Engine, Logprob, SamplingParams, cli, console
from tiny_checkpoints import IMAGE_TOKEN


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return Engine(tiny_llama, dtype="float32", max_model_len=128)


class _Stderr(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize("tty", [False, True])
def test_the_api_shows_its_progress_bar_only_on_a_terminal(engine, monkeypatch, tty):
    err = _Stderr(tty)
    monkeypatch.setattr("sys.stderr", err)
    engine.generate("Hello", SamplingParams(max_tokens=2, ignore_eos=True))
    engine.score({"prompt": "Hello", "choices": ["a", "b"]})
    assert ("1/1" in err.getvalue() and "2/2" in err.getvalue()) == tty
    forced = _Stderr(False)
    monkeypatch.setattr("sys.stderr", forced)
    engine.generate("Hello", SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=True)
    assert "1/1" in forced.getvalue()  # asked for, it shows anywhere


def test_top_logprobs_carry_the_decoded_token(engine):
    out = engine.generate("Hello there", SamplingParams(max_tokens=3, ignore_eos=True, logprobs=2, prompt_logprobs=2))
    sample = out[0].samples[0]
    assert len(sample.top_logprobs) == 3
    for position, token in zip(sample.top_logprobs, sample.token_ids, strict=True):
        assert token in position and 2 <= len(position) <= 3
        for tid, lp in position.items():
            assert isinstance(lp, Logprob) and lp.logprob == float(lp) <= 0
            assert lp.decoded_token == engine.tokenizer.decode([tid], skip_special_tokens=False)
    prompt = out[0].prompt_top_logprobs
    assert prompt[0] == {} and all(
        p[t].decoded_token == engine.tokenizer.decode([t], skip_special_tokens=False)
        for p, t in zip(prompt[1:], out[0].prompt_token_ids[1:], strict=True)
    )
    # still a float where one was: arithmetic, JSON and pickling
    lp = sample.top_logprobs[0][sample.token_ids[0]]
    assert math.isclose(lp + 0.0, float(lp)) and json.loads(json.dumps({"lp": lp}))["lp"] == float(lp)
    again = pickle.loads(pickle.dumps(lp))
    assert (float(again), again.decoded_token) == (float(lp), lp.decoded_token)


@pytest.mark.parametrize(
    "request_, key",
    [
        ({"prompt": "Hello", "image": "flag.png"}, "'image'"),  # the singular: a typo, never silently ignored
        ({"prompt": "Hello", "max_tokens": 5}, "'max_tokens'"),  # a sampling parameter in the request
        ({"messages": [{"role": "user", "content": "Hi"}], "choicse": ["a"]}, "'choicse'"),
    ],
)
def test_unknown_request_keys_are_that_requests_error(engine, request_, key):
    good = {"prompt": "Hello"}
    outs = engine.generate([good, request_, good], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
    assert (
        outs[1].error.startswith(f"unknown request key(s) {key}")
        and "a request takes prompt, messages" in outs[1].error
    )
    assert outs[0].error is None and outs[2].error is None and outs[0].token_ids == outs[2].token_ids
    scored = engine.score([{**request_, "choices": ["a", "b"]}], use_tqdm=False)[0]
    assert key in scored.error and scored.best == -1


def test_known_request_keys_still_run(engine):
    img = {"prompt": f"{IMAGE_TOKEN} Which?", "images": [_png()]}
    vllm = {"prompt": f"{IMAGE_TOKEN} Which?", "multi_modal_data": {"image": _png()}}
    outs = engine.generate([img, vllm], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
    assert [o.error for o in outs] == [None, None] and outs[0].token_ids == outs[1].token_ids


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (20, 16), (30, 90, 160)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("cuda", [False, True])
@pytest.mark.parametrize("command", ["values", "stories", "ground", "bench"])
def test_every_command_has_one_device_rule(command, cuda, monkeypatch, tmp_path):
    """No --device: cuda when it is available, else cpu, for bench and the studies alike."""
    import torch

    from cultengine.bench import run as bench_run

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    seen = {}

    class Built(Exception):
        pass

    def build(model, **kwargs):
        seen.update(kwargs)
        raise Built

    monkeypatch.setattr(cultengine, "Engine", build)
    monkeypatch.setattr(bench_run, "_default_engine", lambda model, device, dtype, *_: build(model, device=device))
    (tmp_path / "items.jsonl").write_text(json.dumps({"id": "q1", "question": "Q?", "options": ["a", "b"]}) + "\n")
    (tmp_path / "human.csv").write_text("item_id,country,distribution\nq1,Peru,0.5|0.5\n")
    (tmp_path / "a.png").write_bytes(_png())
    (tmp_path / "entities.jsonl").write_text(json.dumps({"entity": "E", "country": "Peru"}) + "\n")
    out = str(tmp_path / "out")
    argv = {
        "values": [
            "values",
            "--out",
            out,
            "--items",
            str(tmp_path / "items.jsonl"),
            "--human",
            str(tmp_path / "human.csv"),
        ],
        "stories": ["stories", "--out", out, "--concepts", "rain", "--images", str(tmp_path / "a.png")],
        "ground": ["ground", "--out", out, "--input", str(tmp_path / "entities.jsonl")],
        "bench": ["bench", "--limit", "2", "--out", out],
    }[command]
    assert cli.main(argv) == 2  # the stand-in engine stops the command
    assert seen["device"] == ("cuda" if cuda else "cpu")
    for parser in (cli.build_parser(),):
        sub = parser._subparsers._group_actions[0].choices[command]
        device = next(a for a in sub._actions if "--device" in a.option_strings)
        assert device.default is None and "cuda when available, else cpu" in device.help


def test_json_safe_turns_undefined_numbers_into_null():
    data = {"a": float("nan"), "b": [1.0, float("inf"), {"c": -float("inf")}], "d": "NaN", "e": 2}
    assert json.dumps(console.json_safe(data), allow_nan=False) == (
        '{"a": null, "b": [1.0, null, {"c": null}], "d": "NaN", "e": 2}'
    )


def test_values_prints_strict_json(tmp_path, capsys):
    """One country with one image: the image-minus-text interval is undefined (too few clusters), and stdout
    says null where it used to print NaN (not JSON)."""
    from PIL import Image

    (tmp_path / "items.jsonl").write_text(
        json.dumps({"id": "q1", "question": "Family?", "options": ["Very", "Not"], "topic": "family"}) + "\n"
    )
    (tmp_path / "human.csv").write_text("item_id,country,distribution\nq1,Japan,0.8|0.2\n")
    Image.new("RGB", (32, 32), "white").save(tmp_path / "sushi.jpg")
    (tmp_path / "images.csv").write_text("country,category,image\nJapan,food,sushi.jpg\n")
    argv = ["values", "--out", str(tmp_path / "run"), "--items", str(tmp_path / "items.jsonl")]
    argv += ["--human", str(tmp_path / "human.csv"), "--images", str(tmp_path / "images.csv"), "--quiet"]
    assert cli.main([*argv, "--device", "cpu", "--threads", "1"]) == 0
    stdout = capsys.readouterr().out
    summary = json.loads(stdout[: stdout.rindex("}") + 1], parse_constant=lambda c: pytest.fail(f"{c} on stdout"))
    assert summary["delta_by_category"]["food"]["low"] is None
