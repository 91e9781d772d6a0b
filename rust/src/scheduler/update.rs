//! Applying a step's results: sampled tokens, log-probabilities and stop checks, and finished
//! sequences' outputs.

use super::*;

impl Scheduler {
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

    pub(super) fn finish(&self, seq_id: i64, seq: Seq, reason: &'static str) -> FinishedSequence {
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
