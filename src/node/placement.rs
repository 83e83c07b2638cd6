//! Where a model goes when the ring's engines differ: nodes whose engine has no build of the
//! model hold none of it, and an engine that runs only whole models (RKLLM) holds all of it on
//! one node, chosen only when no node that splits layers can run the model.

use crate::engine::loads_whole_models;
use crate::error::{Error, Result};
use crate::models;
use crate::topology::Partition;

/// The nodes a model's layers go to.
#[derive(Debug, Clone, PartialEq)]
pub enum Placement {
    /// Every node of the ring, as partitioned.
    Ring,
    /// Only these nodes, in ring order, their shares stretched to cover the model.
    Among(Vec<Partition>),
    /// This node holds every layer.
    Whole(String),
}

/// Places `model_id` on the nodes of `partitions` (in ring order), given each node's engine
/// (`None` for a classic peer, taken to run whatever the ring runs). A ring whose nodes all run
/// one engine that splits layers, or whose engines are not known, is left as it is.
pub fn place(
    partitions: &[Partition],
    engine_of: impl Fn(&str) -> Option<String>,
    model_id: &str,
) -> Result<Placement> {
    let engines: Vec<Option<String>> = partitions.iter().map(|p| engine_of(&p.node_id)).collect();
    let known: Vec<&str> = engines.iter().flatten().map(String::as_str).collect();
    let one_engine = known.windows(2).all(|pair| pair[0] == pair[1]);
    if one_engine && !known.iter().any(|&e| loads_whole_models(e)) {
        return Ok(Placement::Ring);
    }
    let runs = |engine: &Option<String>| {
        engine.as_deref().is_none_or(|e| models::get_repo(model_id, models::engine_class(e)).is_some())
    };
    let whole = |engine: &Option<String>| engine.as_deref().is_some_and(loads_whole_models);
    let splitters: Vec<&Partition> =
        partitions.iter().zip(&engines).filter(|(_, e)| runs(e) && !whole(e)).map(|(p, _)| p).collect();
    if splitters.len() == partitions.len() {
        return Ok(Placement::Ring);
    }
    if !splitters.is_empty() {
        return Ok(Placement::Among(stretched(&splitters)));
    }
    // The first in ring order is the node with the most memory.
    let holder = partitions.iter().zip(&engines).find(|(_, e)| runs(e) && whole(e));
    if let Some((partition, _)) = holder {
        return Ok(Placement::Whole(partition.node_id.clone()));
    }
    let mut engines: Vec<&str> = known;
    engines.sort_unstable();
    engines.dedup();
    Err(Error::InvalidModel(format!(
        "no node of the cluster can run the model '{model_id}': its engines ({}) have no build of it",
        engines.join(", ")
    )))
}

/// `kept`'s shares laid end to end and scaled to cover [0, 1), in the same order.
fn stretched(kept: &[&Partition]) -> Vec<Partition> {
    let total: f64 = kept.iter().map(|p| p.end - p.start).sum();
    let mut start = 0.0;
    kept.iter()
        .enumerate()
        .map(|(i, p)| {
            let share = if total > 0.0 { (p.end - p.start) / total } else { 1.0 / kept.len() as f64 };
            let end = if i + 1 == kept.len() { 1.0 } else { start + share };
            let partition = Partition { node_id: p.node_id.clone(), start, end };
            start = end;
            partition
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(shares: &[(&str, f64)]) -> Vec<Partition> {
        let mut start = 0.0;
        shares
            .iter()
            .map(|&(id, share)| {
                let p = Partition { node_id: id.into(), start, end: start + share };
                start += share;
                p
            })
            .collect()
    }

    fn engines<'a>(table: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |id| table.iter().find(|(node, _)| *node == id).map(|(_, engine)| engine.to_string())
    }

    #[test]
    fn a_ring_of_one_engine_is_left_alone() {
        let partitions = ring(&[("a", 0.5), ("b", 0.5)]);
        let placed = place(&partitions, engines(&[("a", "candle"), ("b", "candle")]), "llama-3.2-1b");
        assert_eq!(placed.unwrap(), Placement::Ring);
        // Classic peers say nothing of their engine, and keep classic's partition.
        assert_eq!(place(&partitions, engines(&[("a", "candle")]), "llama-3.2-1b").unwrap(), Placement::Ring);
    }

    #[test]
    fn a_model_rkllm_cannot_run_is_split_among_the_other_nodes() {
        let partitions = ring(&[("npu", 0.5), ("a", 0.3), ("b", 0.2)]);
        let table = [("npu", "rkllm"), ("a", "candle"), ("b", "candle")];
        let Placement::Among(kept) = place(&partitions, engines(&table), "llama-3.2-1b").unwrap() else {
            panic!("the rkllm node should be left out");
        };
        let ids: Vec<&str> = kept.iter().map(|p| p.node_id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        assert!((kept[0].end - 0.6).abs() < 1e-12 && kept[1].start == kept[0].end && kept[1].end == 1.0);
    }

    #[test]
    fn an_rkllm_model_goes_whole_to_an_rkllm_node() {
        let partitions = ring(&[("a", 0.6), ("npu", 0.4)]);
        let table = [("a", "candle"), ("npu", "rkllm")];
        let placed = place(&partitions, engines(&table), "qwen2.5-1.5b-rkllm").unwrap();
        assert_eq!(placed, Placement::Whole("npu".into()));
        // Two boards: the model is not split between them.
        let boards = ring(&[("npu1", 0.5), ("npu2", 0.5)]);
        let placed = place(&boards, engines(&[("npu1", "rkllm"), ("npu2", "rkllm")]), "qwen2.5-1.5b-rkllm");
        assert_eq!(placed.unwrap(), Placement::Whole("npu1".into()));
    }

    #[test]
    fn a_model_no_engine_has_is_refused_by_name() {
        let partitions = ring(&[("a", 0.5), ("npu", 0.5)]);
        let table = [("a", "candle"), ("npu", "rkllm")];
        let err = place(&partitions, engines(&table), "no-such-model").unwrap_err().to_string();
        assert!(err.contains("no-such-model") && err.contains("candle, rkllm"), "{err}");
    }
}
