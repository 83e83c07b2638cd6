//! Rotary position embeddings: the per-position cos/sin tables, with Llama 3's
//! frequency scaling, Phi-3's LongRoPE or YaRN, computed the way Hugging Face transformers
//! computes them; a partial rotary factor rotates only each head's leading dimensions.
//! Most families rotate the pairs `(i, i + d/2)`; DeepSeek-V2 rotates adjacent pairs
//! `(2i, 2i + 1)` (transformers views them as complex numbers).

use candle_core::{DType, Device, Tensor};

use super::config::{ModelConfig, RopeScaling};
use super::phi3::LongRope;
use super::yarn;
use crate::error::Result;

/// cos/sin tables `[positions, rotary_dim / 2]` for every position the model supports.
#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
    /// LongRoPE's tables for passes that reach past the original context, and that context.
    long: Option<(Tensor, Tensor, usize)>,
    /// Leading width of each head that is rotated.
    rotary_dim: usize,
    /// Whether adjacent pairs `(2i, 2i + 1)` are rotated, rather than `(i, i + d/2)`.
    interleaved: bool,
}

impl Rope {
    /// Tables for `positions` positions of `config`'s head width.
    pub fn new(config: &ModelConfig, positions: usize, device: &Device) -> Result<Self> {
        let rotary_dim = config.rotary_dim();
        let interleaved = config.is_deepseek();
        if let Some(longrope) = LongRope::from_config(config) {
            let scale = f64::from(longrope.attention_factor);
            let (cos, sin) = tables(longrope.short, positions, scale, device)?;
            let (long_cos, long_sin) = tables(longrope.long, positions, scale, device)?;
            let long = Some((long_cos, long_sin, longrope.original));
            return Ok(Self { cos, sin, long, rotary_dim, interleaved });
        }
        let scale = match &config.rope_scaling {
            Some(scaling) if scaling.rope_type == "yarn" => yarn::attention_factor(scaling),
            _ => 1.0,
        };
        let (cos, sin) = tables(inverse_frequencies(config), positions, scale, device)?;
        Ok(Self { cos, sin, long: None, rotary_dim, interleaved })
    }

    /// The cos and sin tables `[seq, head_dim / 2]` of positions `0..seq`.
    pub fn tables(&self, seq: usize) -> Result<(Tensor, Tensor)> {
        Ok((self.cos.narrow(0, 0, seq)?, self.sin.narrow(0, 0, seq)?))
    }

    /// Rotates `x` (`[batch, heads, seq, head_dim]`) for positions `offset..offset + seq`.
    #[cfg(test)]
    pub fn apply(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        self.apply_in_pass(x, offset, offset + x.dim(2)?)
    }

    /// As [`Rope::apply`], for part of a pass that ends before position `end`: with LongRoPE
    /// the whole pass takes the long tables once it reaches past the original context, as
    /// transformers chooses them per forward pass.
    pub fn apply_in_pass(&self, x: &Tensor, offset: usize, end: usize) -> Result<Tensor> {
        let seq = x.dim(2)?;
        let (cos, sin) = match &self.long {
            Some((cos, sin, original)) if end > *original => (cos, sin),
            _ => (&self.cos, &self.sin),
        };
        let cos = cos.narrow(0, offset, seq)?;
        let sin = sin.narrow(0, offset, seq)?;
        let head_dim = x.dim(3)?;
        let rotate = |x: &Tensor| -> Result<Tensor> {
            let x = x.contiguous()?;
            if self.interleaved {
                return Ok(candle_nn::rotary_emb::rope_i(&x, &cos, &sin)?);
            }
            Ok(candle_nn::rotary_emb::rope(&x, &cos, &sin)?)
        };
        if self.rotary_dim == head_dim {
            return rotate(x);
        }
        let rotated = rotate(&x.narrow(3, 0, self.rotary_dim)?)?;
        let kept = x.narrow(3, self.rotary_dim, head_dim - self.rotary_dim)?;
        Ok(Tensor::cat(&[rotated, kept], 3)?)
    }
}

/// cos and sin (each multiplied by `scale`) of every position's angles for `inv_freq`.
fn tables(inv_freq: Vec<f32>, positions: usize, scale: f64, device: &Device) -> Result<(Tensor, Tensor)> {
    let half = inv_freq.len();
    let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
    let steps =
        Tensor::arange(0u32, positions as u32, device)?.to_dtype(DType::F32)?.reshape((positions, 1))?;
    let angles = steps.matmul(&inv_freq)?;
    if scale == 1.0 {
        return Ok((angles.cos()?, angles.sin()?));
    }
    Ok(((angles.cos()? * scale)?, (angles.sin()? * scale)?))
}

/// `1 / theta^(2i / d)` in f32 as transformers computes it, then Llama 3 or linear scaling if configured
/// (as `rope_scaling`, or as GGUF's per-frequency divisors).
fn inverse_frequencies(config: &ModelConfig) -> Vec<f32> {
    let dim = config.rotary_dim();
    let base = config.rope_theta as f32;
    let plain = (0..dim).step_by(2).map(|i| 1.0 / base.powf(i as f32 / dim as f32));
    if let Some(factors) = &config.rope_freq_factors {
        return plain.zip(factors).map(|(f, factor)| f / factor).collect();
    }
    match &config.rope_scaling {
        Some(scaling) if scaling.rope_type == "llama3" => plain.map(|f| llama3_scaled(f, scaling)).collect(),
        // Positions divided by `factor` (Gemma 3's global layers).
        Some(scaling) if scaling.rope_type == "linear" => {
            plain.map(|f| f / scaling.factor() as f32).collect()
        }
        Some(scaling) if scaling.rope_type == "yarn" => {
            yarn::inverse_frequencies(dim, config.rope_theta, scaling)
        }
        _ => plain.collect(),
    }
}

/// Llama 3's scaling: long wavelengths are divided by `factor`, short ones kept, and the
/// band between them interpolated smoothly.
fn llama3_scaled(freq: f32, scaling: &RopeScaling) -> f32 {
    let factor = scaling.factor() as f32;
    let original = scaling.original_max_position_embeddings as f32;
    let low_freq_wavelen = original / scaling.low_freq_factor as f32;
    let high_freq_wavelen = original / scaling.high_freq_factor as f32;
    let wavelen = 2.0 * std::f32::consts::PI / freq;
    if wavelen < high_freq_wavelen {
        return freq;
    }
    if wavelen > low_freq_wavelen {
        return freq / factor;
    }
    let smooth = (original / wavelen - scaling.low_freq_factor as f32)
        / (scaling.high_freq_factor as f32 - scaling.low_freq_factor as f32);
    (1.0 - smooth) * freq / factor + smooth * freq
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scaling() -> RopeScaling {
        RopeScaling { rope_type: "llama3".into(), given_factor: Some(32.0), ..Default::default() }
    }

    #[test]
    fn llama3_scaling_bands() {
        // Short wavelength (high frequency): unchanged.
        assert_eq!(llama3_scaled(1.0, &scaling()), 1.0);
        // Wavelength 2π / 1e-4 ≈ 62832 > 8192: divided by the factor.
        assert!((llama3_scaled(1e-4, &scaling()) - 1e-4 / 32.0).abs() < 1e-12);
        // Wavelength 4096 lies between 2048 and 8192: smooth = (8192/4096 - 1) / 3 = 1/3.
        let f = 2.0 * std::f32::consts::PI / 4096.0;
        let expected = (2.0 / 3.0) * f / 32.0 + (1.0 / 3.0) * f;
        assert!((llama3_scaled(f, &scaling()) - expected).abs() < 1e-9);
    }

    #[test]
    fn position_zero_is_identity() {
        let config: ModelConfig = serde_json::from_str(
            r#"{"model_type": "llama", "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
                "num_attention_heads": 1, "vocab_size": 4, "rms_norm_eps": 1e-5, "max_position_embeddings": 4}"#,
        )
        .unwrap();
        let rope = Rope::new(&config, 4, &Device::Cpu).unwrap();
        let x = Tensor::arange(0f32, 8.0, &Device::Cpu).unwrap().reshape((1, 1, 1, 8)).unwrap();
        let rotated = rope.apply(&x, 0).unwrap();
        assert_eq!(
            rotated.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            x.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        // Rotation keeps each (i, i + d/2) pair's norm.
        let moved = rope.apply(&x, 3).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for i in 0..4 {
            let before = (i as f32).hypot(i as f32 + 4.0);
            assert!((moved[i].hypot(moved[i + 4]) - before).abs() < 1e-4);
        }
    }
}
