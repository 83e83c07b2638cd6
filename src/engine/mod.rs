//! Inference engines: run a shard's layers on a request's input, sample tokens,
//! and turn text into tokens and back.

pub mod candle;
pub mod dummy;
pub mod example;
pub mod kernels;
pub mod rkllm;
pub mod sampling;

use std::collections::BTreeMap;
use std::path::PathBuf;

use async_trait::async_trait;

use crate::error::{Error, Result};
use crate::shard::Shard;
use crate::tensor::{DType, WireTensor};
use example::{Example, ExampleOutput};

/// The key of a prompt's images in its inference state: `[n, channels, height, width]` f32
/// pixel values, preprocessed as the model's image processor does. Only the prompt carries
/// them, to the first shard, which embeds them; they go no further.
pub const IMAGES_KEY: &str = "pixel_values";

/// Per-request data that travels with a tensor between nodes (exo classic's `inference_state`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InferenceState {
    /// Named tensors.
    pub tensors: BTreeMap<String, WireTensor>,
    /// Named lists of tensors.
    pub tensor_lists: BTreeMap<String, Vec<WireTensor>>,
    /// Everything else, as a JSON object.
    pub other: serde_json::Map<String, serde_json::Value>,
}

/// How the next token is chosen from logits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Nucleus mass to keep; 1.0 keeps everything.
    pub top_p: f32,
    /// Most likely tokens to keep; 0 keeps everything.
    pub top_k: usize,
    /// Seed of the sampler's random stream, for reproducible sampling.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 0.0, top_p: 1.0, top_k: 0, seed: None }
    }
}

/// An inference engine, as exo classic's `InferenceEngine`: the node drives it one step at a
/// time. Implementations do their compute off the async runtime's threads.
#[async_trait]
pub trait Engine: Send + Sync {
    /// Name the engine is selected by (`"candle"`, `"dummy"`, ...).
    fn name(&self) -> &str;

    /// Name of the device the engine computes on (`cpu`, `cuda:0`, ...).
    fn device(&self) -> &str {
        "cpu"
    }

    /// How many steps the engine takes at once: an engine that batches concurrent requests'
    /// steps into one pass takes many, others one at a time (the node queues the rest).
    fn concurrent_steps(&self) -> usize {
        1
    }

    /// The shard last loaded by `ensure_shard`, if any.
    fn current_shard(&self) -> Option<Shard> {
        None
    }

    /// The tokenizer of the loaded model, if the engine has one.
    fn tokenizer(&self) -> Option<std::sync::Arc<crate::tokenizer::Tokenizer>> {
        None
    }

    /// Token ids of `prompt` (already chat-templated) for the model of `shard`.
    async fn encode(&self, shard: &Shard, prompt: &str) -> Result<Vec<u32>>;

    /// Text of `tokens` for the model of `shard`.
    async fn decode(&self, shard: &Shard, tokens: &[u32]) -> Result<String>;

    /// Picks the next token from the last row of `logits` (`[.., vocab]`).
    async fn sample(&self, logits: &WireTensor, params: SamplingParams) -> Result<Vec<u32>>;

    /// Runs `shard`'s layers on `input` (token ids on the first shard, hidden states
    /// otherwise) for `request_id`: hidden states out, or logits from the last shard.
    async fn infer_tensor(
        &self,
        request_id: &str,
        shard: &Shard,
        input: WireTensor,
        state: Option<InferenceState>,
    ) -> Result<(WireTensor, Option<InferenceState>)>;

    /// Loads `shard` (weights, tokenizer) if it is not the one already loaded.
    async fn ensure_shard(&self, shard: &Shard) -> Result<()>;

    /// Drops everything kept for `request_id` (its KV cache); unknown ids are ignored.
    async fn finish_request(&self, request_id: &str);

    /// Token ids that end generation for the model of `shard`.
    async fn eos_token_ids(&self, shard: &Shard) -> Result<Vec<u32>>;

    /// Positions `request_id`'s cache on this node can still take for `shard`'s model (its
    /// context less what the request holds), when the engine keeps such caches; the node
    /// ends a request whose next token would not fit, as a token limit does.
    async fn context_room(&self, _shard: &Shard, _request_id: &str) -> Option<usize> {
        None
    }

    /// What a layer and the LM head of `base`'s model cost per token, if the engine can tell
    /// without loading weights; the node balances layers across the ring with it.
    async fn model_costs(&self, _base: &Shard) -> Option<crate::topology::ModelCosts> {
        None
    }

    /// What `base`'s model takes in memory once this engine loads it (weights as it holds them,
    /// KV caches at its context within its cache budget), if it can tell without loading
    /// weights; the node keeps every node's layers within that node's memory with it.
    async fn model_memory(&self, _base: &Shard) -> Option<crate::topology::ModelMemory> {
        None
    }

    /// Runs `shard`'s layers over a whole example with no cache kept (exo classic's
    /// evaluation): hidden states for the next shard, or on the last shard the example's loss.
    async fn evaluate_example(&self, _shard: &Shard, _example: &Example) -> Result<ExampleOutput> {
        Err(Error::InvalidArgument(format!("the {} engine does not evaluate examples", self.name())))
    }

    /// The forward pass of a training example on `shard` for `request_id`: hidden states for
    /// the next shard (the pass kept until [`Engine::backward_example`]), or on the last shard
    /// the loss and the gradient for the shard's input, its adapters already stepped.
    async fn train_example(
        &self,
        _request_id: &str,
        _shard: &Shard,
        _example: &Example,
    ) -> Result<ExampleOutput> {
        Err(Error::InvalidArgument(format!("the {} engine does not train", self.name())))
    }

    /// The backward pass of `request_id`'s training example given the gradient for `shard`'s
    /// output: steps the adapters and returns the gradient for the shard's input (none on the
    /// first shard, whose input is token ids).
    async fn backward_example(
        &self,
        _request_id: &str,
        _shard: &Shard,
        _output_grad: WireTensor,
    ) -> Result<Option<WireTensor>> {
        Err(Error::InvalidArgument(format!("the {} engine does not train", self.name())))
    }

    /// Starts `request_id` afresh from `prompt`: encodes it and runs the first shard on it.
    async fn infer_prompt(
        &self,
        request_id: &str,
        shard: &Shard,
        prompt: &str,
        state: Option<InferenceState>,
    ) -> Result<(WireTensor, Option<InferenceState>)> {
        self.finish_request(request_id).await;
        let tokens: Vec<i64> = self.encode(shard, prompt).await?.into_iter().map(i64::from).collect();
        let input =
            WireTensor::new(DType::I64, vec![1, tokens.len()], bytemuck::cast_slice(&tokens).to_vec())?;
        self.infer_tensor(request_id, shard, input, state).await
    }
}

/// Finds the local directory holding a shard's model files (downloading them if needed).
#[async_trait]
pub trait ModelLocator: Send + Sync {
    /// Directory with `config.json`, the tokenizer files and the shard's safetensors.
    async fn locate(&self, shard: &Shard) -> Result<PathBuf>;

    /// Directory with the model's `config.json`, fetching no weights; `None` when this
    /// locator cannot get it without fetching the weights too.
    async fn locate_config(&self, model_id: &str) -> Option<PathBuf>;
}

/// Whether the engine named `engine_name` runs only whole models (RKLLM), never a layer range.
pub fn loads_whole_models(engine_name: &str) -> bool {
    engine_name == rkllm::NAME
}

/// Whether `id` names a local model: a directory with a `config.json`, or a GGUF file (a
/// `.gguf` path, or a directory holding one).
pub fn is_local_model(id: &str) -> bool {
    let path = std::path::Path::new(id);
    !id.is_empty() && (path.join("config.json").is_file() || !matches!(candle::gguf_files(path), Ok(None)))
}

/// Resolves a model id that is itself a local model (directory or GGUF); nothing is downloaded.
#[derive(Debug, Clone, Copy, Default)]
pub struct LocalDirectories;

#[async_trait]
impl ModelLocator for LocalDirectories {
    async fn locate(&self, shard: &Shard) -> Result<PathBuf> {
        if is_local_model(&shard.model_id) {
            return Ok(PathBuf::from(&shard.model_id));
        }
        Err(crate::error::Error::InvalidModel(format!(
            "{} is not a local model (a directory with config.json, or a GGUF file) and no downloader is configured",
            shard.model_id
        )))
    }

    async fn locate_config(&self, model_id: &str) -> Option<PathBuf> {
        is_local_model(model_id).then(|| PathBuf::from(model_id))
    }
}
