//! Rust futures as Python awaitables and back: a Python stand-in's coroutine runs on the
//! asyncio loop of the caller when there is one, else on the loop the node was started from.
//!
//! Every awaitable the core returns hands its result to Python on a thread of tokio's
//! blocking pool. That thread can lose the GIL in the middle of the hand-off (setting the
//! result wakes the loop), and if the script ends meanwhile, taking the GIL back after
//! Python began finalizing kills the thread ("Fatal Python error: PyGILState_Release").
//! So hand-offs, and other calls into Python from the core's threads, are counted; an
//! `atexit` hook marks Python as exiting (later ones are skipped) and waits for those in
//! flight before Python finalizes.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::IntoPyObject;
use pyo3_async_runtimes::generic::{ContextExt, Runtime};
use pyo3_async_runtimes::TaskLocals;

/// Calls into Python from the core's threads (result hand-offs included) not finished yet.
static IN_PYTHON: AtomicUsize = AtomicUsize::new(0);
/// Set by the exit hook: from then on the core's threads leave Python alone.
static EXITING: AtomicBool = AtomicBool::new(false);
/// The longest the exit hook waits for calls in flight.
const EXIT_WAIT: Duration = Duration::from_secs(2);

/// pyo3-async-runtimes' tokio runtime, with its blocking hand-offs counted.
struct CountedTokio;

tokio::task_local! {
    static TASK_LOCALS: OnceLock<TaskLocals>;
}

/// Marks one call into Python finished when dropped (also when it panics).
struct CallDone;

impl Drop for CallDone {
    fn drop(&mut self) {
        IN_PYTHON.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Runs `f` with the GIL from one of the core's own threads, or returns `None` once Python is
/// exiting (its exit hook has run).
pub fn attach_unless_exiting<R>(f: impl FnOnce(Python<'_>) -> R) -> Option<R> {
    IN_PYTHON.fetch_add(1, Ordering::SeqCst);
    let _done = CallDone;
    if EXITING.load(Ordering::SeqCst) {
        return None;
    }
    Some(Python::attach(f))
}

/// Runs `f` with the GIL from one of the core's threads (a call into a Python stand-in), or
/// fails once Python is exiting.
pub fn with_python<R>(f: impl FnOnce(Python<'_>) -> PyResult<R>) -> PyResult<R> {
    attach_unless_exiting(f).unwrap_or_else(|| Err(PyRuntimeError::new_err("Python is exiting")))
}

impl Runtime for CountedTokio {
    type JoinError = tokio::task::JoinError;
    type JoinHandle = tokio::task::JoinHandle<()>;

    fn spawn<F>(fut: F) -> Self::JoinHandle
    where
        F: Future<Output = ()> + Send + 'static,
    {
        pyo3_async_runtimes::tokio::get_runtime().spawn(fut)
    }

    fn spawn_blocking<F>(f: F) -> Self::JoinHandle
    where
        F: FnOnce() + Send + 'static,
    {
        // Counted from now, so the exit hook also waits for hand-offs not started yet.
        IN_PYTHON.fetch_add(1, Ordering::SeqCst);
        pyo3_async_runtimes::tokio::get_runtime().spawn_blocking(move || {
            let _done = CallDone;
            if !EXITING.load(Ordering::SeqCst) {
                f()
            }
        })
    }
}

impl ContextExt for CountedTokio {
    fn scope<F, R>(locals: TaskLocals, fut: F) -> Pin<Box<dyn Future<Output = R> + Send>>
    where
        F: Future<Output = R> + Send + 'static,
    {
        Box::pin(TASK_LOCALS.scope(OnceLock::from(locals), fut))
    }

    fn get_task_locals() -> Option<TaskLocals> {
        TASK_LOCALS.try_with(|cell| cell.get().cloned()).ok().flatten()
    }
}

/// The asyncio loop (and context) of the awaitable being run, else the running loop.
pub fn current_locals(py: Python<'_>) -> PyResult<TaskLocals> {
    pyo3_async_runtimes::generic::get_current_locals::<CountedTokio>(py)
}

/// `fut` as a Python awaitable on the running asyncio loop (as
/// `pyo3_async_runtimes::tokio::future_into_py`, with the hand-off counted).
pub fn future_into_py<F, T>(py: Python<'_>, fut: F) -> PyResult<Bound<'_, PyAny>>
where
    F: Future<Output = PyResult<T>> + Send + 'static,
    T: for<'py> IntoPyObject<'py> + Send + 'static,
{
    let locals = current_locals(py)?;
    pyo3_async_runtimes::generic::future_into_py_with_locals::<CountedTokio, F, T>(py, locals, fut)
}

/// Registered with `atexit`: marks Python as exiting and waits, without the GIL, until the
/// core's threads are out of Python (at most [`EXIT_WAIT`]).
#[pyfunction]
pub fn leave_python_before_exit(py: Python<'_>) {
    EXITING.store(true, Ordering::SeqCst);
    py.detach(|| {
        let deadline = Instant::now() + EXIT_WAIT;
        while IN_PYTHON.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    });
}

/// The loop a node was last started from, for coroutines awaited by background tasks.
static NODE_LOOP: Mutex<Option<TaskLocals>> = Mutex::new(None);

/// Remembers the running asyncio loop (call from Python code that runs inside one).
pub fn remember_running_loop(py: Python<'_>) {
    if let Ok(locals) = current_locals(py) {
        *NODE_LOOP.lock().expect("loop lock poisoned") = Some(locals);
    }
}

/// A Rust future that awaits `awaitable` on the caller's loop, or the remembered one.
pub fn await_python(
    awaitable: Bound<'_, PyAny>,
) -> PyResult<impl Future<Output = PyResult<Py<PyAny>>> + Send + use<>> {
    let py = awaitable.py();
    let locals = match current_locals(py) {
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
        with_python(|py| await_python(object.bind(py).call_method1(method, args)?)).map_err(failed)?;
    future.await.map_err(failed)
}
