//! Which files of a model repository a shard needs: the metadata every node reads, and the
//! safetensors files that the index's `weight_map` assigns to the shard's layers.

use std::collections::{BTreeSet, HashMap};

use crate::engine::candle::{canonical_tensor_name, is_vision_tensor};
use crate::error::{Error, Result};
use crate::shard::Shard;

/// The name of the safetensors index of a multi-file checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The name of a single-file checkpoint.
pub const SINGLE_WEIGHTS_FILE: &str = "model.safetensors";
/// The model's configuration.
pub const CONFIG_FILE: &str = "config.json";

/// Whether a top-level repository file is metadata every shard fetches: configs, the index and
/// tokenizer files (`*.json`, `tokenizer.model`, `*.tiktoken`, `*.txt`). Files in
/// subdirectories (such as Llama's `original/`) and weights are not.
pub fn is_metadata_file(path: &str) -> bool {
    if path.contains('/') || path.starts_with('.') {
        return false;
    }
    path.ends_with(".json")
        || path == "tokenizer.model"
        || path.ends_with(".tiktoken")
        || path.ends_with(".txt")
}

/// Whether `path` is a top-level safetensors weights file.
pub fn is_weights_file(path: &str) -> bool {
    !path.contains('/') && path.ends_with(".safetensors")
}

/// The layer a tensor belongs to (`model.layers.{i}.…`), or None for embeddings, norm, head.
pub fn layer_of(tensor: &str) -> Option<i32> {
    let rest = tensor.strip_prefix("model.layers.")?;
    let (number, _) = rest.split_once('.')?;
    number.parse().ok()
}

/// Whether a shard needs `tensor` (by its canonical name, see [`canonical_tensor_name`]): its
/// own layers, the embeddings on the first shard (and on the last when the head is tied to
/// them), LLaVA's vision tower and projector on the first, every other non-layer tensor (norm,
/// head) on the last shard.
pub fn shard_needs_tensor(shard: &Shard, tensor: &str, tied: bool) -> bool {
    let tensor = canonical_tensor_name(tensor);
    if let Some(layer) = layer_of(&tensor) {
        return shard.start_layer <= layer && layer <= shard.end_layer;
    }
    if tensor.starts_with("model.embed_tokens.") {
        return shard.is_first_layer() || (tied && shard.is_last_layer());
    }
    if is_vision_tensor(&tensor) {
        return shard.is_first_layer();
    }
    shard.is_last_layer()
}

/// The parsed `weight_map` of a safetensors index (tensor name → file name).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WeightMap(pub HashMap<String, String>);

impl WeightMap {
    /// Parses the text of `model.safetensors.index.json`; `source` names it in errors.
    pub fn parse(text: &str, source: &str) -> Result<Self> {
        let index: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| Error::InvalidModel(format!("{source} is not valid JSON: {e}")))?;
        let map = index
            .get("weight_map")
            .and_then(|m| serde_json::from_value::<HashMap<String, String>>(m.clone()).ok())
            .ok_or_else(|| {
                Error::InvalidModel(format!("{source} has no weight_map of tensor names to files"))
            })?;
        for file in map.values() {
            if file.contains('/') || file.contains("..") || !file.ends_with(".safetensors") {
                return Err(Error::InvalidModel(format!(
                    "{source} names an unexpected weights file {file:?}"
                )));
            }
        }
        Ok(Self(map))
    }

    /// Whether the head is tied to the embeddings: the config says so, or there is no `lm_head`.
    pub fn head_is_tied(&self, config_ties: bool) -> bool {
        config_ties || !self.0.keys().any(|name| canonical_tensor_name(name) == "lm_head.weight")
    }

    /// The files holding the tensors `shard` needs, sorted.
    pub fn files_for(&self, shard: &Shard, tied: bool) -> BTreeSet<String> {
        self.0
            .iter()
            .filter(|(tensor, _)| shard_needs_tensor(shard, tensor, tied))
            .map(|(_, file)| file.clone())
            .collect()
    }
}

/// Whether a model's `config.json` text ties the head to the embeddings.
pub fn config_ties_embeddings(config: &serde_json::Value) -> bool {
    let direct = config.get("tie_word_embeddings").and_then(|v| v.as_bool());
    let nested =
        config.get("text_config").and_then(|c| c.get("tie_word_embeddings")).and_then(|v| v.as_bool());
    direct.or(nested).unwrap_or(false)
}

/// The number of decoder layers a `config.json` declares.
pub fn config_layers(config: &serde_json::Value, source: &str) -> Result<i32> {
    let keys = ["num_hidden_layers", "n_layer", "num_layers", "n_layers"];
    let find = |value: &serde_json::Value| keys.iter().find_map(|k| value.get(*k).and_then(|v| v.as_i64()));
    let layers = find(config)
        .or_else(|| config.get("text_config").and_then(find))
        .ok_or_else(|| Error::InvalidModel(format!("{source} does not say how many layers the model has")))?;
    i32::try_from(layers)
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| Error::InvalidModel(format!("{source} declares {layers} layers")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 6-layer model over 3 files: embeddings + layers 0-1, layers 2-3, layers 4-5 + norm (+ head).
    fn weight_map(with_head: bool) -> WeightMap {
        let mut map = HashMap::new();
        map.insert("model.embed_tokens.weight".to_string(), "a.safetensors".to_string());
        for layer in 0..6 {
            let file = ["a", "a", "b", "b", "c", "c"][layer];
            for part in ["self_attn.q_proj.weight", "mlp.down_proj.weight"] {
                map.insert(format!("model.layers.{layer}.{part}"), format!("{file}.safetensors"));
            }
        }
        map.insert("model.norm.weight".into(), "c.safetensors".into());
        if with_head {
            map.insert("lm_head.weight".into(), "c.safetensors".into());
        }
        WeightMap(map)
    }

    fn files(map: &WeightMap, start: i32, end: i32) -> Vec<String> {
        let tied = map.head_is_tied(false);
        map.files_for(&Shard::new("m", start, end, 6), tied).into_iter().collect()
    }

    #[test]
    fn layer_numbers_come_from_the_tensor_prefix() {
        assert_eq!(layer_of("model.layers.12.mlp.up_proj.weight"), Some(12));
        assert_eq!(layer_of("model.layers.x.mlp"), None);
        assert_eq!(layer_of("model.norm.weight"), None);
        assert_eq!(layer_of("lm_head.weight"), None);
    }

    #[test]
    fn each_shard_gets_only_the_files_of_its_layers() {
        let map = weight_map(true);
        assert_eq!(files(&map, 0, 1), ["a.safetensors"]);
        assert_eq!(files(&map, 2, 3), ["b.safetensors"]);
        assert_eq!(files(&map, 4, 5), ["c.safetensors"]);
        assert_eq!(files(&map, 1, 2), ["a.safetensors", "b.safetensors"]);
        assert_eq!(files(&map, 0, 5), ["a.safetensors", "b.safetensors", "c.safetensors"]);
    }

    #[test]
    fn a_tied_head_brings_the_embeddings_to_the_last_shard() {
        let map = weight_map(false);
        assert!(map.head_is_tied(false));
        assert_eq!(files(&map, 4, 5), ["a.safetensors", "c.safetensors"]);
        assert_eq!(files(&map, 2, 3), ["b.safetensors"]);
        let untied = weight_map(true);
        assert!(untied.head_is_tied(true));
        assert!(!untied.head_is_tied(false));
    }

    #[test]
    fn llava_layers_tower_and_head_go_where_a_llamas_would() {
        // llava-hf's layout: the decoder under language_model, the tower under vision_tower.
        let names = [
            ("language_model.model.embed_tokens.weight", "a"),
            ("vision_tower.vision_model.encoder.layers.7.mlp.fc1.weight", "b"),
            ("multi_modal_projector.linear_1.weight", "b"),
            ("language_model.model.layers.0.mlp.up_proj.weight", "c"),
            ("language_model.model.layers.5.mlp.up_proj.weight", "d"),
            ("language_model.lm_head.weight", "e"),
        ];
        let map = WeightMap(names.iter().map(|(n, f)| (n.to_string(), format!("{f}.safetensors"))).collect());
        assert!(!map.head_is_tied(false));
        assert_eq!(files(&map, 0, 2), ["a.safetensors", "b.safetensors", "c.safetensors"]);
        assert_eq!(files(&map, 3, 5), ["d.safetensors", "e.safetensors"]);
    }

    #[test]
    fn the_index_must_name_plain_safetensors_files() {
        assert!(WeightMap::parse(r#"{"weight_map": {"x": "../evil.safetensors"}}"#, "idx").is_err());
        assert!(WeightMap::parse(r#"{"weight_map": {"x": "a.bin"}}"#, "idx").is_err());
        assert!(WeightMap::parse(r#"{"metadata": {}}"#, "idx").is_err());
        assert!(WeightMap::parse("not json", "idx").is_err());
        let ok = WeightMap::parse(r#"{"weight_map": {"x": "a.safetensors"}}"#, "idx").unwrap();
        assert_eq!(ok.0["x"], "a.safetensors");
    }

    #[test]
    fn metadata_is_top_level_configs_and_tokenizer_files() {
        for name in
            ["config.json", "tokenizer.json", "merges.txt", "tokenizer.model", "x.tiktoken", INDEX_FILE]
        {
            assert!(is_metadata_file(name), "{name}");
        }
        for name in ["original/params.json", "model.safetensors", "README.md", ".gitattributes", "model.py"] {
            assert!(!is_metadata_file(name), "{name}");
        }
        assert!(is_weights_file("model-00001-of-00002.safetensors"));
        assert!(!is_weights_file("original/consolidated.safetensors"));
    }

    #[test]
    fn layers_are_read_from_the_config() {
        let config = serde_json::json!({"num_hidden_layers": 16, "tie_word_embeddings": true});
        assert_eq!(config_layers(&config, "c").unwrap(), 16);
        assert!(config_ties_embeddings(&config));
        let nested = serde_json::json!({"text_config": {"num_hidden_layers": 8}});
        assert_eq!(config_layers(&nested, "c").unwrap(), 8);
        assert!(!config_ties_embeddings(&nested));
        assert!(config_layers(&serde_json::json!({"hidden_size": 8}), "c").is_err());
        assert!(config_layers(&serde_json::json!({"num_hidden_layers": 0}), "c").is_err());
    }
}
