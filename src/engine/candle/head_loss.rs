//! The last shard's head and its masked cross entropy as one autograd op. Built from separate
//! candle ops, a step holds `[batch, seq, vocab]` logits several times over (the logits, their
//! log-softmax, the gathered gradient and its zeros), each written to fresh pages and walked by
//! one thread. Here the logits of a few positions at a time are formed, scored and turned into
//! their gradient (softmax minus the target, times the position's weight) at once, and that
//! gradient meets the head again for the normed hidden states' gradient, which the backward
//! pass only scales.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::frozen_weight::FrozenWeight;
use super::fused::input_values;
use super::loss::scored_positions;
use crate::error::{Error, Result};

/// Positions whose logits are formed together: a bounded buffer (`POSITIONS x vocab` floats)
/// and enough rows for the products to run on many input rows.
const POSITIONS: usize = 64;

/// Mean cross entropy of `head`'s logits of `normed` (`[batch, seq, hidden]`, f32, on the
/// host) against `targets` over the positions `lengths` count (see [`super::loss`]), as a
/// scalar tensor differentiable in `normed`, with the number of those positions.
pub fn head_loss(
    head: &FrozenWeight,
    normed: &Tensor,
    targets: &[Vec<u32>],
    lengths: &[usize],
) -> Result<(Tensor, usize)> {
    let (batch, seq, hidden) = normed.dims3()?;
    let (mask, count) = scored_positions(targets, lengths, (batch, seq, head.rows()))?;
    if hidden != head.cols() {
        return Err(Error::InvalidTensor(format!(
            "hidden states of width {hidden} do not fit a head over {}",
            head.cols()
        )));
    }
    let op = HeadLoss {
        head: head.clone(),
        targets: targets.iter().flatten().copied().collect(),
        weights: mask.iter().map(|&m| m / count as f32).collect(),
        gradient: Arc::new(Mutex::new(None)),
    };
    let loss = normed.contiguous()?.reshape((batch * seq, hidden))?.apply_op1(op)?;
    Ok((loss, count))
}

/// The op: its head, each position's target and weight (1/count where it is scored, else 0),
/// and the input's gradient, worked out by the forward pass for the backward pass.
struct HeadLoss {
    head: FrozenWeight,
    targets: Vec<u32>,
    weights: Vec<f32>,
    gradient: Arc<Mutex<Option<Tensor>>>,
}

impl CustomOp1 for HeadLoss {
    fn name(&self) -> &'static str {
        "head-loss"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = input_values(storage, layout, "the head's loss")?;
        let (positions, hidden) = layout.shape().dims2()?;
        let vocab = self.head.rows();
        let mut loss = 0f64;
        let mut gradient = vec![0f32; positions * hidden];
        for first in (0..positions).step_by(POSITIONS) {
            let rows = POSITIONS.min(positions - first);
            let mut logits = self.head.product(&x[first * hidden..(first + rows) * hidden])?;
            let scored = &self.weights[first..first + rows];
            let targets = &self.targets[first..first + rows];
            loss += logits
                .par_chunks_exact_mut(vocab)
                .zip(scored.par_iter().zip(targets.par_iter()))
                .map(|(row, (&weight, &target))| score_row(row, weight, target as usize))
                .sum::<f64>();
            let rows_gradient = self.head.input_gradient(&logits)?;
            gradient[first * hidden..(first + rows) * hidden].copy_from_slice(&rows_gradient);
        }
        let gradient = Tensor::from_vec(gradient, (positions, hidden), &Device::Cpu)?;
        *self.gradient.lock().expect("head-loss gradient lock poisoned") = Some(gradient);
        Ok((CpuStorage::F32(vec![loss as f32]), Shape::from(())))
    }

    fn bwd(&self, _x: &Tensor, _loss: &Tensor, grad_loss: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let gradient = self.gradient.lock().expect("head-loss gradient lock poisoned").take();
        let Some(gradient) = gradient else { candle_core::bail!("the head's loss was differentiated twice") };
        Ok(Some(gradient.broadcast_mul(grad_loss)?))
    }
}

/// One position's weighted loss, `weight · (log Σ exp(logits) - logits[target])`, with `row`
/// replaced by that loss's gradient in the logits, `weight · (softmax - one_hot(target))`.
fn score_row(row: &mut [f32], weight: f32, target: usize) -> f64 {
    if weight == 0.0 {
        row.fill(0.0);
        return 0.0;
    }
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let target_logit = row[target];
    let mut sum = 0f64;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += f64::from(*v);
    }
    let loss = (sum.ln() as f32 + max - target_logit) as f64 * weight as f64;
    let scale = weight / sum as f32;
    for v in row.iter_mut() {
        *v *= scale;
    }
    row[target] -= weight;
    loss
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    use super::*;
    use crate::engine::candle::frozen_product::FrozenProduct;
    use crate::engine::candle::loss::masked_cross_entropy;

    fn largest_difference(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    /// The fused op gives the loss and the hidden states' gradient of the plain head product
    /// followed by the separate cross entropy, over more positions than one chunk holds.
    #[test]
    fn equals_the_head_then_the_cross_entropy() {
        let device = Device::Cpu;
        let (batch, seq, hidden, vocab) = (2, 40, 16, 50);
        let weight = Tensor::randn(0f32, 1.0, (vocab, hidden), &device).unwrap();
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (batch, seq, hidden), &device).unwrap()).unwrap();
        let targets: Vec<Vec<u32>> =
            (0..batch).map(|b| (0..seq).map(|i| ((7 * i + 3 * b) % vocab) as u32).collect()).collect();
        let lengths = [seq + 1, 25];
        let head = FrozenWeight::Float(FrozenProduct::new(weight.clone()).unwrap());
        let (fused, count) = head_loss(&head, x.as_tensor(), &targets, &lengths).unwrap();
        let logits = x.as_tensor().broadcast_matmul(&weight.t().unwrap()).unwrap();
        let (plain, plain_count) = masked_cross_entropy(&logits, &targets, &lengths).unwrap();
        assert_eq!(count, plain_count);
        assert!(largest_difference(&fused, &plain) < 1e-5);
        // A scaled loss, so the upstream gradient is not one.
        let fused_grads = (fused * 3.0).unwrap().backward().unwrap();
        let plain_grads = (plain * 3.0).unwrap().backward().unwrap();
        let (ours, reference) =
            (fused_grads.get(x.as_tensor()).unwrap(), plain_grads.get(x.as_tensor()).unwrap());
        assert_eq!(ours.dims(), reference.dims());
        assert!(largest_difference(ours, reference) < 1e-6, "{}", largest_difference(ours, reference));
    }

    #[test]
    fn refuses_targets_outside_the_vocabulary() {
        let weight = Tensor::zeros((5, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        let head = FrozenWeight::Float(FrozenProduct::new(weight).unwrap());
        let x = Tensor::zeros((1, 2, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        let message = head_loss(&head, &x, &[vec![9, 0]], &[3]).unwrap_err().to_string();
        assert!(message.contains("target id 9 is outside the vocabulary of 5"), "{message}");
    }
}
