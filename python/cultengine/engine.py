"""The public engine: requests in, generations and choice scores out.

Python prepares requests (chat template, images, tokenization through the Rust tokenizer), hands
whole sequences to the Rust scheduler, and then only moves flat arrays between the scheduler, the
model runner and the sampler — nothing on the hot path runs per token in Python.
"""

from __future__ import annotations

import os
import time
import warnings
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from . import _core
from .checkpoint import config_errors, load_checkpoint
from .models import SUPPORTED_ARCHITECTURES, family_for
from .ops import Ops, resolve_backend, set_cpu_threads
from .outputs import ChoiceScore, GenerationOutput, Logprob, Sample, ScoreOutput
from .parallel import model_and_workers
from .prepare import Prepared, Preparer, Request, RequestError, as_list, describe
from .runner import Launched, ModelRunner
from .sampling import SamplingParams, checked_int, generation_defaults
from .step_clock import StepClock
from .top_logprobs import TopLogprobs


class StepOutput(NamedTuple):
    """What one `Engine.step` gives back: the sequences that finished (`FinishedSequence`s; `release` each),
    the ids of the sequences that sampled a token, and those whose logits were not finite."""

    finished: list
    sampled_seq_ids: np.ndarray
    non_finite: set[int]


class Engine:
    """A loaded checkpoint with its paged KV cache, scheduler and caches, ready to generate and score.

    `model` is a local Hugging Face checkpoint directory (any architecture in `cultengine.models.FAMILIES`)
    or "demo" (the small random-weight demo checkpoint, built on first use). Requests are dicts:
    `{"prompt": str, "images": [...]}` (the checkpoint's image placeholder marks each image),
    `{"messages": [...]}` (rendered with the checkpoint's chat template), vLLM's
    `{"prompt": str, "multi_modal_data": {"image": img or [imgs]}}`, or a plain prompt string; images are
    paths, bytes or PIL images. `generate` and `score` take one request or a list and return a list.
    A bad request gets `.error` on its output and never stops the others.
    """

    def __init__(
        self,
        model: str | os.PathLike,
        device: str = "cpu",
        dtype: str = "auto",
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 8192,
        block_size: int = 16,
        num_blocks: int | None = None,
        kv_cache_memory: int | None = None,
        enable_prefix_caching: bool = True,
        attention_backend: str | None = None,
        max_model_len: int | None = None,
        encoder_cache_size: int = 256,
        random_init: bool = False,
        profile: bool = False,
        cuda_graphs: bool = True,
        image_backend: str | None = None,
        max_num_image_tokens: int | None = None,
        threads: int | None = None,
        image_options: dict | None = None,
        cascade_attention: bool | None = None,
        overlap_scheduling: bool | None = None,
        generation_config: str = "auto",
        chat_template: str | None = None,
        tensor_parallel_size: int = 1,
    ):
        """`random_init` draws weights instead of reading them (profiling model shapes); `profile`
        synchronises the device around each phase to time it and records per-request latencies;
        `cuda_graphs` replays decode steps from CUDA graphs (CUDA with the Triton backend only);
        `image_backend` ("pil" | "torchvision") overrides the preprocessing path transformers would pick;
        `max_num_image_tokens` caps the image embeddings a step starts (each image's encoder runs whole
        in the step that first reaches it; many-tile images then spread over steps); `threads` sets torch's
        CPU threads (default: the cores this process may run on, unless OMP_NUM_THREADS is set);
        `image_options` are defaults for the request keys the family reads from requests
        (`family.image_options`, e.g. Qwen's `min_pixels`/`max_pixels`); `cascade_attention` lets decode
        steps read the KV blocks their sequences share (an image asked many ways) once per group (default:
        on the Triton backend, where decode is bound by reading the cache; the torch backend's reference
        computes the same attention no faster on a CPU, measured in benches/bench_generate.py);
        `overlap_scheduling` schedules and launches step N+1 before step N's tokens come back to the host, so
        the host's work hides behind the device's (outputs identical to the synchronous loop,
        `overlap_scheduling=False`; default: on CUDA only, since on a CPU the forward pass runs in the
        launching thread and nothing overlaps); `generation_config="auto"` takes the checkpoint's
        generation_config.json temperature / top_p / top_k as the defaults of SamplingParams fields left
        unset (as vLLM does; "none": greedy, no truncation; what was taken is in `provenance()`);
        `chat_template` names one of the checkpoint's named chat templates (default: "default");
        `tensor_parallel_size` > 1 splits the decoder over that many processes, one per rank (`parallel.py`;
        CUDA: one GPU each, cuda:0..N-1; `close()` stops them)."""
        # Sizes are checked first: 0 or a negative one would fail deep in the KV cache, or (max_model_len=0)
        # quietly mean "the model's context".
        sizes = dict(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, block_size=block_size)
        sizes["tensor_parallel_size"] = tensor_parallel_size
        unset_means_auto = dict(num_blocks=num_blocks, max_model_len=max_model_len)
        for name, value in {**sizes, **{k: v for k, v in unset_means_auto.items() if v is not None}}.items():
            checked_int(name, value, 1)
        set_cpu_threads(threads)
        if str(model) == "demo":
            from .bench.demo_checkpoint import ensure

            model = ensure()
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device='cuda' was asked for but torch sees no CUDA device")
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)  # Triton launches and graph capture use the current device
        self.checkpoint = load_checkpoint(
            model, dtype=dtype, device=self.device, random_init=random_init, architectures=SUPPORTED_ARCHITECTURES
        )
        with config_errors(self.checkpoint):
            self.family = family_for(self.checkpoint, image_backend)
        self.tokenizer = self.checkpoint.tokenizer()
        where = str(self.checkpoint.path / "generation_config.json")
        self.sampling_defaults, self._unfollowed = generation_defaults(
            self.checkpoint.generation_config, where, generation_config
        )
        if self._unfollowed:
            warnings.warn(
                f"{where} sets {self._unfollowed}, which cultengine's sampler does not implement; "
                "sampled outputs differ from transformers' generate there (greedy ones do not)",
                stacklevel=2,
            )
        self.preparer = Preparer(self.checkpoint, self.family, self.tokenizer, chat_template, image_options)
        self.image_token = self.preparer.image_token
        self.ops = Ops(resolve_backend(self.device, attention_backend))
        context = self.family.max_context
        self.max_model_len = min(max_model_len or context, context)
        self.max_num_seqs = max_num_seqs
        with config_errors(self.checkpoint):
            self.model, self.workers = model_and_workers(
                self.checkpoint, self.family, self.ops, self.max_model_len, tensor_parallel_size, threads
            )
        # Decode graphs replay one rank's kernels: with tensor parallelism the steps run eagerly.
        graphs = cuda_graphs and self.device.type == "cuda" and self.ops.backend == "triton" and self.workers is None
        caps = self.family.capabilities
        self.runner = ModelRunner(
            self.model,
            self.device,
            self.checkpoint.dtype,
            block_size,
            num_blocks,
            kv_cache_memory,
            max_num_seqs,
            self.max_model_len,
            encoder_cache_size,
            cuda_graphs=graphs,
            position_rows=caps.position_rows,
            bidirectional_images=caps.bidirectional_images,
            cascade=self.ops.backend == "triton" if cascade_attention is None else cascade_attention,
        )
        self.scheduler = _core.Scheduler(
            self.tokenizer,
            num_blocks=self.runner.num_blocks,
            block_size=block_size,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=self.max_model_len,
            enable_prefix_caching=enable_prefix_caching,
            eos_token_ids=list(self.checkpoint.eos_token_ids),
            position_rows=caps.position_rows,
            max_num_image_tokens=max_num_image_tokens,
        )
        self._next_seq_id = 0
        self._seq_images: dict[int, list[int]] = {}  # in-flight sequence -> image hashes it pins
        self._contexts: dict[int, list[int]] = {}  # a scoring context not yet forked -> its choices' ids
        self._context_of: dict[int, int] = {}  # such a choice -> its context
        self._top = TopLogprobs(self.tokenizer)  # SamplingParams(logprobs=k, prompt_logprobs=k)
        self._counters = {"prompt_tokens": 0, "generated_tokens": 0, "run_seconds": 0.0}
        self.overlap_scheduling = self.device.type == "cuda" if overlap_scheduling is None else overlap_scheduling
        self._in_flight: Launched | None = None  # overlapped: the step launched, its results not yet applied
        self.clock = StepClock(self.device, profile)  # profile: seconds per phase, per-request latencies
        if self.ops.backend != "torch":
            self._warm_up()

    # -------------------------------------------------------------------------------------------
    # Public API
    # -------------------------------------------------------------------------------------------
    def generate(
        self,
        requests: Request | list[Request],
        params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool | None = None,
    ) -> list[GenerationOutput]:
        """Generate for every request (one SamplingParams for all, or one per request); returns one
        `GenerationOutput` per request, in order. A bad request gets `.error`, the others run."""
        requests = as_list(requests)
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(requests)
        if len(params_list) != len(requests):
            raise ValueError(f"{len(params_list)} SamplingParams for {len(requests)} requests")
        params_list = [sp.with_defaults(self.sampling_defaults) for sp in params_list]
        prepared = self.prepare(requests)
        outputs = [
            GenerationOutput(index=i, prompt_token_ids=p.prompt_ids if isinstance(p, Prepared) else [])
            for i, p in enumerate(prepared)
        ]
        owners: dict[int, tuple[int, int]] = {}
        with self._call_guard():
            for i, (prep, sp) in enumerate(zip(prepared, params_list, strict=True)):
                if isinstance(prep, Exception):
                    outputs[i].error = str(prep)
                    continue
                outputs[i].samples = [None] * sp.n
                try:
                    for k, seed in enumerate(sp.sample_seeds()):
                        # The prompt's log-probs are the same for every sample: the first one gathers them.
                        prompt_lps = sp.prompt_logprobs is not None and k == 0
                        seq_id = self.add_request(
                            prep,
                            max_tokens=sp.max_tokens,
                            prompt_logprobs_from=1 if prompt_lps else -1,
                            logprobs=sp.logprobs,
                            **sp.scheduler_kwargs(seed),
                        )
                        owners[seq_id] = (i, k)
                        if prompt_lps:
                            self._top.want_prompt(seq_id, sp.prompt_logprobs)
                except Exception as e:  # noqa: BLE001 - whatever one request raises is that request's error
                    self._abort_request(owners, i)
                    outputs[i].error, outputs[i].samples = describe(e), []

            def on_finished(seq, error: str | None) -> None:
                i, k = owners[seq.seq_id]
                if error or outputs[i].error:
                    self._abort_request(owners, i)
                    outputs[i].error, outputs[i].samples = outputs[i].error or error, []
                    return
                outputs[i].samples[k] = Sample(
                    text=seq.text,
                    token_ids=list(seq.output_token_ids),
                    finish_reason=seq.finish_reason,
                    logprobs=list(seq.output_logprobs),
                    top_logprobs=self.take_top_logprobs(seq),
                )
                outputs[i].num_cached_tokens = max(outputs[i].num_cached_tokens, seq.num_cached_tokens)
                if (prompt := self._top.take_prompt(seq)) is not None:
                    outputs[i].prompt_logprobs, outputs[i].prompt_top_logprobs = prompt

            self._run(len(owners), use_tqdm, on_finished)
        return outputs

    def score(self, requests: Request | list[Request], use_tqdm: bool | None = None) -> list[ScoreOutput]:
        """Log-likelihood of each of a request's `choices` continuing its prompt; one `ScoreOutput` per
        request, in order.

        The context (images + prompt) is one shared prefix: the first choice computes it, the others
        find its full blocks in the prefix cache, and all choices of all requests run batched.
        """
        requests = as_list(requests)
        prepared = self.prepare(requests)
        outputs = [ScoreOutput(index=i) for i in range(len(requests))]
        choice_texts: list[tuple[int, int, str]] = []
        for i, (req, prep) in enumerate(zip(requests, prepared, strict=True)):
            choices = req.get("choices") if isinstance(prep, Prepared) else None
            if isinstance(prep, Exception):
                outputs[i].error = str(prep)
            elif problem := self.choices_problem(choices):
                outputs[i].error = problem
            else:
                choice_texts += [(i, j, c) for j, c in enumerate(choices)]
        # Choice tokens: tokenised on their own so every choice shares the context's exact tokens.
        choice_ids = self.preparer.encode_choices(choice_texts, outputs)
        by_request: dict[int, list[list[int]]] = {}
        for (i, _, text), ids in zip(choice_texts, choice_ids, strict=True):
            if not ids and not outputs[i].error:
                outputs[i].error = f"choice {text!r} tokenizes to nothing"
            by_request.setdefault(i, []).append(list(ids))
        owners: dict[int, tuple[int, int]] = {}
        with self._call_guard():
            for i, choices in by_request.items():
                if outputs[i].error:
                    continue
                outputs[i].choices = [None] * len(choices)
                try:
                    for j, seq_id in enumerate(self.add_scoring(prepared[i], choices)):
                        owners[seq_id] = (i, j)
                except Exception as e:  # noqa: BLE001 - whatever one request raises is that request's error
                    outputs[i].error, outputs[i].choices = describe(e), []

            def on_finished(seq, error: str | None) -> None:
                i, j = owners[seq.seq_id]
                if error or outputs[i].error:
                    self._abort_request(owners, i)
                    outputs[i].error, outputs[i].choices = outputs[i].error or error, []
                    return
                lps = list(seq.prompt_logprobs)
                outputs[i].choices[j] = ChoiceScore(
                    text=requests[i]["choices"][j],
                    logprob=float(sum(lps)),
                    num_tokens=len(lps),
                    is_greedy=all(seq.prompt_greedy),
                    token_logprobs=lps,
                )

            self._run(len(owners), use_tqdm, on_finished)
        return outputs

    def choices_problem(self, choices) -> str | None:
        """Why `choices` cannot be scored (None: they can); see `Preparer.choices_problem`."""
        return self.preparer.choices_problem(choices)

    def image_processor(self, src, options: dict | None = None):
        """One image source (path, bytes or PIL image) to its family's features."""
        return self.preparer.image_processor(src, options)

    def close(self) -> None:
        """Stop the tensor-parallel worker processes (nothing to do on one rank); the engine is unusable after."""
        if self.workers is not None:
            self.workers.close()

    def provenance(self) -> dict:
        """What produced this engine's numbers: image processor and path, library versions, checkpoint, and the
        engine settings that chose the kernels and the loop."""
        from .provenance import library_versions

        proc = self.family.image_processor
        images = (
            proc.provenance()
            if proc
            else {"image_processor": None, "image_backend": None, "versions": library_versions()}
        )
        return {
            **images,
            "checkpoint": str(self.checkpoint.path),
            "architecture": self.checkpoint.architecture,
            "dtype": str(self.checkpoint.dtype).removeprefix("torch."),
            # How the numbers were computed: each setting leaves outputs unchanged, but they say what ran.
            "settings": {
                "attention_backend": self.ops.backend,
                "cuda_graphs": self.runner.decode_graphs is not None,
                "cascade_attention": self.runner.cascade_width > 0,
                "overlap_scheduling": self.overlap_scheduling,
                "tensor_parallel_size": 1 if self.workers is None else self.workers.tp.world,
            },
            # What the prompts and the sampling defaults were made from, as transformers reads the files.
            "tokenizer": self.checkpoint.tokenizer_source,
            "chat_template": self.preparer.template_source,
            "sampling_defaults": {
                "source": "generation_config.json" if self.sampling_defaults else None,
                "applied": dict(self.sampling_defaults),
                "not_followed": dict(self._unfollowed),
            },
        }

    def stats(self) -> dict:
        """Cumulative counters: scheduler (prefix cache, preemptions, CPU time), encoder cache, tokens, and
        the keys decode attention read (`decode_kv_keys_read`; `decode_kv_keys_plain` without shared-prefix
        groups: per full-attention layer, `kv_bytes_per_key` bytes each over all layers)."""
        r = self.runner
        return {
            **self.scheduler.stats(),
            **self._counters,
            "images_encoded": r.images_encoded,
            "num_blocks": r.num_blocks,
            "block_size": r.block_size,
            "decode_kv_keys_read": r.decode_keys_read,
            "decode_kv_keys_plain": r.decode_keys_plain,
            "kv_bytes_per_key": r.kv_bytes_per_key,
        }

    def _warm_up(self) -> None:
        """Compile the kernels now (a Triton kernel's first launch takes seconds), not inside the first
        request: one request of two tokens (with an image where the family has them), after which the
        counters and timers start from zero."""
        req = (
            {"prompt": "Hello"}
            if self.image_token is None
            else {"prompt": f"{self.image_token}\n", "images": [self.family.dummy_image()]}
        )
        out = self.generate([req], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)[0]
        if out.error:
            warnings.warn(f"kernel warm-up request failed ({out.error}); kernels compile on first use", stacklevel=3)
        self._counters = dict.fromkeys(self._counters, 0)
        self.clock.reset()

    # -------------------------------------------------------------------------------------------
    # The step API: what `generate`, `score` and the server's loop are made of
    # -------------------------------------------------------------------------------------------
    def prepare(self, requests: list[Request]) -> list[Prepared | RequestError]:
        """Render, load images and tokenize every request (on any thread: nothing here changes while steps
        run); a request that cannot be prepared gets its `RequestError` in its place."""
        return self.preparer.prepare(requests)

    # -------------------------------------------------------------------------------------------
    # The step loop
    # -------------------------------------------------------------------------------------------
    def add_request(
        self,
        prep: Prepared,
        max_tokens: int,
        prompt_logprobs_from: int = -1,
        logprobs: int | None = None,
        **sampling,
    ) -> int:
        """Put one sample of a prepared request into the scheduler; returns its sequence id. `sampling`: the
        scheduler's sampling fields (`SamplingParams.scheduler_kwargs`); `logprobs=k` gathers the k most likely
        tokens at each generated position (`take_top_logprobs`)."""
        seq_id = self._next_seq_id
        self.scheduler.add_sequence(
            seq_id,
            prep.prompt_ids,
            prep.image_spans,
            max_tokens=max_tokens,
            prompt_logprobs_from=prompt_logprobs_from,
            positions=prep.positions,
            position_delta=prep.position_delta,
            **sampling,
        )
        self._next_seq_id += 1
        self.runner.pin_images(prep.images)
        self._seq_images[seq_id] = list(prep.images)
        self._counters["prompt_tokens"] += len(prep.prompt_ids)
        if logprobs is not None:
            self._top.want(seq_id, logprobs)
        return seq_id

    def add_scoring(self, prep: Prepared, choices: list[list[int]]) -> list[int]:
        """Score `choices` after the context `prep`, computed once for all of them (the scheduler forks
        each choice from it); returns the choices' sequence ids."""
        context_id = self._next_seq_id
        ids = list(range(context_id + 1, context_id + 1 + len(choices)))
        self.scheduler.add_scoring(
            context_id,
            prep.prompt_ids,
            prep.image_spans,
            choices,
            ids,
            positions=prep.positions,
            position_delta=prep.position_delta,
        )
        self._next_seq_id = ids[-1] + 1
        self._contexts[context_id] = ids
        for seq_id in ids:
            self._context_of[seq_id] = context_id
            self.runner.pin_images(prep.images)
            self._seq_images[seq_id] = list(prep.images)
        self._counters["prompt_tokens"] += len(prep.prompt_ids) + sum(map(len, choices))
        return ids

    def _abort_request(self, owners: dict[int, tuple[int, int]], index: int) -> None:
        """Take back the sequences already added for a request that failed part-way."""
        for seq_id in [s for s, (i, _) in owners.items() if i == index]:
            self.abort(seq_id)
            del owners[seq_id]

    def release(self, seq_id: int) -> None:
        """After a sequence finished (`step` gave it back): unpin its images."""
        self.runner.unpin_images(self._seq_images.pop(seq_id, ()))
        # A choice that finished (or was dropped) means its context has forked or is gone.
        self._contexts.pop(self._context_of.pop(seq_id, None), None)

    def abort(self, seq_id: int) -> None:
        """Take a sequence out (its request went away): its KV blocks return, its images are unpinned."""
        self.scheduler.abort(seq_id)
        self.release(seq_id)
        self._top.drop(seq_id)

    @contextmanager
    def _call_guard(self):
        """Whatever happens inside a call, nothing of it stays scheduled or pinned: the next call starts clean."""
        try:
            yield
        except BaseException:
            self._drop_in_flight()
            for seq_id in list(self._seq_images):
                self.abort(seq_id)
            raise
        finally:
            self._top.clear()

    def _run(self, num_seqs: int, use_tqdm: bool | None, on_finished) -> None:
        start = time.perf_counter()
        generated = 0
        # use_tqdm None: a bar only when stderr is a terminal (as the command line); True / False: always / never
        bar = tqdm(total=num_seqs, disable=None if use_tqdm is None else not use_tqdm, unit="seq", dynamic_ncols=True)
        # Profiling: time of each sequence's first sampled token, indexed by (dense) sequence id.
        first_token = self.clock.first_tokens(self._next_seq_id + 1)
        try:
            while self.scheduler.has_unfinished() or self._in_flight is not None:
                finished, sampled_ids, non_finite = self.step()
                if first_token is not None:
                    now = time.perf_counter() - start
                    new = sampled_ids[np.isnan(first_token[sampled_ids])]
                    first_token[new] = now
                # A sequence whose logits went NaN or infinite stops here and reports it.
                done = {seq.seq_id for seq in finished}
                # Choices before their contexts: dropping a context first would drop its choices unreported.
                stopped = sorted(non_finite - done, key=lambda s: s in self._contexts)
                finished += [f for f in map(self.scheduler.abort, stopped) if f is not None]
                for seq in finished:
                    if seq.seq_id not in self._seq_images:  # taken back with its request already
                        continue
                    generated += len(seq.output_token_ids)
                    self.release(seq.seq_id)
                    if first_token is not None:
                        self.clock.record_latency(seq, first_token[seq.seq_id], time.perf_counter() - start)
                    on_finished(seq, NON_FINITE_LOGITS if seq.seq_id in non_finite else None)
                if finished and not bar.disable:
                    elapsed = time.perf_counter() - start
                    bar.set_postfix_str(f"{generated / elapsed:.1f} tok/s out", refresh=False)
                    bar.update(len(finished))
        finally:
            bar.close()
            self._counters["generated_tokens"] += generated
            self._counters["run_seconds"] += time.perf_counter() - start

    def step(self) -> StepOutput:
        """One scheduled step: returns the finished sequences, the ids that sampled a token, and the ids
        whose logits were not finite. Overlapped (`overlap_scheduling`), it schedules and launches the next
        step before it waits for the one launched last, and returns that one's results (nothing the first
        time); a sequence that finished meanwhile has its row in the new step ignored by the scheduler."""
        try:
            t = self.clock.tick(None, 0.0)
            plan = self.scheduler.schedule()
            t = self.clock.tick("scheduler", t)
            previous, self._in_flight = self._in_flight, None
            if plan is None and previous is None:
                raise RuntimeError("the scheduler holds unfinished sequences but scheduled nothing")
            launched = None if plan is None else self._launch(plan, previous, t)
            # Synchronous: apply this step now (a change of the setting waits until nothing is in flight).
            if not (self.overlap_scheduling or previous is not None):
                return self._complete(launched)
            self._in_flight = launched
            if previous is None:
                return StepOutput([], np.empty(0, dtype=np.int64), set())
            return self._complete(previous)
        except BaseException:
            self._drop_in_flight()
            raise

    def _drop_in_flight(self) -> None:
        """After a failed step: forget the launched one; the scheduler recomputes what it held."""
        self._in_flight = None
        self.scheduler.cancel_in_flight()

    def _launch(self, plan, previous: Launched | None, t: float) -> Launched:
        """Queue the plan's forward pass, then its sampling and the copy of its results to the host."""
        vision_before = self.runner.vision_seconds
        synchronize = self.clock.enabled
        logits = self.runner.forward(plan, None if previous is None else previous.tokens, synchronize=synchronize)
        t_forward = self.clock.forward(t, self.runner.vision_seconds - vision_before, plan.max_query_len > 1)
        launched = self.runner.sample(plan, logits, previous)
        self.clock.tick("sampling", t_forward)
        return launched

    def _complete(self, launched: Launched) -> StepOutput:
        """Wait for a launched step's results and apply them to the scheduler."""
        t = self.clock.tick(None, 0.0)
        plan = launched.plan
        tokens, token_lps, prompt_lps, greedy, non_finite = self.runner.results(launched)
        for context in non_finite & self._contexts.keys():  # a scoring context fails its choices
            non_finite |= set(self._contexts[context])
        if self._top:
            self._top.gather(plan, launched.logits)
        finished = self.scheduler.update(tokens, token_lps, prompt_lps, greedy)
        self.clock.tick("update", t)
        return StepOutput(finished, plan.sample_seq_ids, non_finite)

    def take_top_logprobs(self, seq) -> list[dict[int, Logprob]] | None:
        """A finished sequence's gathered top-k per position, each with the token sampled there."""
        return self._top.take(seq)


NON_FINITE_LOGITS = (
    "the model produced NaN or infinite logits (in float16 or bfloat16, activations beyond the "
    "dtype's range; try dtype='float32')"
)
