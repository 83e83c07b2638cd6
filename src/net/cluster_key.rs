//! The cluster key: a secret a cluster's nodes share, so that only they join its ring. A node
//! with the key proves it on what it sends (discovery announcements, gRPC calls, health-check
//! answers) with a [`Proof`]: an HMAC-SHA256 tag over a purpose, a timestamp, a random nonce
//! and the payload. A receiver accepts a proof with a valid tag, a timestamp within
//! [`MAX_CLOCK_SKEW_SECS`] of its own clock, and a nonce it has not seen in that window.
//!
//! The key guards who may join and call, not what travels: traffic stays unencrypted, and a
//! proof does not cover a gRPC message's body (SECURITY.md).

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::error::{Error, Result};

/// The shortest key accepted: shorter ones fall to guessing against a captured announcement.
pub const MIN_KEY_CHARS: usize = 16;
/// How far a proof's timestamp may be from the receiver's clock, either way.
pub const MAX_CLOCK_SKEW_SECS: u64 = 30;
/// Nonces a receiver remembers at most; past this (a flood of valid proofs) proofs are refused.
const MAX_REMEMBERED_NONCES: usize = 1 << 20;
/// Strangers named in the log at most; later ones are refused silently.
const MAX_STRANGERS_LOGGED: usize = 1024;
/// The version prefix of a proof's text form.
const PROOF_VERSION: &str = "v1";

type HmacSha256 = Hmac<Sha256>;

/// What a proof is for; a proof made for one purpose never passes for another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// A UDP discovery announcement; the payload is the announcement.
    Announcement,
    /// A gRPC call; no payload.
    Call,
    /// A node's answer to a health check; the payload is the call's nonce.
    Answer,
}

impl Purpose {
    fn label(self) -> &'static [u8] {
        match self {
            Purpose::Announcement => b"xotorch-core announcement v1\0",
            Purpose::Call => b"xotorch-core grpc call v1\0",
            Purpose::Answer => b"xotorch-core health answer v1\0",
        }
    }
}

/// Why a proof was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// Nothing proves the key (a node without one, or exo classic).
    #[error("no cluster key proof")]
    Missing,
    /// The proof's text does not parse.
    #[error("malformed cluster key proof: {0}")]
    Malformed(String),
    /// The tag does not match: another key, or altered content.
    #[error("cluster key proof does not match this cluster's key")]
    WrongTag,
    /// The timestamp is too far from this node's clock.
    #[error(
        "cluster key proof is {0} s off this node's clock (at most {MAX_CLOCK_SKEW_SECS} s; are the clocks in sync?)"
    )]
    Skewed(u64),
    /// The nonce was seen before: a replayed message.
    #[error("cluster key proof was already used (a replay)")]
    Replayed,
    /// Too many proofs within the time window to remember their nonces.
    #[error("too many cluster key proofs within {MAX_CLOCK_SKEW_SECS} s to check for replays")]
    Overloaded,
}

/// The shared secret. Its `Debug` form hides it; nothing prints it.
#[derive(Clone)]
pub struct ClusterKey {
    secret: Arc<[u8]>,
}

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterKey(hidden)")
    }
}

impl ClusterKey {
    /// A key from its text; at least [`MIN_KEY_CHARS`] characters.
    pub fn new(secret: &str) -> Result<Self> {
        if secret.chars().count() < MIN_KEY_CHARS {
            return Err(Error::InvalidArgument(format!(
                "the cluster key must be at least {MIN_KEY_CHARS} characters (e.g. from `openssl rand -hex 16`)"
            )));
        }
        Ok(Self { secret: secret.as_bytes().into() })
    }

    /// A fresh proof for `payload`: now, and a random nonce.
    pub fn prove(&self, purpose: Purpose, payload: &[u8]) -> Proof {
        self.prove_at(purpose, payload, unix_now(), rand::random())
    }

    /// The proof for `payload` at `timestamp` with `nonce`.
    fn prove_at(&self, purpose: Purpose, payload: &[u8], timestamp: u64, nonce: [u8; 16]) -> Proof {
        let tag = self.mac(purpose, payload, timestamp, &nonce).finalize().into_bytes().into();
        Proof { timestamp, nonce, tag }
    }

    /// Whether `proof` was made with this key for `payload`, and is fresh at `now`.
    pub fn verify(&self, proof: &Proof, purpose: Purpose, payload: &[u8], now: u64) -> Rejected<()> {
        self.mac(purpose, payload, proof.timestamp, &proof.nonce)
            .verify_slice(&proof.tag)
            .map_err(|_| Rejection::WrongTag)?;
        let skew = now.abs_diff(proof.timestamp);
        if skew > MAX_CLOCK_SKEW_SECS {
            return Err(Rejection::Skewed(skew));
        }
        Ok(())
    }

    fn mac(&self, purpose: Purpose, payload: &[u8], timestamp: u64, nonce: &[u8; 16]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.secret).expect("HMAC takes a key of any length");
        mac.update(purpose.label());
        mac.update(&timestamp.to_be_bytes());
        mac.update(nonce);
        mac.update(payload);
        mac
    }
}

/// The outcome of checking a proof.
pub type Rejected<T> = std::result::Result<T, Rejection>;

/// A proof of the key: when it was made, its nonce and its tag. Travels as
/// `v1.TIMESTAMP.NONCE_HEX.TAG_HEX`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proof {
    /// Seconds since the Unix epoch when it was made.
    pub timestamp: u64,
    /// Random bytes that make it unique.
    pub nonce: [u8; 16],
    tag: [u8; 32],
}

impl fmt::Display for Proof {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (nonce, tag) = (hex::encode(self.nonce), hex::encode(self.tag));
        write!(f, "{PROOF_VERSION}.{}.{nonce}.{tag}", self.timestamp)
    }
}

impl FromStr for Proof {
    type Err = Rejection;

    fn from_str(text: &str) -> Rejected<Self> {
        let malformed = |what: &str| Rejection::Malformed(what.to_string());
        let mut parts = text.split('.');
        if parts.next() != Some(PROOF_VERSION) {
            return Err(malformed("it does not start with v1"));
        }
        let (Some(timestamp), Some(nonce), Some(tag), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed("it is not v1.TIMESTAMP.NONCE.TAG"));
        };
        let timestamp = timestamp.parse().map_err(|_| malformed("the timestamp is not a number"))?;
        let mut proof = Proof { timestamp, nonce: [0; 16], tag: [0; 32] };
        hex::decode_to_slice(nonce, &mut proof.nonce)
            .map_err(|_| malformed("the nonce is not 16 hex bytes"))?;
        hex::decode_to_slice(tag, &mut proof.tag).map_err(|_| malformed("the tag is not 32 hex bytes"))?;
        Ok(proof)
    }
}

/// Checks proofs as they arrive: the key, the clock, and the nonces seen within the window.
#[derive(Debug)]
pub struct ProofChecker {
    key: ClusterKey,
    /// Each nonce seen, with the time after which its proof is too old to pass anyway.
    seen: Mutex<NonceMemory>,
}

#[derive(Debug, Default)]
struct NonceMemory {
    expiries: HashMap<[u8; 16], u64>,
    /// When expired nonces were last dropped; they are dropped once per window...
    pruned_at: u64,
    /// ... or sooner, when there are this many.
    next_prune: usize,
}

impl ProofChecker {
    /// A checker for proofs made with `key`.
    pub fn new(key: ClusterKey) -> Self {
        Self { key, seen: Mutex::default() }
    }

    /// The key it checks against (to answer with proofs of its own).
    pub fn key(&self) -> &ClusterKey {
        &self.key
    }

    /// Accepts `proof` (its text form, `None` when absent) for `payload` once, now.
    pub fn check(&self, proof: Option<&str>, purpose: Purpose, payload: &[u8]) -> Rejected<Proof> {
        let proof: Proof = proof.ok_or(Rejection::Missing)?.parse()?;
        self.check_at(&proof, purpose, payload, unix_now())?;
        Ok(proof)
    }

    fn check_at(&self, proof: &Proof, purpose: Purpose, payload: &[u8], now: u64) -> Rejected<()> {
        self.key.verify(proof, purpose, payload, now)?;
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.expiries.len() >= seen.next_prune || now >= seen.pruned_at + MAX_CLOCK_SKEW_SECS {
            seen.expiries.retain(|_, expiry| *expiry >= now);
            seen.next_prune = (seen.expiries.len() * 2).max(1024);
            seen.pruned_at = now;
        }
        if seen.expiries.contains_key(&proof.nonce) {
            return Err(Rejection::Replayed);
        }
        if seen.expiries.len() >= MAX_REMEMBERED_NONCES {
            return Err(Rejection::Overloaded);
        }
        seen.expiries.insert(proof.nonce, proof.timestamp + MAX_CLOCK_SKEW_SECS);
        Ok(())
    }
}

/// Senders refused for want of the key, so that each is logged once, not per message.
#[derive(Debug, Default)]
pub struct Strangers {
    named: Mutex<BTreeSet<String>>,
}

impl Strangers {
    /// None named yet.
    pub const fn new() -> Self {
        Self { named: Mutex::new(BTreeSet::new()) }
    }

    /// True the first time `who` is refused (while fewer than a bound are named).
    pub fn first_refusal(&self, who: &str) -> bool {
        let mut named = self.named.lock().unwrap_or_else(|p| p.into_inner());
        named.len() < MAX_STRANGERS_LOGGED && named.insert(who.to_string())
    }
}

/// Seconds since the Unix epoch (0 for a clock set before it).
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_700_000_000;

    fn key(text: &str) -> ClusterKey {
        ClusterKey::new(text).unwrap()
    }

    fn checker() -> ProofChecker {
        ProofChecker::new(key("correct horse battery staple"))
    }

    #[test]
    fn a_proof_verifies_with_its_key_purpose_and_payload_only() {
        let k = key("correct horse battery staple");
        let proof = k.prove_at(Purpose::Announcement, b"hello", NOW, [7; 16]);
        assert_eq!(k.verify(&proof, Purpose::Announcement, b"hello", NOW), Ok(()));
        let other = key("correct horse battery stapler");
        assert_eq!(other.verify(&proof, Purpose::Announcement, b"hello", NOW), Err(Rejection::WrongTag));
        assert_eq!(k.verify(&proof, Purpose::Announcement, b"hellO", NOW), Err(Rejection::WrongTag));
        assert_eq!(k.verify(&proof, Purpose::Call, b"hello", NOW), Err(Rejection::WrongTag));
        let mut shifted = proof.clone();
        shifted.timestamp += 1;
        assert_eq!(k.verify(&shifted, Purpose::Announcement, b"hello", NOW), Err(Rejection::WrongTag));
    }

    #[test]
    fn clock_skew_beyond_the_window_is_refused_either_way() {
        let k = key("correct horse battery staple");
        let proof = k.prove_at(Purpose::Call, b"", NOW, [1; 16]);
        for now in [NOW - MAX_CLOCK_SKEW_SECS, NOW + MAX_CLOCK_SKEW_SECS] {
            assert_eq!(k.verify(&proof, Purpose::Call, b"", now), Ok(()));
        }
        assert_eq!(k.verify(&proof, Purpose::Call, b"", NOW + 31), Err(Rejection::Skewed(31)));
        assert_eq!(k.verify(&proof, Purpose::Call, b"", NOW - 45), Err(Rejection::Skewed(45)));
        assert!(Rejection::Skewed(45).to_string().contains("45 s off"));
    }

    #[test]
    fn a_nonce_passes_once_and_is_forgotten_after_the_window() {
        let checker = checker();
        let proof = checker.key().prove_at(Purpose::Call, b"", NOW, [2; 16]);
        assert_eq!(checker.check_at(&proof, Purpose::Call, b"", NOW), Ok(()));
        assert_eq!(checker.check_at(&proof, Purpose::Call, b"", NOW + 1), Err(Rejection::Replayed));
        let fresh = checker.key().prove_at(Purpose::Call, b"", NOW, [3; 16]);
        assert_eq!(checker.check_at(&fresh, Purpose::Call, b"", NOW + 1), Ok(()));
        // Past the window the proof fails on its age, so its nonce need not be remembered.
        let late = NOW + MAX_CLOCK_SKEW_SECS + 1;
        assert_eq!(checker.check_at(&proof, Purpose::Call, b"", late), Err(Rejection::Skewed(31)));
    }

    #[test]
    fn expired_nonces_are_pruned() {
        let checker = checker();
        for i in 0..3000u32 {
            let mut nonce = [0; 16];
            nonce[..4].copy_from_slice(&i.to_be_bytes());
            let proof = checker.key().prove_at(Purpose::Call, b"", NOW, nonce);
            assert_eq!(checker.check_at(&proof, Purpose::Call, b"", NOW), Ok(()));
        }
        let later = NOW + MAX_CLOCK_SKEW_SECS + 1;
        let proof = checker.key().prove_at(Purpose::Call, b"", later, [9; 16]);
        assert_eq!(checker.check_at(&proof, Purpose::Call, b"", later), Ok(()));
        assert_eq!(checker.seen.lock().unwrap().expiries.len(), 1);
    }

    #[test]
    fn proofs_round_trip_through_text_and_malformed_text_is_named() {
        let proof = key("correct horse battery staple").prove(Purpose::Call, b"");
        let text = proof.to_string();
        assert!(text.starts_with("v1."), "{text}");
        assert_eq!(text.parse::<Proof>(), Ok(proof));
        for (bad, what) in [
            ("", "v1"),
            ("v2.1.00.00", "v1"),
            ("v1.1.2", "v1.TIMESTAMP"),
            ("v1.x.00000000000000000000000000000000.00", "timestamp"),
            ("v1.1.zz.00", "nonce"),
            (&format!("v1.1.{}.abc", "0".repeat(32)), "tag"),
            (&format!("{text}.extra"), "v1.TIMESTAMP"),
        ] {
            match bad.parse::<Proof>() {
                Err(Rejection::Malformed(message)) => assert!(message.contains(what), "{bad}: {message}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
        assert_eq!(checker().check(None, Purpose::Call, b"").unwrap_err(), Rejection::Missing);
    }

    #[test]
    fn short_keys_are_refused_and_the_key_is_never_shown() {
        let error = ClusterKey::new("short").unwrap_err().to_string();
        assert!(error.contains("at least 16 characters"), "{error}");
        let k = key("correct horse battery staple");
        assert!(!format!("{k:?} {:?}", ProofChecker::new(k.clone())).contains("horse"));
    }

    #[test]
    fn each_stranger_is_named_once() {
        let strangers = Strangers::default();
        assert!(strangers.first_refusal("10.0.0.9"));
        assert!(!strangers.first_refusal("10.0.0.9"));
        assert!(strangers.first_refusal("10.0.0.10"));
    }
}
