//! Matrix kernels for the CPU hot path: `y = x Wᵀ` with the weight read in its stored dtype
//! (f32, bf16 or f16) straight from memory (usually the memory-mapped checkpoint), SIMD
//! chosen at run time (AVX-512, AVX2 + FMA + F16C, or portable), threads over output rows.
//!
//! Decoding is bound by memory bandwidth: each weight row is read once per call and, while
//! it sits in L1, dotted with every input row.
//!
//! `mod.rs` chooses the path; [`avx2`] cuts work for AVX2, [`x86`] holds the x86-64 SIMD
//! kernels and [`portable`] the plain-Rust fallback. Block-quantized (GGUF) weights have
//! their own: [`blocks`] decodes the formats, [`quantized`] runs the products and
//! [`x86_blocks`] holds their AVX-512 VNNI kernels and [`x86_prompt_blocks`] the K formats'
//! kernel for many input rows; [`x86_amx`] multiplies bf16 weights and K-format blocks by many
//! input rows on AMX tiles, and [`x86_amx_split`] fine-tuning's frozen weights there, split to
//! bf16 parts by [`split`]. MLX's affine-quantized weights have [`affine`], [`x86_affine`]
//! (AVX-512 VNNI) and [`avx2_affine`].
//! [`linear`], [`Isa`], [`split_product`] and the matrix types are public for
//! `benches/kernels.rs`.

mod affine;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx2_affine;
mod blocks;
mod matrix;
mod portable;
mod quantized;
mod split;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
mod x86;
#[cfg(target_arch = "x86_64")]
mod x86_affine;
#[cfg(target_arch = "x86_64")]
mod x86_amx;
#[cfg(target_arch = "x86_64")]
mod x86_amx_split;
#[cfg(target_arch = "x86_64")]
mod x86_blocks;
#[cfg(target_arch = "x86_64")]
mod x86_prompt_blocks;

use std::sync::OnceLock;

use rayon::prelude::*;

pub use affine::{dequantize_affine_row, linear_affine, linear_affine_with, AffineMatrix, AFFINE_BITS};
pub use blocks::{dequantize_row, BlockMatrix, BlockType};
pub use matrix::{WeightDType, WeightMatrix};
pub use quantized::{block_kernels_accelerated, linear_blocks, linear_blocks_with};
pub use split::{split_product, Orientation, SplitMatrix};

use crate::error::{Error, Result};

/// Instruction sets the kernels can use, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512 BF16 plus AMX tiles, which multiply bf16 weights by many input rows at once.
    Amx,
    /// AVX-512 plus BF16 dot products: bf16 weights meet activations rounded to bf16
    /// (as bf16 inference in transformers does) when several rows are computed at once.
    Avx512Bf16,
    Avx512,
    Avx2,
    Portable,
}

impl Isa {
    /// The best instruction set this CPU supports (detected once).
    pub fn detect() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16") {
                    return if x86_amx::usable() { Isa::Amx } else { Isa::Avx512Bf16 };
                }
                if is_x86_feature_detected!("avx512f") {
                    return Isa::Avx512;
                }
                if is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
                {
                    return Isa::Avx2;
                }
            }
            Isa::Portable
        })
    }

    /// Whether `self` includes AVX-512 (F, BW and the rest of the x86-64-v4 set).
    pub fn has_avx512(self) -> bool {
        matches!(self, Isa::Avx512 | Isa::Avx512Bf16 | Isa::Amx)
    }

    /// Whether `self` includes AVX-512 BF16's dot products.
    fn has_bf16_dots(self) -> bool {
        matches!(self, Isa::Avx512Bf16 | Isa::Amx)
    }

    /// Whether this CPU can run kernels for `self`.
    pub fn available(self) -> bool {
        match (self, Isa::detect()) {
            (Isa::Portable, _) => true,
            (Isa::Avx2, best) => best != Isa::Portable,
            (Isa::Avx512, best) => best.has_avx512(),
            (Isa::Avx512Bf16, best) => matches!(best, Isa::Avx512Bf16 | Isa::Amx),
            (Isa::Amx, best) => best == Isa::Amx,
        }
    }
}

/// Input rows computed together against one weight row.
const ROW_BLOCK: usize = 4;
/// Weight rows computed together (each loaded vector reused across the input rows).
const WEIGHT_BLOCK: usize = 4;
/// Output rows per parallel task (a few hundred KB of weights).
const ROWS_PER_TASK: usize = 64;

/// How far ahead of its reads a kernel that walks one weight row at a time asks for the
/// weights. The hardware prefetchers stop at each 4 KiB page and run only a little ahead, so
/// a kernel that computes between its loads (decoding blocks, widening bf16) waited on memory
/// and then computed instead of doing both at once. Asking 2 KiB ahead took decoding with 2
/// threads on a 2-core Xeon from 14.8 to 20.5 tok/s (Q4_K_M), 13.1 to 15.3 (Q8_0), 9.5 to
/// 20.0 (MLX 4-bit) and 8.4 to 10.0 (bf16); 1-3 KiB measured alike. The multi-row tiles
/// compute enough per byte to keep memory busy, and ran slower with it.
#[cfg(target_arch = "x86_64")]
const PREFETCH_AHEAD: usize = 2048;

/// Asks for the cache lines `PREFETCH_AHEAD` bytes past the `bytes` bytes at `at` (a hint:
/// addresses past the weights are never read, and cannot fault).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn prefetch_ahead(at: *const u8, bytes: usize) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    let ahead = at.wrapping_add(PREFETCH_AHEAD);
    for line in (0..bytes).step_by(64) {
        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line) as *const i8);
    }
}

/// Output pointer shared by tasks that write disjoint columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint elements and the buffer outlives the parallel loop.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer (a method, so closures capture the whole `Send` wrapper).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// `out[m, rows] = x[m, cols] · Wᵀ (+ bias)` with the best instruction set.
pub fn linear(x: &[f32], w: &WeightMatrix, bias: Option<&[f32]>, out: &mut [f32]) -> Result<()> {
    linear_with(Isa::detect(), x, w, bias, out)
}

/// [`linear`] with a chosen instruction set (tests force each one).
pub fn linear_with(
    isa: Isa,
    x: &[f32],
    w: &WeightMatrix,
    bias: Option<&[f32]>,
    out: &mut [f32],
) -> Result<()> {
    let (n, k) = (w.rows(), w.cols());
    check_product(isa, x, (n, k), bias, out)?;
    let m = x.len() / k;
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Amx && w.dtype() == WeightDType::BF16 && m >= x86_amx::MIN_ROWS && x86_amx::fits(n, k) {
        // SAFETY: `Isa::Amx` is available (checked), so the tiles are usable; `fits` checked
        // the shape and `check_product` the slices.
        unsafe { x86_amx::linear(x, w, bias, out) };
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2 {
        avx2::linear_avx2(x, w, bias, out);
        return Ok(());
    }
    let data = w.data();
    let row_bytes = k * w.dtype().size();
    let out_ptr = OutPtr(out.as_mut_ptr());
    let x_bf16: Vec<u16> = if isa.has_bf16_dots() && w.dtype() == WeightDType::BF16 && m > 1 {
        x.iter().map(|v| half::bf16::from_f32(*v).to_bits()).collect()
    } else {
        Vec::new()
    };
    let tasks = n.div_ceil(ROWS_PER_TASK);
    (0..tasks).into_par_iter().for_each(|task| {
        let rows = task * ROWS_PER_TASK..((task + 1) * ROWS_PER_TASK).min(n);
        let mut tile = [[0f32; ROW_BLOCK]; WEIGHT_BLOCK];
        for first in rows.clone().step_by(WEIGHT_BLOCK) {
            let count_w = WEIGHT_BLOCK.min(rows.end - first);
            let weights = &data[first * row_bytes..(first + count_w) * row_bytes];
            for block in (0..m).step_by(ROW_BLOCK) {
                let count = ROW_BLOCK.min(m - block);
                let inputs = &x[block * k..(block + count) * k];
                let inputs_bf16 = x_bf16.get(block * k..(block + count) * k).unwrap_or_default();
                dot_tile(isa, w.dtype(), weights, count_w, (inputs, inputs_bf16), k, count, &mut tile);
                for (j, dots) in tile.iter().enumerate().take(count_w) {
                    let add = bias.map_or(0.0, |b| b[first + j]);
                    for (i, dot) in dots.iter().enumerate().take(count) {
                        // SAFETY: (block + i, first + j) is inside `out`; no other task writes these rows.
                        unsafe { *out_ptr.get().add((block + i) * n + first + j) = dot + add };
                    }
                }
            }
        }
    });
    Ok(())
}

/// Checks that `x` (rows of `k`), a `[n, k]` weight, `bias` and `out` fit one product, and
/// that this CPU runs `isa`.
fn check_product(
    isa: Isa,
    x: &[f32],
    (n, k): (usize, usize),
    bias: Option<&[f32]>,
    out: &[f32],
) -> Result<()> {
    if k == 0
        || !x.len().is_multiple_of(k)
        || out.len() != x.len() / k * n
        || bias.is_some_and(|b| b.len() != n)
    {
        return Err(Error::InvalidArgument(format!(
            "linear: input of {} values, weight {n}x{k}, output of {} values do not fit",
            x.len(),
            out.len()
        )));
    }
    if !isa.available() {
        return Err(Error::InvalidArgument(format!("this CPU cannot run {isa:?} kernels")));
    }
    Ok(())
}

/// `tile[j][i]` = dot of weight row `j` (of `weight_rows`) with input row `i` (of `rows`);
/// inputs come as f32 and, for the BF16 dot-product path, also rounded to bf16 (else empty).
#[allow(clippy::too_many_arguments)]
fn dot_tile(
    isa: Isa,
    dtype: WeightDType,
    weights: &[u8],
    weight_rows: usize,
    (inputs, inputs_bf16): (&[f32], &[u16]),
    k: usize,
    rows: usize,
    tile: &mut [[f32; ROW_BLOCK]; WEIGHT_BLOCK],
) {
    #[cfg(target_arch = "x86_64")]
    if !inputs_bf16.is_empty() && weight_rows == WEIGHT_BLOCK {
        // SAFETY: the BF16 path is only prepared when `isa` is Avx512Bf16 (checked available);
        // `weights` holds WEIGHT_BLOCK bf16 rows of k and `inputs_bf16` `rows` rows of k.
        return unsafe { x86::dot_tile_avx512_bf16(weights, inputs, inputs_bf16, k, rows, tile) };
    }
    #[cfg(target_arch = "x86_64")]
    // Decoding (one input row) streams one weight row at a time: fewer concurrent streams
    // keep the prefetchers at full bandwidth.
    if isa.has_avx512() && weight_rows == WEIGHT_BLOCK && rows > 1 {
        // SAFETY: AVX-512 availability was checked by the caller; `weights` holds WEIGHT_BLOCK
        // rows of k elements and `inputs` holds `rows` rows of k.
        return unsafe { x86::dot_tile_avx512(dtype, weights, inputs, k, rows, tile) };
    }
    let row_bytes = k * dtype.size();
    for (j, dots) in tile.iter_mut().enumerate().take(weight_rows) {
        dot_rows(isa, dtype, &weights[j * row_bytes..(j + 1) * row_bytes], inputs, k, &mut dots[..rows]);
    }
}

/// Dot products of one weight row with `dots.len()` input rows of length `k`.
fn dot_rows(isa: Isa, dtype: WeightDType, weights: &[u8], inputs: &[f32], k: usize, dots: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: `isa.available()` was checked by the caller; slices have the lengths the
        // kernels index (weights: k elements, inputs: dots.len() rows of k).
        match isa {
            Isa::Avx512 | Isa::Avx512Bf16 | Isa::Amx => {
                return unsafe { x86::dot_rows_avx512(dtype, weights, inputs, k, dots) }
            }
            Isa::Avx2 | Isa::Portable => {}
        }
    }
    let _ = isa;
    portable::dot_rows(dtype, weights, inputs, k, dots);
}
