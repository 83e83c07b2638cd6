//! MLX's affine quantization, read in place: each row's weights packed `bits` a weight into a
//! little-endian bit stream (MLX's `uint32` words; weight `i` at bit `i·bits`), and per group
//! of `group_size` weights a scale and a bias in the checkpoint's float dtype, `w = scale·q + bias`.
//!
//! `y = x Wᵀ` rounds each input row to 8-bit codes per 32 values (as the GGUF block kernels
//! do, see [`super::quantized`]), sums `q·x` in integers per 32 weights and scales the sums in
//! f32; the biases meet each 32 values' sum once. The error bound is the block kernels':
//! `Σ_blocks max|x_block| / 254 · Σ|w_block|` per dot product.
//!
//! 4- and 8-bit weights with groups of 32, 64 or 128 have AVX-512 VNNI kernels
//! ([`super::x86_affine`]) and AVX2 ones ([`super::avx2_affine`]); other widths (2, 3, 5,
//! 6 bits) and CPUs take the portable path.
//! On a CPU with AMX, a product with [`super::x86_amx::MIN_BLOCK_ROWS`] input rows or more
//! (a prompt) of any width takes [`super::x86_amx`] instead: weights decoded to bf16,
//! activations rounded to bf16.
//! For 4 bits, each 64 input codes are stored even positions first, then odd ones, so that a
//! byte's low nibbles meet the first half and its high nibbles the second without shuffles.

use std::ops::Range;
use std::sync::Arc;

use rayon::prelude::*;

use super::matrix::{element, WeightMatrix};
use super::quantized::{quantize, vnni_available, CHUNK, ROW_BLOCK};
use super::{check_product, Isa, OutPtr, ROWS_PER_TASK};
use crate::error::{Error, Result};

/// Bits a weight MLX's affine quantization stores.
pub const AFFINE_BITS: [usize; 6] = [2, 3, 4, 5, 6, 8];

/// A `[rows, cols]` MLX-quantized matrix: packed codes and per-group scales and biases.
#[derive(Clone)]
pub struct AffineMatrix {
    codes: Arc<dyn AsRef<[u8]> + Send + Sync>,
    range: Range<usize>,
    scales: WeightMatrix,
    biases: WeightMatrix,
    cols: usize,
    bits: usize,
}

impl std::fmt::Debug for AffineMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "AffineMatrix({}x{} {}-bit, groups of {})",
            self.rows(),
            self.cols,
            self.bits,
            self.group_size()
        )
    }
}

impl AffineMatrix {
    /// The matrix whose codes lie at `range` of `codes` (`bits` a weight, `cols` weights a
    /// row), with `[rows, groups]` `scales` and `biases`; checks that the sizes agree.
    pub fn new(
        codes: Arc<dyn AsRef<[u8]> + Send + Sync>,
        range: Range<usize>,
        scales: WeightMatrix,
        biases: WeightMatrix,
        cols: usize,
        bits: usize,
    ) -> Result<Self> {
        let invalid = |why: String| Err(Error::InvalidModel(format!("an MLX-quantized matrix: {why}")));
        if !AFFINE_BITS.contains(&bits) {
            return invalid(format!("{bits} bits a weight (MLX stores 2, 3, 4, 5, 6 or 8)"));
        }
        let (rows, groups) = (scales.rows(), scales.cols());
        if (biases.rows(), biases.cols()) != (rows, groups) || biases.dtype() != scales.dtype() {
            return invalid(format!(
                "biases {}x{} {:?} do not match scales {rows}x{groups} {:?}",
                biases.rows(),
                biases.cols(),
                biases.dtype(),
                scales.dtype()
            ));
        }
        if groups == 0 || !cols.is_multiple_of(groups) || !(cols / groups).is_multiple_of(32) {
            return invalid(format!("{groups} groups do not split {cols} columns into groups of 32·n"));
        }
        let fits = range.end <= (*codes).as_ref().len();
        if rows * cols * bits / 8 != range.len() || !fits {
            return invalid(format!("{} bytes cannot hold {rows}x{cols} {bits}-bit codes", range.len()));
        }
        Ok(Self { codes, range, scales, biases, cols, bits })
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.scales.rows()
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bits a weight.
    pub fn bits(&self) -> usize {
        self.bits
    }

    /// Weights sharing one scale and bias.
    pub fn group_size(&self) -> usize {
        self.cols / self.scales.cols()
    }

    /// Bytes of a row's codes.
    fn row_bytes(&self) -> usize {
        self.cols * self.bits / 8
    }

    /// Row `row`'s packed codes.
    pub(super) fn row_codes(&self, row: usize) -> &[u8] {
        let width = self.row_bytes();
        &(*self.codes).as_ref()[self.range.start + row * width..][..width]
    }

    /// The scales and biases (as stored) of row `row`.
    pub(super) fn row_parameters(&self, row: usize) -> (&[u8], &[u8]) {
        let width = self.scales.cols() * self.scales.dtype().size();
        let (scales, biases) = (self.scales.data(), self.biases.data());
        (&scales[row * width..(row + 1) * width], &biases[row * width..(row + 1) * width])
    }

    /// The stored dtype of the scales and biases.
    pub fn parameter_dtype(&self) -> super::WeightDType {
        self.scales.dtype()
    }
}

/// Code `i` of a row packed `bits` a code.
fn code_at(codes: &[u8], bits: usize, i: usize) -> u8 {
    let bit = i * bits;
    let (byte, shift) = (bit / 8, bit % 8);
    let low = codes[byte] as u16;
    let high = codes.get(byte + 1).map_or(0, |&b| b as u16);
    (((low | high << 8) >> shift) & ((1 << bits) - 1)) as u8
}

/// Row `row` of `matrix` decoded to f32 (`out` has `cols` values): `scale·q + bias`, a
/// product then a sum in f32, as `mx.dequantize` computes it.
pub fn dequantize_affine_row(matrix: &AffineMatrix, row: usize, out: &mut [f32]) {
    let (codes, (scales, biases)) = (matrix.row_codes(row), matrix.row_parameters(row));
    let (group_size, dtype) = (matrix.group_size(), matrix.parameter_dtype());
    for (group, values) in out[..matrix.cols].chunks_exact_mut(group_size).enumerate() {
        let (scale, bias) = (element(scales, group, dtype), element(biases, group, dtype));
        for (i, value) in values.iter_mut().enumerate() {
            *value = scale * code_at(codes, matrix.bits, group * group_size + i) as f32 + bias;
        }
    }
}

/// Where value `i` (of 64) of an input chunk is stored for weights of `bits`: 4-bit rows
/// pair with the even values first, then the odd ones (see the module comment).
fn chunk_position(bits: usize, i: usize) -> usize {
    if bits == 4 {
        i / 2 + 32 * (i % 2)
    } else {
        i
    }
}

/// One quantized input row: its codes, scales and sums (see [`AffineInput`]).
pub type InputRow<'a> = (&'a [i8], &'a [f32], &'a [f32]);

/// Input rows quantized for affine weights of one width: signed 8-bit codes (each chunk of 64
/// ordered as [`chunk_position`] says), and per 32 values a scale and the scale times the
/// codes' sum; rows padded to whole chunks, scales and sums to a multiple of 8 (256 values).
pub struct AffineInput {
    pub codes: Vec<i8>,
    pub scales: Vec<f32>,
    pub sums: Vec<f32>,
    /// Codes, and scales or sums, per row.
    strides: (usize, usize),
}

impl AffineInput {
    /// Quantizes the `x.len() / cols` rows of `x` for weights of `bits`.
    pub fn new(x: &[f32], cols: usize, bits: usize) -> Self {
        let strides = (cols.div_ceil(CHUNK) * CHUNK, (cols / 32).div_ceil(8) * 8);
        let rows = x.len() / cols;
        let mut input = Self {
            codes: vec![0; rows * strides.0],
            scales: vec![0.0; rows * strides.1],
            sums: vec![0.0; rows * strides.1],
            strides,
        };
        let mut block_codes = [0i8; 32];
        for (r, row) in x.chunks_exact(cols).enumerate() {
            let codes = &mut input.codes[r * strides.0..(r + 1) * strides.0];
            for (b, block) in row.chunks_exact(32).enumerate() {
                let scale = quantize(block, &mut block_codes);
                input.scales[r * strides.1 + b] = scale;
                input.sums[r * strides.1 + b] =
                    scale * block_codes.iter().map(|&q| q as i32).sum::<i32>() as f32;
                let chunk = &mut codes[b / 2 * CHUNK..][..CHUNK];
                for (i, &code) in block_codes.iter().enumerate() {
                    chunk[chunk_position(bits, 32 * (b % 2) + i)] = code;
                }
            }
        }
        input
    }

    /// Rows `rows` (the first [`ROW_BLOCK`] of them) as [`AffineInput::row`] gives each, and
    /// how many there are.
    pub(super) fn rows(&self, rows: Range<usize>) -> ([InputRow<'_>; ROW_BLOCK], usize) {
        let count = rows.len().min(ROW_BLOCK);
        let mut inputs = [(&[][..], &[][..], &[][..]); ROW_BLOCK];
        for (slot, r) in inputs.iter_mut().zip(rows.take(count)) {
            *slot = self.row(r);
        }
        (inputs, count)
    }

    /// Row `r`'s codes, scales and sums.
    pub fn row(&self, r: usize) -> InputRow<'_> {
        let (c, s) = self.strides;
        (&self.codes[r * c..(r + 1) * c], &self.scales[r * s..(r + 1) * s], &self.sums[r * s..(r + 1) * s])
    }
}

/// For each block of 32 weights of a span of 256, its group of `group_size` counted from the
/// span's first: which of a span's group scales and biases the SIMD kernels spread to it.
pub(super) fn group_of_block(group_size: usize) -> [i32; 8] {
    std::array::from_fn(|b| (32 * b / group_size) as i32)
}

/// The kernel that dots one weight row with a block of input rows.
#[derive(Clone, Copy)]
enum RowKernel {
    Avx512Vnni,
    Avx2,
    Portable,
}

/// The fastest row kernel for `matrix` on `isa`: SIMD for 4 and 8 bits in groups of 32, 64
/// or 128, the portable one otherwise.
fn row_kernel(isa: Isa, matrix: &AffineMatrix) -> RowKernel {
    #[cfg(target_arch = "x86_64")]
    if matches!(matrix.bits, 4 | 8) && matches!(matrix.group_size(), 32 | 64 | 128) {
        if isa.has_avx512() && vnni_available() && is_x86_feature_detected!("avx512vl") {
            return RowKernel::Avx512Vnni;
        }
        if isa != Isa::Portable {
            return RowKernel::Avx2;
        }
    }
    let _ = (isa, matrix);
    RowKernel::Portable
}

/// `out[m, rows] = x[m, cols] · Wᵀ (+ bias)` for an MLX-quantized matrix, with the best
/// instruction set.
pub fn linear_affine(x: &[f32], w: &AffineMatrix, bias: Option<&[f32]>, out: &mut [f32]) -> Result<()> {
    linear_affine_with(Isa::detect(), x, w, bias, out)
}

/// [`linear_affine`] with a chosen instruction set (tests force each one); the AVX-512 paths
/// need VNNI.
pub fn linear_affine_with(
    isa: Isa,
    x: &[f32],
    w: &AffineMatrix,
    bias: Option<&[f32]>,
    out: &mut [f32],
) -> Result<()> {
    let (n, k) = (w.rows(), w.cols());
    check_product(isa, x, (n, k), bias, out)?;
    let m = x.len() / k;
    #[cfg(target_arch = "x86_64")]
    if super::quantized::takes_amx(isa, m, n, k) {
        // SAFETY: AMX was granted (`Isa::Amx` is available) with AVX-512 BF16; `fits` checked
        // the shape and `check_product` the slices.
        unsafe { super::x86_amx::linear_affine(x, w, bias, out) };
        return Ok(());
    }
    let input = AffineInput::new(x, k, w.bits);
    let kernel = row_kernel(isa, w);
    let out_ptr = OutPtr(out.as_mut_ptr());
    let tasks = n.div_ceil(ROWS_PER_TASK);
    (0..tasks).into_par_iter().for_each(|task| {
        let mut dots = [0f32; ROW_BLOCK];
        // Input rows outer: a block of them stays in L1 while the task's weight rows pass.
        for first in (0..m).step_by(ROW_BLOCK) {
            let count = ROW_BLOCK.min(m - first);
            for row in task * ROWS_PER_TASK..((task + 1) * ROWS_PER_TASK).min(n) {
                dot_rows(kernel, w, row, &input, first..first + count, &mut dots[..count]);
                let add = bias.map_or(0.0, |b| b[row]);
                for (i, dot) in dots[..count].iter().enumerate() {
                    // SAFETY: (first + i, row) is inside `out`; no other task writes this row.
                    unsafe { *out_ptr.get().add((first + i) * n + row) = dot + add };
                }
            }
        }
    });
    Ok(())
}

/// Dots of weight row `row` with the input rows `rows`.
fn dot_rows(
    kernel: RowKernel,
    w: &AffineMatrix,
    row: usize,
    input: &AffineInput,
    rows: Range<usize>,
    dots: &mut [f32],
) {
    match kernel {
        // SAFETY (both): `row_kernel` checked the CPU, 4 or 8 bits and groups of 32-128;
        // every input row holds whole chunks and scales and sums padded to 8.
        #[cfg(target_arch = "x86_64")]
        RowKernel::Avx512Vnni => unsafe { super::x86_affine::dot_rows(w, row, input, rows, dots) },
        #[cfg(target_arch = "x86_64")]
        RowKernel::Avx2 => unsafe { super::avx2_affine::dot_rows(w, row, input, rows, dots) },
        _ => dot_rows_portable(w, row, input, rows, dots),
    }
}

/// The portable dots: each 32 weights' codes summed against the input codes in integers,
/// scaled in f32, the group's bias meeting the input's sum.
pub(super) fn dot_rows_portable(
    w: &AffineMatrix,
    row: usize,
    input: &AffineInput,
    rows: Range<usize>,
    dots: &mut [f32],
) {
    dots.fill(0.0);
    let (codes, (scales, biases)) = (w.row_codes(row), w.row_parameters(row));
    let (group_size, dtype) = (w.group_size(), w.parameter_dtype());
    let mut weights = [0u8; 32];
    for b in 0..w.cols / 32 {
        let group = 32 * b / group_size;
        let (scale, bias) = (element(scales, group, dtype), element(biases, group, dtype));
        for (i, q) in weights.iter_mut().enumerate() {
            *q = code_at(codes, w.bits, 32 * b + i);
        }
        for (dot, r) in dots.iter_mut().zip(rows.clone()) {
            let (x, x_scales, x_sums) = input.row(r);
            let chunk = &x[b / 2 * CHUNK..][..CHUNK];
            let products: i32 = weights
                .iter()
                .enumerate()
                .map(|(i, &q)| q as i32 * chunk[chunk_position(w.bits, 32 * (b % 2) + i)] as i32)
                .sum();
            *dot += scale * x_scales[b] * products as f32 + bias * x_sums[b];
        }
    }
}
