"""The engine thread behind `cultengine serve`: one step loop, requests admitted between steps.

`EngineLoop` drives the engine through its step API (`prepare`, `add_request`, `add_scoring`, `step`, `release`,
`abort`, `take_top_logprobs`) and reads its scheduler's queues and streamed text; everything else talks to it
through thread-safe calls that return `concurrent.futures.Future`s (awaitable from asyncio with
`asyncio.wrap_future`).

Every scheduler call happens on the engine thread; request preparation (chat template, image
decoding, tokenization) reads no engine state that changes, so it runs on the caller's thread and
overlaps the step loop.

Fairness: a request's first sequence enters the scheduler when it is admitted; its other samples wait in the
loop and are fed in round-robin between requests, so the scheduler never holds more than
`max_in_scheduler` of them (twice `max_num_seqs` by default: one batch running, one waiting). A large `n`
then cannot queue thousands of sequences ahead of a later client: that client's sequence waits behind at most
`max_in_scheduler` others. Each result's bookkeeping is O(1) (a count of the results still open per request).

Memory: each request's images are capped on their own (the HTTP layer's pixel limit); `ImageMemory` caps what
all requests in flight hold together. A request reserves an estimate from its images' header sizes before they
are decoded, trades it for the bytes its processed pixels really take once prepared, and gives those back when
it finishes, fails or is aborted. A request that does not fit is refused with `ServerBusy` (HTTP 503) rather
than queued, so concurrent uploads cannot together exhaust the host.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field

from ..engine import NON_FINITE_LOGITS, Engine, RequestError
from ..outputs import ChoiceScore, Sample
from ..sampling import SamplingParams
from .metrics import TPOT_BUCKETS, TTFT_BUCKETS, Histogram

DEFAULT_IMAGE_MEMORY = 8 << 30
# Bytes a source pixel can take while an image is prepared: the decoded RGB(A) image (PIL keeps 4 bytes per
# pixel) and a float32 copy of it (12) that the processor resizes from.
PREPARE_BYTES_PER_PIXEL = 16


class ServerBusy(Exception):
    """The requests in flight already hold the image memory this server allows: retry later (HTTP 503)."""


class ImageMemory:
    """Bytes of image data held by the requests in flight, capped at `capacity` (thread-safe)."""

    def __init__(self, capacity: int):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"max_image_memory must be a positive integer (bytes), got {capacity!r}")
        self.capacity = capacity
        self.used = 0
        self._lock = threading.Lock()

    def reserve(self, nbytes: int) -> None:
        """Take `nbytes`, or raise `ServerBusy` (taking nothing) when they do not fit beside what is held."""
        with self._lock:
            if nbytes > 0 and self.used + nbytes > self.capacity:
                raise ServerBusy(
                    f"the server holds {self.used:,} of its {self.capacity:,} bytes of image memory for requests "
                    f"in flight and this request needs {nbytes:,} more (--max-image-memory); retry later"
                )
            self.used += nbytes

    def release(self, nbytes: int) -> None:
        with self._lock:
            self.used -= nbytes


def pixel_bytes(prepared) -> int:
    """Bytes of the processed pixels a prepared request keeps until it finishes."""
    return sum(f.pixels.element_size() * f.pixels.nelement() for f in prepared.images.values())


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
    open_results: int = 0  # results not yet resolved: the request is done at 0
    pending: deque = field(default_factory=deque)  # (result index, seed) of samples not yet in the scheduler
    image_bytes: int = 0  # reserved in the loop's ImageMemory until the job ends


class EngineLoop:
    """Runs `engine`'s step loop on one thread and admits requests from any thread between steps.

    Sequences of every admitted request run batched together (continuous batching across callers),
    sharing the prefix and encoder caches. `close()` stops the thread; requests still running then
    fail with `RuntimeError`.
    """

    def __init__(
        self, engine: Engine, max_in_scheduler: int | None = None, max_image_memory: int = DEFAULT_IMAGE_MEMORY
    ):
        """`max_in_scheduler`: most sequences the loop keeps in the scheduler at once (running or waiting)
        before it holds back further samples of admitted requests (default: 2 x the engine's max_num_seqs).
        `max_image_memory`: bytes of image data all requests in flight may hold together (see the module's doc)."""
        self.engine = engine
        self.image_memory = ImageMemory(max_image_memory)
        limit = 2 * engine.max_num_seqs if max_in_scheduler is None else max_in_scheduler
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"max_in_scheduler must be a positive integer, got {limit!r}")
        self.max_in_scheduler = limit
        self._feeding: deque[_Job] = deque()  # jobs with samples not yet in the scheduler; round-robin order
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
        self,
        request: dict,
        params: SamplingParams,
        max_tokens: int | None = None,
        stream: bool = False,
        *,
        max_tokens_limit: int | None = None,
        max_prompt_tokens: int | None = None,
        image_pixels: int = 0,
    ) -> Future:
        """Admit one generation request (`params.n` samples); the future gives `Admitted`.

        `max_tokens=None` lets each sample run to the end of the context, or `max_tokens_limit` tokens if
        that comes first (`params.max_tokens` is ignored then); `stream` puts each sample's new text on
        `Admitted.stream` as the steps release it (the rest of a sample's text, held back for a possible stop
        string, comes with its result). A request the engine cannot prepare, or whose prompt is longer than
        `max_prompt_tokens` (images expanded), raises `RequestError` here; `image_pixels` (the request's images'
        pixels, from their headers) sizes its share of the image memory, and `ServerBusy` says it does not fit.
        """
        arrived = time.perf_counter()
        prep, image_bytes = self._prepare_one(request, max_prompt_tokens, image_pixels)
        if max_tokens is None and max_tokens_limit is not None:
            max_tokens = max(1, min(max_tokens_limit, self.engine.max_model_len - len(prep.prompt_ids)))
        job = _Job(
            self._new_request_id(),
            prep,
            Future(),
            params=params,
            max_tokens=max_tokens,
            arrived=arrived,
            stream=queue.SimpleQueue() if stream else None,
            image_bytes=image_bytes,
        )
        job.results = [Future() for _ in range(params.n)]
        job.open_results = params.n
        self._inbox.put(lambda: self._admit(job))
        return job.admitted

    def score(self, request: dict, max_prompt_tokens: int | None = None, image_pixels: int = 0) -> Future:
        """Admit one scoring request (its `choices` continue its context); the future gives `Admitted`.
        A context longer than `max_prompt_tokens` (images expanded) raises `RequestError`; `image_pixels` as
        for `generate`."""
        choices = request.get("choices")
        if problem := self.engine.choices_problem(choices):  # what Engine.score refuses, refused alike
            raise RequestError(problem)
        prep, image_bytes = self._prepare_one(request, max_prompt_tokens, image_pixels)
        job = _Job(self._new_request_id(), prep, Future(), choices=list(choices), image_bytes=image_bytes)
        job.results = [Future() for _ in choices]
        job.open_results = len(choices)
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

    def _prepare_one(self, request: dict, max_prompt_tokens: int | None, image_pixels: int):
        """The prepared request and the image-memory bytes it now holds (the caller's job gives them back)."""
        estimate = image_pixels * PREPARE_BYTES_PER_PIXEL
        self.image_memory.reserve(estimate)
        held = estimate
        try:
            (prep,) = self.engine.prepare([request])
            if isinstance(prep, Exception):
                raise prep if isinstance(prep, RequestError) else RequestError(str(prep))
            if max_prompt_tokens is not None and len(prep.prompt_ids) > max_prompt_tokens:
                raise RequestError(
                    f"the prompt is {len(prep.prompt_ids)} tokens (images expanded); this server takes at most "
                    f"{max_prompt_tokens} (--max-prompt-tokens)"
                )
            kept = pixel_bytes(prep)  # the decoded images are gone; the processed pixels stay until the end
            if kept > held:
                self.image_memory.reserve(kept - held)
            else:
                self.image_memory.release(held - kept)
            held = kept
        except BaseException:
            self.image_memory.release(held)
            raise
        return prep, held

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        running = True
        while running:
            busy = self.engine.scheduler.has_unfinished() or bool(self._feeding)
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
            if running:
                self._feed()
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
            self._release_images(job)
            return  # the caller stopped waiting (its client went away) before admission
        for f in job.results:
            f.set_running_or_notify_cancel()  # from here on only this thread resolves them
        eng, prep = self.engine, job.prepared
        try:
            if job.params is not None:
                sp = job.params
                if job.max_tokens is None:
                    job.max_tokens = max(1, self.engine.max_model_len - len(prep.prompt_ids))
                job.pending.extend(enumerate(sp.sample_seeds()))
                # The first sample now: the scheduler refuses the request (too long, ...) here, and a new
                # request always has a sequence in the queue; the others follow as there is room (`_feed`).
                self._add_sample(job)
            else:
                # As Engine.score: each choice tokenized on its own; the context computed once, the
                # choices forked from it.
                choice_ids = eng.tokenizer.encode_batch(job.choices, add_special_tokens=False)
                for text, ids in zip(job.choices, choice_ids, strict=True):
                    if not ids:
                        raise ValueError(f"choice {text!r} tokenizes to nothing")
                job.seq_ids.extend(eng.add_scoring(prep, [list(ids) for ids in choice_ids]))
                for k, seq_id in enumerate(job.seq_ids):
                    self._owner[seq_id] = (job, k)
        except Exception as e:  # ValueError: the scheduler refuses it (too long, ...)
            self._drop(job)
            job.admitted.set_exception(RequestError(str(e)) if isinstance(e, ValueError) else e)
            return
        self._jobs[job.request_id] = job
        if job.pending:
            self._feeding.append(job)
        self.counters["requests_admitted"] += 1
        self.counters["prompt_tokens"] += len(prep.prompt_ids)
        job.admitted.set_result(Admitted(job.request_id, len(prep.prompt_ids), job.results, job.stream))

    def _add_sample(self, job: _Job) -> None:
        """Put the job's next pending sample into the scheduler."""
        k, seed = job.pending.popleft()
        sp = job.params
        seq_id = self.engine.add_request(
            job.prepared,
            max_tokens=job.max_tokens,
            logprobs=sp.logprobs,
            stream=job.stream is not None,
            **sp.scheduler_kwargs(seed),
        )
        job.seq_ids.append(seq_id)
        self._owner[seq_id] = (job, k)

    def _feed(self) -> None:
        """Top the scheduler up to `max_in_scheduler` sequences with pending samples, one per request in
        turn (round-robin), so requests that arrive later are not queued behind a large one's samples."""
        room = self.max_in_scheduler - len(self._owner)
        while room > 0 and self._feeding:
            job = self._feeding.popleft()
            if job.request_id not in self._jobs or not job.pending:  # aborted or failed meanwhile
                continue
            try:
                self._add_sample(job)
            except Exception as e:  # noqa: BLE001 - as at admission: this request fails, the others go on
                self._jobs.pop(job.request_id, None)
                self._drop(job)
                for f in job.results:
                    if not f.done():
                        f.set_exception(RuntimeError(f"could not schedule a sample: {type(e).__name__}: {e}"))
                continue
            room -= 1
            if job.pending:
                self._feeding.append(job)

    def _step(self) -> None:
        try:
            finished, sampled_seq_ids, non_finite = self.engine.step()
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
            self.engine.release(seq.seq_id)
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
                    top_logprobs=self.engine.take_top_logprobs(seq),
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
            job.open_results -= 1
            if job.open_results == 0:  # before the last result wakes its waiter, who may read stats()
                del self._jobs[job.request_id]
                self._release_images(job)
                self._observe_latency(job, now)
                self._refresh_snapshot()
            job.results[k].set_result(result)

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

    def _release_images(self, job: _Job) -> None:
        self.image_memory.release(job.image_bytes)
        job.image_bytes = 0
        job.prepared = None  # the pixels go with the last reference

    def _drop(self, job: _Job) -> None:
        """Take a job's sequences out of the scheduler, unpin their images and give back their memory."""
        self._release_images(job)
        job.pending.clear()
        for seq_id in job.seq_ids:
            self.engine.abort(seq_id)
            self._owner.pop(seq_id, None)

    def _fail_all(self, error: Exception) -> None:
        for job in list(self._jobs.values()):
            self._drop(job)
            for f in job.results:
                if not f.done():
                    f.set_exception(error)
        self._jobs.clear()
        self._feeding.clear()

    def _refresh_snapshot(self) -> None:
        sched = self.engine.scheduler
        self._snapshot = {
            **self.engine.stats(),
            **self.counters,
            "num_waiting": sched.num_waiting,
            "num_running": sched.num_running,
            "inbox": self._inbox.qsize(),
            "requests_running": len(self._jobs),
            "sequences_held_back": sum(len(job.pending) for job in self._feeding),
            "image_memory_bytes": self.image_memory.used,
            "image_memory_capacity": self.image_memory.capacity,
            "updated": time.time(),
        }
