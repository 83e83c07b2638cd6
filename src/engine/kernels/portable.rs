//! The portable kernel: plain Rust for CPUs without the x86-64 SIMD the other paths use.

use super::matrix::{element, WeightDType};

/// Dot products of one weight row (`k` elements of `dtype`) with `dots.len()` input rows of
/// length `k`.
pub(super) fn dot_rows(dtype: WeightDType, weights: &[u8], inputs: &[f32], k: usize, dots: &mut [f32]) {
    dots.fill(0.0);
    for i in 0..k {
        let w = element(weights, i, dtype);
        for (r, dot) in dots.iter_mut().enumerate() {
            *dot += w * inputs[r * k + i];
        }
    }
}
