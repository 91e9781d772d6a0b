//! A sequence as the scheduler keeps it: its tokens, blocks and positions, how far its KV is computed,
//! the next prefill chunk it can take (atomic image runs, the step's image budget), and the hashes
//! by which its full blocks enter the prefix cache.

use super::*;

pub(super) struct Seq {
    pub(super) tokens: Vec<u32>, // prompt then output
    pub(super) prompt_len: usize,
    pub(super) images: Vec<ImageSpan>,
    pub(super) positions: Vec<i64>, // [position_rows, positions_len] given with the prompt; empty: plain positions
    pub(super) positions_len: usize, // tokens `positions` covers; a later token at `pos` is at `pos + position_delta`
    pub(super) position_delta: i64,
    pub(super) params: SamplingParams,
    pub(super) lp_from: usize, // 0: no prompt logprobs
    pub(super) blocks: Vec<u32>,
    pub(super) num_computed: usize, // tokens whose KV is (being) written
    pub(super) num_registered: usize, // leading blocks offered to the prefix cache
    pub(super) hashes: Vec<u64>,    // chained hashes of the full blocks of `tokens`, filled lazily
    pub(super) logprobs: Vec<f32>,
    pub(super) prompt_lp: Vec<f32>,
    pub(super) prompt_greedy: Vec<bool>,
    pub(super) detok: Option<IncrementalDetokenizer>, // only with stop strings; otherwise decode once at the end
    pub(super) num_cached_tokens: Option<usize>,      // prefix hit of the first admission
    pub(super) choices: Vec<Choice>, // a scoring context: the continuations that fork from it
    pub(super) pending: usize, // tokens sampled by plans in flight, not yet given back by `update`
    pub(super) last_sample: Option<(u64, usize)>, // (plan, sample row) of the newest pending token
}

/// A continuation scored after a shared context (`Scheduler::add_scoring`): its first token is scored
/// by the context's last row, computed once for all choices; at the fork it becomes a sequence of its
/// own that shares the context's KV blocks (the last, partial one copied when first written).
pub(super) struct Choice {
    pub(super) seq_id: Option<i64>, // None once aborted
    pub(super) tokens: Vec<u32>,
    pub(super) first_lp: f32,
    pub(super) first_greedy: bool,
}

impl Seq {
    pub(super) fn num_output(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Position of token `pos` in position row `row`.
    pub(super) fn position(&self, row: usize, pos: usize) -> i64 {
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
    pub(super) fn target(&self) -> usize {
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
    pub(super) fn can_follow(&self, last_plan: u64) -> bool {
        self.pending == 0 || self.last_sample.is_some_and(|(plan, _)| plan == last_plan)
    }

    /// Tokens to compute from `start` within `budget`: the chunk never ends inside an atomic image
    /// run (0 when that run does not fit; a run that began before `start` was a prefix-cache hit,
    /// whose cached KV is valid, so only the rest of it must come in one piece), and it stops before
    /// an image whose embeddings would exceed the step's image budget (`images` holds the hashes
    /// already counted this step and what they cost).
    pub(super) fn chunk_len(&self, start: usize, budget: usize, images: &mut ImageBudget) -> usize {
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
    pub(super) fn image_tokens(&self, hash: u64) -> usize {
        self.images
            .iter()
            .filter(|im| im.hash == hash)
            .map(|im| im.len)
            .sum()
    }

    pub(super) fn ensure_hashes(&mut self, n: usize, bs: usize) {
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
    pub(super) fn register_blocks(
        &mut self,
        end: usize,
        bm: &mut BlockManager,
        pending: &mut Vec<u32>,
    ) {
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
pub(super) struct ImageBudget {
    pub(super) left: usize,
    pub(super) used_any: bool,
    pub(super) counted: Vec<u64>,
}

impl ImageBudget {
    pub(super) fn new(limit: usize) -> Self {
        Self {
            left: limit,
            used_any: false,
            counted: Vec::new(),
        }
    }

    /// Whether image `hash` fits the step (counting it if it is new); the first image always fits.
    pub(super) fn take(&mut self, hash: u64, cost: impl FnOnce() -> usize) -> bool {
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
