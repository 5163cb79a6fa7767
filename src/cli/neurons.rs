//! `realign neurons`: safety neurons (Zhao et al.): `detect` (importance, per-prompt selection,
//! intersection over a corpus) and `overlap` of two neuron-set files. Each subcommand is one
//! variant of [`NeuronsCommand`] with its own flags struct and handler.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use realign::adapters::Adapter;
use realign::bench::Figure;
use realign::model::{AdapterMode, LoadedModel};
use realign::neurons::detect::{self, DetectConfig, Selection};
use realign::neurons::importance::{ImportanceKind, NeuronImportance};
use realign::neurons::{NeuronSet, TokenScope};

/// Flags of `realign neurons`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    command: NeuronsCommand,
}

/// The `realign neurons` subcommands.
#[derive(clap::Subcommand, Debug)]
enum NeuronsCommand {
    /// Detect the neurons every prompt of a corpus activates (safety neurons on a harmful
    /// corpus, foundation neurons on embedded:general_text); writes SET.json, SET.report.json,
    /// SET.report.md and SET.svg
    Detect(DetectArgs),
    /// Compare two neuron-set files: |A and B| / |B| (the paper's ratio), |A and B| / |A|, the
    /// intersection size, per module kind
    Overlap(OverlapArgs),
    /// Set algebra on two neuron-set files: `A - B` (e.g. safety minus foundation neurons, the
    /// set RSN-Tune trains), `A & B` or `A | B`; writes a set file that `neurons deactivate`,
    /// `sn-tune --set` and `neurons overlap` read
    Combine(CombineArgs),
    /// The deactivation check (the paper's Table 1): harmfulness and task accuracy with no
    /// neuron zeroed, with the set zeroed (Deact-SN) and with an equal random set per module
    /// (Deact-R); or write the deactivated model as a Hugging Face folder
    Deactivate(super::sn_tune::DeactivateArgs),
}

/// Importance formulas.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum ImportanceArg {
    /// The paper's output-change norms: FFN and V/O exact, Q/K by the attention change (Eqs. 4, 8-14)
    Exact,
    /// The authors' cheaper code: sums of |up_proj output|, |attention output|, |q|, |k| per unit
    Proxy,
}

/// Token scopes.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum TokensArg {
    /// Every token of the rendered prompt
    All,
    /// The user's content only
    Content,
    /// The last token only
    Last,
}

#[derive(clap::Args, Debug)]
struct DetectArgs {
    /// Model: HF folder or GGUF [default: the embedded SmolLM2-135M-Instruct]
    #[arg(long)]
    model: Option<PathBuf>,
    /// PEFT adapter merged into the weights before detection (repeatable, applied in order)
    #[arg(long)]
    adapter: Vec<PathBuf>,
    /// Corpus: embedded:NAME or a data file; only the prompts are used, each rendered as a
    /// user message with the chat template and the generation prompt
    #[arg(long, default_value = "embedded:safety_sft")]
    corpus: String,
    /// The column (CSV) or key (JSON) of the corpus file holding the prompt, e.g. `Behavior`
    /// [default: found automatically, as `realign eval --prompt-column` says]
    #[arg(long, value_name = "NAME")]
    prompt_column: Option<String>,
    /// Use at most this many rows of the corpus (in order); 0: all
    #[arg(long, default_value_t = 200)]
    limit: usize,
    /// Per prompt and layer, keep the N most important rows of q_proj and columns of o_proj;
    /// k_proj and v_proj keep N scaled by their size (round(N * kv_rows / q_rows)). Default:
    /// the paper's 1000 per layer at width 4096 scaled to the model's hidden size,
    /// round(1000 * hidden / 4096) (141 on SmolLM2-135M)
    #[arg(long, conflicts_with_all = ["epsilon", "top_k"])]
    top_k_attn: Option<usize>,
    /// Per prompt and layer, keep the N most important FFN units (gate row, up row and down
    /// column together, counted once). Default: the paper's 2000 at intermediate size 11008
    /// scaled to the model's, round(2000 * intermediate / 11008) (279 on SmolLM2-135M)
    #[arg(long, conflicts_with_all = ["epsilon", "top_k"])]
    top_k_ffn: Option<usize>,
    /// Instead of the per-kind rule: keep the K most important of each layer pooled over q, k,
    /// v, o and the FFN units (mixes Q/K attention changes with output norms) [default: not
    /// used]
    #[arg(long, conflicts_with = "epsilon")]
    top_k: Option<usize>,
    /// Instead of the per-kind rule: keep the neurons with importance >= E (the paper's rule)
    /// [default: not used]
    #[arg(long)]
    epsilon: Option<f64>,
    /// Which tokens of each prompt count in the importance: content (the user's message
    /// only, not the chat template or system preamble), all (every token), last (the last
    /// token of the prompt)
    #[arg(long, value_enum, default_value = "content")]
    tokens: TokensArg,
    /// Importance formula
    #[arg(long, value_enum, default_value = "exact")]
    importance: ImportanceArg,
    /// Skip prompts longer than this many tokens
    #[arg(long, default_value_t = 2048)]
    max_length: usize,
    /// A system prompt put in front of every prompt [default: none]
    #[arg(long)]
    system: Option<String>,
    /// Device: cpu, cuda or cuda:N (CUDA needs a build with `--features cuda`)
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Dtype the model's matrices are kept in: auto (the checkpoint's own: bf16/f16 stay
    /// narrow, f32 and quantised GGUF are f32), f32, bf16 or f16; products accumulate in f32
    #[arg(long, value_enum, default_value_t = realign::model::StorageDtype::Auto)]
    dtype: realign::model::StorageDtype,
    /// Output neuron-set file (JSON); the reports and the plot go beside it as
    /// SET.report.json, SET.report.md and SET.svg
    #[arg(short, long)]
    output: PathBuf,
    /// Replace the output if it exists (without this flag an existing output is refused and
    /// left untouched)
    #[arg(long)]
    overwrite: bool,
}

#[derive(clap::Args, Debug)]
struct OverlapArgs {
    /// Set A (e.g. safety neurons)
    first: PathBuf,
    /// Set B (e.g. foundation neurons)
    second: PathBuf,
    /// Print JSON instead of a table
    #[arg(long)]
    json: bool,
}

/// Set operations of `neurons combine`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum SetOp {
    /// Neurons of A that are not in B
    Difference,
    /// Neurons in both
    Intersection,
    /// Neurons in either
    Union,
}

#[derive(clap::Args, Debug)]
struct CombineArgs {
    /// Set A (e.g. safety neurons)
    first: PathBuf,
    /// Set B (e.g. foundation neurons)
    second: PathBuf,
    /// The operation
    #[arg(long, value_enum, default_value = "difference")]
    op: SetOp,
    /// Output set file (JSON), written whole
    #[arg(short, long)]
    output: PathBuf,
    /// Replace the output if it exists (without this flag an existing output is refused and
    /// left untouched)
    #[arg(long)]
    overwrite: bool,
}

fn combine_cmd(a: CombineArgs) -> anyhow::Result<()> {
    realign::fsutil::refuse_existing(&a.output, a.overwrite)?;
    // An empty input makes the operation a copy or an empty set: refused, as a typo'd path is.
    let load = |p: &Path| {
        NeuronSet::load_nonempty(p)
            .with_context(|| format!("loading the neuron set {}", p.display()))
    };
    let (first, second) = (load(&a.first)?, load(&a.second)?);
    let (out, op) = match a.op {
        SetOp::Difference => (first.difference(&second), "difference"),
        SetOp::Intersection => (first.intersection(&second), "intersection"),
        SetOp::Union => (first.union(&second), "union"),
    };
    // a shape disagreement names the module; the files are named here
    let mut out = out.with_context(|| {
        format!(
            "combining {} (A) and {} (B)",
            a.first.display(),
            a.second.display()
        )
    })?;
    if out.is_empty() {
        anyhow::bail!(
            "the {op} of {} ({} neurons) and {} ({} neurons) is empty: no set file written to {} \
             (`neurons deactivate` and `sn-tune` would refuse it)",
            a.first.display(),
            first.len(),
            a.second.display(),
            second.len(),
            a.output.display()
        );
    }
    // Sets of two architectures make no set of either; the shared one is kept for the
    // check where the result is applied.
    let architecture = match (first.architecture(), second.architecture()) {
        (Some(x), Some(y)) if x != y => anyhow::bail!(
            "{} was detected on a {x} model, {} on a {y} model: their neurons cannot be combined",
            a.first.display(),
            a.second.display()
        ),
        (x, y) => x.or(y).map(str::to_string),
    };
    out.meta = serde_json::json!({
        "op": op,
        "architecture": architecture,
        "a": a.first.display().to_string(),
        "b": a.second.display().to_string(),
        "a_neurons": first.len(),
        "b_neurons": second.len(),
    });
    out.save(&a.output)?;
    println!(
        "{op} of {} ({} neurons) and {} ({} neurons): {} neurons; wrote {}",
        a.first.display(),
        first.len(),
        a.second.display(),
        second.len(),
        out.len(),
        a.output.display()
    );
    Ok(())
}

/// Runs `realign neurons`.
pub fn run(a: Args) -> anyhow::Result<()> {
    match a.command {
        NeuronsCommand::Detect(a) => detect_cmd(a),
        NeuronsCommand::Overlap(a) => overlap_cmd(a),
        NeuronsCommand::Combine(a) => combine_cmd(a),
        NeuronsCommand::Deactivate(a) => super::sn_tune::run_deactivate(a),
    }
}

fn detect_cmd(a: DetectArgs) -> anyhow::Result<()> {
    let model_path = super::model_path(a.model)?;
    let mut model_label = model_path.display().to_string();
    for p in &a.adapter {
        model_label.push_str(&format!(" + {}", p.display()));
    }
    let cfg = DetectConfig {
        importance: match a.importance {
            ImportanceArg::Exact => ImportanceKind::Exact,
            ImportanceArg::Proxy => ImportanceKind::Proxy,
        },
        // ε and the pooled k are checked before the model is loaded; the per-kind rule
        // needs the model's widths (a placeholder until then).
        selection: match (a.top_k, a.epsilon) {
            (_, Some(e)) => Selection::Epsilon(e),
            (Some(k), None) => Selection::TopK(k),
            (None, None) => Selection::Epsilon(0.0),
        },
        tokens: match a.tokens {
            TokensArg::All => TokenScope::All,
            TokensArg::Content => TokenScope::Content,
            TokensArg::Last => TokenScope::Last,
        },
        limit: (a.limit > 0).then_some(a.limit),
        max_length: a.max_length,
        system: a.system,
        corpus: a.corpus.clone(),
        model: model_label,
        ..Default::default()
    };
    cfg.validate()?;
    let mut cfg = cfg;
    let outputs = detect::output_paths(&a.output);
    if outputs[1..].contains(&a.output) {
        anyhow::bail!(
            "the set file {} would be overwritten by its report or plot: name it SET.json",
            a.output.display()
        );
    }
    for p in &outputs {
        realign::fsutil::refuse_existing(p, a.overwrite)?;
    }
    let dev = super::device(&a.device)?;
    let mut loaded = super::load_model(&model_path, dev.clone(), a.dtype)?;
    for p in &a.adapter {
        let adapter = Adapter::load(p, &dev)
            .with_context(|| format!("loading the adapter {}", p.display()))?;
        loaded
            .model
            .apply_adapter(&adapter, AdapterMode::Merged)
            .with_context(|| format!("applying the adapter {}", p.display()))?;
    }
    let mc = loaded.model.config();
    cfg.selection = match (a.top_k, a.epsilon) {
        (_, Some(e)) => Selection::Epsilon(e),
        (Some(k), None) => Selection::TopK(k),
        (None, None) => Selection::paper_split(
            mc.hidden_size,
            mc.intermediate_size,
            a.top_k_attn,
            a.top_k_ffn,
        ),
    };
    // k is checked against the model's widths: a k at or above them would keep everything.
    cfg.validate_for(mc)?;
    // Only the prompts are used: any prompt set `realign eval --harmful` reads (prompt-only
    // JSONL, HarmBench CSV, `.txt`) is a corpus, not only training rows with responses.
    let rows: Vec<realign::data::Row> =
        realign::data::load_prompts(&a.corpus, a.prompt_column.as_deref())
            .with_context(|| format!("loading the corpus {}", a.corpus))?
            .into_iter()
            .map(|prompt| realign::data::Row::Sft {
                prompt,
                response: String::new(),
            })
            .collect();
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} prompts [{elapsed_precise} < {eta_precise}]",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut progress = |done: usize, total: usize| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    };
    let (set, report) =
        detect::detect(&loaded.model, &loaded.tokenizer, &rows, &cfg, &mut progress)
            .with_context(|| format!("detecting neurons on {}", a.corpus))?;
    bar.finish_and_clear();
    if report.counts.neurons == 0 {
        anyhow::bail!(
            "no neuron passes {} on {} prompts of {}: the set would be empty, so nothing was \
             written; lower --epsilon, or rank with --top-k-attn / --top-k-ffn",
            report.rule,
            report.prompts,
            a.corpus
        );
    }
    // the four files are one output: on an error, those already written are removed again
    let outputs = detect::save(&set, &report, &a.output).inspect_err(|_| {
        for p in &outputs {
            let _ = std::fs::remove_file(p);
        }
    })?;
    println!(
        "wrote {} ({} neurons: {} attention, {} FFN; {} prompts, {}, {} importance, {:.1} s, {:.2} s per prompt), {}, {}, {}, {}",
        outputs[0].display(),
        report.counts.neurons,
        report.counts.attention,
        report.counts.ffn,
        report.prompts,
        report.rule,
        report.importance,
        report.seconds,
        report.seconds_per_prompt,
        outputs[1].display(),
        outputs[2].display(),
        outputs[3].display(),
        outputs[4].display()
    );
    Ok(())
}

fn overlap_cmd(a: OverlapArgs) -> anyhow::Result<()> {
    let load = |p: &Path| {
        NeuronSet::load(p).with_context(|| format!("loading the neuron set {}", p.display()))
    };
    let report = detect::overlap(&load(&a.first)?, &load(&a.second)?)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "A = {}\nB = {}\n{:<10} {:>8} {:>8} {:>8} {:>10} {:>10}",
        a.first.display(),
        a.second.display(),
        "module",
        "|A|",
        "|B|",
        "|A∩B|",
        "|A∩B|/|B|",
        "|A∩B|/|A|"
    );
    // A ratio over an empty set (NaN in the report) is not a number: n/a, not 0 or NaN.
    let ratio = |r: f64| {
        if r.is_finite() {
            format!("{r:.4}")
        } else {
            "n/a".to_string()
        }
    };
    for e in report.kinds.iter().chain([&report.overall]) {
        println!(
            "{:<10} {:>8} {:>8} {:>8} {:>10} {:>10}",
            e.kind,
            e.a,
            e.b,
            e.intersection,
            ratio(e.ratio_of_b),
            ratio(e.ratio_of_a)
        );
    }
    Ok(())
}

/// `realign bench neurons`: exact detection (the paper's per-kind split scaled to the model,
/// content tokens) on `prompts` rows of `embedded:safety_sft`, then one prompt of random tokens
/// (every token scored) at each of 64, 256 and 1024 tokens
/// with the peak resident memory reset before each (`/proc/self/clear_refs`), to show that
/// memory stays bounded as prompts grow. Prints JSON lines.
pub fn bench(loaded: &LoadedModel, prompts: usize) -> anyhow::Result<()> {
    let print = |metric: &str, value: f64, unit: &str, detail: String| {
        let f = Figure::new("neurons", metric, value, unit, detail);
        println!("{}", serde_json::to_string(&f).unwrap_or_default());
    };
    let threads = rayon::current_num_threads();
    let rows = realign::data::load_source("embedded:safety_sft")?;
    let mc = loaded.model.config();
    let cfg = DetectConfig {
        limit: Some(prompts),
        corpus: "embedded:safety_sft".into(),
        selection: Selection::paper_split(mc.hidden_size, mc.intermediate_size, None, None),
        ..Default::default()
    };
    let (set, report) = detect::detect(
        &loaded.model,
        &loaded.tokenizer,
        &rows,
        &cfg,
        &mut |_, _| {},
    )?;
    print(
        "detect_seconds",
        report.seconds,
        "s",
        format!(
            "exact importance, {}, {} prompts of embedded:safety_sft ({} tokens, {} scored), {} neurons kept; {threads} rayon threads",
            report.rule, report.prompts, report.tokens, report.scored_tokens, set.len()
        ),
    );
    // A plain forward pass (no logits): the reference of detection's speed and memory.
    let plain_forward = |ids: &[u32]| -> anyhow::Result<()> {
        let input =
            candle_core::Tensor::from_vec(ids.to_vec(), (1, ids.len()), loaded.model.device())?;
        loaded.model.forward_with(
            &input,
            realign::model::ForwardArgs {
                logits: realign::model::Logits::None,
                ..Default::default()
            },
        )?;
        Ok(())
    };
    // The reference the issue sets: plain forward passes over the same prompts, rendered and
    // tokenised exactly as detection rendered them.
    let mut forward = 0f64;
    for row in rows.iter().take(prompts) {
        let sp = cfg.scoped_prompt(&loaded.tokenizer, row.prompt())?;
        if sp.ids.is_empty() || sp.ids.len() > cfg.max_length {
            continue;
        }
        let t = Instant::now();
        plain_forward(&sp.ids)?;
        forward += t.elapsed().as_secs_f64();
    }
    print(
        "forward_seconds",
        forward,
        "s",
        format!(
            "plain forward passes (no logits) over the same {} prompts, one at a time",
            report.prompts
        ),
    );
    print(
        "detect_over_forward",
        report.seconds / forward.max(1e-9),
        "x",
        "detect_seconds / forward_seconds (issue 12's goal: at most 2)".into(),
    );
    print(
        "peak_rss_bytes",
        peak_rss_bytes().map_or(f64::NAN, |b| b as f64),
        "bytes",
        "VmHWM of the whole process after detection (model load included)".into(),
    );
    let imp = NeuronImportance::new(&loaded.model, ImportanceKind::Exact)?;
    let vocab = loaded.model.config().vocab_size as u32;
    let positions = loaded.model.config().positions();
    for len in [64usize, 256, 1024] {
        if len > positions {
            eprintln!(
                "bench neurons: no {len}-token prompt (the model reads {positions} positions)"
            );
            continue;
        }
        let ids: Vec<u32> = (0..len as u32)
            .map(|i| {
                100.min(vocab - 1)
                    + (i.wrapping_mul(2_654_435_761) % vocab.saturating_sub(100).max(1))
            })
            .collect();
        // The forward pass alone first: its [heads, l, l] attention tensors are the part of
        // the peak that grows with l^2 and is not the importance computation's.
        let before = current_rss_bytes().unwrap_or(0);
        let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
        plain_forward(&ids)?;
        let forward_peak = peak_rss_bytes().unwrap_or(0).saturating_sub(before);
        let before = current_rss_bytes().unwrap_or(0);
        let reset = reset && std::fs::write("/proc/self/clear_refs", "5").is_ok();
        let t = Instant::now();
        imp.prompt(&ids)?;
        let secs = t.elapsed().as_secs_f64();
        let peak = peak_rss_bytes().unwrap_or(0);
        print(
            &format!("peak_rss_bytes_prompt_{len}"),
            peak as f64,
            "bytes",
            format!(
                "exact importance of one {len}-token prompt: {secs:.2} s, resident before {before} bytes, peak above it {} bytes (the plain forward pass alone: {forward_peak} bytes above){}",
                peak.saturating_sub(before),
                if reset { "" } else { " (peak not reset: /proc/self/clear_refs not writable)" }
            ),
        );
    }
    Ok(())
}

fn status_field(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
}

fn peak_rss_bytes() -> Option<u64> {
    status_field("VmHWM:")
}

fn current_rss_bytes() -> Option<u64> {
    status_field("VmRSS:")
}
