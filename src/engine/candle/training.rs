//! A candle engine's fine-tuning state for its loaded shard: the LoRA adapters, the optimizer
//! updating them, and each in-flight training example's graph between its forward pass and the
//! gradient coming back from the next shard. Checkpoints hold the adapters and the optimizer's
//! state, so training resumes where it stopped.
//!
//! Every shard steps its own optimizer once per example: the last shard as soon as it has the
//! loss, the others when the gradient for their output arrives. What a shard sends back is the
//! gradient of the loss with respect to its *input* hidden states, which is what the shard
//! before it needs for its own backward pass.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use super::lora::{Adapters, LoraConfig};
use super::model::ShardModel;
use super::optimizer::Optimizer;
use super::trainable::TrainableShard;
use crate::engine::example::{ExampleLoss, ExampleOutput};
use crate::error::{Error, Result};
use crate::shard::Shard;

/// Which optimizer updates the adapters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptimizerKind {
    /// Plain gradient descent.
    Sgd,
    /// Adam with decoupled weight decay.
    AdamW,
}

/// How a candle engine fine-tunes.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainOptions {
    /// The adapters' rank, scale and targets (for fresh adapters).
    pub lora: LoraConfig,
    /// The optimizer.
    pub optimizer: OptimizerKind,
    /// Its learning rate.
    pub learning_rate: f64,
    /// Its weight decay (AdamW).
    pub weight_decay: f64,
    /// A PEFT adapter directory to start from instead of fresh adapters.
    pub adapter: Option<PathBuf>,
    /// Seed of fresh adapters' `A` matrices.
    pub seed: u64,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            lora: LoraConfig::default(),
            optimizer: OptimizerKind::AdamW,
            learning_rate: 1e-4,
            weight_decay: 0.0,
            adapter: None,
            seed: 0,
        }
    }
}

/// An example between its forward pass and its gradient: the tracked input (none on the first
/// shard, whose input is token ids) and the output whose gradient will arrive.
struct Pending {
    input: Option<Var>,
    output: Tensor,
}

/// Where `shard`'s adapters are in the checkpoint `dir`: `dir` itself when it holds an adapter,
/// else its `layers-{start}-{end}` subdirectory.
fn adapters_dir(dir: &std::path::Path, shard: &Shard) -> std::path::PathBuf {
    if dir.join(super::lora::ADAPTER_CONFIG).is_file() {
        dir.to_path_buf()
    } else {
        dir.join(super::lora::shard_dir_name(shard))
    }
}

/// Fine-tuning state of one shard.
pub struct Training {
    model: TrainableShard,
    adapters: Adapters,
    optimizer: Optimizer,
    pending: HashMap<String, Pending>,
    /// The adapters' gradients of the last step, by PEFT name.
    last_gradients: BTreeMap<String, Tensor>,
}

impl Training {
    /// Training state for `model`'s shard under `options`.
    pub fn new(model: &ShardModel, options: &TrainOptions) -> Result<Self> {
        let adapters = match &options.adapter {
            Some(dir) => Adapters::load(dir, model.shard(), model.config())?,
            None => Adapters::new(options.lora.clone(), model.shard(), model.config(), options.seed)?,
        };
        let mut optimizer = match options.optimizer {
            OptimizerKind::Sgd => Optimizer::Sgd { lr: options.learning_rate },
            OptimizerKind::AdamW => Optimizer::AdamW {
                lr: options.learning_rate,
                weight_decay: options.weight_decay,
                step: 0,
                moments: HashMap::new(),
            },
        };
        if let Some(dir) = &options.adapter {
            optimizer.restore(&adapters_dir(dir, model.shard()))?;
        }
        Ok(Self {
            model: TrainableShard::load(model)?,
            optimizer,
            adapters,
            pending: HashMap::new(),
            last_gradients: BTreeMap::new(),
        })
    }

    /// The shard this state trains.
    pub fn shard(&self) -> &Shard {
        self.model.shard()
    }

    /// Writes the adapters and the optimizer's state to `dir` (PEFT's layout, plus
    /// `optimizer.safetensors`).
    pub fn save(&self, dir: &std::path::Path) -> Result<()> {
        self.adapters.save(dir, &self.shard().model_id)?;
        self.optimizer.save(dir)
    }

    /// The adapters' gradients of the last step, by PEFT name.
    pub fn last_gradients(&self) -> &BTreeMap<String, Tensor> {
        &self.last_gradients
    }

    /// Output of the layers with the adapters, tracking nothing (evaluation).
    pub fn evaluate(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(self.model.forward(hidden, &self.adapters)?.detach())
    }

    /// The forward pass of a training example entering the shard as `hidden` (token ids
    /// already embedded on the first shard, whose input gets no gradient). On the last shard,
    /// the loss, its backward pass and the step; elsewhere the output, kept until
    /// [`Self::backward`] gets its gradient.
    pub fn forward(
        &mut self,
        request_id: &str,
        hidden: Tensor,
        targets: &[Vec<u32>],
        lengths: &[usize],
    ) -> Result<ExampleOutput> {
        let hidden = hidden.to_device(&candle_core::Device::Cpu)?;
        let input = if self.shard().is_first_layer() { None } else { Some(Var::from_tensor(&hidden)?) };
        let hidden = input.as_ref().map_or(hidden, |var| var.as_tensor().clone());
        self.run(request_id, input, hidden, targets, lengths)
    }

    fn run(
        &mut self,
        request_id: &str,
        input: Option<Var>,
        hidden: Tensor,
        targets: &[Vec<u32>],
        lengths: &[usize],
    ) -> Result<ExampleOutput> {
        if !self.shard().is_last_layer() {
            let output = self.model.forward(&hidden, &self.adapters)?;
            self.pending.insert(request_id.to_string(), Pending { input, output: output.clone() });
            return Ok(ExampleOutput::Hidden(crate::tensor::WireTensor::from_candle(&output.detach())?));
        }
        let (loss, _) = self.model.loss(&hidden, &self.adapters, targets, lengths)?;
        let grads = self.step(&loss)?;
        let input_grad = input.and_then(|var| grads.get(var.as_tensor()).cloned());
        Ok(ExampleOutput::Loss(ExampleLoss {
            loss: loss.to_scalar::<f32>()?,
            grads: input_grad.map(|g| crate::tensor::WireTensor::from_candle(&g)).transpose()?,
        }))
    }

    /// The backward pass of `request_id`'s example given the gradient for its output: steps
    /// the optimizer and returns the gradient for the shard's input (none on the first shard).
    pub fn backward(&mut self, request_id: &str, output_grad: &Tensor) -> Result<Option<Tensor>> {
        let pending = self.pending.remove(request_id).ok_or_else(|| {
            Error::RequestFailed(format!("example {request_id} has no forward pass waiting for its gradient"))
        })?;
        if output_grad.dims() != pending.output.dims() {
            return Err(Error::InvalidTensor(format!(
                "a gradient of shape {:?} does not fit the output {:?}",
                output_grad.dims(),
                pending.output.dims()
            )));
        }
        // d/dθ of Σ output · g is the vector-Jacobian product the chain rule asks for.
        let surrogate = (&pending.output * output_grad.to_dtype(candle_core::DType::F32)?)?.sum_all()?;
        let grads = self.step(&surrogate)?;
        Ok(pending.input.and_then(|var| grads.get(var.as_tensor()).cloned()))
    }

    /// Forgets `request_id`'s pending forward pass, if any.
    pub fn forget(&mut self, request_id: &str) {
        self.pending.remove(request_id);
    }

    /// Back-propagates from `root`, records the adapters' gradients and steps the optimizer.
    fn step(&mut self, root: &Tensor) -> Result<GradStore> {
        let grads = root.backward()?;
        self.last_gradients = self
            .adapters
            .named_vars()
            .into_iter()
            .filter_map(|(name, var)| grads.get(var.as_tensor()).map(|g| (name, g.clone())))
            .collect();
        self.optimizer.step(&self.adapters.named_vars(), &grads)?;
        Ok(grads)
    }
}
