"""Type stubs for the Rust extension `cultengine._core` (see docs/ARCHITECTURE.md for the contracts)."""

import numpy as np
import numpy.typing as npt

class Tokenizer:
    @staticmethod
    def from_file(path: str) -> Tokenizer: ...
    @staticmethod
    def from_str(json: str) -> Tokenizer: ...
    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]: ...
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...
    def token_to_id(self, token: str) -> int | None: ...
    def id_to_token(self, id: int) -> str | None: ...
    @property
    def vocab_size(self) -> int: ...
    def expand_placeholders(
        self, ids: list[int], placeholder: int, replacements: list[list[int]]
    ) -> tuple[list[int], list[int]]: ...

class IncrementalDetokenizer:
    def __init__(self, tok: Tokenizer, skip_special_tokens: bool = True, stop: list[str] = ...) -> None: ...
    def push(self, token_id: int) -> tuple[str, bool]: ...
    @property
    def text(self) -> str: ...

class StepPlan:
    input_ids: npt.NDArray[np.int64]
    positions: npt.NDArray[np.int64]  # [position_rows, T]
    slot_mapping: npt.NDArray[np.int64]
    query_start_loc: npt.NDArray[np.int32]
    seq_lens: npt.NDArray[np.int32]
    block_tables: npt.NDArray[np.int32]
    seq_ids: npt.NDArray[np.int64]
    max_query_len: int
    max_seq_len: int
    sample_indices: npt.NDArray[np.int64]
    sample_seq_ids: npt.NDArray[np.int64]
    temperature: npt.NDArray[np.float32]
    top_p: npt.NDArray[np.float32]
    top_k: npt.NDArray[np.int32]
    seed: npt.NDArray[np.int64]
    output_index: npt.NDArray[np.int64]
    prompt_lp_indices: npt.NDArray[np.int64]
    prompt_lp_targets: npt.NDArray[np.int64]
    image_chunks: npt.NDArray[np.int64]  # [K, 3]: dst row, first embedding, length
    image_hashes: npt.NDArray[np.uint64]  # [K]
    block_copies: npt.NDArray[np.int64]  # [C, 2]: (src, dst) KV blocks to copy before the step runs
    prev_input_rows: npt.NDArray[np.int64]  # rows of input_ids whose token the previous plan samples
    prev_sample_index: npt.NDArray[np.int64]  # which of the previous plan's sampled tokens each row takes
    penalty_rows: npt.NDArray[np.int64]  # sample rows with a penalty; the arrays below are per such row
    repetition_penalty: npt.NDArray[np.float32]
    presence_penalty: npt.NDArray[np.float32]
    frequency_penalty: npt.NDArray[np.float32]
    penalty_token_loc: npt.NDArray[np.int64]  # [R+1]: row j's known tokens are penalty_tokens[loc[j]:loc[j+1]]
    penalty_tokens: npt.NDArray[np.int64]  # prompt then output tokens given back so far
    penalty_prompt_lens: npt.NDArray[np.int64]

class FinishedSequence:
    seq_id: int
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    output_logprobs: list[float]
    text: str
    finish_reason: str  # "stop" | "length" | "scored" | "abort"
    prompt_logprobs: list[float]
    prompt_greedy: list[bool]
    num_cached_tokens: int

class Scheduler:
    def __init__(
        self,
        tokenizer: Tokenizer,
        num_blocks: int,
        block_size: int = 16,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 8192,
        max_model_len: int = 4096,
        enable_prefix_caching: bool = True,
        eos_token_ids: list[int] = ...,
        position_rows: int = 1,
        max_num_image_tokens: int | None = None,
    ) -> None: ...
    def add_sequence(
        self,
        seq_id: int,
        prompt_ids: list[int],
        images: list[tuple[int, int, int, int, bool]],
        max_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = -1,
        seed: int = 0,
        stop: list[str] = ...,
        stop_token_ids: list[int] = ...,
        ignore_eos: bool = False,
        skip_special_tokens: bool = True,
        prompt_logprobs_from: int = -1,
        positions: list[int] = ...,
        position_delta: int = 0,
        stream: bool = False,
        repetition_penalty: float = 1.0,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
    ) -> None: ...
    def add_scoring(
        self,
        seq_id: int,
        context_ids: list[int],
        images: list[tuple[int, int, int, int, bool]],
        choices: list[list[int]],
        choice_ids: list[int],
        positions: list[int] = ...,
        position_delta: int = 0,
    ) -> None: ...
    def take_deltas(self) -> list[tuple[int, str]]: ...
    def abort(self, seq_id: int) -> FinishedSequence | None: ...
    def has_unfinished(self) -> bool: ...
    @property
    def num_waiting(self) -> int: ...
    @property
    def num_running(self) -> int: ...
    @property
    def num_in_flight(self) -> int: ...  # plans scheduled and not yet given back by update()
    def cancel_in_flight(self) -> None: ...  # after a failed step: drop those plans, recompute their sequences
    def schedule(self) -> StepPlan | None: ...
    def update(
        self,
        sampled: npt.NDArray[np.int64],
        sampled_logprobs: npt.NDArray[np.float32],
        prompt_logprobs: npt.NDArray[np.float32],
        prompt_is_greedy: npt.NDArray[np.bool_],
    ) -> list[FinishedSequence]: ...
    def stats(self) -> dict[str, int]: ...
