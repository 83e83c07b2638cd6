//! The candle engine: runs a shard of a Hugging Face decoder model on the CPU or a CUDA GPU,
//! each request with its own KV cache; concurrent requests' steps run batched (see [`batch`]).

mod batch;
mod cache;
mod clip;
mod config;
mod decode_attention;
mod deepseek;
mod device;
mod embedding;
mod footprint;
mod frozen_product;
mod frozen_weight;
mod fused;
mod gemma;
mod gguf;
mod gguf_config;
mod gguf_names;
mod head_loss;
mod limits;
mod linear;
mod llava;
mod lora;
mod lora_merge;
mod loss;
mod model;
mod moe;
mod optimizer;
mod phi3;
pub mod quant_type;
mod quantize;
mod quantized_product;
mod rope;
mod sliding_window;
mod tensors;
#[cfg(test)]
mod tests;
mod trainable;
mod training;
mod weights;
mod yarn;

pub use batch::{BatchOptions, MAX_BATCH_ENV, PREFILL_CHUNK_ENV};
pub use config::{ModelConfig, MODEL_TYPES};
pub use device::{ComputeDevice, DEVICE_ENV};
#[cfg(test)]
pub(crate) use gguf::GgufFile;
pub use gguf::{gguf_files, part_names as gguf_part_names, tensor_range as gguf_tensor_range};
pub use limits::{Limits, MAX_CONTEXT_ENV, MAX_KV_CACHE_GB_ENV};
pub use llava::{canonical_name as canonical_tensor_name, is_vision_tensor};
pub use lora::LoraConfig;
#[cfg(test)]
pub(crate) use lora_merge::LoraMerge;
pub use lora_merge::ADAPTER_ENV;
pub use quantize::{block_type, block_type_from_env, QUANTIZE_ENV};
pub use training::{OptimizerKind, TrainOptions};
#[cfg(test)]
pub(crate) use weights::WeightIndex;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use candle_core::quantized::GgmlDType;
use candle_core::{DType as CandleDType, Device, Tensor};

use self::batch::Batcher;
use self::cache::CacheStore;
use self::model::{ShardInput, ShardModel};
use self::tensors::Checkpoint;
use self::training::Training;
use super::example::{Example, ExampleLoss, ExampleOutput};
use super::sampling::sample_token;
use super::{Engine, InferenceState, ModelLocator, SamplingParams, IMAGES_KEY};
use crate::error::{Error, Result};
use crate::shard::Shard;
use crate::tensor::{DType, WireTensor};
use crate::tokenizer::Tokenizer;

/// Limits of a candle engine.
#[derive(Debug, Clone, Copy, Default)]
pub struct EngineOptions {
    /// The KV cache budget and the context of one request (prompt + generated tokens).
    pub limits: Limits,
    /// Block type safetensors weights are quantized to as they load (GGUF weights stay as stored).
    pub quantize: Option<GgmlDType>,
    /// How concurrent requests' steps are batched.
    pub batch: BatchOptions,
}

/// A loaded shard with its model's tokenizer.
struct Loaded {
    model: Arc<ShardModel>,
    tokenizer: Arc<Tokenizer>,
}

impl Loaded {
    fn load(
        path: &Path,
        shard: &Shard,
        options: EngineOptions,
        adapter: Option<&Path>,
        device: &Device,
    ) -> Result<Self> {
        let checkpoint = Checkpoint::open(path)?;
        let context = options.limits.context_for(&checkpoint.config()?);
        let model = ShardModel::load(&checkpoint, shard, context, device, options.quantize, adapter)?;
        Ok(Self { model: Arc::new(model), tokenizer: Arc::new(checkpoint.tokenizer()?) })
    }
}

/// The candle engine (exo's `CandleInferenceEngine`).
pub struct CandleEngine {
    locator: Arc<dyn ModelLocator>,
    options: EngineOptions,
    /// The LoRA adapter merged into every shard this engine loads, if any.
    adapter: Option<PathBuf>,
    device: ComputeDevice,
    loaded: tokio::sync::Mutex<Option<Arc<Loaded>>>,
    current: Mutex<Option<Shard>>,
    /// The loaded model's context (0 before a model loads), readable without waiting on a load.
    loaded_context: AtomicUsize,
    caches: Arc<Mutex<CacheStore>>,
    batcher: Batcher,
    /// What each model asked about takes in memory (headers are read once per model: a GGUF's
    /// holds its whole vocabulary, and the TUI and `/topology` ask every second).
    footprints: Mutex<std::collections::HashMap<String, crate::topology::ModelMemory>>,
    /// How fine-tuning runs, and its state once an example trained or adapters were loaded.
    train_options: Mutex<TrainOptions>,
    training: Arc<Mutex<Option<Training>>>,
}

impl CandleEngine {
    /// An engine that finds model files through `locator` and computes on `device`.
    pub fn new(locator: Arc<dyn ModelLocator>, options: EngineOptions, device: ComputeDevice) -> Self {
        log::info!("the candle engine computes on {}", device.name());
        Self {
            locator,
            options,
            adapter: None,
            device,
            loaded: tokio::sync::Mutex::new(None),
            current: Mutex::new(None),
            loaded_context: AtomicUsize::new(0),
            caches: Arc::new(Mutex::new(CacheStore::new(options.limits.kv_cache_bytes as usize))),
            batcher: Batcher::start(options.batch),
            footprints: Mutex::default(),
            train_options: Mutex::default(),
            training: Arc::default(),
        }
    }

    /// This engine with the LoRA adapter at `adapter` (a PEFT directory, or a `train`
    /// checkpoint of `layers-*` directories) merged into the weights of every shard it loads;
    /// its configs are read now, so a bad one fails here.
    pub fn with_adapter(mut self, adapter: PathBuf) -> Result<Self> {
        lora_merge::LoraMerge::check(&adapter)?;
        self.adapter = Some(adapter);
        Ok(self)
    }

    /// The limits this engine was given.
    pub fn limits(&self) -> Limits {
        self.options.limits
    }

    /// The context of one request now: the loaded model's, else the one set, else `None` (it
    /// is derived from each model as it loads).
    pub fn context(&self) -> Option<usize> {
        match self.loaded_context.load(Ordering::Relaxed) {
            0 => self.options.limits.max_context,
            tokens => Some(tokens),
        }
    }

    /// Loads `shard` from `dir` directly, bypassing the locator.
    pub async fn load_from(&self, shard: &Shard, dir: &Path) -> Result<()> {
        let mut loaded = self.loaded.lock().await;
        let (dir, shard_owned, options) = (dir.to_path_buf(), shard.clone(), self.options);
        let (adapter, device) = (self.adapter.clone(), self.device.device().clone());
        let fresh = tokio::task::spawn_blocking(move || {
            Loaded::load(&dir, &shard_owned, options, adapter.as_deref(), &device)
        })
        .await
        .map_err(|e| Error::InvalidModel(format!("loading {} stopped: {e}", shard.model_id)))??;
        self.loaded_context.store(fresh.model.max_context(), Ordering::Relaxed);
        *loaded = Some(Arc::new(fresh));
        *self.current.lock().expect("shard lock poisoned") = Some(shard.clone());
        *self.caches.lock().expect("cache lock poisoned") =
            CacheStore::new(self.options.limits.kv_cache_bytes as usize);
        Ok(())
    }

    /// Writes the tensors of `shard` (loaded first if need be) to the safetensors file `path`,
    /// under their checkpoint names and in their checkpoint dtypes.
    pub async fn save_checkpoint(&self, shard: &Shard, path: &Path) -> Result<()> {
        let loaded = self.model_for(shard).await?;
        let path = path.to_path_buf();
        tokio::task::spawn_blocking(move || loaded.model.save(&path))
            .await
            .map_err(|e| Error::InvalidModel(format!("saving {} stopped: {e}", shard.model_id)))?
    }

    /// Sets how fine-tuning runs; adapters and optimizer state start afresh (or from
    /// `options.adapter`) with the next training example.
    pub fn configure_training(&self, options: TrainOptions) -> Result<()> {
        options.lora.check()?;
        *self.train_options.lock().expect("train options lock poisoned") = options;
        *self.training.lock().expect("training lock poisoned") = None;
        Ok(())
    }

    /// The adapters' gradients of the last training step, by PEFT name.
    pub fn adapter_gradients(&self) -> Result<Vec<(String, WireTensor)>> {
        let training = self.training.lock().expect("training lock poisoned");
        let Some(training) = training.as_ref() else { return Ok(Vec::new()) };
        training
            .last_gradients()
            .iter()
            .map(|(name, g)| Ok((name.clone(), WireTensor::from_candle(g)?)))
            .collect()
    }

    /// Writes the adapters of the shard in training to `dir/layers-{start}-{end}` in PEFT's
    /// layout, with the optimizer's state; returns that directory, or `None` when nothing has trained here.
    pub fn save_adapters(&self, dir: &Path) -> Result<Option<std::path::PathBuf>> {
        let training = self.training.lock().expect("training lock poisoned");
        let Some(training) = training.as_ref() else { return Ok(None) };
        let target = dir.join(lora::shard_dir_name(training.shard()));
        training.save(&target)?;
        Ok(Some(target))
    }

    /// Runs `work` on the training state of `loaded`'s shard, made first if need be, on a
    /// blocking thread.
    async fn with_training<T: Send + 'static>(
        &self,
        loaded: Arc<Loaded>,
        work: impl FnOnce(&mut Training, &ShardModel) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (training, options) =
            (self.training.clone(), self.train_options.lock().expect("train options lock poisoned").clone());
        let run = move || {
            let mut guard = training.lock().expect("training lock poisoned");
            if guard.as_ref().is_none_or(|t| t.shard() != loaded.model.shard()) {
                *guard = Some(Training::new(&loaded.model, &options)?);
            }
            work(guard.as_mut().expect("just made"), &loaded.model)
        };
        tokio::task::spawn_blocking(run)
            .await
            .map_err(|e| Error::RequestFailed(format!("training stopped: {e}")))?
    }

    /// `(requests, bytes)` of the KV caches held, running and idle.
    pub fn cache_usage(&self) -> (usize, usize) {
        let store = self.caches.lock().expect("cache lock poisoned");
        (store.requests(), store.total_bytes())
    }

    /// The loaded model for `shard`, loading it first if another (or none) is loaded.
    async fn model_for(&self, shard: &Shard) -> Result<Arc<Loaded>> {
        if let Some(loaded) = self.loaded.lock().await.as_ref().filter(|l| l.model.shard() == shard) {
            return Ok(loaded.clone());
        }
        shard.validate()?;
        let dir = self.locator.locate(shard).await?;
        self.load_from(shard, &dir).await?;
        Ok(self.loaded.lock().await.clone().expect("just loaded"))
    }

    /// The loaded tokenizer for the model of `shard` (any shard of the model will do).
    async fn tokenizer_for(&self, shard: &Shard) -> Result<Arc<Loaded>> {
        if let Some(loaded) =
            self.loaded.lock().await.as_ref().filter(|l| l.model.shard().model_id == shard.model_id)
        {
            return Ok(loaded.clone());
        }
        self.model_for(shard).await
    }
}

/// Turns a wire tensor into the shard's input: token ids (`[seq]` or `[batch, seq]`) on the
/// first shard, hidden states `[batch, seq, hidden]` elsewhere.
fn shard_input(input: &WireTensor, first: bool) -> Result<ShardInput> {
    let tensor = input.to_candle(&Device::Cpu)?;
    if !first {
        return Ok(ShardInput::Hidden(tensor.to_dtype(CandleDType::F32)?));
    }
    let ids = match input.dtype() {
        DType::I64 | DType::I32 | DType::U32 | DType::U8 | DType::I16 => tensor,
        other => {
            return Err(Error::InvalidTensor(format!("token ids must be integers, got {}", other.name())))
        }
    };
    if ids.dims().is_empty() || ids.dims().len() > 2 {
        return Err(Error::InvalidTensor(format!(
            "token ids must be [seq] or [batch, seq], got {:?}",
            ids.dims()
        )));
    }
    if ids.elem_count() > 0 && ids.to_dtype(CandleDType::F64)?.min_all()?.to_scalar::<f64>()? < 0.0 {
        return Err(Error::InvalidTensor("token ids must not be negative".into()));
    }
    let ids = if ids.rank() == 1 { ids.unsqueeze(0)? } else { ids };
    Ok(ShardInput::Tokens(ids.to_dtype(CandleDType::U32)?))
}

/// The images of a prompt (`[n, channels, size, size]` pixel values under [`IMAGES_KEY`]) taken
/// out of its state: the first shard embeds them, and they go no further.
fn take_images(state: Option<InferenceState>) -> (Option<WireTensor>, Option<InferenceState>) {
    let Some(mut state) = state else { return (None, None) };
    (state.tensors.remove(IMAGES_KEY), Some(state))
}

/// Refuses an input bigger than one request can be for `model`, before it is converted: at
/// most its context of positions, each a token id (on the first shard) or a hidden state of
/// the model's width. A peer's tensor is otherwise bounded only by the gRPC message limit.
fn check_input_size(input: &WireTensor, model: &ShardModel) -> Result<()> {
    let width = if model.shard().is_first_layer() { 1 } else { model.config().hidden_size };
    let limit = model.max_context().saturating_mul(width);
    let elements: usize = input.shape().iter().product();
    if elements > limit {
        return Err(Error::ContextOverflow(format!(
            "an input of {} positions ({elements} elements, shape {:?}) exceeds the context of {} \
             tokens (raise it with --max-context or {MAX_CONTEXT_ENV})",
            elements.div_ceil(width),
            input.shape(),
            model.max_context()
        )));
    }
    Ok(())
}

/// The last row of logits shaped `[.., vocab]`, as f32.
fn last_logits(logits: &WireTensor) -> Result<Vec<f32>> {
    let vocab = *logits
        .shape()
        .last()
        .ok_or_else(|| Error::InvalidTensor("logits must have a vocabulary axis".into()))?;
    if vocab == 0 || logits.shape().contains(&0) {
        return Err(Error::InvalidTensor("cannot sample from empty logits".into()));
    }
    if logits.dtype() == DType::F32 {
        // The last row's bytes, read once (the logits of a large vocabulary are half a MB).
        let data = logits.data();
        return Ok(bytemuck::pod_collect_to_vec(&data[data.len() - 4 * vocab..]));
    }
    let values: Vec<f32> =
        logits.to_candle(&Device::Cpu)?.to_dtype(CandleDType::F32)?.flatten_all()?.to_vec1()?;
    Ok(values[values.len() - vocab..].to_vec())
}

#[async_trait]
impl Engine for CandleEngine {
    fn name(&self) -> &str {
        "candle"
    }

    fn device(&self) -> &str {
        self.device.name()
    }

    fn current_shard(&self) -> Option<Shard> {
        self.current.lock().expect("shard lock poisoned").clone()
    }

    fn concurrent_steps(&self) -> usize {
        self.options.batch.max_batch
    }

    fn tokenizer(&self) -> Option<Arc<Tokenizer>> {
        self.loaded.try_lock().ok()?.as_ref().map(|l| l.tokenizer.clone())
    }

    async fn encode(&self, shard: &Shard, prompt: &str) -> Result<Vec<u32>> {
        self.tokenizer_for(shard).await?.tokenizer.encode(prompt, false)
    }

    async fn decode(&self, shard: &Shard, tokens: &[u32]) -> Result<String> {
        self.tokenizer_for(shard).await?.tokenizer.decode(tokens, true)
    }

    async fn sample(&self, logits: &WireTensor, params: SamplingParams) -> Result<Vec<u32>> {
        Ok(vec![sample_token(&last_logits(logits)?, params)?])
    }

    async fn infer_tensor(
        &self,
        request_id: &str,
        shard: &Shard,
        input: WireTensor,
        state: Option<InferenceState>,
    ) -> Result<(WireTensor, Option<InferenceState>)> {
        let loaded = self.model_for(shard).await?;
        check_input_size(&input, &loaded.model)?;
        let (images, state) = take_images(state);
        let input = shard_input(&input, shard.is_first_layer())?;
        let hidden = match (images, input) {
            (None, input) => loaded.model.embed(input)?,
            (Some(pixels), ShardInput::Tokens(ids)) => {
                let (model, pixels) = (loaded.model.clone(), pixels.to_candle(&Device::Cpu)?);
                tokio::task::spawn_blocking(move || model.embed_with_images(&ids, &pixels))
                    .await
                    .map_err(|e| Error::RequestFailed(format!("embedding the images stopped: {e}")))??
            }
            (Some(_), ShardInput::Hidden(_)) => {
                return Err(Error::InvalidArgument(format!(
                    "images go to the first shard of {}, not to layers {}..={}",
                    shard.model_id, shard.start_layer, shard.end_layer
                )))
            }
        };
        let layers = loaded.model.layer_count();
        let cache = self.caches.lock().expect("cache lock poisoned").check_out(request_id, layers)?;
        if let Err(e) = loaded.model.check_room(cache.position, hidden.dim(1)?) {
            self.caches.lock().expect("cache lock poisoned").check_in(request_id, cache);
            return Err(e);
        }
        let output =
            self.batcher.run(loaded.model.clone(), request_id, hidden, cache, self.caches.clone()).await?;
        Ok((WireTensor::from_candle(&output)?, state))
    }

    async fn evaluate_example(&self, shard: &Shard, example: &Example) -> Result<ExampleOutput> {
        let loaded = self.model_for(shard).await?;
        let input = shard_input(&example.input, shard.is_first_layer())?;
        let (targets, lengths, last) = (example.targets()?, example.lengths()?, shard.is_last_layer());
        let score = move |output: Tensor| -> Result<ExampleOutput> {
            if !last {
                return Ok(ExampleOutput::Hidden(WireTensor::from_candle(&output.to_device(&Device::Cpu)?)?));
            }
            let (loss, _) = loss::masked_cross_entropy(&output, &targets, &lengths)?;
            Ok(ExampleOutput::Loss(ExampleLoss { loss: loss.to_scalar::<f32>()?, grads: None }))
        };
        // With adapters (in training, or to start from) their layers score the example.
        let adapted = self.train_options.lock().expect("train options lock poisoned").adapter.is_some()
            || self
                .training
                .lock()
                .expect("training lock poisoned")
                .as_ref()
                .is_some_and(|t| t.shard() == shard);
        if adapted {
            return self
                .with_training(loaded, move |t, model| score(t.evaluate(&model.embed(input)?)?))
                .await;
        }
        let run = move || score(loaded.model.forward_all_positions(input)?);
        tokio::task::spawn_blocking(run)
            .await
            .map_err(|e| Error::RequestFailed(format!("evaluating an example stopped: {e}")))?
    }

    async fn train_example(
        &self,
        request_id: &str,
        shard: &Shard,
        example: &Example,
    ) -> Result<ExampleOutput> {
        let loaded = self.model_for(shard).await?;
        let input = shard_input(&example.input, shard.is_first_layer())?;
        let (targets, lengths, request_id) = (example.targets()?, example.lengths()?, request_id.to_string());
        self.with_training(loaded, move |training, model| {
            training.forward(&request_id, model.embed(input)?, &targets, &lengths)
        })
        .await
    }

    async fn backward_example(
        &self,
        request_id: &str,
        shard: &Shard,
        output_grad: WireTensor,
    ) -> Result<Option<WireTensor>> {
        let loaded = self.model_for(shard).await?;
        let (grad, request_id) = (output_grad.to_candle(&Device::Cpu)?, request_id.to_string());
        let input_grad =
            self.with_training(loaded, move |training, _| training.backward(&request_id, &grad)).await?;
        input_grad.map(|g| WireTensor::from_candle(&g)).transpose()
    }

    async fn ensure_shard(&self, shard: &Shard) -> Result<()> {
        self.model_for(shard).await.map(|_| ())
    }

    async fn finish_request(&self, request_id: &str) {
        self.caches.lock().expect("cache lock poisoned").finish(request_id);
        if let Some(training) = self.training.lock().expect("training lock poisoned").as_mut() {
            training.forget(request_id);
        }
    }

    async fn context_room(&self, shard: &Shard, request_id: &str) -> Option<usize> {
        let loaded = self.loaded.lock().await.clone().filter(|l| l.model.shard() == shard)?;
        let position = self.caches.lock().expect("cache lock poisoned").position(request_id)?;
        Some(loaded.model.max_context().saturating_sub(position))
    }

    async fn eos_token_ids(&self, shard: &Shard) -> Result<Vec<u32>> {
        Ok(self.tokenizer_for(shard).await?.tokenizer.eos_token_ids().to_vec())
    }

    /// From the model's `config.json` (the only file fetched for it, if need be) or GGUF header.
    async fn model_costs(&self, base: &Shard) -> Option<crate::topology::ModelCosts> {
        let dir = self.locator.locate_config(&base.model_id).await?;
        match model_config(&dir) {
            Ok(config) => Some(config.costs()),
            Err(e) => {
                log::debug!("no layer costs for {}: {e}", base.model_id);
                None
            }
        }
    }

    /// From the model's `config.json` and the headers of what is here of its weights, or its
    /// GGUF header; weights are never read.
    async fn model_memory(&self, base: &Shard) -> Option<crate::topology::ModelMemory> {
        let known = self.footprints.lock().expect("footprint lock poisoned").get(&base.model_id).cloned();
        if known.is_some() {
            return known;
        }
        let dir = self.locator.locate_config(&base.model_id).await?;
        let (options, on_host) = (self.options, self.device.device().is_cpu());
        let read = tokio::task::spawn_blocking(move || model_memory(&dir, &options, on_host)).await;
        match read.map_err(|e| Error::InvalidModel(e.to_string())).and_then(|r| r) {
            Ok(memory) => {
                let mut footprints = self.footprints.lock().expect("footprint lock poisoned");
                footprints.insert(base.model_id.clone(), memory.clone());
                Some(memory)
            }
            Err(e) => {
                log::debug!("no memory figures for {}: {e}", base.model_id);
                None
            }
        }
    }
}

/// What the model at `path` takes in memory once an engine with `options` loads it, on the
/// host when `on_host` (see [`footprint`]).
pub fn model_memory(
    path: &Path,
    options: &EngineOptions,
    on_host: bool,
) -> Result<crate::topology::ModelMemory> {
    footprint::model_memory(path, options, on_host)
}

/// The config of the model at `path`: a model directory's `config.json`, or a GGUF's metadata.
pub fn model_config(path: &Path) -> Result<ModelConfig> {
    Checkpoint::open(path)?.config()
}

/// All of `dir`'s layers in one shard on the CPU, with room for `positions` positions.
fn whole_model_on_cpu(dir: &Path, positions: usize) -> Result<ShardModel> {
    let n = model_config(dir)?.num_hidden_layers as i32;
    let shard = Shard::new(dir.display().to_string(), 0, n - 1, n);
    ShardModel::load(&Checkpoint::open(dir)?, &shard, positions, &Device::Cpu, None, None)
}

/// Logits `[vocab]` for every position of `tokens`, running all of `dir`'s layers in one
/// shard; used by tests that compare with reference logits.
pub fn reference_logits(dir: &Path, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
    let model = whole_model_on_cpu(dir, tokens.len() + 1)?;
    let mut cache = cache::RequestCache::new(model.layer_count());
    tokens
        .iter()
        .map(|&t| {
            let ids = Tensor::new(&[[t]], &Device::Cpu)?;
            Ok(model.forward(ShardInput::Tokens(ids), &mut cache)?.flatten_all()?.to_vec1()?)
        })
        .collect()
}

/// Each layer's chosen experts (indices, best first) for every position of `tokens` run as
/// one prompt through all of `dir`'s layers in one shard (`None` for dense layers); used by
/// tests that compare routing with a reference.
pub fn expert_routes(dir: &Path, tokens: &[u32]) -> Result<Vec<Option<Vec<Vec<usize>>>>> {
    let model = whole_model_on_cpu(dir, tokens.len() + 1)?;
    let mut cache = cache::RequestCache::new(model.layer_count());
    let ids = Tensor::from_vec(tokens.to_vec(), (1, tokens.len()), &Device::Cpu)?;
    let routes = model.expert_routes(ShardInput::Tokens(ids), &mut cache)?;
    Ok(routes
        .into_iter()
        .map(|layer| {
            layer.map(|rows| rows.into_iter().map(|r| r.into_iter().map(|(e, _)| e).collect()).collect())
        })
        .collect())
}
