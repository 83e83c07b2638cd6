//! GGUF checkpoints (llama.cpp's format): finding the file (or the parts of a split file),
//! the model config from its metadata, and the bytes of a tensor as stored. The header is
//! parsed by candle's reader; tensor bytes are read with positioned reads, so only the
//! tensors a shard asks for are ever read.

use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, TensorInfo, Value};
use candle_core::quantized::GgmlDType;
use memmap2::Mmap;

use super::quant_type::ggml_dtype_name;
use super::weights::read_exact_at;
use crate::error::{Error, Result};
use crate::gguf_header::read_gguf_header;

/// File extension of GGUF checkpoints.
const EXTENSION: &str = "gguf";

/// The GGUF file `path` names: the file itself, or the one GGUF (or first part of one split
/// GGUF) in the directory `path`; `None` when `path` holds no GGUF.
pub fn find_gguf(path: &Path) -> Result<Option<PathBuf>> {
    if path.is_file() {
        return Ok(is_gguf(path).then(|| path.to_path_buf()));
    }
    if !path.is_dir() {
        return Ok(None);
    }
    let entries = std::fs::read_dir(path)
        .map_err(|e| Error::InvalidModel(format!("cannot list {}: {e}", path.display())))?;
    let mut files: Vec<PathBuf> =
        entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| is_gguf(p)).collect();
    files.sort();
    let firsts: Vec<&PathBuf> =
        files.iter().filter(|f| split_part(f).is_none_or(|(no, _)| no == 1)).collect();
    match firsts.as_slice() {
        [] if files.is_empty() => Ok(None),
        [only] => Ok(Some(only.to_path_buf())),
        _ => Err(Error::InvalidModel(format!(
            "{} holds several GGUF models ({}); name the file to load",
            path.display(),
            files
                .iter()
                .filter_map(|f| f.file_name())
                .map(|n| n.to_string_lossy())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

fn is_gguf(path: &Path) -> bool {
    path.is_file() && path.extension().is_some_and(|e| e.eq_ignore_ascii_case(EXTENSION))
}

/// `(part, count)` of a split GGUF name `<stem>-00002-of-00005.gguf`.
fn split_part(path: &Path) -> Option<(usize, usize)> {
    let stem = path.file_stem()?.to_str()?;
    let (rest, count) = stem.rsplit_once("-of-")?;
    let (_, part) = rest.rsplit_once('-')?;
    let digits = |s: &str| s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit());
    (digits(part) && digits(count))
        .then(|| (part.parse().ok(), count.parse().ok()))
        .and_then(|(p, c)| Some((p?, c?)))
}

/// The files of the GGUF that `path` names (see [`find_gguf`]): the file, or every part of a
/// split GGUF in order; `None` when `path` holds no GGUF.
pub fn gguf_files(path: &Path) -> Result<Option<Vec<PathBuf>>> {
    find_gguf(path)?.map(|first| part_paths(&first)).transpose()
}

/// The names of the files of the GGUF whose first file is `first`: itself, or every part of a
/// split in order (whether or not they exist).
pub fn part_names(first: &Path) -> Result<Vec<PathBuf>> {
    let Some((no, count)) = split_part(first) else { return Ok(vec![first.to_path_buf()]) };
    if no != 1 {
        return Err(Error::InvalidModel(format!(
            "{} is part {no} of a split GGUF; name its first part (-00001-of-{count:05})",
            first.display()
        )));
    }
    let name = first.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let prefix = &name[..name.len() - "00001-of-00000.gguf".len()];
    Ok((1..=count)
        .map(|part| first.with_file_name(format!("{prefix}{part:05}-of-{count:05}.{EXTENSION}")))
        .collect())
}

/// The files of the GGUF whose first file is `first`: itself, or all parts of a split.
fn part_paths(first: &Path) -> Result<Vec<PathBuf>> {
    part_names(first)?
        .into_iter()
        .map(|path| {
            if path.is_file() {
                Ok(path)
            } else {
                Err(Error::InvalidModel(format!("split GGUF part {} is missing", path.display())))
            }
        })
        .collect()
}

/// Where the bytes of the tensor `name` (`info`) of a GGUF whose header is `content` lie in
/// its file; an error when its shape or offset overflows the 64-bit file positions.
pub fn tensor_range(content: &Content, name: &str, info: &TensorInfo) -> Result<Range<u64>> {
    let dims = info.shape.dims();
    let overflow = || {
        Error::InvalidModel(format!("GGUF tensor {name} (shape {dims:?}, offset {}) overflows", info.offset))
    };
    let elems = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d as u64)).ok_or_else(overflow)?;
    let dtype = info.ggml_dtype;
    let bytes =
        (elems / dtype.block_size() as u64).checked_mul(dtype.type_size() as u64).ok_or_else(overflow)?;
    let start = content.tensor_data_offset.checked_add(info.offset).ok_or_else(overflow)?;
    Ok(start..start.checked_add(bytes).ok_or_else(overflow)?)
}

/// Where one tensor's bytes lie.
#[derive(Debug, Clone)]
pub struct StoredTensor {
    /// The part file holding it, and the file mapped (for rows read in place).
    pub file: Arc<File>,
    pub map: Arc<Mmap>,
    /// Its block type as stored.
    pub dtype: GgmlDType,
    /// `[rows, cols]` (or `[len]`) in row-major order, as candle reports GGUF shapes.
    pub shape: Vec<usize>,
    /// Byte range in `file`.
    pub range: Range<u64>,
}

/// An opened GGUF checkpoint: the first file's metadata and every part's tensors.
pub struct GgufFile {
    path: PathBuf,
    metadata: HashMap<String, Value>,
    tensors: HashMap<String, StoredTensor>,
    /// Each expert's slice of a stacked `blk.N.ffn_gate_exps.weight`, as
    /// `blk.N.ffn_gate.E.weight` (see [`expert_views`]).
    experts: HashMap<String, StoredTensor>,
}

impl GgufFile {
    /// Opens the GGUF `first` (a single file or a split's first part), reading only headers.
    pub fn open(first: &Path) -> Result<Self> {
        let mut metadata = None;
        let mut tensors = HashMap::new();
        let mut experts = HashMap::new();
        for path in part_paths(first)? {
            let mut file = File::open(&path)
                .map_err(|e| Error::InvalidModel(format!("cannot open {}: {e}", path.display())))?;
            let content = read_gguf_header(&mut file).map_err(|e| {
                Error::InvalidModel(format!("{} is not a readable GGUF file: {e}", path.display()))
            })?;
            // SAFETY: mapped read-only; as for safetensors, the file must not be truncated while
            // mapped. Only pages read through the map (embedding rows) become resident.
            let map = unsafe { memmap2::MmapOptions::new().map(&file) }
                .map_err(|e| Error::InvalidModel(format!("cannot map {}: {e}", path.display())))?;
            let (file, map) = (Arc::new(file), Arc::new(map));
            for (name, info) in &content.tensor_infos {
                let dims = info.shape.dims().to_vec();
                let range = tensor_range(&content, name, info)?;
                if range.end > map.len() as u64 {
                    return Err(Error::InvalidModel(format!(
                        "{}: tensor {name} ({}, {dims:?}) runs past the end of the file",
                        path.display(),
                        ggml_dtype_name(info.ggml_dtype)
                    )));
                }
                let stored = StoredTensor {
                    file: file.clone(),
                    map: map.clone(),
                    dtype: info.ggml_dtype,
                    shape: dims,
                    range,
                };
                experts.extend(expert_views(name, &stored));
                tensors.insert(name.clone(), stored);
            }
            metadata.get_or_insert(content.metadata);
        }
        Ok(Self { path: first.to_path_buf(), metadata: metadata.unwrap_or_default(), tensors, experts })
    }

    /// The first file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The tensor `name`, if the checkpoint has it (one expert's slice of a stacked tensor by
    /// its own name, `blk.N.ffn_gate.E.weight`).
    pub fn tensor(&self, name: &str) -> Option<&StoredTensor> {
        self.tensors.get(name).or_else(|| self.experts.get(name))
    }

    /// Bytes of every tensor whose name starts with `prefix`, as stored.
    pub fn tensor_bytes_with_prefix(&self, prefix: &str) -> u64 {
        self.tensors
            .iter()
            .filter(|(name, _)| name.starts_with(prefix))
            .map(|(_, t)| t.range.end - t.range.start)
            .sum()
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<&str> {
        self.string("general.architecture")
    }

    fn string(&self, key: &str) -> Result<&str> {
        self.optional_string(key)?.ok_or_else(|| self.invalid(format!("metadata {key} is missing")))
    }

    /// A string metadata value; `None` when absent.
    pub(super) fn optional_string(&self, key: &str) -> Result<Option<&str>> {
        match self.metadata.get(key) {
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(self.invalid(format!("metadata {key} is {other:?}, not a string"))),
            None => Ok(None),
        }
    }

    /// An integer metadata value of any integer width; `None` when absent.
    pub(super) fn integer(&self, key: &str) -> Result<Option<usize>> {
        let value = match self.metadata.get(key) {
            None => return Ok(None),
            Some(Value::U8(v)) => *v as i128,
            Some(Value::I8(v)) => *v as i128,
            Some(Value::U16(v)) => *v as i128,
            Some(Value::I16(v)) => *v as i128,
            Some(Value::U32(v)) => *v as i128,
            Some(Value::I32(v)) => *v as i128,
            Some(Value::U64(v)) => *v as i128,
            Some(Value::I64(v)) => *v as i128,
            Some(other) => return Err(self.invalid(format!("metadata {key} is {other:?}, not an integer"))),
        };
        usize::try_from(value).map(Some).map_err(|_| self.invalid(format!("metadata {key} is {value}")))
    }

    pub(super) fn required(&self, key: &str) -> Result<usize> {
        self.integer(key)?.ok_or_else(|| self.invalid(format!("metadata {key} is missing")))
    }

    /// A boolean metadata value; `None` when absent.
    pub(super) fn boolean(&self, key: &str) -> Result<Option<bool>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(Value::Bool(v)) => Ok(Some(*v)),
            Some(other) => Err(self.invalid(format!("metadata {key} is {other:?}, not a boolean"))),
        }
    }

    /// A float metadata value; `None` when absent.
    pub(super) fn float(&self, key: &str) -> Result<Option<f64>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(Value::F32(v)) => Ok(Some(*v as f64)),
            Some(Value::F64(v)) => Ok(Some(*v)),
            Some(other) => Err(self.invalid(format!("metadata {key} is {other:?}, not a number"))),
        }
    }

    /// An `InvalidModel` error naming this file.
    pub(super) fn invalid(&self, message: String) -> Error {
        Error::InvalidModel(format!("{}: {message}", self.path.display()))
    }

    /// The values of a 1-D F32 tensor.
    pub(super) fn f32_values(&self, name: &str, stored: &StoredTensor) -> Result<Vec<f32>> {
        if stored.dtype != GgmlDType::F32 || stored.shape.len() != 1 {
            return Err(self.invalid(format!("tensor {name} must be a 1-D F32 tensor")));
        }
        let mut bytes = vec![0u8; (stored.range.end - stored.range.start) as usize];
        read_exact_at(&stored.file, &mut bytes, stored.range.start)
            .map_err(|e| self.invalid(format!("cannot read tensor {name}: {e}")))?;
        Ok(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
    }

    /// Whether the q and k projections are stored with each head's rows interleaved in pairs
    /// (llama.cpp's converter does so for the `llama` architecture, Mixtral's included, whose
    /// GGML RoPE rotates adjacent pairs); the others (Qwen, Phi-3, Gemma) keep Hugging Face's
    /// halves, which llama.cpp rotates as NeoX does.
    pub fn interleaves_query_key_rows(&self) -> Result<bool> {
        Ok(self.architecture()? == "llama")
    }
}

/// One view per expert of the stacked expert tensor `name` (`blk.N.ffn_gate_exps.weight`,
/// `[experts, rows, cols]`), named `blk.N.ffn_gate.E.weight`: the expert is the outermost
/// dimension, so each expert's rows are one contiguous byte range of the file, read (or mapped)
/// only when that expert is. Other tensors have none.
fn expert_views(name: &str, stacked: &StoredTensor) -> Vec<(String, StoredTensor)> {
    let (Some(base), &[experts, rows, cols]) = (name.strip_suffix("_exps.weight"), stacked.shape.as_slice())
    else {
        return Vec::new();
    };
    if experts == 0 {
        return Vec::new();
    }
    let each = (stacked.range.end - stacked.range.start) / experts as u64;
    (0..experts)
        .map(|expert| {
            let start = stacked.range.start + expert as u64 * each;
            let view =
                StoredTensor { shape: vec![rows, cols], range: start..start + each, ..stacked.clone() };
            (format!("{base}.{expert}.weight"), view)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_ranges_past_64_bits_are_errors() {
        let content = Content {
            magic: candle_core::quantized::gguf_file::VersionedMagic::GgufV3,
            metadata: HashMap::new(),
            tensor_infos: HashMap::new(),
            tensor_data_offset: 64,
        };
        let info =
            |dims: Vec<usize>, offset| TensorInfo { ggml_dtype: GgmlDType::F32, shape: dims.into(), offset };
        assert_eq!(tensor_range(&content, "t", &info(vec![2, 3], 8)).unwrap(), 72..96);
        for (dims, offset) in [(vec![1 << 40, 1 << 40], 0), (vec![1 << 62], 0), (vec![4], u64::MAX)] {
            let error = tensor_range(&content, "t", &info(dims, offset)).unwrap_err().to_string();
            assert!(error.contains("GGUF tensor t") && error.contains("overflows"), "{error}");
        }
    }

    #[test]
    fn each_expert_is_its_own_slice_of_a_stacked_tensor() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(1024).unwrap();
        // SAFETY: a private temporary file, mapped read-only and never truncated.
        let map = unsafe { Mmap::map(&file) }.unwrap();
        // 3 experts of 4 rows of 64 Q8_0 values (2 blocks of 34 bytes a row): 272 bytes each.
        let stacked = StoredTensor {
            file: Arc::new(file),
            map: Arc::new(map),
            dtype: GgmlDType::Q8_0,
            shape: vec![3, 4, 64],
            range: 100..100 + 3 * 272,
        };
        let views = expert_views("blk.2.ffn_up_exps.weight", &stacked);
        let names: Vec<&str> = views.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(names, ["blk.2.ffn_up.0.weight", "blk.2.ffn_up.1.weight", "blk.2.ffn_up.2.weight"]);
        for (expert, (_, view)) in views.iter().enumerate() {
            let start = 100 + 272 * expert as u64;
            assert_eq!((view.range.clone(), view.shape.as_slice()), (start..start + 272, &[4, 64][..]));
        }
        assert!(expert_views("blk.2.ffn_up.weight", &stacked).is_empty());
    }

    #[test]
    fn split_names_are_recognised() {
        assert_eq!(split_part(Path::new("/m/x-Q4_K_M-00002-of-00003.gguf")), Some((2, 3)));
        assert_eq!(split_part(Path::new("/m/x-Q4_K_M.gguf")), None);
        assert_eq!(split_part(Path::new("/m/x-2-of-3.gguf")), None);
    }

    #[test]
    fn a_directory_names_its_one_gguf() {
        let dir = tempfile::tempdir().unwrap();
        assert!(find_gguf(dir.path()).unwrap().is_none());
        for name in ["m-00001-of-00002.gguf", "m-00002-of-00002.gguf", "notes.txt"] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        assert_eq!(find_gguf(dir.path()).unwrap().unwrap(), dir.path().join("m-00001-of-00002.gguf"));
        assert_eq!(part_paths(&dir.path().join("m-00001-of-00002.gguf")).unwrap().len(), 2);
        let error = part_paths(&dir.path().join("m-00002-of-00002.gguf")).unwrap_err().to_string();
        assert!(error.contains("part 2"), "{error}");
        std::fs::write(dir.path().join("other.gguf"), b"").unwrap();
        let error = find_gguf(dir.path()).unwrap_err().to_string();
        assert!(error.contains("several GGUF models"), "{error}");
        std::fs::remove_file(dir.path().join("m-00002-of-00002.gguf")).unwrap();
        let error = part_paths(&dir.path().join("m-00001-of-00002.gguf")).unwrap_err().to_string();
        assert!(error.contains("m-00002-of-00002.gguf is missing"), "{error}");
    }
}
