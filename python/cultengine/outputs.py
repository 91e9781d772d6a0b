"""What `Engine.generate` and `Engine.score` return."""

from __future__ import annotations

from dataclasses import dataclass, field


class Logprob(float):
    """A token's log-probability (it is the float) with the token's text, as vLLM's `Logprob.decoded_token`:
    the values of `top_logprobs` / `prompt_top_logprobs`, keyed by token id."""

    decoded_token: str

    def __new__(cls, logprob: float, decoded_token: str = ""):
        self = super().__new__(cls, logprob)
        self.decoded_token = decoded_token
        return self

    @property
    def logprob(self) -> float:
        return float(self)

    def __repr__(self) -> str:
        return f"Logprob({float(self)!r}, decoded_token={self.decoded_token!r})"

    def __reduce__(self):
        return Logprob, (float(self), self.decoded_token)


@dataclass
class Sample:
    """One generated continuation."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) | "length"
    logprobs: list[float]  # log-probability of each generated token under the model
    # SamplingParams(logprobs=k): the k most likely tokens per position (and the sampled one), id -> Logprob
    top_logprobs: list[dict[int, Logprob]] | None = None


@dataclass
class GenerationOutput:
    """The result of one generation request: `n` samples, or an error that names what was wrong."""

    index: int
    prompt_token_ids: list[int]
    samples: list[Sample] = field(default_factory=list)
    error: str | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    # SamplingParams(prompt_logprobs=k): each prompt token's log-prob (None for the first) and the k most
    # likely tokens at its position ({} for the first)
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[dict[int, Logprob]] | None = None

    # The first sample's fields, for the common n=1 case.
    @property
    def text(self) -> str:
        return self.samples[0].text if self.samples else ""

    @property
    def token_ids(self) -> list[int]:
        return self.samples[0].token_ids if self.samples else []

    @property
    def finish_reason(self) -> str:
        return self.samples[0].finish_reason if self.samples else "error"

    @property
    def logprobs(self) -> list[float]:
        return self.samples[0].logprobs if self.samples else []


@dataclass
class ChoiceScore:
    """Log-likelihood of one choice continuing the request's context."""

    text: str
    logprob: float  # summed log-probability of the choice tokens
    num_tokens: int
    is_greedy: bool  # every choice token is the argmax continuation
    token_logprobs: list[float] = field(default_factory=list)

    @property
    def logprob_per_token(self) -> float:
        return self.logprob / max(self.num_tokens, 1)


@dataclass
class ScoreOutput:
    index: int
    choices: list[ChoiceScore] = field(default_factory=list)
    error: str | None = None

    @property
    def best(self) -> int:
        """Index of the choice with the highest summed log-probability (-1 on error)."""
        if not self.choices:
            return -1
        return max(range(len(self.choices)), key=lambda i: self.choices[i].logprob)
