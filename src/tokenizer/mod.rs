//! A model's tokenizer as Hugging Face ships it: `tokenizer.json`, the chat template and
//! special tokens from `tokenizer_config.json`, EOS ids from `generation_config.json`; or
//! rebuilt from a GGUF file's metadata.

mod chat;
mod gguf;
mod stream;

pub use chat::{flatten_content, ChatTemplate};
pub use stream::IncrementalDetokenizer;

use std::path::Path;

use crate::error::{Error, Result};
use crate::file_limits::{read_limited, CONFIG_FILE_LIMIT, TOKENIZER_FILE_LIMIT};

/// Text ↔ token ids and chat formatting for one model.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: Option<ChatTemplate>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    eos_token_ids: Vec<u32>,
}

/// Reads a JSON file of a model directory; `None` when the file does not exist.
fn read_json(dir: &Path, file: &str) -> Result<Option<serde_json::Value>> {
    let path = dir.join(file);
    let text = match read_limited(&path, CONFIG_FILE_LIMIT) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::InvalidModel(format!("cannot read {}: {e}", path.display()))),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::InvalidModel(format!("{} is not valid JSON: {e}", path.display())))
}

/// A special token given as a string or as an AddedToken-like `{"content": ...}`.
fn token_text(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(str::to_string),
        _ => None,
    }
}

/// Token ids from an `eos_token_id` field (an id or a list of ids).
fn ids_of(value: &serde_json::Value) -> Vec<u32> {
    match value {
        serde_json::Value::Number(n) => n.as_u64().map(|n| n as u32).into_iter().collect(),
        serde_json::Value::Array(list) => list.iter().filter_map(|v| v.as_u64()).map(|n| n as u32).collect(),
        _ => Vec::new(),
    }
}

impl Tokenizer {
    /// Loads the tokenizer of the model directory `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let load =
            |e: &dyn std::fmt::Display| Error::InvalidModel(format!("cannot load {}: {e}", path.display()));
        let text = read_limited(&path, TOKENIZER_FILE_LIMIT).map_err(|e| load(&e))?;
        let inner: tokenizers::Tokenizer = text.parse().map_err(|e| load(&e))?;
        let config = read_json(dir, "tokenizer_config.json")?.unwrap_or_default();
        let bos_token = config.get("bos_token").and_then(token_text);
        let eos_token = config.get("eos_token").and_then(token_text);
        let chat_template = ChatTemplate::from_model_dir(dir, &config)?;
        let mut eos_token_ids = Vec::new();
        for file in ["generation_config.json", "config.json"] {
            if let Some(json) = read_json(dir, file)? {
                eos_token_ids.extend(ids_of(&json["eos_token_id"]));
            }
        }
        if let Some(id) = eos_token.as_deref().and_then(|t| inner.token_to_id(t)) {
            eos_token_ids.push(id);
        }
        let mut seen = std::collections::HashSet::new();
        eos_token_ids.retain(|id| seen.insert(*id));
        Ok(Self { inner, chat_template, bos_token, eos_token, eos_token_ids })
    }

    /// Token ids of `text`. Chat-templated prompts already hold the BOS text, so they are
    /// encoded with `add_special_tokens = false` (as transformers' `apply_chat_template` does).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| Error::InvalidArgument(format!("cannot encode text: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::InvalidArgument(format!("cannot decode tokens: {e}")))
    }

    /// The prompt for `messages` (a JSON list of `{role, content}`) rendered with the model's
    /// chat template; `extra` adds template variables (e.g. `enable_thinking`).
    pub fn apply_chat_template(
        &self,
        messages: &serde_json::Value,
        add_generation_prompt: bool,
        tools: Option<&serde_json::Value>,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String> {
        let template = self.chat_template.as_ref().ok_or_else(|| {
            Error::InvalidModel(
                "the model has no chat template (tokenizer_config.json or tokenizer.chat_template)".into(),
            )
        })?;
        template.render(
            messages,
            add_generation_prompt,
            tools,
            self.bos_token.as_deref(),
            self.eos_token.as_deref(),
            extra,
        )
    }

    /// Token ids that end generation.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    /// The BOS token's text, if the model has one.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    /// Number of tokens, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
