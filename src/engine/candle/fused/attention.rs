//! Causal self-attention over whole sequences, `softmax(q kᵀ / √d + causal mask) v` per head,
//! with grouped key/value heads each serving `heads / kv_heads` query heads. The backward pass
//! recomputes each query's probabilities `p` rather than keeping them, then with `dp = dO vᵀ`
//! and `ds = p · (dp - Σ p·dp) / √d` gives `dq = ds k`, `dk = dsᵀ q` and `dv = pᵀ dO`.

use candle_core::{CpuStorage, CustomOp3, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{add_scaled, dot, input_values, with_values};
use crate::error::Result;

/// Causal attention of `q` (`[batch, seq, heads, head_dim]`) over `k` and `v`
/// (`[batch, seq, kv_heads, head_dim]`), f32 on the host: `[batch, seq, heads, head_dim]`,
/// differentiable in all three.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    Ok(q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, CausalAttention)?)
}

struct CausalAttention;

/// The sizes of one call, and where a head's row sits in `[batch, seq, heads, head_dim]`.
#[derive(Clone, Copy)]
struct Sizes {
    batch: usize,
    seq: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    /// `1 / √head_dim`.
    scale: f32,
}

impl Sizes {
    fn of(q: &[usize], k: &[usize], v: &[usize]) -> candle_core::Result<Self> {
        let (&[batch, seq, heads, head_dim], &[kb, ks, kv_heads, kd]) = (q, k) else {
            candle_core::bail!("attention takes [batch, seq, heads, head_dim] operands, not {q:?} and {k:?}")
        };
        if k != v || (kb, ks, kd) != (batch, seq, head_dim) || kv_heads == 0 || heads % kv_heads != 0 {
            candle_core::bail!("attention's queries {q:?}, keys {k:?} and values {v:?} do not fit together")
        }
        Ok(Self { batch, seq, heads, kv_heads, head_dim, scale: (head_dim as f32).sqrt().recip() })
    }

    /// The values of `head`'s row at `position` of sequence `b`, in a tensor of `heads` heads.
    fn row<'a>(&self, t: &'a [f32], heads: usize, b: usize, position: usize, head: usize) -> &'a [f32] {
        let at = ((b * self.seq + position) * heads + head) * self.head_dim;
        &t[at..at + self.head_dim]
    }

    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }

    /// The probabilities of query `i` of `head` over positions `0..=i`, written to `p`.
    fn probabilities(&self, q: &[f32], k: &[f32], (b, head, i): (usize, usize, usize), p: &mut [f32]) {
        let query = self.row(q, self.heads, b, i, head);
        let kv_head = head / self.group();
        let mut max = f32::NEG_INFINITY;
        for (j, p) in p[..=i].iter_mut().enumerate() {
            *p = dot(query, self.row(k, self.kv_heads, b, j, kv_head)) * self.scale;
            max = max.max(*p);
        }
        let mut sum = 0f32;
        for p in &mut p[..=i] {
            *p = (*p - max).exp();
            sum += *p;
        }
        for p in &mut p[..=i] {
            *p /= sum;
        }
    }

    /// Writes rows `[group, seq, head_dim]` of key/value head `kv_head` of sequence `b` into
    /// `out` (`[batch, seq, heads, head_dim]`).
    fn scatter(&self, out: &mut [f32], rows: &[f32], b: usize, kv_head: usize) {
        let d = self.head_dim;
        for (g, head_rows) in rows.chunks_exact(self.seq * d).enumerate() {
            let head = kv_head * self.group() + g;
            for (i, row) in head_rows.chunks_exact(d).enumerate() {
                let at = ((b * self.seq + i) * self.heads + head) * d;
                out[at..at + d].copy_from_slice(row);
            }
        }
    }

    /// Every `(sequence, key/value head)` pair: the units the work is split into.
    fn tasks(&self) -> Vec<(usize, usize)> {
        (0..self.batch).flat_map(|b| (0..self.kv_heads).map(move |h| (b, h))).collect()
    }
}

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "causal-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_layout: &Layout,
        k: &CpuStorage,
        k_layout: &Layout,
        v: &CpuStorage,
        v_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let sizes = Sizes::of(q_layout.dims(), k_layout.dims(), v_layout.dims())?;
        let q = input_values(q, q_layout, "attention")?;
        let (k, v) = (input_values(k, k_layout, "attention")?, input_values(v, v_layout, "attention")?);
        let (seq, d) = (sizes.seq, sizes.head_dim);
        let parts: Vec<Vec<f32>> = sizes
            .tasks()
            .into_par_iter()
            .map(|(b, kv_head)| {
                let mut rows = vec![0f32; sizes.group() * seq * d];
                let mut p = vec![0f32; seq];
                for (g, head_rows) in rows.chunks_exact_mut(seq * d).enumerate() {
                    let head = kv_head * sizes.group() + g;
                    for (i, out) in head_rows.chunks_exact_mut(d).enumerate() {
                        sizes.probabilities(q, k, (b, head, i), &mut p);
                        for (j, &p) in p[..=i].iter().enumerate() {
                            add_scaled(out, p, sizes.row(v, sizes.kv_heads, b, j, kv_head));
                        }
                    }
                }
                rows
            })
            .collect();
        let mut out = vec![0f32; q.len()];
        for ((b, kv_head), rows) in sizes.tasks().into_iter().zip(parts) {
            sizes.scatter(&mut out, &rows, b, kv_head);
        }
        Ok((CpuStorage::F32(out), q_layout.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad_out: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let sizes = Sizes::of(q.dims(), k.dims(), v.dims())?;
        let (dq, dk, dv) = with_values(q, |q| {
            with_values(k, |k| {
                with_values(v, |v| with_values(grad_out, |grad| Ok(gradients(sizes, q, k, v, grad))))
            })
        })?;
        let tensor = |values, like: &Tensor| Tensor::from_vec(values, like.dims(), &Device::Cpu);
        Ok((Some(tensor(dq, q)?), Some(tensor(dk, k)?), Some(tensor(dv, v)?)))
    }
}

/// The gradients of `q`, `k` and `v` given the output's, `grad`.
fn gradients(sizes: Sizes, q: &[f32], k: &[f32], v: &[f32], grad: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (seq, d, kv_heads) = (sizes.seq, sizes.head_dim, sizes.kv_heads);
    // Each task: its query heads' dq rows `[group, seq, d]`, and its dk and dv rows `[seq, d]`.
    let parts: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = sizes
        .tasks()
        .into_par_iter()
        .map(|(b, kv_head)| {
            let mut dq = vec![0f32; sizes.group() * seq * d];
            let (mut dk, mut dv) = (vec![0f32; seq * d], vec![0f32; seq * d]);
            let (mut p, mut dp) = (vec![0f32; seq], vec![0f32; seq]);
            for (g, dq_rows) in dq.chunks_exact_mut(seq * d).enumerate() {
                let head = kv_head * sizes.group() + g;
                for (i, dq_row) in dq_rows.chunks_exact_mut(d).enumerate() {
                    sizes.probabilities(q, k, (b, head, i), &mut p);
                    let upstream = sizes.row(grad, sizes.heads, b, i, head);
                    for (j, dp) in dp[..=i].iter_mut().enumerate() {
                        *dp = dot(upstream, sizes.row(v, kv_heads, b, j, kv_head));
                    }
                    let expected: f32 = p[..=i].iter().zip(&dp[..=i]).map(|(p, dp)| p * dp).sum();
                    let query = sizes.row(q, sizes.heads, b, i, head);
                    for j in 0..=i {
                        let ds = p[j] * (dp[j] - expected) * sizes.scale;
                        add_scaled(dq_row, ds, sizes.row(k, kv_heads, b, j, kv_head));
                        add_scaled(&mut dk[j * d..(j + 1) * d], ds, query);
                        add_scaled(&mut dv[j * d..(j + 1) * d], p[j], upstream);
                    }
                }
            }
            (dq, dk, dv)
        })
        .collect();
    let kv_sizes = Sizes { heads: kv_heads, ..sizes };
    let (mut dq, mut dk, mut dv) = (vec![0f32; q.len()], vec![0f32; k.len()], vec![0f32; v.len()]);
    for ((b, kv_head), (q_rows, k_rows, v_rows)) in sizes.tasks().into_iter().zip(parts) {
        sizes.scatter(&mut dq, &q_rows, b, kv_head);
        kv_sizes.scatter(&mut dk, &k_rows, b, kv_head);
        kv_sizes.scatter(&mut dv, &v_rows, b, kv_head);
    }
    (dq, dk, dv)
}

#[cfg(test)]
mod tests {
    use candle_core::{Var, D};

    use super::super::assert_same_op;
    use super::*;

    /// Attention from separate candle ops on `[batch, seq, heads, head_dim]` operands.
    fn composed(q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
        let (b, seq, heads, d) = q.dims4().unwrap();
        let kv_heads = k.dim(2).unwrap();
        let group = heads / kv_heads;
        let widen = |t: &Tensor| {
            let t = t.transpose(1, 2).unwrap();
            t.unsqueeze(2)
                .unwrap()
                .broadcast_as((b, kv_heads, group, seq, d))
                .unwrap()
                .reshape((b, heads, seq, d))
                .unwrap()
        };
        let q = q.transpose(1, 2).unwrap().contiguous().unwrap();
        let (k, v) = (widen(k), widen(v));
        let scores = (q.matmul(&k.t().unwrap().contiguous().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
        let mask: Vec<f32> = (0..seq)
            .flat_map(|i| (0..seq).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let scores =
            scores.broadcast_add(&Tensor::from_vec(mask, (seq, seq), &Device::Cpu).unwrap()).unwrap();
        let shifted = scores.broadcast_sub(&scores.max_keepdim(D::Minus1).unwrap().detach()).unwrap();
        let exp = shifted.exp().unwrap();
        let probs = exp.broadcast_div(&exp.sum_keepdim(D::Minus1).unwrap()).unwrap();
        probs.matmul(&v.contiguous().unwrap()).unwrap().transpose(1, 2).unwrap()
    }

    #[test]
    fn equals_the_composed_attention_and_its_gradients() {
        let device = Device::Cpu;
        let (batch, seq, heads, kv_heads, d) = (2, 7, 4, 2, 12);
        let var =
            |n| Var::from_tensor(&Tensor::randn(0f32, 1.0, (batch, seq, n, d), &device).unwrap()).unwrap();
        let (q, k, v) = (var(heads), var(kv_heads), var(kv_heads));
        let ours = causal_attention(q.as_tensor(), k.as_tensor(), v.as_tensor()).unwrap();
        let reference = composed(q.as_tensor(), k.as_tensor(), v.as_tensor());
        assert_same_op(ours, reference, &[q.as_tensor(), k.as_tensor(), v.as_tensor()], 1e-5);
    }

    #[test]
    fn refuses_heads_that_do_not_group() {
        let zeros = |n| Tensor::zeros((1, 3, n, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        let message = causal_attention(&zeros(3), &zeros(2), &zeros(2)).unwrap_err().to_string();
        assert!(message.contains("do not fit together"), "{message}");
    }
}
