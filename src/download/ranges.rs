//! Sets of byte ranges of one file: the bytes present locally, the bytes a shard needs, and
//! the requests that fetch the difference.

use std::ops::Range;

use serde::{Deserialize, Serialize};

/// Sorted, disjoint, non-adjacent half-open byte ranges (stored as `[start, end]` pairs).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Vec<(u64, u64)>", into = "Vec<(u64, u64)>")]
pub struct ByteRanges(Vec<Range<u64>>);

impl From<Vec<(u64, u64)>> for ByteRanges {
    fn from(pairs: Vec<(u64, u64)>) -> Self {
        let mut ranges = Self::default();
        for (start, end) in pairs {
            ranges.insert(start..end);
        }
        ranges
    }
}

impl From<ByteRanges> for Vec<(u64, u64)> {
    fn from(ranges: ByteRanges) -> Self {
        ranges.0.into_iter().map(|r| (r.start, r.end)).collect()
    }
}

impl ByteRanges {
    /// The ranges in order.
    pub fn iter(&self) -> impl Iterator<Item = &Range<u64>> {
        self.0.iter()
    }

    /// Adds `range`, merging it with the ranges it overlaps or touches; empty ranges are ignored.
    pub fn insert(&mut self, range: Range<u64>) {
        if range.start >= range.end {
            return;
        }
        let first = self.0.partition_point(|r| r.end < range.start);
        let last = self.0.partition_point(|r| r.start <= range.end);
        let merged = match self.0[first..last] {
            [] => range,
            ref touched => touched[0].start.min(range.start)..touched[touched.len() - 1].end.max(range.end),
        };
        self.0.splice(first..last, [merged]);
    }

    /// The number of bytes in the set.
    pub fn total(&self) -> u64 {
        self.0.iter().map(|r| r.end - r.start).sum()
    }

    /// Whether every byte of `range` is in the set.
    pub fn covers(&self, range: &Range<u64>) -> bool {
        range.start >= range.end || self.0.iter().any(|r| r.start <= range.start && range.end <= r.end)
    }

    /// The bytes of `wanted` that are not in the set.
    pub fn missing(&self, wanted: &ByteRanges) -> ByteRanges {
        let mut missing = ByteRanges::default();
        for want in wanted.iter() {
            let mut from = want.start;
            for have in self.0.iter().filter(|h| h.end > want.start && h.start < want.end) {
                missing.insert(from..have.start.max(from));
                from = from.max(have.end);
            }
            missing.insert(from..want.end);
        }
        missing
    }

    /// The number of bytes of `other` that are also in the set.
    pub fn overlap(&self, other: &ByteRanges) -> u64 {
        other.total() - self.missing(other).total()
    }

    /// The end of the run of bytes that starts at byte 0 (0 when byte 0 is absent).
    pub fn prefix_end(&self) -> u64 {
        self.0.first().filter(|r| r.start == 0).map_or(0, |r| r.end)
    }

    /// The ranges with gaps of at most `gap` bytes between them bridged: one request each,
    /// fetching a few unneeded bytes (alignment padding) rather than making many requests.
    pub fn bridged(&self, gap: u64) -> Vec<Range<u64>> {
        let mut runs: Vec<Range<u64>> = Vec::new();
        for range in &self.0 {
            match runs.last_mut() {
                Some(last) if range.start - last.end <= gap => last.end = range.end,
                _ => runs.push(range.clone()),
            }
        }
        runs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ranges: &[(u64, u64)]) -> ByteRanges {
        ByteRanges::from(ranges.to_vec())
    }

    fn pairs(ranges: &ByteRanges) -> Vec<(u64, u64)> {
        ranges.clone().into()
    }

    #[test]
    fn inserted_ranges_merge_when_they_overlap_or_touch() {
        let mut ranges = set(&[(10, 20), (30, 40)]);
        ranges.insert(20..25);
        assert_eq!(pairs(&ranges), [(10, 25), (30, 40)]);
        ranges.insert(5..50);
        assert_eq!(pairs(&ranges), [(5, 50)]);
        ranges.insert(60..60);
        ranges.insert(0..2);
        assert_eq!(pairs(&ranges), [(0, 2), (5, 50)]);
        assert_eq!(ranges.total(), 47);
        assert_eq!(ranges.prefix_end(), 2);
        assert_eq!(set(&[(3, 4)]).prefix_end(), 0);
        assert_eq!(pairs(&set(&[(30, 40), (10, 20), (15, 35)])), [(10, 40)]);
    }

    #[test]
    fn missing_bytes_are_the_wanted_ones_not_present() {
        let present = set(&[(0, 10), (20, 30)]);
        let wanted = set(&[(5, 25), (28, 40)]);
        assert_eq!(pairs(&present.missing(&wanted)), [(10, 20), (30, 40)]);
        assert_eq!(present.overlap(&wanted), 5 + 5 + 2);
        assert!(present.covers(&(21..29)) && !present.covers(&(9..11)));
        assert!(present.missing(&set(&[(0, 10)])).iter().next().is_none());
        assert_eq!(pairs(&ByteRanges::default().missing(&wanted)), pairs(&wanted));
    }

    #[test]
    fn small_gaps_are_bridged_into_one_request() {
        let ranges = set(&[(0, 100), (132, 200), (1000, 1100)]);
        assert_eq!(ranges.bridged(32), [0..200, 1000..1100]);
        assert_eq!(ranges.bridged(0).len(), 3);
    }

    #[test]
    fn the_record_form_is_a_list_of_pairs() {
        let ranges = set(&[(0, 10), (20, 30)]);
        let text = serde_json::to_string(&ranges).unwrap();
        assert_eq!(text, "[[0,10],[20,30]]");
        assert_eq!(serde_json::from_str::<ByteRanges>("[[20,30],[0,10],[5,5]]").unwrap(), ranges);
    }
}
