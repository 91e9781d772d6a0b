//! Which sequences run this step: admitting waiting ones FCFS with their prefix-cache hits, and
//! preempting (by recompute) when blocks run out.

use super::*;

impl Scheduler {
    /// Takes the blocks waiting sequence `id` needs to compute its next chunk: a forked choice already
    /// holds its context's blocks (the partial last one is copied now if still shared), anything else
    /// looks its prefix up in the cache. None (nothing taken) when the chunk does not fit.
    pub(super) fn admit(
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
    pub(super) fn release_waiting_blocks(&mut self) -> bool {
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

    pub(super) fn preempt(&mut self, id: i64) {
        let seq = self.seqs.get_mut(&id).unwrap();
        self.bm.free(&seq.blocks);
        seq.blocks.clear();
        seq.num_computed = 0;
        seq.num_registered = 0;
        self.waiting.push_front(id);
        self.stats.num_preemptions += 1;
    }
}
