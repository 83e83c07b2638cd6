//! The training path's layer ops, each one autograd node with its own backward pass. Built
//! from separate candle ops, an RMS norm, SwiGLU, RoPE or attention is a chain of elementwise
//! nodes; the backward pass of each node writes its gradient to fresh zeros and adds, so a
//! step walked many buffers of the MLP's width for every layer. Here each op reads its inputs
//! once forward and once backward, and recomputes what it needs (a row's scale, a head's
//! probabilities) rather than keeping it.

mod attention;
mod rms_norm;
mod rope;
mod swiglu;

pub use attention::causal_attention;
pub use rms_norm::RmsNorm;
pub use rope::HalfRotation;
pub use swiglu::swiglu;

use candle_core::{CpuStorage, DType, Layout, Storage, Tensor};

/// The values of a contiguous op input.
pub(super) fn input_values<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> candle_core::Result<&'a [f32]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&storage.as_slice::<f32>()?[start..end]),
        None => candle_core::bail!("{op} takes contiguous inputs"),
    }
}

/// Runs `f` on the values of `t` as f32 on the host, made contiguous.
pub(super) fn with_values<R>(
    t: &Tensor,
    f: impl FnOnce(&[f32]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let t = t.to_dtype(DType::F32)?.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (Storage::Cpu(values), Some((start, end))) => f(&values.as_slice::<f32>()?[start..end]),
        _ => candle_core::bail!("the training path's tensors are on the host"),
    }
}

/// `Σ a·b` over two equal-length slices, in eight running sums the compiler keeps in vector
/// registers.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut sums = [0f32; 8];
    for (a, b) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        for lane in 0..8 {
            sums[lane] += a[lane] * b[lane];
        }
    }
    let tail = a.len() - a.len() % 8;
    let tail: f32 = a[tail..].iter().zip(&b[tail..]).map(|(a, b)| a * b).sum();
    sums.iter().sum::<f32>() + tail
}

/// `y += alpha · x`.
fn add_scaled(y: &mut [f32], alpha: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += alpha * x;
    }
}

#[cfg(test)]
fn largest_difference(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// Asserts that an op's output `ours` equals `reference` (the same op from candle's own ops),
/// and that the gradients of each of `inputs` through both agree, for a random upstream
/// gradient, all within `tolerance`.
#[cfg(test)]
fn assert_same_op(ours: Tensor, reference: Tensor, inputs: &[&Tensor], tolerance: f32) {
    let difference = largest_difference(&ours, &reference);
    assert!(difference < tolerance, "output: {difference}");
    let upstream = Tensor::randn(0f32, 1.0, ours.shape(), ours.device()).unwrap();
    let grad = |y: Tensor| (y * &upstream).unwrap().sum_all().unwrap().backward().unwrap();
    let (ours, reference) = (grad(ours), grad(reference));
    for (i, input) in inputs.iter().enumerate() {
        let difference = largest_difference(ours.get(input).unwrap(), reference.get(input).unwrap());
        assert!(difference < tolerance, "gradient of input {i}: {difference}");
    }
}
