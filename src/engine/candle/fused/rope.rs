//! RoPE as transformers applies it to Llama-style heads: the first half of each head's values
//! paired with the second, each pair `(a, b)` at position `p` turned by `p`'s angle to
//! `(a·cos - b·sin, b·cos + a·sin)`. A rotation's transpose is its inverse, so the backward
//! pass turns the gradient by minus the angle.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{input_values, with_values};
use crate::error::Result;

/// RoPE over positions from 0, from cos and sin tables `[positions, head_dim / 2]`.
#[derive(Clone)]
pub struct HalfRotation {
    cos: Arc<[f32]>,
    sin: Arc<[f32]>,
    half: usize,
}

impl HalfRotation {
    /// The rotation of the tables `cos` and `sin` (`[positions, head_dim / 2]`).
    pub fn new(cos: &Tensor, sin: &Tensor) -> Result<Self> {
        let (_, half) = cos.dims2()?;
        let cos = with_values(cos, |values| Ok(Arc::from(values)))?;
        let sin = with_values(sin, |values| Ok(Arc::from(values)))?;
        Ok(Self { cos, sin, half })
    }

    /// `x` (`[batch, seq, heads, head_dim]`, f32, on the host) rotated for positions
    /// `0..seq`, differentiable in `x`.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.contiguous()?.apply_op1(self.clone())?)
    }

    /// `x` turned by each position's angle, or by its opposite where `inverse`.
    fn rotate(&self, x: &[f32], dims: &[usize], inverse: bool) -> candle_core::Result<Vec<f32>> {
        let &[_, seq, heads, head_dim] = dims else {
            candle_core::bail!("RoPE takes [batch, seq, heads, head_dim], not {dims:?}")
        };
        if head_dim != 2 * self.half {
            candle_core::bail!("RoPE tables for heads of {} values got heads of {head_dim}", 2 * self.half)
        }
        if seq * self.half > self.cos.len() {
            candle_core::bail!("RoPE tables for {} positions got {seq}", self.cos.len() / self.half)
        }
        let sign = if inverse { -1.0 } else { 1.0 };
        let position_len = heads * head_dim;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(position_len).zip(x.par_chunks(position_len)).enumerate().for_each(
            |(row, (y, x))| {
                let at = (row % seq) * self.half;
                let (cos, sin) = (&self.cos[at..at + self.half], &self.sin[at..at + self.half]);
                for (y, x) in y.chunks_exact_mut(head_dim).zip(x.chunks_exact(head_dim)) {
                    let (first, second) = x.split_at(self.half);
                    let (y_first, y_second) = y.split_at_mut(self.half);
                    for i in 0..self.half {
                        let (c, s) = (cos[i], sign * sin[i]);
                        y_first[i] = first[i] * c - second[i] * s;
                        y_second[i] = second[i] * c + first[i] * s;
                    }
                }
            },
        );
        Ok(y)
    }
}

impl CustomOp1 for HalfRotation {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = input_values(storage, layout, "RoPE")?;
        Ok((CpuStorage::F32(self.rotate(x, layout.dims(), false)?), layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad_y: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let grad = with_values(grad_y, |g| self.rotate(g, x.dims(), true))?;
        Ok(Some(Tensor::from_vec(grad, x.dims(), &Device::Cpu)?))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Var, D};

    use super::super::assert_same_op;
    use super::*;

    /// RoPE from separate candle ops on `[batch, heads, seq, head_dim]`.
    fn composed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
        let half = x.dim(D::Minus1).unwrap() / 2;
        let (cos, sin) = (Tensor::cat(&[cos, cos], 1).unwrap(), Tensor::cat(&[sin, sin], 1).unwrap());
        let (first, second) =
            (x.narrow(D::Minus1, 0, half).unwrap(), x.narrow(D::Minus1, half, half).unwrap());
        let rotated = Tensor::cat(&[&second.neg().unwrap(), &first], D::Minus1).unwrap();
        (x.broadcast_mul(&cos).unwrap() + rotated.broadcast_mul(&sin).unwrap()).unwrap()
    }

    #[test]
    fn equals_the_composed_rotation_and_its_gradient() {
        let device = Device::Cpu;
        let (batch, seq, heads, head_dim, positions) = (2, 6, 3, 8, 10);
        let angles = Tensor::randn(0f32, 2.0, (positions, head_dim / 2), &device).unwrap();
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (batch, seq, heads, head_dim), &device).unwrap())
            .unwrap();
        let ours = HalfRotation::new(&cos, &sin).unwrap().apply(x.as_tensor()).unwrap();
        let by_heads = x.as_tensor().transpose(1, 2).unwrap();
        let reference = composed(&by_heads, &cos.narrow(0, 0, seq).unwrap(), &sin.narrow(0, 0, seq).unwrap())
            .transpose(1, 2)
            .unwrap();
        assert_same_op(ours, reference, &[x.as_tensor()], 1e-6);
    }

    #[test]
    fn refuses_sequences_longer_than_its_tables() {
        let tables = Tensor::zeros((4, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        let rope = HalfRotation::new(&tables, &tables).unwrap();
        let x = Tensor::zeros((1, 5, 1, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        let message = rope.apply(&x).unwrap_err().to_string();
        assert!(message.contains("RoPE tables for 4 positions got 5"), "{message}");
    }
}
