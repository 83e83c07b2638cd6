//! LLaVA-1.5 (`model_type` "llava"): a CLIP vision tower and a two-layer projector in front of
//! a Llama decoder. Its `config.json` nests the decoder in `text_config` and the tower in
//! `vision_config`, each holding only what differs from its family's defaults; its checkpoint
//! puts them under `language_model` and `vision_tower`, laid out as transformers 4 or 5 saves
//! them. Each image's features replace the embeddings of the prompt's image tokens.

use std::borrow::Cow;

use candle_core::{Device, Tensor};
use serde::Deserialize;
use serde_json::{json, Value};

use super::clip::{ClipConfig, ClipVision};
use super::linear::Linear;
use super::tensors::ShardTensors;
use crate::error::{Error, Result};

/// Where the tower's tensors are named from, once checkpoint names are made canonical.
const VISION_PREFIX: &str = "vision_tower";
/// Where the projector's tensors are named from.
const PROJECTOR_PREFIX: &str = "multi_modal_projector";

/// Checkpoint name prefixes and the canonical ones they stand for: the decoder's as a plain
/// Llama's, the tower's relative to CLIP's vision transformer. Longer prefixes come first.
const PREFIXES: &[(&str, &str)] = &[
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.language_model.", "model."),
    ("model.vision_tower.vision_model.", "vision_tower."),
    ("vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
];

/// The canonical name of a checkpoint tensor: a LLaVA decoder's tensors as a Llama's
/// (`model.layers.0...`, `lm_head.weight`), its tower's as `vision_tower.{CLIP name}`; other
/// names are their own.
pub fn canonical_name(name: &str) -> Cow<'_, str> {
    for (stored, canonical) in PREFIXES {
        if let Some(rest) = name.strip_prefix(stored) {
            return Cow::Owned(format!("{canonical}{rest}"));
        }
    }
    Cow::Borrowed(name)
}

/// Whether a canonical tensor name belongs to the tower or the projector (first shard only).
pub fn is_vision_tensor(name: &str) -> bool {
    name.starts_with("vision_tower.") || name.starts_with("multi_modal_projector.")
}

/// LLaVA's own `config.json` fields.
#[derive(Debug, Clone, PartialEq)]
pub struct LlavaConfig {
    /// The CLIP vision tower.
    pub vision: ClipConfig,
    /// The token whose embeddings an image's features replace.
    pub image_token_id: u32,
    /// Encoder layers to run, the last one's output being the features (`vision_feature_layer`
    /// -2 of a 24-layer tower runs 23).
    pub feature_layers: usize,
    /// Whether the class token's feature is kept (`vision_feature_select_strategy` "full").
    pub keeps_class_token: bool,
    /// Whether the projector's layers have biases.
    pub projector_bias: bool,
}

/// The top-level fields, as `config.json` gives them.
#[derive(Debug, Deserialize)]
struct Fields {
    #[serde(alias = "image_token_id", default = "default_image_token")]
    image_token_index: u32,
    #[serde(default = "default_feature_layer")]
    vision_feature_layer: Value,
    #[serde(default = "default_strategy")]
    vision_feature_select_strategy: String,
    #[serde(default = "default_projector_act")]
    projector_hidden_act: String,
    #[serde(default = "default_true")]
    multimodal_projector_bias: bool,
}

fn default_image_token() -> u32 {
    32000
}

fn default_feature_layer() -> Value {
    json!(-2)
}

fn default_strategy() -> String {
    "default".into()
}

fn default_projector_act() -> String {
    "gelu".into()
}

fn default_true() -> bool {
    true
}

/// transformers' `LlamaConfig` defaults, which LLaVA's `text_config` leaves out.
fn llama_defaults() -> Value {
    json!({
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
        "num_hidden_layers": 32, "num_attention_heads": 32, "vocab_size": 32000,
        "rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "hidden_act": "silu",
        "tie_word_embeddings": false
    })
}

/// transformers' `CLIPVisionConfig` defaults.
fn clip_defaults() -> Value {
    json!({
        "model_type": "clip_vision_model", "hidden_size": 768, "intermediate_size": 3072,
        "num_hidden_layers": 12, "num_attention_heads": 12, "num_channels": 3, "image_size": 224,
        "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5
    })
}

/// The tower LLaVA's config makes when it gives no `vision_config` (LLaVA-1.5's CLIP ViT-L/14 at 336).
fn llava_vision_defaults() -> Value {
    json!({
        "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
        "num_attention_heads": 16, "image_size": 336, "patch_size": 14
    })
}

/// `defaults` with the fields of the object `given` put over them.
fn overlaid(mut defaults: Value, given: Option<&Value>) -> std::result::Result<Value, String> {
    let Some(given) = given else { return Ok(defaults) };
    let given = given.as_object().ok_or("text_config and vision_config must be objects")?;
    let fields = defaults.as_object_mut().expect("defaults are objects");
    for (key, value) in given {
        fields.insert(key.clone(), value.clone());
    }
    Ok(defaults)
}

/// Splits a `config.json` into the decoder's config (the file itself for other models) and,
/// for LLaVA, its own fields.
pub fn split_config(config: Value) -> std::result::Result<(Value, Option<LlavaConfig>), String> {
    if config.get("model_type").and_then(Value::as_str) != Some("llava") {
        return Ok((config, None));
    }
    let mut text = overlaid(llama_defaults(), config.get("text_config"))?;
    if text["model_type"] != "llama" {
        return Err(format!("LLaVA's text model {} is not supported (only llama)", text["model_type"]));
    }
    // The top-level tie wins over the text model's, as transformers reads it.
    if let Some(tie) = config.get("tie_word_embeddings") {
        text["tie_word_embeddings"] = tie.clone();
    }
    let vision = match config.get("vision_config") {
        Some(given) => overlaid(clip_defaults(), Some(given))?,
        None => overlaid(clip_defaults(), Some(&llava_vision_defaults()))?,
    };
    let vision: ClipConfig =
        serde_json::from_value(vision).map_err(|e| format!("vision_config is not a CLIP config: {e}"))?;
    vision.validate()?;
    let fields: Fields = serde_json::from_value(config).map_err(|e| e.to_string())?;
    if fields.projector_hidden_act != "gelu" {
        return Err(format!(
            "projector_hidden_act {:?} is not supported (only gelu)",
            fields.projector_hidden_act
        ));
    }
    let keeps_class_token = match fields.vision_feature_select_strategy.as_str() {
        "default" => false,
        "full" => true,
        other => {
            return Err(format!("vision_feature_select_strategy {other:?} is not supported (default, full)"))
        }
    };
    let feature_layers = feature_layers(&fields.vision_feature_layer, vision.num_hidden_layers)?;
    let llava = LlavaConfig {
        vision,
        image_token_id: fields.image_token_index,
        feature_layers,
        keeps_class_token,
        projector_bias: fields.multimodal_projector_bias,
    };
    Ok((text, Some(llava)))
}

/// Encoder layers to run for `vision_feature_layer` (an index into the embeddings' output and
/// each layer's, negative from the end) of a tower of `layers` layers.
fn feature_layers(value: &Value, layers: usize) -> std::result::Result<usize, String> {
    let index = value
        .as_i64()
        .ok_or_else(|| format!("vision_feature_layer {value} is not supported (only one layer)"))?;
    let outputs = layers as i64 + 1;
    let at = if index < 0 { outputs + index } else { index };
    if !(0..outputs).contains(&at) {
        return Err(format!("vision_feature_layer {index} is outside the tower's {layers} layers"));
    }
    Ok(at as usize)
}

impl LlavaConfig {
    /// Features one image gives: a patch's each, and the class token's if kept.
    pub fn tokens_per_image(&self) -> usize {
        self.vision.patches() + usize::from(self.keeps_class_token)
    }

    /// The tower's and the projector's tensors, with their shapes, for a decoder `hidden` wide.
    pub fn tensors(&self, hidden: usize) -> Vec<(String, Vec<usize>)> {
        let mut tensors = self.vision.tensors(VISION_PREFIX, self.feature_layers);
        let width = self.vision.hidden_size;
        for (layer, input) in [("linear_1", width), ("linear_2", hidden)] {
            tensors.push((format!("{PROJECTOR_PREFIX}.{layer}.weight"), vec![hidden, input]));
            if self.projector_bias {
                tensors.push((format!("{PROJECTOR_PREFIX}.{layer}.bias"), vec![hidden]));
            }
        }
        tensors
    }
}

/// The tower and the projector: images in, one decoder-wide feature per image token out.
#[derive(Debug, Clone)]
pub struct VisionTower {
    clip: ClipVision,
    linear_1: Linear,
    linear_2: Linear,
    config: LlavaConfig,
}

impl VisionTower {
    /// Loads the tower's first `config.feature_layers` layers and the projector.
    pub fn load(
        weights: &ShardTensors,
        config: &LlavaConfig,
        hidden: usize,
        device: &Device,
    ) -> Result<Self> {
        let clip = ClipVision::load(weights, VISION_PREFIX, &config.vision, config.feature_layers, device)?;
        let bias = config.projector_bias;
        let width = config.vision.hidden_size;
        Ok(Self {
            clip,
            linear_1: weights.linear(PROJECTOR_PREFIX, &[("linear_1", hidden)], width, bias, device)?,
            linear_2: weights.linear(PROJECTOR_PREFIX, &[("linear_2", hidden)], hidden, bias, device)?,
            config: config.clone(),
        })
    }

    /// The features of images `[n, channels, size, size]` (preprocessed as the model's image
    /// processor does), image after image: `[n * tokens_per_image, hidden]`.
    pub fn image_features(&self, pixels: &Tensor) -> Result<Tensor> {
        let states = self.clip.forward(pixels)?;
        let (n, positions, width) = states.dims3()?;
        let skip = usize::from(!self.config.keeps_class_token);
        let selected =
            states.narrow(1, skip, positions - skip)?.reshape((1, n * (positions - skip), width))?;
        let projected = self.linear_2.forward(&self.linear_1.forward(&selected)?.gelu_erf()?)?;
        Ok(projected.squeeze(0)?)
    }

    /// The token whose embeddings image features replace.
    pub fn image_token_id(&self) -> u32 {
        self.config.image_token_id
    }
}

/// `embeddings` `[seq, hidden]` of the prompt `ids` with the rows of image tokens replaced, in
/// order, by the rows of `features` `[k, hidden]`; the counts must agree.
pub fn merge(embeddings: &Tensor, ids: &[u32], image_token: u32, features: &Tensor) -> Result<Tensor> {
    let (seq, k) = (ids.len(), features.dim(0)?);
    let slots = ids.iter().filter(|&&id| id == image_token).count();
    if slots != k {
        return Err(Error::InvalidArgument(format!(
            "the prompt holds {slots} image tokens but its images give {k} features"
        )));
    }
    let mut next = seq;
    let rows: Vec<u32> = ids
        .iter()
        .enumerate()
        .map(|(i, &id)| {
            if id != image_token {
                return i as u32;
            }
            next += 1;
            (next - 1) as u32
        })
        .collect();
    let table = Tensor::cat(&[embeddings, &features.to_device(embeddings.device())?], 0)?;
    Ok(table.index_select(&Tensor::new(rows, embeddings.device())?, 0)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_names_of_transformers_4_and_5_become_canonical() {
        let cases = [
            ("language_model.model.layers.3.mlp.up_proj.weight", "model.layers.3.mlp.up_proj.weight"),
            ("model.language_model.embed_tokens.weight", "model.embed_tokens.weight"),
            ("language_model.lm_head.weight", "lm_head.weight"),
            ("vision_tower.vision_model.pre_layrnorm.bias", "vision_tower.pre_layrnorm.bias"),
            (
                "model.vision_tower.vision_model.embeddings.class_embedding",
                "vision_tower.embeddings.class_embedding",
            ),
            (
                "model.vision_tower.encoder.layers.0.mlp.fc1.weight",
                "vision_tower.encoder.layers.0.mlp.fc1.weight",
            ),
            ("vision_tower.embeddings.class_embedding", "vision_tower.embeddings.class_embedding"),
            ("model.multi_modal_projector.linear_1.bias", "multi_modal_projector.linear_1.bias"),
            ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.weight"),
            ("lm_head.weight", "lm_head.weight"),
        ];
        for (stored, canonical) in cases {
            assert_eq!(canonical_name(stored), canonical);
        }
    }

    #[test]
    fn llava_15_config_takes_llama_and_clip_defaults() {
        // llava-hf/llava-1.5-7b-hf's config.json, as on the hub.
        let config = json!({
            "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100,
            "image_token_index": 32000, "model_type": "llava", "pad_token_id": 32001,
            "projector_hidden_act": "gelu",
            "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
                "torch_dtype": "float16", "vocab_size": 32064},
            "tie_word_embeddings": false, "torch_dtype": "float16", "transformers_version": "4.36.0.dev0",
            "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
            "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064
        });
        let (text, llava) = split_config(config).unwrap();
        let llava = llava.unwrap();
        assert_eq!(
            (text["hidden_size"].clone(), text["num_hidden_layers"].clone()),
            (json!(4096), json!(32))
        );
        assert_eq!(
            (text["vocab_size"].clone(), text["intermediate_size"].clone()),
            (json!(32064), json!(11008))
        );
        assert_eq!((llava.image_token_id, llava.feature_layers, llava.keeps_class_token), (32000, 23, false));
        assert_eq!(llava.tokens_per_image(), 576);
        assert_eq!(llava.vision.hidden_act, "quick_gelu");
    }

    #[test]
    fn unsupported_llava_settings_are_named() {
        let base = json!({"model_type": "llava", "vision_config": {"num_hidden_layers": 2}});
        let with = |key: &str, value: Value| {
            let mut config = base.clone();
            config[key] = value;
            split_config(config).unwrap_err()
        };
        assert!(with("vision_feature_layer", json!([-2, -1])).contains("vision_feature_layer"));
        assert!(with("vision_feature_layer", json!(-4)).contains("outside"));
        assert!(with("vision_feature_select_strategy", json!("mean")).contains("mean"));
        assert!(with("projector_hidden_act", json!("relu")).contains("relu"));
        assert!(with("text_config", json!({"model_type": "mistral"})).contains("mistral"));
    }

    #[test]
    fn image_features_take_the_image_tokens_places_in_order() {
        let embeddings = Tensor::new(&[[0f32, 0.], [1., 1.], [2., 2.], [3., 3.]], &Device::Cpu).unwrap();
        let features = Tensor::new(&[[10f32, 10.], [20., 20.]], &Device::Cpu).unwrap();
        let merged = merge(&embeddings, &[5, 9, 9, 6], 9, &features).unwrap();
        assert_eq!(merged.to_vec2::<f32>().unwrap(), [[0., 0.], [10., 10.], [20., 20.], [3., 3.]]);
        let error = merge(&embeddings, &[5, 9, 7, 6], 9, &features).unwrap_err().to_string();
        assert!(error.contains("1 image tokens but its images give 2 features"), "{error}");
    }
}
