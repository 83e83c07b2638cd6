//! What a model takes in memory once this engine loads it, from its headers alone: the bytes
//! of each layer's weights as held (the checkpoint's dtype, a GGUF's blocks, the block type
//! safetensors weights are quantized to as they load, or an MLX checkpoint's packed weights
//! with their scales and biases), the embedding and head, and the KV caches.

use std::io::Read;
use std::path::Path;

use candle_core::quantized::GgmlDType;

use super::config::ModelConfig;
use super::gguf::{find_gguf, GgufFile};
use super::tensors::Checkpoint;
use super::EngineOptions;
use crate::error::{Error, Result};
use crate::file_limits::{read_limited, CONFIG_FILE_LIMIT};
use crate::topology::ModelMemory;

/// Bytes of one key or value entry: the caches hold f32.
const CACHE_ELEMENT_BYTES: u64 = 4;

/// Bytes of a norm's or bias's element: they load as f32.
const VECTOR_ELEMENT_BYTES: u64 = 4;

/// The memory of the model at `path` (a model directory or a GGUF) as an engine with
/// `options` loads it; `on_host` when it computes on the CPU.
pub fn model_memory(path: &Path, options: &EngineOptions, on_host: bool) -> Result<ModelMemory> {
    let checkpoint = Checkpoint::open(path)?;
    let config = checkpoint.config()?;
    let context = options.limits.context_for(&config);
    let kv_layer = kv_bytes_per_layer(&config, context);
    let kv_budget = options.limits.kv_cache_bytes;
    let parts = match &checkpoint {
        Checkpoint::Safetensors { .. } => {
            let storage = Storage::of_dir(path, options.quantize)?;
            let tied = config.tie_word_embeddings || !checkpoint.has_head();
            storage.parts(&config, tied, on_host)
        }
        Checkpoint::Gguf(_) => {
            let file = find_gguf(path)?
                .ok_or_else(|| Error::InvalidModel(format!("no GGUF at {}", path.display())))?;
            gguf_parts(&GgufFile::open(&file)?, &config)?
        }
    };
    Ok(ModelMemory {
        layers: parts.layers,
        kv_layer,
        kv_budget,
        context,
        embedding: parts.embedding,
        head: parts.head,
        head_shares_embedding: parts.head_shares_embedding,
    })
}

/// Keys and values of one layer for one request of `context` tokens. A cache grows by
/// doubling from a power of two, so at the full context it may hold the next power of two.
fn kv_bytes_per_layer(config: &ModelConfig, context: usize) -> u64 {
    let per_token = config.cache_values_per_position() as u64 * CACHE_ELEMENT_BYTES;
    per_token * context.next_power_of_two() as u64
}

/// What the weights of a model's parts take.
struct Parts {
    layers: Vec<u64>,
    embedding: u64,
    head: u64,
    head_shares_embedding: bool,
}

/// How a safetensors checkpoint's matrices are held once loaded.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Storage {
    /// In the checkpoint's dtype, of this many bytes an element.
    Dense(u64),
    /// Quantized to a block type as they load (matrices whose rows are whole blocks; the
    /// embedding stays dense).
    Blocks { dense: u64, block: GgmlDType },
    /// An MLX checkpoint: `bits` a weight packed, and per group of `group_size` weights a scale
    /// and a bias of `scale_bytes` each (the embedding and head too).
    Mlx { bits: u64, group_size: u64, scale_bytes: u64 },
}

impl Storage {
    /// How `dir`'s weights are held: MLX's `quantization` in `config.json`, else the dtype a
    /// layer weight has in the safetensors header (or `torch_dtype` when the weights are not
    /// here yet), quantized to `quantize` if given.
    fn of_dir(dir: &Path, quantize: Option<GgmlDType>) -> Result<Self> {
        let path = dir.join("config.json");
        let text = read_limited(&path, CONFIG_FILE_LIMIT)
            .map_err(|e| Error::InvalidModel(format!("cannot read {}: {e}", path.display())))?;
        let raw: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::InvalidModel(format!("{} is not valid JSON: {e}", path.display())))?;
        let torch_dtype = raw.get("torch_dtype").and_then(|d| d.as_str()).and_then(element_bytes);
        let stored = |name: &str| header_dtype(dir, name).and_then(|d| element_bytes(&d));
        let quantization = raw.get("quantization").or_else(|| raw.get("quantization_config"));
        let mlx = quantization.and_then(|q| Some((q.get("bits")?.as_u64()?, q.get("group_size")?.as_u64()?)));
        if let Some((bits, group_size)) = mlx.filter(|&(bits, group)| bits > 0 && group > 0) {
            if bits > 8 || group_size > 1 << 20 {
                return Err(Error::InvalidModel(format!(
                    "{}: MLX quantization of {bits} bits in groups of {group_size} is not supported \
                     (at most 8 bits, groups of at most 2^20)",
                    path.display()
                )));
            }
            let scale_bytes = stored("model.layers.0.mlp.down_proj.scales").or(torch_dtype).unwrap_or(2);
            return Ok(Self::Mlx { bits, group_size, scale_bytes });
        }
        let dense = stored("model.layers.0.mlp.down_proj.weight").or(torch_dtype).unwrap_or(4);
        Ok(match quantize {
            Some(block) => Self::Blocks { dense, block },
            None => Self::Dense(dense),
        })
    }

    /// Bytes of a `[rows, cols]` matrix; `embedding` for the token table, which load-time
    /// quantization leaves dense.
    fn matrix(&self, rows: usize, cols: usize, embedding: bool) -> u64 {
        let (rows, cols) = (rows as u64, cols as u64);
        match *self {
            Self::Dense(bytes) => rows * cols * bytes,
            Self::Blocks { dense, block } => {
                let block_size = block.block_size() as u64;
                if embedding || !cols.is_multiple_of(block_size) {
                    rows * cols * dense
                } else {
                    rows * (cols / block_size) * block.type_size() as u64
                }
            }
            Self::Mlx { bits, group_size, scale_bytes } => {
                rows * cols * bits / 8 + 2 * rows * cols.div_ceil(group_size) * scale_bytes
            }
        }
    }

    /// The parts of a model with `config`; `tied` when the head reuses the embedding.
    fn parts(&self, config: &ModelConfig, tied: bool, on_host: bool) -> Parts {
        let variant = config.variant().unwrap_or(super::config::Variant {
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            qk_norm: false,
        });
        let (hidden, inter, vocab) = (config.hidden_size, config.intermediate_size, config.vocab_size);
        let head_dim = config.head_dim();
        let (q_out, kv_out) =
            (config.num_attention_heads * head_dim, config.num_key_value_heads() * head_dim);
        let mut vectors = 2 * hidden;
        if variant.qkv_bias {
            vectors += q_out + 2 * kv_out;
        }
        if variant.o_bias {
            vectors += hidden;
        }
        if variant.mlp_bias {
            vectors += 2 * inter + hidden;
        }
        if variant.qk_norm {
            vectors += 2 * head_dim;
        }
        // DeepSeek's latent attention has projections of its own (`kv_b_proj` held decoded, in f32).
        let attention = match super::deepseek::LatentShape::of(config) {
            Some(shape) => shape
                .tensors("", hidden)
                .iter()
                .map(|(name, dims)| match dims[..] {
                    [rows, cols] if name.ends_with("kv_b_proj.weight") => (rows * cols * 4) as u64,
                    [rows, cols] => self.matrix(rows, cols, false),
                    _ => dims.iter().product::<usize>() as u64 * VECTOR_ELEMENT_BYTES,
                })
                .sum(),
            None => {
                self.matrix(q_out, hidden, false)
                    + 2 * self.matrix(kv_out, hidden, false)
                    + self.matrix(hidden, q_out, false)
            }
        };
        let layer = attention
            + 2 * self.matrix(inter, hidden, false)
            + self.matrix(hidden, inter, false)
            + vectors as u64 * VECTOR_ELEMENT_BYTES;
        // A mixture of experts holds every expert of its sparse layers (dense layers as above).
        let layer = match super::moe::MoeSpec::of(config).ok().flatten() {
            Some(spec) => {
                let dense_mlp = 2 * self.matrix(inter, hidden, false) + self.matrix(hidden, inter, false);
                let expert = 2 * self.matrix(spec.intermediate, hidden, false)
                    + self.matrix(hidden, spec.intermediate, false);
                let shared = spec.shared_intermediate.map_or(0, |width| {
                    2 * self.matrix(width, hidden, false) + self.matrix(hidden, width, false)
                });
                let sparse_mlp =
                    spec.experts as u64 * expert + self.matrix(spec.experts, hidden, false) + shared;
                let layers = config.num_hidden_layers.max(1) as u128;
                let sparse = (0..config.num_hidden_layers).filter(|&l| spec.is_sparse(l)).count() as u128;
                // The mean over layers, summed in 128 bits: experts × layers can pass 64.
                let mean = (sparse * sparse_mlp as u128 + (layers - sparse) * dense_mlp as u128) / layers;
                layer - dense_mlp + u64::try_from(mean).unwrap_or(u64::MAX)
            }
            None => layer,
        };
        // LLaVA's vision tower and projector load beside the embeddings, on the first shard.
        let vision: u64 = config.llava.as_ref().map_or(0, |llava| {
            llava
                .tensors(hidden)
                .iter()
                .map(|(_, dims)| match dims[..] {
                    [rows, cols] => self.matrix(rows, cols, false),
                    _ => dims.iter().product::<usize>() as u64 * VECTOR_ELEMENT_BYTES,
                })
                .sum()
        });
        let embedding = self.matrix(vocab, hidden, true) + vision;
        let head = self.matrix(vocab, hidden, false) + hidden as u64 * VECTOR_ELEMENT_BYTES;
        // On the host, a tied head multiplies by the embedding table itself unless load-time
        // quantization gives the head blocks of its own.
        let head_shares_embedding = tied && on_host && !matches!(self, Self::Blocks { .. });
        Parts { layers: vec![layer; config.num_hidden_layers], embedding, head, head_shares_embedding }
    }
}

/// Bytes of an element of the dtype `name` (safetensors' or `torch_dtype`'s spelling).
fn element_bytes(name: &str) -> Option<u64> {
    match name.to_ascii_lowercase().as_str() {
        "f64" | "float64" => Some(8),
        "f32" | "float32" | "float" => Some(4),
        "bf16" | "bfloat16" | "f16" | "float16" | "half" => Some(2),
        _ => None,
    }
}

/// The dtype the safetensors header in `dir` gives the tensor `name`, reading only the header
/// of the file that holds it; `None` when that file is not here (or does not have it).
fn header_dtype(dir: &Path, name: &str) -> Option<String> {
    let file = match std::fs::read_to_string(dir.join("model.safetensors.index.json")) {
        Ok(text) => {
            let index: serde_json::Value = serde_json::from_str(&text).ok()?;
            index.get("weight_map")?.get(name)?.as_str()?.to_string()
        }
        Err(_) => "model.safetensors".to_string(),
    };
    let mut reader = std::fs::File::open(dir.join(file)).ok()?;
    let mut length = [0u8; 8];
    reader.read_exact(&mut length).ok()?;
    let length = usize::try_from(u64::from_le_bytes(length)).ok()?;
    // A header is JSON of a few hundred bytes a tensor; a bigger one is not a safetensors file.
    if length > 100 << 20 {
        return None;
    }
    let mut header = vec![0u8; length];
    reader.read_exact(&mut header).ok()?;
    let header: serde_json::Value = serde_json::from_slice(&header).ok()?;
    Some(header.get(name)?.get("dtype")?.as_str()?.to_string())
}

/// The parts of a GGUF as stored (its tensors stay in their block types once loaded).
fn gguf_parts(file: &GgufFile, config: &ModelConfig) -> Result<Parts> {
    let bytes = |name: &str| file.tensor(name).map_or(0, |t| t.range.end - t.range.start);
    let layers = (0..config.num_hidden_layers)
        .map(|layer| file.tensor_bytes_with_prefix(&format!("blk.{layer}.")))
        .collect();
    let embedding = bytes("token_embd.weight");
    let tied = file.tensor("output.weight").is_none();
    let head = bytes("output_norm.weight") + if tied { embedding } else { bytes("output.weight") };
    Ok(Parts { layers, embedding, head, head_shares_embedding: tied })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::candle::Limits;

    const LLAMA: &str = r#"{"model_type": "llama", "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "tie_word_embeddings": false,
        "torch_dtype": "bfloat16"}"#;

    fn options(max_context: usize, quantize: Option<GgmlDType>) -> EngineOptions {
        let limits = Limits { kv_cache_bytes: 1 << 30, max_context: Some(max_context) };
        EngineOptions { limits, quantize, ..EngineOptions::default() }
    }

    fn dir_with_config(config: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), config).unwrap();
        dir
    }

    /// Weights of one layer of `LLAMA`, counted by hand: q, o 256x256; k, v 128x256 (2 heads
    /// of 64); gate, up 512x256; down 256x512; two norms of 256 in f32.
    const LAYER_WEIGHTS: u64 = 2 * 256 * 256 + 2 * 128 * 256 + 3 * 512 * 256;

    #[test]
    fn a_latent_cache_holds_the_latent_and_the_rope_key() {
        let deepseek = LLAMA.replace("\"llama\"", "\"deepseek_v2\"").replace(
            "\"vocab_size\": 1000",
            "\"vocab_size\": 1000, \"kv_lora_rank\": 64, \"qk_rope_head_dim\": 16, \"num_experts_per_tok\": 2, \"n_routed_experts\": 4",
        );
        let memory = model_memory(dir_with_config(&deepseek).path(), &options(1000, None), true).unwrap();
        assert_eq!(memory.kv_layer, (64 + 16) * 1024 * CACHE_ELEMENT_BYTES);
    }

    #[test]
    fn bf16_weights_from_the_config_and_caches_at_the_context() {
        let dir = dir_with_config(LLAMA);
        let memory = model_memory(dir.path(), &options(1000, None), true).unwrap();
        assert_eq!(memory.layers, vec![LAYER_WEIGHTS * 2 + 2 * 256 * 4; 2]);
        assert_eq!(memory.embedding, 1000 * 256 * 2);
        assert_eq!(memory.head, 1000 * 256 * 2 + 256 * 4);
        assert!(!memory.head_shares_embedding);
        // 2 kv heads x 64 x (key + value) x 4 bytes, for 1024 positions (1000 rounded up).
        assert_eq!((memory.context, memory.kv_layer), (1000, 2 * 2 * 64 * 4 * 1024));
        assert_eq!(memory.kv_budget, 1 << 30);
        // The model's own context bounds the engine's.
        assert_eq!(model_memory(dir.path(), &options(1 << 20, None), true).unwrap().context, 4096);
    }

    #[test]
    fn the_safetensors_header_overrides_torch_dtype() {
        let dir = dir_with_config(LLAMA);
        let header = br#"{"model.layers.0.mlp.down_proj.weight":{"dtype":"F32","shape":[256,512],"data_offsets":[0,0]}}"#;
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(header);
        std::fs::write(dir.path().join("model.safetensors"), file).unwrap();
        assert_eq!(header_dtype(dir.path(), "model.layers.0.mlp.down_proj.weight").unwrap(), "F32");
        let memory = model_memory(dir.path(), &options(1000, None), true).unwrap();
        assert_eq!(memory.layers[0], LAYER_WEIGHTS * 4 + 2 * 256 * 4);
    }

    #[test]
    fn load_time_quantization_counts_blocks_and_keeps_the_embedding_dense() {
        let dir = dir_with_config(LLAMA);
        let memory = model_memory(dir.path(), &options(1000, Some(GgmlDType::Q8_0)), true).unwrap();
        // Q8_0: 34 bytes per 32 weights; every matrix's rows are whole blocks.
        assert_eq!(memory.layers[0], LAYER_WEIGHTS / 32 * 34 + 2 * 256 * 4);
        assert_eq!(memory.embedding, 1000 * 256 * 2);
        assert_eq!(memory.head, 1000 * 256 / 32 * 34 + 256 * 4);
    }

    #[test]
    fn mlx_quantized_weights_count_packed_bits_and_group_scales() {
        let config = LLAMA.replace(
            "\"torch_dtype\": \"bfloat16\"",
            "\"torch_dtype\": \"float16\", \"tie_word_embeddings\": true, \
             \"quantization\": {\"group_size\": 64, \"bits\": 4}",
        );
        let config = config.replace("\"tie_word_embeddings\": false,", "");
        let dir = dir_with_config(&config);
        let memory = model_memory(dir.path(), &options(1000, None), true).unwrap();
        // 4 bits a weight, and a 2-byte scale and bias per 64 weights of a row.
        let packed = LAYER_WEIGHTS / 2 + 2 * (LAYER_WEIGHTS / 64) * 2;
        assert_eq!(memory.layers[0], packed + 2 * 256 * 4);
        assert_eq!(memory.embedding, 1000 * 256 / 2 + 2 * 1000 * 4 * 2);
        assert!(memory.head_shares_embedding);
    }

    #[test]
    fn absurd_mlx_quantization_is_an_error() {
        // 2^62 bits a weight once overflowed the byte count.
        let config = LLAMA.replace(
            "\"torch_dtype\": \"bfloat16\"",
            "\"torch_dtype\": \"float16\", \"quantization\": {\"group_size\": 64, \"bits\": 4611686018427387904}",
        );
        let error = model_memory(dir_with_config(&config).path(), &options(1000, None), true).unwrap_err();
        assert!(error.to_string().contains("MLX quantization of 4611686018427387904 bits"), "{error}");
    }

    #[test]
    fn gguf_layers_take_what_their_mixed_blocks_take() {
        use candle_core::quantized::{gguf_file, QTensor};
        use candle_core::{Device, Tensor};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m-Q4_K_M.gguf");
        let (hidden, inter, vocab) = (256usize, 512usize, 300usize);
        let matrix = |rows: usize, cols: usize, dtype: GgmlDType| {
            QTensor::quantize(
                &Tensor::zeros((rows, cols), candle_core::DType::F32, &Device::Cpu).unwrap(),
                dtype,
            )
            .unwrap()
        };
        let vector = |len: usize| {
            QTensor::quantize(
                &Tensor::ones(len, candle_core::DType::F32, &Device::Cpu).unwrap(),
                GgmlDType::F32,
            )
            .unwrap()
        };
        let mut tensors = vec![
            ("token_embd.weight".to_string(), matrix(vocab, hidden, GgmlDType::Q4K)),
            ("output.weight".to_string(), matrix(vocab, hidden, GgmlDType::Q6K)),
            ("output_norm.weight".to_string(), vector(hidden)),
        ];
        for layer in 0..2 {
            // As in Q4_K_M, some layers keep attn_v and ffn_down in Q6_K.
            let more_bits = if layer == 0 { GgmlDType::Q6K } else { GgmlDType::Q4K };
            let p = format!("blk.{layer}");
            tensors.extend([
                (format!("{p}.attn_q.weight"), matrix(hidden, hidden, GgmlDType::Q4K)),
                (format!("{p}.attn_k.weight"), matrix(128, hidden, GgmlDType::Q4K)),
                (format!("{p}.attn_v.weight"), matrix(128, hidden, more_bits)),
                (format!("{p}.attn_output.weight"), matrix(hidden, hidden, GgmlDType::Q4K)),
                (format!("{p}.ffn_gate.weight"), matrix(inter, hidden, GgmlDType::Q4K)),
                (format!("{p}.ffn_up.weight"), matrix(inter, hidden, GgmlDType::Q4K)),
                (format!("{p}.ffn_down.weight"), matrix(hidden, inter, more_bits)),
                (format!("{p}.attn_norm.weight"), vector(hidden)),
                (format!("{p}.ffn_norm.weight"), vector(hidden)),
            ]);
        }
        let metadata = [
            ("general.architecture", gguf_file::Value::String("llama".into())),
            ("llama.attention.head_count", gguf_file::Value::U32(4)),
            ("llama.attention.head_count_kv", gguf_file::Value::U32(2)),
            ("llama.embedding_length", gguf_file::Value::U32(hidden as u32)),
            ("llama.feed_forward_length", gguf_file::Value::U32(inter as u32)),
            ("llama.block_count", gguf_file::Value::U32(2)),
            ("llama.context_length", gguf_file::Value::U32(2048)),
        ];
        let metadata: Vec<(&str, &gguf_file::Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
        let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let mut out = std::fs::File::create(&path).unwrap();
        gguf_file::write(&mut out, &metadata, &tensor_refs).unwrap();
        drop(out);
        let memory = model_memory(&path, &options(1 << 20, None), true).unwrap();
        // Q4_K: 144 bytes per 256 weights; Q6_K: 210.
        let (q4, q6) = (|n: usize| (n / 256 * 144) as u64, |n: usize| (n / 256 * 210) as u64);
        let base = q4(hidden * hidden) * 2 + q4(128 * hidden) + 2 * q4(inter * hidden) + 2 * 256 * 4;
        assert_eq!(
            memory.layers,
            [base + q6(128 * hidden) + q6(hidden * inter), base + q4(128 * hidden) + q4(hidden * inter)]
        );
        assert_eq!(memory.embedding, q4(vocab * hidden));
        assert_eq!(memory.head, q6(vocab * hidden) + 256 * 4);
        assert_eq!(memory.context, 2048);
    }
}
