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

use super::config::{ModelConfig, RopeScaling};
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
}

impl GgufFile {
    /// Opens the GGUF `first` (a single file or a split's first part), reading only headers.
    pub fn open(first: &Path) -> Result<Self> {
        let mut metadata = None;
        let mut tensors = HashMap::new();
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
                tensors.insert(name.clone(), stored);
            }
            metadata.get_or_insert(content.metadata);
        }
        Ok(Self { path: first.to_path_buf(), metadata: metadata.unwrap_or_default(), tensors })
    }

    /// The first file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The tensor `name`, if the checkpoint has it.
    pub fn tensor(&self, name: &str) -> Option<&StoredTensor> {
        self.tensors.get(name)
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
        match self.metadata.get(key) {
            Some(Value::String(s)) => Ok(s),
            Some(other) => Err(self.invalid(format!("metadata {key} is {other:?}, not a string"))),
            None => Err(self.invalid(format!("metadata {key} is missing"))),
        }
    }

    /// An integer metadata value of any integer width; `None` when absent.
    fn integer(&self, key: &str) -> Result<Option<usize>> {
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

    fn required(&self, key: &str) -> Result<usize> {
        self.integer(key)?.ok_or_else(|| self.invalid(format!("metadata {key} is missing")))
    }

    /// A float metadata value; `None` when absent.
    fn float(&self, key: &str) -> Result<Option<f64>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(Value::F32(v)) => Ok(Some(*v as f64)),
            Some(Value::F64(v)) => Ok(Some(*v)),
            Some(other) => Err(self.invalid(format!("metadata {key} is {other:?}, not a number"))),
        }
    }

    fn invalid(&self, message: String) -> Error {
        Error::InvalidModel(format!("{}: {message}", self.path.display()))
    }

    /// The model config the metadata describes, as `config.json` would give it; Llama 3's
    /// frequency scaling comes from the `rope_freqs.weight` tensor.
    pub fn config(&self) -> Result<ModelConfig> {
        let arch = self.architecture()?.to_string();
        if !matches!(arch.as_str(), "llama" | "qwen2" | "qwen3") {
            return Err(self.invalid(format!(
                "architecture {arch:?} is not supported (llama, mistral as llama, qwen2, qwen3)"
            )));
        }
        let key = |name: &str| format!("{arch}.{name}");
        if let Ok(kind) = self.string(&key("rope.scaling.type")) {
            if !matches!(kind, "none" | "") {
                return Err(self.invalid(format!("rope scaling {kind:?} is not supported")));
            }
        }
        let heads = self.required(&key("attention.head_count"))?;
        let hidden = self.required(&key("embedding_length"))?;
        let embedding = self
            .tensor("token_embd.weight")
            .ok_or_else(|| self.invalid("tensor token_embd.weight is missing".into()))?;
        let vocab = embedding.shape.first().copied().unwrap_or(0);
        let config = ModelConfig {
            model_type: arch.clone(),
            hidden_size: hidden,
            intermediate_size: self.required(&key("feed_forward_length"))?,
            num_hidden_layers: self.required(&key("block_count"))?,
            num_attention_heads: heads,
            num_key_value_heads: self.integer(&key("attention.head_count_kv"))?,
            head_dim: self.integer(&key("attention.key_length"))?,
            vocab_size: vocab,
            rms_norm_eps: self.float(&key("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5),
            rope_theta: self.float(&key("rope.freq_base"))?.unwrap_or(10_000.0),
            rope_scaling: None::<RopeScaling>,
            tie_word_embeddings: self.tensor("output.weight").is_none(),
            max_position_embeddings: self.required(&key("context_length"))?,
            attention_bias: Some(self.tensor("blk.0.attn_q.bias").is_some() && arch != "qwen2"),
            mlp_bias: false,
            hidden_act: "silu".into(),
            rope_freq_factors: match self.tensor("rope_freqs.weight") {
                Some(stored) => Some(self.f32_values("rope_freqs.weight", stored)?),
                None => None,
            },
            quantization: None,
            quantization_config: None,
            original_max_position_embeddings: None,
            partial_rotary_factor: None,
            sliding_window: None,
            num_experts: self.integer(&key("expert_count"))?,
            num_experts_per_tok: None,
            moe_intermediate_size: None,
            norm_topk_prob: None,
            decoder_sparse_step: None,
            mlp_only_layers: None,
            gemma: Default::default(),
            deepseek: Default::default(),
            llava: None,
        };
        config.checked().map_err(|e| self.invalid(e))
    }

    /// The values of a 1-D F32 tensor.
    fn f32_values(&self, name: &str, stored: &StoredTensor) -> Result<Vec<f32>> {
        if stored.dtype != GgmlDType::F32 || stored.shape.len() != 1 {
            return Err(self.invalid(format!("tensor {name} must be a 1-D F32 tensor")));
        }
        let mut bytes = vec![0u8; (stored.range.end - stored.range.start) as usize];
        read_exact_at(&stored.file, &mut bytes, stored.range.start)
            .map_err(|e| self.invalid(format!("cannot read tensor {name}: {e}")))?;
        Ok(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
    }

    /// Whether the q and k projections are stored with each head's rows interleaved in pairs
    /// (llama.cpp's converter does so for the `llama` architecture, whose GGML RoPE rotates
    /// adjacent pairs); Qwen models keep Hugging Face's halves.
    pub fn interleaves_query_key_rows(&self) -> Result<bool> {
        Ok(self.architecture()? == "llama")
    }
}

/// The GGUF name of a tensor given by its Hugging Face name; `None` for names GGUF lacks.
pub fn gguf_name(hf_name: &str) -> Option<String> {
    let fixed = match hf_name {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.into());
    }
    let rest = hf_name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, kind) = rest.rsplit_once('.')?;
    let short = match module {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        _ => return None,
    };
    Some(format!("blk.{layer}.{short}.{kind}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_translate_to_gguf() {
        assert_eq!(gguf_name("model.layers.3.self_attn.q_proj.weight").unwrap(), "blk.3.attn_q.weight");
        assert_eq!(gguf_name("model.layers.0.self_attn.k_proj.bias").unwrap(), "blk.0.attn_k.bias");
        assert_eq!(gguf_name("model.layers.12.mlp.down_proj.weight").unwrap(), "blk.12.ffn_down.weight");
        assert_eq!(
            gguf_name("model.layers.1.post_attention_layernorm.weight").unwrap(),
            "blk.1.ffn_norm.weight"
        );
        assert_eq!(gguf_name("lm_head.weight").unwrap(), "output.weight");
        assert!(gguf_name("model.layers.1.mlp.experts.weight").is_none());
    }

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
