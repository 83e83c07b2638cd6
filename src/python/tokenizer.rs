//! Tokenizers as `exo.inference.tokenizers` exposes them, and streaming detokenization.

use std::path::PathBuf;
use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::error::Error;
use crate::tokenizer::{IncrementalDetokenizer, Tokenizer};

/// Converts a Python value (messages, tools, extra variables) to JSON via the `json` module.
fn to_json(value: &Bound<'_, PyAny>) -> PyResult<serde_json::Value> {
    let text: String = value.py().import("json")?.call_method1("dumps", (value,))?.extract()?;
    Ok(serde_json::from_str(&text)
        .map_err(|e| Error::InvalidArgument(format!("not JSON-serializable: {e}")))?)
}

/// A Hugging Face tokenizer with its chat template and special tokens.
#[pyclass(name = "Tokenizer", module = "exo.inference.tokenizers", frozen)]
pub struct PyTokenizer {
    pub inner: Arc<Tokenizer>,
}

#[pymethods]
impl PyTokenizer {
    /// Loads the tokenizer of a local model directory.
    #[staticmethod]
    fn from_dir(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let inner = py.detach(|| Tokenizer::from_dir(&path))?;
        Ok(Self { inner: Arc::new(inner) })
    }

    /// Loads the tokenizer stored in a GGUF file's metadata (the first part of a split GGUF).
    #[staticmethod]
    fn from_gguf(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let inner = py.detach(|| Tokenizer::from_gguf(&path))?;
        Ok(Self { inner: Arc::new(inner) })
    }

    #[pyo3(signature = (text, add_special_tokens=true))]
    fn encode(&self, text: &str, add_special_tokens: bool) -> PyResult<Vec<u32>> {
        Ok(self.inner.encode(text, add_special_tokens)?)
    }

    #[pyo3(signature = (tokens, skip_special_tokens=true))]
    fn decode(&self, tokens: &Bound<'_, PyAny>, skip_special_tokens: bool) -> PyResult<String> {
        let flat = tokens
            .py()
            .import("numpy")?
            .call_method1("asarray", (tokens,))?
            .call_method1("reshape", (-1,))?;
        let ids: Vec<u32> = flat.call_method0("tolist")?.extract()?;
        Ok(self.inner.decode(&ids, skip_special_tokens)?)
    }

    /// The prompt for `messages` (or its token ids when `tokenize`); extra keyword
    /// arguments become template variables.
    #[pyo3(signature = (conversation, tokenize=false, add_generation_prompt=true, tools=None, **kwargs))]
    fn apply_chat_template<'py>(
        &self,
        py: Python<'py>,
        conversation: &Bound<'py, PyAny>,
        tokenize: bool,
        add_generation_prompt: bool,
        tools: Option<&Bound<'py, PyAny>>,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let messages = to_json(conversation)?;
        let tools = tools.filter(|t| !t.is_none()).map(to_json).transpose()?;
        let extra = match kwargs.map(|k| to_json(k.as_any())).transpose()? {
            Some(serde_json::Value::Object(map)) => map,
            _ => serde_json::Map::new(),
        };
        let text =
            self.inner.apply_chat_template(&messages, add_generation_prompt, tools.as_ref(), &extra)?;
        if tokenize {
            return Ok(self.inner.encode(&text, false)?.into_pyobject(py)?.into_any());
        }
        Ok(text.into_pyobject(py)?.into_any())
    }

    /// The first EOS id (what exo classic reads).
    #[getter]
    fn eos_token_id(&self) -> Option<u32> {
        self.inner.eos_token_ids().first().copied()
    }

    /// Every token id that ends generation.
    #[getter]
    fn eos_token_ids(&self) -> Vec<u32> {
        self.inner.eos_token_ids().to_vec()
    }

    #[getter]
    fn bos_token(&self) -> Option<&str> {
        self.inner.bos_token()
    }

    #[getter]
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }
}

/// Streams text from token ids without ever emitting a broken UTF-8 character.
#[pyclass(name = "IncrementalDetokenizer", module = "exo.inference.tokenizers")]
pub struct PyIncrementalDetokenizer {
    inner: IncrementalDetokenizer,
}

#[pymethods]
impl PyIncrementalDetokenizer {
    #[new]
    fn new(tokenizer: &PyTokenizer) -> Self {
        Self { inner: IncrementalDetokenizer::new(tokenizer.inner.clone()) }
    }

    /// Adds a token; returns the newly completed text (possibly empty).
    fn push(&mut self, token: u32) -> PyResult<String> {
        Ok(self.inner.push(token)?)
    }

    /// Returns whatever text is still held back.
    fn finish(&mut self) -> PyResult<String> {
        Ok(self.inner.finish()?)
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyTokenizer>()?;
    m.add_class::<PyIncrementalDetokenizer>()?;
    Ok(())
}
