//! The AVX2 kernels for MLX's 4- and 8-bit affine weights, for CPUs without AVX-512 VNNI.
//! AVX2 has no `vpdpbusd`: `vpmaddubsw` multiplies unsigned weight codes by signed input
//! codes into 16-bit pair sums and `vpmaddwd` by ones widens them to 32-bit lanes of 4
//! products. A pair sum must stay within 16 bits:
//!
//! - 4 bits: codes up to 15 meet inputs up to 127 (pairs within ±3810). A chunk's 32 bytes
//!   hold 64 weights, low nibbles against the input's even values and high nibbles against
//!   its odd ones (see [`super::affine`]); both halves add in 16 bits before widening, and
//!   lanes 0-3 then belong to the chunk's first input block, lanes 4-7 to its second.
//! - 8 bits: codes up to 255 would overflow, so they are centred (`q - 128`) and multiplied
//!   by sign (`|q - 128|` against the input with `q - 128`'s sign, pairs within ±32512); the
//!   128 taken off comes back through the biases, `b + 128·s`. A 32-byte register is one
//!   input block.
//!
//! Per 256 weights each input row forms its 8 blocks' scales (weight times input scale) once,
//! and the biases meet the input's per-block sums in one FMA. Every function needs AVX2, FMA
//! and F16C; the caller checks them.

use std::arch::x86_64::*;
use std::ops::Range;

use super::affine::{group_of_block, AffineInput, AffineMatrix};
use super::quantized::{CHUNK, ROW_BLOCK};
use super::WeightDType;

/// Weights a span: the 8 input blocks whose scales one register holds.
const SPAN: usize = 256;

/// For 4-bit chunk `p` of a span, the block (of 8) of each 32-bit lane.
const BLOCK_OF_LANE_4BIT: [[i32; 8]; 4] =
    [[0, 0, 0, 0, 1, 1, 1, 1], [2, 2, 2, 2, 3, 3, 3, 3], [4, 4, 4, 4, 5, 5, 5, 5], [6, 6, 6, 6, 7, 7, 7, 7]];

/// Dots of weight row `row` of `w` (4 or 8 bits, groups of 32, 64 or 128) with the input rows
/// `rows` of `input` (at most [`ROW_BLOCK`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_rows(
    w: &AffineMatrix,
    row: usize,
    input: &AffineInput,
    rows: Range<usize>,
    dots: &mut [f32],
) {
    let (inputs, count) = input.rows(rows);
    let inputs = &inputs[..count];
    let codes = w.row_codes(row);
    let spread = _mm256_loadu_si256(group_of_block(w.group_size()).as_ptr() as *const __m256i);
    let mut acc = [_mm256_setzero_ps(); ROW_BLOCK];
    let blocks = w.cols() / 32;
    for span in 0..blocks.div_ceil(8) {
        let valid = (blocks - 8 * span).min(8);
        let (block_scales, mut block_biases) = span_parameters(w, row, span, valid, spread);
        super::prefetch_ahead(codes.as_ptr().add(SPAN * span * w.bits() / 8), SPAN * w.bits() / 8);
        let span_codes = codes.as_ptr().add(SPAN * span * w.bits() / 8);
        if w.bits() == 8 {
            // The 128 taken off each code: b + 128·s.
            block_biases = _mm256_fmadd_ps(block_scales, _mm256_set1_ps(128.0), block_biases);
        }
        for ((x, x_scales, x_sums), sum) in inputs.iter().zip(acc.iter_mut()) {
            let at = 8 * span;
            let scales = _mm256_mul_ps(block_scales, _mm256_loadu_ps(x_scales.as_ptr().add(at)));
            let offsets = _mm256_mul_ps(block_biases, _mm256_loadu_ps(x_sums.as_ptr().add(at)));
            let x = x.as_ptr().add(SPAN * span);
            let products = if w.bits() == 4 {
                span_4bit(span_codes, x, valid, scales)
            } else {
                span_8bit(span_codes, x, valid, scales)
            };
            *sum = _mm256_add_ps(*sum, _mm256_add_ps(offsets, products));
        }
    }
    for (dot, sum) in dots.iter_mut().zip(&acc[..count]) {
        *dot = horizontal_sum(*sum);
    }
}

/// The scales and biases of a span's `valid` blocks (of 8, in f32; the rest zero): each
/// block takes its group's, the group of each block (from the span's first) in `spread`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn span_parameters(
    w: &AffineMatrix,
    row: usize,
    span: usize,
    valid: usize,
    spread: __m256i,
) -> (__m256, __m256) {
    let (scales, biases) = w.row_parameters(row);
    let (group_size, dtype) = (w.group_size(), w.parameter_dtype());
    let (first, groups) = (SPAN * span / group_size, (32 * valid).div_ceil(group_size));
    let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(valid as i32), lanes));
    let scales = _mm256_permutevar8x32_ps(group_values(scales, dtype, first, groups), spread);
    let biases = _mm256_permutevar8x32_ps(group_values(biases, dtype, first, groups), spread);
    (_mm256_and_ps(scales, keep), _mm256_and_ps(biases, keep))
}

/// `groups` (at most 8) consecutive values of a row's scales or biases from `first`, widened
/// to f32; lanes past `groups` hold whatever follows (the caller masks them).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn group_values(values: &[u8], dtype: WeightDType, first: usize, groups: usize) -> __m256 {
    let size = dtype.size();
    let mut copy = [0u8; 32];
    let at = if (first + 8) * size <= values.len() {
        values.as_ptr().add(first * size)
    } else {
        // The row's last groups: copied so that the load stays inside the row.
        copy[..groups * size].copy_from_slice(&values[first * size..(first + groups) * size]);
        copy.as_ptr()
    };
    match dtype {
        WeightDType::F32 => _mm256_loadu_ps(at as *const f32),
        WeightDType::F16 => _mm256_cvtph_ps(_mm_loadu_si128(at as *const __m128i)),
        WeightDType::BF16 => {
            let bits = _mm256_cvtepu16_epi32(_mm_loadu_si128(at as *const __m128i));
            _mm256_castsi256_ps(_mm256_slli_epi32(bits, 16))
        }
    }
}

/// A span's 4-bit products with one input row (`valid` blocks of 32, a chunk of 64 per two
/// blocks), each block's 32-bit lanes scaled by its lane of `scales`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn span_4bit(codes: *const u8, x: *const i8, valid: usize, scales: __m256) -> __m256 {
    let (nibbles, ones) = (_mm256_set1_epi8(0x0f), _mm256_set1_epi16(1));
    // Two chains, so that a single input row (decoding) does not wait on one FMA chain.
    let mut partial = [_mm256_setzero_ps(); 2];
    for p in 0..valid.div_ceil(2) {
        let packed = if 2 * p + 1 < valid {
            _mm256_loadu_si256(codes.add(32 * p) as *const __m256i)
        } else {
            _mm256_zextsi128_si256(_mm_loadu_si128(codes.add(32 * p) as *const __m128i))
        };
        let low = _mm256_and_si256(packed, nibbles);
        let high = _mm256_and_si256(_mm256_srli_epi16(packed, 4), nibbles);
        let even = _mm256_loadu_si256(x.add(CHUNK * p) as *const __m256i);
        let odd = _mm256_loadu_si256(x.add(CHUNK * p + 32) as *const __m256i);
        let pairs = _mm256_add_epi16(_mm256_maddubs_epi16(low, even), _mm256_maddubs_epi16(high, odd));
        let lanes = _mm256_madd_epi16(pairs, ones);
        let lane_blocks = _mm256_loadu_si256(BLOCK_OF_LANE_4BIT[p].as_ptr() as *const __m256i);
        let scale = _mm256_permutevar8x32_ps(scales, lane_blocks);
        partial[p % 2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lanes), scale, partial[p % 2]);
    }
    _mm256_add_ps(partial[0], partial[1])
}

/// A span's 8-bit products with one input row (`valid` blocks of 32), each block scaled by
/// its lane of `scales`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn span_8bit(codes: *const u8, x: *const i8, valid: usize, scales: __m256) -> __m256 {
    let (centre, ones) = (_mm256_set1_epi8(0x80u8 as i8), _mm256_set1_epi16(1));
    let mut partial = [_mm256_setzero_ps(); 2];
    for b in 0..valid {
        let q = _mm256_xor_si256(_mm256_loadu_si256(codes.add(32 * b) as *const __m256i), centre);
        let x = _mm256_loadu_si256(x.add(32 * b) as *const __m256i);
        let pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(q), _mm256_sign_epi8(x, q));
        let lanes = _mm256_madd_epi16(pairs, ones);
        let scale = _mm256_permutevar8x32_ps(scales, _mm256_set1_epi32(b as i32));
        partial[b % 2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lanes), scale, partial[b % 2]);
    }
    _mm256_add_ps(partial[0], partial[1])
}

/// The sum of a register's 8 lanes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn horizontal_sum(v: __m256) -> f32 {
    let halves = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let pairs = _mm_add_ps(halves, _mm_movehl_ps(halves, halves));
    _mm_cvtss_f32(_mm_add_ss(pairs, _mm_shuffle_ps::<1>(pairs, pairs)))
}
