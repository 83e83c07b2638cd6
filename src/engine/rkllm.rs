//! The RKLLM engine: Rockchip NPU boards (RK3588) through an RKLLAMA server over HTTP.
//!
//! RKLLM answers a whole conversation at once; exo's node asks for one token per step. The
//! first step of a request sends the conversation to `POST /generate` (streaming) from a task
//! that feeds the answer's text into the request's state; each step then hands out the next
//! token of that text (tokenized with the model's Hugging Face tokenizer) and EOS at its end.
//! The server runs one generation at a time, so requests take turns on it, each holding the
//! turn until its answer ends or it is cancelled.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::{Engine, InferenceState, ModelLocator, SamplingParams};
use crate::error::{Error, Result};
use crate::shard::Shard;
use crate::tensor::{DType, WireTensor};
use crate::tokenizer::Tokenizer;

/// How long a short call (health, listing, unload) may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the RKLLAMA server is and how long it may take.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// `http://host:port`.
    pub base_url: String,
    /// Longest wait for a model load, and between two pieces of an answer.
    pub timeout: Duration,
}

impl ServerOptions {
    /// `RKLLM_SERVER_HOST` (default `localhost`), `RKLLM_SERVER_PORT` (default 8080) and
    /// `RKLLM_TIMEOUT` in seconds (default 300).
    pub fn from_env() -> Result<Self> {
        let (host, port) = Self::from_env_address()?;
        let seconds = std::env::var("RKLLM_TIMEOUT").unwrap_or_else(|_| "300".into());
        let seconds: f64 = seconds.trim().parse().ok().filter(|s: &f64| *s > 0.0).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "RKLLM_TIMEOUT must be a positive number of seconds, not {seconds:?}"
            ))
        })?;
        Ok(Self { base_url: format!("http://{host}:{port}"), timeout: Duration::from_secs_f64(seconds) })
    }

    /// `RKLLM_SERVER_HOST` (default `localhost`) and `RKLLM_SERVER_PORT` (default 8080).
    pub fn from_env_address() -> Result<(String, u16)> {
        let host = std::env::var("RKLLM_SERVER_HOST").unwrap_or_else(|_| "localhost".into());
        let port = std::env::var("RKLLM_SERVER_PORT").unwrap_or_else(|_| "8080".into());
        let port: u16 = port.trim().parse().map_err(|_| {
            Error::InvalidArgument(format!("RKLLM_SERVER_PORT must be a port number, not {port:?}"))
        })?;
        Ok((host.trim().to_string(), port))
    }
}

/// A client of RKLLAMA's HTTP API.
#[derive(Debug, Clone)]
pub struct RkllamaClient {
    options: ServerOptions,
    http: reqwest::Client,
}

/// One role/content message as `POST /generate` takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The message's text.
    pub content: String,
}

impl RkllamaClient {
    /// A client of the server `options` names.
    pub fn new(options: ServerOptions) -> Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(CALL_TIMEOUT)
            .build()
            .map_err(|e| Error::InferenceServer(format!("cannot build an HTTP client: {e}")))?;
        Ok(Self { options, http })
    }

    /// The server's address.
    pub fn base_url(&self) -> &str {
        &self.options.base_url
    }

    fn failure(&self, what: &str, why: impl std::fmt::Display) -> Error {
        Error::InferenceServer(format!("RKLLAMA server at {}: {what}: {why}", self.options.base_url))
    }

    fn transport(&self, what: &str, e: reqwest::Error) -> Error {
        let why = if e.is_timeout() {
            "timed out".to_string()
        } else if e.is_connect() {
            "does not answer (is rkllama running there? set RKLLM_SERVER_HOST and RKLLM_SERVER_PORT)"
                .to_string()
        } else {
            e.to_string()
        };
        self.failure(what, why)
    }

    /// Sends a request and reads its JSON answer: the body's `error` on a failure status.
    async fn call(&self, what: &str, request: reqwest::RequestBuilder, timeout: Duration) -> Result<Value> {
        let response = request.timeout(timeout).send().await.map_err(|e| self.transport(what, e))?;
        let status = response.status();
        let body = response.bytes().await.map_err(|e| self.transport(what, e))?;
        let value: Option<Value> = serde_json::from_slice(&body).ok();
        if !status.is_success() {
            let message = value
                .as_ref()
                .and_then(|v| v.get("error"))
                .and_then(Value::as_str)
                .map_or_else(|| String::from_utf8_lossy(&body).into_owned(), str::to_string);
            return Err(self.failure(what, format!("HTTP {status}: {message}")));
        }
        value.ok_or_else(|| self.failure(what, "the answer is not JSON"))
    }

    /// `GET /`: whether the server answers.
    pub async fn health(&self) -> Result<()> {
        let url = format!("{}/", self.options.base_url);
        self.call("health check", self.http.get(url), CALL_TIMEOUT).await.map(drop)
    }

    /// `GET /models`: the models on the server.
    pub async fn models(&self) -> Result<Vec<String>> {
        let url = format!("{}/models", self.options.base_url);
        let answer = self.call("listing models", self.http.get(url), CALL_TIMEOUT).await?;
        let list = answer
            .get("models")
            .and_then(Value::as_array)
            .ok_or_else(|| self.failure("listing models", "the answer has no \"models\" list"))?;
        Ok(list.iter().filter_map(Value::as_str).map(str::to_string).collect())
    }

    /// `GET /current_model`: the loaded model, if any (the server answers 404 when none is).
    pub async fn current_model(&self) -> Result<Option<String>> {
        let url = format!("{}/current_model", self.options.base_url);
        let response = self
            .http
            .get(url)
            .timeout(CALL_TIMEOUT)
            .send()
            .await
            .map_err(|e| self.transport("asking the loaded model", e))?;
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let body: Value = response.json().await.map_err(|e| self.transport("asking the loaded model", e))?;
        Ok(body.get("model_name").and_then(Value::as_str).map(str::to_string))
    }

    /// `POST /load_model`, after `POST /unload_model` when another model is loaded.
    pub async fn load(&self, model_name: &str) -> Result<()> {
        let current = self.current_model().await?;
        if current.as_deref() == Some(model_name) {
            return Ok(());
        }
        if current.is_some() {
            let url = format!("{}/unload_model", self.options.base_url);
            self.call("unloading the loaded model", self.http.post(url), CALL_TIMEOUT).await?;
        }
        let available = self.models().await?;
        if !available.iter().any(|m| m == model_name) {
            let has = if available.is_empty() { "none".to_string() } else { available.join(", ") };
            return Err(self.failure(
                &format!("loading {model_name}"),
                format!("the server has no model {model_name} in ~/RKLLAMA/models (it has: {has})"),
            ));
        }
        let url = format!("{}/load_model", self.options.base_url);
        let request = self.http.post(url).json(&json!({"model_name": model_name}));
        self.call(&format!("loading {model_name}"), request, self.options.timeout).await.map(drop)
    }

    /// `POST /generate` with `stream: true`: the answer's pieces, each within the timeout.
    async fn generate(&self, messages: &[ChatMessage], pieces: mpsc::UnboundedSender<Result<String>>) {
        let what = "generating";
        let body = json!({
            "messages": messages.iter().map(|m| json!({"role": m.role, "content": m.content})).collect::<Vec<_>>(),
            "stream": true,
        });
        let url = format!("{}/generate", self.options.base_url);
        let sent = tokio::time::timeout(self.options.timeout, self.http.post(url).json(&body).send()).await;
        let response = match sent {
            Err(_) => return drop(pieces.send(Err(self.failure(what, "timed out")))),
            Ok(Err(e)) => return drop(pieces.send(Err(self.transport(what, e)))),
            Ok(Ok(response)) => response,
        };
        if !response.status().is_success() {
            let status = response.status();
            let text = response.text().await.unwrap_or_default();
            let message = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_string))
                .unwrap_or(text);
            return drop(pieces.send(Err(self.failure(what, format!("HTTP {status}: {message}")))));
        }
        let mut body = response.bytes_stream();
        let mut parser = AnswerStream::default();
        loop {
            let next = match tokio::time::timeout(self.options.timeout, body.next()).await {
                Err(_) => Err(self.failure(what, "timed out waiting for the next piece of the answer")),
                Ok(None) => parser.finish().map(|()| None),
                Ok(Some(Err(e))) => Err(self.transport(what, e)),
                Ok(Some(Ok(bytes))) => parser.feed(&bytes).map(Some),
            };
            let outcome = next.map_err(|e| match e {
                Error::InferenceServer(m) if !m.starts_with("RKLLAMA") => self.failure(what, m),
                other => other,
            });
            match outcome {
                Err(e) => return drop(pieces.send(Err(e))),
                Ok(None) => return,
                Ok(Some(texts)) => {
                    // Read on to the end after the last piece: the server holds its one
                    // generation until its response ends, and the turn follows it.
                    for text in texts {
                        if pieces.send(Ok(text)).is_err() {
                            return;
                        }
                    }
                }
            }
        }
    }
}

/// RKLLAMA's answer as it streams: JSON objects `{"choices": [{"content", "finish_reason"}]}`
/// one after another (whitespace between them, several per read, one split across reads),
/// the last with `finish_reason` `stop`; a whole answer is one such object.
#[derive(Debug, Default)]
pub struct AnswerStream {
    pending: Vec<u8>,
    /// Whether an object with `finish_reason` `stop` has been read.
    pub ended: bool,
}

impl AnswerStream {
    /// The texts of the objects `bytes` completes.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Vec<String>> {
        self.pending.extend_from_slice(bytes);
        let pending = std::mem::take(&mut self.pending);
        let mut texts = Vec::new();
        let mut objects = serde_json::Deserializer::from_slice(&pending).into_iter::<Value>();
        let mut consumed = 0;
        while !self.ended {
            match objects.next() {
                None => break,
                Some(Ok(object)) => {
                    consumed = objects.byte_offset();
                    let (text, ended) = read_object(&object)?;
                    texts.extend(text);
                    self.ended = ended;
                }
                Some(Err(e)) if e.is_eof() => break,
                Some(Err(e)) => {
                    return Err(Error::InferenceServer(format!("malformed answer stream: {e}")));
                }
            }
        }
        self.pending = pending[consumed..].to_vec();
        Ok(texts)
    }

    /// Checks the stream ended with a finished answer and nothing cut off.
    pub fn finish(&mut self) -> Result<()> {
        if !self.ended && self.pending.iter().any(|b| !b.is_ascii_whitespace()) {
            return Err(Error::InferenceServer(format!(
                "truncated answer stream: it ends inside an object ({} bytes unread)",
                self.pending.len()
            )));
        }
        if !self.ended {
            return Err(Error::InferenceServer(
                "truncated answer stream: it ended before an object with finish_reason \"stop\"".into(),
            ));
        }
        Ok(())
    }
}

/// The text of one object of the answer, and whether it ends the answer.
fn read_object(object: &Value) -> Result<(Option<String>, bool)> {
    if let Some(error) = object.get("error") {
        let message = error.as_str().map_or_else(|| error.to_string(), str::to_string);
        return Err(Error::InferenceServer(format!("the server reported an error: {message}")));
    }
    let choice = object.get("choices").and_then(|c| c.get(0)).ok_or_else(|| {
        Error::InferenceServer(format!("malformed answer stream: an object without choices: {object}"))
    })?;
    let ended = choice.get("finish_reason").and_then(Value::as_str) == Some("stop");
    let text = choice.get("content").and_then(Value::as_str).filter(|c| !c.is_empty()).map(str::to_string);
    Ok((text, ended))
}

/// The conversation a chat-templated prompt holds, as messages, so the server templates it
/// once: ChatML (Qwen), DeepSeek-R1, Phi-3 and Llama 3 templates are read back; any other
/// prompt is one user message.
pub fn chat_messages(prompt: &str) -> Vec<ChatMessage> {
    let parsed =
        chatml(prompt).or_else(|| phi3(prompt)).or_else(|| llama3(prompt)).or_else(|| deepseek(prompt));
    parsed.filter(|m| !m.is_empty()).unwrap_or_else(|| vec![message("user", prompt)])
}

fn message(role: &str, content: &str) -> ChatMessage {
    ChatMessage { role: role.to_string(), content: content.trim().to_string() }
}

/// `<|im_start|>role\ncontent<|im_end|>` turns.
fn chatml(prompt: &str) -> Option<Vec<ChatMessage>> {
    if !prompt.contains("<|im_start|>") {
        return None;
    }
    let turns = prompt.split("<|im_start|>").skip(1);
    Some(
        turns
            .filter_map(|turn| {
                let (role, rest) = turn.split_once('\n')?;
                let content = rest.split("<|im_end|>").next().unwrap_or_default();
                (!content.trim().is_empty()).then(|| message(role.trim(), content))
            })
            .collect(),
    )
}

/// `<|role|>\ncontent<|end|>` turns.
fn phi3(prompt: &str) -> Option<Vec<ChatMessage>> {
    if !prompt.contains("<|end|>") {
        return None;
    }
    let mut messages = Vec::new();
    for turn in prompt.split("<|end|>") {
        let turn = turn.trim_start();
        let Some(rest) = turn.strip_prefix("<|") else { continue };
        let Some((role, content)) = rest.split_once("|>") else { continue };
        if !content.trim().is_empty() && matches!(role, "system" | "user" | "assistant") {
            messages.push(message(role, content));
        }
    }
    Some(messages)
}

/// `<|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>` turns.
fn llama3(prompt: &str) -> Option<Vec<ChatMessage>> {
    if !prompt.contains("<|start_header_id|>") {
        return None;
    }
    let turns = prompt.split("<|start_header_id|>").skip(1);
    Some(
        turns
            .filter_map(|turn| {
                let (role, rest) = turn.split_once("<|end_header_id|>")?;
                let content = rest.split("<|eot_id|>").next().unwrap_or_default();
                (!content.trim().is_empty()).then(|| message(role.trim(), content))
            })
            .collect(),
    )
}

/// DeepSeek-R1's `system<｜User｜>question<｜Assistant｜>answer<｜end▁of▁sentence｜>` turns.
fn deepseek(prompt: &str) -> Option<Vec<ChatMessage>> {
    const USER: &str = "<｜User｜>";
    const ASSISTANT: &str = "<｜Assistant｜>";
    if !prompt.contains(USER) {
        return None;
    }
    let prompt = prompt.trim_start_matches("<｜begin▁of▁sentence｜>");
    let mut parts = prompt.split(USER);
    let system = parts.next().unwrap_or_default();
    let mut messages = Vec::new();
    if !system.trim().is_empty() {
        messages.push(message("system", system));
    }
    for part in parts {
        let (question, answer) = part.split_once(ASSISTANT).unwrap_or((part, ""));
        messages.push(message("user", question));
        let answer = answer.split("<｜end▁of▁sentence｜>").next().unwrap_or_default();
        if !answer.trim().is_empty() {
            messages.push(message("assistant", answer));
        }
    }
    Some(messages)
}

/// The tokens of an answer whose text arrives in pieces: the whole text so far is tokenized
/// again as it grows, and a token is handed out once more text cannot change it (the last
/// token waits for the next piece or the end).
#[derive(Debug, Default)]
struct AnswerTokens {
    text: String,
    handed_out: Vec<u32>,
    ready: VecDeque<u32>,
}

impl AnswerTokens {
    fn push(&mut self, tokenizer: &Tokenizer, piece: &str, ended: bool) -> Result<()> {
        self.text.push_str(piece);
        let tokens = tokenizer.encode(&self.text, false)?;
        let known = self.handed_out.len() + self.ready.len();
        let agreed =
            self.handed_out.iter().chain(self.ready.iter()).copied().eq(tokens.iter().take(known).copied());
        let fresh: Vec<u32> = if agreed && tokens.len() >= known {
            tokens[known..].to_vec()
        } else {
            // More text changed a token already given out: the rest is tokenized on its own.
            let given: Vec<u32> = self.handed_out.iter().chain(self.ready.iter()).copied().collect();
            let said = tokenizer.decode(&given, false)?;
            let rest = self.text.strip_prefix(said.as_str()).unwrap_or_default();
            tokenizer.encode(rest, false)?
        };
        let keep_back = usize::from(!ended && !fresh.is_empty());
        self.ready.extend(&fresh[..fresh.len() - keep_back]);
        Ok(())
    }

    fn next(&mut self) -> Option<u32> {
        let token = self.ready.pop_front()?;
        self.handed_out.push(token);
        Some(token)
    }
}

/// One request's answer in progress.
struct Generation {
    pieces: mpsc::UnboundedReceiver<Result<String>>,
    tokens: AnswerTokens,
    ended: bool,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Generation {
    fn drop(&mut self) {
        // Dropping the response closes the connection and gives the server's turn back.
        self.task.abort();
    }
}

/// The loaded model: its shard, its name on the server and its tokenizer.
#[derive(Clone)]
struct Loaded {
    shard: Shard,
    tokenizer: Arc<Tokenizer>,
}

/// A model id's name on the RKLLAMA server (the registry knows it; the engine does not).
pub type ServerNames = Arc<dyn Fn(&str) -> Result<String> + Send + Sync>;

/// exo's `RKLLMInferenceEngine`: whole models on an RKLLAMA server, token by token.
pub struct RkllmEngine {
    client: RkllamaClient,
    locator: Arc<dyn ModelLocator>,
    server_names: ServerNames,
    loaded: Mutex<Option<Loaded>>,
    loading: tokio::sync::Mutex<()>,
    turn: Arc<tokio::sync::Mutex<()>>,
    requests: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Generation>>>>,
}

impl RkllmEngine {
    /// An engine for the server `options` names; `locator` fetches each model's tokenizer and
    /// `server_names` names each model on the server.
    pub fn new(
        options: ServerOptions,
        locator: Arc<dyn ModelLocator>,
        server_names: ServerNames,
    ) -> Result<Self> {
        Ok(Self {
            client: RkllamaClient::new(options)?,
            locator,
            server_names,
            loaded: Mutex::new(None),
            loading: tokio::sync::Mutex::new(()),
            turn: Arc::new(tokio::sync::Mutex::new(())),
            requests: Mutex::new(HashMap::new()),
        })
    }

    /// The HTTP client of the engine's server.
    pub fn client(&self) -> &RkllamaClient {
        &self.client
    }

    fn loaded(&self) -> Option<Loaded> {
        self.loaded.lock().expect("loaded lock poisoned").clone()
    }

    async fn tokenizer(&self, shard: &Shard) -> Result<Arc<Tokenizer>> {
        self.ensure_shard(shard).await?;
        self.loaded()
            .map(|l| l.tokenizer)
            .ok_or_else(|| Error::InvalidModel("no RKLLM model is loaded".into()))
    }

    fn generation(&self, request_id: &str) -> Option<Arc<tokio::sync::Mutex<Generation>>> {
        self.requests.lock().expect("requests lock poisoned").get(request_id).cloned()
    }

    /// The next token of `request_id`'s answer, EOS once it has ended.
    async fn next_token(&self, request_id: &str, shard: &Shard) -> Result<u32> {
        let tokenizer = self.tokenizer(shard).await?;
        let eos = *tokenizer.eos_token_ids().first().ok_or_else(|| {
            Error::InvalidModel(format!("the tokenizer of {} names no EOS token", shard.model_id))
        })?;
        let generation = self.generation(request_id).ok_or_else(|| {
            Error::RequestFailed(format!(
                "request {request_id} has no answer in progress on the RKLLM engine"
            ))
        })?;
        let mut generation = generation.lock().await;
        loop {
            if let Some(token) = generation.tokens.next() {
                return Ok(token);
            }
            if generation.ended {
                drop(generation);
                self.requests.lock().expect("requests lock poisoned").remove(request_id);
                return Ok(eos);
            }
            match generation.pieces.recv().await {
                Some(Ok(piece)) => generation.tokens.push(&tokenizer, &piece, false)?,
                Some(Err(e)) => {
                    drop(generation);
                    self.requests.lock().expect("requests lock poisoned").remove(request_id);
                    return Err(e);
                }
                None => {
                    generation.ended = true;
                    generation.tokens.push(&tokenizer, "", true)?;
                }
            }
        }
    }
}

/// The engine's name, as `--inference-engine` and peers' health checks give it.
pub const NAME: &str = "rkllm";

/// A token as the `[1, 1]` int64 tensor `sample` reads back.
fn token_output(token: u32) -> Result<WireTensor> {
    WireTensor::new(DType::I64, vec![1, 1], i64::from(token).to_le_bytes().to_vec())
}

#[async_trait]
impl Engine for RkllmEngine {
    fn name(&self) -> &str {
        NAME
    }

    fn device(&self) -> &str {
        "npu"
    }

    /// Steps only hand out tokens already read, so many run at once; the server's one
    /// generation at a time is kept by the turn each answer holds.
    fn concurrent_steps(&self) -> usize {
        64
    }

    fn current_shard(&self) -> Option<Shard> {
        self.loaded().map(|l| l.shard)
    }

    fn tokenizer(&self) -> Option<Arc<Tokenizer>> {
        self.loaded().map(|l| l.tokenizer)
    }

    async fn encode(&self, shard: &Shard, prompt: &str) -> Result<Vec<u32>> {
        self.tokenizer(shard).await?.encode(prompt, false)
    }

    async fn decode(&self, shard: &Shard, tokens: &[u32]) -> Result<String> {
        self.tokenizer(shard).await?.decode(tokens, false)
    }

    /// The token `infer_*` put in its output: the server samples (its Modelfile's settings).
    async fn sample(&self, logits: &WireTensor, _params: SamplingParams) -> Result<Vec<u32>> {
        if logits.dtype() != DType::I64 || logits.data().len() != 8 {
            return Err(Error::InvalidTensor(format!(
                "the RKLLM engine samples the [1, 1] int64 token it produced, not a {} tensor of shape {:?}",
                logits.dtype().name(),
                logits.shape()
            )));
        }
        let value = i64::from_le_bytes(logits.data().try_into().expect("8 bytes"));
        u32::try_from(value)
            .map(|t| vec![t])
            .map_err(|_| Error::InvalidTensor(format!("token {value} is negative")))
    }

    async fn infer_tensor(
        &self,
        request_id: &str,
        shard: &Shard,
        _input: WireTensor,
        state: Option<InferenceState>,
    ) -> Result<(WireTensor, Option<InferenceState>)> {
        let token = self.next_token(request_id, shard).await?;
        Ok((token_output(token)?, state))
    }

    async fn infer_prompt(
        &self,
        request_id: &str,
        shard: &Shard,
        prompt: &str,
        state: Option<InferenceState>,
    ) -> Result<(WireTensor, Option<InferenceState>)> {
        self.finish_request(request_id).await;
        self.ensure_shard(shard).await?;
        let turn = self.turn.clone().lock_owned().await;
        let (sender, pieces) = mpsc::unbounded_channel();
        let (client, messages) = (self.client.clone(), chat_messages(prompt));
        let task = tokio::spawn(async move {
            let _turn = turn;
            client.generate(&messages, sender).await;
        });
        let generation = Generation { pieces, tokens: AnswerTokens::default(), ended: false, task };
        self.requests
            .lock()
            .expect("requests lock poisoned")
            .insert(request_id.to_string(), Arc::new(tokio::sync::Mutex::new(generation)));
        self.infer_tensor(request_id, shard, token_output(0)?, state).await
    }

    /// Loads the whole model on the server; a layer range is refused, as RKLLM loads whole models.
    async fn ensure_shard(&self, shard: &Shard) -> Result<()> {
        shard.validate()?;
        if shard.start_layer != 0 || !shard.is_last_layer() {
            return Err(Error::InvalidShard(format!(
                "the RKLLM engine runs whole models on one node, and this node was given layers {}..={} of {}'s {}; \
                 run {} on a single RKLLM node (or leave it to nodes of another engine)",
                shard.start_layer, shard.end_layer, shard.model_id, shard.n_layers, shard.model_id
            )));
        }
        if self.loaded().is_some_and(|l| l.shard == *shard) {
            return Ok(());
        }
        let _one_load = self.loading.lock().await;
        if self.loaded().is_some_and(|l| l.shard == *shard) {
            return Ok(());
        }
        let name = (self.server_names)(&shard.model_id)?;
        let dir = self.locator.locate(shard).await?;
        let tokenizer = Arc::new(load_tokenizer(dir).await?);
        {
            let _turn = self.turn.lock().await;
            self.client.load(&name).await?;
        }
        *self.loaded.lock().expect("loaded lock poisoned") = Some(Loaded { shard: shard.clone(), tokenizer });
        Ok(())
    }

    async fn finish_request(&self, request_id: &str) {
        let removed = self.requests.lock().expect("requests lock poisoned").remove(request_id);
        drop(removed);
    }

    async fn eos_token_ids(&self, shard: &Shard) -> Result<Vec<u32>> {
        Ok(self.tokenizer(shard).await?.eos_token_ids().to_vec())
    }
}

async fn load_tokenizer(dir: std::path::PathBuf) -> Result<Tokenizer> {
    tokio::task::spawn_blocking(move || Tokenizer::from_dir(Path::new(&dir)))
        .await
        .map_err(|e| Error::InvalidModel(format!("loading the tokenizer stopped: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(stream: &mut AnswerStream, bytes: &str) -> Vec<String> {
        stream.feed(bytes.as_bytes()).unwrap()
    }

    #[test]
    fn stream_objects_split_and_shared_across_reads_are_read_in_order() {
        let mut stream = AnswerStream::default();
        let a = r#"{"choices": [{"content": "Hel", "finish_reason": null}]}"#;
        let b = r#"{"choices": [{"content": "lo", "finish_reason": null}]}"#;
        let end = r#"{"choices": [{"content": "", "finish_reason": "stop"}]}"#;
        let all = format!("{a}\n\n{b}\n\n{end}\n\n");
        let (first, rest) = all.split_at(a.len() + 10);
        assert_eq!(texts(&mut stream, first), ["Hel"]);
        assert!(!stream.ended);
        assert_eq!(texts(&mut stream, rest), ["lo"]);
        assert!(stream.ended);
        stream.finish().unwrap();
    }

    #[test]
    fn a_whole_answer_is_one_object() {
        let mut stream = AnswerStream::default();
        let whole = r#"{"id": "rkllm_chat", "choices": [{"role": "assistant", "content": "4", "finish_reason": "stop"}]}"#;
        assert_eq!(texts(&mut stream, whole), ["4"]);
        stream.finish().unwrap();
    }

    #[test]
    fn malformed_and_truncated_streams_are_errors() {
        let mut stream = AnswerStream::default();
        assert!(stream.feed(b"{\"choices\": [}").is_err());
        let mut cut = AnswerStream::default();
        assert_eq!(texts(&mut cut, r#"{"choices": [{"content": "a"}]} {"choi"#), ["a"]);
        let err = cut.finish().unwrap_err().to_string();
        assert!(err.contains("truncated") && err.contains("inside an object"), "{err}");
        let mut unfinished = AnswerStream::default();
        texts(&mut unfinished, r#"{"choices": [{"content": "a", "finish_reason": null}]}"#);
        assert!(unfinished.finish().unwrap_err().to_string().contains("finish_reason"));
        let mut failed = AnswerStream::default();
        let err = failed.feed(br#"{"error": "No models are currently loaded."}"#).unwrap_err().to_string();
        assert!(err.contains("No models are currently loaded."), "{err}");
    }

    #[test]
    fn templated_prompts_are_read_back_as_messages() {
        let chatml = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
                      <|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n";
        let roles = |m: Vec<ChatMessage>| m.into_iter().map(|m| (m.role, m.content)).collect::<Vec<_>>();
        let s = |a: &str, b: &str| (a.to_string(), b.to_string());
        assert_eq!(
            roles(chat_messages(chatml)),
            [s("system", "Be brief."), s("user", "Hi"), s("assistant", "Hello!"), s("user", "2+2?")]
        );
        let deepseek = "<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi<｜Assistant｜>Hello!<｜end▁of▁sentence｜><｜User｜>2+2?<｜Assistant｜>";
        assert_eq!(
            roles(chat_messages(deepseek)),
            [s("system", "Be brief."), s("user", "Hi"), s("assistant", "Hello!"), s("user", "2+2?")]
        );
        let phi3 = "<|system|>\nBe brief.<|end|>\n<|user|>\n2+2?<|end|>\n<|assistant|>\n";
        assert_eq!(roles(chat_messages(phi3)), [s("system", "Be brief."), s("user", "2+2?")]);
        let llama = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>\
                     <|start_header_id|>assistant<|end_header_id|>\n\n";
        assert_eq!(roles(chat_messages(llama)), [s("user", "2+2?")]);
        assert_eq!(roles(chat_messages("plain text")), [s("user", "plain text")]);
    }

    #[tokio::test]
    async fn a_layer_range_is_refused_before_the_server_is_asked() {
        // Nothing listens on the discard port: a refusal that reached the server would say so.
        let options =
            ServerOptions { base_url: "http://127.0.0.1:9".into(), timeout: Duration::from_secs(1) };
        let engine = RkllmEngine::new(
            options,
            Arc::new(super::super::LocalDirectories),
            Arc::new(|id| Ok(id.to_string())),
        )
        .unwrap();
        let part = Shard::new("qwen2.5-1.5b-rkllm", 0, 13, 28);
        let err = engine.ensure_shard(&part).await.unwrap_err();
        assert!(matches!(err, Error::InvalidShard(_)), "{err}");
        let err = err.to_string();
        assert!(err.contains("whole models") && err.contains("layers 0..=13"), "{err}");
        let tail = Shard::new("qwen2.5-1.5b-rkllm", 14, 27, 28);
        assert!(matches!(engine.ensure_shard(&tail).await, Err(Error::InvalidShard(_))));
        assert!(engine.current_shard().is_none());
    }
}
