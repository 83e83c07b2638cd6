//! Rings of real nodes talking gRPC over loopback in one process, with the dummy engine.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use super::{GenerateOptions, Node, NodeSettings, StreamEvent};
use crate::engine::dummy::DummyEngine;
use crate::engine::{Engine, InferenceState, SamplingParams};
use crate::error::Result;
use crate::net::grpc::{GrpcPeer, GrpcServer};
use crate::net::{Discovery, PeerHandle, RequestHandler, Server};
use crate::shard::Shard;
use crate::tensor::{DType, WireTensor};
use crate::topology::{
    DeviceCapabilities, DeviceFlops, ModelCosts, ModelMemory, RingMemoryWeightedPartitioning, Topology,
};

/// The dummy engine's tokens for any prompt: 2..=10, then EOS (69).
const DUMMY_TOKENS: [u32; 10] = [2, 3, 4, 5, 6, 7, 8, 9, 10, 69];

/// Whatever peers the test puts in.
#[derive(Default)]
struct FixedPeers(Mutex<Vec<Arc<dyn PeerHandle>>>);

#[async_trait]
impl Discovery for FixedPeers {
    async fn start(&self) -> Result<()> {
        Ok(())
    }
    async fn stop(&self) -> Result<()> {
        Ok(())
    }
    async fn discover_peers(&self, _wait_for_peers: usize) -> Result<Vec<Arc<dyn PeerHandle>>> {
        Ok(self.0.lock().unwrap().clone())
    }
}

/// The dummy engine with test knobs: a delay per step (so a test can act in the middle of a
/// request) and the per-token costs it reports; it records the layer ranges it runs.
#[derive(Default)]
struct TestDummy {
    inner: DummyEngine,
    step: Duration,
    costs: Option<ModelCosts>,
    memory: Option<ModelMemory>,
    ran: Mutex<BTreeSet<(i32, i32)>>,
}

impl TestDummy {
    /// Each step takes at least `step`.
    fn slow(step: Duration) -> Arc<dyn Engine> {
        Arc::new(Self { step, ..Default::default() })
    }

    /// A model whose LM head costs as much as seven layers.
    fn heavy_head() -> Self {
        Self { costs: Some(ModelCosts { layer: 1.0, head: 7.0 }), ..Default::default() }
    }
}

#[async_trait]
impl Engine for TestDummy {
    fn name(&self) -> &str {
        "test-dummy"
    }
    async fn encode(&self, shard: &Shard, prompt: &str) -> Result<Vec<u32>> {
        self.inner.encode(shard, prompt).await
    }
    async fn decode(&self, shard: &Shard, tokens: &[u32]) -> Result<String> {
        self.inner.decode(shard, tokens).await
    }
    async fn sample(&self, logits: &WireTensor, params: SamplingParams) -> Result<Vec<u32>> {
        self.inner.sample(logits, params).await
    }
    async fn infer_tensor(
        &self,
        request_id: &str,
        shard: &Shard,
        input: WireTensor,
        state: Option<InferenceState>,
    ) -> Result<(WireTensor, Option<InferenceState>)> {
        self.ran.lock().unwrap().insert((shard.start_layer, shard.end_layer));
        tokio::time::sleep(self.step).await;
        self.inner.infer_tensor(request_id, shard, input, state).await
    }
    async fn ensure_shard(&self, shard: &Shard) -> Result<()> {
        self.inner.ensure_shard(shard).await
    }
    async fn finish_request(&self, request_id: &str) {
        self.inner.finish_request(request_id).await
    }
    async fn eos_token_ids(&self, shard: &Shard) -> Result<Vec<u32>> {
        self.inner.eos_token_ids(shard).await
    }
    async fn model_costs(&self, _base: &Shard) -> Option<ModelCosts> {
        self.costs
    }
    async fn model_memory(&self, _base: &Shard) -> Option<ModelMemory> {
        self.memory.clone()
    }
}

struct TestNode {
    node: Arc<Node>,
    server: Arc<GrpcServer>,
    discovery: Arc<FixedPeers>,
}

/// Starts one node per id on loopback, each knowing every other one.
async fn cluster(ids: &[&str], engine: impl Fn() -> Arc<dyn Engine>) -> Vec<TestNode> {
    let mut nodes = Vec::new();
    for id in ids {
        let discovery = Arc::new(FixedPeers::default());
        let node = Node::new(
            *id,
            engine(),
            discovery.clone(),
            Arc::new(RingMemoryWeightedPartitioning),
            NodeSettings::default(),
        );
        let handler: Arc<dyn RequestHandler> = node.clone();
        let server = Arc::new(GrpcServer::new(Arc::downgrade(&handler), "127.0.0.1", 0));
        node.set_server(server.clone());
        server.start().await.unwrap();
        nodes.push(TestNode { node, server, discovery });
    }
    for test in &nodes {
        let peers: Vec<Arc<dyn PeerHandle>> = nodes
            .iter()
            .filter(|other| other.node.id() != test.node.id())
            .map(|other| {
                let address = format!("127.0.0.1:{}", other.server.port());
                let caps = crate::topology::detect_device_capabilities();
                Arc::new(GrpcPeer::new(other.node.id().to_string(), address, "test".into(), caps))
                    as Arc<dyn PeerHandle>
            })
            .collect();
        *test.discovery.0.lock().unwrap() = peers;
    }
    for test in &nodes {
        test.node.start(0).await.unwrap();
    }
    // Nodes started before their peers saw them without capabilities; look again.
    for test in &nodes {
        test.node.update_peers(0).await.unwrap();
        test.node.collect_topology(BTreeSet::new(), 4).await;
    }
    nodes
}

/// Collects a stream until it ends; the error message if it failed.
async fn drain(mut stream: tokio::sync::mpsc::UnboundedReceiver<StreamEvent>) -> (Vec<u32>, Option<String>) {
    let mut tokens = Vec::new();
    while let Some(event) = stream.recv().await {
        match event {
            StreamEvent::Token(t) => tokens.push(t),
            StreamEvent::Finished => return (tokens, None),
            StreamEvent::Failed(e) => return (tokens, Some(e.to_string())),
        }
    }
    (tokens, Some("the stream closed without an end".into()))
}

fn dummy() -> Arc<dyn Engine> {
    Arc::new(DummyEngine::default())
}

fn base() -> Shard {
    Shard::new("dummy", 0, 7, 8)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rings_of_one_two_and_three_nodes_give_the_same_tokens() {
    for ids in [&["a"][..], &["a", "b"], &["a", "b", "c"]] {
        let nodes = cluster(ids, dummy).await;
        assert_eq!(nodes[0].node.partitions().len(), ids.len());
        // Start from every node in turn: the origin need not hold the first layer.
        for (i, test) in nodes.iter().enumerate() {
            let (_, stream) =
                test.node.generate(&base(), "hi", Some(format!("r{i}")), GenerateOptions::default()).unwrap();
            let (tokens, error) = tokio::time::timeout(Duration::from_secs(10), drain(stream)).await.unwrap();
            assert_eq!((tokens, error), (DUMMY_TOKENS.to_vec(), None), "{ids:?} from {}", test.node.id());
        }
        for test in &nodes {
            test.node.stop().await.unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_tokens_and_concurrent_requests_stay_per_request() {
    let nodes = cluster(&["a", "b"], dummy).await;
    let options = |max| GenerateOptions { max_tokens: Some(max), ..Default::default() };
    let streams: Vec<_> =
        (0..6).map(|i| nodes[i % 2].node.generate(&base(), "hi", None, options(i + 1)).unwrap().1).collect();
    for (i, stream) in streams.into_iter().enumerate() {
        let (tokens, error) = tokio::time::timeout(Duration::from_secs(10), drain(stream)).await.unwrap();
        assert_eq!((tokens, error), (DUMMY_TOKENS[..i + 1].to_vec(), None));
    }
    // Every node has forgotten every request.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for test in &nodes {
        assert!(test.node.outstanding_requests().is_empty(), "{:?}", test.node.outstanding_requests());
        test.node.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_the_refresh_leaves_out_fails_the_requests_through_it_at_once_naming_its_address() {
    let nodes = cluster(&["a", "b"], || TestDummy::slow(Duration::from_millis(300))).await;
    let (_, mut stream) = nodes[0].node.generate(&base(), "hi", None, GenerateOptions::default()).unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    // Node b is no longer discovered (a partition, say): the next refresh leaves it out.
    nodes[0].discovery.0.lock().unwrap().clear();
    nodes[0].node.update_peers(0).await.unwrap();
    let mut failure = None;
    while let Ok(event) = stream.try_recv() {
        if let StreamEvent::Failed(e) = event {
            failure = Some(e.to_string());
        }
    }
    let failure = failure.expect("the request failed within the refresh");
    let address = format!("127.0.0.1:{}", nodes[1].server.port());
    assert!(failure.contains(&format!("b ({address}) stopped answering")), "{failure}");
    for test in &nodes {
        test.node.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_dies_mid_request_fails_it_within_seconds_and_leaves_the_ring() {
    let nodes = cluster(&["a", "b"], || TestDummy::slow(Duration::from_millis(300))).await;
    let (_, stream) = nodes[0].node.generate(&base(), "hi", None, GenerateOptions::default()).unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    // Node b goes away: its server closes and it stops answering.
    nodes[1].node.stop().await.unwrap();
    let started = std::time::Instant::now();
    let (tokens, error) = tokio::time::timeout(Duration::from_secs(10), drain(stream)).await.unwrap();
    assert!(error.is_some(), "the request should fail, got {tokens:?}");
    assert!(tokens.len() < DUMMY_TOKENS.len());
    assert!(started.elapsed() < Duration::from_secs(8), "failing took {:?}", started.elapsed());
    // The next request runs on the new partition: node a alone.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(nodes[0].node.partitions().len(), 1);
    let (_, stream) = nodes[0].node.generate(&base(), "hi", None, GenerateOptions::default()).unwrap();
    let (tokens, error) = tokio::time::timeout(Duration::from_secs(10), drain(stream)).await.unwrap();
    assert_eq!((tokens, error), (DUMMY_TOKENS.to_vec(), None));
    nodes[0].node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_stops_the_request_on_every_node() {
    let nodes = cluster(&["a", "b"], || TestDummy::slow(Duration::from_millis(100))).await;
    let (id, mut stream) = nodes[0].node.generate(&base(), "hi", None, GenerateOptions::default()).unwrap();
    assert!(matches!(stream.recv().await, Some(StreamEvent::Token(2))));
    nodes[0].node.cancel_request(&id).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    for test in &nodes {
        assert!(
            test.node.outstanding_requests().is_empty(),
            "{}: {:?}",
            test.node.id(),
            test.node.outstanding_requests()
        );
        test.node.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_calls_fail_alone_and_the_node_keeps_serving() {
    let nodes = cluster(&["a"], dummy).await;
    let address = format!("127.0.0.1:{}", nodes[0].server.port());
    let peer =
        GrpcPeer::new("a".into(), address, String::new(), crate::topology::DeviceCapabilities::unknown());
    let bad_shard = Shard::new("dummy", 5, 2, 8);
    // The server's error keeps its kind across the call (the status's metadata names it).
    let error = peer.send_prompt(&bad_shard, "x", "r1", None).await.unwrap_err();
    assert_eq!(error.kind(), "invalid_shard", "{error}");
    assert!(
        error.to_string().contains("layers 5..=2") && error.to_string().ends_with("(on node a)"),
        "{error}"
    );
    let floats = WireTensor::new(DType::F16, vec![1], vec![0; 2]).unwrap();
    let error = peer.send_tensor(&Shard::new("dummy", 0, 7, 8), floats, "r2", None).await.unwrap_err();
    assert!(error.to_string().contains("integer tokens"), "{error}");
    let topology = peer.collect_topology(&BTreeSet::new(), 1).await.unwrap();
    assert!(topology.nodes.contains_key("a"));
    assert!(peer.health_check().await);
    let (_, stream) = nodes[0].node.generate(&base(), "hi", None, GenerateOptions::default()).unwrap();
    assert_eq!(drain(stream).await, (DUMMY_TOKENS.to_vec(), None));
    nodes[0].node.stop().await.unwrap();
    assert!(!peer.health_check().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_discovery_no_longer_lists_leaves_the_partitions_at_once() {
    let nodes = cluster(&["a", "b", "c"], dummy).await;
    assert_eq!(nodes[0].node.partitions().len(), 3);
    nodes[0].discovery.0.lock().unwrap().retain(|peer| peer.id() != "c");
    assert!(nodes[0].node.update_peers(0).await.unwrap());
    // No topology walk in between: update_peers itself took c out.
    let ids: Vec<String> = nodes[0].node.partitions().into_iter().map(|p| p.node_id).collect();
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert!(!ids.contains(&"c".to_string()), "{ids:?}");
    assert!(!nodes[0].node.topology().nodes.contains_key("c"));
    // Unchanged peers are not a change.
    assert!(!nodes[0].node.update_peers(0).await.unwrap());
    for test in &nodes {
        test.node.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ring_of_xotorch_nodes_moves_layers_off_the_node_with_the_head() {
    let engines: Arc<Mutex<Vec<Arc<TestDummy>>>> = Arc::default();
    let made = engines.clone();
    let nodes = cluster(&["a", "b"], move || {
        let engine = Arc::new(TestDummy::heavy_head());
        made.lock().unwrap().push(engine.clone());
        engine as Arc<dyn Engine>
    })
    .await;
    assert!(nodes[0].node.peers().iter().all(|p| p.runs_xotorch_core()));
    // Classic's partition of equal nodes: b (ids descending) 0..=3, a 4..=7 plus the head.
    let classic: Vec<_> =
        nodes[0].node.assignments(&base()).into_iter().map(|(id, s)| (id, s.end_layer)).collect();
    assert_eq!(classic, [("b".to_string(), 3), ("a".to_string(), 7)]);
    let mut statuses_at_b = nodes[1].node.subscribe();
    for (i, test) in nodes.iter().enumerate() {
        let (_, stream) =
            test.node.generate(&base(), "hi", Some(format!("r{i}")), GenerateOptions::default()).unwrap();
        let (tokens, error) = tokio::time::timeout(Duration::from_secs(10), drain(stream)).await.unwrap();
        assert_eq!((tokens, error), (DUMMY_TOKENS.to_vec(), None), "from {}", test.node.id());
    }
    // A head worth 7 layers: b runs 7 layers, a the last one and the head (8 against 8).
    let ran: Vec<_> = engines.lock().unwrap().iter().map(|e| e.ran.lock().unwrap().clone()).collect();
    assert_eq!(ran, [BTreeSet::from([(7, 7)]), BTreeSet::from([(0, 6)])]);
    // a's prompt status tells every node the plan, so each can fetch its part at once.
    let announced = loop {
        let event = tokio::time::timeout(Duration::from_secs(5), statuses_at_b.recv()).await;
        match event.expect("a's start status reaches b").unwrap() {
            super::NodeEvent::Status { request_id, status } if request_id == "r0" => {
                let status: serde_json::Value = serde_json::from_str(&status).unwrap();
                if status["status"] == "start_process_prompt" && status["node_id"] == "a" {
                    break status["layers"].clone();
                }
            }
            _ => {}
        }
    };
    let plan = serde_json::json!([
        {"node_id": "b", "start_layer": 0, "end_layer": 6},
        {"node_id": "a", "start_layer": 7, "end_layer": 7},
    ]);
    assert_eq!(announced, plan);
    for test in &nodes {
        test.node.stop().await.unwrap();
    }
}

/// The dummy model's 8 layers at `layer_mib` MiB each, with a 100 MiB embedding and a head of
/// `head_mib`.
fn sized_model(layer_mib: u64, head_mib: u64) -> ModelMemory {
    ModelMemory {
        layers: vec![layer_mib << 20; 8],
        kv_layer: 0,
        kv_budget: 0,
        context: 1024,
        embedding: 100 << 20,
        head: head_mib << 20,
        head_shares_embedding: false,
    }
}

/// A ring of xotorch nodes with the memory `mib` (MiB, in the order of `ids`) whose engines
/// report `model`'s memory.
async fn sized_cluster(
    ids: &[&str],
    mib: &[u64],
    model: ModelMemory,
) -> (Vec<TestNode>, Vec<Arc<TestDummy>>) {
    let engines: Arc<Mutex<Vec<Arc<TestDummy>>>> = Arc::default();
    let made = engines.clone();
    let nodes = cluster(ids, move || {
        let engine = Arc::new(TestDummy { memory: Some(model.clone()), ..Default::default() });
        made.lock().unwrap().push(engine.clone());
        engine as Arc<dyn Engine>
    })
    .await;
    for (test, &mib) in nodes.iter().zip(mib) {
        test.node.set_device_capabilities(DeviceCapabilities::new("m", "c", mib, DeviceFlops::default()));
    }
    for test in &nodes {
        test.node.collect_topology(BTreeSet::new(), 4).await;
    }
    let engines = engines.lock().unwrap().clone();
    (nodes, engines)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layers_stay_within_each_nodes_memory_and_a_model_too_big_is_refused() {
    // Equal nodes of 1000 MiB (ring: b, a) would hold 4 layers of 100 MiB each, but a, last,
    // also holds a 700 MiB head: it takes 3 layers, b the other 5 and the embedding.
    let (nodes, engines) = sized_cluster(&["a", "b"], &[1000, 1000], sized_model(100, 700)).await;
    let (_, stream) = nodes[0].node.generate(&base(), "hi", None, GenerateOptions::default()).unwrap();
    let (tokens, error) = tokio::time::timeout(Duration::from_secs(10), drain(stream)).await.unwrap();
    assert_eq!((tokens, error), (DUMMY_TOKENS.to_vec(), None));
    let ran: Vec<_> = engines.iter().map(|e| e.ran.lock().unwrap().clone()).collect();
    assert_eq!(ran, [BTreeSet::from([(5, 7)]), BTreeSet::from([(0, 4)])]);
    for test in &nodes {
        test.node.stop().await.unwrap();
    }
    // Layers of 500 MiB: 4.10 GiB needed, 2.34 GiB there; b (last) holds none, a the head
    // and 3 layers: 5 layers and the embedding fit nowhere.
    let (nodes, _) = sized_cluster(&["a", "b"], &[2000, 400], sized_model(500, 100)).await;
    let (_, stream) = nodes[1].node.generate(&base(), "hi", None, GenerateOptions::default()).unwrap();
    let (tokens, error) = tokio::time::timeout(Duration::from_secs(10), drain(stream)).await.unwrap();
    assert!(tokens.is_empty());
    let error = error.expect("the request is refused");
    assert!(error.starts_with("insufficient memory: dummy does not fit"), "{error}");
    assert!(error.contains("needs 4.10 GiB"), "{error}");
    assert!(
        error.contains("have 2.34 GiB together; 5 of its layers fit on no node: 2.54 GiB missing"),
        "{error}"
    );
    for test in &nodes {
        test.node.stop().await.unwrap();
    }
    // A node alone keeps classic's partition, and is refused the same way: 8 x 200 MiB and
    // 200 MiB of embedding and head against 1000 MiB.
    let (nodes, _) = sized_cluster(&["a"], &[1000], sized_model(200, 100)).await;
    let error = nodes[0].node.process_prompt(&base(), "hi", None, None).await.unwrap_err();
    assert_eq!(error.kind(), "insufficient_memory");
    let text = error.to_string();
    assert!(text.contains("node a would hold layers 0-7, which need 1.76 GiB"), "{text}");
    assert!(text.contains("it has 0.98 GiB: 0.78 GiB missing"), "{text}");
    nodes[0].node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_layer_plan_fails_its_request_alone() {
    let nodes = cluster(&["a"], dummy).await;
    let node = &nodes[0].node;
    let mut events = node.subscribe();
    let short = super::LayerRange { node_id: "a".into(), start_layer: 0, end_layer: 3 };
    let context =
        super::RequestContext { origin: "a".into(), layers: Some(vec![short]), ..Default::default() };
    let token = WireTensor::new(DType::I64, vec![1, 1], 5i64.to_le_bytes().to_vec()).unwrap();
    node.handle_tensor(base(), token, Some("bad".into()), context.attach(None)).await.unwrap();
    let failure = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Some(super::NodeEvent::Failed { request_id, error }) = events.recv().await {
                return (request_id, error.to_string());
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(failure.0, "bad");
    assert!(failure.1.contains("layer plan ends at layer 4, not at 8"), "{}", failure.1);
    let (_, stream) = node.generate(&base(), "hi", None, GenerateOptions::default()).unwrap();
    assert_eq!(drain(stream).await, (DUMMY_TOKENS.to_vec(), None));
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_key_keeps_out_peers_without_it() {
    use crate::net::cluster_key::ClusterKey;
    let nodes = cluster(&["a"], dummy).await;
    let key = |text: &str| Some(ClusterKey::new(text).unwrap());
    let handler: Arc<dyn RequestHandler> = nodes[0].node.clone();
    let keyed = GrpcServer::new(Arc::downgrade(&handler), "127.0.0.1", 0)
        .with_cluster_key(key("a cluster key of ours"));
    keyed.start().await.unwrap();
    let peer = |port: u16, key: Option<ClusterKey>| {
        GrpcPeer::new("a".into(), format!("127.0.0.1:{port}"), String::new(), DeviceCapabilities::unknown())
            .with_cluster_key(key)
    };

    let friend = peer(keyed.port(), key("a cluster key of ours"));
    assert!(friend.health_check().await);
    friend.connect().await.unwrap();
    assert!(friend.is_connected().await);
    assert!(friend.collect_topology(&BTreeSet::new(), 1).await.unwrap().nodes.contains_key("a"));
    for stranger in [peer(keyed.port(), None), peer(keyed.port(), key("somebody else's key"))] {
        assert!(!stranger.health_check().await);
        let error = stranger.collect_topology(&BTreeSet::new(), 1).await.unwrap_err().to_string();
        assert!(error.contains("Unauthenticated"), "{error}");
    }
    // A server without the key cannot prove it, so a keyed node finds it unhealthy; to a
    // keyless peer it answers as before.
    let open = nodes[0].server.port();
    assert!(!peer(open, key("a cluster key of ours")).health_check().await);
    assert!(peer(open, None).health_check().await);
    keyed.stop().await.unwrap();
    nodes[0].node.stop().await.unwrap();
}

/// A raw TCP connection to `address`; with `preface`, it opens HTTP/2 as a gRPC client would (the
/// preface and an empty SETTINGS frame) and then neither sends nor acknowledges anything.
async fn raw_connection(address: &str, preface: bool) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    if preface {
        stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0").await.unwrap();
    }
    stream
}

/// Whether the server closes `stream` within `limit` (what it sends meanwhile is read and dropped).
async fn closed_within(stream: &mut tokio::net::TcpStream, limit: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buffer = [0u8; 1024];
    let until_closed = async { while matches!(stream.read(&mut buffer).await, Ok(read) if read > 0) {} };
    tokio::time::timeout(limit, until_closed).await.is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_drops_silent_and_stuck_connections_and_refuses_those_over_its_limit() {
    use crate::net::grpc::ConnectionPolicy;
    let nodes = cluster(&["a"], dummy).await;
    let handler: Arc<dyn RequestHandler> = nodes[0].node.clone();
    let serve = |policy: ConnectionPolicy| async {
        let server = GrpcServer::new(Arc::downgrade(&handler), "127.0.0.1", 0).with_connection_policy(policy);
        server.start().await.unwrap();
        let address = format!("127.0.0.1:{}", server.port());
        (server, address)
    };
    let peer = |address: &str| {
        GrpcPeer::new("a".into(), address.to_string(), String::new(), DeviceCapabilities::unknown())
    };
    let patient =
        ConnectionPolicy { preface_deadline: Duration::from_secs(30), ..ConnectionPolicy::default() };

    // A connection that sends nothing is closed once the preface deadline passes.
    let quick_preface = ConnectionPolicy { preface_deadline: Duration::from_millis(200), ..patient.clone() };
    let (server, address) = serve(quick_preface).await;
    assert!(closed_within(&mut raw_connection(&address, false).await, Duration::from_secs(10)).await);
    server.stop().await.unwrap();

    // One that opened HTTP/2 but stopped reading never answers the server's pings and is dropped;
    // a peer that answers them is served on.
    let quick_pings = ConnectionPolicy {
        keepalive_interval: Duration::from_millis(500),
        keepalive_timeout: Duration::from_millis(500),
        ..patient.clone()
    };
    let (server, address) = serve(quick_pings).await;
    let mut stuck = raw_connection(&address, true).await;
    assert!(!closed_within(&mut stuck, Duration::from_millis(300)).await, "closed before its first ping");
    assert!(closed_within(&mut stuck, Duration::from_secs(20)).await);
    let live = peer(&address);
    assert!(live.health_check().await);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(live.health_check().await);
    server.stop().await.unwrap();

    // Past the limit a connection is closed as it is accepted, a peer's included; a freed slot
    // serves again.
    let (server, address) = serve(ConnectionPolicy { max_connections: 2, ..patient }).await;
    let held = [raw_connection(&address, true).await, raw_connection(&address, true).await];
    assert!(closed_within(&mut raw_connection(&address, false).await, Duration::from_secs(5)).await);
    assert!(!peer(&address).health_check().await);
    drop(held);
    let mut served = false;
    for _ in 0..50 {
        served = peer(&address).health_check().await;
        if served {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served, "a freed slot takes a peer again");
    server.stop().await.unwrap();
    nodes[0].node.stop().await.unwrap();
}

/// A peer that may stop answering while its port stays open (an exo classic node loading its
/// weights) or go away altogether; it refuses requests, or with `swallows` takes tensors and
/// never answers them (a node that dies with a request in hand).
struct SilentPeer {
    identity: crate::net::PeerIdentity,
    answers: std::sync::atomic::AtomicBool,
    reachable: std::sync::atomic::AtomicBool,
    swallows: std::sync::atomic::AtomicBool,
    xotorch: std::sync::atomic::AtomicBool,
}

impl SilentPeer {
    fn new(id: &str) -> Arc<Self> {
        Arc::new(Self {
            identity: crate::net::PeerIdentity::new(id, "127.0.0.1:1", "test"),
            answers: true.into(),
            reachable: true.into(),
            swallows: false.into(),
            xotorch: false.into(),
        })
    }
}

#[async_trait]
impl PeerHandle for SilentPeer {
    fn identity(&self) -> &crate::net::PeerIdentity {
        &self.identity
    }
    fn device_capabilities(&self) -> DeviceCapabilities {
        DeviceCapabilities::unknown()
    }
    async fn connect(&self) -> Result<()> {
        Ok(())
    }
    async fn is_connected(&self) -> bool {
        true
    }
    async fn disconnect(&self) -> Result<()> {
        Ok(())
    }
    async fn health_check(&self) -> bool {
        self.answers.load(std::sync::atomic::Ordering::SeqCst)
    }
    async fn is_reachable(&self) -> bool {
        self.reachable.load(std::sync::atomic::Ordering::SeqCst)
    }
    fn runs_xotorch_core(&self) -> bool {
        self.xotorch.load(std::sync::atomic::Ordering::SeqCst)
    }
    async fn send_prompt(&self, _: &Shard, _: &str, _: &str, _: Option<InferenceState>) -> Result<()> {
        Err(crate::error::Error::Peer("a silent peer takes no prompts".into()))
    }
    async fn send_tensor(&self, _: &Shard, _: WireTensor, _: &str, _: Option<InferenceState>) -> Result<()> {
        if self.swallows.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(());
        }
        Err(crate::error::Error::Peer("a silent peer takes no tensors".into()))
    }
    async fn send_result(&self, _: &str, _: &[u32], _: bool) -> Result<()> {
        Ok(())
    }
    async fn send_opaque_status(&self, _: &str, _: &str) -> Result<()> {
        Ok(())
    }
    async fn collect_topology(&self, _: &BTreeSet<String>, _: i32) -> Result<Topology> {
        Ok(Topology::new())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_may_be_loading_keeps_its_place_for_the_loading_grace_while_its_port_is_open() {
    use std::sync::atomic::Ordering::SeqCst;
    let nodes = cluster(&["a"], dummy).await;
    let a = &nodes[0].node;
    a.set_settings(NodeSettings { loading_grace: Duration::from_millis(500), ..a.settings() });
    let silent = SilentPeer::new("classic");
    *nodes[0].discovery.0.lock().unwrap() = vec![silent.clone()];
    a.update_peers(0).await.unwrap();
    let peer_ids = || a.peers().iter().map(|p| p.id()).collect::<Vec<_>>();
    // It stops answering and discovery loses it (UDP discovery drops peers that fail health checks).
    silent.answers.store(false, SeqCst);
    nodes[0].discovery.0.lock().unwrap().clear();
    let progress =
        r#"{"type": "download_progress", "node_id": "classic", "progress": {"status": "complete"}}"#;
    a.handle_opaque_status(String::new(), progress.into()).await;
    a.update_peers(0).await.unwrap();
    assert_eq!(peer_ids(), ["classic"], "within the grace, with its port open, it stays");
    // Its port closed: the process is gone, grace or not.
    silent.reachable.store(false, SeqCst);
    a.update_peers(0).await.unwrap();
    assert!(peer_ids().is_empty());
    // Port open again but the grace over: gone as well.
    *nodes[0].discovery.0.lock().unwrap() = vec![silent.clone()];
    silent.answers.store(true, SeqCst);
    silent.reachable.store(true, SeqCst);
    a.update_peers(0).await.unwrap();
    assert_eq!(peer_ids(), ["classic"]);
    silent.answers.store(false, SeqCst);
    tokio::time::sleep(Duration::from_millis(600)).await;
    a.update_peers(0).await.unwrap();
    assert!(peer_ids().is_empty());
    a.stop().await.unwrap();
}

/// A context started by `origin` with the plan `layers` (node, first layer, last layer).
fn planned(origin: &str, layers: &[(&str, i32, i32)]) -> Option<InferenceState> {
    let plan = layers
        .iter()
        .map(|&(node_id, start_layer, end_layer)| super::LayerRange {
            node_id: node_id.into(),
            start_layer,
            end_layer,
        })
        .collect();
    super::RequestContext { origin: origin.into(), layers: Some(plan), ..Default::default() }.attach(None)
}

fn token(value: i64) -> WireTensor {
    WireTensor::new(DType::I64, vec![1, 1], value.to_le_bytes().to_vec()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_step_of_an_ended_request_is_refused_with_why_it_ended() {
    let nodes = cluster(&["a"], dummy).await;
    let a = &nodes[0].node;
    a.cancel_request("r").await;
    let state = planned("b", &[("a", 0, 7)]);
    let error = a.handle_tensor(base(), token(5), Some("r".into()), state.clone()).await.unwrap_err();
    assert_eq!(error.kind(), "request_failed");
    let text = error.to_string();
    assert!(
        text.contains("request r has ended on node a: request failed: request r was cancelled"),
        "{text}"
    );
    assert!(a.outstanding_requests().is_empty(), "the step did not start it again");
    // Through gRPC, the sender gets the same error.
    let peer = GrpcPeer::new(
        "a".into(),
        format!("127.0.0.1:{}", nodes[0].server.port()),
        String::new(),
        DeviceCapabilities::unknown(),
    );
    let error = peer.send_tensor(&base(), token(5), "r", state).await.unwrap_err();
    assert!(error.to_string().contains("request r has ended on node a"), "{error}");
    assert!(a.outstanding_requests().is_empty());
    // An exo classic sender's step (no context: classic sends one step past every request's
    // end) is answered as classic answers it, and dropped.
    a.handle_tensor(base(), token(5), Some("r".into()), None).await.unwrap();
    peer.send_tensor(&base(), token(5), "r", None).await.unwrap();
    assert!(a.outstanding_requests().is_empty(), "the classic step did not start it again");
    a.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_origin_left_the_ring_is_ended_here() {
    use std::sync::atomic::Ordering::SeqCst;
    let nodes = cluster(&["b"], dummy).await;
    let b = &nodes[0].node;
    let mut events = b.subscribe();
    let origin = SilentPeer::new("a");
    origin.swallows.store(true, SeqCst);
    *nodes[0].discovery.0.lock().unwrap() = vec![origin.clone()];
    b.update_peers(0).await.unwrap();
    // b runs its layers and hands the request to a, which takes it and dies.
    let state = planned("a", &[("b", 0, 3), ("a", 4, 7)]);
    b.handle_tensor(base(), token(5), Some("r".into()), state).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(b.outstanding_requests(), [("r".to_string(), "waiting")]);
    origin.answers.store(false, SeqCst);
    origin.reachable.store(false, SeqCst);
    nodes[0].discovery.0.lock().unwrap().clear();
    b.update_peers(0).await.unwrap();
    // Past the grace given to an origin discovery has not found yet, b's watch ends it.
    let ended = tokio::time::timeout(super::DISCOVERY_GRACE + Duration::from_secs(5), async {
        loop {
            if let Some(super::NodeEvent::Failed { request_id, error }) = events.recv().await {
                return (request_id, error.to_string());
            }
        }
    })
    .await
    .expect("the orphaned request ends");
    assert_eq!(ended.0, "r");
    assert!(ended.1.contains("node a, which started request r, left the ring"), "{}", ended.1);
    assert!(b.outstanding_requests().is_empty());
    b.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_nodes_request_keeps_its_layers_when_a_node_joins() {
    let engines: Arc<Mutex<Vec<Arc<TestDummy>>>> = Arc::default();
    let made = engines.clone();
    let nodes = cluster(&["a", "b"], move || {
        let engine = Arc::new(TestDummy { step: Duration::from_millis(100), ..Default::default() });
        made.lock().unwrap().push(engine.clone());
        engine as Arc<dyn Engine>
    })
    .await;
    // a starts alone: its discovery does not list b yet.
    let everyone = std::mem::take(&mut *nodes[0].discovery.0.lock().unwrap());
    nodes[0].node.update_peers(0).await.unwrap();
    assert_eq!(nodes[0].node.partitions().len(), 1);
    let (_, mut stream) = nodes[0].node.generate(&base(), "hi", None, GenerateOptions::default()).unwrap();
    assert!(matches!(stream.recv().await, Some(StreamEvent::Token(2))));
    // b joins mid-request: the ring is re-partitioned, the running request keeps its layers.
    *nodes[0].discovery.0.lock().unwrap() = everyone;
    nodes[0].node.update_peers(0).await.unwrap();
    nodes[0].node.collect_topology(BTreeSet::new(), 4).await;
    assert_eq!(nodes[0].node.partitions().len(), 2);
    let (tokens, error) = tokio::time::timeout(Duration::from_secs(10), drain(stream)).await.unwrap();
    assert_eq!((tokens, error), (DUMMY_TOKENS[1..].to_vec(), None));
    let ran: Vec<_> = engines.lock().unwrap().iter().map(|e| e.ran.lock().unwrap().clone()).collect();
    assert_eq!(ran, [BTreeSet::from([(0, 7)]), BTreeSet::new()], "b ran nothing of a's request");
    // The next request uses both nodes.
    let (_, stream) = nodes[0].node.generate(&base(), "hi", None, GenerateOptions::default()).unwrap();
    let (tokens, error) = tokio::time::timeout(Duration::from_secs(10), drain(stream)).await.unwrap();
    assert_eq!((tokens, error), (DUMMY_TOKENS.to_vec(), None));
    assert!(!engines.lock().unwrap()[1].ran.lock().unwrap().is_empty());
    for test in &nodes {
        test.node.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_node_fails_its_requests_as_an_unavailable_peer() {
    let nodes = cluster(&["a", "b"], || TestDummy::slow(Duration::from_millis(200))).await;
    let (_, mut stream) = nodes[0].node.generate(&base(), "hi", None, GenerateOptions::default()).unwrap();
    assert!(matches!(stream.recv().await, Some(StreamEvent::Token(2))));
    assert_eq!(nodes[1].node.outstanding_requests().len(), 1);
    let stopped = std::time::Instant::now();
    nodes[1].node.stop().await.unwrap();
    let failure = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match stream.recv().await {
                Some(StreamEvent::Failed(error)) => return error,
                Some(StreamEvent::Token(_)) => {}
                other => panic!("the request should fail, got {other:?}"),
            }
        }
    })
    .await
    .expect("the origin learns at once");
    assert_eq!(failure.kind(), "peer_unavailable", "{failure}");
    assert!(failure.to_string().contains("node b is stopping"), "{failure}");
    assert!(stopped.elapsed() < Duration::from_secs(2), "took {:?}", stopped.elapsed());
    nodes[0].node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_xotorch_peer_gets_no_loading_grace() {
    use std::sync::atomic::Ordering::SeqCst;
    let nodes = cluster(&["a"], dummy).await;
    let a = &nodes[0].node;
    let frozen = SilentPeer::new("b");
    frozen.xotorch.store(true, SeqCst);
    *nodes[0].discovery.0.lock().unwrap() = vec![frozen.clone()];
    a.update_peers(0).await.unwrap();
    // A request started on the ring marks every peer as maybe loading; b then stops answering
    // with its port open, as a process under SIGSTOP does.
    let start = r#"{"type": "node_status", "node_id": "a", "status": "start_process_prompt"}"#;
    a.handle_opaque_status("r".into(), start.into()).await;
    frozen.answers.store(false, SeqCst);
    a.update_peers(0).await.unwrap();
    assert!(a.peers().is_empty(), "a xotorch-core peer that does not answer leaves at once");
    a.stop().await.unwrap();
}
