//! Thin PyO3 layer: argument conversion, GIL release and numpy arrays. No logic lives here.

use std::collections::HashMap;
use std::sync::Arc;

use numpy::ndarray::Array2;
use numpy::{PyArray1, PyArray2, PyReadonlyArray1};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;

use crate::block_manager::ImageSpan;
use crate::detokenizer;
use crate::scheduler::{self, SamplingParams, SchedulerConfig};
use crate::tokenizer;

fn value_err(e: String) -> PyErr {
    PyValueError::new_err(e)
}

#[pyclass(module = "cultengine._core", frozen)]
pub struct Tokenizer {
    inner: Arc<tokenizer::Tokenizer>,
}

#[pymethods]
impl Tokenizer {
    #[staticmethod]
    fn from_file(py: Python<'_>, path: &str) -> PyResult<Self> {
        let inner = py
            .detach(|| tokenizer::Tokenizer::from_file(path))
            .map_err(value_err)?;
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// A tokenizer from tokenizer.json's text (as transformers would run it, see tokenizer_files.py).
    #[staticmethod]
    fn from_str(py: Python<'_>, json: &str) -> PyResult<Self> {
        let inner = py
            .detach(|| tokenizer::Tokenizer::from_json(json))
            .map_err(value_err)?;
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    #[pyo3(signature = (texts, add_special_tokens = false))]
    fn encode_batch(
        &self,
        py: Python<'_>,
        texts: Vec<String>,
        add_special_tokens: bool,
    ) -> PyResult<Vec<Vec<u32>>> {
        let tok = &self.inner;
        py.detach(|| tok.encode_batch(texts, add_special_tokens))
            .map_err(value_err)
    }

    #[pyo3(signature = (text, add_special_tokens = false))]
    fn encode(&self, text: &str, add_special_tokens: bool) -> PyResult<Vec<u32>> {
        self.inner
            .encode(text, add_special_tokens)
            .map_err(value_err)
    }

    #[pyo3(signature = (ids, skip_special_tokens = true))]
    fn decode(&self, ids: Vec<u32>, skip_special_tokens: bool) -> PyResult<String> {
        self.inner
            .decode(&ids, skip_special_tokens)
            .map_err(value_err)
    }

    fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    #[getter]
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }

    /// Replaces the i-th `placeholder` id with `replacements[i]`; returns the ids and where each
    /// replacement starts in them.
    fn expand_placeholders(
        &self,
        ids: Vec<u32>,
        placeholder: u32,
        replacements: Vec<Vec<u32>>,
    ) -> PyResult<tokenizer::Expanded> {
        tokenizer::expand_placeholders(&ids, placeholder, &replacements).map_err(value_err)
    }
}

#[pyclass(module = "cultengine._core")]
pub struct IncrementalDetokenizer {
    inner: detokenizer::IncrementalDetokenizer,
}

#[pymethods]
impl IncrementalDetokenizer {
    #[new]
    #[pyo3(signature = (tok, skip_special_tokens = true, stop = Vec::new()))]
    fn new(tok: &Tokenizer, skip_special_tokens: bool, stop: Vec<String>) -> Self {
        Self {
            inner: detokenizer::IncrementalDetokenizer::new(
                tok.inner.clone(),
                skip_special_tokens,
                stop,
            ),
        }
    }

    fn push(&mut self, token_id: u32) -> (String, bool) {
        self.inner.push(token_id)
    }

    #[getter]
    fn text(&self) -> String {
        self.inner.text().to_string()
    }
}

#[pyclass(module = "cultengine._core", frozen, get_all)]
pub struct StepPlan {
    input_ids: Py<PyArray1<i64>>,
    positions: Py<PyArray2<i64>>,
    slot_mapping: Py<PyArray1<i64>>,
    query_start_loc: Py<PyArray1<i32>>,
    seq_lens: Py<PyArray1<i32>>,
    block_tables: Py<PyArray2<i32>>,
    seq_ids: Py<PyArray1<i64>>,
    max_query_len: usize,
    max_seq_len: usize,
    sample_indices: Py<PyArray1<i64>>,
    sample_seq_ids: Py<PyArray1<i64>>,
    temperature: Py<PyArray1<f32>>,
    top_p: Py<PyArray1<f32>>,
    top_k: Py<PyArray1<i32>>,
    seed: Py<PyArray1<i64>>,
    output_index: Py<PyArray1<i64>>,
    prompt_lp_indices: Py<PyArray1<i64>>,
    prompt_lp_targets: Py<PyArray1<i64>>,
    image_chunks: Py<PyArray2<i64>>,
    image_hashes: Py<PyArray1<u64>>,
    block_copies: Py<PyArray2<i64>>,
    prev_input_rows: Py<PyArray1<i64>>,
    prev_sample_index: Py<PyArray1<i64>>,
    penalty_rows: Py<PyArray1<i64>>,
    repetition_penalty: Py<PyArray1<f32>>,
    presence_penalty: Py<PyArray1<f32>>,
    frequency_penalty: Py<PyArray1<f32>>,
    penalty_token_loc: Py<PyArray1<i64>>,
    penalty_tokens: Py<PyArray1<i64>>,
    penalty_prompt_lens: Py<PyArray1<i64>>,
}

fn arr<T: numpy::Element>(py: Python<'_>, v: Vec<T>) -> Py<PyArray1<T>> {
    PyArray1::from_vec(py, v).unbind()
}

fn arr2<T: numpy::Element>(py: Python<'_>, v: Vec<T>, cols: usize) -> Py<PyArray2<T>> {
    let rows = v.len().checked_div(cols).unwrap_or(0);
    let a = Array2::from_shape_vec((rows, cols), v).expect("rows * cols elements");
    PyArray2::from_owned_array(py, a).unbind()
}

impl StepPlan {
    fn new(py: Python<'_>, p: scheduler::StepPlan) -> Self {
        let num_tokens = p.input_ids.len();
        Self {
            input_ids: arr(py, p.input_ids),
            positions: arr2(py, p.positions, num_tokens),
            slot_mapping: arr(py, p.slot_mapping),
            query_start_loc: arr(py, p.query_start_loc),
            seq_lens: arr(py, p.seq_lens),
            block_tables: arr2(py, p.block_tables, p.block_table_width),
            seq_ids: arr(py, p.seq_ids),
            max_query_len: p.max_query_len,
            max_seq_len: p.max_seq_len,
            sample_indices: arr(py, p.sample_indices),
            sample_seq_ids: arr(py, p.sample_seq_ids),
            temperature: arr(py, p.temperature),
            top_p: arr(py, p.top_p),
            top_k: arr(py, p.top_k),
            seed: arr(py, p.seed),
            output_index: arr(py, p.output_index),
            prompt_lp_indices: arr(py, p.prompt_lp_indices),
            prompt_lp_targets: arr(py, p.prompt_lp_targets),
            image_chunks: arr2(py, p.image_chunks, 3),
            image_hashes: arr(py, p.image_hashes),
            block_copies: arr2(py, p.block_copies, 2),
            prev_input_rows: arr(py, p.prev_input_rows),
            prev_sample_index: arr(py, p.prev_sample_index),
            penalty_rows: arr(py, p.penalty_rows),
            repetition_penalty: arr(py, p.repetition_penalty),
            presence_penalty: arr(py, p.presence_penalty),
            frequency_penalty: arr(py, p.frequency_penalty),
            penalty_token_loc: arr(py, p.penalty_token_loc),
            penalty_tokens: arr(py, p.penalty_tokens),
            penalty_prompt_lens: arr(py, p.penalty_prompt_lens),
        }
    }
}

#[pyclass(module = "cultengine._core", frozen, get_all)]
pub struct FinishedSequence {
    seq_id: i64,
    prompt_token_ids: Vec<u32>,
    output_token_ids: Vec<u32>,
    output_logprobs: Vec<f32>,
    text: String,
    finish_reason: &'static str,
    prompt_logprobs: Vec<f32>,
    prompt_greedy: Vec<bool>,
    num_cached_tokens: usize,
}

impl From<scheduler::FinishedSequence> for FinishedSequence {
    fn from(f: scheduler::FinishedSequence) -> Self {
        Self {
            seq_id: f.seq_id,
            prompt_token_ids: f.prompt_token_ids,
            output_token_ids: f.output_token_ids,
            output_logprobs: f.output_logprobs,
            text: f.text,
            finish_reason: f.finish_reason,
            prompt_logprobs: f.prompt_logprobs,
            prompt_greedy: f.prompt_greedy,
            num_cached_tokens: f.num_cached_tokens,
        }
    }
}

#[pymethods]
impl FinishedSequence {
    fn __repr__(&self) -> String {
        format!(
            "FinishedSequence(seq_id={}, finish_reason={:?}, output_tokens={}, text={:?})",
            self.seq_id,
            self.finish_reason,
            self.output_token_ids.len(),
            self.text
        )
    }
}

#[pyclass(module = "cultengine._core")]
pub struct Scheduler {
    inner: scheduler::Scheduler,
}

fn spans(images: Vec<(usize, usize, u64, usize, bool)>) -> Vec<ImageSpan> {
    images
        .into_iter()
        .map(|(start, len, hash, offset, atomic)| ImageSpan {
            start,
            len,
            hash,
            offset,
            atomic,
        })
        .collect()
}

fn slice<'a, T: numpy::Element>(a: &'a PyReadonlyArray1<'_, T>, name: &str) -> PyResult<&'a [T]> {
    a.as_slice()
        .map_err(|_| PyValueError::new_err(format!("{name} must be a contiguous 1-d array")))
}

#[pymethods]
impl Scheduler {
    #[new]
    #[pyo3(signature = (tokenizer, num_blocks, block_size = 16, max_num_seqs = 256, max_num_batched_tokens = 8192,
                        max_model_len = 4096, enable_prefix_caching = true, eos_token_ids = Vec::new(),
                        position_rows = 1, max_num_image_tokens = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        tokenizer: &Tokenizer,
        num_blocks: usize,
        block_size: usize,
        max_num_seqs: usize,
        max_num_batched_tokens: usize,
        max_model_len: usize,
        enable_prefix_caching: bool,
        eos_token_ids: Vec<u32>,
        position_rows: usize,
        max_num_image_tokens: Option<usize>,
    ) -> PyResult<Self> {
        if position_rows == 0 {
            return Err(PyValueError::new_err("position_rows must be >= 1"));
        }
        let cfg = SchedulerConfig {
            num_blocks,
            block_size,
            max_num_seqs,
            max_num_batched_tokens,
            max_model_len,
            enable_prefix_caching,
            eos_token_ids,
            position_rows,
            max_num_image_tokens: max_num_image_tokens.unwrap_or(usize::MAX),
        };
        let inner = scheduler::Scheduler::new(tokenizer.inner.clone(), cfg).map_err(value_err)?;
        Ok(Self { inner })
    }

    /// `images`: (start, length, content hash, first embedding, atomic) of each run of image tokens.
    #[pyo3(signature = (seq_id, prompt_ids, images, max_tokens, temperature = 0.0, top_p = 1.0, top_k = -1,
                        seed = 0, stop = Vec::new(), stop_token_ids = Vec::new(), ignore_eos = false,
                        skip_special_tokens = true, prompt_logprobs_from = -1, positions = Vec::new(),
                        position_delta = 0, stream = false, repetition_penalty = 1.0,
                        presence_penalty = 0.0, frequency_penalty = 0.0))]
    #[allow(clippy::too_many_arguments)]
    fn add_sequence(
        &mut self,
        seq_id: i64,
        prompt_ids: Vec<u32>,
        images: Vec<(usize, usize, u64, usize, bool)>,
        max_tokens: i64,
        temperature: f32,
        top_p: f32,
        top_k: i32,
        seed: i64,
        stop: Vec<String>,
        stop_token_ids: Vec<u32>,
        ignore_eos: bool,
        skip_special_tokens: bool,
        prompt_logprobs_from: i64,
        positions: Vec<i64>,
        position_delta: i64,
        stream: bool,
        repetition_penalty: f32,
        presence_penalty: f32,
        frequency_penalty: f32,
    ) -> PyResult<()> {
        let max_tokens = usize::try_from(max_tokens).map_err(|_| {
            PyValueError::new_err(format!(
                "sequence {seq_id}: max_tokens must be >= 0, got {max_tokens}"
            ))
        })?;
        let params = SamplingParams {
            max_tokens,
            temperature,
            top_p,
            top_k,
            seed,
            stop,
            stop_token_ids,
            ignore_eos,
            skip_special_tokens,
            prompt_logprobs_from,
            stream,
            repetition_penalty,
            presence_penalty,
            frequency_penalty,
        };
        self.inner
            .add_sequence(
                seq_id,
                prompt_ids,
                &spans(images),
                positions,
                position_delta,
                params,
            )
            .map_err(value_err)
    }

    /// Scores every choice as a continuation of `context_ids`, computing the context once (see
    /// `scheduler::Scheduler::add_scoring`); each choice finishes under its id in `choice_ids`.
    #[pyo3(signature = (seq_id, context_ids, images, choices, choice_ids, positions = Vec::new(), position_delta = 0))]
    #[allow(clippy::too_many_arguments)]
    fn add_scoring(
        &mut self,
        seq_id: i64,
        context_ids: Vec<u32>,
        images: Vec<(usize, usize, u64, usize, bool)>,
        choices: Vec<Vec<u32>>,
        choice_ids: Vec<i64>,
        positions: Vec<i64>,
        position_delta: i64,
    ) -> PyResult<()> {
        if choices.len() != choice_ids.len() {
            return Err(PyValueError::new_err(format!(
                "{} choices but {} choice ids",
                choices.len(),
                choice_ids.len()
            )));
        }
        self.inner
            .add_scoring(
                seq_id,
                context_ids,
                &spans(images),
                positions,
                position_delta,
                choice_ids.into_iter().zip(choices).collect(),
            )
            .map_err(value_err)
    }

    /// Returns the aborted sequence as finished with reason "abort", or None for an unknown id.
    fn abort(&mut self, seq_id: i64) -> Option<FinishedSequence> {
        self.inner.abort(seq_id).map(Into::into)
    }

    /// (seq id, text) released for streaming sequences since the last call.
    fn take_deltas(&mut self) -> Vec<(i64, String)> {
        self.inner.take_deltas()
    }

    fn has_unfinished(&self) -> bool {
        self.inner.has_unfinished()
    }

    #[getter]
    fn num_waiting(&self) -> usize {
        self.inner.num_waiting()
    }

    #[getter]
    fn num_running(&self) -> usize {
        self.inner.num_running()
    }

    /// Plans scheduled and not yet given back by `update`.
    #[getter]
    fn num_in_flight(&self) -> usize {
        self.inner.num_in_flight()
    }

    /// Drops the plans in flight after a failed step; their sequences recompute (see
    /// `scheduler::Scheduler::cancel_in_flight`).
    fn cancel_in_flight(&mut self) {
        self.inner.cancel_in_flight()
    }

    fn schedule(&mut self, py: Python<'_>) -> Option<StepPlan> {
        self.inner.schedule().map(|p| StepPlan::new(py, p))
    }

    fn update(
        &mut self,
        sampled: PyReadonlyArray1<'_, i64>,
        sampled_logprobs: PyReadonlyArray1<'_, f32>,
        prompt_logprobs: PyReadonlyArray1<'_, f32>,
        prompt_is_greedy: PyReadonlyArray1<'_, bool>,
    ) -> PyResult<Vec<FinishedSequence>> {
        let finished = self
            .inner
            .update(
                slice(&sampled, "sampled")?,
                slice(&sampled_logprobs, "sampled_logprobs")?,
                slice(&prompt_logprobs, "prompt_logprobs")?,
                slice(&prompt_is_greedy, "prompt_is_greedy")?,
            )
            .map_err(PyRuntimeError::new_err)?;
        Ok(finished.into_iter().map(Into::into).collect())
    }

    fn stats(&self) -> HashMap<&'static str, u64> {
        let s = self.inner.stats();
        let bm = self.inner.block_manager();
        HashMap::from([
            ("num_preemptions", s.num_preemptions),
            ("prefix_cache_queried_tokens", s.prefix_cache_queried_tokens),
            ("prefix_cache_hit_tokens", s.prefix_cache_hit_tokens),
            ("num_free_blocks", bm.num_free() as u64),
            ("num_cached_blocks", bm.num_cached() as u64),
            ("prefill_tokens_computed", s.prefill_tokens_computed),
            ("steps", s.steps),
            ("schedule_ns", s.schedule_ns),
            ("peak_used_blocks", s.peak_used_blocks),
        ])
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Tokenizer>()?;
    m.add_class::<IncrementalDetokenizer>()?;
    m.add_class::<Scheduler>()?;
    m.add_class::<StepPlan>()?;
    m.add_class::<FinishedSequence>()?;
    Ok(())
}
