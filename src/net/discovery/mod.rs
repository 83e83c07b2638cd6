//! Peer discovery: UDP broadcast on the local network (`udp`), a hand-written JSON config
//! (`manual`) and Tailscale's devices API (`tailscale`). Each health-checks what it finds
//! and hands the node `PeerHandle`s made by the node's `PeerFactory`.

pub mod datagram_gate;
pub mod interfaces;
mod known_peers;
pub mod manual;
pub mod tailscale;
pub mod udp;

use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use crate::topology::{DeviceCapabilities, DeviceFlops};

pub use interfaces::{interface_priority_and_type, local_ipv4_interfaces, InterfaceType, NetworkInterface};
pub use manual::{ManualDiscovery, NetworkTopology, PeerConfig};
pub use tailscale::{TailscaleConfig, TailscaleDiscovery};
pub use udp::{PresenceMessage, UdpConfig, UdpDiscovery};

/// Device capabilities as discovery JSON carries them (`{"model", "chip", "memory", "flops"}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CapabilitiesJson {
    /// Machine model.
    pub model: String,
    /// Chip name.
    pub chip: String,
    /// Memory in MB.
    pub memory: u64,
    /// Peak throughput in TFLOPS.
    pub flops: FlopsJson,
}

/// Throughput as discovery JSON carries it (`{"fp32", "fp16", "int8"}`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FlopsJson {
    /// 32-bit float TFLOPS.
    pub fp32: f64,
    /// 16-bit float TFLOPS.
    pub fp16: f64,
    /// 8-bit integer TOPS.
    pub int8: f64,
}

impl From<&DeviceCapabilities> for CapabilitiesJson {
    fn from(caps: &DeviceCapabilities) -> Self {
        let flops = FlopsJson { fp32: caps.flops.fp32, fp16: caps.flops.fp16, int8: caps.flops.int8 };
        Self { model: caps.model.clone(), chip: caps.chip.clone(), memory: caps.memory, flops }
    }
}

impl From<CapabilitiesJson> for DeviceCapabilities {
    fn from(json: CapabilitiesJson) -> Self {
        let flops = DeviceFlops::new(json.flops.fp32, json.flops.fp16, json.flops.int8);
        DeviceCapabilities::new(json.model, json.chip, json.memory, flops)
    }
}

/// The background tasks of a started discovery; stopping aborts and awaits them all.
#[derive(Default)]
pub(crate) struct BackgroundTasks {
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl BackgroundTasks {
    /// Whether tasks are running (the discovery was started and not stopped).
    pub fn running(&self) -> bool {
        !self.lock().is_empty()
    }

    /// Adds a task to stop later.
    pub fn push(&self, task: JoinHandle<()>) {
        self.lock().push(task);
    }

    /// Aborts every task and waits for each to end.
    pub async fn stop(&self) {
        let tasks = std::mem::take(&mut *self.lock());
        for task in &tasks {
            task.abort();
        }
        for task in tasks {
            let _ = task.await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<JoinHandle<()>>> {
        self.tasks.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Drop for BackgroundTasks {
    fn drop(&mut self) {
        for task in self.lock().iter() {
            task.abort();
        }
    }
}

/// The node's own capabilities: those given, or detected on a blocking thread.
pub(crate) async fn own_capabilities(given: Option<DeviceCapabilities>) -> DeviceCapabilities {
    match given {
        Some(caps) => caps,
        None => tokio::task::spawn_blocking(crate::topology::detect_device_capabilities)
            .await
            .unwrap_or_else(|_| DeviceCapabilities::unknown()),
    }
}

#[cfg(test)]
pub(crate) mod fake {
    //! A peer handle for tests whose health the test controls.

    use std::collections::BTreeSet;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use async_trait::async_trait;

    use crate::engine::InferenceState;
    use crate::error::{Error, Result};
    use crate::net::{PeerFactory, PeerHandle, PeerIdentity};
    use crate::shard::Shard;
    use crate::tensor::WireTensor;
    use crate::topology::{DeviceCapabilities, Topology};

    /// A peer that only answers health checks, healthy unless told otherwise; while `hang`
    /// is set its health check never answers.
    pub struct FakePeer {
        pub identity: PeerIdentity,
        pub caps: DeviceCapabilities,
        pub healthy: Arc<AtomicBool>,
        pub hang: Arc<AtomicBool>,
        pub checks: AtomicUsize,
    }

    #[async_trait]
    impl PeerHandle for FakePeer {
        fn identity(&self) -> &PeerIdentity {
            &self.identity
        }
        fn device_capabilities(&self) -> DeviceCapabilities {
            self.caps.clone()
        }
        async fn connect(&self) -> Result<()> {
            Ok(())
        }
        async fn is_connected(&self) -> bool {
            false
        }
        async fn disconnect(&self) -> Result<()> {
            Ok(())
        }
        async fn health_check(&self) -> bool {
            self.checks.fetch_add(1, Ordering::SeqCst);
            if self.hang.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            self.healthy.load(Ordering::SeqCst)
        }
        async fn send_prompt(&self, _: &Shard, _: &str, _: &str, _: Option<InferenceState>) -> Result<()> {
            Err(Error::InvalidArgument("fake peer".into()))
        }
        async fn send_tensor(
            &self,
            _: &Shard,
            _: WireTensor,
            _: &str,
            _: Option<InferenceState>,
        ) -> Result<()> {
            Err(Error::InvalidArgument("fake peer".into()))
        }
        async fn send_result(&self, _: &str, _: &[u32], _: bool) -> Result<()> {
            Ok(())
        }
        async fn send_opaque_status(&self, _: &str, _: &str) -> Result<()> {
            Ok(())
        }
        async fn collect_topology(&self, _: &BTreeSet<String>, _: i32) -> Result<Topology> {
            Ok(Topology::default())
        }
    }

    /// A factory of fake peers; every peer it makes shares `healthy`, and `made` lists
    /// `(id, addr, description)` of each.
    pub struct FakeFactory {
        pub healthy: Arc<AtomicBool>,
        pub hang: Arc<AtomicBool>,
        pub made: Arc<Mutex<Vec<(String, String, String)>>>,
    }

    impl FakeFactory {
        pub fn new() -> Self {
            Self { healthy: Arc::new(AtomicBool::new(true)), hang: Arc::default(), made: Arc::default() }
        }

        pub fn factory(&self) -> PeerFactory {
            let (healthy, hang, made) = (self.healthy.clone(), self.hang.clone(), self.made.clone());
            Arc::new(move |id, addr, description, caps| {
                made.lock().unwrap().push((id.clone(), addr.clone(), description.clone()));
                let (healthy, hang) = (healthy.clone(), hang.clone());
                let identity = PeerIdentity::new(id, addr, description);
                Arc::new(FakePeer { identity, caps, healthy, hang, checks: 0.into() })
            })
        }

        pub fn set_healthy(&self, healthy: bool) {
            self.healthy.store(healthy, Ordering::SeqCst);
        }
    }
}
