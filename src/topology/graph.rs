//! The cluster graph: each node's capabilities and the directed peer connections.

use indexmap::{IndexMap, IndexSet};

use super::device::DeviceCapabilities;

/// A directed connection from one node to a peer; identity is the (from, to) pair.
#[derive(Debug, Clone)]
pub struct PeerConnection {
    /// Node the connection starts at.
    pub from_id: String,
    /// Node the connection leads to.
    pub to_id: String,
    /// Free-form description (e.g. the interface it runs over).
    pub description: Option<String>,
}

impl PartialEq for PeerConnection {
    fn eq(&self, other: &Self) -> bool {
        self.from_id == other.from_id && self.to_id == other.to_id
    }
}

impl Eq for PeerConnection {}

impl std::hash::Hash for PeerConnection {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (&self.from_id, &self.to_id).hash(state);
    }
}

/// Nodes in the order they were first seen, and each node's outgoing connections.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Topology {
    /// Capabilities per node id.
    pub nodes: IndexMap<String, DeviceCapabilities>,
    /// Outgoing connections per node id.
    pub peer_graph: IndexMap<String, IndexSet<PeerConnection>>,
    /// The node currently running a request, if any.
    pub active_node_id: Option<String>,
}

impl Topology {
    /// An empty topology.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets (or replaces) a node's capabilities.
    pub fn update_node(&mut self, node_id: impl Into<String>, capabilities: DeviceCapabilities) {
        self.nodes.insert(node_id.into(), capabilities);
    }

    /// A node's capabilities, if it is known.
    pub fn get_node(&self, node_id: &str) -> Option<&DeviceCapabilities> {
        self.nodes.get(node_id)
    }

    /// Adds a connection; an existing (from, to) connection keeps its description.
    pub fn add_edge(&mut self, from_id: &str, to_id: &str, description: Option<String>) {
        let connection =
            PeerConnection { from_id: from_id.to_string(), to_id: to_id.to_string(), description };
        self.peer_graph.entry(from_id.to_string()).or_default().insert(connection);
    }

    /// Takes in what `other` (a peer's own view) says about `peer_node_id` itself:
    /// its capabilities and its outgoing connections, nothing else.
    pub fn merge(&mut self, peer_node_id: &str, other: &Topology) {
        if let Some(capabilities) = other.nodes.get(peer_node_id) {
            self.update_node(peer_node_id, capabilities.clone());
        }
        for connection in other.peer_graph.values().flatten().filter(|c| c.from_id == peer_node_id) {
            self.add_edge(&connection.from_id, &connection.to_id, connection.description.clone());
        }
    }

    /// The JSON form exo classic's API serves (`nodes`, `peer_graph`, `active_node_id`).
    pub fn to_json(&self) -> serde_json::Value {
        let nodes: serde_json::Map<_, _> =
            self.nodes.iter().map(|(id, caps)| (id.clone(), caps.to_json())).collect();
        let peer_graph: serde_json::Map<_, _> = self
            .peer_graph
            .iter()
            .map(|(id, connections)| {
                let list = connections
                    .iter()
                    .map(|c| {
                        serde_json::json!({"from_id": c.from_id, "to_id": c.to_id, "description": c.description})
                    })
                    .collect();
                (id.clone(), serde_json::Value::Array(list))
            })
            .collect();
        serde_json::json!({"nodes": nodes, "peer_graph": peer_graph, "active_node_id": self.active_node_id})
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::DeviceFlops;

    fn caps(memory: u64) -> DeviceCapabilities {
        DeviceCapabilities::new("m", "c", memory, DeviceFlops::new(1.0, 2.0, 4.0))
    }

    #[test]
    fn duplicate_edges_keep_the_first_description() {
        let mut t = Topology::new();
        t.add_edge("a", "b", Some("first".into()));
        t.add_edge("a", "b", Some("second".into()));
        let edges: Vec<_> = t.peer_graph["a"].iter().collect();
        assert_eq!(edges.len(), 1);
        assert_eq!(edges[0].description.as_deref(), Some("first"));
    }

    #[test]
    fn merge_takes_only_what_the_peer_says_about_itself() {
        let mut mine = Topology::new();
        mine.update_node("me", caps(1));
        let mut theirs = Topology::new();
        theirs.update_node("peer", caps(2));
        theirs.update_node("third", caps(3));
        theirs.add_edge("peer", "third", None);
        theirs.add_edge("third", "peer", None);
        mine.merge("peer", &theirs);
        assert_eq!(mine.nodes.keys().collect::<Vec<_>>(), ["me", "peer"]);
        assert_eq!(mine.peer_graph.keys().collect::<Vec<_>>(), ["peer"]);
    }

    #[test]
    fn json_has_classic_shape() {
        let mut t = Topology::new();
        t.update_node("a", caps(1024));
        t.add_edge("a", "b", Some("eth0".into()));
        let json = t.to_json();
        assert_eq!(json["nodes"]["a"]["memory"], 1024);
        assert_eq!(json["nodes"]["a"]["flops"]["fp16"], 2.0);
        assert_eq!(json["peer_graph"]["a"][0]["to_id"], "b");
        assert_eq!(json["peer_graph"]["a"][0]["description"], "eth0");
        assert!(json["active_node_id"].is_null());
    }
}
