//! The register-blocked product `x W^T` for few input rows (batched decoding: 7-64 rows).
//!
//! The input rows become vector lanes: `x: [n, k]` is packed once as `xt: [k, L]` (`L` = `n`
//! rounded up to whole vectors, zero-padded; on AVX2 in lane groups of 16 rows, each packed
//! this way). A tile of `MR` weight rows then runs one k-loop in which every weight element is
//! broadcast once and multiplied into `L / V` lane vectors
//! (`V` = 16 for AVX-512, 8 for AVX2), accumulating `MR x L / V` vector registers:
//! `acc[r][lanes] += w[j + r][kk] * xt[kk][lanes]`. Each FMA needs one broadcast load (folded
//! into the FMA as a memory operand), there is no horizontal sum, and each weight row is read
//! from memory once per call. On Zen 4 one tile reaches the FMA throughput: ~100 GFLOP/s per
//! core at n = 16, against ~35 GFLOP/s for one dot product per (row, weight row); on an
//! AVX2-only Zen 1 core (peak ~37 GFLOP/s) ~35 at n = 16 — measured by hand with
//! `examples/kernel_rates.rs`, not a test.
//!
//! The rows of `W` are split across [`Pool::global`] in blocks of whole tiles. Where
//! [`super::prefetch`] says so (Intel), each tile prefetches the next tile's weight rows as it
//! runs, a cache line of each per sixteen `kk`: the weights stream from memory (a decode step
//! reads all of them once), and the hardware prefetchers alone left the tiles waiting on it.

use super::matmul::WeightRows;
use super::parallel::Pool;
use super::prefetch::{tile_hint, Hint};

/// Most input rows one packed pass covers; more rows are processed in chunks of this many.
pub const MAX_LANES: usize = 64;

/// The instruction set the tiles use, detected once per call (the detection is cached by std).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Isa {
    /// AVX-512F, plus AVX2+FMA for the narrow (n <= 8) tiles.
    Avx512,
    /// AVX2 + FMA.
    Avx2,
    /// Anything else: plain Rust (auto-vectorised where the compiler can).
    Scalar,
}

/// The instruction set the few-row tiles use on this CPU (the other hand-written kernels test
/// for the same features): `"avx512f"`, `"avx2+fma"` or `"portable"`.
pub fn kernel_set() -> &'static str {
    match isa() {
        Isa::Avx512 => "avx512f",
        Isa::Avx2 => "avx2+fma",
        Isa::Scalar => "portable",
    }
}

fn isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma");
        if avx2 && std::arch::is_x86_feature_detected!("avx512f") {
            return Isa::Avx512;
        }
        if avx2 {
            return Isa::Avx2;
        }
    }
    Isa::Scalar
}

/// `y[i][j] = sum_kk x[i][kk] * w[j][kk]` for `x: [n, k]`, `w: [out, k]` (row-major), written
/// into `y: [n, out]`. Any `n >= 1`; meant for `n <= ` [`MAX_LANES`] (larger `n` runs in
/// chunks of input rows, but a gemm is then faster). Writes nothing when a slice is shorter
/// than its shape (callers pass exact slices; a debug build asserts it).
pub fn few_rows(x: &[f32], w: &[f32], n: usize, k: usize, out: usize, y: &mut [f32]) {
    few_rows_of(x, WeightRows::F32(w), n, k, out, y)
}

/// [`few_rows`] for a weight in any storage dtype: each pool thread converts its block of
/// weight rows to f32 (exactly) right before the tiles read it, so a bf16 weight is read from
/// memory at half the bytes and the arithmetic is the f32 kernel's, bit for bit.
pub fn few_rows_of(x: &[f32], w: WeightRows, n: usize, k: usize, out: usize, y: &mut [f32]) {
    if x.len() < n * k || w.len() < out * k || y.len() < n * out || n == 0 {
        debug_assert!(n == 0, "few_rows: slices shorter than the shapes");
        return;
    }
    few_rows_with(isa(), x, w, n, k, out, SyncPtr(y.as_mut_ptr()));
}

/// [`few_rows_of`] into a new vector, which the tiles write without zeroing it first (a zero
/// fill cost a write of every output, the LM head's 6 MB at batch 32, per product). Empty
/// when a slice is shorter than its shape or `n` is 0.
pub(crate) fn few_rows_vec(x: &[f32], w: WeightRows, n: usize, k: usize, out: usize) -> Vec<f32> {
    if x.len() < n * k || w.len() < out * k || n == 0 {
        debug_assert!(n == 0, "few_rows: slices shorter than the shapes");
        return Vec::new();
    }
    let mut y = Vec::<f32>::with_capacity(n * out);
    few_rows_with(isa(), x, w, n, k, out, SyncPtr(y.as_mut_ptr()));
    // SAFETY: the capacity is `n * out`, and `chunk` wrote every element `i * out + j`
    // (`i < n`, `j < out`): each lane group's rows for every block of weight rows.
    unsafe { y.set_len(n * out) };
    y
}

fn few_rows_with(isa: Isa, x: &[f32], w: WeightRows, n: usize, k: usize, out: usize, y: SyncPtr) {
    let mut i0 = 0;
    while i0 < n {
        let rows = (n - i0).min(MAX_LANES);
        chunk(
            isa,
            &x[i0 * k..(i0 + rows) * k],
            w,
            rows,
            k,
            out,
            // The rows `i0..` of `y`, which holds `n * out` values.
            SyncPtr(y.0.wrapping_add(i0 * out)),
        );
        i0 += rows;
    }
}

/// The tile shape for `n` input rows: (vector width `V`, vectors per weight row `NB`, weight
/// rows per tile `MR`), so that `MR * NB` accumulators plus `NB` input vectors fit the
/// register file (32 for AVX-512, 16 for AVX2) with room for the broadcast.
fn shape(isa: Isa, n: usize) -> (usize, usize, usize) {
    match (isa, n) {
        (Isa::Avx512, 0..=8) => (8, 1, 12),
        (Isa::Avx512, 9..=16) => (16, 1, 8),
        (Isa::Avx512, 17..=32) => (16, 2, 12),
        (Isa::Avx512, 33..=48) => (16, 3, 8),
        (Isa::Avx512, _) => (16, 4, 6),
        (Isa::Avx2, 0..=8) => (8, 1, 12),
        // More than 16 rows on AVX2: lane groups of 16 (see `group_lanes`).
        (Isa::Avx2, _) => (8, 2, 6),
        (Isa::Scalar, _) => (8, 1, 4),
    }
}

/// Most input rows one lane group holds: the widest tile whose accumulators, input vectors and
/// broadcast fit the register file. AVX-512's 32 registers take all [`MAX_LANES`] rows in one
/// group; AVX2's 16 take 16 rows (12 accumulators, 2 inputs, 1 broadcast: 24 or 32 rows would
/// spill, measured ~29 against ~35 GFLOP/s per core on Zen 1).
fn group_lanes(isa: Isa) -> usize {
    match isa {
        Isa::Avx512 => MAX_LANES,
        Isa::Avx2 => 16,
        Isa::Scalar => 8,
    }
}

/// One group of input rows: the first row, the row count, its tile shape and where its packed
/// inputs start.
#[derive(Clone, Copy)]
struct Group {
    row0: usize,
    rows: usize,
    shape: (usize, usize, usize),
    at: usize,
}

/// One packed pass over `W`: `n <= MAX_LANES` input rows in lane groups (see [`group_lanes`]).
/// Each pool part takes a block of weight rows and runs every group over it, so the block is
/// read from memory once and reused from cache by the later groups. Writes each of the `n *
/// out` values at `y` once (row stride `out`) and reads none of them: `y` may be uninitialised.
fn chunk(isa: Isa, x: &[f32], w: WeightRows, n: usize, k: usize, out: usize, yp: SyncPtr) {
    let (groups, at) = groups(isa, n, k);
    // Blocks of ~128 KiB of weights, in whole tiles of every group: enough parts to balance two
    // to a few threads, few enough that handing them out costs nothing.
    let tile_rows = groups.iter().fold(1, |l, g| lcm(l, g.shape.2));
    let block = ((32_768 / k.max(1)) / tile_rows).max(1) * tile_rows;
    PACKED.with(|cell| {
        let mut xt = cell.borrow_mut();
        // Every element is written below (the inputs, then zeros in the padding lanes), so
        // the buffer is only grown, never cleared (a zero fill of it on every product wrote
        // ~9.6 MB per batch-16 decode step of SmolLM2 for nothing).
        if xt.len() < at {
            xt.resize(at, 0.0);
        }
        for g in &groups {
            pack(
                &x[g.row0 * k..],
                g.rows,
                k,
                g.shape.0 * g.shape.1,
                &mut xt[g.at..],
            );
        }
        let parts = out.div_ceil(block);
        let xt = &xt[..at];
        Pool::global().run(parts, &|p| {
            let j0 = p * block;
            let j1 = (j0 + block).min(out);
            let yp = &yp;
            PANEL.with(|panel| {
                let mut panel = panel.borrow_mut();
                let wp = w.panel(j0, j1, k, &mut panel);
                BLOCK.with(|cell| {
                    let mut buf = cell.borrow_mut();
                    for g in &groups {
                        let lanes = g.shape.0 * g.shape.1;
                        // The block's outputs as `[j - j0][lanes]` (the tiles' natural layout),
                        // then copied out row by row: storing straight into `y` would write
                        // `n` lines `out * 4` bytes apart per weight row, which all map to one
                        // L1 set when `out` is a multiple of 1024 (the LM head) and thrash it.
                        // Only grown: the tiles write all of `buf[..(j1 - j0) * lanes]`.
                        let len = (j1 - j0) * lanes;
                        if buf.len() < len {
                            buf.resize(len, 0.0);
                        }
                        let buf = &mut buf[..len];
                        let xg = &xt[g.at..g.at + k * lanes];
                        run_block(isa, g.shape, xg, wp, k, 0, j1 - j0, buf);
                        for i in 0..g.rows {
                            let row = (g.row0 + i) * out + j0;
                            for (c, src) in buf.chunks_exact(lanes).enumerate() {
                                // SAFETY: part `p` writes only the columns `j0..j1` of `y`
                                // (rows `0..n`, row stride `out`), which no other part
                                // writes; the caller's buffer holds `n * out` values and
                                // outlives `run`. A raw write: the value may be uninitialised.
                                unsafe { yp.0.add(row + c).write(src[i]) };
                            }
                        }
                    }
                });
            });
        });
    });
}

/// `xt[kk * lanes + i] = x[i * k + kk]` for `i < rows` and zero for `rows <= i < lanes`: the
/// first `rows` rows of `x` (`[rows, k]`, row-major) as `[k, lanes]`. Written one `kk` at a
/// time, so the output is written in order while the `rows` inputs are each read in order.
fn pack(x: &[f32], rows: usize, k: usize, lanes: usize, xt: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if lanes % 16 == 0 && rows <= lanes && std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F; the slices are checked against the shapes there.
            return unsafe { x86::pack16(x, rows, k, lanes, xt) };
        }
    }
    pack_portable(x, rows, k, lanes, xt)
}

/// [`pack`], one element at a time.
fn pack_portable(x: &[f32], rows: usize, k: usize, lanes: usize, xt: &mut [f32]) {
    let x = &x[..rows * k];
    for (kk, dst) in xt[..k * lanes].chunks_exact_mut(lanes).enumerate() {
        let (filled, padding) = dst.split_at_mut(rows);
        for (i, d) in filled.iter_mut().enumerate() {
            *d = x[i * k + kk];
        }
        padding.fill(0.0);
    }
}

/// Calls `f` with the first `n` rows of `x` (`[n, k]`) packed as `[k, lanes]` ([`pack`]), in the
/// calling thread's reused buffer.
pub(crate) fn with_packed<R>(
    x: &[f32],
    n: usize,
    k: usize,
    lanes: usize,
    f: impl FnOnce(&[f32]) -> R,
) -> R {
    PACKED.with(|cell| {
        let mut xt = cell.borrow_mut();
        if xt.len() < k * lanes {
            xt.resize(k * lanes, 0.0);
        }
        pack(x, n, k, lanes, &mut xt[..k * lanes]);
        f(&xt[..k * lanes])
    })
}

/// The lane groups of `n` input rows of length `k`, and the packed length they take: groups of
/// [`group_lanes`] rows in order, the last one shorter, each packed as `[k, lanes]` after the
/// previous one.
fn groups(isa: Isa, n: usize, k: usize) -> (Vec<Group>, usize) {
    let width = group_lanes(isa);
    let mut groups = Vec::with_capacity(n.div_ceil(width));
    let (mut row0, mut at) = (0, 0);
    while row0 < n {
        let rows = (n - row0).min(width);
        let shape = shape(isa, rows);
        groups.push(Group {
            row0,
            rows,
            shape,
            at,
        });
        at += k * shape.0 * shape.1;
        row0 += rows;
    }
    (groups, at)
}

/// Least common multiple (of tile heights: small positive numbers).
fn lcm(a: usize, b: usize) -> usize {
    fn gcd(a: usize, b: usize) -> usize {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
    a / gcd(a, b) * b
}

thread_local! {
    /// The packed input of the calling thread, reused across calls (a fresh 100+ KiB buffer
    /// per product would be an mmap and page faults every time).
    static PACKED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// The outputs of one block of weight rows, per pool thread.
    static BLOCK: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// One block of a bf16/f16 weight's rows converted to f32, per pool thread.
    static PANEL: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Weight rows `j0..j1`: whole tiles, then single rows; row `j` goes to
/// `buf[(j - j0) * lanes..][..lanes]`.
#[allow(clippy::too_many_arguments)]
fn run_block(
    isa: Isa,
    (v, nb, mr): (usize, usize, usize),
    xt: &[f32],
    w: &[f32],
    k: usize,
    j0: usize,
    j1: usize,
    buf: &mut [f32],
) {
    let lanes = v * nb;
    let mut j = j0;
    while j < j1 {
        let rows = if j + mr <= j1 { mr } else { 1 };
        let wt = &w[j * k..(j + rows) * k];
        let at = (j - j0) * lanes;
        tile(
            isa,
            (v, nb, rows),
            xt,
            wt,
            k,
            &mut buf[at..at + rows * lanes],
        );
        j += rows;
    }
}

/// One tile: `acc[r * lanes + l] = sum_kk w[r][kk] * xt[kk][l]` for `r < rows`.
fn tile(
    isa: Isa,
    (v, nb, rows): (usize, usize, usize),
    xt: &[f32],
    w: &[f32],
    k: usize,
    acc: &mut [f32],
) {
    debug_assert!(xt.len() >= k * v * nb && w.len() >= rows * k && acc.len() >= rows * v * nb);
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY (all arms): `isa` was detected on this CPU (AVX-512 implies AVX2+FMA is
        // checked in `isa`), and the slices hold `k * lanes` packed inputs, `rows * k` weights
        // and `rows * lanes` outputs, which is what the kernels read and write.
        macro_rules! go {
            ($f:ident, $mr:literal, $nb:literal) => {
                unsafe {
                    let (xt, w, acc) = (xt.as_ptr(), w.as_ptr(), acc.as_mut_ptr());
                    match tile_hint() {
                        Hint::T0 => x86::$f::<$mr, $nb, { Hint::T0.code() }>(xt, w, k, acc),
                        Hint::Nta => x86::$f::<$mr, $nb, { Hint::Nta.code() }>(xt, w, k, acc),
                        Hint::Off => x86::$f::<$mr, $nb, { Hint::Off.code() }>(xt, w, k, acc),
                    }
                }
            };
        }
        match (isa, v, nb, rows) {
            (Isa::Avx512 | Isa::Avx2, 8, 1, 12) => return go!(avx2, 12, 1),
            (Isa::Avx512 | Isa::Avx2, 8, 1, 1) => return go!(avx2, 1, 1),
            (Isa::Avx2, 8, 2, 6) => return go!(avx2, 6, 2),
            (Isa::Avx2, 8, 2, 1) => return go!(avx2, 1, 2),
            (Isa::Avx512, 16, 1, 8) => return go!(avx512, 8, 1),
            (Isa::Avx512, 16, 1, 1) => return go!(avx512, 1, 1),
            (Isa::Avx512, 16, 2, 12) => return go!(avx512, 12, 2),
            (Isa::Avx512, 16, 2, 1) => return go!(avx512, 1, 2),
            (Isa::Avx512, 16, 3, 8) => return go!(avx512, 8, 3),
            (Isa::Avx512, 16, 3, 1) => return go!(avx512, 1, 3),
            (Isa::Avx512, 16, 4, 6) => return go!(avx512, 6, 4),
            (Isa::Avx512, 16, 4, 1) => return go!(avx512, 1, 4),
            _ => {}
        }
    }
    tile_scalar(xt, w, k, v * nb, rows, acc);
}

/// The portable tile (any shape): same arithmetic order per output as the vector tiles
/// (one fused multiply-add per `kk`, in increasing `kk`).
fn tile_scalar(xt: &[f32], w: &[f32], k: usize, lanes: usize, rows: usize, acc: &mut [f32]) {
    for r in 0..rows {
        let a = &mut acc[r * lanes..(r + 1) * lanes];
        a.fill(0.0);
        let wr = &w[r * k..(r + 1) * k];
        for (kk, &wv) in wr.iter().enumerate() {
            let xr = &xt[kk * lanes..(kk + 1) * lanes];
            for (s, &xv) in a.iter_mut().zip(xr) {
                *s = wv.mul_add(xv, *s);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use crate::model::prefetch::line;
    use std::arch::x86_64::*;

    /// At every sixteenth `kk` (one cache line of each weight row), prefetches the same line of
    /// the `MR` rows that follow this tile's, which the next tile reads: as a tile runs, the
    /// next one's weights come in behind it. The address may lie past the weights (a prefetch
    /// never faults). `H` is [`line`]'s hint; with no hint this is nothing.
    ///
    /// # Safety
    /// The CPU has SSE (every x86-64 CPU).
    #[inline(always)]
    unsafe fn prefetch_next<const MR: usize, const H: i32>(w: *const f32, k: usize, kk: usize) {
        if H >= 0 && kk % 16 == 0 {
            for r in 0..MR {
                line::<H>(w.wrapping_add((MR + r) * k + kk));
            }
        }
    }

    /// [`super::pack`] for `lanes` a multiple of 16: blocks of 16 rows x 16 `kk` are loaded as
    /// 16 row vectors (rows past `rows` as zeros), transposed in registers and stored as 16
    /// lane vectors; the `k % 16` last `kk` one element at a time. Two cycles per element the
    /// scalar way were ~5 % of a batch-32 decode step.
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn pack16(x: &[f32], rows: usize, k: usize, lanes: usize, xt: &mut [f32]) {
        let (x, xt) = (&x[..rows * k], &mut xt[..k * lanes]);
        let whole = k / 16 * 16;
        for i0 in (0..lanes).step_by(16) {
            for kb in (0..whole).step_by(16) {
                let mut r = [_mm512_setzero_ps(); 16];
                for (i, v) in r.iter_mut().enumerate() {
                    if i0 + i < rows {
                        *v = _mm512_loadu_ps(x[(i0 + i) * k + kb..][..16].as_ptr());
                    }
                }
                let c = transpose16(r);
                for (cc, v) in c.iter().enumerate() {
                    _mm512_storeu_ps(xt[(kb + cc) * lanes + i0..][..16].as_mut_ptr(), *v);
                }
            }
            for kk in whole..k {
                for i in i0..i0 + 16 {
                    xt[kk * lanes + i] = if i < rows { x[i * k + kk] } else { 0.0 };
                }
            }
        }
    }

    /// The transpose of a 16 x 16 block held as 16 row vectors: element `c` of output `r` is
    /// element `r` of input `c`. Pairs of rows interleaved by 32 then 64 bits, then 128-bit
    /// lanes gathered in two rounds.
    #[target_feature(enable = "avx512f")]
    unsafe fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
        let mut a = [_mm512_setzero_ps(); 16];
        for j in 0..8 {
            a[2 * j] = _mm512_unpacklo_ps(r[2 * j], r[2 * j + 1]);
            a[2 * j + 1] = _mm512_unpackhi_ps(r[2 * j], r[2 * j + 1]);
        }
        // b[4j + m], 128-bit lane L: column 4L + m of rows 4j..4j+3.
        let mut b = [_mm512_setzero_ps(); 16];
        let (lo, hi) = (
            |p: __m512, q: __m512| {
                _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(p), _mm512_castps_pd(q)))
            },
            |p: __m512, q: __m512| {
                _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(p), _mm512_castps_pd(q)))
            },
        );
        for j in 0..4 {
            b[4 * j] = lo(a[4 * j], a[4 * j + 2]);
            b[4 * j + 1] = hi(a[4 * j], a[4 * j + 2]);
            b[4 * j + 2] = lo(a[4 * j + 1], a[4 * j + 3]);
            b[4 * j + 3] = hi(a[4 * j + 1], a[4 * j + 3]);
        }
        let mut out = [_mm512_setzero_ps(); 16];
        for m in 0..4 {
            let c01 = _mm512_shuffle_f32x4::<0x88>(b[m], b[4 + m]);
            let d01 = _mm512_shuffle_f32x4::<0xDD>(b[m], b[4 + m]);
            let c23 = _mm512_shuffle_f32x4::<0x88>(b[8 + m], b[12 + m]);
            let d23 = _mm512_shuffle_f32x4::<0xDD>(b[8 + m], b[12 + m]);
            out[m] = _mm512_shuffle_f32x4::<0x88>(c01, c23);
            out[4 + m] = _mm512_shuffle_f32x4::<0x88>(d01, d23);
            out[8 + m] = _mm512_shuffle_f32x4::<0xDD>(c01, c23);
            out[12 + m] = _mm512_shuffle_f32x4::<0xDD>(d01, d23);
        }
        out
    }

    /// `MR` weight rows x `NB` AVX2 vectors of 8 lanes, prefetching the next tile's weight
    /// rows with hint `H` (see [`prefetch_next`]).
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `xt` holds `k * 8 * NB` floats, `w` holds `MR * k`, `acc` has
    /// room for `MR * 8 * NB`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn avx2<const MR: usize, const NB: usize, const H: i32>(
        xt: *const f32,
        w: *const f32,
        k: usize,
        acc: *mut f32,
    ) {
        let l = NB * 8;
        let mut a = [[_mm256_setzero_ps(); NB]; MR];
        for kk in 0..k {
            prefetch_next::<MR, H>(w, k, kk);
            let mut xv = [_mm256_setzero_ps(); NB];
            for (b, x) in xv.iter_mut().enumerate() {
                *x = _mm256_loadu_ps(xt.add(kk * l + b * 8));
            }
            for (r, ar) in a.iter_mut().enumerate() {
                let wv = _mm256_set1_ps(*w.add(r * k + kk));
                for (s, x) in ar.iter_mut().zip(&xv) {
                    *s = _mm256_fmadd_ps(wv, *x, *s);
                }
            }
        }
        for (r, ar) in a.iter().enumerate() {
            for (b, s) in ar.iter().enumerate() {
                _mm256_storeu_ps(acc.add(r * l + b * 8), *s);
            }
        }
    }

    /// `MR` weight rows x `NB` AVX-512 vectors of 16 lanes, prefetching the next tile's
    /// weight rows with hint `H` (see [`prefetch_next`]).
    ///
    /// # Safety
    /// The CPU has AVX-512F; `xt` holds `k * 16 * NB` floats, `w` holds `MR * k`, `acc` has
    /// room for `MR * 16 * NB`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn avx512<const MR: usize, const NB: usize, const H: i32>(
        xt: *const f32,
        w: *const f32,
        k: usize,
        acc: *mut f32,
    ) {
        laid::<MR, NB, H, 0>(xt, w, k, acc)
    }

    /// [`avx512`] for a weight laid out row-major (`BAND` 0: row `r` at `w[r * k..]`) or in a
    /// band of `BAND` rows stored `kk`-major (`w[kk * BAND + r]`, see
    /// [`super::super::tile_major`]). A band tile with a hint (the first tile of its band)
    /// prefetches the band 2 KiB ahead, a cache line per `64 / (4 * BAND)` `kk` when `BAND` is
    /// 8 (what the band consumes); the sums are the same chain of FMAs in either layout.
    ///
    /// # Safety
    /// As [`avx512`]; with a band, `w` holds the band's `BAND * k` floats from the tile's first
    /// row.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn laid<const MR: usize, const NB: usize, const H: i32, const BAND: usize>(
        xt: *const f32,
        w: *const f32,
        k: usize,
        acc: *mut f32,
    ) {
        let l = NB * 16;
        let mut a = [[_mm512_setzero_ps(); NB]; MR];
        for kk in 0..k {
            if BAND == 0 {
                prefetch_next::<MR, H>(w, k, kk);
            } else if H >= 0 && kk % 2 == 0 {
                line::<H>(w.wrapping_add(kk * BAND + 512));
            }
            let mut xv = [_mm512_setzero_ps(); NB];
            for (b, x) in xv.iter_mut().enumerate() {
                *x = _mm512_loadu_ps(xt.add(kk * l + b * 16));
            }
            for (r, ar) in a.iter_mut().enumerate() {
                let at = if BAND == 0 { r * k + kk } else { kk * BAND + r };
                let wv = _mm512_set1_ps(*w.add(at));
                for (s, x) in ar.iter_mut().zip(&xv) {
                    *s = _mm512_fmadd_ps(wv, *x, *s);
                }
            }
        }
        for (r, ar) in a.iter().enumerate() {
            for (b, s) in ar.iter().enumerate() {
                _mm512_storeu_ps(acc.add(r * l + b * 16), *s);
            }
        }
    }
}

struct SyncPtr(*mut f32);
// SAFETY: used only for disjoint writes inside `Pool::run`, which returns after all of them.
unsafe impl Sync for SyncPtr {}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every instruction set this CPU has, the portable one included.
    fn isas() -> Vec<Isa> {
        let mut v = vec![Isa::Scalar];
        if matches!(isa(), Isa::Avx2 | Isa::Avx512) {
            v.push(Isa::Avx2);
        }
        if isa() == Isa::Avx512 {
            v.push(Isa::Avx512);
        }
        v
    }

    fn naive(x: &[f32], w: &[f32], n: usize, k: usize, out: usize) -> Vec<f64> {
        let mut y = vec![0f64; n * out];
        for i in 0..n {
            for j in 0..out {
                for kk in 0..k {
                    y[i * out + j] += x[i * k + kk] as f64 * w[j * k + kk] as f64;
                }
            }
        }
        y
    }

    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    /// Brute force against a triple loop (in f64) on odd shapes: every n in 1..=33 and 63..=65,
    /// k not a multiple of any vector width, out not a multiple of any tile height (so the
    /// single-row tail runs), on every instruction set of this CPU.
    #[test]
    fn matches_triple_loop_on_odd_shapes() {
        for isa in isas() {
            for (k, out) in [(37, 29), (3, 50), (129, 13)] {
                let w = values(out * k, 1);
                for n in (1..=33).chain(63..=65) {
                    let x = values(n * k, n as u64 + 7);
                    let want = naive(&x, &w, n, k, out);
                    let mut y = vec![f32::NAN; n * out];
                    few_rows_with(
                        isa,
                        &x,
                        WeightRows::F32(&w),
                        n,
                        k,
                        out,
                        SyncPtr(y.as_mut_ptr()),
                    );
                    for (idx, (&got, &want)) in y.iter().zip(&want).enumerate() {
                        // |terms| <= 0.25, k <= 129: f32 rounding stays far below 1e-4.
                        assert!(
                            (got as f64 - want).abs() < 1e-4,
                            "{isa:?} n {n} k {k} out {out} at {idx}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// A row's outputs do not depend on the rows beside it: the lane groups and tile shapes
    /// chosen for a batch give, bit for bit, what the row gives alone (what lets batched
    /// generation equal one-by-one generation).
    #[test]
    fn each_row_is_bit_identical_to_the_row_alone() {
        let (k, out) = (131, 77);
        let w = values(out * k, 3);
        for isa in isas() {
            for n in [9, 16, 17, 24, 33, 48, 64] {
                let x = values(n * k, n as u64);
                let mut y = vec![f32::NAN; n * out];
                few_rows_with(
                    isa,
                    &x,
                    WeightRows::F32(&w),
                    n,
                    k,
                    out,
                    SyncPtr(y.as_mut_ptr()),
                );
                for i in 0..n {
                    let mut alone = vec![f32::NAN; out];
                    let row = &x[i * k..(i + 1) * k];
                    few_rows_with(
                        isa,
                        row,
                        WeightRows::F32(&w),
                        1,
                        k,
                        out,
                        SyncPtr(alone.as_mut_ptr()),
                    );
                    assert_eq!(
                        &y[i * out..(i + 1) * out],
                        &alone[..],
                        "{isa:?} n {n} row {i}"
                    );
                }
            }
        }
    }

    #[test]
    fn lane_groups_cover_every_row_once_and_pack_back_to_back() {
        let rows = |isa, n| {
            let (g, at) = groups(isa, n, 10);
            let sizes: Vec<(usize, usize, usize)> =
                g.iter().map(|g| (g.row0, g.rows, g.at)).collect();
            (sizes, at, g.iter().map(|g| g.shape).collect::<Vec<_>>())
        };
        // AVX2, 40 rows: 16 + 16 + 8, packed [10, 16], [10, 16], [10, 8] one after the other.
        let (sizes, at, shapes) = rows(Isa::Avx2, 40);
        assert_eq!(sizes, [(0, 16, 0), (16, 16, 160), (32, 8, 320)]);
        assert_eq!(at, 400);
        assert_eq!(shapes, [(8, 2, 6), (8, 2, 6), (8, 1, 12)]);
        // 16 rows or fewer: one group, as before the groups.
        assert_eq!(rows(Isa::Avx2, 16).0, [(0, 16, 0)]);
        assert_eq!(rows(Isa::Avx2, 5).1, 80);
        // AVX-512 takes all 64 rows in one group (32 registers); the scalar tiles 8 at a time.
        assert_eq!(rows(Isa::Avx512, 64).0, [(0, 64, 0)]);
        assert_eq!(
            rows(Isa::Scalar, 20).0,
            [(0, 8, 0), (8, 8, 80), (16, 4, 160)]
        );
        // Blocks are whole tiles of every group: lcm of the tile heights.
        assert_eq!(lcm(6, 12), 12);
        assert_eq!(lcm(4, 6), 12);
    }

    #[test]
    fn the_unzeroed_output_equals_the_zeroed_one() {
        let (k, out) = (40, 70);
        let w = values(out * k, 9);
        for n in [7, 16, 33, 64, 65] {
            let x = values(n * k, n as u64);
            let mut want = vec![0f32; n * out];
            few_rows(&x, &w, n, k, out, &mut want);
            let got = few_rows_vec(&x, WeightRows::F32(&w), n, k, out);
            assert_eq!(got, want, "n {n}");
        }
        assert!(few_rows_vec(&[1.0], WeightRows::F32(&w), 2, k, out).is_empty());
    }

    #[test]
    fn the_vector_pack_equals_the_portable_one() {
        for (rows, k, lanes) in [
            (32, 576, 32),
            (30, 37, 32),
            (17, 16, 32),
            (64, 100, 64),
            (5, 3, 16),
        ] {
            let x = values(rows * k, 3);
            let mut want = vec![f32::NAN; k * lanes];
            pack_portable(&x, rows, k, lanes, &mut want);
            let mut got = vec![f32::NAN; k * lanes];
            pack(&x, rows, k, lanes, &mut got);
            assert_eq!(got, want, "rows {rows} k {k} lanes {lanes}");
            assert_eq!(want[(k - 1) * lanes + rows - 1], x[(rows - 1) * k + k - 1]);
        }
    }

    #[test]
    fn pack_transposes_the_rows_and_zeroes_the_padding_over_stale_contents() {
        // 3 rows of k = 4 into 8 lanes, over a buffer left full of another call's values.
        let x: Vec<f32> = (0..12).map(|v| v as f32 + 1.0).collect();
        let mut xt = vec![f32::NAN; 40];
        pack(&x, 3, 4, 8, &mut xt);
        for kk in 0..4 {
            let want = [x[kk], x[4 + kk], x[8 + kk], 0.0, 0.0, 0.0, 0.0, 0.0];
            assert_eq!(xt[kk * 8..(kk + 1) * 8], want, "kk {kk}");
        }
        assert!(xt[32..].iter().all(|v| v.is_nan()), "wrote past k * lanes");
    }

    #[test]
    fn small_product_by_hand() {
        // x = [[1, 2, 3], [4, 5, 6]], w = [[1, 0, -1], [0.5, 0.5, 0.5]]:
        // y = [[1 - 3, 0.5 + 1 + 1.5], [4 - 6, 2 + 2.5 + 3]] = [[-2, 3], [-2, 7.5]].
        let x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let w = [1.0, 0.0, -1.0, 0.5, 0.5, 0.5];
        for isa in isas() {
            let mut y = [0f32; 4];
            few_rows_with(
                isa,
                &x,
                WeightRows::F32(&w),
                2,
                3,
                2,
                SyncPtr(y.as_mut_ptr()),
            );
            assert_eq!(y, [-2.0, 3.0, -2.0, 7.5], "{isa:?}");
        }
    }
}
