//! GGUF headers, written byte by byte with counts, lengths, alignment, tensor shapes, block
//! types and offsets at the edges of their types, then read by every reader a node has: the
//! downloader's header probe and range planner, the engine's checkpoint, config and memory
//! estimate, and the tokenizer rebuilt from the metadata.

use proptest::prelude::*;

use super::{assert_clear, edge_u64};
use crate::download::gguf::{needed_ranges, parse_header};
use crate::engine::candle::{model_memory, EngineOptions, GgufFile, Limits};
use crate::shard::Shard;
use crate::tokenizer::Tokenizer;

/// A metadata value of GGUF's typed encoding.
#[derive(Debug, Clone)]
enum Value {
    U32(u32),
    U64(u64),
    I32(i32),
    F32(f32),
    Str(String),
    Strings(Vec<String>),
    Floats(Vec<f32>),
    Ints(Vec<i32>),
    /// Any type id and payload bytes.
    Raw(u32, Vec<u8>),
}

fn put_string(out: &mut Vec<u8>, text: &str) {
    out.extend((text.len() as u64).to_le_bytes());
    out.extend(text.as_bytes());
}

impl Value {
    fn write(&self, out: &mut Vec<u8>) {
        let array = |out: &mut Vec<u8>, kind: u32, count: usize| {
            out.extend(9u32.to_le_bytes());
            out.extend(kind.to_le_bytes());
            out.extend((count as u64).to_le_bytes());
        };
        match self {
            Value::U32(v) => out.extend([4u32.to_le_bytes(), v.to_le_bytes()].concat()),
            Value::U64(v) => {
                out.extend(10u32.to_le_bytes());
                out.extend(v.to_le_bytes());
            }
            Value::I32(v) => out.extend([5u32.to_le_bytes(), v.to_le_bytes()].concat()),
            Value::F32(v) => out.extend([6u32.to_le_bytes(), v.to_le_bytes()].concat()),
            Value::Str(s) => {
                out.extend(8u32.to_le_bytes());
                put_string(out, s);
            }
            Value::Strings(items) => {
                array(out, 8, items.len());
                items.iter().for_each(|s| put_string(out, s));
            }
            Value::Floats(items) => {
                array(out, 6, items.len());
                items.iter().for_each(|v| out.extend(v.to_le_bytes()));
            }
            Value::Ints(items) => {
                array(out, 5, items.len());
                items.iter().for_each(|v| out.extend(v.to_le_bytes()));
            }
            Value::Raw(kind, bytes) => {
                out.extend(kind.to_le_bytes());
                out.extend(bytes);
            }
        }
    }
}

fn size_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => (1u32..64).prop_map(Value::U32),
        1 => edge_u64().prop_map(Value::U64),
        1 => any::<i32>().prop_map(Value::I32),
        1 => any::<f32>().prop_map(Value::F32),
    ]
}

fn tokens() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(
        prop_oneof![Just("a".to_string()), Just("b".to_string()), Just("ab".to_string()), ".{0,3}"],
        0..8,
    )
}

fn metadata() -> impl Strategy<Value = Vec<(String, Value)>> {
    let arch = prop_oneof![Just("llama".to_string()), Just("qwen2".to_string()), ".{0,6}"];
    let entries = vec![
        ("general.architecture", arch.prop_map(Value::Str).boxed()),
        (
            "general.alignment",
            prop_oneof![Just(Value::U32(0)), Just(Value::U32(32)), size_value(), Just(Value::I32(-1))]
                .boxed(),
        ),
        ("llama.block_count", size_value().boxed()),
        ("llama.embedding_length", size_value().boxed()),
        ("llama.feed_forward_length", size_value().boxed()),
        ("llama.attention.head_count", size_value().boxed()),
        ("llama.attention.head_count_kv", size_value().boxed()),
        ("llama.context_length", size_value().boxed()),
        ("llama.expert_count", size_value().boxed()),
        (
            "tokenizer.ggml.model",
            prop_oneof![Just("gpt2".to_string()), Just("llama".to_string()), ".{0,4}"]
                .prop_map(Value::Str)
                .boxed(),
        ),
        ("tokenizer.ggml.tokens", tokens().prop_map(Value::Strings).boxed()),
        (
            "tokenizer.ggml.merges",
            prop::collection::vec(
                prop_oneof![Just("a b".to_string()), Just("x y".to_string()), ".{0,4}"],
                0..4,
            )
            .prop_map(Value::Strings)
            .boxed(),
        ),
        ("tokenizer.ggml.scores", prop::collection::vec(any::<f32>(), 0..8).prop_map(Value::Floats).boxed()),
        ("tokenizer.ggml.token_type", prop::collection::vec(-1i32..8, 0..8).prop_map(Value::Ints).boxed()),
        ("tokenizer.ggml.bos_token_id", size_value().boxed()),
        ("tokenizer.ggml.eos_token_id", size_value().boxed()),
        (
            "tokenizer.ggml.pre",
            prop_oneof![Just("llama3".to_string()), ".{0,4}"].prop_map(Value::Str).boxed(),
        ),
        (
            "tokenizer.chat_template",
            prop_oneof![Just("{{ messages }}".to_string()), ".{0,8}"].prop_map(Value::Str).boxed(),
        ),
        (
            "noise",
            (any::<u32>(), prop::collection::vec(any::<u8>(), 0..16))
                .prop_map(|(k, b)| Value::Raw(k, b))
                .boxed(),
        ),
    ];
    let each = entries.into_iter().map(|(key, value)| {
        prop::option::weighted(0.6, value).prop_map(move |v| v.map(|v| (key.to_string(), v)))
    });
    each.collect::<Vec<_>>().prop_map(|entries| entries.into_iter().flatten().collect())
}

/// A tensor info: name, dims, GGML type id, offset.
fn tensor_info() -> impl Strategy<Value = (String, Vec<u64>, u32, u64)> {
    let name = prop::sample::select(vec![
        "token_embd.weight",
        "blk.0.attn_q.weight",
        "output.weight",
        "rope_freqs.weight",
        "blk.9.ffn_up.weight",
    ]);
    let dims = prop::collection::vec(prop_oneof![4 => 1u64..64, 1 => edge_u64()], 0..5);
    let dtype = prop_oneof![Just(0u32), Just(1), Just(2), Just(8), Just(12), any::<u32>()];
    let offset = prop_oneof![3 => Just(0u64), 1 => 0u64..256, 1 => edge_u64()];
    (name, dims, dtype, offset)
        .prop_map(|(name, dims, dtype, offset)| (name.to_string(), dims, dtype, offset))
}

/// A whole file: header (with true or bent counts), then some tensor bytes.
fn gguf_file() -> impl Strategy<Value = Vec<u8>> {
    let counts = prop::option::weighted(0.1, (edge_u64(), edge_u64()));
    let version = prop_oneof![Just(3u32), Just(2), any::<u32>()];
    (
        metadata(),
        prop::collection::vec(tensor_info(), 0..4),
        counts,
        version,
        prop::collection::vec(any::<u8>(), 0..600),
    )
        .prop_map(|(metadata, tensors, counts, version, data)| {
            let mut out = b"GGUF".to_vec();
            out.extend(version.to_le_bytes());
            let (tensor_count, kv_count) = counts.unwrap_or((tensors.len() as u64, metadata.len() as u64));
            out.extend(tensor_count.to_le_bytes());
            out.extend(kv_count.to_le_bytes());
            for (key, value) in &metadata {
                put_string(&mut out, key);
                value.write(&mut out);
            }
            for (name, dims, dtype, offset) in &tensors {
                put_string(&mut out, name);
                out.extend((dims.len() as u32).to_le_bytes());
                dims.iter().for_each(|d| out.extend(d.to_le_bytes()));
                out.extend(dtype.to_le_bytes());
                out.extend(offset.to_le_bytes());
            }
            out.extend(data);
            out
        })
}

proptest! {
    #[test]
    fn fuzz_gguf_header(file in gguf_file(), cut in any::<prop::sample::Index>()) {
        let size = file.len() as u64;
        // The downloader's probe: on the whole file, and on a prefix of it.
        let prefix = &file[..cut.index(file.len() + 1)];
        if let Err(error) = parse_header(prefix, size, "fuzz.gguf") {
            assert_clear(&error)?;
        }
        if let Ok(Some(content)) = parse_header(&file, size, "fuzz.gguf") {
            for shard in [None, Some(Shard::new("m", 0, 0, 2)), Some(Shard::new("m", 1, 1, 2))] {
                if let Err(error) = needed_ranges(&content, shard.as_ref(), true, size, "fuzz.gguf") {
                    assert_clear(&error)?;
                }
            }
        }
        // The engine and the tokenizer, from the file on disk.
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("fuzz.gguf");
        std::fs::write(&path, &file)?;
        match GgufFile::open(&path).and_then(|gguf| gguf.config()) {
            Ok(_) => {
                let options = EngineOptions { limits: Limits { kv_cache_bytes: 1 << 30, max_context: Some(64) }, ..EngineOptions::default() };
                if let Err(error) = model_memory(&path, &options, true) {
                    assert_clear(&error)?;
                }
            }
            Err(error) => assert_clear(&error)?,
        }
        match Tokenizer::from_gguf(&path) {
            Ok(tokenizer) => {
                if let Ok(ids) = tokenizer.encode("ab a b", true) {
                    if let Err(error) = tokenizer.decode(&ids, true) {
                        assert_clear(&error)?;
                    }
                }
            }
            Err(error) => assert_clear(&error)?,
        }
    }
}
