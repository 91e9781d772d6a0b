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

struct Seq {
    tokens: Vec<u32>, // prompt then output
    prompt_len: usize,
    images: Vec<ImageSpan>,
    positions: Vec<i64>, // [position_rows, positions_len] given with the prompt; empty: plain positions
    positions_len: usize, // tokens `positions` covers; a later token at `pos` is at `pos + position_delta`
    position_delta: i64,
    params: SamplingParams,
    lp_from: usize, // 0: no prompt logprobs
    blocks: Vec<u32>,
    num_computed: usize,   // tokens whose KV is (being) written
    num_registered: usize, // leading blocks offered to the prefix cache
    hashes: Vec<u64>,      // chained hashes of the full blocks of `tokens`, filled lazily
    logprobs: Vec<f32>,
    prompt_lp: Vec<f32>,
    prompt_greedy: Vec<bool>,
    detok: Option<IncrementalDetokenizer>, // only with stop strings; otherwise decode once at the end
    num_cached_tokens: Option<usize>,      // prefix hit of the first admission
    choices: Vec<Choice>,                  // a scoring context: the continuations that fork from it
    pending: usize, // tokens sampled by plans in flight, not yet given back by `update`
    last_sample: Option<(u64, usize)>, // (plan, sample row) of the newest pending token
}

/// A continuation scored after a shared context (`Scheduler::add_scoring`): its first token is scored
/// by the context's last row, computed once for all choices; at the fork it becomes a sequence of its
/// own that shares the context's KV blocks (the last, partial one copied when first written).
struct Choice {
    seq_id: Option<i64>, // None once aborted
    tokens: Vec<u32>,
    first_lp: f32,
    first_greedy: bool,
}

impl Seq {
    fn num_output(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Position of token `pos` in position row `row`.
    fn position(&self, row: usize, pos: usize) -> i64 {
        if pos < self.positions_len {
            self.positions[row * self.positions_len + pos]
        } else {
            pos as i64 + self.position_delta
        }
    }

    /// Tokens whose KV this sequence computes: all of them, pending ones included, except that a scored
    /// prompt skips its last token (no later row reads its KV, and its logits score nothing), and that a
    /// sequence whose pending tokens complete `max_tokens` computes no more (its last token's KV is
    /// never written).
    fn target(&self) -> usize {
        let known = self.tokens.len();
        if self.params.max_tokens == 0 && self.lp_from > 0 {
            self.prompt_len - 1
        } else if self.pending > 0 && self.num_output() + self.pending >= self.params.max_tokens {
            known + self.pending - 1
        } else {
            known + self.pending
        }
    }

    /// Whether a step right after plan `last_plan` can compute this sequence: a pending token must
    /// come from that very plan (its decode row reads the id from that plan's sampled tokens).
    fn can_follow(&self, last_plan: u64) -> bool {
        self.pending == 0 || self.last_sample.is_some_and(|(plan, _)| plan == last_plan)
    }

    /// Tokens to compute from `start` within `budget`: the chunk never ends inside an atomic image
    /// run (0 when that run does not fit; a run that began before `start` was a prefix-cache hit,
    /// whose cached KV is valid, so only the rest of it must come in one piece), and it stops before
    /// an image whose embeddings would exceed the step's image budget (`images` holds the hashes
    /// already counted this step and what they cost).
    fn chunk_len(&self, start: usize, budget: usize, images: &mut ImageBudget) -> usize {
        let mut end = (start + budget).min(self.target());
        for im in self
            .images
            .iter()
            .filter(|im| im.end() > start && im.start < end)
        {
            if !images.take(im.hash, || self.image_tokens(im.hash)) {
                end = im.start.max(start);
                break;
            }
        }
        let cut = self
            .images
            .iter()
            .find(|im| im.atomic && im.start < end && end < im.end() && im.end() > start)
            .map_or(end, |im| im.start.max(start));
        cut - start
    }

    /// Embeddings of the image `hash` in this sequence (the lengths of all its runs).
    fn image_tokens(&self, hash: u64) -> usize {
        self.images
            .iter()
            .filter(|im| im.hash == hash)
            .map(|im| im.len)
            .sum()
    }

    fn ensure_hashes(&mut self, n: usize, bs: usize) {
        while self.hashes.len() < n {
            let i = self.hashes.len();
            let parent = if i == 0 { 0 } else { self.hashes[i - 1] };
            let extra = extra_keys(&self.images, i, bs);
            self.hashes.push(hash_block(
                parent,
                &self.tokens[i * bs..(i + 1) * bs],
                &extra,
            ));
        }
    }

    /// Offers the blocks that the first `end` tokens fill to the prefix cache. As in vLLM this
    /// happens when they are scheduled, so a sequence admitted later in the same step can share
    /// them: sound because every layer writes the whole batch's KV before any attention reads it.
    fn register_blocks(&mut self, end: usize, bm: &mut BlockManager, pending: &mut Vec<u32>) {
        if !bm.caching_enabled() {
            return;
        }
        let bs = bm.block_size();
        let full = end.min(self.tokens.len()) / bs; // a pending token's id is not known yet
        self.ensure_hashes(full, bs);
        for i in self.num_registered..full {
            let parent = i.checked_sub(1).map(|j| self.blocks[j]);
            let tokens = &self.tokens[i * bs..(i + 1) * bs];
            let extra = extra_keys(&self.images, i, bs);
            if bm.cache_block(self.blocks[i], parent, self.hashes[i], tokens, extra) {
                pending.push(self.blocks[i]);
            }
        }
        self.num_registered = self.num_registered.max(full);
    }
}

/// The step's image-embedding budget: each image counted once.
struct ImageBudget {
    left: usize,
    used_any: bool,
    counted: Vec<u64>,
}

impl ImageBudget {
    fn new(limit: usize) -> Self {
        Self {
            left: limit,
            used_any: false,
            counted: Vec::new(),
        }
    }

    /// Whether image `hash` fits the step (counting it if it is new); the first image always fits.
    fn take(&mut self, hash: u64, cost: impl FnOnce() -> usize) -> bool {
        if self.counted.contains(&hash) {
            return true;
        }
        let cost = cost();
        if self.used_any && cost > self.left {
            return false;
        }
        self.left = self.left.saturating_sub(cost);
        self.used_any = true;
        self.counted.push(hash);
        true
    }
}

/// A plan not yet given back by `update`.
struct InFlight {
    rows: Vec<Scheduled>,
    cached: Vec<u32>, // blocks this plan offered to the prefix cache, whose KV it (or the one before) writes
}

/// What `update` needs to know about a sequence scheduled in a plan.
struct Scheduled {
    seq_id: Option<i64>, // None once aborted
    sampled: bool,
    end: usize,    // tokens computed once this plan has run
    lp_pos: usize, // first prompt position scored, and how many
    lp_count: usize,
    fanout: usize, // a scoring context's last row: one logprob per choice after the prompt rows
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

    /// Scores each of `choices` (seq id, tokens) as a continuation of `context`, computing the context
    /// once: its last row scores every choice's first token, and each choice then computes only its
    /// own tokens over the context's KV blocks (shared; the partial last block copied on first write).
    /// Each choice finishes as its own sequence ("scored", prompt logprobs of its tokens); the context
    /// (`seq_id`) is internal and never returned.
    #[allow(clippy::too_many_arguments)]
    pub fn add_scoring(
        &mut self,
        seq_id: i64,
        context: Vec<u32>,
        images: &[ImageSpan],
        positions: Vec<i64>,
        position_delta: i64,
        choices: Vec<(i64, Vec<u32>)>,
    ) -> Result<(), String> {
        self.check_new_id(seq_id)?;
        let mut ids: Vec<i64> = choices.iter().map(|c| c.0).collect();
        ids.sort_unstable();
        ids.dedup();
        if choices.is_empty() || ids.len() != choices.len() || ids.contains(&seq_id) {
            return Err(format!(
                "sequence {seq_id}: scoring needs choices with distinct ids of their own"
            ));
        }
        for &(id, ref tokens) in &choices {
            self.check_new_id(id)?;
            if tokens.is_empty() {
                return Err(format!("sequence {id}: an empty choice"));
            }
        }
        // The longest choice as a sequence of its own must fit (context length, KV blocks).
        let longest = choices.iter().map(|c| c.1.len()).max().unwrap_or(0);
        let mut probe = context.clone();
        probe.resize(context.len() + longest, 0);
        let probe_params = SamplingParams {
            max_tokens: 0,
            ..Default::default()
        };
        self.new_seq(seq_id, probe, images, vec![], 0, probe_params.clone())?;
        let mut seq = self.new_seq(
            seq_id,
            context,
            images,
            positions,
            position_delta,
            probe_params,
        )?;
        for &(id, _) in &choices {
            self.context_of.insert(id, seq_id);
        }
        seq.choices = choices
            .into_iter()
            .map(|(id, tokens)| Choice {
                seq_id: Some(id),
                tokens,
                first_lp: 0.0,
                first_greedy: false,
            })
            .collect();
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

    /// Plans scheduled and not yet given back by `update`.
    pub fn num_in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Drops the plans in flight (their step failed, or will never be applied): what they cached is
    /// uncached, and every sequence they computed is preempted, so it recomputes its KV and resamples
    /// its pending tokens (seeded sampling gives the same ones).
    pub fn cancel_in_flight(&mut self) {
        let mut ids = Vec::new();
        for plan in std::mem::take(&mut self.in_flight) {
            for id in plan.cached {
                self.bm.uncache(id);
            }
            ids.extend(plan.rows.iter().filter_map(|sc| sc.seq_id));
        }
        for id in self.running.clone().into_iter().rev() {
            if ids.contains(&id) {
                self.running.retain(|&r| r != id);
                self.preempt(id);
            }
        }
        for id in ids {
            if let Some(seq) = self.seqs.get_mut(&id) {
                seq.pending = 0;
                seq.last_sample = None;
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

    /// Takes the blocks waiting sequence `id` needs to compute its next chunk: a forked choice already
    /// holds its context's blocks (the partial last one is copied now if still shared), anything else
    /// looks its prefix up in the cache. None (nothing taken) when the chunk does not fit.
    fn admit(
        &mut self,
        id: i64,
        budget: usize,
        images: &mut ImageBudget,
    ) -> Option<(usize, usize)> {
        let bs = self.cfg.block_size;
        let seq = self.seqs.get_mut(&id).unwrap();
        if !seq.blocks.is_empty() {
            let start = seq.num_computed;
            let len = seq.chunk_len(start, budget, images);
            let shared = !start.is_multiple_of(bs) && self.bm.ref_cnt(seq.blocks[start / bs]) > 1;
            let need = (start + len).div_ceil(bs) - seq.blocks.len() + shared as usize;
            if len == 0 || self.bm.num_free() < need {
                return None;
            }
            if shared {
                let old = seq.blocks[start / bs];
                let mut fresh = Vec::with_capacity(1);
                self.bm.allocate(1, &mut fresh);
                seq.blocks[start / bs] = fresh[0];
                self.bm.free(&[old]);
                self.copies.extend([old as i64, fresh[0] as i64]);
            }
            self.bm.allocate(need - shared as usize, &mut seq.blocks);
            seq.register_blocks(start + len, &mut self.bm, &mut self.pending);
            return Some((start, len));
        }
        let hit = if self.bm.caching_enabled() {
            // Always compute the last token, and every position whose logits score the prompt.
            let mut max_hit = seq.tokens.len() - 1;
            if seq.lp_from > 0 {
                max_hit = max_hit.min(seq.lp_from - 1);
            }
            seq.ensure_hashes(max_hit / bs, bs);
            self.bm
                .lookup(&seq.hashes[..max_hit / bs], &seq.tokens, &seq.images)
        } else {
            Vec::new()
        };
        let start = hit.len() * bs;
        let len = seq.chunk_len(start, budget, images);
        let need = (start + len).div_ceil(bs) - hit.len();
        if len == 0 || !self.bm.can_take(&hit, need) {
            return None;
        }
        self.bm.take_hits(&hit);
        let hit_blocks = hit.len();
        seq.blocks = hit;
        self.bm.allocate(need, &mut seq.blocks);
        seq.num_computed = start;
        seq.num_registered = hit_blocks;
        seq.register_blocks(start + len, &mut self.bm, &mut self.pending);
        seq.num_cached_tokens.get_or_insert(start);
        self.stats.prefix_cache_queried_tokens += seq.tokens.len() as u64;
        self.stats.prefix_cache_hit_tokens += start as u64;
        Some((start, len))
    }

    /// Frees the blocks of the waiting sequences that hold some (forked choices); whether any did.
    fn release_waiting_blocks(&mut self) -> bool {
        let victims: Vec<i64> = self
            .waiting
            .iter()
            .copied()
            .filter(|id| !self.seqs[id].blocks.is_empty())
            .collect();
        for &id in &victims {
            let seq = self.seqs.get_mut(&id).unwrap();
            self.bm.free(&seq.blocks);
            seq.blocks.clear();
            seq.num_computed = 0;
            seq.num_registered = 0;
        }
        !victims.is_empty()
    }

    fn preempt(&mut self, id: i64) {
        let seq = self.seqs.get_mut(&id).unwrap();
        self.bm.free(&seq.blocks);
        seq.blocks.clear();
        seq.num_computed = 0;
        seq.num_registered = 0;
        self.waiting.push_front(id);
        self.stats.num_preemptions += 1;
    }

    fn build_plan(&mut self, chunks: &[(i64, usize, usize)], width: usize) -> StepPlan {
        let bs = self.cfg.block_size as i64;
        let position_rows = self.cfg.position_rows;
        let total: usize = chunks.iter().map(|c| c.2).sum();
        let mut p = StepPlan {
            input_ids: Vec::with_capacity(total),
            positions: vec![0; position_rows * total],
            slot_mapping: Vec::with_capacity(total),
            query_start_loc: Vec::with_capacity(chunks.len() + 1),
            seq_lens: Vec::with_capacity(chunks.len()),
            block_tables: vec![0; chunks.len() * width],
            block_table_width: width,
            seq_ids: Vec::with_capacity(chunks.len()),
            block_copies: std::mem::take(&mut self.copies),
            ..Default::default()
        };
        p.query_start_loc.push(0);
        p.penalty_token_loc.push(0);
        let mut rows = std::mem::take(&mut self.spare_rows);
        self.num_plans += 1;
        for (b, &(id, start, len)) in chunks.iter().enumerate() {
            let seq = self.seqs.get_mut(&id).unwrap();
            let row0 = p.input_ids.len();
            let end = start + len;
            for pos in start..end {
                let row = p.input_ids.len();
                for r in 0..position_rows {
                    p.positions[r * total + row] = seq.position(r, pos);
                }
                match seq.tokens.get(pos) {
                    Some(&tok) => p.input_ids.push(tok as i64),
                    None => {
                        // Pending: only a decode row of the plan just before (see `can_follow`).
                        let (_, sample_row) = seq.last_sample.expect("a pending token");
                        p.prev_input_rows.push(row as i64);
                        p.prev_sample_index.push(sample_row as i64);
                        p.input_ids.push(0);
                    }
                }
                p.slot_mapping
                    .push(seq.blocks[pos / bs as usize] as i64 * bs + pos as i64 % bs);
            }
            p.query_start_loc.push(p.input_ids.len() as i32);
            p.seq_lens.push(end as i32);
            for (dst, &blk) in p.block_tables[b * width..].iter_mut().zip(&seq.blocks) {
                *dst = blk as i32;
            }
            p.seq_ids.push(id);
            p.max_query_len = p.max_query_len.max(len);
            p.max_seq_len = p.max_seq_len.max(end);

            let sampled = end == seq.tokens.len() + seq.pending && seq.params.max_tokens > 0;
            if sampled {
                let sp = &seq.params;
                seq.last_sample = Some((self.num_plans, p.sample_indices.len()));
                p.sample_indices.push((row0 + len - 1) as i64);
                p.sample_seq_ids.push(id);
                p.temperature.push(sp.temperature);
                p.top_p.push(sp.top_p);
                p.top_k.push(sp.top_k);
                p.seed.push(sp.seed);
                p.output_index.push((seq.num_output() + seq.pending) as i64);
                if sp.penalized() {
                    p.penalty_rows.push(p.sample_indices.len() as i64 - 1);
                    p.repetition_penalty.push(sp.repetition_penalty);
                    p.presence_penalty.push(sp.presence_penalty);
                    p.frequency_penalty.push(sp.frequency_penalty);
                    p.penalty_tokens
                        .extend(seq.tokens.iter().map(|&t| t as i64));
                    p.penalty_token_loc.push(p.penalty_tokens.len() as i64);
                    p.penalty_prompt_lens.push(seq.prompt_len as i64);
                }
                seq.pending += 1;
            }
            // Row `pos` scores prompt token pos+1.
            let (mut lp_pos, mut lp_count) = (0, 0);
            if seq.lp_from > 0 {
                lp_pos = start.max(seq.lp_from - 1);
                let lp_end = end.min(seq.prompt_len - 1);
                lp_count = lp_end.saturating_sub(lp_pos);
                for pos in lp_pos..lp_pos + lp_count {
                    p.prompt_lp_indices.push((row0 + pos - start) as i64);
                    p.prompt_lp_targets.push(seq.tokens[pos + 1] as i64);
                }
            }
            // A scoring context's last row scores the first token of every choice.
            let fanout = if end == seq.prompt_len {
                seq.choices.len()
            } else {
                0
            };
            for c in &seq.choices[..fanout] {
                p.prompt_lp_indices.push((row0 + len - 1) as i64);
                p.prompt_lp_targets.push(c.tokens[0] as i64);
            }
            for im in &seq.images {
                let (lo, hi) = (start.max(im.start), end.min(im.end()));
                if lo < hi {
                    p.image_chunks.extend([
                        (row0 + lo - start) as i64,
                        (im.offset + lo - im.start) as i64,
                        (hi - lo) as i64,
                    ]);
                    p.image_hashes.push(im.hash);
                }
            }
            let is_decode = len == 1 && start >= seq.prompt_len;
            if !is_decode {
                self.stats.prefill_tokens_computed += len as u64;
            }
            seq.num_computed = end;
            rows.push(Scheduled {
                seq_id: Some(id),
                sampled,
                end,
                lp_pos,
                lp_count,
                fanout,
            });
        }
        self.in_flight.push_back(InFlight {
            rows,
            cached: std::mem::take(&mut self.pending),
        });
        p
    }

    /// Applies the results of the oldest plan in flight: `sampled`/`sampled_logprobs` per sample row,
    /// `prompt_logprobs`/`prompt_greedy` per prompt-logprob row. Returns the sequences that finished.
    pub fn update(
        &mut self,
        sampled: &[i64],
        sampled_logprobs: &[f32],
        prompt_logprobs: &[f32],
        prompt_greedy: &[bool],
    ) -> Result<Vec<FinishedSequence>, String> {
        let t0 = Instant::now();
        let rows = self
            .in_flight
            .front()
            .map_or(&[][..], |plan| &plan.rows[..]);
        let s = rows.iter().filter(|x| x.sampled).count();
        let l: usize = rows.iter().map(|x| x.lp_count + x.fanout).sum();
        if sampled.len() != s
            || sampled_logprobs.len() != s
            || prompt_logprobs.len() != l
            || prompt_greedy.len() != l
        {
            return Err(format!(
                "update() expects {s} sampled tokens and logprobs and {l} prompt logprobs and greedy flags, got {}, {}, {} and {}",
                sampled.len(),
                sampled_logprobs.len(),
                prompt_logprobs.len(),
                prompt_greedy.len()
            ));
        }
        let (mut si, mut li) = (0, 0);
        let mut done: Vec<(i64, &'static str)> = Vec::new();
        let mut rows = self
            .in_flight
            .pop_front()
            .map_or_else(Vec::new, |plan| plan.rows);
        for sc in rows.drain(..) {
            let (s_row, l_row) = (si, li);
            si += sc.sampled as usize;
            li += sc.lp_count + sc.fanout;
            let Some(id) = sc.seq_id else { continue };
            let seq = self.seqs.get_mut(&id).unwrap();
            for k in 0..sc.lp_count {
                let at = sc.lp_pos + 1 + k - seq.lp_from;
                seq.prompt_lp[at] = prompt_logprobs[l_row + k];
                seq.prompt_greedy[at] = prompt_greedy[l_row + k];
            }
            for (k, c) in seq.choices[..sc.fanout].iter_mut().enumerate() {
                c.first_lp = prompt_logprobs[l_row + sc.lp_count + k];
                c.first_greedy = prompt_greedy[l_row + sc.lp_count + k];
            }
            if seq.params.max_tokens == 0 {
                // Not `num_computed`: a later plan in flight may have scheduled its next chunk.
                if sc.end >= seq.target() {
                    done.push((id, "scored"));
                }
                continue;
            }
            if !sc.sampled {
                continue;
            }
            let tok = u32::try_from(sampled[s_row])
                .map_err(|_| format!("sampled token {} is not a token id", sampled[s_row]))?;
            seq.tokens.push(tok);
            seq.pending -= 1;
            seq.logprobs.push(sampled_logprobs[s_row]);
            let stop_tok = is_stop_token(&self.cfg.eos_token_ids, &seq.params, tok);
            // A stop token is not part of the text, so it is not detokenized.
            let (released, stop_str) = match seq.detok.as_mut() {
                Some(d) if !stop_tok => d.push(tok),
                _ => (String::new(), false),
            };
            let reason = if stop_tok || stop_str {
                Some("stop")
            } else if seq.num_output() >= seq.params.max_tokens {
                Some("length")
            } else {
                None
            };
            if let Some(r) = reason {
                done.push((id, r));
            } else if seq.params.stream && !released.is_empty() {
                self.deltas.push((id, released));
            }
        }
        self.spare_rows = rows;
        let mut out = Vec::with_capacity(done.len());
        if !done.is_empty() {
            // A sequence preempted with a token pending waits in the queue; a later plan may hold
            // rows of one that finishes now.
            self.running.retain(|id| !done.iter().any(|d| d.0 == *id));
            if done.iter().any(|d| self.seqs[&d.0].blocks.is_empty()) {
                self.waiting.retain(|id| !done.iter().any(|d| d.0 == *id));
            }
            for (id, reason) in done {
                self.forget_rows(id);
                let seq = self.seqs.remove(&id).unwrap();
                if seq.choices.is_empty() {
                    self.bm.free(&seq.blocks);
                    out.push(self.finish(id, seq, reason));
                } else {
                    self.fork(seq, &mut out);
                }
            }
        }
        self.stats.schedule_ns += t0.elapsed().as_nanos() as u64;
        Ok(out)
    }

    /// A computed scoring context becomes its choices: each shares the context's blocks and goes to the
    /// front of the queue with its first token already scored; a one-token choice is done at once.
    fn fork(&mut self, ctx: Seq, out: &mut Vec<FinishedSequence>) {
        let n = ctx.prompt_len;
        let mut forked = Vec::new();
        for c in &ctx.choices {
            let Some(id) = c.seq_id else { continue };
            self.context_of.remove(&id);
            let m = c.tokens.len();
            // The choice reuses the context's KV as a prefix-cache hit would.
            self.stats.prefix_cache_queried_tokens += (n + m) as u64;
            self.stats.prefix_cache_hit_tokens += n as u64;
            let mut tokens = ctx.tokens.clone();
            tokens.extend(&c.tokens);
            let (mut prompt_lp, mut prompt_greedy) = (vec![0.0; m], vec![false; m]);
            prompt_lp[0] = c.first_lp;
            prompt_greedy[0] = c.first_greedy;
            let seq = Seq {
                tokens,
                prompt_len: n + m,
                images: ctx.images.clone(),
                positions: ctx.positions.clone(),
                positions_len: ctx.positions_len,
                position_delta: ctx.position_delta,
                params: ctx.params.clone(),
                lp_from: n,
                blocks: if m > 1 {
                    ctx.blocks.clone()
                } else {
                    Vec::new()
                },
                num_computed: n,
                num_registered: ctx.num_registered,
                hashes: ctx.hashes.clone(),
                logprobs: Vec::new(),
                prompt_lp,
                prompt_greedy,
                detok: None,
                num_cached_tokens: ctx.num_cached_tokens,
                choices: Vec::new(),
                pending: 0,
                last_sample: None,
            };
            if m == 1 {
                out.push(self.finish(id, seq, "scored"));
                continue;
            }
            self.bm.take_hits(&seq.blocks);
            self.seqs.insert(id, seq);
            forked.push(id);
        }
        self.bm.free(&ctx.blocks);
        for id in forked.into_iter().rev() {
            self.waiting.push_front(id);
        }
    }

    fn finish(&self, seq_id: i64, seq: Seq, reason: &'static str) -> FinishedSequence {
        let output = seq.tokens[seq.prompt_len..].to_vec();
        let text = match seq.detok {
            Some(mut d) => {
                d.flush();
                d.text().to_string()
            }
            None => {
                // An EOS or stop token ends the output but is not part of its text.
                let p = &seq.params;
                let stop_tok = output
                    .last()
                    .is_some_and(|&t| is_stop_token(&self.cfg.eos_token_ids, p, t));
                let ids = if reason == "stop" && stop_tok {
                    &output[..output.len() - 1]
                } else {
                    &output[..]
                };
                self.tok
                    .decode(ids, p.skip_special_tokens)
                    .unwrap_or_default()
            }
        };
        FinishedSequence {
            seq_id,
            prompt_token_ids: seq.tokens[..seq.prompt_len].to_vec(),
            output_token_ids: output,
            output_logprobs: seq.logprobs,
            text,
            finish_reason: reason,
            prompt_logprobs: seq.prompt_lp,
            prompt_greedy: seq.prompt_greedy,
            num_cached_tokens: seq.num_cached_tokens.unwrap_or(0),
        }
    }
}

fn is_stop_token(eos_token_ids: &[u32], p: &SamplingParams, tok: u32) -> bool {
    (!p.ignore_eos && eos_token_ids.contains(&tok)) || p.stop_token_ids.contains(&tok)
}
