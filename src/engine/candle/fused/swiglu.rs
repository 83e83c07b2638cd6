//! The gated MLP's activation, `silu(gate) · up`, with `silu(g) = g · σ(g)`. Its backward pass
//! gives `d_up = grad · silu(g)` and `d_gate = grad · up · σ(g) · (1 + g · (1 - σ(g)))`.

use candle_core::{CpuStorage, CustomOp2, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{input_values, with_values};
use crate::error::Result;

/// Elements a task takes: whole cache lines, and enough work to be worth a thread.
const CHUNK: usize = 1 << 14;

/// `silu(gate) · up` of two tensors of one shape (f32, on the host), differentiable in both.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    Ok(gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)?)
}

struct SwiGlu;

/// `σ(g)`.
fn sigmoid(g: f32) -> f32 {
    (1.0 + (-g).exp()).recip()
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        gate: &CpuStorage,
        gate_layout: &Layout,
        up: &CpuStorage,
        up_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if gate_layout.dims() != up_layout.dims() {
            candle_core::bail!(
                "SwiGLU's gate {:?} and up {:?} differ in shape",
                gate_layout.dims(),
                up_layout.dims()
            )
        }
        let (gate, up) = (input_values(gate, gate_layout, "SwiGLU")?, input_values(up, up_layout, "SwiGLU")?);
        let mut y = vec![0f32; gate.len()];
        y.par_chunks_mut(CHUNK).zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK))).for_each(
            |(y, (gate, up))| {
                for ((y, &g), u) in y.iter_mut().zip(gate).zip(up) {
                    *y = g * sigmoid(g) * u;
                }
            },
        );
        Ok((CpuStorage::F32(y), gate_layout.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (d_gate, d_up) = with_values(gate, |gate| {
            with_values(up, |up| {
                with_values(grad_y, |grad| {
                    let (mut d_gate, mut d_up) = (vec![0f32; gate.len()], vec![0f32; gate.len()]);
                    d_gate
                        .par_chunks_mut(CHUNK)
                        .zip(d_up.par_chunks_mut(CHUNK))
                        .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)).zip(grad.par_chunks(CHUNK)))
                        .for_each(|((d_gate, d_up), ((gate, up), grad))| {
                            for ((((dg, du), &g), u), grad) in
                                d_gate.iter_mut().zip(d_up).zip(gate).zip(up).zip(grad)
                            {
                                let s = sigmoid(g);
                                *du = grad * g * s;
                                *dg = grad * u * s * (1.0 + g * (1.0 - s));
                            }
                        });
                    Ok((d_gate, d_up))
                })
            })
        })?;
        let shape = gate.dims();
        Ok((
            Some(Tensor::from_vec(d_gate, shape, &Device::Cpu)?),
            Some(Tensor::from_vec(d_up, shape, &Device::Cpu)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Var;

    use super::super::assert_same_op;
    use super::*;

    #[test]
    fn equals_the_composed_activation_and_its_gradients() {
        let device = Device::Cpu;
        let shape = (3, 7, CHUNK / 4 + 5);
        let gate = Var::from_tensor(&Tensor::randn(0f32, 3.0, shape, &device).unwrap()).unwrap();
        let up = Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &device).unwrap()).unwrap();
        let (g, u) = (gate.as_tensor(), up.as_tensor());
        let ours = swiglu(g, u).unwrap();
        let reference = ((g / (g.neg().unwrap().exp().unwrap() + 1.0).unwrap()).unwrap() * u).unwrap();
        assert_same_op(ours, reference, &[g, u], 1e-5);
    }

    #[test]
    fn refuses_operands_of_different_shapes() {
        let a = Tensor::ones((2, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        let b = Tensor::ones((2, 5), candle_core::DType::F32, &Device::Cpu).unwrap();
        let message = swiglu(&a, &b).unwrap_err().to_string();
        assert!(message.contains("SwiGLU's gate [2, 4] and up [2, 5] differ in shape"), "{message}");
    }
}
