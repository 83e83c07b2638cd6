//! UDP broadcast discovery, wire-compatible with exo classic: every node announces itself
//! from each IPv4 address and listens for the announcements of others. With a cluster key,
//! announcements carry a proof of it (`xot_auth`, which classic ignores), and only those with
//! a valid, fresh, unreplayed proof are heard.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};

use super::datagram_gate::DatagramGate;
use super::interfaces::{local_ipv4_interfaces, NetworkInterface};
use super::known_peers::{healthy, KnownPeer, KnownPeers, Sighting};
use super::{own_capabilities, BackgroundTasks, CapabilitiesJson};
use crate::error::{Error, Result};
use crate::net::cluster_key::{ClusterKey, ProofChecker, Purpose, Rejection, Strangers};
use crate::net::{Discovery, PeerFactory, PeerHandle};
use crate::topology::DeviceCapabilities;

/// The `type` every presence message carries.
const MESSAGE_TYPE: &str = "discovery";
/// Largest datagram read (UDP's own limit), so that a datagram over the gate's limit is seen
/// whole and dropped rather than parsed cut short.
const MAX_DATAGRAM: usize = 64 * 1024;

/// The presence message, field for field (and in order) as exo classic sends it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PresenceMessage {
    /// Always `"discovery"`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The sender's node id.
    pub node_id: String,
    /// Port of the sender's gRPC server.
    pub grpc_port: u16,
    /// The sender's device.
    pub device_capabilities: CapabilitiesJson,
    /// Priority of the interface the message was sent from.
    pub priority: i64,
    /// Name of that interface.
    pub interface_name: String,
    /// Type of that interface (`"Ethernet"`, `"Loopback"`, ...).
    pub interface_type: String,
    /// Proof of the cluster key over the rest of the message, when the sender has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xot_auth: Option<String>,
}

impl PresenceMessage {
    /// Parses a datagram; anything but a well-formed `discovery` message is an error.
    pub fn parse(datagram: &[u8]) -> std::result::Result<Self, String> {
        let text = String::from_utf8_lossy(datagram);
        let trimmed = text.trim();
        if !trimmed.starts_with('{') {
            return Err("not a JSON object".into());
        }
        let message: Self = serde_json::from_str(trimmed).map_err(|e| e.to_string())?;
        if message.kind != MESSAGE_TYPE {
            return Err(format!("message type {:?} is not {MESSAGE_TYPE:?}", message.kind));
        }
        Ok(message)
    }

    /// The datagram: compact JSON.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a presence message always serializes")
    }

    /// What a proof of the cluster key covers: the datagram without the proof.
    fn proven_bytes(&self) -> Vec<u8> {
        Self { xot_auth: None, ..self.clone() }.to_bytes()
    }
}

/// Settings of a [`UdpDiscovery`]; `new` fills classic's defaults.
#[derive(Debug, Clone)]
pub struct UdpConfig {
    /// This node's id (its own messages are ignored).
    pub node_id: String,
    /// This node's gRPC port, announced to peers.
    pub node_port: u16,
    /// Port to listen on for presence messages.
    pub listen_port: u16,
    /// Port presence messages are sent to.
    pub broadcast_port: u16,
    /// Time between announcements (and between peer health checks); classic: 2.5 s.
    pub broadcast_interval: Duration,
    /// A peer silent for this long is dropped; classic: 30 s.
    pub discovery_timeout: Duration,
    /// Capabilities to announce; `None` detects this machine's when starting.
    pub device_capabilities: Option<DeviceCapabilities>,
    /// When set, only these node ids are accepted.
    pub allowed_node_ids: Option<Vec<String>>,
    /// When set, only announcements sent over these interface types are accepted, and this
    /// node announces itself only on interfaces of these types.
    pub allowed_interface_types: Option<Vec<String>>,
    /// When set, announcements are signed with it and only those proving it are accepted.
    pub cluster_key: Option<ClusterKey>,
}

impl UdpConfig {
    /// Classic's defaults for everything but the ids and ports.
    pub fn new(node_id: impl Into<String>, node_port: u16, listen_port: u16, broadcast_port: u16) -> Self {
        Self {
            node_id: node_id.into(),
            node_port,
            listen_port,
            broadcast_port,
            broadcast_interval: Duration::from_millis(2500),
            discovery_timeout: Duration::from_secs(30),
            device_capabilities: None,
            allowed_node_ids: None,
            allowed_interface_types: None,
            cluster_key: None,
        }
    }

    /// Why an announcement is not for us, or `None` when it should be considered.
    pub fn rejection(&self, message: &PresenceMessage) -> Option<String> {
        if message.node_id == self.node_id {
            return Some("own announcement".into());
        }
        if let Some(allowed) = &self.allowed_node_ids {
            if !allowed.contains(&message.node_id) {
                return Some(format!("node id {} is not allowed", message.node_id));
            }
        }
        if !self.interface_type_allowed(&message.interface_type) {
            return Some(format!("interface type {} is not allowed", message.interface_type));
        }
        None
    }

    fn interface_type_allowed(&self, kind: &str) -> bool {
        self.allowed_interface_types.as_ref().is_none_or(|allowed| allowed.iter().any(|a| a == kind))
    }
}

/// Finds peers by UDP broadcast; see the module doc.
pub struct UdpDiscovery {
    shared: Arc<Shared>,
    tasks: BackgroundTasks,
}

/// What the background tasks share.
struct Shared {
    config: UdpConfig,
    factory: PeerFactory,
    peers: KnownPeers,
    capabilities: Mutex<Option<DeviceCapabilities>>,
    /// Health checks of newly seen peers in flight; aborted when stopping.
    checks: Mutex<JoinSet<()>>,
    /// Checks announcements' proofs of the cluster key, when there is one.
    proofs: Option<ProofChecker>,
    /// Senders refused for want of the key, each logged once.
    strangers: Strangers,
}

/// A claim on checking one peer at one address, released when the check ends or is aborted.
struct CheckClaim {
    shared: Arc<Shared>,
    id: String,
    addr: String,
}

impl Drop for CheckClaim {
    fn drop(&mut self) {
        self.shared.peers.end_check(&self.id, &self.addr);
    }
}

impl UdpDiscovery {
    /// A discovery with these settings, making handles with `factory`; nothing runs until
    /// `start`.
    pub fn new(config: UdpConfig, factory: PeerFactory) -> Self {
        let shared = Shared {
            proofs: config.cluster_key.clone().map(ProofChecker::new),
            config,
            factory,
            peers: KnownPeers::new(),
            capabilities: Mutex::new(None),
            checks: Mutex::default(),
            strangers: Strangers::default(),
        };
        Self { shared: Arc::new(shared), tasks: BackgroundTasks::default() }
    }

    /// The settings.
    pub fn config(&self) -> &UdpConfig {
        &self.shared.config
    }

    /// The capabilities announced (those detected once started).
    pub fn device_capabilities(&self) -> Option<DeviceCapabilities> {
        let announced = self.shared.capabilities.lock().unwrap_or_else(|p| p.into_inner()).clone();
        announced.or_else(|| self.shared.config.device_capabilities.clone())
    }
}

#[async_trait]
impl Discovery for UdpDiscovery {
    async fn start(&self) -> Result<()> {
        if self.tasks.running() {
            return Ok(());
        }
        let config = &self.shared.config;
        let listener = bind_listener(config.listen_port)?;
        let caps = own_capabilities(config.device_capabilities.clone()).await;
        *self.shared.capabilities.lock().unwrap_or_else(|p| p.into_inner()) = Some(caps.clone());
        self.tasks.push(tokio::spawn(listen(self.shared.clone(), listener)));
        self.tasks.push(tokio::spawn(announce(self.shared.clone(), caps)));
        self.tasks.push(tokio::spawn(sweep(self.shared.clone())));
        Ok(())
    }

    async fn stop(&self) -> Result<()> {
        self.tasks.stop().await;
        let mut checks = std::mem::take(&mut *self.shared.checks.lock().unwrap_or_else(|p| p.into_inner()));
        checks.shutdown().await;
        Ok(())
    }

    async fn discover_peers(&self, wait_for_peers: usize) -> Result<Vec<Arc<dyn PeerHandle>>> {
        Ok(self.shared.peers.wait_for(wait_for_peers).await)
    }
}

/// A socket on `0.0.0.0:port` that shares the port with other listeners on this host and
/// receives broadcasts.
fn bind_listener(port: u16) -> Result<UdpSocket> {
    let fail = |e: std::io::Error| Error::Discovery(format!("cannot listen on UDP port {port}: {e}"));
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(fail)?;
    socket.set_reuse_address(true).map_err(fail)?;
    #[cfg(all(unix, not(any(target_os = "solaris", target_os = "illumos"))))]
    socket.set_reuse_port(true).map_err(fail)?;
    socket.set_broadcast(true).map_err(fail)?;
    socket.set_nonblocking(true).map_err(fail)?;
    socket.bind(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port).into()).map_err(fail)?;
    UdpSocket::from_std(socket.into()).map_err(fail)
}

/// A broadcast-capable socket bound to one of this host's addresses.
fn bind_sender(ip: Ipv4Addr) -> std::io::Result<UdpSocket> {
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_broadcast(true)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&SocketAddrV4::new(ip, 0).into())?;
    UdpSocket::from_std(socket.into())
}

/// Receives presence messages until stopped; datagrams the gate drops are not parsed, bad ones
/// are logged and skipped.
async fn listen(shared: Arc<Shared>, socket: UdpSocket) {
    let mut buffer = vec![0u8; MAX_DATAGRAM];
    let mut gate = DatagramGate::default();
    loop {
        let (len, from) = match socket.recv_from(&mut buffer).await {
            Ok(received) => received,
            Err(error) => {
                log::debug!("UDP discovery receive failed: {error}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if gate.admit(from.ip(), len, std::time::Instant::now()).is_err() {
            continue;
        }
        match PresenceMessage::parse(&buffer[..len]) {
            Ok(message) => on_presence(&shared, message, from),
            Err(reason) => log::debug!("ignoring datagram from {from}: {reason}"),
        }
    }
}

/// Handles one announcement: refreshes a known peer, or checks a new one (or one on a
/// higher priority interface) in the background and adds it once healthy.
fn on_presence(shared: &Arc<Shared>, message: PresenceMessage, from: SocketAddr) {
    if let Some(reason) = shared.config.rejection(&message) {
        log::trace!("ignoring announcement from {from}: {reason}");
        return;
    }
    if !proves_cluster_key(shared, &message, from) {
        return;
    }
    let addr = format!("{}:{}", from.ip(), message.grpc_port);
    match shared.peers.sighted(&message.node_id, &addr, message.priority) {
        Sighting::Refreshed => return,
        Sighting::ElsewhereWithPriority(known) if known >= message.priority => return,
        Sighting::ElsewhereWithPriority(_) | Sighting::New => {}
    }
    if !shared.peers.begin_check(&message.node_id, &addr) {
        return;
    }
    let claim = CheckClaim { shared: shared.clone(), id: message.node_id.clone(), addr };
    let mut checks = shared.checks.lock().unwrap_or_else(|p| p.into_inner());
    while checks.try_join_next().is_some() {}
    checks.spawn(admit(claim, message));
}

/// Whether an announcement proves the cluster key (always, without one). A sender without the
/// key is logged once; a replay (or the same datagram twice, by two routes) is dropped quietly.
fn proves_cluster_key(shared: &Shared, message: &PresenceMessage, from: SocketAddr) -> bool {
    let Some(proofs) = &shared.proofs else { return true };
    let rejection =
        match proofs.check(message.xot_auth.as_deref(), Purpose::Announcement, &message.proven_bytes()) {
            Ok(_) => return true,
            Err(rejection) => rejection,
        };
    let stranger = format!("node {} at {}", message.node_id, from.ip());
    if rejection == Rejection::Replayed || !shared.strangers.first_refusal(&stranger) {
        log::trace!("ignoring announcement of {stranger}: {rejection}");
    } else {
        log::warn!("ignoring announcements of {stranger}: {rejection} (logged once)");
    }
    false
}

/// Makes a handle for a newly seen peer and adds it if its health check passes.
async fn admit(claim: CheckClaim, message: PresenceMessage) {
    let (shared, addr) = (claim.shared.clone(), claim.addr.clone());
    let description = format!("{} ({})", message.interface_type, message.interface_name);
    let caps = DeviceCapabilities::from(message.device_capabilities);
    let handle = (shared.factory)(message.node_id.clone(), addr.clone(), description, caps);
    let ok = healthy(handle.as_ref()).await;
    drop(claim);
    if !ok {
        log::debug!("peer {} at {addr} failed its health check; not adding it", message.node_id);
        return;
    }
    let peer =
        KnownPeer { handle, addr: addr.clone(), last_seen: Instant::now(), priority: message.priority };
    if shared.peers.insert(&message.node_id, peer, true) {
        log::info!("added peer {} at {addr} (priority {})", message.node_id, message.priority);
    }
}

/// Announces this node on every allowed interface, once per broadcast interval.
async fn announce(shared: Arc<Shared>, caps: DeviceCapabilities) {
    let config = &shared.config;
    let mut ticks = tokio::time::interval(config.broadcast_interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        for interface in local_ipv4_interfaces() {
            if !config.interface_type_allowed(interface.kind().as_str()) {
                continue;
            }
            if let Err(error) = announce_on(config, &caps, &interface).await {
                log::debug!("cannot announce on {} ({}): {error}", interface.name, interface.ip);
            }
        }
    }
}

/// Sends one presence message from `interface` to each of its broadcast targets.
async fn announce_on(
    config: &UdpConfig,
    caps: &DeviceCapabilities,
    interface: &NetworkInterface,
) -> std::io::Result<()> {
    let kind = interface.kind();
    let mut message = PresenceMessage {
        kind: MESSAGE_TYPE.into(),
        node_id: config.node_id.clone(),
        grpc_port: config.node_port,
        device_capabilities: caps.into(),
        priority: kind.priority(),
        interface_name: interface.name.clone(),
        interface_type: kind.as_str().into(),
        xot_auth: None,
    };
    if let Some(key) = &config.cluster_key {
        message.xot_auth = Some(key.prove(Purpose::Announcement, &message.proven_bytes()).to_string());
    }
    let datagram = message.to_bytes();
    let socket = bind_sender(interface.ip)?;
    for target in interface.broadcast_targets() {
        socket.send_to(&datagram, SocketAddrV4::new(target, config.broadcast_port)).await?;
    }
    Ok(())
}

/// Drops silent and unhealthy peers, once per broadcast interval.
async fn sweep(shared: Arc<Shared>) {
    let mut ticks = tokio::time::interval(shared.config.broadcast_interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        shared.peers.sweep(shared.config.discovery_timeout).await;
    }
}

#[cfg(test)]
mod tests {
    use super::super::fake::FakeFactory;
    use super::*;
    use crate::topology::DeviceFlops;

    fn caps() -> DeviceCapabilities {
        DeviceCapabilities::new("Test Box", "Test Chip", 1024, DeviceFlops::new(1.0, 2.0, 4.0))
    }

    fn message(node_id: &str, priority: i64, interface_type: &str) -> PresenceMessage {
        PresenceMessage {
            kind: "discovery".into(),
            node_id: node_id.into(),
            grpc_port: 50051,
            device_capabilities: (&caps()).into(),
            priority,
            interface_name: "eth0".into(),
            interface_type: interface_type.into(),
            xot_auth: None,
        }
    }

    fn from(ip: [u8; 4]) -> SocketAddr {
        SocketAddr::from((ip, 5678))
    }

    #[test]
    fn presence_message_matches_classic_json() {
        let json = String::from_utf8(message("a", 4, "Ethernet").to_bytes()).unwrap();
        assert_eq!(
            json,
            r#"{"type":"discovery","node_id":"a","grpc_port":50051,"device_capabilities":{"model":"Test Box","chip":"Test Chip","memory":1024,"flops":{"fp32":1.0,"fp16":2.0,"int8":4.0}},"priority":4,"interface_name":"eth0","interface_type":"Ethernet"}"#
        );
        let classic = br#"{"type": "discovery", "node_id": "b", "grpc_port": 5, "device_capabilities": {"model": "M", "chip": "C", "memory": 0, "flops": {"fp32": 0, "fp16": 0, "int8": 0}}, "priority": 6, "interface_name": "lo", "interface_type": "Loopback"}"#;
        let parsed = PresenceMessage::parse(classic).unwrap();
        assert_eq!((parsed.node_id.as_str(), parsed.grpc_port, parsed.priority), ("b", 5, 6));
        assert_eq!(
            PresenceMessage::parse(&message("a", 4, "Ethernet").to_bytes()).unwrap(),
            message("a", 4, "Ethernet")
        );
    }

    #[test]
    fn malformed_datagrams_are_rejected() {
        let bad: [&[u8]; 6] = [
            b"",
            b"hello",
            b"\xff\xfe\x00",
            b"{\"type\": \"discovery\"",
            br#"{"type": "other", "node_id": "b"}"#,
            br#"{"type": "discovery", "node_id": "b", "grpc_port": "x"}"#,
        ];
        for datagram in bad {
            assert!(PresenceMessage::parse(datagram).is_err(), "{datagram:?}");
        }
        let missing_caps = br#"{"type": "discovery", "node_id": "b", "grpc_port": 1, "priority": 1, "interface_name": "e", "interface_type": "Other"}"#;
        assert!(PresenceMessage::parse(missing_caps).unwrap_err().contains("device_capabilities"));
    }

    #[test]
    fn filters_reject_own_and_disallowed_announcements() {
        let mut config = UdpConfig::new("me", 1, 2, 3);
        assert!(config.rejection(&message("me", 4, "Ethernet")).is_some());
        assert!(config.rejection(&message("you", 4, "Ethernet")).is_none());
        config.allowed_node_ids = Some(vec!["friend".into()]);
        assert!(config.rejection(&message("you", 4, "Ethernet")).unwrap().contains("you"));
        assert!(config.rejection(&message("friend", 4, "Ethernet")).is_none());
        config.allowed_interface_types = Some(vec!["Loopback".into()]);
        assert!(config.rejection(&message("friend", 4, "Ethernet")).unwrap().contains("Ethernet"));
        assert!(config.rejection(&message("friend", 6, "Loopback")).is_none());
    }

    /// Lets spawned tasks (health checks) run to completion under paused time.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_is_kept_on_its_highest_priority_interface() {
        let fakes = FakeFactory::new();
        let discovery = UdpDiscovery::new(UdpConfig::new("me", 1, 2, 3), fakes.factory());
        let shared = &discovery.shared;

        on_presence(shared, message("peer", 3, "WiFi"), from([10, 0, 0, 2]));
        settle().await;
        let peers = discovery.discover_peers(1).await.unwrap();
        assert_eq!(peers[0].addr(), "10.0.0.2:50051");

        on_presence(shared, message("peer", 4, "Ethernet"), from([10, 0, 1, 2]));
        settle().await;
        let peers = discovery.discover_peers(1).await.unwrap();
        assert_eq!((peers.len(), peers[0].addr()), (1, "10.0.1.2:50051".to_string()));
        assert_eq!(peers[0].description(), "Ethernet (eth0)");

        on_presence(shared, message("peer", 3, "WiFi"), from([10, 0, 0, 2]));
        on_presence(shared, message("peer", 4, "Ethernet"), from([10, 0, 0, 9]));
        settle().await;
        let peers = discovery.discover_peers(1).await.unwrap();
        assert_eq!(peers[0].addr(), "10.0.1.2:50051");
        assert_eq!(fakes.made.lock().unwrap().len(), 2, "lower or equal priority makes no handle");
    }

    #[tokio::test(start_paused = true)]
    async fn an_unhealthy_peer_is_not_added() {
        let fakes = FakeFactory::new();
        fakes.set_healthy(false);
        let discovery = UdpDiscovery::new(UdpConfig::new("me", 1, 2, 3), fakes.factory());
        on_presence(&discovery.shared, message("peer", 4, "Ethernet"), from([10, 0, 0, 2]));
        settle().await;
        assert!(discovery.discover_peers(0).await.unwrap().is_empty());
        assert_eq!(fakes.made.lock().unwrap().len(), 1);

        fakes.set_healthy(true);
        on_presence(&discovery.shared, message("peer", 4, "Ethernet"), from([10, 0, 0, 2]));
        settle().await;
        assert_eq!(discovery.discover_peers(0).await.unwrap().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn stopping_aborts_pending_checks_and_frees_their_claims() {
        let fakes = FakeFactory::new();
        fakes.hang.store(true, std::sync::atomic::Ordering::SeqCst);
        let discovery = UdpDiscovery::new(UdpConfig::new("me", 1, 2, 3), fakes.factory());
        on_presence(&discovery.shared, message("peer", 4, "Ethernet"), from([10, 0, 0, 2]));
        settle().await;
        on_presence(&discovery.shared, message("peer", 4, "Ethernet"), from([10, 0, 0, 2]));
        assert_eq!(fakes.made.lock().unwrap().len(), 1, "one check per peer and address at a time");
        discovery.stop().await.unwrap();

        fakes.hang.store(false, std::sync::atomic::Ordering::SeqCst);
        on_presence(&discovery.shared, message("peer", 4, "Ethernet"), from([10, 0, 0, 2]));
        settle().await;
        assert_eq!(discovery.discover_peers(1).await.unwrap()[0].id(), "peer");
        assert_eq!(fakes.made.lock().unwrap().len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn silent_and_unhealthy_peers_are_dropped() {
        let fakes = FakeFactory::new();
        let discovery = UdpDiscovery::new(UdpConfig::new("me", 1, 2, 3), fakes.factory());
        let shared = &discovery.shared;
        let timeout = shared.config.discovery_timeout;
        on_presence(shared, message("quiet", 4, "Ethernet"), from([10, 0, 0, 2]));
        on_presence(shared, message("chatty", 4, "Ethernet"), from([10, 0, 0, 3]));
        settle().await;
        assert_eq!(discovery.discover_peers(2).await.unwrap().len(), 2);

        tokio::time::advance(timeout / 2).await;
        on_presence(shared, message("chatty", 4, "Ethernet"), from([10, 0, 0, 3]));
        tokio::time::advance(timeout / 2 + Duration::from_secs(1)).await;
        assert_eq!(shared.peers.sweep(timeout).await, ["quiet"]);
        let peers = discovery.discover_peers(0).await.unwrap();
        assert_eq!(peers.iter().map(|p| p.id()).collect::<Vec<_>>(), ["chatty"]);

        fakes.set_healthy(false);
        assert_eq!(shared.peers.sweep(timeout).await, ["chatty"]);
        assert!(discovery.discover_peers(0).await.unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn discover_peers_waits_for_enough_peers() {
        let fakes = FakeFactory::new();
        let discovery = Arc::new(UdpDiscovery::new(UdpConfig::new("me", 1, 2, 3), fakes.factory()));
        let waiting = tokio::spawn({
            let discovery = discovery.clone();
            async move { discovery.discover_peers(2).await.unwrap().len() }
        });
        on_presence(&discovery.shared, message("a", 4, "Ethernet"), from([10, 0, 0, 2]));
        settle().await;
        assert!(!waiting.is_finished());
        on_presence(&discovery.shared, message("b", 4, "Ethernet"), from([10, 0, 0, 3]));
        assert_eq!(waiting.await.unwrap(), 2);
    }

    fn keyed(text: &str) -> Option<ClusterKey> {
        Some(ClusterKey::new(text).unwrap())
    }

    fn signed(message: PresenceMessage, key: &str) -> PresenceMessage {
        let proof = keyed(key).unwrap().prove(Purpose::Announcement, &message.proven_bytes());
        PresenceMessage { xot_auth: Some(proof.to_string()), ..message }
    }

    #[test]
    fn a_signed_announcement_is_classic_json_with_one_more_field() {
        let message = signed(message("a", 4, "Ethernet"), "a cluster key of ours");
        let json: serde_json::Value = serde_json::from_slice(&message.to_bytes()).unwrap();
        let fields: Vec<_> = json.as_object().unwrap().keys().cloned().collect();
        assert_eq!(fields.last().map(String::as_str), Some("xot_auth"));
        assert_eq!(PresenceMessage::parse(&message.to_bytes()).unwrap(), message);
    }

    #[tokio::test(start_paused = true)]
    async fn with_a_key_only_fresh_proven_announcements_are_heard() {
        let fakes = FakeFactory::new();
        let mut config = UdpConfig::new("me", 1, 2, 3);
        config.cluster_key = keyed("a cluster key of ours");
        let discovery = UdpDiscovery::new(config, fakes.factory());
        let shared = &discovery.shared;
        let stranger = from([10, 0, 0, 9]);

        assert!(!proves_cluster_key(shared, &message("plain", 4, "Ethernet"), stranger));
        let wrong_key = signed(message("wrong", 4, "Ethernet"), "somebody else's key");
        assert!(!proves_cluster_key(shared, &wrong_key, stranger));
        let mut altered = signed(message("altered", 4, "Ethernet"), "a cluster key of ours");
        altered.grpc_port += 1;
        assert!(!proves_cluster_key(shared, &altered, stranger));
        assert!(shared.strangers.first_refusal("node other at 10.0.0.9"));
        assert!(!shared.strangers.first_refusal("node plain at 10.0.0.9"), "refused once, named once");

        let friend = signed(message("friend", 4, "Ethernet"), "a cluster key of ours");
        assert!(proves_cluster_key(shared, &friend, from([10, 0, 0, 2])));
        assert!(!proves_cluster_key(shared, &friend, from([10, 0, 0, 2])), "a replay is refused");

        on_presence(shared, message("plain", 4, "Ethernet"), stranger);
        on_presence(shared, wrong_key, stranger);
        on_presence(
            shared,
            signed(message("friend", 4, "Ethernet"), "a cluster key of ours"),
            from([10, 0, 0, 2]),
        );
        settle().await;
        let peers = discovery.discover_peers(0).await.unwrap();
        assert_eq!(peers.iter().map(|p| p.id()).collect::<Vec<_>>(), ["friend"]);
        assert_eq!(fakes.made.lock().unwrap().len(), 1, "no handle is made for a stranger");
    }

    #[tokio::test]
    async fn keyed_discoveries_on_loopback_hear_only_each_other() {
        let port = free_udp_port();
        let config = |id: &str, node_port: u16, key: &str| {
            let mut config = loopback_config(id, node_port, port, port);
            config.cluster_key = keyed(key);
            config
        };
        let fakes: Vec<_> = (0..3).map(|_| FakeFactory::new()).collect();
        let discoveries = [
            UdpDiscovery::new(config("a", 50001, "a cluster key of ours"), fakes[0].factory()),
            UdpDiscovery::new(config("b", 50002, "a cluster key of ours"), fakes[1].factory()),
            UdpDiscovery::new(config("c", 50003, "somebody else's key"), fakes[2].factory()),
        ];
        for discovery in &discoveries {
            discovery.start().await.unwrap();
        }
        let wait = Duration::from_secs(20);
        let found = tokio::time::timeout(wait, discoveries[0].discover_peers(1)).await.expect("a finds b");
        assert_eq!(found.unwrap()[0].id(), "b");
        // Ten more announcements of each node.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut heard = Vec::new();
        for discovery in &discoveries {
            let peers = discovery.discover_peers(0).await.unwrap();
            heard.push(peers.iter().map(|p| p.id()).collect::<Vec<_>>());
            discovery.stop().await.unwrap();
        }
        assert_eq!(heard, [vec!["b".to_string()], vec!["a".to_string()], vec![]]);
    }

    fn loopback_config(id: &str, node_port: u16, listen: u16, broadcast: u16) -> UdpConfig {
        let mut config = UdpConfig::new(id, node_port, listen, broadcast);
        config.broadcast_interval = Duration::from_millis(100);
        config.device_capabilities = Some(caps());
        config.allowed_interface_types = Some(vec!["Loopback".into()]);
        config
    }

    fn free_udp_port() -> u16 {
        std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    async fn find_each_other(a: UdpConfig, b: UdpConfig) {
        let (fa, fb) = (FakeFactory::new(), FakeFactory::new());
        let (da, db) = (UdpDiscovery::new(a, fa.factory()), UdpDiscovery::new(b, fb.factory()));
        da.start().await.unwrap();
        db.start().await.unwrap();
        let wait = Duration::from_secs(20);
        let pa = tokio::time::timeout(wait, da.discover_peers(1)).await.expect("a finds b").unwrap();
        let pb = tokio::time::timeout(wait, db.discover_peers(1)).await.expect("b finds a").unwrap();
        assert_eq!((pa[0].id(), pa[0].addr()), ("b".to_string(), "127.0.0.1:50002".to_string()));
        assert_eq!((pb[0].id(), pb[0].addr()), ("a".to_string(), "127.0.0.1:50001".to_string()));
        assert_eq!(pa[0].description(), "Loopback (lo)");
        assert_eq!(pa[0].device_capabilities(), caps());
        da.stop().await.unwrap();
        db.stop().await.unwrap();
    }

    #[tokio::test]
    async fn two_discoveries_find_each_other_over_loopback_with_crossed_ports() {
        let (p1, p2) = (free_udp_port(), free_udp_port());
        find_each_other(loopback_config("a", 50001, p1, p2), loopback_config("b", 50002, p2, p1)).await;
    }

    #[tokio::test]
    async fn two_discoveries_share_one_port_on_loopback() {
        let port = free_udp_port();
        find_each_other(loopback_config("a", 50001, port, port), loopback_config("b", 50002, port, port))
            .await;
    }

    #[tokio::test]
    async fn stop_then_start_again_rebinds_the_port() {
        let fakes = FakeFactory::new();
        let discovery =
            UdpDiscovery::new(loopback_config("a", 1, free_udp_port(), free_udp_port()), fakes.factory());
        discovery.start().await.unwrap();
        discovery.stop().await.unwrap();
        discovery.start().await.unwrap();
        discovery.stop().await.unwrap();
    }
}
