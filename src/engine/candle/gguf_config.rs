//! The model config a GGUF file's metadata describes, per llama.cpp architecture, as the
//! `config.json` of the Hugging Face model it was converted from would give it. Where the
//! converter drops a field, the value is the one llama.cpp assumes: Gemma's query scale from
//! the head width (the hidden width per head in the 27B models), Gemma 3's local layers one in
//! six with RoPE base 10 000, Qwen3-MoE's chosen experts always renormalised, DeepSeek-V2's
//! YaRN `mscale` equal to its `mscale_all_dim` (as in the released configs).

use super::config::{DeepseekFields, ModelConfig, RopeScaling};
use super::gemma::GemmaFields;
use super::gguf::GgufFile;
use crate::error::Result;

/// The llama.cpp architectures the engine reads.
const ARCHITECTURES: &[&str] =
    &["llama", "qwen2", "qwen3", "qwen3moe", "phi3", "gemma2", "gemma3", "deepseek2"];

/// Layers of the Gemma models whose queries llama.cpp scales by `(hidden / heads)^-0.5`
/// rather than `head_dim^-0.5`: the 27B ones (`query_pre_attn_scalar` 144 and 168).
const GEMMA2_27B_LAYERS: usize = 46;
const GEMMA3_27B_LAYERS: usize = 62;

/// Gemma 3: every this many layers one is global (llama.cpp's fixed pattern).
const GEMMA3_PATTERN: usize = 6;

/// Gemma 3: the RoPE base of the local layers when the file names none.
const GEMMA3_LOCAL_ROPE_BASE: f64 = 10_000.0;

impl GgufFile {
    /// The model config the metadata describes, as `config.json` would give it; Llama 3's
    /// frequency scaling comes from the `rope_freqs.weight` tensor, Phi-3's LongRoPE factors
    /// from `rope_factors_{short,long}.weight`.
    pub fn config(&self) -> Result<ModelConfig> {
        let arch = self.architecture()?.to_string();
        if !ARCHITECTURES.contains(&arch.as_str()) {
            return Err(self.invalid(format!(
                "architecture {arch:?} is not supported ({}; mistral and mixtral as llama)",
                ARCHITECTURES.join(", ")
            )));
        }
        let base = self.base_config(&arch)?;
        let config = match arch.as_str() {
            "llama" => self.llama_config(base)?,
            "qwen3moe" => self.qwen3_moe_config(base)?,
            "phi3" => self.phi3_config(base)?,
            "gemma2" | "gemma3" => self.gemma_config(base)?,
            "deepseek2" => self.deepseek_config(base)?,
            _ => base,
        };
        config.checked().map_err(|e| self.invalid(e))
    }

    /// `{arch}.{name}`, the key of an architecture's own metadata.
    fn key(&self, name: &str) -> Result<String> {
        Ok(format!("{}.{name}", self.architecture()?))
    }

    /// The fields every architecture stores alike.
    fn base_config(&self, arch: &str) -> Result<ModelConfig> {
        let key = |name: &str| format!("{arch}.{name}");
        let embedding = self
            .tensor("token_embd.weight")
            .ok_or_else(|| self.invalid("tensor token_embd.weight is missing".into()))?;
        Ok(ModelConfig {
            model_type: arch.to_string(),
            hidden_size: self.required(&key("embedding_length"))?,
            intermediate_size: self.required(&key("feed_forward_length"))?,
            num_hidden_layers: self.required(&key("block_count"))?,
            num_attention_heads: self.required(&key("attention.head_count"))?,
            num_key_value_heads: self.integer(&key("attention.head_count_kv"))?,
            head_dim: self.integer(&key("attention.key_length"))?,
            // Rows of the embedding: Gemma 3's converter drops those past the tokenizer's.
            vocab_size: embedding.shape.first().copied().unwrap_or(0),
            rms_norm_eps: self.float(&key("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5),
            rope_theta: self.float(&key("rope.freq_base"))?.unwrap_or(10_000.0),
            rope_scaling: self.rope_scaling(arch)?,
            tie_word_embeddings: self.tensor("output.weight").is_none(),
            max_position_embeddings: self.required(&key("context_length"))?,
            attention_bias: Some(self.tensor("blk.0.attn_q.bias").is_some() && arch != "qwen2"),
            mlp_bias: false,
            hidden_act: "silu".into(),
            rope_freq_factors: match self.tensor("rope_freqs.weight") {
                Some(stored) => Some(self.f32_values("rope_freqs.weight", stored)?),
                None => None,
            },
            quantization: None,
            quantization_config: None,
            original_max_position_embeddings: None,
            partial_rotary_factor: None,
            sliding_window: None,
            num_experts: self.integer(&key("expert_count"))?,
            num_experts_per_tok: None,
            moe_intermediate_size: None,
            norm_topk_prob: None,
            decoder_sparse_step: None,
            mlp_only_layers: None,
            gemma: GemmaFields::default(),
            deepseek: DeepseekFields::default(),
            llava: None,
        })
    }

    /// `rope.scaling.type`: none, or linear with `rope.scaling.factor`.
    fn rope_scaling(&self, arch: &str) -> Result<Option<RopeScaling>> {
        match self.optional_string(&format!("{arch}.rope.scaling.type"))? {
            None | Some("none" | "") => Ok(None),
            Some("linear") => {
                let factor = self.float(&format!("{arch}.rope.scaling.factor"))?;
                let factor = factor
                    .ok_or_else(|| self.invalid(format!("metadata {arch}.rope.scaling.factor is missing")))?;
                Ok(Some(RopeScaling {
                    rope_type: "linear".into(),
                    given_factor: Some(factor),
                    ..Default::default()
                }))
            }
            Some("yarn") if arch == "deepseek2" => self.yarn_scaling(arch).map(Some),
            Some(other) => Err(self.invalid(format!("rope scaling {other:?} is not supported for {arch}"))),
        }
    }

    /// DeepSeek-V2's YaRN: llama.cpp keeps `0.1 * mscale_all_dim` as `yarn_log_multiplier`;
    /// `mscale` is taken to be the same (it is in every released DeepSeek-V2 config), so cos and
    /// sin keep their scale and the softmax scale takes `mscale_all_dim`'s.
    fn yarn_scaling(&self, arch: &str) -> Result<RopeScaling> {
        let key = |name: &str| format!("{arch}.rope.scaling.{name}");
        let factor = self.float(&key("factor"))?;
        let factor = factor.ok_or_else(|| self.invalid(format!("metadata {} is missing", key("factor"))))?;
        let mscale = self.float(&key("yarn_log_multiplier"))?.map(|multiplier| multiplier / 0.1);
        Ok(RopeScaling {
            rope_type: "yarn".into(),
            given_factor: Some(factor),
            original_max_position_embeddings: self.required(&key("original_context_length"))? as f64,
            beta_fast: self.float(&key("yarn_beta_fast"))?,
            beta_slow: self.float(&key("yarn_beta_slow"))?,
            mscale,
            mscale_all_dim: mscale,
            ..Default::default()
        })
    }

    /// DeepSeek-V2: the latent attention's widths (the heads' in the `_mla` keys of newer
    /// converters, whose `key_length` is the latent's; in `key_length`/`value_length` before),
    /// the leading dense layers, and the routing: groups, shared experts, scale, gating.
    fn deepseek_config(&self, base: ModelConfig) -> Result<ModelConfig> {
        let required = |name: &str| -> Result<usize> { self.required(&self.key(name)?) };
        let rope = required("rope.dimension_count")?;
        let (qk, v) = match self.integer(&self.key("attention.key_length_mla")?)? {
            Some(qk) => (qk, required("attention.value_length_mla")?),
            None => (required("attention.key_length")?, required("attention.value_length")?),
        };
        if qk <= rope {
            return Err(
                self.invalid(format!("heads of {qk} values cannot hold {rope} rotated ones and more"))
            );
        }
        let scoring = match self.integer(&self.key("expert_gating_func")?)? {
            None | Some(1) => "softmax".to_string(),
            Some(2) => "sigmoid".to_string(),
            Some(other) => format!("gating function {other}"),
        };
        let groups = self.integer(&self.key("expert_group_count")?)?.unwrap_or(1);
        let deepseek = DeepseekFields {
            q_lora_rank: Some(self.integer(&self.key("attention.q_lora_rank")?)?),
            kv_lora_rank: Some(required("attention.kv_lora_rank")?),
            qk_nope_head_dim: Some(qk - rope),
            qk_rope_head_dim: Some(rope),
            v_head_dim: Some(v),
            n_shared_experts: Some(self.integer(&self.key("expert_shared_count")?)?.unwrap_or(0)),
            routed_scaling_factor: self.float(&self.key("expert_weights_scale")?)?,
            topk_method: Some(if groups > 1 { "group_limited_greedy" } else { "greedy" }.into()),
            n_group: Some(groups),
            topk_group: self.integer(&self.key("expert_group_used_count")?)?,
            first_k_dense_replace: Some(self.integer(&self.key("leading_dense_block_count")?)?.unwrap_or(0)),
            scoring_func: Some(scoring),
            moe_layer_freq: None,
            split_kv_b: self.tensor("blk.0.attn_k_b.weight").is_some(),
        };
        Ok(ModelConfig {
            model_type: "deepseek_v2".into(),
            head_dim: None,
            num_key_value_heads: None,
            num_experts: Some(required("expert_count")?),
            num_experts_per_tok: Some(required("expert_used_count")?),
            moe_intermediate_size: Some(required("expert_feed_forward_length")?),
            norm_topk_prob: self.boolean(&self.key("expert_weights_norm")?)?,
            deepseek,
            ..base
        })
    }

    /// Llama, Mistral and Mixtral (the same architecture; experts when `expert_count` says so).
    fn llama_config(&self, base: ModelConfig) -> Result<ModelConfig> {
        if base.num_experts.unwrap_or(0) == 0 {
            return Ok(ModelConfig { num_experts: None, ..base });
        }
        Ok(ModelConfig {
            model_type: "mixtral".into(),
            num_experts_per_tok: Some(self.required(&self.key("expert_used_count")?)?),
            ..base
        })
    }

    /// Qwen3-MoE: every layer with a router is sparse (llama.cpp's own layout has no dense
    /// layers; a layer stored with a plain MLP and no router is one of `mlp_only_layers`).
    fn qwen3_moe_config(&self, base: ModelConfig) -> Result<ModelConfig> {
        let used = self.required(&self.key("expert_used_count")?)?;
        let width = match self.integer(&self.key("expert_feed_forward_length")?)? {
            Some(width) => width,
            // llama.cpp's width when the file gives none.
            None => base.intermediate_size / used.max(1),
        };
        let dense = (0..base.num_hidden_layers)
            .filter(|layer| {
                self.tensor(&format!("blk.{layer}.ffn_gate_inp.weight")).is_none()
                    && self.tensor(&format!("blk.{layer}.ffn_gate.weight")).is_some()
            })
            .collect();
        Ok(ModelConfig {
            model_type: "qwen3_moe".into(),
            num_experts: Some(self.required(&self.key("expert_count")?)?),
            num_experts_per_tok: Some(used),
            moe_intermediate_size: Some(width),
            norm_topk_prob: Some(true),
            decoder_sparse_step: Some(1),
            mlp_only_layers: Some(dense),
            ..base
        })
    }

    /// Phi-3, Phi-3.5 and Phi-4: the rotated width, the sliding window (0 for none, Phi-4's)
    /// and LongRoPE's factors and attention factor.
    fn phi3_config(&self, base: ModelConfig) -> Result<ModelConfig> {
        let head_dim = base.hidden_size / base.num_attention_heads.max(1);
        let rotary = self.integer(&self.key("rope.dimension_count")?)?.unwrap_or(head_dim);
        let partial = (rotary != head_dim).then(|| rotary as f64 / head_dim as f64);
        if partial.is_some_and(|factor| (head_dim as f64 * factor) as usize != rotary) {
            return Err(
                self.invalid(format!("a rotated width of {rotary} in heads of {head_dim} is not supported"))
            );
        }
        let longrope =
            match (self.tensor("rope_factors_short.weight"), self.tensor("rope_factors_long.weight")) {
                (None, None) => None,
                (Some(short), Some(long)) => Some(RopeScaling {
                    rope_type: "longrope".into(),
                    short_factor: Some(self.f32_values("rope_factors_short.weight", short)?),
                    long_factor: Some(self.f32_values("rope_factors_long.weight", long)?),
                    attention_factor: self.float(&self.key("rope.scaling.attn_factor")?)?,
                    ..Default::default()
                }),
                (Some(_), None) => {
                    return Err(self.invalid("tensor rope_factors_long.weight is missing".into()))
                }
                (None, Some(_)) => {
                    return Err(self.invalid("tensor rope_factors_short.weight is missing".into()))
                }
            };
        Ok(ModelConfig {
            model_type: "phi3".into(),
            head_dim: None,
            partial_rotary_factor: partial,
            original_max_position_embeddings: self
                .integer(&self.key("rope.scaling.original_context_length")?)?,
            sliding_window: self.integer(&self.key("attention.sliding_window")?)?.filter(|&w| w > 0),
            rope_scaling: longrope.or(base.rope_scaling.clone()),
            ..base
        })
    }

    /// Gemma 2 and 3: soft-capping, the sliding window and which layers have it, the query
    /// scale, and Gemma 3's local RoPE base.
    fn gemma_config(&self, base: ModelConfig) -> Result<ModelConfig> {
        let gemma3 = base.model_type == "gemma3";
        let big = base.num_hidden_layers == if gemma3 { GEMMA3_27B_LAYERS } else { GEMMA2_27B_LAYERS };
        let scalar = match big {
            true => base.hidden_size / base.num_attention_heads.max(1),
            false => base.head_dim(),
        };
        let window = self.integer(&self.key("attention.sliding_window")?)?;
        // Gemma 3 without a window (or with 0) attends globally in every layer.
        let all_global = gemma3 && window.unwrap_or(0) == 0;
        let gemma = GemmaFields {
            query_pre_attn_scalar: Some(scalar as f64),
            attn_logit_softcapping: self.float(&self.key("attn_logit_softcapping")?)?.map(Some),
            final_logit_softcapping: self.float(&self.key("final_logit_softcapping")?)?.map(Some),
            layer_types: all_global.then(|| vec!["full_attention".to_string(); base.num_hidden_layers]),
            sliding_window_pattern: gemma3.then_some(GEMMA3_PATTERN),
            rope_local_base_freq: match gemma3 {
                true => Some(self.float(&self.key("rope.freq_base_swa")?)?.unwrap_or(GEMMA3_LOCAL_ROPE_BASE)),
                false => None,
            },
            ..GemmaFields::default()
        };
        Ok(ModelConfig {
            model_type: if gemma3 { "gemma3_text" } else { "gemma2" }.into(),
            sliding_window: window.filter(|&w| w > 0),
            gemma,
            ..base
        })
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    use candle_core::{DType, Device, Tensor};

    use super::*;

    /// A GGUF of `arch` with the hyperparameters of a tiny model (and `extra`), an embedding
    /// and `tensors` (name and length of F32 vectors), read back as its config.
    fn config_of(
        arch: &str,
        layers: u32,
        extra: &[(&str, gguf_file::Value)],
        tensors: &[(&str, usize)],
    ) -> Result<ModelConfig> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let key = |name: &str| format!("{arch}.{name}");
        let mut metadata = vec![
            ("general.architecture".to_string(), gguf_file::Value::String(arch.into())),
            (key("block_count"), gguf_file::Value::U32(layers)),
            (key("context_length"), gguf_file::Value::U32(256)),
            (key("embedding_length"), gguf_file::Value::U32(64)),
            (key("feed_forward_length"), gguf_file::Value::U32(128)),
            (key("attention.head_count"), gguf_file::Value::U32(4)),
            (key("attention.head_count_kv"), gguf_file::Value::U32(2)),
        ];
        metadata.extend(extra.iter().map(|(name, value)| (key(name), value.clone())));
        let vector = |len: usize| {
            QTensor::quantize(&Tensor::ones(len, DType::F32, &Device::Cpu).unwrap(), GgmlDType::F32)
        };
        let embedding =
            QTensor::quantize(&Tensor::zeros((10, 64), DType::F32, &Device::Cpu).unwrap(), GgmlDType::F32);
        let mut stored = vec![("token_embd.weight".to_string(), embedding.unwrap())];
        stored.extend(tensors.iter().map(|(name, len)| (name.to_string(), vector(*len).unwrap())));
        let metadata: Vec<(&str, &gguf_file::Value)> =
            metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let stored: Vec<(&str, &QTensor)> = stored.iter().map(|(n, t)| (n.as_str(), t)).collect();
        gguf_file::write(&mut std::fs::File::create(&path).unwrap(), &metadata, &stored).unwrap();
        GgufFile::open(&path)?.config()
    }

    #[test]
    fn gemma_takes_llama_cpps_query_scale_and_layer_pattern() {
        let window = [("attention.sliding_window", gguf_file::Value::U32(16))];
        let gemma2 = config_of("gemma2", 2, &window, &[]).unwrap();
        assert_eq!(gemma2.model_type, "gemma2");
        // Without key_length the head is 64 / 4 wide; the 27B's 46 layers take hidden / heads.
        assert_eq!(gemma2.gemma.query_pre_attn_scalar, Some(16.0));
        assert_eq!(gemma2.sliding_window, Some(16));
        let key_length = [("attention.key_length", gguf_file::Value::U32(32))];
        let big = config_of("gemma2", 46, &key_length, &[]).unwrap();
        assert_eq!((big.head_dim(), big.gemma.query_pre_attn_scalar), (32, Some(16.0)));
        let gemma3 = config_of("gemma3", 7, &[window[0].clone(), key_length[0].clone()], &[]).unwrap();
        assert_eq!(gemma3.model_type, "gemma3_text");
        assert_eq!(gemma3.gemma.query_pre_attn_scalar, Some(32.0));
        assert_eq!(gemma3.gemma.sliding_window_pattern, Some(6));
        assert_eq!(gemma3.gemma.rope_local_base_freq, Some(10_000.0));
        // Without a window every layer is global.
        let global = config_of("gemma3", 2, &[], &[]).unwrap();
        assert_eq!(global.gemma.layer_types.unwrap(), ["full_attention", "full_attention"]);
    }

    #[test]
    fn phi3_reads_its_rotated_width_window_and_longrope() {
        let extra = [
            ("rope.dimension_count", gguf_file::Value::U32(12)),
            ("attention.sliding_window", gguf_file::Value::U32(0)),
            ("rope.scaling.original_context_length", gguf_file::Value::U32(32)),
            ("rope.scaling.attn_factor", gguf_file::Value::F32(1.25)),
        ];
        let factors = [("rope_factors_long.weight", 6), ("rope_factors_short.weight", 6)];
        let phi3 = config_of("phi3", 2, &extra, &factors).unwrap();
        assert_eq!((phi3.rotary_dim(), phi3.sliding_window), (12, None));
        assert_eq!(phi3.original_max_position_embeddings, Some(32));
        let scaling = phi3.rope_scaling.unwrap();
        assert_eq!((scaling.rope_type.as_str(), scaling.attention_factor), ("longrope", Some(1.25)));
        assert_eq!(scaling.long_factor.unwrap(), [1.0; 6]);
        // Factors for another width are named.
        let error = config_of(
            "phi3",
            2,
            &extra,
            &[("rope_factors_long.weight", 4), ("rope_factors_short.weight", 4)],
        );
        assert!(error.unwrap_err().to_string().contains("6 values"));
    }

    #[test]
    fn experts_make_mixtral_and_qwen3_moe() {
        let counts =
            [("expert_count", gguf_file::Value::U32(8)), ("expert_used_count", gguf_file::Value::U32(2))];
        let mixtral = config_of("llama", 2, &counts, &[]).unwrap();
        assert_eq!(
            (mixtral.model_type.as_str(), mixtral.num_experts, mixtral.num_experts_per_tok),
            ("mixtral", Some(8), Some(2))
        );
        let llama = config_of("llama", 2, &[("expert_count", gguf_file::Value::U32(0))], &[]).unwrap();
        assert_eq!((llama.model_type.as_str(), llama.num_experts), ("llama", None));
        let width =
            [counts[0].clone(), counts[1].clone(), ("expert_feed_forward_length", gguf_file::Value::U32(32))];
        // Layer 1 has a plain MLP and no router: one of Qwen3-MoE's dense layers.
        let moe = config_of("qwen3moe", 2, &width, &[("blk.1.ffn_gate.weight", 4)]).unwrap();
        assert_eq!(moe.model_type, "qwen3_moe");
        assert_eq!((moe.moe_intermediate_size, moe.norm_topk_prob), (Some(32), Some(true)));
        assert_eq!(moe.mlp_only_layers.unwrap(), [1]);
        let error = config_of("qwen3moe", 2, &counts[..1], &[]).unwrap_err().to_string();
        assert!(error.contains("metadata qwen3moe.expert_used_count is missing"), "{error}");
    }

    #[test]
    fn deepseek2_reads_its_latent_widths_routing_and_yarn() {
        let u32 = gguf_file::Value::U32;
        let extra = [
            ("attention.kv_lora_rank", u32(32)),
            ("attention.key_length", u32(40)),
            ("attention.value_length", u32(32)),
            ("attention.key_length_mla", u32(24)),
            ("attention.value_length_mla", u32(16)),
            ("rope.dimension_count", u32(8)),
            ("leading_dense_block_count", u32(1)),
            ("expert_count", u32(16)),
            ("expert_used_count", u32(3)),
            ("expert_shared_count", u32(2)),
            ("expert_feed_forward_length", u32(32)),
            ("expert_group_count", u32(8)),
            ("expert_group_used_count", u32(2)),
            ("expert_weights_scale", gguf_file::Value::F32(16.0)),
            ("rope.scaling.type", gguf_file::Value::String("yarn".into())),
            ("rope.scaling.factor", gguf_file::Value::F32(40.0)),
            ("rope.scaling.original_context_length", u32(4096)),
            ("rope.scaling.yarn_log_multiplier", gguf_file::Value::F32(0.0707)),
        ];
        let config = config_of("deepseek2", 2, &extra, &[("blk.0.attn_k_b.weight", 4)]).unwrap();
        let fields = &config.deepseek;
        assert_eq!(config.model_type, "deepseek_v2");
        assert_eq!((fields.kv_lora_rank, fields.q_lora_rank), (Some(32), Some(None)));
        assert_eq!(
            (fields.qk_nope_head_dim, fields.qk_rope_head_dim, fields.v_head_dim),
            (Some(16), Some(8), Some(16))
        );
        assert_eq!(
            (fields.n_group, fields.topk_group, fields.topk_method.as_deref()),
            (Some(8), Some(2), Some("group_limited_greedy"))
        );
        assert_eq!(
            (fields.first_k_dense_replace, fields.n_shared_experts, fields.routed_scaling_factor),
            (Some(1), Some(2), Some(16.0))
        );
        assert!(fields.split_kv_b);
        let yarn = config.rope_scaling.unwrap();
        assert_eq!(
            (yarn.rope_type.as_str(), yarn.factor(), yarn.original_max_position_embeddings),
            ("yarn", 40.0, 4096.0)
        );
        assert!((yarn.mscale_all_dim.unwrap() - 0.707).abs() < 1e-6 && yarn.mscale == yarn.mscale_all_dim);
        let sigmoid = [&extra[..], &[("expert_gating_func", u32(2))]].concat();
        let error = config_of("deepseek2", 2, &sigmoid, &[]).unwrap_err().to_string();
        assert!(error.contains("scoring_func \"sigmoid\" is not supported"), "{error}");
    }

    #[test]
    fn unsupported_architectures_and_scalings_are_named() {
        let error = config_of("gpt2", 2, &[], &[]).unwrap_err().to_string();
        assert!(error.contains("architecture \"gpt2\" is not supported"), "{error}");
        let yarn = [("rope.scaling.type", gguf_file::Value::String("yarn".into()))];
        let error = config_of("qwen3", 2, &yarn, &[]).unwrap_err().to_string();
        assert!(error.contains("rope scaling \"yarn\" is not supported for qwen3"), "{error}");
        let linear = [
            ("rope.scaling.type", gguf_file::Value::String("linear".into())),
            ("rope.scaling.factor", gguf_file::Value::F32(8.0)),
        ];
        let scaled = config_of("gemma3", 2, &linear, &[]).unwrap().rope_scaling.unwrap();
        assert_eq!((scaled.rope_type.as_str(), scaled.factor()), ("linear", 8.0));
    }
}
