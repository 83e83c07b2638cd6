//! `config.json` of the decoder-only architectures the candle engine runs, and the
//! per-family choices (biases, q/k norms) derived from it.

use std::path::Path;

use serde::Deserialize;

pub use super::deepseek::DeepseekFields;
pub use super::gemma::GemmaFields;
pub use super::llava::LlavaConfig;
use crate::error::{Error, Result};
use crate::file_limits::{read_limited, CONFIG_FILE_LIMIT};
use crate::topology::ModelCosts;

/// The `model_type`s of `config.json` the engine runs; [`ModelConfig::variant`] knows each but
/// `llava`, whose decoder's own config (`text_config`) is a Llama's.
pub const MODEL_TYPES: &[&str] = &[
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "phi3",
    "qwen3_moe",
    "mixtral",
    "gemma2",
    "gemma3_text",
    "deepseek_v2",
    "llava",
];

/// Largest width, vocabulary or rank a config may give (released models stay below 300,000).
const MAX_WIDTH: usize = 1 << 20;
/// Largest count of layers, heads, experts or per-head width a config may give (released
/// models stay below 1,000). With [`MAX_WIDTH`] this keeps every weight's byte count, and the
/// memory estimates summed from them, far inside 64 bits.
const MAX_COUNT: usize = 1 << 12;

/// RoPE frequency scaling as `config.json`'s `rope_scaling` gives it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct RopeScaling {
    /// `rope_type` (newer configs) or `type` (older ones).
    #[serde(alias = "type")]
    pub rope_type: String,
    /// Context extension factor, as given ([`RopeScaling::factor`] reads it); LongRoPE
    /// derives it from the context's growth when absent.
    #[serde(rename = "factor")]
    pub given_factor: Option<f64>,
    /// Llama 3: wavelengths above `original / low_freq_factor` are divided by `factor`.
    #[serde(default = "one")]
    pub low_freq_factor: f64,
    /// Llama 3: wavelengths below `original / high_freq_factor` are kept.
    #[serde(default = "four")]
    pub high_freq_factor: f64,
    /// Llama 3: context length the model was pre-trained with.
    #[serde(default = "original_context")]
    pub original_max_position_embeddings: f64,
    /// LongRoPE (`longrope`, formerly `su`): per-frequency divisors within the original context.
    pub short_factor: Option<Vec<f32>>,
    /// LongRoPE: per-frequency divisors once a pass reaches past the original context.
    pub long_factor: Option<Vec<f32>>,
    /// LongRoPE: multiplier of cos and sin; derived from the context extension when absent.
    pub attention_factor: Option<f64>,
    /// Fraction of each head's width that is rotated (overrides the config's own).
    pub partial_rotary_factor: Option<f64>,
    /// YaRN: rotations over the original context below which a dimension is extrapolated (32).
    pub beta_fast: Option<f64>,
    /// YaRN: rotations over the original context above which a dimension is interpolated (1).
    pub beta_slow: Option<f64>,
    /// YaRN: the numerator's coefficient of the cos/sin factor.
    pub mscale: Option<f64>,
    /// YaRN: the denominator's coefficient, and DeepSeek's softmax scale's.
    pub mscale_all_dim: Option<f64>,
    /// YaRN: whether the ramp's ends are rounded to whole dimensions (true when absent).
    pub truncate: Option<bool>,
}

/// A `rope_scaling` entry with no type and every other field as an absent key reads.
impl Default for RopeScaling {
    fn default() -> Self {
        Self {
            rope_type: String::new(),
            given_factor: None,
            low_freq_factor: one(),
            high_freq_factor: four(),
            original_max_position_embeddings: original_context(),
            short_factor: None,
            long_factor: None,
            attention_factor: None,
            partial_rotary_factor: None,
            beta_fast: None,
            beta_slow: None,
            mscale: None,
            mscale_all_dim: None,
            truncate: None,
        }
    }
}

impl RopeScaling {
    /// The context extension factor (1 when the config gives none).
    pub fn factor(&self) -> f64 {
        self.given_factor.unwrap_or(1.0)
    }
}

fn one() -> f64 {
    1.0
}

fn four() -> f64 {
    4.0
}

fn original_context() -> f64 {
    8192.0
}

fn default_rope_theta() -> f64 {
    10_000.0
}

fn default_act() -> String {
    "silu".into()
}

/// The fields of a Hugging Face `config.json` that the decoder needs.
#[derive(Debug, Clone, Deserialize)]
pub struct ModelConfig {
    /// `llama`, `mistral`, `qwen2`, `qwen3`, ... (a LLaVA's decoder's: `llama`).
    pub model_type: String,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP's hidden layer.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention); defaults to the query heads.
    pub num_key_value_heads: Option<usize>,
    /// Per-head width; defaults to `hidden_size / num_attention_heads`.
    pub head_dim: Option<usize>,
    /// Rows of the embedding and the LM head.
    pub vocab_size: usize,
    /// Epsilon of every RMS norm.
    pub rms_norm_eps: f64,
    /// RoPE base.
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// RoPE frequency scaling, if any.
    pub rope_scaling: Option<RopeScaling>,
    /// Whether the LM head reuses the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Longest context the model supports.
    pub max_position_embeddings: usize,
    /// Biases on the attention projections (Llama, Qwen3); Qwen2 always has q/k/v biases.
    pub attention_bias: Option<bool>,
    /// Biases on the MLP projections (Llama).
    #[serde(default)]
    pub mlp_bias: bool,
    /// Activation of the gated MLP; only `silu` is supported.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Per-frequency divisors of the RoPE frequencies, as a GGUF's `rope_freqs.weight` gives
    /// Llama 3's scaling (`config.json` gives it as `rope_scaling` instead).
    #[serde(skip)]
    pub rope_freq_factors: Option<Vec<f32>>,
    /// MLX's quantization of the weights, if any (each weight's width and group size are read
    /// from its tensors' shapes).
    pub quantization: Option<Quantization>,
    /// Another tool's quantization (mlx-lm repeats its own here).
    pub quantization_config: Option<Quantization>,
    /// Phi-3: context length of pre-training, past which LongRoPE's long factors apply.
    pub original_max_position_embeddings: Option<usize>,
    /// Fraction of each head's width that is rotated (Phi-4-mini); the rest passes through.
    pub partial_rotary_factor: Option<f64>,
    /// Positions a query sees, itself included: in every layer of Phi-3, in Gemma's local
    /// layers (see [`super::sliding_window`]); other families ignore it.
    pub sliding_window: Option<usize>,
    /// Mixture of experts: experts per sparse layer (`num_experts` of Qwen3-MoE,
    /// `num_local_experts` of Mixtral, `n_routed_experts` of DeepSeek-V2).
    #[serde(alias = "num_local_experts", alias = "n_routed_experts")]
    pub num_experts: Option<usize>,
    /// Mixture of experts: experts each token is routed to.
    pub num_experts_per_tok: Option<usize>,
    /// Mixture of experts: width of each expert's hidden layer (Qwen3-MoE; Mixtral's experts
    /// use `intermediate_size`).
    pub moe_intermediate_size: Option<usize>,
    /// Mixture of experts: whether the chosen experts' weights are renormalised to sum to one
    /// (Qwen3-MoE; Mixtral always renormalises).
    pub norm_topk_prob: Option<bool>,
    /// Qwen3-MoE: every `decoder_sparse_step`-th layer is sparse, the others dense.
    pub decoder_sparse_step: Option<usize>,
    /// Qwen3-MoE: layers with a dense MLP whatever `decoder_sparse_step` says.
    pub mlp_only_layers: Option<Vec<usize>>,
    /// Gemma 2 and 3's own fields (soft-capping, sliding windows, ...).
    #[serde(flatten)]
    pub gemma: GemmaFields,
    /// DeepSeek-V2's own fields (latent attention, grouped routing, ...).
    #[serde(flatten)]
    pub deepseek: DeepseekFields,
    /// LLaVA's vision tower and projector; the fields above are then its decoder's.
    #[serde(skip)]
    pub llava: Option<LlavaConfig>,
}

/// The `quantization` (MLX) or `quantization_config` (other tools) entry of `config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct Quantization {
    /// MLX's scheme (`affine` when absent); the engine reads only affine codes.
    pub mode: Option<String>,
    /// The quantizing tool of Hugging Face checkpoints (`gptq`, `awq`, `bitsandbytes`, ...),
    /// none of which the engine reads.
    pub quant_method: Option<String>,
}

/// Which projections carry biases and whether queries/keys are normalized per head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Variant {
    /// q, k and v projections have biases.
    pub qkv_bias: bool,
    /// The output projection has a bias.
    pub o_bias: bool,
    /// The MLP projections have biases.
    pub mlp_bias: bool,
    /// RMS norms on each head's queries and keys before RoPE (Qwen3).
    pub qk_norm: bool,
}

impl ModelConfig {
    /// Reads and checks `config.json` from a model directory.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = read_limited(&path, CONFIG_FILE_LIMIT)
            .map_err(|e| Error::InvalidModel(format!("cannot read {}: {e}", path.display())))?;
        Self::from_json(&text).map_err(|e| Error::InvalidModel(format!("{}: {e}", path.display())))
    }

    /// Parses and checks the text of a `config.json` (a LLaVA's decoder fields read from its
    /// `text_config`).
    pub fn from_json(text: &str) -> std::result::Result<Self, String> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("not a valid model config: {e}"))?;
        let (decoder, llava) = super::llava::split_config(value)?;
        let mut config: Self =
            serde_json::from_value(decoder).map_err(|e| format!("not a valid model config: {e}"))?;
        config.llava = llava;
        config.checked()
    }

    /// The config if the engine can run it, else what is wrong with it.
    pub fn checked(self) -> std::result::Result<Self, String> {
        self.validate()?;
        Ok(self)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        self.variant()?;
        self.validate_sizes()?;
        if self.is_gemma() {
            self.gemma.validate(self.num_hidden_layers)?;
        } else if self.hidden_act != "silu" {
            return Err(format!("hidden_act {:?} is not supported (only silu)", self.hidden_act));
        }
        for quantization in self.quantization.iter().chain(&self.quantization_config) {
            if let Some(method) = &quantization.quant_method {
                return Err(format!(
                    "weights quantized by {method:?} are not supported (MLX's affine quantization and GGUF are)"
                ));
            }
            if let Some(mode) = quantization.mode.as_deref().filter(|mode| *mode != "affine") {
                return Err(format!("MLX quantization mode {mode:?} is not supported (only affine)"));
            }
        }
        if self.sliding_window == Some(0) {
            return Err("sliding_window must be positive".into());
        }
        if self.model_type == "phi3" {
            super::phi3::validate_rope(self)?;
        } else if self.is_deepseek() {
            self.deepseek.validate(self)?;
        } else if let Some(scaling) = &self.rope_scaling {
            if !matches!(scaling.rope_type.as_str(), "llama3" | "linear" | "default") {
                return Err(format!("rope_scaling type {:?} is not supported", scaling.rope_type));
            }
        }
        let heads = self.num_attention_heads;
        if heads == 0 || self.num_key_value_heads() == 0 || !heads.is_multiple_of(self.num_key_value_heads())
        {
            return Err(format!(
                "{heads} attention heads cannot be shared by {} key/value heads",
                self.num_key_value_heads()
            ));
        }
        if self.head_dim() == 0 || !self.head_dim().is_multiple_of(2) {
            return Err(format!("head_dim {} must be even and positive", self.head_dim()));
        }
        if self.num_hidden_layers == 0 || self.vocab_size == 0 || self.hidden_size == 0 {
            return Err("num_hidden_layers, vocab_size and hidden_size must be positive".into());
        }
        super::moe::MoeSpec::of(self)?;
        Ok(())
    }

    /// Every size within [`MAX_WIDTH`] or [`MAX_COUNT`], so a crafted config cannot make the
    /// engine allocate or multiply past what any machine holds.
    fn validate_sizes(&self) -> std::result::Result<(), String> {
        let deepseek = &self.deepseek;
        let widths = [
            ("hidden_size", Some(self.hidden_size)),
            ("intermediate_size", Some(self.intermediate_size)),
            ("vocab_size", Some(self.vocab_size)),
            ("moe_intermediate_size", self.moe_intermediate_size),
            ("kv_lora_rank", deepseek.kv_lora_rank),
            ("q_lora_rank", deepseek.q_lora_rank.flatten()),
        ];
        let counts = [
            ("num_hidden_layers", Some(self.num_hidden_layers)),
            ("num_attention_heads", Some(self.num_attention_heads)),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", Some(self.head_dim())),
            ("num_experts", self.num_experts),
            ("num_experts_per_tok", self.num_experts_per_tok),
            ("n_shared_experts", deepseek.n_shared_experts),
            ("qk_nope_head_dim", deepseek.qk_nope_head_dim),
            ("qk_rope_head_dim", deepseek.qk_rope_head_dim),
            ("v_head_dim", deepseek.v_head_dim),
            ("n_group", deepseek.n_group),
            ("topk_group", deepseek.topk_group),
            ("first_k_dense_replace", deepseek.first_k_dense_replace),
        ];
        let too_big = |fields: &[(&str, Option<usize>)], limit: usize| {
            fields.iter().find_map(|&(name, value)| {
                value.filter(|&v| v > limit).map(|v| format!("{name} {v} exceeds the limit of {limit}"))
            })
        };
        if let Some(error) = too_big(&widths, MAX_WIDTH).or_else(|| too_big(&counts, MAX_COUNT)) {
            return Err(error);
        }
        let rotated =
            self.rope_scaling.as_ref().and_then(|s| s.partial_rotary_factor).or(self.partial_rotary_factor);
        if let Some(factor) = rotated.filter(|f| !(*f > 0.0 && *f <= 1.0)) {
            return Err(format!("partial_rotary_factor {factor} must be in (0, 1]"));
        }
        Ok(())
    }

    /// The family's choices for this config, or an error for an unsupported `model_type`.
    pub fn variant(&self) -> std::result::Result<Variant, String> {
        let attention_bias = self.attention_bias.unwrap_or(false);
        match self.model_type.as_str() {
            "llama" | "mistral" | "mixtral" => Ok(Variant {
                qkv_bias: attention_bias,
                o_bias: attention_bias,
                mlp_bias: self.mlp_bias,
                qk_norm: false,
            }),
            "qwen2" => Ok(Variant { qkv_bias: true, o_bias: false, mlp_bias: false, qk_norm: false }),
            "qwen3" | "qwen3_moe" => Ok(Variant {
                qkv_bias: attention_bias,
                o_bias: attention_bias,
                mlp_bias: false,
                qk_norm: true,
            }),
            "phi3" | "deepseek_v2" => {
                Ok(Variant { qkv_bias: false, o_bias: false, mlp_bias: false, qk_norm: false })
            }
            "gemma2" | "gemma3_text" => Ok(Variant {
                qkv_bias: attention_bias,
                o_bias: attention_bias,
                mlp_bias: false,
                qk_norm: self.model_type == "gemma3_text",
            }),
            other => Err(format!("model_type {other:?} is not supported ({})", MODEL_TYPES.join(", "))),
        }
    }

    /// Gemma 2 or Gemma 3 (text): the layout and arithmetic of [`super::gemma`].
    pub fn is_gemma(&self) -> bool {
        matches!(self.model_type.as_str(), "gemma2" | "gemma3_text")
    }

    /// DeepSeek-V2: multi-head latent attention and grouped routing ([`super::deepseek`]).
    pub fn is_deepseek(&self) -> bool {
        self.model_type == "deepseek_v2"
    }

    /// Values a request's cache holds per position and layer: keys and values of every
    /// key/value head, or DeepSeek's compressed latent and shared rope key.
    pub fn cache_values_per_position(&self) -> usize {
        match super::deepseek::LatentShape::of(self) {
            Some(shape) => shape.kv_lora_rank + shape.rope,
            None => 2 * self.num_key_value_heads() * self.head_dim(),
        }
    }

    /// Key/value heads.
    pub fn num_key_value_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Whether q/k/v and gate/up are stored fused, as `qkv_proj` and `gate_up_proj` (Phi-3).
    pub fn fused_projections(&self) -> bool {
        self.model_type == "phi3"
    }

    /// Leading width of each head that RoPE rotates (all of it unless a partial factor is set).
    pub fn rotary_dim(&self) -> usize {
        if let Some(shape) = super::deepseek::LatentShape::of(self) {
            return shape.rope;
        }
        let factor = self.rope_scaling.as_ref().and_then(|s| s.partial_rotary_factor);
        match factor.or(self.partial_rotary_factor) {
            Some(factor) => (self.head_dim() as f64 * factor) as usize,
            None => self.head_dim(),
        }
    }

    /// Weights read per token by one decoder layer (its projections) and by the LM head;
    /// norms and biases are too small to count.
    pub fn costs(&self) -> ModelCosts {
        let (hidden, head_dim) = (self.hidden_size as f64, self.head_dim() as f64);
        let queries = self.num_attention_heads as f64 * head_dim;
        let keys_values = 2.0 * self.num_key_value_heads() as f64 * head_dim;
        let attention = match super::deepseek::LatentShape::of(self) {
            Some(shape) => shape.weights(self.hidden_size) as f64,
            None => hidden * (2.0 * queries + keys_values),
        };
        let mlp = match super::moe::MoeSpec::of(self).ok().flatten() {
            Some(spec) => spec.mean_layer_cost(self),
            None => 3.0 * hidden * self.intermediate_size as f64,
        };
        ModelCosts { layer: attention + mlp, head: self.vocab_size as f64 * hidden }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> std::result::Result<ModelConfig, String> {
        let config: ModelConfig = serde_json::from_str(json).map_err(|e| e.to_string())?;
        config.validate()?;
        Ok(config)
    }

    const LLAMA: &str = r#"{"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 256,
        "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}"#;

    #[test]
    fn sizes_past_the_limits_are_named() {
        let cases = [
            ("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 1000000000000", "num_hidden_layers"),
            (
                "\"vocab_size\": 100",
                "\"vocab_size\": 100, \"kv_lora_rank\": 4611686018427387904",
                "kv_lora_rank",
            ),
            ("\"hidden_size\": 64", "\"hidden_size\": 18446744073709551615", "hidden_size"),
            // Found by fuzz_model_config: DeepSeek's dense layers were listed before any check.
            (
                "\"vocab_size\": 100",
                "\"vocab_size\": 100, \"first_k_dense_replace\": 8223599152488741280",
                "first_k_dense_replace",
            ),
            (
                "\"vocab_size\": 100",
                "\"vocab_size\": 100, \"partial_rotary_factor\": 1e300",
                "partial_rotary_factor",
            ),
        ];
        for (field, bent, name) in cases {
            let error = parse(&LLAMA.replace(field, bent)).unwrap_err();
            assert!(error.contains(name), "{error}");
        }
    }

    #[test]
    fn llama_defaults() {
        let c = parse(LLAMA).unwrap();
        assert_eq!(c.head_dim(), 16);
        assert_eq!(c.num_key_value_heads(), 2);
        assert_eq!(c.rope_theta, 10_000.0);
        assert!(!c.tie_word_embeddings);
        assert_eq!(
            c.variant().unwrap(),
            Variant { qkv_bias: false, o_bias: false, mlp_bias: false, qk_norm: false }
        );
        assert_eq!(c.rope_scaling.unwrap().factor(), 32.0);
    }

    #[test]
    fn costs_count_the_projections_and_the_head() {
        let c = parse(LLAMA).unwrap();
        // q and o 64x64, k and v 32x64 (2 heads of 16), MLP 3 x 64x128; head 100x64.
        let costs = c.costs();
        assert_eq!((costs.layer, costs.head), (4096.0 * 2.0 + 2048.0 * 2.0 + 3.0 * 8192.0, 6400.0));
    }

    #[test]
    fn family_variants() {
        let qwen2 = parse(&LLAMA.replace("\"llama\"", "\"qwen2\"")).unwrap();
        assert!(qwen2.variant().unwrap().qkv_bias);
        let qwen3 = parse(&LLAMA.replace("\"llama\"", "\"qwen3\"")).unwrap();
        assert!(qwen3.variant().unwrap().qk_norm);
        for model_type in MODEL_TYPES {
            if *model_type == "llava" {
                let nested = format!(r#"{{"model_type": "llava", "text_config": {LLAMA}}}"#);
                assert!(ModelConfig::from_json(&nested).is_ok_and(|c| c.llava.is_some()));
                continue;
            }
            let config = LLAMA.replace("\"llama\"", &format!("{model_type:?}"));
            // DeepSeek-V2 takes YaRN, not Llama 3's scaling, and needs its experts per token.
            let config = match *model_type {
                "deepseek_v2" => config
                    .replace("\"llama3\"", "\"yarn\"")
                    .replace("\"vocab_size\": 100", "\"vocab_size\": 100, \"num_experts_per_tok\": 2"),
                _ => config,
            };
            assert!(parse(&config).is_ok_and(|c| c.variant().is_ok()), "{model_type}");
        }
    }

    #[test]
    fn unsupported_configs_are_named() {
        let err = parse(&LLAMA.replace("\"llama\"", "\"gpt2\"")).unwrap_err();
        assert!(err.contains("gpt2"), "{err}");
        let err = parse(&LLAMA.replace("\"llama3\"", "\"yarn\"")).unwrap_err();
        assert!(err.contains("yarn"), "{err}");
        let err =
            parse(&LLAMA.replace("\"num_key_value_heads\": 2", "\"num_key_value_heads\": 3")).unwrap_err();
        assert!(err.contains("key/value heads"), "{err}");
        assert!(parse(r#"{"model_type": "llama"}"#).is_err());
    }
}
