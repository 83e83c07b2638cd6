//! LoRA adapters on a shard's frozen projections, kept and saved in Hugging Face PEFT's layout:
//! each adapted projection `W` of layer `i` gains `(alpha / rank) · B A`, with `A` `[rank, in]`
//! and `B` `[out, rank]` stored as `base_model.model.model.layers.{i}.{module}.lora_{A,B}.weight`
//! in `adapter_model.safetensors`, beside an `adapter_config.json`.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};

use super::config::ModelConfig;
use crate::error::{Error, Result};
use crate::shard::Shard;

/// PEFT's file names.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// PEFT's config file name.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";

/// Rank, scale and target projections of the adapters.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Inner dimension of each `B A` product.
    pub rank: usize,
    /// The update is scaled by `alpha / rank`.
    pub alpha: f64,
    /// Projection names (`q_proj`, `v_proj`, `gate_proj`, ...).
    pub targets: Vec<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self { rank: 8, alpha: 16.0, targets: vec!["q_proj".into(), "v_proj".into()] }
    }
}

impl LoraConfig {
    /// What the update is multiplied by.
    pub fn scaling(&self) -> f64 {
        self.alpha / self.rank as f64
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
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": false,
        })
    }

    /// The config PEFT's `adapter_config.json` holds.
    pub fn from_peft_json(value: &serde_json::Value) -> Result<Self> {
        let bad = |what: &str| Error::InvalidConfig(format!("{ADAPTER_CONFIG}: {what}"));
        let rank = value["r"].as_u64().ok_or_else(|| bad("no rank `r`"))? as usize;
        let alpha = value["lora_alpha"].as_f64().ok_or_else(|| bad("no `lora_alpha`"))?;
        let targets = value["target_modules"]
            .as_array()
            .ok_or_else(|| bad("`target_modules` is not a list"))?
            .iter()
            .map(|t| t.as_str().map(str::to_string).ok_or_else(|| bad("a target module is not a name")))
            .collect::<Result<Vec<_>>>()?;
        let config = Self { rank, alpha, targets };
        config.check()?;
        Ok(config)
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
        for layer in shard.start_layer..=shard.end_layer {
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
        let text = std::fs::read_to_string(dir.join(ADAPTER_CONFIG))
            .map_err(|e| Error::ConfigNotFound(format!("{}: {e}", dir.join(ADAPTER_CONFIG).display())))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::InvalidConfig(format!("{}: {e}", dir.join(ADAPTER_CONFIG).display())))?;
        let config = LoraConfig::from_peft_json(&json)?;
        let stored = candle_core::safetensors::load(dir.join(ADAPTER_WEIGHTS), &Device::Cpu)?;
        let mut pairs = BTreeMap::new();
        for layer in shard.start_layer..=shard.end_layer {
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
        let lora = LoraConfig { rank: 2, alpha: 4.0, targets: vec!["q_proj".into(), "down_proj".into()] };
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

    #[test]
    fn unknown_targets_and_rank_zero_are_refused() {
        let bad = LoraConfig { targets: vec!["qkv".into()], ..LoraConfig::default() };
        assert!(bad.check().unwrap_err().to_string().contains("unknown LoRA target qkv"));
        assert!(LoraConfig { rank: 0, ..LoraConfig::default() }.check().is_err());
    }
}
