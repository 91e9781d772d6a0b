//! Plans in flight (overlapped scheduling): what each plan scheduled, so `update` can apply it in
//! order, and how a failed step takes its plans back.

use super::*;

/// A plan not yet given back by `update`.
pub(super) struct InFlight {
    pub(super) rows: Vec<Scheduled>,
    pub(super) cached: Vec<u32>, // blocks this plan offered to the prefix cache, whose KV it (or the one before) writes
}

/// What `update` needs to know about a sequence scheduled in a plan.
pub(super) struct Scheduled {
    pub(super) seq_id: Option<i64>, // None once aborted
    pub(super) sampled: bool,
    pub(super) end: usize,    // tokens computed once this plan has run
    pub(super) lp_pos: usize, // first prompt position scored, and how many
    pub(super) lp_count: usize,
    pub(super) fanout: usize, // a scoring context's last row: one logprob per choice after the prompt rows
}

impl Scheduler {
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
}
