"""A `cultengine` model for lmms-eval: `generate_until` and `loglikelihood` (with images) on the engine.

Run lmms-eval with it, keeping your task YAMLs:

    python -m cultengine.lmms_eval --model cultengine --model_args pretrained=DIR,device=cuda --tasks TASKS ...

(`python -m cultengine.lmms_eval` registers the model, then runs lmms-eval's own command line; with
cultengine installed, `lmms-eval --model cultengine ...` finds it too, through the `lmms_eval.models`
entry point.) Model arguments: `pretrained` (checkpoint directory), `device`, `dtype`, `max_num_seqs`,
`max_num_batched_tokens`, `max_model_len`, `kv_cache_memory`, `attention_backend`, `chat` (default true:
the context is a user turn, images first, rendered with the checkpoint's chat template; false: a raw
prompt with one image placeholder per image before the context), `seed` (of sampled generations),
`nll` (default true; see below).

Every request of a call goes to the engine at once (continuous batching). Log-likelihood requests that
share a context and images (a question's options) become one `Engine.score` request: the context is
computed once and the options share its KV blocks through the prefix cache. In chat mode an option is
the assistant's reply, so the target delimiter lmms-eval puts before it (a space by default) is dropped;
with `chat=false` the continuation is scored exactly as given. Under `torchrun` or `accelerate launch`
each process runs its own engine on `cuda:$LOCAL_RANK` and lmms-eval splits the documents between them
(not tested here: no multi-GPU machine).

What `loglikelihood` returns: lmms-eval's built-in models return a loss, and its `multiple_choice` tasks
pick the option with the *lowest* value (`np.argmin` in `lmms_eval/api/task.py`). So by default each
option gets its negative summed log-likelihood, `(-log P(option | context), is_greedy)`: lmms-eval's `acc`
is then the argmax of the log-likelihood (as `cultengine bench`'s `acc`), and its `acc_norm` divides by
the option's length in characters. `nll=false` returns the log-likelihood itself (lm-evaluation-harness's
convention, for custom `process_results`).
"""

from __future__ import annotations

import os
import sys
from typing import Any

try:
    from lmms_eval.api.instance import GenerationResult, Instance
    from lmms_eval.api.model import lmms
    from lmms_eval.models.registry_v2 import ModelManifest
except ImportError as e:
    raise ImportError(
        f"cultengine's lmms-eval backend needs lmms-eval 0.7 ({e}): pip install 'cultengine[lmms]' && "
        "pip install --no-deps 'lmms-eval==0.7.3'"
    ) from e
from PIL import Image

from .engine import Engine
from .sampling import SamplingParams

MODEL_ID = "cultengine"


def manifest() -> ModelManifest:
    """lmms-eval's `lmms_eval.models` entry point: where the `cultengine` model class lives."""
    return ModelManifest(model_id=MODEL_ID, simple_class_path="cultengine.lmms_eval.CultEngineLMM")


def _flag(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes")


class CultEngineLMM(lmms):
    """lmms-eval model backed by `cultengine.Engine` (see the module docstring for the arguments)."""

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        dtype: str = "auto",
        chat: Any = True,
        nll: Any = True,
        seed: int = 0,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 8192,
        max_model_len: int | None = None,
        kv_cache_memory: int | None = None,
        attention_backend: str | None = None,
        tensor_parallel_size: int = 1,
        batch_size: Any = None,
        max_batch_size: Any = None,
        **unused: Any,
    ):
        super().__init__()
        import torch

        if unused:
            raise TypeError(f"unknown model_args for cultengine: {', '.join(sorted(unused))}")
        # batch_size / max_batch_size come from lmms-eval's command line; the engine batches continuously.
        del batch_size, max_batch_size
        self._device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if self._device == "cuda" and "LOCAL_RANK" in os.environ:  # one engine per GPU under torchrun/accelerate
            self._device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        self.engine = Engine(
            pretrained,
            device=self._device,
            dtype=dtype,
            max_num_seqs=int(max_num_seqs),
            max_num_batched_tokens=int(max_num_batched_tokens),
            max_model_len=int(max_model_len) if max_model_len else None,
            kv_cache_memory=int(kv_cache_memory) if kv_cache_memory else None,
            attention_backend=attention_backend,
            tensor_parallel_size=int(tensor_parallel_size),
        )
        self.chat = _flag(chat)
        self.seed = int(seed)
        self.nll = _flag(nll)
        _skip_filelock3_patch()  # lmms-eval builds the model before its evaluator takes any lock

    @property
    def device(self) -> str:
        return self._device

    # ---------------------------------------------------------------------------------- requests
    def _visuals(self, doc_to_visual, doc_id, task: str, split: str) -> list:
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
        flat = [v for item in visuals for v in (item if isinstance(item, list | tuple) else [item])]
        for v in flat:
            if not isinstance(v, Image.Image | str | bytes):
                raise ValueError(
                    f"cultengine takes images (PIL, path or bytes), got {type(v).__name__} "
                    f"in {task}/{split} doc {doc_id}"
                )
        return flat

    def _request(self, context: str, images: list) -> dict:
        if self.chat:
            content = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": context}]
            return {"messages": [{"role": "user", "content": content}]}
        placeholders = "".join(f"{self.engine.image_token}\n" for _ in images)
        return {"prompt": placeholders + context, "images": images}

    def generate_until(self, requests: list[Instance]) -> list[str]:
        reqs, params = [], []
        for inst in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = inst.args
            reqs.append(self._request(context, self._visuals(doc_to_visual, doc_id, task, split)))
            params.append(self._sampling(dict(gen_kwargs or {})))
        outs = self.engine.generate(reqs, params, use_tqdm=self.rank == 0)
        for inst, out in zip(requests, outs, strict=True):
            if out.error:
                raise ValueError(f"{inst.task_name} doc {inst.doc_id}: {out.error}")
        return [out.text for out in outs]

    def _sampling(self, gen: dict) -> SamplingParams:
        until = gen.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        temperature = float(gen.pop("temperature", 0.0) or 0.0)
        if not _flag(gen.pop("do_sample", temperature > 0)):
            temperature = 0.0
        if int(gen.pop("num_beams", 1) or 1) != 1:
            raise ValueError("cultengine does not do beam search (num_beams must be 1)")
        top_p = gen.pop("top_p", None)
        return SamplingParams(
            max_tokens=int(gen.pop("max_new_tokens", 128)),
            temperature=temperature,
            top_p=1.0 if top_p is None else float(top_p),
            seed=self.seed,
            stop=[s for s in until if s],
        )

    def loglikelihood(self, requests: list[Instance]) -> list:
        # One score request per distinct (context, images): a question's options share its context.
        groups: dict[tuple, tuple[dict, list[str]]] = {}
        where: list[tuple[tuple, int]] = []
        for inst in requests:
            if len(inst.args) == 2:  # unconditional (mutual-information) requests carry no visuals
                (context, continuation), images, key_docs = inst.args, [], None
            else:
                context, continuation, doc_to_visual, doc_id, task, split = inst.args
                if not isinstance(continuation, str):  # doc_to_target given as a function
                    continuation = continuation(self.task_dict[task][split][doc_id])
                images, key_docs = self._visuals(doc_to_visual, doc_id, task, split), (task, split, doc_id)
            if self.chat:
                continuation = continuation.lstrip()
            key = (context, key_docs if images else None)
            if key not in groups:
                groups[key] = (self._request(context, images), [])
            choices = groups[key][1]
            where.append((key, len(choices)))
            choices.append(continuation)
        keys = list(groups)
        outs = self.engine.score([{**groups[k][0], "choices": groups[k][1]} for k in keys], use_tqdm=self.rank == 0)
        by_key = dict(zip(keys, outs, strict=True))
        results = []
        for inst, (key, j) in zip(requests, where, strict=True):
            out = by_key[key]
            if out.error:
                raise ValueError(f"{inst.task_name} doc {inst.doc_id}: {out.error}")
            lp = out.choices[j].logprob
            results.append(_loglikelihood_result(-lp if self.nll else lp, out.choices[j].is_greedy))
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("cultengine does not implement generate_until_multi_round yet")


def _loglikelihood_result(value: float, is_greedy: bool):
    """The `(value, is_greedy)` pair lmms-eval's tasks expect. lmms-eval 0.7's evaluator passes every
    model output through `unwrap_generation_output`, which turns a bare tuple into its `str()`; wrapped
    in a `GenerationResult` the pair comes out unchanged."""
    return GenerationResult(text=(value, is_greedy))


def register() -> None:
    """Add the `cultengine` model to lmms-eval's registry (for when the entry point is not installed)."""
    from lmms_eval.models import MODEL_REGISTRY_V2

    MODEL_REGISTRY_V2.register_manifest(manifest(), overwrite=True)


def _skip_filelock3_patch() -> None:
    """lmms-eval 0.7's evaluator patches filelock 3's singleton metaclass (`filelock._api.FileLockMeta`,
    against a lock clash between `datasets` and filelock) and crashes on filelock >= 4, which has no such
    module. There the patch cannot apply, so it is marked done and filelock keeps its own behaviour."""
    try:
        import filelock._api  # noqa: F401
    except ImportError:
        from lmms_eval import evaluator

        patch = getattr(evaluator, "_enable_reentrant_filelocks", None)
        if patch is not None:
            patch._patched = True


def main(argv: list[str] | None = None) -> None:
    """`python -m cultengine.lmms_eval ARGS`: lmms-eval's command line with the `cultengine` model."""
    register()
    from lmms_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
