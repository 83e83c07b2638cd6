//! Property-based fuzz targets for every decoder that reads bytes from outside the node. Each
//! target is a test named `fuzz_*` that runs `PROPTEST_CASES` cases (proptest's default of 256
//! in a plain `cargo test`; `scripts/fuzz` runs 100,000). A target holds when every input is
//! either accepted or rejected with an error that says what is wrong: no panic, no abort, no
//! hang. Inputs mix raw bytes with structured ones (a valid message with one field bent), so
//! the cases reach past the first syntax check.

mod adapter;
mod config;
mod discovery;
mod gguf;
mod rpc;
mod safetensors;
mod tensor;
mod tokenizer;

use proptest::prelude::*;

/// Any JSON value, nested a few levels deep, with numbers at the edges of their types.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        json_number(),
        ".{0,12}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
            prop::collection::btree_map("[a-z_]{0,8}", inner, 0..6)
                .prop_map(|map| serde_json::Value::Object(map.into_iter().collect())),
        ]
    })
}

/// A JSON number: small, huge, negative or fractional.
fn json_number() -> impl Strategy<Value = serde_json::Value> {
    prop_oneof![
        (0u64..8).prop_map(serde_json::Value::from),
        edge_u64().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
    ]
}

/// Integers that break arithmetic: 0, 1, powers of two around 32 and 64 bits, the maximum.
fn edge_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..4,
        1u64..5000,
        Just(1u64 << 20),
        Just(1u64 << 31),
        Just(1u64 << 32),
        Just(1u64 << 62),
        Just(u64::MAX),
        any::<u64>(),
    ]
}

/// A JSON object: a valid `base` with some of its fields replaced by any value, removed, or
/// joined by an unknown field.
fn bent_object(base: serde_json::Value) -> impl Strategy<Value = serde_json::Value> {
    let keys: Vec<String> = base.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default();
    let edits = prop::collection::vec((prop::sample::select(keys), 0u8..3, json_value()), 0..4);
    edits.prop_map(move |edits| {
        let mut object = base.as_object().cloned().unwrap_or_default();
        for (key, action, value) in edits {
            match action {
                0 => {
                    object.remove(&key);
                }
                1 => {
                    object.insert(key, value);
                }
                _ => {
                    object.insert(format!("{key}_x"), value);
                }
            }
        }
        serde_json::Value::Object(object)
    })
}

/// Fails the case unless `error` reads as a sentence about the input (not empty, not a
/// debug dump of a panic).
fn assert_clear(error: &crate::Error) -> std::result::Result<(), TestCaseError> {
    let text = error.to_string();
    prop_assert!(text.len() > 8, "unclear error: {text:?}");
    prop_assert!(!text.contains("panicked"), "a panic became the error: {text}");
    Ok(())
}
