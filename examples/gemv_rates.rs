//! Batch-1 decode's matrix-vector products against the machine's memory bandwidth
//! (development aid, not a test): how many GB/s two threads stream from memory, and how many GB/s
//! of weights `matmul::gemv_of` reads, f32 and bf16, over one decode step's products of
//! SmolLM2-135M (30 layers of q, k, v, o, gate, up, down, then the LM head); then one
//! 576 x 1536 matrix again and again (in cache) and the LM head alone.
use std::time::Instant;

use realign::model::matmul::{gemv_of, WeightRows};
use realign::model::parallel::Pool;

fn main() {
    let pool = Pool::global();
    // Streaming read: sum every u32 of 1 GiB, split over the pool in 256 KiB parts.
    let words = 1usize << 28;
    let buf: Vec<u32> = (0..words as u32)
        .map(|i| i.wrapping_mul(2_654_435_761))
        .collect();
    let part = 1 << 16;
    let parts = words / part;
    let sums: Vec<std::sync::atomic::AtomicU32> = (0..parts)
        .map(|_| std::sync::atomic::AtomicU32::new(0))
        .collect();
    for _ in 0..3 {
        let t = Instant::now();
        pool.run(parts, &|p| {
            let s = buf[p * part..(p + 1) * part]
                .iter()
                .fold(0u32, |a, &b| a.wrapping_add(b));
            sums[p].store(s, std::sync::atomic::Ordering::Relaxed);
        });
        let s = t.elapsed().as_secs_f64();
        println!(
            "stream read, {} threads: {:.1} GB/s",
            pool.threads(),
            (words * 4) as f64 / s / 1e9
        );
    }
    // One decode step's products: (out, k) per layer, 30 layers, then the head.
    let layer = [
        (576usize, 576usize),
        (192, 576),
        (192, 576),
        (576, 576),
        (1536, 576),
        (1536, 576),
        (576, 1536),
    ];
    let mut shapes: Vec<(usize, usize)> = (0..30).flat_map(|_| layer).collect();
    shapes.push((49_152, 576));
    let f32s: Vec<Vec<f32>> = shapes
        .iter()
        .enumerate()
        .map(|(i, &(o, k))| {
            (0..o * k)
                .map(|j| ((j * 31 + i * 7) % 1001) as f32 / 1001.0 - 0.5)
                .collect()
        })
        .collect();
    let bf16s: Vec<Vec<half::bf16>> = f32s
        .iter()
        .map(|w| w.iter().map(|&v| half::bf16::from_f32(v)).collect())
        .collect();
    let x: Vec<f32> = (0..1536).map(|i| (i % 13) as f32 / 13.0).collect();
    let macs: usize = shapes.iter().map(|&(o, k)| o * k).sum();
    for round in 0..3 {
        for (name, bytes) in [("f32", 4usize), ("bf16", 2)] {
            let t = Instant::now();
            let mut acc = 0f32;
            for (i, &(o, k)) in shapes.iter().enumerate() {
                let w = if bytes == 4 {
                    WeightRows::F32(&f32s[i])
                } else {
                    WeightRows::Bf16(&bf16s[i])
                };
                acc += gemv_of(&x[..k], w, 1, k, o)[0];
            }
            let s = t.elapsed().as_secs_f64();
            println!(
                "round {round} {name}: step {:.2} ms = {:.1} steps/s, {:.1} GB/s of weights, {:.1} GFLOP/s ({acc:.1})",
                s * 1e3,
                1.0 / s,
                (macs * bytes) as f64 / s / 1e9,
                2.0 * macs as f64 / s / 1e9
            );
        }
    }
    // In cache: one 576 x 1536 matrix (1.7 MB as bf16) again and again, and the head alone.
    for (label, idx, reps) in [
        ("in-cache 576x1536", 6usize, 200usize),
        ("head 49152x576", shapes.len() - 1, 5),
    ] {
        let (o, k) = shapes[idx];
        for (name, bytes) in [("f32", 4usize), ("bf16", 2)] {
            let w = if bytes == 4 {
                WeightRows::F32(&f32s[idx])
            } else {
                WeightRows::Bf16(&bf16s[idx])
            };
            let mut acc = gemv_of(&x[..k], w, 1, k, o)[0];
            let t = Instant::now();
            for _ in 0..reps {
                acc += gemv_of(&x[..k], w, 1, k, o)[0];
            }
            let s = t.elapsed().as_secs_f64() / reps as f64;
            println!(
                "{label} {name}: {:.3} ms, {:.1} GB/s, {:.1} GFLOP/s ({acc:.1})",
                s * 1e3,
                (o * k * bytes) as f64 / s / 1e9,
                2.0 * (o * k) as f64 / s / 1e9
            );
        }
    }
}
