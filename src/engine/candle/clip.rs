//! CLIP's vision transformer (`clip_vision_model`), as LLaVA's image encoder: patch and class
//! embeddings with learned positions, a pre-norm, then pre-norm encoder layers with biased
//! projections and a quick-GELU MLP. Only the layers up to the one whose output is used load.

use candle_core::{Device, Tensor};
use serde::Deserialize;

use super::linear::Linear;
use super::tensors::ShardTensors;
use crate::error::{Error, Result};

/// Largest image side, in pixels, and largest width a tower config may give.
const MAX_SIDE: usize = 1 << 14;

/// `vision_config` of a CLIP vision tower (transformers' defaults filled in by the caller).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ClipConfig {
    /// `clip_vision_model`.
    pub model_type: String,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP's hidden layer.
    pub intermediate_size: usize,
    /// Encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Colour channels of an image.
    pub num_channels: usize,
    /// Side of the square images the tower takes, in pixels.
    pub image_size: usize,
    /// Side of a patch, in pixels.
    pub patch_size: usize,
    /// The MLP's activation: `quick_gelu` or `gelu`.
    pub hidden_act: String,
    /// Epsilon of every layer norm.
    pub layer_norm_eps: f64,
}

impl ClipConfig {
    /// What the engine cannot run in this config, if anything.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.model_type != "clip_vision_model" {
            return Err(format!(
                "vision model {:?} is not supported (only clip_vision_model)",
                self.model_type
            ));
        }
        if !matches!(self.hidden_act.as_str(), "quick_gelu" | "gelu") {
            return Err(format!(
                "vision hidden_act {:?} is not supported (quick_gelu, gelu)",
                self.hidden_act
            ));
        }
        let sizes = [
            self.hidden_size,
            self.intermediate_size,
            self.num_attention_heads,
            self.num_channels,
            self.image_size,
            self.patch_size,
        ];
        if sizes.iter().any(|&s| s == 0 || s > MAX_SIDE) || self.num_hidden_layers > MAX_SIDE {
            return Err(format!("vision_config sizes must be within 1..={MAX_SIDE}"));
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "vision hidden_size {} is not a multiple of its {} heads",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !self.image_size.is_multiple_of(self.patch_size) {
            return Err(format!(
                "vision image_size {} is not a multiple of patch_size {}",
                self.image_size, self.patch_size
            ));
        }
        Ok(())
    }

    /// Patches per image.
    pub fn patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }

    /// The tensors under `prefix` of the embeddings, the pre-norm and the first `layers`
    /// encoder layers, with their shapes.
    pub fn tensors(&self, prefix: &str, layers: usize) -> Vec<(String, Vec<usize>)> {
        let (h, inter, p) = (self.hidden_size, self.intermediate_size, self.patch_size);
        let mut tensors = vec![
            (format!("{prefix}.embeddings.patch_embedding.weight"), vec![h, self.num_channels, p, p]),
            (format!("{prefix}.embeddings.class_embedding"), vec![h]),
            (format!("{prefix}.embeddings.position_embedding.weight"), vec![self.patches() + 1, h]),
            (format!("{prefix}.pre_layrnorm.weight"), vec![h]),
            (format!("{prefix}.pre_layrnorm.bias"), vec![h]),
        ];
        for layer in 0..layers {
            let l = format!("{prefix}.encoder.layers.{layer}");
            let linears = [
                ("self_attn.q_proj", h, h),
                ("self_attn.k_proj", h, h),
                ("self_attn.v_proj", h, h),
                ("self_attn.out_proj", h, h),
                ("mlp.fc1", inter, h),
                ("mlp.fc2", h, inter),
            ];
            for (name, out, input) in linears {
                tensors.push((format!("{l}.{name}.weight"), vec![out, input]));
                tensors.push((format!("{l}.{name}.bias"), vec![out]));
            }
            for norm in ["layer_norm1", "layer_norm2"] {
                tensors.push((format!("{l}.{norm}.weight"), vec![h]));
                tensors.push((format!("{l}.{norm}.bias"), vec![h]));
            }
        }
        tensors
    }
}

/// Layer norm with f32 weight and bias.
#[derive(Debug, Clone)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    fn load(weights: &ShardTensors, prefix: &str, size: usize, eps: f64, device: &Device) -> Result<Self> {
        Ok(Self {
            weight: weights.vector_f32(&format!("{prefix}.weight"), size, device)?,
            bias: weights.vector_f32(&format!("{prefix}.bias"), size, device)?,
            eps: eps as f32,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::layer_norm(&x.contiguous()?, &self.weight, &self.bias, self.eps)?)
    }
}

/// One encoder layer: pre-norm self-attention over all positions, pre-norm MLP.
#[derive(Debug, Clone)]
struct EncoderLayer {
    layer_norm1: LayerNorm,
    qkv_proj: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    quick_gelu: bool,
}

impl EncoderLayer {
    fn load(weights: &ShardTensors, prefix: &str, config: &ClipConfig, device: &Device) -> Result<Self> {
        let (h, eps) = (config.hidden_size, config.layer_norm_eps);
        let attn = format!("{prefix}.self_attn");
        let mlp = format!("{prefix}.mlp");
        Ok(Self {
            layer_norm1: LayerNorm::load(weights, &format!("{prefix}.layer_norm1"), h, eps, device)?,
            qkv_proj: weights.linear(
                &attn,
                &[("q_proj", h), ("k_proj", h), ("v_proj", h)],
                h,
                true,
                device,
            )?,
            out_proj: weights.linear(&attn, &[("out_proj", h)], h, true, device)?,
            layer_norm2: LayerNorm::load(weights, &format!("{prefix}.layer_norm2"), h, eps, device)?,
            fc1: weights.linear(&mlp, &[("fc1", config.intermediate_size)], h, true, device)?,
            fc2: weights.linear(&mlp, &[("fc2", h)], config.intermediate_size, true, device)?,
            heads: config.num_attention_heads,
            quick_gelu: config.hidden_act == "quick_gelu",
        })
    }

    /// `x` is `[n, positions, hidden]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = (x + self.attend(&self.layer_norm1.forward(x)?)?)?;
        let hidden = self.fc1.forward(&self.layer_norm2.forward(&x)?)?;
        let activated = if self.quick_gelu {
            (&hidden * candle_nn::ops::sigmoid(&(&hidden * 1.702)?)?)?
        } else {
            hidden.gelu_erf()?
        };
        Ok((x + self.fc2.forward(&activated)?)?)
    }

    fn attend(&self, x: &Tensor) -> Result<Tensor> {
        let (n, positions, width) = x.dims3()?;
        let head_dim = width / self.heads;
        let [q, k, v]: [Tensor; 3] =
            self.qkv_proj.forward_parts(x, &[width; 3])?.try_into().expect("three parts were asked for");
        // (n, positions, heads, head_dim) -> (n, heads, positions, head_dim)
        let split = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((n, positions, self.heads, head_dim))?.transpose(1, 2)?.contiguous()?)
        };
        let (q, k, v) = (split(q)?, split(k)?, split(v)?);
        let scores = (q.matmul(&k.t()?)? * (head_dim as f64).powf(-0.5))?;
        let out = candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v)?;
        // (n, heads, positions, head_dim) -> (n, positions, width)
        self.out_proj.forward(&out.transpose(1, 2)?.reshape((n, positions, width))?)
    }
}

/// The embeddings and the first encoder layers of a CLIP vision tower.
#[derive(Debug, Clone)]
pub struct ClipVision {
    /// The patch convolution's kernel as a matrix `[hidden, channels * patch * patch]`.
    patch_embedding: Tensor,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    layers: Vec<EncoderLayer>,
    config: ClipConfig,
}

impl ClipVision {
    /// Loads the tower under `prefix` with its first `layers` encoder layers.
    pub fn load(
        weights: &ShardTensors,
        prefix: &str,
        config: &ClipConfig,
        layers: usize,
        device: &Device,
    ) -> Result<Self> {
        let (h, p, c) = (config.hidden_size, config.patch_size, config.num_channels);
        let embeddings = format!("{prefix}.embeddings");
        let kernel =
            weights.tensor_f32(&format!("{embeddings}.patch_embedding.weight"), &[h, c, p, p], device)?;
        Ok(Self {
            patch_embedding: kernel.reshape((h, c * p * p))?,
            class_embedding: weights.vector_f32(&format!("{embeddings}.class_embedding"), h, device)?,
            position_embedding: weights.tensor_f32(
                &format!("{embeddings}.position_embedding.weight"),
                &[config.patches() + 1, h],
                device,
            )?,
            pre_layrnorm: LayerNorm::load(
                weights,
                &format!("{prefix}.pre_layrnorm"),
                h,
                config.layer_norm_eps,
                device,
            )?,
            layers: (0..layers)
                .map(|layer| {
                    EncoderLayer::load(weights, &format!("{prefix}.encoder.layers.{layer}"), config, device)
                })
                .collect::<Result<_>>()?,
            config: config.clone(),
        })
    }

    /// The output of the loaded layers for images `[n, channels, size, size]`:
    /// `[n, 1 + patches, hidden]`, the class token first.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let config = &self.config;
        let (c, size, p) = (config.num_channels, config.image_size, config.patch_size);
        let n = match pixels.dims() {
            &[n, channels, height, width] if n > 0 && (channels, height, width) == (c, size, size) => n,
            dims => {
                return Err(Error::InvalidArgument(format!(
                    "images must be [n, {c}, {size}, {size}] pixel values, got {dims:?}"
                )))
            }
        };
        let device = self.patch_embedding.device();
        let grid = size / p;
        // (n, c, grid, p, grid, p) -> (n, grid, grid, c, p, p): one row per patch, in the
        // convolution kernel's (channel, row, column) order.
        let patches = pixels
            .to_device(device)?
            .to_dtype(candle_core::DType::F32)?
            .reshape((n, c, grid, p, grid, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((n * grid * grid, c * p * p))?;
        let patch_embeds =
            patches.matmul(&self.patch_embedding.t()?)?.reshape((n, grid * grid, config.hidden_size))?;
        let class = self.class_embedding.reshape((1, 1, config.hidden_size))?.repeat((n, 1, 1))?;
        let embeddings = Tensor::cat(&[class, patch_embeds], 1)?.broadcast_add(&self.position_embedding)?;
        let mut x = self.pre_layrnorm.forward(&embeddings)?;
        for layer in &self.layers {
            x = layer.forward(&x)?;
        }
        Ok(x)
    }
}
