//! Scaled dot-product attention for one new query per sequence (a decode step), computed
//! straight from the KV cache's memory: at these sizes the general tensor path spends more
//! time launching small matrix products than computing.

use candle_core::{Storage, Tensor};

use super::parallel::Pool;

/// `softmax(q k^T * scale + mask) v` for `q: [b, heads, 1, d]`, `k, v: [b, kv_heads, t, d]`
/// (any strides with a unit last stride), `mask: [b, 1, 1, t]` additive or `None`.
/// Query head `h` reads KV head `h / (heads / kv_heads)`. Returns `[b, 1, heads * d]`.
/// `None` when the tensors are not f32 on the CPU (the caller then takes the general path).
pub fn decode_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
) -> candle_core::Result<Option<Tensor>> {
    let (b, heads, s, d) = q.dims4()?;
    let (_, kv_heads, t, _) = k.dims4()?;
    if s != 1 || !q.device().is_cpu() || q.dtype() != candle_core::DType::F32 {
        return Ok(None);
    }
    let qs: Vec<f32> = q.contiguous()?.flatten_all()?.to_vec1()?;
    let ms: Option<Vec<f32>> = match mask {
        Some(m) => Some(m.flatten_all()?.to_vec1()?),
        None => None,
    };
    let groups = heads / kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    let mut out = vec![0f32; b * heads * d];
    {
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let (Storage::Cpu(kc), Storage::Cpu(vc)) = (&*ks, &*vs) else {
            return Ok(None);
        };
        let (kd, vd) = (kc.as_slice::<f32>()?, vc.as_slice::<f32>()?);
        let (kst, vst) = (kl.stride(), vl.stride());
        if kst[3] != 1 || vst[3] != 1 {
            return Ok(None);
        }
        let (ko, vo) = (kl.start_offset(), vl.start_offset());
        let op = OutPtr(out.as_mut_ptr());
        let kv = KvView {
            k: kd,
            v: vd,
            k_at: |bi: usize, h: usize, j: usize| ko + bi * kst[0] + h * kst[1] + j * kst[2],
            v_at: |bi: usize, h: usize, j: usize| vo + bi * vst[0] + h * vst[1] + j * vst[2],
        };
        // One part per (sequence, KV head): its `groups` query heads read the same keys and
        // values, each row of them once for all the heads where the CPU has AVX-512.
        Pool::global().run(b * kv_heads, &|part| {
            let op = &op;
            let (bi, kvh) = (part / kv_heads, part % kv_heads);
            let mrow = ms.as_ref().map(|m| &m[bi * t..(bi + 1) * t]);
            let bh = bi * heads + kvh * groups;
            // SAFETY: the rows of the (batch, head) pairs of one part are consecutive in
            // `out` and written by that part only; `out` outlives `run`.
            let o = unsafe { std::slice::from_raw_parts_mut(op.0.add(bh * d), groups * d) };
            let q = &qs[bh * d..(bh + groups) * d];
            SCORES.with(|cell| {
                let mut scores = cell.borrow_mut();
                scores.resize(groups * t, 0.0);
                one_group(groups, q, &kv, (bi, kvh), mrow, scale, &mut scores, o);
            });
        });
    }
    Ok(Some(Tensor::from_vec(out, (b, 1, heads * d), q.device())?))
}

thread_local! {
    /// One head's scores, per pool thread.
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The cached keys and values with their index functions `(batch, kv head, position) ->
/// offset` of a row of `d` values.
struct KvView<'a, K, V> {
    k: &'a [f32],
    v: &'a [f32],
    k_at: K,
    v_at: V,
}

/// [`one_head`] for the `groups` query heads of one KV head (`q`, `o`: their rows one after
/// the other, `scores`: room for `t` per head). With AVX-512 and a head size of 64 or 128
/// each key and value row is loaded once for all of them; the arithmetic is [`one_head`]'s, in
/// the same order, so the result is the same to the bit.
#[allow(clippy::too_many_arguments)]
fn one_group<K, V>(
    groups: usize,
    q: &[f32],
    kv: &KvView<K, V>,
    at: (usize, usize),
    mask: Option<&[f32]>,
    scale: f32,
    scores: &mut [f32],
    o: &mut [f32],
) where
    K: Fn(usize, usize, usize) -> usize,
    V: Fn(usize, usize, usize) -> usize,
{
    if groups == 0 {
        return;
    }
    let d = q.len() / groups;
    let t = scores.len() / groups;
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY (both arms): the CPU has AVX-512F; `q` and `o` hold `groups * d` values,
            // `scores` `groups * t`, and every key/value row `d` (the view's offsets).
            match d {
                64 => return unsafe { x86::group::<4, K, V>(q, kv, at, mask, scale, scores, o) },
                128 => return unsafe { x86::group::<8, K, V>(q, kv, at, mask, scale, scores, o) },
                _ => {}
            }
        }
    }
    for ((qh, oh), sh) in q
        .chunks_exact(d)
        .zip(o.chunks_exact_mut(d))
        .zip(scores.chunks_exact_mut(t))
    {
        one_head(qh, kv, at, mask, scale, sh, oh);
    }
}

/// `o = softmax(q . k_j * scale + mask_j) v_j` over the cached positions of one query head.
fn one_head<K, V>(
    q: &[f32],
    kv: &KvView<K, V>,
    (bi, kvh): (usize, usize),
    mask: Option<&[f32]>,
    scale: f32,
    scores: &mut [f32],
    o: &mut [f32],
) where
    K: Fn(usize, usize, usize) -> usize,
    V: Fn(usize, usize, usize) -> usize,
{
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports the features the function is compiled for.
            return unsafe { one_head_avx2(q, kv, (bi, kvh), mask, scale, scores, o) };
        }
    }
    one_head_portable(q, kv, (bi, kvh), mask, scale, scores, o)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn one_head_avx2<K, V>(
    q: &[f32],
    kv: &KvView<K, V>,
    at: (usize, usize),
    mask: Option<&[f32]>,
    scale: f32,
    scores: &mut [f32],
    o: &mut [f32],
) where
    K: Fn(usize, usize, usize) -> usize,
    V: Fn(usize, usize, usize) -> usize,
{
    one_head_portable(q, kv, at, mask, scale, scores, o)
}

#[inline(always)]
fn one_head_portable<K, V>(
    q: &[f32],
    kv: &KvView<K, V>,
    (bi, kvh): (usize, usize),
    mask: Option<&[f32]>,
    scale: f32,
    scores: &mut [f32],
    o: &mut [f32],
) where
    K: Fn(usize, usize, usize) -> usize,
    V: Fn(usize, usize, usize) -> usize,
{
    let d = q.len();
    for (j, sc) in scores.iter_mut().enumerate() {
        let at = (kv.k_at)(bi, kvh, j);
        let m = mask.map_or(0.0, |m| m[j]);
        *sc = dot_tree(q, &kv.k[at..at + d]) * scale + m;
    }
    let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut z = 0.0;
    for sc in scores.iter_mut() {
        *sc = (*sc - max).exp();
        z += *sc;
    }
    o.fill(0.0);
    for (j, p) in scores.iter().enumerate() {
        let at = (kv.v_at)(bi, kvh, j);
        let w = p / z;
        for (acc, &vv) in o.iter_mut().zip(&kv.v[at..at + d]) {
            *acc += w * vv;
        }
    }
}

/// A dot product of short rows (a head's 64-128 values): sixteen accumulators summed as a
/// tree, so the reduction is four vector steps instead of sixteen dependent scalar adds.
#[inline(always)]
fn dot_tree(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 16];
    let mut ca = a.chunks_exact(16);
    let mut cb = b.chunks_exact(16);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..16 {
            acc[l] = x[l].mul_add(y[l], acc[l]);
        }
    }
    for half in [8, 4, 2, 1] {
        for l in 0..half {
            acc[l] += acc[l + half];
        }
    }
    let mut s = acc[0];
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        s = x.mul_add(*y, s);
    }
    s
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::KvView;
    use std::arch::x86_64::*;

    /// [`super::one_head`] for every query head of one KV head, with a head size of `16 * C`:
    /// each key row is loaded once and dotted with all the heads' queries (a sixteen-lane
    /// accumulator, summed as [`super::dot_tree`] sums: halves, quarters, ...), then each head's
    /// softmax as in `one_head`, then its weighted sum of the value rows (multiply, then add).
    ///
    /// # Safety
    /// The CPU has AVX-512F; `q` and `o` hold `groups * 16 * C` values and `scores` `groups *
    /// t`; every offset of the view is the start of a row of `16 * C` values inside its slice.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn group<const C: usize, K, V>(
        q: &[f32],
        kv: &KvView<K, V>,
        (bi, kvh): (usize, usize),
        mask: Option<&[f32]>,
        scale: f32,
        scores: &mut [f32],
        o: &mut [f32],
    ) where
        K: Fn(usize, usize, usize) -> usize,
        V: Fn(usize, usize, usize) -> usize,
    {
        let d = 16 * C;
        let groups = q.len() / d;
        let t = scores.len() / groups;
        let (kp, vp, qp) = (kv.k.as_ptr(), kv.v.as_ptr(), q.as_ptr());
        for j in 0..t {
            let at = (kv.k_at)(bi, kvh, j);
            debug_assert!(at + d <= kv.k.len());
            let mut kr = [_mm512_setzero_ps(); C];
            for (c, r) in kr.iter_mut().enumerate() {
                *r = _mm512_loadu_ps(kp.add(at + 16 * c));
            }
            let m = mask.map_or(0.0, |m| m[j]);
            for g in 0..groups {
                let mut acc = _mm512_setzero_ps();
                for (c, r) in kr.iter().enumerate() {
                    acc = _mm512_fmadd_ps(_mm512_loadu_ps(qp.add(g * d + 16 * c)), *r, acc);
                }
                // acc[l] += acc[l + 8], then + 4, + 2, + 1, as `dot_tree`.
                let h8 = _mm256_add_ps(
                    _mm512_castps512_ps256(acc),
                    _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(acc))),
                );
                let h4 = _mm_add_ps(_mm256_castps256_ps128(h8), _mm256_extractf128_ps::<1>(h8));
                let h2 = _mm_add_ps(h4, _mm_movehl_ps(h4, h4));
                let h1 = _mm_add_ss(h2, _mm_shuffle_ps::<0b01>(h2, h2));
                scores[g * t + j] = _mm_cvtss_f32(h1) * scale + m;
            }
        }
        for (g, sh) in scores.chunks_exact_mut(t).enumerate() {
            let max = sh.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let mut z = 0.0;
            for sc in sh.iter_mut() {
                *sc = (*sc - max).exp();
                z += *sc;
            }
            let mut acc = [_mm512_setzero_ps(); C];
            for (j, p) in sh.iter().enumerate() {
                let at = (kv.v_at)(bi, kvh, j);
                debug_assert!(at + d <= kv.v.len());
                let w = _mm512_set1_ps(p / z);
                for (c, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_add_ps(*a, _mm512_mul_ps(w, _mm512_loadu_ps(vp.add(at + 16 * c))));
                }
            }
            for (c, a) in acc.iter().enumerate() {
                _mm512_storeu_ps(o.as_mut_ptr().add(g * d + 16 * c), *a);
            }
        }
    }
}

struct OutPtr(*mut f32);
// SAFETY: disjoint writes inside `Pool::run`, which returns after all of them.
unsafe impl Sync for OutPtr {}

#[cfg(test)]
mod tests {
    use super::*;

    /// The grouped kernel (AVX-512 where the CPU has it) gives the per-head portable result to
    /// the bit, for both head sizes it specialises and one it does not, with and without a
    /// mask, on keys and values at strided offsets.
    #[test]
    fn grouped_heads_equal_each_head_alone_to_the_bit() {
        let mut seed = 12345u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        };
        for (d, groups, t) in [(64, 3, 37), (128, 4, 5), (48, 2, 9), (64, 1, 1)] {
            // Two KV heads, rows `d + 16` apart (a strided view, as a cache with room).
            let stride = d + 16;
            let k: Vec<f32> = (0..2 * t * stride).map(|_| next()).collect();
            let v: Vec<f32> = (0..2 * t * stride).map(|_| next()).collect();
            let q: Vec<f32> = (0..groups * d).map(|_| next() * 3.0).collect();
            let mask: Vec<f32> = (0..t)
                .map(|j| if j % 4 == 1 { f32::NEG_INFINITY } else { 0.0 })
                .collect();
            let kv = KvView {
                k: &k,
                v: &v,
                k_at: |_b: usize, h: usize, j: usize| (h * t + j) * stride,
                v_at: |_b: usize, h: usize, j: usize| (h * t + j) * stride,
            };
            for m in [None, Some(&mask[..])] {
                let mut scores = vec![0f32; groups * t];
                let mut got = vec![0f32; groups * d];
                one_group(groups, &q, &kv, (0, 1), m, 0.125, &mut scores, &mut got);
                let mut want = vec![0f32; groups * d];
                let mut s = vec![0f32; t];
                for (qh, oh) in q.chunks_exact(d).zip(want.chunks_exact_mut(d)) {
                    one_head_portable(qh, &kv, (0, 1), m, 0.125, &mut s, oh);
                }
                let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "d {d} groups {groups} t {t}");
                assert!(want.iter().all(|x| x.is_finite()) && want.iter().any(|x| *x != 0.0));
            }
        }
    }
}
