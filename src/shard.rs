//! A contiguous range of a model's layers: the unit of work one node holds.

use crate::error::{Error, Result};
use crate::proto;

/// Layers `start_layer..=end_layer` of a model with `n_layers` layers.
///
/// Any values can be held (exo classic builds placeholder shards such as
/// `Shard("", 0, 0, 0)`); [`Shard::validate`] checks a shard before it is used.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Shard {
    /// Model identifier (registry id, Hugging Face repo or local path).
    pub model_id: String,
    /// First layer held, 0-based.
    pub start_layer: i32,
    /// Last layer held, inclusive.
    pub end_layer: i32,
    /// Number of layers in the whole model.
    pub n_layers: i32,
}

impl Shard {
    /// A shard over `start_layer..=end_layer` of `model_id`.
    pub fn new(model_id: impl Into<String>, start_layer: i32, end_layer: i32, n_layers: i32) -> Self {
        Self { model_id: model_id.into(), start_layer, end_layer, n_layers }
    }

    /// Whether the shard holds the model's first layer (and so its embeddings).
    pub fn is_first_layer(&self) -> bool {
        self.start_layer == 0
    }

    /// Whether the shard holds the model's last layer (and so its head).
    pub fn is_last_layer(&self) -> bool {
        self.end_layer == self.n_layers - 1
    }

    /// Number of layers held.
    pub fn layer_count(&self) -> i32 {
        self.end_layer - self.start_layer + 1
    }

    /// Whether both shards belong to the same model and share at least one layer.
    pub fn overlaps(&self, other: &Shard) -> bool {
        self.model_id == other.model_id
            && self.start_layer.max(other.start_layer) <= self.end_layer.min(other.end_layer)
    }

    /// exo classic's `to_dict()` form.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "model_id": self.model_id,
            "start_layer": self.start_layer,
            "end_layer": self.end_layer,
            "n_layers": self.n_layers,
        })
    }

    /// Checks that the range is non-empty and lies inside the model.
    pub fn validate(&self) -> Result<()> {
        let in_range =
            0 <= self.start_layer && self.start_layer <= self.end_layer && self.end_layer < self.n_layers;
        if self.model_id.is_empty() {
            return Err(Error::InvalidShard("model_id is empty".into()));
        }
        if !in_range {
            return Err(Error::InvalidShard(format!(
                "layers {}..={} do not fit a model of {} layers ({})",
                self.start_layer, self.end_layer, self.n_layers, self.model_id
            )));
        }
        Ok(())
    }
}

impl From<proto::Shard> for Shard {
    fn from(s: proto::Shard) -> Self {
        Self::new(s.model_id, s.start_layer, s.end_layer, s.n_layers)
    }
}

impl From<Shard> for proto::Shard {
    fn from(s: Shard) -> Self {
        Self {
            model_id: s.model_id,
            start_layer: s.start_layer,
            end_layer: s.end_layer,
            n_layers: s.n_layers,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_last_and_count() {
        let s = Shard::new("m", 0, 3, 8);
        assert!(s.is_first_layer());
        assert!(!s.is_last_layer());
        assert_eq!(s.layer_count(), 4);
        assert!(Shard::new("m", 4, 7, 8).is_last_layer());
    }

    #[test]
    fn overlap_needs_same_model_and_shared_layer() {
        let a = Shard::new("m", 0, 3, 8);
        assert!(a.overlaps(&Shard::new("m", 3, 5, 8)));
        assert!(!a.overlaps(&Shard::new("m", 4, 5, 8)));
        assert!(!a.overlaps(&Shard::new("other", 0, 3, 8)));
    }

    #[test]
    fn validate_rejects_ranges_outside_the_model() {
        assert!(Shard::new("m", 0, 7, 8).validate().is_ok());
        for bad in [
            Shard::new("m", -1, 3, 8),
            Shard::new("m", 4, 3, 8),
            Shard::new("m", 0, 8, 8),
            Shard::new("", 0, 0, 1),
        ] {
            assert!(matches!(bad.validate(), Err(Error::InvalidShard(_))), "{bad:?}");
        }
    }

    #[test]
    fn proto_round_trip() {
        let s = Shard::new("llama-3.2-1b", 2, 9, 16);
        assert_eq!(Shard::from(proto::Shard::from(s.clone())), s);
    }
}
