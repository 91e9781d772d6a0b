//! A step's flat arrays (`StepPlan`) from the chunks the scheduler chose.

use super::*;

impl Scheduler {
    pub(super) fn build_plan(&mut self, chunks: &[(i64, usize, usize)], width: usize) -> StepPlan {
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
}
