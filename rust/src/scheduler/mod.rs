//! Continuous batching with chunked prefill, prefix caching and preemption by recompute.
//!
//! One token budget per step: running sequences first (decodes and unfinished prefill chunks),
//! then waiting ones FCFS, as in vLLM v1. `schedule()` allocates blocks and advances each
//! sequence's computed-token count; `update()` takes the sampled tokens back.
//!
//! Overlapped scheduling: `schedule()` may be called again before `update()` returns the last
//! plan's tokens. A sequence that samples in plan N then has a *pending* token: plan N+1 counts it
//! (its KV slot is allocated, its decode row reads the id from plan N's sampled tokens on the
//! device, see `StepPlan::prev_input_rows`), and `update(N)` fills it in. Plans are applied in order.
//! A sequence that finishes in `update(N)` while plan N+1 is in flight has its N+1 row ignored; that
//! row writes KV into blocks freed now, which is safe on one device stream: any plan that reuses them
//! is built after this point, so it is launched, and runs, after plan N+1.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use rustc_hash::FxHashMap;

use crate::block_manager::{extra_keys, hash_block, BlockManager, ImageSpan};
use crate::detokenizer::IncrementalDetokenizer;
use crate::tokenizer::Tokenizer;
mod admission;
mod forks;
mod overlap;
mod plan;
mod sequence;
mod update;

use overlap::{InFlight, Scheduled};
use sequence::{Choice, ImageBudget, Seq};

#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    pub num_blocks: usize,
    pub block_size: usize,
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub max_model_len: usize,
    pub enable_prefix_caching: bool,
    pub eos_token_ids: Vec<u32>,
    pub position_rows: usize, // 1: plain positions; 3: M-RoPE (temporal, height, width)
    /// Image embeddings a step may start (each image counted once, whole, when a chunk first touches
    /// it: its encoder runs then); one image is always allowed, however large.
    pub max_num_image_tokens: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            num_blocks: 1024,
            block_size: 16,
            max_num_seqs: 256,
            max_num_batched_tokens: 8192,
            max_model_len: 4096,
            enable_prefix_caching: true,
            eos_token_ids: Vec::new(),
            position_rows: 1,
            max_num_image_tokens: usize::MAX,
        }
    }
}

#[derive(Clone, Debug)]
pub struct SamplingParams {
    pub max_tokens: usize, // 0: score the prompt only
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: i32,
    pub seed: i64,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    pub skip_special_tokens: bool,
    pub stream: bool, // report the text each step adds (`Scheduler::take_deltas`)
    pub prompt_logprobs_from: i64, // k >= 1: log P(prompt[i] | prompt[:i]) for i >= k
    // vLLM's penalties: repetition over prompt and output tokens (1 = off), presence and frequency over
    // output tokens (0 = off).
    pub repetition_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
}

impl SamplingParams {
    fn penalized(&self) -> bool {
        self.repetition_penalty != 1.0
            || self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
    }
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            max_tokens: 16,
            temperature: 0.0,
            top_p: 1.0,
            top_k: -1,
            seed: 0,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            skip_special_tokens: true,
            stream: false,
            prompt_logprobs_from: -1,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct FinishedSequence {
    pub seq_id: i64,
    pub prompt_token_ids: Vec<u32>,
    pub output_token_ids: Vec<u32>,
    pub output_logprobs: Vec<f32>,
    pub text: String,
    pub finish_reason: &'static str, // "stop" | "length" | "scored" | "abort"
    pub prompt_logprobs: Vec<f32>,
    pub prompt_greedy: Vec<bool>,
    pub num_cached_tokens: usize,
}

/// One step's flat arrays; see the StepPlan table in docs/ARCHITECTURE.md.
#[derive(Clone, Debug, Default)]
pub struct StepPlan {
    pub input_ids: Vec<i64>,
    pub positions: Vec<i64>, // [position_rows, T], row-major
    pub slot_mapping: Vec<i64>,
    pub query_start_loc: Vec<i32>,
    pub seq_lens: Vec<i32>,
    pub block_tables: Vec<i32>, // [B, block_table_width], row-major
    pub block_table_width: usize,
    pub seq_ids: Vec<i64>,
    pub max_query_len: usize,
    pub max_seq_len: usize,
    pub sample_indices: Vec<i64>,
    pub sample_seq_ids: Vec<i64>,
    pub temperature: Vec<f32>,
    pub top_p: Vec<f32>,
    pub top_k: Vec<i32>,
    pub seed: Vec<i64>,
    pub output_index: Vec<i64>,
    pub prompt_lp_indices: Vec<i64>,
    pub prompt_lp_targets: Vec<i64>,
    pub image_chunks: Vec<i64>, // [K, 3], row-major: (dst row, first embedding, length)
    pub image_hashes: Vec<u64>, // [K]: the content hash of each chunk's image
    pub block_copies: Vec<i64>, // [C, 2], row-major: (src, dst) KV blocks to copy before this step runs
    /// Rows of `input_ids` whose token the previous plan samples (a placeholder 0 here), and which of
    /// that plan's sampled tokens (its sample order) each takes: filled on the device before the step.
    pub prev_input_rows: Vec<i64>,
    pub prev_sample_index: Vec<i64>,
    /// Sample rows with a penalty, their three penalties, and each one's known tokens (prompt, then the
    /// output tokens already given back; a pending one is `prev_input_rows`' at its sample index):
    /// row j's are `penalty_tokens[penalty_token_loc[j]..penalty_token_loc[j + 1]]`, the first
    /// `penalty_prompt_lens[j]` of them its prompt.
    pub penalty_rows: Vec<i64>,
    pub repetition_penalty: Vec<f32>,
    pub presence_penalty: Vec<f32>,
    pub frequency_penalty: Vec<f32>,
    pub penalty_token_loc: Vec<i64>,
    pub penalty_tokens: Vec<i64>,
    pub penalty_prompt_lens: Vec<i64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub num_preemptions: u64,
    pub prefix_cache_queried_tokens: u64,
    pub prefix_cache_hit_tokens: u64,
    pub prefill_tokens_computed: u64,
    pub steps: u64,
    pub schedule_ns: u64,      // CPU time in schedule() and update()
    pub peak_used_blocks: u64, // most blocks held by sequences at once (KV-cache use)
}
pub struct Scheduler {
    tok: Arc<Tokenizer>,
    cfg: SchedulerConfig,
    bm: BlockManager,
    seqs: FxHashMap<i64, Seq>,
    waiting: VecDeque<i64>,
    running: Vec<i64>,
    in_flight: VecDeque<InFlight>, // plans scheduled and not yet updated, oldest first
    spare_rows: Vec<Scheduled>, // an applied plan's rows, emptied: the next plan reuses the allocation
    num_plans: u64,
    pending: Vec<u32>,               // blocks cached by the plan being built
    copies: Vec<i64>,                // (src, dst) block copies the next plan carries
    deltas: Vec<(i64, String)>, // text released for streaming sequences since the last take_deltas
    context_of: FxHashMap<i64, i64>, // choice seq id -> its scoring context, until the fork
    stats: Stats,
}

impl Scheduler {
    pub fn new(tok: Arc<Tokenizer>, cfg: SchedulerConfig) -> Result<Self, String> {
        if cfg.num_blocks == 0
            || cfg.block_size == 0
            || cfg.max_num_seqs == 0
            || cfg.max_num_batched_tokens == 0
        {
            return Err(format!("num_blocks, block_size, max_num_seqs and max_num_batched_tokens must be positive: {cfg:?}"));
        }
        let bm = BlockManager::new(cfg.num_blocks, cfg.block_size, cfg.enable_prefix_caching);
        Ok(Self {
            tok,
            cfg,
            bm,
            seqs: FxHashMap::default(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            in_flight: VecDeque::new(),
            spare_rows: Vec::new(),
            num_plans: 0,
            pending: Vec::new(),
            copies: Vec::new(),
            deltas: Vec::new(),
            context_of: FxHashMap::default(),
            stats: Stats::default(),
        })
    }

    pub fn block_manager(&self) -> &BlockManager {
        &self.bm
    }
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }
    pub fn num_running(&self) -> usize {
        self.running.len()
    }
    pub fn has_unfinished(&self) -> bool {
        !self.seqs.is_empty()
    }
    /// The text each streaming sequence (`SamplingParams::stream`) gained since the last call, in
    /// order; a finished sequence's rest is in its `FinishedSequence::text`.
    pub fn take_deltas(&mut self) -> Vec<(i64, String)> {
        std::mem::take(&mut self.deltas)
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// `images`: the runs of `prompt` that take image embeddings. `positions`: the prompt's
    /// positions, `[position_rows, prompt.len()]` row-major, or empty for `0..len` in every row.
    pub fn add_sequence(
        &mut self,
        seq_id: i64,
        prompt: Vec<u32>,
        images: &[ImageSpan],
        positions: Vec<i64>,
        position_delta: i64,
        params: SamplingParams,
    ) -> Result<(), String> {
        self.check_new_id(seq_id)?;
        let seq = self.new_seq(seq_id, prompt, images, positions, position_delta, params)?;
        self.seqs.insert(seq_id, seq);
        self.waiting.push_back(seq_id);
        Ok(())
    }

    fn check_new_id(&self, seq_id: i64) -> Result<(), String> {
        if self.seqs.contains_key(&seq_id) || self.context_of.contains_key(&seq_id) {
            return Err(format!("sequence {seq_id} already exists"));
        }
        Ok(())
    }

    fn new_seq(
        &self,
        seq_id: i64,
        prompt: Vec<u32>,
        images: &[ImageSpan],
        positions: Vec<i64>,
        position_delta: i64,
        params: SamplingParams,
    ) -> Result<Seq, String> {
        let (n, bs) = (prompt.len(), self.cfg.block_size);
        if n == 0 {
            return Err(format!("sequence {seq_id}: the prompt is empty"));
        }
        if n + params.max_tokens > self.cfg.max_model_len {
            return Err(format!(
                "sequence {seq_id}: prompt length {n} + max_tokens {} = {} exceeds max_model_len {}",
                params.max_tokens,
                n + params.max_tokens,
                self.cfg.max_model_len
            ));
        }
        // The last sampled token's KV is never written.
        let max_kv = n.max(n + params.max_tokens - 1);
        let need = max_kv.div_ceil(bs);
        if need > self.cfg.num_blocks {
            return Err(format!(
                "sequence {seq_id}: {max_kv} tokens need {need} KV blocks of {bs} but the cache has only {}",
                self.cfg.num_blocks
            ));
        }
        let mut spans = images.to_vec();
        spans.sort_by_key(|s| s.start);
        for (i, s) in spans.iter().enumerate() {
            if s.len == 0 || s.end() > n {
                return Err(format!(
                    "sequence {seq_id}: image span ({}, {}) is outside the prompt of length {n}",
                    s.start, s.len
                ));
            }
            if i > 0 && spans[i - 1].end() > s.start {
                return Err(format!(
                    "sequence {seq_id}: image spans starting at {} and {} overlap",
                    spans[i - 1].start,
                    s.start
                ));
            }
            if s.atomic && s.len > self.cfg.max_num_batched_tokens {
                return Err(format!(
                    "sequence {seq_id}: an image of {} tokens must be computed in one step, but \
                     max_num_batched_tokens is {}; raise it",
                    s.len, self.cfg.max_num_batched_tokens
                ));
            }
        }
        let rows = self.cfg.position_rows;
        if !positions.is_empty() && positions.len() != rows * n {
            return Err(format!(
                "sequence {seq_id}: {} positions given for {rows} row(s) of {n} prompt tokens",
                positions.len()
            ));
        }
        let lp_from = if params.prompt_logprobs_from >= 1 {
            params.prompt_logprobs_from as usize
        } else {
            0
        };
        let num_lp = if lp_from > 0 {
            n.saturating_sub(lp_from)
        } else {
            0
        };
        let detok = (!params.stop.is_empty() || params.stream).then(|| {
            IncrementalDetokenizer::new(
                self.tok.clone(),
                params.skip_special_tokens,
                params.stop.clone(),
            )
        });
        let seq = Seq {
            tokens: prompt,
            prompt_len: n,
            images: spans,
            positions_len: if positions.is_empty() { 0 } else { n },
            positions,
            position_delta,
            lp_from,
            blocks: Vec::new(),
            num_computed: 0,
            num_registered: 0,
            hashes: Vec::new(),
            logprobs: Vec::with_capacity(params.max_tokens),
            prompt_lp: vec![0.0; num_lp],
            prompt_greedy: vec![false; num_lp],
            detok,
            num_cached_tokens: None,
            choices: Vec::new(),
            params,
            pending: 0,
            last_sample: None,
        };
        Ok(seq)
    }

    /// Drops a sequence; returns it as finished with reason "abort" (None for an unknown id). A choice
    /// not yet forked is struck from its context, and a context left without choices is dropped too.
    pub fn abort(&mut self, seq_id: i64) -> Option<FinishedSequence> {
        if let Some(ctx) = self.context_of.remove(&seq_id) {
            let parent = self.seqs.get_mut(&ctx)?;
            let choice = parent
                .choices
                .iter_mut()
                .find(|c| c.seq_id == Some(seq_id))?;
            choice.seq_id = None;
            let mut prompt = parent.tokens.clone();
            prompt.extend(&choice.tokens);
            if parent.choices.iter().all(|c| c.seq_id.is_none()) {
                self.abort(ctx);
            }
            return Some(FinishedSequence {
                seq_id,
                prompt_token_ids: prompt,
                output_token_ids: Vec::new(),
                output_logprobs: Vec::new(),
                text: String::new(),
                finish_reason: "abort",
                prompt_logprobs: Vec::new(),
                prompt_greedy: Vec::new(),
                num_cached_tokens: 0,
            });
        }
        let seq = self.seqs.remove(&seq_id)?;
        for c in &seq.choices {
            if let Some(id) = c.seq_id {
                self.context_of.remove(&id);
            }
        }
        self.waiting.retain(|&id| id != seq_id);
        self.running.retain(|&id| id != seq_id);
        self.bm.free(&seq.blocks);
        self.forget_rows(seq_id);
        // The outstanding plans may never run (aborts follow errors): cache nothing they were to write.
        for plan in &mut self.in_flight {
            for id in std::mem::take(&mut plan.cached) {
                self.bm.uncache(id);
            }
        }
        Some(self.finish(seq_id, seq, "abort"))
    }

    /// The rows of a sequence gone (finished or aborted) in the plans in flight: `update` skips them.
    fn forget_rows(&mut self, seq_id: i64) {
        for plan in &mut self.in_flight {
            for sc in plan.rows.iter_mut().filter(|sc| sc.seq_id == Some(seq_id)) {
                sc.seq_id = None;
            }
        }
    }

    pub fn schedule(&mut self) -> Option<StepPlan> {
        let t0 = Instant::now();
        let plan = self.schedule_inner();
        self.stats.schedule_ns += t0.elapsed().as_nanos() as u64;
        plan
    }

    fn schedule_inner(&mut self) -> Option<StepPlan> {
        let bs = self.cfg.block_size;
        let mut budget = self.cfg.max_num_batched_tokens;
        let mut images = ImageBudget::new(self.cfg.max_num_image_tokens);
        let mut chunks: Vec<(i64, usize, usize)> = Vec::with_capacity(self.running.len()); // (id, start, len)
        let mut width = 0; // widest block table of the step
        let mut preempted = false;
        self.pending.clear();

        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let seq = &self.seqs[&id];
            let start = seq.num_computed;
            let len = if seq.can_follow(self.num_plans) {
                seq.chunk_len(start, budget, &mut images)
            } else {
                0
            };
            if len == 0 {
                // An image that must be computed whole, or its encoder, does not fit this step; or
                // the sequence waits for its pending tokens.
                i += 1;
                continue;
            }
            let need = (start + len).div_ceil(bs) - seq.blocks.len();
            // Out of blocks: preempt the most recently admitted sequence, possibly this one.
            while self.bm.num_free() < need && self.running.last() != Some(&id) {
                let victim = self.running.pop().unwrap();
                self.preempt(victim);
                preempted = true;
            }
            if self.bm.num_free() < need {
                self.running.pop();
                self.preempt(id);
                preempted = true;
                break;
            }
            let seq = self.seqs.get_mut(&id).unwrap();
            self.bm.allocate(need, &mut seq.blocks);
            seq.register_blocks(start + len, &mut self.bm, &mut self.pending);
            width = width.max(seq.blocks.len());
            chunks.push((id, start, len));
            budget -= len;
            i += 1;
        }

        // Admitting while others were just preempted for memory would only thrash.
        while !preempted && budget > 0 && self.running.len() < self.cfg.max_num_seqs {
            let Some(&id) = self.waiting.front() else {
                break;
            };
            // Preempted with a token pending: it recomputes once `update` has given that token.
            if self.seqs[&id].pending > 0 {
                break;
            }
            let Some((start, len)) = self.admit(id, budget, &mut images) else {
                break;
            };
            width = width.max(self.seqs[&id].blocks.len());
            self.waiting.pop_front();
            self.running.push(id);
            chunks.push((id, start, len));
            budget -= len;
        }

        if chunks.is_empty() {
            // Nothing fits while forked choices wait holding context blocks: drop those (they recompute
            // through the prefix cache) rather than stall.
            if self.release_waiting_blocks() {
                return self.schedule_inner();
            }
            return None;
        }
        self.stats.steps += 1;
        let used = (self.bm.num_blocks() - self.bm.num_free()) as u64;
        self.stats.peak_used_blocks = self.stats.peak_used_blocks.max(used);
        Some(self.build_plan(&chunks, width))
    }
}
