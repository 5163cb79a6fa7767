//! Where a LoRA training step's time goes (development aid).
use std::time::Instant;

use candle_core::Tensor;
use realign::adapters::LoraConfig;
use realign::model::{ForwardArgs, LoadOptions, LoadedModel, Logits};
use realign::train::{LabelLogprobs, TrainableLora};

fn main() -> anyhow::Result<()> {
    let m = LoadedModel::load(&realign::assets::default_model(), &LoadOptions::default())?;
    let mut model = m.model;
    let t = realign::adapters::ALL_LINEAR_TARGETS;
    let lora = TrainableLora::init(
        &model,
        LoraConfig::new(16, 32.0, t.map(String::from).to_vec()),
        0,
    )?;
    lora.attach(&mut model)?;
    let dev = model.device().clone();
    let ids = Tensor::arange(0u32, 1024, &dev)?
        .affine(37.0, 100.0)?
        .reshape((8, 128))?;
    let labels = ids.to_dtype(candle_core::DType::I64)?;
    let steps: usize = std::env::var("STEPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let only_training = std::env::var("TRAIN_ONLY").is_ok();
    for diff in [false, true] {
        if only_training && !diff {
            continue;
        }
        model.set_differentiable(diff);
        // BLOCK_OPS=0: the composed graph instead of one op per decoder layer
        model.set_block_ops(std::env::var("BLOCK_OPS").map_or(true, |v| v != "0"));
        for _ in 0..steps {
            let t0 = Instant::now();
            let hidden = model.forward_with(
                &ids,
                ForwardArgs {
                    logits: Logits::None,
                    ..Default::default()
                },
            )?;
            let t1 = Instant::now();
            let loss = LabelLogprobs::from_hidden(&model, &hidden, &labels)?.mean_nll()?;
            let t2 = Instant::now();
            let g = loss.backward()?;
            let t3 = Instant::now();
            println!(
                "differentiable={diff}: body {:.2}s, head+loss {:.2}s, backward {:.2}s ({} grads)",
                (t1 - t0).as_secs_f64(),
                (t2 - t1).as_secs_f64(),
                (t3 - t2).as_secs_f64(),
                g.get_ids().count()
            );
        }
    }
    Ok(())
}
