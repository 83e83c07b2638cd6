//! The AVX-512 VNNI block kernels: a chunk of 64 weight codes is decoded into one register,
//! dotted with 64 activation codes by one `vpdpbusd` per input row (16 lane sums of 4
//! products), and the lane sums are scaled in f32. Every function needs AVX-512F, BW and
//! VNNI; the caller checks them.

use std::arch::x86_64::*;
use std::ops::Range;

use super::blocks::{chunks, decode_chunk, BlockType, CHUNK, LANES};
use super::quantized::QuantizedInput;

/// A decoded chunk in registers: codes, and per-lane scales and offsets.
struct Decoded {
    q: __m512i,
    a: __m512,
    b: __m512,
}

/// The input rows' pointers: codes, lane scales, lane scaled sums.
struct Inputs<const N: usize> {
    codes: [*const i8; N],
    scales: [*const f32; N],
    sums: [*const f32; N],
}

/// Lanes 0-7 from group `2p`, 8-15 from `2p + 1` (groups of 32), for chunk `p` of a block;
/// the offsets of these groups lie 8 lanes further.
const GROUPS_OF_32: [[i32; 16]; 4] = lane_groups(8, 0);
const OFFSETS_OF_32: [[i32; 16]; 4] = lane_groups(8, 8);
/// Lanes from groups `4p..4p + 4`, four lanes each (groups of 16).
const GROUPS_OF_16: [[i32; 16]; 4] = lane_groups(4, 0);

const fn lane_groups(lanes_per_group: usize, first: usize) -> [[i32; 16]; 4] {
    let mut table = [[0; 16]; 4];
    let mut part = 0;
    while part < 4 {
        let mut lane = 0;
        while lane < 16 {
            table[part][lane] = (first + (part * 16 + lane) / lanes_per_group) as i32;
            lane += 1;
        }
        part += 1;
    }
    table
}

/// The f16 at `bytes` (two readable bytes) as f32.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
#[inline]
unsafe fn half_at(bytes: *const u8) -> f32 {
    let bits = std::ptr::read_unaligned(bytes as *const u16);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// Dots of one weight row (`k` weights of `block_type`) with input rows `rows` of `input`
/// (at most eight).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
pub unsafe fn dot_rows(
    block_type: BlockType,
    weights: &[u8],
    k: usize,
    input: &QuantizedInput,
    rows: Range<usize>,
    dots: &mut [f32],
) {
    // A count known at compile time keeps each row's accumulator in a register.
    match rows.len() {
        1 => dot_rows_n::<1>(block_type, weights, k, input, rows, dots),
        2 => dot_rows_n::<2>(block_type, weights, k, input, rows, dots),
        3 => dot_rows_n::<3>(block_type, weights, k, input, rows, dots),
        4 => dot_rows_n::<4>(block_type, weights, k, input, rows, dots),
        5 => dot_rows_n::<5>(block_type, weights, k, input, rows, dots),
        6 => dot_rows_n::<6>(block_type, weights, k, input, rows, dots),
        7 => dot_rows_n::<7>(block_type, weights, k, input, rows, dots),
        _ => dot_rows_n::<8>(block_type, weights, k, input, rows, dots),
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
unsafe fn dot_rows_n<const N: usize>(
    block_type: BlockType,
    weights: &[u8],
    k: usize,
    input: &QuantizedInput,
    rows: Range<usize>,
    dots: &mut [f32],
) {
    let mut inputs =
        Inputs { codes: [std::ptr::null(); N], scales: [std::ptr::null(); N], sums: [std::ptr::null(); N] };
    for (i, r) in rows.take(N).enumerate() {
        let (codes, scales, sums) = input.row(r);
        inputs.codes[i] = codes.as_ptr();
        inputs.scales[i] = scales.as_ptr();
        inputs.sums[i] = sums.as_ptr();
    }
    let mut acc = [_mm512_setzero_ps(); N];
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
                let (table, offset_table) = if block_type == BlockType::Q6K {
                    (&GROUPS_OF_16, &GROUPS_OF_16)
                } else {
                    (&GROUPS_OF_32, &OFFSETS_OF_32)
                };
                for (part, (lanes, offset_lanes)) in table.iter().zip(offset_table).enumerate() {
                    let index = _mm512_loadu_si512(lanes.as_ptr() as *const _);
                    let offset_index = _mm512_loadu_si512(offset_lanes.as_ptr() as *const _);
                    let decoded = Decoded {
                        q: k_codes(block_type, at, part),
                        a: _mm512_permutexvar_ps(index, scales),
                        b: _mm512_permutexvar_ps(offset_index, offsets),
                    };
                    accumulate(&decoded, &inputs, 4 * block + part, &mut acc);
                }
            }
        }
    }
    for (dot, sum) in dots.iter_mut().zip(acc) {
        *dot = _mm512_reduce_add_ps(sum);
    }
}

/// Adds chunk `c`'s products with every input row to its accumulator.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
#[inline]
unsafe fn accumulate<const N: usize>(decoded: &Decoded, inputs: &Inputs<N>, c: usize, acc: &mut [__m512; N]) {
    for (r, sum) in acc.iter_mut().enumerate() {
        let codes = _mm512_loadu_si512(inputs.codes[r].add(c * CHUNK) as *const _);
        let scales = _mm512_loadu_ps(inputs.scales[r].add(c * LANES));
        let sums = _mm512_loadu_ps(inputs.sums[r].add(c * LANES));
        let dots = _mm512_dpbusd_epi32(_mm512_setzero_si512(), decoded.q, codes);
        *sum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots), _mm512_mul_ps(decoded.a, scales), *sum);
        *sum = _mm512_fmadd_ps(decoded.b, sums, *sum);
    }
}

/// A chunk decoded by the portable code (the last, half-filled chunk of a 32-weight format).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
#[inline]
unsafe fn from_portable(block_type: BlockType, weights: &[u8], k: usize, c: usize) -> Decoded {
    let chunk = decode_chunk(block_type, weights, k, c);
    Decoded {
        q: _mm512_loadu_si512(chunk.q.as_ptr() as *const _),
        a: _mm512_loadu_ps(chunk.a.as_ptr()),
        b: _mm512_loadu_ps(chunk.b.as_ptr()),
    }
}

/// Two consecutive Q8_0 or Q4_0 blocks starting at `first`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
#[inline]
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

/// Per-group scales and offsets of a K-format block at `block`, built in registers: for
/// Q6_K the 16 groups' scales and offsets; for Q4_K/Q5_K the 8 groups' scales in lanes 0-7
/// and their offsets in lanes 8-15 (both vectors then hold the same).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
#[inline]
unsafe fn group_parameters(block_type: BlockType, block: *const u8) -> (__m512, __m512) {
    if block_type == BlockType::Q6K {
        let scales =
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(block.add(192) as *const __m128i)));
        let scales = _mm512_mul_ps(scales, _mm512_set1_ps(half_at(block.add(208))));
        return (scales, _mm512_mul_ps(scales, _mm512_set1_ps(-32.0)));
    }
    // The 6-bit scales and mins of the 12 packed bytes, as 8 bytes each (see `scale_min_k4`).
    let packed = block.add(4);
    let word = |i: usize| std::ptr::read_unaligned(packed.add(4 * i) as *const u32);
    let (w0, w1, w2) = (word(0), word(1), word(2));
    let (low6, low4, top2) = (0x3f3f_3f3f_u32, 0x0f0f_0f0f_u32, 0x0303_0303_u32);
    let scales = (w0 & low6) as u64 | ((((w2 & low4) | (((w0 >> 6) & top2) << 4)) as u64) << 32);
    let mins = (w1 & low6) as u64 | (((((w2 >> 4) & low4) | (((w1 >> 6) & top2) << 4)) as u64) << 32);
    let bytes = _mm_set_epi64x(mins as i64, scales as i64);
    let values = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes));
    let (d, dmin) = (half_at(block), half_at(block.add(2)));
    let factors = _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(d), _mm512_set1_ps(-dmin));
    let parameters = _mm512_mul_ps(values, factors);
    (parameters, parameters)
}

/// The 64 codes of chunk `part` (of 4) of a K-format block at `block`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
#[inline]
unsafe fn k_codes(block_type: BlockType, block: *const u8, part: usize) -> __m512i {
    let nibbles = _mm256_set1_epi8(0x0f);
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
            let low = _mm256_or_si256(
                _mm256_and_si256(_mm256_srl_epi16(first, shift), nibbles),
                high_bits(high, 4 * (part % 2), 3),
            );
            let up = _mm256_or_si256(
                _mm256_and_si256(_mm256_srl_epi16(second, shift), nibbles),
                high_bits(high, 4 * (part % 2) + 2, 3),
            );
            join(low, up)
        }
        BlockType::Q8_0 | BlockType::Q4_0 => unreachable!("32-weight formats are decoded in pairs"),
    }
}

/// 64 codes from two halves of 32.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
#[inline]
unsafe fn join(low: __m256i, high: __m256i) -> __m512i {
    _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1)
}

/// The bits `mask` of each byte of `bits` shifted right by `shift`, moved up to bit 4: the
/// high bits of 5- and 6-bit codes.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
#[inline]
unsafe fn high_bits(bits: __m256i, shift: usize, mask: i8) -> __m256i {
    let shifted = _mm256_srl_epi16(bits, _mm_cvtsi32_si128(shift as i32));
    _mm256_slli_epi16(_mm256_and_si256(shifted, _mm256_set1_epi8(mask)), 4)
}
