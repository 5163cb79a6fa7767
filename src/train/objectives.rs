//! Preference objectives, each written as its paper's formula over sequence log-probabilities.
//! Every function returns the mean loss over the batch.
//!
//! Notation: `pi_c`, `pi_r` are the policy's summed log-probabilities of the chosen and
//! rejected responses, `ref_c`, `ref_r` the reference model's; `len_*` are token counts.

use candle_core::Tensor;

fn log_sigmoid(x: &Tensor) -> candle_core::Result<Tensor> {
    // log sigmoid(x) = -softplus(-x) = min(x, 0) - log(1 + exp(-|x|)), stable for large |x|.
    let neg_abs = x.abs()?.neg()?;
    x.minimum(0f32)? - (neg_abs.exp()? + 1.0)?.log()?
}

/// The preference objective of a training run.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "method", rename_all = "lowercase")]
pub enum Objective {
    /// Supervised fine-tuning: mean token NLL of the response.
    Sft,
    /// DPO (Rafailov et al. 2023, Eq. 7), sigmoid loss.
    Dpo {
        /// Temperature of the implicit reward (paper default 0.1).
        #[serde(default = "default_dpo_beta")]
        beta: f64,
    },
    /// ORPO (Hong et al. 2024, Eq. 6-7): SFT on the chosen response plus an odds-ratio term.
    Orpo {
        /// Weight of the odds-ratio term (paper default 0.1).
        #[serde(default = "default_orpo_lambda")]
        lambda: f64,
    },
    /// KTO (Ethayarajh et al. 2024, Eq. 8), with the KL reference point estimated from
    /// mismatched prompt/completion pairs of the batch.
    Kto {
        /// Reward temperature (paper default 0.1).
        #[serde(default = "default_dpo_beta")]
        beta: f64,
        /// Weight of desirable examples (paper default 1).
        #[serde(default = "one")]
        lambda_d: f64,
        /// Weight of undesirable examples (paper default 1).
        #[serde(default = "one")]
        lambda_u: f64,
    },
    /// SimPO (Meng et al. 2024, Eq. 6): length-normalised reward with a target margin; no
    /// reference model.
    Simpo {
        /// Reward scale (paper: 2.0-2.5; default 2.0).
        #[serde(default = "default_simpo_beta")]
        beta: f64,
        /// Target margin (paper recommends gamma/beta = 0.5; default 1.0).
        #[serde(default = "one")]
        gamma: f64,
    },
}

fn default_dpo_beta() -> f64 {
    0.1
}
fn default_orpo_lambda() -> f64 {
    0.1
}
fn default_simpo_beta() -> f64 {
    2.0
}
fn one() -> f64 {
    1.0
}

/// Every method of a run file (`method = "..."`) with the run-file keys of its parameters.
pub const METHOD_PARAMETERS: [(&str, &[&str]); 5] = [
    ("sft", &[]),
    ("dpo", &["beta"]),
    ("orpo", &["lambda"]),
    ("kto", &["beta", "lambda_d", "lambda_u"]),
    ("simpo", &["beta", "gamma"]),
];

impl Objective {
    /// The method's name as a run file writes it (`method = "dpo"`).
    pub fn method(&self) -> &'static str {
        match self {
            Objective::Sft => "sft",
            Objective::Dpo { .. } => "dpo",
            Objective::Orpo { .. } => "orpo",
            Objective::Kto { .. } => "kto",
            Objective::Simpo { .. } => "simpo",
        }
    }

    /// Checks the parameters' values: every one finite; DPO's, KTO's and SimPO's `beta` and
    /// KTO's `lambda_d` and `lambda_u` > 0 (0 turns the objective off, a negative value
    /// reverses it); ORPO's `lambda` and SimPO's `gamma` ≥ 0 (0: no odds-ratio term, no
    /// margin). The error names the key and its value (`beta = -1 must be a finite number > 0`).
    pub fn validate(&self) -> Result<(), String> {
        for (key, v) in self.parameters() {
            let zero_ok = matches!(key, "lambda" | "gamma");
            let ok = v.is_finite() && (v > 0.0 || (zero_ok && v == 0.0));
            if !ok {
                let want = if zero_ok { "≥ 0" } else { "> 0" };
                return Err(format!(
                    "{key} = {} must be a finite number {want}",
                    super::config::fmt_num(v)
                ));
            }
        }
        Ok(())
    }

    /// Whether the objective compares with a frozen reference model.
    pub fn needs_reference(&self) -> bool {
        matches!(self, Objective::Dpo { .. } | Objective::Kto { .. })
    }

    /// Whether rows are preference pairs (chosen/rejected).
    pub fn is_pairwise(&self) -> bool {
        matches!(
            self,
            Objective::Dpo { .. } | Objective::Orpo { .. } | Objective::Simpo { .. }
        )
    }

    /// The objective's parameters by their run-file keys, with their values (none for SFT).
    pub fn parameters(&self) -> Vec<(&'static str, f64)> {
        match *self {
            Objective::Sft => vec![],
            Objective::Dpo { beta } => vec![("beta", beta)],
            Objective::Orpo { lambda } => vec![("lambda", lambda)],
            Objective::Kto {
                beta,
                lambda_d,
                lambda_u,
            } => vec![
                ("beta", beta),
                ("lambda_d", lambda_d),
                ("lambda_u", lambda_u),
            ],
            Objective::Simpo { beta, gamma } => vec![("beta", beta), ("gamma", gamma)],
        }
    }
}

/// DPO: `-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))`.
pub fn dpo_loss(
    pi_c: &Tensor,
    pi_r: &Tensor,
    ref_c: &Tensor,
    ref_r: &Tensor,
    beta: f64,
) -> candle_core::Result<Tensor> {
    let margin = ((pi_c - ref_c)? - (pi_r - ref_r)?)?;
    log_sigmoid(&(margin * beta)?)?.mean_all()?.neg()
}

/// SimPO: `-log sigmoid(beta * pi_c / len_c - beta * pi_r / len_r - gamma)`.
pub fn simpo_loss(
    pi_c: &Tensor,
    pi_r: &Tensor,
    len_c: &Tensor,
    len_r: &Tensor,
    beta: f64,
    gamma: f64,
) -> candle_core::Result<Tensor> {
    let reward = ((pi_c.div(len_c)? - pi_r.div(len_r)?)? * beta)?;
    log_sigmoid(&(reward - gamma)?)?.mean_all()?.neg()
}

/// ORPO: `nll_c + lambda * -log sigmoid(log odds_c - log odds_r)`, with
/// `log odds = m - log(1 - exp(m))` for the mean token log-probability `m` of a response, and
/// `nll_c` the chosen response's mean token NLL over the batch.
pub fn orpo_loss(
    nll_c: &Tensor,
    mean_c: &Tensor,
    mean_r: &Tensor,
    lambda: f64,
) -> candle_core::Result<Tensor> {
    let log_odds = |m: &Tensor| -> candle_core::Result<Tensor> {
        // log(1 - exp(m)) for m < 0; clamp so that m = 0 stays finite.
        let one_minus = (m.exp()?.neg()? + 1.0)?.maximum(1e-12f32)?;
        m - one_minus.log()?
    };
    let ratio = (log_odds(mean_c)? - log_odds(mean_r)?)?;
    let or_term = log_sigmoid(&ratio)?.mean_all()?.neg()?;
    nll_c + (or_term * lambda)?
}

/// KTO: for each example with reward `r = pi - ref`, desirable ones cost
/// `lambda_d * (1 - sigmoid(beta * (r - z0)))`, undesirable ones
/// `lambda_u * (1 - sigmoid(beta * (z0 - r)))`, where `z0 = max(0, mean(pi_mis - ref_mis))` is
/// the KL estimate from mismatched pairs, detached (no gradient), as in the paper.
/// `desirable` is `[b]` f32 of 1/0.
#[allow(clippy::too_many_arguments)]
pub fn kto_loss(
    pi: &Tensor,
    reference: &Tensor,
    pi_mismatched: &Tensor,
    ref_mismatched: &Tensor,
    desirable: &Tensor,
    beta: f64,
    lambda_d: f64,
    lambda_u: f64,
) -> candle_core::Result<Tensor> {
    let z0 = (pi_mismatched - ref_mismatched)?
        .mean_all()?
        .maximum(0f32)?
        .detach();
    let r = (pi - reference)?;
    let d_term =
        ((candle_nn::ops::sigmoid(&(r.broadcast_sub(&z0)? * beta)?)?.neg()? + 1.0)? * lambda_d)?;
    let u_term = ((candle_nn::ops::sigmoid(&(r.broadcast_sub(&z0)?.neg()? * beta)?)?.neg()?
        + 1.0)?
        * lambda_u)?;
    let undesirable = (desirable.neg()? + 1.0)?;
    ((d_term * desirable)? + (u_term * undesirable)?)?.mean_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }
    fn s(x: Tensor) -> f64 {
        x.to_scalar::<f32>().unwrap() as f64
    }
    fn sig(x: f64) -> f64 {
        1.0 / (1.0 + (-x).exp())
    }

    #[test]
    fn dpo_by_hand() {
        // margins: ((-10) - (-12)) - ((-20) - (-19)) = 2 - (-1) = 3; beta 0.1 -> -log sig(0.3)
        let l = s(dpo_loss(&t(&[-10.]), &t(&[-20.]), &t(&[-12.]), &t(&[-19.]), 0.1).unwrap());
        assert!((l + sig(0.3).ln()).abs() < 1e-6, "{l}");
    }

    #[test]
    fn simpo_by_hand() {
        // 2 * (-10/5) - 2 * (-30/10) - 1 = -4 + 6 - 1 = 1 -> -log sig(1)
        let l = s(simpo_loss(&t(&[-10.]), &t(&[-30.]), &t(&[5.]), &t(&[10.]), 2.0, 1.0).unwrap());
        assert!((l + sig(1.0).ln()).abs() < 1e-6, "{l}");
    }

    #[test]
    fn orpo_by_hand() {
        // m_c = ln 0.5 -> odds 1 -> log odds 0; m_r = ln 0.2 -> odds 0.25 -> log odds ln 0.25.
        // ratio = -ln 0.25 = ln 4 -> -log sig(ln 4) = -ln(4/5) = ln 1.25.
        let l = s(orpo_loss(
            &t(&[0.7]).sum_all().unwrap(),
            &t(&[0.5f32.ln()]),
            &t(&[0.2f32.ln()]),
            0.1,
        )
        .unwrap());
        assert!((l - (0.7 + 0.1 * 1.25f64.ln())).abs() < 1e-6, "{l}");
    }

    #[test]
    fn kto_by_hand() {
        // rewards r = [1, -2]; mismatched mean = (0.5 + 1.5)/2 = 1 -> z0 = 1.
        // desirable r=1: 1 - sig(0.1*0) = 0.5; undesirable r=-2: 1 - sig(0.1*(1+2)) = 1 - sig(0.3).
        let l = s(kto_loss(
            &t(&[-9., -12.]),
            &t(&[-10., -10.]),
            &t(&[-9.5, -8.5]),
            &t(&[-10., -10.]),
            &t(&[1., 0.]),
            0.1,
            1.0,
            1.0,
        )
        .unwrap());
        assert!((l - (0.5 + (1.0 - sig(0.3))) / 2.0).abs() < 1e-6, "{l}");
        // A negative KL estimate is clipped to 0.
        let l = s(kto_loss(
            &t(&[-10.]),
            &t(&[-10.]),
            &t(&[-12.]),
            &t(&[-10.]),
            &t(&[1.]),
            0.1,
            1.0,
            1.0,
        )
        .unwrap());
        assert!((l - 0.5).abs() < 1e-6);
    }
}
