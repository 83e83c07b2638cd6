//! `config.json` of a model directory, bent field by field from real families' configs (sizes
//! at the edges of 64 bits, MLX quantization, DeepSeek's latent ranks, MoE counts), then read
//! as the engine reads it: the config, the per-token costs and the memory estimate.

use proptest::prelude::*;

use super::{assert_clear, bent_object, edge_u64};
use crate::engine::candle::{model_memory, EngineOptions, Limits, ModelConfig};

fn families() -> Vec<serde_json::Value> {
    let llama = serde_json::json!({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 256, "head_dim": 16, "torch_dtype": "bfloat16",
        "quantization": {"bits": 4, "group_size": 32}, "rope_scaling": {"rope_type": "llama3", "factor": 8.0},
        "partial_rotary_factor": 0.5, "sliding_window": 128});
    let moe = serde_json::json!({"model_type": "qwen3_moe", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 4, "num_attention_heads": 4, "vocab_size": 100, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 256, "num_experts": 8, "num_experts_per_tok": 2,
        "moe_intermediate_size": 32, "decoder_sparse_step": 2, "mlp_only_layers": [0]});
    let deepseek = serde_json::json!({"model_type": "deepseek_v2", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 256, "kv_lora_rank": 32, "q_lora_rank": null, "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 16, "v_head_dim": 16, "n_routed_experts": 4, "num_experts_per_tok": 2,
        "n_shared_experts": 1, "n_group": 2, "topk_group": 1, "first_k_dense_replace": 1,
        "topk_method": "group_limited_greedy", "rope_scaling": {"type": "yarn", "factor": 4.0}});
    let gemma = serde_json::json!({"model_type": "gemma2", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 256, "head_dim": 16, "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": 16, "sliding_window": 64, "final_logit_softcapping": 30.0});
    let phi3 = serde_json::json!({"model_type": "phi3", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 1024, "original_max_position_embeddings": 256,
        "rope_scaling": {"type": "longrope", "short_factor": [1.0, 1.0, 1.0, 1.0], "long_factor": [2.0, 2.0, 2.0, 2.0]}});
    vec![llama, moe, deepseek, gemma, phi3]
}

/// A family's config with fields bent, and some numbers set to edge values.
fn config_json() -> impl Strategy<Value = serde_json::Value> {
    prop::sample::select(families()).prop_flat_map(|base| {
        let keys: Vec<String> = base.as_object().unwrap().keys().cloned().collect();
        let numbers = prop::collection::vec((prop::sample::select(keys), edge_u64()), 0..4);
        (bent_object(base), numbers).prop_map(|(mut config, numbers)| {
            for (key, value) in numbers {
                config[key.as_str()] = value.into();
            }
            config
        })
    })
}

proptest! {
    #[test]
    fn fuzz_model_config(config in config_json()) {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("config.json"), config.to_string())?;
        let checked = ModelConfig::from_dir(dir.path());
        let options = EngineOptions { limits: Limits { kv_cache_bytes: 1 << 30, max_context: Some(512) }, ..EngineOptions::default() };
        let memory = model_memory(dir.path(), &options, true);
        match checked {
            Ok(config) => {
                let costs = config.costs();
                prop_assert!(costs.layer >= 0.0 && costs.head >= 0.0, "{costs:?}");
                match memory {
                    Ok(memory) => prop_assert_eq!(memory.layers.len(), config.num_hidden_layers),
                    Err(error) => assert_clear(&error)?,
                }
            }
            Err(error) => assert_clear(&error)?,
        }
    }
}
