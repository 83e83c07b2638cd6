//! A tokenizer rebuilt from a GGUF file's `tokenizer.ggml.*` metadata, for GGUF models that
//! come without a `tokenizer.json`. Two vocabularies are supported, each assembled from the
//! `tokenizers` crate's parts as the model's own `tokenizer.json` assembles them, so a text
//! gives the ids Hugging Face's tokenizer gives:
//!
//! - `gpt2`: byte-level BPE (Llama 3, Qwen2/3, GPT-2) with the merges stored in the file and
//!   the pre-tokenizer regex that `tokenizer.ggml.pre` names. An unknown name is an error rather
//!   than a guess: another regex splits text differently and silently gives other ids.
//! - `llama`: a SentencePiece vocabulary (Llama 2, Mistral) of pieces, scores and token types.
//!   As transformers' converter does, it becomes a byte-fallback BPE whose merges are every pair
//!   of pieces that joins into a piece, ranked by the joined piece's score (highest first), with
//!   `▁` for spaces and a `▁` put before the text (merges stored in the file win when present).
//!
//! candle's `TokenizerFromGguf` is not used: it reads only `gpt2` vocabularies, does not know
//! `llama-bpe` (Llama 3's name) or Llama 3's whole-word rule, puts a space before GPT-2 texts,
//! and falls back to GPT-2's regex for names it does not know.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::{SpecialToken, TemplateProcessing, Tokens};
use tokenizers::{AddedToken, DecoderWrapper, PreTokenizerWrapper, SplitDelimiterBehavior};

use super::{ChatTemplate, Tokenizer};
use crate::error::{Error, Result};

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const TYPE_UNKNOWN: i64 = 2;
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;

/// The texts of control tokens that end a turn; llama.cpp and the models' generation configs
/// stop on them even when the file names only one EOS id.
const END_OF_TURN_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|end|>",
    "<end_of_turn>",
];

/// The split rule of Llama 3 (and Smaug, DBRX): contractions, letters, digits in threes.
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's rule: Llama 3's with single digits.
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// SentencePiece's space marker.
const SPACE: &str = "\u{2581}";

/// The GGUF metadata of one file, for errors that name the file and the key.
struct Metadata<'a> {
    content: &'a Content,
    path: &'a Path,
}

impl Metadata<'_> {
    fn invalid(&self, key: &str, problem: &str) -> Error {
        Error::InvalidModel(format!("{}: {key} {problem}", self.path.display()))
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn require(&self, key: &str) -> Result<&Value> {
        self.get(key).ok_or_else(|| self.invalid(key, "is missing"))
    }

    fn string(&self, key: &str) -> Result<Option<&str>> {
        self.get(key)
            .map(|v| v.to_string().map(String::as_str).map_err(|_| self.invalid(key, "is not a string")))
            .transpose()
    }

    fn flag(&self, key: &str) -> Result<Option<bool>> {
        self.get(key).map(|v| v.to_bool().map_err(|_| self.invalid(key, "is not a boolean"))).transpose()
    }

    /// A token id, checked against the vocabulary size.
    fn id(&self, key: &str, vocab_size: usize) -> Result<Option<u32>> {
        let Some(value) = self.get(key) else { return Ok(None) };
        match integer(value) {
            Some(id) if (0..vocab_size as i64).contains(&id) => Ok(Some(id as u32)),
            Some(id) if id < 0 => Ok(None),
            _ => Err(self.invalid(key, &format!("is not a token id below {vocab_size}"))),
        }
    }

    fn array(&self, key: &str) -> Result<&[Value]> {
        self.require(key)?.to_vec().map(Vec::as_slice).map_err(|_| self.invalid(key, "is not an array"))
    }

    fn strings(&self, key: &str) -> Result<Vec<String>> {
        self.array(key)?
            .iter()
            .map(|v| {
                v.to_string().cloned().map_err(|_| self.invalid(key, "holds a value that is not a string"))
            })
            .collect()
    }

    /// An array with one entry per token.
    fn per_token<T>(&self, key: &str, len: usize, read: impl Fn(&Value) -> Option<T>) -> Result<Vec<T>> {
        let values = self.array(key)?;
        if values.len() != len {
            return Err(self.invalid(key, &format!("has {} entries for {len} tokens", values.len())));
        }
        values
            .iter()
            .map(|v| read(v).ok_or_else(|| self.invalid(key, "holds a value of the wrong type")))
            .collect()
    }
}

fn integer(value: &Value) -> Option<i64> {
    match *value {
        Value::U8(v) => Some(v.into()),
        Value::I8(v) => Some(v.into()),
        Value::U16(v) => Some(v.into()),
        Value::I16(v) => Some(v.into()),
        Value::U32(v) => Some(v.into()),
        Value::I32(v) => Some(v.into()),
        Value::U64(v) => i64::try_from(v).ok(),
        Value::I64(v) => Some(v),
        _ => None,
    }
}

fn float(value: &Value) -> Option<f32> {
    match *value {
        Value::F32(v) => Some(v),
        Value::F64(v) => Some(v as f32),
        _ => None,
    }
}

fn model_error(path: &Path, what: &str, e: impl std::fmt::Display) -> Error {
    Error::InvalidModel(format!("{}: cannot build the tokenizer's {what}: {e}", path.display()))
}

/// Token → id, as the tokens are listed.
fn vocab(tokens: &[String]) -> Vocab {
    tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect()
}

/// How a byte-level BPE vocabulary splits text before the merges, from `tokenizer.ggml.pre`.
struct ByteLevelRule {
    regex: Option<&'static str>,
    nfc: bool,
    /// A pre-token that is itself in the vocabulary is taken whole (Llama 3's `ignore_merges`).
    whole_words: bool,
    add_bos: bool,
}

impl ByteLevelRule {
    fn named(pre: &str) -> Option<Self> {
        let rule = |regex, nfc, whole_words, add_bos| Self { regex, nfc, whole_words, add_bos };
        Some(match pre {
            "default" | "gpt-2" | "gpt2" => rule(None, false, false, false),
            "llama-bpe" | "llama3" | "llama-v3" => rule(Some(LLAMA3_REGEX), false, true, true),
            "smaug-bpe" | "dbrx" => rule(Some(LLAMA3_REGEX), false, false, false),
            "qwen2" => rule(Some(QWEN2_REGEX), true, false, false),
            _ => return None,
        })
    }

    /// A regex split then the byte mapping; GPT-2's own regex is the byte-level pre-tokenizer's.
    fn pre_tokenizer(&self) -> std::result::Result<PreTokenizerWrapper, tokenizers::Error> {
        let Some(regex) = self.regex else {
            return Ok(ByteLevel::new(false, true, true).into());
        };
        let split = Split::new(SplitPattern::Regex(regex.into()), SplitDelimiterBehavior::Isolated, false)?;
        Ok(PreTokenizerSequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()]).into())
    }
}

/// The merges of `tokenizer.ggml.merges`, each two tokens joined by a space; both tokens and
/// their merge must be in `tokens` (the tokenizers crate panics on a merge longer than every
/// token of the vocabulary).
fn stored_merges(meta: &Metadata, tokens: &[String]) -> Result<Vec<(String, String)>> {
    const MERGES: &str = "tokenizer.ggml.merges";
    let known: HashSet<&str> = tokens.iter().map(String::as_str).collect();
    meta.strings(MERGES)?
        .into_iter()
        .map(|m| match m.split_once(' ') {
            Some((a, b)) if [a, b, &format!("{a}{b}")].iter().all(|t| known.contains(t)) => {
                Ok((a.to_string(), b.to_string()))
            }
            Some(_) => Err(meta
                .invalid(MERGES, &format!("holds {m:?}, whose tokens or merge are not in the vocabulary"))),
            None => Err(meta.invalid(MERGES, &format!("holds {m:?}, which is not two tokens"))),
        })
        .collect()
}

/// Byte-level BPE from `tokenizer.ggml.merges`; returns whether BOS is added by default.
fn byte_level_bpe(meta: &Metadata, tokens: &[String]) -> Result<(tokenizers::Tokenizer, bool)> {
    const PRE: &str = "tokenizer.ggml.pre";
    let pre = meta.string(PRE)?.unwrap_or("default");
    let rule = ByteLevelRule::named(pre).ok_or_else(|| {
        meta.invalid(
            PRE,
            &format!(
                "is {pre:?}, a pre-tokenizer this loader does not know (known: default, gpt-2, llama-bpe, \
                 llama3, smaug-bpe, dbrx, qwen2); put the model's tokenizer.json beside the file"
            ),
        )
    })?;
    let merges = stored_merges(meta, tokens)?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab(tokens), merges)
        .ignore_merges(rule.whole_words)
        .build()
        .map_err(|e| model_error(meta.path, "BPE", e))?;
    let mut inner = tokenizers::Tokenizer::new(bpe);
    if rule.nfc {
        inner.with_normalizer(Some(NFC)).map_err(|e| model_error(meta.path, "normalizer", e))?;
    }
    inner.with_pre_tokenizer(Some(
        rule.pre_tokenizer().map_err(|e| model_error(meta.path, "pre-tokenizer", e))?,
    ));
    inner.with_decoder(Some(ByteLevel::default()));
    Ok((inner, rule.add_bos))
}

/// The merges a SentencePiece vocabulary implies: for each piece, every split into two pieces
/// (by their ids), pieces taken by score from highest, ties in vocabulary order.
fn merges_by_score(tokens: &[String], scores: &[f32]) -> Vec<(String, String)> {
    let ids: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
    let mut merges = Vec::new();
    for (piece, &score) in tokens.iter().zip(scores) {
        let mut splits: Vec<(usize, usize)> = piece
            .char_indices()
            .skip(1)
            .filter_map(|(at, _)| Some((*ids.get(&piece[..at])?, *ids.get(&piece[at..])?)))
            .collect();
        splits.sort_unstable();
        merges.extend(splits.into_iter().map(|(left, right)| (score, left, right)));
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0));
    merges.into_iter().map(|(_, left, right)| (tokens[left].clone(), tokens[right].clone())).collect()
}

/// A SentencePiece vocabulary as byte-fallback BPE; returns whether BOS is added by default.
fn sentencepiece_bpe(
    meta: &Metadata,
    tokens: &[String],
    types: &[i64],
) -> Result<(tokenizers::Tokenizer, bool)> {
    let scores = meta.per_token("tokenizer.ggml.scores", tokens.len(), float)?;
    let unk = match meta.id("tokenizer.ggml.unknown_token_id", tokens.len())? {
        Some(id) => Some(id as usize),
        None => types.iter().position(|&t| t == TYPE_UNKNOWN),
    };
    // Merges stored with the vocabulary (a conversion from tokenizer.json) are used as they are.
    let merges = match meta.get("tokenizer.ggml.merges") {
        Some(_) => stored_merges(meta, tokens)?,
        None => merges_by_score(tokens, &scores),
    };
    let mut builder =
        BPE::builder().vocab_and_merges(vocab(tokens), merges).fuse_unk(true).byte_fallback(true);
    if let Some(unk) = unk {
        builder = builder.unk_token(tokens[unk].clone());
    }
    let bpe = builder.build().map_err(|e| model_error(meta.path, "BPE", e))?;
    let mut inner = tokenizers::Tokenizer::new(bpe);
    let space_prefix = meta.flag("tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
    let replace =
        |from: &str, to: &str| Replace::new(from, to).map_err(|e| model_error(meta.path, "normalizer", e));
    let mut normalizers = Vec::new();
    if space_prefix {
        normalizers.push(Prepend::new(SPACE.into()).into());
    }
    normalizers.push(replace(" ", SPACE)?.into());
    inner
        .with_normalizer(Some(NormalizerSequence::new(normalizers)))
        .map_err(|e| model_error(meta.path, "normalizer", e))?;
    let mut decoders: Vec<DecoderWrapper> = vec![
        tokenizers::decoders::DecoderWrapper::Replace(replace(SPACE, " ")?),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    inner.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok((inner, true))
}

/// Adds BOS/EOS around encoded text (`add_special_tokens = true`).
fn bos_eos_template(
    bos: Option<(u32, &str)>,
    eos: Option<(u32, &str)>,
) -> tokenizers::Result<TemplateProcessing> {
    let mut specials = Vec::new();
    let mut single = Vec::new();
    if let Some((id, text)) = bos {
        specials.push(SpecialToken::new("bos".into(), vec![id], vec![text.into()])?);
        single.push("bos");
    }
    single.push("$A");
    if let Some((id, text)) = eos {
        specials.push(SpecialToken::new("eos".into(), vec![id], vec![text.into()])?);
        single.push("eos");
    }
    let second: Vec<String> = single
        .iter()
        .map(|piece| if *piece == "$A" { "$B:1".into() } else { format!("{piece}:1") })
        .collect();
    let pair = format!("{} {}", single.join(" "), second.join(" "));
    Ok(TemplateProcessing::builder()
        .try_single(single.join(" "))?
        .try_pair(pair)?
        .special_tokens(Tokens::from(specials))
        .build()?)
}

/// The first part of a split GGUF (`-0000K-of-0000N.gguf`), which holds the metadata; any
/// other path as it is.
fn first_split(path: &Path) -> PathBuf {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else { return path.to_path_buf() };
    let Some(stem) = name.strip_suffix(".gguf") else { return path.to_path_buf() };
    let parts: Vec<&str> = stem.rsplitn(4, '-').collect();
    match parts.as_slice() {
        [total, "of", part, base]
            if part.len() == 5
                && total.len() == 5
                && [part, total].iter().all(|s| s.bytes().all(|b| b.is_ascii_digit())) =>
        {
            path.with_file_name(format!("{base}-00001-of-{total}.gguf"))
        }
        _ => path.to_path_buf(),
    }
}

/// Control and unknown tokens (and the named BOS/EOS/... ids) become Hugging Face's special
/// added tokens: matched whole in text, dropped by `skip_special_tokens`; user-defined ones
/// are matched whole but kept.
fn add_vocabulary_tokens(
    inner: &mut tokenizers::Tokenizer,
    tokens: &[String],
    types: &[i64],
    named: &[u32],
) -> tokenizers::Result<()> {
    let special = |i: usize| matches!(types[i], TYPE_UNKNOWN | TYPE_CONTROL) || named.contains(&(i as u32));
    let specials: Vec<AddedToken> = (0..tokens.len())
        .filter(|&i| special(i))
        .map(|i| AddedToken::from(tokens[i].clone(), true))
        .collect();
    let user_defined: Vec<AddedToken> = (0..tokens.len())
        .filter(|&i| types[i] == TYPE_USER_DEFINED && !special(i))
        .map(|i| AddedToken::from(tokens[i].clone(), false).normalized(false))
        .collect();
    inner.add_special_tokens(specials)?;
    inner.add_tokens(user_defined)?;
    Ok(())
}

/// The EOS/EOT/EOM ids the file names, then the control tokens that end a turn, each once.
fn end_of_generation_ids(named: &[Option<u32>], tokens: &[String], types: &[i64]) -> Vec<u32> {
    let by_text = (0..tokens.len())
        .filter(|&i| types[i] == TYPE_CONTROL && END_OF_TURN_TEXTS.contains(&tokens[i].as_str()))
        .map(|i| i as u32);
    let mut seen = std::collections::HashSet::new();
    named.iter().flatten().copied().chain(by_text).filter(|id| seen.insert(*id)).collect()
}

impl Tokenizer {
    /// Loads the tokenizer stored in a GGUF file's metadata (only the header is read). For a
    /// split GGUF (`NAME-0000K-of-0000N.gguf`) the metadata is read from the first part.
    pub fn from_gguf(path: &Path) -> Result<Self> {
        let path = first_split(path);
        let invalid =
            |e: &dyn std::fmt::Display| Error::InvalidModel(format!("cannot read {}: {e}", path.display()));
        let mut reader = std::io::BufReader::new(std::fs::File::open(&path).map_err(|e| invalid(&e))?);
        let content = crate::gguf_header::read_gguf_header(&mut reader).map_err(|e| invalid(&e))?;
        Self::from_gguf_content(&content, &path)
    }

    /// The tokenizer in an already parsed GGUF header; `path` names the file in errors.
    pub fn from_gguf_content(content: &Content, path: &Path) -> Result<Self> {
        let meta = Metadata { content, path };
        const MODEL: &str = "tokenizer.ggml.model";
        let model = meta.string(MODEL)?.ok_or_else(|| meta.invalid(MODEL, "is missing"))?;
        let tokens = meta.strings("tokenizer.ggml.tokens")?;
        let n = tokens.len();
        let types = match meta.get("tokenizer.ggml.token_type") {
            Some(_) => meta.per_token("tokenizer.ggml.token_type", n, integer)?,
            None => vec![1; n],
        };
        let (mut inner, default_add_bos) = match model {
            "gpt2" => byte_level_bpe(&meta, &tokens)?,
            "llama" => sentencepiece_bpe(&meta, &tokens, &types)?,
            other => {
                return Err(meta.invalid(
                    MODEL,
                    &format!("is {other:?}; supported: \"gpt2\" (byte-level BPE), \"llama\" (SentencePiece)"),
                ))
            }
        };
        let id = |key: &str| meta.id(&format!("tokenizer.ggml.{key}"), n);
        let bos = id("bos_token_id")?;
        let eos = id("eos_token_id")?;
        let ends = [eos, id("eot_token_id")?, id("eom_token_id")?];

        let named: Vec<u32> = [bos, id("unknown_token_id")?, id("padding_token_id")?]
            .into_iter()
            .chain(ends)
            .flatten()
            .collect();
        add_vocabulary_tokens(&mut inner, &tokens, &types, &named)
            .map_err(|e| model_error(path, "added tokens", e))?;

        let add_bos = meta.flag("tokenizer.ggml.add_bos_token")?.unwrap_or(default_add_bos);
        let add_eos = meta.flag("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
        let with_text = |id: u32| (id, tokens[id as usize].as_str());
        let template_bos = bos.filter(|_| add_bos).map(with_text);
        let template_eos = eos.filter(|_| add_eos).map(with_text);
        if template_bos.is_some() || template_eos.is_some() {
            let template = bos_eos_template(template_bos, template_eos)
                .map_err(|e| model_error(path, "BOS/EOS template", e))?;
            inner.with_post_processor(Some(template));
        }

        let eos_token_ids = end_of_generation_ids(&ends, &tokens, &types);
        let chat_template =
            meta.string("tokenizer.chat_template")?.map(|s| ChatTemplate::new(s.to_string())).transpose()?;
        Ok(Self {
            inner,
            chat_template,
            bos_token: bos.map(|id| tokens[id as usize].clone()),
            eos_token: eos.map(|id| tokens[id as usize].clone()),
            eos_token_ids,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn strings(items: &[&str]) -> Value {
        Value::Array(items.iter().map(|s| Value::String(s.to_string())).collect())
    }

    /// Writes a metadata-only GGUF named `name` into `dir`.
    fn write_gguf(dir: &Path, name: &str, metadata: &[(&str, Value)]) -> PathBuf {
        let path = dir.join(name);
        let mut file = std::fs::File::create(&path).unwrap();
        let entries: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
        candle_core::quantized::gguf_file::write(&mut file, &entries, &[]).unwrap();
        path
    }

    const BPE_TOKENS: &[&str] = &[
        "<|begin_of_text|>",
        "<|eot_id|>",
        "<|end_of_text|>",
        "<tool>",
        "h",
        "e",
        "l",
        "o",
        "w",
        "r",
        "d",
        "Ġ",
        "1",
        "2",
        "3",
        "4",
        "5",
        "he",
        "ll",
        "llo",
        "hello",
        "Ġw",
        "or",
        "Ġwor",
        "ld",
        "Ġworld",
        "12",
        "123",
        "45",
        "12345",
        "wd",
    ];
    const BPE_MERGES: &[&str] = &[
        "h e", "l l", "ll o", "he llo", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "1 2", "12 3", "4 5",
        "123 45",
    ];

    /// A byte-level BPE vocabulary: three control tokens, one user-defined, the rest normal.
    fn bpe_metadata(pre: &str) -> Vec<(&'static str, Value)> {
        let types = (0..BPE_TOKENS.len()).map(|i| {
            Value::I32(if i < 3 {
                3
            } else if i == 3 {
                4
            } else {
                1
            })
        });
        vec![
            ("tokenizer.ggml.model", Value::String("gpt2".into())),
            ("tokenizer.ggml.pre", Value::String(pre.into())),
            ("tokenizer.ggml.tokens", strings(BPE_TOKENS)),
            ("tokenizer.ggml.token_type", Value::Array(types.collect())),
            ("tokenizer.ggml.merges", strings(BPE_MERGES)),
            ("tokenizer.ggml.bos_token_id", Value::U32(0)),
            ("tokenizer.ggml.eos_token_id", Value::U32(1)),
            (
                "tokenizer.chat_template",
                Value::String(
                    "{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}".into(),
                ),
            ),
        ]
    }

    fn bpe(pre: &str) -> Tokenizer {
        let dir = tempfile::tempdir().unwrap();
        Tokenizer::from_gguf(&write_gguf(dir.path(), "m.gguf", &bpe_metadata(pre))).unwrap()
    }

    fn token_ids(tokenizer: &Tokenizer, pieces: &[&str]) -> Vec<u32> {
        pieces.iter().map(|p| tokenizer.inner.token_to_id(p).unwrap()).collect()
    }

    #[test]
    fn byte_level_bpe_encodes_and_decodes() {
        let tokenizer = bpe("gpt-2");
        let ids = tokenizer.encode("hello world", false).unwrap();
        assert_eq!(ids, token_ids(&tokenizer, &["hello", "Ġworld"]));
        assert_eq!(tokenizer.decode(&ids, true).unwrap(), "hello world");
        // GPT-2 adds no BOS; its digits stay one pre-token.
        assert_eq!(tokenizer.encode("12345", true).unwrap(), token_ids(&tokenizer, &["12345"]));
    }

    #[test]
    fn pre_tokenizer_names_choose_the_split() {
        let llama3 = bpe("llama-bpe");
        assert_eq!(llama3.encode("12345", false).unwrap(), token_ids(&llama3, &["123", "45"]));
        let qwen2 = bpe("qwen2");
        assert_eq!(qwen2.encode("12345", false).unwrap(), token_ids(&qwen2, &["1", "2", "3", "4", "5"]));
        // Llama 3 takes a pre-token found in the vocabulary whole, merges or not.
        assert_eq!(llama3.encode("wd", false).unwrap(), token_ids(&llama3, &["wd"]));
        assert_eq!(bpe("gpt-2").encode("wd", false).unwrap(), token_ids(&llama3, &["w", "d"]));
    }

    #[test]
    fn bos_is_added_as_the_pre_tokenizer_or_the_file_says() {
        let llama3 = bpe("llama-bpe");
        assert_eq!(llama3.encode("hello", true).unwrap(), vec![0, 20]);
        assert_eq!(llama3.encode("hello", false).unwrap(), vec![20]);
        let dir = tempfile::tempdir().unwrap();
        let mut metadata = bpe_metadata("qwen2");
        metadata.push(("tokenizer.ggml.add_bos_token", Value::Bool(true)));
        metadata.push(("tokenizer.ggml.add_eos_token", Value::Bool(true)));
        let tokenizer = Tokenizer::from_gguf(&write_gguf(dir.path(), "m.gguf", &metadata)).unwrap();
        assert_eq!(tokenizer.encode("hello", true).unwrap(), vec![0, 20, 1]);
    }

    #[test]
    fn special_tokens_are_single_ids_and_skipped_on_decode() {
        let tokenizer = bpe("llama-bpe");
        let ids = tokenizer.encode("<|begin_of_text|>hello<|eot_id|><tool>", false).unwrap();
        assert_eq!(ids, vec![0, 20, 1, 3]);
        assert_eq!(tokenizer.decode(&ids, true).unwrap(), "hello<tool>");
        assert_eq!(tokenizer.decode(&ids, false).unwrap(), "<|begin_of_text|>hello<|eot_id|><tool>");
        assert_eq!(tokenizer.bos_token(), Some("<|begin_of_text|>"));
        // The EOS id first, then the control tokens that end a turn.
        assert_eq!(tokenizer.eos_token_ids(), &[1, 2]);
        let prompt = tokenizer
            .apply_chat_template(
                &serde_json::json!([{"role": "user", "content": "hi"}]),
                false,
                None,
                &Default::default(),
            )
            .unwrap();
        assert_eq!(prompt, "<|begin_of_text|>hi<|eot_id|>");
    }

    /// A SentencePiece vocabulary: `<unk>`, `<s>`, `</s>`, the 256 byte pieces, then pieces
    /// whose scores make `▁hello` in five merges.
    fn sentencepiece_metadata() -> Vec<(&'static str, Value)> {
        let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
        let mut types = vec![2, 3, 3];
        let mut scores = vec![0.0, 0.0, 0.0];
        for byte in 0..=255u8 {
            tokens.push(format!("<0x{byte:02X}>"));
            types.push(6);
            scores.push(0.0);
        }
        let pieces = [
            ("▁h", -1.0),
            ("ll", -2.0),
            ("he", -3.0),
            ("▁he", -4.0),
            ("llo", -5.0),
            ("▁hello", -6.0),
            ("▁", -100.0),
            ("h", -101.0),
            ("e", -102.0),
            ("l", -103.0),
            ("o", -104.0),
        ];
        for (piece, score) in pieces {
            tokens.push(piece.into());
            types.push(1);
            scores.push(score);
        }
        vec![
            ("tokenizer.ggml.model", Value::String("llama".into())),
            ("tokenizer.ggml.tokens", Value::Array(tokens.into_iter().map(Value::String).collect())),
            ("tokenizer.ggml.token_type", Value::Array(types.into_iter().map(Value::I32).collect())),
            ("tokenizer.ggml.scores", Value::Array(scores.into_iter().map(Value::F32).collect())),
            ("tokenizer.ggml.bos_token_id", Value::U32(1)),
            ("tokenizer.ggml.eos_token_id", Value::U32(2)),
            ("tokenizer.ggml.unknown_token_id", Value::U32(0)),
        ]
    }

    fn sentencepiece() -> Tokenizer {
        let dir = tempfile::tempdir().unwrap();
        Tokenizer::from_gguf(&write_gguf(dir.path(), "m.gguf", &sentencepiece_metadata())).unwrap()
    }

    #[test]
    fn sentencepiece_merges_follow_the_scores() {
        let tokenizer = sentencepiece();
        assert_eq!(tokenizer.encode("hello", false).unwrap(), token_ids(&tokenizer, &["▁hello"]));
        assert_eq!(tokenizer.encode("hello", true).unwrap(), token_ids(&tokenizer, &["<s>", "▁hello"]));
        // A space becomes `▁`, and `▁` goes before the text.
        assert_eq!(tokenizer.encode(" hello", false).unwrap(), token_ids(&tokenizer, &["▁", "▁hello"]));
        assert_eq!(tokenizer.encode("hell", false).unwrap(), token_ids(&tokenizer, &["▁he", "ll"]));
        assert_eq!(
            tokenizer.decode(&tokenizer.encode(" hello hell", true).unwrap(), true).unwrap(),
            " hello hell"
        );
        assert_eq!(tokenizer.eos_token_ids(), &[2]);
    }

    #[test]
    fn stored_merges_replace_the_score_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut metadata = sentencepiece_metadata();
        metadata.push(("tokenizer.ggml.merges", strings(&["h e", "▁ he"])));
        let tokenizer = Tokenizer::from_gguf(&write_gguf(dir.path(), "m.gguf", &metadata)).unwrap();
        assert_eq!(tokenizer.encode("hello", false).unwrap(), token_ids(&tokenizer, &["▁he", "l", "l", "o"]));
    }

    #[test]
    fn merges_outside_the_vocabulary_are_named() {
        // Found by fuzz_gguf_header: the tokenizers crate panicked on a merge longer than every token.
        for merges in [["h e", "▁h ello"], ["h e", "zz q"]] {
            let dir = tempfile::tempdir().unwrap();
            let mut metadata = sentencepiece_metadata();
            metadata.push(("tokenizer.ggml.merges", strings(&merges)));
            let error = Tokenizer::from_gguf(&write_gguf(dir.path(), "m.gguf", &metadata)).err().unwrap();
            assert!(error.to_string().contains("not in the vocabulary"), "{error}");
        }
    }

    #[test]
    fn sentencepiece_falls_back_to_bytes_and_keeps_special_tokens_whole() {
        let tokenizer = sentencepiece();
        let ids = tokenizer.encode("hé", false).unwrap();
        assert_eq!(ids, token_ids(&tokenizer, &["▁h", "<0xC3>", "<0xA9>"]));
        assert_eq!(tokenizer.decode(&ids, true).unwrap(), "hé");
        // Text after a special token gets its own `▁`, as llama.cpp and transformers' legacy mode do.
        let ids = tokenizer.encode("<s>hello</s>", false).unwrap();
        assert_eq!(ids, token_ids(&tokenizer, &["<s>", "▁hello", "</s>"]));
        assert_eq!(tokenizer.decode(&ids, true).unwrap(), "hello");
    }

    #[test]
    fn merges_by_score_orders_by_score_then_ids() {
        let tokens: Vec<String> = ["a", "b", "c", "ab", "bc", "abc"].map(String::from).to_vec();
        let merges = merges_by_score(&tokens, &[0.0, 0.0, 0.0, -2.0, -1.0, -3.0]);
        let pairs: Vec<(&str, &str)> = merges.iter().map(|(l, r)| (l.as_str(), r.as_str())).collect();
        assert_eq!(pairs, [("b", "c"), ("a", "b"), ("a", "bc"), ("ab", "c")]);
    }

    #[test]
    fn errors_name_the_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let check = |metadata: &[(&str, Value)], key: &str, detail: &str| {
            let path = write_gguf(dir.path(), "bad.gguf", metadata);
            let err = Tokenizer::from_gguf(&path).err().expect("an error").to_string();
            assert!(err.contains("bad.gguf") && err.contains(key) && err.contains(detail), "{err}");
            assert!(matches!(Tokenizer::from_gguf(&path), Err(Error::InvalidModel(_))));
        };
        check(&[], "tokenizer.ggml.model", "missing");
        let mut metadata = bpe_metadata("gpt-2");
        metadata[0].1 = Value::String("bert".into());
        check(&metadata, "tokenizer.ggml.model", "bert");
        check(&bpe_metadata("chameleon"), "tokenizer.ggml.pre", "chameleon");
        metadata = bpe_metadata("gpt-2");
        metadata.retain(|(k, _)| *k != "tokenizer.ggml.merges");
        check(&metadata, "tokenizer.ggml.merges", "missing");
        metadata = sentencepiece_metadata();
        metadata.retain(|(k, _)| *k != "tokenizer.ggml.scores");
        check(&metadata, "tokenizer.ggml.scores", "missing");
    }

    #[test]
    fn split_files_are_read_from_the_first_part() {
        let dir = tempfile::tempdir().unwrap();
        write_gguf(dir.path(), "model-00001-of-00003.gguf", &bpe_metadata("gpt-2"));
        let second = dir.path().join("model-00002-of-00003.gguf");
        assert_eq!(Tokenizer::from_gguf(&second).unwrap().encode("hello", false).unwrap(), vec![20]);
        assert_eq!(first_split(Path::new("a/x-1-of-2.gguf")), Path::new("a/x-1-of-2.gguf"));
        assert_eq!(first_split(Path::new("a/model.gguf")), Path::new("a/model.gguf"));
    }
}
