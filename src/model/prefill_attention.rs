//! Attention of an inference pass over many positions (prefill, scoring) on the CPU,
//! `softmax(scale · Q Kᵀ + mask) V`, computed block by block so that the keys every query of a
//! block masks are never multiplied.
//!
//! Under a causal mask, query `i` of a prompt sees keys `0..=past + i`: the composed path
//! (`Q Kᵀ`, the softmax, `P V` over all `t` keys) spends half of its products and of its `exp`
//! calls on entries whose probability is exactly zero. Here the queries of each KV head's
//! stacked heads are cut into blocks of [`BLOCK`] rows (the last one up to `2 BLOCK - 1`), and
//! a block's scores, softmax and `P V` run over its first `e` keys only, `e` the last key any
//! of its rows sees, rounded up to a multiple of 32 (at most `t`). A block's scores live in a
//! small scratch buffer, so the `[b, heads, s, t]` probabilities are never written either.
//!
//! The result is the composed path's to the bit: each score is the same `gemm` dot product
//! over `head_dim`; each row's softmax ([`super::expf::softmax_row`]) sees the same values
//! in the same lanes, and the keys it leaves out are masked ones, whose probabilities the
//! composed path computes as exactly 0 and whose terms (`+ 0` in its sums) change nothing; and
//! `P V` adds the same products in the same order, without the trailing `0 · v` terms. A row
//! that sees no key at all (a padding position) keeps all `t`, as the composed path's uniform
//! row does. Checked against the composed path by the tests below.

use candle_core::{DType, Tensor};

use super::gemm::{kernel, SyncPtr, Write};

/// Query rows per block: blocks ending at positions 32, 64, … follow the causal diagonal
/// closely (a 128-token prompt computes 62.5 % of its keys instead of all), while a block still
/// fills `gemm`'s tiles.
pub const BLOCK: usize = 32;

/// The rounding of a block's key count: candle's vectorised sum adds 32 elements per step and
/// the rest one by one, so a prefix of whole steps keeps every element's place in the sum.
const KEY_STEP: usize = 32;

/// Whether an additive mask value makes a probability exactly zero in the composed path:
/// `f32::MIN` (the mask [`super::llama`] builds; a finite score added to it stays `f32::MIN`,
/// whose `exp` after the row's maximum is subtracted underflows to 0) or `-inf`.
fn hides(m: f32) -> bool {
    m == f32::MIN || m == f32::NEG_INFINITY
}

/// Per batch row and query position of an additive `[b, 1, s, t]` mask, the number of keys up
/// to and including the last one the query sees (`t` for a query that sees none), row-major
/// `[b, s]`. `None` for a mask off the CPU or not f32.
pub fn key_extents(mask: &Tensor) -> candle_core::Result<Option<Vec<usize>>> {
    if !mask.device().is_cpu() || mask.dtype() != DType::F32 {
        return Ok(None);
    }
    let (b, _, s, t) = mask.dims4()?;
    super::frozen::with_slice(&mask.contiguous()?, |ms| Ok(Some(extents_of(ms, b, s, t))))
}

/// [`key_extents`] on a contiguous slice.
fn extents_of(mask: &[f32], b: usize, s: usize, t: usize) -> Vec<usize> {
    (0..b * s)
        .map(|row| {
            let m = &mask[row * t..(row + 1) * t];
            match m.iter().rposition(|&v| !hides(v)) {
                Some(j) => j + 1,
                None => t,
            }
        })
        .collect()
}

/// `softmax(scale · Q Kᵀ + mask) V` for the query heads of each KV head stacked as
/// `q: [b, kv, groups · s, d]` (query head `h` reads KV head `h / groups`), `k`, `v:
/// [b, kv, t, d]` and the additive `[b, 1, s, t]` mask; the result is `[b, kv, groups · s, d]`.
///
/// `extents`: the mask's [`key_extents`], when the caller has them (the mask is the same for
/// every layer of a forward pass, so the model reads it once); `None` reads them here.
///
/// `None` where this path does not apply (not a CPU f32 computation, no mask, or a single
/// position); the caller then composes the products and the softmax.
pub fn prefill_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    extents: Option<&[usize]>,
    scale: f32,
    s: usize,
) -> candle_core::Result<Option<Tensor>> {
    let Some(mask) = mask else {
        return Ok(None);
    };
    if s < 2 {
        // one query per head: decoding's own path, or the composed one
        return Ok(None);
    }
    if !q.device().is_cpu() || [q, k, v, mask].iter().any(|x| x.dtype() != DType::F32) {
        return Ok(None);
    }
    let (b, kv, m, d) = q.dims4()?;
    let (_, _, t, _) = k.dims4()?;
    if k.dims() != [b, kv, t, d] || v.dims() != [b, kv, t, d] || m % s != 0 {
        candle_core::bail!(
            "prefill-attention: q {:?}, k {:?}, v {:?} with {s} positions",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if mask.dims() != [b, 1, s, t] {
        candle_core::bail!(
            "prefill-attention: mask {:?}, expected [{b}, 1, {s}, {t}]",
            mask.dims()
        );
    }
    let (q, k, v, mask) = (
        q.contiguous()?,
        k.contiguous()?,
        v.contiguous()?,
        mask.contiguous()?,
    );
    use super::frozen::with_slice;
    let out = with_slice(&mask, |ms| {
        let owned;
        let extents = match extents {
            Some(e) if e.len() == b * s => e,
            Some(e) => candle_core::bail!(
                "prefill-attention: {} key extents for {b} x {s} queries",
                e.len()
            ),
            None => {
                owned = extents_of(ms, b, s, t);
                &owned
            }
        };
        with_slice(&q, |qs| {
            with_slice(&k, |ks| {
                with_slice(&v, |vs| {
                    Ok(attend(
                        qs,
                        ks,
                        vs,
                        (ms, extents),
                        (b, kv, m, t, d),
                        s,
                        scale,
                    ))
                })
            })
        })
    })?;
    Ok(Some(Tensor::from_vec(out, (b, kv, m, d), q.device())?))
}

/// The blocks on contiguous slices (shapes as in [`prefill_attention`]).
fn attend(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    (mask, extents): (&[f32], &[usize]),
    (b, kv, m, t, d): (usize, usize, usize, usize, usize),
    s: usize,
    scale: f32,
) -> Vec<f32> {
    // whole blocks, the last one taking the rest: never a block of one row, which `gemm`
    // would run as a matrix-vector product, adding in another order
    let blocks_per_group = (s / BLOCK).max(1);
    let groups = m / s;
    // one part per (batch row, KV head, head of the group, block of positions)
    let parts = b * kv * groups * blocks_per_group;
    let mut out = super::gemm::uninit(b * kv * m * d);
    let py = SyncPtr(out.as_mut_ptr().cast());
    let run = |p: usize| {
        let blk = p % blocks_per_group;
        let item = p / (blocks_per_group * groups);
        let g = (p / blocks_per_group) % groups;
        let bi = item / kv;
        let i0 = blk * BLOCK;
        let i1 = if blk + 1 == blocks_per_group {
            s
        } else {
            i0 + BLOCK
        };
        let rows = i1 - i0;
        let seen = extents[bi * s + i0..bi * s + i1]
            .iter()
            .copied()
            .max()
            .unwrap_or(t);
        let e = seen.next_multiple_of(KEY_STEP).min(t);
        let r0 = g * s + i0;
        let (qi, ki) = ((item * m + r0) * d, item * t * d);
        let mut scores = vec![0f32; rows * e];
        let mut probs = vec![0f32; rows * e];
        // SAFETY: the slices hold `[b, kv, m, d]`, `[b, kv, t, d]` and `[b, kv, t, d]`
        // elements; the block's rows `r0..r0 + rows` lie inside item `item`'s `m` rows, its
        // `e <= t` keys inside the item's `t`, and the scratch buffers hold `rows · e`.
        unsafe {
            // scores = Q_block Kᵀ[:, ..e]: `[rows, d] x [d, e]`, Kᵀ read through K's strides
            kernel(
                (rows, e, d),
                q.as_ptr().add(qi),
                (d, 1),
                k.as_ptr().add(ki),
                (1, d),
                scores.as_mut_ptr(),
                e,
                Write::Overwrite,
            );
        }
        for (r, (raw, p)) in scores.chunks(e).zip(probs.chunks_mut(e)).enumerate() {
            let mrow = (bi * s + i0 + r) * t;
            super::expf::softmax_row(raw, scale, Some(&mask[mrow..mrow + e]), p);
        }
        // SAFETY: as above; part p alone writes rows `r0..r0 + rows` of item `item` of `out`.
        unsafe {
            // out_block = P[:, ..e] V[..e]: `[rows, e] x [e, d]`
            kernel(
                (rows, d, e),
                probs.as_ptr(),
                (e, 1),
                v.as_ptr().add(ki),
                (d, 1),
                py.get().add(qi),
                d,
                Write::Overwrite,
            );
        }
    };
    super::parallel::run_beside_products(b * kv * m * t, parts, &run);
    // SAFETY: the parts cover every row of every item, each written whole by its `P V` (d > 0
    // and e > 0 whenever t > 0; with t = 0 or d = 0 nothing is read).
    unsafe { super::gemm::assume_init(out) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::bmm::batched_matmul;
    use crate::model::test_util::{bits, values};
    use candle_core::Device;

    /// The composed path: `Q Kᵀ`, the scaled masked softmax and `P V` as [`super::super::llama`]
    /// runs them.
    fn composed(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Tensor,
        scale: f32,
        heads: usize,
    ) -> Tensor {
        let (b, kv, m, _) = q.dims4().unwrap();
        let (s, t) = (m / (heads / kv), k.dim(2).unwrap());
        let raw = batched_matmul(q, &k.t().unwrap())
            .unwrap()
            .reshape((b, heads, s, t))
            .unwrap();
        let op = crate::model::softmax::ScaledMaskedSoftmax {
            scale,
            mask: Some(mask.clone()),
        };
        let probs = raw
            .contiguous()
            .unwrap()
            .apply_op1_no_bwd(&op)
            .unwrap()
            .reshape((b, kv, m, t))
            .unwrap();
        batched_matmul(&probs, v).unwrap()
    }

    /// The mask `llama` builds: causal over the last `s` of `t` keys, `pad[bi]` left-padding
    /// keys hidden.
    fn mask(b: usize, s: usize, t: usize, pad: &[usize]) -> Tensor {
        let past = t - s;
        let mut data = vec![0f32; b * s * t];
        for bi in 0..b {
            for i in 0..s {
                for j in 0..t {
                    if j > past + i || j < pad[bi] {
                        data[(bi * s + i) * t + j] = f32::MIN;
                    }
                }
            }
        }
        Tensor::from_vec(data, (b, 1, s, t), &Device::Cpu).unwrap()
    }

    /// Bit for bit the composed path: prompts shorter and longer than a block, not multiples of
    /// it, with a cache before them (`past > 0`), left padding (whole padded query rows among
    /// them) and grouped heads.
    #[test]
    fn equals_the_composed_path_to_the_bit() {
        let dev = Device::Cpu;
        /// (b, kv, groups, s, past, left padding per batch row)
        type Case = (usize, usize, usize, usize, usize, &'static [usize]);
        let cases: [Case; 10] = [
            (2, 3, 3, 128, 0, &[0, 17]),
            (1, 1, 1, 5, 0, &[0]),
            (3, 2, 2, 70, 0, &[0, 40, 69]),
            (2, 1, 4, 33, 50, &[0, 61]),
            (1, 2, 1, 200, 0, &[0]),
            (2, 3, 3, 31, 96, &[5, 0]),
            (1, 1, 1, 2, 0, &[0]),
            (2, 3, 3, 65, 0, &[0, 1]),
            // a cache of a length that is no multiple of 32: blocks end between key steps
            (2, 3, 3, 100, 7, &[0, 9]),
            (1, 1, 2, 64, 45, &[0]),
        ];
        for (n, &(b, kv, groups, s, past, pad)) in cases.iter().enumerate() {
            let (d, t) = (64, past + s);
            // seeded values in [-4, 4) for q and k (scores of up to a few units), [-1, 1) for v
            let seeded = |shape: (usize, usize, usize, usize), seed: u64, scale: f32| {
                let v = values(shape.0 * shape.1 * shape.2 * shape.3, seed);
                let v = v.into_iter().map(|x| x * scale).collect::<Vec<_>>();
                Tensor::from_vec(v, shape, &dev).unwrap()
            };
            let q = seeded((b, kv, groups * s, d), 3 * n as u64, 4.0);
            let k = seeded((b, kv, t, d), 3 * n as u64 + 1, 4.0);
            let v = seeded((b, kv, t, d), 3 * n as u64 + 2, 1.0);
            let mask = mask(b, s, t, pad);
            let scale = 0.125;
            let got = prefill_attention(&q, &k, &v, Some(&mask), None, scale, s)
                .unwrap()
                .unwrap();
            let want = composed(&q, &k, &v, &mask, scale, kv * groups);
            assert_eq!(got.dims(), want.dims(), "case {n}");
            assert!(bits(&got) == bits(&want), "case {n}: not the same bits");
            // the extents read once by the caller, as the model passes them
            let extents = key_extents(&mask).unwrap().unwrap();
            let given = prefill_attention(&q, &k, &v, Some(&mask), Some(&extents), scale, s)
                .unwrap()
                .unwrap();
            assert!(bits(&given) == bits(&want), "case {n}: given extents");
        }
    }

    /// The extents: the last seen key per query, all keys for a query that sees none.
    #[test]
    fn key_extents_follow_the_mask() {
        let m = mask(2, 3, 5, &[0, 4]);
        // past 2: query i sees keys ..= 2 + i; batch row 1 hides keys 0..4, so its queries 0
        // and 1 (keys ..= 2, ..= 3) see nothing
        assert_eq!(key_extents(&m).unwrap(), Some(vec![3, 4, 5, 5, 5, 5]));
    }

    /// Without a mask, or off the f32 CPU path, the caller composes.
    #[test]
    fn declines_what_it_does_not_cover() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((1, 1, 2, 4), DType::F32, &dev).unwrap();
        let k = Tensor::zeros((1, 1, 2, 4), DType::F32, &dev).unwrap();
        assert!(prefill_attention(&q, &k, &k, None, None, 1.0, 2)
            .unwrap()
            .is_none());
        let one = mask(1, 1, 2, &[0]);
        let q1 = Tensor::zeros((1, 1, 1, 4), DType::F32, &dev).unwrap();
        assert!(prefill_attention(&q1, &k, &k, Some(&one), None, 1.0, 1)
            .unwrap()
            .is_none());
        let bad = Tensor::zeros((1, 1, 2, 3), DType::F32, &dev).unwrap();
        let err = prefill_attention(&q, &k, &k, Some(&bad), None, 1.0, 2).unwrap_err();
        assert!(err.to_string().contains("expected [1, 1, 2, 2]"), "{err}");
        let good = mask(1, 2, 2, &[0]);
        let err = prefill_attention(&q, &k, &k, Some(&good), Some(&[2]), 1.0, 2).unwrap_err();
        assert!(err.to_string().contains("1 key extents for 1 x 2"), "{err}");
    }
}
