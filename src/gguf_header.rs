//! GGUF headers read with candle's reader behind a guard: the one entry point for every reader
//! of GGUF files (the engine, the tokenizer, the downloader).

use candle_core::quantized::gguf_file::Content;

/// Reads a GGUF header with candle's reader. A header that makes the reader panic (candle
/// 0.11 divides by a `general.alignment` of 0) is an error here, so a crafted file cannot
/// bring a node down.
pub fn read_gguf_header<R: std::io::Read + std::io::Seek>(reader: &mut R) -> candle_core::Result<Content> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Content::read(reader))).unwrap_or_else(|panic| {
        let reason = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown reason".into());
        Err(candle_core::Error::Msg(format!("the GGUF header is malformed ({reason})")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file::Value;

    #[test]
    fn a_zero_alignment_is_an_error_not_a_panic() {
        let mut file = std::io::Cursor::new(Vec::new());
        let zero = Value::U32(0);
        candle_core::quantized::gguf_file::write(&mut file, &[("general.alignment", &zero)], &[]).unwrap();
        file.set_position(0);
        let error = read_gguf_header(&mut file).unwrap_err().to_string();
        assert!(error.contains("GGUF header is malformed"), "{error}");
    }
}
