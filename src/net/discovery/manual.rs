//! Manual discovery: the peers are listed in a JSON file (exo classic's format), which is
//! re-read whenever it changes; listed peers that pass a health check are the peers.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use indexmap::IndexMap;
use serde::Deserialize;
use tokio::time::{Instant, MissedTickBehavior};

use super::known_peers::{healthy, KnownPeer, KnownPeers};
use super::{BackgroundTasks, CapabilitiesJson};
use crate::error::{Error, Result};
use crate::file_limits::{read_limited, CONFIG_FILE_LIMIT};
use crate::net::{Discovery, PeerFactory, PeerHandle};
use crate::topology::DeviceCapabilities;

/// The description manual peers carry, as in classic.
const DESCRIPTION: &str = "MAN";

/// One node of the network config: where its gRPC server listens and its device.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerConfig {
    /// Host name or address.
    pub address: String,
    /// gRPC port.
    pub port: u16,
    /// The node's device.
    pub device_capabilities: DeviceCapabilities,
}

impl PeerConfig {
    /// `address:port`.
    pub fn addr(&self) -> String {
        format!("{}:{}", self.address, self.port)
    }
}

/// The whole network: every node by id, including the node reading it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NetworkTopology {
    /// Node id to its config, in file order.
    pub peers: IndexMap<String, PeerConfig>,
}

#[derive(Deserialize)]
struct TopologyJson {
    peers: IndexMap<String, PeerJson>,
}

#[derive(Deserialize)]
struct PeerJson {
    address: String,
    port: u16,
    device_capabilities: CapabilitiesJson,
}

impl NetworkTopology {
    /// Reads and validates the config at `path`; a missing file is
    /// [`Error::ConfigNotFound`], anything unreadable or invalid [`Error::InvalidConfig`],
    /// both naming the file.
    pub fn from_path(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = read_limited(path, CONFIG_FILE_LIMIT).map_err(|error| match error.kind() {
            std::io::ErrorKind::NotFound => Error::ConfigNotFound(path.display().to_string()),
            _ => Error::InvalidConfig(format!("cannot read {}: {error}", path.display())),
        })?;
        Self::from_json(&text, &path.display().to_string())
    }

    /// Validates config text; `origin` names where it came from in errors, which read as
    /// classic's (pydantic's) do: `Error validating network topology config from {origin}: 1
    /// validation error for NetworkTopology`, then the field's path and the problem.
    pub fn from_json(text: &str, origin: &str) -> Result<Self> {
        let json: TopologyJson = serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_str(
            text,
        ))
        .map_err(|error| {
            Error::InvalidConfig(format!(
                "Error validating network topology config from {origin}: 1 validation error for \
                     NetworkTopology\n{}",
                validation_detail(&error)
            ))
        })?;
        let peers = json.peers.into_iter().map(|(id, peer)| {
            let device_capabilities = peer.device_capabilities.into();
            (id, PeerConfig { address: peer.address, port: peer.port, device_capabilities })
        });
        Ok(Self { peers: peers.collect() })
    }
}

/// The failing field's dotted path and the problem, in pydantic's layout: `peers.n.port` then
/// `  Field required` for a missing field, `  Invalid JSON: ...` alone for a syntax error.
fn validation_detail(error: &serde_path_to_error::Error<serde_json::Error>) -> String {
    let inner = error.inner();
    if inner.is_syntax() || inner.is_eof() {
        return format!("  Invalid JSON: {inner}");
    }
    let path = error.path().to_string();
    let message = inner.to_string();
    let missing = message.strip_prefix("missing field `").and_then(|rest| rest.split_once('`'));
    match missing {
        Some((field, _)) if path == "." => format!("{field}\n  Field required ({message})"),
        Some((field, _)) => format!("{path}.{field}\n  Field required ({message})"),
        None => format!("{path}\n  {message}"),
    }
}

/// How often the file's modification time is compared.
const FILE_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// How often listed peers are health-checked when the file has not changed.
const HEALTH_CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// Finds peers in a config file; see the module doc.
pub struct ManualDiscovery {
    shared: Arc<Shared>,
    tasks: BackgroundTasks,
}

struct Shared {
    path: PathBuf,
    node_id: String,
    factory: PeerFactory,
    peers: KnownPeers,
    config: Mutex<LoadedConfig>,
}

/// The last config that validated, and the file's state when it was read.
#[derive(Default)]
struct LoadedConfig {
    stamp: Option<FileStamp>,
    others: IndexMap<String, PeerConfig>,
}

/// What tells that the file changed: its modification time and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
}

impl FileStamp {
    fn of(path: &Path) -> std::io::Result<Self> {
        let meta = std::fs::metadata(path)?;
        Ok(Self { modified: meta.modified().ok(), len: meta.len() })
    }
}

impl ManualDiscovery {
    /// A discovery reading `path` for node `node_id`; nothing is read until `start`.
    pub fn new(path: impl Into<PathBuf>, node_id: impl Into<String>, factory: PeerFactory) -> Self {
        let shared = Shared {
            path: path.into(),
            node_id: node_id.into(),
            factory,
            peers: KnownPeers::new(),
            config: Mutex::default(),
        };
        Self { shared: Arc::new(shared), tasks: BackgroundTasks::default() }
    }

    /// The config file.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.shared.node_id
    }
}

impl Shared {
    /// The other nodes of the config at `path`, or why it cannot be used.
    fn read_others(&self) -> Result<IndexMap<String, PeerConfig>> {
        let mut topology = NetworkTopology::from_path(&self.path)?;
        if topology.peers.shift_remove(&self.node_id).is_none() {
            let ids: Vec<&String> = topology.peers.keys().collect();
            return Err(Error::InvalidConfig(format!(
                "node id {} not found in network config file {}; run with the node id set to one of {ids:?}",
                self.node_id,
                self.path.display()
            )));
        }
        Ok(topology.peers)
    }

    fn loaded(&self) -> std::sync::MutexGuard<'_, LoadedConfig> {
        self.config.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Re-reads the file if it changed; true when a new config was taken. A file that went
    /// missing or invalid keeps the last good config and logs why.
    fn reload_if_changed(&self) -> bool {
        let stamp = match FileStamp::of(&self.path) {
            Ok(stamp) => stamp,
            Err(error) => {
                log::warn!(
                    "cannot read network config {}: {error}; keeping the last peers",
                    self.path.display()
                );
                return false;
            }
        };
        if self.loaded().stamp == Some(stamp) {
            return false;
        }
        let result = self.read_others();
        let mut loaded = self.loaded();
        loaded.stamp = Some(stamp);
        match result {
            Ok(others) => {
                loaded.others = others;
                true
            }
            Err(error) => {
                log::warn!("{error}; keeping the last good peers");
                false
            }
        }
    }

    /// Health-checks every configured peer (reusing handles whose address is unchanged) and
    /// makes the healthy ones the known peers.
    async fn refresh_peers(&self) {
        let others = self.loaded().others.clone();
        let known = self.peers.snapshot();
        let candidates: Vec<(String, String, Arc<dyn PeerHandle>)> = others
            .into_iter()
            .map(|(id, config)| {
                let addr = config.addr();
                let handle = match known.get(&id) {
                    Some(peer) if peer.addr == addr => peer.handle.clone(),
                    _ => (self.factory)(
                        id.clone(),
                        addr.clone(),
                        DESCRIPTION.into(),
                        config.device_capabilities,
                    ),
                };
                (id, addr, handle)
            })
            .collect();
        let checks = candidates.iter().map(|(_, _, handle)| healthy(handle.as_ref()));
        let results = futures::future::join_all(checks).await;
        let now = Instant::now();
        let next = candidates
            .into_iter()
            .zip(results)
            .filter(|((id, addr, _), ok)| {
                if !ok {
                    log::debug!("configured peer {id} at {addr} failed its health check; leaving it out");
                }
                *ok
            })
            .map(|((id, addr, handle), _)| (id, KnownPeer { handle, addr, last_seen: now, priority: 0 }))
            .collect();
        self.peers.replace_all(next);
    }
}

/// Watches the file and re-checks peers until stopped.
async fn watch_config(shared: Arc<Shared>) {
    let mut ticks = tokio::time::interval(FILE_POLL_INTERVAL);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_check: Option<Instant> = None;
    loop {
        ticks.tick().await;
        let changed = shared.reload_if_changed();
        let due = last_check.is_none_or(|at| at.elapsed() >= HEALTH_CHECK_INTERVAL);
        if changed || due {
            shared.refresh_peers().await;
            last_check = Some(Instant::now());
        }
    }
}

#[async_trait]
impl Discovery for ManualDiscovery {
    /// Reads the config (a missing or invalid file is an error naming it), then watches it.
    async fn start(&self) -> Result<()> {
        if self.tasks.running() {
            return Ok(());
        }
        let stamp = FileStamp::of(&self.shared.path).ok();
        let others = self.shared.read_others()?;
        *self.shared.loaded() = LoadedConfig { stamp, others };
        self.tasks.push(tokio::spawn(watch_config(self.shared.clone())));
        Ok(())
    }

    async fn stop(&self) -> Result<()> {
        self.tasks.stop().await;
        Ok(())
    }

    async fn discover_peers(&self, wait_for_peers: usize) -> Result<Vec<Arc<dyn PeerHandle>>> {
        Ok(self.shared.peers.wait_for(wait_for_peers).await)
    }
}

#[cfg(test)]
mod tests {
    use super::super::fake::FakeFactory;
    use super::*;

    const TWO_NODES: &str = r#"{
      "peers": {
        "node1": {"address": "localhost", "port": 50051, "device_capabilities":
          {"model": "Unknown Model", "chip": "Unknown Chip", "memory": 0, "flops": {"fp32": 0, "fp16": 0, "int8": 0}}},
        "node2": {"address": "localhost", "port": 50052, "device_capabilities":
          {"model": "Unknown Model", "chip": "Unknown Chip", "memory": 0, "flops": {"fp32": 0, "fp16": 0, "int8": 0}}}
      }
    }"#;

    fn node(port: u16) -> serde_json::Value {
        serde_json::json!({"address": "127.0.0.1", "port": port, "device_capabilities":
            {"model": "M", "chip": "C", "memory": 8, "flops": {"fp32": 1.5, "fp16": 3, "int8": 6}}})
    }

    #[test]
    fn a_valid_config_parses() {
        let topology = NetworkTopology::from_json(TWO_NODES, "test").unwrap();
        assert_eq!(topology.peers.keys().collect::<Vec<_>>(), ["node1", "node2"]);
        let node2 = &topology.peers["node2"];
        assert_eq!(
            (node2.address.as_str(), node2.port, node2.addr()),
            ("localhost", 50052, "localhost:50052".into())
        );
        assert_eq!(node2.device_capabilities, DeviceCapabilities::unknown());
    }

    #[test]
    fn invalid_configs_name_the_file_and_the_problem() {
        let empty = NetworkTopology::from_json("", "empty.json").unwrap_err().to_string();
        assert_eq!(
            empty,
            "Error validating network topology config from empty.json: 1 validation error for \
             NetworkTopology\n  Invalid JSON: EOF while parsing a value at line 1 column 0"
        );
        let no_port = r#"{"peers": {"n": {"address": "h", "device_capabilities": {"model": "m", "chip": "c", "memory": 0, "flops": {"fp32": 0, "fp16": 0, "int8": 0}}}}}"#;
        let error = NetworkTopology::from_json(no_port, "cfg.json").unwrap_err();
        assert!(matches!(error, Error::InvalidConfig(_)));
        assert!(error.to_string().contains("cfg.json"), "{error}");
        assert!(
            error.to_string().contains("\npeers.n.port\n  Field required (missing field `port`"),
            "{error}"
        );
        let wrong_type = r#"{"peers": {"n": {"address": 7}}}"#;
        let error = NetworkTopology::from_json(wrong_type, "x").unwrap_err().to_string();
        assert!(
            error.contains("\npeers.n.address\n  invalid type: integer `7`, expected a string"),
            "{error}"
        );
        let bad_port = r#"{"peers": {"n": {"address": "h", "port": 70000}}}"#;
        assert!(NetworkTopology::from_json(bad_port, "x").unwrap_err().to_string().contains("70000"));
        assert!(NetworkTopology::from_json(r#"{"nodes": {}}"#, "x")
            .unwrap_err()
            .to_string()
            .contains("`peers`"));
    }

    #[test]
    fn a_missing_file_is_config_not_found() {
        let error = NetworkTopology::from_path("/nonexistent/topology.json").unwrap_err();
        assert!(matches!(error, Error::ConfigNotFound(_)));
        assert_eq!(error.to_string(), "Config file not found at /nonexistent/topology.json");
    }

    struct TempConfig(PathBuf);

    impl TempConfig {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("xotorch-manual-{}-{name}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir.join("topology.json"))
        }

        fn write(&self, peers: serde_json::Value) {
            self.write_text(&serde_json::json!({ "peers": peers }).to_string());
        }

        fn write_text(&self, text: &str) {
            // Write aside and rename, so the watcher never reads a half-written file.
            let aside = self.0.with_extension("tmp");
            std::fs::write(&aside, text).unwrap();
            std::fs::rename(&aside, &self.0).unwrap();
        }
    }

    impl Drop for TempConfig {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(self.0.parent().unwrap());
        }
    }

    fn ids(peers: &[Arc<dyn PeerHandle>]) -> Vec<String> {
        let mut ids: Vec<String> = peers.iter().map(|p| p.id()).collect();
        ids.sort();
        ids
    }

    #[tokio::test]
    async fn start_fails_clearly_on_missing_invalid_or_foreign_configs() {
        let fakes = FakeFactory::new();
        let config = TempConfig::new("start");
        let discovery = ManualDiscovery::new(&config.0, "node1", fakes.factory());
        assert!(matches!(discovery.start().await.unwrap_err(), Error::ConfigNotFound(_)));
        config.write_text("{not json");
        let error = discovery.start().await.unwrap_err();
        assert!(error.to_string().contains(&config.0.display().to_string()), "{error}");
        config.write(serde_json::json!({"node2": node(2)}));
        let error = discovery.start().await.unwrap_err().to_string();
        assert!(error.contains("node1") && error.contains("node2"), "{error}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_single_node_config_finds_no_peers() {
        let fakes = FakeFactory::new();
        let config = TempConfig::new("single");
        config.write(serde_json::json!({"node1": node(1)}));
        let discovery = ManualDiscovery::new(&config.0, "node1", fakes.factory());
        discovery.start().await.unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(discovery.discover_peers(0).await.unwrap().is_empty());
        assert!(fakes.made.lock().unwrap().is_empty());
        discovery.stop().await.unwrap();
    }

    #[tokio::test]
    async fn config_edits_add_and_remove_peers_and_bad_edits_keep_the_last_good_ones() {
        let fakes = FakeFactory::new();
        let config = TempConfig::new("edits");
        config.write(serde_json::json!({"node1": node(1), "node2": node(2)}));
        let discovery = ManualDiscovery::new(&config.0, "node1", fakes.factory());
        discovery.start().await.unwrap();
        let wait = Duration::from_secs(20);
        let peers = tokio::time::timeout(wait, discovery.discover_peers(1)).await.unwrap().unwrap();
        assert_eq!(ids(&peers), ["node2"]);
        assert_eq!(peers[0].addr(), "127.0.0.1:2");
        assert_eq!(peers[0].description(), "MAN");

        config.write(serde_json::json!({"node1": node(1), "node2": node(2), "node3": node(3)}));
        let peers = tokio::time::timeout(wait, discovery.discover_peers(2)).await.unwrap().unwrap();
        assert_eq!(ids(&peers), ["node2", "node3"]);

        config.write_text("{\"peers\": {\"node1\": ");
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(ids(&discovery.discover_peers(0).await.unwrap()), ["node2", "node3"]);

        config.write(serde_json::json!({"node1": node(1), "node3": node(3)}));
        let deadline = Instant::now() + wait;
        while ids(&discovery.discover_peers(0).await.unwrap()) != ["node3"] {
            assert!(Instant::now() < deadline, "node2 was never dropped");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        discovery.stop().await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn unhealthy_listed_peers_are_not_returned() {
        let fakes = FakeFactory::new();
        fakes.set_healthy(false);
        let config = TempConfig::new("unhealthy");
        config.write(serde_json::json!({"node1": node(1), "node2": node(2)}));
        let discovery = ManualDiscovery::new(&config.0, "node1", fakes.factory());
        discovery.start().await.unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(discovery.discover_peers(0).await.unwrap().is_empty());
        assert!(!fakes.made.lock().unwrap().is_empty());
        fakes.set_healthy(true);
        tokio::time::sleep(HEALTH_CHECK_INTERVAL + Duration::from_secs(1)).await;
        assert_eq!(ids(&discovery.discover_peers(0).await.unwrap()), ["node2"]);
        discovery.stop().await.unwrap();
    }
}
