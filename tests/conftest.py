"""Shared test setup: offline Hugging Face, import paths, session-cached tiny LLaVA checkpoints."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(_TESTS))  # tiny_checkpoints is importable from every test file
try:
    import cultengine  # noqa: F401
except ImportError:  # not installed (no `maturin develop` yet): use the source tree
    sys.path.insert(0, str(_TESTS.parent / "python"))

from tiny_checkpoints import build_tiny_llava  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory: `tiny_checkpoint("llama" | "qwen2" | "mistral") -> Path`, each built once per session."""
    cache: dict[str, Path] = {}

    def get(backbone: str = "llama") -> Path:
        if backbone not in cache:
            cache[backbone] = build_tiny_llava(tmp_path_factory.mktemp(f"tiny-{backbone}"), backbone)
        return cache[backbone]

    return get


@pytest.fixture(scope="session")
def tiny_llama(tiny_checkpoint) -> Path:
    return tiny_checkpoint("llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tiny_checkpoint) -> Path:
    return tiny_checkpoint("qwen2")


@pytest.fixture(scope="session")
def tiny_mistral(tiny_checkpoint) -> Path:
    return tiny_checkpoint("mistral")
