//! Inference engines as exo classic's `InferenceEngine` classes: every method is an
//! awaitable that runs in Rust without the GIL; arrays cross as numpy, copied once.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use numpy::PyArray1;
use pyo3::prelude::*;

use super::convert::{state_from_py, StateDict};
use super::download::PyHfShardDownloader;
use super::gc::{FromPy, HoldsPython};
use super::shard::PyShard;
use super::tensor::{ndarray_from_wire, wire_from_ndarray};
use super::tokenizer::PyTokenizer;
use crate::download::DownloaderLocator;
use crate::engine::candle::{
    block_type, block_type_from_env, BatchOptions, CandleEngine, ComputeDevice, EngineOptions, Limits,
    LoraConfig, OptimizerKind, TrainOptions, ADAPTER_ENV,
};
use crate::engine::dummy::DummyEngine;
use crate::engine::rkllm::{RkllmEngine, ServerOptions};
use crate::engine::{Engine, InferenceState, LocalDirectories, ModelLocator, SamplingParams};
use crate::error::{Error, Result};
use crate::shard::Shard;
use crate::tensor::WireTensor;

/// A Rust engine behind exo classic's `InferenceEngine` methods.
#[pyclass(name = "NativeInferenceEngine", module = "exo.inference.inference_engine", subclass, frozen)]
pub struct PyEngine {
    pub inner: Arc<dyn Engine>,
}

/// A wire tensor handed to Python as a numpy array.
struct Array(WireTensor);

impl<'py> IntoPyObject<'py> for Array {
    type Target = PyAny;
    type Output = Bound<'py, PyAny>;
    type Error = PyErr;

    fn into_pyobject(self, py: Python<'py>) -> PyResult<Self::Output> {
        ndarray_from_wire(py, self.0)
    }
}

/// Token ids handed to Python as an int64 numpy array.
struct TokenIds(Vec<u32>);

impl<'py> IntoPyObject<'py> for TokenIds {
    type Target = PyAny;
    type Output = Bound<'py, PyAny>;
    type Error = PyErr;

    fn into_pyobject(self, py: Python<'py>) -> PyResult<Self::Output> {
        let ids: Vec<i64> = self.0.into_iter().map(i64::from).collect();
        Ok(PyArray1::from_vec(py, ids).into_any())
    }
}

/// Token ids from a numpy array or a sequence of ints.
pub(super) fn token_ids(tokens: &Bound<'_, PyAny>) -> PyResult<Vec<u32>> {
    let flat =
        tokens.py().import("numpy")?.call_method1("asarray", (tokens,))?.call_method1("reshape", (-1,))?;
    let ids: Vec<i64> = flat.call_method0("tolist")?.extract()?;
    ids.into_iter()
        .map(|id| {
            u32::try_from(id)
                .map_err(|_| Error::InvalidArgument(format!("token id {id} is out of range")).into())
        })
        .collect()
}

#[pymethods]
impl PyEngine {
    /// Name of the device the engine computes on (`cpu`, `cuda:0`, ...).
    #[getter]
    fn device(&self) -> String {
        self.inner.device().to_string()
    }

    /// The shard last loaded, or None.
    #[getter]
    fn shard(&self) -> Option<PyShard> {
        self.inner.current_shard().map(|inner| PyShard { inner })
    }

    /// The loaded model's tokenizer, or None.
    #[getter]
    fn tokenizer(&self) -> Option<PyTokenizer> {
        self.inner.tokenizer().map(|inner| PyTokenizer { inner })
    }

    /// The engine's name (`"candle"`, `"dummy"`).
    #[getter]
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn encode<'py>(&self, py: Python<'py>, shard: PyShard, prompt: String) -> PyResult<Bound<'py, PyAny>> {
        let engine = self.inner.clone();
        super::asyncio::future_into_py(py, async move {
            Ok(TokenIds(engine.encode(&shard.inner, &prompt).await?))
        })
    }

    fn decode<'py>(
        &self,
        py: Python<'py>,
        shard: PyShard,
        tokens: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (engine, tokens) = (self.inner.clone(), token_ids(tokens)?);
        super::asyncio::future_into_py(py, async move { Ok(engine.decode(&shard.inner, &tokens).await?) })
    }

    #[pyo3(signature = (x, temp=0.0, top_p=1.0, top_k=0, seed=None))]
    fn sample<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        temp: f32,
        top_p: f32,
        top_k: usize,
        seed: Option<u64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (engine, logits) = (self.inner.clone(), wire_from_ndarray(x)?);
        let params = SamplingParams { temperature: temp, top_p, top_k, seed };
        super::asyncio::future_into_py(py, async move { Ok(TokenIds(engine.sample(&logits, params).await?)) })
    }

    #[pyo3(signature = (request_id, shard, input_data, inference_state=None))]
    fn infer_tensor<'py>(
        &self,
        py: Python<'py>,
        request_id: String,
        shard: PyShard,
        input_data: &Bound<'py, PyAny>,
        inference_state: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (engine, input, state) =
            (self.inner.clone(), wire_from_ndarray(input_data)?, state_from_py(inference_state)?);
        super::asyncio::future_into_py(py, async move {
            let (output, state) = engine.infer_tensor(&request_id, &shard.inner, input, state).await?;
            Ok((Array(output), StateDict(state)))
        })
    }

    #[pyo3(signature = (request_id, shard, prompt, inference_state=None))]
    fn infer_prompt<'py>(
        &self,
        py: Python<'py>,
        request_id: String,
        shard: PyShard,
        prompt: String,
        inference_state: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (engine, state) = (self.inner.clone(), state_from_py(inference_state)?);
        super::asyncio::future_into_py(py, async move {
            let (output, state) = engine.infer_prompt(&request_id, &shard.inner, &prompt, state).await?;
            Ok((Array(output), StateDict(state)))
        })
    }

    fn ensure_shard<'py>(&self, py: Python<'py>, shard: PyShard) -> PyResult<Bound<'py, PyAny>> {
        let engine = self.inner.clone();
        super::asyncio::future_into_py(py, async move { Ok(engine.ensure_shard(&shard.inner).await?) })
    }

    /// Frees what the engine keeps for `request_id` (its KV cache).
    fn finish_request<'py>(&self, py: Python<'py>, request_id: String) -> PyResult<Bound<'py, PyAny>> {
        let engine = self.inner.clone();
        super::asyncio::future_into_py(py, async move {
            engine.finish_request(&request_id).await;
            Ok(())
        })
    }

    /// Token ids that end generation for the model of `shard`.
    fn eos_token_ids<'py>(&self, py: Python<'py>, shard: PyShard) -> PyResult<Bound<'py, PyAny>> {
        let engine = self.inner.clone();
        super::asyncio::future_into_py(py, async move { Ok(engine.eos_token_ids(&shard.inner).await?) })
    }
}

/// exo classic's `DummyInferenceEngine`: deterministic, no model files.
#[pyclass(name = "DummyInferenceEngine", module = "exo.inference.dummy_inference_engine", extends = PyEngine, frozen)]
pub struct PyDummyEngine;

#[pymethods]
impl PyDummyEngine {
    #[new]
    fn new() -> PyClassInitializer<Self> {
        PyClassInitializer::from(PyEngine { inner: Arc::new(DummyEngine::default()) }).add_subclass(Self)
    }
}

/// Locates model files through a Python shard downloader (`await ensure_shard(shard, engine)`),
/// using a model id that is itself a local model directory as is.
struct PythonDownloader {
    downloader: Option<Py<PyAny>>,
    /// The engine class the downloader is asked to fetch for.
    engine: &'static str,
}

#[async_trait]
impl ModelLocator for PythonDownloader {
    async fn locate(&self, shard: &Shard) -> Result<PathBuf> {
        if let Ok(dir) = LocalDirectories.locate(shard).await {
            return Ok(dir);
        }
        let Some(downloader) = &self.downloader else { return LocalDirectories.locate(shard).await };
        let download = super::asyncio::with_python(|py| {
            let shard = PyShard { inner: shard.clone() };
            let coroutine = downloader.bind(py).call_method1("ensure_shard", (shard, self.engine))?;
            super::asyncio::await_python(coroutine)
        })
        .map_err(|e| Error::InvalidModel(format!("cannot start the download of {}: {e}", shard.model_id)))?;
        let path = download
            .await
            .map_err(|e| Error::InvalidModel(format!("download of {} failed: {e}", shard.model_id)))?;
        super::asyncio::with_python(|py| path.bind(py).str().and_then(|s| s.extract::<String>()))
            .map(PathBuf::from)
            .map_err(|e| {
                Error::InvalidModel(format!("the downloader returned no path for {}: {e}", shard.model_id))
            })
    }

    /// Only a local model directory: a Python downloader fetches whole shards, not configs.
    async fn locate_config(&self, model_id: &str) -> Option<PathBuf> {
        LocalDirectories.locate_config(model_id).await
    }
}

/// The candle engine (exo's `CandleInferenceEngine`); weights stay in their checkpoint dtype.
/// With exo's `HfShardDownloader` it fetches shards in Rust; any other downloader object is
/// called through its Python `ensure_shard`.
#[pyclass(name = "CandleInferenceEngine", module = "exo.inference.candle", extends = PyEngine, frozen)]
pub struct PyCandleEngine {
    engine: Arc<CandleEngine>,
}

#[pymethods]
impl PyCandleEngine {
    /// `device` (`auto`, `cpu`, `cuda`, `cuda:N`) overrides `EXO_DEVICE`; without either the
    /// first GPU is used when this build has CUDA and a driver answers, else the CPU.
    /// `quantize` (`q8_0`, `q4_0`, `q4_k`, ... or `none`) overrides `EXO_QUANTIZE`: the block
    /// type safetensors weights are quantized to as they load. `prefill_chunk` and
    /// `max_batch` (else `EXO_PREFILL_CHUNK`, `EXO_MAX_BATCH`) bound one batched pass: the
    /// prompt positions it runs, and the requests' steps it takes. `max_kv_cache_gb` (else
    /// `EXO_MAX_KV_CACHE_GB`, else a quarter of memory) bounds all requests' KV caches together,
    /// and `max_context` (else `EXO_MAX_CONTEXT`, else what that budget holds of each model, up
    /// to the model's own limit) one request's tokens. `adapter` (else `EXO_ADAPTER`) is a LoRA
    /// adapter merged into the weights of every shard loaded: a PEFT directory, or a `train`
    /// checkpoint of `layers-*` directories.
    #[new]
    #[pyo3(signature = (
        shard_downloader=None, max_context=None, max_kv_cache_gb=None, device=None, quantize=None,
        prefill_chunk=None, max_batch=None, adapter=None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        shard_downloader: Option<Py<PyAny>>,
        max_context: Option<usize>,
        max_kv_cache_gb: Option<f64>,
        device: Option<String>,
        quantize: Option<String>,
        prefill_chunk: Option<usize>,
        max_batch: Option<usize>,
        adapter: Option<PathBuf>,
    ) -> PyResult<PyClassInitializer<Self>> {
        let device = match device {
            Some(name) => ComputeDevice::named(&name)?,
            None => ComputeDevice::from_env()?,
        };
        let quantize = match quantize {
            Some(name) => block_type(&name)?,
            None => block_type_from_env()?,
        };
        let options = EngineOptions {
            limits: Limits::resolve(max_context, max_kv_cache_gb)?,
            quantize,
            batch: BatchOptions::new(prefill_chunk, max_batch)?,
        };
        let locator = locator_from_py(py, shard_downloader, crate::models::CANDLE);
        let mut engine = CandleEngine::new(locator, options, device);
        let adapter =
            adapter.or_else(|| std::env::var_os(ADAPTER_ENV).filter(|v| !v.is_empty()).map(PathBuf::from));
        if let Some(adapter) = adapter {
            engine = engine.with_adapter(adapter)?;
        }
        let engine = Arc::new(engine);
        Ok(PyClassInitializer::from(PyEngine { inner: engine.clone() }).add_subclass(Self { engine }))
    }

    /// `{"max_context": ..., "max_kv_cache_gb": ...}`: the context of one request (the loaded
    /// model's; before a model loads the one set, else `None`) and the KV cache budget in GB.
    #[getter]
    fn limits<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, pyo3::types::PyDict>> {
        let dict = pyo3::types::PyDict::new(py);
        dict.set_item("max_context", self.engine.context())?;
        dict.set_item("max_kv_cache_gb", self.engine.limits().kv_cache_gb())?;
        Ok(dict)
    }

    /// Sets how this engine fine-tunes its shard: LoRA `rank`, `alpha` and `targets`, the
    /// `optimizer` (`adamw` or `sgd`) with its `learning_rate` and `weight_decay`, and a PEFT
    /// `adapter` directory to start from; adapters start afresh with the next training example.
    #[pyo3(signature = (*, rank=8, alpha=16.0, targets=vec!["q_proj".to_string(), "v_proj".to_string()], optimizer="adamw", learning_rate=1e-4, weight_decay=0.0, adapter=None, seed=0))]
    #[allow(clippy::too_many_arguments)]
    fn configure_training(
        &self,
        rank: usize,
        alpha: f64,
        targets: Vec<String>,
        optimizer: &str,
        learning_rate: f64,
        weight_decay: f64,
        adapter: Option<PathBuf>,
        seed: u64,
    ) -> PyResult<()> {
        let optimizer = match optimizer.to_ascii_lowercase().as_str() {
            "adamw" => OptimizerKind::AdamW,
            "sgd" => OptimizerKind::Sgd,
            other => {
                return Err(Error::InvalidArgument(format!("unknown optimizer {other} (adamw or sgd)")).into())
            }
        };
        let lora = LoraConfig { rank, alpha, targets, ..LoraConfig::default() };
        let options = TrainOptions { lora, optimizer, learning_rate, weight_decay, adapter, seed };
        Ok(self.engine.configure_training(options)?)
    }

    /// The adapters' gradients of the last training step, by PEFT name.
    fn adapter_gradients<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, pyo3::types::PyDict>> {
        let dict = pyo3::types::PyDict::new(py);
        for (name, grad) in self.engine.adapter_gradients()? {
            dict.set_item(name, ndarray_from_wire(py, grad)?)?;
        }
        Ok(dict)
    }

    /// Writes the adapters of the shard in training to `path/layers-{start}-{end}` in PEFT's
    /// layout (`adapter_model.safetensors`, `adapter_config.json`); returns that directory, or
    /// `None` when nothing has trained on this engine.
    fn save_adapters(&self, py: Python<'_>, path: PathBuf) -> PyResult<Option<PathBuf>> {
        Ok(py.detach(|| self.engine.save_adapters(&path))?)
    }

    /// `(requests, bytes)` of the KV caches the engine holds: running and idle requests'.
    fn cache_usage(&self) -> (usize, usize) {
        self.engine.cache_usage()
    }

    /// Writes `shard`'s tensors (loaded first if need be) to the safetensors file `path`, with
    /// their checkpoint names and dtypes; there is no training, so this saves what is loaded.
    fn save_checkpoint<'py>(
        &self,
        py: Python<'py>,
        shard: PyShard,
        path: PathBuf,
    ) -> PyResult<Bound<'py, PyAny>> {
        let engine = self.engine.clone();
        super::asyncio::future_into_py(
            py,
            async move { Ok(engine.save_checkpoint(&shard.inner, &path).await?) },
        )
    }

    /// Loads `shard` from the model directory `path`.
    fn load_checkpoint<'py>(
        &self,
        py: Python<'py>,
        shard: PyShard,
        path: PathBuf,
    ) -> PyResult<Bound<'py, PyAny>> {
        let engine = self.engine.clone();
        super::asyncio::future_into_py(py, async move { Ok(engine.load_from(&shard.inner, &path).await?) })
    }
}

/// Where an engine finds a shard's files: exo's `HfShardDownloader` in Rust, any other
/// downloader object through its Python `ensure_shard`, for engine class `engine`.
fn locator_from_py(
    py: Python<'_>,
    downloader: Option<Py<PyAny>>,
    engine: &'static str,
) -> Arc<dyn ModelLocator> {
    let native = downloader.as_ref().and_then(|d| d.bind(py).cast::<PyHfShardDownloader>().ok());
    match native {
        Some(native) => {
            Arc::new(DownloaderLocator { downloader: native.get().inner.clone(), engine: engine.to_string() })
        }
        None => Arc::new(PythonDownloader { downloader, engine }),
    }
}

/// exo's `RKLLMInferenceEngine`: whole models on a Rockchip NPU through an RKLLAMA server,
/// answered token by token; the tokenizer comes from the model's Hugging Face repository.
#[pyclass(name = "RKLLMInferenceEngine", module = "exo.inference.rkllm", extends = PyEngine, frozen)]
pub struct PyRkllmEngine {
    engine: Arc<RkllmEngine>,
}

#[pymethods]
impl PyRkllmEngine {
    /// `host`, `port` and `timeout` (seconds) override `RKLLM_SERVER_HOST` (`localhost`),
    /// `RKLLM_SERVER_PORT` (8080) and `RKLLM_TIMEOUT` (300).
    #[new]
    #[pyo3(signature = (shard_downloader=None, host=None, port=None, timeout=None))]
    fn new(
        py: Python<'_>,
        shard_downloader: Option<Py<PyAny>>,
        host: Option<String>,
        port: Option<u16>,
        timeout: Option<f64>,
    ) -> PyResult<PyClassInitializer<Self>> {
        let mut options = ServerOptions::from_env()?;
        if host.is_some() || port.is_some() {
            let from_env = ServerOptions::from_env_address()?;
            let host = host.unwrap_or(from_env.0);
            let port = port.unwrap_or(from_env.1);
            options.base_url = format!("http://{host}:{port}");
        }
        if let Some(seconds) = timeout {
            if !(seconds > 0.0 && seconds.is_finite()) {
                return Err(Error::InvalidArgument(format!(
                    "timeout must be positive seconds, not {seconds}"
                ))
                .into());
            }
            options.timeout = std::time::Duration::from_secs_f64(seconds);
        }
        let locator = locator_from_py(py, shard_downloader, crate::models::RKLLM);
        let engine =
            Arc::new(RkllmEngine::new(options, locator, Arc::new(crate::models::rkllm_server_name))?);
        Ok(PyClassInitializer::from(PyEngine { inner: engine.clone() }).add_subclass(Self { engine }))
    }

    /// The server's address (`http://host:port`).
    #[getter]
    fn server(&self) -> String {
        self.engine.client().base_url().to_string()
    }

    /// Whether the server answers `GET /`: resolves to None, or raises `InferenceServerError`
    /// saying why not.
    fn health_check<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let engine = self.engine.clone();
        super::asyncio::future_into_py(py, async move { Ok(engine.client().health().await?) })
    }
}

/// An engine from Python: a native engine as is, any object with exo classic's
/// `InferenceEngine` methods through an adapter.
pub fn engine_from_py(object: &Bound<'_, PyAny>) -> PyResult<FromPy<dyn Engine>> {
    if let Ok(native) = object.cast::<PyEngine>() {
        return Ok(FromPy::native(native.get().inner.clone()));
    }
    for method in ["encode", "decode", "sample", "infer_tensor", "ensure_shard"] {
        if !object.hasattr(method)? {
            return Err(
                Error::InvalidArgument(format!("an inference engine needs a {method}() method")).into()
            );
        }
    }
    let name = object.get_type().name()?.to_string();
    let stand_in = Arc::new(PythonEngine { object: object.clone().unbind(), name });
    Ok(FromPy { core: stand_in.clone(), stand_in: Some(stand_in) })
}

/// A Python object with exo classic's `InferenceEngine` coroutines.
struct PythonEngine {
    object: Py<PyAny>,
    name: String,
}

impl HoldsPython for PythonEngine {
    fn python_object(&self) -> &Py<PyAny> {
        &self.object
    }
}

impl PythonEngine {
    /// Reads a Python value returned by the stand-in.
    fn read<T>(
        &self,
        method: &str,
        value: Py<PyAny>,
        read: impl FnOnce(&Bound<'_, PyAny>) -> PyResult<T>,
    ) -> Result<T> {
        super::asyncio::with_python(|py| read(value.bind(py))).map_err(|e| {
            Error::StandIn(format!("{method}() of {} returned something unusable: {e}", self.name))
        })
    }

    /// Reads `(ndarray, state)` as `infer_tensor` and `infer_prompt` return it.
    fn read_output(&self, method: &str, value: Py<PyAny>) -> Result<(WireTensor, Option<InferenceState>)> {
        self.read(method, value, |v| {
            let (output, state): (Bound<'_, PyAny>, Option<Bound<'_, PyAny>>) = v.extract()?;
            Ok((wire_from_ndarray(&output)?, state_from_py(state.as_ref())?))
        })
    }

    fn stand_in(&self, error: PyErr) -> Error {
        Error::StandIn(format!("{}: {error}", self.name))
    }
}

#[async_trait]
impl Engine for PythonEngine {
    fn name(&self) -> &str {
        &self.name
    }

    async fn encode(&self, shard: &Shard, prompt: &str) -> Result<Vec<u32>> {
        let args = (PyShard { inner: shard.clone() }, prompt.to_string());
        let tokens = super::asyncio::call_coroutine(&self.object, "encode", args).await?;
        self.read("encode", tokens, token_ids)
    }

    async fn decode(&self, shard: &Shard, tokens: &[u32]) -> Result<String> {
        let args = super::asyncio::with_python(|py| {
            let ids: Vec<i64> = tokens.iter().map(|&t| i64::from(t)).collect();
            Ok((PyShard { inner: shard.clone() }, PyArray1::from_vec(py, ids).into_any().unbind()))
        })
        .map_err(|e| self.stand_in(e))?;
        let text = super::asyncio::call_coroutine(&self.object, "decode", args).await?;
        self.read("decode", text, |v| v.extract())
    }

    async fn sample(&self, logits: &WireTensor, params: SamplingParams) -> Result<Vec<u32>> {
        let array =
            super::asyncio::with_python(|py| ndarray_from_wire(py, logits.clone()).map(Bound::unbind))
                .map_err(|e| self.stand_in(e))?;
        let args = (array, params.temperature, params.top_p);
        let token = super::asyncio::call_coroutine(&self.object, "sample", args).await?;
        self.read("sample", token, token_ids)
    }

    async fn infer_tensor(
        &self,
        request_id: &str,
        shard: &Shard,
        input: WireTensor,
        state: Option<InferenceState>,
    ) -> Result<(WireTensor, Option<InferenceState>)> {
        let args = super::asyncio::with_python(|py| {
            Ok((
                request_id.to_string(),
                PyShard { inner: shard.clone() },
                ndarray_from_wire(py, input)?.unbind(),
                StateDict(state).into_pyobject(py)?.unbind(),
            ))
        })
        .map_err(|e| self.stand_in(e))?;
        let output = super::asyncio::call_coroutine(&self.object, "infer_tensor", args).await?;
        self.read_output("infer_tensor", output)
    }

    async fn infer_prompt(
        &self,
        request_id: &str,
        shard: &Shard,
        prompt: &str,
        state: Option<InferenceState>,
    ) -> Result<(WireTensor, Option<InferenceState>)> {
        let args = super::asyncio::with_python(|py| {
            Ok((
                request_id.to_string(),
                PyShard { inner: shard.clone() },
                prompt.to_string(),
                StateDict(state).into_pyobject(py)?.unbind(),
            ))
        })
        .map_err(|e| self.stand_in(e))?;
        let output = super::asyncio::call_coroutine(&self.object, "infer_prompt", args).await?;
        self.read_output("infer_prompt", output)
    }

    async fn ensure_shard(&self, shard: &Shard) -> Result<()> {
        super::asyncio::call_coroutine(&self.object, "ensure_shard", (PyShard { inner: shard.clone() },))
            .await?;
        Ok(())
    }

    async fn finish_request(&self, request_id: &str) {
        let has =
            super::asyncio::with_python(|py| self.object.bind(py).hasattr("finish_request")).unwrap_or(false);
        if has {
            let _ = super::asyncio::call_coroutine(&self.object, "finish_request", (request_id.to_string(),))
                .await;
        }
    }

    /// The `eos_token_id` of the engine's tokenizer, as classic's node reads it.
    async fn eos_token_ids(&self, _shard: &Shard) -> Result<Vec<u32>> {
        super::asyncio::with_python(|py| {
            let tokenizer = self.object.bind(py).getattr("tokenizer")?;
            let eos: Option<u32> = tokenizer.getattr("eos_token_id")?.extract()?;
            Ok(eos.into_iter().collect())
        })
        .map_err(|e| Error::StandIn(format!("{} has no usable tokenizer.eos_token_id: {e}", self.name)))
    }
}

/// Each layer's chosen experts (indices, best first) at every position of `tokens` run as one
/// prompt through the whole model at `model_dir` (`None` for dense layers): for tests that
/// compare the engine's routing with a reference.
#[pyfunction]
fn expert_routes(
    py: Python<'_>,
    model_dir: PathBuf,
    tokens: Vec<u32>,
) -> PyResult<Vec<Option<Vec<Vec<usize>>>>> {
    Ok(py.detach(|| crate::engine::candle::expert_routes(&model_dir, &tokens))?)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(expert_routes, m)?)?;
    m.add_class::<PyEngine>()?;
    m.add_class::<PyDummyEngine>()?;
    m.add_class::<PyCandleEngine>()?;
    m.add_class::<PyRkllmEngine>()?;
    Ok(())
}
