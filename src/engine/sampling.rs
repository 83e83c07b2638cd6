//! Choosing the next token from a row of logits: greedy at temperature 0, otherwise
//! temperature, top-k and top-p (nucleus) sampling from a seedable random stream.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::SamplingParams;
use crate::error::{Error, Result};

/// Picks a token id from `logits` (one vocabulary row).
pub fn sample_token(logits: &[f32], params: SamplingParams) -> Result<u32> {
    if logits.is_empty() {
        return Err(Error::InvalidArgument("cannot sample from empty logits".into()));
    }
    let valid = params.temperature >= 0.0 && params.top_p > 0.0 && params.top_p <= 1.0;
    if !valid {
        return Err(Error::InvalidArgument(format!(
            "temperature must be >= 0 and top_p in (0, 1], got {} and {}",
            params.temperature, params.top_p
        )));
    }
    if params.temperature == 0.0 {
        return Ok(argmax(logits));
    }
    let mut candidates: Vec<(u32, f32)> =
        logits.iter().enumerate().map(|(i, &l)| (i as u32, l / params.temperature)).collect();
    // Highest first; ties keep the lower id first so results are deterministic.
    candidates.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if params.top_k > 0 {
        candidates.truncate(params.top_k);
    }
    let max = candidates[0].1;
    let mut weights: Vec<f32> = candidates.iter().map(|&(_, l)| (l - max).exp()).collect();
    let total: f32 = weights.iter().sum();
    weights.iter_mut().for_each(|w| *w /= total);
    let keep = nucleus_size(&weights, params.top_p);
    let kept_mass: f32 = weights[..keep].iter().sum();
    let mut rng = match params.seed {
        Some(seed) => StdRng::seed_from_u64(seed),
        None => StdRng::from_os_rng(),
    };
    let mut target = rng.random::<f32>() * kept_mass;
    for (&(id, _), &w) in candidates[..keep].iter().zip(&weights[..keep]) {
        if target < w {
            return Ok(id);
        }
        target -= w;
    }
    Ok(candidates[keep - 1].0)
}

/// Index of the largest logit (the first one on ties, as `torch.argmax`); NaN never wins.
fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] || logits[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

/// Smallest number of leading (sorted, normalized) probabilities whose mass reaches `top_p`.
fn nucleus_size(probs: &[f32], top_p: f32) -> usize {
    let mut mass = 0.0;
    for (i, p) in probs.iter().enumerate() {
        mass += p;
        if mass >= top_p {
            return i + 1;
        }
    }
    probs.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_p: f32, top_k: usize, seed: u64) -> SamplingParams {
        SamplingParams { temperature, top_p, top_k, seed: Some(seed) }
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        assert_eq!(sample_token(&[0.1, 3.0, 3.0, -1.0], SamplingParams::default()).unwrap(), 1);
        assert_eq!(sample_token(&[f32::NAN, 1.0], SamplingParams::default()).unwrap(), 1);
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_varies_with_the_seed() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let draw = |seed| sample_token(&logits, params(1.0, 1.0, 0, seed)).unwrap();
        assert_eq!(draw(7), draw(7));
        let distinct: std::collections::HashSet<u32> = (0..40).map(draw).collect();
        assert!(distinct.len() > 5, "{distinct:?}");
    }

    #[test]
    fn top_k_and_top_p_restrict_the_candidates() {
        let logits = [5.0, 4.0, 0.0, -1.0, -2.0];
        for seed in 0..100 {
            assert!(sample_token(&logits, params(1.0, 1.0, 2, seed)).unwrap() < 2);
            // p(0) ≈ 0.72, so a nucleus of 0.5 keeps token 0 alone.
            assert_eq!(sample_token(&logits, params(1.0, 0.5, 0, seed)).unwrap(), 0);
        }
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let logits = [0.0f32, (3.0f32).ln()];
        let ones = (0..4000).filter(|&s| sample_token(&logits, params(1.0, 1.0, 0, s)).unwrap() == 1).count();
        assert!((2800..3200).contains(&ones), "{ones} of 4000 should be about 3000");
    }

    #[test]
    fn bad_parameters_are_errors() {
        assert!(sample_token(&[], SamplingParams::default()).is_err());
        assert!(sample_token(&[1.0], params(-1.0, 1.0, 0, 0)).is_err());
        assert!(sample_token(&[1.0], params(1.0, 0.0, 0, 0)).is_err());
    }
}
