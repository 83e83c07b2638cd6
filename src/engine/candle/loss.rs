//! The length-masked next-token cross entropy an example is scored by, built from candle ops
//! that autograd differentiates.
//!
//! Position `i` of a sequence of `length` tokens predicts token `i + 1`, so positions
//! `0..length - 1` count and the padding after them does not. (Classic's mask keeps `length`
//! positions, scoring one padding target per sequence shorter than the batch; this one scores
//! exactly what transformers scores with padding labelled -100.)

use candle_core::{DType, Tensor, D};

use crate::error::{Error, Result};

/// The `[batch, seq]` mask of the positions `lengths` count, flattened, and their number; an
/// error when `targets` (`batch` rows of `seq` ids below `vocab`) and `lengths` do not fit or
/// leave nothing to score.
pub fn scored_positions(
    targets: &[Vec<u32>],
    lengths: &[usize],
    (batch, seq, vocab): (usize, usize, usize),
) -> Result<(Vec<f32>, usize)> {
    if targets.len() != batch || lengths.len() != batch || targets.iter().any(|row| row.len() != seq) {
        return Err(Error::InvalidTensor(format!(
            "targets {}x{} and {} lengths do not fit {batch} sequences of {seq} positions",
            targets.len(),
            targets.first().map_or(0, Vec::len),
            lengths.len(),
        )));
    }
    let count = lengths.iter().map(|&l| l.saturating_sub(1).min(seq)).sum::<usize>();
    if count == 0 {
        return Err(Error::InvalidArgument(
            "the example has no position to score (every length is below 2)".into(),
        ));
    }
    if let Some(id) = targets.iter().flatten().find(|&&id| id as usize >= vocab) {
        return Err(Error::InvalidTensor(format!("target id {id} is outside the vocabulary of {vocab}")));
    }
    let mask = lengths
        .iter()
        .flat_map(|&length| (0..seq).map(move |i| if i + 1 < length { 1.0 } else { 0.0 }))
        .collect();
    Ok((mask, count))
}

/// Mean cross entropy of `logits` (`[batch, seq, vocab]`, f32) against `targets` over the
/// positions `lengths` count, as a scalar tensor, with the number of those positions.
pub fn masked_cross_entropy(
    logits: &Tensor,
    targets: &[Vec<u32>],
    lengths: &[usize],
) -> Result<(Tensor, usize)> {
    let (batch, seq, vocab) = logits.dims3()?;
    let (mask, count) = scored_positions(targets, lengths, (batch, seq, vocab))?;
    let mask = Tensor::from_vec(mask, (batch, seq), logits.device())?;
    let ids: Vec<u32> = targets.iter().flatten().copied().collect();
    let ids = Tensor::from_vec(ids, (batch, seq, 1), logits.device())?;
    let log_probs = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    // (batch, seq, 1) -> (batch, seq): each position's log probability of its target.
    let picked = log_probs.gather(&ids, 2)?.squeeze(2)?;
    let total = (picked * mask)?.sum_all()?;
    Ok(((total.neg()? / count as f64)?.to_dtype(DType::F32)?, count))
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    /// Two sequences of lengths 3 and 2 padded to 2 input positions: three positions count,
    /// and each loss is `log(sum(exp)) - logit[target]`, worked out by hand.
    #[test]
    fn counts_only_real_targets() {
        let logits = Tensor::from_vec(
            vec![0.0f32, 1.0, 2.0, 1.0, 0.0, 0.0, 2.0, 2.0, 0.0, 5.0, -5.0, 0.0],
            (2, 2, 3),
            &Device::Cpu,
        )
        .unwrap();
        let targets = vec![vec![2, 0], vec![1, 1]];
        let (loss, count) = masked_cross_entropy(&logits, &targets, &[3, 2]).unwrap();
        assert_eq!(count, 3);
        let lse = |row: [f32; 3]| row.iter().map(|v| v.exp()).sum::<f32>().ln();
        let expected =
            ((lse([0.0, 1.0, 2.0]) - 2.0) + (lse([1.0, 0.0, 0.0]) - 1.0) + (lse([2.0, 2.0, 0.0]) - 2.0))
                / 3.0;
        let got = loss.to_scalar::<f32>().unwrap();
        assert!((got - expected).abs() < 1e-6, "{got} vs {expected}");
    }

    #[test]
    fn refuses_examples_with_nothing_to_score_and_bad_targets() {
        let logits = Tensor::zeros((1, 2, 3), DType::F32, &Device::Cpu).unwrap();
        let message = masked_cross_entropy(&logits, &[vec![0, 0]], &[1]).unwrap_err().to_string();
        assert!(message.contains("no position to score"), "{message}");
        let message = masked_cross_entropy(&logits, &[vec![7, 0]], &[3]).unwrap_err().to_string();
        assert!(message.contains("target id 7 is outside the vocabulary of 3"), "{message}");
    }
}
