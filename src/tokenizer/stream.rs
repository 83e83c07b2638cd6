//! Streaming detokenization: text is emitted only once it is stable, so a multi-byte
//! character split across tokens is never emitted broken.

use std::sync::Arc;

use super::Tokenizer;
use crate::error::Result;

/// Turns a stream of token ids into a stream of text pieces.
///
/// Decodes a short window of recent tokens (from `prefix_offset`) and emits what it adds
/// beyond the already emitted part (up to `read_offset`); text ending in U+FFFD (an
/// incomplete character) is held back until the next token completes it.
pub struct IncrementalDetokenizer {
    tokenizer: Arc<Tokenizer>,
    tokens: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDetokenizer {
    /// A detokenizer with no tokens yet.
    pub fn new(tokenizer: Arc<Tokenizer>) -> Self {
        Self { tokenizer, tokens: Vec::new(), prefix_offset: 0, read_offset: 0 }
    }

    /// Adds a token and returns the newly completed text (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.tokens.push(id);
        let emitted = self.tokenizer.decode(&self.tokens[self.prefix_offset..self.read_offset], true)?;
        let current = self.tokenizer.decode(&self.tokens[self.prefix_offset..], true)?;
        if current.ends_with('\u{FFFD}')
            || current.len() <= emitted.len()
            || !current.is_char_boundary(emitted.len())
        {
            return Ok(String::new());
        }
        let piece = current[emitted.len()..].to_string();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.tokens.len();
        Ok(piece)
    }

    /// Returns whatever is still held back (at the end of a stream).
    pub fn finish(&mut self) -> Result<String> {
        let emitted = self.tokenizer.decode(&self.tokens[self.prefix_offset..self.read_offset], true)?;
        let current = self.tokenizer.decode(&self.tokens[self.prefix_offset..], true)?;
        self.prefix_offset = self.tokens.len();
        self.read_offset = self.tokens.len();
        Ok(current.get(emitted.len()..).unwrap_or_default().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A byte-level tokenizer whose vocabulary holds single bytes: every multi-byte
    /// character is split over several tokens.
    fn byte_tokenizer() -> Arc<Tokenizer> {
        use tokenizers::models::bpe::BPE;
        use tokenizers::pre_tokenizers::byte_level::ByteLevel;
        let alphabet = ByteLevel::alphabet();
        let vocab: Vec<(String, u32)> =
            alphabet.iter().enumerate().map(|(i, c)| (c.to_string(), i as u32)).collect();
        let model = BPE::builder()
            .vocab_and_merges(vocab.into_iter().collect::<tokenizers::models::bpe::Vocab>(), vec![])
            .build()
            .unwrap();
        let mut inner = tokenizers::Tokenizer::new(model);
        inner.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
        inner.with_decoder(Some(ByteLevel::default()));
        Arc::new(Tokenizer {
            inner,
            chat_template: None,
            bos_token: None,
            eos_token: None,
            eos_token_ids: vec![],
        })
    }

    #[test]
    fn streams_multibyte_text_without_broken_characters() {
        let tokenizer = byte_tokenizer();
        let text = "héllo 日本語 🙂 done";
        let ids = tokenizer.encode(text, false).unwrap();
        assert!(ids.len() > text.chars().count(), "characters must span several tokens");
        let mut stream = IncrementalDetokenizer::new(tokenizer.clone());
        let mut out = String::new();
        for id in ids {
            let piece = stream.push(id).unwrap();
            assert!(!piece.contains('\u{FFFD}'), "{piece:?}");
            out += &piece;
        }
        out += &stream.finish().unwrap();
        assert_eq!(out, text);
    }
}
