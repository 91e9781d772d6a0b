"""cultengine: high-throughput inference for measuring how well VLMs understand the world's cultures."""

from .engine import Engine, RequestError
from .outputs import ChoiceScore, GenerationOutput, Sample, ScoreOutput
from .sampling import SamplingParams

__all__ = ["Engine", "RequestError", "SamplingParams", "GenerationOutput", "Sample", "ScoreOutput", "ChoiceScore"]
__version__ = "0.1.0"
