//! Where a decode step's time goes (development aid): all linear products alone, the LM head
//! alone, and a whole cached forward step, for `BATCH` sequences (default 1; the evaluation
//! decodes 32 at a time) over `STEPS` steps (default 20); `DTYPE=bf16` keeps the matrices as bf16.
use std::time::Instant;

use candle_core::{DType, Tensor};
use realign::model::{ForwardArgs, KvCache, LoadOptions, LoadedModel, Logits};

fn main() -> anyhow::Result<()> {
    let batch: usize = std::env::var("BATCH")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    // DTYPE=bf16 keeps the matrices as bf16 (as `realign bench forward`'s bf16 figure).
    let dtype = match std::env::var("DTYPE").as_deref() {
        Ok("bf16") => realign::model::StorageDtype::Bf16,
        _ => realign::model::StorageDtype::Auto,
    };
    let opts = LoadOptions {
        dtype,
        ..LoadOptions::default()
    };
    let m = LoadedModel::load(&realign::assets::default_model(), &opts)?;
    let model = &m.model;
    let dev = model.device().clone();
    let ws: Vec<Tensor> = model.linears().map(|l| l.weight.clone()).collect();
    let x576 = Tensor::ones((batch, 576), DType::F32, &dev)?;
    let x1536 = Tensor::ones((batch, 1536), DType::F32, &dev)?;
    let head = model.lm_head_weight().clone();
    let step = |cache: &mut KvCache, ids: &Tensor| -> anyhow::Result<()> {
        model.forward_with(
            ids,
            ForwardArgs {
                cache: Some(cache),
                logits: Logits::Last,
                ..Default::default()
            },
        )?;
        Ok(())
    };
    for _ in 0..3 {
        let t = Instant::now();
        for w in &ws {
            let x = if w.dim(1)? == 576 { &x576 } else { &x1536 };
            realign::model::matmul::linear(x, w)?;
        }
        let lin = t.elapsed().as_secs_f64();
        let t = Instant::now();
        realign::model::matmul::linear(&x576, &head)?;
        let hd = t.elapsed().as_secs_f64();
        // A 16-token prompt per row, then `STEPS` (default 20) timed one-token steps: more
        // steps make the history, and so attention's share, longer.
        let mut cache = KvCache::new(model.config().num_hidden_layers);
        step(
            &mut cache,
            &Tensor::from_vec(vec![1u32; batch * 16], (batch, 16), &dev)?,
        )?;
        let one = Tensor::from_vec(vec![5u32; batch], (batch, 1), &dev)?;
        let n: usize = std::env::var("STEPS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(20);
        let t = Instant::now();
        for _ in 0..n {
            step(&mut cache, &one)?;
        }
        let s = t.elapsed().as_secs_f64() / n as f64;
        println!(
            "batch {batch}: linears {:.2} ms, lm_head {:.2} ms, full step {:.2} ms ({:.0} tokens/s)",
            lin * 1e3,
            hd * 1e3,
            s * 1e3,
            batch as f64 / s
        );
    }
    Ok(())
}
