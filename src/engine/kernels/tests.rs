use std::sync::Arc;

use super::matrix::element;
use super::*;

fn encode(values: &[f32], dtype: WeightDType) -> Vec<u8> {
    match dtype {
        WeightDType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        WeightDType::BF16 => {
            values.iter().flat_map(|v| half::bf16::from_f32(*v).to_bits().to_le_bytes()).collect()
        }
        WeightDType::F16 => {
            values.iter().flat_map(|v| half::f16::from_f32(*v).to_bits().to_le_bytes()).collect()
        }
    }
}

fn pseudo_random(count: usize, seed: u32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(2_654_435_761) | 1;
    (0..count)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state >> 8) as f32 / (1 << 24) as f32 - 0.5
        })
        .collect()
}

#[test]
fn every_isa_and_dtype_matches_a_reference() {
    for isa in [Isa::Amx, Isa::Avx512Bf16, Isa::Avx512, Isa::Avx2, Isa::Portable]
        .into_iter()
        .filter(|i| i.available())
    {
        for dtype in [WeightDType::F32, WeightDType::BF16, WeightDType::F16] {
            for (m, n, k) in [
                (1, 7, 37),
                (3, 70, 64),
                (17, 65, 100),
                (130, 9, 48),
                (1, 130, 2048),
                (5, 11, 1100),
                (7, 70, 300),
                (13, 33, 600),
                (40, 64, 96),
                (16, 96, 2048),
            ] {
                let values = pseudo_random(n * k, (m * n * k) as u32);
                let bytes = encode(&values, dtype);
                // The reference uses the stored (rounded) weights.
                let stored: Vec<f64> = (0..n * k).map(|i| f64::from(element(&bytes, i, dtype))).collect();
                let len = bytes.len();
                let w = WeightMatrix::new(Arc::new(bytes), 0..len, n, k, dtype).unwrap();
                let x = pseudo_random(m * k, 99);
                let bias = pseudo_random(n, 7);
                for with_bias in [false, true] {
                    let mut out = vec![0.0; m * n];
                    linear_with(isa, &x, &w, with_bias.then_some(&bias[..]), &mut out).unwrap();
                    for r in 0..m {
                        for c in 0..n {
                            let mut expected: f64 =
                                (0..k).map(|i| stored[c * k + i] * f64::from(x[r * k + i])).sum();
                            if with_bias {
                                expected += f64::from(bias[c]);
                            }
                            let got = f64::from(out[r * n + c]);
                            // The BF16 dot-product and AMX paths round activations to bf16 (8 bits).
                            let rounded = matches!(isa, Isa::Avx512Bf16 | Isa::Amx)
                                && dtype == WeightDType::BF16
                                && m > 1;
                            let tolerance = (if rounded { 4e-3 } else { 1e-4 }) * (k as f64).sqrt();
                            assert!(
                                (got - expected).abs() < tolerance,
                                "{isa:?} {dtype:?} m{m} n{n} k{k}: {got} vs {expected}"
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn mismatched_sizes_are_errors() {
    let w = WeightMatrix::new(Arc::new(vec![0u8; 24]), 0..24, 2, 3, WeightDType::F32).unwrap();
    let mut out = vec![0.0; 2];
    assert!(linear(&[1.0; 4], &w, None, &mut out).is_err());
    assert!(linear(&[1.0; 3], &w, Some(&[0.0; 3]), &mut out).is_err());
    assert!(WeightMatrix::new(Arc::new(vec![0u8; 24]), 0..24, 2, 4, WeightDType::F32).is_err());
    assert!(WeightMatrix::new(Arc::new(vec![0u8; 24]), 8..32, 2, 3, WeightDType::F32).is_err());
}

/// Random blocks of `block_type` for a `[rows, cols]` matrix, with small finite f16 scales.
fn random_blocks(block_type: BlockType, rows: usize, cols: usize, seed: u32) -> Vec<u8> {
    let len = rows * block_type.row_bytes(cols);
    let noise = pseudo_random(len, seed);
    let mut bytes: Vec<u8> = noise.iter().map(|v| ((v + 0.5) * 255.0) as u8).collect();
    let scale_offsets: &[usize] = match block_type {
        BlockType::Q8_0 | BlockType::Q4_0 => &[0],
        BlockType::Q4K | BlockType::Q5K => &[0, 2],
        BlockType::Q6K => &[208],
    };
    for (b, block) in bytes.chunks_exact_mut(block_type.block_bytes()).enumerate() {
        for (i, &at) in scale_offsets.iter().enumerate() {
            let scale = half::f16::from_f32(0.002 + 0.001 * ((b * 7 + i * 3) % 11) as f32);
            block[at..at + 2].copy_from_slice(&scale.to_bits().to_le_bytes());
        }
    }
    bytes
}

const BLOCK_TYPES: [(BlockType, candle_core::quantized::GgmlDType); 5] = [
    (BlockType::Q8_0, candle_core::quantized::GgmlDType::Q8_0),
    (BlockType::Q4_0, candle_core::quantized::GgmlDType::Q4_0),
    (BlockType::Q4K, candle_core::quantized::GgmlDType::Q4K),
    (BlockType::Q5K, candle_core::quantized::GgmlDType::Q5K),
    (BlockType::Q6K, candle_core::quantized::GgmlDType::Q6K),
];

/// Our decoding of every block format equals candle's dequantization of the same bytes.
#[test]
fn block_decoding_matches_candle() {
    use candle_core::{quantized::ggml_file::qtensor_from_ggml, Device};
    for (block_type, ggml) in BLOCK_TYPES {
        let (rows, cols) = (3, 512);
        let bytes = random_blocks(block_type, rows, cols, 5);
        let reference = qtensor_from_ggml(ggml, &bytes, vec![rows, cols], &Device::Cpu)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let len = bytes.len();
        let matrix = BlockMatrix::new(Arc::new(bytes), 0..len, rows, cols, block_type).unwrap();
        let mut ours = vec![0f32; rows * cols];
        for (r, row) in ours.chunks_exact_mut(cols).enumerate() {
            dequantize_row(&matrix, r, row);
        }
        for (i, (a, b)) in ours.iter().zip(&reference).enumerate() {
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{block_type:?} weight {i}: {a} vs {b}");
        }
    }
}

/// The error bound of a product whose activations are rounded to codes of at most `code_max`
/// with one scale per `block` values: half a step of each block's largest magnitude per value.
fn rounding_bound(x: &[f32], w: &[f32], block: usize, code_max: f32) -> f32 {
    x.chunks(block)
        .zip(w.chunks(block))
        .map(|(xb, wb)| {
            let max = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            max / (2.0 * code_max) * wb.iter().map(|w| w.abs()).sum::<f32>()
        })
        .sum()
}

/// Every instruction set's block product is within the activation rounding's bound of the
/// f32 product with the decoded weights, and the paths that round alike agree with each
/// other. Many input rows of a K format take the 14-bit path on AVX-512 VNNI, held to its
/// own, tighter bound.
#[test]
fn block_products_match_the_decoded_weights() {
    for (block_type, _) in BLOCK_TYPES {
        let shapes: &[(usize, usize, usize)] = match block_type {
            BlockType::Q8_0 | BlockType::Q4_0 => {
                &[(1, 5, 96), (3, 17, 256), (11, 9, 2048), (1, 70, 64), (40, 64, 512), (24, 32, 2048)]
            }
            _ => &[
                (1, 5, 256),
                (3, 17, 512),
                (11, 9, 2048),
                (1, 70, 256),
                (37, 70, 2304),
                (16, 3, 256),
                (40, 64, 512),
                (24, 32, 2048),
            ],
        };
        for &(m, n, k) in shapes {
            let bytes = random_blocks(block_type, n, k, (m * n + k) as u32);
            let len = bytes.len();
            let matrix = BlockMatrix::new(Arc::new(bytes), 0..len, n, k, block_type).unwrap();
            let mut weights = vec![0f32; n * k];
            for (r, row) in weights.chunks_exact_mut(k).enumerate() {
                dequantize_row(&matrix, r, row);
            }
            let x: Vec<f32> = pseudo_random(m * k, 9).iter().map(|v| v * 4.0).collect();
            let bias: Vec<f32> = (0..n).map(|j| j as f32 / 8.0).collect();
            let mut outputs = Vec::new();
            for isa in [Isa::Amx, Isa::Avx512, Isa::Portable].into_iter().filter(|i| i.available()) {
                let amx = quantized::takes_amx(isa, m, n, k);
                let wide = !amx && quantized::takes_prompt_kernel(isa, block_type, m);
                let mut out = vec![0f32; m * n];
                linear_blocks_with(isa, &x, &matrix, Some(&bias), &mut out).unwrap();
                for i in 0..m {
                    for j in 0..n {
                        let (xs, ws) = (&x[i * k..(i + 1) * k], &weights[j * k..(j + 1) * k]);
                        let exact: f32 = xs.iter().zip(ws).map(|(a, b)| a * b).sum::<f32>() + bias[j];
                        let rounding = if amx {
                            // Weights and activations each rounded to bf16 (8 significant bits).
                            xs.iter().zip(ws).map(|(a, b)| (a * b).abs()).sum::<f32>() * 2f32.powi(-8)
                        } else if wide {
                            rounding_bound(xs, ws, 256, 8191.0)
                        } else {
                            rounding_bound(xs, ws, 32, 127.0)
                        };
                        let bound = rounding + 1e-4 * (1.0 + exact.abs());
                        let got = out[i * n + j];
                        assert!(
                            (got - exact).abs() <= bound,
                            "{block_type:?} {isa:?} amx {amx} wide {wide} ({m},{n},{k}) [{i},{j}]: {got} vs {exact} (bound {bound})"
                        );
                    }
                }
                if !wide && !amx {
                    outputs.push(out);
                }
            }
            for pair in outputs.windows(2) {
                for (a, b) in pair[0].iter().zip(&pair[1]) {
                    assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "paths differ: {a} vs {b}");
                }
            }
        }
    }
}

/// `codes` (each below `1 << bits`) packed as MLX packs them: a little-endian bit stream.
fn pack_codes(codes: &[u8], bits: usize) -> Vec<u8> {
    let mut packed = vec![0u8; codes.len() * bits / 8];
    for (i, &code) in codes.iter().enumerate() {
        for bit in 0..bits {
            let at = i * bits + bit;
            packed[at / 8] |= ((code >> bit) & 1) << (at % 8);
        }
    }
    packed
}

/// A random `[rows, cols]` MLX-quantized matrix of `bits` with groups of `group_size`, its
/// scales and biases in `dtype`, and its weights (`scale·q + bias` in f32).
fn random_affine(
    rows: usize,
    cols: usize,
    bits: usize,
    group_size: usize,
    dtype: WeightDType,
    seed: u32,
) -> (AffineMatrix, Vec<f32>) {
    let codes: Vec<u8> =
        pseudo_random(rows * cols, seed).iter().map(|v| ((v + 0.5) * (1 << bits) as f32) as u8).collect();
    let groups = rows * cols / group_size;
    let parameters = |values: Vec<f32>| {
        let bytes = encode(&values, dtype);
        let stored: Vec<f32> = (0..groups).map(|i| element(&bytes, i, dtype)).collect();
        let len = bytes.len();
        (WeightMatrix::new(Arc::new(bytes), 0..len, rows, cols / group_size, dtype).unwrap(), stored)
    };
    let (scales, scale_values) =
        parameters(pseudo_random(groups, seed + 1).iter().map(|v| v / 16.0).collect());
    let (biases, bias_values) = parameters(pseudo_random(groups, seed + 2).iter().map(|v| v / 4.0).collect());
    let weights = codes
        .iter()
        .enumerate()
        .map(|(i, &q)| scale_values[i / group_size] * q as f32 + bias_values[i / group_size])
        .collect();
    let packed = pack_codes(&codes, bits);
    let len = packed.len();
    (AffineMatrix::new(Arc::new(packed), 0..len, scales, biases, cols, bits).unwrap(), weights)
}

/// Every width's rows decode to exactly `scale·q + bias` of the packed codes.
#[test]
fn affine_decoding_reads_the_packed_codes() {
    for bits in AFFINE_BITS {
        for group_size in [32, 64, 128] {
            let (rows, cols) = (3, 256);
            let (matrix, weights) =
                random_affine(rows, cols, bits, group_size, WeightDType::BF16, bits as u32);
            for (r, expected) in weights.chunks_exact(cols).enumerate() {
                let mut row = vec![0f32; cols];
                dequantize_affine_row(&matrix, r, &mut row);
                assert_eq!(row, expected, "{bits} bits, groups of {group_size}, row {r}");
            }
        }
    }
}

/// Every width, group size, parameter dtype and instruction set gives products within the
/// activation rounding's bound of the f32 product with the decoded weights, rows ending
/// inside a span and a chunk included, and the paths agree with each other.
#[test]
fn affine_products_match_the_decoded_weights() {
    for bits in AFFINE_BITS {
        for group_size in [32, 64, 128] {
            for dtype in [WeightDType::BF16, WeightDType::F16, WeightDType::F32] {
                let shapes =
                    [(1, 5, 96usize), (3, 17, 384), (9, 9, 2048), (1, 70, 256), (2, 3, 640), (40, 64, 512)];
                for (m, n, k) in shapes {
                    if !k.is_multiple_of(group_size) {
                        continue;
                    }
                    let seed = (bits * 1000 + group_size + m * n + k) as u32;
                    let (matrix, weights) = random_affine(n, k, bits, group_size, dtype, seed);
                    let x: Vec<f32> = pseudo_random(m * k, 9).iter().map(|v| v * 4.0).collect();
                    let bias: Vec<f32> = (0..n).map(|j| j as f32 / 8.0).collect();
                    let mut outputs = Vec::new();
                    let isas = [Isa::Amx, Isa::Avx512, Isa::Avx2, Isa::Portable];
                    for isa in isas.into_iter().filter(|i| i.available()) {
                        let amx = quantized::takes_amx(isa, m, n, k);
                        let mut out = vec![0f32; m * n];
                        linear_affine_with(isa, &x, &matrix, Some(&bias), &mut out).unwrap();
                        for i in 0..m {
                            for j in 0..n {
                                let (xs, ws) = (&x[i * k..(i + 1) * k], &weights[j * k..(j + 1) * k]);
                                let exact: f32 = xs.iter().zip(ws).map(|(a, b)| a * b).sum::<f32>() + bias[j];
                                let rounding = if amx {
                                    // Weights and activations each rounded to bf16 (8 significant bits).
                                    xs.iter().zip(ws).map(|(a, b)| (a * b).abs()).sum::<f32>() * 2f32.powi(-8)
                                } else {
                                    rounding_bound(xs, ws, 32, 127.0)
                                };
                                let bound = rounding + 1e-4 * (1.0 + exact.abs());
                                let got = out[i * n + j];
                                assert!(
                                    (got - exact).abs() <= bound,
                                    "{bits}-bit g{group_size} {dtype:?} {isa:?} amx {amx} ({m},{n},{k}) [{i},{j}]: \
                                     {got} vs {exact} (bound {bound})"
                                );
                            }
                        }
                        if !amx {
                            outputs.push(out);
                        }
                    }
                    for pair in outputs.windows(2) {
                        for (a, b) in pair[0].iter().zip(&pair[1]) {
                            assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "paths differ: {a} vs {b}");
                        }
                    }
                }
            }
        }
    }
}

/// Sizes that do not fit an MLX matrix are errors naming what is wrong.
#[test]
fn mismatched_affine_sizes_are_errors() {
    let parameters = |rows, groups| {
        WeightMatrix::new(
            Arc::new(vec![0u8; rows * groups * 2]),
            0..rows * groups * 2,
            rows,
            groups,
            WeightDType::BF16,
        )
        .unwrap()
    };
    let codes = |len: usize| Arc::new(vec![0u8; len]);
    let error = |result: crate::error::Result<AffineMatrix>| result.unwrap_err().to_string();
    assert!(error(AffineMatrix::new(codes(256), 0..256, parameters(4, 2), parameters(4, 2), 128, 7))
        .contains("7 bits"));
    assert!(error(AffineMatrix::new(codes(255), 0..255, parameters(4, 2), parameters(4, 2), 128, 4))
        .contains("255 bytes"));
    assert!(error(AffineMatrix::new(codes(256), 0..256, parameters(4, 2), parameters(4, 1), 128, 4))
        .contains("biases"));
    assert!(error(AffineMatrix::new(codes(256), 0..256, parameters(4, 3), parameters(4, 3), 128, 4))
        .contains("groups"));
}

/// The products of split weights on AMX (three bf16 products each, two for bf16 weights) stay
/// within `Σ|x·w|·2⁻¹⁵` of the f64 product in both orientations, where one bf16 rounding of
/// each operand would not; a weight of bf16 values is held without `lo`. On a CPU without AMX,
/// or a shape that is not whole tiles, no split matrix is made.
#[test]
fn split_products_are_as_close_as_their_split_allows() {
    // (rows, n, k): more rows than one pair of tiles, more of W's rows than one chunk, and
    // column blocks of several tiles with a shorter last one.
    for (m, n, k) in [(8, 32, 32), (40, 64, 96), (64, 1056, 128), (17, 96, 64), (1, 32, 64), (24, 64, 320)] {
        let (x, g) = (pseudo_random(m * k, 3), pseudo_random(m * n, 7));
        let f32_weight = pseudo_random(n * k, 5);
        let bf16_weight: Vec<f32> = f32_weight.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
        for (w, bf16_values) in [(f32_weight, false), (bf16_weight, true)] {
            let Some(split) = SplitMatrix::new(&w, (n, k)) else {
                assert_ne!(Isa::detect(), Isa::Amx, "AMX declined {n}x{k}");
                continue;
            };
            assert_eq!(split.with_lo(), !bf16_values, "only values bf16 cannot hold need a lo part");
            for orientation in [Orientation::Transposed, Orientation::AsStored] {
                let (inner, outer) = orientation.widths((n, k));
                let input = if orientation == Orientation::Transposed { &x } else { &g };
                let weight = |i: usize, o: usize| match orientation {
                    Orientation::Transposed => w[o * k + i],
                    Orientation::AsStored => w[i * k + o],
                };
                let mut out = vec![f32::NAN; m * outer];
                assert!(split_product(input, &split, orientation, &mut out), "{m}x{n}x{k} {orientation:?}");
                let bf16 = |v: f32| f64::from(half::bf16::from_f32(v).to_f32());
                let (mut worst, mut worst_bf16) = (0f64, 0f64);
                for r in 0..m {
                    for o in 0..outer {
                        let terms =
                            (0..inner).map(|i| (f64::from(input[r * inner + i]), f64::from(weight(i, o))));
                        let exact: f64 = terms.clone().map(|(a, b)| a * b).sum();
                        let scale: f64 = terms.clone().map(|(a, b)| (a * b).abs()).sum();
                        let rounded: f64 = terms.map(|(a, b)| bf16(a as f32) * bf16(b as f32)).sum();
                        worst = worst.max((f64::from(out[r * outer + o]) - exact).abs() / scale);
                        worst_bf16 = worst_bf16.max((rounded - exact).abs() / scale);
                    }
                }
                let bound = 2f64.powi(-15);
                assert!(worst <= bound, "{m}x{n}x{k} {orientation:?}: off by {worst:.3e} of Σ|x·w|");
                assert!(
                    worst_bf16 > bound,
                    "the test cannot tell one bf16 rounding ({worst_bf16:.3e}) apart"
                );
            }
            let mut wrong = vec![0f32; m * n + 1];
            assert!(
                !split_product(&x, &split, Orientation::Transposed, &mut wrong),
                "an output that does not fit"
            );
        }
    }
    assert!(SplitMatrix::new(&pseudo_random(33 * 32, 2), (33, 32)).is_none(), "33 rows are not whole tiles");
}
