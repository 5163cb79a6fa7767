//! Matrix-vector products for decoding (one to [`super::matmul::GEMV_MAX_ROWS`] input rows):
//! `y = x W^T` with each weight row read once, front to back, as a stream.
//!
//! Decoding one token reads every weight once, so these products run at the memory bandwidth
//! they reach, not at the FMA rate. On AVX2 + FMA the rows are read by the `stream` kernels:
//! a software prefetch 4 KiB ahead of the read, on top of the hardware prefetchers (its hint,
//! non-temporal on AMD and T0 on Intel, is [`super::prefetch`]'s measured choice), and a
//! bf16 row widened two elements per 32-bit word (a shift for the even element, a mask for the
//! odd one: no zero-extension of each element) against the input row stored de-interleaved
//! to match (`deinterleave`). Each pool part takes a block of ~128 K weights, and the
//! number of parts is a multiple of the pool's threads, so both cores stream to the end.
//! Measured with `examples/gemv_rates.rs` on the AVX2-only Zen 1 machine (one decode step's
//! 211 products of SmolLM2-135M, two threads; a plain two-thread streaming read reaches
//! 25.4-26.8 GB/s there), before → after: bf16 weights 15.3 → 23.8 GB/s (a step's products
//! 17.5 → 11.3 ms), f32 weights 23.9 → 25.1 GB/s (22.5 → 21.5 ms). The old kernels' limit was
//! the memory side, not the arithmetic: the same bf16 loop ran at 36 GB/s on a matrix in cache
//! and at 15 GB/s from memory, however the parts were sized (8 K to 256 K weights), and four
//! weight rows at a time (shared input loads, eight accumulator chains) was no faster: the
//! prefetch is what it lacked.
//!
//! With several input rows (a batch of sequences that has shrunk as its replies ended), one
//! pass over a weight row serves up to six of them, each with its own two accumulators, so a
//! row is loaded once for all of them: an f32 decode step of 4 rows 42 → 30 ms (before → after
//! this pass), of 2 rows 24 ms (one row: 24 ms).
//!
//! The sums are those of [`dot`] on each (input row, weight row), bit for bit, in every path
//! (the tests compare them with `assert_eq`): a stored bf16 or f16 weight gives exactly what its
//! f32 value gives, and a row's result does not depend on the block or thread that computed it.

use super::matmul::WeightRows;
use super::parallel::Pool;
use super::prefetch::{gemv_hint, Hint};

/// Weights per pool part: 512 KiB of f32 (256 KiB of bf16), long enough for the prefetchers to
/// run ahead, short enough that the parts balance.
const BLOCK: usize = 131_072;

/// Most input rows one pass over a weight row takes: two accumulators each, so six rows hold
/// 12 of AVX2's 16 vector registers, with the two weight vectors and one input vector beside
/// them (f32; a bf16 pass also holds the mask and the word it widens, so may spill one).
/// Chosen on f32 decode steps (see [`super::matmul::GEMV_MAX_ROWS`]).
const MAX_PASS: usize = 6;

/// `y[i][j] = sum_k x[i][k] * w[j][k]` for `x: [n, k]`, `w: [out, k]`, row-major; returns
/// `[n, out]`. Blocks of output rows are spread over [`Pool::global`].
pub fn gemv(x: &[f32], w: &[f32], n: usize, k: usize, out: usize) -> Vec<f32> {
    gemv_of(x, WeightRows::F32(w), n, k, out)
}

/// [`gemv`] for a weight in any storage dtype (bf16 widened in registers, f16 one row at a time
/// into L1; the same dot products, bit for bit, as on the f32 values).
pub fn gemv_of(x: &[f32], w: WeightRows, n: usize, k: usize, out: usize) -> Vec<f32> {
    let mut y = vec![0f32; n * out];
    if x.len() < n * k || w.len() < out * k {
        debug_assert!(false, "gemv: slices shorter than the shapes");
        return y;
    }
    let pool = Pool::global();
    let (rows, parts) = split(out, k, pool.threads());
    let fast = stream::available();
    let hint = gemv_hint();
    // The bf16 kernel reads the input rows de-interleaved, once per call.
    let xd = match w {
        WeightRows::Bf16(_) if fast => deinterleave(&x[..n * k], k),
        _ => Vec::new(),
    };
    let yp = SyncPtr(y.as_mut_ptr());
    pool.run(parts, &|p| {
        let y = &yp;
        let (j0, j1) = (p * rows, ((p + 1) * rows).min(out));
        PANEL.with(|cell| {
            let mut scratch = cell.borrow_mut();
            for j in j0..j1 {
                // An f16 row is widened into L1 right before its dots.
                let wide = match w {
                    WeightRows::F16(_) => w.panel(j, j + 1, k, &mut scratch),
                    _ => &[][..],
                };
                // Up to `MAX_PASS` input rows per pass over the weight row: the row is loaded once
                // and each input row keeps its own two accumulators.
                let mut i = 0;
                while i < n {
                    let c = (n - i).min(MAX_PASS);
                    let mut v = [0f32; MAX_PASS];
                    match c {
                        6 => v = dots::<6>(w, x, &xd, k, j, i, fast, wide, hint),
                        5 => {
                            v[..5].copy_from_slice(&dots::<5>(w, x, &xd, k, j, i, fast, wide, hint))
                        }
                        4 => {
                            v[..4].copy_from_slice(&dots::<4>(w, x, &xd, k, j, i, fast, wide, hint))
                        }
                        3 => {
                            v[..3].copy_from_slice(&dots::<3>(w, x, &xd, k, j, i, fast, wide, hint))
                        }
                        2 => {
                            v[..2].copy_from_slice(&dots::<2>(w, x, &xd, k, j, i, fast, wide, hint))
                        }
                        _ => {
                            v[..1].copy_from_slice(&dots::<1>(w, x, &xd, k, j, i, fast, wide, hint))
                        }
                    }
                    for (r, &v) in v[..c].iter().enumerate() {
                        // SAFETY: each (i, j) is written by exactly one part, and `y` outlives
                        // `run`.
                        unsafe { *y.0.add((i + r) * out + j) = v };
                    }
                    i += c;
                }
            }
        });
    });
    y
}

/// The dot products of weight row `j` with input rows `i0..i0 + N` (`xd`: the input rows
/// de-interleaved when `w` is bf16 and `fast`; `wide`: row `j` of an f16 weight as f32;
/// `hint`: how the streamed row is prefetched).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn dots<const N: usize>(
    w: WeightRows,
    x: &[f32],
    xd: &[f32],
    k: usize,
    j: usize,
    i0: usize,
    fast: bool,
    wide: &[f32],
    hint: Hint,
) -> [f32; N] {
    let row = j * k..(j + 1) * k;
    let xs: [&[f32]; N] = std::array::from_fn(|r| &x[(i0 + r) * k..(i0 + r + 1) * k]);
    match w {
        // SAFETY: `fast` says the CPU has AVX2 and FMA.
        WeightRows::F32(w) if fast => unsafe {
            match hint {
                Hint::T0 => stream::dots_f32::<N, { Hint::T0.code() }>(xs, &w[row]),
                Hint::Nta => stream::dots_f32::<N, { Hint::Nta.code() }>(xs, &w[row]),
                Hint::Off => stream::dots_f32::<N, { Hint::Off.code() }>(xs, &w[row]),
            }
        },
        WeightRows::Bf16(w) if fast => {
            let xds: [&[f32]; N] = std::array::from_fn(|r| &xd[(i0 + r) * k..(i0 + r + 1) * k]);
            let w = &w[row];
            // SAFETY: as above.
            unsafe {
                match hint {
                    Hint::T0 => stream::dots_bf16::<N, { Hint::T0.code() }>(xs, xds, w),
                    Hint::Nta => stream::dots_bf16::<N, { Hint::Nta.code() }>(xs, xds, w),
                    Hint::Off => stream::dots_bf16::<N, { Hint::Off.code() }>(xs, xds, w),
                }
            }
        }
        WeightRows::F32(w) => xs.map(|xi| dot(xi, &w[row.clone()])),
        WeightRows::Bf16(w) => xs.map(|xi| dot_bf16(xi, &w[row.clone()])),
        WeightRows::F16(_) => xs.map(|xi| dot(xi, wide)),
    }
}

/// Rows per part and the number of parts for `out` rows of `k` weights on `threads` threads:
/// about [`BLOCK`] weights per part, the parts a multiple of the threads (while there are rows
/// enough), so that no thread is left with a lone last block.
fn split(out: usize, k: usize, threads: usize) -> (usize, usize) {
    let threads = threads.max(1);
    let parts = (out * k).div_ceil(BLOCK).div_ceil(threads) * threads;
    let rows = out.div_ceil(parts.clamp(1, out.max(1))).max(1);
    (rows, out.div_ceil(rows))
}

/// Each row of `x: [_, k]` with every whole block of sixteen elements stored as its eight even
/// elements, then its eight odd ones (a tail shorter than sixteen as it is): the order in which
/// [`stream::dot_bf16`] widens a bf16 row.
fn deinterleave(x: &[f32], k: usize) -> Vec<f32> {
    let mut d = x.to_vec();
    for (dr, xr) in d.chunks_exact_mut(k.max(1)).zip(x.chunks_exact(k.max(1))) {
        for (db, xb) in dr.chunks_exact_mut(16).zip(xr.chunks_exact(16)) {
            for j in 0..8 {
                db[j] = xb[2 * j];
                db[8 + j] = xb[2 * j + 1];
            }
        }
    }
    d
}

thread_local! {
    /// One f16 weight row converted to f32, per pool thread.
    static PANEL: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

struct SyncPtr(*mut f32);
// SAFETY: used only for disjoint writes inside `Pool::run`, which returns after all of them.
unsafe impl Sync for SyncPtr {}

/// The streamed dot products of [`gemv_of`] on AVX2 + FMA: [`dot`]'s sixteen partial sums
/// (element `i` into sum `i mod 16` by fused multiply-adds, in order), kept in two registers,
/// added up in [`dot`]'s order, then [`dot`]'s tail: equal to it bit for bit.
mod stream {
    #[cfg(target_arch = "x86_64")]
    use crate::model::prefetch::line;
    #[cfg(target_arch = "x86_64")]
    use std::arch::x86_64::*;

    /// Whether the kernels run on this CPU.
    pub fn available() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// How far ahead of the read the prefetch runs, in bytes. On Zen 1 (LM head, bf16) 4 KiB
    /// beat 8 and 16 KiB, and the non-temporal hint beat `_MM_HINT_T0` by ~20 % (29.4 against
    /// 24.5 GB/s in a prototype; no prefetch: 20.9). On the Intel Xeon, with `_MM_HINT_T0`
    /// (see [`crate::model::prefetch`]), 2-8 KiB were level within the noise, 16 KiB lost a third.
    #[cfg(target_arch = "x86_64")]
    const AHEAD: usize = 4096;

    /// [`super::dot`] of each input row `x[r]` and an f32 weight row `w` (all of one length):
    /// the weight row is loaded once for the `N` rows.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dots_f32<const N: usize, const H: i32>(x: [&[f32]; N], w: &[f32]) -> [f32; N] {
        let k = x.iter().fold(w.len(), |k, xi| k.min(xi.len()));
        let body = k / 16 * 16;
        let wp = w.as_ptr();
        let (mut lo, mut hi) = ([_mm256_setzero_ps(); N], [_mm256_setzero_ps(); N]);
        let mut m = 0;
        while m < body {
            // One 64-byte line of weights per step; the address may lie past the slice (a
            // prefetch never faults).
            line::<H>(wp.wrapping_add(m + AHEAD / 4));
            let (w0, w1) = (_mm256_loadu_ps(wp.add(m)), _mm256_loadu_ps(wp.add(m + 8)));
            for r in 0..N {
                let xp = x[r].as_ptr();
                lo[r] = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(m)), w0, lo[r]);
                hi[r] = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(m + 8)), w1, hi[r]);
            }
            m += 16;
        }
        std::array::from_fn(|r| {
            let mut acc = [0f32; 16];
            _mm256_storeu_ps(acc.as_mut_ptr(), lo[r]);
            _mm256_storeu_ps(acc.as_mut_ptr().add(8), hi[r]);
            let mut s: f32 = acc.iter().sum();
            for i in body..k {
                s = x[r][i].mul_add(w[i], s);
            }
            s
        })
    }

    /// [`super::dot_bf16`] of each input row `x[r]` and a bf16 weight row `w`, with `xd[r]` =
    /// `x[r]` de-interleaved ([`super::deinterleave`]); all of one length. The weight row is
    /// loaded and widened once for the `N` rows.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dots_bf16<const N: usize, const H: i32>(
        x: [&[f32]; N],
        xd: [&[f32]; N],
        w: &[half::bf16],
    ) -> [f32; N] {
        let k = x.iter().chain(&xd).fold(w.len(), |k, xi| k.min(xi.len()));
        let body = k / 16 * 16;
        let wp = w.as_ptr();
        // The 32-bit word of elements 2j, 2j+1 holds the odd one in its high half: masked, it
        // is that element as an f32; shifted left by 16, the even one.
        let high = _mm256_set1_epi32(0xFFFF_0000_u32 as i32);
        let (mut even, mut odd) = ([_mm256_setzero_ps(); N], [_mm256_setzero_ps(); N]);
        macro_rules! block {
            ($m:expr) => {{
                let v = _mm256_loadu_si256(wp.add($m) as *const __m256i);
                let we = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v));
                let wo = _mm256_castsi256_ps(_mm256_and_si256(v, high));
                for r in 0..N {
                    let xp = xd[r].as_ptr();
                    even[r] = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add($m)), we, even[r]);
                    odd[r] = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add($m + 8)), wo, odd[r]);
                }
            }};
        }
        let mut m = 0;
        // Two blocks (one 64-byte line of weights) per prefetch.
        while m + 32 <= body {
            line::<H>(wp.wrapping_add(m + AHEAD / 2).cast());
            block!(m);
            block!(m + 16);
            m += 32;
        }
        if m < body {
            block!(m);
        }
        std::array::from_fn(|r| {
            let (mut e, mut o) = ([0f32; 8], [0f32; 8]);
            _mm256_storeu_ps(e.as_mut_ptr(), even[r]);
            _mm256_storeu_ps(o.as_mut_ptr(), odd[r]);
            let acc: [f32; 16] =
                std::array::from_fn(|l| if l % 2 == 0 { e[l / 2] } else { o[l / 2] });
            let mut s: f32 = acc.iter().sum();
            for i in body..k {
                s = x[r][i].mul_add(f32::from_bits(u32::from(w[i].to_bits()) << 16), s);
            }
            s
        })
    }

    /// Never called where [`available`] is false.
    #[cfg(not(target_arch = "x86_64"))]
    pub unsafe fn dots_f32<const N: usize, const H: i32>(x: [&[f32]; N], w: &[f32]) -> [f32; N] {
        x.map(|xi| super::dot(xi, w))
    }

    /// Never called where [`available`] is false.
    #[cfg(not(target_arch = "x86_64"))]
    pub unsafe fn dots_bf16<const N: usize, const H: i32>(
        x: [&[f32]; N],
        _xd: [&[f32]; N],
        w: &[half::bf16],
    ) -> [f32; N] {
        x.map(|xi| super::dot_bf16(xi, w))
    }
}

/// `sum_i a[i] * b[i]` for a bf16 `b`, widened in registers (AVX-512 or AVX2+FMA when the CPU
/// has them). Equal, bit for bit, to [`dot`] on `b` widened first: the same sixteen partial
/// sums in the same order.
#[inline]
pub fn dot_bf16(a: &[f32], b: &[half::bf16]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        let fma = std::arch::is_x86_feature_detected!("fma");
        if fma && std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports the features the function is compiled for.
            return unsafe { dot_bf16_avx512(a, b) };
        }
        if fma && std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: as above.
            return unsafe { dot_bf16_avx2(a, b) };
        }
    }
    dot_portable(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn dot_bf16_avx512(a: &[f32], b: &[half::bf16]) -> f32 {
    dot_portable(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_bf16_avx2(a: &[f32], b: &[half::bf16]) -> f32 {
    dot_portable(a, b)
}

/// Dot product, with AVX2+FMA when the CPU has it.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports the features the function is compiled for.
            return unsafe { dot_avx2(a, b) };
        }
    }
    dot_portable(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_portable(a, b)
}

/// A weight element the dot products read, widened to f32 exactly.
pub(super) trait Widen: Copy {
    /// The value as an f32 (exact).
    fn widen(self) -> f32;
}

impl Widen for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl Widen for half::bf16 {
    /// A bf16 is the high half of an f32.
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }
}

/// Sixteen independent accumulators, so that the compiler vectorises without reassociating;
/// a bf16 `b` is widened as it is read (same sums, same order, as on `b` widened first).
#[inline(always)]
fn dot_portable<T: Widen>(a: &[f32], b: &[T]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 16];
    let mut ca = a.chunks_exact(16);
    let mut cb = b.chunks_exact(16);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..16 {
            acc[l] = x[l].mul_add(y[l].widen(), acc[l]);
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        s = x.mul_add(y.widen(), s);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_util::values;

    /// Each (input row, weight row) of `gemv_of`, computed alone by the reference [`dot`].
    fn by_dot(x: &[f32], w: &[f32], n: usize, k: usize, out: usize) -> Vec<f32> {
        (0..n)
            .flat_map(|i| (0..out).map(move |j| (i, j)))
            .map(|(i, j)| dot(&x[i * k..(i + 1) * k], &w[j * k..(j + 1) * k]))
            .collect()
    }

    /// The streamed kernels (whole blocks of 16, a tail, rows shorter than one block, many
    /// parts, one to six input rows per pass) give exactly the reference dot products, f32,
    /// bf16 and f16 alike.
    #[test]
    fn every_dtype_equals_the_reference_dot_bit_for_bit() {
        // Passes of 1-6 input rows, and more rows than one pass takes (13 = 6 + 6 + 1).
        for (n, k, out) in [
            (1, 576, 1536),
            (4, 1536, 70),
            (2, 37, 29),
            (3, 7, 5),
            (1, 48, 3000),
            (5, 17, 7),
            (6, 576, 40),
            (13, 40, 9),
        ] {
            let x = values(n * k, 1);
            let w = values(out * k, 2);
            assert_eq!(
                gemv(&x, &w, n, k, out),
                by_dot(&x, &w, n, k, out),
                "f32 {n}x{k}x{out}"
            );
            let b: Vec<half::bf16> = w.iter().map(|&v| half::bf16::from_f32(v)).collect();
            let bw: Vec<f32> = b.iter().map(|v| v.to_f32()).collect();
            let want = by_dot(&x, &bw, n, k, out);
            assert_eq!(
                gemv_of(&x, WeightRows::Bf16(&b), n, k, out),
                want,
                "bf16 {n}x{k}x{out}"
            );
            let bx: Vec<f32> = (0..n)
                .flat_map(|i| (0..out).map(move |j| (i, j)))
                .map(|(i, j)| dot_bf16(&x[i * k..(i + 1) * k], &b[j * k..(j + 1) * k]))
                .collect();
            assert_eq!(bx, want, "dot_bf16 {n}x{k}x{out}");
            let h: Vec<half::f16> = w.iter().map(|&v| half::f16::from_f32(v)).collect();
            let hw: Vec<f32> = h.iter().map(|v| v.to_f32()).collect();
            let want = by_dot(&x, &hw, n, k, out);
            assert_eq!(
                gemv_of(&x, WeightRows::F16(&h), n, k, out),
                want,
                "f16 {n}x{k}x{out}"
            );
        }
    }

    #[test]
    fn split_covers_every_row_in_a_multiple_of_the_threads() {
        // 576 x 576 weights on 2 threads: 331,776 / 131,072 -> 3 blocks -> 4 parts of 144 rows.
        assert_eq!(split(576, 576, 2), (144, 4));
        // A product smaller than one block still goes to both threads.
        assert_eq!(split(192, 576, 2), (96, 2));
        // One row cannot be split; no rows give no parts.
        assert_eq!(split(1, 576, 2), (1, 1));
        assert_eq!(split(0, 576, 2).1, 0);
        for (out, k, t) in [(49_152, 576, 2), (1536, 576, 3), (7, 3, 4), (5, 100_000, 2)] {
            let (rows, parts) = split(out, k, t);
            assert!(
                rows * parts >= out && rows * (parts - 1) < out,
                "{out} {k} {t}"
            );
        }
    }

    #[test]
    fn deinterleave_puts_even_then_odd_per_block_and_keeps_the_tail() {
        let x: Vec<f32> = (0..2 * 18).map(|i| i as f32).collect();
        let d = deinterleave(&x, 18);
        let row: Vec<f32> = [0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 16, 17]
            .iter()
            .map(|&v| v as f32)
            .collect();
        assert_eq!(&d[..18], &row[..]);
        let second: Vec<f32> = row.iter().map(|v| v + 18.0).collect();
        assert_eq!(&d[18..], &second[..]);
    }

    #[test]
    fn dot_by_hand() {
        // 1*4 + 2*5 + 3*6 = 32, with a tail past the 16-wide body.
        let a: Vec<f32> = (0..19)
            .map(|i| if i < 3 { (i + 1) as f32 } else { 0.0 })
            .collect();
        let b: Vec<f32> = (0..19)
            .map(|i| if i < 3 { (i + 4) as f32 } else { 1.0 })
            .collect();
        assert_eq!(dot(&a, &b), 32.0);
        assert_eq!(dot(&[2.0; 17], &[0.5; 17]), 17.0);
        assert_eq!(gemv(&a, &b, 1, 19, 1), vec![32.0]);
    }
}
