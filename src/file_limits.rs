//! Size limits on the files a node reads whole into memory: a model's JSON configs, its
//! tokenizer and chat template, the manual discovery config. A file over its limit is refused
//! before it is read, so a crafted or corrupt file cannot exhaust the node's memory.

use std::io::Read;
use std::path::Path;

/// Limit on a JSON config (`config.json`, `tokenizer_config.json`, an index, the manual
/// discovery config) or a chat template; real ones are kilobytes, an index a few megabytes.
pub const CONFIG_FILE_LIMIT: u64 = 16 << 20;
/// Limit on `tokenizer.json`; real ones reach a few tens of megabytes.
pub const TOKENIZER_FILE_LIMIT: u64 = 256 << 20;

/// The text of the file `path`, refused with an `InvalidData` error naming the limit when it
/// holds more than `limit` bytes (checked again while reading, should the file grow).
pub fn read_limited(path: &Path, limit: u64) -> std::io::Result<String> {
    let file = std::fs::File::open(path)?;
    let too_big = |size: u64| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("the file holds {size} bytes, over the limit of {limit} bytes"),
        )
    };
    let size = file.metadata()?.len();
    if size > limit {
        return Err(too_big(size));
    }
    let mut text = String::with_capacity(size as usize);
    file.take(limit + 1).read_to_string(&mut text)?;
    if text.len() as u64 > limit {
        return Err(too_big(text.len() as u64));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_over_its_limit_is_refused_naming_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, "{\"a\": 1}").unwrap();
        assert_eq!(read_limited(&path, 8).unwrap(), "{\"a\": 1}");
        let error = read_limited(&path, 7).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::InvalidData);
        assert!(error.to_string().contains("8 bytes, over the limit of 7 bytes"), "{error}");
        assert_eq!(
            read_limited(&dir.path().join("missing"), 7).unwrap_err().kind(),
            std::io::ErrorKind::NotFound
        );
    }
}
