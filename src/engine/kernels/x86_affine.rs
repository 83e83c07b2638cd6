//! The AVX-512 VNNI kernels for MLX's 4- and 8-bit affine weights (groups of 32, 64 or 128).
//! Per 256 weights (8 blocks of 32), the row's scales and biases of those blocks are loaded
//! once and widened to f32; each chunk of 64 codes is decoded once into a register and then,
//! for every input row of the call's row block, meets the row's codes in one `vpdpbusd`
//! (unsigned weight codes, signed input codes; lane sums stay within 4·255·127, exact in f32),
//! one conversion and one FMA with its blocks' weight-times-input scales. The biases meet the
//! input's per-block sums in one product per 256 weights.
//!
//! Every function needs AVX-512F, BW, VL and VNNI (and F16C); the caller checks them.

use std::arch::x86_64::*;
use std::ops::Range;

use super::affine::{group_of_block, AffineInput, AffineMatrix};
use super::quantized::{CHUNK, ROW_BLOCK};
use super::WeightDType;

/// Weights a span: the 8 input blocks whose scales one register holds.
const SPAN: usize = 256;

/// For chunk `p` of a span, the block (of 8) of each lane's 4 weights: 8-bit codes in order.
const BLOCK_OF_LANE_8BIT: [[i32; 16]; 4] = lane_blocks(false);
/// As [`BLOCK_OF_LANE_8BIT`] for 4-bit codes: lanes 0-7 hold the chunk's even weights (low
/// nibbles), lanes 8-15 its odd ones (high nibbles).
const BLOCK_OF_LANE_4BIT: [[i32; 16]; 4] = lane_blocks(true);

const fn lane_blocks(paired: bool) -> [[i32; 16]; 4] {
    let mut table = [[0; 16]; 4];
    let mut p = 0;
    while p < 4 {
        let mut lane = 0;
        while lane < 16 {
            let within = if paired { (lane % 8) / 4 } else { lane / 8 };
            table[p][lane] = (2 * p + within) as i32;
            lane += 1;
        }
        p += 1;
    }
    table
}

/// Dots of weight row `row` of `w` (4 or 8 bits, groups of 32, 64 or 128) with the input rows
/// `rows` of `input` (at most [`ROW_BLOCK`]).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
pub unsafe fn dot_rows(
    w: &AffineMatrix,
    row: usize,
    input: &AffineInput,
    rows: Range<usize>,
    dots: &mut [f32],
) {
    let (inputs, count) = input.rows(rows);
    let inputs = &inputs[..count];
    let (codes, (scales, biases)) = (w.row_codes(row), w.row_parameters(row));
    let (bits, group_size, dtype) = (w.bits(), w.group_size(), w.parameter_dtype());
    let lane_table = if bits == 4 { &BLOCK_OF_LANE_4BIT } else { &BLOCK_OF_LANE_8BIT };
    let mut lanes = [_mm512_setzero_si512(); 4];
    for (lane, blocks) in lanes.iter_mut().zip(lane_table) {
        *lane = _mm512_loadu_si512(blocks.as_ptr() as *const _);
    }
    // The group of each of a span's 8 blocks, counted from the span's first group.
    let group_of_block = _mm256_loadu_si256(group_of_block(group_size).as_ptr() as *const __m256i);
    let mut acc = [_mm512_setzero_ps(); ROW_BLOCK];
    let blocks = w.cols() / 32;
    for span in 0..blocks.div_ceil(8) {
        let valid = (blocks - 8 * span).min(8);
        let (first_group, groups) = (SPAN * span / group_size, (32 * valid).div_ceil(group_size));
        let block_scales =
            _mm256_permutevar8x32_ps(group_values(scales, dtype, first_group, groups), group_of_block);
        let block_biases =
            _mm256_permutevar8x32_ps(group_values(biases, dtype, first_group, groups), group_of_block);
        super::prefetch_ahead(codes.as_ptr().add(SPAN * span * bits / 8), SPAN * bits / 8);
        let mut q = [_mm512_setzero_si512(); 4];
        for (p, chunk) in q.iter_mut().enumerate().take(valid.div_ceil(2)) {
            let weights = (32 * valid - CHUNK * p).min(CHUNK);
            *chunk = chunk_codes(bits, codes.as_ptr().add((SPAN * span + CHUNK * p) * bits / 8), weights);
        }
        for ((x, x_scales, x_sums), sum) in inputs.iter().zip(acc.iter_mut()) {
            let at = 8 * span;
            let scales = _mm512_castps256_ps512(_mm256_mul_ps(
                block_scales,
                _mm256_loadu_ps(x_scales.as_ptr().add(at)),
            ));
            let offsets = _mm256_mul_ps(block_biases, _mm256_loadu_ps(x_sums.as_ptr().add(at)));
            // Two chains, so that a single input row (decoding) does not wait on one FMA chain.
            let mut partial = [_mm512_zextps256_ps512(offsets), _mm512_setzero_ps()];
            for p in 0..valid.div_ceil(2) {
                let x_codes = _mm512_loadu_si512(x.as_ptr().add(SPAN * span + CHUNK * p) as *const _);
                let products = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), q[p], x_codes));
                let scale = _mm512_permutexvar_ps(lanes[p], scales);
                partial[p % 2] = _mm512_fmadd_ps(products, scale, partial[p % 2]);
            }
            *sum = _mm512_add_ps(*sum, _mm512_add_ps(partial[0], partial[1]));
        }
    }
    for (dot, sum) in dots.iter_mut().zip(&acc[..count]) {
        *dot = _mm512_reduce_add_ps(*sum);
    }
}

/// `groups` (at most 8) consecutive values of a row's scales or biases from `first`, widened
/// to f32; the other lanes are zero.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
#[inline]
unsafe fn group_values(values: &[u8], dtype: WeightDType, first: usize, groups: usize) -> __m256 {
    let mask = ((1u32 << groups) - 1) as u8;
    let at = values.as_ptr().add(first * dtype.size());
    match dtype {
        WeightDType::F32 => _mm256_maskz_loadu_ps(mask, at as *const f32),
        WeightDType::F16 => _mm256_cvtph_ps(_mm_maskz_loadu_epi16(mask, at as *const i16)),
        WeightDType::BF16 => {
            let bits = _mm256_cvtepu16_epi32(_mm_maskz_loadu_epi16(mask, at as *const i16));
            _mm256_castsi256_ps(_mm256_slli_epi32(bits, 16))
        }
    }
}

/// The codes of `weights` (64, or 32 at a row's end) weights packed `bits` at `at`, in the
/// order the input's chunks take (see [`BLOCK_OF_LANE_4BIT`]); missing ones are zero.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
#[inline]
unsafe fn chunk_codes(bits: usize, at: *const u8, weights: usize) -> __m512i {
    if bits == 8 {
        return _mm512_maskz_loadu_epi8(u64::MAX >> (64 - weights), at as *const i8);
    }
    let packed = _mm256_maskz_loadu_epi8(u32::MAX >> (32 - weights / 2), at as *const i8);
    let nibbles = _mm256_set1_epi8(0x0f);
    let low = _mm256_and_si256(packed, nibbles);
    let high = _mm256_and_si256(_mm256_srli_epi16(packed, 4), nibbles);
    _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1)
}
