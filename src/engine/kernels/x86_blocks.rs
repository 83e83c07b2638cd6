//! The AVX-512 VNNI block kernels: a chunk of 64 weight codes is decoded into one register,
//! dotted with 64 activation codes by one `vpdpbusd` per input row (16 lane sums of 4
//! products), and the lane sums are scaled in f32. Every function needs AVX-512F, BW and
//! VNNI; the caller checks them.

use std::arch::x86_64::*;
use std::ops::Range;

use half::f16;

use super::blocks::{chunks, decode_chunk, scale_min_k4, BlockType, CHUNK, LANES};
use super::quantized::QuantizedInput;

/// Input rows dotted at once (at most [`super::quantized`]'s row block).
const MAX_ROWS: usize = 4;

/// A decoded chunk in registers: codes, and per-lane scales and offsets.
struct Decoded {
    q: __m512i,
    a: __m512,
    b: __m512,
}

/// The input rows' pointers: codes, lane scales, lane scaled sums.
struct Inputs {
    codes: [*const i8; MAX_ROWS],
    scales: [*const f32; MAX_ROWS],
    sums: [*const f32; MAX_ROWS],
    count: usize,
}

/// Lanes 0-7 from group `2p`, 8-15 from `2p + 1` (groups of 32), for chunk `p` of a block.
const GROUPS_OF_32: [[i32; 16]; 4] = lane_groups(8);
/// Lanes from groups `4p..4p + 4`, four lanes each (groups of 16).
const GROUPS_OF_16: [[i32; 16]; 4] = lane_groups(4);

const fn lane_groups(lanes_per_group: usize) -> [[i32; 16]; 4] {
    let mut table = [[0; 16]; 4];
    let mut part = 0;
    while part < 4 {
        let mut lane = 0;
        while lane < 16 {
            table[part][lane] = ((part * 16 + lane) / lanes_per_group) as i32;
            lane += 1;
        }
        part += 1;
    }
    table
}

fn half_at(bytes: *const u8) -> f32 {
    // SAFETY (callers): two readable bytes.
    f16::from_bits(u16::from_le_bytes(unsafe { [*bytes, *bytes.add(1)] })).to_f32()
}

/// Dots of one weight row (`k` weights of `block_type`) with input rows `rows` of `input`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub unsafe fn dot_rows(
    block_type: BlockType,
    weights: &[u8],
    k: usize,
    input: &QuantizedInput,
    rows: Range<usize>,
    dots: &mut [f32],
) {
    let mut inputs = Inputs {
        codes: [std::ptr::null(); MAX_ROWS],
        scales: [std::ptr::null(); MAX_ROWS],
        sums: [std::ptr::null(); MAX_ROWS],
        count: rows.len().min(MAX_ROWS),
    };
    for (i, r) in rows.take(MAX_ROWS).enumerate() {
        let (codes, scales, sums) = input.row(r);
        inputs.codes[i] = codes.as_ptr();
        inputs.scales[i] = scales.as_ptr();
        inputs.sums[i] = sums.as_ptr();
    }
    let mut acc = [_mm512_setzero_ps(); MAX_ROWS];
    let w = weights.as_ptr();
    match block_type {
        BlockType::Q8_0 | BlockType::Q4_0 => {
            let blocks = k / 32;
            for c in 0..chunks(k) {
                let decoded = if 2 * c + 1 < blocks {
                    let first = w.add(2 * c * block_type.block_bytes());
                    pair_of_blocks(block_type, first)
                } else {
                    from_portable(block_type, weights, k, c)
                };
                accumulate(&decoded, &inputs, c, &mut acc);
            }
        }
        BlockType::Q4K | BlockType::Q5K | BlockType::Q6K => {
            for block in 0..k / 256 {
                let at = w.add(block * block_type.block_bytes());
                let (scales, offsets) = group_parameters(block_type, at);
                let table = if block_type == BlockType::Q6K { &GROUPS_OF_16 } else { &GROUPS_OF_32 };
                for (part, lanes) in table.iter().enumerate() {
                    let index = _mm512_loadu_si512(lanes.as_ptr() as *const _);
                    let decoded = Decoded {
                        q: k_codes(block_type, at, part),
                        a: _mm512_permutexvar_ps(index, scales),
                        b: _mm512_permutexvar_ps(index, offsets),
                    };
                    accumulate(&decoded, &inputs, 4 * block + part, &mut acc);
                }
            }
        }
    }
    for (dot, sum) in dots.iter_mut().zip(acc).take(inputs.count) {
        *dot = _mm512_reduce_add_ps(sum);
    }
}

/// Adds chunk `c`'s products with every input row to its accumulator.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn accumulate(decoded: &Decoded, inputs: &Inputs, c: usize, acc: &mut [__m512; MAX_ROWS]) {
    for (r, sum) in acc.iter_mut().enumerate().take(inputs.count) {
        let codes = _mm512_loadu_si512(inputs.codes[r].add(c * CHUNK) as *const _);
        let scales = _mm512_loadu_ps(inputs.scales[r].add(c * LANES));
        let sums = _mm512_loadu_ps(inputs.sums[r].add(c * LANES));
        let dots = _mm512_dpbusd_epi32(_mm512_setzero_si512(), decoded.q, codes);
        *sum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots), _mm512_mul_ps(decoded.a, scales), *sum);
        *sum = _mm512_fmadd_ps(decoded.b, sums, *sum);
    }
}

/// A chunk decoded by the portable code (the last, half-filled chunk of a 32-weight format).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn from_portable(block_type: BlockType, weights: &[u8], k: usize, c: usize) -> Decoded {
    let chunk = decode_chunk(block_type, weights, k, c);
    Decoded {
        q: _mm512_loadu_si512(chunk.q.as_ptr() as *const _),
        a: _mm512_loadu_ps(chunk.a.as_ptr()),
        b: _mm512_loadu_ps(chunk.b.as_ptr()),
    }
}

/// Two consecutive Q8_0 or Q4_0 blocks starting at `first`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn pair_of_blocks(block_type: BlockType, first: *const u8) -> Decoded {
    let second = first.add(block_type.block_bytes());
    let (d0, d1) = (half_at(first), half_at(second));
    let a = _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(d0), _mm512_set1_ps(d1));
    if block_type == BlockType::Q8_0 {
        let low = _mm256_loadu_si256(first.add(2) as *const __m256i);
        let high = _mm256_loadu_si256(second.add(2) as *const __m256i);
        let signed = _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1);
        let q = _mm512_xor_si512(signed, _mm512_set1_epi8(0x80u8 as i8));
        return Decoded { q, a, b: _mm512_mul_ps(a, _mm512_set1_ps(-128.0)) };
    }
    let nibbles = _mm_set1_epi8(0x0f);
    let q0 = _mm_loadu_si128(first.add(2) as *const __m128i);
    let q1 = _mm_loadu_si128(second.add(2) as *const __m128i);
    let mut q = _mm512_castsi128_si512(_mm_and_si128(q0, nibbles));
    q = _mm512_inserti32x4(q, _mm_and_si128(_mm_srli_epi16(q0, 4), nibbles), 1);
    q = _mm512_inserti32x4(q, _mm_and_si128(q1, nibbles), 2);
    q = _mm512_inserti32x4(q, _mm_and_si128(_mm_srli_epi16(q1, 4), nibbles), 3);
    Decoded { q, a, b: _mm512_mul_ps(a, _mm512_set1_ps(-8.0)) }
}

/// Per-group scales and offsets of a K-format block at `block` (8 groups of 32 or 16
/// groups of 16), in the register's first lanes.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn group_parameters(block_type: BlockType, block: *const u8) -> (__m512, __m512) {
    let mut scales = [0f32; 16];
    let mut offsets = [0f32; 16];
    if block_type == BlockType::Q6K {
        let d = half_at(block.add(208));
        for (g, (scale, offset)) in scales.iter_mut().zip(&mut offsets).enumerate() {
            *scale = d * *block.add(192 + g) as i8 as f32;
            *offset = -32.0 * *scale;
        }
    } else {
        let (d, dmin) = (half_at(block), half_at(block.add(2)));
        let packed = std::slice::from_raw_parts(block.add(4), 12);
        for g in 0..8 {
            let (scale, min) = scale_min_k4(g, packed);
            scales[g] = d * scale as f32;
            offsets[g] = -dmin * min as f32;
        }
    }
    (_mm512_loadu_ps(scales.as_ptr()), _mm512_loadu_ps(offsets.as_ptr()))
}

/// The 64 codes of chunk `part` (of 4) of a K-format block at `block`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn k_codes(block_type: BlockType, block: *const u8, part: usize) -> __m512i {
    let nibbles = _mm256_set1_epi8(0x0f);
    let join = |low: __m256i, high: __m256i| _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1);
    match block_type {
        BlockType::Q4K => {
            let codes = _mm256_loadu_si256(block.add(16 + 32 * part) as *const __m256i);
            join(_mm256_and_si256(codes, nibbles), _mm256_and_si256(_mm256_srli_epi16(codes, 4), nibbles))
        }
        BlockType::Q5K => {
            let codes = _mm256_loadu_si256(block.add(48 + 32 * part) as *const __m256i);
            let high = _mm256_loadu_si256(block.add(16) as *const __m256i);
            let one = _mm256_set1_epi8(1);
            let bit = |shift: usize| {
                let bits = _mm256_srl_epi16(high, _mm_cvtsi32_si128(shift as i32));
                _mm256_slli_epi16(_mm256_and_si256(bits, one), 4)
            };
            let low = _mm256_or_si256(_mm256_and_si256(codes, nibbles), bit(2 * part));
            let up =
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(codes, 4), nibbles), bit(2 * part + 1));
            join(low, up)
        }
        BlockType::Q6K => {
            let (n, shift) = (part / 2, _mm_cvtsi32_si128(4 * (part % 2) as i32));
            let first = _mm256_loadu_si256(block.add(64 * n) as *const __m256i);
            let second = _mm256_loadu_si256(block.add(64 * n + 32) as *const __m256i);
            let high = _mm256_loadu_si256(block.add(128 + 32 * n) as *const __m256i);
            let three = _mm256_set1_epi8(3);
            let high = _mm256_srl_epi16(high, shift);
            let top = |bits: __m256i| _mm256_slli_epi16(_mm256_and_si256(bits, three), 4);
            let low = _mm256_or_si256(_mm256_and_si256(_mm256_srl_epi16(first, shift), nibbles), top(high));
            let up = _mm256_or_si256(
                _mm256_and_si256(_mm256_srl_epi16(second, shift), nibbles),
                top(_mm256_srli_epi16(high, 2)),
            );
            join(low, up)
        }
        BlockType::Q8_0 | BlockType::Q4_0 => unreachable!("32-weight formats are decoded in pairs"),
    }
}
