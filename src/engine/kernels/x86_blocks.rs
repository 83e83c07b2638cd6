//! The AVX-512 VNNI block kernels. Each weight block is decoded once into registers and then
//! dotted with every input row of the call's row block: per chunk of 64 weights and input
//! row, one `vpdpbusd` (16 lanes of 4 products), one conversion to f32 and one FMA with the
//! lanes' scales, which are formed per row once per 256 weights (8 activation scales times
//! the weights' block or group scales) and spread to the chunk's lanes by one permute.
//!
//! K formats: unsigned codes (at most 63) meet signed activations; each block's offsets
//! (mins) meet the activations' scaled sums per 16 values in one FMA per 256 weights.
//! Q8_0/Q4_0: signed codes meet the activations plus 128, the accumulator starting at
//! `-128·Σq` (computed once per weight chunk), so a lane holds `Σ q·x` exactly. Lane sums
//! stay within 4·255·128 in magnitude, so their conversion to f32 is exact.
//!
//! Every function needs AVX-512F, BW and VNNI (and F16C); the caller checks them.

use std::arch::x86_64::*;
use std::ops::Range;

use super::blocks::{decode_small_block, BlockType};
use super::prefetch_ahead;
use super::quantized::{QuantizedInput, CHUNK, ROW_BLOCK};

/// The input rows' pointers: codes, scales, sums.
struct Rows {
    codes: [*const u8; ROW_BLOCK],
    scales: [*const f32; ROW_BLOCK],
    sums: [*const f32; ROW_BLOCK],
}

/// Per group of 16 (f32 lane), the lane holding its group of 32's min (mins are lanes 8-15).
const MIN_OF_GROUP: [i32; 16] = [8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15];
/// For chunk `p` of 4, the group of 32 of each lane (4 weights): Q4_K/Q5_K's scales, and the
/// activations' 8 block scales of 256 weights (Q8_0/Q4_0 take theirs the same way).
const GROUP_OF_32: [[i32; 16]; 4] = lane_groups(8);
/// For chunk `p` of 4, the group of 16 of each lane (Q6_K's scales).
const GROUP_OF_16: [[i32; 16]; 4] = lane_groups(4);
/// Per group of 16, its activation block (of 32).
const BLOCK_OF_GROUP: [i32; 16] = [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7];
/// Lanes 0-7 in place (Q4_K/Q5_K: groups of 32 are activation blocks).
const SAME_LANE: [i32; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];

const fn lane_groups(lanes_per_group: usize) -> [[i32; 16]; 4] {
    let mut table = [[0; 16]; 4];
    let mut lane = 0;
    while lane < 64 {
        table[lane / 16][lane % 16] = (lane / lanes_per_group) as i32;
        lane += 1;
    }
    table
}

/// The f16 at `bytes` (two readable bytes) as f32.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
#[inline]
pub(super) unsafe fn half_at(bytes: *const u8) -> f32 {
    let bits = std::ptr::read_unaligned(bytes as *const u16);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// Dots of one weight row (`k` weights of `block_type`) with input rows `rows` of `input`
/// (at most [`ROW_BLOCK`]).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
pub unsafe fn dot_rows(
    block_type: BlockType,
    weights: &[u8],
    k: usize,
    input: &QuantizedInput,
    rows: Range<usize>,
    dots: &mut [f32],
) {
    let mut pointers = Rows {
        codes: [std::ptr::null(); ROW_BLOCK],
        scales: [std::ptr::null(); ROW_BLOCK],
        sums: [std::ptr::null(); ROW_BLOCK],
    };
    let count = rows.len().min(ROW_BLOCK);
    for (i, r) in rows.take(count).enumerate() {
        let (codes, scales, sums) = input.row(r);
        pointers.codes[i] = codes.as_ptr();
        pointers.scales[i] = scales.as_ptr();
        pointers.sums[i] = sums.as_ptr();
    }
    let mut acc = [_mm512_setzero_ps(); ROW_BLOCK];
    let acc = &mut acc[..count];
    match block_type {
        BlockType::Q8_0 | BlockType::Q4_0 => small_blocks(block_type, weights, k, &pointers, acc),
        BlockType::Q4K | BlockType::Q5K | BlockType::Q6K => k_blocks(block_type, weights, k, &pointers, acc),
    }
    for (dot, sum) in dots.iter_mut().zip(acc) {
        *dot = _mm512_reduce_add_ps(*sum);
    }
}

/// Adds every K block's products with each input row to the row's accumulator.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
unsafe fn k_blocks(block_type: BlockType, weights: &[u8], k: usize, rows: &Rows, acc: &mut [__m512]) {
    // No closures here: they would not inherit the target features.
    let (groups, blocks) = if block_type == BlockType::Q6K {
        (&GROUP_OF_16, &BLOCK_OF_GROUP)
    } else {
        (&GROUP_OF_32, &SAME_LANE)
    };
    let blocks = _mm512_loadu_si512(blocks.as_ptr() as *const _);
    let mut lanes = [_mm512_setzero_si512(); 4];
    for (lane, group) in lanes.iter_mut().zip(groups) {
        *lane = _mm512_loadu_si512(group.as_ptr() as *const _);
    }
    for block in 0..k / 256 {
        let at = weights.as_ptr().add(block * block_type.block_bytes());
        prefetch_ahead(at, block_type.block_bytes());
        let (group_scales, offsets) = k_parameters(block_type, at);
        let mut q = [_mm512_setzero_si512(); 4];
        for (part, codes) in q.iter_mut().enumerate() {
            *codes = k_codes(block_type, at, part);
        }
        for (r, sum) in acc.iter_mut().enumerate() {
            // Each group's weight scale times its activation block's scale.
            let x_scales = _mm512_castps256_ps512(_mm256_loadu_ps(rows.scales[r].add(8 * block)));
            let scales = _mm512_mul_ps(group_scales, _mm512_permutexvar_ps(blocks, x_scales));
            let x = rows.codes[r].add(256 * block);
            // Two short chains per block rather than one long one through `sum` (decoding has
            // a single row, so nothing else hides the FMAs' latency).
            let mut partial =
                [_mm512_mul_ps(offsets, _mm512_loadu_ps(rows.sums[r].add(16 * block))), _mm512_setzero_ps()];
            for part in 0..4 {
                let codes = _mm512_loadu_si512(x.add(CHUNK * part) as *const _);
                let products =
                    _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), q[part], codes));
                let scale = _mm512_permutexvar_ps(lanes[part], scales);
                partial[part % 2] = _mm512_fmadd_ps(products, scale, partial[part % 2]);
            }
            *sum = _mm512_add_ps(*sum, _mm512_add_ps(partial[0], partial[1]));
        }
    }
}

/// A K block's group scales times `d` (Q6_K: 16 groups of 16; Q4_K/Q5_K: 8 groups of 32,
/// in lanes 0-7) and its 16 per-group-of-16 offsets.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
#[inline]
pub(super) unsafe fn k_parameters(block_type: BlockType, block: *const u8) -> (__m512, __m512) {
    if block_type == BlockType::Q6K {
        let scales =
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(block.add(192) as *const __m128i)));
        let d = half_at(block.add(208));
        return (_mm512_mul_ps(scales, _mm512_set1_ps(d)), _mm512_mul_ps(scales, _mm512_set1_ps(-32.0 * d)));
    }
    let (scales, mins) = k_scale_and_min_bytes(block);
    let values = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_set_epi64x(mins as i64, scales as i64)));
    let (d, dmin) = (half_at(block), half_at(block.add(2)));
    let mins = _mm512_permutexvar_ps(_mm512_loadu_si512(MIN_OF_GROUP.as_ptr() as *const _), values);
    (_mm512_mul_ps(values, _mm512_set1_ps(d)), _mm512_mul_ps(mins, _mm512_set1_ps(-dmin)))
}

/// A Q4_K/Q5_K block's 8 six-bit scales and 8 mins, a byte each (see `scale_min_k4`);
/// `block` must point at a whole block.
#[inline]
pub(super) unsafe fn k_scale_and_min_bytes(block: *const u8) -> (u64, u64) {
    // The 12 packed bytes follow the two f16 scales.
    let words = std::ptr::read_unaligned(block.add(4) as *const [u32; 3]);
    let (w0, w1, w2) = (words[0], words[1], words[2]);
    let (low6, low4, top2) = (0x3f3f_3f3f_u32, 0x0f0f_0f0f_u32, 0x0303_0303_u32);
    let scales = (w0 & low6) as u64 | ((((w2 & low4) | (((w0 >> 6) & top2) << 4)) as u64) << 32);
    let mins = (w1 & low6) as u64 | (((((w2 >> 4) & low4) | (((w1 >> 6) & top2) << 4)) as u64) << 32);
    (scales, mins)
}

/// The 64 codes of chunk `part` (of 4) of a K-format block at `block`. Each half of 32 codes
/// comes from the same bytes shifted by a different amount, so the bytes are loaded into both
/// halves of one register and shifted per half (`vpsrlvw`) instead of decoded twice and joined.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
#[inline]
pub(super) unsafe fn k_codes(block_type: BlockType, block: *const u8, part: usize) -> __m512i {
    let nibbles = _mm512_set1_epi8(0x0f);
    match block_type {
        BlockType::Q4K => {
            let codes = both_halves(block.add(16 + 32 * part));
            _mm512_and_si512(_mm512_srlv_epi16(codes, half_shifts(0, 4)), nibbles)
        }
        BlockType::Q5K => {
            let codes = both_halves(block.add(48 + 32 * part));
            let low = _mm512_and_si512(_mm512_srlv_epi16(codes, half_shifts(0, 4)), nibbles);
            let high = high_bits(both_halves(block.add(16)), half_shifts(2 * part, 2 * part + 1), 1);
            _mm512_or_si512(low, high)
        }
        BlockType::Q6K => {
            let (n, shift) = (part / 2, 4 * (part % 2));
            // The halves' low 4 bits lie in two adjacent runs of 32 bytes, shifted alike.
            let codes = _mm512_loadu_si512(block.add(64 * n) as *const _);
            let low = _mm512_and_si512(_mm512_srlv_epi16(codes, half_shifts(shift, shift)), nibbles);
            let high = high_bits(both_halves(block.add(128 + 32 * n)), half_shifts(shift, shift + 2), 3);
            _mm512_or_si512(low, high)
        }
        BlockType::Q8_0 | BlockType::Q4_0 => unreachable!("32-weight formats have no K blocks"),
    }
}

/// The 32 bytes at `at` in both halves of a register.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
#[inline]
unsafe fn both_halves(at: *const u8) -> __m512i {
    _mm512_broadcast_i64x4(_mm256_loadu_si256(at as *const __m256i))
}

/// Shift counts for `vpsrlvw`: `low` for the register's first 256 bits, `high` for the rest.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
#[inline]
unsafe fn half_shifts(low: usize, high: usize) -> __m512i {
    _mm512_mask_blend_epi16(0xffff_0000, _mm512_set1_epi16(low as i16), _mm512_set1_epi16(high as i16))
}

/// 64 codes from two halves of 32.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
#[inline]
unsafe fn join(low: __m256i, high: __m256i) -> __m512i {
    _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1)
}

/// The bits `mask` of each byte of `bits` shifted right by `shifts` (per half), moved up to
/// bit 4: the high bits of 5- and 6-bit codes.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
#[inline]
unsafe fn high_bits(bits: __m512i, shifts: __m512i, mask: i8) -> __m512i {
    let shifted = _mm512_srlv_epi16(bits, shifts);
    _mm512_slli_epi16(_mm512_and_si512(shifted, _mm512_set1_epi8(mask)), 4)
}

/// Adds every Q8_0/Q4_0 chunk's products with each input row to the row's accumulator,
/// four chunks (256 weights) at a time where the row allows.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
unsafe fn small_blocks(block_type: BlockType, weights: &[u8], k: usize, rows: &Rows, acc: &mut [__m512]) {
    let chunks = k.div_ceil(CHUNK);
    let mut first = 0;
    while first < chunks {
        match chunks - first {
            1 => small_chunks::<1>(block_type, weights, k, first, rows, acc),
            2 => small_chunks::<2>(block_type, weights, k, first, rows, acc),
            3 => small_chunks::<3>(block_type, weights, k, first, rows, acc),
            _ => small_chunks::<4>(block_type, weights, k, first, rows, acc),
        }
        first += 4;
    }
}

/// Chunks `first..first + G` of a Q8_0/Q4_0 row (`first` a multiple of 4) dotted with every
/// input row.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
#[inline]
unsafe fn small_chunks<const G: usize>(
    block_type: BlockType,
    weights: &[u8],
    k: usize,
    first: usize,
    rows: &Rows,
    acc: &mut [__m512],
) {
    let mut q = [_mm512_setzero_si512(); G];
    let mut start = [_mm512_setzero_si512(); G];
    let mut index = [_mm512_setzero_si512(); G];
    // The blocks' f16 scales, converted together.
    let mut d = [0i16; 8];
    let block_bytes = block_type.block_bytes();
    prefetch_ahead(weights.as_ptr().add(2 * first * block_bytes), 2 * G * block_bytes);
    for p in 0..G {
        (q[p], d[2 * p], d[2 * p + 1]) = small_chunk(block_type, weights, k, first + p);
        // -128·Σq per lane: `vpdpbusd` then adds Σ (x + 128)·q.
        let offset = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(0x80u8 as i8), q[p]);
        start[p] = _mm512_sub_epi32(_mm512_setzero_si512(), offset);
        index[p] = _mm512_loadu_si512(GROUP_OF_32[p].as_ptr() as *const _);
    }
    let d = _mm256_cvtph_ps(_mm_set_epi16(d[7], d[6], d[5], d[4], d[3], d[2], d[1], d[0]));
    for (r, sum) in acc.iter_mut().enumerate() {
        // The 8 blocks' weight scales times their activation scales, spread to lanes per chunk.
        let scales = _mm512_castps256_ps512(_mm256_mul_ps(d, _mm256_loadu_ps(rows.scales[r].add(2 * first))));
        // Two chains, as in `k_blocks`.
        let mut partial = [_mm512_setzero_ps(); 2];
        for p in 0..G {
            let codes = _mm512_loadu_si512(rows.codes[r].add(CHUNK * (first + p)) as *const _);
            let lanes = _mm512_dpbusd_epi32(start[p], codes, q[p]);
            let scale = _mm512_permutexvar_ps(index[p], scales);
            partial[p % 2] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lanes), scale, partial[p % 2]);
        }
        *sum = _mm512_add_ps(*sum, _mm512_add_ps(partial[0], partial[1]));
    }
}

/// Chunk `c` (blocks `2c` and `2c + 1`) of a Q8_0/Q4_0 row: signed codes and the two
/// blocks' f16 scales as stored; a missing second block is zeros.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
#[inline]
unsafe fn small_chunk(block_type: BlockType, weights: &[u8], k: usize, c: usize) -> (__m512i, i16, i16) {
    let size = block_type.block_bytes();
    let first = weights.as_ptr().add(2 * c * size);
    let d0 = std::ptr::read_unaligned(first as *const i16);
    if 2 * c + 1 >= k / 32 {
        let block = decode_small_block(block_type, &weights[2 * c * size..]);
        let q = _mm512_castsi256_si512(_mm256_loadu_si256(block.q.as_ptr() as *const __m256i));
        return (_mm512_inserti64x4(q, _mm256_setzero_si256(), 1), d0, 0);
    }
    let second = first.add(size);
    let d1 = std::ptr::read_unaligned(second as *const i16);
    if block_type == BlockType::Q8_0 {
        let low = _mm256_loadu_si256(first.add(2) as *const __m256i);
        let high = _mm256_loadu_si256(second.add(2) as *const __m256i);
        return (join(low, high), d0, d1);
    }
    let nibbles = _mm_set1_epi8(0x0f);
    let q0 = _mm_loadu_si128(first.add(2) as *const __m128i);
    let q1 = _mm_loadu_si128(second.add(2) as *const __m128i);
    let mut q = _mm512_castsi128_si512(_mm_and_si128(q0, nibbles));
    q = _mm512_inserti32x4(q, _mm_and_si128(_mm_srli_epi16(q0, 4), nibbles), 1);
    q = _mm512_inserti32x4(q, _mm_and_si128(q1, nibbles), 2);
    q = _mm512_inserti32x4(q, _mm_and_si128(_mm_srli_epi16(q1, 4), nibbles), 3);
    (_mm512_sub_epi8(q, _mm512_set1_epi8(8)), d0, d1)
}
