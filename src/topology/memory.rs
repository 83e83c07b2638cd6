//! What a model's parts take in memory once loaded, how many of its layers fit a node, and
//! the error that names what is missing when a model does not fit.

use crate::error::{Error, Result};
use crate::shard::Shard;

/// Bytes a model's parts take once an engine has loaded them (weights as the engine holds them,
/// quantized or not) and what its KV caches may take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelMemory {
    /// Weights of each decoder layer, in order (a GGUF's mixes give layers different sizes).
    pub layers: Vec<u64>,
    /// KV cache of one layer for one request at `context` tokens.
    pub kv_layer: u64,
    /// Most bytes a node's caches hold together (the engine's cache budget).
    pub kv_budget: u64,
    /// Tokens the KV figure is for (the engine's longest context).
    pub context: usize,
    /// Token embedding, on the node holding the first layer.
    pub embedding: u64,
    /// Final norm and LM head, on the node holding the last layer.
    pub head: u64,
    /// Whether the head reuses the embedding's memory when one node holds both.
    pub head_shares_embedding: bool,
}

impl ModelMemory {
    /// Bytes a node needs to hold `layers` (a range of layer indices) and their caches, with
    /// the embedding if `layers` starts the model and the head if it ends it. The caches of a
    /// node never hold more than the budget (the engine evicts idle ones beyond it), and one
    /// request at the full context holds `kv_layer` per layer: the smaller of the two is what
    /// the node must have room for to serve a request at the configured context. Concurrent
    /// shorter requests share that room; past the budget they evict each other instead of
    /// growing.
    pub fn need(&self, layers: std::ops::Range<usize>) -> u64 {
        if layers.is_empty() {
            return 0;
        }
        let (first, last) = (layers.start == 0, layers.end == self.layers.len());
        let count = layers.len() as u64;
        let weights: u64 = self.layers[layers].iter().fold(0, |sum, &b| sum.saturating_add(b));
        let kv = count.saturating_mul(self.kv_layer).min(self.kv_budget);
        let mut bytes = weights.saturating_add(kv);
        if first {
            bytes = bytes.saturating_add(self.embedding);
        }
        if last && !(first && self.head_shares_embedding) {
            bytes = bytes.saturating_add(self.head);
        }
        bytes
    }

    /// Bytes a node needs for `shard`'s layers (see [`ModelMemory::need`]).
    pub fn shard_need(&self, shard: &Shard) -> u64 {
        let (start, end) = (shard.start_layer.max(0) as usize, (shard.end_layer + 1).max(0) as usize);
        self.need(start.min(self.layers.len())..end.min(self.layers.len()))
    }

    /// The most layers ending at layer `end` (exclusive), at most `most`, that fit in
    /// `memory` bytes, holding the embedding too when they reach layer 0.
    pub fn layers_fitting(&self, memory: u64, end: usize, most: usize) -> usize {
        let (mut low, mut high) = (0, most.min(end));
        while low < high {
            let middle = (low + high).div_ceil(2);
            if self.need(end - middle..end) <= memory {
                low = middle;
            } else {
                high = middle - 1;
            }
        }
        low
    }
}

/// A model's memory and the memory of each node it may be split over, in ring order.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryFit {
    /// What the model's parts take.
    pub model: ModelMemory,
    /// Bytes each node has, in the order of the partitions.
    pub nodes: Vec<u64>,
}

impl MemoryFit {
    /// The error for a model whose layers `unplaced` (the first ones) fit on no node, once the
    /// other nodes hold what they can; the head too when `head_unplaced`. What is missing is
    /// what one more node would need to hold what is left (the embedding comes with the first
    /// layer).
    pub fn shortfall(&self, model_id: &str, unplaced: usize, head_unplaced: bool) -> Error {
        let model = &self.model;
        let n = model.layers.len();
        let missing = if head_unplaced { model.need(0..n) } else { model.need(0..unplaced) };
        let kv = (n as u64).saturating_mul(model.kv_layer).min(model.kv_budget);
        Error::InsufficientMemory(format!(
            "{model_id} does not fit the memory of the cluster: it needs {} ({n} layers, {} of KV \
             cache for {} tokens, embedding and head) and the {} node(s) have {} together; {unplaced} \
             of its layers fit on no node: {} missing to hold them",
            gib(model.need(0..n)),
            gib(kv),
            model.context,
            self.nodes.len(),
            gib(self.nodes.iter().sum()),
            gib(missing),
        ))
    }

    /// An error unless every node's layers in `shards` (node ids in the order of
    /// `node_ids`) fit its memory; a node reporting no memory (0 MB: unknown) is not checked.
    pub fn check(&self, node_ids: &[&str], shards: &[(&str, Shard)]) -> Result<()> {
        for (id, shard) in shards {
            let Some(index) = node_ids.iter().position(|n| n == id) else { continue };
            let (need, have) = (self.model.shard_need(shard), self.nodes[index]);
            if have > 0 && need > have {
                return Err(Error::InsufficientMemory(format!(
                    "{} does not fit the memory of the cluster: node {id} would hold layers {}-{}, \
                     which need {} ({} of KV cache for {} tokens), and it has {}: {} missing",
                    shard.model_id,
                    shard.start_layer,
                    shard.end_layer,
                    gib(need),
                    gib(((shard.end_layer - shard.start_layer + 1) as u64 * self.model.kv_layer)
                        .min(self.model.kv_budget)),
                    self.model.context,
                    gib(have),
                    gib(need - have),
                )));
            }
        }
        Ok(())
    }
}

/// `bytes` in GiB, two decimals.
fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / f64::from(1u32 << 30))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(layers: &[u64]) -> ModelMemory {
        ModelMemory {
            layers: layers.to_vec(),
            kv_layer: 10,
            kv_budget: 25,
            context: 100,
            embedding: 1000,
            head: 500,
            head_shares_embedding: false,
        }
    }

    #[test]
    fn need_counts_weights_capped_caches_embedding_and_head() {
        let m = model(&[100, 200, 300]);
        assert_eq!(m.need(1..2), 200 + 10);
        assert_eq!(m.need(0..2), 300 + 20 + 1000);
        // Three layers' caches (30) are capped by the budget (25).
        assert_eq!(m.need(0..3), 600 + 25 + 1000 + 500);
        assert_eq!(m.need(2..2), 0);
        let shared = ModelMemory { head_shares_embedding: true, ..m.clone() };
        assert_eq!(shared.need(0..3), 600 + 25 + 1000);
        assert_eq!(shared.need(2..3), 300 + 10 + 500);
    }

    #[test]
    fn layers_fitting_is_the_largest_count_within_memory() {
        let m = model(&[100, 200, 300]);
        assert_eq!(m.layers_fitting(309, 3, 3), 0);
        assert_eq!(m.layers_fitting(810, 3, 3), 1);
        assert_eq!(m.layers_fitting(1020, 3, 3), 2);
        assert_eq!(m.layers_fitting(1020, 3, 1), 1);
        // Reaching layer 0 brings the embedding along.
        assert_eq!(m.layers_fitting(1024, 2, 2), 1);
        assert_eq!(m.layers_fitting(1320, 2, 2), 2);
    }
}
