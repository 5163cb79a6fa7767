//! `realign experiment`: the whole pipeline from one command, with an overall progress bar, a
//! bar for the running stage, and a log file (`OUTPUT/experiment.log`).

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Context;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use realign::experiment::{self, ExperimentConfig, Observer};

/// Flags of `realign experiment`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Experiment file (TOML; every key optional, see `--print-config`): its keys replace the
    /// embedded default's, tables merging key by key (`[align.dpo]` with only `method = "orpo"`
    /// keeps the rest of the default's stage) [default: the embedded default:
    /// SmolLM2-135M-Instruct + the shipped data]
    config: Option<PathBuf>,
    /// The reduced run (320 SFT rows and 32 DPO pairs, one attack of 100 rows at p = 0.2,
    /// Safe LoRA and NLSR with low-rank and random masks, no sweeps, no safety-neuron half;
    /// 64 harmful, 64 task and 64 over-refusal prompts per model): about 10 minutes on 2
    /// cores; writes runs/experiment-quick. With a CONFIG file, the file's keys apply over the
    /// reduced run instead of the full default
    #[arg(long)]
    quick: bool,
    /// Output folder [default: the file's `output`, else runs/experiment (runs/experiment-quick
    /// with --quick)]
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// Base model: a Hugging Face folder or a .gguf file (Llama, Mistral, Qwen2) [default: the
    /// file's `model`, else the embedded SmolLM2-135M-Instruct]. The settings stay those of the
    /// file or default, which were chosen for SmolLM2-135M on its validation slices
    #[arg(long)]
    model: Option<PathBuf>,
    /// Evaluate on the validation slices (embedded:harmful_val, embedded:task_val,
    /// embedded:overrefusal_val) instead of the held-out sets: for choosing settings without looking
    /// at the evaluation sets. Training stages are shared with the normal run
    #[arg(long)]
    validate: bool,
    /// Print the resolved configuration (every key with its value) as TOML and exit
    #[arg(long)]
    print_config: bool,
    /// Print the report as JSON on stdout instead of the Markdown tables
    #[arg(long)]
    json: bool,
    /// Recompute report.md and report.json from the stored replies of the finished run (same
    /// settings), without regenerating anything; with --judge, under that judge
    #[arg(long)]
    rejudge: bool,
    /// With --rejudge: the judge of HS: keyword, keyword+coherence, keyword+decline, qwen (needs
    /// scripts/fetch-judge-model.sh), model:PATH, rubric:PATH, … (see `realign judge-eval
    /// --help`) [default: the run's `eval.judge`]
    #[arg(long, requires = "rejudge")]
    judge: Option<String>,
    /// With --rejudge: the report of the stages finished so far, for a run in progress or
    /// stopped (rows whose evaluation has not finished are left out), written to
    /// OUTPUT/report-partial/ instead of OUTPUT/report/
    #[arg(long, requires = "rejudge")]
    partial: bool,
}

struct Bars {
    multi: MultiProgress,
    overall: ProgressBar,
    stage: Option<ProgressBar>,
    log: std::fs::File,
    started: std::time::Instant,
}

impl Bars {
    fn log(&mut self, line: &str) {
        let _ = writeln!(
            self.log,
            "[{:>8.1}s] {line}",
            self.started.elapsed().as_secs_f64()
        );
    }
}

impl Observer for Bars {
    fn plan(&mut self, total: usize) {
        self.overall.set_length(total as u64);
        self.log(&format!("host: {}", realign::host::Host::detect()));
        self.log(&format!("plan: {total} stages"));
    }
    fn stage_start(&mut self, index: usize, name: &str, cached: bool) {
        self.overall.set_position(index as u64);
        self.overall.set_message(name.to_string());
        if !cached {
            let bar = self.multi.add(ProgressBar::new(0));
            bar.set_style(
                ProgressStyle::with_template(
                    "  {prefix:<28} {bar:30} {pos}/{len} [{elapsed_precise}] {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.set_prefix(name.to_string());
            self.stage = Some(bar);
            self.log(&format!("start {name}"));
        }
    }
    fn stage_progress(&mut self, done: usize, total: usize, message: &str) {
        if let Some(b) = &self.stage {
            b.set_length(total as u64);
            b.set_position(done as u64);
            b.set_message(message.to_string());
        }
    }
    fn stage_end(&mut self, name: &str, seconds: f64, summary: &str) {
        if let Some(b) = self.stage.take() {
            b.finish_and_clear();
            self.multi.remove(&b);
        }
        self.overall.inc(1);
        self.log(&format!("done  {name} ({seconds:.1} s): {summary}"));
    }
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let mut cfg = match (&a.config, a.quick) {
        (Some(p), false) => ExperimentConfig::from_file(p)?,
        (Some(p), true) => ExperimentConfig::from_file_over(p, &ExperimentConfig::quick())?,
        (None, true) => ExperimentConfig::quick(),
        (None, false) => ExperimentConfig::default(),
    };
    let output_flag = a.output.is_some();
    let model_flag = a.model.is_some();
    if let Some(o) = a.output {
        cfg.output = o;
    }
    if let Some(m) = a.model {
        cfg.model = Some(m);
    }
    if a.validate {
        cfg = cfg.validation();
    }
    if a.print_config {
        print!("{}", cfg.to_toml());
        return Ok(());
    }
    if a.rejudge {
        let report = experiment::rejudge::rejudge_with(
            &cfg,
            a.judge.as_deref(),
            &realign::eval::judges::JudgeOptions::default(),
            a.partial,
        )
        .with_context(|| format!("rejudging the run in {}", cfg.output.display()))?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            println!("{}", report.markdown());
            eprintln!(
                "report: {}",
                cfg.output
                    .join(experiment::rejudge::report_folder(a.partial))
                    .join("index.md")
                    .display()
            );
        }
        return Ok(());
    }
    // where a key's value came from: the file, else the built-in run
    let origin = match (&a.config, a.quick) {
        (Some(f), _) => f.display().to_string(),
        (None, true) => "the --quick run".to_string(),
        (None, false) => "the embedded default".to_string(),
    };
    check_before_run(&cfg, &origin, output_flag, model_flag)?;
    std::fs::create_dir_all(&cfg.output)
        .with_context(|| format!("creating {}", cfg.output.display()))?;
    let log_path = cfg.output.join("experiment.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let multi = MultiProgress::new();
    let overall = multi.add(ProgressBar::new(0));
    overall.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} stages [{elapsed_precise}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut bars = Bars {
        multi,
        overall,
        stage: None,
        log,
        started: std::time::Instant::now(),
    };
    let result = experiment::run(&cfg, &mut bars);
    bars.overall.finish_and_clear();
    let report = match result {
        Ok(r) => r,
        // Another run holds the folder: this one did nothing, so it neither writes into that
        // run's log nor says that it stopped with finished stages to resume.
        Err(e @ realign::Error::Busy { .. }) => return Err(e.into()),
        Err(e) => {
            bars.log(&format!("failed: {e}"));
            return Err(e).context(format!(
                "the experiment stopped; finished stages are kept in {} and a rerun resumes",
                cfg.output.join("stages").display()
            ));
        }
    };
    match report.peak_rss_mib {
        Some(m) => bars.log(&format!("report written; peak RSS of this run {m:.0} MiB")),
        None => bars.log("report written"),
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{}", report.markdown());
        eprintln!(
            "report: {} (log: {})",
            cfg.output.join("report/index.md").display(),
            log_path.display()
        );
    }
    Ok(())
}

/// Everything refused before the output folder is created, naming the flag or the key and
/// `origin` (the experiment file, or the built-in run) it came from: the configuration
/// ([`ExperimentConfig::validate`]), the model ([`ExperimentConfig::check_model`]), and an
/// output path that is a file or lies under one (`-o afile is a file, not a folder`).
fn check_before_run(
    cfg: &ExperimentConfig,
    origin: &str,
    output_flag: bool,
    model_flag: bool,
) -> anyhow::Result<()> {
    cfg.validate()
        .map_err(|what| anyhow::anyhow!("{origin}: {what}"))?;
    if let Err(what) = cfg.check_model() {
        match (&cfg.model, model_flag) {
            (Some(m), true) => {
                anyhow::bail!("--model {}: no such model folder or GGUF file", m.display())
            }
            _ => anyhow::bail!("{origin}: {what}"),
        }
    }
    let out = &cfg.output;
    // the output itself or the first folder above it that exists must be a folder
    if let Some(blocker) = out
        .ancestors()
        .filter(|p| !p.as_os_str().is_empty())
        .find(|p| p.exists())
        .filter(|p| !p.is_dir())
    {
        let named = if output_flag {
            format!("-o {}", out.display())
        } else {
            format!("{origin}: output = {:?}", out.display().to_string())
        };
        if blocker == out.as_path() {
            anyhow::bail!("{named} is a file, not a folder");
        }
        anyhow::bail!("{named}: {} is a file, not a folder", blocker.display());
    }
    // Not into the folders another run manages: a stage folder (it has a record), or its
    // `stages/`, `report/` or `report-partial/`, which that run replaces whole (deleting the
    // new files with a stage it reruns or a report it rewrites).
    let absolute = std::path::absolute(out).unwrap_or_else(|_| out.clone());
    let managed = ["stages", "report", "report-partial"];
    let inside = absolute.ancestors().find(|a| {
        a.join(realign::experiment::cache::STAGE_JSON).is_file()
            || (a
                .file_name()
                .is_some_and(|n| managed.iter().any(|m| n == *m))
                && a.parent().is_some_and(|p| {
                    p.join("experiment.toml").is_file()
                        && p.join(realign::fsutil::DirLock::FILE).is_file()
                }))
    });
    if let Some(run) = inside {
        let named = if output_flag {
            format!("-o {}", out.display())
        } else {
            format!("{origin}: output = {:?}", out.display().to_string())
        };
        anyhow::bail!(
            "{named} lies inside {}, which another experiment run manages (a stage \
             folder, or its stages/ or report/ folder); choose a folder outside it",
            run.display()
        );
    }
    Ok(())
}
