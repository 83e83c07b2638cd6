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

use super::lora::{module_of, peft_prefix, LoraConfig, ADAPTER_CONFIG, ADAPTER_WEIGHTS};
use crate::error::{Error, Result};
use crate::shard::Shard;

/// The variable naming the adapter a candle engine merges when it is given none.
pub const ADAPTER_ENV: &str = "EXO_ADAPTER";

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
        dirs.iter().try_for_each(|dir| LoraConfig::read(dir).map(drop))
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

/// Adds the deltas of `layers` from the PEFT adapter in `dir` to `deltas`.
fn read_deltas(dir: &Path, layers: &[i32], deltas: &mut BTreeMap<String, Delta>) -> Result<()> {
    let config = LoraConfig::read(dir)?;
    let file = dir.join(ADAPTER_WEIGHTS);
    let stored = candle_core::safetensors::load(&file, &Device::Cpu)
        .map_err(|e| Error::InvalidModel(format!("adapter {}: {e}", file.display())))?;
    let rank = config.rank;
    for &layer in layers.iter().filter(|&&layer| config.adapts(layer)) {
        for target in &config.targets {
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
            let delta = Delta { a: factor("A")?, b: factor("B")?, scaling: config.scaling(), name: prefix };
            let module = module_of(target).expect("targets are checked");
            deltas.insert(format!("model.layers.{layer}.{module}.weight"), delta);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
