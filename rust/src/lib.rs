//! Rust core of cultengine: tokenizer, incremental detokenizer, paged-KV block manager and
//! continuous-batching scheduler, exposed to Python as `cultengine._core`.

pub mod block_manager;
pub mod detokenizer;
pub mod scheduler;
pub mod tokenizer;

mod python;

use pyo3::prelude::*;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    python::register(m)
}
