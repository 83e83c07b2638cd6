//! DeepSeek-V2 and V2-Lite (`model_type` `deepseek_v2`): the `config.json` fields and the
//! multi-head latent attention that set them apart (their routing is [`super::moe`]'s, their
//! YaRN rope [`super::yarn`]'s).
//!
//! Latent attention: each position's keys and values come from one compressed latent
//! (`kv_lora_rank` wide, RMS-normed) through `kv_b_proj`, plus one rope key
//! (`qk_rope_head_dim` wide) shared by all heads. The cache holds only those two per
//! position; `kv_b_proj` is folded into the queries and outputs instead of expanding the
//! cache: a head's `q_nope · (W_uk c)` is `(W_ukᵀ q_nope) · c`, and its output
//! `Σ p (W_uv c)` is `W_uv Σ p c`. Every head then attends over the one latent, as one
//! group of multi-query attention.

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Deserializer};

use super::config::ModelConfig;
use super::linear::Linear;
use super::model::{causal_mask, BatchPart, RmsNorm};
use super::rope::Rope;
use super::tensors::ShardTensors;
use crate::engine::kernels::dequantize_affine_row;
use crate::error::{Error, Result};

/// DeepSeek-V2's own `config.json` fields (absent from other families' configs).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct DeepseekFields {
    /// Width of the queries' low-rank bottleneck; null (V2-Lite) for a plain `q_proj`, absent
    /// for transformers' default of 1536.
    #[serde(default, deserialize_with = "present")]
    pub q_lora_rank: Option<Option<usize>>,
    /// Width of the compressed key/value latent (512 when absent).
    pub kv_lora_rank: Option<usize>,
    /// Per-head width of the keys and queries that are not rotated (128 when absent).
    pub qk_nope_head_dim: Option<usize>,
    /// Width of the rotated part of queries and of the shared rope key (64 when absent).
    pub qk_rope_head_dim: Option<usize>,
    /// Per-head width of the values (128 when absent).
    pub v_head_dim: Option<usize>,
    /// Experts every token goes through, as one MLP `n_shared_experts` times as wide (2).
    pub n_shared_experts: Option<usize>,
    /// Multiplier of the chosen experts' weights (1 when absent).
    pub routed_scaling_factor: Option<f64>,
    /// `greedy` (top-k of all experts) or `group_limited_greedy` (top-k within the best groups).
    pub topk_method: Option<String>,
    /// Groups the experts fall into, for `group_limited_greedy`.
    pub n_group: Option<usize>,
    /// Groups a token's experts may come from, for `group_limited_greedy`.
    pub topk_group: Option<usize>,
    /// Leading layers with a dense MLP (0 when absent).
    pub first_k_dense_replace: Option<usize>,
    /// How router logits become scores; only `softmax` (DeepSeek-V2's) is supported.
    pub scoring_func: Option<String>,
    /// DeepSeek's reference code makes every `moe_layer_freq`-th layer sparse; transformers
    /// ignores it, so only 1 is accepted.
    pub moe_layer_freq: Option<usize>,
    /// GGUF of llama.cpp's current converter: `kv_b_proj` is stored split per head, as
    /// `k_b_proj` (its key rows, transposed: `[heads, kv_lora_rank, nope]`) and `v_b_proj` (its
    /// value rows: `[heads, v, kv_lora_rank]`).
    #[serde(skip)]
    pub split_kv_b: bool,
}

/// A field that may be absent (`None`), null (`Some(None)`) or a number.
fn present<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> std::result::Result<Option<Option<usize>>, D::Error> {
    Option::<usize>::deserialize(deserializer).map(Some)
}

impl DeepseekFields {
    /// What the engine cannot run in a `deepseek_v2` config, if anything.
    pub fn validate(&self, config: &ModelConfig) -> std::result::Result<(), String> {
        if config.attention_bias == Some(true) {
            return Err("deepseek_v2 with attention_bias is not supported".into());
        }
        if let Some(scaling) = &config.rope_scaling {
            if !matches!(scaling.rope_type.as_str(), "yarn" | "default") {
                return Err(format!(
                    "rope_scaling type {:?} is not supported for deepseek_v2 (yarn is)",
                    scaling.rope_type
                ));
            }
        }
        let shape = LatentShape::of(config).expect("a deepseek_v2 config has a latent shape");
        if shape.kv_lora_rank == 0 || shape.v == 0 || shape.nope + shape.rope == 0 {
            return Err("kv_lora_rank, v_head_dim and the query/key head width must be positive".into());
        }
        if shape.q_lora_rank == Some(0) {
            return Err("q_lora_rank must be positive or null".into());
        }
        if shape.rope == 0 || !shape.rope.is_multiple_of(2) {
            return Err(format!("qk_rope_head_dim {} must be even and positive", shape.rope));
        }
        if let Some(other) = self.scoring_func.as_deref().filter(|f| *f != "softmax") {
            return Err(format!("scoring_func {other:?} is not supported (softmax is)"));
        }
        if self.moe_layer_freq.is_some_and(|f| f != 1) {
            return Err("moe_layer_freq other than 1 is not supported (transformers ignores it)".into());
        }
        if config.norm_topk_prob == Some(true) {
            return Err("deepseek_v2 with norm_topk_prob is not supported (transformers ignores it, \
                 DeepSeek's code renormalises; no released checkpoint sets it)"
                .into());
        }
        Ok(())
    }
}

/// The widths of a DeepSeek-V2 layer's latent attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LatentShape {
    /// Query heads (each also has its own keys and values, expanded from the latent).
    pub heads: usize,
    /// Width of the queries' bottleneck (`q_a_proj`, `q_b_proj`), if any.
    pub q_lora_rank: Option<usize>,
    /// Width of the compressed key/value latent.
    pub kv_lora_rank: usize,
    /// Per-head width of the unrotated query/key part.
    pub nope: usize,
    /// Width of the rotated query/key part.
    pub rope: usize,
    /// Per-head width of the values.
    pub v: usize,
    /// `kv_b_proj` is stored as `k_b_proj` and `v_b_proj` (see [`DeepseekFields::split_kv_b`]).
    pub split_kv_b: bool,
}

impl LatentShape {
    /// The shape of a `deepseek_v2` config's attention; `None` for other families.
    pub fn of(config: &ModelConfig) -> Option<Self> {
        if !config.is_deepseek() {
            return None;
        }
        let fields = &config.deepseek;
        Some(Self {
            heads: config.num_attention_heads,
            q_lora_rank: fields.q_lora_rank.unwrap_or(Some(1536)),
            kv_lora_rank: fields.kv_lora_rank.unwrap_or(512),
            nope: fields.qk_nope_head_dim.unwrap_or(128),
            rope: fields.qk_rope_head_dim.unwrap_or(64),
            v: fields.v_head_dim.unwrap_or(128),
            split_kv_b: fields.split_kv_b,
        })
    }

    /// Width of each head's queries and keys.
    fn qk_width(&self) -> usize {
        self.nope + self.rope
    }

    /// The attention's tensors under `prefix` (`model.layers.N.self_attn`) with their shapes.
    pub fn tensors(&self, prefix: &str, hidden: usize) -> Vec<(String, Vec<usize>)> {
        let q_out = self.heads * self.qk_width();
        let mut entries = match self.q_lora_rank {
            Some(rank) => vec![
                (format!("{prefix}.q_a_proj.weight"), vec![rank, hidden]),
                (format!("{prefix}.q_a_layernorm.weight"), vec![rank]),
                (format!("{prefix}.q_b_proj.weight"), vec![q_out, rank]),
            ],
            None => vec![(format!("{prefix}.q_proj.weight"), vec![q_out, hidden])],
        };
        entries.extend([
            (format!("{prefix}.kv_a_proj_with_mqa.weight"), vec![self.kv_lora_rank + self.rope, hidden]),
            (format!("{prefix}.kv_a_layernorm.weight"), vec![self.kv_lora_rank]),
        ]);
        if self.split_kv_b {
            entries.extend([
                (format!("{prefix}.k_b_proj.weight"), vec![self.heads, self.kv_lora_rank, self.nope]),
                (format!("{prefix}.v_b_proj.weight"), vec![self.heads, self.v, self.kv_lora_rank]),
            ]);
        } else {
            entries.push((
                format!("{prefix}.kv_b_proj.weight"),
                vec![self.heads * (self.nope + self.v), self.kv_lora_rank],
            ));
        }
        entries.push((format!("{prefix}.o_proj.weight"), vec![hidden, self.heads * self.v]));
        entries
    }

    /// Weights of the attention's projections (what a token reads).
    pub fn weights(&self, hidden: usize) -> usize {
        let matrices = self.tensors("", hidden).into_iter().filter(|(_, shape)| shape.len() >= 2);
        matrices.map(|(_, shape)| shape.iter().product::<usize>()).sum()
    }

    /// The softmax scale: `(nope + rope)^-0.5`, times YaRN's `mscale²` where configured.
    fn scale(&self, config: &ModelConfig) -> f64 {
        let plain = 1.0 / (self.qk_width() as f64).sqrt();
        match &config.rope_scaling {
            Some(scaling) if scaling.rope_type != "default" => {
                plain * super::yarn::softmax_scale_factor(scaling)
            }
            _ => plain,
        }
    }
}

/// One layer's multi-head latent attention, with `kv_b_proj` folded into queries and outputs.
#[derive(Debug, Clone)]
pub struct LatentAttention {
    /// `q_a_proj` (or `q_proj`) and `kv_a_proj_with_mqa`, which share their input.
    input_proj: Linear,
    /// `q_a_layernorm` and `q_b_proj` when the queries have a bottleneck.
    query_up: Option<(RmsNorm, Linear)>,
    kv_a_layernorm: RmsNorm,
    /// `kv_b_proj`'s key part per head, `[heads, nope, kv_lora_rank]` (f32).
    key_up: Tensor,
    /// `kv_b_proj`'s value part per head, transposed: `[heads, kv_lora_rank, v]` (f32).
    value_up: Tensor,
    o_proj: Linear,
    shape: LatentShape,
    scale: f64,
}

impl LatentAttention {
    /// Loads the attention under `prefix` (`model.layers.N.self_attn`).
    pub fn load(weights: &ShardTensors, prefix: &str, config: &ModelConfig, device: &Device) -> Result<Self> {
        let shape = LatentShape::of(config)
            .ok_or_else(|| Error::InvalidModel(format!("{} has no latent attention", config.model_type)))?;
        let (hidden, eps) = (config.hidden_size, config.rms_norm_eps);
        let kv_a = ("kv_a_proj_with_mqa", shape.kv_lora_rank + shape.rope);
        let q_out = shape.heads * shape.qk_width();
        let (input_proj, query_up) = match shape.q_lora_rank {
            Some(rank) => {
                let norm =
                    RmsNorm::load(weights, &format!("{prefix}.q_a_layernorm.weight"), rank, eps, device)?;
                let up = weights.linear(prefix, &[("q_b_proj", q_out)], rank, false, device)?;
                (
                    weights.linear(prefix, &[("q_a_proj", rank), kv_a], hidden, false, device)?,
                    Some((norm, up)),
                )
            }
            None => (weights.linear(prefix, &[("q_proj", q_out), kv_a], hidden, false, device)?, None),
        };
        let (key_up, value_up) = up_projections(weights, prefix, &shape, device)?;
        Ok(Self {
            input_proj,
            query_up,
            kv_a_layernorm: RmsNorm::load(
                weights,
                &format!("{prefix}.kv_a_layernorm.weight"),
                shape.kv_lora_rank,
                eps,
                device,
            )?,
            key_up,
            value_up,
            o_proj: weights.linear(prefix, &[("o_proj", hidden)], shape.heads * shape.v, false, device)?,
            shape,
            scale: shape.scale(config),
        })
    }

    /// `x` holds every part's rows packed as `[1, rows, hidden]`, part after part; each
    /// part attends over its own cache only.
    pub fn forward(&self, x: &Tensor, parts: &mut [BatchPart], rope: &Rope, layer: usize) -> Result<Tensor> {
        let shape = &self.shape;
        let q_width = shape.q_lora_rank.unwrap_or(shape.heads * shape.qk_width());
        let [q, kv]: [Tensor; 2] = self
            .input_proj
            .forward_parts(x, &[q_width, shape.kv_lora_rank + shape.rope])?
            .try_into()
            .expect("two parts were asked for");
        let q = match &self.query_up {
            Some((norm, up)) => up.forward(&norm.forward(&q)?)?,
            None => q,
        };
        let latent = self.kv_a_layernorm.forward(&kv.narrow(2, 0, shape.kv_lora_rank)?)?;
        let rope_key = kv.narrow(2, shape.kv_lora_rank, shape.rope)?;
        let mut outputs = Vec::with_capacity(parts.len());
        let mut row = 0;
        for part in parts.iter_mut() {
            let (b, seq) = part.shape;
            let rows = |t: &Tensor| -> Result<Tensor> { Ok(t.narrow(1, row, b * seq)?) };
            let out = self.attend(&rows(&q)?, &rows(&latent)?, &rows(&rope_key)?, part, rope, layer)?;
            outputs.push(out.reshape((1, b * seq, shape.heads * shape.v))?);
            row += b * seq;
        }
        let out = if outputs.len() == 1 { outputs.remove(0) } else { Tensor::cat(&outputs, 1)? };
        self.o_proj.forward(&out)
    }

    /// One part's attention: `q` `[1, b * seq, heads * (nope + rope)]`, `latent`
    /// `[1, b * seq, kv_lora_rank]` and `rope_key` `[1, b * seq, rope]` at positions
    /// `offset..offset + seq` of its cache; returns `[b, seq, heads * v]`.
    fn attend(
        &self,
        q: &Tensor,
        latent: &Tensor,
        rope_key: &Tensor,
        part: &mut BatchPart,
        rope: &Rope,
        layer: usize,
    ) -> Result<Tensor> {
        let s = &self.shape;
        let ((b, seq), offset) = (part.shape, part.cache.position);
        let end = part.cache.step_end.max(offset + seq);
        // (b, seq, heads, nope + rope) -> (b, heads, seq, nope + rope)
        let q = q.reshape((b, seq, s.heads, s.qk_width()))?.transpose(1, 2)?;
        let q_nope = q.narrow(3, 0, s.nope)?.contiguous()?;
        let q_rope = rope.apply_in_pass(&q.narrow(3, s.nope, s.rope)?, offset, end)?;
        // The cache's one "head": (b, 1, seq, width).
        let rope_key = rope.apply_in_pass(&rope_key.reshape((b, 1, seq, s.rope))?, offset, end)?;
        let latent = latent.reshape((b, 1, seq, s.kv_lora_rank))?;
        let (rope_keys, latents) = part.cache.append(layer, &rope_key, &latent)?;
        let total = latents.dim(2)?;
        // Queries in latent space: (b, heads, seq, nope) x (heads, nope, rank) -> (b, heads, seq, rank),
        // then every head's rows as one group: (b, 1, heads * seq, width).
        let q_latent =
            q_nope.broadcast_matmul(&self.key_up)?.reshape((b, 1, s.heads * seq, s.kv_lora_rank))?;
        let q_rope = q_rope.reshape((b, 1, s.heads * seq, s.rope))?;
        let scores = (q_latent.matmul(&latents.t()?)? + q_rope.matmul(&rope_keys.t()?)?)?;
        let scores = (scores * self.scale)?;
        let scores = match causal_mask(seq, offset, total, s.heads, q.device())? {
            Some(mask) => scores.broadcast_add(&mask)?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        // (b, 1, heads * seq, rank) -> (b, heads, seq, rank) x (heads, rank, v) -> (b, heads, seq, v)
        let out = probs.matmul(&latents.contiguous()?)?.reshape((b, s.heads, seq, s.kv_lora_rank))?;
        let out = out.broadcast_matmul(&self.value_up)?;
        Ok(out.transpose(1, 2)?.reshape((b, seq, s.heads * s.v))?)
    }
}

/// The weight `name` (`[rows, cols]`) as an f32 tensor on `device`, MLX's affine codes
/// decoded: what is folded into other products must be plain numbers.
/// `kv_b_proj`'s key part per head `[heads, nope, rank]` and its value part transposed
/// `[heads, rank, v]` (f32), from `kv_b_proj` or from llama.cpp's split of it.
fn up_projections(
    weights: &ShardTensors,
    prefix: &str,
    shape: &LatentShape,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let (heads, rank) = (shape.heads, shape.kv_lora_rank);
    if shape.split_kv_b {
        let k_b = weights.dequantized_f32(
            &format!("{prefix}.k_b_proj.weight"),
            &[heads, rank, shape.nope],
            device,
        )?;
        let v_b =
            weights.dequantized_f32(&format!("{prefix}.v_b_proj.weight"), &[heads, shape.v, rank], device)?;
        return Ok((k_b.transpose(1, 2)?.contiguous()?, v_b.transpose(1, 2)?.contiguous()?));
    }
    let kv_b = float_matrix(
        weights,
        &format!("{prefix}.kv_b_proj.weight"),
        heads * (shape.nope + shape.v),
        rank,
        device,
    )?;
    // (heads * (nope + v), rank) -> (heads, nope + v, rank), split into the key and value parts.
    let kv_b = kv_b.reshape((heads, shape.nope + shape.v, rank))?;
    Ok((
        kv_b.narrow(1, 0, shape.nope)?.contiguous()?,
        kv_b.narrow(1, shape.nope, shape.v)?.transpose(1, 2)?.contiguous()?,
    ))
}

fn float_matrix(
    weights: &ShardTensors,
    name: &str,
    rows: usize,
    cols: usize,
    device: &Device,
) -> Result<Tensor> {
    let ShardTensors::Safetensors { weights: stored, .. } = weights else {
        return weights.dequantized_f32(name, &[rows, cols], device);
    };
    if !stored.is_affine(name) {
        return Ok(stored.device_matrix(&[(name, rows)], cols, device)?.to_dtype(DType::F32)?);
    }
    let matrix = stored
        .affine_matrix(&[(name, rows)], cols, false)?
        .ok_or_else(|| Error::InvalidModel(format!("{name}: its quantization parameters do not fit")))?;
    let mut values = vec![0f32; rows * cols];
    for (row, out) in values.chunks_exact_mut(cols).enumerate() {
        dequantize_affine_row(&matrix, row, out);
    }
    Ok(Tensor::from_vec(values, (rows, cols), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> std::result::Result<ModelConfig, String> {
        let json = format!(
            r#"{{"model_type": "deepseek_v2", "hidden_size": 64, "intermediate_size": 128,
                "num_hidden_layers": 3, "num_attention_heads": 4, "vocab_size": 100, "rms_norm_eps": 1e-6,
                "max_position_embeddings": 256, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
                "qk_rope_head_dim": 8, "v_head_dim": 12, "n_routed_experts": 8, "num_experts_per_tok": 2,
                "moe_intermediate_size": 24 {extra}}}"#
        );
        serde_json::from_str::<ModelConfig>(&json).map_err(|e| e.to_string())?.checked()
    }

    #[test]
    fn null_q_lora_rank_is_a_plain_query_projection() {
        let lite = LatentShape::of(&config(r#", "q_lora_rank": null"#).unwrap()).unwrap();
        assert_eq!(lite.q_lora_rank, None);
        let names: Vec<String> = lite.tensors("a", 64).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names[0], "a.q_proj.weight");
        assert_eq!(lite.tensors("a", 64)[3], ("a.kv_b_proj.weight".to_string(), vec![4 * 28, 32]));
        let v2 = LatentShape::of(&config(r#", "q_lora_rank": 48"#).unwrap()).unwrap();
        assert_eq!(v2.tensors("a", 64)[2], ("a.q_b_proj.weight".to_string(), vec![4 * 24, 48]));
        // Absent means transformers' default bottleneck.
        assert_eq!(LatentShape::of(&config("").unwrap()).unwrap().q_lora_rank, Some(1536));
        assert_eq!(config("").unwrap().rotary_dim(), 8);
        assert_eq!(config("").unwrap().cache_values_per_position(), 40);
    }

    #[test]
    fn yarn_scales_the_softmax() {
        let yarn = r#", "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 64,
            "mscale": 0.707, "mscale_all_dim": 0.707}"#;
        let c = config(yarn).unwrap();
        let m = 0.1 * 0.707 * 40f64.ln() + 1.0;
        assert!((LatentShape::of(&c).unwrap().scale(&c) - m * m / 24f64.sqrt()).abs() < 1e-12);
        let c = config("").unwrap();
        assert_eq!(LatentShape::of(&c).unwrap().scale(&c), 1.0 / 24f64.sqrt());
    }

    #[test]
    fn unsupported_settings_are_named() {
        let err = config(r#", "moe_layer_freq": 2"#).unwrap_err();
        assert!(err.contains("moe_layer_freq"), "{err}");
        let err = config(r#", "norm_topk_prob": true"#).unwrap_err();
        assert!(err.contains("norm_topk_prob"), "{err}");
        let err = config(r#", "rope_scaling": {"type": "llama3", "factor": 8}"#).unwrap_err();
        assert!(err.contains("llama3"), "{err}");
        let err = config(r#", "scoring_func": "sigmoid""#).unwrap_err();
        assert!(err.contains("sigmoid"), "{err}");
        let err = config(r#", "qk_rope_head_dim": 7"#).unwrap_err();
        assert!(err.contains("qk_rope_head_dim"), "{err}");
    }
}
