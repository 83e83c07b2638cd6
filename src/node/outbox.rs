//! Ordered, non-blocking delivery of results and statuses to each peer: one queue and one
//! sender task per peer, so the token loop never waits on a notification and a peer sees a
//! request's tokens in order. Consecutive results of one request are merged into one call.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::mpsc;

use super::membership::{discovered, DISCOVERY_GRACE};
use crate::net::PeerHandle;

/// One notification for a peer.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// Tokens of a request.
    Result { request_id: String, tokens: Vec<u32>, is_finished: bool },
    /// A JSON status.
    Status { request_id: String, status: String },
}

/// Finds the current handle of a peer by id (handles are replaced when a peer moves).
pub trait PeerLookup: Send + Sync + 'static {
    /// The handle of peer `id`, if it is still a peer.
    fn peer(&self, id: &str) -> Option<Arc<dyn PeerHandle>>;
}

/// The queues, keyed by peer id.
pub struct Outbox {
    queues: Mutex<HashMap<String, mpsc::UnboundedSender<Message>>>,
}

impl Outbox {
    /// No queues yet; each is made on first use.
    pub fn new() -> Self {
        Self { queues: Mutex::new(HashMap::new()) }
    }

    /// Queues `message` for `peer_id`, starting its sender task if needed.
    pub fn send<L: PeerLookup>(&self, lookup: &Weak<L>, peer_id: &str, message: Message) {
        let mut queues = self.queues.lock().expect("outbox lock poisoned");
        if let Some(queue) = queues.get(peer_id) {
            if queue.send(message.clone()).is_ok() {
                return;
            }
        }
        let (queue, receiver) = mpsc::unbounded_channel();
        queue.send(message).expect("the receiver is alive");
        queues.insert(peer_id.to_string(), queue);
        tokio::spawn(deliver(lookup.clone(), peer_id.to_string(), receiver));
    }

    /// Drops every queue; their tasks end once they have sent what they hold.
    pub fn close(&self) {
        self.queues.lock().expect("outbox lock poisoned").clear();
    }
}

/// Sends a peer's messages in order until its queue closes.
async fn deliver<L: PeerLookup>(
    lookup: Weak<L>,
    peer_id: String,
    mut queue: mpsc::UnboundedReceiver<Message>,
) {
    let mut held: Option<Message> = None;
    loop {
        let Some(mut message) = (match held.take() {
            Some(message) => Some(message),
            None => queue.recv().await,
        }) else {
            return;
        };
        // Merge the results of one request that queued up while the last call ran.
        if let Message::Result { request_id, tokens, is_finished } = &mut message {
            while !*is_finished {
                match queue.try_recv() {
                    Ok(Message::Result { request_id: next, tokens: more, is_finished: done })
                        if next == *request_id =>
                    {
                        tokens.extend(more);
                        *is_finished = done;
                    }
                    Ok(other) => {
                        held = Some(other);
                        break;
                    }
                    Err(_) => break,
                }
            }
        }
        // The origin of a request may not be in this node's discovery yet: wait for it a while.
        let find = || lookup.upgrade().and_then(|l| l.peer(&peer_id));
        let Some(peer) = discovered(find, DISCOVERY_GRACE).await else {
            log::warn!("{peer_id} is not among this node's peers: a message to it is dropped");
            continue;
        };
        let outcome = match &message {
            Message::Result { request_id, tokens, is_finished } => {
                peer.send_result(request_id, tokens, *is_finished).await
            }
            Message::Status { request_id, status } => peer.send_opaque_status(request_id, status).await,
        };
        if let Err(e) = outcome {
            log::debug!("notification to {peer_id} dropped: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use async_trait::async_trait;

    use super::*;
    use crate::engine::InferenceState;
    use crate::error::Result;
    use crate::net::PeerIdentity;
    use crate::shard::Shard;
    use crate::tensor::WireTensor;
    use crate::topology::{DeviceCapabilities, Topology};

    /// Records what it is sent; the first call waits until released so later ones queue up.
    struct Recorder {
        identity: PeerIdentity,
        calls: Mutex<Vec<(String, Vec<u32>, bool)>>,
        gate: tokio::sync::Semaphore,
    }

    #[async_trait]
    impl PeerHandle for Recorder {
        fn identity(&self) -> &PeerIdentity {
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
            true
        }
        async fn send_prompt(&self, _: &Shard, _: &str, _: &str, _: Option<InferenceState>) -> Result<()> {
            Ok(())
        }
        async fn send_tensor(
            &self,
            _: &Shard,
            _: WireTensor,
            _: &str,
            _: Option<InferenceState>,
        ) -> Result<()> {
            Ok(())
        }
        async fn send_result(&self, request_id: &str, tokens: &[u32], is_finished: bool) -> Result<()> {
            let _permit = self.gate.acquire().await.expect("gate open");
            self.calls.lock().unwrap().push((request_id.into(), tokens.to_vec(), is_finished));
            Ok(())
        }
        async fn send_opaque_status(&self, request_id: &str, _: &str) -> Result<()> {
            self.calls.lock().unwrap().push((format!("status:{request_id}"), vec![], false));
            Ok(())
        }
        async fn collect_topology(&self, _: &BTreeSet<String>, _: i32) -> Result<Topology> {
            Ok(Topology::new())
        }
    }

    struct One(Arc<Recorder>);

    impl PeerLookup for One {
        fn peer(&self, _: &str) -> Option<Arc<dyn PeerHandle>> {
            Some(self.0.clone())
        }
    }

    fn result(id: &str, tokens: &[u32], is_finished: bool) -> Message {
        Message::Result { request_id: id.into(), tokens: tokens.to_vec(), is_finished }
    }

    #[tokio::test]
    async fn results_arrive_in_order_and_queued_ones_merge() {
        let recorder = Arc::new(Recorder {
            identity: PeerIdentity::new("p", "p:1", ""),
            calls: Mutex::new(vec![]),
            gate: tokio::sync::Semaphore::new(0),
        });
        let lookup = Arc::new(One(recorder.clone()));
        let weak = Arc::downgrade(&lookup);
        let outbox = Outbox::new();
        outbox.send(&weak, "p", result("r", &[1], false));
        tokio::task::yield_now().await;
        for (tokens, done) in [(&[2][..], false), (&[3], false), (&[4], true)] {
            outbox.send(&weak, "p", result("r", tokens, done));
        }
        outbox.send(&weak, "p", Message::Status { request_id: "s".into(), status: "{}".into() });
        outbox.send(&weak, "p", result("q", &[9], true));
        recorder.gate.add_permits(10);
        for _ in 0..100 {
            if recorder.calls.lock().unwrap().len() == 4 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let calls = recorder.calls.lock().unwrap().clone();
        assert_eq!(
            calls,
            [
                ("r".to_string(), vec![1], false),
                ("r".to_string(), vec![2, 3, 4], true),
                ("status:s".to_string(), vec![], false),
                ("q".to_string(), vec![9], true),
            ]
        );
    }

    /// Knows its peer only once `known` is set, as a node whose discovery has not found it yet.
    struct Late {
        peer: Arc<Recorder>,
        known: std::sync::atomic::AtomicBool,
    }

    impl Late {
        /// A lookup whose one peer, `p`, is not discovered yet; its first call is not held back.
        fn unknown() -> Arc<Self> {
            let peer = Arc::new(Recorder {
                identity: PeerIdentity::new("p", "p:1", ""),
                calls: Mutex::new(vec![]),
                gate: tokio::sync::Semaphore::new(10),
            });
            Arc::new(Self { peer, known: false.into() })
        }
    }

    impl PeerLookup for Late {
        fn peer(&self, _: &str) -> Option<Arc<dyn PeerHandle>> {
            let known = self.known.load(std::sync::atomic::Ordering::SeqCst);
            known.then(|| self.peer.clone() as Arc<dyn PeerHandle>)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_result_waits_for_its_peer_to_be_discovered_then_arrives() {
        let lookup = Late::unknown();
        let recorder = lookup.peer.clone();
        let weak = Arc::downgrade(&lookup);
        let outbox = Outbox::new();
        outbox.send(&weak, "p", result("r", &[1], false));
        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
        assert!(recorder.calls.lock().unwrap().is_empty());
        lookup.known.store(true, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        assert_eq!(recorder.calls.lock().unwrap().clone(), [("r".to_string(), vec![1], false)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_for_a_peer_never_discovered_is_dropped_after_the_grace() {
        let lookup = Late::unknown();
        let recorder = lookup.peer.clone();
        let weak = Arc::downgrade(&lookup);
        let outbox = Outbox::new();
        outbox.send(&weak, "p", result("lost", &[1], true));
        outbox.send(&weak, "p", result("next", &[2], true));
        tokio::time::sleep(DISCOVERY_GRACE + std::time::Duration::from_millis(500)).await;
        // The first was dropped after the grace; the second found the peer once it appeared.
        lookup.known.store(true, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        assert_eq!(recorder.calls.lock().unwrap().clone(), [("next".to_string(), vec![2], true)]);
    }
}
