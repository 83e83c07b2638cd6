//! Layer ranges that balance what each node reads per token, the LM head included.
//!
//! exo classic turns each node's share of [0, 1) into the same share of the layers, so the
//! node holding the last layer also runs the LM head on top of its share: for Llama 3.2 1B the
//! head reads as many weights as four of its sixteen layers, and that node sets the pace of a
//! pipeline. Here the shares stay what the partitioning strategy says (memory, for classic's
//! strategy); the layer boundaries move so that every node's cost per unit of share is as even
//! as whole layers allow.

use super::memory::MemoryFit;
use super::partition::Partition;
use crate::error::Result;
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
/// Nodes with no share, or whose share is not worth a layer, hold nothing. With `fit`, no node
/// gets more layers than its memory holds, and a model that fits nowhere is refused
/// (`Error::InsufficientMemory`, naming what is missing). Without `fit`, falls back to
/// classic's mapping when no partition has a share or the costs are not positive and finite;
/// with it, unusable costs count every layer alike.
pub fn balance_layers<'a>(
    partitions: &'a [Partition],
    num_layers: i32,
    model_id: &str,
    costs: ModelCosts,
    fit: Option<&MemoryFit>,
) -> Result<Vec<(&'a str, Shard)>> {
    let shares: Vec<f64> = partitions.iter().map(|p| (p.end - p.start).max(0.0)).collect();
    let usable = |x: f64| x.is_finite() && x >= 0.0;
    let costs_usable = usable(costs.layer) && costs.layer > 0.0 && usable(costs.head);
    if num_layers < 1 || shares.iter().all(|&s| s <= 0.0) || (!costs_usable && fit.is_none()) {
        return Ok(super::partition::assign_layers(partitions, num_layers, model_id));
    }
    let costs = if costs_usable { costs } else { ModelCosts { layer: 1.0, head: 0.0 } };
    let fill = Fill { shares: &shares, num_layers, costs, fit };
    let counts = fill.smallest_bound_counts(model_id)?;
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
    Ok(shards)
}

/// What filling the ring with layers under a bound depends on.
struct Fill<'a> {
    shares: &'a [f64],
    num_layers: i32,
    costs: ModelCosts,
    fit: Option<&'a MemoryFit>,
}

impl Fill<'_> {
    /// Layer counts per node for the smallest feasible bound on cost per unit of share. The
    /// optimum is one of the values `(c * layer [+ head]) / share`, or unbounded when memory
    /// rules those out, so those are searched.
    fn smallest_bound_counts(&self, model_id: &str) -> Result<Vec<i32>> {
        let (counts, unplaced, head_placed) = self.fill(f64::INFINITY);
        if unplaced > 0 {
            let fit = self.fit.expect("without memory limits the largest share holds everything");
            return Err(fit.shortfall(model_id, unplaced as usize, !head_placed));
        }
        let (num_layers, costs) = (self.num_layers, self.costs);
        let mut bounds: Vec<f64> = self
            .shares
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
        let feasible = |bound: f64| {
            let (counts, unplaced, _) = self.fill(bound);
            (unplaced == 0).then_some(counts)
        };
        let (mut low, mut high) = (0, bounds.len());
        while low < high {
            let middle = (low + high) / 2;
            if feasible(bounds[middle]).is_some() {
                high = middle;
            } else {
                low = middle + 1;
            }
        }
        Ok(bounds.get(low).and_then(|&bound| feasible(bound)).unwrap_or(counts))
    }

    /// Layer counts keeping every node's cost within `bound` times its share, and its layers
    /// within its memory, filled from the end of the ring: the last node able to hold the head
    /// and a layer takes the head and as many layers as fit, the nodes before it as many as
    /// fit. Returns the counts, how many layers (the first ones) are left over, and whether
    /// the head found a node.
    fn fill(&self, bound: f64) -> (Vec<i32>, i32, bool) {
        let costs = self.costs;
        let fitting = |budget: f64| ((budget / costs.layer) * (1.0 + SLACK) + SLACK).floor().max(0.0);
        let mut counts = vec![0; self.shares.len()];
        let mut left = self.num_layers;
        let mut head_placed = false;
        for (index, &share) in self.shares.iter().enumerate().rev() {
            if left == 0 {
                break;
            }
            if share <= 0.0 {
                continue;
            }
            let budget = bound * share;
            let by_cost = if head_placed { fitting(budget) } else { fitting(budget - costs.head) };
            let mut take = by_cost.min(f64::from(left)) as i32;
            if let Some(fit) = self.fit {
                let end = left as usize;
                take = fit.model.layers_fitting(fit.nodes[index], end, take as usize) as i32;
            }
            if take > 0 {
                counts[index] = take;
                left -= take;
                head_placed = true;
            }
        }
        (counts, left, head_placed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::MemoryFit;

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
        let got = balance_layers(&partitions, 16, "m", costs, None).unwrap();
        assert_eq!(ranges(&got), [range("a", 0, 9), range("b", 10, 15)]);
    }

    #[test]
    fn a_free_head_keeps_the_shares_as_classic_does() {
        let costs = ModelCosts { layer: 1.0, head: 0.0 };
        let partitions = equal(&["a", "b"]);
        let got = balance_layers(&partitions, 16, "m", costs, None).unwrap();
        assert_eq!(ranges(&got), [range("a", 0, 7), range("b", 8, 15)]);
        let memory = [
            Partition { node_id: "big".into(), start: 0.0, end: 0.75 },
            Partition { node_id: "small".into(), start: 0.75, end: 1.0 },
        ];
        assert_eq!(
            ranges(&balance_layers(&memory, 8, "m", costs, None).unwrap()),
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
        let got = balance_layers(&partitions, 4, "m", ModelCosts { layer: 1.0, head: 10.0 }, None).unwrap();
        assert_eq!(ranges(&got), [range("big", 0, 3)]);
    }

    #[test]
    fn unusable_costs_or_shares_fall_back_to_classic() {
        let parts = equal(&["a", "b"]);
        for costs in [ModelCosts { layer: 0.0, head: 1.0 }, ModelCosts { layer: f64::NAN, head: 1.0 }] {
            assert_eq!(
                ranges(&balance_layers(&parts, 4, "m", costs, None).unwrap()),
                [range("a", 0, 1), range("b", 2, 3)]
            );
        }
        let empty = [Partition { node_id: "a".into(), start: 0.0, end: 0.0 }];
        let got = balance_layers(&empty, 4, "m", ModelCosts { layer: 1.0, head: 1.0 }, None).unwrap();
        assert_eq!(ranges(&got), [range("a", 0, 3)]);
    }

    fn memory(layers: usize, layer: u64) -> crate::topology::ModelMemory {
        crate::topology::ModelMemory {
            layers: vec![layer; layers],
            kv_layer: 10,
            kv_budget: u64::MAX,
            context: 64,
            embedding: 300,
            head: 200,
            head_shares_embedding: false,
        }
    }

    #[test]
    fn a_node_with_too_little_memory_gets_fewer_layers() {
        // Equal shares would give 8 layers each; "b" (last: head 200) has room for 3 layers
        // of 100 bytes and their 10-byte caches, so "a" holds the rest.
        let partitions = equal(&["a", "b"]);
        let fit = MemoryFit { model: memory(16, 100), nodes: vec![10_000, 530] };
        let costs = ModelCosts { layer: 1.0, head: 0.0 };
        let got = balance_layers(&partitions, 16, "m", costs, Some(&fit)).unwrap();
        assert_eq!(ranges(&got), [range("a", 0, 12), range("b", 13, 15)]);
        for (index, (_, shard)) in got.iter().enumerate() {
            assert!(fit.model.shard_need(shard) <= fit.nodes[index], "{shard:?}");
        }
        // Plenty of memory keeps the balanced split.
        let roomy = MemoryFit { model: memory(16, 100), nodes: vec![10_000, 10_000] };
        let got = balance_layers(&partitions, 16, "m", costs, Some(&roomy)).unwrap();
        assert_eq!(ranges(&got), [range("a", 0, 7), range("b", 8, 15)]);
    }

    #[test]
    fn the_first_node_needs_room_for_the_embedding() {
        // "a" could hold 5 layers (550 bytes) but not with the 300-byte embedding; "b" takes
        // the head and as many layers as it can, and the split starts on "a" with 2.
        let partitions = equal(&["a", "b"]);
        let fit = MemoryFit { model: memory(6, 100), nodes: vec![550, 640] };
        let costs = ModelCosts { layer: 1.0, head: 0.0 };
        let got = balance_layers(&partitions, 6, "m", costs, Some(&fit)).unwrap();
        assert_eq!(ranges(&got), [range("a", 0, 1), range("b", 2, 5)]);
    }

    #[test]
    fn a_model_too_big_for_the_cluster_is_refused_with_the_missing_amount() {
        let partitions = equal(&["a", "b"]);
        let gib = 1u64 << 30;
        let model = crate::topology::ModelMemory {
            layers: vec![gib; 10],
            kv_layer: 0,
            kv_budget: 0,
            context: 128,
            embedding: gib / 2,
            head: gib / 2,
            head_shares_embedding: false,
        };
        // 11 GiB needed; "b" holds the head and 3 layers, "a" 4 layers: 3 layers and the
        // embedding (3.5 GiB) fit nowhere.
        let fit = MemoryFit { model, nodes: vec![4 * gib, 4 * gib] };
        let error =
            balance_layers(&partitions, 10, "big-model", ModelCosts { layer: 1.0, head: 1.0 }, Some(&fit))
                .unwrap_err();
        assert_eq!(error.kind(), "insufficient_memory");
        let text = error.to_string();
        assert!(text.contains("big-model"), "{text}");
        assert!(text.contains("needs 11.00 GiB"), "{text}");
        assert!(text.contains("have 8.00 GiB"), "{text}");
        assert!(text.contains("3 of its layers fit on no node: 3.50 GiB missing"), "{text}");
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
            let got = balance_layers(&partitions, num_layers, "m", costs, None).unwrap();
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
