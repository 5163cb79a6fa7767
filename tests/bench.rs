//! `realign bench forward` on the tiny Llama fixture: every figure, in order, with its unit,
//! including the batched figures' split into prefill and one-token steps.

mod common;

use realign::model::{LoadOptions, LoadedModel};

#[test]
fn forward_reports_every_figure_with_the_batched_prefill_split_out() {
    let dir = common::fixtures().join("tiny-llama");
    let m = LoadedModel::load(&dir, &LoadOptions::default()).unwrap();
    let mut figures = Vec::new();
    realign::bench::forward(&m.model, 1, |f| figures.push(f)).unwrap();
    let got: Vec<(&str, &str)> = figures
        .iter()
        .map(|f| (f.metric.as_str(), f.unit.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("prefill_tokens_per_s", "tokens/s"),
            ("prefill_last_logits_tokens_per_s", "tokens/s"),
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
    // every figure names the machine it was measured on
    let host = realign::host::Host::detect().to_string();
    for f in &figures {
        assert!(f.bench == "forward" && f.value > 0.0, "{f:?}");
        assert_eq!(f.host, host);
    }
}
