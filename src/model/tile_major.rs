//! A decoding copy of an f32 weight: its rows in bands of [`BAND`], each band stored `kk`-major
//! (`band[kk][r]`), so that the few-row tiles of batched decoding ([`super::tile`]) read one
//! sequential stream per band instead of `MR` rows side by side.
//!
//! Why: the row-major tiles read 8-12 weight rows at once per thread, each line brought in by a
//! software prefetch that holds one of the core's few L1 miss buffers; on the Intel Xeon
//! (family 6 model 167) 16-row products streamed f32 weights at ~15 GB/s where one sequential
//! stream reaches ~22. A band read in order, with a prefetch 2 KiB ahead, streamed at 17.6
//! against 14.9 GB/s in a harness of 80 matrices of 1536 x 576 (2026-12-04). The arithmetic is
//! the row-major tiles' to the bit: every output is the same chain of fused multiply-adds in
//! increasing `kk`.
//!
//! The copy doubles the memory of the weights it is made for, so [`super::linear::Linear`]
//! makes it only when a product has [`MIN_ROWS`] to [`super::tile::MAX_LANES`] input rows
//! (batched decoding), for f32 weights, on AVX-512 CPUs, unless `REALIGN_DECODE_COPY=off`
//! ([`available`]), and keeps it with the id of the weight it was made from (a replaced weight
//! gets a new copy). A batch-16 decoding step of SmolLM2-135M: 41.2 -> 37.1 ms (three runs each,
//! `examples/decode_profile.rs`).

use std::sync::{Arc, Mutex};

use candle_core::{Storage, Tensor};

use super::parallel::Pool;

/// Rows per band: one tile's rows (8), so that the tile reading a band uses all of every line
/// it brings in. (Bands of 24 rows, read by two or three tiles of 8-12 rows each, made a
/// batch-16 step slower than the row-major tiles: the first tile of a band streamed three
/// times the bytes it used.)
pub const BAND: usize = 8;

/// Fewest input rows that use the copy: from 9 rows on the tiles are 16-lane AVX-512 ones (up
/// to 8 rows, the row-major path's 8-lane AVX2 tiles of 12 rows).
pub const MIN_ROWS: usize = 9;

/// The tile for `n` input rows (`MIN_ROWS..=64`): (16-lane vectors per `kk`, rows of the band
/// per tile). 8 rows with up to three vectors (24 accumulators); with four vectors 8 rows would
/// need 32 accumulators, more than the registers, so two tiles of 4 rows, the second reading
/// the band from L1.
fn shape(n: usize) -> (usize, usize) {
    match n {
        0..=16 => (1, 8),
        17..=32 => (2, 8),
        33..=48 => (3, 8),
        _ => (4, 4),
    }
}

/// An `[out, k]` weight as bands of [`BAND`] rows, each `[k][BAND]`; rows past `out` (the last
/// band's padding) are zeros.
#[derive(Debug)]
pub struct TileMajor {
    data: Vec<f32>,
    out: usize,
    k: usize,
}

impl TileMajor {
    /// The copy of `w` (`[out, k]`, row-major). `None` when `w` is shorter than that.
    pub fn new(w: &[f32], out: usize, k: usize) -> Option<Self> {
        if w.len() < out * k {
            return None;
        }
        let bands = out.div_ceil(BAND);
        let mut data = vec![0f32; bands * BAND * k];
        for (b, band) in data.chunks_exact_mut(BAND * k).enumerate() {
            for r in 0..BAND.min(out - b * BAND) {
                let row = &w[(b * BAND + r) * k..][..k];
                for (kk, &v) in row.iter().enumerate() {
                    band[kk * BAND + r] = v;
                }
            }
        }
        Some(Self { data, out, k })
    }

    /// `(out, k)` of the weight it copies.
    pub fn shape(&self) -> (usize, usize) {
        (self.out, self.k)
    }
}

/// A [`super::linear::Linear`]'s decoding copy, made on first use and kept with the id of the
/// weight it copies. Cloning a module gives its clone an empty one (made again if used).
#[derive(Default)]
pub struct DecodeCopy(Mutex<Option<(candle_core::TensorId, Arc<TileMajor>)>>);

impl Clone for DecodeCopy {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl std::fmt::Debug for DecodeCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let made = self.0.lock().map(|c| c.is_some()).unwrap_or(false);
        write!(f, "DecodeCopy({})", if made { "made" } else { "none" })
    }
}

impl DecodeCopy {
    /// The copy of `w` (a contiguous f32 CPU tensor `[out, k]`), made now if there is none for
    /// this tensor. `None` when `w` is not such a tensor.
    pub fn of(&self, w: &Tensor) -> Option<Arc<TileMajor>> {
        let mut slot = self.0.lock().ok()?;
        if let Some((id, tm)) = slot.as_ref() {
            if *id == w.id() {
                return Some(tm.clone());
            }
        }
        let (out, k) = w.dims2().ok()?;
        let tm = {
            let (s, l) = w.storage_and_layout();
            let Storage::Cpu(c) = &*s else { return None };
            let (a, b) = l.contiguous_offsets()?;
            TileMajor::new(&c.as_slice::<f32>().ok()?[a..b], out, k)?
        };
        let tm = Arc::new(tm);
        *slot = Some((w.id(), tm.clone()));
        Some(tm)
    }
}

/// Whether batched decoding uses band copies: the CPU runs their kernels (AVX-512F) and
/// `REALIGN_DECODE_COPY` is not `off` (which saves the copies' memory, a second copy of every
/// f32 weight that batched decoding multiplies, for ~10 % slower batched steps).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let off = *OFF.get_or_init(|| {
            std::env::var("REALIGN_DECODE_COPY").is_ok_and(|v| v.eq_ignore_ascii_case("off"))
        });
        !off && std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `x W^T` for `x: [n, k]` and the copy of `W`: `[n, out]` row-major, equal to the bit to
/// [`super::tile::few_rows`] on the row-major weight. `None` unless [`available`] and
/// [`MIN_ROWS`] `<= n <=` [`super::tile::MAX_LANES`], or when `x` is shorter than `n * k`.
pub fn few_rows(x: &[f32], tm: &TileMajor, n: usize) -> Option<Vec<f32>> {
    #[cfg(target_arch = "x86_64")]
    {
        if !(MIN_ROWS..=super::tile::MAX_LANES).contains(&n) || !available() {
            return None;
        }
        let (out, k) = (tm.out, tm.k);
        if x.len() < n * k {
            return None;
        }
        let (nb, mr) = shape(n);
        let lanes = 16 * nb;
        // Every element is written below: no zero fill first.
        let mut y = Vec::<f32>::with_capacity(n * out);
        super::tile::with_packed(x, n, k, lanes, |xt| {
            let bands = out.div_ceil(BAND);
            // ~128 KiB of weights per part, in whole bands.
            let per = ((32_768 / k.max(1)) / BAND).max(1);
            let yp = YPtr(y.as_mut_ptr());
            Pool::global().run(bands.div_ceil(per), &|p| {
                let yp = &yp;
                let mut acc = [0f32; BAND * super::tile::MAX_LANES];
                for b in p * per..((p + 1) * per).min(bands) {
                    let band = &tm.data[b * BAND * k..(b + 1) * BAND * k];
                    for (s, r0) in (0..BAND).step_by(mr).enumerate() {
                        // SAFETY: the CPU has AVX-512F (`available`); `xt` holds `k * lanes`
                        // packed inputs, the band `BAND * k` weights (rows `r0..r0 + mr`,
                        // within it), and `acc` room for `BAND * lanes` outputs.
                        unsafe {
                            x86::band_tile(
                                (mr, nb, s == 0),
                                xt.as_ptr(),
                                band.as_ptr().add(r0),
                                k,
                                acc.as_mut_ptr().add(r0 * lanes),
                            )
                        };
                    }
                    let j0 = b * BAND;
                    let rows = BAND.min(out - j0);
                    for i in 0..n {
                        for r in 0..rows {
                            // SAFETY: part `p` writes only the columns of its bands, each once;
                            // `y` has room for `n * out` values and outlives `run`. A raw
                            // write: the value is uninitialised.
                            unsafe { yp.0.add(i * out + j0 + r).write(acc[r * lanes + i]) };
                        }
                    }
                }
            });
        });
        // SAFETY: the bands cover the columns `0..out` and each writes its columns of all `n`
        // rows, so all `n * out` values are written.
        unsafe { y.set_len(n * out) };
        Some(y)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (x, tm, n);
        None
    }
}

struct YPtr(*mut f32);
// SAFETY: only for disjoint writes inside `Pool::run`, which returns after all of them.
unsafe impl Sync for YPtr {}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::BAND;
    use crate::model::prefetch::Hint;
    use crate::model::tile::x86::laid;

    /// One tile of `mr` rows of a band (from `w`, its first row's element at `kk = 0`) and `nb`
    /// vectors of 16 lanes, by the tiles' AVX-512 kernel in the band layout. The first tile of a
    /// band (`lead`) prefetches the band ahead; a second tile of the band reads it from L1.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `xt` holds `k * 16 * nb` floats, the band `BAND * k` from the band's
    /// start, and `acc` room for `mr * 16 * nb`.
    pub unsafe fn band_tile(
        (mr, nb, lead): (usize, usize, bool),
        xt: *const f32,
        w: *const f32,
        k: usize,
        acc: *mut f32,
    ) {
        const T0: i32 = Hint::T0.code();
        const OFF: i32 = Hint::Off.code();
        macro_rules! go {
            ($mr:literal, $nb:literal) => {
                if lead {
                    laid::<$mr, $nb, T0, BAND>(xt, w, k, acc)
                } else {
                    laid::<$mr, $nb, OFF, BAND>(xt, w, k, acc)
                }
            };
        }
        match (mr, nb) {
            (8, 1) => go!(8, 1),
            (8, 2) => go!(8, 2),
            (8, 3) => go!(8, 3),
            (4, 4) => go!(4, 4),
            _ => unreachable!("tile shapes come from `shape`"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    /// Every row count the copy serves, on shapes that end in a partial band, gives the
    /// row-major tiles' result to the bit.
    #[test]
    fn the_band_copy_equals_the_row_major_tiles_to_the_bit() {
        if !available() {
            return;
        }
        for (out, k) in [(50, 37), (24, 16), (97, 129), (8, 5)] {
            let w = values(out * k, out as u64);
            let tm = TileMajor::new(&w, out, k).unwrap();
            assert_eq!(tm.shape(), (out, k));
            for n in MIN_ROWS..=super::super::tile::MAX_LANES {
                let x = values(n * k, n as u64 + 3);
                let mut want = vec![0f32; n * out];
                super::super::tile::few_rows(&x, &w, n, k, out, &mut want);
                let got = few_rows(&x, &tm, n).unwrap();
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "out {out} k {k} n {n}");
            }
            assert!(few_rows(&values(8 * k, 1), &tm, 8).is_none());
            assert!(few_rows(&values(65 * k, 1), &tm, 65).is_none());
        }
    }

    #[test]
    fn a_copy_is_kept_per_weight_and_remade_for_another() {
        let dev = candle_core::Device::Cpu;
        let w1 = Tensor::from_vec(values(48 * 8, 1), (48, 8), &dev).unwrap();
        let w2 = Tensor::from_vec(values(48 * 8, 2), (48, 8), &dev).unwrap();
        let copy = DecodeCopy::default();
        let a = copy.of(&w1).unwrap();
        assert!(Arc::ptr_eq(&a, &copy.of(&w1).unwrap()));
        let b = copy.of(&w2).unwrap();
        assert!(!Arc::ptr_eq(&a, &b));
        assert_eq!(b.data[..BAND * 8][1], values(48 * 8, 2)[8]);
        assert!(copy.clone().0.lock().unwrap().is_none());
    }
}
