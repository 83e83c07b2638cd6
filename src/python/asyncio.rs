//! Awaiting Python coroutines from Rust: a Python stand-in's coroutine runs on the asyncio
//! loop of the caller when there is one, else on the loop the node was started from.

use std::future::Future;
use std::sync::Mutex;

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3_async_runtimes::TaskLocals;

/// The loop a node was last started from, for coroutines awaited by background tasks.
static NODE_LOOP: Mutex<Option<TaskLocals>> = Mutex::new(None);

/// Remembers the running asyncio loop (call from Python code that runs inside one).
pub fn remember_running_loop(py: Python<'_>) {
    if let Ok(locals) = pyo3_async_runtimes::tokio::get_current_locals(py) {
        *NODE_LOOP.lock().expect("loop lock poisoned") = Some(locals);
    }
}

/// A Rust future that awaits `awaitable` on the caller's loop, or the remembered one.
pub fn await_python(
    awaitable: Bound<'_, PyAny>,
) -> PyResult<impl Future<Output = PyResult<Py<PyAny>>> + Send + use<>> {
    let py = awaitable.py();
    let locals = match pyo3_async_runtimes::tokio::get_current_locals(py) {
        Ok(locals) => locals,
        Err(_) => NODE_LOOP
            .lock()
            .expect("loop lock poisoned")
            .as_ref()
            .cloned()
            .ok_or_else(|| PyRuntimeError::new_err("no asyncio event loop runs the Python stand-in"))?,
    };
    pyo3_async_runtimes::into_future_with_locals(&locals, awaitable)
}

/// Calls `method` on a Python object and awaits the coroutine it returns.
pub async fn call_coroutine<A>(object: &Py<PyAny>, method: &str, args: A) -> crate::error::Result<Py<PyAny>>
where
    A: for<'py> pyo3::call::PyCallArgs<'py> + Send,
{
    let failed = |e: PyErr| crate::error::Error::StandIn(format!("{method}() raised {e}"));
    let future =
        Python::attach(|py| await_python(object.bind(py).call_method1(method, args)?)).map_err(failed)?;
    future.await.map_err(failed)
}
