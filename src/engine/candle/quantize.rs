//! Choosing the block type that safetensors weights are quantized to as they load
//! (`EXO_QUANTIZE`, `--quantize`), named as GGUF names its types.

use candle_core::quantized::GgmlDType;

use super::quant_type::{ggml_dtype_from_name, ggml_dtype_name};
use crate::error::{Error, Result};

/// Environment variable naming the block type to quantize safetensors weights to.
pub const QUANTIZE_ENV: &str = "EXO_QUANTIZE";

/// The block types weights may be quantized to.
const BLOCK_TYPES: [GgmlDType; 10] = [
    GgmlDType::Q8_0,
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q2K,
    GgmlDType::Q3K,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

/// The block type `name` names (GGUF's names, any case); `none` or an empty name keeps the
/// checkpoint's dtype.
pub fn block_type(name: &str) -> Result<Option<GgmlDType>> {
    let name = name.trim();
    if name.is_empty() || name.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    match ggml_dtype_from_name(name) {
        Ok(dtype) if BLOCK_TYPES.contains(&dtype) => Ok(Some(dtype)),
        _ => {
            let known: Vec<String> = BLOCK_TYPES.iter().map(|t| ggml_dtype_name(*t).to_lowercase()).collect();
            Err(Error::InvalidArgument(format!(
                "cannot quantize to {name:?}: use none or one of {}",
                known.join(", ")
            )))
        }
    }
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
