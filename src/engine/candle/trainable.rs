//! The training path: a shard's layers over whole sequences built only from candle ops that
//! autograd differentiates (matmul, broadcast arithmetic, exp, sums), on frozen weights (f32
//! copies of a float checkpoint's, a quantized checkpoint's as stored) with LoRA adapters
//! added. The inference path's SIMD kernels, fused RMS norm, RoPE and softmax have no backward,
//! so nothing here uses them; the numbers are the same up to rounding (the evaluation tests
//! hold both to transformers).

use std::ops::Range;

use candle_core::{Device, Tensor, D};

use super::config::ModelConfig;
use super::frozen_product::FrozenProduct;
use super::frozen_weight::FrozenWeight;
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
    input_norm: Tensor,
    post_norm: Tensor,
    projections: Vec<(&'static str, Frozen)>,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
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
    norm: Option<Tensor>,
    head: Option<FrozenWeight>,
    cos: Tensor,
    sin: Tensor,
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
            let norm = |name: &str, len: usize| model.dense(&format!("{p}.{name}.weight"), &[len]);
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
            (Some(model.dense("model.norm.weight", &[hidden])?), Some(head))
        } else {
            (None, None)
        };
        let (cos, sin) = model.rope().tables(model.max_context())?;
        let (cos, sin) = (cos.to_device(&Device::Cpu)?, sin.to_device(&Device::Cpu)?);
        Ok(Self { shard, config, blocks, norm, head, cos, sin })
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
            (Some(norm), Some(head)) => head.apply(&rms_norm(&x, norm, self.config.rms_norm_eps)?),
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
        head_loss(head, &rms_norm(&x, norm, self.config.rms_norm_eps)?, targets, lengths)
    }

    fn layers(&self, x: &Tensor, adapters: &Adapters) -> Result<Tensor> {
        let mut x = x.clone();
        for block in &self.blocks {
            x = self.block(&x, block, adapters)?;
        }
        Ok(x)
    }

    fn block(&self, x: &Tensor, block: &DenseBlock, adapters: &Adapters) -> Result<Tensor> {
        let eps = self.config.rms_norm_eps;
        let project =
            |name: &str, input: &Tensor| project(input, block.projection(name), adapters, block.layer, name);
        let normed = rms_norm(x, &block.input_norm, eps)?;
        let attended = self.attention(&normed, block, &project)?;
        let x = (x + project("o_proj", &attended)?)?;
        let normed = rms_norm(&x, &block.post_norm, eps)?;
        let gate = project("gate_proj", &normed)?;
        // SiLU as x / (1 + e^-x), from differentiable parts.
        let silu = (&gate / (gate.neg()?.exp()? + 1.0)?)?;
        let mlp = project("down_proj", &(silu * project("up_proj", &normed)?)?)?;
        Ok((x + mlp)?)
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
        let eps = self.config.rms_norm_eps;
        let split = |t: Tensor, n: usize, norm: &Option<Tensor>| -> Result<Tensor> {
            // (b, seq, n * d) -> (b, seq, n, d) -> optional per-head norm -> (b, n, seq, d)
            let t = t.reshape((b, seq, n, d))?;
            let t = match norm {
                Some(w) => rms_norm(&t, w, eps)?,
                None => t,
            };
            Ok(t.transpose(1, 2)?)
        };
        let q = self.rotate(&split(project("q_proj", x)?, heads, &block.q_norm)?, seq)?;
        let k = self.rotate(&split(project("k_proj", x)?, kv_heads, &block.k_norm)?, seq)?;
        let v = split(project("v_proj", x)?, kv_heads, &None)?;
        // Each key/value head serves `group` query heads: (b, kv, s, d) -> (b, kv * group, s, d).
        let group = heads / kv_heads;
        let widen = |t: Tensor| -> Result<Tensor> {
            Ok(t.unsqueeze(2)?.broadcast_as((b, kv_heads, group, seq, d))?.reshape((b, heads, seq, d))?)
        };
        let (k, v) = (widen(k)?, widen(v)?);
        let scores = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? / (d as f64).sqrt())?;
        let mask: Vec<f32> = (0..seq)
            .flat_map(|i| (0..seq).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let scores = scores.broadcast_add(&Tensor::from_vec(mask, (seq, seq), &Device::Cpu)?)?;
        let probs = softmax_last(&scores)?;
        let out = probs.matmul(&v.contiguous()?)?;
        // (b, heads, seq, d) -> (b, seq, heads * d)
        Ok(out.transpose(1, 2)?.reshape((b, seq, heads * d))?)
    }

    /// RoPE on `[batch, heads, seq, head_dim]` as transformers applies it (halves rotated).
    fn rotate(&self, x: &Tensor, seq: usize) -> Result<Tensor> {
        let half = self.config.head_dim() / 2;
        let cos = self.cos.narrow(0, 0, seq)?;
        let sin = self.sin.narrow(0, 0, seq)?;
        let (cos, sin) = (Tensor::cat(&[&cos, &cos], 1)?, Tensor::cat(&[&sin, &sin], 1)?);
        let (first, second) = (x.narrow(D::Minus1, 0, half)?, x.narrow(D::Minus1, half, half)?);
        let rotated = Tensor::cat(&[&second.neg()?, &first], D::Minus1)?;
        Ok((x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?)
    }
}

/// The frozen weight `name` (`[out, in]`): an f32 copy where `model` holds it as a float weight,
/// else rows of the inference layer that `stored` gives, multiplied as that layer holds them.
fn frozen<'a>(
    model: &'a ShardModel,
    name: &str,
    [out, input]: [usize; 2],
    stored: impl FnOnce() -> Result<(&'a Linear, Range<usize>)>,
) -> Result<FrozenWeight> {
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

/// RMS norm over the last axis, as transformers computes it in f32.
fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let scale = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    Ok(x.broadcast_mul(&scale)?.broadcast_mul(weight)?)
}

/// Softmax over the last axis, stabilised by the row maximum (held constant, as it cancels).
fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let shifted = x.broadcast_sub(&x.max_keepdim(D::Minus1)?.detach())?;
    let exp = shifted.exp()?;
    Ok(exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)?)
}
