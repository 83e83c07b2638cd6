//! Tailscale discovery, as exo classic does it: each node writes its id, port and device into
//! its Tailscale device's posture attributes (`custom:exo_*`), and reads the tailnet's device
//! list and attributes to find the others. The API base URL is configurable so tests can
//! point it at a local fake.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{Map, Value};
use tokio::time::{Instant, MissedTickBehavior};

use super::known_peers::{healthy, KnownPeer, KnownPeers, Sighting};
use super::{own_capabilities, BackgroundTasks};
use crate::error::{Error, Result};
use crate::net::{Discovery, PeerFactory, PeerHandle};
use crate::topology::{DeviceCapabilities, DeviceFlops};

/// Tailscale's public API.
pub const DEFAULT_API_BASE: &str = "https://api.tailscale.com";
/// Environment variable that overrides the API base URL.
pub const API_BASE_ENV: &str = "EXO_TAILSCALE_API_BASE";
/// Environment variable read when no API key is given.
pub const API_KEY_ENV: &str = "TAILSCALE_API_KEY";
/// Environment variable read when no tailnet is given (else `-`, the key's own tailnet).
pub const TAILNET_ENV: &str = "TAILSCALE_TAILNET";
/// The description Tailscale peers carry, as in classic.
const DESCRIPTION: &str = "TS";
/// Deadline of each API call.
const API_TIMEOUT: Duration = Duration::from_secs(10);
/// Prefix of the posture attributes exo writes.
const ATTRIBUTE_PREFIX: &str = "custom:exo_";

/// Settings of a [`TailscaleDiscovery`]; `new` fills classic's defaults.
#[derive(Debug, Clone)]
pub struct TailscaleConfig {
    /// This node's id.
    pub node_id: String,
    /// This node's gRPC port, written into its attributes.
    pub node_port: u16,
    /// Time between reads of the device list (and peer health checks); classic: 5 s.
    pub discovery_interval: Duration,
    /// Devices not seen by Tailscale, and peers not listed, for this long are dropped; 30 s.
    pub discovery_timeout: Duration,
    /// Time between writes of this node's attributes; classic: 15 s.
    pub update_interval: Duration,
    /// Capabilities to publish; `None` detects this machine's when starting.
    pub device_capabilities: Option<DeviceCapabilities>,
    /// API key; `None` reads `TAILSCALE_API_KEY`.
    pub api_key: Option<String>,
    /// Tailnet name; `None` reads `TAILSCALE_TAILNET`, else `-`.
    pub tailnet: Option<String>,
    /// When set, only these node ids are accepted.
    pub allowed_node_ids: Option<Vec<String>>,
    /// API base URL; `None` reads `EXO_TAILSCALE_API_BASE`, else Tailscale's.
    pub api_base: Option<String>,
    /// This machine's Tailscale device id; `None` asks `tailscale status --json`.
    pub device_id: Option<String>,
}

impl TailscaleConfig {
    /// Classic's defaults for everything but the id and port.
    pub fn new(node_id: impl Into<String>, node_port: u16) -> Self {
        Self {
            node_id: node_id.into(),
            node_port,
            discovery_interval: Duration::from_secs(5),
            discovery_timeout: Duration::from_secs(30),
            update_interval: Duration::from_secs(15),
            device_capabilities: None,
            api_key: None,
            tailnet: None,
            allowed_node_ids: None,
            api_base: None,
            device_id: None,
        }
    }

    /// The API key, tailnet and base URL left unset filled from the environment
    /// (`TAILSCALE_API_KEY`, `TAILSCALE_TAILNET`, `EXO_TAILSCALE_API_BASE`).
    pub fn with_env_defaults(mut self) -> Self {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        self.api_key = self.api_key.filter(|k| !k.is_empty()).or_else(|| env(API_KEY_ENV));
        self.tailnet = self.tailnet.filter(|t| !t.is_empty()).or_else(|| env(TAILNET_ENV));
        self.api_base = self.api_base.filter(|b| !b.is_empty()).or_else(|| env(API_BASE_ENV));
        self
    }
}

/// A device of the tailnet, as the devices API lists it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TailscaleDevice {
    /// Tailscale's device id.
    #[serde(default)]
    pub id: String,
    /// Device name (a MagicDNS name).
    #[serde(default)]
    pub name: String,
    /// Tailscale addresses, IPv4 first.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// When Tailscale last saw the device (RFC 3339).
    #[serde(default, rename = "lastSeen")]
    pub last_seen: Option<String>,
}

impl TailscaleDevice {
    /// Whether Tailscale saw the device within `window` of `now`.
    pub fn seen_within(&self, now: chrono::DateTime<chrono::Utc>, window: Duration) -> bool {
        let Some(seen) = self.last_seen.as_deref() else { return false };
        let Ok(seen) = chrono::DateTime::parse_from_rfc3339(seen) else { return false };
        let age = now.signed_duration_since(seen.with_timezone(&chrono::Utc));
        age.to_std().map_or(true, |age| age < window)
    }
}

#[derive(Deserialize)]
struct DeviceList {
    #[serde(default)]
    devices: Vec<TailscaleDevice>,
}

#[derive(Deserialize)]
struct AttributeList {
    #[serde(default)]
    attributes: Map<String, Value>,
}

/// What a device's `custom:exo_*` attributes say about the exo node on it.
#[derive(Debug, Clone, PartialEq)]
pub struct ExoAttributes {
    /// The node id (classic writes `-` as `_`; this is the id with `-` restored).
    pub node_id: String,
    /// The node's gRPC port.
    pub node_port: u16,
    /// The node's device (spaces restored from `_`).
    pub device_capabilities: DeviceCapabilities,
}

impl ExoAttributes {
    /// Reads the attributes; `None` when the device carries no exo node id or port.
    pub fn from_attributes(attributes: &Map<String, Value>) -> Option<Self> {
        let text = |name: &str| match attributes.get(&format!("{ATTRIBUTE_PREFIX}{name}")) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        };
        let number = |name: &str| text(name).and_then(|t| t.parse::<f64>().ok()).unwrap_or(0.0);
        let node_id = text("node_id").filter(|id| !id.is_empty())?.replace('_', "-");
        let node_port = text("node_port")?.parse::<f64>().ok().filter(|p| *p > 0.0 && *p <= 65535.0)? as u16;
        let flops = DeviceFlops::new(
            number("device_capability_flops_fp32"),
            number("device_capability_flops_fp16"),
            number("device_capability_flops_int8"),
        );
        let device_capabilities = DeviceCapabilities::new(
            text("device_capability_model").unwrap_or_default().replace('_', " "),
            text("device_capability_chip").unwrap_or_default().replace('_', " "),
            number("device_capability_memory").max(0.0) as u64,
            flops,
        );
        Some(Self { node_id, node_port, device_capabilities })
    }

    /// The attributes this node writes, name and value, as classic writes them.
    pub fn posture_attributes(
        node_id: &str,
        node_port: u16,
        caps: &DeviceCapabilities,
    ) -> Vec<(String, String)> {
        let values = [
            ("node_id", node_id.replace('-', "_")),
            ("node_port", node_port.to_string()),
            ("device_capability_chip", sanitize_attribute(&caps.chip)),
            ("device_capability_model", sanitize_attribute(&caps.model)),
            ("device_capability_memory", caps.memory.to_string()),
            ("device_capability_flops_fp16", python_float(caps.flops.fp16)),
            ("device_capability_flops_fp32", python_float(caps.flops.fp32)),
            ("device_capability_flops_int8", python_float(caps.flops.int8)),
        ];
        values
            .into_iter()
            .map(|(name, value)| (format!("{ATTRIBUTE_PREFIX}{name}"), value.replace(' ', "_")))
            .collect()
    }
}

/// Keeps `[A-Za-z0-9_.]`, turns anything else into `_`, and truncates to 50 characters.
fn sanitize_attribute(value: &str) -> String {
    value
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '.' { c } else { '_' })
        .take(50)
        .collect()
}

/// A float as Python's `str` writes it (`0.0`, `2.5`).
fn python_float(value: f64) -> String {
    if value.fract() == 0.0 && value.abs() < 1e16 {
        format!("{value:.1}")
    } else {
        value.to_string()
    }
}

/// Finds peers through Tailscale's API; see the module doc.
pub struct TailscaleDiscovery {
    shared: Arc<Shared>,
    tasks: BackgroundTasks,
}

struct Shared {
    config: TailscaleConfig,
    factory: PeerFactory,
    peers: KnownPeers,
    device_id: Mutex<Option<String>>,
}

/// An API client with the key, tailnet and base URL resolved.
#[derive(Clone)]
struct ApiClient {
    http: reqwest::Client,
    base: String,
    key: String,
    tailnet: String,
}

impl ApiClient {
    /// A client for `config` as given (see [`TailscaleConfig::with_env_defaults`]).
    fn from_config(config: &TailscaleConfig) -> Result<Self> {
        let key = config.api_key.clone().filter(|k| !k.is_empty()).ok_or_else(|| {
            Error::Discovery(format!(
                "Tailscale discovery needs an API key (tailscale_api_key or {API_KEY_ENV})"
            ))
        })?;
        let tailnet = config.tailnet.clone().unwrap_or_else(|| "-".into());
        let base = config.api_base.clone().unwrap_or_else(|| DEFAULT_API_BASE.into());
        let http = reqwest::Client::builder()
            .timeout(API_TIMEOUT)
            .build()
            .map_err(|e| Error::Discovery(format!("cannot build an HTTP client: {e}")))?;
        Ok(Self { http, base: base.trim_end_matches('/').to_string(), key, tailnet })
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> std::result::Result<T, String> {
        let url = format!("{}{path}", self.base);
        let response =
            self.http.get(&url).bearer_auth(&self.key).send().await.map_err(|e| format!("GET {url}: {e}"))?;
        let response = response.error_for_status().map_err(|e| format!("GET {url}: {e}"))?;
        response.json().await.map_err(|e| format!("GET {url}: bad JSON: {e}"))
    }

    async fn devices(&self) -> std::result::Result<Vec<TailscaleDevice>, String> {
        let list: DeviceList = self.get_json(&format!("/api/v2/tailnet/{}/devices", self.tailnet)).await?;
        Ok(list.devices)
    }

    async fn attributes(&self, device_id: &str) -> std::result::Result<Map<String, Value>, String> {
        let list: AttributeList = self.get_json(&format!("/api/v2/device/{device_id}/attributes")).await?;
        Ok(list.attributes)
    }

    async fn set_attribute(
        &self,
        device_id: &str,
        name: &str,
        value: &str,
    ) -> std::result::Result<(), String> {
        let url = format!("{}/api/v2/device/{device_id}/attributes/{name}", self.base);
        let body = serde_json::json!({ "value": value });
        let response = self.http.post(&url).bearer_auth(&self.key).json(&body).send().await;
        let response = response.map_err(|e| format!("POST {url}: {e}"))?;
        response.error_for_status().map(|_| ()).map_err(|e| format!("POST {url}: {e}"))
    }
}

impl TailscaleDiscovery {
    /// A discovery with these settings, making handles with `factory`; nothing runs until
    /// `start`.
    pub fn new(config: TailscaleConfig, factory: PeerFactory) -> Self {
        let shared = Shared { config, factory, peers: KnownPeers::new(), device_id: Mutex::new(None) };
        Self { shared: Arc::new(shared), tasks: BackgroundTasks::default() }
    }

    /// The settings.
    pub fn config(&self) -> &TailscaleConfig {
        &self.shared.config
    }
}

#[async_trait]
impl Discovery for TailscaleDiscovery {
    /// Fails when no API key is given or set in the environment.
    async fn start(&self) -> Result<()> {
        if self.tasks.running() {
            return Ok(());
        }
        let api = ApiClient::from_config(&self.shared.config.clone().with_env_defaults())?;
        *self.shared.device_id.lock().unwrap_or_else(|p| p.into_inner()) =
            self.shared.config.device_id.clone();
        let caps = own_capabilities(self.shared.config.device_capabilities.clone()).await;
        self.tasks.push(tokio::spawn(poll_devices(self.shared.clone(), api.clone())));
        self.tasks.push(tokio::spawn(publish_attributes(self.shared.clone(), api, caps)));
        self.tasks.push(tokio::spawn(sweep(self.shared.clone())));
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

/// Reads the device list every discovery interval and adds healthy exo nodes.
async fn poll_devices(shared: Arc<Shared>, api: ApiClient) {
    let mut ticks = tokio::time::interval(shared.config.discovery_interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if let Err(error) = discover_once(&shared, &api).await {
            log::warn!("Tailscale discovery: {error}");
        }
    }
}

/// One pass over the tailnet's devices.
async fn discover_once(shared: &Shared, api: &ApiClient) -> std::result::Result<(), String> {
    let config = &shared.config;
    let devices = api.devices().await?;
    let now = chrono::Utc::now();
    let own_device = shared.device_id.lock().unwrap_or_else(|p| p.into_inner()).clone();
    for device in devices {
        let own = device.name == config.node_id || own_device.as_deref() == Some(device.id.as_str());
        if own || !device.seen_within(now, config.discovery_timeout) {
            continue;
        }
        let Some(host) = device.addresses.first() else { continue };
        let attributes = match api.attributes(&device.id).await {
            Ok(attributes) => attributes,
            Err(error) => {
                log::debug!("skipping Tailscale device {}: {error}", device.id);
                continue;
            }
        };
        let Some(node) = ExoAttributes::from_attributes(&attributes) else { continue };
        if node.node_id == config.node_id {
            continue;
        }
        if config.allowed_node_ids.as_ref().is_some_and(|allowed| !allowed.contains(&node.node_id)) {
            continue;
        }
        let addr = format!("{host}:{}", node.node_port);
        consider(shared, node, addr).await;
    }
    Ok(())
}

/// Refreshes a known peer, or adds a new one (or one at a new address) once healthy.
async fn consider(shared: &Shared, node: ExoAttributes, addr: String) {
    if shared.peers.sighted(&node.node_id, &addr, 0) == Sighting::Refreshed {
        return;
    }
    let handle =
        (shared.factory)(node.node_id.clone(), addr.clone(), DESCRIPTION.into(), node.device_capabilities);
    if !healthy(handle.as_ref()).await {
        log::debug!("Tailscale peer {} at {addr} failed its health check; not adding it", node.node_id);
        return;
    }
    let peer = KnownPeer { handle, addr, last_seen: Instant::now(), priority: 0 };
    shared.peers.insert(&node.node_id, peer, false);
}

/// Writes this node's attributes every update interval.
async fn publish_attributes(shared: Arc<Shared>, api: ApiClient, caps: DeviceCapabilities) {
    let config = &shared.config;
    let attributes = ExoAttributes::posture_attributes(&config.node_id, config.node_port, &caps);
    let mut ticks = tokio::time::interval(config.update_interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(device_id) = own_device_id(&shared).await else { continue };
        for (name, value) in &attributes {
            if let Err(error) = api.set_attribute(&device_id, name, value).await {
                log::warn!("cannot update Tailscale attribute {name}: {error}");
            }
        }
    }
}

/// This machine's device id: configured, or asked once of the `tailscale` CLI.
async fn own_device_id(shared: &Shared) -> Option<String> {
    if let Some(id) = shared.device_id.lock().unwrap_or_else(|p| p.into_inner()).clone() {
        return Some(id);
    }
    match device_id_from_cli().await {
        Ok(id) => {
            *shared.device_id.lock().unwrap_or_else(|p| p.into_inner()) = Some(id.clone());
            Some(id)
        }
        Err(error) => {
            log::warn!("{error}; is the tailscale CLI installed? See https://tailscale.com/kb/1080/cli");
            None
        }
    }
}

/// `Self.ID` of `tailscale status --json`.
async fn device_id_from_cli() -> std::result::Result<String, String> {
    let output = tokio::process::Command::new("tailscale")
        .args(["status", "--json"])
        .output()
        .await
        .map_err(|e| format!("cannot run `tailscale status --json`: {e}"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(format!("`tailscale status --json` failed ({}): {}", output.status, stderr.trim()));
    }
    let status: Value = serde_json::from_slice(&output.stdout)
        .map_err(|e| format!("`tailscale status --json` printed bad JSON: {e}"))?;
    status["Self"]["ID"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| "`tailscale status --json` has no Self.ID".into())
}

/// Drops silent and unhealthy peers, once per discovery interval.
async fn sweep(shared: Arc<Shared>) {
    let mut ticks = tokio::time::interval(shared.config.discovery_interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        shared.peers.sweep(shared.config.discovery_timeout).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn posture_attributes_round_trip() {
        let caps = DeviceCapabilities::new(
            "Linux Box (AMD EPYC)",
            "AMD EPYC 9B14",
            16384,
            DeviceFlops::new(1.5, 3.0, 6.0),
        );
        let written = ExoAttributes::posture_attributes("a-b-c", 50051, &caps);
        let map: Map<String, Value> =
            written.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
        assert_eq!(map["custom:exo_node_id"], "a_b_c");
        assert_eq!(map["custom:exo_device_capability_model"], "Linux_Box__AMD_EPYC_");
        assert_eq!(map["custom:exo_device_capability_flops_fp32"], "1.5");
        assert_eq!(map["custom:exo_device_capability_flops_fp16"], "3.0");
        let read = ExoAttributes::from_attributes(&map).unwrap();
        assert_eq!((read.node_id.as_str(), read.node_port), ("a-b-c", 50051));
        assert_eq!(read.device_capabilities.chip, "AMD EPYC 9B14");
        assert_eq!(read.device_capabilities.memory, 16384);
        assert_eq!(read.device_capabilities.flops, caps.flops);
    }

    #[test]
    fn devices_without_exo_attributes_are_not_nodes() {
        let none = Map::new();
        assert_eq!(ExoAttributes::from_attributes(&none), None);
        let mut numeric = Map::new();
        numeric.insert("custom:exo_node_id".into(), "n1".into());
        assert_eq!(ExoAttributes::from_attributes(&numeric), None, "no port");
        numeric.insert("custom:exo_node_port".into(), 50052.into());
        assert_eq!(ExoAttributes::from_attributes(&numeric).unwrap().node_port, 50052);
        numeric.insert("custom:exo_node_port".into(), "junk".into());
        assert_eq!(ExoAttributes::from_attributes(&numeric), None);
    }

    #[test]
    fn sanitize_keeps_safe_characters_and_truncates() {
        assert_eq!(sanitize_attribute("Apple M2 (Pro)"), "Apple_M2__Pro_");
        assert_eq!(sanitize_attribute(&"x".repeat(80)).len(), 50);
    }

    #[test]
    fn only_recently_seen_devices_are_active() {
        let now =
            chrono::DateTime::parse_from_rfc3339("2025-01-01T00:01:00Z").unwrap().with_timezone(&chrono::Utc);
        let device = |seen: Option<&str>| TailscaleDevice {
            id: "1".into(),
            name: "n".into(),
            addresses: vec![],
            last_seen: seen.map(str::to_string),
        };
        let window = Duration::from_secs(30);
        assert!(device(Some("2025-01-01T00:00:45Z")).seen_within(now, window));
        assert!(device(Some("2025-01-01T00:01:05Z")).seen_within(now, window), "clock skew");
        assert!(!device(Some("2025-01-01T00:00:10Z")).seen_within(now, window));
        assert!(!device(None).seen_within(now, window));
        assert!(!device(Some("yesterday")).seen_within(now, window));
        let list: DeviceList = serde_json::from_str(
            r#"{"devices": [{"id": "7", "name": "box.tail.ts.net", "addresses": ["100.64.0.7"], "lastSeen": "2025-01-01T00:00:50Z", "os": "linux"}]}"#,
        )
        .unwrap();
        assert_eq!(list.devices[0].addresses, ["100.64.0.7"]);
        assert!(list.devices[0].seen_within(now, window));
    }

    #[test]
    fn a_missing_api_key_is_a_clear_error() {
        let error = ApiClient::from_config(&TailscaleConfig::new("n", 1)).err().unwrap();
        assert!(error.to_string().contains(API_KEY_ENV));
    }
}
