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
    for isa in [Isa::Avx512Bf16, Isa::Avx512, Isa::Avx2, Isa::Portable].into_iter().filter(|i| i.available())
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
                            // The BF16 dot-product path rounds activations to bf16 (8 bits).
                            let rounded = isa == Isa::Avx512Bf16 && dtype == WeightDType::BF16 && m > 1;
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
