//! YaRN rope scaling (`rope_scaling.type` `yarn`, DeepSeek-V2's long context) as transformers
//! computes it: each frequency blends its extrapolated value `1 / theta^(2i/d)` with the
//! interpolated one (divided by `factor`) along a linear ramp between the dimensions that turn
//! `beta_fast` and `beta_slow` times over the original context; cos and sin are multiplied by
//! an attention factor, and DeepSeek's softmax scale by `mscale(factor, mscale_all_dim)²`.

use super::config::RopeScaling;

/// YaRN's `0.1 * mscale * ln(factor) + 1` (1 for factors up to 1).
fn mscale(factor: f64, mscale: f64) -> f64 {
    if factor <= 1.0 {
        return 1.0;
    }
    0.1 * mscale * factor.ln() + 1.0
}

/// The dimension whose frequency turns `rotations` times over `context` positions.
fn correction_dim(rotations: f64, dim: usize, base: f64, context: f64) -> f64 {
    dim as f64 * (context / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * base.ln())
}

/// Inverse frequencies of the `dim` rotated dimensions for RoPE base `base`.
pub fn inverse_frequencies(dim: usize, base: f64, scaling: &RopeScaling) -> Vec<f32> {
    let factor = scaling.factor() as f32;
    let context = scaling.original_max_position_embeddings;
    let (beta_fast, beta_slow) = (scaling.beta_fast.unwrap_or(32.0), scaling.beta_slow.unwrap_or(1.0));
    let (mut low, mut high) =
        (correction_dim(beta_fast, dim, base, context), correction_dim(beta_slow, dim, base, context));
    if scaling.truncate.unwrap_or(true) {
        (low, high) = (low.floor(), high.ceil());
    }
    let (low, mut high) = (low.max(0.0) as f32, high.min(dim as f64 - 1.0) as f32);
    if low == high {
        high += 0.001;
    }
    let base = base as f32;
    (0..dim / 2)
        .map(|i| {
            let position = base.powf((2 * i) as f32 / dim as f32);
            let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
            let extrapolated = 1.0 - ramp;
            (1.0 / (factor * position)) * (1.0 - extrapolated) + (1.0 / position) * extrapolated
        })
        .collect()
}

/// Multiplier of cos and sin: the configured `attention_factor`, else
/// `mscale(factor, mscale) / mscale(factor, mscale_all_dim)` when both are set, else
/// `mscale(factor, 1)`.
pub fn attention_factor(scaling: &RopeScaling) -> f64 {
    if let Some(factor) = scaling.attention_factor {
        return factor;
    }
    match (scaling.mscale.filter(|&m| m != 0.0), scaling.mscale_all_dim.filter(|&m| m != 0.0)) {
        (Some(m), Some(all)) => mscale(scaling.factor(), m) / mscale(scaling.factor(), all),
        _ => mscale(scaling.factor(), 1.0),
    }
}

/// What multiplies DeepSeek's softmax scale: `mscale(factor, mscale_all_dim)²` when
/// `mscale_all_dim` is set, else 1.
pub fn softmax_scale_factor(scaling: &RopeScaling) -> f64 {
    match scaling.mscale_all_dim.filter(|&m| m != 0.0) {
        Some(all) => mscale(scaling.factor(), all).powi(2),
        None => 1.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deepseek_v2_lite() -> RopeScaling {
        serde_json::from_str(
            r#"{"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}"#,
        )
        .unwrap()
    }

    #[test]
    fn high_frequencies_are_kept_and_low_ones_divided() {
        let freqs = inverse_frequencies(64, 10_000.0, &deepseek_v2_lite());
        assert_eq!(freqs.len(), 32);
        assert_eq!(freqs[0], 1.0, "the fastest rotation is extrapolated");
        let slowest = 1.0 / 10_000f32.powf(62.0 / 64.0);
        assert!((freqs[31] - slowest / 40.0).abs() < 1e-12, "the slowest is interpolated");
        assert!(freqs.windows(2).all(|w| w[1] < w[0]));
    }

    #[test]
    fn equal_mscales_cancel_in_cos_and_sin_but_scale_the_softmax() {
        let scaling = deepseek_v2_lite();
        assert!((attention_factor(&scaling) - 1.0).abs() < 1e-12);
        let m = 0.1 * 0.707 * 40f64.ln() + 1.0;
        assert!((softmax_scale_factor(&scaling) - m * m).abs() < 1e-12);
        let plain = RopeScaling { mscale: None, mscale_all_dim: None, ..scaling };
        assert!((attention_factor(&plain) - (0.1 * 40f64.ln() + 1.0)).abs() < 1e-12);
        assert_eq!(softmax_scale_factor(&plain), 1.0);
    }
}
