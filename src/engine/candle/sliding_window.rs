//! Sliding-window attention: a query sees only the latest `window` positions, itself included.
//! Phi-3 windows every layer; Gemma only its local layers.

use candle_core::{Device, Tensor};

use super::config::ModelConfig;
use super::gemma::Gemma;
use crate::error::Result;

/// The window of `layer`'s attention, if it has one.
pub fn of_layer(config: &ModelConfig, layer: usize) -> Option<usize> {
    match Gemma::new(config) {
        Some(gemma) => gemma.windows[layer],
        None => config.sliding_window.filter(|_| config.model_type == "phi3"),
    }
}

/// The last `window` positions of a layer's cached keys and values (`[batch, kv_heads, len,
/// head_dim]`): all that one new query sees.
pub fn last_positions(keys: Tensor, values: Tensor, window: usize) -> Result<(Tensor, Tensor)> {
    let len = keys.dim(2)?;
    if len <= window {
        return Ok((keys, values));
    }
    Ok((keys.narrow(2, len - window, window)?, values.narrow(2, len - window, window)?))
}

/// `[group * seq, total]` additive mask for queries at `offset..offset + seq`: the query at
/// position `offset + i` sees keys `j` with `offset + i - window < j <= offset + i`.
pub fn mask(
    seq: usize,
    offset: usize,
    total: usize,
    group: usize,
    window: usize,
    device: &Device,
) -> Result<Tensor> {
    let row: Vec<f32> = (0..seq)
        .flat_map(|i| {
            let position = offset + i;
            (0..total)
                .map(move |j| if j > position || j + window <= position { f32::NEG_INFINITY } else { 0.0 })
        })
        .collect();
    Ok(Tensor::from_vec(row, (seq, total), device)?.repeat((group, 1))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> ModelConfig {
        let base = r#""hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
            "num_attention_heads": 4, "vocab_size": 100, "rms_norm_eps": 1e-5, "max_position_embeddings": 64"#;
        serde_json::from_str::<ModelConfig>(&format!("{{{base}, {json}}}")).unwrap().checked().unwrap()
    }

    #[test]
    fn the_mask_keeps_the_window() {
        let mask = mask(3, 2, 5, 1, 2, &Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
        let seen: Vec<Vec<usize>> =
            mask.iter().map(|row| (0..5).filter(|&j| row[j] == 0.0).collect()).collect();
        assert_eq!(seen, [vec![1, 2], vec![2, 3], vec![3, 4]]);
        let keys = Tensor::arange(0f32, 6.0, &Device::Cpu).unwrap().reshape((1, 1, 6, 1)).unwrap();
        let (k, _) = last_positions(keys.clone(), keys, 4).unwrap();
        assert_eq!(k.flatten_all().unwrap().to_vec1::<f32>().unwrap(), [2.0, 3.0, 4.0, 5.0]);
    }

    #[test]
    fn phi3_windows_every_layer_gemma_its_local_ones_mistral_none() {
        let windows = |json: &str| (0..4).map(|l| of_layer(&config(json), l)).collect::<Vec<_>>();
        assert_eq!(windows(r#""model_type": "phi3", "sliding_window": 6"#), [Some(6); 4]);
        assert_eq!(windows(r#""model_type": "gemma2", "sliding_window": 6"#), [Some(6), None, Some(6), None]);
        assert_eq!(windows(r#""model_type": "mistral", "sliding_window": 6"#), [None; 4]);
    }
}
