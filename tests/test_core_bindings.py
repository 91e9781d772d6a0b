"""End-to-end checks of the Rust core's Python bindings (`cultengine._core`) with a tokenizer
trained here (byte-level BPE on non-ASCII text) and a fake deterministic model."""

from __future__ import annotations

import numpy as np
import pytest

from cultengine import _core

CORPUS = [
    "Grüße aus München, schöne Straße. Ça va très bien.",
    "日本語のテキストです。東京は大きい都市です。",
    "中文文本：你好，世界！Русский текст: привет, мир!",
    "Hello world! The quick brown fox jumps over the lazy dog. 🙂🚀",
] * 10


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=350,
        special_tokens=["<|endoftext|>", "<image>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    t.train_from_iterator(CORPUS, trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    t.save(str(path))
    return _core.Tokenizer.from_file(str(path))


def test_tokenizer_roundtrip(tok):
    texts = ["Grüße 日本語 🙂", "привет, мир", "plain ascii"]
    batch = tok.encode_batch(texts)
    assert batch == [tok.encode(t) for t in texts]
    assert [tok.decode(ids) for ids in batch] == texts
    eot = tok.token_to_id("<|endoftext|>")
    assert tok.id_to_token(eot) == "<|endoftext|>"
    assert tok.token_to_id("no such token") is None and tok.id_to_token(10**6) is None
    assert tok.decode(batch[0] + [eot]) == texts[0]
    assert tok.decode(batch[0] + [eot], skip_special_tokens=False) == texts[0] + "<|endoftext|>"
    assert tok.vocab_size == 350
    with pytest.raises(ValueError):
        _core.Tokenizer.from_file("/nonexistent/tokenizer.json")


def test_expand_placeholders(tok):
    img = tok.token_to_id("<image>")
    ids, starts = tok.expand_placeholders([5, img, 6, img], img, [[img] * 3, [8, img]])
    assert ids == [5, img, img, img, 6, 8, img]
    assert starts == [1, 5]
    with pytest.raises(ValueError, match=r"2 image placeholder.*1 image"):
        tok.expand_placeholders([img, img], img, [[img] * 4])


def test_incremental_detokenizer(tok):
    text = "Grüße aus München 日本語 🙂 und mehr"
    d = _core.IncrementalDetokenizer(tok, True, [])
    pieces = [d.push(i) for i in tok.encode(text)]
    assert all("\ufffd" not in p for p, _ in pieces)
    assert "".join(p for p, _ in pieces) == d.text == text
    d = _core.IncrementalDetokenizer(tok, True, ["日本語"])
    hits = [d.push(i)[1] for i in tok.encode(text)]
    assert any(hits) and d.text == "Grüße aus München "


def fake_step(plan, vocab):
    """Next token and logprobs from a hash of the scheduled token, position and sequence."""
    state = plan.input_ids * 1_000_003 + plan.positions[0] * 7919
    rows = plan.sample_indices
    tokens = (state[rows] + plan.seed * 31 + plan.output_index) % (vocab - 2) + 2  # never 0 or 1
    lps = -((state[rows] % 100) / 10).astype(np.float32)
    plp = -((state[plan.prompt_lp_indices] % 50) / 10).astype(np.float32)
    greedy = (state[plan.prompt_lp_indices] % 3) == 0
    return tokens.astype(np.int64), lps, plp, greedy


def run_all(sched, vocab):
    done = {}
    while sched.has_unfinished():
        plan = sched.schedule()
        assert plan is not None
        for f in sched.update(*fake_step(plan, vocab)):
            done[f.seq_id] = f
    return done


def test_scheduler_end_to_end(tok):
    img = tok.token_to_id("<image>")
    sched = _core.Scheduler(
        tok,
        num_blocks=64,
        block_size=16,
        max_num_seqs=4,
        max_num_batched_tokens=48,
        max_model_len=512,
        enable_prefix_caching=True,
        eos_token_ids=[0],
    )
    prefix = tok.encode("Grüße aus München, schöne Straße. " * 3)
    ids, starts = tok.expand_placeholders(prefix + [img], img, [[img] * 20])
    span = (starts[0], 20, 2**64 - 5, 0, False)
    sched.add_sequence(0, ids, [span], max_tokens=12, seed=1, ignore_eos=True)
    sched.add_sequence(1, prefix + tok.encode("日本語"), [], max_tokens=0, prompt_logprobs_from=3)
    sched.add_sequence(2, prefix, [], max_tokens=5, stop_token_ids=[7], temperature=0.7, top_p=0.9, top_k=5)
    assert (sched.num_waiting, sched.num_running) == (3, 0)

    plan = sched.schedule()
    assert plan.input_ids.dtype == np.int64 and plan.input_ids.shape == (48,)
    assert plan.query_start_loc.dtype == np.int32 and plan.query_start_loc[0] == 0
    assert plan.block_tables.dtype == np.int32 and plan.block_tables.ndim == 2
    assert plan.block_tables.shape[0] == len(plan.seq_ids) == len(plan.seq_lens)
    assert plan.image_chunks.dtype == np.int64 and plan.image_chunks.shape[1] == 3
    assert plan.image_hashes.dtype == np.uint64 and len(plan.image_hashes) == len(plan.image_chunks)
    assert all(h == 2**64 - 5 for h in plan.image_hashes.tolist())  # u64 hashes cross the boundary intact
    assert plan.positions.shape == (1, 48) and plan.positions.dtype == np.int64
    assert plan.max_query_len == max(np.diff(plan.query_start_loc))
    chunk_rows = [r for r in range(len(plan.input_ids)) if plan.input_ids[r] == img]
    for dst, first, n in plan.image_chunks:
        assert chunk_rows[0] == dst and n == len(chunk_rows) and first == 0
    for f in sched.update(*fake_step(plan, tok.vocab_size)):
        raise AssertionError(f"nothing can finish in the first step: {f}")

    done = run_all(sched, tok.vocab_size)
    assert done[0].finish_reason == "length" and len(done[0].output_token_ids) == 12
    assert len(done[0].output_logprobs) == 12
    assert done[0].prompt_token_ids == ids
    assert done[1].finish_reason == "scored" and done[1].output_token_ids == []
    assert len(done[1].prompt_logprobs) == len(done[1].prompt_greedy) == len(prefix) + 3 - 3
    assert done[2].finish_reason in ("stop", "length")
    assert done[2].text == tok.decode([t for t in done[2].output_token_ids if t != 7])

    stats = sched.stats()
    assert stats["num_free_blocks"] == 64 and stats["steps"] > 0 and stats["schedule_ns"] > 0
    assert stats["prefill_tokens_computed"] >= len(ids)

    # The same prompt again hits the prefix cache and gives the same output.
    sched.add_sequence(3, ids, [span], max_tokens=12, seed=1, ignore_eos=True)
    again = run_all(sched, tok.vocab_size)[3]
    assert again.num_cached_tokens > 0
    assert again.output_token_ids == done[0].output_token_ids and again.text == done[0].text


def test_scheduler_errors_and_abort(tok):
    sched = _core.Scheduler(tok, num_blocks=4, block_size=16, max_model_len=100)
    with pytest.raises(ValueError, match="empty"):
        sched.add_sequence(0, [], [], max_tokens=1)
    with pytest.raises(ValueError, match="90.*20.*100"):
        sched.add_sequence(0, [3] * 90, [], max_tokens=20)
    with pytest.raises(ValueError, match="blocks"):
        sched.add_sequence(0, [3] * 70, [], max_tokens=10)
    sched.add_sequence(0, [3] * 10, [], max_tokens=5)
    with pytest.raises(ValueError, match="already"):
        sched.add_sequence(0, [3] * 10, [], max_tokens=5)
    plan = sched.schedule()
    with pytest.raises(RuntimeError, match="expects 1 sampled"):
        sched.update(np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.float32), np.zeros(0, bool))
    assert sched.abort(0).finish_reason == "abort"
    assert sched.abort(0) is None
    assert sched.update(*fake_step(plan, tok.vocab_size)) == []
    assert not sched.has_unfinished() and sched.schedule() is None
    assert sched.stats()["num_free_blocks"] == 4


def test_the_stubs_declare_what_the_extension_has():
    """`_core.pyi` names every public member of every class the extension exports, no more, and each method's
    parameters in the extension's order (PyO3's text signatures): a field added to the Rust StepPlan must be
    declared in the stub too."""
    import ast
    import inspect
    from pathlib import Path

    import cultengine

    stub = ast.parse((Path(cultengine.__file__).parent / "_core.pyi").read_text())
    declared = {node.name: node for node in stub.body if isinstance(node, ast.ClassDef)}
    exported = {name for name, obj in vars(_core).items() if isinstance(obj, type) and not name.startswith("_")}
    assert exported == set(declared)
    for name, node in declared.items():
        cls = getattr(_core, name)
        members = {
            m.target.id if isinstance(m, ast.AnnAssign) else m.name
            for m in node.body
            if isinstance(m, (ast.AnnAssign, ast.FunctionDef)) and not getattr(m, "name", "").startswith("__")
        }
        assert members == {m for m in dir(cls) if not m.startswith("_")}, name
        for m in node.body:
            if isinstance(m, ast.FunctionDef) and not m.decorator_list and not m.name.startswith("__"):
                params = [a.arg for a in m.args.args if a.arg != "self"]
                target = getattr(cls, m.name)
                try:
                    actual = [p for p in inspect.signature(target).parameters if p != "self"]
                except (TypeError, ValueError):  # no text signature exported
                    continue
                assert params == actual, f"{name}.{m.name}"
