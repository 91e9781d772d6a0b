"""SamplingParams are checked completely when built, so a bad one never reaches the engine."""

import math

import numpy as np
import pytest

from cultengine.sampling import SamplingParams


@pytest.mark.parametrize(
    "kwargs",
    [
        {"stop": [1]},
        {"stop": [""]},
        {"stop": 5},
        {"stop": {"a": 1}},
        {"seed": 1.5},
        {"seed": "7"},
        {"seed": True},
        {"seed": -1},
        {"seed": 2**64},
        {"max_tokens": 2.5},
        {"max_tokens": 2.0},
        {"max_tokens": 0},
        {"max_tokens": 2**40},
        {"max_tokens": "8"},
        {"top_k": 2**40},
        {"top_k": 0},
        {"top_k": -2},
        {"top_k": 1.0},
        {"stop_token_ids": [-1]},
        {"stop_token_ids": [1.0]},
        {"stop_token_ids": 3},
        {"stop_token_ids": [2**40]},
        {"temperature": math.nan},
        {"temperature": math.inf},
        {"temperature": -0.1},
        {"temperature": "1"},
        {"top_p": math.nan},
        {"top_p": 0},
        {"top_p": 1.5},
        {"top_p": "0.5"},
        {"n": 0},
        {"n": 1.5},
        {"n": True},
        {"ignore_eos": 1},
        {"skip_special_tokens": "no"},
    ],
)
def test_bad_sampling_params_are_refused_at_construction(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs)).split("_ids")[0]):
        SamplingParams(**kwargs)


def test_good_sampling_params_are_normalised():
    p = SamplingParams(
        max_tokens=np.int64(8),
        temperature=1,
        top_p=np.float32(0.5),
        top_k=np.int32(5),
        seed=np.uint64(2**64 - 3),
        n=2,
        stop="\n",
        stop_token_ids=(4, np.int64(7)),
    )
    assert (p.max_tokens, p.top_k, p.seed, p.stop, p.stop_token_ids) == (8, 5, 2**64 - 3, ["\n"], [4, 7])
    assert type(p.max_tokens) is int and type(p.temperature) is float and type(p.stop_token_ids[1]) is int
    assert SamplingParams(stop=None, stop_token_ids=None).stop == []
    caller_stops = ["x"]
    q = SamplingParams(stop=caller_stops)
    caller_stops.append(7)  # editing the caller's list afterwards cannot smuggle in a bad stop
    assert q.stop == ["x"]
