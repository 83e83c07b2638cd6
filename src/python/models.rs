//! The model registry as `exo.models` exposes it (classic's `model_cards` and helpers).

use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::shard::PyShard;
use crate::download::layout::{downloads_dir, hf_cache_snapshot, repo_dir_name};
use crate::download::selection::{config_layers, CONFIG_FILE};
use crate::download::REVISION;
use crate::engine::candle::model_config;
use crate::models;
use crate::shard::Shard;

/// Classic's `model_cards`: `{model_id: {"layers": n, "repo": {engine_class: repo}}}`, as edited.
#[pyfunction]
fn model_cards(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let cards = PyDict::new(py);
    for card in models::model_table() {
        let repos = PyDict::new(py);
        for (engine, repo) in card.repos {
            repos.set_item(engine, repo)?;
        }
        let entry = PyDict::new(py);
        entry.set_item("layers", card.layers)?;
        entry.set_item("repo", repos)?;
        cards.set_item(card.id, entry)?;
    }
    Ok(cards)
}

/// Classic's `pretty_name`: `{model_id: display name}`.
#[pyfunction]
fn pretty_names(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let names = PyDict::new(py);
    for card in models::model_table() {
        if let Some(name) = card.pretty_name {
            names.set_item(card.id, name)?;
        }
    }
    Ok(names)
}

/// Adds `model_id` to the table or replaces its card: `layers` decoder layers, `repos` an
/// `{engine_class: repository}` dict. Raises `InvalidConfigError` naming the id and the bad field.
#[pyfunction]
#[pyo3(signature = (model_id, layers, repos, pretty_name=None))]
fn set_model_card(
    model_id: &str,
    layers: i32,
    repos: Vec<(String, String)>,
    pretty_name: Option<&str>,
) -> PyResult<()> {
    Ok(models::set_model_card(model_id, layers, &repos, pretty_name)?)
}

/// Removes `model_id` from the table (a built-in id included); false when it was not there.
#[pyfunction]
fn remove_model_card(model_id: &str) -> bool {
    models::remove_model_card(model_id)
}

/// Drops every edit of the table: the built-in cards again.
#[pyfunction]
fn reset_model_cards() {
    models::reset_model_cards()
}

/// The repository of `model_id` for an engine class, or None.
#[pyfunction]
fn get_repo(model_id: &str, inference_engine_classname: &str) -> Option<String> {
    models::get_repo(model_id, inference_engine_classname)
}

/// Why `model_id` names nothing the engine (a name or class name) can load, naming both; None
/// when the engine has a repository for it.
#[pyfunction]
fn unavailable_reason(model_id: &str, inference_engine_classname: &str) -> Option<String> {
    models::unavailable_reason(model_id, inference_engine_classname)
}

/// The display name of a registry model, or None.
#[pyfunction]
fn get_pretty_name(model_id: &str) -> Option<&'static str> {
    models::get_pretty_name(model_id)
}

/// The `model_type` of a registry model's weights (`llama`, `llava`, ...); None for an id the
/// registry does not know or one added at run time, whose weights' `config.json` decides.
#[pyfunction]
fn get_architecture(model_id: &str) -> Option<&'static str> {
    models::model_card(model_id)?.architecture
}

/// Registry models that every list of engines (names or class names) can run.
#[pyfunction]
#[pyo3(signature = (supported_inference_engine_lists=None))]
fn get_supported_models(supported_inference_engine_lists: Option<Vec<Vec<String>>>) -> Vec<&'static str> {
    models::get_supported_models(&supported_inference_engine_lists.unwrap_or_default())
}

/// Layers of a model known without network: the registry's, a local GGUF's header, or a
/// `config.json` in a local directory, exo's downloads directory or the Hugging Face cache.
fn known_layers(model_id: &str, engine: &str) -> Option<i32> {
    let repo = models::get_repo(model_id, engine)?;
    if let Some(card) = models::model_card(model_id) {
        return Some(card.layers);
    }
    let path = std::path::Path::new(&repo);
    if !path.join(CONFIG_FILE).is_file() && models::is_local_model(&repo) {
        return model_config(path).ok().map(|c| c.num_hidden_layers as i32);
    }
    let candidates = [
        Some(std::path::PathBuf::from(&repo)).filter(|_| models::is_local_model(&repo)),
        Some(downloads_dir().join(repo_dir_name(&repo))),
        hf_cache_snapshot(&repo, REVISION),
    ];
    candidates.into_iter().flatten().find_map(|dir| {
        let config = dir.join(CONFIG_FILE);
        let value = serde_json::from_str(&std::fs::read_to_string(&config).ok()?).ok()?;
        config_layers(&value, &config.display().to_string()).ok()
    })
}

/// Classic's `build_base_shard`: `Shard(model_id, 0, 0, n_layers)`, or None when the model
/// has no repository for the engine or its layer count is not known without network.
#[pyfunction]
fn build_base_shard(model_id: &str, inference_engine_classname: &str) -> Option<PyShard> {
    let layers = known_layers(model_id, inference_engine_classname)?;
    Some(PyShard { inner: Shard::new(model_id, 0, 0, layers) })
}

/// Classic's `build_full_shard`: every layer of the model, or None.
#[pyfunction]
fn build_full_shard(model_id: &str, inference_engine_classname: &str) -> Option<PyShard> {
    let layers = known_layers(model_id, inference_engine_classname)?;
    Some(PyShard { inner: Shard::new(model_id, 0, layers - 1, layers) })
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(model_cards, m)?)?;
    m.add_function(wrap_pyfunction!(pretty_names, m)?)?;
    m.add_function(wrap_pyfunction!(set_model_card, m)?)?;
    m.add_function(wrap_pyfunction!(remove_model_card, m)?)?;
    m.add_function(wrap_pyfunction!(reset_model_cards, m)?)?;
    m.add_function(wrap_pyfunction!(get_repo, m)?)?;
    m.add_function(wrap_pyfunction!(get_pretty_name, m)?)?;
    m.add_function(wrap_pyfunction!(get_architecture, m)?)?;
    m.add_function(wrap_pyfunction!(unavailable_reason, m)?)?;
    m.add_function(wrap_pyfunction!(get_supported_models, m)?)?;
    m.add_function(wrap_pyfunction!(build_base_shard, m)?)?;
    m.add_function(wrap_pyfunction!(build_full_shard, m)?)?;
    Ok(())
}
