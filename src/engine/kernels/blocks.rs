//! Quantized weight matrices in GGUF's block formats, read in place, and the portable
//! decoding of their blocks.
//!
//! The 32-weight formats (Q8_0, Q4_0) decode to signed 8-bit codes and one scale per block;
//! the 256-weight K formats to unsigned codes (at most 6 bits) with an integer scale and an
//! f32 offset per 16 weights and one f32 scale per block, so the kernels can sum a whole
//! block in integers (see [`super::quantized`]).

use std::ops::Range;
use std::sync::Arc;

use half::f16;

use crate::error::{Error, Result};

/// A GGUF block format the block kernels multiply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockType {
    /// 32 weights: f16 scale, 32 signed 8-bit codes.
    Q8_0,
    /// 32 weights: f16 scale, 32 4-bit codes offset by 8.
    Q4_0,
    /// 256 weights in 8 groups of 32: f16 scale and min, 6-bit group scales and mins,
    /// 4-bit codes.
    Q4K,
    /// As Q4K with a fifth bit per code.
    Q5K,
    /// 256 weights in 16 groups of 16: 6-bit codes offset by 32, 8-bit group scales, f16 scale.
    Q6K,
}

impl BlockType {
    /// Weights per block.
    pub fn block_weights(self) -> usize {
        match self {
            Self::Q8_0 | Self::Q4_0 => 32,
            Self::Q4K | Self::Q5K | Self::Q6K => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q8_0 => 34,
            Self::Q4_0 => 18,
            Self::Q4K => 144,
            Self::Q5K => 176,
            Self::Q6K => 210,
        }
    }

    /// Bytes of a row of `cols` weights (a multiple of the block size).
    pub fn row_bytes(self, cols: usize) -> usize {
        cols / self.block_weights() * self.block_bytes()
    }
}

/// A `[rows, cols]` matrix of blocks over shared bytes, row after row.
#[derive(Clone)]
pub struct BlockMatrix {
    bytes: Arc<dyn AsRef<[u8]> + Send + Sync>,
    range: Range<usize>,
    rows: usize,
    cols: usize,
    block_type: BlockType,
}

impl std::fmt::Debug for BlockMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlockMatrix({}x{} {:?})", self.rows, self.cols, self.block_type)
    }
}

impl BlockMatrix {
    /// The matrix stored at `range` of `bytes`, checking that the sizes agree.
    pub fn new(
        bytes: Arc<dyn AsRef<[u8]> + Send + Sync>,
        range: Range<usize>,
        rows: usize,
        cols: usize,
        block_type: BlockType,
    ) -> Result<Self> {
        let fits = range.end <= (*bytes).as_ref().len();
        let whole_blocks = cols.is_multiple_of(block_type.block_weights());
        if !whole_blocks || rows * block_type.row_bytes(cols) != range.len() || !fits {
            return Err(Error::InvalidModel(format!(
                "{} bytes cannot hold a {rows}x{cols} {block_type:?} matrix",
                range.len()
            )));
        }
        Ok(Self { bytes, range, rows, cols, block_type })
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The block format.
    pub fn block_type(&self) -> BlockType {
        self.block_type
    }

    /// The matrix's bytes, row after row.
    pub(super) fn data(&self) -> &[u8] {
        &(*self.bytes).as_ref()[self.range.clone()]
    }
}

fn half_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([bytes[at], bytes[at + 1]])).to_f32()
}

/// The 6-bit scale and min of group `j` (of 8) of a Q4K/Q5K block's 12 packed bytes.
pub fn scale_min_k4(j: usize, packed: &[u8]) -> (u8, u8) {
    if j < 4 {
        (packed[j] & 63, packed[j + 4] & 63)
    } else {
        ((packed[j + 4] & 0x0f) | ((packed[j - 4] >> 6) << 4), (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4))
    }
}

/// A decoded Q8_0 or Q4_0 block: `w = d·q`.
pub struct SmallBlock {
    pub q: [i8; 32],
    pub d: f32,
}

/// The Q8_0 or Q4_0 block at the start of `bytes`.
pub fn decode_small_block(block_type: BlockType, bytes: &[u8]) -> SmallBlock {
    let mut q = [0i8; 32];
    if block_type == BlockType::Q8_0 {
        for (code, &byte) in q.iter_mut().zip(&bytes[2..34]) {
            *code = byte as i8;
        }
    } else {
        for (i, &byte) in bytes[2..18].iter().enumerate() {
            q[i] = (byte & 0x0f) as i8 - 8;
            q[i + 16] = (byte >> 4) as i8 - 8;
        }
    }
    SmallBlock { q, d: half_at(bytes, 0) }
}

/// Weights per group of a decoded K block (one integer scale and one offset each).
pub const K_GROUP: usize = 16;

/// A decoded Q4K, Q5K or Q6K block: unsigned codes (at most 63), and per group of 16
/// weights an integer scale `s` and an offset `o`, with `w = d·s·q + o`.
pub struct KBlock {
    pub q: [u8; 256],
    pub scales: [i32; 16],
    pub offsets: [f32; 16],
    pub d: f32,
}

/// The K-format block at the start of `bytes`.
pub fn decode_k_block(block_type: BlockType, bytes: &[u8]) -> KBlock {
    let mut block = KBlock { q: [0; 256], scales: [0; 16], offsets: [0.0; 16], d: 0.0 };
    match block_type {
        BlockType::Q4K | BlockType::Q5K => {
            let (d, dmin) = (half_at(bytes, 0), half_at(bytes, 2));
            let packed = &bytes[4..16];
            for part in 0..4 {
                let codes = if block_type == BlockType::Q5K {
                    &bytes[48 + 32 * part..80 + 32 * part]
                } else {
                    &bytes[16 + 32 * part..48 + 32 * part]
                };
                for (i, &byte) in codes.iter().enumerate() {
                    let (mut low, mut up) = (byte & 0x0f, byte >> 4);
                    if block_type == BlockType::Q5K {
                        let high = bytes[16 + i];
                        low |= ((high >> (2 * part)) & 1) << 4;
                        up |= ((high >> (2 * part + 1)) & 1) << 4;
                    }
                    block.q[64 * part + i] = low;
                    block.q[64 * part + 32 + i] = up;
                }
            }
            for group in 0..16 {
                let (scale, min) = scale_min_k4(group / 2, packed);
                block.scales[group] = scale as i32;
                block.offsets[group] = -dmin * min as f32;
            }
            block.d = d;
        }
        BlockType::Q6K => {
            for part in 0..4 {
                let (n, shift) = (part / 2, 4 * (part % 2));
                let (low, high) = (&bytes[64 * n..64 * n + 64], &bytes[128 + 32 * n..160 + 32 * n]);
                for l in 0..32 {
                    let first = (low[l] >> shift) & 0x0f;
                    let second = (low[l + 32] >> shift) & 0x0f;
                    block.q[64 * part + l] = first | (((high[l] >> shift) & 3) << 4);
                    block.q[64 * part + 32 + l] = second | (((high[l] >> (shift + 2)) & 3) << 4);
                }
            }
            let d = half_at(bytes, 208);
            for group in 0..16 {
                let scale = bytes[192 + group] as i8 as i32;
                block.scales[group] = scale;
                block.offsets[group] = -32.0 * d * scale as f32;
            }
            block.d = d;
        }
        BlockType::Q8_0 | BlockType::Q4_0 => unreachable!("32-weight formats have no K blocks"),
    }
    block
}

/// Row `row` of `matrix` decoded to f32 (`out` has `cols` values).
pub fn dequantize_row(matrix: &BlockMatrix, row: usize, out: &mut [f32]) {
    let block_type = matrix.block_type;
    let (size, bytes_per_block) = (block_type.block_weights(), block_type.block_bytes());
    let row_bytes = block_type.row_bytes(matrix.cols);
    let bytes = &matrix.data()[row * row_bytes..(row + 1) * row_bytes];
    for (block, values) in bytes.chunks_exact(bytes_per_block).zip(out.chunks_exact_mut(size)) {
        if size == 32 {
            let decoded = decode_small_block(block_type, block);
            for (value, &q) in values.iter_mut().zip(&decoded.q) {
                *value = decoded.d * q as f32;
            }
            continue;
        }
        let decoded = decode_k_block(block_type, block);
        for (i, value) in values.iter_mut().enumerate() {
            let group = i / K_GROUP;
            *value = decoded.d * decoded.scales[group] as f32 * decoded.q[i] as f32 + decoded.offsets[group];
        }
    }
}
