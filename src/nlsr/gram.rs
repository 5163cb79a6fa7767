//! The `r x r` Gram products behind the layer similarity (paper Eq. 8), fused with the masks.
//!
//! For one LoRA factor of a module and its mask, the masked reference and fine-tuned factors
//! are stacked side by side, `Z = [M ⊙ X_e | M ⊙ X_t]` (`[d, 2r]`, `d` = `out` for B and `in`
//! for A), and the one symmetric product `H = Zᵀ Z` (`[2r, 2r]`) is computed, lower triangle
//! only (a `syrk`): its blocks are `X_eᵀ X_e`, `X_tᵀ X_t` and `X_tᵀ X_e`, every product the
//! similarity needs, in `4 d r²` flops instead of the `6 d r²` of three separate products.
//!
//! The product is blocked for the caches: `Z` is packed (masked, transposed where needed) `KC`
//! rows at a time into strips of 32 columns (128 KB for r 128, in L2), and every tile of the
//! lower triangle runs over that block before the next is packed. An AVX-512 micro-kernel
//! (AVX2/FMA, or portable Rust, where the CPU lacks it) accumulates a 32 x 8 tile of `H` in f32
//! registers over the block's rows and adds it into `H` in f64 straight from the registers.
//! With AVX-512 the packing is vectorised too: `[d, r]` factors 16 columns at a time, `[r, d]`
//! factors masked row by row into a scratch and transposed 16 x 16 in registers (ranks that are
//! multiples of 16; others pack in scalar code).

use super::NlsrError;

/// Rows of `Z` packed per block.
const KC: usize = 128;
/// Columns of a strip (rows of a tile).
const MR: usize = 32;
/// Columns of a tile.
const NR: usize = 8;

/// How a factor is laid out in memory (row-major).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `[d, r]`: lora_B, `[out, r]`; a row of Z is a row of the factor.
    RowMajorDR,
    /// `[r, d]`: lora_A, `[r, in]`; a row of Z is a column of the factor.
    RowMajorRD,
}

/// The lower triangle of `H = Zᵀ Z`, `Z = [m ⊙ e | m ⊙ t]`, in f64.
#[derive(Debug, Clone)]
pub struct StackedGram {
    /// The rank r.
    pub r: usize,
    /// The row stride of `h` (2r rounded up to a multiple of 32).
    ld: usize,
    /// `h[j * ld + i] = Σ_k Z[k][i] Z[k][j]`, valid for `i >= j` (and some `i < j`).
    h: Vec<f64>,
    /// The sum of the mask's values (its number of ones), read while packing.
    pub mask_sum: f64,
}

impl StackedGram {
    /// `H[i][j]` for `i >= j` (`i`, `j` < 2r).
    #[inline]
    fn at(&self, i: usize, j: usize) -> f64 {
        self.h[j * self.ld + i]
    }

    /// `X_eᵀ X_e` (`which` 0), `X_tᵀ X_t` (1) or their cross product `X_eᵀ X_t` (2), entry
    /// `(a, b)`, `a`, `b` < r. The Gram blocks are symmetric; the cross block is not.
    #[inline]
    pub fn block(&self, which: usize, a: usize, b: usize) -> f64 {
        let r = self.r;
        match which {
            0 => self.at(a.max(b), a.min(b)),
            1 => self.at(r + a.max(b), r + a.min(b)),
            _ => self.at(r + b, a),
        }
    }
}

/// Multiply-adds done by [`stacked_gram`] for a factor of `d` rows of rank `r` (the lower
/// triangle of the `[2r, 2r]` product at tile granularity): twice this is its flop count.
pub fn stacked_gram_fmas(d: usize, r: usize) -> u64 {
    let w = (2 * r).div_ceil(MR) * MR;
    let mut tiles = 0u64;
    for s in 0..w / MR {
        tiles += ((s * MR + MR) / NR) as u64;
    }
    tiles * (MR * NR) as u64 * d as u64
}

/// `H = Zᵀ Z` for `Z = [m ⊙ e | m ⊙ t]`, lower triangle, in f64 (see the module doc).
///
/// # Shapes
/// - e, t, m: `d x r` values laid out as `layout` says -> `[2r, 2r]` (lower triangle).
///
/// # Errors
/// [`NlsrError::FactorLength`] when a slice does not hold `d · r` values.
pub fn stacked_gram(
    e: &[f32],
    t: &[f32],
    m: &[f32],
    d: usize,
    r: usize,
    layout: Layout,
) -> Result<StackedGram, NlsrError> {
    for (what, v) in [("reference", e), ("fine-tuned", t), ("mask", m)] {
        if Some(v.len()) != d.checked_mul(r) {
            return Err(NlsrError::FactorLength {
                what: what.into(),
                rows: d,
                cols: r,
                got: v.len(),
            });
        }
    }
    Ok(stacked_gram_with(e, t, m, d, r, layout, has_simd()))
}

fn stacked_gram_with(
    e: &[f32],
    t: &[f32],
    m: &[f32],
    d: usize,
    r: usize,
    layout: Layout,
    simd: Simd,
) -> StackedGram {
    assert!(e.len() == d * r && t.len() == d * r && m.len() == d * r);
    let w = (2 * r).div_ceil(MR) * MR;
    let mut h = vec![0f64; w * w];
    let mask_sum = match simd {
        // SAFETY: the CPU has the features (checked at run time, or by the caller's test).
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 => unsafe { gram_avx512(&mut h, e, t, m, d, r, layout) },
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => unsafe { gram_avx2(&mut h, e, t, m, d, r, layout) },
        _ => drive(&mut h, e, t, m, d, r, layout, pack, micro_portable),
    };
    StackedGram {
        r,
        ld: w,
        h,
        mask_sum,
    }
}

/// The blocked product: for each block of `KC` rows of `Z`, packs it once (`pack`) and runs
/// every tile of the lower triangle over it (`tile`, which adds its f32 block sums into `h` in
/// f64). Returns the sum of the mask.
///
/// The whole `Z` block (`KC x 2r` f32, 128 KB for r 128) stays in L2; a 32-column strip of it
/// (16 KB) stays in L1 while the tiles of its row of `H` stream the other strips.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn drive(
    h: &mut [f64],
    e: &[f32],
    t: &[f32],
    m: &[f32],
    d: usize,
    r: usize,
    layout: Layout,
    pack: impl Fn(&mut [f32], &[f32], &[f32], &[f32], usize, usize, usize, usize, Layout) -> f64,
    tile: impl Fn(&[f32], &[f32], usize, &mut [f64], usize),
) -> f64 {
    let w = (2 * r).div_ceil(MR) * MR;
    let strips = w / MR;
    // columns past 2r stay zero: the packing never writes them
    let mut z = vec![0f32; strips * KC * MR];
    let mut k0 = 0;
    let mut mask_sum = 0.0;
    while k0 < d {
        let kc = KC.min(d - k0);
        mask_sum += pack(&mut z, e, t, m, d, r, k0, kc, layout);
        for si in 0..strips {
            let xs = &z[si * KC * MR..][..kc * MR];
            for j0 in (0..si * MR + MR).step_by(NR) {
                let (sj, jo) = (j0 / MR, j0 % MR);
                let bs = &z[sj * KC * MR + jo..][..(kc - 1) * MR + NR];
                tile(xs, bs, kc, &mut h[j0 * w + si * MR..], w);
            }
        }
        k0 += kc;
    }
    mask_sum
}

/// [`drive`] with the AVX-512 packing and micro-kernel.
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn gram_avx512(
    h: &mut [f64],
    e: &[f32],
    t: &[f32],
    m: &[f32],
    d: usize,
    r: usize,
    layout: Layout,
) -> f64 {
    drive(
        h,
        e,
        t,
        m,
        d,
        r,
        layout,
        // SAFETY: the CPU has AVX-512F (this function's contract).
        |z, e, t, m, d, r, k0, kc, l| unsafe { pack_avx512(z, e, t, m, d, r, k0, kc, l) },
        |xs, bs, kc, h, ld| unsafe { micro_avx512(xs, bs, kc, h, ld) },
    )
}

/// [`drive`] with the AVX2 micro-kernel (and the portable packing, compiled for AVX2).
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn gram_avx2(
    h: &mut [f64],
    e: &[f32],
    t: &[f32],
    m: &[f32],
    d: usize,
    r: usize,
    layout: Layout,
) -> f64 {
    drive(
        h,
        e,
        t,
        m,
        d,
        r,
        layout,
        pack,
        // SAFETY: the CPU has AVX2 and FMA (this function's contract).
        |xs, bs, kc, h, ld| unsafe { micro_avx2(xs, bs, kc, h, ld) },
    )
}

/// Packs rows `k0..k0+kc` of `Z` into strips: `z[s][k][c] = Z[k0 + k][s * 32 + c]`; columns
/// from 2r on are left as they are (zero). Returns the sum of the mask values read.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn pack(
    z: &mut [f32],
    e: &[f32],
    t: &[f32],
    m: &[f32],
    d: usize,
    r: usize,
    k0: usize,
    kc: usize,
    layout: Layout,
) -> f64 {
    let mut sum = 0f64;
    let mut put = |col: usize, k: usize, v: f32| {
        z[(col / MR) * KC * MR + k * MR + col % MR] = v;
    };
    match layout {
        Layout::RowMajorDR => {
            for k in 0..kc {
                let o = (k0 + k) * r;
                let (er, tr, mr) = (&e[o..o + r], &t[o..o + r], &m[o..o + r]);
                let mut ones = 0f32;
                for i in 0..r {
                    put(i, k, er[i] * mr[i]);
                    put(r + i, k, tr[i] * mr[i]);
                    ones += mr[i];
                }
                sum += f64::from(ones);
            }
        }
        Layout::RowMajorRD => {
            for i in 0..r {
                let o = i * d + k0;
                let (er, tr, mr) = (&e[o..o + kc], &t[o..o + kc], &m[o..o + kc]);
                let mut ones = 0f32;
                for k in 0..kc {
                    put(i, k, er[k] * mr[k]);
                    put(r + i, k, tr[k] * mr[k]);
                    ones += mr[k];
                }
                sum += f64::from(ones);
            }
        }
    }
    sum
}

/// [`pack`] in AVX-512 registers, for ranks that are multiples of 16 (so that no group of 16
/// columns straddles two strips); other ranks go to [`pack`]. `[r, in]` factors are
/// transposed 16 x 16 in registers. The mask sum is exact for 0/1 masks (f32 lane sums).
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn pack_avx512(
    z: &mut [f32],
    e: &[f32],
    t: &[f32],
    m: &[f32],
    d: usize,
    r: usize,
    k0: usize,
    kc: usize,
    layout: Layout,
) -> f64 {
    use std::arch::x86_64::*;
    if r % 16 != 0 {
        return pack(z, e, t, m, d, r, k0, kc, layout);
    }
    let w = (2 * r).div_ceil(MR) * MR;
    assert!(kc <= KC && k0 + kc <= d && z.len() >= w / MR * KC * MR);
    assert!(e.len() >= d * r && t.len() >= d * r && m.len() >= d * r);
    let zp = z.as_mut_ptr();
    // where column `col` of row `k` of the block goes
    let at = |col: usize, k: usize| (col / MR) * KC * MR + k * MR + col % MR;
    let mut ones = _mm512_setzero_ps();
    match layout {
        Layout::RowMajorDR => {
            for k in 0..kc {
                let o = (k0 + k) * r;
                for i in (0..r).step_by(16) {
                    // in bounds: o + i + 16 <= d r (asserted); columns < w
                    let mv = _mm512_loadu_ps(m.as_ptr().add(o + i));
                    let ev = _mm512_loadu_ps(e.as_ptr().add(o + i));
                    let tv = _mm512_loadu_ps(t.as_ptr().add(o + i));
                    _mm512_storeu_ps(zp.add(at(i, k)), _mm512_mul_ps(ev, mv));
                    _mm512_storeu_ps(zp.add(at(r + i, k)), _mm512_mul_ps(tv, mv));
                    ones = _mm512_add_ps(ones, mv);
                }
            }
        }
        Layout::RowMajorRD => {
            // 16 rows of a factor at a time: masked into a contiguous scratch row by row
            // (sequential reads), then transposed 16 x 16 from there
            #[repr(align(64))]
            struct Scratch([f32; 16 * KC]);
            let mut scratch = Scratch([0f32; 16 * KC]);
            let sp = scratch.0.as_mut_ptr();
            let chunks = kc.div_ceil(16);
            let last = kc - 16 * (chunks - 1);
            let tail: __mmask16 = if last == 16 { 0xffff } else { (1 << last) - 1 };
            for i in (0..r).step_by(16) {
                for (src, col) in [(e, i), (t, r + i)] {
                    for c in 0..16 {
                        // in bounds: row i + c < r, columns k0 + (< kc) < d (asserted)
                        let o = (i + c) * d + k0;
                        let (sr, mr, dst) =
                            (src.as_ptr().add(o), m.as_ptr().add(o), sp.add(c * KC));
                        for q in 0..chunks {
                            let mask = if q + 1 == chunks { tail } else { 0xffff };
                            let mv = _mm512_maskz_loadu_ps(mask, mr.add(16 * q));
                            let v = _mm512_maskz_loadu_ps(mask, sr.add(16 * q));
                            _mm512_store_ps(dst.add(16 * q), _mm512_mul_ps(v, mv));
                            if col == i {
                                ones = _mm512_add_ps(ones, mv);
                            }
                        }
                    }
                    for q in 0..chunks {
                        let mut v = [_mm512_setzero_ps(); 16];
                        for (c, vc) in v.iter_mut().enumerate() {
                            *vc = _mm512_load_ps(sp.add(c * KC + 16 * q));
                        }
                        transpose16(&mut v);
                        let n = if q + 1 == chunks { last } else { 16 };
                        for (p, vp) in v.iter().enumerate().take(n) {
                            _mm512_storeu_ps(zp.add(at(col, 16 * q + p)), *vp);
                        }
                    }
                }
            }
        }
    }
    f64::from(_mm512_reduce_add_ps(ones))
}

/// Transposes 16 rows of 16 lanes in place: afterwards `v[j][i]` is the old `v[i][j]`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
fn transpose16(v: &mut [std::arch::x86_64::__m512; 16]) {
    use std::arch::x86_64::*;
    let mut t = [_mm512_setzero_ps(); 16];
    // pairs of rows interleaved within 128-bit lanes
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]);
    }
    // v[4i + q], lane L: rows 4i..4i+4 at column 4L + q
    let (lo, hi) = (
        |a: __m512, b: __m512| {
            _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)))
        },
        |a: __m512, b: __m512| {
            _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)))
        },
    );
    for i in 0..4 {
        v[4 * i] = lo(t[4 * i], t[4 * i + 2]);
        v[4 * i + 1] = hi(t[4 * i], t[4 * i + 2]);
        v[4 * i + 2] = lo(t[4 * i + 1], t[4 * i + 3]);
        v[4 * i + 3] = hi(t[4 * i + 1], t[4 * i + 3]);
    }
    // then the 128-bit lanes, twice
    for i in 0..2 {
        for q in 0..4 {
            t[8 * i + q] = _mm512_shuffle_f32x4::<0x88>(v[8 * i + q], v[8 * i + 4 + q]);
            t[8 * i + 4 + q] = _mm512_shuffle_f32x4::<0xdd>(v[8 * i + q], v[8 * i + 4 + q]);
        }
    }
    for j in 0..8 {
        v[j] = _mm512_shuffle_f32x4::<0x88>(t[j], t[8 + j]);
        v[8 + j] = _mm512_shuffle_f32x4::<0xdd>(t[j], t[8 + j]);
    }
}

/// The micro-kernel the CPU runs: [`micro_portable`]'s sum, added to `h` (see there).
#[cfg(test)]
fn micro(xs: &[f32], bs: &[f32], kc: usize, h: &mut [f64], ld: usize, simd: Simd) {
    match simd {
        // SAFETY: the CPU has the features (checked by the caller).
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 => unsafe { micro_avx512(xs, bs, kc, h, ld) },
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => unsafe { micro_avx2(xs, bs, kc, h, ld) },
        _ => micro_portable(xs, bs, kc, h, ld),
    }
}

/// The micro-kernel the CPU runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Simd {
    Avx512,
    Avx2,
    None,
}

fn has_simd() -> Simd {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") {
            return Simd::Avx512;
        }
        if has!("avx2") && has!("fma") {
            return Simd::Avx2;
        }
    }
    Simd::None
}

/// Checks the slices a micro-kernel reads and writes.
#[inline(always)]
fn check_tile(xs: &[f32], bs: &[f32], kc: usize, h: &[f64], ld: usize) {
    assert!(kc > 0 && xs.len() >= kc * MR && bs.len() >= (kc - 1) * MR + NR);
    assert!(ld >= MR && h.len() >= (NR - 1) * ld + MR);
}

/// The micro-kernel in AVX-512 registers: 32 x 8 accumulators in 16 zmm, per row of the
/// strips two loads and eight broadcasts for sixteen fused multiply-adds; the f32 sums are
/// widened and added into `h` in f64 from the registers.
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn micro_avx512(xs: &[f32], bs: &[f32], kc: usize, h: &mut [f64], ld: usize) {
    use std::arch::x86_64::*;
    check_tile(xs, bs, kc, h, ld);
    let (x, b, hp) = (xs.as_ptr(), bs.as_ptr(), h.as_mut_ptr());
    let mut c = [[_mm512_setzero_ps(); 2]; NR];
    for k in 0..kc {
        // in bounds by check_tile
        let x0 = _mm512_loadu_ps(x.add(k * MR));
        let x1 = _mm512_loadu_ps(x.add(k * MR + 16));
        let b = b.add(k * MR);
        for (jj, cj) in c.iter_mut().enumerate() {
            let bj = _mm512_set1_ps(*b.add(jj));
            cj[0] = _mm512_fmadd_ps(x0, bj, cj[0]);
            cj[1] = _mm512_fmadd_ps(x1, bj, cj[1]);
        }
    }
    for (jj, cj) in c.iter().enumerate() {
        let row = hp.add(jj * ld);
        for (half, v) in cj.iter().enumerate() {
            let lo = _mm512_cvtps_pd(_mm512_castps512_ps256(*v));
            let hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(
                _mm512_castps_pd(*v),
            )));
            let p = row.add(16 * half);
            _mm512_storeu_pd(p, _mm512_add_pd(_mm512_loadu_pd(p), lo));
            _mm512_storeu_pd(p.add(8), _mm512_add_pd(_mm512_loadu_pd(p.add(8)), hi));
        }
    }
}

/// The micro-kernel in AVX2 registers, for CPUs without AVX-512: the 32 x 8 tile as four
/// 32 x 2 passes (8 ymm accumulators each).
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn micro_avx2(xs: &[f32], bs: &[f32], kc: usize, h: &mut [f64], ld: usize) {
    use std::arch::x86_64::*;
    check_tile(xs, bs, kc, h, ld);
    let (xs, bs, hp) = (xs.as_ptr(), bs.as_ptr(), h.as_mut_ptr());
    for j0 in (0..NR).step_by(2) {
        let mut c = [[_mm256_setzero_ps(); 4]; 2];
        for k in 0..kc {
            // in bounds by check_tile
            let x = xs.add(k * MR);
            let xv = [
                _mm256_loadu_ps(x),
                _mm256_loadu_ps(x.add(8)),
                _mm256_loadu_ps(x.add(16)),
                _mm256_loadu_ps(x.add(24)),
            ];
            let b = bs.add(k * MR + j0);
            for (jj, cj) in c.iter_mut().enumerate() {
                let bj = _mm256_set1_ps(*b.add(jj));
                for (ch, xh) in cj.iter_mut().zip(&xv) {
                    *ch = _mm256_fmadd_ps(*xh, bj, *ch);
                }
            }
        }
        for (jj, cj) in c.iter().enumerate() {
            let row = hp.add((j0 + jj) * ld);
            for (q, v) in cj.iter().enumerate() {
                let lo = _mm256_cvtps_pd(_mm256_castps256_ps128(*v));
                let hi = _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(*v));
                let p = row.add(8 * q);
                _mm256_storeu_pd(p, _mm256_add_pd(_mm256_loadu_pd(p), lo));
                _mm256_storeu_pd(p.add(4), _mm256_add_pd(_mm256_loadu_pd(p.add(4)), hi));
            }
        }
    }
}

/// The portable micro-kernel (what [`micro_avx512`] computes, without fused multiply-adds):
/// `h[jj * ld + ii] += Σ_{k < kc} xs[k * 32 + ii] · bs[k * 32 + jj]`, the sum in f32.
fn micro_portable(xs: &[f32], bs: &[f32], kc: usize, h: &mut [f64], ld: usize) {
    check_tile(xs, bs, kc, h, ld);
    let mut acc = [[0f32; MR]; NR];
    for (x, b) in xs[..kc * MR].chunks_exact(MR).zip(bs.chunks(MR)) {
        // chunks of exactly MR (`chunks_exact`) and tiles of at least NR (`check_tile`)
        #[allow(clippy::expect_used)]
        let (x, b): (&[f32; MR], &[f32; NR]) = (
            x.try_into().expect("a strip row"),
            b[..NR].try_into().expect("a tile row"),
        );
        for jj in 0..NR {
            for ii in 0..MR {
                acc[jj][ii] += x[ii] * b[jj];
            }
        }
    }
    for (jj, a) in acc.iter().enumerate() {
        for (o, v) in h[jj * ld..][..MR].iter_mut().zip(a) {
            *o += f64::from(*v);
        }
    }
}

/// The three Frobenius inner products of Eq. 8 from the Grams of both factors:
/// `(<W'_e, W'_e>, <W'_t, W'_t>, <W'_e, W'_t>)` with `<P_1 Q_1, P_2 Q_2> = Σ (P_1ᵀ P_2) ⊙ (Q_1 Q_2ᵀ)`.
pub fn inner_products(gb: &StackedGram, ga: &StackedGram) -> (f64, f64, f64) {
    let r = gb.r;
    let sym = |which: usize| {
        let mut s = 0.0;
        for a in 0..r {
            s += gb.block(which, a, a) * ga.block(which, a, a);
            let mut off = 0.0;
            for b in 0..a {
                off += gb.block(which, a, b) * ga.block(which, a, b);
            }
            s += 2.0 * off;
        }
        s
    };
    let mut et = 0.0;
    for a in 0..r {
        for b in 0..r {
            et += gb.block(2, a, b) * ga.block(2, a, b);
        }
    }
    (sym(0), sym(1), et)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vals(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5
            })
            .collect()
    }

    /// Whether this CPU runs `simd`.
    fn has(simd: Simd) -> bool {
        match simd {
            Simd::Avx512 => has_simd() == Simd::Avx512,
            Simd::Avx2 => has_simd() != Simd::None,
            Simd::None => true,
        }
    }

    #[test]
    #[ignore = "timing"]
    fn kernel_speed() {
        // `GRAM_D=2048` for inputs that stay in the caches
        let (d, r) = (
            std::env::var("GRAM_D").map_or(14336, |v| v.parse().unwrap()),
            128,
        );
        let (e, t) = (vals(d * r, 1), vals(d * r, 2));
        let m = vec![1f32; d * r];
        // the micro-kernel alone, on one packed block that stays in L1: the attainable peak
        for simd in [Simd::Avx512, Simd::Avx2] {
            if !has(simd) {
                continue;
            }
            let (xs, bs) = (vals(KC * MR, 3), vals(KC * MR, 4));
            let mut h = vec![0f64; NR * MR];
            let n = 200_000;
            let c0 = crate::bench::process_usage();
            for _ in 0..n {
                micro(&xs, &bs, KC, &mut h, MR, simd);
            }
            let c1 = crate::bench::process_usage();
            let cpu = c1.0 - c0.0 + c1.1 - c0.1;
            let gf = n as f64 * 2.0 * (KC * MR * NR) as f64 * 1e-9;
            eprintln!(
                "{simd:?} micro-kernel alone: {:.1} GFLOP/s per cpu-s ({})",
                gf / cpu,
                h[7]
            );
        }
        for simd in [Simd::Avx512, Simd::Avx2] {
            if !has(simd) {
                continue;
            }
            for layout in [Layout::RowMajorDR, Layout::RowMajorRD] {
                // best of 10 runs of 8 products (the process's CPU time: run it alone)
                let (mut cpu, mut wall, mut sum) = (f64::INFINITY, f64::INFINITY, 0.0);
                for _ in 0..10 {
                    let c0 = crate::bench::process_usage();
                    let w = std::time::Instant::now();
                    for _ in 0..8 {
                        sum += stacked_gram_with(&e, &t, &m, d, r, layout, simd).mask_sum;
                    }
                    let c1 = crate::bench::process_usage();
                    cpu = cpu.min(c1.0 - c0.0 + c1.1 - c0.1);
                    wall = wall.min(w.elapsed().as_secs_f64());
                }
                let gf = 8.0 * 2.0 * stacked_gram_fmas(d, r) as f64 * 1e-9;
                eprintln!(
                    "{simd:?} {layout:?}: {wall:.3} s wall {cpu:.3} s cpu {:.1} GFLOP/s per cpu-s ({sum})",
                    gf / cpu,
                );
            }
        }
    }

    #[test]
    fn every_micro_kernel_the_cpu_has_gives_the_portable_tile() {
        let kc = 37;
        let xs = vals(kc * MR, 5);
        let bs = vals(kc * MR, 6);
        let ld = MR + 5;
        let start = vals(NR * ld, 7);
        let start: Vec<f64> = start.iter().map(|v| f64::from(*v)).collect();
        let mut want = start.clone();
        micro_portable(&xs, &bs[8..], kc, &mut want, ld);
        for simd in [Simd::Avx512, Simd::Avx2] {
            if !has(simd) {
                continue;
            }
            let mut got = start.clone();
            micro(&xs, &bs[8..], kc, &mut got, ld, simd);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((g - w).abs() < 1e-4, "{simd:?} {i}: {g} vs {w}");
            }
        }
    }

    #[test]
    fn every_path_the_cpu_has_gives_the_portable_gram() {
        // ranks that take the vector packing (multiples of 16) and others; row counts with
        // partial blocks of 128 and of 16
        for (d, r) in [(300, 16), (517, 48), (130, 64), (64, 3), (203, 40)] {
            let (e, t) = (vals(d * r, 11), vals(d * r, 12));
            let m: Vec<f32> = vals(d * r, 13)
                .iter()
                .map(|v| (*v > -0.2) as u8 as f32)
                .collect();
            for layout in [Layout::RowMajorDR, Layout::RowMajorRD] {
                let want = stacked_gram_with(&e, &t, &m, d, r, layout, Simd::None);
                for simd in [Simd::Avx512, Simd::Avx2] {
                    if !has(simd) {
                        continue;
                    }
                    let got = stacked_gram_with(&e, &t, &m, d, r, layout, simd);
                    assert_eq!(got.mask_sum, want.mask_sum, "{d} {r} {layout:?} {simd:?}");
                    for which in 0..3 {
                        for a in 0..r {
                            for b in 0..r {
                                let (g, w) = (got.block(which, a, b), want.block(which, a, b));
                                assert!(
                                    (g - w).abs() < 1e-4,
                                    "{d} {r} {layout:?} {simd:?} {which} {a} {b}: {g} vs {w}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn stacked_gram_matches_a_naive_product() {
        for (d, r) in [(300, 3), (517, 40), (64, 16)] {
            let (e, t) = (vals(d * r, 1), vals(d * r, 2));
            let m: Vec<f32> = vals(d * r, 3)
                .iter()
                .map(|v| (*v > 0.0) as u8 as f32)
                .collect();
            for layout in [Layout::RowMajorDR, Layout::RowMajorRD] {
                let at = |x: &[f32], k: usize, i: usize| match layout {
                    Layout::RowMajorDR => x[k * r + i],
                    Layout::RowMajorRD => x[i * d + k],
                };
                let z = |k: usize, c: usize| {
                    if c < r {
                        at(&e, k, c) as f64 * at(&m, k, c) as f64
                    } else {
                        at(&t, k, c - r) as f64 * at(&m, k, c - r) as f64
                    }
                };
                let g = stacked_gram(&e, &t, &m, d, r, layout).unwrap();
                for which in 0..3 {
                    for a in 0..r {
                        for b in 0..r {
                            let (ca, cb) = match which {
                                0 => (a, b),
                                1 => (r + a, r + b),
                                _ => (a, r + b),
                            };
                            let want: f64 = (0..d).map(|k| z(k, ca) * z(k, cb)).sum();
                            let got = g.block(which, a, b);
                            assert!(
                                (got - want).abs() < 1e-4,
                                "{d} {r} {layout:?} {which} {a} {b}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}
