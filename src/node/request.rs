//! What a node keeps per request, what travels with it between nodes, and what it tells
//! its listeners.

use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::engine::{InferenceState, SamplingParams};
use crate::error::{Error, Result};
use crate::shard::Shard;

/// Key of the request context in `inference_state.other_data_json`. Classic nodes pass
/// unknown keys through untouched, so the context survives a ring with classic peers in it.
pub const CONTEXT_KEY: &str = "xot_request";

/// Per-request settings chosen by the node that started the request, carried to every node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RequestContext {
    /// Node whose listeners want the tokens.
    pub origin: String,
    /// Most tokens to generate (the node's own limit applies too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<usize>,
    /// Sampling temperature; the sampling node's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// Nucleus mass to keep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    /// Most likely tokens to keep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<usize>,
    /// Seed of the sampler; step `i` samples with `seed + i`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// The layers each node runs, in ring order, when the origin balanced them; when absent
    /// every node derives them from its own partitions, as classic nodes do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers: Option<Vec<LayerRange>>,
}

/// The layers one node runs in a request's plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerRange {
    /// The node.
    pub node_id: String,
    /// Its first layer.
    pub start_layer: i32,
    /// Its last layer.
    pub end_layer: i32,
}

/// The shards of `base`'s model that a plan gives its nodes, in ring order; an error unless the
/// plan holds every layer exactly once, in order, on distinct named nodes.
pub fn planned_shards(plan: &[LayerRange], base: &Shard) -> Result<Vec<(String, Shard)>> {
    let invalid = |why: String| Error::InvalidArgument(format!("the request's layer plan {why}"));
    let mut next = 0;
    let mut shards: Vec<(String, Shard)> = Vec::with_capacity(plan.len());
    for range in plan {
        if range.node_id.is_empty() || shards.iter().any(|(id, _)| *id == range.node_id) {
            return Err(invalid(format!("names node {:?} twice or not at all", range.node_id)));
        }
        if range.start_layer != next || range.end_layer < range.start_layer {
            return Err(invalid(format!(
                "gives {} layers {}..={} where layer {next} comes next",
                range.node_id, range.start_layer, range.end_layer
            )));
        }
        next = range.end_layer + 1;
        let shard = Shard::new(base.model_id.clone(), range.start_layer, range.end_layer, base.n_layers);
        shards.push((range.node_id.clone(), shard));
    }
    if next != base.n_layers {
        return Err(invalid(format!("ends at layer {next}, not at {} of {}", base.n_layers, base.model_id)));
    }
    Ok(shards)
}

impl RequestContext {
    /// The context carried in `state`, if any (a malformed one counts as absent).
    pub fn from_state(state: Option<&InferenceState>) -> Option<Self> {
        let value = state?.other.get(CONTEXT_KEY)?;
        serde_json::from_value(value.clone()).ok()
    }

    /// `state` with this context in it.
    pub fn attach(&self, state: Option<InferenceState>) -> Option<InferenceState> {
        let mut state = state.unwrap_or_default();
        let value = serde_json::to_value(self).expect("a context always serializes");
        state.other.insert(CONTEXT_KEY.to_string(), value);
        Some(state)
    }

    /// Sampling parameters for generation step `step`, falling back to `default_temperature`.
    pub fn sampling(&self, default_temperature: f32, step: usize) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature.unwrap_or(default_temperature),
            top_p: self.top_p.unwrap_or(1.0),
            top_k: self.top_k.unwrap_or(0),
            seed: self.seed.map(|s| s.wrapping_add(step as u64)),
        }
    }
}

/// The `request_failed` status a node sends every peer when a request fails there: the
/// error's text and its kind, so the origin fails the request with an error of that kind.
pub fn failed_status(node_id: &str, request_id: &str, error: &Error) -> serde_json::Value {
    serde_json::json!({
        "type": "request_failed",
        "node_id": node_id,
        "request_id": request_id,
        "error": error.to_string(),
        "kind": error.kind(),
    })
}

/// The error a `request_failed` status reports, naming the node it failed on; a status without
/// a kind (from a node that predates kinds) reports a failed request.
pub fn failure_from_status(status: &serde_json::Value) -> Error {
    let field = |name: &str| status.get(name).and_then(|v| v.as_str()).unwrap_or_default();
    let kind = Some(field("kind")).filter(|k| !k.is_empty()).unwrap_or("request_failed");
    Error::from_kind(kind, &format!("{} (on node {})", field("error"), field("node_id")))
}

/// What the node tells its listeners (the Python callbacks, the TUI).
#[derive(Debug, Clone)]
pub enum NodeEvent {
    /// New tokens of a request (usually one); `is_finished` on the last delivery.
    Token { request_id: String, tokens: Vec<u32>, is_finished: bool },
    /// A JSON status message, sent by this node or received from a peer.
    Status { request_id: String, status: String },
    /// A request failed or was cancelled somewhere in the ring; the error keeps the kind it
    /// had where it was raised.
    Failed { request_id: String, error: Arc<Error> },
}

/// What a request's own stream receives on the node that started it.
#[derive(Debug, Clone)]
pub enum StreamEvent {
    /// The next generated token.
    Token(u32),
    /// Generation ended normally (EOS or the token limit).
    Finished,
    /// The request failed; the error says where and why, with the kind it was raised with.
    Failed(Arc<Error>),
}

/// Where a request stands on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Running this node's layers.
    Processing,
    /// Waiting for another node.
    Waiting,
}

impl Phase {
    /// exo classic's word for it in `outstanding_requests`.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Processing => "processing",
            Phase::Waiting => "waiting",
        }
    }
}

/// A request as this node knows it.
#[derive(Debug)]
pub struct Request {
    /// Settings from the origin; absent for requests started by classic nodes.
    pub context: Option<RequestContext>,
    /// Where it stands here.
    pub phase: Phase,
    /// Tokens sampled here (only the node with the last layer samples).
    pub generated: Vec<u32>,
    /// Tokens sampled here and not yet sent to bystanders (peers that only display them).
    pub unsent: Vec<u32>,
    /// When bystanders were last sent tokens.
    pub last_flush: Instant,
    /// When the request last made progress here.
    pub last_active: Instant,
    /// Calls handing the request to the next node that are open now: that node runs its layers
    /// while its call is open, so the progress deadline waits for the call.
    pub handed_off: usize,
    /// On the origin: the request's token stream, if someone listens to it.
    pub stream: Option<mpsc::UnboundedSender<StreamEvent>>,
    /// On the origin: the nodes of the ring when it started, watched for failures.
    pub members: Vec<String>,
}

impl Request {
    /// A request first seen here, with what its state says about it.
    pub fn new(context: Option<RequestContext>) -> Self {
        let now = Instant::now();
        Self {
            context,
            phase: Phase::Processing,
            generated: Vec::new(),
            unsent: Vec::new(),
            last_flush: now,
            last_active: now,
            handed_off: 0,
            stream: None,
            members: Vec::new(),
        }
    }

    /// Whether this node started the request.
    pub fn is_origin(&self, node_id: &str) -> bool {
        self.context.as_ref().is_some_and(|c| c.origin == node_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_round_trips_through_state_json() {
        let context =
            RequestContext { origin: "a".into(), max_tokens: Some(5), seed: Some(7), ..Default::default() };
        let state = context.attach(None);
        assert_eq!(RequestContext::from_state(state.as_ref()), Some(context.clone()));
        let params = context.sampling(0.5, 3);
        assert_eq!((params.temperature, params.top_p, params.top_k, params.seed), (0.5, 1.0, 0, Some(10)));
    }

    fn range(node_id: &str, start_layer: i32, end_layer: i32) -> LayerRange {
        LayerRange { node_id: node_id.into(), start_layer, end_layer }
    }

    #[test]
    fn a_plan_travels_with_the_context_and_must_hold_every_layer_once() {
        let plan = vec![range("a", 0, 5), range("b", 6, 7)];
        let context = RequestContext { origin: "a".into(), layers: Some(plan.clone()), ..Default::default() };
        assert_eq!(RequestContext::from_state(context.attach(None).as_ref()), Some(context));
        let base = Shard::new("m", 0, 7, 8);
        let shards = planned_shards(&plan, &base).unwrap();
        assert_eq!(shards, [("a".into(), Shard::new("m", 0, 5, 8)), ("b".into(), Shard::new("m", 6, 7, 8))]);
        let bad = [
            (vec![range("a", 0, 5)], "ends at layer 6, not at 8"),
            (vec![range("a", 0, 5), range("b", 5, 7)], "layers 5..=7 where layer 6 comes next"),
            (vec![range("a", 0, 3), range("a", 4, 7)], "names node \"a\" twice"),
            (vec![range("a", 0, 3), range("b", 4, 2)], "layers 4..=2"),
            (vec![range("", 0, 7)], "not at all"),
        ];
        for (plan, why) in bad {
            let error = planned_shards(&plan, &base).unwrap_err().to_string();
            assert!(error.contains("layer plan") && error.contains(why), "{error}");
        }
    }

    #[test]
    fn a_failure_keeps_its_kind_through_the_status_json() {
        let error = Error::ContextOverflow("40 tokens exceed the context of 8 tokens".into());
        let wire = failed_status("b", "r", &error).to_string();
        let status: serde_json::Value = serde_json::from_str(&wire).unwrap();
        assert_eq!(status["type"], "request_failed");
        assert_eq!(status["request_id"], "r");
        assert_eq!(status["kind"], "context_length_exceeded");
        assert_eq!(status["error"], "context overflow: 40 tokens exceed the context of 8 tokens");
        let rebuilt = failure_from_status(&status);
        assert!(matches!(rebuilt, Error::ContextOverflow(_)), "{rebuilt:?}");
        assert_eq!(
            rebuilt.to_string(),
            "context overflow: 40 tokens exceed the context of 8 tokens (on node b)"
        );
        let evicted = failure_from_status(&failed_status("c", "r", &Error::CacheEvicted("r".into())));
        assert!(matches!(evicted, Error::CacheEvicted(_)), "{evicted:?}");
    }

    #[test]
    fn a_failure_without_a_kind_is_a_failed_request() {
        let status = serde_json::json!({"type": "request_failed", "node_id": "b", "error": "boom"});
        let error = failure_from_status(&status);
        assert!(matches!(error, Error::RequestFailed(_)), "{error:?}");
        assert_eq!(error.to_string(), "request failed: boom (on node b)");
    }

    #[test]
    fn malformed_context_counts_as_absent() {
        let mut state = InferenceState::default();
        state.other.insert(CONTEXT_KEY.into(), serde_json::json!({"origin": 3}));
        assert_eq!(RequestContext::from_state(Some(&state)), None);
        assert_eq!(RequestContext::from_state(None), None);
    }
}
