//! The node: holds its peers and the cluster topology, runs its shard of every request,
//! forwards hidden states and tokens around the ring, and delivers tokens to listeners.
//! Lifecycle and cluster membership live here; the request path lives in `ring`, the node's
//! state in owned parts: `membership` (peers, topology, partitions) and `table` (requests).

mod examples;
mod membership;
mod outbox;
mod placement;
mod request;
mod ring;
mod table;

pub use request::{LayerRange, NodeEvent, RequestContext, StreamEvent, CONTEXT_KEY};
pub use table::RequestSummary;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::net::{Discovery, PeerHandle, Server};
use crate::shard::Shard;
use crate::tensor::WireTensor;
use crate::topology::{
    assign_layers, balance_layers, DeviceCapabilities, MemoryFit, ModelCosts, Partition,
    PartitioningStrategy, Topology,
};
use membership::{Membership, DISCOVERY_GRACE};
use outbox::{Message, Outbox, PeerLookup};
use placement::Placement;
use request::planned_shards;
use table::RequestTable;

/// How often peers and the topology are refreshed (classic: 2 s).
const TOPOLOGY_INTERVAL: Duration = Duration::from_secs(2);
/// How often the peers of running requests are health-checked.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);
/// How long connecting to a new peer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one peer's part of a topology walk may take (classic: 5 s).
const COLLECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests idle this long are forgotten (their messages were lost).
const IDLE_REQUEST: Duration = Duration::from_secs(600);

/// Default of [`NodeSettings::progress_deadline`]: a decode step of a large model on a slow
/// CPU takes seconds, so a minute without any sign of progress means the request was lost.
pub const PROGRESS_DEADLINE: Duration = Duration::from_secs(60);
/// Default of [`NodeSettings::loading_grace`]: exo classic's tinygrad engine loads a 1B model
/// in about 20 s on a 2-core CPU with its event loop blocked; larger models and slower disks
/// take a few times that.
pub const LOADING_GRACE: Duration = Duration::from_secs(120);

/// Settings callers may change while the node runs.
#[derive(Debug, Clone, Copy)]
pub struct NodeSettings {
    /// Most tokens any request generates (classic's `max_generate_tokens`).
    pub max_generate_tokens: usize,
    /// Sampling temperature for requests that name none.
    pub default_temperature: f32,
    /// How long a request started here may wait on other nodes with no sign of progress (a
    /// token, a status of it, an answer from the next node) before it fails as stalled.
    pub progress_deadline: Duration,
    /// How long after a sign that a peer may be loading a model (a request starting, its
    /// download progress) the peer may not answer before it counts as dead; requests waiting on
    /// it wait as long.
    pub loading_grace: Duration,
}

impl Default for NodeSettings {
    fn default() -> Self {
        Self {
            max_generate_tokens: 1024,
            default_temperature: 0.0,
            progress_deadline: PROGRESS_DEADLINE,
            loading_grace: LOADING_GRACE,
        }
    }
}

/// The layers one node holds of a model, and the bytes they need there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeLayers {
    /// The node.
    pub node_id: String,
    /// Its first layer.
    pub start_layer: i32,
    /// Its last layer.
    pub end_layer: i32,
    /// Bytes its layers, their KV caches and the embedding or head it holds need; `None` when
    /// the engine cannot tell.
    pub memory: Option<u64>,
}

/// Options of one `generate` call; `None` falls back to the node's settings.
#[derive(Debug, Clone, Default)]
pub struct GenerateOptions {
    /// Most tokens to generate.
    pub max_tokens: Option<usize>,
    /// Sampling temperature.
    pub temperature: Option<f32>,
    /// Nucleus mass to keep.
    pub top_p: Option<f32>,
    /// Most likely tokens to keep.
    pub top_k: Option<usize>,
    /// Seed for reproducible sampling.
    pub seed: Option<u64>,
    /// The prompt's images for the first shard, as [`crate::engine::IMAGES_KEY`] holds them.
    pub images: Option<WireTensor>,
}

/// A cluster node. Always held in an `Arc`; background tasks hold it weakly.
pub struct Node {
    id: String,
    me: Weak<Node>,
    engine: Arc<dyn Engine>,
    discovery: Arc<dyn Discovery>,
    server: Mutex<Option<Arc<dyn Server>>>,
    settings: RwLock<NodeSettings>,
    capabilities: RwLock<DeviceCapabilities>,
    /// Whether the capabilities were set by the caller, so start does not detect them.
    capabilities_given: std::sync::atomic::AtomicBool,
    /// Peers, topology and partitions.
    membership: Membership,
    /// Running requests and the ones that ended badly.
    requests: RequestTable,
    listeners: Mutex<Vec<mpsc::UnboundedSender<NodeEvent>>>,
    /// Steps enter the engine first come first served, as many at once as it takes (an engine
    /// that batches runs concurrent requests' steps as one pass; others take one at a time,
    /// and requests that do not share the engine move on to the next node in turn).
    compute: tokio::sync::Semaphore,
    outbox: Outbox,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl PeerLookup for Node {
    fn peer(&self, id: &str) -> Option<Arc<dyn PeerHandle>> {
        self.membership.peer(id)
    }
}

impl Node {
    /// A stopped node; `start` brings it up.
    pub fn new(
        id: impl Into<String>,
        engine: Arc<dyn Engine>,
        discovery: Arc<dyn Discovery>,
        strategy: Arc<dyn PartitioningStrategy>,
        settings: NodeSettings,
    ) -> Arc<Self> {
        let id = id.into();
        let steps = engine.concurrent_steps().max(1);
        Arc::new_cyclic(|me| Self {
            membership: Membership::new(&id, strategy),
            id,
            me: me.clone(),
            engine,
            discovery,
            server: Mutex::new(None),
            settings: RwLock::new(settings),
            capabilities: RwLock::new(DeviceCapabilities::unknown()),
            capabilities_given: std::sync::atomic::AtomicBool::new(false),
            requests: RequestTable::default(),
            listeners: Mutex::new(Vec::new()),
            compute: tokio::sync::Semaphore::new(steps),
            outbox: Outbox::new(),
            tasks: Mutex::new(Vec::new()),
        })
    }

    fn arc(&self) -> Arc<Self> {
        self.me.upgrade().expect("a node is only used through its Arc")
    }

    /// This node's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The engine running this node's layers.
    pub fn engine(&self) -> &Arc<dyn Engine> {
        &self.engine
    }

    /// Sets the server started and stopped with the node.
    pub fn set_server(&self, server: Arc<dyn Server>) {
        *self.server.lock().expect("server lock poisoned") = Some(server);
    }

    /// The current settings.
    pub fn settings(&self) -> NodeSettings {
        *self.settings.read().expect("settings lock poisoned")
    }

    /// Replaces the settings; running requests pick them up on their next step.
    pub fn set_settings(&self, settings: NodeSettings) {
        *self.settings.write().expect("settings lock poisoned") = settings;
    }

    /// This node's device, as detected at start.
    pub fn device_capabilities(&self) -> DeviceCapabilities {
        self.capabilities.read().expect("capabilities lock poisoned").clone()
    }

    /// Sets this node's device instead of detecting it at start (e.g. memory 0 for a node
    /// that should hold no layers).
    pub fn set_device_capabilities(&self, capabilities: DeviceCapabilities) {
        self.capabilities_given.store(true, std::sync::atomic::Ordering::SeqCst);
        self.apply_capabilities(capabilities);
    }

    fn apply_capabilities(&self, capabilities: DeviceCapabilities) {
        *self.capabilities.write().expect("capabilities lock poisoned") = capabilities.clone();
        self.membership.update_node(&self.id, capabilities);
    }

    /// The peers in use now.
    pub fn peers(&self) -> Vec<Arc<dyn PeerHandle>> {
        self.membership.peers()
    }

    /// The cluster as last collected.
    pub fn topology(&self) -> Topology {
        self.membership.topology()
    }

    /// The engines the cluster's nodes run, as far as they are known: this node's first, then
    /// each other one named by a xotorch-core peer.
    pub fn engines(&self) -> Vec<String> {
        let mut engines = vec![self.engine.name().to_string()];
        for engine in self.peers().iter().filter_map(|peer| peer.engine()) {
            if !engines.contains(&engine) {
                engines.push(engine);
            }
        }
        engines
    }

    /// The partitions of the current topology, in ring order.
    pub fn partitions(&self) -> Vec<Partition> {
        self.membership.partitions()
    }

    /// Request ids active here and where each stands (`processing` or `waiting`).
    pub fn outstanding_requests(&self) -> Vec<(String, &'static str)> {
        self.requests.outstanding()
    }

    /// The requests running here now, with their origin, tokens and nodes, ordered by id.
    pub fn running_requests(&self) -> Vec<RequestSummary> {
        self.requests.summaries()
    }

    /// A channel of everything this node tells its listeners, from now on.
    pub fn subscribe(&self) -> mpsc::UnboundedReceiver<NodeEvent> {
        let (sender, receiver) = mpsc::unbounded_channel();
        self.listeners.lock().expect("listeners lock poisoned").push(sender);
        receiver
    }

    fn emit(&self, event: NodeEvent) {
        self.listeners.lock().expect("listeners lock poisoned").retain(|l| l.send(event.clone()).is_ok());
    }

    /// Index of this node's partition, moved `offset` places round the ring.
    pub fn get_partition_index(&self, offset: usize) -> Result<usize> {
        let partitions = self.partitions();
        let index = partitions
            .iter()
            .position(|p| p.node_id == self.id)
            .ok_or_else(|| Error::InvalidArgument(format!("no partition holds node {}", self.id)))?;
        Ok((index + offset) % partitions.len())
    }

    /// The shard of `base`'s model that partition `index` (this node's by default) holds.
    pub fn get_current_shard(&self, base: &Shard, index: Option<usize>) -> Result<Shard> {
        let index = match index {
            Some(index) => index,
            None => self.get_partition_index(0)?,
        };
        let partitions = self.partitions();
        let shards = crate::topology::map_partitions_to_shards(&partitions, base.n_layers, &base.model_id);
        shards.get(index).cloned().ok_or_else(|| {
            Error::InvalidArgument(format!(
                "partition {index} holds no layers of {} ({} shards for {} layers)",
                base.model_id,
                shards.len(),
                base.n_layers
            ))
        })
    }

    /// Every node holding layers of `base`'s model, with its shard, in ring order.
    fn assignments(&self, base: &Shard) -> Vec<(String, Shard)> {
        let partitions = self.partitions();
        assign_layers(&partitions, base.n_layers, &base.model_id)
            .into_iter()
            .map(|(id, shard)| (id.to_string(), shard))
            .collect()
    }

    /// The layers of a request started here, balanced by what `base`'s layers and LM head
    /// cost per token and kept within every node's memory, when the strategy allows it, the
    /// engine knows the costs or the memory, and every other node of the ring is a
    /// xotorch-core peer (they follow the plan the request carries). `None` leaves the request
    /// to classic's partition, which classic nodes derive for themselves. Either way, a model
    /// whose layers do not fit the nodes' memory is refused (`Error::InsufficientMemory`).
    /// Where the nodes' engines differ, the plan holds only the nodes that can run the model
    /// (`placement`).
    async fn balanced_plan(&self, base: &Shard) -> Result<Option<Vec<LayerRange>>> {
        let ring = self.partitions();
        let peers = self.peers();
        let follows_plans = |id: &str| peers.iter().any(|peer| peer.id() == id && peer.runs_xotorch_core());
        let engine_of = |id: &str| match id == self.id {
            true => Some(self.engine.name().to_string()),
            false => peers.iter().find(|peer| peer.id() == id).and_then(|peer| peer.engine()),
        };
        let (partitions, must_plan) = match placement::place(&ring, engine_of, &base.model_id)? {
            Placement::Ring => (ring, false),
            Placement::Whole(node_id) => {
                let whole = LayerRange { node_id, start_layer: 0, end_layer: base.n_layers - 1 };
                return Ok(Some(vec![whole]));
            }
            Placement::Among(kept) => {
                if let Some(classic) =
                    ring.iter().find(|p| p.node_id != self.id && !follows_plans(&p.node_id))
                {
                    return Err(Error::InvalidModel(format!(
                        "some nodes' engines cannot run {}, and the classic peer {} cannot follow a plan that \
                         leaves them out",
                        base.model_id, classic.node_id
                    )));
                }
                (kept, true)
            }
        };
        let fit = self.memory_fit(base, &partitions).await;
        let balancing = self.membership.strategy().allows_balancing()
            && partitions.len() >= 2
            && partitions.iter().all(|p| p.node_id == self.id || follows_plans(&p.node_id));
        let costs = if balancing { self.engine.model_costs(base).await } else { None };
        if !balancing || (costs.is_none() && fit.is_none()) {
            let layers = assign_layers(&partitions, base.n_layers, &base.model_id);
            if let Some(fit) = &fit {
                let ids: Vec<&str> = partitions.iter().map(|p| p.node_id.as_str()).collect();
                fit.check(&ids, &layers)?;
            }
            return Ok(must_plan.then(|| plan_of(layers)));
        }
        // Without costs, the memory alone shapes the split (balancing counts layers alike).
        let costs = costs.unwrap_or(ModelCosts { layer: f64::NAN, head: 0.0 });
        let balanced = balance_layers(&partitions, base.n_layers, &base.model_id, costs, fit.as_ref())?;
        Ok(Some(plan_of(balanced)))
    }

    /// The layers each node would hold of `base`'s model (any shard of it) for a request
    /// started here now, in ring order, with the bytes they need where the engine can tell; an
    /// error when the model does not fit the nodes' memory.
    pub async fn layer_plan(&self, base: &Shard) -> Result<Vec<NodeLayers>> {
        let base = &Shard::new(base.model_id.clone(), 0, base.n_layers - 1, base.n_layers);
        base.validate()?;
        let partitions = self.partitions();
        let layers = match self.balanced_plan(base).await? {
            Some(plan) => planned_shards(&plan, base)?,
            None => self.assignments(base),
        };
        let fit = self.memory_fit(base, &partitions).await;
        Ok(layers
            .into_iter()
            .map(|(node_id, shard)| NodeLayers {
                memory: fit.as_ref().map(|fit| fit.model.shard_need(&shard)),
                node_id,
                start_layer: shard.start_layer,
                end_layer: shard.end_layer,
            })
            .collect())
    }

    /// `base`'s model's memory, as this node's engine would load it, against the memory of the
    /// partitions' nodes (in their order), when the engine can tell the former and some node
    /// reports the latter (a ring where every node reports 0 MB says nothing of its memory).
    /// Other nodes are assumed to load the model as this one does.
    async fn memory_fit(&self, base: &Shard, partitions: &[Partition]) -> Option<MemoryFit> {
        let topology = self.topology();
        let nodes: Vec<u64> = partitions
            .iter()
            .map(|p| topology.get_node(&p.node_id).map_or(0, |c| c.memory.saturating_mul(1 << 20)))
            .collect();
        if nodes.iter().all(|&bytes| bytes == 0) {
            return None;
        }
        let model = self.engine.model_memory(base).await?;
        (model.layers.len() == base.n_layers as usize).then_some(MemoryFit { model, nodes })
    }

    /// The layers each node runs for `request_id`: the plan its context carries, else this
    /// node's partition of `base`'s model.
    fn layers_for(&self, request_id: &str, base: &Shard) -> Result<Vec<(String, Shard)>> {
        let plan =
            self.requests.with(request_id, |r| r.context.as_ref().and_then(|c| c.layers.clone())).flatten();
        match plan {
            Some(plan) => planned_shards(&plan, base),
            None => Ok(self.assignments(base)),
        }
    }

    /// Starts the server and discovery, finds peers, and starts the background refresh.
    pub async fn start(&self, wait_for_peers: usize) -> Result<()> {
        if !self.capabilities_given.load(std::sync::atomic::Ordering::SeqCst) {
            let detected = tokio::task::spawn_blocking(crate::topology::detect_device_capabilities)
                .await
                .map_err(|e| Error::InvalidArgument(format!("device detection failed: {e}")))?;
            self.apply_capabilities(detected);
        }
        let server = self.server.lock().expect("server lock poisoned").clone();
        if let Some(server) = server {
            server.start().await?;
        }
        self.discovery.start().await?;
        self.update_peers(wait_for_peers).await?;
        self.collect_topology(BTreeSet::new(), 4).await;
        let (refresh, watch) = (self.me.clone(), self.me.clone());
        let mut tasks = self.tasks.lock().expect("tasks lock poisoned");
        tasks.push(tokio::spawn(refresh_periodically(refresh)));
        tasks.push(tokio::spawn(watch_requests(watch)));
        Ok(())
    }

    /// Stops the background tasks, discovery and the server; running requests fail.
    pub async fn stop(&self) -> Result<()> {
        for task in self.tasks.lock().expect("tasks lock poisoned").drain(..) {
            task.abort();
        }
        // Peers learn at once that this node will not answer (the origin fails the request as
        // it would for a dead peer), before the outbox closes.
        for request_id in self.requests.ids() {
            let error = Error::Peer(format!("node {} is stopping", self.id));
            self.fail_request(&request_id, error).await;
        }
        self.outbox.close();
        let discovery = self.discovery.stop().await;
        let server = self.server.lock().expect("server lock poisoned").clone();
        if let Some(server) = server {
            server.stop().await?;
        }
        discovery
    }

    /// Takes the peers discovery knows now (waiting for `wait_for_peers`) that answer a health
    /// check, connecting new ones; a peer that does not answer stays out until it does, and one
    /// that left is taken out of the topology at once, unless it may be loading a model (within
    /// the loading grace). True if the peers changed.
    pub async fn update_peers(&self, wait_for_peers: usize) -> Result<bool> {
        let discovered = self.discovery.discover_peers(wait_for_peers).await?;
        let checks = discovered.into_iter().map(|peer| async move {
            if !peer.health_check().await {
                log::debug!("peer {}@{} does not answer; left out for now", peer.id(), peer.addr());
                return None;
            }
            if !peer.is_connected().await {
                if let Err(e) =
                    tokio::time::timeout(CONNECT_TIMEOUT, peer.connect()).await.unwrap_or_else(|_| {
                        Err(Error::Peer(format!("connecting to {}@{} timed out", peer.id(), peer.addr())))
                    })
                {
                    log::info!("{e}");
                    return None;
                }
            }
            Some(peer)
        });
        let mut next: Vec<_> = futures::future::join_all(checks).await.into_iter().flatten().collect();
        // A peer that may be loading a model keeps its place while it does not answer.
        for peer in self.peers() {
            if !next.iter().any(|p| p.id() == peer.id()) && self.may_be_loading(peer.as_ref()).await {
                next.push(peer);
            }
        }
        let addresses: BTreeMap<String, String> = self.peers().iter().map(|p| (p.id(), p.addr())).collect();
        let Some(departed) = self.membership.replace_peers(next) else { return Ok(false) };
        // A departed peer leaves the partitions now, not at the next walk, and the requests
        // through it fail now, naming it, not at the watch's next pass.
        for peer_id in departed {
            self.membership.forget_node(&peer_id);
            let address = addresses.get(&peer_id).map_or("", String::as_str);
            self.fail_requests_through(&peer_id, address).await;
        }
        Ok(true)
    }

    /// Rebuilds the topology from this node, its peers and what they see, down to `max_depth`,
    /// and makes it the node's topology.
    pub async fn collect_topology(&self, visited: BTreeSet<String>, max_depth: i32) -> Topology {
        let next = self.walk_topology(visited, max_depth).await;
        self.membership.set_topology(next.clone());
        next
    }

    /// The cluster as seen from here: this node, its peers, and what the peers not in
    /// `visited` see, down to `max_depth`. A peer whose handle does not know its device keeps
    /// what the last walk learned about it.
    pub async fn walk_topology(&self, mut visited: BTreeSet<String>, max_depth: i32) -> Topology {
        let peers = self.peers();
        let known = self.topology();
        let mut next = Topology::new();
        next.update_node(self.id.clone(), self.device_capabilities());
        let before = visited.clone();
        visited.insert(self.id.clone());
        visited.extend(peers.iter().map(|p| p.id()));
        for peer in &peers {
            let mut capabilities = peer.device_capabilities();
            if capabilities == DeviceCapabilities::unknown() {
                if let Some(learned) = known.get_node(&peer.id()) {
                    capabilities = learned.clone();
                }
            }
            next.update_node(peer.id(), capabilities);
            next.add_edge(&self.id, &peer.id(), Some(peer.description()));
        }
        let walks = peers.iter().filter(|p| max_depth > 0 && !before.contains(&p.id())).map(|peer| {
            let visited = &visited;
            async move {
                let walk =
                    tokio::time::timeout(COLLECT_TIMEOUT, peer.collect_topology(visited, max_depth - 1));
                (peer.id(), walk.await)
            }
        });
        for (peer_id, walk) in futures::future::join_all(walks).await {
            match walk {
                Ok(Ok(other)) => next.merge(&peer_id, &other),
                Ok(Err(e)) => log::debug!("topology from {peer_id}: {e}"),
                Err(_) => log::debug!("topology from {peer_id} timed out"),
            }
        }
        next.active_node_id = known.active_node_id;
        next
    }

    /// Takes a peer that stopped answering out of the ring; the next refresh lets it back
    /// in if it answers again.
    fn drop_peer(&self, peer_id: &str) {
        self.membership.remove_peer(peer_id);
        self.membership.forget_node(peer_id);
        log::warn!("peer {peer_id} stopped answering; it leaves the ring until it answers again");
    }

    /// Sends a status to every peer and to this node's own listeners.
    pub fn broadcast_opaque_status(&self, request_id: &str, status: &str) {
        for peer in self.peers() {
            let message = Message::Status { request_id: request_id.to_string(), status: status.to_string() };
            self.outbox.send(&self.me, &peer.id(), message);
        }
        self.observe_status(request_id, status);
    }

    /// Sends tokens of a request to every peer.
    pub fn broadcast_result(&self, request_id: &str, tokens: &[u32], is_finished: bool) {
        for peer in self.peers() {
            let message =
                Message::Result { request_id: request_id.to_string(), tokens: tokens.to_vec(), is_finished };
            self.outbox.send(&self.me, &peer.id(), message);
        }
    }

    /// Applies what a status says to this node's state (the active node, the peers that may be
    /// loading a model), then tells the listeners.
    fn observe_status(&self, request_id: &str, status: &str) {
        if let Ok(serde_json::Value::Object(message)) = serde_json::from_str::<serde_json::Value>(status) {
            let field = |name: &str| message.get(name).and_then(|v| v.as_str()).unwrap_or_default();
            match field("type") {
                "node_status" if field("status").starts_with("start_") => {
                    self.membership.mark_active(field("node_id"), true);
                    if field("status") == "start_process_prompt" {
                        let peers = self.peers();
                        self.membership.mark_loading(peers.iter().map(|p| p.identity().id.as_str()));
                    }
                }
                "node_status" if field("status").starts_with("end_") => {
                    self.membership.mark_active(field("node_id"), false);
                }
                "download_progress" => self.membership.mark_loading([field("node_id")]),
                _ => {}
            }
        }
        self.emit(NodeEvent::Status { request_id: request_id.to_string(), status: status.to_string() });
    }

    /// Whether `peer`, which does not answer, may be busy loading a model: it showed signs of
    /// loading within the loading grace and its process is still there.
    async fn may_be_loading(&self, peer: &dyn PeerHandle) -> bool {
        let loading = self.showed_loading(&peer.id()) && peer.is_reachable().await;
        if loading {
            log::debug!("peer {}@{} does not answer while it may be loading a model", peer.id(), peer.addr());
        }
        loading
    }

    /// Whether node `node_id` showed signs of loading a model within the loading grace and is
    /// not a xotorch-core peer: only an exo classic node stops answering while it loads (its
    /// event loop blocks); a xotorch-core node answers health checks from its own threads, so
    /// one that does not is frozen or gone, whatever it was doing.
    fn showed_loading(&self, node_id: &str) -> bool {
        let xotorch = self.peer(node_id).is_some_and(|peer| peer.runs_xotorch_core());
        !xotorch && self.membership.may_be_loading(node_id, self.settings().loading_grace)
    }

    /// Health-checks the peers that running requests started here depend on; a peer that
    /// fails leaves the ring and its requests fail at once, unless it may be loading a model.
    async fn watch_running_requests(&self) {
        let watched = self.requests.members_of_started(&self.id);
        if watched.is_empty() {
            return;
        }
        let checks = watched.into_iter().map(|id| async move {
            let alive = match self.peer(&id) {
                Some(peer) => peer.health_check().await || self.may_be_loading(peer.as_ref()).await,
                None => false,
            };
            (id, alive)
        });
        for (peer_id, alive) in futures::future::join_all(checks).await {
            if !alive {
                self.peer_failed(&peer_id).await;
            }
        }
    }

    /// Drops a dead peer and fails every request started here that runs through it.
    async fn peer_failed(&self, peer_id: &str) {
        let address = self.peer(peer_id).map(|p| p.addr()).unwrap_or_default();
        self.drop_peer(peer_id);
        self.fail_requests_through(peer_id, &address).await;
    }

    /// Fails every request that runs through `peer_id` (at `address`), which left the ring.
    async fn fail_requests_through(&self, peer_id: &str, address: &str) {
        for request_id in self.requests.running_on(peer_id) {
            let error = Error::Peer(format!("{peer_id} ({address}) stopped answering during the request"));
            self.fail_request(&request_id, error).await;
        }
    }

    /// Fails the requests started here that waited on other nodes past the progress deadline
    /// with no sign of progress, unless a node they run on may be loading a model.
    async fn fail_stalled_requests(&self) {
        let deadline = self.settings().progress_deadline;
        for (request_id, members) in self.requests.stalled(&self.id, deadline) {
            let others: Vec<String> = members.into_iter().filter(|id| *id != self.id).collect();
            if others.iter().any(|id| self.showed_loading(id)) {
                continue;
            }
            let error = Error::Stalled(format!(
                "request {request_id} made no progress for {} s (the progress deadline) while it waited on {}",
                deadline.as_secs_f64(),
                others.join(", ")
            ));
            log::warn!("{error}");
            self.fail_request(&request_id, error).await;
        }
    }

    /// Ends the requests started by a node that left the ring: nobody is left to ask for their
    /// tokens, and their caches would otherwise stay until the idle limit.
    async fn end_orphaned_requests(&self) {
        let present = |id: &str| self.membership.peer(id).is_some();
        for (request_id, origin) in self.requests.orphaned(&self.id, present, DISCOVERY_GRACE) {
            let error =
                Error::Peer(format!("node {origin}, which started request {request_id}, left the ring"));
            log::info!("{error}");
            self.end_request(&request_id, Some(error)).await;
        }
    }

    /// Forgets requests whose messages were lost, and old records of ended ones.
    async fn forget_idle_requests(&self) {
        for request_id in self.requests.idle_for(IDLE_REQUEST) {
            let error = Error::RequestFailed("the request stalled and was dropped".into());
            self.end_request(&request_id, Some(error)).await;
        }
        self.requests.forget_ended(IDLE_REQUEST);
    }
}

/// A request's layer plan from the shards its nodes hold.
fn plan_of(layers: Vec<(&str, Shard)>) -> Vec<LayerRange> {
    let range = |(node_id, shard): (&str, Shard)| LayerRange {
        node_id: node_id.to_string(),
        start_layer: shard.start_layer,
        end_layer: shard.end_layer,
    };
    layers.into_iter().map(range).collect()
}

/// Refreshes peers and the topology every `TOPOLOGY_INTERVAL` while the node lives.
async fn refresh_periodically(node: Weak<Node>) {
    loop {
        tokio::time::sleep(TOPOLOGY_INTERVAL).await;
        let Some(node) = node.upgrade() else { return };
        if let Err(e) = node.update_peers(0).await {
            log::warn!("updating peers failed: {e}");
        }
        node.collect_topology(BTreeSet::new(), 4).await;
        node.forget_idle_requests().await;
    }
}

/// Watches the peers and the progress of running requests every `WATCH_INTERVAL` while the
/// node lives.
async fn watch_requests(node: Weak<Node>) {
    loop {
        tokio::time::sleep(WATCH_INTERVAL).await;
        let Some(node) = node.upgrade() else { return };
        node.watch_running_requests().await;
        node.fail_stalled_requests().await;
        node.end_orphaned_requests().await;
    }
}

#[cfg(test)]
mod tests;
