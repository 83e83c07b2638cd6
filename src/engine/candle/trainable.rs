//! The training path: a shard's layers over whole sequences, on frozen weights (a float
//! checkpoint's split from its map, a quantized checkpoint's as stored) with LoRA adapters
//! added. Which path each op takes through autograd:
//! - frozen products: [`FrozenWeight`], one op whose backward gives only the input's gradient;
//! - RMS norms, RoPE, causal attention and SwiGLU: the ops of [`super::fused`], each with its
//!   own backward;
//! - the LoRA products and residual sums: candle's matmul and arithmetic, differentiated by
//!   candle;
//! - the head and its loss: [`head_loss`].
//!
//! The inference path's kernels have no backward, so nothing here uses them; the numbers are
//! the same up to rounding (the evaluation tests hold both to transformers).

use std::ops::Range;

use candle_core::{Device, Tensor};

use super::config::ModelConfig;
use super::frozen_product::FrozenProduct;
use super::frozen_weight::FrozenWeight;
use super::fused::{causal_attention, swiglu, HalfRotation, RmsNorm};
use super::head_loss::head_loss;
use super::linear::Linear;
use super::lora::Adapters;
use super::model::ShardModel;
use super::quantized_product::QuantizedProduct;
use crate::error::Result;
use crate::shard::Shard;

/// A frozen projection `[out, in]` with an optional bias `[out]`.
struct Frozen {
    weight: FrozenWeight,
    bias: Option<Tensor>,
}

/// One layer's frozen weights.
struct DenseBlock {
    layer: i32,
    input_norm: RmsNorm,
    post_norm: RmsNorm,
    projections: Vec<(&'static str, Frozen)>,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
}

impl DenseBlock {
    fn projection(&self, name: &str) -> &Frozen {
        &self.projections.iter().find(|(n, _)| *n == name).expect("every projection is loaded").1
    }
}

/// A shard's layers (and final norm and head on the last shard) as frozen weights.
pub struct TrainableShard {
    shard: Shard,
    config: ModelConfig,
    blocks: Vec<DenseBlock>,
    norm: Option<RmsNorm>,
    head: Option<FrozenWeight>,
    rope: HalfRotation,
}

/// The families whose layers this path builds (plain attention and gated MLP, unfused).
const TRAINABLE_MODEL_TYPES: [&str; 4] = ["llama", "mistral", "qwen2", "qwen3"];

const PROJECTIONS: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

impl TrainableShard {
    /// Frozen weights of `model`: f32 copies of float weights, quantized weights shared.
    pub fn load(model: &ShardModel) -> Result<Self> {
        let (config, shard) = (model.config().clone(), model.shard().clone());
        if !TRAINABLE_MODEL_TYPES.contains(&config.model_type.as_str()) {
            return Err(crate::error::Error::InvalidModel(format!(
                "fine-tuning runs {} models; {} is a {} model",
                TRAINABLE_MODEL_TYPES.join(", "),
                shard.model_id,
                config.model_type
            )));
        }
        let variant = config.variant().map_err(crate::error::Error::InvalidModel)?;
        let (hidden, inter, head_dim) = (config.hidden_size, config.intermediate_size, config.head_dim());
        let (q, kv) = (config.num_attention_heads * head_dim, config.num_key_value_heads() * head_dim);
        let mut blocks = Vec::new();
        for layer in shard.start_layer..=shard.end_layer {
            let p = format!("model.layers.{layer}");
            let mut projections = Vec::new();
            for name in PROJECTIONS {
                let (module, out, input, bias) = match name {
                    "q_proj" => ("self_attn", q, hidden, variant.qkv_bias),
                    "k_proj" | "v_proj" => ("self_attn", kv, hidden, variant.qkv_bias),
                    "o_proj" => ("self_attn", hidden, q, variant.o_bias),
                    "gate_proj" | "up_proj" => ("mlp", inter, hidden, variant.mlp_bias),
                    _ => ("mlp", hidden, inter, variant.mlp_bias),
                };
                let prefix = format!("{p}.{module}.{name}");
                let weight = frozen(model, &format!("{prefix}.weight"), [out, input], || {
                    model.projection(layer, name)
                })?;
                let bias = if bias { Some(model.dense(&format!("{prefix}.bias"), &[out])?) } else { None };
                projections.push((name, Frozen { weight, bias }));
            }
            let norm = |name: &str, len: usize| {
                RmsNorm::new(&model.dense(&format!("{p}.{name}.weight"), &[len])?, config.rms_norm_eps)
            };
            blocks.push(DenseBlock {
                layer,
                input_norm: norm("input_layernorm", hidden)?,
                post_norm: norm("post_attention_layernorm", hidden)?,
                projections,
                q_norm: if variant.qk_norm { Some(norm("self_attn.q_norm", head_dim)?) } else { None },
                k_norm: if variant.qk_norm { Some(norm("self_attn.k_norm", head_dim)?) } else { None },
            });
        }
        let (norm, head) = if shard.is_last_layer() {
            let vocab = config.vocab_size;
            let head = frozen(model, model.head_name(), [vocab, hidden], || {
                model.head().map(|head| (head, 0..vocab)).ok_or_else(|| {
                    crate::error::Error::InvalidModel(format!("{} holds no LM head", shard.model_id))
                })
            })?;
            (
                Some(RmsNorm::new(&model.dense("model.norm.weight", &[hidden])?, config.rms_norm_eps)?),
                Some(head),
            )
        } else {
            (None, None)
        };
        let (cos, sin) = model.rope().tables(model.max_context())?;
        let rope = HalfRotation::new(&cos.to_device(&Device::Cpu)?, &sin.to_device(&Device::Cpu)?)?;
        Ok(Self { shard, config, blocks, norm, head, rope })
    }

    /// The shard whose weights these are.
    pub fn shard(&self) -> &Shard {
        &self.shard
    }

    /// Hidden states `[batch, seq, hidden]` (f32, on the host) through the layers with
    /// `adapters`: hidden states out, or on the last shard the logits `[batch, seq, vocab]`.
    pub fn forward(&self, x: &Tensor, adapters: &Adapters) -> Result<Tensor> {
        let x = self.layers(x, adapters)?;
        match (&self.norm, &self.head) {
            (Some(norm), Some(head)) => head.apply(&norm.apply(&x)?),
            _ => Ok(x),
        }
    }

    /// On the last shard, the mean cross entropy of the logits of hidden states `x`
    /// (`[batch, seq, hidden]`, f32, on the host) through the layers with `adapters`, against
    /// `targets` over the positions `lengths` count (see [`super::loss`]), with their number.
    pub fn loss(
        &self,
        x: &Tensor,
        adapters: &Adapters,
        targets: &[Vec<u32>],
        lengths: &[usize],
    ) -> Result<(Tensor, usize)> {
        let (Some(norm), Some(head)) = (&self.norm, &self.head) else {
            return Err(crate::error::Error::RequestFailed(format!(
                "layers {}..={} of {} hold no head to score an example with",
                self.shard.start_layer, self.shard.end_layer, self.shard.model_id
            )));
        };
        let x = self.layers(x, adapters)?;
        head_loss(head, &norm.apply(&x)?, targets, lengths)
    }

    fn layers(&self, x: &Tensor, adapters: &Adapters) -> Result<Tensor> {
        let mut x = x.clone();
        for block in &self.blocks {
            x = self.block(&x, block, adapters)?;
        }
        Ok(x)
    }

    fn block(&self, x: &Tensor, block: &DenseBlock, adapters: &Adapters) -> Result<Tensor> {
        let project =
            |name: &str, input: &Tensor| project(input, block.projection(name), adapters, block.layer, name);
        let attended = self.attention(&block.input_norm.apply(x)?, block, &project)?;
        let x = (x + project("o_proj", &attended)?)?;
        let normed = block.post_norm.apply(&x)?;
        let activated = swiglu(&project("gate_proj", &normed)?, &project("up_proj", &normed)?)?;
        Ok((&x + project("down_proj", &activated)?)?)
    }

    /// Causal self-attention over whole sequences: `[batch, seq, hidden]` in,
    /// `[batch, seq, heads * head_dim]` out.
    fn attention(
        &self,
        x: &Tensor,
        block: &DenseBlock,
        project: &dyn Fn(&str, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let (b, seq, _) = x.dims3()?;
        let (heads, kv_heads, d) =
            (self.config.num_attention_heads, self.config.num_key_value_heads(), self.config.head_dim());
        // (b, seq, n * d) -> (b, seq, n, d), then the optional per-head norm.
        let split = |t: Tensor, n: usize, norm: &Option<RmsNorm>| -> Result<Tensor> {
            let t = t.reshape((b, seq, n, d))?;
            norm.as_ref().map_or(Ok(t.clone()), |norm| norm.apply(&t))
        };
        let q = self.rope.apply(&split(project("q_proj", x)?, heads, &block.q_norm)?)?;
        let k = self.rope.apply(&split(project("k_proj", x)?, kv_heads, &block.k_norm)?)?;
        let v = split(project("v_proj", x)?, kv_heads, &None)?;
        // (b, seq, heads, d) -> (b, seq, heads * d)
        Ok(causal_attention(&q, &k, &v)?.reshape((b, seq, heads * d))?)
    }
}

/// The frozen weight `name` (`[out, in]`): a float weight taken from the checkpoint's bytes, or
/// from an f32 copy where the inference adapter was merged into it; else rows of the inference
/// layer that `stored` gives, multiplied as that layer holds them.
fn frozen<'a>(
    model: &'a ShardModel,
    name: &str,
    [out, input]: [usize; 2],
    stored: impl FnOnce() -> Result<(&'a Linear, Range<usize>)>,
) -> Result<FrozenWeight> {
    if let Some((bytes, dtype)) = model.stored_matrix(name, [out, input])? {
        return Ok(FrozenWeight::Float(FrozenProduct::from_stored(bytes, dtype, (out, input))?));
    }
    if model.is_float(name) {
        return Ok(FrozenWeight::Float(FrozenProduct::new(model.dense(name, &[out, input])?)?));
    }
    let (layer, rows) = stored()?;
    let weight = QuantizedProduct::of(layer, rows)?;
    if (weight.rows(), weight.cols()) != (out, input) {
        return Err(crate::error::Error::InvalidModel(format!(
            "{name} is {}x{}, the config implies {out}x{input}",
            weight.rows(),
            weight.cols()
        )));
    }
    Ok(FrozenWeight::Quantized(weight))
}

/// `x Wᵀ + b`, plus the adapter's `scaling · x Aᵀ Bᵀ` where `name` of `layer` is adapted.
fn project(x: &Tensor, frozen: &Frozen, adapters: &Adapters, layer: i32, name: &str) -> Result<Tensor> {
    let mut y = frozen.weight.apply(x)?;
    if let Some(bias) = &frozen.bias {
        y = y.broadcast_add(bias)?;
    }
    let Some(pair) = adapters.pair(layer, name) else { return Ok(y) };
    let update = x.broadcast_matmul(&pair.a.as_tensor().t()?)?.broadcast_matmul(&pair.b.as_tensor().t()?)?;
    Ok((y + (update * adapters.config().scaling())?)?)
}
