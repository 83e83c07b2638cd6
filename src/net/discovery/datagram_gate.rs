//! The gate in front of UDP discovery's decoder. Discovery listens on a port anyone on the LAN
//! can send to; a presence message is a few hundred bytes and a peer sends one per interface
//! every 2.5 s, so datagrams over [`MAX_DATAGRAM_BYTES`] and a source's datagrams past
//! [`MAX_DATAGRAMS_PER_SECOND`] are dropped unparsed. Each source is logged once per reason.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Largest datagram parsed.
pub const MAX_DATAGRAM_BYTES: usize = 16 * 1024;
/// Datagrams parsed per source address and second; the rest of the second's are dropped.
pub const MAX_DATAGRAMS_PER_SECOND: u32 = 200;
/// Sources remembered before the quiet ones are forgotten (a flood of spoofed addresses
/// must not grow the table without end).
const MAX_SOURCES: usize = 4096;

/// Why a datagram was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dropped {
    /// Over [`MAX_DATAGRAM_BYTES`].
    TooLarge,
    /// Past its source's [`MAX_DATAGRAMS_PER_SECOND`].
    TooFast,
}

/// Counts each source's datagrams in one-second windows.
#[derive(Debug, Default)]
pub struct DatagramGate {
    windows: HashMap<IpAddr, (Instant, u32)>,
    logged: HashSet<(IpAddr, Dropped)>,
}

impl DatagramGate {
    /// Whether a datagram of `len` bytes from `source` arriving at `now` may be parsed; a
    /// dropped one is logged the first time its source is dropped for that reason.
    pub fn admit(&mut self, source: IpAddr, len: usize, now: Instant) -> Result<(), Dropped> {
        let verdict = self.judge(source, len, now);
        if let Err(reason) = verdict {
            if self.logged.len() < MAX_SOURCES && self.logged.insert((source, reason)) {
                match reason {
                    Dropped::TooLarge => log::warn!(
                        "dropping UDP discovery datagrams over {MAX_DATAGRAM_BYTES} bytes from {source} \
                         (got {len}; logged once)"
                    ),
                    Dropped::TooFast => log::warn!(
                        "dropping UDP discovery datagrams from {source} past {MAX_DATAGRAMS_PER_SECOND} a second \
                         (logged once)"
                    ),
                }
            }
        }
        verdict
    }

    fn judge(&mut self, source: IpAddr, len: usize, now: Instant) -> Result<(), Dropped> {
        if len > MAX_DATAGRAM_BYTES {
            return Err(Dropped::TooLarge);
        }
        if self.windows.len() >= MAX_SOURCES && !self.windows.contains_key(&source) {
            self.windows.retain(|_, (start, _)| now.duration_since(*start) < Duration::from_secs(1));
        }
        let (start, count) = self.windows.entry(source).or_insert((now, 0));
        if now.duration_since(*start) >= Duration::from_secs(1) {
            (*start, *count) = (now, 0);
        }
        if *count >= MAX_DATAGRAMS_PER_SECOND {
            return Err(Dropped::TooFast);
        }
        *count += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn large_datagrams_are_dropped() {
        let mut gate = DatagramGate::default();
        let now = Instant::now();
        assert_eq!(gate.admit(ip(1), MAX_DATAGRAM_BYTES, now), Ok(()));
        assert_eq!(gate.admit(ip(1), MAX_DATAGRAM_BYTES + 1, now), Err(Dropped::TooLarge));
    }

    #[test]
    fn a_flooding_source_is_held_to_its_rate_and_others_pass() {
        let mut gate = DatagramGate::default();
        let now = Instant::now();
        let passed = (0..1000).filter(|_| gate.admit(ip(1), 300, now).is_ok()).count();
        assert_eq!(passed, MAX_DATAGRAMS_PER_SECOND as usize);
        assert_eq!(gate.admit(ip(2), 300, now), Ok(()), "another source has its own budget");
        let next_second = now + Duration::from_secs(1);
        assert_eq!(gate.admit(ip(1), 300, next_second), Ok(()), "the budget renews each second");
    }

    #[test]
    fn spoofed_sources_do_not_grow_the_table_without_end() {
        let mut gate = DatagramGate::default();
        let start = Instant::now();
        for i in 0..3 * MAX_SOURCES as u32 {
            let later = start + Duration::from_millis(u64::from(i));
            assert!(gate.admit(IpAddr::from(i.to_be_bytes()), 10, later).is_ok());
        }
        assert!(gate.windows.len() <= MAX_SOURCES + 1, "{} sources kept", gate.windows.len());
    }
}
