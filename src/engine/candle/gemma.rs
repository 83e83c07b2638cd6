//! Gemma 2 and Gemma 3 (text): the `config.json` fields and the arithmetic that set them apart
//! from Llama — GeGLU, embeddings scaled by `sqrt(hidden_size)`, tanh soft-capping of attention
//! scores and logits, and local layers that attend over a sliding window of positions.

use candle_core::Tensor;
use serde::{Deserialize, Deserializer};

use super::config::ModelConfig;
use crate::error::Result;

/// Gemma's own `config.json` fields (absent from other families' configs).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct GemmaFields {
    /// Activation of the gated MLP (`gelu_pytorch_tanh` when absent).
    pub hidden_activation: Option<String>,
    /// Attention scores are scaled by `query_pre_attn_scalar ** -0.5` (256 when absent).
    pub query_pre_attn_scalar: Option<f64>,
    /// Cap of the attention scores; absent means the family's default, null means none.
    #[serde(default, deserialize_with = "present")]
    pub attn_logit_softcapping: Option<Option<f64>>,
    /// Cap of the final logits; absent means the family's default, null means none.
    #[serde(default, deserialize_with = "present")]
    pub final_logit_softcapping: Option<Option<f64>>,
    /// `sliding_attention` or `full_attention` per layer.
    pub layer_types: Option<Vec<String>>,
    /// Gemma 3: every this many layers one is global (6 when absent and `layer_types` is).
    pub sliding_window_pattern: Option<usize>,
    /// Gemma 3: the RoPE base of local layers (10 000 when absent).
    pub rope_local_base_freq: Option<f64>,
    /// Gemma 3: local layers attend both ways (an embedding model); not supported.
    #[serde(default)]
    pub use_bidirectional_attention: Option<bool>,
    /// The checkpoint's dtype (`torch_dtype`, or `dtype` in newer configs): transformers
    /// rounds the embedding scale to it.
    #[serde(alias = "dtype")]
    pub torch_dtype: Option<String>,
}

/// A field that may be absent (`None`), null (`Some(None)`) or a number.
fn present<'de, D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Option<Option<f64>>, D::Error> {
    Option::<f64>::deserialize(deserializer).map(Some)
}

impl GemmaFields {
    /// What the engine cannot run in these fields, if anything.
    pub fn validate(&self, layers: usize) -> std::result::Result<(), String> {
        Activation::named(self.hidden_activation.as_deref().unwrap_or("gelu_pytorch_tanh"))?;
        if self.use_bidirectional_attention == Some(true) {
            return Err("bidirectional attention (use_bidirectional_attention) is not supported".into());
        }
        if self.sliding_window_pattern == Some(0) {
            return Err("sliding_window_pattern must be positive".into());
        }
        if let Some(types) = &self.layer_types {
            if types.len() != layers {
                return Err(format!("layer_types lists {} layers, the model has {layers}", types.len()));
            }
            if let Some(other) =
                types.iter().find(|t| !matches!(t.as_str(), "sliding_attention" | "full_attention"))
            {
                return Err(format!("layer type {other:?} is not supported"));
            }
        }
        Ok(())
    }
}

/// The activation of a gated MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x * sigmoid(x)` (Llama, Qwen).
    Silu,
    /// GELU's tanh approximation (`gelu_pytorch_tanh`, Gemma).
    GeluTanh,
    /// The exact GELU (`gelu`).
    Gelu,
}

impl Activation {
    /// The activation `config` uses.
    pub fn of(config: &ModelConfig) -> Self {
        match Gemma::new(config) {
            Some(gemma) => gemma.activation,
            None => Self::Silu,
        }
    }

    fn named(name: &str) -> std::result::Result<Self, String> {
        match name {
            "gelu_pytorch_tanh" | "gelu_tanh" => Ok(Self::GeluTanh),
            "gelu" => Ok(Self::Gelu),
            "silu" => Ok(Self::Silu),
            other => Err(format!("hidden_activation {other:?} is not supported")),
        }
    }

    /// Applies the activation.
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Silu => candle_nn::ops::silu(x)?,
            Self::GeluTanh => x.gelu()?,
            Self::Gelu => x.gelu_erf()?,
        })
    }
}

/// A Gemma config's choices, resolved with the family's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct Gemma {
    /// The MLP's activation.
    pub activation: Activation,
    /// Factor of the attention scores.
    pub attention_scale: f64,
    /// Cap of the attention scores, if any.
    pub attention_softcap: Option<f32>,
    /// Cap of the logits, if any.
    pub final_softcap: Option<f32>,
    /// Factor of the looked-up embeddings.
    pub embed_scale: f32,
    /// Per layer, the sliding window of a local layer (`None` for a global one).
    pub windows: Vec<Option<usize>>,
    /// Gemma 3: the RoPE base of local layers (which ignore `rope_scaling`).
    pub local_rope_theta: Option<f64>,
}

impl Gemma {
    /// The choices of a Gemma config; `None` for other families.
    pub fn new(config: &ModelConfig) -> Option<Self> {
        let fields = &config.gemma;
        let gemma3 = match config.model_type.as_str() {
            "gemma2" => false,
            "gemma3_text" => true,
            _ => return None,
        };
        let cap = |field: Option<Option<f64>>, gemma2_default: f64| {
            let value = field.unwrap_or(if gemma3 { None } else { Some(gemma2_default) });
            value.map(|cap| cap as f32)
        };
        // A local layer's query sees `sliding_window` positions, itself included (4096 when absent).
        let window = config.sliding_window.unwrap_or(4096);
        let layers = config.num_hidden_layers;
        let windows = match &fields.layer_types {
            Some(types) => types.iter().map(|t| (t == "sliding_attention").then_some(window)).collect(),
            None => {
                // Gemma 2 alternates local and global layers; Gemma 3 has one global layer in `pattern`.
                let pattern = if gemma3 { fields.sliding_window_pattern.unwrap_or(6) } else { 2 };
                (0..layers).map(|i| (!(i + 1).is_multiple_of(pattern)).then_some(window)).collect()
            }
        };
        let activation = fields.hidden_activation.as_deref().unwrap_or("gelu_pytorch_tanh");
        Some(Self {
            activation: Activation::named(activation).unwrap_or(Activation::GeluTanh),
            attention_scale: fields.query_pre_attn_scalar.unwrap_or(256.0).powf(-0.5),
            attention_softcap: cap(fields.attn_logit_softcapping, 50.0),
            final_softcap: cap(fields.final_logit_softcapping, 30.0),
            embed_scale: embed_scale(config.hidden_size, fields.torch_dtype.as_deref()),
            windows,
            local_rope_theta: gemma3.then(|| fields.rope_local_base_freq.unwrap_or(10_000.0)),
        })
    }

    /// The config of the local layers' RoPE (Gemma 3): their own base and no scaling.
    pub fn local_rope_config(&self, config: &ModelConfig) -> Option<ModelConfig> {
        let theta = self.local_rope_theta?;
        Some(ModelConfig { rope_theta: theta, rope_scaling: None, ..config.clone() })
    }
}

/// `sqrt(hidden)` as transformers applies it: rounded to the checkpoint's dtype.
fn embed_scale(hidden: usize, dtype: Option<&str>) -> f32 {
    let scale = (hidden as f64).sqrt() as f32;
    match dtype {
        Some("bfloat16") => half::bf16::from_f32(scale).to_f32(),
        Some("float16") => half::f16::from_f32(scale).to_f32(),
        _ => scale,
    }
}

/// `tanh(x / cap) * cap`: values bent smoothly into `(-cap, cap)`.
pub fn softcap(x: &Tensor, cap: f32) -> Result<Tensor> {
    Ok(((x / cap as f64)?.tanh()? * cap as f64)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> ModelConfig {
        let base = r#""hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 7,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 100,
            "rms_norm_eps": 1e-6, "max_position_embeddings": 256"#;
        serde_json::from_str::<ModelConfig>(&format!("{{{base}, {json}}}")).unwrap().checked().unwrap()
    }

    #[test]
    fn gemma2_defaults_alternate_local_and_global_layers() {
        let gemma = Gemma::new(&config(r#""model_type": "gemma2", "sliding_window": 8"#)).unwrap();
        assert_eq!(gemma.windows, [Some(8), None, Some(8), None, Some(8), None, Some(8)]);
        assert_eq!((gemma.attention_softcap, gemma.final_softcap), (Some(50.0), Some(30.0)));
        assert_eq!(gemma.attention_scale, 1.0 / 16.0);
        assert_eq!(gemma.activation, Activation::GeluTanh);
        assert_eq!(gemma.local_rope_theta, None);
    }

    #[test]
    fn gemma3_pattern_caps_and_local_rope() {
        let json = r#""model_type": "gemma3_text", "sliding_window_pattern": 3, "query_pre_attn_scalar": 64,
            "final_logit_softcapping": null, "attn_logit_softcapping": 20.0, "rope_local_base_freq": 500.0"#;
        let gemma = Gemma::new(&config(json)).unwrap();
        assert_eq!(gemma.windows, [Some(4096), Some(4096), None, Some(4096), Some(4096), None, Some(4096)]);
        assert_eq!((gemma.attention_softcap, gemma.final_softcap), (Some(20.0), None));
        assert_eq!(gemma.attention_scale, 0.125);
        assert_eq!(gemma.local_rope_theta, Some(500.0));
        let types = r#""model_type": "gemma3_text", "layer_types": ["full_attention", "sliding_attention",
            "full_attention", "full_attention", "full_attention", "full_attention", "sliding_attention"]"#;
        let gemma = Gemma::new(&config(types)).unwrap();
        assert_eq!(gemma.windows, [None, Some(4096), None, None, None, None, Some(4096)]);
        assert_eq!(Gemma::new(&config(r#""model_type": "llama""#)), None);
    }

    #[test]
    fn embed_scale_is_rounded_to_the_checkpoint_dtype() {
        // sqrt(3584) = 59.866...: bf16 steps by 0.25 between 32 and 64.
        assert_eq!(embed_scale(3584, Some("bfloat16")), 59.75);
        assert!((embed_scale(3584, Some("float32")) - 59.866_5).abs() < 1e-3);
        assert_eq!(embed_scale(64, Some("bfloat16")), 8.0);
    }

    #[test]
    fn unsupported_fields_are_named() {
        let check = |json: &str| {
            let base = r#""model_type": "gemma2", "hidden_size": 48, "intermediate_size": 96,
                "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100,
                "rms_norm_eps": 1e-6, "max_position_embeddings": 256"#;
            serde_json::from_str::<ModelConfig>(&format!("{{{base}, {json}}}"))
                .unwrap()
                .checked()
                .unwrap_err()
        };
        assert!(check(r#""hidden_activation": "relu""#).contains("relu"));
        assert!(check(r#""layer_types": ["full_attention"]"#).contains("layer_types"));
        assert!(check(r#""layer_types": ["chunked", "full_attention"]"#).contains("chunked"));
        assert!(check(r#""use_bidirectional_attention": true"#).contains("bidirectional"));
    }

    #[test]
    fn softcap_bends_large_values_only() {
        let x = Tensor::new(&[0.01f32, 10.0, -10.0], &candle_core::Device::Cpu).unwrap();
        let capped = softcap(&x, 5.0).unwrap().to_vec1::<f32>().unwrap();
        assert!((capped[0] - 0.01).abs() < 1e-6);
        // 5 * tanh(2) = 4.820...
        assert!((capped[1] - 4.8201).abs() < 1e-3 && (capped[2] + 4.8201).abs() < 1e-3);
    }
}
