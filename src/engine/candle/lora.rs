//! LoRA adapters on a shard's frozen projections, kept and saved in Hugging Face PEFT's layout:
//! each adapted projection `W` of layer `i` gains `s · B A` (`s` is `alpha / rank`, or
//! `alpha / sqrt(rank)` with rsLoRA), with `A` `[rank, in]`
//! and `B` `[out, rank]` stored as `base_model.model.model.layers.{i}.{module}.lora_{A,B}.weight`
//! in `adapter_model.safetensors`, beside an `adapter_config.json`.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use serde_json::Value;

use super::config::ModelConfig;
use crate::error::{Error, Result};
use crate::file_limits::{read_limited, CONFIG_FILE_LIMIT};
use crate::shard::Shard;

/// PEFT's file names.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// PEFT's config file name.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";

/// `adapter_config.json` fields that do not change what the adapters compute.
const INERT_FIELDS: [&str; 12] = [
    "task_type",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "lora_dropout",
    "auto_mapping",
    "peft_version",
    "runtime_config",
    "megatron_core",
    "qalora_group_size",
    "ensure_weight_tying",
    "layers_pattern",
];

/// Fields [`LoraConfig::from_peft_json`] reads; any other field must be unset.
const READ_FIELDS: [&str; 8] = [
    "peft_type",
    "r",
    "lora_alpha",
    "target_modules",
    "use_rslora",
    "layers_to_transform",
    "bias",
    "init_lora_weights",
];

/// `init_lora_weights` values that leave the base weights as they are (PiSSA, OLoRA, CorDA and
/// LoftQ rewrite the base weights the adapter was trained against).
const PLAIN_INITS: [&str; 3] = ["gaussian", "eva", "orthogonal"];

/// Rank, scale, target projections and layers of the adapters.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Inner dimension of each `B A` product.
    pub rank: usize,
    /// The update is scaled by `alpha / rank` (`alpha / sqrt(rank)` with rsLoRA).
    pub alpha: f64,
    /// Projection names (`q_proj`, `v_proj`, `gate_proj`, ...).
    pub targets: Vec<String>,
    /// rsLoRA's scale `alpha / sqrt(rank)` (PEFT's `use_rslora`).
    pub rslora: bool,
    /// The adapted layers (PEFT's `layers_to_transform`); `None`: every layer.
    pub layers: Option<Vec<i32>>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 16.0,
            targets: vec!["q_proj".into(), "v_proj".into()],
            rslora: false,
            layers: None,
        }
    }
}

impl LoraConfig {
    /// What the update is multiplied by.
    pub fn scaling(&self) -> f64 {
        match self.rslora {
            true => self.alpha / (self.rank as f64).sqrt(),
            false => self.alpha / self.rank as f64,
        }
    }

    /// Whether layer `layer` is adapted.
    pub fn adapts(&self, layer: i32) -> bool {
        self.layers.as_ref().is_none_or(|layers| layers.contains(&layer))
    }

    /// PEFT's `adapter_config.json` for adapters of `model_id`.
    pub fn to_peft_json(&self, model_id: &str) -> serde_json::Value {
        serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": model_id,
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": 0.0,
            "target_modules": self.targets,
            "use_rslora": self.rslora,
            "layers_to_transform": self.layers,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": false,
        })
    }

    /// The config of PEFT's `adapter_config.json`, refusing by name every field that makes
    /// the adapters compute something other than `W x + s · B A x` (DoRA, `fan_in_fan_out`,
    /// bias terms, per-module ranks, extra trained modules, ...).
    pub fn from_peft_json(json: &Value) -> std::result::Result<Self, String> {
        let fields = json.as_object().ok_or("not a JSON object")?;
        let known = |field: &str| INERT_FIELDS.contains(&field) || READ_FIELDS.contains(&field);
        if let Some((field, value)) = fields.iter().find(|(field, value)| !known(field) && is_set(value)) {
            return Err(format!("{field} is {value}; only plain LoRA adapters are supported"));
        }
        if let Some(kind) = json.get("peft_type").filter(|t| t.as_str() != Some("LORA")) {
            return Err(format!("peft_type is {kind}; only LORA adapters are supported"));
        }
        if let Some(bias) = json.get("bias").filter(|b| !b.is_null() && b.as_str() != Some("none")) {
            return Err(format!("bias is {bias}; adapters with bias terms are not supported"));
        }
        match json.get("init_lora_weights") {
            None | Some(Value::Null | Value::Bool(_)) => {}
            Some(Value::String(init)) if PLAIN_INITS.contains(&init.as_str()) => {}
            Some(init) => {
                return Err(format!("init_lora_weights is {init}, which rewrites the base weights"))
            }
        }
        let rank = json["r"].as_u64().ok_or("no rank `r`")? as usize;
        let alpha = json["lora_alpha"].as_f64().ok_or("no `lora_alpha`")?;
        let targets = json["target_modules"]
            .as_array()
            .ok_or("`target_modules` is not a list")?
            .iter()
            .map(|t| t.as_str().map(str::to_string).ok_or("a target module is not a name"))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let rslora = json.get("use_rslora").and_then(Value::as_bool).unwrap_or(false);
        let layers = peft_layers(json)?;
        let config = Self { rank, alpha, targets, rslora, layers };
        config.check().map_err(|e| match e {
            Error::InvalidArgument(message) => message,
            other => other.to_string(),
        })?;
        Ok(config)
    }

    /// The config in `dir`'s `adapter_config.json`; a problem is an [`Error::InvalidModel`]
    /// naming the file.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(ADAPTER_CONFIG);
        let bad = |what: String| Error::InvalidModel(format!("adapter {}: {what}", path.display()));
        let text = read_limited(&path, CONFIG_FILE_LIMIT).map_err(|e| bad(e.to_string()))?;
        let json: Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        Self::from_peft_json(&json).map_err(bad)
    }

    /// Rank at least 1 and every target a projection the models have.
    pub fn check(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(Error::InvalidArgument("a LoRA rank must be at least 1".into()));
        }
        match self.targets.iter().find(|t| module_of(t).is_none()) {
            Some(t) => Err(Error::InvalidArgument(format!(
                "unknown LoRA target {t} (known: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)"
            ))),
            None => Ok(()),
        }
    }
}

/// PEFT's `layers_to_transform` (one index or a list), checked against `layers_pattern`.
fn peft_layers(json: &Value) -> std::result::Result<Option<Vec<i32>>, String> {
    let index = |value: &Value| {
        value.as_u64().and_then(|n| i32::try_from(n).ok()).ok_or(format!("layers_to_transform holds {value}"))
    };
    let layers = match json.get("layers_to_transform") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(layers)) => layers.iter().map(index).collect::<std::result::Result<_, _>>()?,
        Some(layer) => vec![index(layer)?],
    };
    let pattern = json.get("layers_pattern").unwrap_or(&Value::Null);
    let plain = [Value::Null, Value::from("layers"), serde_json::json!(["layers"])];
    if !plain.contains(pattern) {
        return Err(format!("layers_pattern is {pattern}; the models' layers are `layers`"));
    }
    Ok(Some(layers))
}

/// Whether a config value asks for something: not null, false, zero or empty.
fn is_set(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

/// The module path of a projection inside a layer (`q_proj` -> `self_attn.q_proj`).
pub(super) fn module_of(target: &str) -> Option<String> {
    match target {
        "q_proj" | "k_proj" | "v_proj" | "o_proj" => Some(format!("self_attn.{target}")),
        "gate_proj" | "up_proj" | "down_proj" => Some(format!("mlp.{target}")),
        _ => None,
    }
}

/// `(in, out)` features of `target` in `config`'s model.
fn features(target: &str, config: &ModelConfig) -> (usize, usize) {
    let (hidden, inter) = (config.hidden_size, config.intermediate_size);
    let (q, kv) =
        (config.num_attention_heads * config.head_dim(), config.num_key_value_heads() * config.head_dim());
    match target {
        "q_proj" => (hidden, q),
        "k_proj" | "v_proj" => (hidden, kv),
        "o_proj" => (q, hidden),
        "gate_proj" | "up_proj" => (hidden, inter),
        _ => (inter, hidden),
    }
}

/// PEFT's name prefix of `target` in layer `layer`.
pub(super) fn peft_prefix(layer: i32, target: &str) -> String {
    format!("base_model.model.model.layers.{layer}.{}", module_of(target).expect("targets are checked"))
}

/// The subdirectory a shard's adapters are saved in: `layers-{start}-{end}`.
pub fn shard_dir_name(shard: &Shard) -> String {
    format!("layers-{}-{}", shard.start_layer, shard.end_layer)
}

/// One adapted projection's trainable pair.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// `[rank, in]`.
    pub a: Var,
    /// `[out, rank]`.
    pub b: Var,
}

/// The adapters of one shard's layers.
#[derive(Debug)]
pub struct Adapters {
    config: LoraConfig,
    /// By PEFT prefix.
    pairs: BTreeMap<String, LoraPair>,
}

impl Adapters {
    /// Fresh adapters as PEFT starts them: `A` uniform in `±1/sqrt(in)` (seeded), `B` zero, so
    /// the adapted model starts equal to the base.
    pub fn new(config: LoraConfig, shard: &Shard, model: &ModelConfig, seed: u64) -> Result<Self> {
        config.check()?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut pairs = BTreeMap::new();
        for layer in (shard.start_layer..=shard.end_layer).filter(|&layer| config.adapts(layer)) {
            for target in &config.targets {
                let (input, out) = features(target, model);
                let bound = 1.0 / (input as f32).sqrt();
                let a: Vec<f32> = (0..config.rank * input).map(|_| rng.random_range(-bound..bound)).collect();
                let a = Var::from_tensor(&Tensor::from_vec(a, (config.rank, input), &Device::Cpu)?)?;
                let b = Var::zeros((out, config.rank), DType::F32, &Device::Cpu)?;
                pairs.insert(peft_prefix(layer, target), LoraPair { a, b });
            }
        }
        Ok(Self { config, pairs })
    }

    /// The adapters of `shard`'s layers from a PEFT adapter directory, or from its
    /// `layers-{start}-{end}` subdirectory (where a ring saves each shard's adapters).
    pub fn load(dir: &Path, shard: &Shard, model: &ModelConfig) -> Result<Self> {
        let per_shard = dir.join(shard_dir_name(shard));
        let dir = if dir.join(ADAPTER_CONFIG).is_file() { dir } else { per_shard.as_path() };
        let config = LoraConfig::read(dir)?;
        let stored = candle_core::safetensors::load(dir.join(ADAPTER_WEIGHTS), &Device::Cpu)?;
        let mut pairs = BTreeMap::new();
        for layer in (shard.start_layer..=shard.end_layer).filter(|&layer| config.adapts(layer)) {
            for target in &config.targets {
                let prefix = peft_prefix(layer, target);
                let (input, out) = features(target, model);
                let take = |part: &str, shape: (usize, usize)| -> Result<Var> {
                    let name = format!("{prefix}.lora_{part}.weight");
                    let tensor = stored
                        .get(&name)
                        .ok_or_else(|| Error::InvalidModel(format!("{ADAPTER_WEIGHTS} has no {name}")))?;
                    if tensor.dims2()? != shape {
                        return Err(Error::InvalidModel(format!(
                            "{name} is {:?}, the model implies {shape:?}",
                            tensor.dims()
                        )));
                    }
                    Ok(Var::from_tensor(&tensor.to_dtype(DType::F32)?)?)
                };
                let pair =
                    LoraPair { a: take("A", (config.rank, input))?, b: take("B", (out, config.rank))? };
                pairs.insert(prefix, pair);
            }
        }
        Ok(Self { config, pairs })
    }

    /// The rank, scale and targets.
    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    /// The pair adapting `target` of layer `layer`, if it is adapted.
    pub fn pair(&self, layer: i32, target: &str) -> Option<&LoraPair> {
        module_of(target).and_then(|_| self.pairs.get(&peft_prefix(layer, target)))
    }

    /// Every trainable tensor by its PEFT name.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        self.pairs
            .iter()
            .flat_map(|(prefix, pair)| {
                [
                    (format!("{prefix}.lora_A.weight"), pair.a.clone()),
                    (format!("{prefix}.lora_B.weight"), pair.b.clone()),
                ]
            })
            .collect()
    }

    /// Writes `adapter_model.safetensors` and `adapter_config.json` to `dir`.
    pub fn save(&self, dir: &Path, model_id: &str) -> Result<()> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::InvalidArgument(format!("{}: {e}", dir.display())))?;
        let tensors: Vec<(String, Tensor)> =
            self.named_vars().into_iter().map(|(name, var)| (name, var.as_tensor().clone())).collect();
        candle_core::safetensors::save(&tensors.into_iter().collect(), dir.join(ADAPTER_WEIGHTS))?;
        let config =
            serde_json::to_string_pretty(&self.config.to_peft_json(model_id)).expect("JSON of a config");
        std::fs::write(dir.join(ADAPTER_CONFIG), config)
            .map_err(|e| Error::InvalidArgument(format!("{}: {e}", dir.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ModelConfig {
        serde_json::from_str(
            r#"{"model_type": "llama", "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 4,
                "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 4, "rms_norm_eps": 1e-5,
                "max_position_embeddings": 4}"#,
        )
        .unwrap()
    }

    /// Fresh adapters start as PEFT's (B zero), cover the shard's layers only, and come back
    /// from their PEFT files unchanged.
    #[test]
    fn fresh_adapters_save_and_load_in_peft_layout() {
        let shard = Shard::new("m", 1, 2, 4);
        let lora = LoraConfig {
            rank: 2,
            alpha: 4.0,
            targets: vec!["q_proj".into(), "down_proj".into()],
            ..LoraConfig::default()
        };
        let adapters = Adapters::new(lora.clone(), &shard, &config(), 7).unwrap();
        let names: Vec<String> = adapters.named_vars().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names.len(), 8);
        assert!(names.contains(&"base_model.model.model.layers.2.mlp.down_proj.lora_B.weight".to_string()));
        assert!(adapters.pair(0, "q_proj").is_none() && adapters.pair(1, "v_proj").is_none());
        let pair = adapters.pair(1, "q_proj").unwrap();
        assert_eq!(pair.a.dims(), &[2, 8]);
        assert_eq!(pair.b.as_tensor().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        assert_eq!(adapters.pair(2, "down_proj").unwrap().a.dims(), &[2, 16]);

        let dir = std::env::temp_dir().join(format!("lora-test-{}", std::process::id()));
        adapters.save(&dir, "m").unwrap();
        let loaded = Adapters::load(&dir, &shard, &config()).unwrap();
        assert_eq!(loaded.config(), &lora);
        for ((name, saved), (_, read)) in adapters.named_vars().into_iter().zip(loaded.named_vars()) {
            let diff = (saved.as_tensor() - read.as_tensor()).unwrap().abs().unwrap().sum_all().unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{name}");
        }
        let other_layers =
            Adapters::load(&dir, &Shard::new("m", 0, 0, 4), &config()).unwrap_err().to_string();
        assert!(other_layers.contains("has no base_model.model.model.layers.0"), "{other_layers}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn peft_config(extra: Value) -> std::result::Result<LoraConfig, String> {
        let mut json = serde_json::json!({
            "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "down_proj"],
            "fan_in_fan_out": false, "use_dora": false, "bias": "none", "modules_to_save": null,
            "rank_pattern": {}, "alpha_pattern": {}, "loftq_config": {}, "init_lora_weights": true,
            "megatron_core": "megatron.core", "qalora_group_size": 16, "lora_dropout": 0.05,
        });
        json.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        LoraConfig::from_peft_json(&json)
    }

    #[test]
    fn a_plain_config_gives_alpha_over_r_and_rslora_alpha_over_its_root() {
        let plain = peft_config(serde_json::json!({})).unwrap();
        assert_eq!((plain.scaling(), plain.layers.clone()), (2.0, None));
        assert_eq!(plain.targets, ["q_proj", "down_proj"]);
        assert_eq!(peft_config(serde_json::json!({"use_rslora": true})).unwrap().scaling(), 4.0);
        let some =
            peft_config(serde_json::json!({"layers_to_transform": [1, 3], "layers_pattern": "layers"}))
                .unwrap();
        assert!(some.adapts(3) && !some.adapts(2));
        assert_eq!(peft_config(serde_json::json!({"layers_to_transform": 2})).unwrap().layers, Some(vec![2]));
    }

    #[test]
    fn fields_that_change_the_update_are_refused_by_name() {
        for (field, value) in [
            ("fan_in_fan_out", serde_json::json!(true)),
            ("use_dora", serde_json::json!(true)),
            ("rank_pattern", serde_json::json!({"q_proj": 8})),
            ("modules_to_save", serde_json::json!(["lm_head"])),
            ("bias", serde_json::json!("all")),
            ("init_lora_weights", serde_json::json!("pissa")),
            ("peft_type", serde_json::json!("IA3")),
            ("layers_pattern", serde_json::json!("h")),
            ("some_future_option", serde_json::json!(1)),
        ] {
            let mut extra = serde_json::json!({ field: value });
            if field == "layers_pattern" {
                extra["layers_to_transform"] = serde_json::json!([0]);
            }
            let message = peft_config(extra).unwrap_err();
            assert!(message.starts_with(field), "{field}: {message}");
        }
        let unknown = peft_config(serde_json::json!({"target_modules": ["lm_head"]})).unwrap_err();
        assert!(unknown.contains("unknown LoRA target lm_head"), "{unknown}");
    }

    #[test]
    fn unknown_targets_and_rank_zero_are_refused() {
        let bad = LoraConfig { targets: vec!["qkv".into()], ..LoraConfig::default() };
        assert!(bad.check().unwrap_err().to_string().contains("unknown LoRA target qkv"));
        assert!(LoraConfig { rank: 0, ..LoraConfig::default() }.check().is_err());
    }
}
