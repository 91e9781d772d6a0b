"""The public engine: requests in, generations and choice scores out.

Python prepares requests (chat template, images, tokenization through the Rust tokenizer), hands
whole sequences to the Rust scheduler, and then only moves flat arrays between the scheduler, the
model runner and the sampler — nothing on the hot path runs per token in Python.
"""

from __future__ import annotations

import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from . import _core
from .chat import render_checkpoint_chat
from .checkpoint import load_checkpoint
from .image import ClipImageProcessor, content_hash
from .models import build_model
from .ops import Ops, resolve_backend
from .outputs import ChoiceScore, GenerationOutput, Sample, ScoreOutput
from .runner import ModelRunner
from .sampling import SamplingParams, sample


class RequestError(ValueError):
    """A request the engine cannot run; reported on that request's output, never raised for a batch."""


@dataclass
class _Prepared:
    """A request turned into what the scheduler takes: token ids with expanded image spans."""

    prompt_ids: list[int]
    image_spans: list[tuple[int, int, int]]  # (start, length, content hash)
    image_pixels: dict[int, torch.Tensor] = field(default_factory=dict)


def _image_key(src):
    """Identity of an image source within one call: a file is read once however often it is named."""
    return ("path", os.fspath(src)) if isinstance(src, str | os.PathLike) else ("object", id(src))


class Engine:
    def __init__(self, model: str | os.PathLike, device: str = "cpu", dtype: str = "auto",
                 max_num_seqs: int = 256, max_num_batched_tokens: int = 8192, block_size: int = 16,
                 num_blocks: int | None = None, kv_cache_memory: int | None = None,
                 enable_prefix_caching: bool = True, attention_backend: str | None = None,
                 max_model_len: int | None = None, encoder_cache_size: int = 256, random_init: bool = False,
                 profile: bool = False, cuda_graphs: bool = True):
        """`random_init` draws weights instead of reading them (profiling model shapes); `profile`
        synchronises the device around each phase to time it and records per-request latencies;
        `cuda_graphs` replays decode steps from CUDA graphs (CUDA with the Triton backend only)."""
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device='cuda' was asked for but torch sees no CUDA device")
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)  # Triton launches and graph capture use the current device
        self.checkpoint = load_checkpoint(model, dtype=dtype, device=self.device, random_init=random_init)
        self.tokenizer = _core.Tokenizer.from_file(str(self.checkpoint.tokenizer_path))
        self.ops = Ops(resolve_backend(self.device, attention_backend))
        # Up to a sliding window (Mistral), windowed attention equals full attention: cap there, exactly.
        context = min(self.checkpoint.text.max_position_embeddings, self.checkpoint.text.sliding_window or 1 << 62)
        self.max_model_len = min(max_model_len or context, context)
        self.model = build_model(self.checkpoint, self.ops, max_positions=self.max_model_len)
        self.image_processor = ClipImageProcessor.for_checkpoint(self.checkpoint)
        self.image_token = self.tokenizer.id_to_token(self.checkpoint.image_token_id)
        graphs = cuda_graphs and self.device.type == "cuda" and self.ops.backend == "triton"
        self.runner = ModelRunner(self.model, self.device, self.checkpoint.dtype, block_size, num_blocks,
                                  kv_cache_memory, max_num_seqs, self.max_model_len, encoder_cache_size,
                                  cuda_graphs=graphs)
        self.scheduler = _core.Scheduler(
            self.tokenizer, num_blocks=self.runner.num_blocks, block_size=block_size,
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=self.max_model_len, enable_prefix_caching=enable_prefix_caching,
            eos_token_ids=list(self.checkpoint.eos_token_ids))
        self._next_seq_id = 0
        self._seq_images: dict[int, list[int]] = {}  # in-flight sequence -> image hashes it pins
        self._counters = {"prompt_tokens": 0, "generated_tokens": 0, "run_seconds": 0.0}
        self.profile = profile
        self.phase_seconds: dict[str, float] = dict.fromkeys(
            ("scheduler", "vision_encoder", "prefill", "decode", "sampling", "update"), 0.0)
        self.latencies: dict[str, list[float]] = {"ttft": [], "tpot": []}
        if self.ops.backend != "torch":
            self._warm_up()

    # -------------------------------------------------------------------------------------------
    # Public API
    # -------------------------------------------------------------------------------------------
    def generate(self, requests: list[dict], params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[GenerationOutput]:
        """Generate for every request; a bad request gets `.error`, the others run."""
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(requests)
        if len(params_list) != len(requests):
            raise ValueError(f"{len(params_list)} SamplingParams for {len(requests)} requests")
        prepared = self._prepare(requests)
        outputs = [GenerationOutput(index=i, prompt_token_ids=p.prompt_ids if isinstance(p, _Prepared) else [])
                   for i, p in enumerate(prepared)]
        owners: dict[int, tuple[int, int]] = {}
        for i, (prep, sp) in enumerate(zip(prepared, params_list, strict=True)):
            if isinstance(prep, Exception):
                outputs[i].error = str(prep)
                continue
            outputs[i].samples = [None] * sp.n
            try:
                for k, seed in enumerate(sp.sample_seeds()):
                    owners[self._add(prep, max_tokens=sp.max_tokens, temperature=sp.temperature,
                                     top_p=sp.top_p, top_k=sp.top_k, seed=seed, stop=list(sp.stop),
                                     stop_token_ids=list(sp.stop_token_ids), ignore_eos=sp.ignore_eos,
                                     skip_special_tokens=sp.skip_special_tokens)] = (i, k)
            except ValueError as e:
                self._abort_request(owners, i)
                outputs[i].error, outputs[i].samples = str(e), []

        def on_finished(seq) -> None:
            i, k = owners[seq.seq_id]
            outputs[i].samples[k] = Sample(text=seq.text, token_ids=list(seq.output_token_ids),
                                           finish_reason=seq.finish_reason, logprobs=list(seq.output_logprobs))
            outputs[i].num_cached_tokens = max(outputs[i].num_cached_tokens, seq.num_cached_tokens)

        self._run(len(owners), use_tqdm, on_finished)
        return outputs

    def score(self, requests: list[dict], use_tqdm: bool = True) -> list[ScoreOutput]:
        """Log-likelihood of each of a request's `choices` continuing its prompt.

        The context (images + prompt) is one shared prefix: the first choice computes it, the others
        find its full blocks in the prefix cache, and all choices of all requests run batched.
        """
        prepared = self._prepare(requests)
        outputs = [ScoreOutput(index=i) for i in range(len(requests))]
        choice_texts: list[tuple[int, int, str]] = []
        for i, (req, prep) in enumerate(zip(requests, prepared, strict=True)):
            choices = req.get("choices") if isinstance(prep, _Prepared) else None
            if isinstance(prep, Exception):
                outputs[i].error = str(prep)
            elif not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
                outputs[i].error = "a scoring request needs a non-empty 'choices' list of non-empty strings"
            else:
                choice_texts += [(i, j, c) for j, c in enumerate(choices)]
        # Choice tokens: tokenised on their own so every choice shares the context's exact tokens.
        choice_ids = self.tokenizer.encode_batch([c for _, _, c in choice_texts], add_special_tokens=False)
        owners: dict[int, tuple[int, int]] = {}
        for (i, j, text), ids in zip(choice_texts, choice_ids, strict=True):
            if outputs[i].error:
                continue
            prep = prepared[i]
            if j == 0:
                outputs[i].choices = [None] * len(requests[i]["choices"])
            try:
                if not ids:
                    raise ValueError(f"choice {text!r} tokenizes to nothing")
                full = _Prepared(prep.prompt_ids + list(ids), prep.image_spans, prep.image_pixels)
                owners[self._add(full, max_tokens=0, prompt_logprobs_from=len(prep.prompt_ids))] = (i, j)
            except ValueError as e:
                self._abort_request(owners, i)
                outputs[i].error, outputs[i].choices = str(e), []

        def on_finished(seq) -> None:
            i, j = owners[seq.seq_id]
            if outputs[i].error:
                return
            lps = list(seq.prompt_logprobs)
            outputs[i].choices[j] = ChoiceScore(text=requests[i]["choices"][j], logprob=float(sum(lps)),
                                                num_tokens=len(lps), is_greedy=all(seq.prompt_greedy),
                                                token_logprobs=lps)

        self._run(len(owners), use_tqdm, on_finished)
        return outputs

    def stats(self) -> dict:
        """Cumulative counters: scheduler (prefix cache, preemptions, CPU time), encoder cache, tokens."""
        return {**self.scheduler.stats(), **self._counters,
                "images_encoded": self.runner.encoder_cache.images_encoded,
                "num_blocks": self.runner.num_blocks, "block_size": self.runner.block_size}

    def _warm_up(self) -> None:
        """Compile the kernels now (a Triton kernel's first launch takes seconds), not inside the first
        request: one image request of two tokens, after which the counters and timers start from zero."""
        from PIL import Image

        size = self.model.image_size
        out = self.generate([{"prompt": f"{self.image_token}\n", "images": [Image.new("RGB", (size, size))]}],
                            SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)[0]
        if out.error:
            warnings.warn(f"kernel warm-up request failed ({out.error}); kernels compile on first use",
                          stacklevel=3)
        self._counters = dict.fromkeys(self._counters, 0)
        self.phase_seconds = dict.fromkeys(self.phase_seconds, 0.0)
        self.latencies = {"ttft": [], "tpot": []}

    # -------------------------------------------------------------------------------------------
    # Request preparation
    # -------------------------------------------------------------------------------------------
    def _prepare(self, requests: list[dict]) -> list[_Prepared | Exception]:
        """Render, load images and tokenize every request; a failure becomes that request's error."""
        parsed: list[tuple[str, list, bool] | Exception] = []
        for req in requests:
            try:
                parsed.append(self._prompt_and_images(req))
            except (ValueError, OSError) as e:
                parsed.append(e if isinstance(e, RequestError) else RequestError(str(e)))
        images = self._preprocess([src for p in parsed if not isinstance(p, Exception) for src in p[1]])
        prepared: list[_Prepared | Exception | None] = []
        # Raw prompts carry no BOS (the tokenizer adds it); chat templates write their own.
        by_special: dict[bool, list[int]] = {True: [], False: []}
        for i, p in enumerate(parsed):
            if not isinstance(p, Exception):
                p = next((images[k] for k in map(_image_key, p[1]) if isinstance(images[k], Exception)), p)
            prepared.append(p if isinstance(p, Exception) else None)
            if not isinstance(p, Exception):
                by_special[p[2]].append(i)
        for flag, idx in by_special.items():
            texts = [parsed[i][0] for i in idx]
            for i, ids in zip(idx, self.tokenizer.encode_batch(texts, add_special_tokens=flag), strict=True):
                imgs = [images[_image_key(src)] for src in parsed[i][1]]
                try:
                    expanded, spans = self.tokenizer.expand_image_tokens(
                        ids, self.checkpoint.image_token_id, [self.model.tokens_per_image] * len(imgs))
                except ValueError as e:
                    prepared[i] = RequestError(f"{e} (image placeholder token {self.image_token!r})")
                    continue
                prepared[i] = _Prepared(prompt_ids=list(expanded),
                                        image_spans=[(s, n, h) for (s, n), (_, h) in zip(spans, imgs, strict=True)],
                                        image_pixels={h: px for px, h in imgs})
        return prepared

    def _preprocess(self, sources: list) -> dict:
        """(pixels, content hash), or the error, of each distinct image: decoded once, in threads."""
        distinct = {_image_key(src): src for src in sources}

        def one(src):
            try:
                pixels = self.image_processor(src)
                return pixels, content_hash(pixels)
            except (ValueError, OSError) as e:
                return RequestError(str(e))

        if len(distinct) < 2:
            return {k: one(src) for k, src in distinct.items()}
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            return dict(zip(distinct, pool.map(one, distinct.values()), strict=True))

    def _prompt_and_images(self, req: dict) -> tuple[str, list, bool]:
        if not isinstance(req, dict):
            raise RequestError(f"a request is a dict with 'prompt' or 'messages', got {type(req).__name__}")
        if "messages" in req:
            text, imgs = render_checkpoint_chat(self.checkpoint, req["messages"])
            return text, imgs, False
        if "prompt" in req:
            if not isinstance(req["prompt"], str):
                raise RequestError("'prompt' must be a string")
            return req["prompt"], list(req.get("images") or []), True
        raise RequestError("a request needs 'prompt' (with images) or 'messages'")

    # -------------------------------------------------------------------------------------------
    # The step loop
    # -------------------------------------------------------------------------------------------
    def _add(self, prep: _Prepared, max_tokens: int, prompt_logprobs_from: int = -1, **sampling) -> int:
        seq_id = self._next_seq_id
        self.scheduler.add_sequence(seq_id, prep.prompt_ids, prep.image_spans, max_tokens=max_tokens,
                                    prompt_logprobs_from=prompt_logprobs_from, **sampling)
        self._next_seq_id += 1
        for h, px in prep.image_pixels.items():
            self.runner.encoder_cache.register(h, px)
        self._seq_images[seq_id] = list(prep.image_pixels)
        self._counters["prompt_tokens"] += len(prep.prompt_ids)
        return seq_id

    def _abort_request(self, owners: dict[int, tuple[int, int]], index: int) -> None:
        """Take back the sequences already added for a request that failed part-way."""
        for seq_id in [s for s, (i, _) in owners.items() if i == index]:
            self.scheduler.abort(seq_id)
            self._release(seq_id)
            del owners[seq_id]

    def _release(self, seq_id: int) -> None:
        for h in self._seq_images.pop(seq_id, ()):
            self.runner.encoder_cache.release(h)

    def _run(self, num_seqs: int, use_tqdm: bool, on_finished) -> None:
        start = time.perf_counter()
        generated = 0
        bar = tqdm(total=num_seqs, disable=not use_tqdm, unit="seq", dynamic_ncols=True)
        # Profiling: time of each sequence's first sampled token, indexed by (dense) sequence id.
        first_token = np.full(self._next_seq_id + 1, np.nan) if self.profile else None
        try:
            while self.scheduler.has_unfinished():
                finished, sampled_ids = self._step()
                if first_token is not None:
                    now = time.perf_counter() - start
                    new = sampled_ids[np.isnan(first_token[sampled_ids])]
                    first_token[new] = now
                for seq in finished:
                    generated += len(seq.output_token_ids)
                    self._release(seq.seq_id)
                    if first_token is not None:
                        self._record_latency(seq, first_token[seq.seq_id], time.perf_counter() - start)
                    on_finished(seq)
                if finished and use_tqdm:
                    elapsed = time.perf_counter() - start
                    bar.set_postfix_str(f"{generated / elapsed:.1f} tok/s out", refresh=False)
                    bar.update(len(finished))
        except BaseException:
            # Leave the engine usable: nothing half-done stays scheduled or pinned.
            for seq_id in list(self._seq_images):
                self.scheduler.abort(seq_id)
                self._release(seq_id)
            raise
        finally:
            bar.close()
            self._counters["generated_tokens"] += generated
            self._counters["run_seconds"] += time.perf_counter() - start

    def _record_latency(self, seq, first: float, end: float) -> None:
        if np.isnan(first):  # scored sequences produce no token
            return
        self.latencies["ttft"].append(float(first))
        if len(seq.output_token_ids) > 1:
            self.latencies["tpot"].append((end - float(first)) / (len(seq.output_token_ids) - 1))

    def _tick(self, phase: str | None, since: float) -> float:
        """Charge the time since `since` to a phase (profiling only: waits for the device first)."""
        if not self.profile:
            return since
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        if phase:
            self.phase_seconds[phase] += now - since
        return now

    def _step(self) -> tuple[list, np.ndarray]:
        t = self._tick(None, 0.0)
        plan = self.scheduler.schedule()
        t = self._tick("scheduler", t)
        vision_before = self.runner.vision_seconds
        hidden = self.runner.execute(plan, synchronize=self.profile)
        rows = torch.from_numpy(np.concatenate([plan.sample_indices, plan.prompt_lp_indices])).to(self.device)
        logits = self.model.compute_logits(hidden[rows]).float()
        t_forward = self._tick(None, t)
        if self.profile:
            self.phase_seconds["vision_encoder"] += self.runner.vision_seconds - vision_before
            phase = "prefill" if plan.max_query_len > 1 else "decode"
            self.phase_seconds[phase] += t_forward - t - (self.runner.vision_seconds - vision_before)
        t = t_forward

        num_sampled = len(plan.sample_indices)
        tokens, token_lps = sample(logits[:num_sampled], plan.temperature, plan.top_p, plan.top_k, plan.seed,
                                   plan.output_index)
        scored = logits[num_sampled:]
        targets = torch.from_numpy(plan.prompt_lp_targets).to(self.device)
        prompt_lps = torch.log_softmax(scored, dim=-1).gather(1, targets[:, None]).squeeze(1)
        greedy = scored.argmax(dim=-1) == targets
        # One device-to-host copy, so one wait, for all the scheduler needs back (ids are exact in fp64).
        host = torch.cat([tokens.double(), token_lps.double(), prompt_lps.double(), greedy.double()]).cpu().numpy()
        n, m = num_sampled, len(plan.prompt_lp_targets)
        tokens, token_lps = host[:n].astype(np.int64), host[n:2 * n].astype(np.float32)
        prompt_lps, greedy = host[2 * n:2 * n + m].astype(np.float32), host[2 * n + m:] > 0.5
        t = self._tick("sampling", t)
        finished = self.scheduler.update(tokens, token_lps, prompt_lps, greedy)
        self._tick("update", t)
        return finished, plan.sample_seq_ids
