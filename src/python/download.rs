//! The shard downloader as `exo.download.new_shard_download` exposes it: awaitable
//! `ensure_shard`, progress through classic's `AsyncCallbackSystem`, status as an async iterator.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures::{Stream, StreamExt};
use pyo3::exceptions::PyStopAsyncIteration;
use pyo3::prelude::*;

use super::shard::PyShard;
use crate::download::layout;
use crate::download::progress::RepoProgress;
use crate::download::{DownloaderOptions, HfDownloader, ProgressListener};

/// Classic's `RepoProgressEvent` built from the core's event (through its `to_dict` form).
fn progress_event<'py>(py: Python<'py>, progress: &RepoProgress) -> PyResult<Bound<'py, PyAny>> {
    let dict = py.import("json")?.call_method1("loads", (progress.to_json().to_string(),))?;
    py.import("exo.download.download_progress")?
        .getattr("RepoProgressEvent")?
        .call_method1("from_dict", (dict,))
}

/// A progress event handed to Python as a `RepoProgressEvent`.
struct ProgressEvent(RepoProgress);

impl<'py> IntoPyObject<'py> for ProgressEvent {
    type Target = PyAny;
    type Output = Bound<'py, PyAny>;
    type Error = PyErr;

    fn into_pyobject(self, py: Python<'py>) -> PyResult<Self::Output> {
        progress_event(py, &self.0)
    }
}

/// The asyncio loop events are delivered on: the awaiting task's, else the one seen last.
type LoopSlot = Arc<Mutex<Option<Py<PyAny>>>>;

fn remember_loop(py: Python<'_>, slot: &LoopSlot) {
    if let Ok(event_loop) = py.import("asyncio").and_then(|a| a.call_method0("get_running_loop")) {
        *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(event_loop.unbind());
    }
}

/// Calls `on_progress.trigger_all(shard, event)` on the asyncio loop (so observers may create
/// tasks), or directly when no loop is running.
fn deliver(
    py: Python<'_>,
    on_progress: &Py<PyAny>,
    slot: &LoopSlot,
    progress: &RepoProgress,
) -> PyResult<()> {
    let event = progress_event(py, progress)?;
    let shard = PyShard { inner: progress.shard.clone() }.into_pyobject(py)?;
    let trigger = on_progress.bind(py).getattr("trigger_all")?;
    let remembered = slot.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(|l| l.clone_ref(py));
    let event_loop = super::asyncio::current_locals(py)
        .map(|locals| locals.event_loop(py).unbind())
        .ok()
        .or(remembered)
        .map(|l| l.into_bound(py));
    if let Some(event_loop) = event_loop {
        if !event_loop.call_method0("is_closed")?.is_truthy()? {
            event_loop.call_method1("call_soon_threadsafe", (trigger, shard, event))?;
            return Ok(());
        }
    }
    trigger.call1((shard, event))?;
    Ok(())
}

/// Downloads shards from the Hugging Face hub (`HF_ENDPOINT`, `HF_TOKEN`, `HF_HUB_OFFLINE`)
/// into `$EXO_HOME/downloads`; exo classic's `ShardDownloader` interface, implemented in Rust.
#[pyclass(name = "HfShardDownloader", module = "exo.download.new_shard_download", subclass, frozen)]
pub struct PyHfShardDownloader {
    pub inner: Arc<HfDownloader>,
    on_progress: Py<PyAny>,
    event_loop: LoopSlot,
}

#[pymethods]
impl PyHfShardDownloader {
    #[new]
    #[pyo3(signature = (max_parallel_downloads=8, exo_home=None))]
    fn new(py: Python<'_>, max_parallel_downloads: usize, exo_home: Option<PathBuf>) -> PyResult<Self> {
        let on_progress = py.import("exo.helpers")?.getattr("AsyncCallbackSystem")?.call0()?.unbind();
        let event_loop: LoopSlot = Arc::new(Mutex::new(None));
        remember_loop(py, &event_loop);
        let (callbacks, slot) = (on_progress.clone_ref(py), event_loop.clone());
        let listener: ProgressListener = Arc::new(move |progress: RepoProgress| {
            // Downloads go on in the background; once Python exits, progress goes nowhere.
            super::asyncio::attach_unless_exiting(|py| {
                if let Err(error) = deliver(py, &callbacks, &slot, &progress) {
                    error.write_unraisable(py, None);
                }
            });
        });
        let options = DownloaderOptions { max_parallel_downloads, home: exo_home };
        let inner = Arc::new(HfDownloader::new(options, Some(listener))?);
        Ok(Self { inner, on_progress, event_loop })
    }

    /// Classic's `on_progress`: an `AsyncCallbackSystem[str, tuple[Shard, RepoProgressEvent]]`.
    #[getter]
    fn on_progress(&self, py: Python<'_>) -> Py<PyAny> {
        self.on_progress.clone_ref(py)
    }

    /// The downloads directory.
    #[getter]
    fn exo_home(&self) -> PathBuf {
        self.inner.home()
    }

    /// Fetches the files `shard` needs for an engine class; resolves to their directory (to
    /// the file of a GGUF on the hub, `org/name/file.gguf`, of which only the shard's byte
    /// ranges are fetched).
    fn ensure_shard<'py>(
        &self,
        py: Python<'py>,
        shard: PyShard,
        inference_engine_name: String,
    ) -> PyResult<Bound<'py, PyAny>> {
        remember_loop(py, &self.event_loop);
        let downloader = self.inner.clone();
        super::asyncio::future_into_py(py, async move {
            Ok(downloader.ensure_shard(&shard.inner, &inference_engine_name).await?)
        })
    }

    /// Fetches a model's config and tokenizer files only; resolves to their directory (to the
    /// file of a GGUF on the hub, of which only the header is fetched).
    fn ensure_metadata<'py>(&self, py: Python<'py>, model_id: String) -> PyResult<Bound<'py, PyAny>> {
        let downloader = self.inner.clone();
        super::asyncio::future_into_py(py, async move { Ok(downloader.ensure_metadata(&model_id).await?) })
    }

    /// The number of layers of a registry model, Hugging Face repo, GGUF on the hub or local
    /// model.
    fn model_layers<'py>(
        &self,
        py: Python<'py>,
        model_id: String,
        inference_engine_name: String,
    ) -> PyResult<Bound<'py, PyAny>> {
        let downloader = self.inner.clone();
        super::asyncio::future_into_py(py, async move {
            Ok(downloader.model_layers(&model_id, &inference_engine_name).await?)
        })
    }

    /// Async iterator of `(path, RepoProgressEvent)` for every registry model of the engine.
    fn get_shard_download_status(
        &self,
        py: Python<'_>,
        inference_engine_name: String,
    ) -> DownloadStatusIterator {
        remember_loop(py, &self.event_loop);
        let stream = self.inner.clone().download_statuses(&inference_engine_name);
        DownloadStatusIterator { stream: Arc::new(tokio::sync::Mutex::new(Box::pin(stream))) }
    }

    /// Deletes the downloaded files of a model; False when there were none.
    fn delete_model(
        &self,
        py: Python<'_>,
        model_id: String,
        inference_engine_name: String,
    ) -> PyResult<bool> {
        Ok(py.detach(|| self.inner.delete_model(&model_id, &inference_engine_name))?)
    }
}

type StatusStream = Pin<Box<dyn Stream<Item = (PathBuf, RepoProgress)> + Send>>;

/// The async iterator `get_shard_download_status` returns.
#[pyclass(name = "DownloadStatusIterator", module = "exo.download.new_shard_download", frozen)]
pub struct DownloadStatusIterator {
    stream: Arc<tokio::sync::Mutex<StatusStream>>,
}

#[pymethods]
impl DownloadStatusIterator {
    fn __aiter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __anext__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let stream = self.stream.clone();
        super::asyncio::future_into_py(py, async move {
            match stream.lock().await.next().await {
                Some((path, progress)) => Ok((path, ProgressEvent(progress))),
                None => Err(PyStopAsyncIteration::new_err(())),
            }
        })
    }
}

/// Classic's `delete_model`: deletes the downloaded files of a model; False when there were none.
#[pyfunction]
#[pyo3(signature = (model_id, inference_engine_name, exo_home=None))]
fn delete_model(
    py: Python<'_>,
    model_id: String,
    inference_engine_name: String,
    exo_home: Option<PathBuf>,
) -> PyResult<bool> {
    let home = exo_home.unwrap_or_else(layout::downloads_dir);
    Ok(py.detach(|| crate::download::delete_model(&home, &model_id, &inference_engine_name))?)
}

/// exo's home (`EXO_HOME`, default `~/.cache/exo`), as in classic.
#[pyfunction]
fn exo_home() -> PathBuf {
    layout::exo_home()
}

/// exo's downloads directory (`downloads` in exo's home), as in classic.
#[pyfunction]
fn downloads_dir() -> PathBuf {
    layout::downloads_dir()
}

/// Links (or copies) the models of `seed_dir` into the downloads directory; returns the
/// repository directories seeded.
#[pyfunction]
#[pyo3(signature = (seed_dir, exo_home=None))]
fn seed_models(py: Python<'_>, seed_dir: PathBuf, exo_home: Option<PathBuf>) -> PyResult<Vec<String>> {
    let home = exo_home.unwrap_or_else(layout::downloads_dir);
    Ok(py.detach(|| layout::seed_models(&seed_dir, &home))?)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyHfShardDownloader>()?;
    m.add_class::<DownloadStatusIterator>()?;
    m.add_function(wrap_pyfunction!(exo_home, m)?)?;
    m.add_function(wrap_pyfunction!(downloads_dir, m)?)?;
    m.add_function(wrap_pyfunction!(seed_models, m)?)?;
    m.add_function(wrap_pyfunction!(delete_model, m)?)?;
    Ok(())
}
