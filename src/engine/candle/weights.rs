//! Reading a shard's tensors from a Hugging Face safetensors checkpoint (one file or an
//! indexed set), memory-mapped, opening only the files that hold the requested tensors.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{Device, Tensor};

use crate::error::{Error, Result};

const SINGLE_FILE: &str = "model.safetensors";
const INDEX_FILE: &str = "model.safetensors.index.json";

/// Where each tensor of a checkpoint lives.
#[derive(Debug, Clone)]
pub struct WeightIndex {
    dir: PathBuf,
    /// Tensor name → file name; `None` for a single-file checkpoint.
    weight_map: Option<HashMap<String, String>>,
}

impl WeightIndex {
    /// Reads `model.safetensors.index.json` if present, else expects `model.safetensors`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let index_path = dir.join(INDEX_FILE);
        if !index_path.exists() {
            return Ok(Self { dir: dir.to_path_buf(), weight_map: None });
        }
        let text = std::fs::read_to_string(&index_path)
            .map_err(|e| Error::InvalidModel(format!("cannot read {}: {e}", index_path.display())))?;
        let index: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::InvalidModel(format!("{} is not valid JSON: {e}", index_path.display())))?;
        let weight_map = index
            .get("weight_map")
            .and_then(|m| serde_json::from_value::<HashMap<String, String>>(m.clone()).ok())
            .ok_or_else(|| Error::InvalidModel(format!("{} has no weight_map", index_path.display())))?;
        Ok(Self { dir: dir.to_path_buf(), weight_map: Some(weight_map) })
    }

    /// Whether the checkpoint has a tensor called `name` (always true for a single file,
    /// which is checked when loaded).
    pub fn contains(&self, name: &str) -> bool {
        self.weight_map.as_ref().is_none_or(|m| m.contains_key(name))
    }

    /// Memory-maps the files holding `names` and returns a reader for them.
    pub fn open(&self, names: &[String]) -> Result<ShardWeights> {
        let files: BTreeSet<PathBuf> = match &self.weight_map {
            None => BTreeSet::from([self.dir.join(SINGLE_FILE)]),
            Some(map) => names
                .iter()
                .map(|name| {
                    map.get(name)
                        .map(|file| self.dir.join(file))
                        .ok_or_else(|| Error::InvalidModel(format!("tensor {name} is not in {INDEX_FILE}")))
                })
                .collect::<Result<_>>()?,
        };
        for file in &files {
            if !file.exists() {
                return Err(Error::InvalidModel(format!("weight file {} is missing", file.display())));
            }
        }
        let files: Vec<_> = files.into_iter().collect();
        // SAFETY: the files are opened read-only; like every mmap reader we rely on them not being
        // truncated while mapped (the downloader only replaces files by atomic rename).
        let mapped = unsafe { MmapedSafetensors::multi(&files) }.map_err(|e| {
            Error::InvalidModel(format!("cannot read safetensors in {}: {e}", self.dir.display()))
        })?;
        Ok(ShardWeights { mapped })
    }
}

/// Memory-mapped safetensors files from which a shard's tensors are loaded.
pub struct ShardWeights {
    mapped: MmapedSafetensors,
}

impl ShardWeights {
    /// Loads `name` in its stored dtype, checking its shape.
    pub fn load(&self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
        let tensor = self
            .mapped
            .load(name, device)
            .map_err(|e| Error::InvalidModel(format!("cannot load tensor {name}: {e}")))?;
        if tensor.dims() != shape {
            return Err(Error::InvalidModel(format!(
                "tensor {name} has shape {:?}, the config implies {shape:?}",
                tensor.dims()
            )));
        }
        Ok(tensor)
    }
}
