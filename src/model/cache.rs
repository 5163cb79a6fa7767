//! The key/value cache of incremental decoding, kept outside the model so that `forward`
//! takes `&self` and analysis code can run the same model concurrently.
//!
//! Each layer's keys and values live in a buffer with spare room along the sequence axis, so a
//! decode step writes one position in place instead of copying the whole history.

use candle_core::Tensor;

#[derive(Debug, Clone)]
struct Layer {
    /// `[b, kv_heads, capacity, head_dim]`
    k: Tensor,
    v: Tensor,
    len: usize,
}

/// Keys and values of every layer seen so far.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<Layer>>,
}

impl KvCache {
    /// An empty cache for `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
        }
    }

    /// Number of positions cached (0 when empty).
    pub fn seq_len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |l| l.len)
    }

    /// Appends this step's keys/values (`[b, kv_heads, s, head_dim]`) of `layer` and returns
    /// views of the whole history, `[b, kv_heads, past + s, head_dim]`.
    pub fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let slot = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| candle_core::Error::Msg(format!("KV cache has no layer {layer}")))?;
        let s = k.dim(2)?;
        let len = slot.as_ref().map_or(0, |l| l.len);
        let capacity = slot.as_ref().map_or(0, |l| l.k.dim(2).unwrap_or(0));
        if len + s > capacity {
            // Grow geometrically; the first allocation leaves room for 256 more positions.
            let cap = (len + s + 256).max(capacity * 2);
            let (b, h, _, d) = k.dims4()?;
            let grow = |old: Option<&Tensor>, new: &Tensor| -> candle_core::Result<Tensor> {
                let buf = Tensor::zeros((b, h, cap, d), new.dtype(), new.device())?;
                if let Some(o) = old {
                    buf.slice_set(&o.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
                }
                Ok(buf)
            };
            let l = slot.as_ref();
            *slot = Some(Layer {
                k: grow(l.map(|l| &l.k), k)?,
                v: grow(l.map(|l| &l.v), v)?,
                len,
            });
        }
        let l = slot
            .as_mut()
            .ok_or_else(|| candle_core::Error::Msg("KV cache slot".into()))?;
        l.k.slice_set(&k.contiguous()?, 2, len)?;
        l.v.slice_set(&v.contiguous()?, 2, len)?;
        l.len = len + s;
        Ok((l.k.narrow(2, 0, l.len)?, l.v.narrow(2, 0, l.len)?))
    }

    /// Repeats a one-row cache `n` times along the batch axis (a prompt prefix computed once
    /// and shared by `n` sequences); errors when the cache holds more than one row.
    pub fn repeat_rows(&mut self, n: usize) -> candle_core::Result<()> {
        for l in self.layers.iter_mut().flatten() {
            let b = l.k.dim(0)?;
            if b != 1 {
                candle_core::bail!("KV cache has {b} rows, only a one-row cache can be repeated");
            }
            l.k = l.k.repeat((n, 1, 1, 1))?;
            l.v = l.v.repeat((n, 1, 1, 1))?;
        }
        Ok(())
    }

    /// Keeps only the batch rows `rows` (in that order), e.g. when sequences that finished
    /// leave a batched generation; later steps then attend over fewer rows.
    pub fn retain_rows(&mut self, rows: &[usize]) -> candle_core::Result<()> {
        for l in self.layers.iter_mut().flatten() {
            let b = l.k.dim(0)?;
            if let Some(&bad) = rows.iter().find(|&&r| r >= b) {
                candle_core::bail!("KV cache has {b} rows, asked to keep row {bad}");
            }
            let idx = Tensor::from_vec(
                rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
                rows.len(),
                l.k.device(),
            )?;
            l.k = l.k.index_select(&idx, 0)?;
            l.v = l.v.index_select(&idx, 0)?;
        }
        Ok(())
    }

    /// Appends the rows of `other` after this cache's rows, the two aligned on their last
    /// position: the shorter history is padded on the left with zero keys/values (the caller
    /// masks those positions out). What continuous batching does when prompts join sequences
    /// already generating ([`super::continuous`]). An empty cache simply becomes `other`.
    pub fn join(&mut self, other: KvCache) -> candle_core::Result<()> {
        if self.seq_len() == 0 {
            *self = other;
            return Ok(());
        }
        if other.seq_len() == 0 {
            return Ok(());
        }
        if other.layers.len() != self.layers.len() {
            candle_core::bail!(
                "KV caches of {} and {} layers cannot be joined",
                self.layers.len(),
                other.layers.len()
            );
        }
        let len = self.seq_len().max(other.seq_len());
        for (mine, theirs) in self.layers.iter_mut().zip(other.layers) {
            let (Some(a), Some(b)) = (mine.as_ref(), theirs.as_ref()) else {
                candle_core::bail!("KV caches of different layers filled cannot be joined");
            };
            let k = Tensor::cat(
                &[
                    right_aligned(&a.k, a.len, len)?,
                    right_aligned(&b.k, b.len, len)?,
                ],
                0,
            )?;
            let v = Tensor::cat(
                &[
                    right_aligned(&a.v, a.len, len)?,
                    right_aligned(&b.v, b.len, len)?,
                ],
                0,
            )?;
            *mine = Some(Layer {
                k: with_room(&k)?,
                v: with_room(&v)?,
                len,
            });
        }
        Ok(())
    }

    /// Drops the first `n` positions of every row (positions that are padding for every row
    /// still generating), so later steps attend over a shorter history.
    pub fn drop_front(&mut self, n: usize) -> candle_core::Result<()> {
        if n == 0 {
            return Ok(());
        }
        for l in self.layers.iter_mut().flatten() {
            if n > l.len {
                candle_core::bail!("KV cache holds {} positions, asked to drop {n}", l.len);
            }
            let len = l.len - n;
            l.k = with_room(&l.k.narrow(2, n, len)?)?;
            l.v = with_room(&l.v.narrow(2, n, len)?)?;
            l.len = len;
        }
        Ok(())
    }
}

/// The first `len` positions of `t` (`[b, h, capacity, d]`) padded on the left with zeros to
/// `to` positions.
fn right_aligned(t: &Tensor, len: usize, to: usize) -> candle_core::Result<Tensor> {
    let t = t.narrow(2, 0, len)?;
    if len == to {
        return t.contiguous();
    }
    let (b, h, _, d) = t.dims4()?;
    let pad = Tensor::zeros((b, h, to - len, d), t.dtype(), t.device())?;
    Tensor::cat(&[&pad, &t], 2)
}

/// Spare positions left after a history is rebuilt (joined or trimmed): the next steps then
/// write in place.
const REBUILT_ROOM: usize = 64;

/// A contiguous buffer holding `t` (`[b, h, len, d]`) followed by [`REBUILT_ROOM`] empty
/// positions.
fn with_room(t: &Tensor) -> candle_core::Result<Tensor> {
    let (b, h, _, d) = t.dims4()?;
    let room = Tensor::zeros((b, h, REBUILT_ROOM, d), t.dtype(), t.device())?;
    Tensor::cat(&[t, &room], 2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn retain_rows_keeps_the_chosen_rows_in_order() {
        // Three rows, one KV head, two positions of width 1: row r holds [10 r, 10 r + 1].
        let dev = Device::Cpu;
        let k =
            Tensor::from_vec(vec![0f32, 1.0, 10.0, 11.0, 20.0, 21.0], (3, 1, 2, 1), &dev).unwrap();
        let v = (&k * 2.0).unwrap();
        let mut c = KvCache::new(1);
        c.append(0, &k, &v).unwrap();
        c.retain_rows(&[2, 0]).unwrap();
        // The next step appends one position for the two rows left.
        let k1 = Tensor::from_vec(vec![22f32, 2.0], (2, 1, 1, 1), &dev).unwrap();
        let (kk, vv) = c.append(0, &k1, &(&k1 * 2.0).unwrap()).unwrap();
        let flat = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(flat(kk), [20.0, 21.0, 22.0, 0.0, 1.0, 2.0]);
        assert_eq!(flat(vv), [40.0, 42.0, 44.0, 0.0, 2.0, 4.0]);
        assert_eq!(c.seq_len(), 3);
        assert!(c.retain_rows(&[2]).is_err(), "only rows 0 and 1 are left");
    }

    #[test]
    fn join_aligns_histories_on_the_right_and_drop_front_trims() {
        // Cache a: one row, positions [1, 2]; cache b: two rows, positions [10, 11, 12] and
        // [20, 21, 22] (one KV head of width 1).
        let dev = Device::Cpu;
        let a = Tensor::from_vec(vec![1f32, 2.0], (1, 1, 2, 1), &dev).unwrap();
        let b = Tensor::from_vec(
            vec![10f32, 11.0, 12.0, 20.0, 21.0, 22.0],
            (2, 1, 3, 1),
            &dev,
        )
        .unwrap();
        let mut ca = KvCache::new(1);
        ca.append(0, &a, &(&a * 2.0).unwrap()).unwrap();
        let mut cb = KvCache::new(1);
        cb.append(0, &b, &(&b * 2.0).unwrap()).unwrap();
        ca.join(cb).unwrap();
        assert_eq!(ca.seq_len(), 3);
        let step = Tensor::from_vec(vec![3f32, 13.0, 23.0], (3, 1, 1, 1), &dev).unwrap();
        let (k, v) = ca.append(0, &step, &(&step * 2.0).unwrap()).unwrap();
        let flat = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(
            flat(k),
            [0.0, 1.0, 2.0, 3.0, 10.0, 11.0, 12.0, 13.0, 20.0, 21.0, 22.0, 23.0]
        );
        assert_eq!(flat(v)[..4], [0.0, 2.0, 4.0, 6.0]);
        ca.drop_front(2).unwrap();
        assert_eq!(ca.seq_len(), 2);
        let step = Tensor::from_vec(vec![4f32, 14.0, 24.0], (3, 1, 1, 1), &dev).unwrap();
        let (k, _) = ca.append(0, &step, &step).unwrap();
        assert_eq!(flat(k), [2.0, 3.0, 4.0, 12.0, 13.0, 14.0, 22.0, 23.0, 24.0]);
        assert!(ca.drop_front(4).is_err(), "only 3 positions are cached");
        // Joining to an empty cache takes the other one as it is.
        let mut empty = KvCache::new(1);
        empty.join(ca.clone()).unwrap();
        assert_eq!(empty.seq_len(), 3);
    }
}
