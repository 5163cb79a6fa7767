//! Per-prompt importance of every neuron (safety-neurons paper, §2.1 and Appendix A.1): the
//! norm of the change of a module's output when one neuron (a row or column of its weight, see
//! [`Axis::for_module`](super::Axis::for_module)) is zeroed, for all neurons at once.
//!
//! One prompt (all its tokens, `l` of them) goes through the model once; a [`Hook`] receives
//! each layer's activations and turns them into that layer's importances as soon as the layer
//! is done, so only one layer's activations are alive at a time. With
//! [`NeuronImportance::prompt_rows`] only some positions count (the user's content, see
//! [`scope`](super::scope)): the norms below run over those rows `t` only (for Q/K: those
//! query rows, each still over all its keys).
//!
//! | neuron | [`ImportanceKind::Exact`] (default) | [`ImportanceKind::Proxy`] (the authors' code) |
//! |---|---|---|
//! | FFN unit `k`: gate row `k`, up row `k`, down column `k` | `‖h[:, k]‖ ‖W_down[:, k]‖`, `h` = down_proj input (Eqs. 4, 8-9) | `Σ_t |up_proj(x)[t, k]|` |
//! | o_proj column `c` | `‖a[:, c]‖ ‖W_o[:, c]‖`, `a` = o_proj input (the attention output) | `Σ_t |a[t, c]|` |
//! | v_proj row (KV head `g`, dim `j`) | `‖Σ_{h∈g} a[:, h d + j] W_o[:, h d + j]^T‖_F` | `Σ_{h∈g} Σ_t |a[t, h d + j]|` |
//! | q_proj row (head `h`, dim `k`) | `‖softmax((S - Δ_k)/√d + causal) - softmax(S/√d + causal)‖_F` (Eqs. 11-14) | `Σ_t |q[t, k]|` |
//! | k_proj row (KV head `g`, dim `k`) | `sqrt(Σ_{h∈g} imp_q(h, k)²)` | `Σ_t |k[t, k]|` |
//!
//! with `S = Q_h K_g^T`, `Δ_k = Q_h[:, k] K_g[:, k]^T` and `h ∈ g` meaning query head `h` reads
//! KV head `g = h / (n_heads / n_kv_heads)`. The FFN and V/O formulas are exact: zeroing one
//! input unit of a linear map changes its output by an outer product, whose Frobenius norm is
//! the product of the two norms; for a V row the group's query heads all lose their dim `j`.
//! The Q/K formula is the paper's approximation (the change of the attention probabilities,
//! not of the layer output).
//!
//! Choices, stated:
//! - Q and K are taken **after rotary embedding** (the `self_attn:q|k` capture sites), so
//!   "dim `k`" is a dimension of the rotated head vector; zeroing q_proj row `k` before RoPE
//!   would touch the rotated dims `k` and `k ± d/2`. This follows the paper's `W_Q(x)W_K(x)^T`
//!   read as the scores the model actually uses.
//! - K rows reuse the Q computation: zeroing dim `k` of the key or of the query removes the
//!   same term `Q_h[:, k] K_g[:, k]^T` from `S`, so `Δ_k` is the same; a KV head's importance
//!   combines its query heads as the root of the sum of squares (the Frobenius norm of the
//!   stacked changes).
//! - Nothing of size `l × l × d` is formed: the Frobenius norm is a sum over query rows, so each
//!   row `i` is done for all `k` in turn, holding `O(l)` numbers per worker thread (heads run in
//!   parallel with rayon). Memory stays linear in the prompt length.
//! - Biases are ignored (a neuron is a weight row or column); with an adapter attached
//!   unmerged, the effective weight `W + s B A` is used.
//! - Proxy V rows: the attention output has `n_heads · d` units and V has `n_kv · d` rows; a V
//!   row sums the units of its group's query heads.

use std::collections::BTreeMap;
use std::sync::Mutex;

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use crate::model::{ForwardArgs, Hook, Logits, Model, LINEAR_MODULES};

/// How importance is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImportanceKind {
    /// The paper's formulas (output-change norms; Eqs. 4, 8-14).
    #[default]
    Exact,
    /// The authors' cheaper activation sums (see the module table).
    Proxy,
}

impl ImportanceKind {
    /// `exact` or `proxy`.
    pub fn name(self) -> &'static str {
        match self {
            ImportanceKind::Exact => "exact",
            ImportanceKind::Proxy => "proxy",
        }
    }
}

/// The importances of every neuron of one decoder layer for one prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerImportance {
    /// Per module in [`LINEAR_MODULES`] order (q, k, v, o, gate, up, down), one value per
    /// neuron along [`Axis::for_module`](super::Axis::for_module): q rows `h * d + k`, k and v
    /// rows `g * d + k`, o columns, gate and up rows, down columns. gate, up and down hold the
    /// same values (one FFN unit).
    pub modules: [Vec<f32>; 7],
}

impl LayerImportance {
    /// The values of a module by its path inside the layer (`self_attn.q_proj`, …).
    pub fn module(&self, local: &str) -> Option<&[f32]> {
        LINEAR_MODULES
            .iter()
            .position(|m| *m == local)
            .map(|i| self.modules[i].as_slice())
    }
}

/// Weight statistics of one layer, computed once per model.
#[derive(Debug, Clone)]
struct LayerWeights {
    /// `‖W_down[:, k]‖`, `[intermediate]`.
    down_col_norm: Vec<f32>,
    /// `‖W_o[:, c]‖`, `[n_heads * d]`.
    o_col_norm: Vec<f32>,
    /// `W_o[:, h d + j] · W_o[:, h' d + j]` for the heads of each KV group:
    /// `[n_kv, d, groups, groups]`.
    o_group_gram: Vec<f32>,
}

/// Head layout of the attention.
#[derive(Debug, Clone, Copy)]
struct Heads {
    n: usize,
    kv: usize,
    dim: usize,
}

impl Heads {
    fn groups(self) -> usize {
        self.n / self.kv
    }
}

/// Computes per-prompt neuron importances of a model (the weight statistics are computed once
/// in [`NeuronImportance::new`]).
///
/// ```no_run
/// use realign::neurons::importance::{ImportanceKind, NeuronImportance};
/// # let loaded = realign::model::LoadedModel::load("m".as_ref(), &Default::default())?;
/// let imp = NeuronImportance::new(&loaded.model, ImportanceKind::Exact)?;
/// let layers = imp.prompt(&[1, 2, 3])?; // one LayerImportance per decoder layer
/// # Ok::<(), realign::Error>(())
/// ```
pub struct NeuronImportance<'m> {
    model: &'m Model,
    kind: ImportanceKind,
    heads: Heads,
    weights: Vec<LayerWeights>,
}

impl<'m> NeuronImportance<'m> {
    /// Prepares importance computation on `model` (effective weights: adapters attached
    /// unmerged are folded in).
    pub fn new(model: &'m Model, kind: ImportanceKind) -> crate::Result<Self> {
        let cfg = model.config();
        let heads = Heads {
            n: cfg.num_attention_heads,
            kv: cfg.num_key_value_heads.max(1),
            dim: cfg.head_dim,
        };
        let by_name: BTreeMap<&str, &crate::model::linear::Linear> =
            model.linears().map(|l| (l.name.as_str(), l)).collect();
        let mut weights = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let get = |local: &str| -> crate::Result<Vec<f32>> {
                let name = format!("model.layers.{i}.{local}");
                let lin = by_name.get(name.as_str()).ok_or_else(|| {
                    super::NeuronError::Invalid(format!("the model has no module {name}"))
                })?;
                Ok(to_vec(&effective_weight(lin)?)?)
            };
            let (h, inter, q) = (cfg.hidden_size, cfg.intermediate_size, heads.n * heads.dim);
            let down = get("mlp.down_proj")?;
            let o = get("self_attn.o_proj")?;
            let o_col_norm = col_norms(&o, h, q);
            weights.push(LayerWeights {
                down_col_norm: col_norms(&down, h, inter),
                o_group_gram: group_gram(&o, h, heads),
                o_col_norm,
            });
        }
        Ok(Self {
            model,
            kind,
            heads,
            weights,
        })
    }

    /// The kind of importance computed.
    pub fn kind(&self) -> ImportanceKind {
        self.kind
    }

    /// The importances of every neuron of every layer for one prompt (token ids, all of them
    /// count), one [`LayerImportance`] per decoder layer.
    pub fn prompt(&self, ids: &[u32]) -> crate::Result<Vec<LayerImportance>> {
        self.prompt_rows(ids, &(0..ids.len()).collect::<Vec<_>>())
    }

    /// Like [`prompt`](Self::prompt), but only the positions `rows` (ascending, each `<
    /// ids.len()`) count: the change of the module outputs is measured at those positions
    /// only, and for Q/K only those query rows of the attention probabilities (each still
    /// attends to every earlier key). The forward pass sees every token.
    ///
    /// Errors when `rows` is empty, not ascending or out of range.
    pub fn prompt_rows(&self, ids: &[u32], rows: &[usize]) -> crate::Result<Vec<LayerImportance>> {
        if rows.is_empty()
            || rows.windows(2).any(|w| w[0] >= w[1])
            || rows.last().is_some_and(|&r| r >= ids.len())
        {
            return Err(super::NeuronError::Invalid(format!(
                "token rows {rows:?} must be ascending positions of the {}-token prompt",
                ids.len()
            ))
            .into());
        }
        let input = Tensor::from_vec(ids.to_vec(), (1, ids.len()), self.model.device())?;
        let hook = LayerHook {
            imp: self,
            rows,
            pending: Mutex::default(),
            done: Mutex::new(vec![None; self.weights.len()]),
        };
        self.model.forward_with(
            &input,
            ForwardArgs {
                hook: Some(&hook),
                logits: Logits::None,
                ..Default::default()
            },
        )?;
        let done = hook.done.into_inner().unwrap_or_default();
        done.into_iter()
            .enumerate()
            .map(|(i, l)| {
                l.ok_or_else(|| {
                    super::NeuronError::Invalid(format!(
                        "layer {i}: its activations were not all seen during the forward pass"
                    ))
                    .into()
                })
            })
            .collect()
    }

    /// The capture sites needed per layer, by suffix after `model.layers.{i}.`.
    fn sites(&self) -> [&'static str; 4] {
        let ffn = match self.kind {
            ImportanceKind::Exact => "mlp.down_proj:input",
            ImportanceKind::Proxy => "mlp.up_proj:output",
        };
        ["self_attn:q", "self_attn:k", "self_attn.o_proj:input", ffn]
    }

    /// One layer's importances from its activations (`q [1, n, l, d]`, `k [1, kv, l, d]`,
    /// `o_proj` input `[1, l, n d]`, FFN activation `[1, l, inter]`).
    fn layer(
        &self,
        layer: usize,
        acts: &BTreeMap<&str, Tensor>,
        rows: &[usize],
    ) -> crate::Result<LayerImportance> {
        let [qs, ks, os, fs] = self.sites();
        let get = |s: &str| -> crate::Result<(Vec<f32>, Vec<usize>)> {
            let t = acts.get(s).ok_or_else(|| {
                super::NeuronError::Invalid(format!("layer {layer}: no activation at {s}"))
            })?;
            Ok((to_vec(t)?, t.dims().to_vec()))
        };
        let (q, qd) = get(qs)?;
        let (k, _) = get(ks)?;
        let (a, ad) = get(os)?;
        let (f, fd) = get(fs)?;
        let hs = self.heads;
        let l = qd.get(2).copied().unwrap_or(0);
        let (qw, inter) = (
            ad.last().copied().unwrap_or(0),
            fd.last().copied().unwrap_or(0),
        );
        let w = &self.weights[layer];
        // The o_proj and down_proj inputs at the counted positions only.
        let (a, f) = (gather_rows(&a, qw, rows), gather_rows(&f, inter, rows));
        let lr = rows.len();
        let (qi, ki, vi, oi, fi) = match self.kind {
            ImportanceKind::Exact => {
                let (qi, ki) = qk_importance_rows(&q, &k, l, rows, hs.n, hs.kv, hs.dim);
                let vi = v_importance(&a, lr, &w.o_group_gram, hs.n, hs.kv, hs.dim);
                let oi = mul(&col_norms_rows(&a, lr, qw), &w.o_col_norm);
                let fi = mul(&col_norms_rows(&f, lr, inter), &w.down_col_norm);
                (qi, ki, vi, oi, fi)
            }
            ImportanceKind::Proxy => {
                let per_head_abs = |x: &[f32], heads: usize| -> Vec<f32> {
                    // x: [heads, l, d] -> sum over the counted tokens of |x| per (head, dim)
                    let mut out = vec![0f32; heads * hs.dim];
                    for h in 0..heads {
                        for &t in rows {
                            let row = &x[(h * l + t) * hs.dim..(h * l + t + 1) * hs.dim];
                            for (o, v) in out[h * hs.dim..(h + 1) * hs.dim].iter_mut().zip(row) {
                                *o += v.abs();
                            }
                        }
                    }
                    out
                };
                let oi = col_abs_sums(&a, lr, qw);
                let mut vi = vec![0f32; hs.kv * hs.dim];
                for h in 0..hs.n {
                    let g = h / hs.groups();
                    for j in 0..hs.dim {
                        vi[g * hs.dim + j] += oi[h * hs.dim + j];
                    }
                }
                (
                    per_head_abs(&q, hs.n),
                    per_head_abs(&k, hs.kv),
                    vi,
                    oi,
                    col_abs_sums(&f, lr, inter),
                )
            }
        };
        Ok(LayerImportance {
            modules: [qi, ki, vi, oi, fi.clone(), fi.clone(), fi],
        })
    }
}

/// Receives one prompt's activations and computes each layer's importances as soon as all of
/// its sites have arrived (the FFN site is the layer's last), then drops them.
struct LayerHook<'a, 'm> {
    imp: &'a NeuronImportance<'m>,
    rows: &'a [usize],
    pending: Mutex<BTreeMap<usize, BTreeMap<&'static str, Tensor>>>,
    done: Mutex<Vec<Option<LayerImportance>>>,
}

impl LayerHook<'_, '_> {
    fn parse(&self, site: &str) -> Option<(usize, &'static str)> {
        let rest = site.strip_prefix("model.layers.")?;
        let (i, local) = rest.split_once('.')?;
        let i: usize = i.parse().ok()?;
        let s = self.imp.sites().into_iter().find(|s| *s == local)?;
        Some((i, s))
    }
}

impl Hook for LayerHook<'_, '_> {
    fn wants(&self, site: &str) -> bool {
        self.parse(site).is_some()
    }

    fn record(&self, site: &str, value: &Tensor) -> candle_core::Result<()> {
        let Some((layer, s)) = self.parse(site) else {
            return Ok(());
        };
        let ready = {
            let mut p = self
                .pending
                .lock()
                .map_err(|_| candle_core::Error::Msg("importance hook poisoned".into()))?;
            let entry = p.entry(layer).or_default();
            entry.insert(s, value.clone());
            if entry.len() == 4 {
                p.remove(&layer)
            } else {
                None
            }
        };
        if let Some(acts) = ready {
            let li = self.imp.layer(layer, &acts, self.rows).map_err(|e| {
                candle_core::Error::Msg(format!("importance of layer {layer}: {e}"))
            })?;
            if let Ok(mut d) = self.done.lock() {
                if let Some(slot) = d.get_mut(layer) {
                    *slot = Some(li);
                }
            }
        }
        Ok(())
    }
}

/// The weight with its unmerged adapters folded in.
fn effective_weight(lin: &crate::model::linear::Linear) -> candle_core::Result<Tensor> {
    let mut w = lin.weight.clone();
    for m in &lin.loras {
        w = crate::adapters::merge_into(&w, m)?;
    }
    Ok(w)
}

/// A tensor's values in row-major order, as f32 on the CPU.
fn to_vec(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.to_dtype(DType::F32)?
        .contiguous()?
        .flatten_all()?
        .to_vec1::<f32>()
}

/// The rows `rows` of a row-major `[_, cols]` matrix, stacked.
fn gather_rows(x: &[f32], cols: usize, rows: &[usize]) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows.len() * cols);
    for &r in rows {
        out.extend_from_slice(&x[r * cols..(r + 1) * cols]);
    }
    out
}

fn mul(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(x, y)| x * y).collect()
}

/// `‖W[:, c]‖` of a row-major `[rows, cols]` matrix.
fn col_norms(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    col_norms_rows(w, rows, cols)
}

/// `‖x[:, c]‖` of a row-major `[rows, cols]` matrix (f64 accumulation).
fn col_norms_rows(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut acc = vec![0f64; cols];
    for r in 0..rows {
        for (a, v) in acc.iter_mut().zip(&x[r * cols..(r + 1) * cols]) {
            *a += f64::from(*v) * f64::from(*v);
        }
    }
    acc.into_iter().map(|a| a.sqrt() as f32).collect()
}

/// `Σ_r |x[r, c]|` of a row-major `[rows, cols]` matrix.
fn col_abs_sums(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut acc = vec![0f64; cols];
    for r in 0..rows {
        for (a, v) in acc.iter_mut().zip(&x[r * cols..(r + 1) * cols]) {
            *a += f64::from(v.abs());
        }
    }
    acc.into_iter().map(|a| a as f32).collect()
}

/// `G[g, j, a, b] = X[:, h_a d + j] · X[:, h_b d + j]` for the query heads `h_a`, `h_b` of KV
/// group `g`, of a row-major `[rows, n d]` matrix: `[kv, d, groups, groups]`.
fn group_gram(x: &[f32], rows: usize, hs: Heads) -> Vec<f32> {
    let (gs, d, cols) = (hs.groups(), hs.dim, hs.n * hs.dim);
    let mut acc = vec![0f64; hs.kv * d * gs * gs];
    for r in 0..rows {
        let row = &x[r * cols..(r + 1) * cols];
        for g in 0..hs.kv {
            for j in 0..d {
                let base = (g * d + j) * gs * gs;
                for a in 0..gs {
                    let xa = f64::from(row[(g * gs + a) * d + j]);
                    for b in 0..gs {
                        acc[base + a * gs + b] += xa * f64::from(row[(g * gs + b) * d + j]);
                    }
                }
            }
        }
    }
    acc.into_iter().map(|v| v as f32).collect()
}

/// Importance of the v_proj rows: zeroing row `(g, j)` zeroes dim `j` of the attention output
/// of every query head of group `g`, so the change of the o_proj output is
/// `Σ_{h∈g} a[:, h d + j] W_o[:, h d + j]^T`, whose squared Frobenius norm is
/// `Σ_{h,h'∈g} (a_h · a_h') (w_h · w_h')`.
///
/// # Shapes
/// `a`: o_proj input `[l, n d]` row-major; `w_gram`: `[kv, d, groups, groups]` (see
/// `group_gram`); returns `[kv d]`.
pub fn v_importance(
    a: &[f32],
    l: usize,
    w_gram: &[f32],
    n_heads: usize,
    n_kv: usize,
    d: usize,
) -> Vec<f32> {
    let hs = Heads {
        n: n_heads,
        kv: n_kv,
        dim: d,
    };
    let a_gram = group_gram(a, l, hs);
    let gg = hs.groups() * hs.groups();
    (0..n_kv * d)
        .map(|gj| {
            let s: f64 = (0..gg)
                .map(|e| f64::from(a_gram[gj * gg + e]) * f64::from(w_gram[gj * gg + e]))
                .sum();
            s.max(0.0).sqrt() as f32
        })
        .collect()
}

/// Importance of the FFN units (Eqs. 4, 8-9; also o_proj columns with the attention output):
/// `‖h[:, k]‖ ‖W_down[:, k]‖`, the Frobenius norm of the change of the down_proj output when
/// unit `k` is zeroed.
///
/// # Shapes
/// `h`: `[l, inter]` (the down_proj input), `w_down`: `[hidden, inter]`; returns `[inter]`.
pub fn ffn_importance(h: &Tensor, w_down: &Tensor) -> candle_core::Result<Vec<f32>> {
    let (l, inter) = h.dims2()?;
    let (hidden, _) = w_down.dims2()?;
    Ok(mul(
        &col_norms_rows(&to_vec(h)?, l, inter),
        &col_norms(&to_vec(w_down)?, hidden, inter),
    ))
}

/// Importance of the q_proj and k_proj rows (Eqs. 11-14): for query head `h` and dim `k`,
/// `‖softmax((S - Δ_k)/√d + causal) - softmax(S/√d + causal)‖_F` with `S = Q_h K_g^T`,
/// `Δ_k = Q_h[:, k] K_g[:, k]^T`, `g = h / (n_heads / n_kv)`; a k_proj row `(g, k)` gets the
/// root of the sum of squares over the query heads of `g` (the same `Δ_k`).
///
/// Row by row: for query `i`, the logits `(S[i, j] - Q[i, k] K[j, k]) / √d` over `j ≤ i` are
/// formed for each `k` in turn, so memory is `O(l + d)` per head (heads in parallel).
///
/// # Shapes
/// `q`: `[n_heads, l, d]`, `k`: `[n_kv, l, d]`, row-major (post-RoPE); returns
/// (`[n_heads d]`, `[n_kv d]`).
pub fn qk_importance(
    q: &[f32],
    k: &[f32],
    l: usize,
    n_heads: usize,
    n_kv: usize,
    d: usize,
) -> (Vec<f32>, Vec<f32>) {
    let rows: Vec<usize> = (0..l).collect();
    qk_importance_rows(q, k, l, &rows, n_heads, n_kv, d)
}

/// [`qk_importance`] with only the query rows `rows` (ascending, each `< l`) in the Frobenius
/// norm: the change of the attention probabilities of those queries (each over all its keys
/// `j ≤ i`, template tokens included).
pub fn qk_importance_rows(
    q: &[f32],
    k: &[f32],
    l: usize,
    rows: &[usize],
    n_heads: usize,
    n_kv: usize,
    d: usize,
) -> (Vec<f32>, Vec<f32>) {
    let groups = (n_heads / n_kv.max(1)).max(1);
    let scale = 1.0 / (d as f32).sqrt();
    // Keys transposed per KV head, [kv, d, l], so the inner loop over keys is contiguous.
    let kt: Vec<Vec<f32>> = (0..n_kv)
        .map(|g| {
            let mut t = vec![0f32; d * l];
            for j in 0..l {
                for c in 0..d {
                    t[c * l + j] = k[(g * l + j) * d + c];
                }
            }
            t
        })
        .collect();
    let per_head: Vec<Vec<f64>> = (0..n_heads)
        .into_par_iter()
        .map(|h| {
            let kt = &kt[h / groups];
            let qh = &q[h * l * d..(h + 1) * l * d];
            let mut sq = vec![0f64; d];
            let (mut s, mut p0, mut z) = (vec![0f32; l], vec![0f32; l], vec![0f32; l]);
            for &i in rows {
                let n = i + 1;
                let qi = &qh[i * d..(i + 1) * d];
                s[..n].fill(0.0);
                for (c, &qc) in qi.iter().enumerate() {
                    for (sj, kj) in s[..n].iter_mut().zip(&kt[c * l..c * l + n]) {
                        *sj += qc * kj;
                    }
                }
                p0[..n].copy_from_slice(&s[..n]);
                softmax_lanes(&mut p0[..n], scale);
                for (c, &qc) in qi.iter().enumerate() {
                    for ((zj, sj), kj) in z[..n].iter_mut().zip(&s[..n]).zip(&kt[c * l..c * l + n])
                    {
                        *zj = sj - qc * kj;
                    }
                    softmax_lanes(&mut z[..n], scale);
                    sq[c] += f64::from(sq_diff_lanes(&z[..n], &p0[..n]));
                }
            }
            sq
        })
        .collect();
    let qi: Vec<f32> = per_head
        .iter()
        .flat_map(|sq| sq.iter().map(|v| v.sqrt() as f32))
        .collect();
    let mut ki = vec![0f64; n_kv * d];
    for (h, sq) in per_head.iter().enumerate() {
        let g = h / groups;
        for (c, v) in sq.iter().enumerate() {
            ki[g * d + c] += v;
        }
    }
    (qi, ki.into_iter().map(|v| v.sqrt() as f32).collect())
}

/// Lanes of the vectorised loops below: sums and maxima are kept in `LANES` independent
/// accumulators so the compiler can use SIMD (a single running `f32` sum is a serial chain).
const LANES: usize = 8;

/// `x ← softmax(x · scale)` (max-subtracted), with [`exp_fast`] and lane-wise reductions.
fn softmax_lanes(x: &mut [f32], scale: f32) {
    let mut m = [f32::NEG_INFINITY; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for (mi, &v) in m.iter_mut().zip(c) {
            *mi = if v > *mi { v } else { *mi };
        }
    }
    let mut mx = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |a, &v| a.max(v));
    mx = m.iter().fold(mx, |a, &v| a.max(v));
    let mut sum = [0f32; LANES];
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (si, v) in sum.iter_mut().zip(c.iter_mut()) {
            *v = exp_fast((*v - mx) * scale);
            *si += *v;
        }
    }
    let mut total: f32 = sum.iter().sum();
    for v in chunks.into_remainder() {
        *v = exp_fast((*v - mx) * scale);
        total += *v;
    }
    let inv = 1.0 / total;
    x.iter_mut().for_each(|v| *v *= inv);
}

/// `Σ_j (a_j − b_j)²` with lane-wise accumulation.
fn sq_diff_lanes(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for ((s, u), v) in acc.iter_mut().zip(x).zip(y) {
            let e = u - v;
            *s += e * e;
        }
    }
    let rest: f32 = ra.iter().zip(rb).map(|(u, v)| (u - v) * (u - v)).sum();
    acc.iter().sum::<f32>() + rest
}

/// `e^x` for `x ≤ 0` (used on max-subtracted logits), branch-free so that loops over it
/// vectorise: `r = round(x log2 e)` (by the `1.5 · 2^23` trick), `g = x − r ln 2` (Cody-Waite:
/// `ln 2` in a high and a low part, so `g` is exact to a few ulp), `e^g` by its degree-6 Taylor
/// polynomial (`|g| ≤ 0.35`: truncation below `1e-7` relative), `2^r` built in the exponent
/// bits. Inputs below −87 give `e^-87` (≈ 1.6e-38, next
/// to the f32 normal range), which a probability of that size does not notice.
#[inline(always)]
fn exp_fast(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23
    const LN2_HI: f32 = 0.693_359_4; // 0.693359375, 9 significant bits
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.max(-87.0);
    let r = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let g = (x - r * LN2_HI) - r * LN2_LO;
    let p = 1.0
        + g * (1.0
            + g * (0.5
                + g * (1.0 / 6.0 + g * (1.0 / 24.0 + g * (1.0 / 120.0 + g * (1.0 / 720.0))))));
    let bits = ((r as i32 + 127) as u32) << 23;
    p * f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_fast_matches_exp() {
        for i in 0..2000 {
            let x = -(i as f32) * 0.0437;
            let (got, want) = (exp_fast(x), x.exp());
            assert!(
                (got - want).abs() <= 2e-6 * want + 1e-37,
                "x = {x}: {got} vs {want}"
            );
        }
        assert_eq!(exp_fast(0.0), 1.0);
        assert!(exp_fast(-1000.0) < 2e-38);
        let mut v = vec![1.0f32, 2.0, 3.0, 0.5, -1.0, 4.0, 2.5, 0.0, 1.5, 3.5, -2.0];
        let want: Vec<f32> = {
            let e: Vec<f32> = v.iter().map(|x| ((x - 4.0) * 0.5f32).exp()).collect();
            let s: f32 = e.iter().sum();
            e.iter().map(|x| x / s).collect()
        };
        softmax_lanes(&mut v, 0.5);
        for (g, w) in v.iter().zip(&want) {
            assert!((g - w).abs() < 1e-6, "{g} vs {w}");
        }
        assert!((sq_diff_lanes(&v, &want)).abs() < 1e-10);
        let (a, b): (Vec<f32>, Vec<f32>) = (0..11).map(|i| (i as f32, 0.0)).unzip();
        assert_eq!(sq_diff_lanes(&a, &b), 385.0);
    }

    #[test]
    fn ffn_importance_is_the_outer_product_norm() {
        // h = [[3, 0], [4, 1]] -> column norms 5, 1; W_down = [[1, 0], [0, 2]] -> 1, 2.
        let dev = candle_core::Device::Cpu;
        let h = Tensor::new(&[[3f32, 0.], [4., 1.]], &dev).unwrap();
        let w = Tensor::new(&[[1f32, 0.], [0., 2.]], &dev).unwrap();
        assert_eq!(ffn_importance(&h, &w).unwrap(), vec![5.0, 2.0]);
    }

    #[test]
    fn one_token_prompt_has_zero_qk_importance() {
        // A single query attends to a single key: softmax is 1 whatever the score.
        let (q, k) = (vec![1.0f32, 2.0], vec![0.5f32, -1.0]);
        let (qi, ki) = qk_importance(&q, &k, 1, 1, 1, 2);
        assert_eq!(qi, vec![0.0, 0.0]);
        assert_eq!(ki, vec![0.0, 0.0]);
    }

    #[test]
    fn two_token_qk_importance_by_hand() {
        // d = 1, q = [0, 1], k = [0, 2]: row 0 attends to itself only (diff 0); row 1 has
        // scores [0, 2] -> softmax [1/(1+e^2), e^2/(1+e^2)]; zeroing the dim gives [0, 0] ->
        // [1/2, 1/2]. Norm: sqrt(2) * |1/2 - 1/(1+e^2)|.
        let (qi, _) = qk_importance(&[0.0, 1.0], &[0.0, 2.0], 2, 1, 1, 1);
        let e2 = 2f32.exp();
        let want = 2f32.sqrt() * (0.5 - 1.0 / (1.0 + e2)).abs();
        assert!((qi[0] - want).abs() < 1e-6, "{} vs {want}", qi[0]);
    }

    #[test]
    fn v_importance_single_head_is_the_product_of_norms() {
        // One head, d = 1: a = [3, 4] (norm 5), W_o gram = 4 (norm 2) -> 10.
        let v = v_importance(&[3.0, 4.0], 2, &[4.0], 1, 1, 1);
        assert!((v[0] - 10.0).abs() < 1e-5);
    }
}
