//! The decoder-only transformer shared by Llama, Mistral, Qwen2 and Qwen3, built for one
//! shard: embeddings (and LLaVA's vision tower) only on the first shard, final norm and LM
//! head only on the last.

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use candle_core::quantized::GgmlDType;

use super::cache::RequestCache;
use super::config::{ModelConfig, Variant};
use super::decode_attention;
use super::deepseek::{LatentAttention, LatentShape};
use super::embedding::Embedding;
use super::gemma::{self, Activation, Gemma};
use super::linear::Linear;
use super::llava::{self, VisionTower};
use super::lora_merge::LoraMerge;
use super::moe::{MoeSpec, Route, SparseMoe};
use super::rope::Rope;
use super::sliding_window;
use super::tensors::{Checkpoint, ShardTensors};
use crate::error::{Error, Result};
use crate::shard::Shard;

/// RMS norm with an f32 weight.
#[derive(Debug, Clone)]
pub(super) struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub(super) fn load(
        weights: &ShardTensors,
        name: &str,
        size: usize,
        eps: f64,
        device: &Device,
    ) -> Result<Self> {
        Ok(Self { weight: weights.vector_f32(name, size, device)?, eps: eps as f32 })
    }

    /// Gemma's norm, `x_normed * (1 + w)`: the stored weight plus one when `plus_one`.
    fn shifted(self, plus_one: bool) -> Result<Self> {
        if !plus_one {
            return Ok(self);
        }
        Ok(Self { weight: (self.weight + 1.0)?, eps: self.eps })
    }

    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps)?)
    }
}

/// The tensors one shard needs, with their expected shapes.
struct TensorPlan {
    entries: Vec<(String, Vec<usize>)>,
}

impl TensorPlan {
    fn new(config: &ModelConfig, shard: &Shard, variant: Variant, tied: bool) -> Self {
        let (hidden, inter, vocab) = (config.hidden_size, config.intermediate_size, config.vocab_size);
        let (q_out, kv_out) = (
            config.num_attention_heads * config.head_dim(),
            config.num_key_value_heads() * config.head_dim(),
        );
        let moe = MoeSpec::of(config).ok().flatten();
        let mut entries = Vec::new();
        let mut add = |name: String, shape: Vec<usize>| entries.push((name, shape));
        if shard.is_first_layer() || (shard.is_last_layer() && tied) {
            add("model.embed_tokens.weight".into(), vec![vocab, hidden]);
        }
        if let (true, Some(llava)) = (shard.is_first_layer(), &config.llava) {
            for (name, shape) in llava.tensors(hidden) {
                add(name, shape);
            }
        }
        let fused = config.fused_projections();
        let latent = LatentShape::of(config);
        for layer in shard.start_layer..=shard.end_layer {
            let p = format!("model.layers.{layer}");
            if let Some(shape) = &latent {
                for (name, dims) in shape.tensors(&format!("{p}.self_attn"), hidden) {
                    add(name, dims);
                }
            }
            if fused {
                add(format!("{p}.self_attn.qkv_proj.weight"), vec![q_out + 2 * kv_out, hidden]);
                add(format!("{p}.mlp.gate_up_proj.weight"), vec![2 * inter, hidden]);
            }
            let qkv = if fused || latent.is_some() {
                vec![]
            } else {
                vec![("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)]
            };
            for (proj, out) in qkv {
                add(format!("{p}.self_attn.{proj}.weight"), vec![out, hidden]);
                if variant.qkv_bias {
                    add(format!("{p}.self_attn.{proj}.bias"), vec![out]);
                }
            }
            if latent.is_none() {
                add(format!("{p}.self_attn.o_proj.weight"), vec![hidden, q_out]);
            }
            if variant.o_bias {
                add(format!("{p}.self_attn.o_proj.bias"), vec![hidden]);
            }
            if variant.qk_norm {
                add(format!("{p}.self_attn.q_norm.weight"), vec![config.head_dim()]);
                add(format!("{p}.self_attn.k_norm.weight"), vec![config.head_dim()]);
            }
            let sparse = moe.as_ref().filter(|spec| spec.is_sparse(layer as usize));
            for (name, shape) in sparse.map(|spec| spec.tensors(layer as usize, hidden)).unwrap_or_default() {
                add(name, shape);
            }
            let dense_mlp = if sparse.is_some() {
                &[][..]
            } else if fused {
                &[("down_proj", hidden, inter)][..]
            } else {
                &[("gate_proj", inter, hidden), ("up_proj", inter, hidden), ("down_proj", hidden, inter)]
            };
            for &(proj, out, input) in dense_mlp {
                add(format!("{p}.mlp.{proj}.weight"), vec![out, input]);
                if variant.mlp_bias {
                    add(format!("{p}.mlp.{proj}.bias"), vec![out]);
                }
            }
            add(format!("{p}.input_layernorm.weight"), vec![hidden]);
            add(format!("{p}.post_attention_layernorm.weight"), vec![hidden]);
            if config.is_gemma() {
                add(format!("{p}.pre_feedforward_layernorm.weight"), vec![hidden]);
                add(format!("{p}.post_feedforward_layernorm.weight"), vec![hidden]);
            }
        }
        if shard.is_last_layer() {
            add("model.norm.weight".into(), vec![hidden]);
            if !tied {
                add("lm_head.weight".into(), vec![vocab, hidden]);
            }
        }
        Self { entries }
    }

    fn names(&self) -> Vec<String> {
        self.entries.iter().map(|(n, _)| n.clone()).collect()
    }
}

/// The LM head reuses the embedding when the config says so or the checkpoint has no head.
fn head_is_tied(config: &ModelConfig, checkpoint: &Checkpoint) -> bool {
    config.tie_word_embeddings || !checkpoint.has_head()
}

/// Self-attention with grouped-query heads, optional biases and q/k norms; q, k and v are
/// one stacked product.
#[derive(Debug, Clone)]
struct Attention {
    qkv_proj: Linear,
    o_proj: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    /// Factor of the scores: `1 / sqrt(head_dim)`, or Gemma's `query_pre_attn_scalar ** -0.5`.
    scale: f64,
    /// Gemma 2's cap of the scaled scores.
    softcap: Option<f32>,
    /// How many latest positions (itself included) a query sees, if the layer has a sliding window.
    window: Option<usize>,
}

impl Attention {
    fn load(
        weights: &ShardTensors,
        prefix: &str,
        config: &ModelConfig,
        variant: Variant,
        device: &Device,
    ) -> Result<Self> {
        let (hidden, head_dim) = (config.hidden_size, config.head_dim());
        let (heads, kv_heads) = (config.num_attention_heads, config.num_key_value_heads());
        let norm = |name: &str| {
            RmsNorm::load(weights, &format!("{prefix}.{name}.weight"), head_dim, config.rms_norm_eps, device)?
                .shifted(config.is_gemma())
        };
        let gemma = Gemma::new(config);
        let (q_out, kv_out) = (heads * head_dim, kv_heads * head_dim);
        let qkv = [("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)];
        let fused = [("qkv_proj", q_out + 2 * kv_out)];
        let qkv: &[(&str, usize)] = if config.fused_projections() { &fused } else { &qkv };
        Ok(Self {
            qkv_proj: weights.linear(prefix, qkv, hidden, variant.qkv_bias, device)?,
            o_proj: weights.linear(prefix, &[("o_proj", hidden)], q_out, variant.o_bias, device)?,
            q_norm: if variant.qk_norm { Some(norm("q_norm")?) } else { None },
            k_norm: if variant.qk_norm { Some(norm("k_norm")?) } else { None },
            heads,
            kv_heads,
            head_dim,
            scale: gemma.as_ref().map_or(1.0 / (head_dim as f64).sqrt(), |g| g.attention_scale),
            softcap: gemma.and_then(|g| g.attention_softcap),
            window: None,
        })
    }

    /// The layer holding projection `name` (q/k/v or o) and its rows there.
    fn projection(&self, name: &str) -> Option<(&Linear, Range<usize>)> {
        let (q, kv) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
        match name {
            "q_proj" => Some((&self.qkv_proj, 0..q)),
            "k_proj" => Some((&self.qkv_proj, q..q + kv)),
            "v_proj" => Some((&self.qkv_proj, q + kv..q + 2 * kv)),
            "o_proj" => Some((&self.o_proj, 0..self.o_proj.rows())),
            _ => None,
        }
    }

    /// `x` holds every part's rows packed as `[1, rows, hidden]`, part after part; each
    /// part attends over its own cache only.
    fn forward(&self, x: &Tensor, parts: &mut [BatchPart], rope: &Rope, layer: usize) -> Result<Tensor> {
        let (q_out, kv_out) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
        let [q, k, v]: [Tensor; 3] = self
            .qkv_proj
            .forward_parts(x, &[q_out, kv_out, kv_out])?
            .try_into()
            .expect("three parts were asked for");
        let mut outputs = Vec::with_capacity(parts.len());
        let mut row = 0;
        for part in parts.iter_mut() {
            let (b, seq) = part.shape;
            let rows = |t: &Tensor, width: usize| -> Result<Tensor> {
                Ok(t.narrow(1, row, b * seq)?.reshape((b, seq, width))?)
            };
            let out =
                self.attend(rows(&q, q_out)?, rows(&k, kv_out)?, rows(&v, kv_out)?, part, rope, layer)?;
            outputs.push(out.reshape((1, b * seq, q_out))?);
            row += b * seq;
        }
        let out = if outputs.len() == 1 { outputs.remove(0) } else { Tensor::cat(&outputs, 1)? };
        self.o_proj.forward(&out)
    }

    /// One part's attention: `q`, `k`, `v` are `[batch, seq, heads * head_dim]` at positions
    /// `offset..offset + seq` of its cache; returns `[batch, seq, heads * head_dim]`.
    fn attend(
        &self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        part: &mut BatchPart,
        rope: &Rope,
        layer: usize,
    ) -> Result<Tensor> {
        let ((b, seq), offset) = (part.shape, part.cache.position);
        let split = |t: Tensor, heads: usize, norm: &Option<RmsNorm>| -> Result<Tensor> {
            // (b, seq, heads, head_dim) -> optional per-head norm -> (b, heads, seq, head_dim)
            let t = t.reshape((b, seq, heads, self.head_dim))?;
            let t = match norm {
                Some(norm) => norm.forward(&t)?,
                None => t,
            };
            Ok(t.transpose(1, 2)?.contiguous()?)
        };
        let end = part.cache.step_end.max(offset + seq);
        let q = rope.apply_in_pass(&split(q, self.heads, &self.q_norm)?, offset, end)?;
        let k = rope.apply_in_pass(&split(k, self.kv_heads, &self.k_norm)?, offset, end)?;
        let v = split(v, self.kv_heads, &None)?;
        let (k, v) = part.cache.append(layer, &k, &v)?;
        // One new query sees only the window's last positions.
        let (k, v) = match self.window {
            Some(window) if seq == 1 => sliding_window::last_positions(k, v, window)?,
            _ => (k, v),
        };
        let total = k.dim(2)?;
        let scale = self.scale;
        if let Some(out) = decode_attention::attend_one_position(&q, &k, &v, scale as f32, self.softcap)? {
            return Ok(out);
        }

        // Group the query heads that share a key/value head: (b, kv_heads, group * seq, head_dim).
        let group = self.heads / self.kv_heads;
        let q = q.reshape((b, self.kv_heads, group * seq, self.head_dim))?;
        let scores = (q.matmul(&k.t()?)? * scale)?;
        let scores = match self.softcap {
            Some(cap) => gemma::softcap(&scores, cap)?,
            None => scores,
        };
        let mask = match self.window {
            Some(window) if seq > 1 => {
                Some(sliding_window::mask(seq, offset, total, group, window, q.device())?)
            }
            _ => causal_mask(seq, offset, total, group, q.device())?,
        };
        let scores = match mask {
            Some(mask) => scores.broadcast_add(&mask)?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs.matmul(&v.contiguous()?)?;
        // (b, kv_heads, group * seq, d) -> (b, heads, seq, d) -> (b, seq, heads * d)
        Ok(out.reshape((b, self.heads, seq, self.head_dim))?.transpose(1, 2)?.reshape((
            b,
            seq,
            self.heads * self.head_dim,
        ))?)
    }
}

/// `[group * seq, total]` additive mask hiding keys after each query's position; none for one query.
pub(super) fn causal_mask(
    seq: usize,
    offset: usize,
    total: usize,
    group: usize,
    device: &Device,
) -> Result<Option<Tensor>> {
    if seq == 1 {
        return Ok(None);
    }
    let row: Vec<f32> = (0..seq)
        .flat_map(|i| (0..total).map(move |j| if j > offset + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    let mask = Tensor::from_vec(row, (seq, total), device)?;
    Ok(Some(mask.repeat((group, 1))?))
}

/// The gated SiLU MLP; gate and up are one stacked product.
#[derive(Debug, Clone)]
struct Mlp {
    gate_up_proj: Linear,
    down_proj: Linear,
    intermediate: usize,
    /// SiLU, or Gemma's GELU.
    activation: Activation,
}

impl Mlp {
    fn load(
        weights: &ShardTensors,
        prefix: &str,
        config: &ModelConfig,
        bias: bool,
        device: &Device,
    ) -> Result<Self> {
        let (hidden, inter) = (config.hidden_size, config.intermediate_size);
        let gate_up = [("gate_proj", inter), ("up_proj", inter)];
        let fused = [("gate_up_proj", 2 * inter)];
        let gate_up: &[(&str, usize)] = if config.fused_projections() { &fused } else { &gate_up };
        Ok(Self {
            gate_up_proj: weights.linear(prefix, gate_up, hidden, bias, device)?,
            down_proj: weights.linear(prefix, &[("down_proj", hidden)], inter, bias, device)?,
            intermediate: inter,
            activation: Activation::of(config),
        })
    }

    /// The layer holding projection `name` (gate/up or down) and its rows there.
    fn projection(&self, name: &str) -> Option<(&Linear, Range<usize>)> {
        let inter = self.intermediate;
        match name {
            "gate_proj" => Some((&self.gate_up_proj, 0..inter)),
            "up_proj" => Some((&self.gate_up_proj, inter..2 * inter)),
            "down_proj" => Some((&self.down_proj, 0..self.down_proj.rows())),
            _ => None,
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let [gate, up]: [Tensor; 2] = self
            .gate_up_proj
            .forward_parts(x, &[self.intermediate, self.intermediate])?
            .try_into()
            .expect("two parts were asked for");
        self.down_proj.forward(&(self.activation.apply(&gate)? * up)?)
    }
}

/// A layer's attention: grouped-query heads, or DeepSeek's multi-head latent attention (both
/// boxed: they differ much in size).
#[derive(Debug, Clone)]
enum SelfAttention {
    Grouped(Box<Attention>),
    Latent(Box<LatentAttention>),
}

impl SelfAttention {
    fn forward(&self, x: &Tensor, parts: &mut [BatchPart], rope: &Rope, layer: usize) -> Result<Tensor> {
        match self {
            Self::Grouped(attention) => attention.forward(x, parts, rope, layer),
            Self::Latent(attention) => attention.forward(x, parts, rope, layer),
        }
    }

    /// How many latest positions a query sees, if the layer has a sliding window.
    fn window(&self) -> Option<usize> {
        match self {
            Self::Grouped(attention) => attention.window,
            Self::Latent(_) => None,
        }
    }
}

/// One decoder layer: pre-norm attention and pre-norm MLP, each with a residual.
#[derive(Debug, Clone)]
struct Block {
    input_layernorm: RmsNorm,
    attention: SelfAttention,
    post_attention_layernorm: RmsNorm,
    mlp: FeedForward,
    /// Gemma: norms around the MLP; `post_attention_layernorm` then norms the attention's
    /// output instead of the MLP's input.
    feedforward_norms: Option<(RmsNorm, RmsNorm)>,
}

/// A layer's MLP: dense, or a mixture of experts.
#[derive(Debug, Clone)]
enum FeedForward {
    Dense(Mlp),
    Sparse(SparseMoe),
}

impl FeedForward {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(mlp) => mlp.forward(x),
            Self::Sparse(moe) => moe.forward(x),
        }
    }
}

impl Block {
    fn load(
        weights: &ShardTensors,
        layer: i32,
        config: &ModelConfig,
        variant: Variant,
        device: &Device,
    ) -> Result<Self> {
        let p = format!("model.layers.{layer}");
        let (hidden, eps) = (config.hidden_size, config.rms_norm_eps);
        let gemma = config.is_gemma();
        let norm = |name: &str| {
            RmsNorm::load(weights, &format!("{p}.{name}.weight"), hidden, eps, device)?.shifted(gemma)
        };
        let prefix = format!("{p}.self_attn");
        let attention = if config.is_deepseek() {
            SelfAttention::Latent(Box::new(LatentAttention::load(weights, &prefix, config, device)?))
        } else {
            let mut attention = Attention::load(weights, &prefix, config, variant, device)?;
            attention.window = sliding_window::of_layer(config, layer as usize);
            SelfAttention::Grouped(Box::new(attention))
        };
        Ok(Self {
            input_layernorm: norm("input_layernorm")?,
            attention,
            post_attention_layernorm: norm("post_attention_layernorm")?,
            mlp: match MoeSpec::of(config).map_err(Error::InvalidModel)? {
                Some(spec) if spec.is_sparse(layer as usize) => {
                    FeedForward::Sparse(SparseMoe::load(weights, &spec, layer as usize, hidden, device)?)
                }
                _ => FeedForward::Dense(Mlp::load(
                    weights,
                    &format!("{p}.mlp"),
                    config,
                    variant.mlp_bias,
                    device,
                )?),
            },
            feedforward_norms: if gemma {
                Some((norm("pre_feedforward_layernorm")?, norm("post_feedforward_layernorm")?))
            } else {
                None
            },
        })
    }

    fn forward(&self, x: &Tensor, parts: &mut [BatchPart], rope: &Rope, layer: usize) -> Result<Tensor> {
        let attended = self.attention.forward(&self.input_layernorm.forward(x)?, parts, rope, layer)?;
        if let Some((pre, post)) = &self.feedforward_norms {
            let x = (x + self.post_attention_layernorm.forward(&attended)?)?;
            let mlp = post.forward(&self.mlp.forward(&pre.forward(&x)?)?)?;
            return Ok((x + mlp)?);
        }
        let x = (x + attended)?;
        let mlp = self.mlp.forward(&self.post_attention_layernorm.forward(&x)?)?;
        Ok((x + mlp)?)
    }

    /// The layer holding projection `name` and its rows there (see [`ShardModel::projection`]).
    fn projection(&self, name: &str) -> Option<(&Linear, Range<usize>)> {
        let attention = match &self.attention {
            SelfAttention::Grouped(attention) => attention.projection(name),
            SelfAttention::Latent(_) => None,
        };
        let mlp = match &self.mlp {
            FeedForward::Dense(mlp) => mlp.projection(name),
            FeedForward::Sparse(_) => None,
        };
        attention.or(mlp)
    }

    /// [`Self::forward`], also giving each row's chosen experts in a sparse layer.
    fn forward_routed(
        &self,
        x: &Tensor,
        parts: &mut [BatchPart],
        rope: &Rope,
        layer: usize,
    ) -> Result<(Tensor, Option<Vec<Route>>)> {
        let FeedForward::Sparse(moe) = &self.mlp else {
            return Ok((self.forward(x, parts, rope, layer)?, None));
        };
        let attended = self.attention.forward(&self.input_layernorm.forward(x)?, parts, rope, layer)?;
        let x = (x + attended)?;
        let (mlp, routes) = moe.forward_routed(&self.post_attention_layernorm.forward(&x)?)?;
        Ok(((x + mlp)?, Some(routes)))
    }
}

/// What a shard consumes: token ids on the first shard, hidden states elsewhere.
pub enum ShardInput {
    /// Token ids `[batch, seq]` (u32).
    Tokens(Tensor),
    /// Hidden states `[batch, seq, hidden]` (f32).
    Hidden(Tensor),
}

/// One request's step in a batched pass.
pub struct BatchStep<'a> {
    /// Hidden states `[batch, seq, hidden]` entering the layers (see [`ShardModel::embed`]).
    pub hidden: Tensor,
    /// The request's cache, at the step's first position.
    pub cache: &'a mut RequestCache,
    /// On the last shard, whether the step's logits are needed (a prompt's chunks before
    /// its last need none).
    pub wants_logits: bool,
}

/// A step's rows inside the packed pass: their shape and the request's cache.
pub(super) struct BatchPart<'a> {
    /// `(batch, seq)`.
    pub(super) shape: (usize, usize),
    /// The request's cache, at the step's first position.
    pub(super) cache: &'a mut RequestCache,
    wants_logits: bool,
}

/// One shard of a decoder-only model, ready to run.
pub struct ShardModel {
    shard: Shard,
    config: ModelConfig,
    /// Rows looked up by token id; the hidden states then move to `device`.
    embed_tokens: Option<Embedding>,
    /// LLaVA's vision tower and projector, on the first shard.
    vision: Option<VisionTower>,
    blocks: Vec<Block>,
    norm: Option<RmsNorm>,
    lm_head: Option<Linear>,
    rope: Rope,
    /// Gemma 3: the RoPE of local layers (their own base).
    local_rope: Option<Rope>,
    /// Gemma's choices (embedding scale, logit cap, ...).
    gemma: Option<Gemma>,
    max_context: usize,
    /// Where the layers compute.
    device: Device,
    /// The opened checkpoint and the names of the shard's tensors in it (for saving).
    weights: ShardTensors,
    tensor_names: Vec<String>,
}

impl ShardModel {
    /// Loads `shard`'s layers from `checkpoint`, with room for `max_context` positions;
    /// safetensors weights have the LoRA adapter at `adapter` merged into them and are
    /// quantized to `quantize` as they load, if given.
    pub fn load(
        checkpoint: &Checkpoint,
        shard: &Shard,
        max_context: usize,
        device: &Device,
        quantize: Option<GgmlDType>,
        adapter: Option<&Path>,
    ) -> Result<Self> {
        shard.validate()?;
        let config = checkpoint.config()?;
        if shard.n_layers as usize != config.num_hidden_layers {
            return Err(Error::InvalidShard(format!(
                "shard says {} layers but the model has {}",
                shard.n_layers, config.num_hidden_layers
            )));
        }
        let variant = config.variant().map_err(Error::InvalidModel)?;
        let tied = head_is_tied(&config, checkpoint);
        let plan = TensorPlan::new(&config, shard, variant, tied);
        let tensor_names = plan.names();
        let adapter = adapter.map(|path| LoraMerge::load(path, shard).map(Arc::new)).transpose()?;
        let weights = checkpoint.open_shard(&tensor_names, &config, quantize, adapter.clone())?;
        let (vocab, hidden) = (config.vocab_size, config.hidden_size);
        // Looking tokens up reads a row each; as the LM head on the host the embedding streams
        // whole, on an accelerator the head is a device tensor of its own.
        let embed_tokens = if shard.is_first_layer() {
            let streamed = tied && shard.is_last_layer() && device.is_cpu() && quantize.is_none();
            Some(weights.embedding(vocab, hidden, streamed, device)?)
        } else {
            None
        };
        let vision = match (&embed_tokens, &config.llava) {
            (Some(_), Some(llava)) => Some(VisionTower::load(&weights, llava, hidden, device)?),
            _ => None,
        };
        // Layers load in parallel: each copies its matrices out of the checkpoint.
        let blocks = (shard.start_layer..=shard.end_layer)
            .into_par_iter()
            .map(|layer| Block::load(&weights, layer, &config, variant, device))
            .collect::<Result<Vec<_>>>()?;
        if let Some(adapter) = &adapter {
            adapter.check_all_merged()?;
        }
        let (norm, lm_head) = if shard.is_last_layer() {
            let head = weights.head(vocab, hidden, tied, embed_tokens.as_ref(), device)?;
            let norm = RmsNorm::load(&weights, "model.norm.weight", hidden, config.rms_norm_eps, device)?
                .shifted(config.is_gemma())?;
            (Some(norm), Some(head))
        } else {
            (None, None)
        };
        let max_context = max_context.min(config.max_position_embeddings);
        let rope = Rope::new(&config, max_context, device)?;
        let gemma = Gemma::new(&config);
        let local_rope = match gemma.as_ref().and_then(|g| g.local_rope_config(&config)) {
            Some(local) => Some(Rope::new(&local, max_context, device)?),
            None => None,
        };
        Ok(Self {
            shard: shard.clone(),
            config,
            embed_tokens,
            vision,
            blocks,
            norm,
            lm_head,
            rope,
            local_rope,
            gemma,
            max_context,
            device: device.clone(),
            weights,
            tensor_names,
        })
    }

    /// Writes the shard's tensors, as stored in the checkpoint, to the safetensors file `path`
    /// (for safetensors checkpoints).
    pub fn save(&self, path: &std::path::Path) -> Result<()> {
        match &self.weights {
            ShardTensors::Safetensors { weights, .. } => weights.save(&self.tensor_names, path),
            ShardTensors::Gguf(_) => Err(Error::InvalidArgument(
                "a shard loaded from a GGUF file cannot be saved as safetensors".into(),
            )),
        }
    }

    /// The model's config.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The rotary tables of the model.
    pub fn rope(&self) -> &Rope {
        &self.rope
    }

    /// The rotary tables `block` attends with: Gemma 3's local ones on its sliding-window layers.
    fn rope_of(&self, block: &Block) -> &Rope {
        match (&self.local_rope, block.attention.window()) {
            (Some(local), Some(_)) => local,
            _ => &self.rope,
        }
    }

    /// The float tensor `name` of `shape` widened to f32 on the host, for the training path: a
    /// vector (a norm, a bias) of any checkpoint, or a matrix of a float safetensors checkpoint
    /// loaded without --quantize ([`Self::is_float`]), with the inference adapter merged if one
    /// was given.
    pub fn dense(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        match (shape, &self.weights) {
            ([len], weights) => weights.vector_f32(name, *len, &Device::Cpu),
            ([rows, cols], ShardTensors::Safetensors { weights, adapter, .. }) if self.is_float(name) => {
                let names = [(name.to_string(), *rows)];
                let stored = weights.device_matrix(&names, *cols, &Device::Cpu)?;
                let merged = match adapter {
                    Some(adapter) if adapter.adapts(&names) => adapter.merge(&names, &stored)?,
                    _ => stored,
                };
                Ok(merged.to_dtype(DType::F32)?)
            }
            ([_, _], _) => Err(Error::InvalidArgument(format!(
                "{name} is a quantized weight: the training path multiplies it as stored"
            ))),
            _ => Err(Error::InvalidArgument(format!("{name}: tensors of shape {shape:?} are not weights"))),
        }
    }

    /// The float matrix `name` of `shape` as the checkpoint stores it (bytes read in place, and
    /// their dtype), for the training path to take without a copy; `None` where [`Self::dense`]
    /// must make it (the inference adapter merged into it) or it is no float weight.
    pub fn stored_matrix(&self, name: &str, shape: [usize; 2]) -> Result<Option<(&[u8], DType)>> {
        match &self.weights {
            ShardTensors::Safetensors { weights, adapter, .. } if self.is_float(name) => {
                if adapter.as_ref().is_some_and(|adapter| adapter.adapts(&[(name.to_string(), shape[0])])) {
                    return Ok(None);
                }
                Ok(Some(weights.stored_matrix(name, shape)?))
            }
            _ => Ok(None),
        }
    }

    /// Whether the training path copies the matrix `name` to f32 ([`Self::dense`]): a float
    /// weight of a safetensors checkpoint loaded without --quantize. It multiplies the others
    /// (GGUF, MLX-quantized, quantized at load) as the inference layers hold them.
    pub fn is_float(&self, name: &str) -> bool {
        matches!(&self.weights, ShardTensors::Safetensors { weights, quantize: None, .. } if !weights.is_affine(name))
    }

    /// The inference layer holding projection `name` (`q_proj`, ..., `down_proj`) of `layer`,
    /// and the rows of its weight that are `name`'s (q/k/v and gate/up are stacked).
    pub fn projection(&self, layer: i32, name: &str) -> Result<(&Linear, Range<usize>)> {
        let block = usize::try_from(layer - self.shard.start_layer).ok().and_then(|i| self.blocks.get(i));
        block.and_then(|block| block.projection(name)).ok_or_else(|| {
            Error::InvalidModel(format!("layer {layer} of {} has no projection {name}", self.shard.model_id))
        })
    }

    /// The LM head's layer, on the last shard.
    pub fn head(&self) -> Option<&Linear> {
        self.lm_head.as_ref()
    }

    /// The name of the LM head's weight: its own, or the embedding's when tied.
    pub fn head_name(&self) -> &'static str {
        if self.tensor_names.iter().any(|name| name == "lm_head.weight") {
            "lm_head.weight"
        } else {
            "model.embed_tokens.weight"
        }
    }

    /// The shard this model holds.
    pub fn shard(&self) -> &Shard {
        &self.shard
    }

    /// Positions a request's cache may hold.
    pub fn max_context(&self) -> usize {
        self.max_context
    }

    /// Number of local layers (one KV cache each).
    pub fn layer_count(&self) -> usize {
        self.blocks.len()
    }

    /// Runs the shard on `input` for the request whose state is `cache`; returns hidden
    /// states `[batch, seq, hidden]`, or on the last shard the logits of the last position
    /// `[batch, 1, vocab]`.
    pub fn forward(&self, input: ShardInput, cache: &mut RequestCache) -> Result<Tensor> {
        let hidden = self.embed(input)?;
        self.check_room(cache.position, hidden.dim(1)?)?;
        let mut outputs = self.forward_batch(vec![BatchStep { hidden, cache, wants_logits: true }])?;
        Ok(outputs.remove(0).expect("the one step wants its output"))
    }

    /// Runs the shard's layers on `input` for one request, as [`Self::forward`] does, and
    /// returns each local layer's routes (each row's chosen experts; `None` for dense layers).
    pub fn expert_routes(
        &self,
        input: ShardInput,
        cache: &mut RequestCache,
    ) -> Result<Vec<Option<Vec<Route>>>> {
        let hidden = self.embed(input)?;
        let (b, seq, width) = hidden.dims3()?;
        self.check_room(cache.position, seq)?;
        let mut x = hidden.reshape((1, b * seq, width))?;
        let mut parts = [BatchPart { shape: (b, seq), cache, wants_logits: false }];
        let mut routes = Vec::with_capacity(self.blocks.len());
        for (layer, block) in self.blocks.iter().enumerate() {
            let (next, layer_routes) = block.forward_routed(&x, &mut parts, self.rope_of(block), layer)?;
            x = next;
            routes.push(layer_routes);
        }
        parts[0].cache.position += seq;
        Ok(routes)
    }

    /// Runs the shard over whole sequences with no cache kept (an example, not a request):
    /// hidden states `[batch, seq, hidden]` out, or on the last shard the logits of every
    /// position `[batch, seq, vocab]`.
    pub fn forward_all_positions(&self, input: ShardInput) -> Result<Tensor> {
        let hidden = self.embed(input)?;
        let (b, seq, width) = hidden.dims3()?;
        self.check_room(0, seq)?;
        let mut cache = RequestCache::new(self.layer_count());
        let mut parts = [BatchPart { shape: (b, seq), cache: &mut cache, wants_logits: false }];
        let x = rayon::scope(|_| -> Result<Tensor> {
            let mut x = hidden.reshape((1, b * seq, width))?;
            for (layer, block) in self.blocks.iter().enumerate() {
                x = block.forward(&x, &mut parts, self.rope_of(block), layer)?;
            }
            Ok(x.reshape((b, seq, width))?)
        })?;
        match (&self.norm, &self.lm_head) {
            (Some(norm), Some(head)) => self.logits(norm, head, &x),
            _ => Ok(x),
        }
    }

    /// The last shard's logits of hidden states `x`: final norm, head, and Gemma's soft-cap.
    fn logits(&self, norm: &RmsNorm, head: &Linear, x: &Tensor) -> Result<Tensor> {
        let logits = head.forward(&norm.forward(x)?)?;
        match self.gemma.as_ref().and_then(|g| g.final_softcap) {
            Some(cap) => gemma::softcap(&logits, cap),
            None => Ok(logits),
        }
    }

    /// Fails when `seq` more positions after `position` would pass the context.
    pub fn check_room(&self, position: usize, seq: usize) -> Result<()> {
        if position + seq > self.max_context {
            return Err(Error::ContextOverflow(format!(
                "{} tokens exceed the context of {} tokens (raise it with --max-context or {})",
                position + seq,
                self.max_context,
                super::MAX_CONTEXT_ENV
            )));
        }
        Ok(())
    }

    /// Runs several requests' steps as one pass: all their rows go through each weight
    /// together (one matrix product per weight), and each step attends over its own cache.
    /// Returns, per step, its hidden states `[batch, seq, hidden]`, or on the last shard the
    /// logits of its last position `[batch, 1, vocab]` (`None` for steps that want none).
    pub fn forward_batch(&self, steps: Vec<BatchStep>) -> Result<Vec<Option<Tensor>>> {
        // On a thread of the kernels' pool, each matrix product starts at once and only one
        // more thread needs waking, instead of handing it over to sleeping threads and back.
        rayon::scope(|_| self.forward_in_pool(steps))
    }

    fn forward_in_pool(&self, steps: Vec<BatchStep>) -> Result<Vec<Option<Tensor>>> {
        let width = self.config.hidden_size;
        let mut rows = Vec::with_capacity(steps.len());
        let mut parts = Vec::with_capacity(steps.len());
        for step in steps {
            let (b, seq, _) = step.hidden.dims3()?;
            rows.push(step.hidden.reshape((1, b * seq, width))?);
            parts.push(BatchPart { shape: (b, seq), cache: step.cache, wants_logits: step.wants_logits });
        }
        let mut x = if rows.len() == 1 { rows.remove(0) } else { Tensor::cat(&rows, 1)? };
        for (layer, block) in self.blocks.iter().enumerate() {
            x = block.forward(&x, &mut parts, self.rope_of(block), layer)?;
        }
        let mut outputs = Vec::with_capacity(parts.len());
        let mut row = 0;
        for part in parts.iter_mut() {
            let (b, seq) = part.shape;
            part.cache.position += seq;
            part.cache.step_end = 0;
            outputs.push(x.narrow(1, row, b * seq)?.reshape((b, seq, width))?);
            row += b * seq;
        }
        let (Some(norm), Some(head)) = (&self.norm, &self.lm_head) else {
            return Ok(outputs.into_iter().map(Some).collect());
        };
        let wanted: Vec<usize> = (0..parts.len()).filter(|&i| parts[i].wants_logits).collect();
        if wanted.is_empty() {
            return Ok(vec![None; parts.len()]);
        }
        let lasts = wanted
            .iter()
            .map(|&i| Ok(outputs[i].narrow(1, parts[i].shape.1 - 1, 1)?))
            .collect::<Result<Vec<_>>>()?;
        let logits = self.logits(norm, head, &Tensor::cat(&lasts, 0)?)?;
        let mut results = vec![None; parts.len()];
        let mut at = 0;
        for i in wanted {
            results[i] = Some(logits.narrow(0, at, parts[i].shape.0)?);
            at += parts[i].shape.0;
        }
        Ok(results)
    }

    /// The first shard's hidden states `[1, seq, hidden]` for the prompt `ids` `[1, seq]` with
    /// images `pixels` `[n, channels, size, size]`: LLaVA's image features in place of its
    /// image tokens' embeddings.
    pub fn embed_with_images(&self, ids: &Tensor, pixels: &Tensor) -> Result<Tensor> {
        let tower = self.vision.as_ref().ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{} does not take images (not a LLaVA model's first shard)",
                self.shard.model_id
            ))
        })?;
        if ids.dims2()?.0 != 1 {
            return Err(Error::InvalidArgument("images go with one prompt at a time".into()));
        }
        let ids: Vec<u32> = ids.flatten_all()?.to_vec1()?;
        let image = tower.image_token_id();
        // The image token may lie past the embedding table: its rows are replaced anyway.
        let looked_up: Vec<u32> = ids.iter().map(|&id| if id == image { 0 } else { id }).collect();
        let rows = self.embed(ShardInput::Tokens(Tensor::new(looked_up, &Device::Cpu)?.unsqueeze(0)?))?;
        let features = tower.image_features(pixels)?;
        Ok(llava::merge(&rows.squeeze(0)?, &ids, image, &features)?.unsqueeze(0)?)
    }

    /// The hidden states `[batch, seq, hidden]` entering the shard's first layer: token ids
    /// looked up on the first shard, hidden states checked elsewhere.
    pub fn embed(&self, input: ShardInput) -> Result<Tensor> {
        match (input, &self.embed_tokens) {
            (ShardInput::Tokens(ids), Some(table)) => {
                let (b, seq) = ids.dims2()?;
                if seq == 0 {
                    return Err(Error::InvalidArgument("no tokens to run".into()));
                }
                let hidden = self.config.hidden_size;
                let ids: Vec<u32> = ids.flatten_all()?.to_vec1()?;
                if let Some(id) = ids.iter().find(|&&id| id as usize >= self.config.vocab_size) {
                    return Err(Error::InvalidArgument(format!(
                        "token id {id} is outside the vocabulary of {}",
                        self.config.vocab_size
                    )));
                }
                let rows = table.lookup(&ids)?.reshape((b, seq, hidden))?;
                let rows = match &self.gemma {
                    Some(gemma) => (rows * gemma.embed_scale as f64)?,
                    None => rows,
                };
                Ok(rows.to_device(&self.device)?)
            }
            (ShardInput::Hidden(h), None) => {
                let (_, seq, width) = h.dims3().map_err(|_| {
                    Error::InvalidArgument(format!(
                        "hidden states must be [batch, seq, hidden], got {:?}",
                        h.dims()
                    ))
                })?;
                if width != self.config.hidden_size || seq == 0 {
                    return Err(Error::InvalidArgument(format!(
                        "hidden states of shape {:?} do not fit hidden size {}",
                        h.dims(),
                        self.config.hidden_size
                    )));
                }
                Ok(h.to_dtype(DType::F32)?.to_device(&self.device)?)
            }
            (ShardInput::Tokens(_), None) => Err(Error::InvalidArgument(format!(
                "shard {}..={} starts mid-model and takes hidden states, not token ids",
                self.shard.start_layer, self.shard.end_layer
            ))),
            (ShardInput::Hidden(_), Some(_)) => {
                Err(Error::InvalidArgument("the first shard takes token ids, not hidden states".into()))
            }
        }
    }
}
