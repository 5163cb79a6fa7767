//! The `r x r` Gram products behind the layer similarity (paper Eq. 8), fused with the masks.
//!
//! For one LoRA factor of a module and its mask, the masked reference and fine-tuned factors
//! are stacked side by side, `Z = [M ⊙ X_e | M ⊙ X_t]` (`[d, 2r]`, `d` = `out` for B and `in`
//! for A), and the one symmetric product `H = Zᵀ Z` (`[2r, 2r]`) is computed, lower triangle
//! only (a `syrk`): its blocks are `X_eᵀ X_e`, `X_tᵀ X_t` and `X_tᵀ X_e`, every product the
//! similarity needs, in `4 d r²` flops instead of the `6 d r²` of three separate products.
//!
//! The product is blocked for the caches: `Z` is packed (masked, transposed where needed) `KC`
//! rows at a time into strips of 32 columns, and an AVX-512 micro-kernel (AVX2/FMA, or portable
//! Rust, where the CPU lacks it) accumulates 32 x 8 tiles of `H` in f32 registers over a block;
//! the tiles
//! are summed across blocks in f64.

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
pub fn stacked_gram(
    e: &[f32],
    t: &[f32],
    m: &[f32],
    d: usize,
    r: usize,
    layout: Layout,
) -> StackedGram {
    stacked_gram_with(e, t, m, d, r, layout, has_simd())
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
    debug_assert!(e.len() == d * r && t.len() == d * r && m.len() == d * r);
    let w = (2 * r).div_ceil(MR) * MR;
    let strips = w / MR;
    let mut h = vec![0f64; w * w];
    let mut z = vec![0f32; strips * KC * MR];
    let mut tile = [0f32; MR * NR];
    let mut k0 = 0;
    let mut mask_sum = 0.0;
    while k0 < d {
        let kc = KC.min(d - k0);
        mask_sum += pack(&mut z, e, t, m, d, r, k0, kc, layout);
        for si in 0..strips {
            let xs = &z[si * KC * MR..];
            let mut j0 = 0;
            while j0 < si * MR + MR {
                let (sj, jo) = (j0 / MR, j0 % MR);
                let bs = &z[sj * KC * MR + jo..];
                micro(xs, bs, kc, &mut tile, simd);
                for jj in 0..NR {
                    let row = &mut h[(j0 + jj) * w + si * MR..][..MR];
                    for (acc, v) in row.iter_mut().zip(&tile[jj * MR..(jj + 1) * MR]) {
                        *acc += f64::from(*v);
                    }
                }
                j0 += NR;
            }
        }
        k0 += kc;
    }
    StackedGram {
        r,
        ld: w,
        h,
        mask_sum,
    }
}

/// Packs rows `k0..k0+kc` of `Z` into strips: `z[s][k][c] = Z[k0 + k][s * 32 + c]`, zero past
/// column 2r. Returns the sum of the mask values read.
#[allow(clippy::too_many_arguments)]
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
    let w = z.len() / (KC * MR) * MR;
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
                for col in 2 * r..w {
                    put(col, k, 0.0);
                }
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
            for col in 2 * r..w {
                for k in 0..kc {
                    put(col, k, 0.0);
                }
            }
        }
    }
    sum
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

/// `tile[jj * 32 + ii] = Σ_{k < kc} xs[k * 32 + ii] · bs[k * 32 + jj]` (strips of 32).
#[inline]
fn micro(xs: &[f32], bs: &[f32], kc: usize, tile: &mut [f32; MR * NR], simd: Simd) {
    #[cfg(target_arch = "x86_64")]
    match simd {
        // SAFETY: the CPU has the features (checked at run time).
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 => unsafe { micro_avx512(xs, bs, kc, tile) },
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => unsafe { micro_avx2(xs, bs, kc, tile) },
        _ => micro_portable(xs, bs, kc, tile),
    }
    micro_portable(xs, bs, kc, tile);
}

/// The micro-kernel in AVX-512 registers: 32 x 8 accumulators in 16 zmm, per row of the
/// strips two loads and eight broadcasts for sixteen fused multiply-adds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn micro_avx512(xs: &[f32], bs: &[f32], kc: usize, tile: &mut [f32; MR * NR]) {
    use std::arch::x86_64::*;
    assert!(kc > 0 && xs.len() >= kc * MR && bs.len() >= (kc - 1) * MR + NR);
    let (xs, bs) = (xs.as_ptr(), bs.as_ptr());
    let mut c = [[_mm512_setzero_ps(); 2]; NR];
    for k in 0..kc {
        // in bounds by the assertion above
        let x = xs.add(k * MR);
        let x0 = _mm512_loadu_ps(x);
        let x1 = _mm512_loadu_ps(x.add(16));
        let b = bs.add(k * MR);
        for (jj, cj) in c.iter_mut().enumerate() {
            let bj = _mm512_set1_ps(*b.add(jj));
            cj[0] = _mm512_fmadd_ps(x0, bj, cj[0]);
            cj[1] = _mm512_fmadd_ps(x1, bj, cj[1]);
        }
    }
    for (jj, cj) in c.iter().enumerate() {
        _mm512_storeu_ps(tile.as_mut_ptr().add(jj * MR), cj[0]);
        _mm512_storeu_ps(tile.as_mut_ptr().add(jj * MR + 16), cj[1]);
    }
}

/// The micro-kernel in AVX2 registers, for CPUs without AVX-512: the 32 x 8 tile as four
/// 32 x 2 passes (8 ymm accumulators each).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn micro_avx2(xs: &[f32], bs: &[f32], kc: usize, tile: &mut [f32; MR * NR]) {
    use std::arch::x86_64::*;
    assert!(kc > 0 && xs.len() >= kc * MR && bs.len() >= (kc - 1) * MR + NR);
    let (xs, bs) = (xs.as_ptr(), bs.as_ptr());
    for j0 in (0..NR).step_by(2) {
        let mut c = [[_mm256_setzero_ps(); 4]; 2];
        for k in 0..kc {
            // in bounds by the assertion above
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
            for (h, v) in cj.iter().enumerate() {
                _mm256_storeu_ps(tile.as_mut_ptr().add((j0 + jj) * MR + 8 * h), *v);
            }
        }
    }
}

/// The portable micro-kernel (what [`micro_avx512`] computes).
fn micro_portable(xs: &[f32], bs: &[f32], kc: usize, tile: &mut [f32; MR * NR]) {
    let mut acc = [[0f32; MR]; NR];
    for (x, b) in xs[..kc * MR].chunks_exact(MR).zip(bs.chunks(MR)) {
        let x: &[f32; MR] = x.try_into().expect("a strip row");
        let b: &[f32; NR] = b[..NR].try_into().expect("a tile row");
        for jj in 0..NR {
            for ii in 0..MR {
                acc[jj][ii] += x[ii] * b[jj];
            }
        }
    }
    for jj in 0..NR {
        tile[jj * MR..(jj + 1) * MR].copy_from_slice(&acc[jj]);
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

    #[test]
    #[ignore = "timing"]
    fn kernel_speed() {
        let (d, r) = (14336, 128);
        let (e, t) = (vals(d * r, 1), vals(d * r, 2));
        let m = vec![1f32; d * r];
        for simd in [Simd::Avx512, Simd::Avx2] {
            for layout in [Layout::RowMajorDR, Layout::RowMajorRD] {
                let c0 = crate::bench::process_usage();
                let w = std::time::Instant::now();
                let g = stacked_gram_with(&e, &t, &m, d, r, layout, simd);
                let c1 = crate::bench::process_usage();
                let cpu = c1.0 - c0.0 + c1.1 - c0.1;
                let gf = 2.0 * stacked_gram_fmas(d, r) as f64 * 1e-9;
                eprintln!(
                    "{simd:?} {layout:?}: {:.3} s wall {:.3} s cpu {:.1} GFLOP/s per cpu-s ({})",
                    w.elapsed().as_secs_f64(),
                    cpu,
                    gf / cpu,
                    g.mask_sum
                );
            }
        }
    }

    #[test]
    fn every_micro_kernel_the_cpu_has_gives_the_portable_tile() {
        let kc = 37;
        let xs = vals(kc * MR, 5);
        let bs = vals(kc * MR, 6);
        let mut want = [0f32; MR * NR];
        micro_portable(&xs, &bs[8..], kc, &mut want);
        for simd in [Simd::Avx512, Simd::Avx2] {
            if simd == Simd::Avx512 && has_simd() != Simd::Avx512
                || simd == Simd::Avx2 && has_simd() == Simd::None
            {
                continue;
            }
            let mut got = [0f32; MR * NR];
            micro(&xs, &bs[8..], kc, &mut got, simd);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-4, "{simd:?}: {g} vs {w}");
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
                let g = stacked_gram(&e, &t, &m, d, r, layout);
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
