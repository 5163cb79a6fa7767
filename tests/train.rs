//! Training parity with torch/peft (tests/fixtures/tiny-*-train-expected.safetensors): base +
//! the `aligned` adapter, adapter trainable, dropout 0, on a right-padded batch of two
//! prompt+response sequences. Loss within 1e-5 relative, per-sequence log-probabilities within
//! 1e-4, every LoRA gradient within 1e-4 relative to its largest entry. Then the preference
//! objectives' gradients against their closed forms built from those log-probabilities.

mod common;

use std::collections::HashMap;

use candle_core::{backprop::GradStore, DType, Device, Tensor};
use realign::adapters::Adapter;
use realign::model::{ForwardArgs, LoadOptions, LoadedModel};
use realign::train::{objectives, LabelLogprobs, TrainableLora};

use common::fixtures;

struct Setup {
    model: realign::model::Model,
    lora: TrainableLora,
    exp: HashMap<String, Tensor>,
}

fn setup(arch: &str) -> Setup {
    setup_only(arch, &["layers"])
}

/// Base + the `aligned` adapter restricted to the modules whose path contains one of `keep`.
fn setup_only(arch: &str, keep: &[&str]) -> Setup {
    let dev = Device::Cpu;
    let mut m = LoadedModel::load(
        &fixtures().join(format!("tiny-{arch}")),
        &LoadOptions::default(),
    )
    .unwrap();
    m.model.set_differentiable(true);
    let mut ad = Adapter::load(
        &fixtures().join(format!("tiny-{arch}-adapters/aligned")),
        &dev,
    )
    .unwrap();
    ad.modules
        .retain(|name, _| keep.iter().any(|k| name.contains(k)));
    let lora = TrainableLora::from_adapter(&ad).unwrap();
    lora.attach(&mut m.model).unwrap();
    let exp = candle_core::safetensors::load(
        fixtures().join(format!("tiny-{arch}-train-expected.safetensors")),
        &dev,
    )
    .unwrap();
    Setup {
        model: m.model,
        lora,
        exp,
    }
}

fn logprobs(s: &Setup) -> LabelLogprobs {
    let ids = s.exp["train.input_ids"].to_dtype(DType::U32).unwrap();
    let mask = s.exp["train.attention_mask"].to_dtype(DType::U32).unwrap();
    let labels = &s.exp["train.labels"];
    let logits = s
        .model
        .forward_with(
            &ids,
            ForwardArgs {
                attention_mask: Some(&mask),
                ..Default::default()
            },
        )
        .unwrap();
    LabelLogprobs::new(&logits, labels).unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()[0]
}

/// max |got - want| / max |want| over one gradient tensor.
fn rel_err(got: &Tensor, want: &Tensor) -> f64 {
    let d = (got - want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    let m = want
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    d / m.max(1e-30)
}

fn check_sft(arch: &str) {
    let s = setup(arch);
    let lp = logprobs(&s);
    let loss = lp.mean_nll().unwrap();
    let want = scalar(&s.exp["train.loss"]);
    let got = scalar(&loss);
    assert!(
        ((got - want) / want).abs() < 1e-5,
        "{arch} loss {got} vs {want}"
    );
    let seq = lp.sequence_sums().unwrap().to_vec1::<f32>().unwrap();
    let want_seq = s.exp["train.seq_logprob"].to_vec1::<f32>().unwrap();
    for (g, w) in seq.iter().zip(&want_seq) {
        assert!((g - w).abs() < 1e-4, "{arch} seq logprob {g} vs {w}");
    }
    let grads = loss.backward().unwrap();
    let vars = s.lora.named_vars();
    assert_eq!(vars.len(), 42);
    for (name, var) in &vars {
        let want = &s.exp[&format!("train.grad.{name}")];
        let got = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let e = rel_err(got, want);
        assert!(e < 1e-4, "{arch} {name}: relative error {e}");
    }
}

#[test]
fn llama_sft_loss_logprobs_and_gradients() {
    check_sft("llama");
}

#[test]
fn qwen2_sft_loss_logprobs_and_gradients() {
    check_sft("qwen2");
}

/// The block ops (the default: a decoder layer whose seven projections all carry an adapter
/// is one autograd op, else each attention or MLP block that qualifies) give the loss and
/// every LoRA gradient of the composed graph to the bit. On llama (grouped heads, a padded
/// batch) with the adapter on every projection (the layer op), on attention only and on the
/// MLP only (each block's op alone); on qwen2 (q/k/v biases: the attention block stays
/// composed, the MLP block is one op).
#[test]
fn block_ops_equal_the_composed_graph_to_the_bit() {
    fn bits(t: &Tensor) -> Vec<u32> {
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v.into_iter().map(f32::to_bits).collect()
    }
    let cases = [
        ("llama", &["layers"][..], 42),
        ("llama", &["self_attn"][..], 24),
        ("llama", &["mlp"][..], 18),
        ("qwen2", &["layers"][..], 42),
    ];
    for (arch, keep, vars) in cases {
        let mut s = setup_only(arch, keep);
        assert_eq!(s.lora.named_vars().len(), vars, "{arch} {keep:?}");
        // the adapter is trained (B is not zero), so every A gets a gradient
        let runs: Vec<(Vec<u32>, Vec<Vec<u32>>)> = [true, false]
            .into_iter()
            .map(|on| {
                s.model.set_block_ops(on);
                let loss = logprobs(&s).mean_nll().unwrap();
                let grads = grads_of(&loss, &s);
                (bits(&loss), grads.iter().map(bits).collect())
            })
            .collect();
        assert_eq!(runs[0].0, runs[1].0, "{arch} {keep:?}: loss");
        for (i, (name, _)) in s.lora.named_vars().iter().enumerate() {
            assert!(
                runs[0].1[i].iter().any(|&b| b != 0),
                "{arch} {name}: zero gradient"
            );
            let differ = runs[0].1[i]
                .iter()
                .zip(&runs[1].1[i])
                .filter(|(a, b)| a != b)
                .count();
            assert_eq!(
                differ, 0,
                "{arch} {keep:?} {name}: gradient elements differ"
            );
        }
    }
}

fn grads_of(loss: &Tensor, s: &Setup) -> Vec<Tensor> {
    let g: GradStore = loss.backward().unwrap();
    s.lora
        .named_vars()
        .iter()
        .map(|(_, v)| g.get(v.as_tensor()).unwrap().clone())
        .collect()
}

fn assert_close(got: &[Tensor], want: &[Tensor], what: &str) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let e = rel_err(g, w);
        assert!(e < 1e-4, "{what}: tensor {i} relative error {e}");
    }
}

fn combine(a: &[Tensor], ca: f64, b: &[Tensor], cb: f64) -> Vec<Tensor> {
    a.iter()
        .zip(b)
        .map(|(x, y)| ((x * ca).unwrap() + (y * cb).unwrap()).unwrap())
        .collect()
}

fn sig(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Sequence 0 plays "chosen", sequence 1 "rejected". With g_c, g_r the gradients of their
/// summed log-probabilities, each objective's gradient is a closed-form combination:
/// - DPO: L = -log sig(beta h), h = (pi_c - ref_c) - (pi_r - ref_r);
///   dL = -beta sig(-beta h) (g_c - g_r).
/// - SimPO: L = -log sig(u), u = beta pi_c/n_c - beta pi_r/n_r - gamma;
///   dL = -sig(-u) beta (g_c/n_c - g_r/n_r).
/// - ORPO's odds-ratio term: with m = pi/n, log odds = m - log(1 - e^m), d(log odds)/dm =
///   1/(1 - e^m); L_or = -log sig(o_c - o_r); dL_or = -sig(-(o_c - o_r)) (g_c/(n_c(1-e^m_c)) -
///   g_r/(n_r(1-e^m_r))).
#[test]
fn preference_gradients_equal_their_closed_forms() {
    let s = setup("llama");
    let dev = Device::Cpu;
    // Gradients of each sequence's summed log-probability.
    let lp = logprobs(&s);
    let g_c = grads_of(&lp.sequence_sums().unwrap().get(0).unwrap(), &s);
    let lp = logprobs(&s);
    let g_r = grads_of(&lp.sequence_sums().unwrap().get(1).unwrap(), &s);
    let seq = lp
        .sequence_sums()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let len = lp
        .sequence_lengths()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let (pi_c, pi_r, n_c, n_r) = (seq[0], seq[1], len[0], len[1]);

    // DPO, with reference log-probabilities chosen by hand.
    let (ref_c, ref_r, beta) = (pi_c + 0.7, pi_r - 0.4, 0.1);
    let lp = logprobs(&s);
    let sums = lp.sequence_sums().unwrap();
    let t = |x: f64| Tensor::new(&[x as f32], &dev).unwrap();
    let loss = objectives::dpo_loss(
        &sums.narrow(0, 0, 1).unwrap(),
        &sums.narrow(0, 1, 1).unwrap(),
        &t(ref_c),
        &t(ref_r),
        beta,
    )
    .unwrap();
    let h = (pi_c - ref_c) - (pi_r - ref_r);
    assert!((scalar(&loss) + sig(beta * h).ln()).abs() < 1e-5);
    let c = -beta * sig(-beta * h);
    assert_close(&grads_of(&loss, &s), &combine(&g_c, c, &g_r, -c), "DPO");

    // SimPO.
    let (beta, gamma) = (2.0, 1.0);
    let lp = logprobs(&s);
    let sums = lp.sequence_sums().unwrap();
    let lens = lp.sequence_lengths().unwrap();
    let loss = objectives::simpo_loss(
        &sums.narrow(0, 0, 1).unwrap(),
        &sums.narrow(0, 1, 1).unwrap(),
        &lens.narrow(0, 0, 1).unwrap(),
        &lens.narrow(0, 1, 1).unwrap(),
        beta,
        gamma,
    )
    .unwrap();
    let u = beta * pi_c / n_c - beta * pi_r / n_r - gamma;
    assert!((scalar(&loss) + sig(u).ln()).abs() < 1e-5);
    let c = -sig(-u) * beta;
    assert_close(
        &grads_of(&loss, &s),
        &combine(&g_c, c / n_c, &g_r, -c / n_r),
        "SimPO",
    );

    // ORPO's odds-ratio term (lambda 1, no SFT term so that only the ratio is tested).
    let lp = logprobs(&s);
    let means = lp.sequence_means().unwrap();
    let zero = Tensor::new(0f32, &dev).unwrap();
    let loss = objectives::orpo_loss(
        &zero,
        &means.narrow(0, 0, 1).unwrap(),
        &means.narrow(0, 1, 1).unwrap(),
        1.0,
    )
    .unwrap();
    let (m_c, m_r) = (pi_c / n_c, pi_r / n_r);
    let odds = |m: f64| m - (1.0 - m.exp()).ln();
    let o = odds(m_c) - odds(m_r);
    assert!((scalar(&loss) + sig(o).ln()).abs() < 1e-5);
    let c = -sig(-o);
    let got = grads_of(&loss, &s);
    assert_close(
        &got,
        &combine(
            &g_c,
            c / (n_c * (1.0 - m_c.exp())),
            &g_r,
            -c / (n_r * (1.0 - m_r.exp())),
        ),
        "ORPO",
    );
}

/// KTO: rewards r_i = pi_i - ref_i, z0 from mismatched pairs (detached). Sequence 0
/// desirable, 1 undesirable: L = (lambda_d (1 - sig(beta (r_0 - z0))) + lambda_u (1 -
/// sig(beta (z0 - r_1)))) / 2; dL = -beta sig'(beta(r_0 - z0)) g_0 / 2 + beta sig'(beta(z0 -
/// r_1)) g_1 / 2, with sig' = sig (1 - sig).
#[test]
fn kto_gradient_equals_its_closed_form() {
    let s = setup("llama");
    let dev = Device::Cpu;
    let lp = logprobs(&s);
    let g_0 = grads_of(&lp.sequence_sums().unwrap().get(0).unwrap(), &s);
    let lp = logprobs(&s);
    let g_1 = grads_of(&lp.sequence_sums().unwrap().get(1).unwrap(), &s);
    let seq = lp
        .sequence_sums()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let refs = [seq[0] - 0.3, seq[1] + 0.2];
    let (mis, mis_ref) = ([-5.0f32, -6.0], [-5.5f32, -6.1]); // mean difference 0.3 -> z0 = 0.3
    let beta = 0.1;
    let lp = logprobs(&s);
    let loss = objectives::kto_loss(
        &lp.sequence_sums().unwrap(),
        &Tensor::new(&[refs[0] as f32, refs[1] as f32], &dev).unwrap(),
        &Tensor::new(&mis, &dev).unwrap(),
        &Tensor::new(&mis_ref, &dev).unwrap(),
        &Tensor::new(&[1f32, 0.], &dev).unwrap(),
        beta,
        1.0,
        1.0,
    )
    .unwrap();
    let z0 = 0.3;
    let (r0, r1) = (seq[0] - refs[0], seq[1] - refs[1]);
    let want = ((1.0 - sig(beta * (r0 - z0))) + (1.0 - sig(beta * (z0 - r1)))) / 2.0;
    assert!(
        (scalar(&loss) - want).abs() < 1e-5,
        "{} vs {want}",
        scalar(&loss)
    );
    let d = |x: f64| sig(x) * (1.0 - sig(x));
    let c0 = -beta * d(beta * (r0 - z0)) / 2.0;
    let c1 = beta * d(beta * (z0 - r1)) / 2.0;
    assert_close(&grads_of(&loss, &s), &combine(&g_0, c0, &g_1, c1), "KTO");
}
