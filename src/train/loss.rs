//! The causal-LM objective on response tokens: label `-100` positions (prompt, padding) are
//! ignored, position `i` predicts the label at `i + 1` (as transformers shifts them).
//!
//! Only label positions go through the LM head and the vocabulary-wide log-softmax, and the
//! log-softmax with the pick of the label is one fused op ([`PickedLogSoftmax`]): with a 49k
//! vocabulary these dominate a step otherwise. When the LM head is a frozen f32 product (LoRA
//! training), the head itself joins that op ([`head_log_softmax`]), so the `[n, vocab]` logits
//! never become a graph node and their gradient is written over them.

use std::sync::{Arc, Mutex};

use crate::model::frozen::{times_w, times_wt, with_slice};
use crate::model::gemm::run_parts;
use crate::model::Model;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor, D};

/// Per-sequence sums of the label tokens' log-probabilities.
#[derive(Debug, Clone)]
pub struct LabelLogprobs {
    /// `[b]`: sum of log p(label) over each sequence's label tokens (differentiable).
    pub sums: Tensor,
    /// `[b]` f32: number of label tokens per sequence.
    pub lengths: Tensor,
}

/// Flat row indices (into `[b * s]`) of positions whose next label counts, their targets,
/// and the one-hot `[b, n]` map from selected rows to sequences.
fn label_positions(labels: &Tensor) -> candle_core::Result<(Vec<u32>, Vec<u32>, Tensor, Tensor)> {
    let (b, s) = labels.dims2()?;
    let l: Vec<Vec<i64>> = labels.to_dtype(DType::I64)?.to_vec2()?;
    let (mut rows, mut targets, mut owner) = (Vec::new(), Vec::new(), Vec::new());
    let mut lengths = vec![0f32; b];
    for (bi, row) in l.iter().enumerate() {
        for i in 0..s.saturating_sub(1) {
            if row[i + 1] >= 0 {
                rows.push((bi * s + i) as u32);
                targets.push(row[i + 1] as u32);
                owner.push(bi);
                lengths[bi] += 1.0;
            }
        }
    }
    let n = rows.len();
    let mut onehot = vec![0f32; b * n];
    for (j, &bi) in owner.iter().enumerate() {
        onehot[bi * n + j] = 1.0;
    }
    let dev = labels.device();
    Ok((
        rows,
        targets,
        Tensor::from_vec(onehot, (b, n), dev)?,
        Tensor::from_vec(lengths, b, dev)?,
    ))
}

impl LabelLogprobs {
    /// From full logits `[b, s, vocab]` and labels `[b, s]` (i64, `-100` = ignored).
    pub fn new(logits: &Tensor, labels: &Tensor) -> candle_core::Result<Self> {
        let (b, s, v) = logits.dims3()?;
        let (rows, targets, onehot, lengths) = label_positions(labels)?;
        let idx = Tensor::new(rows.as_slice(), logits.device())?;
        let picked = logits.reshape((b * s, v))?.index_select(&idx, 0)?;
        Self::from_selected(&picked, targets, &onehot, lengths)
    }

    /// From the final hidden states `[b, s, hidden]` (`Logits::None`): only label positions go
    /// through the LM head.
    pub fn from_hidden(
        model: &Model,
        hidden: &Tensor,
        labels: &Tensor,
    ) -> candle_core::Result<Self> {
        let (b, s, h) = hidden.dims3()?;
        let (rows, targets, onehot, lengths) = label_positions(labels)?;
        let idx = Tensor::new(rows.as_slice(), hidden.device())?;
        let picked = hidden.reshape((b * s, h))?.index_select(&idx, 0)?;
        let fused = picked.track_op() && !targets.is_empty() && picked.dtype() == DType::F32;
        if let Some(w) = model
            .frozen_lm_head()
            .filter(|_| fused && picked.device().is_cpu())
        {
            let logp = head_log_softmax(&picked, w, targets)?;
            let sums = onehot.matmul(&logp.unsqueeze(1)?)?.squeeze(1)?;
            return Ok(Self { sums, lengths });
        }
        let logits = model.lm_head_forward(&picked)?;
        Self::from_selected(&logits, targets, &onehot, lengths)
    }

    fn from_selected(
        logits: &Tensor,
        targets: Vec<u32>,
        onehot: &Tensor,
        lengths: Tensor,
    ) -> candle_core::Result<Self> {
        if targets.is_empty() {
            let b = lengths.dim(0)?;
            return Ok(Self {
                sums: Tensor::zeros(b, DType::F32, logits.device())?,
                lengths,
            });
        }
        let logp = picked_log_softmax(logits, targets)?;
        let sums = onehot.matmul(&logp.unsqueeze(1)?)?.squeeze(1)?;
        Ok(Self { sums, lengths })
    }

    /// `[b]`: the sum of log-probabilities of each sequence's label tokens.
    pub fn sequence_sums(&self) -> candle_core::Result<Tensor> {
        Ok(self.sums.clone())
    }

    /// `[b]`: the number of label tokens of each sequence.
    pub fn sequence_lengths(&self) -> candle_core::Result<Tensor> {
        Ok(self.lengths.clone())
    }

    /// The mean cross-entropy over every label token of the batch (transformers' loss).
    pub fn mean_nll(&self) -> candle_core::Result<Tensor> {
        let n = self.lengths.sum_all()?.maximum(1f32)?;
        self.sums.sum_all()?.neg()?.div(&n)
    }

    /// `[b]`: each sequence's mean label log-probability (length-normalised, as ORPO and SimPO
    /// use).
    pub fn sequence_means(&self) -> candle_core::Result<Tensor> {
        self.sums.div(&self.lengths.maximum(1f32)?)
    }
}

/// `log_softmax(logits)[i, targets[i]]` for `logits: [n, vocab]` -> `[n]`, fused, with the
/// backward `g_i (onehot(t_i) - softmax(logits_i))`. Falls back to the composed ops off the CPU.
pub fn picked_log_softmax(logits: &Tensor, targets: Vec<u32>) -> candle_core::Result<Tensor> {
    if !logits.device().is_cpu() || logits.dtype() != DType::F32 {
        let idx = Tensor::new(targets.as_slice(), logits.device())?.unsqueeze(1)?;
        let lp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
        return lp.gather(&idx, D::Minus1)?.squeeze(1);
    }
    logits.contiguous()?.apply_op1(PickedLogSoftmax {
        targets: Arc::new(targets),
        lse: Mutex::new(Vec::new()),
    })
}

/// `log_softmax(x W^T)[i, targets[i]]` for hidden rows `x: [n, h]` and a frozen LM head
/// `w: [vocab, h]` (f32, contiguous, CPU) -> `[n]`: the LM head and [`picked_log_softmax`] as
/// one autograd op, whose backward returns `x`'s gradient `G W` with
/// `G_i = g_i (onehot(t_i) - softmax(x_i W^T))` (issue 17's fused loss).
///
/// The value and the gradient are bit-for-bit those of the two ops in sequence (the same
/// products on [`crate::model::gemm`], the same per-row sums). What it saves: as two ops, the
/// `[n, vocab]` logits were a graph node, so candle's backward kept them, wrote their gradient
/// into a new `[n, vocab]` buffer, and added it to a zero-filled one of the same size (its
/// gradient store accumulates every node's gradient so) — three vocabulary-wide buffers besides
/// the logits, each ~200 MB at 8 × 128 tokens and a 49k vocabulary. Here the logits stay inside
/// the op and their gradient is written over them.
pub fn head_log_softmax(x: &Tensor, w: &Tensor, targets: Vec<u32>) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(HeadLogSoftmax {
        w: w.clone(),
        targets: Arc::new(targets),
        saved: Mutex::new(None),
    })
}

/// The fused op of [`head_log_softmax`].
pub struct HeadLogSoftmax {
    /// `[vocab, h]`, f32, contiguous, not trained.
    w: Tensor,
    targets: Arc<Vec<u32>>,
    /// The logits `[n, vocab]` and per-row log-sum-exp of the last forward pass, taken (and
    /// overwritten by their gradient) by the backward pass.
    saved: Mutex<Option<(Vec<f32>, Vec<f32>)>>,
}

impl HeadLogSoftmax {
    /// The logits `x W^T` of `n` rows and their per-row log-sum-exp.
    fn logits(&self, x: &[f32], n: usize) -> candle_core::Result<(Vec<f32>, Vec<f32>)> {
        let v = self.w.dim(0)?;
        let logits = times_wt(x, n, &self.w)?;
        let lse = row_lses(&logits, n, v);
        Ok((logits, lse))
    }
}

impl CustomOp1 for HeadLogSoftmax {
    fn name(&self) -> &'static str {
        "head-log-softmax"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, h) = layout.shape().dims2()?;
        let (v, wh) = self.w.dims2()?;
        let Some((a, b)) = layout.contiguous_offsets() else {
            candle_core::bail!("head-log-softmax: non-contiguous hidden states");
        };
        if wh != h || self.w.dtype() != DType::F32 || !self.w.is_contiguous() {
            candle_core::bail!(
                "head-log-softmax: hidden states [{n}, {h}] for a head [{v}, {wh}] of {:?} \
                 (needs a contiguous f32 head of the same width)",
                self.w.dtype()
            );
        }
        check_targets("head-log-softmax", &self.targets, n, v)?;
        let (logits, lse) = self.logits(&storage.as_slice::<f32>()?[a..b], n)?;
        let out = picked(&logits, v, &lse, &self.targets);
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some((logits, lse));
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let (n, h) = arg.dims2()?;
        let v = self.w.dim(0)?;
        let g = grad.to_vec1::<f32>()?;
        let saved = self.saved.lock().unwrap_or_else(|e| e.into_inner()).take();
        let (mut logits, lse) = match saved {
            Some(s) => s,
            // a second backward pass through the same graph: compute them again
            None => with_slice(&arg.contiguous()?, |x| self.logits(x, n))?,
        };
        logit_grads_in_place(&mut logits, v, &g, &lse, &self.targets);
        let dx = times_w(&logits, n, &self.w)?;
        drop(logits);
        Ok(Some(Tensor::from_vec(dx, (n, h), arg.device())?))
    }
}

/// One target per row, each below the vocabulary size `v`.
fn check_targets(op: &str, targets: &[u32], n: usize, v: usize) -> candle_core::Result<()> {
    if targets.len() != n || targets.iter().any(|&t| t as usize >= v) {
        candle_core::bail!("{op}: {} targets for {n} rows of {v}", targets.len());
    }
    Ok(())
}

/// `logits[i, targets[i]] - lse[i]` for each row.
fn picked(logits: &[f32], v: usize, lse: &[f32], targets: &[u32]) -> Vec<f32> {
    targets
        .iter()
        .zip(lse)
        .enumerate()
        .map(|(i, (&t, &l))| logits[i * v + t as usize] - l)
        .collect()
}

/// The fused op of [`picked_log_softmax`]. The forward pass keeps each row's log-sum-exp, so
/// the backward pass is one read of the logits and one write of their gradient (no second
/// reduction over the vocabulary, no copies of the `[n, vocab]` logits).
pub struct PickedLogSoftmax {
    targets: Arc<Vec<u32>>,
    /// Per-row log-sum-exp of the last forward pass.
    lse: Mutex<Vec<f32>>,
}

/// Rows per parallel part (each row is a whole vocabulary).
const ROWS_PER_PART: usize = 8;

fn row_lse(row: &[f32], scratch: &mut Vec<f32>) -> f32 {
    let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    scratch.clear();
    scratch.extend(row.iter().map(|&x| x - max));
    // `exp` in vectors, the same bits as `f32::exp`; summed in order as before
    crate::model::expf::exp_in_place(scratch);
    let sum: f32 = scratch.iter().sum();
    max + sum.ln()
}

/// The log-sum-exp of each of the `n` rows of `[n, v]` logits, rows in parallel.
fn row_lses(data: &[f32], n: usize, v: usize) -> Vec<f32> {
    let mut lse = vec![0f32; n];
    let lp = SyncPtr(lse.as_mut_ptr());
    run_parts(n.div_ceil(ROWS_PER_PART), &|p| {
        let rows = p * ROWS_PER_PART..((p + 1) * ROWS_PER_PART).min(n);
        // SAFETY: part p writes rows p*8.. only.
        let out = unsafe { lp.range(rows.start, rows.len()) };
        let mut scratch = Vec::with_capacity(v);
        for (o, i) in out.iter_mut().zip(rows) {
            *o = row_lse(&data[i * v..(i + 1) * v], &mut scratch);
        }
    });
    lse
}

/// The gradient of `g · log_softmax(row)[t]` with respect to the row's logits, written over
/// the logits: `g (onehot(t) - exp(x - lse))`.
fn row_grad_in_place(row: &mut [f32], g: f32, lse: f32, t: usize) {
    // `-g · exp(x - lse)`, each step rounded as in that scalar expression (`exp` in vectors)
    row.iter_mut().for_each(|x| *x -= lse);
    crate::model::expf::exp_in_place(row);
    row.iter_mut().for_each(|x| *x *= -g);
    row[t] += g;
}

/// [`row_grad_in_place`] over every row of `[n, v]` logits, rows in parallel.
fn logit_grads_in_place(logits: &mut [f32], v: usize, g: &[f32], lse: &[f32], targets: &[u32]) {
    let n = g.len();
    let op = SyncPtr(logits.as_mut_ptr());
    run_parts(n.div_ceil(ROWS_PER_PART), &|p| {
        let rows = p * ROWS_PER_PART..((p + 1) * ROWS_PER_PART).min(n);
        // SAFETY: part p writes rows p*8.. only.
        let o = unsafe { op.range(rows.start * v, rows.len() * v) };
        for (r, i) in rows.enumerate() {
            row_grad_in_place(
                &mut o[r * v..(r + 1) * v],
                g[i],
                lse[i],
                targets[i] as usize,
            );
        }
    });
}

/// Disjoint writes into one buffer from parallel parts.
struct SyncPtr(*mut f32);
// SAFETY: every part writes its own rows only, and the buffer outlives `run_parts`.
unsafe impl Sync for SyncPtr {}
impl SyncPtr {
    /// Rows `r0..r0 + len / v` of the buffer.
    ///
    /// # Safety
    /// No other part touches the same range while the slice lives.
    #[allow(clippy::mut_from_ref)]
    unsafe fn range(&self, start: usize, len: usize) -> &mut [f32] {
        std::slice::from_raw_parts_mut(self.0.add(start), len)
    }
}

impl CustomOp1 for PickedLogSoftmax {
    fn name(&self) -> &'static str {
        "picked-log-softmax"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, v) = layout.shape().dims2()?;
        let Some((a, b)) = layout.contiguous_offsets() else {
            candle_core::bail!("picked-log-softmax: non-contiguous logits");
        };
        check_targets("picked-log-softmax", &self.targets, n, v)?;
        let data = &storage.as_slice::<f32>()?[a..b];
        let lse = row_lses(data, n, v);
        let out = picked(data, v, &lse, &self.targets);
        *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = lse;
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let (n, v) = arg.dims2()?;
        let g = grad.to_vec1::<f32>()?;
        let arg = arg.contiguous()?;
        let mut lse = self.lse.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let out = with_slice(&arg, |data| {
            if lse.len() != n {
                lse = row_lses(data, n, v);
            }
            let mut out = data.to_vec();
            logit_grads_in_place(&mut out, v, &g, &lse, &self.targets);
            Ok(out)
        })?;
        Ok(Some(Tensor::from_vec(out, (n, v), arg.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn hand_computed_loss() {
        // One sequence of 3 tokens over a vocabulary of 2. Logits at positions 0 and 1 are
        // [0, 0] (p = 1/2 each) and [ln 3, 0] (p = 3/4, 1/4). Labels [-100, 0, 1]: position 0
        // predicts token 0 (log 1/2), position 1 predicts token 1 (log 1/4).
        let dev = Device::Cpu;
        let logits = Tensor::new(&[[[0f32, 0.], [3f32.ln(), 0.], [5., 5.]]], &dev).unwrap();
        let labels = Tensor::new(&[[-100i64, 0, 1]], &dev).unwrap();
        let lp = LabelLogprobs::new(&logits, &labels).unwrap();
        let sum = lp.sequence_sums().unwrap().to_vec1::<f32>().unwrap()[0];
        assert!((sum - (0.5f32.ln() + 0.25f32.ln())).abs() < 1e-6);
        let nll = lp.mean_nll().unwrap().to_scalar::<f32>().unwrap();
        assert!((nll + (0.5f32.ln() + 0.25f32.ln()) / 2.0).abs() < 1e-6);
        // Ignoring the second label leaves only log 1/2.
        let labels = Tensor::new(&[[-100i64, 0, -100]], &dev).unwrap();
        let lp = LabelLogprobs::new(&logits, &labels).unwrap();
        assert!((lp.mean_nll().unwrap().to_scalar::<f32>().unwrap() - 2f32.ln()).abs() < 1e-6);
    }

    #[test]
    fn fused_op_matches_composed_ops_and_their_gradient() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 3.0, (5, 11), &dev).unwrap()).unwrap();
        let targets = vec![0u32, 10, 3, 3, 7];
        let idx = Tensor::new(targets.as_slice(), &dev)
            .unwrap()
            .unsqueeze(1)
            .unwrap();
        let composed = candle_nn::ops::log_softmax(x.as_tensor(), D::Minus1)
            .unwrap()
            .gather(&idx, 1)
            .unwrap()
            .squeeze(1)
            .unwrap();
        let fused = picked_log_softmax(x.as_tensor(), targets).unwrap();
        let w = Tensor::new(&[1f32, -2., 0.5, 3., 1.], &dev).unwrap();
        let d = (&composed - &fused)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-5, "{d}");
        let g1 = (composed * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g2 = (fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let d = (g1.get(x.as_tensor()).unwrap() - g2.get(x.as_tensor()).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-5, "{d}");
    }

    /// The fused head + loss equals the frozen LM head followed by [`picked_log_softmax`]
    /// bit for bit, in value and in the input's gradient, also on a second backward pass
    /// (which computes the logits again).
    #[test]
    fn fused_head_equals_head_then_picked_log_softmax_bit_for_bit() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (37, 6), &dev).unwrap();
        let x = Var::from_tensor(&Tensor::randn(0f32, 2.0, (9, 6), &dev).unwrap()).unwrap();
        let targets = vec![0u32, 36, 5, 5, 17, 2, 30, 1, 0];
        let probe = Tensor::new(&[1f32, -2., 0.5, 3., 1., -1., 0.25, 2., -0.5], &dev).unwrap();
        let logits = x
            .as_tensor()
            .apply_op1(crate::model::frozen::FrozenLinear { w: w.clone() })
            .unwrap();
        let two_ops = picked_log_softmax(&logits, targets.clone()).unwrap();
        let fused = head_log_softmax(x.as_tensor(), &w, targets).unwrap();
        let (a, b) = (
            two_ops.to_vec1::<f32>().unwrap(),
            fused.to_vec1::<f32>().unwrap(),
        );
        assert_eq!(a, b);
        // against a plain f64 log-softmax of x W^T
        let (xs, ws) = (
            x.as_tensor().to_vec2::<f32>().unwrap(),
            w.to_vec2::<f32>().unwrap(),
        );
        for (i, row) in xs.iter().enumerate() {
            let z: Vec<f64> = ws
                .iter()
                .map(|wr| wr.iter().zip(row).map(|(p, q)| (p * q) as f64).sum())
                .collect();
            let lse = z.iter().map(|v| v.exp()).sum::<f64>().ln();
            let t = [0usize, 36, 5, 5, 17, 2, 30, 1, 0][i];
            assert!((z[t] - lse - b[i] as f64).abs() < 1e-4, "row {i}");
        }
        let grad_of = |y: &Tensor| {
            let g = (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            g.get(x.as_tensor()).unwrap().to_vec2::<f32>().unwrap()
        };
        let g_two = grad_of(&two_ops);
        let g_fused = grad_of(&fused);
        assert_eq!(g_two, g_fused);
        assert_eq!(grad_of(&fused), g_fused, "second backward pass");
    }
}
