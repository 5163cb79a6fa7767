//! `C = A B` in f32 for the large products of training and prefill (the linear layers forward
//! and backward, the fused LoRA op, the LM head; attention's batched products in
//! [`super::bmm`]), with both cores busy for the whole product.
//!
//! The arithmetic is the `gemm` crate's (the kernel candle's own matmul uses: packed panels,
//! a register-blocked micro-kernel). Its AVX-512 kernels are compiled in (the crate's `x86-v4`
//! feature, chosen at run time when the CPU has AVX-512F; AVX2+FMA otherwise): ~115 GFLOP per
//! CPU-second on a Zen 4 core, against ~85 for the AVX2 kernel; ~215 on one core of an Intel
//! Xeon (family 6 model 167) whose AVX-512 FMA peak is ~246 (`examples/kernel_rates.rs`). What
//! differs is the threading. candle hands each product to `gemm` with rayon parallelism: a static
//! split of the work between rayon's threads, while candle's elementwise ops run on a second
//! pool (its barrier pool) whose worker spins for a while after every op. On two cores the
//! spinning worker and the two rayon threads take turns, the static split waits for the thread
//! that lost its core, and a LoRA step keeps ~1.3 cores busy. Here the output is cut into tiles
//! (whole column strips first, then row chunks), each tile is one single-threaded `gemm` call,
//! and the tiles are claimed one by one from an atomic counter by the threads of candle's barrier
//! pool, the same two threads that run the elementwise ops: no second pool. There is one tile
//! per thread (`TILES_PER_THREAD` says what finer tiles cost).
//!
//! `A` and `B` are read through arbitrary strides, so `x W^T` and `g W` read `W` where it lies
//! (no transposed or contiguous copy). The tiling depends only on the shape and the thread
//! count, and each tile's sum order only on its shape, so a product is bit-identical from run to
//! run at a given thread count.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Below this many multiply-adds a product runs on the calling thread.
const PARALLEL_MIN: usize = 1 << 22;
/// Narrowest column tile when splitting `n` (keeps each call's packed `B` panels useful).
const MIN_TILE_COLS: usize = 128;
/// Fewest rows of a row chunk when splitting `m`.
const MIN_TILE_ROWS: usize = 64;
/// Tiles per thread. One: each thread's share is one call of the kernel, packing its panels
/// once. Four tiles per thread (claimed dynamically, so that a thread which lost its core for a
/// while takes fewer) cost each product 8-15 % of its rate on an idle 2-core AVX-512 machine
/// (`examples/kernel_rates.rs`: ~360-390 GFLOP/s against ~380-410; a prefill of 8 x 128
/// tokens 925 ms against 875, a LoRA step 410 tokens/s against 440), more than they saved.
/// The tile shapes steer the crate's blocking, so some products' sums differ in their last bits
/// between the two tilings (the quick experiment's SFT run parts from its 17th step).
const TILES_PER_THREAD: usize = 1;

/// A strided read-only matrix: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a> {
    /// The elements.
    pub data: &'a [f32],
    /// Row stride.
    pub rs: usize,
    /// Column stride.
    pub cs: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major `[rows, cols]` matrix.
    pub fn row_major(data: &'a [f32], cols: usize) -> Self {
        Self {
            data,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose of a row-major `[rows, cols]` matrix, as a `[cols, rows]` matrix.
    pub fn transposed(data: &'a [f32], cols: usize) -> Self {
        Self {
            data,
            rs: 1,
            cs: cols,
        }
    }

    /// Whether every element of an `[rows, cols]` view lies inside `data`.
    fn covers(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || (rows - 1) * self.rs + (cols - 1) * self.cs < self.data.len()
    }
}

/// Errors of [`gemm()`]: shapes that do not fit the buffers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("gemm: {0}")]
pub struct GemmError(String);

/// The output tiling of an `[m, n]` product on `threads` threads: `(n_tiles, cols per tile,
/// m_chunks, rows per chunk)`.
fn tiling(m: usize, n: usize, k: usize, threads: usize) -> (usize, usize, usize, usize) {
    let want = if m.saturating_mul(n).saturating_mul(k) >= PARALLEL_MIN && threads > 1 {
        TILES_PER_THREAD * threads
    } else {
        1
    };
    let n_tiles = (n / MIN_TILE_COLS).clamp(1, want);
    // column tiles in whole 16-column strips (the micro-kernel's width)
    let cols = (n.div_ceil(n_tiles).div_ceil(16) * 16).min(n);
    let n_tiles = n.div_ceil(cols);
    let m_chunks = want.div_ceil(n_tiles).min(m / MIN_TILE_ROWS).max(1);
    let rows = m.div_ceil(m_chunks);
    (n_tiles, cols, m.div_ceil(rows), rows)
}

/// `c = a b` for `a: [m, k]`, `b: [k, n]`, `c: [m, n]` row-major (overwritten).
pub fn gemm(
    m: usize,
    n: usize,
    k: usize,
    a: MatRef,
    b: MatRef,
    c: &mut [f32],
) -> Result<(), GemmError> {
    gemm_with(m, n, k, a, b, c, Write::Overwrite)
}

/// How [`gemm_with`] writes its product `a b` into `c`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Write {
    /// `c = a b`.
    Overwrite,
    /// `c = s · a b`.
    Scaled(f32),
    /// `c += s · a b`.
    Accumulate(f32),
}

/// `c = a b`, `c = s a b` or `c += s a b` (see [`Write`]), shapes as in [`gemm()`]. The scale is
/// applied inside the kernel (no extra pass over `c`).
pub fn gemm_with(
    m: usize,
    n: usize,
    k: usize,
    a: MatRef,
    b: MatRef,
    c: &mut [f32],
    write: Write,
) -> Result<(), GemmError> {
    if !a.covers(m, k) || !b.covers(k, n) || c.len() < m * n {
        return Err(GemmError(format!(
            "[{m}, {k}] x [{k}, {n}] does not fit buffers of {}, {} and {} elements",
            a.data.len(),
            b.data.len(),
            c.len()
        )));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !matches!(write, Write::Accumulate(_)) {
            c[..m * n].iter_mut().for_each(|v| *v = 0.0);
        }
        return Ok(());
    }
    // SAFETY: `covers` checked every element of `a`, `b` and `c`.
    unsafe { tiled(m, n, k, a, b, c.as_mut_ptr(), write) };
    Ok(())
}

/// `s · a b` (shapes as in [`gemm()`]) in a new vector, written once by the kernel: no zeroing
/// pass over the output first.
pub fn product(
    m: usize,
    n: usize,
    k: usize,
    a: MatRef,
    b: MatRef,
    scale: f32,
) -> Result<Vec<f32>, GemmError> {
    if !a.covers(m, k) || !b.covers(k, n) {
        return Err(GemmError(format!(
            "[{m}, {k}] x [{k}, {n}] does not fit buffers of {} and {} elements",
            a.data.len(),
            b.data.len(),
        )));
    }
    if m == 0 || n == 0 || k == 0 {
        return Ok(vec![0f32; m * n]);
    }
    let mut c = uninit(m * n);
    // SAFETY: `covers` checked `a` and `b`; `c` holds `m n` elements, and the tiles, which
    // cover it, overwrite every one of them (k > 0) before it is read.
    unsafe {
        tiled(m, n, k, a, b, c.as_mut_ptr().cast(), Write::Scaled(scale));
        Ok(assume_init(c))
    }
}

/// A vector of `len` uninitialised elements, for outputs that a kernel overwrites.
pub(crate) fn uninit(len: usize) -> Vec<std::mem::MaybeUninit<f32>> {
    let mut v = Vec::with_capacity(len);
    // SAFETY: `MaybeUninit` needs no initialisation.
    unsafe { v.set_len(len) };
    huge_pages(&mut v);
    v
}

/// Asks the kernel to back a large new buffer (16 MiB and up: the LM head's logits) with 2 MiB
/// pages, before anything touches it. Each first touch of a fresh 4 KiB page traps into the
/// kernel, which zeroes it: the 201 MB of logits of an 8 x 128 prefill took ~49,000 such traps,
/// inside the product's tiles, and the LM head ran at ~175-260 GFLOP/s against ~340 with this
/// advice (`examples/prefill_profile.rs`). Linux only; elsewhere, and where the system declines
/// huge pages, nothing changes.
fn huge_pages(v: &mut [std::mem::MaybeUninit<f32>]) {
    #[cfg(not(target_os = "linux"))]
    let _ = v;
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let bytes = std::mem::size_of_val(v);
        if bytes < 8 * HUGE {
            return;
        }
        let start = v.as_mut_ptr() as usize;
        let (lo, hi) = (start.next_multiple_of(HUGE), (start + bytes) / HUGE * HUGE);
        if hi > lo {
            // SAFETY: advice only, on whole pages inside the vector's allocation.
            unsafe { libc::madvise(lo as *mut libc::c_void, hi - lo, libc::MADV_HUGEPAGE) };
        }
    }
}

/// The vector, once every element has been written.
///
/// # Safety
/// Every element of `v` is initialised.
pub(crate) unsafe fn assume_init(v: Vec<std::mem::MaybeUninit<f32>>) -> Vec<f32> {
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: same layout, length and capacity; the caller vouches for the elements.
    Vec::from_raw_parts(v.as_mut_ptr().cast(), v.len(), v.capacity())
}

/// The output tiles of one product, run on the barrier pool.
///
/// # Safety
/// `a` and `b` cover `[m, k]` and `[k, n]`; `c` points to `m n` writable elements that nothing
/// else touches during the call.
unsafe fn tiled(m: usize, n: usize, k: usize, a: MatRef, b: MatRef, c: *mut f32, write: Write) {
    let pool = candle_core::utils::barrier_pool();
    let threads = pool.n_workers() + 1;
    let (n_tiles, cols, m_chunks, rows) = tiling(m, n, k, threads);
    let tasks = n_tiles * m_chunks;
    let out = SyncPtr(c);
    let run = |t: usize| {
        let (i0, j0) = ((t / n_tiles) * rows, (t % n_tiles) * cols);
        let (mi, nj) = (rows.min(m - i0), cols.min(n - j0));
        // SAFETY: see the function's contract; tasks write disjoint tiles of `c`.
        unsafe {
            kernel(
                (mi, nj, k),
                a.data.as_ptr().add(i0 * a.rs),
                (a.rs, a.cs),
                b.data.as_ptr().add(j0 * b.cs),
                (b.rs, b.cs),
                out.get().add(i0 * n + j0),
                n,
                write,
            )
        }
    };
    run_parts(tasks, &run);
}

/// One single-threaded call of the `gemm` crate: `c (+)= s · a b` for `(m, n, k)`, with `a`, `b`
/// read through `(row, column)` strides and `c` row-major with row stride `ldc`.
///
/// # Safety
/// Every element the strides reach for `(m, n, k)` lies inside its buffer, and no other thread
/// touches the written part of `c` during the call.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn kernel(
    (m, n, k): (usize, usize, usize),
    a: *const f32,
    (a_rs, a_cs): (usize, usize),
    b: *const f32,
    (b_rs, b_cs): (usize, usize),
    c: *mut f32,
    ldc: usize,
    write: Write,
) {
    let (read_dst, scale) = match write {
        Write::Overwrite => (false, 1.0),
        Write::Scaled(s) => (false, s),
        Write::Accumulate(s) => (true, s),
    };
    gemm::gemm(
        m,
        n,
        k,
        c,
        1,
        ldc as isize,
        read_dst,
        a,
        a_cs as isize,
        a_rs as isize,
        b,
        b_cs as isize,
        b_rs as isize,
        1.0,
        scale,
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

/// Runs `f(0..parts)` on candle's barrier pool (the training path's one set of threads), each
/// part claimed once from a shared counter; returns when all are done. Runs inline with one
/// part, one thread, or when called from inside the pool.
pub fn run_parts(parts: usize, f: &(dyn Fn(usize) + Sync)) {
    let pool = candle_core::utils::barrier_pool();
    if parts <= 1 || pool.n_workers() == 0 {
        (0..parts).for_each(f);
        return;
    }
    let next = AtomicUsize::new(0);
    pool.execute(|_| loop {
        let t = next.fetch_add(1, Ordering::Relaxed);
        if t >= parts {
            break;
        }
        f(t);
    });
}

/// An output pointer shared by the parts of one parallel product.
pub(crate) struct SyncPtr(pub(crate) *mut f32);
// SAFETY: only used for disjoint writes by the tasks of one product.
unsafe impl Sync for SyncPtr {}

impl SyncPtr {
    /// The pointer (a method, so that closures capture the `Sync` wrapper, not the field).
    pub(crate) fn get(&self) -> *mut f32 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_util::values;

    /// Brute force in f64.
    fn reference(m: usize, n: usize, k: usize, a: MatRef, b: MatRef) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k)
                    .map(|p| {
                        a.data[i * a.rs + p * a.cs] as f64 * b.data[p * b.rs + j * b.cs] as f64
                    })
                    .sum();
            }
        }
        c
    }

    #[test]
    fn equals_brute_force_for_every_layout_and_edge() {
        // Odd sizes, tile edges, and two large enough to run in parallel tiles.
        for &(m, n, k) in &[
            (1, 1, 1),
            (13, 33, 7),
            (12, 32, 256),
            (97, 65, 257),
            (150, 600, 300),
            (5, 1100, 40),
            (300, 700, 600),
        ] {
            let av = values(m * k, 1);
            let bv = values(k * n, 2);
            for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
                let a = if ta {
                    MatRef::transposed(&av, m)
                } else {
                    MatRef::row_major(&av, k)
                };
                let b = if tb {
                    MatRef::transposed(&bv, k)
                } else {
                    MatRef::row_major(&bv, n)
                };
                let mut c = vec![f32::NAN; m * n];
                gemm(m, n, k, a, b, &mut c).unwrap();
                let want = reference(m, n, k, a, b);
                for (x, y) in c.iter().zip(&want) {
                    // |sum| <= k, f32 rounding over k terms
                    assert!(
                        (*x as f64 - y).abs() <= 1e-6 * k as f64,
                        "{m}x{n}x{k} {x} {y}"
                    );
                }
            }
        }
    }

    #[test]
    fn hand_computed_product() {
        // [[1, 2], [3, 4]] x [[5, 6], [7, 8]] = [[19, 22], [43, 50]]
        let a = [1f32, 2., 3., 4.];
        let b = [5f32, 6., 7., 8.];
        let mut c = [0f32; 4];
        gemm(
            2,
            2,
            2,
            MatRef::row_major(&a, 2),
            MatRef::row_major(&b, 2),
            &mut c,
        )
        .unwrap();
        assert_eq!(c, [19., 22., 43., 50.]);
        // the same with b read transposed: a b^T = [[17, 23], [39, 53]]
        gemm(
            2,
            2,
            2,
            MatRef::row_major(&a, 2),
            MatRef::transposed(&b, 2),
            &mut c,
        )
        .unwrap();
        assert_eq!(c, [17., 23., 39., 53.]);
    }

    /// `Scaled` and `Accumulate` against the plain product, and `product` (no zeroing pass)
    /// against `gemm`, bit for bit (the same kernel calls on the same tiles).
    #[test]
    fn scaled_accumulated_and_fresh_products() {
        let (m, n, k) = (150, 600, 300);
        let (av, bv) = (values(m * k, 5), values(k * n, 6));
        let (a, b) = (MatRef::row_major(&av, k), MatRef::transposed(&bv, k));
        let mut plain = vec![0f32; m * n];
        gemm(m, n, k, a, b, &mut plain).unwrap();
        let fresh = product(m, n, k, a, b, 1.0).unwrap();
        assert!(fresh
            .iter()
            .zip(&plain)
            .all(|(x, y)| x.to_bits() == y.to_bits()));
        let mut scaled = vec![f32::NAN; m * n];
        gemm_with(m, n, k, a, b, &mut scaled, Write::Scaled(0.5)).unwrap();
        let mut acc = vec![1f32; m * n];
        gemm_with(m, n, k, a, b, &mut acc, Write::Accumulate(-2.0)).unwrap();
        for i in 0..m * n {
            assert!((scaled[i] - 0.5 * plain[i]).abs() <= 1e-6 * plain[i].abs().max(1.0));
            assert!((acc[i] - (1.0 - 2.0 * plain[i])).abs() <= 1e-5 * plain[i].abs().max(1.0));
        }
        // k = 0: an empty sum
        assert_eq!(product(2, 3, 0, a, b, 1.0).unwrap(), vec![0.0; 6]);
        let mut keep = vec![3f32; 6];
        gemm_with(2, 3, 0, a, b, &mut keep, Write::Accumulate(1.0)).unwrap();
        assert_eq!(keep, vec![3.0; 6]);
    }

    #[test]
    fn tiles_cover_the_output_once() {
        // LM head forward on 2 threads: 2 column tiles of 24576, one row chunk.
        assert_eq!(tiling(512, 49152, 576, 2), (2, 24576, 1, 512));
        // k_proj forward (n = 192): one column tile, two row chunks of 512.
        assert_eq!(tiling(1024, 192, 576, 2), (1, 192, 2, 512));
        // gate_proj forward: two column tiles of 768
        assert_eq!(tiling(1024, 1536, 576, 2), (2, 768, 1, 1024));
        // small products stay whole
        assert_eq!(tiling(8, 8, 8, 2), (1, 8, 1, 8));
        for (m, n, k) in [(1000, 577, 300), (64, 4000, 64), (5, 1100, 40000)] {
            let (nt, cols, mc, rows) = tiling(m, n, k, 2);
            assert!(nt * cols >= n && (nt - 1) * cols < n, "{m} {n}");
            assert!(mc * rows >= m && (mc - 1) * rows < m, "{m} {n}");
        }
    }

    #[test]
    fn short_buffers_are_an_error() {
        let a = [1f32; 3];
        let mut c = [0f32; 4];
        let r = gemm(
            2,
            2,
            2,
            MatRef::row_major(&a, 2),
            MatRef::row_major(&a, 2),
            &mut c,
        );
        assert!(r.is_err());
    }

    #[test]
    fn repeated_runs_are_bit_identical() {
        let (m, n, k) = (300, 700, 600);
        let (av, bv) = (values(m * k, 3), values(k * n, 4));
        let run = || {
            let mut c = vec![0f32; m * n];
            gemm(
                m,
                n,
                k,
                MatRef::row_major(&av, k),
                MatRef::transposed(&bv, k),
                &mut c,
            )
            .unwrap();
            c
        };
        let first = run();
        for _ in 0..3 {
            assert!(run()
                .iter()
                .zip(&first)
                .all(|(x, y)| x.to_bits() == y.to_bits()));
        }
    }
}
