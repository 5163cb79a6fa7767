use std::path::PathBuf;

use anyhow::Context;
use realign::adapters::Adapter;
use realign::model::{LoadOptions, LoadedModel};

/// Flags of `realign inspect`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A model (Hugging Face folder or .gguf file) or a PEFT adapter folder
    path: PathBuf,
    /// Print JSON instead of text
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let report = if a.path.join("adapter_config.json").is_file() {
        let ad = Adapter::load(&a.path, &candle_core::Device::Cpu)
            .with_context(|| format!("loading adapter {}", a.path.display()))?;
        let shapes: Vec<_> = ad
            .modules
            .iter()
            .map(|(n, m)| serde_json::json!({"module": n, "a": m.a.dims(), "b": m.b.dims(), "scale": m.scale}))
            .collect();
        serde_json::json!({
            "kind": "peft-lora-adapter",
            "path": a.path,
            "r": ad.config.r,
            "lora_alpha": ad.config.lora_alpha,
            "use_rslora": ad.config.use_rslora,
            "target_modules": ad.config.target_modules,
            "layers_to_transform": ad.config.layers_to_transform,
            "base_model_name_or_path": ad.config.base_model_name_or_path,
            "num_modules": ad.modules.len(),
            "num_parameters": ad.num_parameters(),
            "modules": shapes,
        })
    } else {
        let m = LoadedModel::load(&a.path, &LoadOptions::default())
            .with_context(|| format!("loading model {}", a.path.display()))?;
        let modules: Vec<_> = m
            .model
            .linears()
            .map(|l| serde_json::json!({"module": l.name, "shape": [l.shape().0, l.shape().1], "bias": l.bias.is_some()}))
            .collect();
        serde_json::json!({
            "kind": "model",
            "path": a.path,
            "format": m.source.format,
            "dtype_on_disk": m.source.dtype,
            "dtype_in_memory": format!("{:?}", m.model.dtype()),
            "config": m.model.config(),
            "num_parameters": m.model.num_parameters(),
            "vocab_size_tokenizer": m.tokenizer.vocab_size(),
            "bos_token_id": m.tokenizer.bos_token_id(),
            "eos_token_ids": m.tokenizer.eos_token_ids(),
            "ignored_special_ids": m.tokenizer.ignored_ids().iter().map(|i| {
                serde_json::json!({"role": i.role, "id": i.id, "vocab_size": i.vocab_size})
            }).collect::<Vec<_>>(),
            "stop_token_ids": m.tokenizer.stop_token_ids(),
            "has_chat_template": m.tokenizer.has_chat_template(),
            "num_linear_modules": modules.len(),
            "modules": modules,
        })
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_text(&report);
    }
    Ok(())
}

fn print_text(r: &serde_json::Value) {
    let obj = r.as_object().cloned().unwrap_or_default();
    for (k, v) in &obj {
        match (k.as_str(), v) {
            ("modules", serde_json::Value::Array(list)) => {
                println!("modules ({}):", list.len());
                for m in list {
                    let name = m["module"].as_str().unwrap_or("");
                    let rest: Vec<String> = m
                        .as_object()
                        .into_iter()
                        .flatten()
                        .filter(|(k, _)| *k != "module")
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect();
                    println!("  {name}  {}", rest.join(" "));
                }
            }
            ("config", serde_json::Value::Object(c)) => {
                for (ck, cv) in c {
                    println!("{ck}: {cv}");
                }
            }
            _ => println!("{k}: {v}"),
        }
    }
}
