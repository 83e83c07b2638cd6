//! xotorch-core: the Rust core of an exo-compatible peer-to-peer LLM inference cluster.
//!
//! Everything outside `python` is plain Rust; `python` holds the only PyO3 code and builds
//! the `exo._core` extension module.

pub mod accelerator;
pub mod download;
pub mod engine;
pub mod error;
pub mod file_limits;
#[cfg(test)]
mod fuzz;
pub mod gguf_header;
pub mod models;
pub mod net;
pub mod node;
pub mod proto;
pub mod shard;
pub mod tensor;
pub mod tokenizer;
pub mod topology;

mod python;

pub use error::{Error, Result};
pub use shard::Shard;
pub use tensor::{DType, WireTensor};
