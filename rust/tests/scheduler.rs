//! Scheduler end to end against a fake deterministic model that reads and writes a simulated
//! paged KV cache: each position's "KV" is a hash of the whole prefix, read back through the
//! block table, so a wrong slot, a stale block or a wrong prefix-cache hit changes the outputs.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use _core::block_manager::ImageSpan;
use _core::scheduler::{FinishedSequence, SamplingParams, Scheduler, SchedulerConfig, StepPlan};
use _core::tokenizer::Tokenizer;

const IMG: u32 = 5; // image placeholder id
const EOS: u32 = 0;
const VOCAB: u64 = 400;

fn tok() -> Arc<Tokenizer> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/rust/tests/fixtures/byte_bpe.json"
    );
    Arc::new(Tokenizer::from_file(path).unwrap())
}

fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9E3779B97F4A7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
    z ^ (z >> 31)
}

struct Rng(u64);
impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 = mix(self.0, 1);
        (self.0 % n as u64) as usize
    }
}

struct FakeModel {
    kv: Vec<Option<u64>>,
    bs: usize,
    last_sampled: Vec<i64>, // what the last step sampled: rows of an overlapped plan read it
}

/// Sampled tokens/logprobs and prompt logprobs/greedy flags for one plan.
type Outputs = (Vec<i64>, Vec<f32>, Vec<f32>, Vec<bool>);

impl FakeModel {
    fn step(&mut self, p: &StepPlan) -> Outputs {
        for c in p.block_copies.chunks(2) {
            let (src, dst) = (c[0] as usize * self.bs, c[1] as usize * self.bs);
            for k in 0..self.bs {
                self.kv[dst + k] = self.kv[src + k];
            }
        }
        let t = p.input_ids.len();
        let mut input_ids = p.input_ids.clone();
        assert_eq!(p.prev_input_rows.len(), p.prev_sample_index.len());
        for (&row, &k) in p.prev_input_rows.iter().zip(&p.prev_sample_index) {
            assert_eq!(
                input_ids[row as usize], 0,
                "a deferred row holds a placeholder"
            );
            input_ids[row as usize] = self.last_sampled[k as usize];
        }
        let mut emb: Vec<Option<u64>> = input_ids
            .iter()
            .map(|&id| (id as u32 != IMG).then(|| mix(id as u64, 77)))
            .collect();
        assert_eq!(p.image_chunks.len(), 3 * p.image_hashes.len());
        for (c, &hash) in p.image_chunks.chunks(3).zip(&p.image_hashes) {
            for k in 0..c[2] as usize {
                let row = c[0] as usize + k;
                assert_eq!(input_ids[row], IMG as i64);
                assert!(emb[row].is_none(), "image row {row} given twice");
                emb[row] = Some(mix(hash, (c[1] as u64) + k as u64));
            }
        }
        let mut state = vec![0u64; t];
        let w = p.block_table_width;
        for b in 0..p.seq_ids.len() {
            let (lo, hi) = (
                p.query_start_loc[b] as usize,
                p.query_start_loc[b + 1] as usize,
            );
            let table = &p.block_tables[b * w..(b + 1) * w];
            let slot = |pos: usize| table[pos / self.bs] as usize * self.bs + pos % self.bs;
            let pos0 = p.positions[lo] as usize;
            assert_eq!(p.seq_lens[b] as usize, pos0 + hi - lo);
            let mut s = if pos0 == 0 {
                1
            } else {
                self.kv[slot(pos0 - 1)].expect("reads KV never written")
            };
            for r in lo..hi {
                let pos = p.positions[r] as usize;
                assert_eq!(pos, pos0 + r - lo);
                assert_eq!(p.slot_mapping[r] as usize, slot(pos));
                s = mix(s, emb[r].expect("image row without an image chunk"));
                self.kv[slot(pos)] = Some(s);
                state[r] = s;
            }
        }
        let mut out: Outputs = Default::default();
        for (i, &r) in p.sample_indices.iter().enumerate() {
            let h = mix(
                mix(state[r as usize], p.seed[i] as u64),
                p.output_index[i] as u64,
            );
            let t = (h % VOCAB) as i64;
            out.0.push(if t == IMG as i64 { t + 1 } else { t }); // the model never emits a placeholder
            out.1.push(-(((h >> 20) % 1000) as f32) / 100.0);
        }
        for (&r, &target) in p.prompt_lp_indices.iter().zip(&p.prompt_lp_targets) {
            let h = mix(state[r as usize], target as u64);
            out.2.push(-(((h >> 20) % 1000) as f32) / 100.0);
            out.3
                .push(mix(state[r as usize], 3) % VOCAB == target as u64);
        }
        self.last_sampled = out.0.clone();
        out
    }
}

struct Request {
    prompt: Vec<u32>,
    images: Vec<ImageSpan>,
    params: SamplingParams,
}

fn random_requests(seed: u64, n: usize) -> Vec<Request> {
    let mut rng = Rng(seed);
    let prefixes: Vec<Vec<u32>> = (0..3)
        .map(|_| {
            (0..rng.below(70))
                .map(|_| 10 + rng.below(380) as u32)
                .collect()
        })
        .collect();
    (0..n)
        .map(|_| {
            let mut prompt = prefixes[rng.below(3)].clone();
            let mut images = Vec::new();
            for _ in 0..rng.below(3) {
                prompt.extend((0..rng.below(6)).map(|_| 10 + rng.below(380) as u32));
                let len = 3 + rng.below(20);
                images.push(ImageSpan {
                    start: prompt.len(),
                    len,
                    hash: 1 + rng.below(3) as u64, // few distinct images
                    offset: rng.below(2) * 7,      // runs that start inside an image's embeddings
                    atomic: rng.below(2) == 0,
                });
                prompt.extend(std::iter::repeat_n(IMG, len));
            }
            prompt.extend((0..1 + rng.below(30)).map(|_| 10 + rng.below(380) as u32));
            let max_tokens = [0, 1, 5, 20, 40][rng.below(5)];
            let params = SamplingParams {
                max_tokens,
                seed: rng.below(1000) as i64,
                ignore_eos: rng.below(2) == 0,
                stop: [
                    vec![],
                    vec!["e".to_string()],
                    vec!["th".to_string(), "ab".to_string()],
                ][rng.below(3)]
                .clone(),
                stop_token_ids: if rng.below(4) == 0 { vec![7] } else { vec![] },
                prompt_logprobs_from: [-1, 1, 5, 40][rng.below(4)],
                ..Default::default()
            };
            Request {
                prompt,
                images,
                params,
            }
        })
        .collect()
}

/// Runs every request to completion, checking per-step invariants; returns outputs by seq id.
fn run(
    reqs: &[Request],
    cfg: SchedulerConfig,
    arrival_seed: u64,
) -> (HashMap<i64, FinishedSequence>, Scheduler) {
    run_with(reqs, cfg, arrival_seed, Drive::default())
}

/// The longest a request can grow, and every request's outputs with memory to spare (the reference).
fn longest_and_reference(reqs: &[Request], seed: u64) -> (usize, HashMap<i64, FinishedSequence>) {
    let longest = reqs
        .iter()
        .map(|r| r.prompt.len() + r.params.max_tokens)
        .max()
        .unwrap();
    (
        longest,
        run(reqs, config(4096, false, 4096, 256, 16), seed).0,
    )
}

/// How `run_with` drives the scheduler.
#[derive(Clone, Copy, Default)]
struct Drive {
    overlap: bool, // schedule (and run) step N+1 before update(N), as the engine does on a device
    abort_every: usize, // abort one live sequence every that many steps (0: never)
    cancel_every: usize, // drop the plans in flight every that many steps, as after a failed step
}

fn run_with(
    reqs: &[Request],
    cfg: SchedulerConfig,
    arrival_seed: u64,
    drive: Drive,
) -> (HashMap<i64, FinishedSequence>, Scheduler) {
    let (bs, nb) = (cfg.block_size, cfg.num_blocks);
    let mut sched = Scheduler::new(tok(), cfg.clone()).unwrap();
    let mut model = FakeModel {
        kv: vec![None; nb * bs],
        bs,
        last_sampled: Vec::new(),
    };
    let mut rng = Rng(arrival_seed);
    let mut next = 0;
    let mut done = HashMap::new();
    let mut steps = 0;
    let mut in_flight: Option<Outputs> = None;
    while next < reqs.len() || sched.has_unfinished() || in_flight.is_some() {
        // Requests arrive a few at a time while others run.
        for _ in 0..rng.below(4) {
            if let Some(r) = reqs.get(next) {
                // An atomic run longer than the whole budget is refused: make those plain here.
                let images: Vec<ImageSpan> = r
                    .images
                    .iter()
                    .map(|&im| ImageSpan {
                        atomic: im.atomic && im.len <= cfg.max_num_batched_tokens,
                        ..im
                    })
                    .collect();
                sched
                    .add_sequence(
                        next as i64,
                        r.prompt.clone(),
                        &images,
                        vec![],
                        0,
                        r.params.clone(),
                    )
                    .unwrap();
                next += 1;
            }
        }
        if drive.abort_every > 0 && steps % drive.abort_every == drive.abort_every - 1 {
            let live: Vec<i64> = (0..next as i64)
                .filter(|id| !done.contains_key(id))
                .collect();
            if !live.is_empty() {
                let f = sched.abort(live[rng.below(live.len())]).unwrap();
                assert_eq!(f.finish_reason, "abort");
                done.insert(f.seq_id, f);
            }
        }
        if drive.cancel_every > 0 && steps % drive.cancel_every == drive.cancel_every - 1 {
            sched.cancel_in_flight();
            in_flight = None;
            model.last_sampled.clear();
            steps += 1;
        }
        let Some(plan) = sched.schedule() else {
            // Overlapped, the plan in flight may hold every sequence's last token.
            if let Some((s, lp, plp, greedy)) = in_flight.take() {
                for f in sched.update(&s, &lp, &plp, &greedy).unwrap() {
                    assert!(done.insert(f.seq_id, f).is_none(), "finished twice");
                }
                continue;
            }
            assert!(
                !sched.has_unfinished() || next < reqs.len(),
                "stalled with unfinished sequences"
            );
            continue;
        };
        steps += 1;
        assert!(steps < 100_000);
        if !drive.overlap {
            assert!(
                plan.prev_input_rows.is_empty(),
                "the synchronous order defers nothing"
            );
        }
        assert!(plan.input_ids.len() <= cfg.max_num_batched_tokens);
        assert!(plan.seq_ids.len() <= cfg.max_num_seqs);
        assert_eq!(
            plan.seq_ids.iter().collect::<HashSet<_>>().len(),
            plan.seq_ids.len()
        );
        assert_eq!(
            plan.slot_mapping.iter().collect::<HashSet<_>>().len(),
            plan.slot_mapping.len(),
            "two rows write one slot"
        );
        assert!(plan.block_tables.iter().all(|&b| (b as usize) < nb));
        for (b, &id) in plan.seq_ids.iter().enumerate() {
            let (lo, hi) = (
                plan.query_start_loc[b] as usize,
                plan.query_start_loc[b + 1] as usize,
            );
            let (first, end) = (plan.positions[lo] as usize, plan.seq_lens[b] as usize);
            for im in &reqs[id as usize].images {
                let atomic = im.atomic && im.len <= cfg.max_num_batched_tokens;
                assert!(
                    !atomic || end <= im.start || end >= im.end() || first + (hi - lo) <= im.start,
                    "atomic image run {im:?} split at {end}"
                );
            }
        }
        let outputs = model.step(&plan);
        let (s, lp, plp, greedy) = if drive.overlap {
            match in_flight.replace(outputs) {
                Some(previous) => previous,
                None => continue,
            }
        } else {
            outputs
        };
        for f in sched.update(&s, &lp, &plp, &greedy).unwrap() {
            let r = &reqs[f.seq_id as usize];
            assert!(f.output_token_ids.len() <= r.params.max_tokens);
            if r.params.max_tokens == 0 {
                assert_eq!(f.finish_reason, "scored");
            }
            assert!(done.insert(f.seq_id, f).is_none(), "finished twice");
        }
    }
    assert_eq!(sched.num_in_flight(), 0);
    assert_eq!(done.len(), reqs.len());
    let bm = sched.block_manager();
    assert_eq!(bm.num_free(), nb, "leaked blocks");
    assert!((0..nb as u32).all(|b| bm.ref_cnt(b) == 0));
    (done, sched)
}

fn config(
    num_blocks: usize,
    caching: bool,
    budget: usize,
    max_seqs: usize,
    bs: usize,
) -> SchedulerConfig {
    SchedulerConfig {
        num_blocks,
        block_size: bs,
        max_num_seqs: max_seqs,
        max_num_batched_tokens: budget,
        max_model_len: 1024,
        enable_prefix_caching: caching,
        eos_token_ids: vec![EOS],
        position_rows: 1,
        max_num_image_tokens: usize::MAX,
    }
}

/// What must not depend on scheduling: everything but the prefix-cache hit count.
fn key(f: &FinishedSequence) -> impl PartialEq + std::fmt::Debug + '_ {
    (
        &f.output_token_ids,
        &f.output_logprobs,
        &f.text,
        f.finish_reason,
        &f.prompt_logprobs,
        &f.prompt_greedy,
    )
}

#[test]
fn outputs_identical_under_memory_pressure_chunking_and_prefix_caching() {
    for seed in 0..12u64 {
        let reqs = random_requests(seed, 40);
        let (longest, reference) = longest_and_reference(&reqs, seed);
        let mut rng = Rng(seed + 100);
        for caching in [false, true] {
            for bs in [4, 16] {
                // Just enough blocks for the longest request: forces preemption.
                let tight = longest.div_ceil(bs) + rng.below(4);
                let budget = 8 + rng.below(100);
                let mut cfg = config(tight, caching, budget, 2 + rng.below(8), bs);
                cfg.max_num_image_tokens = [usize::MAX, 1, 20][rng.below(3)];
                let (out, sched) = run(&reqs, cfg, seed + 1);
                for (id, f) in &reference {
                    assert_eq!(
                        key(&out[id]),
                        key(f),
                        "seed {seed} seq {id} caching {caching} bs {bs}"
                    );
                    assert_eq!(out[id].prompt_token_ids, reqs[*id as usize].prompt);
                }
                let st = sched.stats();
                assert!(
                    st.num_preemptions > 0 || seed > 0,
                    "seed 0 is expected to preempt"
                );
                if !caching {
                    assert_eq!(st.prefix_cache_hit_tokens, 0);
                }
            }
        }
        let (cached, sched) = run(&reqs, config(4096, true, 64, 16, 16), seed + 2);
        for (id, f) in &reference {
            assert_eq!(key(&cached[id]), key(f));
        }
        assert!(
            sched.stats().prefix_cache_hit_tokens > 0,
            "shared prefixes never hit"
        );
    }
}

#[test]
fn prefix_hit_is_reported_and_capped() {
    let prompt: Vec<u32> = (10..74).collect(); // 64 tokens = 4 blocks
    let mut sched = Scheduler::new(tok(), config(64, true, 1024, 8, 16)).unwrap();
    let mut model = FakeModel {
        kv: vec![None; 64 * 16],
        bs: 16,
        last_sampled: Vec::new(),
    };
    let params = |lp| SamplingParams {
        max_tokens: 1,
        prompt_logprobs_from: lp,
        ..Default::default()
    };
    let mut finish = |sched: &mut Scheduler, id: i64, lp: i64| {
        sched
            .add_sequence(id, prompt.clone(), &[], vec![], 0, params(lp))
            .unwrap();
        loop {
            let plan = sched.schedule().unwrap();
            let (s, l, p, g) = model.step(&plan);
            if let Some(f) = sched.update(&s, &l, &p, &g).unwrap().pop() {
                return f;
            }
        }
    };
    let first = finish(&mut sched, 0, -1);
    assert_eq!(first.num_cached_tokens, 0);
    // The whole prompt is cached but its last token must be computed: 3 blocks hit.
    let second = finish(&mut sched, 1, -1);
    assert_eq!(second.num_cached_tokens, 48);
    assert_eq!(second.output_token_ids, first.output_token_ids);
    // Prompt logprobs from position 20 need the logits of position 19 onwards: 1 block hits.
    let third = finish(&mut sched, 2, 20);
    assert_eq!(third.num_cached_tokens, 16);
    assert_eq!(third.prompt_logprobs.len(), 64 - 20);
    let st = sched.stats();
    assert_eq!(
        (st.prefix_cache_queried_tokens, st.prefix_cache_hit_tokens),
        (192, 64)
    );
}

#[test]
fn chunked_prefill_shares_the_step_with_decodes() {
    let mut sched = Scheduler::new(tok(), config(256, false, 32, 8, 16)).unwrap();
    let mut model = FakeModel {
        kv: vec![None; 256 * 16],
        bs: 16,
        last_sampled: Vec::new(),
    };
    sched
        .add_sequence(
            0,
            vec![11; 10],
            &[],
            vec![],
            0,
            SamplingParams {
                max_tokens: 30,
                ignore_eos: true,
                ..Default::default()
            },
        )
        .unwrap();
    let p = sched.schedule().unwrap();
    let (s, l, pl, g) = model.step(&p);
    sched.update(&s, &l, &pl, &g).unwrap();
    sched
        .add_sequence(1, vec![12; 100], &[], vec![], 0, SamplingParams::default())
        .unwrap();
    let p = sched.schedule().unwrap();
    // Decode first, then a 31-token chunk of the long prompt; nothing is sampled for the chunk.
    assert_eq!(p.seq_ids, vec![0, 1]);
    assert_eq!(p.query_start_loc, vec![0, 1, 32]);
    assert_eq!(p.sample_seq_ids, vec![0]);
    assert_eq!(p.output_index, vec![1]);
    assert_eq!(p.max_query_len, 31);
}

#[test]
fn stop_strings_eos_and_stop_tokens() {
    let tok = tok();
    let script = tok
        .encode("Hello world! The quick brown fox", false)
        .unwrap();
    let eot = tok.token_to_id("<|endoftext|>").unwrap();
    let cases: Vec<(SamplingParams, Vec<u32>, &str, &str)> = vec![
        (
            SamplingParams {
                max_tokens: 50,
                stop: vec!["quick".into()],
                ..Default::default()
            },
            script.clone(),
            "Hello world! The ",
            "stop",
        ),
        (
            SamplingParams {
                max_tokens: 3,
                ..Default::default()
            },
            script.clone(),
            "",
            "length",
        ),
        (
            SamplingParams {
                max_tokens: 50,
                ..Default::default()
            },
            [&script[..2], &[eot, 20]].concat(),
            "",
            "stop",
        ),
        (
            SamplingParams {
                max_tokens: 4,
                ignore_eos: true,
                ..Default::default()
            },
            [&script[..2], &[eot, 20]].concat(),
            "",
            "length",
        ),
        (
            SamplingParams {
                max_tokens: 50,
                stop_token_ids: vec![script[3]],
                ..Default::default()
            },
            script.clone(),
            "",
            "stop",
        ),
    ];
    for (i, (params, emitted, text, reason)) in cases.into_iter().enumerate() {
        let mut cfg = config(64, true, 512, 4, 16);
        cfg.eos_token_ids = vec![eot];
        let mut sched = Scheduler::new(tok.clone(), cfg).unwrap();
        sched
            .add_sequence(7, vec![30, 31, 32], &[], vec![], 0, params.clone())
            .unwrap();
        let mut k = 0;
        let f = loop {
            sched.schedule().unwrap();
            let s = vec![emitted[k] as i64];
            k += 1;
            if let Some(f) = sched.update(&s, &[-0.5], &[], &[]).unwrap().pop() {
                break f;
            }
        };
        assert_eq!(f.finish_reason, reason, "case {i}");
        let expect_text = match (reason, i) {
            (_, 0) => text.to_string(),
            (_, 2) => tok.decode(&emitted[..2], true).unwrap(), // EOS is not part of the text
            (_, 4) => tok.decode(&emitted[..3], true).unwrap(),
            _ => tok.decode(&f.output_token_ids, true).unwrap(),
        };
        assert_eq!(f.text, expect_text, "case {i}");
        assert_eq!(f.output_logprobs.len(), f.output_token_ids.len());
        assert_eq!(sched.block_manager().num_free(), 64);
    }
}

#[test]
fn add_sequence_errors() {
    let mut sched = Scheduler::new(
        tok(),
        SchedulerConfig {
            num_blocks: 4,
            max_model_len: 100,
            max_num_batched_tokens: 32,
            ..Default::default()
        },
    )
    .unwrap();
    let p = |max_tokens| SamplingParams {
        max_tokens,
        ..Default::default()
    };
    assert!(sched
        .add_sequence(1, vec![], &[], vec![], 0, p(1))
        .unwrap_err()
        .contains("empty"));
    let e = sched
        .add_sequence(1, vec![1; 90], &[], vec![], 0, p(20))
        .unwrap_err();
    assert!(
        e.contains("90") && e.contains("20") && e.contains("100"),
        "{e}"
    );
    let e = sched
        .add_sequence(1, vec![1; 60], &[], vec![], 0, p(20))
        .unwrap_err();
    assert!(e.contains("blocks"), "{e}");
    sched
        .add_sequence(1, vec![1; 60], &[], vec![], 0, p(5))
        .unwrap();
    assert!(sched
        .add_sequence(1, vec![1; 3], &[], vec![], 0, p(1))
        .unwrap_err()
        .contains("already"));
    assert!(sched
        .add_sequence(2, vec![1; 3], &[span(2, 5, false)], vec![], 0, p(1))
        .is_err());
    let e = sched
        .add_sequence(3, vec![IMG; 40], &[span(0, 40, true)], vec![], 0, p(1))
        .unwrap_err();
    assert!(e.contains("max_num_batched_tokens"), "{e}");
    let e = sched
        .add_sequence(
            4,
            vec![IMG; 9],
            &[span(0, 5, false), span(4, 5, false)],
            vec![],
            0,
            p(1),
        )
        .unwrap_err();
    assert!(e.contains("overlap"), "{e}");
    let e = sched
        .add_sequence(5, vec![1; 3], &[], vec![0, 1], 0, p(1))
        .unwrap_err();
    assert!(e.contains("positions"), "{e}");
    assert_eq!(sched.num_waiting(), 1);
}

#[test]
fn abort_releases_blocks_even_mid_step() {
    let mut sched = Scheduler::new(tok(), config(32, true, 64, 8, 16)).unwrap();
    let mut model = FakeModel {
        kv: vec![None; 32 * 16],
        bs: 16,
        last_sampled: Vec::new(),
    };
    for id in 0..3 {
        sched
            .add_sequence(
                id,
                vec![20 + id as u32; 40],
                &[],
                vec![],
                0,
                SamplingParams {
                    max_tokens: 10,
                    ..Default::default()
                },
            )
            .unwrap();
    }
    let plan = sched.schedule().unwrap();
    let f = sched.abort(0).unwrap();
    assert_eq!(f.finish_reason, "abort");
    assert!(sched.abort(0).is_none());
    let (s, l, p, g) = model.step(&plan);
    sched.update(&s, &l, &p, &g).unwrap();
    sched.abort(1);
    sched.abort(2);
    assert!(!sched.has_unfinished());
    assert!(sched.schedule().is_none());
    assert_eq!(sched.block_manager().num_free(), 32);
}

#[test]
fn schedule_512_decodes_is_fast() {
    let mut sched = Scheduler::new(tok(), config(512 * 40, true, 8192, 512, 16)).unwrap();
    for id in 0..512 {
        let p = SamplingParams {
            max_tokens: 200,
            ignore_eos: true,
            ..Default::default()
        };
        sched
            .add_sequence(id, vec![10 + (id % 300) as u32; 500], &[], vec![], 0, p)
            .unwrap();
    }
    let mut times = Vec::new();
    while sched.has_unfinished() {
        let t0 = std::time::Instant::now();
        let plan = sched.schedule().unwrap();
        let dt = t0.elapsed();
        if plan.seq_ids.len() == 512 && plan.input_ids.len() == 512 {
            times.push(dt.as_micros());
        }
        let s = vec![42i64; plan.sample_indices.len()];
        let lp = vec![0f32; s.len()];
        let n = plan.prompt_lp_indices.len();
        sched
            .update(&s, &lp, &vec![0.0; n], &vec![false; n])
            .unwrap();
    }
    times.sort();
    eprintln!(
        "schedule() with 512 decodes: median {} us",
        times[times.len() / 2]
    );
    // Loose bound: debug builds and a loaded machine.
    assert!(times[times.len() / 2] < 20_000);
}

#[test]
fn identical_prompts_share_blocks_within_one_step() {
    let mut sched = Scheduler::new(tok(), config(64, true, 1024, 8, 16)).unwrap();
    let mut model = FakeModel {
        kv: vec![None; 64 * 16],
        bs: 16,
        last_sampled: Vec::new(),
    };
    let prompt: Vec<u32> = (100..150).collect(); // 3 full blocks + 2 tokens
    for id in 0..3 {
        sched
            .add_sequence(
                id,
                prompt.clone(),
                &[],
                vec![],
                0,
                SamplingParams {
                    max_tokens: 4,
                    ..Default::default()
                },
            )
            .unwrap();
    }
    let plan = sched.schedule().unwrap();
    // The first computes the prompt; the others reuse its 3 full blocks in the same forward pass.
    assert_eq!(plan.query_start_loc, vec![0, 50, 52, 54]);
    assert_eq!(sched.block_manager().num_free(), 64 - 4 - 1 - 1);
    let mut outs = Vec::new();
    let (s, l, p, g) = model.step(&plan);
    outs.extend(sched.update(&s, &l, &p, &g).unwrap());
    while let Some(plan) = sched.schedule() {
        let (s, l, p, g) = model.step(&plan);
        outs.extend(sched.update(&s, &l, &p, &g).unwrap());
    }
    assert_eq!(outs.len(), 3);
    assert!(outs
        .iter()
        .all(|f| f.output_token_ids == outs[0].output_token_ids));
    assert_eq!(
        outs.iter().map(|f| f.num_cached_tokens).sum::<usize>(),
        2 * 48
    );
}

#[test]
fn abort_before_update_uncaches_what_the_plan_was_to_write() {
    let mut sched = Scheduler::new(tok(), config(16, true, 1024, 8, 16)).unwrap();
    let prompt: Vec<u32> = (100..140).collect();
    sched
        .add_sequence(0, prompt.clone(), &[], vec![], 0, SamplingParams::default())
        .unwrap();
    sched.schedule().unwrap();
    assert_eq!(sched.block_manager().num_cached(), 2);
    sched.abort(0).unwrap();
    assert_eq!(sched.block_manager().num_cached(), 0);
    sched
        .add_sequence(1, prompt, &[], vec![], 0, SamplingParams::default())
        .unwrap();
    sched.schedule().unwrap();
    assert_eq!(sched.stats().prefix_cache_hit_tokens, 0);
}

fn span(start: usize, len: usize, atomic: bool) -> ImageSpan {
    ImageSpan {
        start,
        len,
        hash: 9,
        offset: 0,
        atomic,
    }
}

#[test]
fn atomic_image_moves_whole_to_the_next_step() {
    // Budget 12: the 10-token atomic image cannot start in a step that has only 6 tokens left.
    let mut sched = Scheduler::new(tok(), config(64, false, 12, 8, 4)).unwrap();
    let mut prompt = vec![11; 6];
    prompt.extend([IMG; 10]);
    prompt.extend([12; 3]);
    let p = SamplingParams {
        max_tokens: 1,
        ..Default::default()
    };
    sched
        .add_sequence(0, prompt, &[span(6, 10, true)], vec![], 0, p)
        .unwrap();
    let mut chunks = Vec::new();
    while let Some(plan) = sched.schedule() {
        chunks.push((plan.positions[0], plan.input_ids.len()));
        let n = plan.sample_indices.len();
        sched
            .update(&vec![EOS as i64; n], &vec![0.0; n], &[], &[])
            .unwrap();
    }
    assert_eq!(chunks, vec![(0, 6), (6, 12), (18, 1)]);
}

#[test]
fn explicit_position_rows_then_delta_for_outputs() {
    let mut cfg = config(64, false, 64, 8, 4);
    cfg.position_rows = 3;
    let mut sched = Scheduler::new(tok(), cfg).unwrap();
    // Three rows for a 4-token prompt (M-RoPE style); outputs continue at pos + delta.
    let positions = vec![0, 1, 1, 3, 0, 1, 2, 3, 0, 2, 1, 3];
    let p = SamplingParams {
        max_tokens: 3,
        ignore_eos: true,
        ..Default::default()
    };
    sched
        .add_sequence(0, vec![11, 12, 13, 14], &[], positions.clone(), -1, p)
        .unwrap();
    let plan = sched.schedule().unwrap();
    assert_eq!(plan.positions, positions);
    sched.update(&[20], &[0.0], &[], &[]).unwrap();
    let plan = sched.schedule().unwrap();
    assert_eq!(plan.positions, vec![3, 3, 3]); // token 4 at position 4 - 1 in every row
}

#[test]
fn image_budget_spreads_images_over_steps() {
    // Three 6-token images, a budget of 8 image tokens per step: one image starts per step.
    let mut cfg = config(64, false, 64, 8, 4);
    cfg.max_num_image_tokens = 8;
    let mut sched = Scheduler::new(tok(), cfg).unwrap();
    let mut prompt = Vec::new();
    let mut images = Vec::new();
    for h in 0..3u64 {
        prompt.extend([11, 12]);
        images.push(ImageSpan {
            start: prompt.len(),
            len: 6,
            hash: 100 + h,
            ..Default::default()
        });
        prompt.extend([IMG; 6]);
    }
    let p = SamplingParams {
        max_tokens: 1,
        ..Default::default()
    };
    sched
        .add_sequence(0, prompt, &images, vec![], 0, p)
        .unwrap();
    let mut per_step = Vec::new();
    while let Some(plan) = sched.schedule() {
        per_step.push(plan.image_hashes.clone());
        let n = plan.sample_indices.len();
        sched
            .update(&vec![EOS as i64; n], &vec![0.0; n], &[], &[])
            .unwrap();
    }
    assert_eq!(per_step, vec![vec![100], vec![101], vec![102]]);
}

/// Scoring requests as (context, images, choices).
type Scoring = (Vec<u32>, Vec<ImageSpan>, Vec<Vec<u32>>);
/// Each choice's prompt logprobs and greedy flags, by its sequence id.
type ChoiceScores = HashMap<i64, (Vec<f32>, Vec<bool>)>;

fn random_scoring(seed: u64, n: usize) -> Vec<Scoring> {
    let mut rng = Rng(seed);
    let shared: Vec<u32> = (0..20).map(|_| 10 + rng.below(380) as u32).collect();
    (0..n)
        .map(|_| {
            let mut ctx = shared[..rng.below(20)].to_vec();
            let mut images = Vec::new();
            if rng.below(2) == 0 {
                let len = 2 + rng.below(9);
                images.push(ImageSpan {
                    start: ctx.len(),
                    len,
                    hash: 1 + rng.below(2) as u64,
                    ..Default::default()
                });
                ctx.extend(std::iter::repeat_n(IMG, len));
            }
            ctx.extend((0..1 + rng.below(12)).map(|_| 10 + rng.below(380) as u32));
            let choices = (0..1 + rng.below(5))
                .map(|_| {
                    (0..1 + rng.below(6))
                        .map(|_| 10 + rng.below(380) as u32)
                        .collect()
                })
                .collect();
            (ctx, images, choices)
        })
        .collect()
}

/// Runs scoring requests either forked from their context (`add_scoring`) or as one sequence per
/// choice, each step's update applied at once or (`overlap`) after the next step is scheduled and run;
/// returns (choice id -> (prompt logprobs, greedy flags)), prefill tokens computed.
fn run_scoring(
    reqs: &[Scoring],
    cfg: SchedulerConfig,
    forked: bool,
    overlap: bool,
) -> (ChoiceScores, u64) {
    let (bs, nb) = (cfg.block_size, cfg.num_blocks);
    let mut sched = Scheduler::new(tok(), cfg).unwrap();
    let mut model = FakeModel {
        kv: vec![None; nb * bs],
        bs,
        last_sampled: Vec::new(),
    };
    let mut next = 1000;
    let mut expected = 0;
    for (ctx, images, choices) in reqs {
        let ids: Vec<i64> = (0..choices.len() as i64).map(|k| next + 1 + k).collect();
        if forked {
            let pairs = ids.iter().copied().zip(choices.iter().cloned()).collect();
            sched
                .add_scoring(next, ctx.clone(), images, vec![], 0, pairs)
                .unwrap();
        } else {
            for (id, c) in ids.iter().zip(choices) {
                let mut prompt = ctx.clone();
                prompt.extend(c);
                let p = SamplingParams {
                    max_tokens: 0,
                    prompt_logprobs_from: ctx.len() as i64,
                    ..Default::default()
                };
                sched
                    .add_sequence(*id, prompt, images, vec![], 0, p)
                    .unwrap();
            }
        }
        expected += choices.len();
        next += 1 + choices.len() as i64;
    }
    let mut out = HashMap::new();
    let mut steps = 0;
    let mut in_flight: Option<Outputs> = None;
    while sched.has_unfinished() || in_flight.is_some() {
        let outputs = sched.schedule().map(|plan| model.step(&plan));
        assert!(
            outputs.is_some() || in_flight.is_some(),
            "stalled with unfinished sequences: {} waiting, {} running, {} free blocks of {nb}, forked {forked}",
            sched.num_waiting(),
            sched.num_running(),
            sched.block_manager().num_free()
        );
        steps += 1;
        assert!(steps < 100_000);
        let applied = if overlap {
            std::mem::replace(&mut in_flight, outputs)
        } else {
            outputs
        };
        let Some((s, lp, plp, greedy)) = applied else {
            continue;
        };
        for f in sched.update(&s, &lp, &plp, &greedy).unwrap() {
            assert_eq!(f.finish_reason, "scored");
            assert!(out
                .insert(f.seq_id, (f.prompt_logprobs, f.prompt_greedy))
                .is_none());
        }
    }
    assert_eq!(out.len(), expected, "every choice finishes once");
    let bm = sched.block_manager();
    assert_eq!(bm.num_free(), nb, "leaked blocks");
    assert!((0..nb as u32).all(|b| bm.ref_cnt(b) == 0));
    (out, sched.stats().prefill_tokens_computed)
}

#[test]
fn forked_choices_score_as_their_own_sequences_do() {
    for seed in 0..10u64 {
        let reqs = random_scoring(seed, 12);
        let (reference, plain_tokens) =
            run_scoring(&reqs, config(4096, false, 4096, 256, 16), false, false);
        let mut rng = Rng(seed + 7);
        for caching in [false, true] {
            for bs in [4, 16] {
                let longest = reqs
                    .iter()
                    .map(|(c, _, ch)| c.len() + ch.iter().map(Vec::len).max().unwrap())
                    .max()
                    .unwrap();
                // Tight: forked choices then hold context blocks others need (released, recomputed).
                let blocks = longest.div_ceil(bs) + 1 + rng.below(6);
                let cfg = config(blocks, caching, 8 + rng.below(60), 2 + rng.below(8), bs);
                for overlap in [false, true] {
                    let (forked, _) = run_scoring(&reqs, cfg.clone(), true, overlap);
                    for (id, (lp, greedy)) in &reference {
                        let (flp, fgreedy) = &forked[id];
                        assert_eq!(
                            flp, lp,
                            "seed {seed} choice {id} caching {caching} bs {bs} overlap {overlap}"
                        );
                        assert_eq!(fgreedy, greedy);
                    }
                }
            }
        }
        let (roomy, forked_tokens) =
            run_scoring(&reqs, config(4096, false, 4096, 256, 16), true, false);
        assert_eq!(roomy.len(), reference.len());
        // Context once plus each choice's own tokens but its last: fewer than one sequence per choice.
        let ideal: usize = reqs
            .iter()
            .map(|(c, _, ch)| c.len() + ch.iter().map(|x| x.len() - 1).sum::<usize>())
            .sum();
        assert_eq!(forked_tokens as usize, ideal, "seed {seed}");
        assert!(forked_tokens < plain_tokens, "seed {seed}");
    }
}

#[test]
fn aborting_choices_before_the_fork_drops_them_and_their_context() {
    let mut sched = Scheduler::new(tok(), config(64, true, 64, 8, 4)).unwrap();
    sched
        .add_scoring(
            0,
            vec![11; 9],
            &[],
            vec![],
            0,
            vec![(1, vec![12, 13]), (2, vec![14])],
        )
        .unwrap();
    assert!(sched
        .add_scoring(5, vec![11; 3], &[], vec![], 0, vec![(1, vec![12])])
        .unwrap_err()
        .contains("already exists"));
    assert_eq!(sched.abort(1).unwrap().finish_reason, "abort");
    assert!(sched.has_unfinished());
    assert_eq!(sched.abort(2).unwrap().finish_reason, "abort");
    assert!(
        !sched.has_unfinished(),
        "the context goes with its last choice"
    );
    assert_eq!(sched.block_manager().num_free(), 64);
}

#[test]
fn streaming_sequences_report_their_text_as_it_grows() {
    let mut sched = Scheduler::new(tok(), config(64, false, 64, 8, 4)).unwrap();
    let mut model = FakeModel {
        kv: vec![None; 64 * 4],
        bs: 4,
        last_sampled: Vec::new(),
    };
    let p = SamplingParams {
        max_tokens: 12,
        ignore_eos: true,
        stream: true,
        ..Default::default()
    };
    sched
        .add_sequence(0, vec![30, 31, 32], &[], vec![], 0, p.clone())
        .unwrap();
    sched
        .add_sequence(
            1,
            vec![30, 31, 32],
            &[],
            vec![],
            0,
            SamplingParams { stream: false, ..p },
        )
        .unwrap();
    let (mut streamed, mut finished) = (String::new(), HashMap::new());
    while let Some(plan) = sched.schedule() {
        let (s, lp, plp, greedy) = model.step(&plan);
        for f in sched.update(&s, &lp, &plp, &greedy).unwrap() {
            finished.insert(f.seq_id, f);
        }
        for (id, delta) in sched.take_deltas() {
            assert_eq!(id, 0, "only the streaming sequence reports text");
            streamed.push_str(&delta);
        }
    }
    let text = &finished[&0].text;
    assert!(
        !streamed.is_empty() && text.starts_with(&streamed),
        "{streamed:?} / {text:?}"
    );
    assert_eq!(text, &finished[&1].text, "streaming changes no text");
}

#[test]
fn overlapped_scheduling_gives_the_synchronous_outputs() {
    let overlap = Drive {
        overlap: true,
        ..Default::default()
    };
    for seed in 0..12u64 {
        let reqs = random_requests(seed, 40);
        let (longest, reference) = longest_and_reference(&reqs, seed);
        let mut rng = Rng(seed + 200);
        let mut preemptions = 0;
        for caching in [false, true] {
            for bs in [4, 16] {
                // Tight memory (preemption, also of sequences with a token pending), small budgets.
                let tight = longest.div_ceil(bs) + rng.below(4);
                let budget = 8 + rng.below(100);
                let mut cfg = config(tight, caching, budget, 2 + rng.below(8), bs);
                cfg.max_num_image_tokens = [usize::MAX, 1, 20][rng.below(3)];
                let (out, sched) = run_with(&reqs, cfg, seed + 1, overlap);
                preemptions += sched.stats().num_preemptions;
                for (id, f) in &reference {
                    assert_eq!(
                        key(&out[id]),
                        key(f),
                        "seed {seed} seq {id} caching {caching} bs {bs}"
                    );
                }
            }
        }
        let (roomy, _) = run_with(&reqs, config(4096, true, 64, 16, 16), seed + 2, overlap);
        for (id, f) in &reference {
            assert_eq!(key(&roomy[id]), key(f), "seed {seed} seq {id}");
        }
        assert!(preemptions > 0 || seed > 0, "seed 0 is expected to preempt");
    }
}

#[test]
fn overlapped_aborts_and_cancelled_plans_leak_nothing_and_change_no_other_output() {
    for seed in 0..8u64 {
        let reqs = random_requests(seed, 30);
        let (longest, reference) = longest_and_reference(&reqs, seed);
        for (caching, cancel_every) in [(false, 0), (true, 0), (true, 9), (false, 17)] {
            let drive = Drive {
                overlap: true,
                abort_every: 7,
                cancel_every,
            };
            let cfg = config(longest.div_ceil(4) + 2, caching, 48, 6, 4);
            // run_with checks that no block is leaked and every sequence finishes exactly once.
            let (out, sched) = run_with(&reqs, cfg, seed + 3, drive);
            let mut kept = 0;
            for (id, f) in out.iter().filter(|(_, f)| f.finish_reason != "abort") {
                assert_eq!(key(f), key(&reference[id]), "seed {seed} seq {id}");
                kept += 1;
            }
            assert!(
                kept > 0,
                "seed {seed} cancel {cancel_every} caching {caching} aborted {}",
                out.len() - kept
            );
            assert!(out.values().any(|f| f.finish_reason == "abort"));
            assert_eq!(sched.num_in_flight(), 0);
        }
    }
}

#[test]
fn a_pending_token_is_read_from_the_previous_plan_and_max_tokens_stops_one_step_ahead() {
    let mut sched = Scheduler::new(tok(), config(32, true, 64, 8, 16)).unwrap();
    let params = SamplingParams {
        max_tokens: 2,
        ignore_eos: true,
        ..Default::default()
    };
    sched
        .add_sequence(0, vec![30; 5], &[], vec![], 0, params)
        .unwrap();
    let first = sched.schedule().unwrap(); // prefill, samples token 1
    assert!(first.prev_input_rows.is_empty());
    let second = sched.schedule().unwrap(); // decodes token 1 before update(first)
    assert_eq!(second.prev_input_rows, vec![0]);
    assert_eq!(second.prev_sample_index, vec![0]);
    assert_eq!(second.input_ids, vec![0]);
    assert_eq!(second.output_index, vec![1]);
    assert_eq!(second.positions, vec![5]);
    // Token 2 completes max_tokens: nothing more to compute, though neither plan is applied yet.
    assert!(sched.schedule().is_none());
    assert_eq!(sched.num_in_flight(), 2);
    assert!(sched.update(&[41], &[-0.5], &[], &[]).unwrap().is_empty());
    let f = sched.update(&[42], &[-0.25], &[], &[]).unwrap();
    assert_eq!(f[0].output_token_ids, vec![41, 42]);
    assert_eq!(f[0].finish_reason, "length");
    assert_eq!(sched.block_manager().num_free(), 32);
}

#[test]
fn a_sequence_stopped_by_eos_ignores_its_row_already_scheduled() {
    let mut sched = Scheduler::new(tok(), config(8, false, 64, 8, 4)).unwrap();
    sched
        .add_sequence(0, vec![30; 4], &[], vec![], 0, SamplingParams::default())
        .unwrap();
    sched.schedule().unwrap();
    let ahead = sched.schedule().unwrap(); // position 4 opens a second block
    assert_eq!(ahead.prev_input_rows, vec![0]);
    assert_eq!(sched.block_manager().num_free(), 6);
    let f = sched.update(&[EOS as i64], &[-0.1], &[], &[]).unwrap();
    assert_eq!(f[0].output_token_ids, vec![EOS]);
    assert_eq!(f[0].finish_reason, "stop");
    assert_eq!(
        sched.block_manager().num_free(),
        8,
        "blocks return when it stops"
    );
    // The row scheduled ahead is skipped.
    assert!(sched.update(&[9], &[-0.1], &[], &[]).unwrap().is_empty());
    assert!(!sched.has_unfinished());
}

#[test]
fn penalized_rows_carry_their_known_tokens_and_others_none() {
    let mut sched = Scheduler::new(tok(), config(32, true, 64, 8, 16)).unwrap();
    let penalized = SamplingParams {
        max_tokens: 3,
        ignore_eos: true,
        repetition_penalty: 1.5,
        frequency_penalty: 0.25,
        ..Default::default()
    };
    let plain = SamplingParams {
        max_tokens: 3,
        ignore_eos: true,
        ..Default::default()
    };
    sched
        .add_sequence(0, vec![30, 31, 30], &[], vec![], 0, plain)
        .unwrap();
    sched
        .add_sequence(1, vec![40, 41], &[], vec![], 0, penalized)
        .unwrap();
    let first = sched.schedule().unwrap();
    assert_eq!(first.sample_seq_ids, vec![0, 1]);
    assert_eq!(first.penalty_rows, vec![1]);
    assert_eq!(
        (
            first.repetition_penalty.clone(),
            first.presence_penalty.clone()
        ),
        (vec![1.5], vec![0.0])
    );
    assert_eq!(first.frequency_penalty, vec![0.25]);
    assert_eq!(first.penalty_tokens, vec![40, 41]);
    assert_eq!(first.penalty_token_loc, vec![0, 2]);
    assert_eq!(first.penalty_prompt_lens, vec![2]);
    // Overlapped: the next plan is built before `first`'s tokens are known; its pending token is the
    // sample row's input (a `prev_input_rows` row), not among the known tokens.
    let second = sched.schedule().unwrap();
    assert_eq!(second.penalty_tokens, vec![40, 41]);
    assert_eq!(second.prev_input_rows, vec![0, 1]);
    sched.update(&[50, 51], &[-1.0, -1.0], &[], &[]).unwrap();
    sched.update(&[52, 53], &[-1.0, -1.0], &[], &[]).unwrap();
    let third = sched.schedule().unwrap();
    assert_eq!(third.penalty_tokens, vec![40, 41, 51, 53]);
    assert_eq!(third.penalty_token_loc, vec![0, 4]);
}
