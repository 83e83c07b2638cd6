//! Safetensors checkpoints: the 8-byte header length, the JSON header (dtypes, shapes and
//! data offsets bent from a valid file) and the data, read as the engine maps a shard's
//! weights and then reads each tensor as a matrix or a vector.

use candle_core::Device;
use proptest::prelude::*;

use super::{assert_clear, bent_object, edge_u64};
use crate::engine::candle::WeightIndex;

fn tensor_entry() -> impl Strategy<Value = serde_json::Value> {
    let base = serde_json::json!({"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]});
    let dtype = prop::sample::select(vec!["F32", "BF16", "F16", "U32", "U8", "I64", "F8_E4M3", "X"]);
    let dims = prop::collection::vec(prop_oneof![0u64..5, edge_u64()], 0..4);
    let offsets = (prop_oneof![0u64..32, edge_u64()], prop_oneof![0u64..32, edge_u64()]);
    (bent_object(base), dtype, dims, offsets, 0u8..4).prop_map(
        |(mut entry, dtype, dims, (start, end), keep)| {
            // Keep the valid base now and then; otherwise overwrite one or more fields.
            if keep & 1 == 1 {
                entry["dtype"] = dtype.into();
            }
            if keep & 2 == 2 {
                entry["shape"] = dims.into();
                entry["data_offsets"] = serde_json::json!([start, end]);
            }
            entry
        },
    )
}

/// A file: header length (exact, or any), header, data.
fn safetensors_file() -> impl Strategy<Value = Vec<u8>> {
    let header = prop::collection::btree_map(
        prop::sample::select(vec!["w", "v", "__metadata__", "model.layers.0.mlp.switch_mlp.up_proj.weight"]),
        tensor_entry(),
        0..3,
    );
    (header, prop::option::weighted(0.2, edge_u64()), prop::collection::vec(any::<u8>(), 0..48)).prop_map(
        |(header, length, data)| {
            let header = serde_json::to_vec(&header).unwrap_or_default();
            let length = length.unwrap_or(header.len() as u64);
            [length.to_le_bytes().as_slice(), header.as_slice(), data.as_slice()].concat()
        },
    )
}

proptest! {
    #[test]
    fn fuzz_safetensors_header(file in safetensors_file(), names in prop::collection::vec(prop::sample::select(vec!["w", "v"]), 1..3)) {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("model.safetensors"), &file)?;
        let index = WeightIndex::from_dir(dir.path())?;
        let weights = match index.open(&names.iter().map(|n| n.to_string()).collect::<Vec<_>>()) {
            Ok(weights) => weights,
            Err(error) => return assert_clear(&error),
        };
        for name in names {
            // Read as the shapes a config could imply: the engine checks them against the header.
            for (rows, cols) in [(2, 2), (4, 1), (0, 0), (usize::MAX, 2)] {
                if let Err(error) = weights.matrix(name, rows, cols) {
                    assert_clear(&error)?;
                }
            }
            for len in [4, 0] {
                if let Err(error) = weights.tensor_f32(name, &[len], &Device::Cpu) {
                    assert_clear(&error)?;
                }
            }
        }
    }
}
