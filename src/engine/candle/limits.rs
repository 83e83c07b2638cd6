//! How much a candle engine's requests may hold: the bytes of all KV caches together
//! (`--max-kv-cache-gb`, else a quarter of the machine's memory) and the context of one request
//! (`--max-context`, else the model's own limit cut to what the cache budget holds of it).
//!
//! A fixed default fits no machine: 2 GiB of caches is a tenth of a 24 GB box's memory and the
//! whole of a small board's, and one Llama-3.1-8B request at its 128k context takes 16 GiB of
//! f32 keys and values. So unless told, the budget follows the machine and the context follows
//! the budget.

use super::config::ModelConfig;
use crate::error::{Error, Result};

/// Environment variable with the KV cache budget in GB (GiB), read when no value is passed.
pub const MAX_KV_CACHE_GB_ENV: &str = "EXO_MAX_KV_CACHE_GB";
/// Environment variable with the longest context in tokens, read when no value is passed.
pub const MAX_CONTEXT_ENV: &str = "EXO_MAX_CONTEXT";

/// Bytes in one GB as the flag counts it (a GiB, as memory is sized).
const GB: f64 = (1u64 << 30) as f64;

/// The default cache budget is the machine's memory divided by this.
const MEMORY_SHARE_DIVISOR: u64 = 4;

/// Bytes of one cached key or value element: the caches hold f32.
const CACHE_ELEMENT_BYTES: u64 = 4;

/// The limits of one engine.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Bytes all requests' KV caches may hold together.
    pub kv_cache_bytes: u64,
    /// Longest context of one request when set; `None` derives it per model.
    pub max_context: Option<usize>,
}

impl Default for Limits {
    /// A quarter of this machine's memory for caches and each model's derived context.
    fn default() -> Self {
        Self { kv_cache_bytes: machine_memory() / MEMORY_SHARE_DIVISOR, max_context: None }
    }
}

impl Limits {
    /// The limits from the values given, else `EXO_MAX_CONTEXT` and `EXO_MAX_KV_CACHE_GB`, else
    /// the defaults; a zero, negative or unreadable value is an error naming where it came from.
    pub fn resolve(max_context: Option<usize>, max_kv_cache_gb: Option<f64>) -> Result<Self> {
        Self::resolve_with(max_context, max_kv_cache_gb, |name| std::env::var(name).ok(), machine_memory())
    }

    /// [`Limits::resolve`] with the environment read through `env` and `memory` bytes of memory.
    fn resolve_with(
        max_context: Option<usize>,
        max_kv_cache_gb: Option<f64>,
        env: impl Fn(&str) -> Option<String>,
        memory: u64,
    ) -> Result<Self> {
        let max_context = match max_context {
            Some(tokens) => Some(checked_context(tokens, "--max-context")?),
            None => match env(MAX_CONTEXT_ENV) {
                Some(text) => Some(checked_context(parse(&text, MAX_CONTEXT_ENV)?, MAX_CONTEXT_ENV)?),
                None => None,
            },
        };
        let kv_cache_bytes = match max_kv_cache_gb {
            Some(gb) => checked_bytes(gb, "--max-kv-cache-gb")?,
            None => match env(MAX_KV_CACHE_GB_ENV) {
                Some(text) => checked_bytes(parse(&text, MAX_KV_CACHE_GB_ENV)?, MAX_KV_CACHE_GB_ENV)?,
                None => memory / MEMORY_SHARE_DIVISOR,
            },
        };
        Ok(Self { kv_cache_bytes, max_context })
    }

    /// The cache budget in GB (GiB).
    pub fn kv_cache_gb(&self) -> f64 {
        self.kv_cache_bytes as f64 / GB
    }

    /// The context of one request of the model `config` describes: the set context, else the
    /// most positions a request's caches over all the model's layers take within the budget
    /// (a power of two, as caches grow by doubling); never past the model's own limit.
    pub fn context_for(&self, config: &ModelConfig) -> usize {
        let model_limit = config.max_position_embeddings;
        if let Some(tokens) = self.max_context {
            return tokens.min(model_limit);
        }
        let per_position =
            (config.cache_values_per_position() * config.num_hidden_layers) as u64 * CACHE_ELEMENT_BYTES;
        let positions = self.kv_cache_bytes / per_position.max(1);
        let held = if positions == 0 { 1 } else { 1u64 << positions.ilog2() };
        (held as usize).min(model_limit)
    }
}

/// `tokens` when it is a usable context.
fn checked_context(tokens: usize, source: &str) -> Result<usize> {
    if tokens == 0 {
        return Err(Error::InvalidArgument(format!("{source} must be at least 1 token")));
    }
    Ok(tokens)
}

/// `gb` as bytes when it is a usable budget.
fn checked_bytes(gb: f64, source: &str) -> Result<u64> {
    if !gb.is_finite() || gb <= 0.0 {
        return Err(Error::InvalidArgument(format!("{source} must be a positive number of GB, not {gb}")));
    }
    Ok((gb * GB) as u64)
}

/// `text` read as a number, or an error naming `name`.
fn parse<T: std::str::FromStr>(text: &str, name: &str) -> Result<T> {
    text.trim().parse().map_err(|_| Error::InvalidArgument(format!("{name}={text:?} is not a number")))
}

/// This machine's memory in bytes.
fn machine_memory() -> u64 {
    let mut system = sysinfo::System::new();
    system.refresh_memory();
    system.total_memory()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMORY: u64 = 16 << 30;

    fn resolve(context: Option<usize>, gb: Option<f64>, env: &[(&str, &str)]) -> Result<Limits> {
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Limits::resolve_with(
            context,
            gb,
            |name| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()),
            MEMORY,
        )
    }

    /// A Llama-shaped config: 8 KV heads of 64, so 1024 cached values a position a layer.
    fn config(layers: usize, max_positions: usize) -> ModelConfig {
        serde_json::from_value(serde_json::json!({
            "model_type": "llama", "hidden_size": 512, "intermediate_size": 1024,
            "num_hidden_layers": layers, "num_attention_heads": 8, "num_key_value_heads": 8,
            "vocab_size": 100, "max_position_embeddings": max_positions, "rms_norm_eps": 1e-5
        }))
        .unwrap()
    }

    #[test]
    fn without_settings_the_budget_is_a_quarter_of_memory_and_the_context_derived() {
        let limits = resolve(None, None, &[]).unwrap();
        assert_eq!(limits, Limits { kv_cache_bytes: MEMORY / 4, max_context: None });
        assert_eq!(limits.kv_cache_gb(), 4.0);
    }

    #[test]
    fn the_environment_sets_what_no_argument_does() {
        let env = [(MAX_CONTEXT_ENV, "4096"), (MAX_KV_CACHE_GB_ENV, "1.5")];
        let limits = resolve(None, None, &env).unwrap();
        assert_eq!(limits, Limits { kv_cache_bytes: 3 << 29, max_context: Some(4096) });
    }

    #[test]
    fn arguments_win_over_the_environment() {
        let env = [(MAX_CONTEXT_ENV, "4096"), (MAX_KV_CACHE_GB_ENV, "1.5")];
        let limits = resolve(Some(100), Some(0.5), &env).unwrap();
        assert_eq!(limits, Limits { kv_cache_bytes: 1 << 29, max_context: Some(100) });
    }

    #[test]
    fn bad_values_name_their_source() {
        let error = |r: Result<Limits>| r.unwrap_err().to_string();
        assert!(error(resolve(Some(0), None, &[])).contains("--max-context"));
        assert!(error(resolve(None, Some(-1.0), &[])).contains("--max-kv-cache-gb"));
        assert!(error(resolve(None, Some(f64::NAN), &[])).contains("--max-kv-cache-gb"));
        assert!(error(resolve(None, None, &[(MAX_CONTEXT_ENV, "lots")])).contains("EXO_MAX_CONTEXT=\"lots\""));
        assert!(error(resolve(None, None, &[(MAX_KV_CACHE_GB_ENV, "0")])).contains(MAX_KV_CACHE_GB_ENV));
    }

    #[test]
    fn the_derived_context_is_what_the_budget_holds_in_a_power_of_two() {
        // 4 layers × 1024 values × 4 bytes = 16 KiB a position; 1 GiB holds 65536 positions.
        let limits = Limits { kv_cache_bytes: 1 << 30, max_context: None };
        assert_eq!(limits.context_for(&config(4, 1 << 20)), 65_536);
        // 1.5 GiB holds 98304 positions; a cache of that many would grow to 131072, so 65536.
        let limits = Limits { kv_cache_bytes: 3 << 29, max_context: None };
        assert_eq!(limits.context_for(&config(4, 1 << 20)), 65_536);
    }

    #[test]
    fn the_derived_context_never_passes_the_model_and_is_at_least_one() {
        let limits = Limits { kv_cache_bytes: 1 << 30, max_context: None };
        assert_eq!(limits.context_for(&config(4, 8192)), 8192);
        let tiny = Limits { kv_cache_bytes: 100, max_context: None };
        assert_eq!(tiny.context_for(&config(4, 8192)), 1);
    }

    #[test]
    fn a_set_context_wins_over_the_budget_but_not_the_model() {
        let limits = Limits { kv_cache_bytes: 100, max_context: Some(4096) };
        assert_eq!(limits.context_for(&config(4, 8192)), 4096);
        let limits = Limits { kv_cache_bytes: 100, max_context: Some(100_000) };
        assert_eq!(limits.context_for(&config(4, 8192)), 8192);
    }
}
