//! A LoRA adapter merged into a shard's weights as they load, for inference: each adapted
//! projection `W` of a layer the shard holds becomes `W + s · B A` (`s` is `alpha / r`, or
//! `alpha / sqrt(r)` with rsLoRA), computed in f32 and stored in the checkpoint's dtype, so an
//! adapted model costs no more per token than its base.
//!
//! The adapter is a PEFT directory (`adapter_config.json`, `adapter_model.safetensors`) or one of
//! `train`'s checkpoints, whose `layers-{start}-{end}` subdirectories each hold the PEFT adapter
//! of one training shard; a shard takes each of its layers from the subdirectory covering it.
//! Every layer the config adapts (`layers_to_transform`, else all) must have its tensors, and
//! every tensor merged must land on a weight the model loads as a projection of its own.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::lora::{module_of, peft_prefix, LoraConfig, ADAPTER_CONFIG, ADAPTER_WEIGHTS};
use crate::error::{Error, Result};
use crate::file_limits::{read_limited, CONFIG_FILE_LIMIT};
use crate::shard::Shard;

/// The variable naming the adapter a candle engine merges when it is given none.
pub const ADAPTER_ENV: &str = "EXO_ADAPTER";

/// `adapter_config.json` fields that do not change what a merge computes.
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

/// Fields read by [`MergeConfig::from_peft_json`]; any other field must be unset.
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

/// What one PEFT adapter's config says about merging it.
#[derive(Debug, Clone, PartialEq)]
struct MergeConfig {
    lora: LoraConfig,
    /// What `B A` is multiplied by.
    scaling: f64,
    /// The adapted layers (`layers_to_transform`); `None`: every layer.
    layers: Option<Vec<i32>>,
}

impl MergeConfig {
    /// The config of PEFT's `adapter_config.json`, refusing every field that would make the
    /// merge differ from `W + s · B A` (DoRA, `fan_in_fan_out`, bias terms, per-module ranks,
    /// extra trained modules, ...).
    fn from_peft_json(json: &Value) -> std::result::Result<Self, String> {
        let fields = json.as_object().ok_or("not a JSON object")?;
        for (field, value) in fields {
            if !INERT_FIELDS.contains(&field.as_str())
                && !READ_FIELDS.contains(&field.as_str())
                && is_set(value)
            {
                return Err(format!("{field} is {value}; merging supports plain LoRA adapters without it"));
            }
        }
        if let Some(kind) = json.get("peft_type").filter(|t| t.as_str() != Some("LORA")) {
            return Err(format!("peft_type is {kind}; only LORA adapters merge"));
        }
        if let Some(bias) = json.get("bias").filter(|b| !b.is_null() && b.as_str() != Some("none")) {
            return Err(format!("bias is {bias}; adapters with bias terms do not merge yet"));
        }
        match json.get("init_lora_weights") {
            None | Some(Value::Null | Value::Bool(_)) => {}
            Some(Value::String(init)) if PLAIN_INITS.contains(&init.as_str()) => {}
            Some(init) => {
                return Err(format!("init_lora_weights is {init}, which rewrites the base weights"));
            }
        }
        let lora = LoraConfig::from_peft_json(json).map_err(|e| e.to_string())?;
        let scaling = match json.get("use_rslora").and_then(Value::as_bool) {
            Some(true) => lora.alpha / (lora.rank as f64).sqrt(),
            _ => lora.scaling(),
        };
        let layers = match json.get("layers_to_transform") {
            None | Some(Value::Null) => None,
            Some(Value::Number(layer)) => Some(vec![layer_index(layer)?]),
            Some(Value::Array(layers)) => Some(
                layers
                    .iter()
                    .map(|l| {
                        l.as_number().ok_or(format!("layers_to_transform holds {l}")).and_then(layer_index)
                    })
                    .collect::<std::result::Result<_, _>>()?,
            ),
            Some(other) => return Err(format!("layers_to_transform is {other}")),
        };
        if layers.is_some() {
            let pattern = json.get("layers_pattern").unwrap_or(&Value::Null);
            let plain = [Value::Null, Value::from("layers"), serde_json::json!(["layers"])];
            if !plain.contains(pattern) {
                return Err(format!("layers_pattern is {pattern}; the models' layers are `layers`"));
            }
        }
        Ok(Self { lora, scaling, layers })
    }

    /// Whether the config adapts `layer`.
    fn adapts(&self, layer: i32) -> bool {
        self.layers.as_ref().is_none_or(|layers| layers.contains(&layer))
    }
}

/// A layer index of `layers_to_transform`.
fn layer_index(number: &serde_json::Number) -> std::result::Result<i32, String> {
    number.as_u64().and_then(|n| i32::try_from(n).ok()).ok_or(format!("layers_to_transform holds {number}"))
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

/// One adapted projection's factors, in f32.
struct Delta {
    /// PEFT's name prefix of the pair, for messages.
    name: String,
    /// `[rank, in]`.
    a: Tensor,
    /// `[out, rank]`.
    b: Tensor,
    scaling: f64,
}

/// The adapter of one shard's layers, ready to merge into their projections.
pub struct LoraMerge {
    /// By the checkpoint name of the weight each adapts (`model.layers.{i}.self_attn.q_proj.weight`).
    deltas: BTreeMap<String, Delta>,
    /// The weights merged so far.
    merged: Mutex<BTreeSet<String>>,
}

impl LoraMerge {
    /// The adapter at `path` (a PEFT directory or a checkpoint of `layers-*` subdirectories)
    /// for the layers of `shard`.
    pub fn load(path: &Path, shard: &Shard) -> Result<Self> {
        let mut deltas = BTreeMap::new();
        for (dir, layers) in adapter_dirs(path, shard)? {
            read_deltas(&dir, &layers, &mut deltas)?;
        }
        Ok(Self { deltas, merged: Mutex::default() })
    }

    /// Reads the config of every adapter at `path` (a quick check before any model loads).
    pub fn check(path: &Path) -> Result<()> {
        let dirs = match plain_or_split(path)? {
            Layout::Plain => vec![path.to_path_buf()],
            Layout::Split(dirs) => dirs.into_iter().map(|(dir, _)| dir).collect(),
        };
        dirs.iter().try_for_each(|dir| read_config(dir).map(drop))
    }

    /// Whether any of the weights `names` (name and rows of each) is adapted.
    pub fn adapts(&self, names: &[(String, usize)]) -> bool {
        names.iter().any(|(name, _)| self.deltas.contains_key(name))
    }

    /// The stacked weights `names` (name and rows of each) of `base` (`[rows, cols]`, on the
    /// host) with the adapted ones' `s · B A` added in f32, in `base`'s dtype.
    pub fn merge(&self, names: &[(String, usize)], base: &Tensor) -> Result<Tensor> {
        let (_, cols) = base.dims2()?;
        let base_f32 = base.to_dtype(DType::F32)?;
        let mut parts = Vec::with_capacity(names.len());
        let mut at = 0;
        for (name, rows) in names {
            let part = base_f32.narrow(0, at, *rows)?;
            at += rows;
            let Some(delta) = self.deltas.get(name) else {
                parts.push(part);
                continue;
            };
            let (rank, a_cols) = delta.a.dims2()?;
            let (b_rows, _) = delta.b.dims2()?;
            if (a_cols, b_rows) != (cols, *rows) {
                return Err(Error::InvalidModel(format!(
                    "adapter pair {} is [{b_rows}, {rank}]·[{rank}, {a_cols}]; the model's {name} is [{rows}, {cols}]",
                    delta.name
                )));
            }
            parts.push((part + (delta.b.matmul(&delta.a)? * delta.scaling)?)?);
            self.merged.lock().expect("merge lock poisoned").insert(name.clone());
        }
        Ok(Tensor::cat(&parts, 0)?.to_dtype(base.dtype())?)
    }

    /// Every adapted weight was merged; else the first that was not, named (the model has no
    /// such separate projection: fused q/k/v, experts, another attention).
    pub fn check_all_merged(&self) -> Result<()> {
        let merged = self.merged.lock().expect("merge lock poisoned");
        match self.deltas.iter().find(|(name, _)| !merged.contains(*name)) {
            Some((name, delta)) => Err(Error::InvalidModel(format!(
                "adapter pair {} adapts {name}, which this model has no projection of its own for",
                delta.name
            ))),
            None => Ok(()),
        }
    }
}

/// How an adapter path is laid out.
enum Layout {
    /// One PEFT adapter.
    Plain,
    /// `train`'s checkpoint: PEFT adapters in `layers-{start}-{end}` subdirectories.
    Split(Vec<(PathBuf, (i32, i32))>),
}

/// Whether `path` is a PEFT adapter or a checkpoint of per-shard adapters.
fn plain_or_split(path: &Path) -> Result<Layout> {
    if path.join(ADAPTER_CONFIG).is_file() {
        return Ok(Layout::Plain);
    }
    let entries = std::fs::read_dir(path)
        .map_err(|e| Error::InvalidModel(format!("adapter {}: {e}", path.display())))?;
    let mut dirs: Vec<(PathBuf, (i32, i32))> = entries
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let name = entry.file_name().into_string().ok()?;
            let (start, end) = name.strip_prefix("layers-")?.split_once('-')?;
            Some((entry.path(), (start.parse().ok()?, end.parse().ok()?)))
        })
        .collect();
    if dirs.is_empty() {
        return Err(Error::InvalidModel(format!(
            "adapter {} holds neither {ADAPTER_CONFIG} nor layers-START-END directories",
            path.display()
        )));
    }
    dirs.sort_by_key(|(_, range)| *range);
    Ok(Layout::Split(dirs))
}

/// The adapter directories `shard` reads and the layers it takes from each.
fn adapter_dirs(path: &Path, shard: &Shard) -> Result<Vec<(PathBuf, Vec<i32>)>> {
    let layers = shard.start_layer..=shard.end_layer;
    let dirs = match plain_or_split(path)? {
        Layout::Plain => return Ok(vec![(path.to_path_buf(), layers.collect())]),
        Layout::Split(dirs) => dirs,
    };
    let mut taken: Vec<(PathBuf, Vec<i32>)> = Vec::new();
    for layer in layers {
        let Some((dir, _)) = dirs.iter().find(|(_, (start, end))| (*start..=*end).contains(&layer)) else {
            let held: Vec<String> = dirs.iter().map(|(_, (s, e))| format!("layers-{s}-{e}")).collect();
            return Err(Error::InvalidModel(format!(
                "adapter {}: no directory covers layer {layer} (it has {})",
                path.display(),
                held.join(", ")
            )));
        };
        match taken.iter_mut().find(|(d, _)| d == dir) {
            Some((_, layers)) => layers.push(layer),
            None => taken.push((dir.clone(), vec![layer])),
        }
    }
    Ok(taken)
}

/// The merge config of the PEFT adapter in `dir`.
fn read_config(dir: &Path) -> Result<MergeConfig> {
    let path = dir.join(ADAPTER_CONFIG);
    let bad = |what: String| Error::InvalidModel(format!("adapter {}: {what}", path.display()));
    let text = read_limited(&path, CONFIG_FILE_LIMIT).map_err(|e| bad(e.to_string()))?;
    let json: Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    MergeConfig::from_peft_json(&json).map_err(bad)
}

/// Adds the deltas of `layers` from the PEFT adapter in `dir` to `deltas`.
fn read_deltas(dir: &Path, layers: &[i32], deltas: &mut BTreeMap<String, Delta>) -> Result<()> {
    let config = read_config(dir)?;
    let file = dir.join(ADAPTER_WEIGHTS);
    let stored = candle_core::safetensors::load(&file, &Device::Cpu)
        .map_err(|e| Error::InvalidModel(format!("adapter {}: {e}", file.display())))?;
    let rank = config.lora.rank;
    for &layer in layers.iter().filter(|&&layer| config.adapts(layer)) {
        for target in &config.lora.targets {
            let prefix = peft_prefix(layer, target);
            let factor = |part: &str| -> Result<Tensor> {
                let name = format!("{prefix}.lora_{part}.weight");
                let tensor = stored.get(&name).ok_or_else(|| {
                    Error::InvalidModel(format!("adapter {} has no {name}", file.display()))
                })?;
                let dims = tensor.dims2().map_err(|_| {
                    Error::InvalidModel(format!("adapter tensor {name} is {:?}, not a matrix", tensor.dims()))
                })?;
                let tensor_rank = if part == "A" { dims.0 } else { dims.1 };
                if tensor_rank != rank {
                    return Err(Error::InvalidModel(format!(
                        "adapter tensor {name} is {dims:?}, of rank {tensor_rank}; {ADAPTER_CONFIG} says r = {rank}"
                    )));
                }
                Ok(tensor.to_dtype(DType::F32)?)
            };
            let delta = Delta { a: factor("A")?, b: factor("B")?, scaling: config.scaling, name: prefix };
            let module = module_of(target).expect("targets are checked");
            deltas.insert(format!("model.layers.{layer}.{module}.weight"), delta);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: Value) -> std::result::Result<MergeConfig, String> {
        let mut json = serde_json::json!({
            "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "down_proj"],
            "fan_in_fan_out": false, "use_dora": false, "bias": "none", "modules_to_save": null,
            "rank_pattern": {}, "alpha_pattern": {}, "loftq_config": {}, "init_lora_weights": true,
            "megatron_core": "megatron.core", "qalora_group_size": 16, "lora_dropout": 0.05,
        });
        json.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        MergeConfig::from_peft_json(&json)
    }

    #[test]
    fn a_plain_config_gives_alpha_over_r_and_rslora_alpha_over_its_root() {
        let plain = config(serde_json::json!({})).unwrap();
        assert_eq!((plain.scaling, plain.layers.clone()), (2.0, None));
        assert_eq!(plain.lora.targets, ["q_proj", "down_proj"]);
        assert_eq!(config(serde_json::json!({"use_rslora": true})).unwrap().scaling, 4.0);
        let some =
            config(serde_json::json!({"layers_to_transform": [1, 3], "layers_pattern": "layers"})).unwrap();
        assert!(some.adapts(3) && !some.adapts(2));
        assert_eq!(config(serde_json::json!({"layers_to_transform": 2})).unwrap().layers, Some(vec![2]));
    }

    #[test]
    fn fields_that_change_the_merge_are_refused_by_name() {
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
            let message = config(extra).unwrap_err();
            assert!(message.starts_with(field), "{field}: {message}");
        }
        let unknown = config(serde_json::json!({"target_modules": ["lm_head"]})).unwrap_err();
        assert!(unknown.contains("unknown LoRA target lm_head"), "{unknown}");
    }

    /// A checkpoint split over two training shards merges as the whole-model adapter does,
    /// for a shard that straddles them; a layer no directory covers is named.
    #[test]
    fn split_checkpoints_merge_like_one_adapter() {
        let root = std::env::temp_dir().join(format!("lora-merge-test-{}", std::process::id()));
        let (rows, cols, rank) = (3, 5, 2);
        let factor = |layer: i32, part: &str, shape: (usize, usize)| {
            let values: Vec<f32> = (0..shape.0 * shape.1)
                .map(|i| ((i as i32 * 7 + layer * 3) % 11) as f32 / 10.0 - 0.5)
                .collect();
            let name = format!("base_model.model.model.layers.{layer}.self_attn.q_proj.lora_{part}.weight");
            (name, Tensor::from_vec(values, shape, &Device::Cpu).unwrap())
        };
        let write = |dir: &Path, layers: std::ops::RangeInclusive<i32>| {
            std::fs::create_dir_all(dir).unwrap();
            let tensors: std::collections::HashMap<String, Tensor> =
                layers.flat_map(|l| [factor(l, "A", (rank, cols)), factor(l, "B", (rows, rank))]).collect();
            candle_core::safetensors::save(&tensors, dir.join(ADAPTER_WEIGHTS)).unwrap();
            let config = serde_json::json!({"r": rank, "lora_alpha": 3.0, "target_modules": ["q_proj"]});
            std::fs::write(dir.join(ADAPTER_CONFIG), config.to_string()).unwrap();
        };
        write(&root.join("whole"), 0..=3);
        write(&root.join("split/layers-0-1"), 0..=1);
        write(&root.join("split/layers-2-3"), 2..=3);
        let shard = Shard::new("m", 1, 2, 4);
        let base = Tensor::ones((rows, cols), DType::BF16, &Device::Cpu).unwrap();
        let merged = |path: &Path| {
            let merge = LoraMerge::load(path, &shard).unwrap();
            let weights: Vec<Vec<Vec<f32>>> = [1, 2]
                .iter()
                .map(|l| {
                    let name = format!("model.layers.{l}.self_attn.q_proj.weight");
                    let out = merge.merge(&[(name, rows)], &base).unwrap();
                    assert_eq!(out.dtype(), DType::BF16);
                    out.to_dtype(DType::F32).unwrap().to_vec2().unwrap()
                })
                .collect();
            merge.check_all_merged().unwrap();
            weights
        };
        let whole = merged(&root.join("whole"));
        assert_eq!(whole, merged(&root.join("split")));
        let (_, a) = factor(2, "A", (rank, cols));
        let (_, b) = factor(2, "B", (rows, rank));
        let expected = ((b.matmul(&a).unwrap() * 1.5).unwrap() + 1.0).unwrap();
        let expected = expected.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap();
        assert_eq!(whole[1], expected.to_vec2::<f32>().unwrap());

        std::fs::remove_dir_all(root.join("split/layers-2-3")).unwrap();
        let message = LoraMerge::load(&root.join("split"), &shard).err().unwrap().to_string();
        assert!(message.contains("no directory covers layer 2 (it has layers-0-1)"), "{message}");
        let unmerged = LoraMerge::load(&root.join("whole"), &shard).unwrap();
        let message = unmerged.check_all_merged().unwrap_err().to_string();
        assert!(message.contains("model.layers.1.self_attn.q_proj.weight"), "{message}");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
