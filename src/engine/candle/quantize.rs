//! Choosing the block type that safetensors weights are quantized to as they load
//! (`EXO_QUANTIZE`, `--quantize`), named as GGUF names its types.

use candle_core::quantized::GgmlDType;

use crate::error::{Error, Result};

/// Environment variable naming the block type to quantize safetensors weights to.
pub const QUANTIZE_ENV: &str = "EXO_QUANTIZE";

/// The block types weights may be quantized to, by their GGUF names.
const BLOCK_TYPES: [(&str, GgmlDType); 10] = [
    ("q8_0", GgmlDType::Q8_0),
    ("q4_0", GgmlDType::Q4_0),
    ("q4_1", GgmlDType::Q4_1),
    ("q5_0", GgmlDType::Q5_0),
    ("q5_1", GgmlDType::Q5_1),
    ("q2_k", GgmlDType::Q2K),
    ("q3_k", GgmlDType::Q3K),
    ("q4_k", GgmlDType::Q4K),
    ("q5_k", GgmlDType::Q5K),
    ("q6_k", GgmlDType::Q6K),
];

/// The block type `name` names (case-insensitive); `none` or an empty name keeps the
/// checkpoint's dtype.
pub fn block_type(name: &str) -> Result<Option<GgmlDType>> {
    let lower = name.trim().to_ascii_lowercase();
    if lower.is_empty() || lower == "none" {
        return Ok(None);
    }
    BLOCK_TYPES.iter().find(|(n, _)| *n == lower).map(|(_, t)| Some(*t)).ok_or_else(|| {
        let known: Vec<&str> = BLOCK_TYPES.iter().map(|(n, _)| *n).collect();
        Error::InvalidArgument(format!("cannot quantize to {name:?}: use none or one of {}", known.join(", ")))
    })
}

/// The block type `EXO_QUANTIZE` names, if any.
pub fn block_type_from_env() -> Result<Option<GgmlDType>> {
    match std::env::var(QUANTIZE_ENV) {
        Ok(name) => block_type(&name).map_err(|e| Error::InvalidArgument(format!("{QUANTIZE_ENV}: {e}"))),
        Err(_) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_types_are_named_as_gguf_names_them() {
        assert_eq!(block_type("Q4_K").unwrap(), Some(GgmlDType::Q4K));
        assert_eq!(block_type("q8_0").unwrap(), Some(GgmlDType::Q8_0));
        assert_eq!(block_type("none").unwrap(), None);
        assert_eq!(block_type("").unwrap(), None);
        let message = block_type("q4_k_m").unwrap_err().to_string();
        assert!(message.contains("\"q4_k_m\"") && message.contains("q6_k"), "{message}");
    }
}
