"""Errors shared by the checkpoint loader and the model families (kept apart so neither imports the other)."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""


# Architectures published in a remote-code layout (their own modelling code, `auto_map`, `trust_remote_code`)
# whose models cultengine runs in another layout: the error names the checkpoint to use instead.
REMOTE_CODE_LAYOUTS: dict[str, str] = {
    "InternVLChatModel": "InternVL's remote-code layout; use the transformers-native `-hf` checkpoint of the same "
    "model (e.g. OpenGVLab/InternVL3-8B-hf, architecture InternVLForConditionalGeneration)",
}


def unsupported_architecture(where: str, architecture: str, supported) -> CheckpointError:
    if architecture in REMOTE_CODE_LAYOUTS:
        return CheckpointError(
            f"{where}: architecture {architecture!r} is {REMOTE_CODE_LAYOUTS[architecture]}; "
            "cultengine never runs checkpoint code"
        )
    return CheckpointError(
        f"{where}: architecture {architecture!r} is not supported (supported: {', '.join(supported)})"
    )


def config_int(cfg: dict, key: str, where: str, minimum: int = 1) -> int:
    """`cfg[key]` as an int >= `minimum`, or a CheckpointError naming the field (never a ZeroDivisionError later)."""
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value or value < minimum:
        raise CheckpointError(f"{where}: {key} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def config_float(cfg: dict, key: str, where: str, positive: bool = True) -> float:
    """`cfg[key]` as a finite float (> 0 when `positive`), or a CheckpointError naming the field."""
    value = cfg.get(key)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or value != value
        or value in (float("inf"), float("-inf"))
    ):
        raise CheckpointError(f"{where}: {key} must be a number, got {value!r}")
    if positive and value <= 0:
        raise CheckpointError(f"{where}: {key} must be > 0, got {value!r}")
    return float(value)
