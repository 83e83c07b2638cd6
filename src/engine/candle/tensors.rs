//! A shard's tensors from either kind of checkpoint, asked for by their Hugging Face names:
//! a safetensors model directory (names as stored) or a GGUF file (names translated, llama's
//! interleaved q/k rows put back in Hugging Face's order, quantized blocks kept as stored).
//! Each weight becomes the layer that multiplies it best on the compute device; safetensors
//! weights may be quantized as they load, and have a LoRA adapter merged into them.

use std::borrow::Cow;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};

use super::config::ModelConfig;
use super::embedding::Embedding;
use super::gguf::{find_gguf, GgufFile, StoredTensor};
use super::gguf_names::{gguf_name, stacked_expert_name};
use super::linear::Linear;
use super::lora_merge::LoraMerge;
use super::quant_type::ggml_dtype_name;
use super::weights::{copy_to_huge_pages, read_exact_at, read_to_huge_pages, ShardWeights, WeightIndex};
use crate::engine::kernels::{
    block_kernels_accelerated, dequantize_affine_row, AffineMatrix, BlockMatrix, BlockType, WeightDType,
    WeightMatrix,
};
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// A byte range of a file: part of a tensor to read.
type Piece<'a> = (&'a File, Range<u64>);

/// A model's checkpoint, before any shard of it is read.
pub enum Checkpoint {
    /// A Hugging Face model directory: `config.json`, safetensors, tokenizer files.
    Safetensors { dir: PathBuf, index: WeightIndex },
    /// A GGUF file (or split set) with its config and tokenizer in its metadata.
    Gguf(Arc<GgufFile>),
}

impl Checkpoint {
    /// The checkpoint at `path`: a model directory with `config.json`, or a `.gguf` file (or
    /// a directory holding one).
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_dir() && path.join("config.json").is_file() {
            return Ok(Self::Safetensors { dir: path.to_path_buf(), index: WeightIndex::from_dir(path)? });
        }
        match find_gguf(path)? {
            Some(file) => Ok(Self::Gguf(Arc::new(GgufFile::open(&file)?))),
            None => Err(Error::InvalidModel(format!(
                "{} is neither a model directory (with config.json) nor a GGUF file",
                path.display()
            ))),
        }
    }

    /// The model's config.
    pub fn config(&self) -> Result<ModelConfig> {
        match self {
            Self::Safetensors { dir, .. } => ModelConfig::from_dir(dir),
            Self::Gguf(file) => file.config(),
        }
    }

    /// Whether the checkpoint has an LM head of its own (else the head reuses the embedding).
    pub fn has_head(&self) -> bool {
        match self {
            Self::Safetensors { index, .. } => index.contains("lm_head.weight"),
            Self::Gguf(file) => file.tensor("output.weight").is_some(),
        }
    }

    /// The tensors `names` of one shard; safetensors weights have `adapter` merged into them
    /// and are quantized to `quantize` as they load, if given (GGUF weights stay as stored).
    pub fn open_shard(
        &self,
        names: &[String],
        config: &ModelConfig,
        quantize: Option<GgmlDType>,
        adapter: Option<Arc<LoraMerge>>,
    ) -> Result<ShardTensors> {
        match self {
            Self::Safetensors { index, .. } => {
                Ok(ShardTensors::Safetensors { weights: index.open(names)?, quantize, adapter })
            }
            Self::Gguf(file) if adapter.is_some() => Err(Error::InvalidModel(format!(
                "a LoRA adapter merges into float safetensors weights; {} is a GGUF file",
                file.path().display()
            ))),
            Self::Gguf(file) => {
                let heads = (config.num_attention_heads, config.num_key_value_heads());
                let interleaved = file.interleaves_query_key_rows()?.then_some(heads);
                let arch = file.architecture()?.to_string();
                let shifted_norms = config.is_gemma();
                let shard = GgufShard { file: file.clone(), arch, interleaved, shifted_norms };
                for name in names {
                    shard.tensor(name)?;
                }
                Ok(ShardTensors::Gguf(shard))
            }
        }
    }

    /// The tokenizer: Hugging Face's files beside the weights, else the GGUF's own vocabulary.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        match self {
            Self::Safetensors { dir, .. } => Tokenizer::from_dir(dir),
            Self::Gguf(file) => match file.path().parent().filter(|d| d.join("tokenizer.json").is_file()) {
                Some(dir) => Tokenizer::from_dir(dir),
                None => Tokenizer::from_gguf(file.path()),
            },
        }
    }
}

/// The opened tensors of one shard.
pub enum ShardTensors {
    /// Mapped safetensors files, the block type to quantize weights to and the adapter to
    /// merge into them, if any.
    Safetensors { weights: ShardWeights, quantize: Option<GgmlDType>, adapter: Option<Arc<LoraMerge>> },
    /// A GGUF file.
    Gguf(GgufShard),
}

/// A GGUF file read by Hugging Face tensor names.
pub struct GgufShard {
    file: Arc<GgufFile>,
    /// llama.cpp's architecture, which names some tensors its own way (see [`gguf_name`]).
    arch: String,
    /// Query and key heads, when their rows are stored in llama.cpp's interleaved order.
    interleaved: Option<(usize, usize)>,
    /// Gemma: norm weights are stored as `1 + w` (the converter adds Gemma's offset).
    shifted_norms: bool,
}

impl GgufShard {
    /// The stored tensor for the Hugging Face name `name`.
    fn tensor(&self, name: &str) -> Result<&StoredTensor> {
        let gguf = gguf_name(name, &self.arch)
            .ok_or_else(|| Error::InvalidModel(format!("tensor {name} has no GGUF counterpart")))?;
        self.file.tensor(&gguf).ok_or_else(|| {
            let missing = match stacked_expert_name(&gguf) {
                Some(stacked) => format!("{stacked} (or {gguf})"),
                None => gguf,
            };
            Error::InvalidModel(format!("{}: tensor {missing} is missing", self.file.path().display()))
        })
    }

    /// The stored tensor for `name`, which must have `shape`.
    fn shaped(&self, name: &str, shape: &[usize]) -> Result<&StoredTensor> {
        let stored = self.tensor(name)?;
        if stored.shape != shape {
            return Err(Error::InvalidModel(format!(
                "tensor {name} has shape {:?} in the GGUF, the config implies {shape:?}",
                stored.shape
            )));
        }
        Ok(stored)
    }

    /// The tensor `name` of `shape`, as the file pieces to read, rows in Hugging Face's order.
    fn pieces(&self, name: &str, shape: &[usize]) -> Result<(&StoredTensor, Vec<Piece<'_>>)> {
        let stored = self.shaped(name, shape)?;
        let whole = vec![(&*stored.file, stored.range.clone())];
        let Some((heads, kv_heads)) = self.interleaved else { return Ok((stored, whole)) };
        let heads = if name.contains(".q_proj.") {
            heads
        } else if name.contains(".k_proj.") {
            kv_heads
        } else {
            return Ok((stored, whole));
        };
        // Row `h*d + 2i + j` of the file is row `h*d + j*d/2 + i` of the Hugging Face weight.
        let rows = shape[0];
        let row_bytes = (stored.range.end - stored.range.start) / rows as u64;
        let (head_dim, start) = (rows / heads, stored.range.start);
        let half = head_dim / 2;
        let pieces = (0..rows)
            .map(|row| {
                let (head, within) = (row / head_dim, row % head_dim);
                let source = (head * head_dim + 2 * (within % half) + within / half) as u64;
                (&*stored.file, start + source * row_bytes..start + (source + 1) * row_bytes)
            })
            .collect();
        Ok((stored, pieces))
    }
}

impl ShardTensors {
    /// A small tensor widened to f32.
    pub fn vector_f32(&self, name: &str, len: usize, device: &Device) -> Result<Tensor> {
        self.tensor_f32(name, &[len], device)
    }

    /// A float tensor of `shape` copied out and widened to f32.
    pub fn tensor_f32(&self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
        match self {
            Self::Safetensors { weights, .. } => weights.tensor_f32(name, shape, device),
            Self::Gguf(shard) => {
                let (stored, pieces) = shard.pieces(name, shape)?;
                let dtype = float_dtype(name, stored.dtype)?;
                let bytes = read_pieces(name, &pieces)?;
                let values = Tensor::from_raw_buffer(&bytes, dtype, shape, device)?.to_dtype(DType::F32)?;
                // Back to Hugging Face's `w`, which the Gemma layers shift again: both steps are
                // exact for stored values in [0.5, 4), so the layers use the stored `1 + w`.
                if shard.shifted_norms && name.ends_with("norm.weight") {
                    return Ok((values - 1.0)?);
                }
                Ok(values)
            }
        }
    }

    /// The weight `name` (`[rows, cols]`, no bias) multiplied in place from the mapped file by
    /// the host kernels, so that its bytes are read only when a product uses it (an expert few
    /// tokens route to): a float safetensors weight loaded as stored, or a GGUF weight of a
    /// float or host block type. `None` where the weight must be copied out to be multiplied
    /// (an accelerator, quantization at load, MLX codes, other block types).
    pub fn in_place_linear(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        device: &Device,
    ) -> Result<Option<Linear>> {
        if !device.is_cpu() {
            return Ok(None);
        }
        match self {
            Self::Safetensors { weights, quantize: None, .. } if !weights.is_affine(name) => {
                Ok(Some(Linear::new(weights.matrix(name, rows, cols)?, None)?))
            }
            Self::Safetensors { .. } => Ok(None),
            Self::Gguf(shard) => {
                let stored = shard.shaped(name, &[rows, cols])?;
                let (bytes, range) =
                    (stored.map.clone(), stored.range.start as usize..stored.range.end as usize);
                match (host_dtype(stored.dtype), host_blocks(stored.dtype)) {
                    (Some(dtype), _) => {
                        Ok(Some(Linear::new(WeightMatrix::new(bytes, range, rows, cols, dtype)?, None)?))
                    }
                    (None, Some(blocks)) => {
                        Ok(Some(Linear::new(BlockMatrix::new(bytes, range, rows, cols, blocks)?, None)?))
                    }
                    (None, None) => Ok(None),
                }
            }
        }
    }

    /// A small tensor of `shape` in any stored type (float, GGUF blocks) dequantized to f32, for
    /// weights a layer transforms as it loads (DeepSeek's per-head key and value up-projections).
    pub fn dequantized_f32(&self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
        let Self::Gguf(shard) = self else { return self.tensor_f32(name, shape, device) };
        let (stored, pieces) = shard.pieces(name, shape)?;
        if host_dtype(stored.dtype).is_some() {
            return self.tensor_f32(name, shape, device);
        }
        let bytes = read_pieces(name, &pieces)?;
        let storage = QStorage::from_data(Cow::Borrowed(&bytes), &Device::Cpu, stored.dtype)?;
        Ok(QTensor::new(storage, shape)?.dequantize(device)?)
    }

    /// The layers `{prefix}.{name}` of `parts` (name and output features of each, all taking
    /// `input` features) as one stacked layer, with their biases when `bias`.
    pub fn linear(
        &self,
        prefix: &str,
        parts: &[(&str, usize)],
        input: usize,
        bias: bool,
        device: &Device,
    ) -> Result<Linear> {
        let names: Vec<(String, usize)> =
            parts.iter().map(|&(name, out)| (format!("{prefix}.{name}.weight"), out)).collect();
        let biases = if bias {
            let parts = parts
                .iter()
                .map(|&(name, out)| self.vector_f32(&format!("{prefix}.{name}.bias"), out, device))
                .collect::<Result<Vec<_>>>()?;
            Some(Tensor::cat(&parts, 0)?)
        } else {
            None
        };
        self.matrix_layer(&names, input, biases, device)
    }

    /// One layer over the stacked weights `names` (name and rows of each, all `cols` wide).
    fn matrix_layer(
        &self,
        names: &[(String, usize)],
        cols: usize,
        bias: Option<Tensor>,
        device: &Device,
    ) -> Result<Linear> {
        match self {
            Self::Safetensors { weights, quantize, adapter } => {
                let affine = names.iter().filter(|(name, _)| weights.is_affine(name)).count();
                let adapter = adapter.as_deref().filter(|a| a.adapts(names));
                if let (Some(_), true) = (adapter, affine > 0) {
                    return Err(Error::InvalidModel(format!(
                        "a LoRA adapter merges into float weights; {} is MLX-quantized",
                        names[0].0
                    )));
                }
                if affine == names.len() {
                    return match weights.affine_matrix(names, cols, false)? {
                        Some(matrix) => affine_layer(matrix, bias, device),
                        None => self.split_layer(names, cols, bias, device),
                    };
                }
                if affine > 0 {
                    return self.split_layer(names, cols, bias, device);
                }
                let quantize = quantize.filter(|t| cols.is_multiple_of(t.block_size()));
                if let Some(adapter) = adapter {
                    let merged = adapter.merge(names, &weights.device_matrix(names, cols, &Device::Cpu)?)?;
                    return dense_layer(merged, quantize, bias, device);
                }
                if let Some(block_type) = quantize {
                    let dense = weights.device_matrix(names, cols, &Device::Cpu)?.to_dtype(DType::F32)?;
                    return quantized_layer(&dense, block_type, bias, device);
                }
                if !device.is_cpu() {
                    return Linear::on_device(weights.device_matrix(names, cols, device)?, bias);
                }
                Linear::new(weights.stacked_matrix(names, cols)?, host_bias(bias)?)
            }
            Self::Gguf(shard) => {
                let mut stored = Vec::with_capacity(names.len());
                for (name, rows) in names {
                    stored.push(shard.pieces(name, &[*rows, cols])?);
                }
                let dtype = stored[0].0.dtype;
                if stored.iter().any(|(s, _)| s.dtype != dtype) {
                    // Mixed block types (a Q4_K_M file's q/k/v).
                    return self.split_layer(names, cols, bias, device);
                }
                let pieces: Vec<Piece<'_>> = stored.into_iter().flat_map(|(_, p)| p).collect();
                let rows = names.iter().map(|(_, rows)| rows).sum::<usize>();
                let label = names.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ");
                gguf_layer(&label, dtype, &pieces, (rows, cols), bias, device)
            }
        }
    }

    /// One layer per weight of `names` (stacked weights stored in different formats), their
    /// outputs in order.
    fn split_layer(
        &self,
        names: &[(String, usize)],
        cols: usize,
        bias: Option<Tensor>,
        device: &Device,
    ) -> Result<Linear> {
        let mut at = 0;
        let layers = names
            .iter()
            .map(|(name, rows)| {
                let part_bias = bias.as_ref().map(|b| b.narrow(0, at, *rows)).transpose()?;
                at += rows;
                self.matrix_layer(&[(name.clone(), *rows)], cols, part_bias, device)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Linear::Split(layers))
    }

    /// The embedding table `[vocab, hidden]`; `streamed` when the host LM head also reads it
    /// whole (then copied onto huge pages rather than read in place).
    pub fn embedding(
        &self,
        vocab: usize,
        hidden: usize,
        streamed: bool,
        device: &Device,
    ) -> Result<Embedding> {
        let name = "model.embed_tokens.weight";
        match self {
            Self::Safetensors { weights, .. } if weights.is_affine(name) => {
                let table = weights.affine_matrix(&[(name, vocab)], hidden, !streamed)?;
                Ok(Embedding::Affine(table.expect("one matrix has one layout")))
            }
            Self::Safetensors { weights, .. } => Ok(Embedding::Dense(if streamed {
                weights.streamed_matrix(name, vocab, hidden)?
            } else {
                weights.matrix(name, vocab, hidden)?
            })),
            Self::Gguf(shard) => {
                let (stored, pieces) = shard.pieces(name, &[vocab, hidden])?;
                // Read in place, or copied whole when a host head streams it too.
                let host_bytes = || -> Result<HostBytes> {
                    if streamed {
                        return copied(name, &pieces);
                    }
                    Ok((stored.map.clone(), stored.range.start as usize..stored.range.end as usize))
                };
                if let Some(dtype) = host_dtype(stored.dtype) {
                    let (bytes, range) = host_bytes()?;
                    return Ok(Embedding::Dense(WeightMatrix::new(bytes, range, vocab, hidden, dtype)?));
                }
                if let (true, Some(block_type)) = (device.is_cpu(), host_blocks(stored.dtype)) {
                    let (bytes, range) = host_bytes()?;
                    return Ok(Embedding::Blocks(BlockMatrix::new(bytes, range, vocab, hidden, block_type)?));
                }
                let bytes = read_pieces(name, &pieces)?;
                Ok(Embedding::Quantized(Arc::new(quantized_tensor(
                    &bytes,
                    stored.dtype,
                    (vocab, hidden),
                    device,
                )?)))
            }
        }
    }

    /// The LM head `[vocab, hidden]`: its own weight, or the embedding `table` when `tied`.
    pub fn head(
        &self,
        vocab: usize,
        hidden: usize,
        tied: bool,
        table: Option<&Embedding>,
        device: &Device,
    ) -> Result<Linear> {
        let name = if tied { "model.embed_tokens.weight" } else { "lm_head.weight" };
        let quantizing = matches!(self, Self::Safetensors { quantize: Some(_), .. });
        match table.filter(|_| tied) {
            Some(Embedding::Quantized(table)) => Linear::quantized(table.clone(), None),
            Some(Embedding::Blocks(table)) => Linear::new(table.clone(), None),
            Some(Embedding::Affine(table)) if device.is_cpu() => Linear::new(table.clone(), None),
            Some(Embedding::Dense(table)) if device.is_cpu() && !quantizing => {
                Linear::new(table.clone(), None)
            }
            _ => self.matrix_layer(&[(name.to_string(), vocab)], hidden, None, device),
        }
    }
}

/// A GGUF weight of `dtype` read from `pieces` as a `[rows, cols]` layer on `device`.
fn gguf_layer(
    name: &str,
    dtype: GgmlDType,
    pieces: &[Piece<'_>],
    (rows, cols): (usize, usize),
    bias: Option<Tensor>,
    device: &Device,
) -> Result<Linear> {
    let on_host = device.is_cpu();
    match (host_dtype(dtype), host_blocks(dtype)) {
        (Some(weight_dtype), _) if on_host => {
            let (bytes, range) = copied(name, pieces)?;
            Linear::new(WeightMatrix::new(bytes, range, rows, cols, weight_dtype)?, host_bias(bias)?)
        }
        (None, Some(block_type)) if on_host => {
            let (bytes, range) = copied(name, pieces)?;
            Linear::new(BlockMatrix::new(bytes, range, rows, cols, block_type)?, host_bias(bias)?)
        }
        (Some(_), _) => {
            let bytes = read_pieces(name, pieces)?;
            let weight = Tensor::from_raw_buffer(&bytes, float_dtype(name, dtype)?, &[rows, cols], device)?;
            Linear::on_device(weight, bias)
        }
        (None, _) if pairs_blocks(dtype) && (cols / dtype.block_size()) % 2 == 1 => {
            let bytes = read_pieces(name, pieces)?;
            let weight =
                quantized_tensor(&bytes, dtype, (rows, cols), &Device::Cpu)?.dequantize(&Device::Cpu)?;
            dense_layer(weight, None, bias, device)
        }
        (None, _) => {
            let bytes = read_pieces(name, pieces)?;
            Linear::quantized(Arc::new(quantized_tensor(&bytes, dtype, (rows, cols), device)?), bias)
        }
    }
}

/// Block types whose candle dot products take blocks two at a time (its debug builds assert an
/// even count): rows of an odd number of them (32 or 96 values: the rows llama.cpp's Q4_K_M
/// gives Q5_0 in small models) are decoded to f32 as they load instead.
fn pairs_blocks(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1)
}

/// A layer over the float weight `dense` (`[rows, cols]`, on the host): quantized to
/// `quantize` if given, else kept in its dtype (on the host, on huge pages as the stored
/// weights are: the kernels stream it whole every token).
fn dense_layer(
    dense: Tensor,
    quantize: Option<GgmlDType>,
    bias: Option<Tensor>,
    device: &Device,
) -> Result<Linear> {
    if let Some(block_type) = quantize {
        return quantized_layer(&dense.to_dtype(DType::F32)?, block_type, bias, device);
    }
    if !device.is_cpu() {
        return Linear::on_device(dense.to_device(device)?, bias);
    }
    let (rows, cols) = dense.dims2()?;
    let flat = dense.flatten_all()?;
    let (bytes, dtype): (Vec<u8>, WeightDType) = match dense.dtype() {
        DType::F32 => (bytemuck::cast_slice(&flat.to_vec1::<f32>()?).to_vec(), WeightDType::F32),
        DType::BF16 => (bytemuck::cast_slice(&flat.to_vec1::<half::bf16>()?).to_vec(), WeightDType::BF16),
        DType::F16 => (bytemuck::cast_slice(&flat.to_vec1::<half::f16>()?).to_vec(), WeightDType::F16),
        other => {
            return Err(Error::InvalidModel(format!("weights of dtype {other:?} are not float weights")))
        }
    };
    let copy =
        copy_to_huge_pages(&bytes).map_err(|e| Error::InvalidModel(format!("cannot hold a weight: {e}")))?;
    let len = copy.len();
    Linear::new(WeightMatrix::new(Arc::new(copy), 0..len, rows, cols, dtype)?, host_bias(bias)?)
}

/// A layer over the f32 weight `dense` (`[rows, cols]`, on the host) quantized to
/// `block_type` as it loads: read by the host block kernels where they multiply that type,
/// else by candle's quantized product.
fn quantized_layer(
    dense: &Tensor,
    block_type: GgmlDType,
    bias: Option<Tensor>,
    device: &Device,
) -> Result<Linear> {
    let weight = QTensor::quantize_onto(dense, block_type, device)?;
    if let (true, Some(host_type)) = (device.is_cpu(), host_blocks(block_type)) {
        let bytes = weight.data()?.into_owned();
        let ((rows, cols), len) = (dense.dims2()?, bytes.len());
        let matrix = BlockMatrix::new(Arc::new(bytes), 0..len, rows, cols, host_type)?;
        return Linear::new(matrix, host_bias(bias)?);
    }
    Linear::quantized(Arc::new(weight), bias)
}

/// An MLX-quantized layer: read in place by the host kernels, or dequantized to the dtype of
/// its scales for an accelerator.
fn affine_layer(matrix: AffineMatrix, bias: Option<Tensor>, device: &Device) -> Result<Linear> {
    if device.is_cpu() {
        return Linear::new(matrix, host_bias(bias)?);
    }
    let (rows, cols) = (matrix.rows(), matrix.cols());
    let mut values = vec![0f32; rows * cols];
    for (row, out) in values.chunks_exact_mut(cols).enumerate() {
        dequantize_affine_row(&matrix, row, out);
    }
    let dtype = match matrix.parameter_dtype() {
        WeightDType::F32 => DType::F32,
        WeightDType::BF16 => DType::BF16,
        WeightDType::F16 => DType::F16,
    };
    let weight = Tensor::from_vec(values, (rows, cols), device)?.to_dtype(dtype)?;
    Linear::on_device(weight, bias)
}

/// Shared bytes and their range, as the host matrices take them.
type HostBytes = (Arc<dyn AsRef<[u8]> + Send + Sync>, Range<usize>);

/// The bytes of `pieces` copied onto huge pages (see [`read_to_huge_pages`]).
fn copied(name: &str, pieces: &[Piece<'_>]) -> Result<HostBytes> {
    let copy = read_to_huge_pages(pieces)
        .map_err(|e| Error::InvalidModel(format!("cannot read tensors {name}: {e}")))?;
    let len = copy.len();
    Ok((Arc::new(copy), 0..len))
}

/// Quantized blocks `bytes` of `dtype` as a `[rows, cols]` tensor on `device`.
fn quantized_tensor(
    bytes: &[u8],
    dtype: GgmlDType,
    shape: (usize, usize),
    device: &Device,
) -> Result<QTensor> {
    let storage = QStorage::from_data(Cow::Borrowed(bytes), device, dtype)?;
    Ok(QTensor::new(storage, shape)?)
}

/// The bytes of `pieces`, one after another.
fn read_pieces(name: &str, pieces: &[Piece<'_>]) -> Result<Vec<u8>> {
    let len = pieces.iter().map(|(_, r)| (r.end - r.start) as usize).sum();
    let mut bytes = vec![0u8; len];
    let mut at = 0;
    for (file, range) in pieces {
        let size = (range.end - range.start) as usize;
        read_exact_at(file, &mut bytes[at..at + size], range.start)
            .map_err(|e| Error::InvalidModel(format!("cannot read tensor {name}: {e}")))?;
        at += size;
    }
    Ok(bytes)
}

/// The host kernels' dtype for a GGUF float type; `None` for block types.
fn host_dtype(dtype: GgmlDType) -> Option<WeightDType> {
    match dtype {
        GgmlDType::F32 => Some(WeightDType::F32),
        GgmlDType::F16 => Some(WeightDType::F16),
        GgmlDType::BF16 => Some(WeightDType::BF16),
        _ => None,
    }
}

/// The host kernels' block format for a GGUF block type they multiply on this CPU; `None`
/// for the others, and on CPUs without their SIMD path (multiplied by candle).
fn host_blocks(dtype: GgmlDType) -> Option<BlockType> {
    if !block_kernels_accelerated() {
        return None;
    }
    match dtype {
        GgmlDType::Q8_0 => Some(BlockType::Q8_0),
        GgmlDType::Q4_0 => Some(BlockType::Q4_0),
        GgmlDType::Q4K => Some(BlockType::Q4K),
        GgmlDType::Q5K => Some(BlockType::Q5K),
        GgmlDType::Q6K => Some(BlockType::Q6K),
        _ => None,
    }
}

/// The candle dtype of a GGUF float tensor (norms, biases); block types are errors.
fn float_dtype(name: &str, dtype: GgmlDType) -> Result<DType> {
    match dtype {
        GgmlDType::F32 => Ok(DType::F32),
        GgmlDType::F16 => Ok(DType::F16),
        GgmlDType::BF16 => Ok(DType::BF16),
        other => Err(Error::InvalidModel(format!(
            "tensor {name} is stored as {}; it must be F32, F16 or BF16",
            ggml_dtype_name(other)
        ))),
    }
}

/// A bias tensor as the host kernels take it.
fn host_bias(bias: Option<Tensor>) -> Result<Option<Vec<f32>>> {
    Ok(bias.map(|b| b.to_dtype(DType::F32)?.to_vec1::<f32>()).transpose()?)
}
