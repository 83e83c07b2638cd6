//! The cluster key on gRPC. With a key, every call carries a proof of it in its metadata
//! (`x-xot-cluster-proof`) and the server refuses calls without a valid, fresh, unreplayed one
//! with UNAUTHENTICATED, before the call runs. A health check's answer carries the server's own
//! proof, bound to the call's nonce, so a node without the key never passes a keyed node's
//! health check and never joins its ring. Without a key nothing is added or checked, and
//! classic peers talk to the node as before.

use std::sync::Arc;

use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::net::cluster_key::{
    unix_now, ClusterKey, Proof, ProofChecker, Purpose, Rejected, Rejection, Strangers,
};

/// Metadata key of a call's proof of the cluster key.
const CALL_PROOF_KEY: &str = "x-xot-cluster-proof";
/// Metadata key of the proof in a health check's answer.
const ANSWER_PROOF_KEY: &str = "x-xot-cluster-answer";

/// The server side: checks each incoming call's proof; lets every call through without a key.
#[derive(Clone, Default)]
pub(super) struct CallGate {
    keyed: Option<Arc<Keyed>>,
}

struct Keyed {
    proofs: ProofChecker,
    strangers: Strangers,
}

/// The nonce of a call whose proof passed, left in its extensions for the answer to bind to.
#[derive(Clone, Copy)]
struct ProvenCall([u8; 16]);

impl CallGate {
    /// A gate for `key`, or an open one.
    pub fn new(key: Option<ClusterKey>) -> Self {
        let keyed = key
            .map(|key| Arc::new(Keyed { proofs: ProofChecker::new(key), strangers: Strangers::default() }));
        Self { keyed }
    }

    /// Adds this node's proof, bound to the call, to a health check's answer (with a key).
    pub fn prove_answer<T, U>(&self, call: &Request<T>, answer: &mut tonic::Response<U>) {
        let (Some(keyed), Some(ProvenCall(nonce))) = (&self.keyed, call.extensions().get::<ProvenCall>())
        else {
            return;
        };
        let proof = keyed.proofs.key().prove(Purpose::Answer, nonce);
        answer.metadata_mut().insert(ANSWER_PROOF_KEY, metadata_value(&proof));
    }
}

impl Interceptor for CallGate {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let Some(keyed) = &self.keyed else { return Ok(request) };
        let proof = request.metadata().get(CALL_PROOF_KEY).map(|value| value.to_str().unwrap_or("not ASCII"));
        match keyed.proofs.check(proof, Purpose::Call, b"") {
            Ok(proof) => {
                request.extensions_mut().insert(ProvenCall(proof.nonce));
                Ok(request)
            }
            Err(rejection) => {
                let who =
                    request.remote_addr().map_or_else(|| "an unknown address".into(), |a| a.ip().to_string());
                if keyed.strangers.first_refusal(&who) {
                    log::warn!("refusing gRPC calls from {who}: {rejection} (logged once)");
                } else {
                    log::debug!("refusing a gRPC call from {who}: {rejection}");
                }
                Err(Status::unauthenticated(rejection.to_string()))
            }
        }
    }
}

/// The client side: adds a fresh proof to each call that has none (without a key, nothing).
#[derive(Clone, Default)]
pub(super) struct CallSigner {
    key: Option<ClusterKey>,
}

impl CallSigner {
    /// A signer for `key`, or one that adds nothing.
    pub fn new(key: Option<ClusterKey>) -> Self {
        Self { key }
    }

    /// Whether it has a key to prove.
    pub fn is_keyed(&self) -> bool {
        self.key.is_some()
    }

    /// A health check request, with the proof its answer must bind to (with a key).
    pub fn health_check<T>(&self, message: T) -> (Request<T>, Option<Proof>) {
        let mut request = Request::new(message);
        let proof = self.key.as_ref().map(|key| key.prove(Purpose::Call, b""));
        if let Some(proof) = &proof {
            request.metadata_mut().insert(CALL_PROOF_KEY, metadata_value(proof));
        }
        (request, proof)
    }

    /// Whether a health check's answer proves the key, bound to the call's `proof`.
    pub fn check_answer(&self, proof: Option<&Proof>, answer: &MetadataMap) -> Rejected<()> {
        let (Some(key), Some(call)) = (&self.key, proof) else { return Ok(()) };
        let text = answer.get(ANSWER_PROOF_KEY).ok_or(Rejection::Missing)?;
        let answer: Proof = text.to_str().map_err(|_| Rejection::Malformed("not ASCII".into()))?.parse()?;
        key.verify(&answer, Purpose::Answer, &call.nonce, unix_now())
    }
}

impl Interceptor for CallSigner {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(key) = &self.key {
            if !request.metadata().contains_key(CALL_PROOF_KEY) {
                let proof = key.prove(Purpose::Call, b"");
                request.metadata_mut().insert(CALL_PROOF_KEY, metadata_value(&proof));
            }
        }
        Ok(request)
    }
}

fn metadata_value(proof: &Proof) -> AsciiMetadataValue {
    proof.to_string().parse().expect("a proof's text is ASCII")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(text: &str) -> Option<ClusterKey> {
        Some(ClusterKey::new(text).unwrap())
    }

    fn signed(signer: &mut CallSigner) -> Request<()> {
        signer.call(Request::new(())).unwrap()
    }

    #[test]
    fn a_gate_passes_calls_signed_with_its_key_once() {
        let mut gate = CallGate::new(key("a cluster key of ours"));
        let mut signer = CallSigner::new(key("a cluster key of ours"));
        let call = signed(&mut signer);
        let mut replay = Request::new(());
        *replay.metadata_mut() = call.metadata().clone();
        let passed = gate.call(call).unwrap();
        assert!(passed.extensions().get::<ProvenCall>().is_some());
        let replayed = gate.call(replay).unwrap_err();
        assert_eq!(replayed.code(), tonic::Code::Unauthenticated);
        assert!(replayed.message().contains("already used"), "{}", replayed.message());
    }

    #[test]
    fn a_gate_refuses_calls_without_its_key() {
        let mut gate = CallGate::new(key("a cluster key of ours"));
        for (mut signer, expected) in [
            (CallSigner::new(None), "no cluster key proof"),
            (CallSigner::new(key("somebody else's key")), "does not match"),
        ] {
            let refused = gate.call(signed(&mut signer)).unwrap_err();
            assert_eq!(refused.code(), tonic::Code::Unauthenticated);
            assert!(refused.message().contains(expected), "{}", refused.message());
        }
        let mut garbage = Request::new(());
        garbage.metadata_mut().insert(CALL_PROOF_KEY, "v1.1.2.3".parse().unwrap());
        assert!(gate.call(garbage).unwrap_err().message().contains("malformed"));
    }

    #[test]
    fn without_a_key_nothing_is_added_or_checked() {
        let mut signer = CallSigner::new(None);
        assert!(signed(&mut signer).metadata().is_empty());
        assert!(CallGate::new(None).call(Request::new(())).is_ok());
        let (request, proof) = signer.health_check(());
        assert!(proof.is_none() && request.metadata().is_empty());
        assert_eq!(signer.check_answer(None, &MetadataMap::new()), Ok(()));
    }

    #[test]
    fn a_health_check_answer_must_prove_the_key_for_that_call() {
        let mut gate = CallGate::new(key("a cluster key of ours"));
        let signer = CallSigner::new(key("a cluster key of ours"));
        let (request, proof) = signer.health_check(());
        let call = gate.call(request).unwrap();
        let mut answer = tonic::Response::new(());
        gate.prove_answer(&call, &mut answer);
        assert_eq!(signer.check_answer(proof.as_ref(), answer.metadata()), Ok(()));

        let (_, other_call) = signer.health_check(());
        assert_eq!(signer.check_answer(other_call.as_ref(), answer.metadata()), Err(Rejection::WrongTag));
        assert_eq!(signer.check_answer(proof.as_ref(), &MetadataMap::new()), Err(Rejection::Missing));
        let stranger = CallSigner::new(key("somebody else's key"));
        assert_eq!(stranger.check_answer(proof.as_ref(), answer.metadata()), Err(Rejection::WrongTag));
    }
}
