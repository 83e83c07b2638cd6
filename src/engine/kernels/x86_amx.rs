//! Products of bf16 weights with many input rows on AMX (Intel's tile registers, Sapphire
//! Rapids and later): one `tdpbf16ps` multiplies a 16×32 tile of weights by 32×16 of
//! activations into a 16×16 tile of f32 sums, 8192 multiply-adds where an AVX-512 BF16
//! instruction does 32. GGUF blocks (Q8_0, Q4_0, Q4_K, Q5_K, Q6_K) and MLX's affine weights
//! take the same path once each task has decoded its rows to bf16: every weight rounded once,
//! as a bf16 checkpoint's are.
//!
//! The weight tiles load straight from the matrix, 16 rows at its row stride. The activations
//! are rounded to bf16 once per call and packed as the instruction takes its second operand:
//! per 16 input rows and 32 columns, 16 lines of 64 bytes, line `p` holding each row's columns
//! `2p` and `2p + 1`. Each step of 32 columns loads two weight tiles and two activation tiles
//! and makes four products, so 32 weight rows meet 32 input rows in the eight tile registers.
//!
//! Linux hands out the tile registers' state only to a process that asks for it
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM)`); [`usable`] asks once. The unsafe functions need
//! AMX-TILE and AMX-BF16 granted; the caller checks.

use std::arch::asm;
use std::arch::x86_64::*;
use std::sync::OnceLock;

use rayon::prelude::*;

use super::affine::{dequantize_affine_row, AffineMatrix};
use super::blocks::{BlockMatrix, BlockType};
use super::matrix::{element, WeightMatrix};
use super::x86_blocks::{half_at, k_codes, k_parameters};
use super::OutPtr;

/// Rows of every tile, and input rows per activation tile.
pub(super) const TILE: usize = 16;
/// Columns per step: a tile line of 64 bytes holds 32 bf16.
pub(super) const STEP: usize = 32;
/// Weight rows per task: two weight tiles.
const TASK_ROWS: usize = 2 * TILE;
/// Input rows from which a bf16 product takes this path. Loading the weight tiles bounds it at
/// small batches (one thread, weights in cache, `benches/kernels.rs` "rows": about 6.2 G
/// weights/s times the input rows, against 33-36 G multiply-adds/s on AVX-512 BF16's
/// dot products): 4 rows ran 25% slower, 8 rows 45% faster, 16 rows 2.5 times as fast.
pub const MIN_ROWS: usize = 8;
/// Input rows from which a product of GGUF blocks or MLX affine weights takes this path:
/// decoding the weights to bf16
/// costs more than the tiles gain below it (one thread, weights in cache, Q4_K and Q6_K
/// against `x86_prompt_blocks`: 12 rows ran 14-37% slower, 24 rows 19-49% faster, 128 rows
/// 3-3.7 times as fast).
pub const MIN_BLOCK_ROWS: usize = 24;

/// Whether this CPU has AMX with bf16 products and the kernel let this process use them.
pub fn usable() -> bool {
    static USABLE: OnceLock<bool> = OnceLock::new();
    *USABLE.get_or_init(|| {
        let leaf7 = __cpuid_count(7, 0);
        let (tile, bf16) = (leaf7.edx & (1 << 24) != 0, leaf7.edx & (1 << 22) != 0);
        tile && bf16 && request_tile_state()
    })
}

/// Asks Linux for the tile data state (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`).
#[cfg(target_os = "linux")]
fn request_tile_state() -> bool {
    const ARCH_PRCTL: isize = 158;
    const ARCH_REQ_XCOMP_PERM: usize = 0x1023;
    const XFEATURE_XTILEDATA: usize = 18;
    let status: isize;
    // SAFETY: a plain system call; it clobbers rcx and r11 and touches no memory of ours.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") ARCH_PRCTL => status,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    status == 0
}

#[cfg(not(target_os = "linux"))]
fn request_tile_state() -> bool {
    false
}

/// The tile configuration: palette 1, all eight tiles 16 lines of 64 bytes.
#[repr(C, align(64))]
pub(super) struct TileConfig(pub(super) [u8; 64]);

impl TileConfig {
    pub(super) fn uniform() -> Self {
        let mut bytes = [0u8; 64];
        bytes[0] = 1;
        for tile in 0..8 {
            bytes[16 + 2 * tile..18 + 2 * tile].copy_from_slice(&64u16.to_le_bytes());
            bytes[48 + tile] = TILE as u8;
        }
        Self(bytes)
    }
}

/// Whether a `[n, k]` bf16 weight takes this path: whole tiles of rows and steps of columns.
pub fn fits(n: usize, k: usize) -> bool {
    n.is_multiple_of(TASK_ROWS) && k.is_multiple_of(STEP)
}

/// Input rows rounded to bf16 and packed as activation tiles (see the module's doc), in
/// groups of 16 rows padded with zeros, an even number of groups.
pub(super) struct PackedInput {
    tiles: Vec<u16>,
    rows: usize,
    groups: usize,
    steps: usize,
}

impl PackedInput {
    pub(super) fn new(x: &[f32], k: usize) -> Self {
        let m = x.len() / k;
        let groups = m.div_ceil(TILE).next_multiple_of(2);
        let steps = k / STEP;
        let mut tiles = vec![0u16; groups * steps * TILE * STEP];
        for (row, values) in x.chunks_exact(k).enumerate() {
            let (group, lane) = (row / TILE, row % TILE);
            for (step, columns) in values.chunks_exact(STEP).enumerate() {
                let tile = &mut tiles[(group * steps + step) * TILE * STEP..][..TILE * STEP];
                for (line, pair) in columns.chunks_exact(2).enumerate() {
                    let at = line * STEP + 2 * lane;
                    tile[at] = half::bf16::from_f32(pair[0]).to_bits();
                    tile[at + 1] = half::bf16::from_f32(pair[1]).to_bits();
                }
            }
        }
        Self { tiles, rows: m, groups, steps }
    }

    /// The activation tile of `group` at `step`.
    fn tile(&self, group: usize, step: usize) -> *const u16 {
        self.tiles[(group * self.steps + step) * TILE * STEP..].as_ptr()
    }
}

/// `out[m, n] = x[m, k] · Wᵀ (+ bias)` for bf16 `w` that [`fits`]; the caller checked the
/// shapes and [`usable`].
pub unsafe fn linear(x: &[f32], w: &WeightMatrix, bias: Option<&[f32]>, out: &mut [f32]) {
    let k = w.cols();
    let data = w.data();
    for_each_task(x, w.rows(), k, bias, out, |task, _| data[task * TASK_ROWS * 2 * k..].as_ptr());
}

/// `out[m, n] = x[m, k] · Wᵀ (+ bias)` for GGUF blocks that [`fits`]: each task decodes its
/// 32 weight rows to bf16 once, then multiplies them as [`linear`] does. The caller checked
/// the shapes, [`usable`] and AVX-512 VNNI.
pub unsafe fn linear_blocks(x: &[f32], w: &BlockMatrix, bias: Option<&[f32]>, out: &mut [f32]) {
    let (k, block_type) = (w.cols(), w.block_type());
    let row_bytes = block_type.row_bytes(k);
    let data = w.data();
    for_each_task(x, w.rows(), k, bias, out, |task, decoded| {
        decoded.resize(TASK_ROWS * k, 0);
        let rows = &data[task * TASK_ROWS * row_bytes..(task + 1) * TASK_ROWS * row_bytes];
        for (row, values) in rows.chunks_exact(row_bytes).zip(decoded.chunks_exact_mut(k)) {
            // SAFETY: the caller checked the CPU; `row` holds whole blocks of `k` weights.
            unsafe {
                if block_type.block_weights() == 256 {
                    decode_k_row(block_type, row, values)
                } else {
                    decode_small_row(block_type, row, values)
                }
            };
        }
        decoded.as_ptr() as *const u8
    });
}

/// `out[m, n] = x[m, k] · Wᵀ (+ bias)` for MLX affine weights that [`fits`]: each task decodes
/// its 32 weight rows to bf16 once (`scale·q + bias`), then multiplies them as [`linear`]
/// does. The caller checked the shapes, [`usable`] and AVX-512 BF16.
pub unsafe fn linear_affine(x: &[f32], w: &AffineMatrix, bias: Option<&[f32]>, out: &mut [f32]) {
    let k = w.cols();
    for_each_task(x, w.rows(), k, bias, out, |task, decoded| {
        decoded.resize(TASK_ROWS * k, 0);
        for (r, values) in decoded.chunks_exact_mut(k).enumerate() {
            // SAFETY: the caller checked the CPU; `values` holds the row's `k` weights.
            unsafe { decode_affine_row(w, task * TASK_ROWS + r, values) };
        }
        decoded.as_ptr() as *const u8
    });
}

/// Row `row` of MLX affine weights decoded to bf16 (`scale·q + bias` in f32, rounded once):
/// 4 and 8 bits 16 codes at a time, other widths through [`dequantize_affine_row`].
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn decode_affine_row(w: &AffineMatrix, row: usize, out: &mut [u16]) {
    let (bits, group_size) = (w.bits(), w.group_size());
    if !matches!(bits, 4 | 8) {
        let mut values = vec![0f32; w.cols()];
        dequantize_affine_row(w, row, &mut values);
        for (value, chunk) in out.chunks_exact_mut(16).zip(values.chunks_exact(16)) {
            store_bf16(value, _mm512_loadu_ps(chunk.as_ptr()));
        }
        return;
    }
    let (codes, (scales, biases)) = (w.row_codes(row), w.row_parameters(row));
    let dtype = w.parameter_dtype();
    for (group, values) in out.chunks_exact_mut(group_size).enumerate() {
        let scale = _mm512_set1_ps(element(scales, group, dtype));
        let offset = _mm512_set1_ps(element(biases, group, dtype));
        for (part, values) in values.chunks_exact_mut(16).enumerate() {
            let first = group * group_size + 16 * part;
            let q = if bits == 8 {
                _mm_loadu_si128(codes.as_ptr().add(first) as *const __m128i)
            } else {
                // Byte j holds weight 2j in its low nibble and 2j + 1 in its high one.
                let packed = _mm_loadl_epi64(codes.as_ptr().add(first / 2) as *const __m128i);
                let nibbles = _mm_set1_epi8(0x0f);
                let high = _mm_and_si128(_mm_srli_epi16(packed, 4), nibbles);
                _mm_unpacklo_epi8(_mm_and_si128(packed, nibbles), high)
            };
            let weights = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q)), scale, offset);
            store_bf16(values, weights);
        }
    }
}

/// A row of Q8_0/Q4_0 blocks decoded to bf16 weights (`d·q`, rounded once).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512bf16,f16c")]
unsafe fn decode_small_row(block_type: BlockType, row: &[u8], out: &mut [u16]) {
    for (b, values) in out.chunks_exact_mut(32).enumerate() {
        let block = row.as_ptr().add(b * block_type.block_bytes());
        let d = _mm512_set1_ps(half_at(block));
        let codes = if block_type == BlockType::Q8_0 {
            _mm256_loadu_si256(block.add(2) as *const __m256i)
        } else {
            // Q4_0: the low nibbles are weights 0-15, the high ones 16-31, both offset by 8.
            let packed = _mm_loadu_si128(block.add(2) as *const __m128i);
            let nibbles = _mm_set1_epi8(0x0f);
            let low = _mm_and_si128(packed, nibbles);
            let high = _mm_and_si128(_mm_srli_epi16(packed, 4), nibbles);
            _mm256_sub_epi8(_mm256_set_m128i(high, low), _mm256_set1_epi8(8))
        };
        let halves = [_mm256_castsi256_si128(codes), _mm256_extracti128_si256::<1>(codes)];
        for (half, codes) in halves.into_iter().enumerate() {
            let q = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(codes));
            store_bf16(&mut values[16 * half..], _mm512_mul_ps(q, d));
        }
    }
}

/// The 16 values of `weights` rounded to bf16 into the first 16 of `out`.
#[target_feature(enable = "avx512f,avx512bf16")]
#[inline]
unsafe fn store_bf16(out: &mut [u16], weights: __m512) {
    assert!(out.len() >= 16, "16 bf16 values need room");
    let rounded = std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(weights));
    _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, rounded);
}

/// Runs the products of every task of [`TASK_ROWS`] weight rows with all input rows of `x`;
/// `rows_of(task, buffer)` gives the task's weights as bf16 rows of `k` (in place, or
/// decoded into the task's buffer).
pub(super) unsafe fn for_each_task(
    x: &[f32],
    n: usize,
    k: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
    rows_of: impl Fn(usize, &mut Vec<u16>) -> *const u8 + Sync,
) {
    let input = PackedInput::new(x, k);
    for_each_task_of_runs(&[Run { offset: 0, input: &input }], false, n, 2 * k, bias, out, rows_of);
}

/// Activation tiles and where in each weight row the columns they meet begin (bytes).
pub(super) struct Run<'a> {
    pub offset: usize,
    pub input: &'a PackedInput,
}

/// [`for_each_task`] over several runs summed into each output: weight rows of `row_bytes`,
/// every run's input holding the same rows. `in_place`: each task's rows are the matrix's own,
/// the next task's right after them.
pub(super) unsafe fn for_each_task_of_runs(
    runs: &[Run<'_>],
    in_place: bool,
    n: usize,
    row_bytes: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
    rows_of: impl Fn(usize, &mut Vec<u16>) -> *const u8 + Sync,
) {
    let (m, groups) = (runs[0].input.rows, runs[0].input.groups);
    let out_ptr = OutPtr(out.as_mut_ptr());
    (0..n / TASK_ROWS).into_par_iter().for_each_init(Vec::new, |buffer, task| {
        let config = TileConfig::uniform();
        let mut sums = [[0f32; TILE * TILE]; 4];
        let weights = rows_of(task, buffer);
        // Weights in place: the next task's rows follow this one's, and are asked for while
        // this task multiplies (see `product`).
        let next = if in_place && task + 1 < n / TASK_ROWS {
            weights.wrapping_add(TASK_ROWS * row_bytes)
        } else {
            std::ptr::null()
        };
        // SAFETY: the caller checked AMX; the configuration is loaded before any tile is used.
        unsafe { asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly)) };
        for pair in (0..groups).step_by(2) {
            // SAFETY: every tile read lies inside the weights (rows of this task, each run's
            // columns) or inside the packed inputs (groups `pair`, `pair + 1`, all steps).
            unsafe { product((weights, next), row_bytes, runs, pair, &mut sums) };
            for (t, sums) in sums.iter().enumerate() {
                let (first_row, group) = (task * TASK_ROWS + TILE * (t / 2), pair + t % 2);
                for lane in 0..TILE.min(m.saturating_sub(group * TILE)) {
                    let input_row = group * TILE + lane;
                    for r in 0..TILE {
                        let row = first_row + r;
                        // SAFETY: (input_row, row) is inside `out`; only this task writes `row`.
                        unsafe {
                            *out_ptr.get().add(input_row * n + row) =
                                sums[r * TILE + lane] + bias.map_or(0.0, |b| b[row]);
                        }
                    }
                }
            }
        }
        // SAFETY: returns the tile state this thread configured.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    });
}

/// A row of K blocks decoded to bf16 weights (`d·s·q + offset`, rounded once).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512bf16,f16c")]
unsafe fn decode_k_row(block_type: BlockType, row: &[u8], out: &mut [u16]) {
    // Q6_K has a scale per 16 weights, Q4_K/Q5_K per 32 (lanes 0-7 of the scales).
    let groups_of_16_per_scale = if block_type == BlockType::Q6K { 1 } else { 2 };
    for (b, values) in out.chunks_exact_mut(256).enumerate() {
        let block = row.as_ptr().add(b * block_type.block_bytes());
        let (scales, offsets) = k_parameters(block_type, block);
        for part in 0..4 {
            let mut codes = [0u8; 64];
            _mm512_storeu_si512(codes.as_mut_ptr() as *mut _, k_codes(block_type, block, part));
            for quarter in 0..4 {
                let group = 4 * part + quarter;
                let q = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(
                    codes.as_ptr().add(16 * quarter) as *const __m128i,
                )));
                let scale =
                    _mm512_permutexvar_ps(_mm512_set1_epi32((group / groups_of_16_per_scale) as i32), scales);
                let offset = _mm512_permutexvar_ps(_mm512_set1_epi32(group as i32), offsets);
                store_bf16(&mut values[16 * group..], _mm512_fmadd_ps(q, scale, offset));
            }
        }
    }
}

/// The sums of weight tiles 0 and 1 (rows `0..16`, `16..32` at `weights`) with activation
/// groups `pair` and `pair + 1`, over every run's columns: `sums[2·w + g]`, line = weight row,
/// column = input row. Unless `next` is null, each step asks for the lines of the same columns
/// of the 32 rows at `next` into L2: loaded by the tiles alone, a task's rows came from memory
/// a tile line at a time, 32 rows apart, which the hardware prefetchers do not follow.
#[inline(never)]
unsafe fn product(
    (weights, next): (*const u8, *const u8),
    row_bytes: usize,
    runs: &[Run<'_>],
    pair: usize,
    sums: &mut [[f32; TILE * TILE]; 4],
) {
    asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
    for run in runs {
        let first_rows = weights.add(run.offset);
        let second_rows = first_rows.add(TILE * row_bytes);
        for step in 0..run.input.steps {
            if !next.is_null() {
                for row in 0..TASK_ROWS {
                    let line = next.wrapping_add(row * row_bytes + run.offset + 2 * STEP * step);
                    _mm_prefetch::<_MM_HINT_T1>(line as *const i8);
                }
            }
            let (first, second) = (run.input.tile(pair, step), run.input.tile(pair + 1, step));
            asm!(
                "tileloadd tmm4, [{w0} + {stride}*1]",
                "tileloadd tmm5, [{w1} + {stride}*1]",
                "tileloadd tmm6, [{x0} + {line}*1]",
                "tileloadd tmm7, [{x1} + {line}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                w0 = in(reg) first_rows.add(2 * STEP * step),
                w1 = in(reg) second_rows.add(2 * STEP * step),
                x0 = in(reg) first,
                x1 = in(reg) second,
                stride = in(reg) row_bytes,
                line = in(reg) 2 * STEP,
                options(nostack, readonly),
            );
        }
    }
    let line = 4 * TILE;
    asm!(
        "tilestored [{s0} + {line}*1], tmm0",
        "tilestored [{s1} + {line}*1], tmm1",
        "tilestored [{s2} + {line}*1], tmm2",
        "tilestored [{s3} + {line}*1], tmm3",
        s0 = in(reg) sums[0].as_mut_ptr(),
        s1 = in(reg) sums[1].as_mut_ptr(),
        s2 = in(reg) sums[2].as_mut_ptr(),
        s3 = in(reg) sums[3].as_mut_ptr(),
        line = in(reg) line,
        options(nostack),
    );
}
