//! A random-weight checkpoint of a real model's exact shape, for running the pipeline at 7-8B
//! scale where the real weights are not available (none ship on the package registries): the
//! tensors, names, dtype (bf16), sharding and `config.json` of Llama-3-8B, so that memory, time
//! and streaming behave as on the real model. The numbers a model computes with random weights
//! mean nothing; only the figures of resources do.
//!
//! Written tensor by tensor (never a whole shard in memory), from a seeded SplitMix64 stream:
//! the same seed writes the same bytes. Matrices are uniform with standard deviation 0.02 (the
//! usual initialiser range), norms are 1; with it, a matching PEFT LoRA adapter on all seven
//! linear modules.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::adapters::{Adapter, LoraConfig, LoraModule};
use crate::tokenizer::Tokenizer;

/// The shapes [`write()`] can produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SyntheticShape {
    /// Meta-Llama-3-8B: hidden 4096, 32 layers, 32 heads, 8 KV heads, MLP 14336, vocabulary
    /// 128,256, untied LM head (8.03 B parameters, 16.1 GB in bf16).
    #[value(name = "llama3-8b")]
    Llama3_8b,
    /// Two layers of hidden 64, the tokenizer's vocabulary (for tests).
    Tiny,
}

impl SyntheticShape {
    /// The shape's name on the command line (`llama3-8b`, `tiny`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Llama3_8b => "llama3-8b",
            Self::Tiny => "tiny",
        }
    }

    /// The largest LoRA rank that means something on every adapted matrix of the shape:
    /// `min(out, in)` of the smallest (k_proj and v_proj; 32 for `tiny`, 1024 for
    /// `llama3-8b`), with the module and its `[out, in]`.
    pub fn max_adapter_rank(self) -> crate::Result<(usize, &'static str, (usize, usize))> {
        let cfg = self.parsed_config(0)?;
        let mut best = (usize::MAX, "", (0, 0));
        for m in super::LINEAR_MODULES {
            if let Some((o, i)) = cfg.linear_shape(m) {
                if o.min(i) < best.0 {
                    best = (o.min(i), m, (o, i));
                }
            }
        }
        Ok(best)
    }

    /// The parsed [`config`](Self::config) of the shape for a tokenizer of `tok_vocab` ids.
    fn parsed_config(self, tok_vocab: usize) -> crate::Result<super::Config> {
        // The vocabulary does not change the linear shapes; a placeholder keeps it parseable.
        let vocab = tok_vocab.max(1);
        super::Config::from_hf_json(&self.config(vocab)).map_err(|reason| {
            super::ModelError::BadConfig {
                path: format!("<synthetic {} config.json>", self.name()).into(),
                reason,
            }
            .into()
        })
    }

    /// `config.json` of the shape (without token ids), for a tokenizer of `tok_vocab` ids.
    fn config(self, tok_vocab: usize) -> Value {
        let (h, mlp, layers, heads, kv, vocab, pos, theta) = match self {
            Self::Llama3_8b => (4096, 14336, 32, 32, 8, 128_256, 8192, 500_000.0),
            Self::Tiny => (64, 160, 2, 4, 2, tok_vocab, 512, 10_000.0),
        };
        json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": h,
            "intermediate_size": mlp,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv,
            "vocab_size": vocab,
            "max_position_embeddings": pos,
            "rms_norm_eps": 1e-5,
            "rope_theta": theta,
            "hidden_act": "silu",
            "attention_bias": false,
            "mlp_bias": false,
            "tie_word_embeddings": false,
            "torch_dtype": "bfloat16",
            "use_cache": true,
        })
    }
}

/// What to write.
#[derive(Debug, Clone)]
pub struct SyntheticConfig {
    /// The shape.
    pub shape: SyntheticShape,
    /// Seed of every tensor.
    pub seed: u64,
    /// Largest shard, in bytes (Meta's Llama-3-8B: four shards of at most 5 GB).
    pub shard_bytes: u64,
    /// Rank of the adapter (alpha = 2 r); 0 writes none.
    pub adapter_rank: usize,
}

impl SyntheticConfig {
    /// Checks the sizes before anything is allocated or written: `adapter_rank` 0 (no
    /// adapter) or 1 to the shape's [`max_adapter_rank`](SyntheticShape::max_adapter_rank)
    /// (`--adapter-rank 100000000: must be 0 (no adapter) or 1 to 32 for shape tiny …`).
    pub fn validate(&self) -> crate::Result<()> {
        let (max, module, (o, i)) = self.shape.max_adapter_rank()?;
        if self.adapter_rank > max {
            return Err(super::ModelError::Input(format!(
                "--adapter-rank {}: must be 0 (no adapter) or 1 to {max} for shape {} (its \
                 smallest adapted matrix, {module}, is {o} x {i}; a LoRA rank above \
                 min(out, in) adds nothing)",
                self.adapter_rank,
                self.shape.name()
            ))
            .into());
        }
        Ok(())
    }
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        Self {
            shape: SyntheticShape::Llama3_8b,
            seed: 0,
            shard_bytes: 5_000_000_000,
            adapter_rank: 16,
        }
    }
}

/// What [`write()`] wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SyntheticReport {
    /// The shape.
    pub shape: SyntheticShape,
    /// Seed.
    pub seed: u64,
    /// Parameters of the model.
    pub parameters: u64,
    /// Bytes of the model's safetensors files.
    pub model_bytes: u64,
    /// The shard files, in order.
    pub shards: Vec<String>,
    /// Parameters of the adapter (0 without one).
    pub adapter_parameters: u64,
    /// Rank of the adapter.
    pub adapter_rank: usize,
    /// Wall seconds.
    pub seconds: f64,
}

/// The checkpoint's tensors in Hugging Face order: (name, shape).
fn tensors(cfg: &super::Config) -> Vec<(String, Vec<usize>)> {
    let h = cfg.hidden_size;
    let mut v = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![cfg.vocab_size, h],
    )];
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        v.push((format!("{p}.input_layernorm.weight"), vec![h]));
        for m in super::LINEAR_MODULES {
            if let Some((o, i)) = cfg.linear_shape(m) {
                v.push((format!("{p}.{m}.weight"), vec![o, i]));
            }
        }
        v.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
    }
    v.push(("model.norm.weight".to_string(), vec![h]));
    v.push(("lm_head.weight".to_string(), vec![cfg.vocab_size, h]));
    v
}

/// Writes `<dir>/model` (config, tokenizer files, sharded bf16 safetensors with their index),
/// `<dir>/adapter` (a PEFT LoRA of rank `adapter_rank` on all seven linear modules, unless
/// the rank is 0) and `<dir>/synthetic.json`. The folder is staged and renamed into place.
/// `progress(bytes_written, bytes_total)` is called as tensors are written.
pub fn write(
    dir: &Path,
    tokenizer: &Tokenizer,
    opts: &SyntheticConfig,
    overwrite: bool,
    mut progress: impl FnMut(u64, u64),
) -> crate::Result<SyntheticReport> {
    let start = std::time::Instant::now();
    opts.validate()?;
    let mut config = opts.shape.config(tokenizer.vocab_size());
    if let Some(id) = tokenizer.bos_token_id() {
        config["bos_token_id"] = json!(id);
    }
    if let Some(&id) = tokenizer.eos_token_ids().first() {
        config["eos_token_id"] = json!(id);
    }
    let cfg =
        super::Config::from_hf_json(&config).map_err(|reason| super::ModelError::BadConfig {
            path: dir.join("model/config.json"),
            reason,
        })?;
    let list = tensors(&cfg);
    let total: u64 = list
        .iter()
        .map(|(_, s)| 2 * s.iter().product::<usize>() as u64)
        .sum();
    // Shards in order, each at most `shard_bytes` (a single larger tensor gets its own).
    let mut shards: Vec<Vec<usize>> = Vec::new();
    let mut used = 0u64;
    for (i, (_, shape)) in list.iter().enumerate() {
        let bytes = 2 * shape.iter().product::<usize>() as u64;
        if shards.is_empty() || (used > 0 && used + bytes > opts.shard_bytes) {
            shards.push(Vec::new());
            used = 0;
        }
        if let Some(s) = shards.last_mut() {
            s.push(i);
        }
        used += bytes;
    }

    // The adapter: A [r, in] and B [out, r] in f32 for every linear module of every layer.
    let adapter_bytes: u64 = if opts.adapter_rank > 0 {
        let per_layer: u64 = super::LINEAR_MODULES
            .iter()
            .filter_map(|m| cfg.linear_shape(m))
            .map(|(o, i)| (o + i) as u64)
            .sum();
        4 * opts.adapter_rank as u64 * per_layer * cfg.num_hidden_layers as u64
    } else {
        0
    };
    check_free_space(dir, total, adapter_bytes)?;

    let staged = crate::fsutil::StagedDir::new(dir, overwrite)?;
    let model_dir = staged.path().join("model");
    crate::fsutil::create_dir_all(&model_dir)?;
    let write_file = |p: PathBuf, bytes: &[u8]| -> crate::Result<()> {
        std::fs::write(&p, bytes).map_err(|e| crate::Error::io(&p, e))
    };
    let pretty = |v: &Value| format!("{}\n", serde_json::to_string_pretty(v).unwrap_or_default());
    write_file(model_dir.join("config.json"), pretty(&config).as_bytes())?;
    let tokenizer_json = tokenizer.inner().to_string(true).map_err(|e| {
        crate::Error::Model(super::ModelError::Input(format!(
            "serialising the tokenizer: {e}"
        )))
    })?;
    write_file(model_dir.join("tokenizer.json"), tokenizer_json.as_bytes())?;
    write_file(
        model_dir.join("tokenizer_config.json"),
        pretty(&super::export::hf_tokenizer_config_json(
            tokenizer,
            cfg.max_position_embeddings,
        ))
        .as_bytes(),
    )?;

    let n = shards.len();
    let mut names = Vec::with_capacity(n);
    let mut weight_map = serde_json::Map::new();
    let mut done = 0u64;
    for (s, members) in shards.iter().enumerate() {
        let name = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", s + 1)
        };
        let path = model_dir.join(&name);
        let file = std::fs::File::create(&path).map_err(|e| crate::Error::io(&path, e))?;
        let mut out = std::io::BufWriter::with_capacity(1 << 22, file);
        let io = |e| crate::Error::io(&path, e);
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), json!({"format": "pt"}));
        let mut offset = 0u64;
        for &i in members {
            let (t, shape) = &list[i];
            let bytes = 2 * shape.iter().product::<usize>() as u64;
            header.insert(
                t.clone(),
                json!({"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + bytes]}),
            );
            offset += bytes;
            weight_map.insert(t.clone(), json!(name));
        }
        let mut head = serde_json::to_string(&Value::Object(header)).unwrap_or_default();
        while head.len() % 8 != 0 {
            head.push(' ');
        }
        out.write_all(&(head.len() as u64).to_le_bytes())
            .map_err(io)?;
        out.write_all(head.as_bytes()).map_err(io)?;
        for &i in members {
            let count = list[i].1.iter().product::<usize>();
            let seed = opts.seed ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let norm = list[i].1.len() == 1;
            write_bf16_values(&mut out, count, seed, norm).map_err(io)?;
            done += 2 * count as u64;
            progress(done, total);
        }
        out.flush().map_err(io)?;
        out.get_ref().sync_all().map_err(io)?;
        names.push(name);
    }
    if n > 1 {
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        write_file(
            model_dir.join("model.safetensors.index.json"),
            pretty(&index).as_bytes(),
        )?;
    }

    let mut adapter_parameters = 0u64;
    if opts.adapter_rank > 0 {
        let adapter = adapter_for(&cfg, opts.adapter_rank, opts.seed)?;
        adapter_parameters = adapter
            .modules
            .values()
            .map(|m| m.num_parameters() as u64)
            .sum();
        adapter.save(&staged.path().join("adapter"))?;
    }
    let report = SyntheticReport {
        shape: opts.shape,
        seed: opts.seed,
        parameters: total / 2,
        model_bytes: total,
        shards: names,
        adapter_parameters,
        adapter_rank: opts.adapter_rank,
        seconds: start.elapsed().as_secs_f64(),
    };
    write_file(
        staged.path().join("synthetic.json"),
        pretty(&serde_json::to_value(&report).unwrap_or_default()).as_bytes(),
    )?;
    staged.commit()?;
    Ok(report)
}

/// Refuses, before anything is written, an output whose model (`model_bytes`) and adapter
/// (`adapter_bytes`), plus 64 MiB for the tokenizer and the JSON files, do not fit in the free
/// space of the filesystem `dir` would be on (its nearest existing ancestor's). Where the free
/// space cannot be read, nothing is refused.
fn check_free_space(dir: &Path, model_bytes: u64, adapter_bytes: u64) -> crate::Result<()> {
    const SLACK: u64 = 64 << 20;
    let need = model_bytes + adapter_bytes + SLACK;
    let Some((at, free)) = free_space(dir) else {
        return Ok(());
    };
    if need <= free {
        return Ok(());
    }
    let gb = |b: u64| b as f64 / 1e9;
    Err(crate::Error::io(
        dir,
        std::io::Error::new(
            std::io::ErrorKind::StorageFull,
            format!(
                "needs about {:.2} GB (model {:.2} GB, adapter {:.2} GB, 0.07 GB of tokenizer \
                 and JSON) but {} has only {:.2} GB free (nothing was written)",
                gb(need),
                gb(model_bytes),
                gb(adapter_bytes),
                at.display(),
                gb(free)
            ),
        ),
    ))
}

/// The bytes an unprivileged user may still write on the filesystem of `path`'s nearest
/// existing ancestor (`statvfs`: `f_bavail · f_frsize`), and that ancestor.
#[cfg(unix)]
fn free_space(path: &Path) -> Option<(PathBuf, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let abs = std::path::absolute(path).ok()?;
    let at = abs.ancestors().find(|p| p.exists())?.to_path_buf();
    let c = std::ffi::CString::new(at.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a NUL-terminated path and `st` a writable statvfs; the struct is read
    // only when the call reports success (it is then fully written).
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    #[allow(clippy::unnecessary_cast)] // the field types differ between platforms
    let free = (st.f_bavail as u64).saturating_mul(st.f_frsize as u64);
    Some((at, free))
}

/// Free space is not checked off Unix.
#[cfg(not(unix))]
fn free_space(_: &Path) -> Option<(PathBuf, u64)> {
    None
}

/// `count` bf16 values: 1.0 for a norm, else uniform in ±0.02·√3 (standard deviation 0.02).
fn write_bf16_values(
    out: &mut impl Write,
    count: usize,
    seed: u64,
    norm: bool,
) -> std::io::Result<()> {
    const CHUNK: usize = 1 << 20;
    let one = half::bf16::ONE.to_bits().to_le_bytes();
    let mut buf = Vec::with_capacity(2 * CHUNK);
    let mut state = seed;
    let mut left = count;
    while left > 0 {
        let take = left.min(CHUNK);
        buf.clear();
        if norm {
            (0..take).for_each(|_| buf.extend_from_slice(&one));
        } else {
            for _ in 0..take {
                let u = splitmix(&mut state);
                let v = 0.02 * 3f32.sqrt() * u;
                buf.extend_from_slice(&half::bf16::from_f32(v).to_bits().to_le_bytes());
            }
        }
        out.write_all(&buf)?;
        left -= take;
    }
    Ok(())
}

/// The next value of a SplitMix64 stream, as a uniform f32 in `[-1, 1)`.
#[inline]
pub(crate) fn splitmix(state: &mut u64) -> f32 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
}

/// A LoRA of rank `r` (alpha 2 r) on every linear module of `cfg`: `A` uniform in ±1/√in,
/// `B` uniform in ±0.02 (not peft's zero init, so that the adapter changes the outputs).
fn adapter_for(cfg: &super::Config, r: usize, seed: u64) -> crate::Result<Adapter> {
    let dev = candle_core::Device::Cpu;
    let targets = crate::adapters::ALL_LINEAR_TARGETS
        .map(String::from)
        .to_vec();
    let config = LoraConfig::new(r, 2.0 * r as f64, targets);
    let mut state = seed ^ 0x5EED_ADA7;
    let mut tensor = |rows: usize, cols: usize, range: f32| -> crate::Result<candle_core::Tensor> {
        let v: Vec<f32> = (0..rows * cols)
            .map(|_| range * splitmix(&mut state))
            .collect();
        Ok(candle_core::Tensor::from_vec(v, (rows, cols), &dev)?)
    };
    let mut modules = std::collections::BTreeMap::new();
    for l in 0..cfg.num_hidden_layers {
        for m in super::LINEAR_MODULES {
            let Some((o, i)) = cfg.linear_shape(m) else {
                continue;
            };
            let path = format!("model.layers.{l}.{m}");
            let scale = config.scaling_for(&path);
            modules.insert(
                path,
                LoraModule {
                    a: tensor(r, i, 1.0 / (i as f32).sqrt())?,
                    b: tensor(o, r, 0.02)?,
                    scale,
                },
            );
        }
    }
    Ok(Adapter {
        config,
        modules,
        source: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_space_refuses_what_does_not_fit_with_the_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("not/yet/sy");
        // the nearest existing ancestor is measured; a small output fits
        let (at, free) = free_space(&out).unwrap();
        assert_eq!(at, std::path::absolute(dir.path()).unwrap());
        assert!(free > 0);
        check_free_space(&out, 1000, 1000).unwrap();
        let e = check_free_space(&out, free, 4_000_000_000)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(&format!("{}: needs about ", out.display())),
            "{e}"
        );
        assert!(
            e.contains(", adapter 4.00 GB,") && e.contains("GB free"),
            "{e}"
        );
        assert!(!out.exists() && !dir.path().join("not").exists());
    }

    #[test]
    fn adapter_rank_is_bounded_by_the_smallest_matrix() {
        assert_eq!(
            SyntheticShape::Tiny.max_adapter_rank().unwrap(),
            (32, "self_attn.k_proj", (32, 64))
        );
        assert_eq!(
            SyntheticShape::Llama3_8b.max_adapter_rank().unwrap().0,
            1024
        );
        let cfg = |adapter_rank| SyntheticConfig {
            shape: SyntheticShape::Tiny,
            adapter_rank,
            ..Default::default()
        };
        for ok in [0, 1, 32] {
            cfg(ok).validate().unwrap();
        }
        let e = cfg(33).validate().unwrap_err().to_string();
        assert!(
            e.starts_with("--adapter-rank 33: must be 0 (no adapter) or 1 to 32 for shape tiny"),
            "{e}"
        );
    }
}
