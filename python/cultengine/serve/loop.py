"""The engine thread behind `cultengine serve`: one step loop, requests admitted between steps.

`EngineLoop` is the only code of the server that touches the engine's internals (`_prepare`, `_add`, `_add_scoring`,
`_step`, `_release`, the scheduler, the tokenizer and `_Prepared`'s `prompt_ids`), so it is the one seam
to move onto a public incremental engine API. Everything else talks to it through thread-safe calls that return
`concurrent.futures.Future`s (awaitable from asyncio with `asyncio.wrap_future`).

Every scheduler call happens on the engine thread; request preparation (chat template, image
decoding, tokenization) reads no engine state that changes, so it runs on the caller's thread and
overlaps the step loop.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field

from ..engine import NON_FINITE_LOGITS, Engine, RequestError
from ..outputs import ChoiceScore, Sample
from ..sampling import SamplingParams
from .metrics import TPOT_BUCKETS, TTFT_BUCKETS, Histogram


@dataclass
class Admitted:
    """A request whose sequences are in the scheduler; its `results` resolve as they finish.

    Generation: one `Sample` future per sample (in sample order). Scoring: one `ChoiceScore` future
    per choice. `prompt_tokens` counts the request's context tokens (images expanded).
    """

    request_id: int
    prompt_tokens: int
    results: list[Future]
    stream: queue.SimpleQueue | None = None  # generate(stream=True): (sample index, text) as it grows


@dataclass
class _Job:
    request_id: int
    prepared: object  # the engine's prepared request
    admitted: Future  # -> Admitted, or RequestError when the scheduler refuses it
    params: SamplingParams | None = None  # generation; None = scoring
    max_tokens: int | None = None  # None: up to the end of the context
    choices: list[str] = field(default_factory=list)
    results: list[Future] = field(default_factory=list)
    seq_ids: list[int] = field(default_factory=list)
    arrived: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    longest_output: int = 0
    stream: queue.SimpleQueue | None = None


class EngineLoop:
    """Runs `engine`'s step loop on one thread and admits requests from any thread between steps.

    Sequences of every admitted request run batched together (continuous batching across callers),
    sharing the prefix and encoder caches. `close()` stops the thread; requests still running then
    fail with `RuntimeError`.
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self._inbox: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._jobs: dict[int, _Job] = {}  # engine thread only
        self._owner: dict[int, tuple[_Job, int]] = {}  # seq id -> (job, result index); engine thread only
        self._next_request_id = 0
        self._id_lock = threading.Lock()
        self.counters = {
            "requests_admitted": 0,
            "requests_aborted": 0,
            "prompt_tokens": 0,
            "generation_tokens": 0,
            "step_errors": 0,
        }
        # Latency of finished generation requests (seconds): arrival to first token, then per token.
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)
        self._snapshot: dict = {}
        self._refresh_snapshot()
        self._thread = threading.Thread(target=self._run, name="cultengine-engine-loop", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ caller side (any thread)
    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def generate(
        self, request: dict, params: SamplingParams, max_tokens: int | None = None, stream: bool = False
    ) -> Future:
        """Admit one generation request (`params.n` samples); the future gives `Admitted`.

        `max_tokens=None` lets each sample run to the end of the context (`params.max_tokens` is
        ignored then); `stream` puts each sample's new text on `Admitted.stream` as the steps release it
        (the rest of a sample's text, held back for a possible stop string, comes with its result). A
        request the engine cannot prepare raises `RequestError` here.
        """
        arrived = time.perf_counter()
        prep = self._prepare_one(request)
        job = _Job(
            self._new_request_id(),
            prep,
            Future(),
            params=params,
            max_tokens=max_tokens,
            arrived=arrived,
            stream=queue.SimpleQueue() if stream else None,
        )
        job.results = [Future() for _ in range(params.n)]
        self._inbox.put(lambda: self._admit(job))
        return job.admitted

    def score(self, request: dict) -> Future:
        """Admit one scoring request (its `choices` continue its context); the future gives `Admitted`."""
        choices = request.get("choices")
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
            raise RequestError("a scoring request needs a non-empty 'choices' list of non-empty strings")
        prep = self._prepare_one(request)
        job = _Job(self._new_request_id(), prep, Future(), choices=list(choices))
        job.results = [Future() for _ in choices]
        self._inbox.put(lambda: self._admit(job))
        return job.admitted

    def abort(self, request_id: int) -> None:
        """Stop a request (its client went away): its sequences leave the scheduler, their KV blocks return."""
        self._inbox.put(lambda: self._abort(request_id))

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def token_texts(self, token_ids: list[int]) -> list[str]:
        """Each token's own text (special tokens included), as OpenAI's per-token log-probabilities show it."""
        return [self.engine.tokenizer.decode([t], skip_special_tokens=False) for t in token_ids]

    def stats(self) -> dict:
        """The engine's counters as of the last step, plus the loop's: admitted, aborted, queue lengths."""
        return dict(self._snapshot)

    def close(self) -> None:
        if self._thread.is_alive():
            self._inbox.put(None)
            self._thread.join()

    def _new_request_id(self) -> int:
        with self._id_lock:
            self._next_request_id += 1
            return self._next_request_id

    def _prepare_one(self, request: dict):
        (prep,) = self.engine._prepare([request])
        if isinstance(prep, Exception):
            raise prep if isinstance(prep, RequestError) else RequestError(str(prep))
        return prep

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        running = True
        while running:
            busy = self.engine.scheduler.has_unfinished()
            commands = []
            try:
                commands.append(self._inbox.get(block=not busy))
                while True:
                    commands.append(self._inbox.get_nowait())
            except queue.Empty:
                pass
            for cmd in commands:
                if cmd is None:
                    running = False
                    break
                cmd()
            if commands:
                self._refresh_snapshot()
            if running and self.engine.scheduler.has_unfinished():
                self._step()
                self._refresh_snapshot()
        # Whatever was queued behind the stop still resolves its futures (with the shutdown error).
        while not self._inbox.empty():
            cmd = self._inbox.get_nowait()
            if cmd is not None:
                cmd()
        self._fail_all(RuntimeError("the server is shutting down"))

    def _admit(self, job: _Job) -> None:
        if not job.admitted.set_running_or_notify_cancel():
            return  # the caller stopped waiting (its client went away) before admission
        for f in job.results:
            f.set_running_or_notify_cancel()  # from here on only this thread resolves them
        eng, prep = self.engine, job.prepared
        try:
            if job.params is not None:
                sp = job.params
                max_tokens = job.max_tokens or max(1, self.engine.max_model_len - len(prep.prompt_ids))
                for seed in sp.sample_seeds():
                    job.seq_ids.append(
                        seq_id := eng._add(
                            prep, max_tokens=max_tokens, stream=job.stream is not None, **sp.scheduler_kwargs(seed)
                        )
                    )
                    if sp.logprobs is not None:
                        eng._want_top_logprobs(seq_id, sp.logprobs)
            else:
                # As Engine.score: each choice tokenized on its own; the context computed once, the
                # choices forked from it.
                choice_ids = eng.tokenizer.encode_batch(job.choices, add_special_tokens=False)
                for text, ids in zip(job.choices, choice_ids, strict=True):
                    if not ids:
                        raise ValueError(f"choice {text!r} tokenizes to nothing")
                job.seq_ids.extend(eng._add_scoring(prep, [list(ids) for ids in choice_ids]))
        except Exception as e:  # ValueError: the scheduler refuses it (too long, ...)
            self._drop(job)
            job.admitted.set_exception(RequestError(str(e)) if isinstance(e, ValueError) else e)
            return
        self._jobs[job.request_id] = job
        for k, seq_id in enumerate(job.seq_ids):
            self._owner[seq_id] = (job, k)
        self.counters["requests_admitted"] += 1
        self.counters["prompt_tokens"] += len(prep.prompt_ids)
        job.admitted.set_result(Admitted(job.request_id, len(prep.prompt_ids), job.results, job.stream))

    def _step(self) -> None:
        try:
            finished, sampled_seq_ids, non_finite = self.engine._step()
        except Exception as e:  # a failed step fails what is running; the server goes on
            self.counters["step_errors"] += 1
            self._fail_all(RuntimeError(f"engine step failed: {type(e).__name__}: {e}"))
            return
        for seq_id in non_finite:  # NaN or infinite logits: that request fails, the others go on
            owner = self._owner.get(seq_id)
            if owner is not None and self._jobs.pop(owner[0].request_id, None) is not None:
                self._drop(owner[0])
                for f in owner[0].results:
                    if not f.done():
                        f.set_exception(RuntimeError(NON_FINITE_LOGITS))
        for seq_id, text in self.engine.scheduler.take_deltas():
            owner = self._owner.get(seq_id)
            if owner is not None and owner[0].stream is not None:
                owner[0].stream.put((owner[1], text))
        now = time.perf_counter()
        for seq_id in sampled_seq_ids.tolist():
            owner = self._owner.get(seq_id)
            if owner is not None and owner[0].first_token is None:
                owner[0].first_token = now
        for seq in finished:
            self.engine._release(seq.seq_id)
            owner = self._owner.pop(seq.seq_id, None)
            if owner is None:  # aborted between schedule and update
                continue
            job, k = owner
            self.counters["generation_tokens"] += len(seq.output_token_ids)
            if job.params is not None:
                result = Sample(
                    text=seq.text,
                    token_ids=list(seq.output_token_ids),
                    finish_reason=seq.finish_reason,
                    logprobs=list(seq.output_logprobs),
                    top_logprobs=self.engine._take_top_logprobs(seq),
                )
            else:
                lps = list(seq.prompt_logprobs)
                result = ChoiceScore(
                    text=job.choices[k],
                    logprob=float(sum(lps)),
                    num_tokens=len(lps),
                    is_greedy=all(seq.prompt_greedy),
                    token_logprobs=lps,
                )
            job.longest_output = max(job.longest_output, len(seq.output_token_ids))
            job.results[k].set_result(result)
            if all(f.done() for f in job.results):
                del self._jobs[job.request_id]
                self._observe_latency(job, now)

    def _observe_latency(self, job: _Job, now: float) -> None:
        if job.first_token is None:  # scoring: no token is sampled
            return
        self.ttft.observe(job.first_token - job.arrived)
        if job.longest_output > 1:
            self.tpot.observe((now - job.first_token) / (job.longest_output - 1))

    def _abort(self, request_id: int) -> None:
        job = self._jobs.pop(request_id, None)
        if job is None:  # already finished, or never admitted
            return
        self._drop(job)
        self.counters["requests_aborted"] += 1
        for f in job.results:
            if not f.done():
                f.set_exception(CancelledError(f"request {request_id} was aborted"))

    def _drop(self, job: _Job) -> None:
        """Take a job's sequences out of the scheduler and unpin their images."""
        for seq_id in job.seq_ids:
            self.engine.scheduler.abort(seq_id)
            self.engine._release(seq_id)
            self.engine._top_k.pop(seq_id, None)
            self.engine._top.pop(seq_id, None)
            self._owner.pop(seq_id, None)

    def _fail_all(self, error: Exception) -> None:
        for job in list(self._jobs.values()):
            self._drop(job)
            for f in job.results:
                if not f.done():
                    f.set_exception(error)
        self._jobs.clear()

    def _refresh_snapshot(self) -> None:
        sched = self.engine.scheduler
        self._snapshot = {
            **self.engine.stats(),
            **self.counters,
            "num_waiting": sched.num_waiting,
            "num_running": sched.num_running,
            "inbox": self._inbox.qsize(),
            "requests_running": len(self._jobs),
            "updated": time.time(),
        }
