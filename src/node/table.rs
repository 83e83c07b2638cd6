//! The request table: the requests a node is running and the ones that ended badly, under one
//! lock, so a late message for an ended request never brings it back.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::request::{Phase, Request, RequestContext};
use crate::error::Error;

/// The requests known here, by id.
#[derive(Default)]
pub struct RequestTable {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    running: HashMap<String, Request>,
    /// Cancelled or failed requests, when and why they ended, so late messages for them are
    /// refused.
    ended: HashMap<String, Ended>,
}

/// A request that was cancelled or failed here.
struct Ended {
    at: Instant,
    /// The failure's kind ([`Error::kind`]) and text.
    kind: &'static str,
    why: String,
}

/// What `GET /v1/requests` shows of a running request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestSummary {
    /// The request's id.
    pub request_id: String,
    /// Where it stands here (`processing` or `waiting`).
    pub phase: &'static str,
    /// The node that started it, when known.
    pub origin: Option<String>,
    /// Tokens sampled here so far.
    pub tokens: usize,
    /// The nodes it runs on, in ring order, when this node planned it.
    pub nodes: Vec<String>,
}

impl RequestTable {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("request table lock poisoned")
    }

    /// Whether `request_id` is running here.
    pub fn contains(&self, request_id: &str) -> bool {
        self.state().running.contains_key(request_id)
    }

    /// Whether `request_id` was cancelled or failed here.
    pub fn has_ended(&self, request_id: &str) -> bool {
        self.state().ended.contains_key(request_id)
    }

    /// Why `request_id` was cancelled or failed here, if it was.
    pub fn ended_because(&self, request_id: &str) -> Option<Error> {
        self.state().ended.get(request_id).map(|ended| Error::from_kind(ended.kind, &ended.why))
    }

    /// Records a request started here, replacing any earlier record under its id.
    pub fn start(&self, request_id: &str, request: Request) {
        let mut state = self.state();
        state.ended.remove(request_id);
        state.running.insert(request_id.to_string(), request);
    }

    /// Records a request arriving from a peer, keeping `context` unless it has one already;
    /// false when the request already ended here.
    pub fn register(&self, request_id: &str, context: Option<RequestContext>) -> bool {
        let mut state = self.state();
        if state.ended.contains_key(request_id) {
            return false;
        }
        let request = state.running.entry(request_id.to_string()).or_insert_with(|| Request::new(None));
        if request.context.is_none() {
            request.context = context;
        }
        request.last_active = Instant::now();
        true
    }

    /// Runs `change` on a running request; `None` when it is not running here.
    pub fn with<R>(&self, request_id: &str, change: impl FnOnce(&mut Request) -> R) -> Option<R> {
        self.state().running.get_mut(request_id).map(change)
    }

    /// Marks where a request stands here, as of now.
    pub fn set_phase(&self, request_id: &str, phase: Phase) {
        self.with(request_id, |request| {
            request.phase = phase;
            request.last_active = Instant::now();
        });
    }

    /// Records that a request made progress here now (a token or status arrived for it).
    pub fn touch(&self, request_id: &str) {
        self.with(request_id, |request| request.last_active = Instant::now());
    }

    /// Counts a call handing `request_id` to the next node as open until the guard drops; the
    /// call's answer counts as progress.
    pub fn hand_off(&self, request_id: &str) -> HandOff<'_> {
        self.with(request_id, |request| request.handed_off += 1);
        HandOff { table: self, request_id: request_id.to_string() }
    }

    /// Requests started by `node_id` that wait on other nodes with no call to them open and
    /// made no progress for longer than `deadline`, with the nodes each runs on.
    pub fn stalled(&self, node_id: &str, deadline: Duration) -> Vec<(String, Vec<String>)> {
        let state = self.state();
        let stalled = state.running.iter().filter(|(_, r)| {
            r.is_origin(node_id)
                && r.phase == Phase::Waiting
                && r.handed_off == 0
                && r.last_active.elapsed() > deadline
        });
        stalled.map(|(id, r)| (id.clone(), r.members.clone())).collect()
    }

    /// Takes a request out of the table; one that `failed` is remembered as ended, with its
    /// failure. A request restarted under the same id (`start`) forgets its earlier end.
    pub fn end(&self, request_id: &str, failed: Option<&Error>) -> Option<Request> {
        let mut state = self.state();
        if let Some(error) = failed {
            // The first reason stays: a refusal of a late step names the failure behind it.
            let (kind, why) = (error.kind(), error.to_string());
            state.ended.entry(request_id.to_string()).or_insert(Ended { at: Instant::now(), kind, why });
        }
        state.running.remove(request_id)
    }

    /// The ids of the running requests.
    pub fn ids(&self) -> Vec<String> {
        self.state().running.keys().cloned().collect()
    }

    /// The running requests' ids and where each stands.
    pub fn outstanding(&self) -> Vec<(String, &'static str)> {
        self.state().running.iter().map(|(id, r)| (id.clone(), r.phase.as_str())).collect()
    }

    /// The running requests, as `GET /v1/requests` shows them, ordered by id.
    pub fn summaries(&self) -> Vec<RequestSummary> {
        let state = self.state();
        let mut summaries: Vec<RequestSummary> = state
            .running
            .iter()
            .map(|(id, r)| RequestSummary {
                request_id: id.clone(),
                phase: r.phase.as_str(),
                origin: r.context.as_ref().map(|c| c.origin.clone()),
                tokens: r.generated.len(),
                nodes: r.members.clone(),
            })
            .collect();
        summaries.sort_by(|a, b| a.request_id.cmp(&b.request_id));
        summaries
    }

    /// Requests started by another node than `node_id` whose origin `is_present` no longer
    /// finds, idle for longer than `grace` (the origin may not have been discovered yet).
    pub fn orphaned(
        &self,
        node_id: &str,
        is_present: impl Fn(&str) -> bool,
        grace: Duration,
    ) -> Vec<(String, String)> {
        let state = self.state();
        let orphans = state.running.iter().filter_map(|(id, r)| {
            let origin = &r.context.as_ref()?.origin;
            let orphaned = origin != node_id && !is_present(origin) && r.last_active.elapsed() > grace;
            orphaned.then(|| (id.clone(), origin.clone()))
        });
        orphans.collect()
    }

    /// The other nodes that requests started by `node_id` run on.
    pub fn members_of_started(&self, node_id: &str) -> BTreeSet<String> {
        let state = self.state();
        let started = state.running.values().filter(|r| r.is_origin(node_id));
        started.flat_map(|r| r.members.iter().cloned()).filter(|id| id != node_id).collect()
    }

    /// The requests that run on `node_id`.
    pub fn running_on(&self, node_id: &str) -> Vec<String> {
        let state = self.state();
        let on = state.running.iter().filter(|(_, r)| r.members.iter().any(|m| m == node_id));
        on.map(|(id, _)| id.clone()).collect()
    }

    /// The requests that made no progress for `idle`.
    pub fn idle_for(&self, idle: Duration) -> Vec<String> {
        let state = self.state();
        let stalled = state.running.iter().filter(|(_, r)| r.last_active.elapsed() > idle);
        stalled.map(|(id, _)| id.clone()).collect()
    }

    /// Forgets the ended requests older than `age`.
    pub fn forget_ended(&self, age: Duration) {
        self.state().ended.retain(|_, ended| ended.at.elapsed() < age);
    }
}

/// An open call handing a request to the next node (see [`RequestTable::hand_off`]).
pub struct HandOff<'a> {
    table: &'a RequestTable,
    request_id: String,
}

impl Drop for HandOff<'_> {
    fn drop(&mut self) {
        self.table.with(&self.request_id, |request| {
            request.handed_off = request.handed_off.saturating_sub(1);
            request.last_active = Instant::now();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ended_request_is_not_registered_again_until_restarted() {
        let table = RequestTable::default();
        assert!(table.register("r", None));
        assert_eq!(table.outstanding(), [("r".to_string(), "processing")]);
        let cancelled = Error::RequestFailed("it was cancelled".into());
        assert!(table.end("r", Some(&cancelled)).is_some());
        assert!(table.has_ended("r") && !table.contains("r"));
        let why = table.ended_because("r").expect("it ended");
        assert_eq!((why.kind(), why.to_string()), (cancelled.kind(), cancelled.to_string()));
        assert!(!table.register("r", None));
        table.start("r", Request::new(None));
        assert!(!table.has_ended("r") && table.contains("r"));
        table.forget_ended(Duration::ZERO);
        assert!(table.end("r", None).is_some() && !table.has_ended("r"));
    }

    #[test]
    fn members_and_idle_requests_are_found() {
        let table = RequestTable::default();
        let context = RequestContext { origin: "a".into(), ..Default::default() };
        let mut started = Request::new(Some(context));
        started.members = vec!["a".into(), "b".into()];
        table.start("mine", started);
        assert!(table.register("theirs", None));
        assert_eq!(table.members_of_started("a"), BTreeSet::from(["b".to_string()]));
        assert_eq!(table.running_on("b"), ["mine"]);
        table.set_phase("theirs", Phase::Waiting);
        assert_eq!(table.with("theirs", |r| r.phase), Some(Phase::Waiting));
        assert!(table.idle_for(Duration::from_secs(60)).is_empty());
        let mut idle = table.idle_for(Duration::ZERO);
        idle.sort();
        assert_eq!(idle, ["mine", "theirs"]);
    }

    #[test]
    fn a_waiting_request_with_no_open_call_stalls_after_the_deadline() {
        let table = RequestTable::default();
        let mut started = Request::new(Some(RequestContext { origin: "a".into(), ..Default::default() }));
        started.members = vec!["a".into(), "b".into()];
        table.start("mine", started);
        assert!(table.register("theirs", None));
        table.set_phase("theirs", Phase::Waiting);
        // Running its own layers, the origin is not stalled.
        assert!(table.stalled("a", Duration::ZERO).is_empty());
        table.set_phase("mine", Phase::Waiting);
        assert_eq!(table.stalled("a", Duration::ZERO), [("mine".to_string(), vec!["a".into(), "b".into()])]);
        assert!(table.stalled("a", Duration::from_secs(60)).is_empty(), "progress was just made");
        let call = table.hand_off("mine");
        assert!(table.stalled("a", Duration::ZERO).is_empty(), "the next node has the request");
        drop(call);
        assert_eq!(table.with("mine", |r| r.handed_off), Some(0));
        assert!(table.stalled("a", Duration::from_secs(60)).is_empty(), "the answer counts as progress");
        assert_eq!(table.stalled("a", Duration::ZERO).len(), 1);
    }

    #[test]
    fn summaries_show_each_running_request() {
        let table = RequestTable::default();
        let mut started = Request::new(Some(RequestContext { origin: "a".into(), ..Default::default() }));
        started.members = vec!["a".into(), "b".into()];
        started.generated = vec![5, 6];
        table.start("r2", started);
        assert!(table.register("r1", None));
        let summaries = table.summaries();
        assert_eq!(summaries.len(), 2);
        assert_eq!(
            summaries[0],
            RequestSummary {
                request_id: "r1".into(),
                phase: "processing",
                origin: None,
                tokens: 0,
                nodes: vec![],
            }
        );
        assert_eq!((summaries[1].origin.as_deref(), summaries[1].tokens), (Some("a"), 2));
        assert_eq!(summaries[1].nodes, ["a", "b"]);
    }

    #[test]
    fn a_request_whose_origin_is_gone_is_orphaned_after_the_grace() {
        let table = RequestTable::default();
        assert!(table.register("theirs", Some(RequestContext { origin: "b".into(), ..Default::default() })));
        assert!(table.register("unknown", None));
        table.start("mine", Request::new(Some(RequestContext { origin: "a".into(), ..Default::default() })));
        let orphans = |present: bool, grace| table.orphaned("a", |_| present, grace);
        assert!(orphans(true, Duration::ZERO).is_empty(), "its origin is still there");
        assert!(orphans(false, Duration::from_secs(60)).is_empty(), "within the grace");
        assert_eq!(orphans(false, Duration::ZERO), [("theirs".to_string(), "b".to_string())]);
    }
}
