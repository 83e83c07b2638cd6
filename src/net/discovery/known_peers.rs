//! The table of peers a discovery has found and health-checked, shared by its background
//! tasks and `discover_peers`, which can wait on it until enough peers are known.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use indexmap::IndexMap;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::net::PeerHandle;

/// Longest a health check may take before it counts as failed, whatever the handle does.
pub(crate) const HEALTH_CHECK_DEADLINE: Duration = Duration::from_secs(10);

/// One known peer: its handle, where it was found, when it last announced itself.
#[derive(Clone)]
pub(crate) struct KnownPeer {
    pub handle: Arc<dyn PeerHandle>,
    pub addr: String,
    pub last_seen: Instant,
    pub priority: i64,
}

/// What the table knows of a peer that just announced itself at an address.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Sighting {
    /// Known at this address; its `last_seen` has been refreshed.
    Refreshed,
    /// Known at another address, with this priority.
    ElsewhereWithPriority(i64),
    /// Not known.
    New,
}

/// Peers by id, in the order they were added, plus the checks in flight.
pub(crate) struct KnownPeers {
    peers: Mutex<IndexMap<String, KnownPeer>>,
    checking: Mutex<HashSet<(String, String)>>,
    count: watch::Sender<usize>,
}

impl KnownPeers {
    pub fn new() -> Self {
        Self { peers: Mutex::default(), checking: Mutex::default(), count: watch::Sender::new(0) }
    }

    fn lock(&self) -> MutexGuard<'_, IndexMap<String, KnownPeer>> {
        self.peers.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn publish(&self, peers: &IndexMap<String, KnownPeer>) {
        self.count.send_replace(peers.len());
    }

    /// Records that `id` announced itself at `addr` with `priority`.
    pub fn sighted(&self, id: &str, addr: &str, priority: i64) -> Sighting {
        let mut peers = self.lock();
        match peers.get_mut(id) {
            Some(peer) if peer.addr == addr => {
                peer.last_seen = Instant::now();
                peer.priority = priority;
                Sighting::Refreshed
            }
            Some(peer) => Sighting::ElsewhereWithPriority(peer.priority),
            None => Sighting::New,
        }
    }

    /// Claims the health check of `id` at `addr`; false when one is already running.
    pub fn begin_check(&self, id: &str, addr: &str) -> bool {
        let mut checking = self.checking.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        checking.insert((id.to_string(), addr.to_string()))
    }

    /// Releases a claim taken with `begin_check`.
    pub fn end_check(&self, id: &str, addr: &str) {
        let mut checking = self.checking.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        checking.remove(&(id.to_string(), addr.to_string()));
    }

    /// Adds or replaces a peer; with `only_if_higher`, a peer known at another address is
    /// replaced only by one of higher priority. False when nothing changed.
    pub fn insert(&self, id: &str, peer: KnownPeer, only_if_higher: bool) -> bool {
        let mut peers = self.lock();
        if only_if_higher {
            if let Some(existing) = peers.get(id) {
                if existing.addr != peer.addr && existing.priority >= peer.priority {
                    return false;
                }
            }
        }
        peers.insert(id.to_string(), peer);
        self.publish(&peers);
        true
    }

    /// Drops `id` if it is still the given handle (a newer one may have replaced it).
    pub fn remove_handle(&self, id: &str, handle: &Arc<dyn PeerHandle>) -> bool {
        let mut peers = self.lock();
        let same = peers.get(id).is_some_and(|peer| Arc::ptr_eq(&peer.handle, handle));
        if same {
            peers.shift_remove(id);
            self.publish(&peers);
        }
        same
    }

    /// Replaces the whole table (manual discovery recomputes it from its config).
    pub fn replace_all(&self, next: IndexMap<String, KnownPeer>) {
        let mut peers = self.lock();
        for (id, peer) in &next {
            if peers.get(id).is_none_or(|old| old.addr != peer.addr) {
                log::info!("added peer {id} at {}", peer.addr);
            }
        }
        for (id, peer) in peers.iter().filter(|(id, _)| !next.contains_key(*id)) {
            log::info!("dropping peer {id} at {}", peer.addr);
        }
        *peers = next;
        self.publish(&peers);
    }

    /// A copy of every entry.
    pub fn snapshot(&self) -> IndexMap<String, KnownPeer> {
        self.lock().clone()
    }

    /// Every known peer's handle.
    pub fn handles(&self) -> Vec<Arc<dyn PeerHandle>> {
        self.lock().values().map(|peer| peer.handle.clone()).collect()
    }

    /// Waits until at least `wanted` peers are known, then returns them all.
    pub async fn wait_for(&self, wanted: usize) -> Vec<Arc<dyn PeerHandle>> {
        let mut count = self.count.subscribe();
        // The sender lives as long as `self`, so waiting can only end by reaching the count.
        let _ = count.wait_for(|known| *known >= wanted).await;
        self.handles()
    }

    /// Drops peers silent for longer than `timeout` and peers whose health check fails;
    /// returns the ids dropped.
    pub async fn sweep(&self, timeout: Duration) -> Vec<String> {
        let now = Instant::now();
        let mut dropped = Vec::new();
        let mut to_check = Vec::new();
        for (id, peer) in self.snapshot() {
            if now.saturating_duration_since(peer.last_seen) > timeout {
                if self.remove_handle(&id, &peer.handle) {
                    log::info!("dropping peer {id} at {}: silent for over {timeout:?}", peer.addr);
                    dropped.push(id);
                }
            } else {
                to_check.push((id, peer));
            }
        }
        let checks = to_check.iter().map(|(_, peer)| healthy(peer.handle.as_ref()));
        let results = futures::future::join_all(checks).await;
        for ((id, peer), ok) in to_check.into_iter().zip(results) {
            if !ok && self.remove_handle(&id, &peer.handle) {
                log::info!("dropping peer {id} at {}: health check failed", peer.addr);
                dropped.push(id);
            }
        }
        dropped
    }
}

/// Whether a peer passes its health check within [`HEALTH_CHECK_DEADLINE`].
pub(crate) async fn healthy(handle: &dyn PeerHandle) -> bool {
    tokio::time::timeout(HEALTH_CHECK_DEADLINE, handle.health_check()).await.unwrap_or(false)
}
