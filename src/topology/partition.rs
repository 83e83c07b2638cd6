//! Splitting a model across nodes: partitions of [0, 1) and their layer ranges.

use super::graph::Topology;
use crate::shard::Shard;

/// A node's share of the model as a half-open fraction `[start, end)` of its layers.
#[derive(Debug, Clone, PartialEq)]
pub struct Partition {
    /// Node that holds this share.
    pub node_id: String,
    /// Start of the share, in [0, 1].
    pub start: f64,
    /// End of the share (exclusive), in [0, 1].
    pub end: f64,
}

/// Splits a model's layers among the nodes of a topology, as exo classic's `PartitioningStrategy`.
pub trait PartitioningStrategy: Send + Sync {
    /// Contiguous partitions covering [0, 1), in ring order.
    fn partition(&self, topology: &Topology) -> Vec<Partition>;

    /// Whether a node may move the layer boundaries of these shares to even out the model's
    /// per-token costs (`balance_layers`); a strategy whose exact layer ranges matter says no.
    fn allows_balancing(&self) -> bool {
        false
    }
}

/// exo classic's default strategy: nodes in a ring ordered by memory (largest first,
/// ties by node id, descending), each taking a share proportional to its memory.
#[derive(Debug, Clone, Copy, Default)]
pub struct RingMemoryWeightedPartitioning;

impl PartitioningStrategy for RingMemoryWeightedPartitioning {
    /// Partitions every node of `topology`; boundaries are rounded to 5 decimals as classic does.
    ///
    /// Where classic divides by zero (every node reports 0 MB), nodes get equal shares.
    fn partition(&self, topology: &Topology) -> Vec<Partition> {
        let mut nodes: Vec<(&String, u64)> = topology.nodes.iter().map(|(id, c)| (id, c.memory)).collect();
        nodes.sort_by(|a, b| (b.1, b.0).cmp(&(a.1, a.0)));
        // Summed in 128 bits: peers announce their memory, and a few claiming u64::MAX MB
        // would overflow 64.
        let total: u128 = nodes.iter().map(|n| u128::from(n.1)).sum();
        let weight =
            |memory: u64| if total == 0 { 1.0 / nodes.len() as f64 } else { memory as f64 / total as f64 };
        let mut start = 0.0;
        nodes
            .iter()
            .map(|&(id, memory)| {
                let end = round_like_python(start + weight(memory), 5);
                let partition = Partition { node_id: id.clone(), start, end };
                start = end;
                partition
            })
            .collect()
    }

    /// Shares by memory are a capacity estimate, not exact layer ranges.
    fn allows_balancing(&self) -> bool {
        true
    }
}

/// Python's `round(x, digits)`: the double nearest to `x` correctly rounded to `digits`
/// decimals, ties to even. Rust's fixed-precision formatting rounds exactly the same way.
fn round_like_python(x: f64, digits: usize) -> f64 {
    format!("{x:.digits$}").parse().expect("a formatted f64 parses back")
}

/// Turns partitions into layer ranges as exo classic does: `int(start * n)` to
/// `int(end * n) - 1`, the last partition stretched to the final layer, empty ranges dropped.
pub fn map_partitions_to_shards(partitions: &[Partition], num_layers: i32, model_id: &str) -> Vec<Shard> {
    assign_layers(partitions, num_layers, model_id).into_iter().map(|(_, shard)| shard).collect()
}

/// The layer range of every partition that gets at least one layer, with the node holding it.
pub fn assign_layers<'a>(
    partitions: &'a [Partition],
    num_layers: i32,
    model_id: &str,
) -> Vec<(&'a str, Shard)> {
    let layer_at = |fraction: f64| (fraction * f64::from(num_layers)) as i32;
    let mut shards: Vec<(&str, Shard)> = Vec::with_capacity(partitions.len());
    for (i, partition) in partitions.iter().enumerate() {
        let start_layer = layer_at(partition.start);
        let end_layer = if i == partitions.len() - 1 { num_layers - 1 } else { layer_at(partition.end) - 1 };
        if start_layer <= end_layer {
            shards.push((&partition.node_id, Shard::new(model_id, start_layer, end_layer, num_layers)));
        }
    }
    if let Some((_, last)) = shards.last_mut() {
        last.end_layer = last.end_layer.max(num_layers - 1);
    }
    shards
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{DeviceCapabilities, DeviceFlops};

    fn topology(memories: &[(&str, u64)]) -> Topology {
        let mut t = Topology::new();
        for &(id, memory) in memories {
            t.update_node(id, DeviceCapabilities::new("m", "c", memory, DeviceFlops::new(0.0, 0.0, 0.0)));
        }
        t
    }

    fn partition(id: &str, start: f64, end: f64) -> Partition {
        Partition { node_id: id.into(), start, end }
    }

    #[test]
    fn weights_follow_memory_largest_first() {
        let t = topology(&[("node1", 3000), ("node2", 1000), ("node3", 6000)]);
        let got = RingMemoryWeightedPartitioning.partition(&t);
        assert_eq!(
            got,
            [partition("node3", 0.0, 0.6), partition("node1", 0.6, 0.9), partition("node2", 0.9, 1.0)]
        );
    }

    #[test]
    fn equal_memory_breaks_ties_by_id_descending() {
        let t = topology(&[("a", 100), ("c", 100), ("b", 100)]);
        let ids: Vec<_> =
            RingMemoryWeightedPartitioning.partition(&t).into_iter().map(|p| p.node_id).collect();
        assert_eq!(ids, ["c", "b", "a"]);
    }

    #[test]
    fn boundaries_round_like_python() {
        // Values checked against CPython's round(x, 5).
        assert_eq!(round_like_python(0.015625, 5), 0.01562);
        assert_eq!(round_like_python(0.1 + 0.2, 5), 0.3);
        assert_eq!(round_like_python(0.123455, 5), 0.12345);
        assert_eq!(round_like_python(2.0 / 3.0, 5), 0.66667);
        let t = topology(&[("a", 1), ("b", 1), ("c", 1)]);
        let ends: Vec<_> = RingMemoryWeightedPartitioning.partition(&t).iter().map(|p| p.end).collect();
        // Like classic, the rounded shares need not reach 1.0; the last shard is stretched instead.
        assert_eq!(ends, [0.33333, 0.66666, 0.99999]);
    }

    #[test]
    fn zero_memory_everywhere_splits_equally() {
        let t = topology(&[("a", 0), ("b", 0)]);
        let got = RingMemoryWeightedPartitioning.partition(&t);
        assert_eq!(got, [partition("b", 0.0, 0.5), partition("a", 0.5, 1.0)]);
    }

    #[test]
    fn shards_match_classic_examples() {
        let parts =
            [partition("a", 0.0, 0.42857), partition("b", 0.42857, 0.71428), partition("c", 0.71428, 1.0)];
        let got = map_partitions_to_shards(&parts, 32, "model");
        let expected = [
            Shard::new("model", 0, 12, 32),
            Shard::new("model", 13, 21, 32),
            Shard::new("model", 22, 31, 32),
        ];
        assert_eq!(got, expected);
        let tiny = [partition("a", 0.0, 0.1), partition("b", 0.1, 1.0)];
        assert_eq!(map_partitions_to_shards(&tiny, 2, "m"), [Shard::new("m", 0, 1, 2)]);
    }

    #[test]
    fn memories_summing_past_64_bits_still_partition() {
        // Peers announce their memory; two claiming u64::MAX MB once overflowed the sum.
        let parts = RingMemoryWeightedPartitioning.partition(&topology(&[("a", u64::MAX), ("b", u64::MAX)]));
        assert_eq!((parts[0].end, parts[1].end), (0.5, 1.0));
    }

    proptest::proptest! {
        #[test]
        fn every_layer_is_assigned_exactly_once(
            memories in proptest::collection::vec(0u64..200_000, 1..9),
            num_layers in 1i32..200,
        ) {
            let ids: Vec<String> = (0..memories.len()).map(|i| format!("n{i}")).collect();
            let nodes: Vec<(&str, u64)> = ids.iter().map(String::as_str).zip(memories.iter().copied()).collect();
            let parts = RingMemoryWeightedPartitioning.partition(&topology(&nodes));
            let shards = map_partitions_to_shards(&parts, num_layers, "m");
            let mut next = 0;
            for shard in &shards {
                proptest::prop_assert_eq!(shard.start_layer, next);
                proptest::prop_assert!(shard.end_layer >= shard.start_layer);
                next = shard.end_layer + 1;
            }
            proptest::prop_assert_eq!(next, num_layers);
        }
    }
}
