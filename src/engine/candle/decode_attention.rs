//! Attention of a single new position over its request's cached keys and values, read in
//! place from the cache's buffers. Candle's general path copies the values and runs a matrix
//! product per head group, which for one query costs more than the arithmetic itself.

use candle_core::{Layout, Storage, Tensor};
use rayon::prelude::*;

use crate::error::Result;

/// Softmax attention of `q` (`[batch, heads, 1, head_dim]`) over `keys` and `values`
/// (`[batch, kv_heads, len, head_dim]`, views of a cache whose rows of `head_dim` are
/// contiguous), query head `h` reading key/value head `h / (heads / kv_heads)`. Returns
/// `[batch, 1, heads * head_dim]`, or `None` when the tensors are not f32 on the CPU in that
/// layout (the caller then takes candle's general path).
/// The scaled scores are soft-capped to `tanh(s / cap) * cap` when `softcap` is given (Gemma 2).
pub fn attend_one_position(
    q: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    scale: f32,
    softcap: Option<f32>,
) -> Result<Option<Tensor>> {
    let (batch, heads, seq, head_dim) = q.dims4()?;
    let (_, kv_heads, len, _) = keys.dims4()?;
    if seq != 1 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) || values.dims4()? != keys.dims4()? {
        return Ok(None);
    }
    let query: Vec<f32> = match q.flatten_all()?.to_vec1() {
        Ok(values) => values,
        Err(_) => return Ok(None),
    };
    let (key_storage, key_layout) = keys.storage_and_layout();
    let (value_storage, value_layout) = values.storage_and_layout();
    let (Storage::Cpu(key_cpu), Storage::Cpu(value_cpu)) = (&*key_storage, &*value_storage) else {
        return Ok(None);
    };
    let (Ok(key_data), Ok(value_data)) = (key_cpu.as_slice::<f32>(), value_cpu.as_slice::<f32>()) else {
        return Ok(None);
    };
    let (Some(keys), Some(values)) = (
        CachedRows::new(key_data, key_layout, head_dim),
        CachedRows::new(value_data, value_layout, head_dim),
    ) else {
        return Ok(None);
    };

    let group = heads / kv_heads;
    let mut out = vec![0f32; batch * heads * head_dim];
    // One task per (sequence, key/value head): the group of query heads that share its rows.
    out.par_chunks_mut(group * head_dim).enumerate().for_each(|(task, out)| {
        let (b, kv_head) = (task / kv_heads, task % kv_heads);
        let mut weights = vec![0f32; len];
        for (g, out) in out.chunks_exact_mut(head_dim).enumerate() {
            let head = kv_head * group + g;
            let query = &query[(b * heads + head) * head_dim..][..head_dim];
            for (t, weight) in weights.iter_mut().enumerate() {
                *weight = dot(query, keys.row(b, kv_head, t)) * scale;
            }
            if let Some(cap) = softcap {
                weights.iter_mut().for_each(|w| *w = (*w / cap).tanh() * cap);
            }
            softmax_in_place(&mut weights);
            for (t, &weight) in weights.iter().enumerate() {
                for (o, v) in out.iter_mut().zip(values.row(b, kv_head, t)) {
                    *o += weight * v;
                }
            }
        }
    });
    Ok(Some(Tensor::from_vec(out, (batch, 1, heads * head_dim), q.device())?))
}

/// Rows of `head_dim` values of a `[batch, kv_heads, len, head_dim]` view.
struct CachedRows<'a> {
    data: &'a [f32],
    batch_stride: usize,
    head_stride: usize,
    head_dim: usize,
}

impl<'a> CachedRows<'a> {
    /// The view of `data` that `layout` describes, if its rows are contiguous and inside `data`.
    fn new(data: &'a [f32], layout: &Layout, head_dim: usize) -> Option<Self> {
        let (dims, stride) = (layout.dims(), layout.stride());
        if dims.len() != 4 || stride[3] != 1 || stride[2] != head_dim {
            return None;
        }
        let last = dims.iter().zip(stride).map(|(&n, &s)| n.saturating_sub(1) * s).sum::<usize>();
        let data = data.get(layout.start_offset()..)?;
        (dims.contains(&0) || last < data.len()).then_some(Self {
            data,
            batch_stride: stride[0],
            head_stride: stride[1],
            head_dim,
        })
    }

    fn row(&self, batch: usize, head: usize, position: usize) -> &'a [f32] {
        let start = batch * self.batch_stride + head * self.head_stride + position * self.head_dim;
        &self.data[start..start + self.head_dim]
    }
}

/// Dot product in eight independent lanes, so that the compiler can vectorise it.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (chunks_a, chunks_b) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = chunks_a.remainder().iter().zip(chunks_b.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in chunks_a.zip(chunks_b) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// Replaces scores by their softmax.
fn softmax_in_place(scores: &mut [f32]) {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut total = 0.0;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        total += *s;
    }
    for s in scores.iter_mut() {
        *s /= total;
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn pseudo_random(shape: (usize, usize, usize, usize), seed: u32) -> Tensor {
        let count = shape.0 * shape.1 * shape.2 * shape.3;
        let values: Vec<f32> = (0..count as u32)
            .map(|i| ((i.wrapping_mul(2_654_435_761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    /// Candle's general computation of the same attention, the reference.
    fn reference(q: &Tensor, keys: &Tensor, values: &Tensor, scale: f64) -> Tensor {
        let (b, heads, _, d) = q.dims4().unwrap();
        let kv_heads = keys.dim(1).unwrap();
        let q = q.reshape((b, kv_heads, heads / kv_heads, d)).unwrap();
        let scores = (q.matmul(&keys.t().unwrap()).unwrap() * scale).unwrap();
        let probs = candle_nn::ops::softmax_last_dim(&scores).unwrap();
        probs.matmul(&values.contiguous().unwrap()).unwrap().reshape((b, 1, heads * d)).unwrap()
    }

    #[test]
    fn matches_candle_on_a_narrowed_cache_with_grouped_heads() {
        let (batch, heads, kv_heads, d, capacity, len) = (2, 8, 2, 16, 12, 7);
        let q = pseudo_random((batch, heads, 1, d), 1);
        let keys = pseudo_random((batch, kv_heads, capacity, d), 2).narrow(2, 0, len).unwrap();
        let values = pseudo_random((batch, kv_heads, capacity, d), 3).narrow(2, 0, len).unwrap();
        let scale = 1.0 / (d as f64).sqrt();
        let ours =
            attend_one_position(&q, &keys, &values, scale as f32, None).unwrap().expect("a CPU f32 cache");
        let expected = reference(&q, &keys, &values, scale);
        let difference: f32 =
            (ours - expected).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        assert!(difference < 1e-5, "largest difference {difference}");
    }

    #[test]
    fn soft_capped_scores_over_a_window_of_the_cache_match_candle() {
        let (batch, heads, kv_heads, d, capacity) = (1, 4, 2, 8, 10);
        let q = (pseudo_random((batch, heads, 1, d), 4) * 6.0).unwrap();
        // A local layer reads positions 3..9 of its cache: a view that starts mid-buffer.
        let keys = pseudo_random((batch, kv_heads, capacity, d), 5).narrow(2, 3, 6).unwrap();
        let values = pseudo_random((batch, kv_heads, capacity, d), 6).narrow(2, 3, 6).unwrap();
        let (scale, cap) = (0.5, 1.5);
        let ours = attend_one_position(&q, &keys, &values, scale, Some(cap)).unwrap().unwrap();
        let (b, h, _, d) = q.dims4().unwrap();
        let grouped = q.reshape((b, kv_heads, h / kv_heads, d)).unwrap();
        let scores = (grouped.matmul(&keys.t().unwrap()).unwrap() * scale as f64).unwrap();
        let capped = ((scores / cap as f64).unwrap().tanh().unwrap() * cap as f64).unwrap();
        let probs = candle_nn::ops::softmax_last_dim(&capped).unwrap();
        let expected = probs.matmul(&values.contiguous().unwrap()).unwrap().reshape((b, 1, h * d)).unwrap();
        let difference: f32 =
            (&ours - expected).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        assert!(difference < 1e-5, "largest difference {difference}");
        let uncapped = attend_one_position(&q, &keys, &values, scale, None).unwrap().unwrap();
        let moved: f32 = (ours - uncapped).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        assert!(moved > 1e-3, "the cap must change these scores ({moved})");
    }

    #[test]
    fn other_layouts_and_dtypes_are_left_to_candle() {
        let q = pseudo_random((1, 4, 1, 8), 1);
        let keys = pseudo_random((1, 2, 5, 8), 2);
        let transposed = pseudo_random((1, 2, 8, 5), 2).transpose(2, 3).unwrap();
        assert!(attend_one_position(&q, &transposed, &keys, 1.0, None).unwrap().is_none());
        let half = keys.to_dtype(candle_core::DType::F16).unwrap();
        assert!(attend_one_position(&q, &half, &half, 1.0, None).unwrap().is_none());
        let two_positions = pseudo_random((1, 4, 2, 8), 1);
        assert!(attend_one_position(&two_positions, &keys, &keys, 1.0, None).unwrap().is_none());
    }
}
