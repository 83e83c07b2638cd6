//! Membership: the peers a node uses, the cluster topology as last collected, the
//! partitions the node's strategy derives from it, and which peers may be loading a model.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::net::PeerHandle;
use crate::topology::{DeviceCapabilities, Partition, PartitioningStrategy, Topology};

/// A node's view of the cluster; the partitions always follow the topology.
pub struct Membership {
    strategy: Arc<dyn PartitioningStrategy>,
    peers: RwLock<Vec<Arc<dyn PeerHandle>>>,
    topology: RwLock<Topology>,
    partitions: RwLock<Vec<Partition>>,
    /// When each node last showed signs of loading a model.
    loading: RwLock<HashMap<String, Instant>>,
}

impl Membership {
    /// A cluster of the node `node_id` alone, its device not yet known.
    pub fn new(node_id: &str, strategy: Arc<dyn PartitioningStrategy>) -> Self {
        let mut topology = Topology::new();
        topology.update_node(node_id.to_string(), DeviceCapabilities::unknown());
        let partitions = strategy.partition(&topology);
        Self {
            strategy,
            peers: RwLock::new(Vec::new()),
            topology: RwLock::new(topology),
            partitions: RwLock::new(partitions),
            loading: RwLock::new(HashMap::new()),
        }
    }

    /// The strategy that partitions the ring.
    pub fn strategy(&self) -> &Arc<dyn PartitioningStrategy> {
        &self.strategy
    }

    /// The peers in use now.
    pub fn peers(&self) -> Vec<Arc<dyn PeerHandle>> {
        self.peers.read().expect("peers lock poisoned").clone()
    }

    /// The peer in use with id `id`.
    pub fn peer(&self, id: &str) -> Option<Arc<dyn PeerHandle>> {
        self.peers.read().expect("peers lock poisoned").iter().find(|p| p.id() == id).cloned()
    }

    /// Makes `next` the peers in use; the ids of the peers that left when the set of peers
    /// (ids and addresses) changed, else `None`.
    pub fn replace_peers(&self, next: Vec<Arc<dyn PeerHandle>>) -> Option<Vec<String>> {
        let key = |peers: &[Arc<dyn PeerHandle>]| -> BTreeSet<(String, String)> {
            peers.iter().map(|p| (p.id(), p.addr())).collect()
        };
        let mut peers = self.peers.write().expect("peers lock poisoned");
        let changed = key(&peers) != key(&next);
        let staying: BTreeSet<String> = next.iter().map(|p| p.id()).collect();
        let departed = peers.iter().map(|p| p.id()).filter(|id| !staying.contains(id)).collect();
        *peers = next;
        changed.then_some(departed)
    }

    /// Stops using the peer `peer_id`.
    pub fn remove_peer(&self, peer_id: &str) {
        self.peers.write().expect("peers lock poisoned").retain(|p| p.id() != peer_id);
    }

    /// The cluster as last collected.
    pub fn topology(&self) -> Topology {
        self.topology.read().expect("topology lock poisoned").clone()
    }

    /// Makes `topology` the cluster and partitions it.
    pub fn set_topology(&self, topology: Topology) {
        let partitions = self.strategy.partition(&topology);
        *self.topology.write().expect("topology lock poisoned") = topology;
        *self.partitions.write().expect("partitions lock poisoned") = partitions;
    }

    /// The partitions of the current topology, in ring order.
    pub fn partitions(&self) -> Vec<Partition> {
        self.partitions.read().expect("partitions lock poisoned").clone()
    }

    /// Sets a node's device in the topology.
    pub fn update_node(&self, node_id: &str, capabilities: DeviceCapabilities) {
        let mut topology = self.topology();
        topology.update_node(node_id.to_string(), capabilities);
        self.set_topology(topology);
    }

    /// Takes a node out of the topology (and the partitions) until a walk finds it again.
    pub fn forget_node(&self, node_id: &str) {
        let mut topology = self.topology();
        topology.nodes.shift_remove(node_id);
        topology.peer_graph.shift_remove(node_id);
        for connections in topology.peer_graph.values_mut() {
            connections.retain(|c| c.to_id != node_id);
        }
        self.set_topology(topology);
    }

    /// Records that `node_id` started (`true`) or ended (`false`) work on a prompt; the
    /// topology's active node is the one working now.
    pub fn mark_active(&self, node_id: &str, started: bool) {
        let mut topology = self.topology.write().expect("topology lock poisoned");
        if started {
            topology.active_node_id = Some(node_id.to_string());
        } else if topology.active_node_id.as_deref() == Some(node_id) {
            topology.active_node_id = None;
        }
    }

    /// Records that the nodes `node_ids` may be loading a model from now on: a request started
    /// on the ring (an exo classic node loads its shard when it sees one start, and its event
    /// loop answers nothing while tinygrad loads), or the node reported download progress.
    pub fn mark_loading<'a>(&self, node_ids: impl IntoIterator<Item = &'a str>) {
        let now = Instant::now();
        let mut loading = self.loading.write().expect("loading lock poisoned");
        for id in node_ids {
            loading.insert(id.to_string(), now);
        }
    }

    /// Whether `node_id` showed signs of loading a model within the last `grace`.
    pub fn may_be_loading(&self, node_id: &str, grace: Duration) -> bool {
        let loading = self.loading.read().expect("loading lock poisoned");
        loading.get(node_id).is_some_and(|since| since.elapsed() < grace)
    }
}

/// How long a node waits for a peer it has heard from to show up in its own discovery: a peer's
/// first request can arrive before this node's discovery has found the peer.
pub const DISCOVERY_GRACE: Duration = Duration::from_secs(10);

/// How often [`discovered`] looks again.
const DISCOVERY_POLL: Duration = Duration::from_millis(100);

/// The peer `find` returns, looking again until it returns one or `grace` has passed.
pub async fn discovered(
    find: impl Fn() -> Option<Arc<dyn PeerHandle>>,
    grace: Duration,
) -> Option<Arc<dyn PeerHandle>> {
    let deadline = tokio::time::Instant::now() + grace;
    loop {
        if let Some(peer) = find() {
            return Some(peer);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(DISCOVERY_POLL).await;
    }
}
