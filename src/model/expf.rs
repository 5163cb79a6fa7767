//! `exp` on f32 vectors, to the bit of the C library's scalar `expf` that candle's ops call
//! (`f32::exp`), so that an op moved onto these vectors keeps every output bit: SwiGLU's
//! `silu(gate) · up` ([`silu_mul`]) and the attention softmax ([`softmax_row`]) of inference;
//! in training, SwiGLU forward and backward ([`sigmoid`]), the attention softmax and the loss
//! over the vocabulary ([`exp_in_place`]).
//!
//! The algorithm is the table-driven one of glibc (since 2.27) and musl, from ARM's optimized
//! routines: in double precision, `x · 32 / ln 2 = k + r` with `k` an integer (rounded by adding
//! `1.5 · 2^52`) and `|r| ≤ 1/2`; `exp(x) = 2^(k/32) · 2^(r/32)`, the first factor from a table of
//! the 32 values `2^(i/32)` with `k / 32` added to the exponent bits, the second a cubic in `r`;
//! the product rounded once to f32. Its double-precision error (~2^-33 relative) leaves the
//! final rounding the only one that matters, and it is the library's own.
//!
//! Bit equality with the host's `expf` is a fact about that library, not a theorem: a
//! different C library (or glibc before 2.27) may round differently. So [`available`] checks
//! once per process, on 65,536 inputs spread over the whole range where `exp` is neither 0 nor
//! infinite plus the edges and special values, that the vector path returns exactly what
//! `f32::exp` returns, and the callers fall back to `f32::exp` otherwise (and on CPUs without
//! AVX-512). `examples/expf_sweep.rs` compares all 2^32 inputs: none differ from glibc 2.36's
//! `expf` (Debian 12, x86-64 with FMA).

/// `2^(i/32)` rounded to f64, minus `i << 47` (the exponent bits that `k` adds back).
const TAB: [u64; 32] = [
    0x3ff0000000000000,
    0x3fefd9b0d3158574,
    0x3fefb5586cf9890f,
    0x3fef9301d0125b51,
    0x3fef72b83c7d517b,
    0x3fef54873168b9aa,
    0x3fef387a6e756238,
    0x3fef1e9df51fdee1,
    0x3fef06fe0a31b715,
    0x3feef1a7373aa9cb,
    0x3feedea64c123422,
    0x3feece086061892d,
    0x3feebfdad5362a27,
    0x3feeb42b569d4f82,
    0x3feeab07dd485429,
    0x3feea47eb03a5585,
    0x3feea09e667f3bcd,
    0x3fee9f75e8ec5f74,
    0x3feea11473eb0187,
    0x3feea589994cce13,
    0x3feeace5422aa0db,
    0x3feeb737b0cdc5e5,
    0x3feec49182a3f090,
    0x3feed503b23e255d,
    0x3feee89f995ad3ad,
    0x3feeff76f2fb5e47,
    0x3fef199bdd85529c,
    0x3fef3720dcef9069,
    0x3fef5818dcfba487,
    0x3fef7c97337b9b5f,
    0x3fefa4afa2a490da,
    0x3fefd0765b6e4540,
];
/// `32 / ln 2`.
const INV_LN2_N: f64 = f64::from_bits(0x40471547652b82fe);
/// `1.5 · 2^52`: adding it rounds to an integer, which lands in the low mantissa bits.
const SHIFT: f64 = f64::from_bits(0x4338000000000000);
/// The cubic `2^(r/32) ≈ 1 + C2 r + C1 r² + C0 r³`.
const C0: f64 = f64::from_bits(0x3ebc6af84b912394);
const C1: f64 = f64::from_bits(0x3f2ebfce50fac4f3);
const C2: f64 = f64::from_bits(0x3f962e42ff0c52d6);
/// Above this, `exp` overflows to infinity (`log(2^128)` rounded down).
const OVERFLOW: f32 = 88.72283;
/// Below this, `exp` rounds to 0 (`log(2^-150)` rounded up).
const UNDERFLOW: f32 = -103.97208;

/// The algorithm on one value, in scalar code (the vector path's specification; used by the
/// tests, not by the ops).
pub fn exp_scalar(x: f32) -> f32 {
    if x.is_nan() {
        return x + x;
    }
    if x > OVERFLOW {
        return f32::INFINITY;
    }
    if x < UNDERFLOW {
        return 0.0;
    }
    let xd = x as f64;
    let z = INV_LN2_N * xd;
    let kd = z + SHIFT;
    let ki = kd.to_bits();
    // (one rounding: the library's build fuses this product and difference; two roundings
    // differ from it on 2 of the 2^32 inputs)
    let r = INV_LN2_N.mul_add(xd, -(kd - SHIFT));
    let s = f64::from_bits(TAB[(ki % 32) as usize].wrapping_add(ki << 47));
    let y = C2.mul_add(r, 1.0);
    let y = C0.mul_add(r, C1).mul_add(r * r, y);
    (y * s) as f32
}

/// Whether the vector path runs here and equals `f32::exp` to the bit (checked once).
pub fn available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                let xs = probe_inputs();
                let mut ys = vec![0f32; xs.len()];
                // SAFETY: the CPU has AVX-512F.
                unsafe { x86::exp_slice(&xs, &mut ys) };
                return xs
                    .iter()
                    .zip(&ys)
                    .all(|(x, y)| x.exp().to_bits() == y.to_bits());
            }
        }
        false
    })
}

/// The inputs [`available`] checks: 65,536 values evenly spaced in bit pattern over
/// `[UNDERFLOW - 1, OVERFLOW + 1]` (both signs), and the edges and special values.
pub fn probe_inputs() -> Vec<f32> {
    let mut xs = vec![
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::MIN,
        f32::MAX,
        f32::MIN_POSITIVE,
        -f32::MIN_POSITIVE,
        OVERFLOW,
        UNDERFLOW,
        -88.0,
        88.0,
        // the two inputs where rounding `x · 32 / ln 2 - k` twice would differ from glibc
        32.564632,
        -63.09946,
    ];
    for (lo, hi) in [(0f32, OVERFLOW + 1.0), (-0f32, UNDERFLOW - 1.0)] {
        let (a, b) = (lo.to_bits() as u64, hi.to_bits() as u64);
        let step = (b - a) / 32_768;
        xs.extend((0..32_768u64).map(|i| f32::from_bits((a + i * step) as u32)));
    }
    xs
}

/// `out[i] = exp(x[i])`, bit-equal to `f32::exp`.
pub fn exp_slice(x: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if available() {
            // SAFETY: `available` checked for AVX-512F.
            return unsafe { x86::exp_slice(x, out) };
        }
    }
    for (o, &v) in out.iter_mut().zip(x) {
        *o = v.exp();
    }
}

/// `x[i] = exp(x[i])`, bit-equal to `f32::exp`.
pub fn exp_in_place(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if available() {
            // SAFETY: `available` checked for AVX-512F.
            return unsafe { x86::exp_in_place(x) };
        }
    }
    for v in x.iter_mut() {
        *v = v.exp();
    }
}

/// `out[i] = 1 / (1 + exp(-x[i]))` (the logistic sigmoid as the training ops round it).
pub fn sigmoid(x: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if available() {
            // SAFETY: `available` checked for AVX-512F.
            return unsafe { x86::sigmoid(x, out) };
        }
    }
    for (o, &v) in out.iter_mut().zip(x) {
        *o = 1.0 / (1.0 + (-v).exp());
    }
}

/// SwiGLU's gate for inference: `out[i] = (g / (1 + exp(-g))) · u` with candle's roundings
/// (`silu`, then the product), `g = gate[i]`, `u = up[i]`.
pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if available() {
            // SAFETY: `available` checked for AVX-512F.
            return unsafe { x86::silu_mul(gate, up, out) };
        }
    }
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = (g / (1.0 + (-g).exp())) * u;
    }
}

/// One row of the attention softmax for inference, as candle computes
/// `softmax_last_dim(raw · scale + mask)` with the scale and the mask applied by separate ops:
/// `t_j = raw_j · scale + mask_j` (each rounded), `m = max t`, `e_j = exp(t_j - m)`,
/// `out_j = e_j / Σ e` with the sum taken by candle's own reduction (the same order, so the
/// same bits).
pub fn softmax_row(raw: &[f32], scale: f32, mask: Option<&[f32]>, out: &mut [f32]) {
    use candle_core::cpu::kernels::VecOps;
    let n = out.len();
    match mask {
        Some(m) => {
            for ((o, &r), &m) in out.iter_mut().zip(raw).zip(m) {
                *o = r * scale + m;
            }
        }
        None => {
            for (o, &r) in out.iter_mut().zip(raw) {
                // (candle's affine adds 0.0 after the scale: -0.0 becomes 0.0)
                *o = r * scale + 0.0;
            }
        }
    }
    if n == 0 {
        return;
    }
    let mut max = f32::NEG_INFINITY;
    // SAFETY: `out` holds `n > 0` elements.
    unsafe { f32::vec_reduce_max(out.as_ptr(), &mut max, n) };
    for o in out.iter_mut() {
        *o -= max;
    }
    #[cfg(target_arch = "x86_64")]
    let vector = available();
    #[cfg(not(target_arch = "x86_64"))]
    let vector = false;
    if vector {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `available` checked for AVX-512F; the kernel reads each lane before writing it.
        unsafe {
            x86::exp_in_place(out)
        };
    } else {
        for o in out.iter_mut() {
            *o = o.exp();
        }
    }
    let mut sum = 0f32;
    // SAFETY: as above.
    unsafe { f32::vec_reduce_sum(out.as_ptr(), &mut sum, n) };
    for o in out.iter_mut() {
        *o /= sum;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{C0, C1, C2, INV_LN2_N, OVERFLOW, SHIFT, TAB, UNDERFLOW};

    /// `exp` of eight f64 lanes (each an f32 widened), rounded to f32.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn exp8(xd: __m512d) -> __m256 {
        let z = _mm512_mul_pd(xd, _mm512_set1_pd(INV_LN2_N));
        let kd = _mm512_add_pd(z, _mm512_set1_pd(SHIFT));
        let ki = _mm512_castpd_si512(kd);
        let r = _mm512_fmsub_pd(
            xd,
            _mm512_set1_pd(INV_LN2_N),
            _mm512_sub_pd(kd, _mm512_set1_pd(SHIFT)),
        );
        let tab = TAB.as_ptr().cast::<__m512i>();
        let idx = _mm512_and_si512(ki, _mm512_set1_epi64(31));
        let low =
            _mm512_permutex2var_epi64(_mm512_loadu_si512(tab), idx, _mm512_loadu_si512(tab.add(1)));
        let high = _mm512_permutex2var_epi64(
            _mm512_loadu_si512(tab.add(2)),
            idx,
            _mm512_loadu_si512(tab.add(3)),
        );
        let upper = _mm512_test_epi64_mask(idx, _mm512_set1_epi64(16));
        let t = _mm512_mask_blend_epi64(upper, low, high);
        let s = _mm512_castsi512_pd(_mm512_add_epi64(t, _mm512_slli_epi64::<47>(ki)));
        let y = _mm512_fmadd_pd(_mm512_set1_pd(C2), r, _mm512_set1_pd(1.0));
        let c = _mm512_fmadd_pd(_mm512_set1_pd(C0), r, _mm512_set1_pd(C1));
        let y = _mm512_fmadd_pd(c, _mm512_mul_pd(r, r), y);
        _mm512_cvtpd_ps(_mm512_mul_pd(y, s))
    }

    /// `exp` of sixteen f32 lanes, bit-equal to the library's scalar `expf` (see the module).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn exp16(x: __m512) -> __m512 {
        let lo = _mm512_cvtps_pd(_mm512_castps512_ps256(x));
        let hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(
            _mm512_castps_pd(x),
        )));
        let (lo, hi) = (exp8(lo), exp8(hi));
        let y = _mm512_castpd_ps(_mm512_insertf64x4::<1>(
            _mm512_castps_pd(_mm512_castps256_ps512(lo)),
            _mm256_castps_pd(hi),
        ));
        // The edges: 0 below the underflow bound, infinity above the overflow bound, NaN kept.
        let under = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_set1_ps(UNDERFLOW));
        let over = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, _mm512_set1_ps(OVERFLOW));
        let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
        let y = _mm512_mask_mov_ps(y, under, _mm512_setzero_ps());
        let y = _mm512_mask_mov_ps(y, over, _mm512_set1_ps(f32::INFINITY));
        _mm512_mask_add_ps(y, nan, x, x)
    }

    /// Sixteen lanes of `x` from `p`, `n < 16` of them (the rest read as 0).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load(p: *const f32, n: usize) -> __m512 {
        if n >= 16 {
            _mm512_loadu_ps(p)
        } else {
            _mm512_maskz_loadu_ps(((1u32 << n) - 1) as u16, p)
        }
    }

    /// Stores the first `min(n, 16)` lanes of `v` at `p`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn store(p: *mut f32, v: __m512, n: usize) {
        if n >= 16 {
            _mm512_storeu_ps(p, v)
        } else {
            _mm512_mask_storeu_ps(p, ((1u32 << n) - 1) as u16, v)
        }
    }

    /// `out[i] = exp(x[i])` over the shorter of the two.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn exp_slice(x: &[f32], out: &mut [f32]) {
        let n = x.len().min(out.len());
        for i in (0..n).step_by(16) {
            let v = load(x.as_ptr().add(i), n - i);
            store(out.as_mut_ptr().add(i), exp16(v), n - i);
        }
    }

    /// `x[i] = exp(x[i])`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn exp_in_place(x: &mut [f32]) {
        let n = x.len();
        let p = x.as_mut_ptr();
        for i in (0..n).step_by(16) {
            store(p.add(i), exp16(load(p.add(i), n - i)), n - i);
        }
    }

    /// `out[i] = 1 / (1 + exp(-x[i]))`, each operation rounded as in the scalar form.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn sigmoid(x: &[f32], out: &mut [f32]) {
        let n = x.len().min(out.len());
        let one = _mm512_set1_ps(1.0);
        let sign = _mm512_set1_ps(-0.0);
        for i in (0..n).step_by(16) {
            let v = load(x.as_ptr().add(i), n - i);
            let e = exp16(_mm512_xor_ps(v, sign));
            store(
                out.as_mut_ptr().add(i),
                _mm512_div_ps(one, _mm512_add_ps(one, e)),
                n - i,
            );
        }
    }

    /// `out[i] = (g / (1 + exp(-g))) · u`, each operation rounded as in the scalar form.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
        let n = gate.len().min(up.len()).min(out.len());
        let one = _mm512_set1_ps(1.0);
        let sign = _mm512_set1_ps(-0.0);
        for i in (0..n).step_by(16) {
            let g = load(gate.as_ptr().add(i), n - i);
            let u = load(up.as_ptr().add(i), n - i);
            let e = exp16(_mm512_xor_ps(g, sign));
            let s = _mm512_div_ps(g, _mm512_add_ps(one, e));
            store(out.as_mut_ptr().add(i), _mm512_mul_ps(s, u), n - i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scalar_algorithm_is_the_librarys_expf() {
        // Every 4099th bit pattern: ~1M inputs of all magnitudes and signs.
        let mut differ = Vec::new();
        for i in (0..=u32::MAX).step_by(4099) {
            let x = f32::from_bits(i);
            let (a, b) = (x.exp(), exp_scalar(x));
            if a.to_bits() != b.to_bits() && !(a.is_nan() && b.is_nan()) {
                differ.push(x);
            }
        }
        assert!(
            differ.is_empty(),
            "{} inputs differ, e.g. {:?}",
            differ.len(),
            &differ[..differ.len().min(5)]
        );
    }

    #[test]
    fn the_vectors_equal_the_scalar_algorithm_and_the_library() {
        let mut xs = probe_inputs();
        xs.extend((0..=u32::MAX).step_by(65_537).map(f32::from_bits));
        let mut ys = vec![0f32; xs.len()];
        exp_slice(&xs, &mut ys);
        for (x, y) in xs.iter().zip(&ys) {
            let want = x.exp();
            assert!(
                want.to_bits() == y.to_bits() || (want.is_nan() && y.is_nan()),
                "exp({x:e}) = {y:e}, the library says {want:e}"
            );
            let spec = exp_scalar(*x);
            assert!(spec.to_bits() == y.to_bits() || (spec.is_nan() && y.is_nan()));
        }
        if cfg!(target_arch = "x86_64") && std::arch::is_x86_feature_detected!("avx512f") {
            assert!(
                available(),
                "the vector path disagrees with this machine's expf"
            );
        }
    }

    #[test]
    fn silu_mul_equals_candles_ops_to_the_bit() {
        use candle_core::{Device, Tensor};
        // Lengths that leave a partial vector; values from -110 to 110 (past both edges).
        for len in [1usize, 15, 16, 17, 100, 1003] {
            let g: Vec<f32> = (0..len)
                .map(|i| ((i * 7919) % 2201) as f32 * 0.1 - 110.0)
                .collect();
            let u: Vec<f32> = (0..len)
                .map(|i| ((i * 104_729) % 997) as f32 * 0.01 - 5.0)
                .collect();
            let mut out = vec![f32::NAN; len];
            silu_mul(&g, &u, &mut out);
            let (gt, ut) = (
                Tensor::new(g.as_slice(), &Device::Cpu).unwrap(),
                Tensor::new(u.as_slice(), &Device::Cpu).unwrap(),
            );
            let want: Vec<f32> = (candle_nn::ops::silu(&gt).unwrap() * ut)
                .unwrap()
                .to_vec1()
                .unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&out), bits(&want), "length {len}");
        }
    }

    #[test]
    fn sigmoid_and_exp_in_place_equal_the_scalar_forms_to_the_bit() {
        for len in [1usize, 15, 16, 17, 1003] {
            let x: Vec<f32> = (0..len)
                .map(|i| ((i * 7919) % 2201) as f32 * 0.1 - 110.0)
                .collect();
            let mut s = vec![f32::NAN; len];
            sigmoid(&x, &mut s);
            let mut e = x.clone();
            exp_in_place(&mut e);
            for ((&v, &sv), &ev) in x.iter().zip(&s).zip(&e) {
                assert_eq!(
                    sv.to_bits(),
                    (1.0 / (1.0 + (-v).exp())).to_bits(),
                    "sigmoid({v})"
                );
                assert_eq!(ev.to_bits(), v.exp().to_bits(), "exp({v})");
            }
        }
    }

    #[test]
    fn softmax_row_equals_candles_three_ops_to_the_bit() {
        use candle_core::{Device, Tensor};
        let dev = Device::Cpu;
        for len in [1usize, 7, 16, 33, 128, 200] {
            let raw: Vec<f32> = (0..len)
                .map(|i| ((i * 7919) % 1013) as f32 * 0.037 - 18.0)
                .collect();
            // causal-style mask: the last third masked
            let mask: Vec<f32> = (0..len)
                .map(|i| {
                    if i * 3 >= len * 2 && i > 0 {
                        f32::MIN
                    } else {
                        0.0
                    }
                })
                .collect();
            let scale = 0.125f32;
            let rt = Tensor::from_vec(raw.clone(), (1, len), &dev).unwrap();
            let mt = Tensor::from_vec(mask.clone(), (1, len), &dev).unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            let scaled = (rt * scale as f64).unwrap();
            for with_mask in [true, false] {
                let t = if with_mask {
                    scaled.broadcast_add(&mt).unwrap()
                } else {
                    scaled.clone()
                };
                let want: Vec<f32> = candle_nn::ops::softmax_last_dim(&t)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let mut out = vec![f32::NAN; len];
                softmax_row(&raw, scale, with_mask.then_some(mask.as_slice()), &mut out);
                assert_eq!(bits(&out), bits(&want), "length {len}, mask {with_mask}");
            }
        }
    }
}
