//! `realign bench`: speed figures printed as JSON lines, one per figure. Speed targets live
//! here, never in timed tests.

use std::time::Instant;

use candle_core::Tensor;
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::model::{generate, ForwardArgs, GenerationConfig, Logits, Model, Sampling};

/// One measured figure.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Figure {
    /// The benchmark (`forward`, …).
    pub bench: String,
    /// What was measured.
    pub metric: String,
    /// The value (best of the repetitions).
    pub value: f64,
    /// Its unit.
    pub unit: String,
    /// How it was measured.
    pub detail: String,
    /// The machine ([`crate::host::Host`] in words): CPU, logical CPUs, kernels, threads.
    pub host: String,
}

impl Figure {
    /// A figure of benchmark `bench`, measured on this machine.
    pub fn new(bench: &str, metric: &str, value: f64, unit: &str, detail: String) -> Self {
        static HOST: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        Self {
            bench: bench.into(),
            metric: metric.into(),
            value,
            unit: unit.into(),
            detail,
            host: HOST
                .get_or_init(|| crate::host::Host::detect().to_string())
                .clone(),
        }
    }
}

fn figure(metric: &str, value: f64, unit: &str, detail: String) -> Figure {
    Figure::new("forward", metric, value, unit, detail)
}

/// CPU time of the process so far (user, system), in seconds, and its peak resident memory in
/// bytes (Linux `getrusage`; zeros elsewhere).
pub fn process_usage() -> (f64, f64, u64) {
    #[cfg(unix)]
    {
        // SAFETY: getrusage only writes the struct it is given.
        let mut u: libc::rusage = unsafe { std::mem::zeroed() };
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } == 0 {
            let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
            // ru_maxrss is in KiB on Linux
            return (
                secs(u.ru_utime),
                secs(u.ru_stime),
                u.ru_maxrss as u64 * 1024,
            );
        }
    }
    (0.0, 0.0, 0)
}

fn random_ids(rng: &mut StdRng, n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|_| rng.gen_range(100..vocab as u32)).collect()
}

fn best_of(repeats: usize, mut f: impl FnMut() -> crate::Result<()>) -> crate::Result<f64> {
    let mut best = f64::INFINITY;
    for _ in 0..repeats {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// Prefill (batch 8 x 128, with logits at every position and at the last one; batch 2 x 1024,
/// or the model's positions if fewer, with the last logits only), greedy decode (batch 1, 64 tokens; with the model's own storage
/// and with bf16 matrices) and batched decode (batch 16 and batch 32, 64 tokens; each also as
/// its prefill alone and the rate of the one-token steps after it) on random token ids
/// (seed 0). Calls `out` for each figure as it is measured.
pub fn forward(model: &Model, repeats: usize, mut out: impl FnMut(Figure)) -> crate::Result<()> {
    let vocab = model.config().vocab_size;
    let dev = model.device();
    let mut rng = StdRng::seed_from_u64(0);
    let threads = candle_core::utils::get_num_threads();

    let (b, s) = (8, 128);
    let ids = Tensor::from_vec(random_ids(&mut rng, b * s, vocab), (b, s), dev)?;
    let secs = best_of(repeats, || model.forward(&ids).map(drop))?;
    out(figure(
        "prefill_tokens_per_s",
        (b * s) as f64 / secs,
        "tokens/s",
        format!("batch {b} x {s}, logits at every position, {threads} threads, best of {repeats}"),
    ));
    // a prefill that keeps the logits of the last position only, as generation does
    let last_logits = |ids: &Tensor| {
        best_of(repeats, || {
            model
                .forward_with(
                    ids,
                    ForwardArgs {
                        logits: Logits::Last,
                        ..Default::default()
                    },
                )
                .map(drop)
        })
    };
    let secs = last_logits(&ids)?;
    out(figure(
        "prefill_last_logits_tokens_per_s",
        (b * s) as f64 / secs,
        "tokens/s",
        format!(
            "batch {b} x {s}, logits at the last position only (as generate), {threads} threads"
        ),
    ));

    // A long prompt: attention's share grows with the length (each query sees its earlier
    // keys only, which `model::prefill_attention` exploits). At most the model's positions.
    let (lb, ls) = (2, 1024.min(model.config().positions()));
    let long = Tensor::from_vec(random_ids(&mut rng, lb * ls, vocab), (lb, ls), dev)?;
    let secs = last_logits(&long)?;
    out(figure(
        "prefill_long_tokens_per_s",
        (lb * ls) as f64 / secs,
        "tokens/s",
        format!("batch {lb} x {ls}, logits at the last position only, {threads} threads"),
    ));

    let new = 64;
    let cfg = GenerationConfig {
        max_new_tokens: new,
        sampling: Sampling::Greedy,
        stop_ids: vec![],
        pad_id: 0,
    };
    let prompt = vec![random_ids(&mut rng, 16, vocab)];
    let secs = best_of(repeats, || generate(model, &prompt, &cfg).map(drop))?;
    out(figure(
        "decode_tokens_per_s",
        new as f64 / secs,
        "tokens/s",
        format!(
            "batch 1, 16-token prompt, {new} greedy tokens (prefill included), {threads} threads"
        ),
    ));

    // The same decode with the matrices stored as bf16 (half the bytes read per token; the
    // arithmetic is f32, see `model::storage`).
    let narrow = model.with_storage(candle_core::DType::BF16)?;
    let secs = best_of(repeats, || generate(&narrow, &prompt, &cfg).map(drop))?;
    drop(narrow);
    out(figure(
        "decode_bf16_tokens_per_s",
        new as f64 / secs,
        "tokens/s",
        format!(
            "as decode_tokens_per_s, matrices stored as bf16 (f32 arithmetic), {threads} threads"
        ),
    ));

    for (batch, name) in [(16, "batched"), (32, "batched32")] {
        let metric = format!("{name}_decode_tokens_per_s");
        let prompts: Vec<Vec<u32>> = (0..batch)
            .map(|i| random_ids(&mut rng, 8 + i, vocab))
            .collect();
        let secs = best_of(repeats, || generate(model, &prompts, &cfg).map(drop))?;
        let last = 8 + batch - 1;
        out(figure(&metric, (batch * new) as f64 / secs, "tokens/s",
            format!("batch {batch}, left-padded 8..{last}-token prompts, {new} greedy tokens each, {threads} threads")));
        // The same batch's prefill alone (one new token: the prompts' forward pass and the
        // first token from its logits), and so the rate of the remaining one-token steps: the
        // figure above counts both, and the prefill's share grows with the batch's prompts.
        let first = GenerationConfig {
            max_new_tokens: 1,
            ..cfg.clone()
        };
        let prefill = best_of(repeats, || generate(model, &prompts, &first).map(drop))?;
        out(figure(
            &format!("{name}_prefill_s"),
            prefill,
            "s",
            format!("the prefill of {metric} alone (its {batch} prompts and first token)"),
        ));
        out(figure(
            &format!("{name}_steps_tokens_per_s"),
            (batch * (new - 1)) as f64 / (secs - prefill).max(f64::MIN_POSITIVE),
            "tokens/s",
            format!("{metric} without its prefill: the {} one-token steps after the first token, batch {batch}", new - 1),
        ));
    }
    Ok(())
}

/// LoRA training speed: r 16 (alpha 32) on all 7 modules, batch 8 x 128 random tokens with
/// labels on the last 64 positions of each sequence; one step = forward, backward, AdamW.
pub fn train(model: &Model, repeats: usize, mut out: impl FnMut(Figure)) -> crate::Result<()> {
    use crate::adapters::LoraConfig;
    use crate::train::{collect_grads, AdamW, AdamWParams, LabelLogprobs, TrainableLora};
    let mut model = model.clone();
    let config = LoraConfig::new(
        16,
        32.0,
        crate::adapters::ALL_LINEAR_TARGETS
            .map(String::from)
            .to_vec(),
    );
    let lora = TrainableLora::init(&model, config, 0)?;
    lora.attach(&mut model)?;
    model.set_differentiable(true);
    let vars = lora.named_vars();
    let mut opt = AdamW::new(vars.clone(), AdamWParams::default())?;
    let (b, s) = (8, 128);
    let mut rng = StdRng::seed_from_u64(0);
    let dev = model.device().clone();
    let ids = random_ids(&mut rng, b * s, model.config().vocab_size);
    let labels: Vec<i64> = ids
        .iter()
        .enumerate()
        .map(|(i, &t)| if i % s >= s - 64 { t as i64 } else { -100 })
        .collect();
    let ids = Tensor::from_vec(ids, (b, s), &dev)?;
    let labels = Tensor::from_vec(labels, (b, s), &dev)?;
    // Phase times of the best step: forward to the final norm, LM head + loss, backward,
    // AdamW; and the process's CPU seconds per wall second over the step (cores kept busy).
    let mut best = [f64::INFINITY; 6];
    let mut step = || -> crate::Result<[f64; 6]> {
        let (u0, s0, _) = process_usage();
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
        let grads = collect_grads(&loss.backward()?, &vars);
        let t3 = Instant::now();
        opt.step(&grads)?;
        let t4 = Instant::now();
        let (u1, s1, _) = process_usage();
        let wall = (t4 - t0).as_secs_f64();
        Ok([
            wall,
            (t1 - t0).as_secs_f64(),
            (t2 - t1).as_secs_f64(),
            (t3 - t2).as_secs_f64(),
            (t4 - t3).as_secs_f64(),
            (u1 - u0 + s1 - s0) / wall,
        ])
    };
    step()?; // warm-up
    for _ in 0..repeats {
        let t = step()?;
        if t[0] < best[0] {
            best = t;
        }
    }
    let secs = best[0];
    let threads = candle_core::utils::get_num_threads();
    let mut figures = vec![figure(
        "train_tokens_per_s",
        (b * s) as f64 / secs,
        "tokens/s",
        format!("LoRA r 16 on q,k,v,o,gate,up,down; batch {b} x {s}; forward + backward + AdamW; {threads} threads, best of {repeats}"),
    )];
    for (i, (metric, what)) in [
        ("train_forward_s", "forward through the final norm"),
        (
            "train_loss_s",
            "LM head on the label positions + fused log-softmax/NLL",
        ),
        ("train_backward_s", "backward pass"),
        ("train_adamw_s", "AdamW update"),
    ]
    .into_iter()
    .enumerate()
    {
        figures.push(figure(
            metric,
            best[i + 1],
            "s",
            format!("{what}, in the best step"),
        ));
    }
    figures.push(figure(
        "train_cores_busy",
        best[5],
        "CPU s / wall s",
        "user + system CPU seconds of the process per wall second in the best step (spinning counts as busy)".into(),
    ));
    for mut f in figures {
        f.bench = "train".into();
        out(f);
    }
    Ok(())
}

/// Fills a vector with uniform values in `[-1, 1)` from a seeded SplitMix64 stream (fast enough
/// for a few hundred million values, and repeatable; the stream of `realign synthetic`).
fn seeded_uniform(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed;
    (0..n)
        .map(|_| crate::model::synthetic::splitmix(&mut state))
        .collect()
}

/// The large products of an 8 x 128 prefill of SmolLM2-135M: `(name, out features, in
/// features)` of `x Wᵀ` with 1,024 input rows.
pub const GEMM_SHAPES: [(&str, usize, usize); 4] = [
    ("gate_up", 1536, 576),
    ("down", 576, 1536),
    ("q_o", 576, 576),
    ("lm_head", 49152, 576),
];

/// Rows of the input of every [`GEMM_SHAPES`] product: the 8 x 128 tokens of the prefill
/// figures.
pub const GEMM_ROWS: usize = 1024;

/// The prefill's matrix products alone, in GFLOP/s: `x Wᵀ` for each of [`GEMM_SHAPES`]
/// (`[1024, in] x [out, in]ᵀ`, `W` read in place and a fresh output, as the linear layers and
/// the LM head run them) through [`crate::model::gemm::product`], on seeded uniform inputs; no
/// model; one warm-up call, then the best of `repeats`. `scripts/bench-vs-torch.sh --only gemm`
/// sets them beside
/// `torch.nn.functional.linear` on the same shapes, which separates the products' speed from
/// the rest of a prefill.
pub fn gemm(repeats: usize, mut out: impl FnMut(Figure)) -> crate::Result<()> {
    use crate::model::gemm::{product, MatRef};
    let threads = candle_core::utils::get_num_threads();
    let m = GEMM_ROWS;
    for (i, (name, n, k)) in GEMM_SHAPES.into_iter().enumerate() {
        let x = seeded_uniform(m * k, 2 * i as u64);
        let w = seeded_uniform(n * k, 2 * i as u64 + 1);
        let run = || -> crate::Result<()> {
            product(
                m,
                n,
                k,
                MatRef::row_major(&x, k),
                MatRef::transposed(&w, k),
                1.0,
            )
            .map(drop)
            .map_err(|e| candle_core::Error::wrap(e).into())
        };
        run()?; // warm-up, as the torch reference does
        let secs = best_of(repeats, run)?;
        out(Figure::new(
            "gemm",
            &format!("{name}_gflops"),
            2.0 * (m * n * k) as f64 / secs / 1e9,
            "GFLOP/s",
            format!(
                "x [{m}, {k}] times W [{n}, {k}] transposed (SmolLM2-135M's {name} product in an \
                 8 x 128 prefill), W read in place, fresh output, {threads} threads, best of {repeats}"
            ),
        ));
    }
    Ok(())
}

/// The synthetic adapters of [`patch`] and [`diagnose`]: Llama-3-8B's shape, 32 blocks x 7
/// modules, r 128 (alpha 256), f32 (hidden 4096, KV 1024, MLP 14336); a reference and a
/// fine-tuned adapter (uniform entries in ±0.02) and 20%-dense 0/1 masks, generated from seeds.
fn synthetic_llama_adapters() -> crate::Result<(
    crate::adapters::Adapter,
    crate::adapters::Adapter,
    crate::nlsr::masks::Masks,
)> {
    use crate::adapters::{Adapter, LoraConfig, LoraModule};
    use crate::nlsr::masks::{Masks, ModuleMask};
    use std::collections::BTreeMap;
    let dev = candle_core::Device::Cpu;
    let (h, kv, mlp, layers, r) = (4096, 1024, 14336, 32, 128);
    let shapes = [
        ("self_attn.q_proj", h, h),
        ("self_attn.k_proj", kv, h),
        ("self_attn.v_proj", kv, h),
        ("self_attn.o_proj", h, h),
        ("mlp.gate_proj", mlp, h),
        ("mlp.up_proj", mlp, h),
        ("mlp.down_proj", h, mlp),
    ];
    let targets = shapes
        .iter()
        .map(|(n, _, _)| n.rsplit('.').next().unwrap_or(n).to_string())
        .collect();
    let config = LoraConfig::new(r, 2.0 * r as f64, targets);
    let scale = config.scaling_for("model.layers.0.self_attn.q_proj");
    let mut seed = 0u64;
    let mut tensor = |rows: usize, cols: usize, mask: bool| -> crate::Result<Tensor> {
        seed += 1;
        let mut v = seeded_uniform(rows * cols, seed);
        if mask {
            v.iter_mut()
                .for_each(|x| *x = if *x < -0.6 { 1.0 } else { 0.0 }); // P = 0.2
        } else {
            v.iter_mut().for_each(|x| *x *= 0.02);
        }
        Ok(Tensor::from_vec(v, (rows, cols), &dev)?)
    };
    let (mut reference, mut finetuned, mut masks) =
        (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
    for l in 0..layers {
        for (name, o, i) in shapes {
            let path = format!("model.layers.{l}.{name}");
            reference.insert(
                path.clone(),
                LoraModule {
                    a: tensor(r, i, false)?,
                    b: tensor(o, r, false)?,
                    scale,
                },
            );
            finetuned.insert(
                path.clone(),
                LoraModule {
                    a: tensor(r, i, false)?,
                    b: tensor(o, r, false)?,
                    scale,
                },
            );
            masks.insert(
                path,
                ModuleMask {
                    a: tensor(r, i, true)?,
                    b: tensor(o, r, true)?,
                },
            );
        }
    }
    let reference = Adapter {
        config: config.clone(),
        modules: reference,
        source: None,
    };
    let finetuned = Adapter {
        config,
        modules: finetuned,
        source: None,
    };
    let masks = Masks {
        modules: masks,
        source: None,
    };
    Ok((reference, finetuned, masks))
}

/// `realign diagnose` on the synthetic adapters of [`patch`] (Llama-3-8B's shape, r 128):
/// `diagnose_seconds` with a reference and masks (two stacked Grams per factor: Eq. 8 on the
/// masked regions, Safe LoRA's statistic on the update), and `diagnose_adapters_only_seconds`
/// with the aligned and fine-tuned adapters alone (one per factor).
pub fn diagnose(repeats: usize, mut out: impl FnMut(Figure)) -> crate::Result<()> {
    use crate::diagnose::{diagnose, DiagnoseConfig};
    let (aligned, finetuned, masks) = synthetic_llama_adapters()?;
    let cfg = DiagnoseConfig::default();
    let threads = rayon::current_num_threads();
    let full = best_of(repeats, || {
        diagnose(&aligned, &finetuned, Some(&aligned), Some(&masks), &cfg).map(drop)
    })?;
    let plain = best_of(repeats, || {
        diagnose(&aligned, &finetuned, None, None, &cfg).map(drop)
    })?;
    for (metric, secs, what) in [
        ("diagnose_seconds", full, "--reference and --masks: Eq. 8 on the masked regions + Safe LoRA's cosine of the update"),
        ("diagnose_adapters_only_seconds", plain, "W_a and W_t alone: whole-module Eq. 8 + Safe LoRA's cosine from the same Grams"),
    ] {
        let mut f = figure(
            metric,
            secs,
            "s",
            format!("{what}; 32 blocks x 7 modules, r 128, f32, Llama-3-8B shapes, adapters in memory; {threads} threads, best of {repeats}"),
        );
        f.bench = "diagnose".into();
        out(f);
    }
    Ok(())
}

/// The NLSR patch stage (similarities, layer pruning, transplant) on a synthetic adapter of
/// Llama-3-8B's shape: 32 blocks x 7 modules, r 128, f32 (hidden 4096, KV 1024, MLP 14336),
/// reference and fine-tuned adapters and 20%-dense masks generated from seeds.
pub fn patch(repeats: usize, mut out: impl FnMut(Figure)) -> crate::Result<()> {
    use crate::nlsr::patch::{patch, PatchConfig};
    let (layers, r) = (32, 128);
    let (reference, finetuned, masks) = synthetic_llama_adapters()?;
    let cfg = PatchConfig::default();
    let flops: u64 = reference
        .modules
        .values()
        .map(|m| {
            let (r, inp) = (m.a.dims()[0], m.a.dims()[1]);
            crate::nlsr::similarity::similarity_flops([m.b.dims()[0], r, inp])
        })
        .sum();
    let mut cpu = f64::INFINITY;
    let secs = best_of(repeats, || {
        let (u0, s0, _) = process_usage();
        patch(&reference, &finetuned, &masks, &cfg).map(drop)?;
        let (u1, s1, _) = process_usage();
        cpu = cpu.min(u1 - u0 + s1 - s0);
        Ok(())
    })?;
    let threads = rayon::current_num_threads();
    let mut figures = vec![
        figure(
            "patch_seconds",
            secs,
            "s",
            format!("similarity + layer pruning + transplant, {layers} blocks x 7 modules, r {r}, f32, Llama-3-8B shapes; {threads} threads, best of {repeats}"),
        ),
        figure(
            "patch_cpu_seconds",
            cpu,
            "s",
            format!("user + system CPU time of the process during one patch (lowest of {repeats}); about threads x patch_seconds on an idle machine"),
        ),
        figure(
            "patch_gflop",
            flops as f64 * 1e-9,
            "GFLOP",
            "flops of the r x r products of the similarities (stacked syrk per factor, lower triangle at 32 x 8 tiles)".into(),
        ),
        figure(
            "patch_similarity_gflops_per_cpu_s",
            flops as f64 * 1e-9 / cpu,
            "GFLOP/s",
            "patch_gflop / patch_cpu_seconds: per-core efficiency of the whole patch, transplant included".into(),
        ),
    ];
    figures.push(figure(
        "peak_rss_bytes",
        process_usage().2 as f64,
        "bytes",
        "peak resident memory of the bench process so far (the three synthetic adapters are held in memory, 1.3 GB each)".into(),
    ));
    for mut f in figures.drain(..) {
        f.bench = "patch".into();
        out(f);
    }

    // the same from files, as `realign patch` runs: inputs memory-mapped, output streamed
    let dir = std::env::temp_dir().join(format!("realign-bench-patch-{}", std::process::id()));
    let files = (|| -> crate::Result<()> {
        let (e, t, m, o) = (
            dir.join("reference"),
            dir.join("finetuned"),
            dir.join("masks.safetensors"),
            dir.join("out"),
        );
        reference.save(&e)?;
        finetuned.save(&t)?;
        crate::nlsr::masks::save(&masks, &m)?;
        drop((reference, finetuned, masks));
        reset_peak_rss();
        let before = peak_rss_since_reset().unwrap_or(0);
        let start = Instant::now();
        crate::nlsr::stream::patch_files(&e, &t, &m, &cfg, &o)?;
        let secs = start.elapsed().as_secs_f64();
        figures.push(figure(
            "patch_files_seconds",
            secs,
            "s",
            "`realign patch` from files to files (inputs in the page cache, memory-mapped; output written module by module and fsynced), one run".into(),
        ));
        if let Some(hwm) = peak_rss_since_reset() {
            figures.push(figure(
                "patch_files_peak_rss_bytes",
                hwm as f64,
                "bytes",
                format!("peak resident memory during the patch from files (VmHWM after a reset, {:.0} MB resident before it; three 1.3 GB inputs)", before as f64 / 1e6),
            ));
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    files?;
    for mut f in figures {
        f.bench = "patch".into();
        out(f);
    }
    Ok(())
}

/// Resets the peak resident memory the kernel reports as `VmHWM` (Linux; a no-op elsewhere).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// `VmHWM` of `/proc/self/status` in bytes (Linux), the peak since [`reset_peak_rss`].
fn peak_rss_since_reset() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
