//! The `exo._core` extension module: PyO3 wrappers around the core types.

mod asyncio;
mod convert;
mod discovery;
mod download;
mod engine;
mod errors;
mod example;
mod gc;
mod models;
mod node;
mod node_stand_in;
mod peer;
mod quantize;
mod server;
mod shard;
mod tensor;
mod tokenizer;
mod topology;

use pyo3::prelude::*;

/// Registers every class and function of `exo._core`.
///
/// `gil_used = false`: on a free-threaded CPython the module keeps the GIL off. No shared state
/// here counts on the GIL: statics are atomics, `OnceLock`s or behind a `Mutex`/`RwLock` (the
/// asyncio bridge's loop and exit flags, the model table's edits, the logged strangers), the
/// classes' Rust state is behind locks or frozen, and Python objects are held as `Py<T>`.
#[pymodule(name = "_core", gil_used = false)]
fn core_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    // The core's `log` records go to Python's `logging` (logger names follow the Rust modules).
    let _ = pyo3_log::try_init();
    let wait = wrap_pyfunction!(asyncio::leave_python_before_exit, m)?;
    m.py().import("atexit")?.call_method1("register", (wait,))?;
    shard::register(m)?;
    engine::register(m)?;
    download::register(m)?;
    models::register(m)?;
    tensor::register(m)?;
    quantize::register(m)?;
    tokenizer::register(m)?;
    topology::register(m)?;
    peer::register(m)?;
    server::register(m)?;
    node::register(m)?;
    discovery::register(m)?;
    Ok(())
}
