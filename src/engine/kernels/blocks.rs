//! Quantized weight matrices in GGUF's block formats, read in place, and the portable
//! decoding of their blocks.
//!
//! Every format is decoded the same way, 64 weights (a *chunk*) at a time: an unsigned
//! 8-bit code `q` per weight and, per *lane* of 4 consecutive weights, a scale `a` and an
//! offset `b` with `w = a·q + b`. The kernels dot the codes with 8-bit activations in
//! integers and apply `a` and `b` per lane in f32 (see [`super::quantized`]).

use std::ops::Range;
use std::sync::Arc;

use half::f16;

use crate::error::{Error, Result};

/// Weights per chunk, and lanes (of 4 weights) per chunk.
pub const CHUNK: usize = 64;
pub const LANES: usize = CHUNK / 4;

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

/// One decoded chunk: codes and per-lane scales and offsets (`w = a·q + b`).
pub struct Chunk {
    pub q: [u8; CHUNK],
    pub a: [f32; LANES],
    pub b: [f32; LANES],
}

impl Chunk {
    fn zeroed() -> Self {
        Self { q: [0; CHUNK], a: [0.0; LANES], b: [0.0; LANES] }
    }

    /// Weight `i` of the chunk.
    pub fn weight(&self, i: usize) -> f32 {
        self.a[i / 4] * self.q[i] as f32 + self.b[i / 4]
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

/// Chunk `c` of the row `row` (of `cols` weights), decoded; a chunk past the last block of
/// a 32-weight format holds zeros.
pub fn decode_chunk(block_type: BlockType, row: &[u8], cols: usize, c: usize) -> Chunk {
    let mut chunk = Chunk::zeroed();
    match block_type {
        BlockType::Q8_0 | BlockType::Q4_0 => {
            for half in 0..2 {
                let block = 2 * c + half;
                if block * 32 >= cols {
                    break;
                }
                let at = block * block_type.block_bytes();
                let d = half_at(row, at);
                let codes = &mut chunk.q[32 * half..32 * half + 32];
                let offset = if block_type == BlockType::Q8_0 {
                    for (q, &byte) in codes.iter_mut().zip(&row[at + 2..at + 34]) {
                        *q = byte ^ 0x80;
                    }
                    -128.0 * d
                } else {
                    for (i, &byte) in row[at + 2..at + 18].iter().enumerate() {
                        codes[i] = byte & 0x0f;
                        codes[i + 16] = byte >> 4;
                    }
                    -8.0 * d
                };
                chunk.a[8 * half..8 * half + 8].fill(d);
                chunk.b[8 * half..8 * half + 8].fill(offset);
            }
        }
        BlockType::Q4K | BlockType::Q5K => {
            let (block, part) = (c / 4, c % 4);
            let at = block * block_type.block_bytes();
            let block_bytes = &row[at..at + block_type.block_bytes()];
            let (d, dmin) = (half_at(block_bytes, 0), half_at(block_bytes, 2));
            let packed = &block_bytes[4..16];
            let (high, codes) = if block_type == BlockType::Q5K {
                (Some(&block_bytes[16..48]), &block_bytes[48 + 32 * part..80 + 32 * part])
            } else {
                (None, &block_bytes[16 + 32 * part..48 + 32 * part])
            };
            for (i, &byte) in codes.iter().enumerate() {
                let (mut low, mut up) = (byte & 0x0f, byte >> 4);
                if let Some(high) = high {
                    low |= ((high[i] >> (2 * part)) & 1) << 4;
                    up |= ((high[i] >> (2 * part + 1)) & 1) << 4;
                }
                chunk.q[i] = low;
                chunk.q[i + 32] = up;
            }
            for half in 0..2 {
                let (scale, min) = scale_min_k4(2 * part + half, packed);
                chunk.a[8 * half..8 * half + 8].fill(d * scale as f32);
                chunk.b[8 * half..8 * half + 8].fill(-dmin * min as f32);
            }
        }
        BlockType::Q6K => {
            let (block, part) = (c / 4, c % 4);
            let at = block * block_type.block_bytes();
            let block_bytes = &row[at..at + block_type.block_bytes()];
            let (n, upper) = (part / 2, part % 2 == 1);
            let low = &block_bytes[64 * n..64 * n + 64];
            let high = &block_bytes[128 + 32 * n..160 + 32 * n];
            for l in 0..32 {
                let shift = if upper { 4 } else { 0 };
                let first = (low[l] >> shift) & 0x0f;
                let second = (low[l + 32] >> shift) & 0x0f;
                chunk.q[l] = first | (((high[l] >> shift) & 3) << 4);
                chunk.q[l + 32] = second | (((high[l] >> (shift + 2)) & 3) << 4);
            }
            let d = half_at(block_bytes, 208);
            for group in 0..4 {
                let scale = d * block_bytes[192 + 4 * part + group] as i8 as f32;
                chunk.a[4 * group..4 * group + 4].fill(scale);
                chunk.b[4 * group..4 * group + 4].fill(-32.0 * scale);
            }
        }
    }
    chunk
}

/// Chunks in a row of `cols` weights.
pub fn chunks(cols: usize) -> usize {
    cols.div_ceil(CHUNK)
}

/// Row `row` of `matrix` decoded to f32 (`out` has `cols` values).
pub fn dequantize_row(matrix: &BlockMatrix, row: usize, out: &mut [f32]) {
    let row_bytes = matrix.block_type.row_bytes(matrix.cols);
    let bytes = &matrix.data()[row * row_bytes..(row + 1) * row_bytes];
    for c in 0..chunks(matrix.cols) {
        let chunk = decode_chunk(matrix.block_type, bytes, matrix.cols, c);
        for (i, value) in out[c * CHUNK..].iter_mut().take(CHUNK).enumerate() {
            *value = chunk.weight(i);
        }
    }
}
