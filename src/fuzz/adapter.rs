//! LoRA adapters as `--adapter` reads them: PEFT's `adapter_config.json` bent field by field
//! from what PEFT writes, beside `lora_A`/`lora_B` tensors of any small shape, loaded for a
//! shard and merged into its weights as the engine merges them.

use candle_core::{DType, Device, Tensor};
use proptest::prelude::*;

use super::{assert_clear, bent_object, edge_u64};
use crate::engine::candle::LoraMerge;
use crate::shard::Shard;

/// The fields PEFT 0.21 writes for a rank-2 adapter of `q_proj`.
fn peft_config() -> serde_json::Value {
    serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
        "use_rslora": false, "use_dora": false, "fan_in_fan_out": false, "bias": "none", "lora_bias": false,
        "init_lora_weights": true, "layers_to_transform": null, "layers_pattern": null, "rank_pattern": {},
        "alpha_pattern": {}, "modules_to_save": null, "loftq_config": {}, "megatron_core": "megatron.core",
        "qalora_group_size": 16, "task_type": "CAUSAL_LM", "lora_dropout": 0.0})
}

/// A config bent from PEFT's, with `r` and `layers_to_transform` now and then at the edges.
fn config_json() -> impl Strategy<Value = serde_json::Value> {
    let rank = prop::option::weighted(0.3, prop_oneof![0u64..4, edge_u64()]);
    let layers = prop::option::weighted(0.3, prop::collection::vec(prop_oneof![0u64..3, edge_u64()], 0..3));
    (bent_object(peft_config()), rank, layers).prop_map(|(mut config, rank, layers)| {
        if let Some(rank) = rank {
            config["r"] = rank.into();
        }
        if let Some(layers) = layers {
            config["layers_to_transform"] = layers.into();
        }
        config
    })
}

proptest! {
    #[test]
    fn fuzz_adapter(
        config in config_json(),
        shapes in prop::collection::vec((any::<bool>(), 0usize..5, 0usize..7), 4),
        split in any::<bool>(),
    ) {
        let root = tempfile::tempdir()?;
        let dir = if split { root.path().join("layers-0-1") } else { root.path().to_path_buf() };
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("adapter_config.json"), config.to_string())?;
        let mut tensors = std::collections::HashMap::new();
        for (i, (fits, rows, cols)) in shapes.into_iter().enumerate() {
            // A fitting pair is `A` [2, 5] and `B` [3, 2]; others are any small shape.
            let (rows, cols) = match (fits, i % 2) {
                (true, 0) => (2, 5),
                (true, _) => (3, 2),
                (false, _) => (rows, cols),
            };
            let name = format!(
                "base_model.model.model.layers.{}.self_attn.q_proj.lora_{}.weight",
                i / 2,
                if i % 2 == 0 { "A" } else { "B" }
            );
            tensors.insert(name, Tensor::ones((rows, cols), DType::F32, &Device::Cpu)?);
        }
        candle_core::safetensors::save(&tensors, dir.join("adapter_model.safetensors"))?;
        if let Err(error) = LoraMerge::check(root.path()) {
            return assert_clear(&error);
        }
        let merge = match LoraMerge::load(root.path(), &Shard::new("m", 0, 1, 2)) {
            Ok(merge) => merge,
            Err(error) => return assert_clear(&error),
        };
        // Each layer's q_proj is [3, 5] in this model.
        let base = Tensor::zeros((3, 5), DType::BF16, &Device::Cpu)?;
        for layer in 0..2 {
            let names = [(format!("model.layers.{layer}.self_attn.q_proj.weight"), 3)];
            match merge.merge(&names, &base) {
                Ok(merged) => prop_assert_eq!(merged.dims(), &[3, 5]),
                Err(error) => assert_clear(&error)?,
            }
        }
        if let Err(error) = merge.check_all_merged() {
            assert_clear(&error)?;
        }
    }
}
