//! The request path: run this node's layers, sample on the last shard, forward hidden states
//! or the new token to the node holding the next layer, and deliver tokens to the origin.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::future::BoxFuture;
use tokio::sync::mpsc;

use super::membership::{discovered, DISCOVERY_GRACE};
use super::outbox::{Message, PeerLookup};
use super::request::{
    failed_status, failure_from_status, planned_shards, LayerRange, Phase, Request, RequestContext,
    StreamEvent, CONTEXT_KEY,
};
use super::{GenerateOptions, Node, NodeEvent};
use crate::engine::example::{Example, ExampleLoss};
use crate::engine::{InferenceState, IMAGES_KEY};
use crate::error::{Error, Result};
use crate::net::{PeerHandle, RequestHandler};
use crate::shard::Shard;
use crate::tensor::{DType, WireTensor};
use crate::topology::Topology;

/// How often bystanders (peers that only display a request) are sent its new tokens.
const BYSTANDER_INTERVAL: Duration = Duration::from_millis(200);

/// A fresh request id.
fn new_request_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// The whole model of which `shard` is a part.
fn whole_model(shard: &Shard) -> Shard {
    Shard::new(shard.model_id.clone(), 0, shard.n_layers - 1, shard.n_layers)
}

/// What a step's `state` becomes on its way to `peer`: all of it for a xotorch-core peer, and
/// for an exo classic peer the empty state classic itself sends on Linux: classic's peer handle
/// cannot serialize any entry of a state without MLX, and drops the request without a word.
fn state_for(peer: &dyn PeerHandle, state: Option<InferenceState>) -> Option<InferenceState> {
    if peer.runs_xotorch_core() {
        state
    } else {
        Some(InferenceState::default())
    }
}

/// A token as the `[1, 1]` int64 tensor the first shard takes.
fn token_tensor(token: u32) -> WireTensor {
    WireTensor::new(DType::I64, vec![1, 1], i64::from(token).to_le_bytes().to_vec())
        .expect("8 bytes for one i64")
}

impl Node {
    /// exo classic's `process_prompt`: starts `request_id` from `prompt` on the ring for
    /// `base`'s model and returns once this node's part of the first step is done. Tokens reach
    /// the listeners (`subscribe`); the request's settings come from `state` or the defaults.
    pub async fn process_prompt(
        &self,
        base: &Shard,
        prompt: &str,
        request_id: Option<String>,
        state: Option<InferenceState>,
    ) -> Result<String> {
        let request_id = request_id.unwrap_or_else(new_request_id);
        let context = RequestContext::from_state(state.as_ref())
            .unwrap_or_else(|| RequestContext { origin: self.id.clone(), ..Default::default() });
        base.validate()?;
        self.start_request(&request_id, base, context.clone(), None);
        let outcome = self.plan_and_run_prompt(base, prompt, &request_id, context, state).await;
        match outcome {
            Ok(()) => Ok(request_id),
            Err(e) => {
                // The caller gets an error of the same kind; the ring gets the error itself.
                let returned = e.duplicate();
                self.fail_request(&request_id, e).await;
                Err(returned)
            }
        }
    }

    /// Starts a request on the ring and returns its id and its token stream at once; the
    /// stream ends with `Finished` or `Failed`. The prompt's images, if any, travel with it to
    /// the node holding the first layer. Must be called inside the tokio runtime.
    pub fn generate(
        &self,
        base: &Shard,
        prompt: &str,
        request_id: Option<String>,
        options: GenerateOptions,
    ) -> Result<(String, mpsc::UnboundedReceiver<StreamEvent>)> {
        base.validate()?;
        let request_id = request_id.unwrap_or_else(new_request_id);
        if self.requests.contains(&request_id) {
            return Err(Error::InvalidArgument(format!("request {request_id} is already running")));
        }
        let context = RequestContext {
            origin: self.id.clone(),
            max_tokens: options.max_tokens,
            temperature: options.temperature,
            top_p: options.top_p,
            top_k: options.top_k,
            seed: options.seed,
            layers: None,
        };
        let state = options.images.map(|images| InferenceState {
            tensors: [(IMAGES_KEY.to_string(), images)].into(),
            ..Default::default()
        });
        let (stream, receiver) = mpsc::unbounded_channel();
        self.start_request(&request_id, base, context.clone(), Some(stream));
        let (node, base, prompt, id) = (self.arc(), base.clone(), prompt.to_string(), request_id.clone());
        tokio::spawn(async move {
            if let Err(e) = node.plan_and_run_prompt(&base, &prompt, &id, context, state).await {
                node.fail_request(&id, e).await;
            }
        });
        Ok((request_id, receiver))
    }

    /// exo classic's `process_tensor`: runs this node's shard of `base` on `tensor`.
    pub async fn process_tensor(
        &self,
        base: &Shard,
        tensor: WireTensor,
        request_id: Option<String>,
        state: Option<InferenceState>,
    ) -> Result<()> {
        let shard = self.get_current_shard(base, None)?;
        let request_id = request_id.unwrap_or_else(new_request_id);
        self.run_tensor(shard, tensor, &request_id, state).await
    }

    /// Stops a request on every node of the ring and frees what they keep for it.
    pub async fn cancel_request(&self, request_id: &str) {
        let status =
            serde_json::json!({"type": "request_cancelled", "node_id": self.id, "request_id": request_id});
        self.notify_peers(request_id, &status.to_string());
        let error = Error::RequestFailed(format!("request {request_id} was cancelled"));
        self.end_request(request_id, Some(error)).await;
    }

    /// Settles the layers of a request recorded here, then runs (or hands off) its prompt with
    /// the context, plan included, in `state`.
    async fn plan_and_run_prompt(
        &self,
        base: &Shard,
        prompt: &str,
        request_id: &str,
        context: RequestContext,
        state: Option<InferenceState>,
    ) -> Result<()> {
        let (shard, context) = self.settle_layers(request_id, base, context).await?;
        self.run_prompt(base, shard, prompt, request_id, context.attach(state)).await
    }

    /// Plans the layers of a request started here (unless its context carries a plan already),
    /// records the plan and the nodes it runs on with the request, and returns the shard this
    /// node runs, if any, with the context to send along.
    async fn settle_layers(
        &self,
        request_id: &str,
        base: &Shard,
        mut context: RequestContext,
    ) -> Result<(Option<Shard>, RequestContext)> {
        if context.layers.is_none() && context.origin == self.id {
            context.layers = match self.balanced_plan(base).await? {
                Some(plan) => Some(plan),
                None => self.pinned_plan(base),
            };
        }
        let layers = match &context.layers {
            Some(plan) => planned_shards(plan, base)?,
            None => self.assignments(base),
        };
        self.requests.with(request_id, |request| {
            request.context = Some(context.clone());
            request.members = layers.iter().map(|(id, _)| id.clone()).collect();
        });
        let shard = layers.into_iter().find(|(id, _)| *id == self.id).map(|(_, shard)| shard);
        Ok((shard, context))
    }

    /// The current partition of `base`'s model as a plan the request keeps, when every node in
    /// it follows plans: a node joining or leaving later changes the partitions, and a request
    /// that derived its layers anew at each step would move them from under its caches.
    /// `None` when a classic peer holds layers (it derives them from its own partitions).
    fn pinned_plan(&self, base: &Shard) -> Option<Vec<LayerRange>> {
        let layers = self.assignments(base);
        let peers = self.peers();
        let follows = |id: &str| id == self.id || peers.iter().any(|p| p.id() == id && p.runs_xotorch_core());
        let pinned = layers.iter().all(|(id, _)| follows(id));
        pinned
            .then(|| super::plan_of(layers.iter().map(|(id, shard)| (id.as_str(), shard.clone())).collect()))
    }

    /// Records a request started here: its settings, its stream and the nodes it runs on.
    fn start_request(
        &self,
        request_id: &str,
        base: &Shard,
        context: RequestContext,
        stream: Option<mpsc::UnboundedSender<StreamEvent>>,
    ) {
        let members = self.assignments(base).into_iter().map(|(id, _)| id).collect();
        let mut request = Request::new(Some(context));
        request.stream = stream;
        request.members = members;
        self.requests.start(request_id, request);
    }

    /// Tells every peer and the local listeners about this node's work on a prompt.
    fn broadcast_node_status(
        &self,
        status: &str,
        base: &Shard,
        shard: &Shard,
        request_id: &str,
        extra: serde_json::Value,
    ) {
        let mut message = serde_json::json!({
            "type": "node_status",
            "node_id": self.id,
            "status": status,
            "base_shard": base.to_json(),
            "shard": shard.to_json(),
            "request_id": request_id,
        });
        if let (Some(message), serde_json::Value::Object(extra)) = (message.as_object_mut(), extra) {
            message.extend(extra);
        }
        self.broadcast_opaque_status(request_id, &message.to_string());
    }

    /// Runs the prompt here when this node holds the first layer, else hands it to the node
    /// that does (`shard` is what this node holds, if anything).
    async fn run_prompt(
        &self,
        base: &Shard,
        shard: Option<Shard>,
        prompt: &str,
        request_id: &str,
        state: Option<InferenceState>,
    ) -> Result<()> {
        let started = Instant::now();
        let shown = shard.clone().unwrap_or_else(|| Shard::new(base.model_id.clone(), 0, -1, base.n_layers));
        // The request's layer plan, if it has one, lets every node fetch its own part now
        // (classic nodes ignore the extra key).
        let mut start = serde_json::json!({"prompt": prompt});
        if let Some(layers) = RequestContext::from_state(state.as_ref()).and_then(|c| c.layers) {
            start["layers"] = serde_json::json!(layers);
        }
        self.broadcast_node_status("start_process_prompt", base, &shown, request_id, start);
        let mut result_size = 0;
        let outcome = if let Some(shard) = shard.filter(Shard::is_first_layer) {
            self.requests.set_phase(request_id, Phase::Processing);
            let step = {
                let _turn = self.compute.acquire().await.expect("the compute queue is never closed");
                self.engine.infer_prompt(request_id, &shard, prompt, state.clone()).await
            };
            match step {
                Ok((output, returned)) => {
                    result_size = output.shape().iter().product::<usize>();
                    let mut next = returned.or(state);
                    // The images were embedded here; the next node gets hidden states only.
                    if let Some(next) = next.as_mut() {
                        next.tensors.remove(IMAGES_KEY);
                    }
                    self.after_step(&shard, output, request_id, self.keep_context(request_id, next)).await
                }
                Err(e) => Err(e),
            }
        } else {
            self.requests.set_phase(request_id, Phase::Waiting);
            self.forward_prompt(base, prompt, request_id, state).await
        };
        let end = serde_json::json!({
            "prompt": prompt,
            "elapsed_time_ns": started.elapsed().as_nanos() as u64,
            "result_size": result_size,
        });
        self.broadcast_node_status("end_process_prompt", base, &shown, request_id, end);
        outcome
    }

    /// Hands a prompt to the node holding the first layer of `base`'s model.
    async fn forward_prompt(
        &self,
        base: &Shard,
        prompt: &str,
        request_id: &str,
        state: Option<InferenceState>,
    ) -> Result<()> {
        let (target, first) =
            self.layers_for(request_id, base)?.into_iter().next().ok_or_else(|| {
                Error::InvalidArgument(format!("no node holds layers of {}", base.model_id))
            })?;
        let peer = self
            .peer(&target)
            .ok_or_else(|| Error::Peer(format!("peer {target} holding the first layer is not connected")))?;
        let _call = self.requests.hand_off(request_id);
        peer.send_prompt(&first, prompt, request_id, state_for(peer.as_ref(), state)).await
    }

    /// Runs this node's layers on a tensor of a running request.
    async fn run_tensor(
        &self,
        shard: Shard,
        tensor: WireTensor,
        request_id: &str,
        state: Option<InferenceState>,
    ) -> Result<()> {
        if !self.requests.register(request_id, RequestContext::from_state(state.as_ref())) {
            return self.refuse_ended(request_id, state.as_ref()).await;
        }
        self.requests.set_phase(request_id, Phase::Processing);
        let (output, returned) = {
            let _turn = self.compute.acquire().await.expect("the compute queue is never closed");
            self.engine.infer_tensor(request_id, &shard, tensor, state.clone()).await?
        };
        if self.requests.has_ended(request_id) {
            // Ended while this step ran: the step's cache goes too.
            return self.refuse_ended(request_id, state.as_ref()).await;
        }
        self.after_step(&shard, output, request_id, self.keep_context(request_id, returned.or(state))).await
    }

    /// Answers a late step of an ended request, after freeing whatever the step left in the
    /// engine. A xotorch-core sender (its step carries the request's context) gets an error
    /// naming why the request ended, so it stops waiting on it; an exo classic sender, which
    /// sends one step past the end of every request and only logs a failure, is answered as
    /// classic answers it, and the step is dropped.
    async fn refuse_ended(&self, request_id: &str, state: Option<&InferenceState>) -> Result<()> {
        self.engine.finish_request(request_id).await;
        if RequestContext::from_state(state).is_none() {
            return Ok(());
        }
        // The refusal keeps the kind of the failure that ended the request: the sender fails it
        // as it would have on learning of that failure first.
        let why = self
            .requests
            .ended_because(request_id)
            .unwrap_or_else(|| Error::RequestFailed("it ended".into()));
        Err(Error::from_kind(
            why.kind(),
            &format!("request {request_id} has ended on node {}: {why}", self.id),
        ))
    }

    /// `state` with the request's context in it, whatever the engine did with it.
    fn keep_context(&self, request_id: &str, state: Option<InferenceState>) -> Option<InferenceState> {
        if state.as_ref().is_some_and(|s| s.other.contains_key(CONTEXT_KEY)) {
            return state;
        }
        match self.requests.with(request_id, |r| r.context.clone()).flatten() {
            Some(context) => context.attach(state),
            None => state,
        }
    }

    /// After this node's layers ran: on the last shard, sample and deliver the token; then
    /// send what comes next to the node holding the next layer (without waiting for it).
    async fn after_step(
        &self,
        shard: &Shard,
        output: WireTensor,
        request_id: &str,
        state: Option<InferenceState>,
    ) -> Result<()> {
        let forward = if shard.is_last_layer() {
            let Some((params, step, limit)) = self.sampling_plan(request_id) else { return Ok(()) };
            let finished = if step >= limit {
                None
            } else {
                let token = *self.engine.sample(&output, params).await?.first().ok_or_else(|| {
                    Error::InvalidTensor(format!("sampling request {request_id} gave no token"))
                })?;
                let eos = self.engine.eos_token_ids(shard).await?;
                let full = self.engine.context_room(shard, request_id).await == Some(0);
                let finished = eos.contains(&token) || step + 1 >= limit || full;
                self.deliver_token(request_id, token, finished);
                Some((token, finished))
            };
            match finished {
                Some((token, false)) => token_tensor(token),
                _ => {
                    self.end_request(request_id, None).await;
                    return Ok(());
                }
            }
        } else {
            output
        };
        self.requests.set_phase(request_id, Phase::Waiting);
        tokio::spawn(self.arc().forward_step(shard.clone(), forward, request_id.to_string(), state));
        Ok(())
    }

    /// Sampling parameters, tokens generated so far and the token limit of a request.
    fn sampling_plan(&self, request_id: &str) -> Option<(crate::engine::SamplingParams, usize, usize)> {
        let settings = self.settings();
        let (context, step) =
            self.requests.with(request_id, |r| (r.context.clone().unwrap_or_default(), r.generated.len()))?;
        let limit = context.max_tokens.unwrap_or(usize::MAX).min(settings.max_generate_tokens);
        Some((context.sampling(settings.default_temperature, step), step, limit))
    }

    /// Sends `tensor` to the node holding the layer after `shard`'s last; a failure fails
    /// the request everywhere.
    fn forward_step(
        self: Arc<Self>,
        shard: Shard,
        tensor: WireTensor,
        request_id: String,
        state: Option<InferenceState>,
    ) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let next_layer = (shard.end_layer + 1) % shard.n_layers;
            let target = self.layers_for(&request_id, &shard).map(|layers| {
                layers.into_iter().find(|(_, s)| s.start_layer <= next_layer && next_layer <= s.end_layer)
            });
            let outcome = match target {
                Err(e) => Err(e),
                Ok(None) => Err(Error::InvalidArgument(format!(
                    "no node holds layer {next_layer} of {}",
                    shard.model_id
                ))),
                Ok(Some((target, next))) if target == self.id => {
                    self.run_tensor(next, tensor, &request_id, state).await
                }
                Ok(Some((target, next))) => match self.next_peer(&request_id, &target).await {
                    None => {
                        Err(Error::Peer(format!("peer {target} holding layer {next_layer} is not connected")))
                    }
                    Some(peer) => {
                        let call = self.requests.hand_off(&request_id);
                        let state = state_for(peer.as_ref(), state);
                        let sent = peer.send_tensor(&next, tensor, &request_id, state).await;
                        drop(call);
                        if matches!(sent, Err(Error::Peer(_))) && !peer.health_check().await {
                            self.drop_peer(&target);
                        }
                        sent
                    }
                },
            };
            if let Err(e) = outcome {
                self.fail_request(&request_id, e).await;
            }
        })
    }

    /// The peer `target` that a step of `request_id` goes to. The request's origin sent this
    /// node work moments ago, so it is waited for until discovery finds it; any other peer
    /// missing now has left the ring.
    async fn next_peer(&self, request_id: &str, target: &str) -> Option<Arc<dyn PeerHandle>> {
        let to_origin = self.requests.with(request_id, |r| r.is_origin(target)).unwrap_or(false);
        let grace = if to_origin { DISCOVERY_GRACE } else { Duration::ZERO };
        discovered(|| self.peer(target), grace).await
    }

    /// Hands a token sampled here to the listeners: the origin at once, bystanders in
    /// batches, every peer at once when the origin is unknown (a classic node started it).
    fn deliver_token(&self, request_id: &str, token: u32, finished: bool) {
        let delivery = self.requests.with(request_id, |request| {
            request.generated.push(token);
            request.unsent.push(token);
            let flush = finished || request.last_flush.elapsed() >= BYSTANDER_INTERVAL;
            let batch = flush.then(|| {
                request.last_flush = Instant::now();
                std::mem::take(&mut request.unsent)
            });
            (request.context.as_ref().map(|c| c.origin.clone()), request.stream.clone(), batch)
        });
        let Some((origin, stream, batch)) = delivery else { return };
        self.emit(NodeEvent::Token {
            request_id: request_id.to_string(),
            tokens: vec![token],
            is_finished: finished,
        });
        if let Some(stream) = stream {
            let _ = stream.send(StreamEvent::Token(token));
            if finished {
                let _ = stream.send(StreamEvent::Finished);
            }
        }
        let Some(origin) = origin else {
            self.broadcast_result(request_id, &[token], finished);
            return;
        };
        let result = |tokens: Vec<u32>| Message::Result {
            request_id: request_id.to_string(),
            tokens,
            is_finished: finished,
        };
        if origin != self.id {
            self.outbox.send(&self.me, &origin, result(vec![token]));
        }
        if let Some(batch) = batch {
            for peer in self.peers().into_iter().map(|p| p.id()).filter(|id| *id != origin) {
                self.outbox.send(&self.me, &peer, result(batch.clone()));
            }
        }
    }

    /// Sends a status to every peer (not to the local listeners).
    fn notify_peers(&self, request_id: &str, status: &str) {
        for peer in self.peers() {
            let message = Message::Status { request_id: request_id.to_string(), status: status.to_string() };
            self.outbox.send(&self.me, &peer.id(), message);
        }
    }

    /// Fails a request here and tells every peer, so the origin reports it and all free it;
    /// the status names the error's kind, so the origin rebuilds an error of that kind.
    pub(super) async fn fail_request(&self, request_id: &str, error: Error) {
        if !self.requests.contains(request_id) && self.requests.has_ended(request_id) {
            return;
        }
        self.notify_peers(request_id, &failed_status(&self.id, request_id, &error).to_string());
        self.end_request(request_id, Some(error)).await;
    }

    /// Forgets a request here and frees its cache; with an error, its stream and the
    /// listeners learn why, and late messages for it are dropped.
    pub(super) async fn end_request(&self, request_id: &str, error: Option<Error>) {
        let request = self.requests.end(request_id, error.as_ref());
        if let Some(error) = error.map(Arc::new) {
            if let Some(stream) = request.as_ref().and_then(|r| r.stream.as_ref()) {
                let _ = stream.send(StreamEvent::Failed(error.clone()));
            }
            if request.is_some() {
                self.emit(NodeEvent::Failed { request_id: request_id.to_string(), error });
            }
        }
        self.engine.finish_request(request_id).await;
    }

    /// Ends a request a peer handed over when running it failed here, and returns the outcome
    /// to the peer with an error of the same kind.
    async fn end_failed(&self, request_id: &str, outcome: Result<()>) -> Result<()> {
        let Err(error) = outcome else { return Ok(()) };
        let returned = error.duplicate();
        self.end_request(request_id, Some(error)).await;
        Err(returned)
    }
}

#[async_trait]
impl RequestHandler for Node {
    async fn handle_prompt(
        &self,
        shard: Shard,
        prompt: String,
        request_id: Option<String>,
        state: Option<InferenceState>,
    ) -> Result<()> {
        let request_id = request_id.unwrap_or_else(new_request_id);
        if !self.requests.register(&request_id, RequestContext::from_state(state.as_ref())) {
            return self.refuse_ended(&request_id, state.as_ref()).await;
        }
        let outcome = self.run_prompt(&whole_model(&shard), Some(shard), &prompt, &request_id, state).await;
        self.end_failed(&request_id, outcome).await
    }

    async fn handle_tensor(
        &self,
        shard: Shard,
        tensor: WireTensor,
        request_id: Option<String>,
        state: Option<InferenceState>,
    ) -> Result<()> {
        let request_id = request_id.unwrap_or_else(new_request_id);
        let outcome = self.run_tensor(shard, tensor, &request_id, state).await;
        self.end_failed(&request_id, outcome).await
    }

    async fn handle_example(
        &self,
        shard: Shard,
        example: Example,
        train: bool,
        request_id: Option<String>,
    ) -> Result<ExampleLoss> {
        let request_id = request_id.unwrap_or_else(new_request_id);
        self.process_example(&shard, example, train, &request_id).await
    }

    async fn handle_result(&self, request_id: String, tokens: Vec<u32>, is_finished: bool) {
        let stream = self
            .requests
            .with(&request_id, |r| {
                r.last_active = Instant::now();
                r.stream.clone()
            })
            .flatten();
        if let Some(stream) = stream {
            for &token in &tokens {
                let _ = stream.send(StreamEvent::Token(token));
            }
            if is_finished {
                let _ = stream.send(StreamEvent::Finished);
            }
        }
        self.emit(NodeEvent::Token { request_id: request_id.clone(), tokens, is_finished });
        if is_finished {
            self.end_request(&request_id, None).await;
        }
    }

    async fn handle_opaque_status(&self, request_id: String, status: String) {
        // A node telling about a request is working on it.
        self.requests.touch(&request_id);
        let message: serde_json::Value = serde_json::from_str(&status).unwrap_or_default();
        let field = |name: &str| message.get(name).and_then(|v| v.as_str()).unwrap_or_default().to_string();
        match field("type").as_str() {
            "request_failed" => {
                self.end_request(&request_id, Some(failure_from_status(&message))).await;
            }
            "request_cancelled" => {
                let error = format!("request {request_id} was cancelled by node {}", field("node_id"));
                self.end_request(&request_id, Some(Error::RequestFailed(error))).await;
            }
            _ => {}
        }
        self.observe_status(&request_id, &status);
    }

    async fn handle_collect_topology(&self, visited: BTreeSet<String>, max_depth: i32) -> Result<Topology> {
        Ok(self.walk_topology(visited, max_depth).await)
    }

    fn engine_name(&self) -> Option<String> {
        Some(self.engine.name().to_string())
    }
}
