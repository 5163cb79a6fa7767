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
        // values, which stay in L1 between them.
        Pool::global().run(b * kv_heads, &|part| {
            let op = &op;
            let (bi, kvh) = (part / kv_heads, part % kv_heads);
            let mrow = ms.as_ref().map(|m| &m[bi * t..(bi + 1) * t]);
            SCORES.with(|cell| {
                let mut scores = cell.borrow_mut();
                scores.resize(t, 0.0);
                for h in kvh * groups..(kvh + 1) * groups {
                    let bh = bi * heads + h;
                    // SAFETY: each (batch, head) row of `out` is written by one part only, and
                    // `out` outlives `run`.
                    let o = unsafe { std::slice::from_raw_parts_mut(op.0.add(bh * d), d) };
                    let q = &qs[bh * d..(bh + 1) * d];
                    one_head(q, &kv, (bi, kvh), mrow, scale, &mut scores, o);
                }
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

struct OutPtr(*mut f32);
// SAFETY: disjoint writes inside `Pool::run`, which returns after all of them.
unsafe impl Sync for OutPtr {}
