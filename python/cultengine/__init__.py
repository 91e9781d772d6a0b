"""cultengine: high-throughput inference for measuring how well VLMs understand the world's cultures."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from .version import __version__ as __version__

if TYPE_CHECKING:  # what editors and type checkers see; at run time the names load on first use
    from .engine import Engine, RequestError
    from .outputs import ChoiceScore, GenerationOutput, Logprob, Sample, ScoreOutput
    from .sampling import SamplingParams

__all__ = [
    "Engine",
    "RequestError",
    "SamplingParams",
    "GenerationOutput",
    "Sample",
    "ScoreOutput",
    "ChoiceScore",
    "Logprob",
]

# Loaded on first use, so that `cultengine --help` and the command line's argument errors do not import torch.
_HOMES = {
    "Engine": "engine",
    "RequestError": "engine",
    "SamplingParams": "sampling",
    "GenerationOutput": "outputs",
    "Sample": "outputs",
    "ScoreOutput": "outputs",
    "ChoiceScore": "outputs",
    "Logprob": "outputs",
}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'cultengine' has no attribute {name!r}")
    value = getattr(import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
