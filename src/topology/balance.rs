//! Layer ranges that balance what each node reads per token, the LM head included.
//!
//! exo classic turns each node's share of [0, 1) into the same share of the layers, so the
//! node holding the last layer also runs the LM head on top of its share: for Llama 3.2 1B the
//! head reads as many weights as four of its sixteen layers, and that node sets the pace of a
//! pipeline. Here the shares stay what the partitioning strategy says (memory, for classic's
//! strategy); the layer boundaries move so that every node's cost per unit of share is as even
//! as whole layers allow.

use super::partition::Partition;
use crate::shard::Shard;

/// What a model's parts cost per generated token, in one unit (weights read).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelCosts {
    /// One decoder layer.
    pub layer: f64,
    /// The final norm and LM head, run by the node holding the last layer.
    pub head: f64,
}

/// Slack for comparing costs rebuilt from a bound against that bound.
const SLACK: f64 = 1e-9;

/// Layer ranges for `partitions`' nodes, in their ring order, that minimise the largest cost
/// per unit of share (a node's layers, plus the head on the node holding the last layer).
/// Nodes with no share, or whose share is not worth a layer, hold nothing. Falls back to
/// classic's mapping when no partition has a share or the costs are not positive and finite.
pub fn balance_layers<'a>(
    partitions: &'a [Partition],
    num_layers: i32,
    model_id: &str,
    costs: ModelCosts,
) -> Vec<(&'a str, Shard)> {
    let shares: Vec<f64> = partitions.iter().map(|p| (p.end - p.start).max(0.0)).collect();
    let usable = |x: f64| x.is_finite() && x >= 0.0;
    if num_layers < 1
        || shares.iter().all(|&s| s <= 0.0)
        || !(usable(costs.layer) && costs.layer > 0.0 && usable(costs.head))
    {
        return super::partition::assign_layers(partitions, num_layers, model_id);
    }
    let counts = smallest_bound_counts(&shares, num_layers, costs);
    let mut shards = Vec::new();
    let mut start = 0;
    for (partition, count) in partitions.iter().zip(counts) {
        if count > 0 {
            shards.push((
                partition.node_id.as_str(),
                Shard::new(model_id, start, start + count - 1, num_layers),
            ));
            start += count;
        }
    }
    shards
}

/// Layer counts per node for the smallest feasible bound on cost per unit of share. The
/// optimum is one of the values `(c * layer [+ head]) / share`, so those are searched.
fn smallest_bound_counts(shares: &[f64], num_layers: i32, costs: ModelCosts) -> Vec<i32> {
    let mut bounds: Vec<f64> = shares
        .iter()
        .filter(|&&share| share > 0.0)
        .flat_map(|&share| {
            (0..=num_layers).flat_map(move |c| {
                let layers = f64::from(c) * costs.layer;
                [layers / share, (layers + costs.head) / share]
            })
        })
        .collect();
    bounds.sort_by(f64::total_cmp);
    bounds.dedup();
    // The largest bound lets the largest share hold everything, so a feasible one exists.
    let (mut low, mut high) = (0, bounds.len() - 1);
    while low < high {
        let middle = (low + high) / 2;
        if counts_within(shares, num_layers, costs, bounds[middle]).is_some() {
            high = middle;
        } else {
            low = middle + 1;
        }
    }
    counts_within(shares, num_layers, costs, bounds[low]).expect("the largest bound is feasible")
}

/// Layer counts keeping every node's cost within `bound` times its share, filled from the end
/// of the ring: the last node able to hold the head and a layer takes the head and as many
/// layers as fit, the nodes before it as many as fit. `None` if the layers do not all fit.
fn counts_within(shares: &[f64], num_layers: i32, costs: ModelCosts, bound: f64) -> Option<Vec<i32>> {
    let fitting = |budget: f64| ((budget / costs.layer) * (1.0 + SLACK) + SLACK).floor().max(0.0);
    let mut counts = vec![0; shares.len()];
    let mut left = num_layers;
    let mut head_placed = false;
    for (count, &share) in counts.iter_mut().zip(shares).rev() {
        if left == 0 {
            break;
        }
        let budget = bound * share;
        let capacity = if head_placed { fitting(budget) } else { fitting(budget - costs.head) };
        let take = capacity.min(f64::from(left)) as i32;
        if take > 0 {
            *count = take;
            left -= take;
            head_placed = true;
        }
    }
    (left == 0).then_some(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn equal(ids: &[&str]) -> Vec<Partition> {
        let n = ids.len() as f64;
        ids.iter()
            .enumerate()
            .map(|(i, id)| Partition { node_id: (*id).into(), start: i as f64 / n, end: (i + 1) as f64 / n })
            .collect()
    }

    fn ranges(shards: &[(&str, Shard)]) -> Vec<(String, i32, i32)> {
        shards.iter().map(|(id, s)| (id.to_string(), s.start_layer, s.end_layer)).collect()
    }

    fn range(id: &str, start: i32, end: i32) -> (String, i32, i32) {
        (id.into(), start, end)
    }

    #[test]
    fn llama_3_2_1b_on_two_equal_nodes_moves_layers_off_the_head() {
        // Per layer: q, o 2048x2048, k, v 512x2048, MLP 3 x 2048x8192; head 128256x2048.
        let costs = ModelCosts { layer: 60_817_408.0, head: 262_668_288.0 };
        let partitions = equal(&["a", "b"]);
        let got = balance_layers(&partitions, 16, "m", costs);
        assert_eq!(ranges(&got), [range("a", 0, 9), range("b", 10, 15)]);
    }

    #[test]
    fn a_free_head_keeps_the_shares_as_classic_does() {
        let costs = ModelCosts { layer: 1.0, head: 0.0 };
        let partitions = equal(&["a", "b"]);
        let got = balance_layers(&partitions, 16, "m", costs);
        assert_eq!(ranges(&got), [range("a", 0, 7), range("b", 8, 15)]);
        let memory = [
            Partition { node_id: "big".into(), start: 0.0, end: 0.75 },
            Partition { node_id: "small".into(), start: 0.75, end: 1.0 },
        ];
        assert_eq!(
            ranges(&balance_layers(&memory, 8, "m", costs)),
            [range("big", 0, 5), range("small", 6, 7)]
        );
    }

    #[test]
    fn a_head_heavier_than_a_small_node_can_carry_skips_it() {
        // The head costs 10 layers: the tiny last node cannot hold it with a layer in time,
        // so the big node holds everything rather than wait on it.
        let partitions = [
            Partition { node_id: "big".into(), start: 0.0, end: 0.95 },
            Partition { node_id: "tiny".into(), start: 0.95, end: 1.0 },
        ];
        let got = balance_layers(&partitions, 4, "m", ModelCosts { layer: 1.0, head: 10.0 });
        assert_eq!(ranges(&got), [range("big", 0, 3)]);
    }

    #[test]
    fn unusable_costs_or_shares_fall_back_to_classic() {
        let parts = equal(&["a", "b"]);
        for costs in [ModelCosts { layer: 0.0, head: 1.0 }, ModelCosts { layer: f64::NAN, head: 1.0 }] {
            assert_eq!(ranges(&balance_layers(&parts, 4, "m", costs)), [range("a", 0, 1), range("b", 2, 3)]);
        }
        let empty = [Partition { node_id: "a".into(), start: 0.0, end: 0.0 }];
        let got = balance_layers(&empty, 4, "m", ModelCosts { layer: 1.0, head: 1.0 });
        assert_eq!(ranges(&got), [range("a", 0, 3)]);
    }

    proptest::proptest! {
        #[test]
        fn every_layer_is_held_once_and_no_split_beats_the_bound(
            shares in proptest::collection::vec(0u32..100, 1..5),
            num_layers in 1i32..40,
            head in 0.0f64..20.0,
        ) {
            let total: u32 = shares.iter().sum::<u32>().max(1);
            let mut start = 0.0;
            let partitions: Vec<Partition> = shares.iter().enumerate().map(|(i, &s)| {
                let end = start + f64::from(s) / f64::from(total);
                let p = Partition { node_id: format!("n{i}"), start, end };
                start = end;
                p
            }).collect();
            let costs = ModelCosts { layer: 1.0, head };
            let got = balance_layers(&partitions, num_layers, "m", costs);
            let mut next = 0;
            for (_, shard) in &got {
                proptest::prop_assert_eq!(shard.start_layer, next);
                next = shard.end_layer + 1;
            }
            proptest::prop_assert_eq!(next, num_layers);
            if shares.iter().any(|&s| s > 0) {
                // No split into contiguous counts does better (checked by brute force on 2 nodes).
                let share = |id: &str| partitions.iter().find(|p| p.node_id == id).map(|p| p.end - p.start).unwrap();
                let cost = |shards: &[(&str, Shard)]| shards.iter().enumerate().map(|(i, (id, s))| {
                    let c = f64::from(s.end_layer - s.start_layer + 1) + if i == shards.len() - 1 { head } else { 0.0 };
                    c / share(id)
                }).fold(0.0, f64::max);
                if partitions.len() == 2 && shares.iter().all(|&s| s > 0) {
                    for first in 0..=num_layers {
                        let split = [
                            ("n0", Shard::new("m", 0, first - 1, num_layers)),
                            ("n1", Shard::new("m", first, num_layers - 1, num_layers)),
                        ];
                        let split: Vec<_> = split.into_iter().filter(|(_, s)| s.end_layer >= s.start_layer).collect();
                        proptest::prop_assert!(cost(&got) <= cost(&split) * (1.0 + 1e-6), "{got:?} vs {split:?}");
                    }
                }
            }
        }
    }
}
