//! Where a prefill's time goes (development aid): batch 8 x 128 with logits at every position,
//! against the same linear products alone and the vocabulary projection alone.
use std::time::Instant;

use candle_core::{DType, Tensor};
use realign::model::{LoadOptions, LoadedModel};

fn main() -> anyhow::Result<()> {
    let m = LoadedModel::load(&realign::assets::default_model(), &LoadOptions::default())?;
    let model = &m.model;
    let dev = model.device().clone();
    // B, S: another shape (default 8 x 128, the bench's)
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (b, s) = (env("B", 8), env("S", 128));
    let ws: Vec<Tensor> = model.linears().map(|l| l.weight.clone()).collect();
    let x576 = Tensor::ones((b * s, 576), DType::F32, &dev)?;
    let x1536 = Tensor::ones((b * s, 1536), DType::F32, &dev)?;
    let ids = Tensor::from_vec(
        (0..b * s)
            .map(|i| (100 + i * 7919 % 40000) as u32)
            .collect::<Vec<_>>(),
        (b, s),
        &dev,
    )?;
    let head = model.lm_head_weight().clone();
    let reps: usize = std::env::var("REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    // FULL_ONLY=1: the full forward alone (for a profiler).
    if std::env::var_os("FULL_ONLY").is_some() {
        for _ in 0..reps {
            let t = Instant::now();
            model.forward(&ids)?;
            let full = t.elapsed().as_secs_f64();
            println!(
                "full forward {:.0} ms ({:.0} tokens/s)",
                full * 1e3,
                (b * s) as f64 / full
            );
        }
        return Ok(());
    }
    for _ in 0..reps {
        let t = Instant::now();
        for w in &ws {
            let x = if w.dim(1)? == 576 { &x576 } else { &x1536 };
            realign::model::matmul::linear(x, w)?;
        }
        let lin = t.elapsed().as_secs_f64();
        let t = Instant::now();
        realign::model::matmul::linear(&x576, &head)?;
        let vocab = t.elapsed().as_secs_f64();
        let t = Instant::now();
        model.forward(&ids)?;
        let full = t.elapsed().as_secs_f64();
        println!(
            "linears {:.0} ms, lm_head {:.0} ms, rest {:.0} ms, full forward {:.0} ms ({:.0} tokens/s)",
            lin * 1e3,
            vocab * 1e3,
            (full - lin - vocab) * 1e3,
            full * 1e3,
            (b * s) as f64 / full
        );
    }
    Ok(())
}
