//! Reading a shard's tensors from a Hugging Face safetensors checkpoint (one file or an
//! indexed set), memory-mapped, opening only the files that hold the requested tensors.
//! Matrices every token streams through are copied onto huge pages; a matrix read a row at a
//! time (an embedding) is used in place from the map; small tensors are copied out. Tensors are
//! known by their canonical names (see [`canonical_name`]: LLaVA's decoder as a Llama's).

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::SafeTensors;

use super::llava::canonical_name;
use crate::engine::kernels::{AffineMatrix, WeightDType, WeightMatrix};
use crate::error::{Error, Result};
use crate::file_limits::{read_limited, CONFIG_FILE_LIMIT};

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
        let text = read_limited(&index_path, CONFIG_FILE_LIMIT)
            .map_err(|e| Error::InvalidModel(format!("cannot read {}: {e}", index_path.display())))?;
        let index: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::InvalidModel(format!("{} is not valid JSON: {e}", index_path.display())))?;
        let weight_map = index
            .get("weight_map")
            .and_then(|m| serde_json::from_value::<HashMap<String, String>>(m.clone()).ok())
            .ok_or_else(|| Error::InvalidModel(format!("{} has no weight_map", index_path.display())))?
            .into_iter()
            .map(|(name, file)| (canonical_name(&name).into_owned(), file))
            .collect();
        Ok(Self { dir: dir.to_path_buf(), weight_map: Some(weight_map) })
    }

    /// Whether the checkpoint has a tensor called `name` (always true for a single file,
    /// which is checked when loaded).
    pub fn contains(&self, name: &str) -> bool {
        self.weight_map.as_ref().is_none_or(|m| m.contains_key(name))
    }

    /// Memory-maps the files holding `names` (and an MLX-quantized weight's scales and biases)
    /// and returns a reader for them.
    pub fn open(&self, names: &[String]) -> Result<ShardWeights> {
        let files: BTreeSet<PathBuf> = match &self.weight_map {
            None => BTreeSet::from([self.dir.join(SINGLE_FILE)]),
            Some(map) => {
                let mut files = BTreeSet::new();
                // An expert's tensor may be stored stacked with its layer's other experts (MLX).
                let lookup = |name: &str| map.get(name).or_else(|| map.get(&stacked_expert_name(name)?));
                for name in names {
                    let file = lookup(name).ok_or_else(|| {
                        Error::InvalidModel(format!("tensor {name} is not in {INDEX_FILE}"))
                    })?;
                    files.insert(self.dir.join(file));
                    for suffix in ["scales", "biases"] {
                        files.extend(lookup(&sibling(name, suffix)).map(|file| self.dir.join(file)));
                    }
                }
                files
            }
        };
        let mut tensors = HashMap::new();
        for file in files {
            map_file(&file, &mut tensors)?;
        }
        Ok(ShardWeights { tensors })
    }
}

/// A tensor's place inside a mapped file.
struct StoredTensor {
    map: Arc<Mmap>,
    file: Arc<File>,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    range: Range<usize>,
}

/// Maps `path` and records where each of its tensors lies.
fn map_file(path: &Path, tensors: &mut HashMap<String, StoredTensor>) -> Result<()> {
    let file = std::fs::File::open(path)
        .map_err(|e| Error::InvalidModel(format!("weight file {} cannot be opened: {e}", path.display())))?;
    // SAFETY: mapped read-only; like every mmap reader we rely on the file not being truncated
    // while mapped (the downloader only replaces files by atomic rename). Only the pages read
    // through the map (headers, small tensors, embedding rows) become resident.
    let map = unsafe { memmap2::MmapOptions::new().map(&file) }
        .map_err(|e| Error::InvalidModel(format!("cannot map {}: {e}", path.display())))?;
    let (map, file) = (Arc::new(map), Arc::new(file));
    let parsed = SafeTensors::deserialize(&map).map_err(|e| {
        Error::InvalidModel(format!("{} is not a valid safetensors file: {e}", path.display()))
    })?;
    let base = map.as_ptr() as usize;
    for (stored_name, view) in parsed.tensors() {
        let name = canonical_name(&stored_name).into_owned();
        let start = view.data().as_ptr() as usize - base;
        let stored = StoredTensor {
            map: map.clone(),
            file: file.clone(),
            dtype: view.dtype(),
            shape: view.shape().to_vec(),
            range: start..start + view.data().len(),
        };
        if stored.shape.len() == 3 && name.contains(".switch_mlp.") {
            add_expert_views(&name, &stored, tensors);
        }
        tensors.insert(name, stored);
    }
    Ok(())
}

/// The name mlx-lm gives the stacked tensor that holds the expert tensor `name` (Hugging Face's
/// `{block}.experts.{e}.{proj}.{suffix}`, Mixtral's `w1`/`w2`/`w3` as gate/down/up):
/// `{block}.switch_mlp.{proj}.{suffix}`; `None` for other names.
fn stacked_expert_name(name: &str) -> Option<String> {
    let (block, rest) = name.split_once(".experts.")?;
    let (expert, rest) = rest.split_once('.')?;
    expert.parse::<usize>().ok()?;
    let (proj, suffix) = rest.split_once('.')?;
    let proj = match proj {
        "w1" => "gate_proj",
        "w2" => "down_proj",
        "w3" => "up_proj",
        other => other,
    };
    Some(format!("{block}.switch_mlp.{proj}.{suffix}"))
}

/// Registers each expert's slice of the stacked `[experts, rows, cols]` tensor `name` (mlx-lm's
/// `switch_mlp` layout) under its Hugging Face name, so that experts load as if stored apart
/// (no bytes are copied or read here).
fn add_expert_views(name: &str, stacked: &StoredTensor, tensors: &mut HashMap<String, StoredTensor>) {
    let Some((block, rest)) = name.split_once(".switch_mlp.") else { return };
    let Some((proj, suffix)) = rest.split_once('.') else { return };
    let proj = match (block.ends_with(".block_sparse_moe"), proj) {
        (true, "gate_proj") => "w1",
        (true, "down_proj") => "w2",
        (true, "up_proj") => "w3",
        (_, other) => other,
    };
    let experts = stacked.shape[0];
    if experts == 0 {
        return;
    }
    let each = stacked.range.len() / experts;
    for expert in 0..experts {
        let start = stacked.range.start + expert * each;
        let view = StoredTensor {
            map: stacked.map.clone(),
            file: stacked.file.clone(),
            dtype: stacked.dtype,
            shape: stacked.shape[1..].to_vec(),
            range: start..start + each,
        };
        tensors.insert(format!("{block}.experts.{expert}.{proj}.{suffix}"), view);
    }
}

/// The bytes of `pieces` (a file and a byte range of it each), one after another, in
/// anonymous memory advised onto transparent huge pages (Linux; elsewhere, or without THP,
/// ordinary pages). A matrix-vector product streams its weights once per token; on 4 KiB file
/// pages each page costs a TLB miss and restarts the prefetchers; the copy measured 13-23%
/// faster bf16 decoding than the file map. The bytes are read with positioned reads, so the
/// file's pages are never mapped here as well.
pub(super) fn read_to_huge_pages(pieces: &[(&File, Range<u64>)]) -> std::io::Result<Mmap> {
    let len = pieces.iter().map(|(_, range)| (range.end - range.start) as usize).sum();
    let mut copy = huge_page_buffer(len)?;
    let mut at = 0;
    for (file, range) in pieces {
        let bytes = (range.end - range.start) as usize;
        read_exact_at(file, &mut copy[at..at + bytes], range.start)?;
        at += bytes;
    }
    copy.make_read_only()
}

/// `bytes` copied into memory on huge pages, as [`read_to_huge_pages`] copies from files (for
/// weights computed at load, such as those with an adapter merged).
pub(super) fn copy_to_huge_pages(bytes: &[u8]) -> std::io::Result<Mmap> {
    let mut copy = huge_page_buffer(bytes.len())?;
    copy.copy_from_slice(bytes);
    copy.make_read_only()
}

/// `len` bytes of anonymous memory advised onto transparent huge pages where the system has them.
fn huge_page_buffer(len: usize) -> std::io::Result<memmap2::MmapMut> {
    let copy = memmap2::MmapOptions::new().len(len).map_anon()?;
    #[cfg(target_os = "linux")]
    if let Err(e) = copy.advise(memmap2::Advice::HugePage) {
        log::debug!("no huge pages for a weight copy: {e}");
    }
    Ok(copy)
}

#[cfg(unix)]
pub(super) fn read_exact_at(file: &File, buffer: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buffer, offset)
}

#[cfg(not(unix))]
pub(super) fn read_exact_at(file: &File, buffer: &mut [u8], offset: u64) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let mut handle = file.try_clone()?;
    handle.seek(SeekFrom::Start(offset))?;
    handle.read_exact(buffer)
}

/// The weight dtype of a stored tensor; other dtypes (integers, fp8, ...) are errors.
fn weight_dtype(name: &str, dtype: safetensors::Dtype) -> Result<WeightDType> {
    match dtype {
        safetensors::Dtype::F32 => Ok(WeightDType::F32),
        safetensors::Dtype::BF16 => Ok(WeightDType::BF16),
        safetensors::Dtype::F16 => Ok(WeightDType::F16),
        other => Err(Error::InvalidModel(format!("tensor {name} has unsupported dtype {other:?}"))),
    }
}

/// The candle dtype of a stored weight; other dtypes are errors as in [`weight_dtype`].
fn candle_dtype(name: &str, dtype: safetensors::Dtype) -> Result<DType> {
    Ok(match weight_dtype(name, dtype)? {
        WeightDType::F32 => DType::F32,
        WeightDType::BF16 => DType::BF16,
        WeightDType::F16 => DType::F16,
    })
}

/// An MLX-quantized weight's stored tensors.
struct AffineParts<'a> {
    codes: &'a StoredTensor,
    scales: &'a StoredTensor,
    biases: &'a StoredTensor,
    bits: usize,
}

/// The tensor `{prefix}.{suffix}` beside the weight `{prefix}.weight` (MLX's `scales` and
/// `biases` of a quantized weight).
pub fn sibling(weight: &str, suffix: &str) -> String {
    format!("{}.{suffix}", weight.strip_suffix(".weight").unwrap_or(weight))
}

/// The tensors of the mapped files, by name.
pub struct ShardWeights {
    tensors: HashMap<String, StoredTensor>,
}

impl ShardWeights {
    fn stored(&self, name: &str, shape: &[usize]) -> Result<&StoredTensor> {
        let stored =
            self.tensors.get(name).ok_or_else(|| Error::InvalidModel(format!("tensor {name} is missing")))?;
        if stored.shape != shape {
            return Err(Error::InvalidModel(format!(
                "tensor {name} has shape {:?}, the config implies {shape:?}",
                stored.shape
            )));
        }
        Ok(stored)
    }

    /// Writes the tensors `names` as they are stored (names, dtypes, shapes, bytes; an
    /// MLX-quantized weight with its scales and biases) to the safetensors file `path`,
    /// through a temporary file renamed into place.
    pub fn save(&self, names: &[String], path: &Path) -> Result<()> {
        let mut stored_names = Vec::with_capacity(names.len());
        for name in names {
            stored_names.push(name.clone());
            if self.is_affine(name) {
                stored_names.extend(["scales", "biases"].map(|suffix| sibling(name, suffix)));
            }
        }
        let views = stored_names
            .iter()
            .map(|name| {
                let stored = self
                    .tensors
                    .get(name)
                    .ok_or_else(|| Error::InvalidModel(format!("tensor {name} is missing")))?;
                let view = safetensors::tensor::TensorView::new(
                    stored.dtype,
                    stored.shape.clone(),
                    &stored.map[stored.range.clone()],
                )
                .map_err(|e| Error::InvalidModel(format!("tensor {name} cannot be saved: {e}")))?;
                Ok((name.clone(), view))
            })
            .collect::<Result<Vec<_>>>()?;
        let file_name = path.file_name().ok_or_else(|| {
            Error::InvalidArgument(format!("{} does not name a file to save to", path.display()))
        })?;
        let partial = path.with_file_name(format!(".{}.partial", file_name.to_string_lossy()));
        let failed = |e: &dyn std::fmt::Display| {
            Error::InvalidArgument(format!("cannot write the checkpoint {}: {e}", path.display()))
        };
        safetensors::serialize_to_file(views, None, &partial).map_err(|e| {
            let _ = std::fs::remove_file(&partial);
            failed(&e)
        })?;
        std::fs::rename(&partial, path).map_err(|e| {
            let _ = std::fs::remove_file(&partial);
            failed(&e)
        })
    }

    /// A 2-D weight used in place from the map, in its stored dtype: for a matrix read a few
    /// rows at a time, whose other pages then never become resident.
    pub fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<WeightMatrix> {
        let stored = self.stored(name, &[rows, cols])?;
        let dtype = weight_dtype(name, stored.dtype)?;
        WeightMatrix::new(stored.map.clone(), stored.range.clone(), rows, cols, dtype)
    }

    /// A 2-D weight that every token reads whole, copied in its stored dtype into memory of
    /// its own on 2 MiB pages where the system allows (see [`read_to_huge_pages`]).
    pub fn streamed_matrix(&self, name: &str, rows: usize, cols: usize) -> Result<WeightMatrix> {
        self.stacked_matrix(&[(name, rows)], cols)
    }

    /// Weights that every token reads whole and that share their input (`parts`: name and
    /// rows of each, all `cols` wide and of one dtype), copied one after another into one
    /// matrix on huge pages, as [`Self::streamed_matrix`] copies one: one product then
    /// streams them all.
    pub fn stacked_matrix(&self, parts: &[(impl AsRef<str>, usize)], cols: usize) -> Result<WeightMatrix> {
        let stored = parts
            .iter()
            .map(|(name, rows)| self.stored(name.as_ref(), &[*rows, cols]))
            .collect::<Result<Vec<_>>>()?;
        let (Some((first_name, _)), Some(&first)) = (parts.first(), stored.first()) else {
            return Err(Error::InvalidArgument("a stacked matrix needs at least one tensor".into()));
        };
        let first_name = first_name.as_ref();
        let dtype = weight_dtype(first_name, first.dtype)?;
        if let Some(((name, _), other)) = parts.iter().zip(&stored).find(|(_, s)| s.dtype != first.dtype) {
            return Err(Error::InvalidModel(format!(
                "tensors {first_name} ({:?}) and {} ({:?}) must have one dtype",
                first.dtype,
                name.as_ref(),
                other.dtype
            )));
        }
        let rows = parts.iter().map(|(_, rows)| rows).sum();
        let len: usize = stored.iter().map(|s| s.range.len()).sum();
        if len == 0 {
            return WeightMatrix::new(first.map.clone(), 0..0, rows, cols, dtype);
        }
        let pieces: Vec<(&File, Range<u64>)> =
            stored.iter().map(|s| (&*s.file, s.range.start as u64..s.range.end as u64)).collect();
        let copy = read_to_huge_pages(&pieces).map_err(|e| {
            let names: Vec<&str> = parts.iter().map(|(name, _)| name.as_ref()).collect();
            Error::InvalidModel(format!("cannot read tensors {}: {e}", names.join(", ")))
        })?;
        WeightMatrix::new(Arc::new(copy), 0..len, rows, cols, dtype)
    }

    /// The bytes of the float matrix `name` of `shape` as stored (read in place from the map),
    /// with their dtype.
    pub fn stored_matrix(&self, name: &str, shape: [usize; 2]) -> Result<(&[u8], DType)> {
        let stored = self.stored(name, &shape)?;
        Ok((&stored.map[stored.range.clone()], candle_dtype(name, stored.dtype)?))
    }

    /// Weights that share their input (`parts`: name and rows of each, all `cols` wide and of
    /// one dtype) as one `[rows, cols]` tensor on `device`, in their stored dtype: what an
    /// accelerator multiplies, as [`Self::stacked_matrix`] is for the host kernels.
    pub fn device_matrix(
        &self,
        parts: &[(impl AsRef<str>, usize)],
        cols: usize,
        device: &Device,
    ) -> Result<Tensor> {
        let mut bytes = Vec::new();
        let mut dtype = None;
        for (name, rows) in parts {
            let name = name.as_ref();
            let stored = self.stored(name, &[*rows, cols])?;
            let part_dtype = candle_dtype(name, stored.dtype)?;
            if dtype.is_some_and(|d| d != part_dtype) {
                return Err(Error::InvalidModel(format!(
                    "tensor {name} ({part_dtype:?}) differs in dtype from the tensors stacked with it"
                )));
            }
            dtype = Some(part_dtype);
            bytes.extend_from_slice(&stored.map[stored.range.clone()]);
        }
        let dtype = dtype
            .ok_or_else(|| Error::InvalidArgument("a stacked matrix needs at least one tensor".into()))?;
        let rows = parts.iter().map(|(_, rows)| rows).sum::<usize>();
        Ok(Tensor::from_raw_buffer(&bytes, dtype, &[rows, cols], device)?)
    }

    /// Whether the weight `name` (`{prefix}.weight`) is MLX-quantized: packed codes stored
    /// beside `{prefix}.scales`.
    pub fn is_affine(&self, name: &str) -> bool {
        self.tensors.contains_key(&sibling(name, "scales"))
    }

    /// MLX-quantized weights that share their input (`parts`: name and rows of each `.weight`,
    /// all `cols` wide) as one matrix: the codes on huge pages (or, for one part `in_place`,
    /// read from the map), the scales and biases copied out. `None` when the parts differ in
    /// bits, group size or parameter dtype (each is then a matrix of its own).
    pub fn affine_matrix(
        &self,
        parts: &[(impl AsRef<str>, usize)],
        cols: usize,
        in_place: bool,
    ) -> Result<Option<AffineMatrix>> {
        let mut stored = Vec::with_capacity(parts.len());
        for (name, rows) in parts {
            stored.push(self.affine_parts(name.as_ref(), *rows, cols)?);
        }
        let Some(first) = stored.first() else {
            return Err(Error::InvalidArgument("a stacked matrix needs at least one tensor".into()));
        };
        let layout = |s: &AffineParts| (s.bits, s.scales.shape[1], s.scales.dtype);
        if stored.iter().any(|s| layout(s) != layout(first)) {
            return Ok(None);
        }
        let rows: usize = parts.iter().map(|(_, rows)| rows).sum();
        let groups = first.scales.shape[1];
        let dtype = weight_dtype(&sibling(parts[0].0.as_ref(), "scales"), first.scales.dtype)?;
        let parameters = |tensors: Vec<&StoredTensor>| {
            let bytes: Vec<u8> = tensors.iter().flat_map(|t| &t.map[t.range.clone()]).copied().collect();
            let len = bytes.len();
            WeightMatrix::new(Arc::new(bytes), 0..len, rows, groups, dtype)
        };
        let scales = parameters(stored.iter().map(|s| s.scales).collect())?;
        let biases = parameters(stored.iter().map(|s| s.biases).collect())?;
        if in_place && stored.len() == 1 {
            let codes = first.codes;
            return Ok(Some(AffineMatrix::new(
                codes.map.clone(),
                codes.range.clone(),
                scales,
                biases,
                cols,
                first.bits,
            )?));
        }
        let pieces: Vec<(&File, Range<u64>)> = stored
            .iter()
            .map(|s| (&*s.codes.file, s.codes.range.start as u64..s.codes.range.end as u64))
            .collect();
        let copy = read_to_huge_pages(&pieces).map_err(|e| {
            let names: Vec<&str> = parts.iter().map(|(name, _)| name.as_ref()).collect();
            Error::InvalidModel(format!("cannot read tensors {}: {e}", names.join(", ")))
        })?;
        let len = copy.len();
        Ok(Some(AffineMatrix::new(Arc::new(copy), 0..len, scales, biases, cols, first.bits)?))
    }

    /// The packed codes, scales and biases of the MLX-quantized weight `name` (`[rows, cols]`
    /// once unpacked), checked against each other.
    fn affine_parts(&self, name: &str, rows: usize, cols: usize) -> Result<AffineParts<'_>> {
        let codes =
            self.tensors.get(name).ok_or_else(|| Error::InvalidModel(format!("tensor {name} is missing")))?;
        let words = match (codes.dtype, codes.shape.as_slice()) {
            (safetensors::Dtype::U32, &[r, words]) if r == rows => words,
            (dtype, shape) => {
                return Err(Error::InvalidModel(format!(
                    "tensor {name} is {dtype:?} {shape:?}; an MLX-quantized weight of {rows}x{cols} \
                     is U32 [{rows}, {cols}·bits/32]"
                )))
            }
        };
        let bits = words * 32 / cols;
        if bits * cols != words * 32 {
            return Err(Error::InvalidModel(format!(
                "tensor {name}: {words} words do not pack {cols} columns"
            )));
        }
        let (scales_name, biases_name) = (sibling(name, "scales"), sibling(name, "biases"));
        let scales = self
            .tensors
            .get(&scales_name)
            .ok_or_else(|| Error::InvalidModel(format!("tensor {scales_name} is missing")))?;
        let groups = match scales.shape.as_slice() {
            &[r, groups] if r == rows => groups,
            shape => {
                return Err(Error::InvalidModel(format!(
                    "tensor {scales_name} has shape {shape:?}; {rows} rows of group scales expected"
                )))
            }
        };
        let biases = self.stored(&biases_name, &[rows, groups])?;
        Ok(AffineParts { codes, scales, biases, bits })
    }

    /// A float tensor of `shape` copied out of the map and widened to f32.
    pub fn tensor_f32(&self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
        let stored = self.stored(name, shape)?;
        let dtype = candle_dtype(name, stored.dtype)?;
        let bytes = &stored.map[stored.range.clone()];
        Ok(Tensor::from_raw_buffer(bytes, dtype, shape, device)?.to_dtype(DType::F32)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expert_tensors_are_found_in_mlx_stacks() {
        assert_eq!(
            stacked_expert_name("model.layers.3.mlp.experts.17.down_proj.scales").as_deref(),
            Some("model.layers.3.mlp.switch_mlp.down_proj.scales")
        );
        assert_eq!(
            stacked_expert_name("model.layers.0.block_sparse_moe.experts.1.w3.weight").as_deref(),
            Some("model.layers.0.block_sparse_moe.switch_mlp.up_proj.weight")
        );
        assert_eq!(stacked_expert_name("model.layers.0.mlp.down_proj.weight"), None);
    }
}
