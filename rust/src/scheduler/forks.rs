//! Scoring forks: a context computed once, each choice forked from it sharing its KV blocks (the
//! last, partial block copied when first written).

use super::*;

impl Scheduler {
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

    /// A computed scoring context becomes its choices: each shares the context's blocks and goes to the
    /// front of the queue with its first token already scored; a one-token choice is done at once.
    pub(super) fn fork(&mut self, ctx: Seq, out: &mut Vec<FinishedSequence>) {
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
}
