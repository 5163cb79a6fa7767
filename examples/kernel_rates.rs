//! GFLOP/s of the matrix kernels on this machine (development aid): one core's FMA peak (AVX2,
//! and AVX-512 where the CPU has it), the few-row tiles (`model::tile`, batched decoding) at
//! 8-256 input rows, and the large-product path (`model::gemm`, prefill and training), on
//! SmolLM2's shapes. Threads follow `RAYON_NUM_THREADS`; run with `RAYON_NUM_THREADS=1` for
//! per-core rates, which are steadier on a shared machine.
use std::time::Instant;

use realign::model::gemm::{gemm, MatRef};

fn main() -> anyhow::Result<()> {
    println!("one core's FMA peak: {:.1} GFLOP/s", fma_peak());
    println!(
        "one core's AVX-512 FMA peak: {:.1} GFLOP/s",
        fma_peak_avx512()
    );
    // (output features, input features) of the gate/up, down, q/o and LM-head products.
    let shapes = [(1536usize, 576usize), (576, 1536), (576, 576), (49152, 576)];
    for (out, k) in shapes {
        let w = vec![0.25f32; out * k];
        let mut line = format!("tiles out {out} k {k}:");
        for m in [8usize, 16, 24, 32, 64, 256] {
            let x = vec![0.5f32; m * k];
            let mut y = vec![0f32; m * out];
            let secs = best(6, || {
                realign::model::tile::few_rows(&x, &w, m, k, out, &mut y)
            });
            line += &format!(" m{m} {:.1}", 2.0 * (m * out * k) as f64 / secs / 1e9);
        }
        println!("{line} GFLOP/s");
    }
    for (out, k) in &shapes[..3] {
        let (m, out, k) = (1024, *out, *k);
        let (a, w) = (vec![0.5f32; m * k], vec![0.25f32; out * k]);
        let mut c = vec![0f32; m * out];
        let mut result = Ok(());
        let secs = best(6, || {
            let (a, b) = (MatRef::row_major(&a, k), MatRef::transposed(&w, k));
            result = gemm(m, out, k, a, b, &mut c);
        });
        result?;
        let rate = 2.0 * (m * out * k) as f64 / secs / 1e9;
        println!("gemm {m} x {k} . ({out} x {k})^T: {rate:.1} GFLOP/s");
    }
    Ok(())
}

fn best(repeats: usize, mut f: impl FnMut()) -> f64 {
    (0..repeats)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// Twelve independent FMA chains of 8 lanes (AVX2): the core's arithmetic limit.
fn fma_peak() -> f64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA (checked above).
        return chain_rate(8, |iters| unsafe { chains(iters) });
    }
    f64::NAN
}

/// [`fma_peak`] with 512-bit registers (NaN without AVX-512F): whether the CPU has two 512-bit
/// FMA units or one (or splits each into two 256-bit halves).
fn fma_peak_avx512() -> f64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked above).
        return chain_rate(16, |iters| unsafe { chains512(iters) });
    }
    f64::NAN
}

/// GFLOP/s of `run(iters)`, twelve chains of `lanes`-wide FMAs per iteration.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn chain_rate(lanes: usize, run: impl FnOnce(usize) -> f32) -> f64 {
    let iters = 50_000_000;
    let t = Instant::now();
    let s = run(iters);
    let secs = t.elapsed().as_secs_f64();
    std::hint::black_box(s);
    (iters * 12 * lanes * 2) as f64 / secs / 1e9
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn chains512(iters: usize) -> f32 {
    use std::arch::x86_64::*;
    let mut a = [_mm512_set1_ps(0.0); 12];
    let (x, y) = (_mm512_set1_ps(1.0e-7), _mm512_set1_ps(0.999));
    for _ in 0..iters {
        for r in a.iter_mut() {
            *r = _mm512_fmadd_ps(*r, y, x);
        }
    }
    a.iter().map(|&r| _mm512_reduce_add_ps(r)).sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn chains(iters: usize) -> f32 {
    use std::arch::x86_64::*;
    let mut a = [_mm256_set1_ps(0.0); 12];
    let (x, y) = (_mm256_set1_ps(1.0e-7), _mm256_set1_ps(0.999));
    for _ in 0..iters {
        for r in a.iter_mut() {
            *r = _mm256_fmadd_ps(*r, y, x);
        }
    }
    let mut s = 0.0;
    for r in a {
        let mut o = [0f32; 8];
        _mm256_storeu_ps(o.as_mut_ptr(), r);
        s += o[0];
    }
    s
}
