//! `realign bench forward` on the tiny Llama fixture: every figure, in order, with its unit,
//! including the batched figures' split into prefill and one-token steps.

mod common;

use realign::bench::Figure;
use realign::model::{LoadOptions, LoadedModel};

/// `(metric, unit)` of each figure, in order.
fn metrics_and_units(figures: &[Figure]) -> Vec<(&str, &str)> {
    figures
        .iter()
        .map(|f| (f.metric.as_str(), f.unit.as_str()))
        .collect()
}

#[test]
fn forward_reports_every_figure_with_the_batched_prefill_split_out() {
    let dir = common::fixtures().join("tiny-llama");
    let m = LoadedModel::load(&dir, &LoadOptions::default()).unwrap();
    let mut figures = Vec::new();
    realign::bench::forward(&m.model, 1, |f| figures.push(f)).unwrap();
    let got = metrics_and_units(&figures);
    assert_eq!(
        got,
        [
            ("prefill_tokens_per_s", "tokens/s"),
            ("prefill_last_logits_tokens_per_s", "tokens/s"),
            ("prefill_long_tokens_per_s", "tokens/s"),
            ("decode_tokens_per_s", "tokens/s"),
            ("decode_bf16_tokens_per_s", "tokens/s"),
            ("batched_decode_tokens_per_s", "tokens/s"),
            ("batched_prefill_s", "s"),
            ("batched_steps_tokens_per_s", "tokens/s"),
            ("batched32_decode_tokens_per_s", "tokens/s"),
            ("batched32_prefill_s", "s"),
            ("batched32_steps_tokens_per_s", "tokens/s"),
        ]
    );
    // the long prompt fits the fixture's 512 positions, and its detail says so
    let long = &figures[2];
    assert!(long.detail.starts_with("batch 2 x 512,"), "{}", long.detail);
    // every figure names the machine it was measured on
    let host = realign::host::Host::detect().to_string();
    for f in &figures {
        assert!(f.bench == "forward" && f.value > 0.0, "{f:?}");
        assert_eq!(f.host, host);
    }
}

/// `realign bench gemm`: one figure per product of the prefill, in GFLOP/s, and the shapes are
/// SmolLM2-135M's (the names `scripts/bench-vs-torch.sh --only gemm` pairs with torch's).
#[test]
fn gemm_reports_one_rate_per_prefill_product() {
    assert_eq!(
        realign::bench::GEMM_SHAPES,
        [
            ("gate_up", 1536, 576),
            ("down", 576, 1536),
            ("q_o", 576, 576),
            ("lm_head", 49152, 576),
        ]
    );
    let mut figures = Vec::new();
    realign::bench::gemm(1, |f| figures.push(f)).unwrap();
    let got = metrics_and_units(&figures);
    assert_eq!(
        got,
        [
            ("gate_up_gflops", "GFLOP/s"),
            ("down_gflops", "GFLOP/s"),
            ("q_o_gflops", "GFLOP/s"),
            ("lm_head_gflops", "GFLOP/s"),
        ]
    );
    for f in &figures {
        assert!(
            f.bench == "gemm" && f.value.is_finite() && f.value > 0.0,
            "{f:?}"
        );
        assert!(f.detail.contains("[1024, "), "{f:?}");
    }
}
