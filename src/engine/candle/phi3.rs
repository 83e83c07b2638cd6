//! Phi-3, Phi-3.5 and Phi-4 (`model_type` `phi3`): LongRoPE's short and long frequency
//! factors (their sliding window is [`super::sliding_window`]'s). Their fused `qkv_proj` and
//! `gate_up_proj` load as the engine's stacked layers (see [`ModelConfig::fused_projections`]).
//!
//! LongRoPE as transformers runs it: within one forward pass every position uses the same
//! factors, the long ones when the pass reaches past `original_max_position_embeddings`
//! positions and the short ones otherwise; keys cached by earlier passes keep the rotation
//! they were computed with. cos and sin are both multiplied by the attention factor
//! `sqrt(1 + ln(factor) / ln(original))` (or the configured `attention_factor`), where the
//! factor is `max_position_embeddings / original` unless the config gives one.

use super::config::ModelConfig;

/// Phi-3's pre-training context when its config names none (as transformers' `Phi3Config`).
const DEFAULT_ORIGINAL_CONTEXT: usize = 4096;

/// LongRoPE's two sets of inverse frequencies and where the switch between them happens.
#[derive(Debug, Clone, PartialEq)]
pub struct LongRope {
    /// Inverse frequencies divided by the short factors.
    pub short: Vec<f32>,
    /// Inverse frequencies divided by the long factors.
    pub long: Vec<f32>,
    /// Multiplier of cos and sin.
    pub attention_factor: f32,
    /// A pass whose last position is at or past this index uses the long frequencies.
    pub original: usize,
}

impl LongRope {
    /// LongRoPE's parameters when `config` is a Phi-3 with `longrope` (or `su`) scaling.
    pub fn from_config(config: &ModelConfig) -> Option<Self> {
        let scaling = config.rope_scaling.as_ref().filter(|_| config.model_type == "phi3")?;
        if !is_longrope(&scaling.rope_type) {
            return None;
        }
        let (short, long) = (scaling.short_factor.as_ref()?, scaling.long_factor.as_ref()?);
        let original = original_context(config);
        // Without a factor it is the context's growth; a given one counts, 1 included.
        let factor = scaling.given_factor.unwrap_or(config.max_position_embeddings as f64 / original as f64);
        let attention_factor = scaling.attention_factor.unwrap_or(if factor <= 1.0 {
            1.0
        } else {
            (1.0 + factor.ln() / (original as f64).ln()).sqrt()
        });
        let plain = plain_frequencies(config);
        let divide = |factors: &[f32]| plain.iter().zip(factors).map(|(f, e)| 1.0 / (e * f)).collect();
        Some(Self {
            short: divide(short),
            long: divide(long),
            attention_factor: attention_factor as f32,
            original,
        })
    }
}

/// `theta^(2i / d)` over the rotated width `d`, in f32 as transformers computes it.
fn plain_frequencies(config: &ModelConfig) -> Vec<f32> {
    let dim = config.rotary_dim();
    let base = config.rope_theta as f32;
    (0..dim).step_by(2).map(|i| base.powf(i as f32 / dim as f32)).collect()
}

/// `longrope`, or `su` as older Phi-3 configs name it.
fn is_longrope(rope_type: &str) -> bool {
    matches!(rope_type, "longrope" | "su")
}

/// The pre-training context: the config's top-level `original_max_position_embeddings`
/// (which transformers prefers over one inside `rope_scaling`), else Phi-3's default.
fn original_context(config: &ModelConfig) -> usize {
    config.original_max_position_embeddings.unwrap_or(DEFAULT_ORIGINAL_CONTEXT)
}

/// Checks a Phi-3 config's rotary settings: the rotated width, and LongRoPE's factors (one
/// per rotated pair).
pub fn validate_rope(config: &ModelConfig) -> std::result::Result<(), String> {
    let rotary = config.rotary_dim();
    if rotary == 0 || !rotary.is_multiple_of(2) || rotary > config.head_dim() {
        return Err(format!("the rotated width {rotary} must be even, positive and at most head_dim"));
    }
    let Some(scaling) = &config.rope_scaling else { return Ok(()) };
    if matches!(scaling.rope_type.as_str(), "default" | "llama3") {
        return Ok(());
    }
    if !is_longrope(&scaling.rope_type) {
        return Err(format!("rope_scaling type {:?} is not supported for phi3", scaling.rope_type));
    }
    for (name, factors) in [("short_factor", &scaling.short_factor), ("long_factor", &scaling.long_factor)] {
        let len = factors.as_ref().map(Vec::len);
        if len != Some(rotary / 2) {
            return Err(format!("longrope's {name} must have {} values, has {len:?}", rotary / 2));
        }
    }
    if original_context(config) == 0 {
        return Err("original_max_position_embeddings must be positive".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> ModelConfig {
        let json = format!(
            r#"{{"model_type": "phi3", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "vocab_size": 100, "rms_norm_eps": 1e-5,
                "max_position_embeddings": 128, "original_max_position_embeddings": 8 {extra}}}"#
        );
        serde_json::from_str::<ModelConfig>(&json).unwrap().checked().unwrap()
    }

    const SU: &str = r#", "rope_scaling": {"type": "su",
        "short_factor": [1, 1, 1, 1, 1, 1, 1, 2], "long_factor": [1, 2, 3, 4, 5, 6, 7, 8]}"#;

    #[test]
    fn longrope_divides_frequencies_and_scales_by_the_context_growth() {
        let rope = LongRope::from_config(&config(SU)).unwrap();
        assert_eq!(rope.original, 8);
        // factor 128 / 8 = 16: sqrt(1 + ln 16 / ln 8) = sqrt(1 + 4/3).
        assert!((rope.attention_factor - (7.0f32 / 3.0).sqrt()).abs() < 1e-6);
        // head_dim 16: frequency i is 10000^(-2i/16), divided by its factor.
        let third = 1.0 / 10_000f32.powf(4.0 / 16.0);
        assert!((rope.short[2] - third).abs() < 1e-9);
        assert!((rope.long[2] - third / 3.0).abs() < 1e-9);
        assert!((rope.short[7] - rope.long[7] * 4.0).abs() < 1e-9);
    }

    #[test]
    fn a_given_factor_counts_even_when_it_is_one() {
        // As transformers 5.25 computes it (`_compute_longrope_parameters`): a factor of 1
        // means no attention scaling, another one sets it; only an absent one is the growth.
        for (factor, expected) in [(1.0f32, 1.0f32), (4.0, (1.0 + 4f32.ln() / 8f32.ln()).sqrt())] {
            let json = SU.replace("\"type\": \"su\"", &format!("\"type\": \"su\", \"factor\": {factor}"));
            let rope = LongRope::from_config(&config(&json)).unwrap();
            assert!(
                (rope.attention_factor - expected).abs() < 1e-6,
                "factor {factor}: {}",
                rope.attention_factor
            );
        }
    }

    #[test]
    fn given_attention_factor_and_partial_rotation() {
        let json = SU.replace("\"type\": \"su\"", "\"type\": \"longrope\", \"attention_factor\": 1.5");
        let json = json.replace("1, 1, 1, 1, 1, 1, 1, 2", "1, 1, 1, 2").replace(", 5, 6, 7, 8", "");
        let c = config(&format!("{json}, \"partial_rotary_factor\": 0.5"));
        assert_eq!(c.rotary_dim(), 8);
        let rope = LongRope::from_config(&c).unwrap();
        assert_eq!((rope.attention_factor, rope.short.len()), (1.5, 4));
        // Over 8 rotated dims the second frequency is 10000^(-2/8).
        assert!((rope.short[1] - 1.0 / 10_000f32.powf(0.25)).abs() < 1e-9);
    }

    #[test]
    fn bad_factors_are_named() {
        let json = format!(
            r#"{{"model_type": "phi3", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "vocab_size": 100, "rms_norm_eps": 1e-5,
                "max_position_embeddings": 128 {}}}"#,
            SU.replace(", 5, 6, 7, 8", "")
        );
        let err = serde_json::from_str::<ModelConfig>(&json).unwrap().checked().unwrap_err();
        assert!(err.contains("long_factor"), "{err}");
        // Without a longrope scaling there is nothing to switch.
        assert!(LongRope::from_config(&config("")).is_none());
    }
}
