//! The matrix-vector kernels at Llama-3.2-1B's shapes (8192x2048 for the MLP, 2048x2048 for
//! attention), f32 and bf16 weights, one input row as in decoding: criterion reports the weight
//! bytes read per second. "memory" cycles through copies of the matrix totalling
//! `KERNEL_BENCH_MIB` MiB (default 512) so every read comes from RAM; "cache" reads one
//! matrix over and over. Each runs on one thread and on rayon's default pool.
//!
//! "blocks" times the GGUF block kernels on a prompt's worth of input rows (`KERNEL_BENCH_ROWS`,
//! default 128) at the MLP's shapes (8192x2048 and 2048x8192), one thread, with weights that
//! candle quantized from pseudo-random values: criterion reports multiply-adds per second.
//! "rows" times bf16 weights at the same shapes against `KERNEL_BENCH_ROWS` input rows too
//! (16, say: a decode step of 16 requests batched), one thread, with the instruction set the
//! dispatch picks and, where the CPU has them, AVX-512 BF16 dot products and plain AVX-512 FMAs
//! beside it.
//!
//! "affine" times MLX's 4- and 8-bit weights (groups of 64, bf16 scales and biases) at the
//! MLP's shapes against `KERNEL_BENCH_ROWS` input rows (1 for decoding), one thread, with
//! every instruction set the CPU has: it measures the AVX2 kernels on an AVX-512 machine too.
//!
//! "split" times fine-tuning's f32 products with frozen weights (`x·Wᵀ` and the input's
//! gradient `g·W`) at the MLP's shapes against `KERNEL_BENCH_ROWS` rows, one thread: AMX's
//! split-bf16 kernel where the CPU has it (for f32 weights and for bf16 ones), beside candle's
//! f32 matmul.
//!
//! `cargo bench --bench kernels` (add `-- --quick` for a short run, a filter such as `blocks`
//! for one group).

use std::hint::black_box;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::Module;
use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use xotorch_core::engine::kernels::{
    linear, linear_affine_with, linear_blocks_with, linear_with, split_product, AffineMatrix, BlockMatrix,
    BlockType, Isa, Orientation, SplitMatrix, WeightDType, WeightMatrix,
};

/// Llama-3.2-1B's MLP (up/gate) and attention (q/o) weights, `[rows, cols]`.
const SHAPES: [(usize, usize); 2] = [(8192, 2048), (2048, 2048)];

/// MiB of matrices the "memory" case cycles through, from `KERNEL_BENCH_MIB`.
fn memory_mib() -> usize {
    std::env::var("KERNEL_BENCH_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(512)
}

/// `count` distinct `[rows, cols]` matrices of `dtype` with small pseudo-random values.
fn matrices(rows: usize, cols: usize, dtype: WeightDType, count: usize) -> Vec<WeightMatrix> {
    let len = rows * cols * dtype.size();
    (0..count)
        .map(|copy| {
            let mut state = 0x9e37_79b9_u32 ^ copy as u32;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 17;
                    state ^= state << 5;
                    // Small normal numbers in every dtype: the top byte of each element is
                    // 0x38..=0x3b (a denormal would cost each FMA a microcode assist).
                    0x38 | (state >> 24) as u8 & 0x03
                })
                .collect();
            WeightMatrix::new(Arc::new(bytes), 0..len, rows, cols, dtype).expect("sizes agree")
        })
        .collect()
}

fn matrix_vector(c: &mut Criterion) {
    let one_thread = rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("a thread pool");
    let all_threads = rayon::ThreadPoolBuilder::new().build().expect("a thread pool");
    for dtype in [WeightDType::F32, WeightDType::BF16] {
        let mut group = c.benchmark_group(format!("matvec_{dtype:?}").to_lowercase());
        for (rows, cols) in SHAPES {
            let bytes = rows * cols * dtype.size();
            let copies = (memory_mib() << 20).div_ceil(bytes).max(1);
            let x: Vec<f32> = (0..cols).map(|i| (i % 7) as f32 * 0.125 - 0.375).collect();
            let mut out = vec![0.0f32; rows];
            group.throughput(Throughput::Bytes(bytes as u64));
            for (place, set) in
                [("memory", matrices(rows, cols, dtype, copies)), ("cache", matrices(rows, cols, dtype, 1))]
            {
                for (threads, pool) in [("1", &one_thread), ("all", &all_threads)] {
                    let id = BenchmarkId::new(format!("{place}/threads_{threads}"), format!("{rows}x{cols}"));
                    let mut next = 0;
                    group.bench_function(id, |b| {
                        b.iter(|| {
                            let w = &set[next % set.len()];
                            next += 1;
                            pool.install(|| linear(black_box(&x), w, None, &mut out)).expect("shapes agree");
                            black_box(&out);
                        })
                    });
                }
            }
        }
        group.finish();
    }
}

/// Input rows of the block products, from `KERNEL_BENCH_ROWS`.
fn block_rows() -> usize {
    std::env::var("KERNEL_BENCH_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(128)
}

/// A `[rows, cols]` tensor of `ggml` blocks quantized from small pseudo-random values.
fn block_qtensor(rows: usize, cols: usize, ggml: GgmlDType) -> QTensor {
    let values: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919 % 1021) as f32 - 510.0) / 4096.0).collect();
    let tensor = Tensor::from_vec(values, (rows, cols), &Device::Cpu).expect("a tensor");
    QTensor::quantize(&tensor, ggml).expect("quantized")
}

/// [`block_qtensor`]'s blocks as the host kernels read them.
fn block_matrix(rows: usize, cols: usize, block_type: BlockType, ggml: GgmlDType) -> BlockMatrix {
    let bytes = block_qtensor(rows, cols, ggml).data().expect("bytes").into_owned();
    let len = bytes.len();
    BlockMatrix::new(Arc::new(bytes), 0..len, rows, cols, block_type).expect("sizes agree")
}

fn block_products(c: &mut Criterion) {
    let one_thread = rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("a thread pool");
    let m = block_rows();
    let types = [
        (BlockType::Q4K, GgmlDType::Q4K),
        (BlockType::Q6K, GgmlDType::Q6K),
        (BlockType::Q8_0, GgmlDType::Q8_0),
    ];
    let mut group = c.benchmark_group("blocks");
    for (block_type, ggml) in types {
        // The MLP's up/gate and down products.
        for (rows, cols) in [(8192, 2048), (2048, 8192)] {
            let w = block_matrix(rows, cols, block_type, ggml);
            let x: Vec<f32> = (0..m * cols).map(|i| (i % 13) as f32 * 0.1 - 0.6).collect();
            let mut out = vec![0.0f32; m * rows];
            group.throughput(Throughput::Elements((m * rows * cols) as u64));
            let mut isas = vec![Isa::detect()];
            isas.extend([Isa::Avx512].into_iter().filter(|isa| isa.available() && *isa != Isa::detect()));
            // candle's own quantized product (AVX2 where the CPU has it), which serves GGUF
            // blocks on CPUs without AVX-512 VNNI; set RAYON_NUM_THREADS=1 to compare per thread.
            let qmatmul = QMatMul::from_qtensor(block_qtensor(rows, cols, ggml)).expect("a product");
            let input = Tensor::from_vec(x.clone(), (m, cols), &Device::Cpu).expect("a tensor");
            let id = BenchmarkId::new(format!("{block_type:?}/candle/rows_{m}"), format!("{rows}x{cols}"));
            group.bench_function(id, |b| {
                b.iter(|| black_box(qmatmul.forward(black_box(&input)).expect("a product")))
            });
            for isa in isas {
                let id =
                    BenchmarkId::new(format!("{block_type:?}/{isa:?}/rows_{m}"), format!("{rows}x{cols}"));
                group.bench_function(id, |b| {
                    b.iter(|| {
                        one_thread
                            .install(|| linear_blocks_with(isa, black_box(&x), &w, None, &mut out))
                            .expect("shapes agree");
                        black_box(&out);
                    })
                });
            }
        }
    }
    group.finish();
}

fn row_products(c: &mut Criterion) {
    let one_thread = rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("a thread pool");
    let m = block_rows();
    let mut group = c.benchmark_group("rows");
    for (rows, cols) in [(8192, 2048), (2048, 8192)] {
        let w = matrices(rows, cols, WeightDType::BF16, 1).remove(0);
        let x: Vec<f32> = (0..m * cols).map(|i| (i % 13) as f32 * 0.1 - 0.6).collect();
        let mut out = vec![0.0f32; m * rows];
        group.throughput(Throughput::Elements((m * rows * cols) as u64));
        let mut isas = vec![Isa::detect()];
        isas.extend(
            [Isa::Avx512Bf16, Isa::Avx512].into_iter().filter(|isa| isa.available() && *isa != Isa::detect()),
        );
        for isa in isas {
            let id = BenchmarkId::new(format!("bf16/{isa:?}/rows_{m}"), format!("{rows}x{cols}"));
            group.bench_function(id, |b| {
                b.iter(|| {
                    one_thread
                        .install(|| linear_with(isa, black_box(&x), &w, None, &mut out))
                        .expect("shapes agree");
                    black_box(&out);
                })
            });
        }
    }
    group.finish();
}

/// A `[rows, cols]` MLX-quantized matrix of `bits` in groups of 64: pseudo-random codes and
/// small bf16 scales and biases.
fn affine_matrix(rows: usize, cols: usize, bits: usize) -> AffineMatrix {
    let code_bytes = rows * cols * bits / 8;
    let codes: Vec<u8> = (0..code_bytes).map(|i| (i * 7919 % 251) as u8).collect();
    let groups = cols / 64;
    let parameters = |offset: usize| {
        let bytes: Vec<u8> = (0..rows * groups)
            .flat_map(|i| half::bf16::from_f32(((i + offset) % 17) as f32 / 4096.0).to_le_bytes())
            .collect();
        let len = bytes.len();
        WeightMatrix::new(Arc::new(bytes), 0..len, rows, groups, WeightDType::BF16).expect("sizes agree")
    };
    AffineMatrix::new(Arc::new(codes), 0..code_bytes, parameters(0), parameters(5), cols, bits)
        .expect("sizes agree")
}

fn affine_products(c: &mut Criterion) {
    let one_thread = rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("a thread pool");
    let m = block_rows();
    let mut group = c.benchmark_group("affine");
    for bits in [4, 8] {
        for (rows, cols) in [(8192, 2048), (2048, 8192)] {
            let w = affine_matrix(rows, cols, bits);
            let x: Vec<f32> = (0..m * cols).map(|i| (i % 13) as f32 * 0.1 - 0.6).collect();
            let mut out = vec![0.0f32; m * rows];
            group.throughput(Throughput::Elements((m * rows * cols) as u64));
            let isas = [Isa::detect(), Isa::Avx512, Isa::Avx2, Isa::Portable];
            for (i, isa) in isas.into_iter().enumerate() {
                if !isa.available() || isas[..i].contains(&isa) {
                    continue;
                }
                let id = BenchmarkId::new(format!("{bits}bit/{isa:?}/rows_{m}"), format!("{rows}x{cols}"));
                group.bench_function(id, |b| {
                    b.iter(|| {
                        one_thread
                            .install(|| linear_affine_with(isa, black_box(&x), &w, None, &mut out))
                            .expect("shapes agree");
                        black_box(&out);
                    })
                });
            }
        }
    }
    group.finish();
}

fn split_products(c: &mut Criterion) {
    let one_thread = rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("a thread pool");
    let m = block_rows();
    let mut group = c.benchmark_group("split");
    for (rows, cols) in [(8192, 2048), (2048, 8192)] {
        let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 7) % 23) as f32 * 0.01 - 0.11).collect();
        let weight = Tensor::from_slice(&w, (rows, cols), &Device::Cpu).expect("a tensor");
        // f32 values take three bf16 passes, bf16 values (a bf16 checkpoint's) two.
        let bf16_values: Vec<f32> = w.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
        let splits = [
            ("f32", SplitMatrix::new(&w, (rows, cols))),
            ("bf16", SplitMatrix::new(&bf16_values, (rows, cols))),
        ];
        group.throughput(Throughput::Elements((m * rows * cols) as u64));
        for orientation in [Orientation::Transposed, Orientation::AsStored] {
            let (inner, outer) = orientation.widths((rows, cols));
            let x: Vec<f32> = (0..m * inner).map(|i| (i % 13) as f32 * 0.1 - 0.6).collect();
            let input = Tensor::from_slice(&x, (m, inner), &Device::Cpu).expect("a tensor");
            let mut out = vec![0.0f32; m * outer];
            for (values, split) in &splits {
                let Some(split) = split else { continue };
                let id = BenchmarkId::new(
                    format!("{orientation:?}/amx-{values}/rows_{m}"),
                    format!("{rows}x{cols}"),
                );
                group.bench_function(id, |b| {
                    b.iter(|| {
                        let done =
                            one_thread.install(|| split_product(black_box(&x), split, orientation, &mut out));
                        assert!(done, "the shapes fit");
                    })
                });
            }
            let id = BenchmarkId::new(format!("{orientation:?}/candle/rows_{m}"), format!("{rows}x{cols}"));
            group.bench_function(id, |b| {
                b.iter(|| {
                    let product = one_thread.install(|| match orientation {
                        Orientation::Transposed => input.matmul(&weight.t().expect("2-D")),
                        Orientation::AsStored => input.matmul(&weight),
                    });
                    black_box(product.expect("shapes agree"));
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, matrix_vector, block_products, row_products, affine_products, split_products);
criterion_main!(benches);
