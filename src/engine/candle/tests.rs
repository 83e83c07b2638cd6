//! Engine-level checks on a tiny random model written in the test: sharding, the KV cache
//! batching and concurrent requests never change the numbers.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Tensor};

use super::cache::RequestCache;
use super::model::{BatchStep, ShardInput, ShardModel};
use super::tensors::Checkpoint;
use super::{reference_logits, BatchOptions, CandleEngine, ComputeDevice, EngineOptions};
use crate::engine::{Engine, LocalDirectories, SamplingParams};
use crate::error::Error;
use crate::shard::Shard;
use crate::tensor::{DType, WireTensor};

const HIDDEN: usize = 32;
const LAYERS: usize = 3;
const VOCAB: usize = 64;

/// Deterministic pseudo-random values in [-scale, scale).
fn values(count: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..count)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// Writes a tiny model of `model_type` (Qwen3-style q/k norms, Qwen2-style biases) into a fresh dir.
fn write_tiny_model(model_type: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let unique = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("xotorch-tiny-{model_type}-{}-{unique}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (heads, kv_heads, head_dim, inter) = (4, 2, 8, 48);
    let config = serde_json::json!({
        "model_type": model_type, "hidden_size": HIDDEN, "intermediate_size": inter,
        "num_hidden_layers": LAYERS, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "head_dim": head_dim, "vocab_size": VOCAB, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "max_position_embeddings": 128, "tie_word_embeddings": model_type == "qwen2",
        "eos_token_id": 2,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut seed = 1;
    let mut add = |name: String, shape: Vec<usize>, base: f32, scale: f32| {
        seed += 1;
        let data: Vec<f32> =
            values(shape.iter().product(), seed, scale).into_iter().map(|v| v + base).collect();
        tensors.insert(name, Tensor::from_vec(data, shape, &Device::Cpu).unwrap());
    };
    add("model.embed_tokens.weight".into(), vec![VOCAB, HIDDEN], 0.0, 1.0);
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        for (proj, out) in
            [("q_proj", heads * head_dim), ("k_proj", kv_heads * head_dim), ("v_proj", kv_heads * head_dim)]
        {
            add(format!("{p}.self_attn.{proj}.weight"), vec![out, HIDDEN], 0.0, 0.3);
            if model_type == "qwen2" {
                add(format!("{p}.self_attn.{proj}.bias"), vec![out], 0.0, 0.1);
            }
        }
        add(format!("{p}.self_attn.o_proj.weight"), vec![HIDDEN, heads * head_dim], 0.0, 0.3);
        if model_type == "qwen3" {
            add(format!("{p}.self_attn.q_norm.weight"), vec![head_dim], 1.0, 0.1);
            add(format!("{p}.self_attn.k_norm.weight"), vec![head_dim], 1.0, 0.1);
        }
        add(format!("{p}.mlp.gate_proj.weight"), vec![inter, HIDDEN], 0.0, 0.3);
        add(format!("{p}.mlp.up_proj.weight"), vec![inter, HIDDEN], 0.0, 0.3);
        add(format!("{p}.mlp.down_proj.weight"), vec![HIDDEN, inter], 0.0, 0.3);
        add(format!("{p}.input_layernorm.weight"), vec![HIDDEN], 1.0, 0.1);
        add(format!("{p}.post_attention_layernorm.weight"), vec![HIDDEN], 1.0, 0.1);
    }
    add("model.norm.weight".into(), vec![HIDDEN], 1.0, 0.1);
    if model_type != "qwen2" {
        add("lm_head.weight".into(), vec![VOCAB, HIDDEN], 0.0, 0.3);
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("tokenizer.json"), TOKENIZER).unwrap();
    dir
}

/// A word-level tokenizer over a few words, enough for encode/decode plumbing.
const TOKENIZER: &str = r#"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
  "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
  "decoder": null, "model": {"type": "WordLevel", "unk_token": "<unk>",
  "vocab": {"<unk>": 0, "hello": 1, "</s>": 2, "world": 3, "tiny": 4, "model": 5}}}"#;

fn engine() -> CandleEngine {
    CandleEngine::new(Arc::new(LocalDirectories), EngineOptions::default(), ComputeDevice::best())
}

fn tokens(ids: &[i64]) -> WireTensor {
    WireTensor::new(DType::I64, vec![1, ids.len()], bytemuck::cast_slice(ids).to_vec()).unwrap()
}

fn floats(t: &WireTensor) -> Vec<f32> {
    bytemuck::pod_collect_to_vec(t.data())
}

/// Runs `ids` through the ring of `shards` (one engine per shard) as one prefill step,
/// then `steps` greedy decode steps; returns the last logits and the generated tokens.
async fn run_ring(dir: &Path, bounds: &[(i32, i32)], ids: &[i64], steps: usize) -> (Vec<f32>, Vec<u32>) {
    let model = dir.display().to_string();
    let engines: Vec<_> = bounds.iter().map(|_| engine()).collect();
    let shards: Vec<_> =
        bounds.iter().map(|&(s, e)| Shard::new(model.clone(), s, e, LAYERS as i32)).collect();
    let mut input = tokens(ids);
    let mut generated = Vec::new();
    let mut logits = Vec::new();
    for _ in 0..=steps {
        for (engine, shard) in engines.iter().zip(&shards) {
            input = engine.infer_tensor("r", shard, input, None).await.unwrap().0;
        }
        logits = floats(&input);
        let next = engines[0].sample(&input, SamplingParams::default()).await.unwrap()[0];
        generated.push(next);
        input = tokens(&[i64::from(next)]);
    }
    (logits, generated)
}

fn assert_close(a: &[f32], b: &[f32], tolerance: f32) {
    assert_eq!(a.len(), b.len());
    let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
    assert!(worst <= tolerance, "max difference {worst} > {tolerance}");
}

#[tokio::test]
async fn sharding_and_caching_never_change_the_numbers() {
    for model_type in ["llama", "qwen2", "qwen3"] {
        let dir = write_tiny_model(model_type);
        let prompt = [1, 5, 9, 33, 2, 60, 7];
        let (whole, whole_tokens) = run_ring(&dir, &[(0, 2)], &prompt, 12).await;
        let (two, two_tokens) = run_ring(&dir, &[(0, 0), (1, 2)], &prompt, 12).await;
        let (three, three_tokens) = run_ring(&dir, &[(0, 0), (1, 1), (2, 2)], &prompt, 12).await;
        assert_eq!(whole_tokens, two_tokens, "{model_type}");
        assert_eq!(whole_tokens, three_tokens, "{model_type}");
        assert_close(&whole, &two, 1e-5);
        assert_close(&whole, &three, 1e-5);

        // Token-by-token decoding (KV cache) gives the logits of a full prefill.
        let mut sequence: Vec<u32> = prompt.iter().map(|&t| t as u32).collect();
        sequence.extend(&whole_tokens[..12]);
        let stepwise = reference_logits(&dir, &sequence).unwrap();
        let prefill =
            run_ring(&dir, &[(0, 2)], &sequence.iter().map(|&t| i64::from(t)).collect::<Vec<_>>(), 0).await.0;
        assert_close(stepwise.last().unwrap(), &prefill, 1e-4);
        std::fs::remove_dir_all(dir).unwrap();
    }
}

#[tokio::test]
async fn interleaved_requests_match_requests_alone() {
    let dir = write_tiny_model("llama");
    let shard = Shard::new(dir.display().to_string(), 0, LAYERS as i32 - 1, LAYERS as i32);
    let alone_a = run_ring(&dir, &[(0, 2)], &[1, 2, 3], 8).await.1;
    let alone_b = run_ring(&dir, &[(0, 2)], &[40, 41], 8).await.1;
    let engine = engine();
    let (mut a, mut b) = (tokens(&[1, 2, 3]), tokens(&[40, 41]));
    let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
    for _ in 0..=8 {
        let (logits_a, _) = engine.infer_tensor("a", &shard, a, None).await.unwrap();
        let (logits_b, _) = engine.infer_tensor("b", &shard, b, None).await.unwrap();
        let next_a = engine.sample(&logits_a, SamplingParams::default()).await.unwrap()[0];
        let next_b = engine.sample(&logits_b, SamplingParams::default()).await.unwrap()[0];
        got_a.push(next_a);
        got_b.push(next_b);
        a = tokens(&[i64::from(next_a)]);
        b = tokens(&[i64::from(next_b)]);
    }
    assert_eq!(got_a, alone_a);
    assert_eq!(got_b, alone_b);
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn bad_inputs_fail_the_request_only() {
    let dir = write_tiny_model("llama");
    let model = dir.display().to_string();
    let engine = engine();
    let whole = Shard::new(model.clone(), 0, 2, 3);
    let err = engine.infer_tensor("r", &whole, tokens(&[VOCAB as i64]), None).await.unwrap_err();
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
    let hidden = WireTensor::new(DType::F32, vec![1, 1, 5], vec![0; 20]).unwrap();
    let err = engine.infer_tensor("r", &Shard::new(model.clone(), 1, 2, 3), hidden, None).await.unwrap_err();
    assert!(err.to_string().contains("hidden size"), "{err}");
    let err =
        engine.infer_tensor("r", &Shard::new(model.clone(), 0, 3, 3), tokens(&[1]), None).await.unwrap_err();
    assert!(matches!(err, Error::InvalidShard(_)), "{err}");
    let err =
        engine.infer_tensor("r", &Shard::new(model.clone(), 0, 1, 4), tokens(&[1]), None).await.unwrap_err();
    assert!(err.to_string().contains("4 layers"), "{err}");
    let long: Vec<i64> = vec![1; 129];
    let err = engine.infer_tensor("r", &whole, tokens(&long), None).await.unwrap_err();
    assert!(matches!(err, Error::ContextOverflow(_)), "{err}");
    // Hidden states are sized from the model before they are converted: its context × its width.
    let huge = WireTensor::new(DType::F32, vec![1, 129, HIDDEN], vec![0; 129 * HIDDEN * 4]).unwrap();
    let err = engine.infer_tensor("r", &Shard::new(model.clone(), 1, 2, 3), huge, None).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("129 positions (4128 elements") && text.contains("context of 128 tokens"),
        "{text}"
    );
    // The engine still serves.
    assert!(engine.infer_tensor("ok", &whole, tokens(&[1, 2]), None).await.is_ok());
    assert_eq!(engine.encode(&whole, "hello tiny world").await.unwrap(), [1, 4, 3]);
    assert_eq!(engine.eos_token_ids(&whole).await.unwrap(), [2]);
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn a_saved_shard_holds_its_checkpoint_tensors_and_loads_back() {
    let dir = write_tiny_model("qwen2");
    let saved_dir = dir.join("saved");
    std::fs::create_dir_all(&saved_dir).unwrap();
    for file in ["config.json", "tokenizer.json"] {
        std::fs::copy(dir.join(file), saved_dir.join(file)).unwrap();
    }
    // The last two layers of a model whose head is tied to the embedding.
    let shard = Shard::new(dir.display().to_string(), 1, 2, 3);
    let engine = engine();
    engine.save_checkpoint(&shard, &saved_dir.join("model.safetensors")).await.unwrap();

    let original = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let saved = candle_core::safetensors::load(saved_dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut expected: Vec<&String> = original
        .keys()
        .filter(|name| {
            name.starts_with("model.layers.1.")
                || name.starts_with("model.layers.2.")
                || ["model.norm.weight", "model.embed_tokens.weight"].contains(&name.as_str())
        })
        .collect();
    expected.sort();
    let mut names: Vec<&String> = saved.keys().collect();
    names.sort();
    assert_eq!(names, expected);
    for name in names {
        let (a, b) = (&original[name], &saved[name]);
        assert_eq!((a.dtype(), a.dims()), (b.dtype(), b.dims()), "{name}");
        let difference = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(difference, 0.0, "{name}");
    }

    let hidden: Vec<f32> = values(3 * HIDDEN, 5, 1.0);
    let input =
        WireTensor::new(DType::F32, vec![1, 3, HIDDEN], bytemuck::cast_slice(&hidden).to_vec()).unwrap();
    let before = engine.infer_tensor("r", &shard, input.clone(), None).await.unwrap().0;
    let reloaded = self::engine();
    let saved_shard = Shard::new(saved_dir.display().to_string(), 1, 2, 3);
    reloaded.load_from(&saved_shard, &saved_dir).await.unwrap();
    let after = reloaded.infer_tensor("r", &saved_shard, input, None).await.unwrap().0;
    assert_eq!(floats(&before), floats(&after));

    let err = engine.save_checkpoint(&shard, &dir.join("missing").join("x.safetensors")).await.unwrap_err();
    assert!(err.to_string().contains("cannot write the checkpoint"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn projections_of_different_dtypes_are_a_clear_error() {
    let dir = write_tiny_model("llama");
    let file = dir.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    let name = "model.layers.1.self_attn.k_proj.weight";
    let narrowed = tensors[name].to_dtype(candle_core::DType::BF16).unwrap();
    tensors.insert(name.into(), narrowed);
    candle_core::safetensors::save(&tensors, &file).unwrap();
    let shard = Shard::new(dir.display().to_string(), 0, 2, 3);
    let err = engine().infer_tensor("r", &shard, tokens(&[1]), None).await.unwrap_err();
    let message = err.to_string();
    assert!(message.contains("model.layers.1.self_attn.q_proj.weight") && message.contains(name), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// Greedy tokens and last logits of `prompt` and `steps` decode steps, run alone.
fn run_alone(model: &ShardModel, prompt: &[u32], steps: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    let mut cache = RequestCache::new(model.layer_count());
    let (mut input, mut tokens, mut logits) = (prompt.to_vec(), Vec::new(), Vec::new());
    for _ in 0..=steps {
        let ids = Tensor::new(input.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let out: Vec<f32> = model
            .forward(ShardInput::Tokens(ids), &mut cache)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let next = argmax(&out);
        tokens.push(next);
        logits.push(out);
        input = vec![next];
    }
    (tokens, logits)
}

fn argmax(values: &[f32]) -> u32 {
    values.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0 as u32
}

#[test]
fn batched_steps_match_steps_alone() {
    for model_type in ["llama", "qwen2", "qwen3"] {
        let dir = write_tiny_model(model_type);
        let shard = Shard::new(dir.display().to_string(), 0, LAYERS as i32 - 1, LAYERS as i32);
        let model = ShardModel::load(&Checkpoint::open(&dir).unwrap(), &shard, 128, &Device::Cpu, None, None)
            .unwrap();
        let prompts: [&[u32]; 3] = [&[1, 5, 9, 33, 2, 60, 7], &[40, 41], &[3]];
        let steps = 10;
        let alone: Vec<_> = prompts.iter().map(|p| run_alone(&model, p, steps)).collect();

        // The second request's prompt runs in two chunks beside the others' steps, and the
        // third joins one round late.
        let mut caches: Vec<RequestCache> = (0..3).map(|_| RequestCache::new(model.layer_count())).collect();
        let mut pending: Vec<Vec<u32>> = prompts.iter().map(|p| p.to_vec()).collect();
        let mut got: Vec<(Vec<u32>, Vec<Vec<f32>>)> = vec![Default::default(); 3];
        for round in 0..steps + 3 {
            let mut steps_in_round = Vec::new();
            let mut owners = Vec::new();
            for (i, cache) in caches.iter_mut().enumerate() {
                if got[i].0.len() > steps || (i == 2 && round == 0) {
                    continue;
                }
                let take = if i == 1 && cache.position == 0 { 1 } else { pending[i].len() };
                let chunk: Vec<u32> = pending[i].drain(..take).collect();
                let ids = Tensor::new(chunk.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
                let hidden = model.embed(ShardInput::Tokens(ids)).unwrap();
                steps_in_round.push(BatchStep { hidden, cache, wants_logits: pending[i].is_empty() });
                owners.push(i);
            }
            if owners.is_empty() {
                break;
            }
            for (i, out) in owners.into_iter().zip(model.forward_batch(steps_in_round).unwrap()) {
                let Some(out) = out else { continue };
                let out: Vec<f32> = out.flatten_all().unwrap().to_vec1().unwrap();
                let next = argmax(&out);
                got[i].0.push(next);
                got[i].1.push(out);
                pending[i] = vec![next];
            }
        }
        for (i, ((tokens, logits), (alone_tokens, alone_logits))) in got.iter().zip(&alone).enumerate() {
            assert_eq!(tokens, alone_tokens, "{model_type} request {i}");
            for (a, b) in logits.iter().zip(alone_logits) {
                assert_close(a, b, 1e-5);
            }
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}

/// An engine whose prompts run in chunks of at most `chunk` positions.
fn engine_with_chunks(chunk: usize) -> Arc<CandleEngine> {
    let options =
        EngineOptions { batch: BatchOptions { prefill_chunk: chunk, max_batch: 64 }, ..Default::default() };
    Arc::new(CandleEngine::new(Arc::new(LocalDirectories), options, ComputeDevice::best()))
}

#[tokio::test]
async fn concurrent_requests_through_two_shards_match_their_runs_alone() {
    let dir = write_tiny_model("qwen3");
    let model = dir.display().to_string();
    let shards = [Shard::new(model.clone(), 0, 0, 3), Shard::new(model, 1, 2, 3)];
    let engines = [engine_with_chunks(3), engine_with_chunks(3)];
    let prompts: Vec<Vec<i64>> = (0..8)
        .map(|r| (0..(1 + r * 3) as i64).map(|t| (t * 7 + r as i64) % VOCAB as i64).collect())
        .collect();
    let mut tasks = Vec::new();
    for (r, prompt) in prompts.iter().enumerate() {
        let (engines, shards, prompt) = (engines.clone(), shards.clone(), prompt.clone());
        tasks.push(tokio::spawn(async move {
            let id = format!("r{r}");
            let (mut input, mut generated) = (tokens(&prompt), Vec::new());
            for _ in 0..=8 {
                for (engine, shard) in engines.iter().zip(&shards) {
                    input = engine.infer_tensor(&id, shard, input, None).await.unwrap().0;
                }
                let next = engines[0].sample(&input, SamplingParams::default()).await.unwrap()[0];
                generated.push(next);
                input = tokens(&[i64::from(next)]);
            }
            for engine in &engines {
                engine.finish_request(&id).await;
            }
            generated
        }));
    }
    for (prompt, task) in prompts.iter().zip(tasks) {
        let together = task.await.unwrap();
        let alone = run_ring(&dir, &[(0, 0), (1, 2)], prompt, 8).await.1;
        assert_eq!(together, alone, "prompt {prompt:?}");
    }
    for engine in &engines {
        assert_eq!(engine.caches.lock().unwrap().total_bytes(), 0, "every cache went back and was freed");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn an_abandoned_step_returns_its_cache() {
    let dir = write_tiny_model("llama");
    let shard = Shard::new(dir.display().to_string(), 0, 2, 3);
    let engine = engine_with_chunks(2);
    engine.ensure_shard(&shard).await.unwrap();
    let long: Vec<i64> = (0..100).map(|t| t % VOCAB as i64).collect();
    // The caller goes away at once; the step is dropped or finishes, and its cache comes back.
    let _ = tokio::time::timeout(
        std::time::Duration::ZERO,
        engine.infer_tensor("gone", &shard, tokens(&long), None),
    )
    .await;
    let mut again = Err(Error::InvalidArgument("not tried".into()));
    for _ in 0..200 {
        again = engine.infer_tensor("gone", &shard, tokens(&[1]), None).await;
        if again.is_ok() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(again.is_ok(), "{:?}", again.err());
    engine.finish_request("gone").await;
    assert_eq!(engine.caches.lock().unwrap().total_bytes(), 0);
    std::fs::remove_dir_all(dir).unwrap();
}
