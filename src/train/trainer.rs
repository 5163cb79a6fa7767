//! The training loop: encode rows, cache reference log-probabilities (DPO, KTO), then epochs of
//! seeded shuffles, right-padded micro-batches, gradient accumulation, clipping, AdamW and the
//! schedule; PEFT checkpoints that resume exactly; a JSON log of every step.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Tensor};
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};

use super::adamw::{accumulate, clip_grad_norm, collect_grads, AdamW, AdamWParams, Grads};
use super::config::{fmt_num, TrainConfig};
use super::loss::LabelLogprobs;
use super::objectives::{self, Objective};
use super::schedule::lr_at;
use super::trainable::TrainableLora;
use super::TrainError;
use crate::adapters::{Adapter, LoraConfig};
use crate::data::{collate, encode_pair, render_prompt, Encoded, PromptTemplate, Row};
use crate::model::{ForwardArgs, Logits, Model};
use crate::tokenizer::Tokenizer;

/// One training example, encoded.
#[derive(Debug, Clone)]
enum Example {
    Sft(Encoded),
    Pair {
        chosen: Encoded,
        rejected: Encoded,
    },
    Kto {
        seq: Encoded,
        mismatched: Encoded,
        desirable: bool,
    },
}

impl Example {
    /// Tokens of its longest sequence (what its batch is padded to).
    fn len(&self) -> usize {
        self.sequences()
            .iter()
            .map(|s| s.input_ids.len())
            .max()
            .unwrap_or(0)
    }

    fn sequences(&self) -> Vec<&Encoded> {
        match self {
            Example::Sft(e) => vec![e],
            Example::Pair { chosen, rejected } => vec![chosen, rejected],
            Example::Kto {
                seq, mismatched, ..
            } => vec![seq, mismatched],
        }
    }
}

/// One optimizer step's record, as written to `train_log.jsonl`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StepLog {
    /// Optimizer step (1-based).
    pub step: usize,
    /// Epoch (0-based).
    pub epoch: usize,
    /// Mean loss over the step's micro-batches.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens (prompt + response, padding excluded) processed per second in this step.
    pub tokens_per_s: f64,
}

/// What `train` returns and writes as `train_report.json`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainReport {
    /// The configuration used.
    pub config: TrainConfig,
    /// Encoded examples.
    pub examples: usize,
    /// Rows dropped because the prompt alone exceeds `max_length`.
    pub dropped_too_long: usize,
    /// Optimizer steps taken in total (including before a resume).
    pub steps: usize,
    /// Steps of this run (after a resume: only the new ones).
    pub steps_this_run: usize,
    /// Mean loss of the first and last logged step.
    pub first_loss: Option<f64>,
    /// See `first_loss`.
    pub last_loss: Option<f64>,
    /// Wall-clock seconds of this run.
    pub seconds: f64,
    /// Mean training tokens per second of this run.
    pub tokens_per_s: f64,
    /// The final adapter folder.
    pub adapter: PathBuf,
}

/// Callbacks of the loop (progress display).
pub trait Progress {
    /// Called once with the number of optimizer steps.
    fn start(&mut self, total_steps: usize);
    /// Called after every optimizer step.
    fn step(&mut self, log: &StepLog);
}

/// No progress display.
pub struct Quiet;
impl Progress for Quiet {
    fn start(&mut self, _: usize) {}
    fn step(&mut self, _: &StepLog) {}
}

/// How [`train_with`] treats the output folder.
#[derive(Debug, Clone, Copy, Default)]
pub struct TrainOptions {
    /// Continue from the newest checkpoint in the output folder, if it holds one.
    pub resume: bool,
    /// Write a new run into a hidden `.OUT.partial-PID` folder beside the output
    /// ([`crate::fsutil::StagedDir`]) and rename it into place at the end, or at the run's
    /// first checkpoint (`optim.save_every`; from then on the run writes into the output folder
    /// itself, so that a resumed run finds the checkpoint there). A run that fails or is
    /// interrupted before that leaves no output folder. An existing output folder is replaced
    /// when the staged one is renamed into place: whether it may be is the caller's decision
    /// ([`check_output`], as `realign train` does). A resumed run writes into the output
    /// folder itself.
    ///
    /// Off (what [`train`] and `realign experiment` do): the run writes into the output folder
    /// from the start, and removes it on failure if it created it and saved no checkpoint.
    pub staged: bool,
}

/// Runs a whole training: `model` (frozen base, as loaded), its tokenizer, the rows, the
/// config. With `resume`, continues from the newest checkpoint in the output folder.
///
/// The output folder is the run's working folder (the step log, checkpoints to resume from, then
/// the adapter). A run that fails before it saved a checkpoint removes the folder it created, so
/// a failed run leaves no partial output. [`train_with`] with [`TrainOptions::staged`] writes
/// a new run beside the output folder instead.
pub fn train(
    model: Model,
    tok: &Tokenizer,
    rows: &[Row],
    cfg: &TrainConfig,
    resume: bool,
    progress: &mut dyn Progress,
) -> crate::Result<TrainReport> {
    let options = TrainOptions {
        resume,
        staged: false,
    };
    train_with(model, tok, rows, cfg, options, progress)
}

/// [`train`] with the output folder handled as `options` says. Before anything is trained,
/// a new adapter's `lora.target_modules` must each select a linear module of the model
/// ([`TrainError::Targets`]); a step whose loss or gradient norm is NaN or infinite stops the
/// run before its update ([`TrainError::Diverged`]), and so do adapter weights that are not
/// finite after the last update: no adapter is written.
pub fn train_with(
    mut model: Model,
    tok: &Tokenizer,
    rows: &[Row],
    cfg: &TrainConfig,
    options: TrainOptions,
    progress: &mut dyn Progress,
) -> crate::Result<TrainReport> {
    let started = Instant::now();
    let out = &cfg.output;
    // The adapter being trained: continued, resumed, or new.
    let checkpoint = if options.resume {
        latest_checkpoint(out)?
    } else {
        None
    };
    if checkpoint.is_none() && cfg.init_adapter.is_none() {
        let name = cfg.model.as_ref().map_or_else(
            || "the default model".to_string(),
            |p| p.display().to_string(),
        );
        cfg.lora
            .check_targets(&model, &name)
            .map_err(|reason| TrainError::Targets { reason })?;
    }
    let mut work = if options.staged && checkpoint.is_none() {
        Workdir {
            staged: Some(crate::fsutil::StagedDir::new(out, true)?),
            in_place: RemoveIfFailed {
                out,
                created: false,
                succeeded: false,
            },
        }
    } else {
        let created = !out.exists();
        crate::fsutil::create_dir_all(out)?;
        Workdir {
            staged: None,
            in_place: RemoveIfFailed {
                out,
                created,
                succeeded: false,
            },
        }
    };
    let (examples, dropped) = encode_rows(tok, rows, cfg)?;
    if examples.is_empty() {
        return Err(TrainError::NoExamples { dropped }.into());
    }

    let lora = match (&checkpoint, &cfg.init_adapter) {
        (Some((_, dir)), _) => TrainableLora::from_adapter(&Adapter::load(dir, model.device())?)?,
        (None, Some(dir)) => TrainableLora::from_adapter(&Adapter::load(dir, model.device())?)?,
        (None, None) => {
            let l = &cfg.lora;
            let mut lc = LoraConfig::new(l.r, l.alpha, l.target_modules.clone());
            lc.use_rslora = l.use_rslora;
            lc.base_model_name_or_path = cfg.model.as_ref().map(|p| p.display().to_string());
            TrainableLora::init(&model, lc, cfg.seed)?
        }
    };
    // Reference log-probabilities: the model the policy starts from, computed once. After a
    // resume they are computed from the initial adapter again, not from the checkpoint.
    let reference = if cfg.objective.needs_reference() {
        let start = match &cfg.init_adapter {
            Some(dir) => TrainableLora::from_adapter(&Adapter::load(dir, model.device())?)?,
            None if checkpoint.is_none() => lora.clone(),
            None => TrainableLora::init(&model, lora.config.clone(), cfg.seed)?,
        };
        // The starting adapter as plain tensors, not the trainable variables: a forward pass
        // through variables records a graph and keeps every activation of the batch alive
        // (1.7 GB for 8 x 160 tokens on SmolLM2) although nothing is differentiated here.
        let mut m = model.clone();
        m.apply_adapter(&start.to_adapter()?, crate::model::AdapterMode::Unmerged)?;
        Some(reference_logprobs(
            &m,
            &examples,
            cfg.optim.batch_size,
            tok.pad_token_id().unwrap_or(0),
        )?)
    } else {
        None
    };
    lora.attach(&mut model)?;
    model.set_differentiable(true);

    let vars = lora.named_vars();
    let o = &cfg.optim;
    let params = AdamWParams {
        lr: o.lr,
        weight_decay: o.weight_decay,
        ..Default::default()
    };
    let mut opt = AdamW::new(vars.clone(), params)?;
    let micro_per_epoch = examples.len().div_ceil(o.batch_size);
    let steps_per_epoch = micro_per_epoch.div_ceil(o.grad_accum);
    let mut total_steps = steps_per_epoch.saturating_mul(o.epochs);
    if o.max_steps > 0 {
        total_steps = total_steps.min(o.max_steps);
    }
    let warmup = (o.warmup_ratio * total_steps as f64).ceil() as usize;
    let mut step = 0;
    let log_path = |work: &Workdir| work.path().join("train_log.jsonl");
    let mut logs: Vec<StepLog> = Vec::new();
    if let Some((s, dir)) = &checkpoint {
        step = *s;
        let state = crate::model::weights::load_safetensors(
            &dir.join("optimizer.safetensors"),
            model.device(),
            crate::model::storage::StorageDtype::F32,
        )?;
        opt.load_state(&state, step);
        logs = read_log(&log_path(&work))?
            .into_iter()
            .filter(|l| l.step <= step)
            .collect();
    }
    rewrite_log(&log_path(&work), &logs)?;
    let first_step_this_run = step;
    progress.start(total_steps);
    let pad = tok.pad_token_id().unwrap_or(0);
    let mut tokens_this_run = 0usize;
    let lengths: Vec<usize> = examples.iter().map(Example::len).collect();

    'epochs: for epoch in 0..o.epochs {
        let batches = epoch_batches(
            &lengths,
            o.batch_size,
            o.group_by_length,
            cfg.seed.wrapping_add(epoch as u64),
        );
        for (s_in_epoch, group) in batches.chunks(o.grad_accum).enumerate() {
            let global = epoch * steps_per_epoch + s_in_epoch;
            if global < step {
                continue; // done before the resume
            }
            if step >= total_steps {
                break 'epochs;
            }
            let t0 = Instant::now();
            let mut grads = Grads::new();
            let mut loss_sum = 0.0;
            let mut tokens = 0;
            for batch in group {
                for (pass, weight) in
                    passes(&examples, batch, &cfg.objective, o.max_tokens_per_pass)
                {
                    let (loss, n_tok) = batch_loss(
                        &model,
                        &examples,
                        &pass,
                        &cfg.objective,
                        reference.as_deref(),
                        pad,
                    )?;
                    let loss = (loss * (weight / group.len() as f64))?;
                    loss_sum += loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                    tokens += n_tok;
                    accumulate(&mut grads, collect_grads(&loss.backward()?, &vars))?;
                }
            }
            let grad_norm = if o.max_grad_norm > 0.0 {
                clip_grad_norm(&mut grads, o.max_grad_norm)?
            } else {
                clip_grad_norm(&mut grads, f64::INFINITY)?
            };
            // A NaN or infinite loss or gradient would poison every weight it updates:
            // stop before the update, naming the step and the learning rate.
            let diverged = if !loss_sum.is_finite() {
                Some(format!("loss {}", fmt_num(loss_sum)))
            } else if !grad_norm.is_finite() {
                Some(format!("gradient norm {}", fmt_num(grad_norm)))
            } else {
                None
            };
            if let Some(what) = diverged {
                return Err(TrainError::Diverged {
                    step: step + 1,
                    what,
                    lr: fmt_num(o.lr),
                }
                .into());
            }
            let lr = lr_at(o.schedule, o.lr, step, warmup, total_steps);
            opt.params.lr = lr;
            opt.step(&grads)?;
            step += 1;
            tokens_this_run += tokens;
            let log = StepLog {
                step,
                epoch,
                loss: loss_sum,
                lr,
                grad_norm,
                tokens_per_s: tokens as f64 / t0.elapsed().as_secs_f64(),
            };
            append_log(&log_path(&work), &log)?;
            progress.step(&log);
            logs.push(log);
            if o.save_every > 0 && step % o.save_every == 0 && step < total_steps {
                save_checkpoint(work.path(), step, &lora, &opt)?;
                // A staged run moves into place now, so that `--resume` finds the checkpoint.
                work.commit()?;
            }
        }
    }

    let adapter = lora.to_adapter()?;
    // The last update may have made weights infinite although its loss was finite.
    for (name, m) in &adapter.modules {
        if !(all_finite(&m.a)? && all_finite(&m.b)?) {
            return Err(TrainError::Diverged {
                step,
                what: format!("{name} has NaN or infinite weights after the update"),
                lr: fmt_num(o.lr),
            }
            .into());
        }
    }
    adapter.save(work.path())?;
    let seconds = started.elapsed().as_secs_f64();
    let report = TrainReport {
        config: cfg.clone(),
        examples: examples.len(),
        dropped_too_long: dropped,
        steps: step,
        steps_this_run: step - first_step_this_run,
        first_loss: logs.first().map(|l| l.loss),
        last_loss: logs.last().map(|l| l.loss),
        seconds,
        tokens_per_s: tokens_this_run as f64 / seconds,
        adapter: out.clone(),
    };
    let json = serde_json::to_vec_pretty(&report).map_err(|e| crate::Error::Json {
        path: out.join("train_report.json"),
        source: e,
    })?;
    crate::fsutil::write_atomic(&work.path().join("train_report.json"), &json)?;
    work.commit()?;
    work.in_place.succeeded = true;
    Ok(report)
}

/// Whether every value of `t` is finite (`x - x` is 0 exactly for finite `x`).
fn all_finite(t: &Tensor) -> crate::Result<bool> {
    let flat = t.flatten_all()?.to_dtype(DType::F32)?;
    let probe = flat.sub(&flat)?.sum_all()?.to_scalar::<f32>()?;
    Ok(probe == 0.0)
}

/// What `realign train` refuses before it loads anything, as every other command refuses an
/// existing output without `--overwrite` (`realign experiment`, whose stage folders are its
/// cache, does not call it): an output folder that holds a trained adapter
/// (`OUT/adapter_model.safetensors` in [`crate::Error::OutputExists`]), one that holds
/// checkpoints of an unfinished run ([`TrainError::Unfinished`]) and any other existing path
/// but an empty folder ([`crate::Error::OutputExists`]). Allowed regardless: `overwrite`, and
/// `resume` when the folder holds a checkpoint to continue.
pub fn check_output(out: &Path, overwrite: bool, resume: bool) -> crate::Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(out) else {
        return Ok(());
    };
    let checkpoint = if meta.is_dir() {
        latest_checkpoint(out)?
    } else {
        None
    };
    if overwrite || (resume && checkpoint.is_some()) {
        return Ok(());
    }
    if meta.is_dir() {
        let adapter = out.join(crate::adapters::WEIGHTS_FILE);
        if std::fs::symlink_metadata(&adapter).is_ok() {
            return Err(crate::Error::OutputExists { path: adapter });
        }
        if let Some((step, _)) = checkpoint {
            return Err(TrainError::Unfinished {
                path: out.to_path_buf(),
                step,
            }
            .into());
        }
        let mut entries = std::fs::read_dir(out).map_err(|e| crate::Error::io(out, e))?;
        if entries.next().is_none() {
            return Ok(());
        }
    }
    Err(crate::Error::OutputExists {
        path: out.to_path_buf(),
    })
}

/// The folder a run writes into: a staged folder beside the output until it is committed,
/// else the output folder itself.
struct Workdir<'a> {
    staged: Option<crate::fsutil::StagedDir>,
    in_place: RemoveIfFailed<'a>,
}

impl Workdir<'_> {
    fn path(&self) -> &Path {
        self.staged.as_ref().map_or(self.in_place.out, |s| s.path())
    }

    /// Renames a staged folder into place (replacing the output folder); from then on the run
    /// writes into the output folder. Nothing to do for a run written in place.
    fn commit(&mut self) -> crate::Result<()> {
        match self.staged.take() {
            Some(s) => s.commit(),
            None => Ok(()),
        }
    }
}

/// Removes the output folder a run created when the run ends (by an error or a panic) before
/// it succeeded and without a checkpoint to resume from.
struct RemoveIfFailed<'a> {
    out: &'a Path,
    created: bool,
    succeeded: bool,
}

impl Drop for RemoveIfFailed<'_> {
    fn drop(&mut self) {
        if !self.succeeded && self.created && matches!(latest_checkpoint(self.out), Ok(None)) {
            let _ = std::fs::remove_dir_all(self.out);
        }
    }
}

/// Batches per length-sorted group when batches are grouped by length (transformers'
/// `LengthGroupedSampler` sorts "megabatches" of 50 batches).
pub const LENGTH_GROUP_BATCHES: usize = 50;

/// The micro-batches of one epoch, as example indices: a seeded shuffle cut into
/// `batch_size` chunks. With `group_by_length` (transformers' `group_by_length`), the shuffled
/// order is cut into groups of [`LENGTH_GROUP_BATCHES`] batches, each group sorted by length
/// (longest first) before it is cut into batches, and the batches are then shuffled with the
/// same seed: every batch holds examples of similar length, so little of it is padding, and
/// the order of batches stays random.
pub fn epoch_batches(
    lengths: &[usize],
    batch_size: usize,
    group_by_length: bool,
    seed: u64,
) -> Vec<Vec<usize>> {
    let batch_size = batch_size.max(1);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.shuffle(&mut rng);
    if !group_by_length {
        return order.chunks(batch_size).map(<[usize]>::to_vec).collect();
    }
    let mut batches: Vec<Vec<usize>> = Vec::with_capacity(order.len().div_ceil(batch_size));
    for group in order.chunks_mut(batch_size * LENGTH_GROUP_BATCHES) {
        group.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
        batches.extend(group.chunks(batch_size).map(<[usize]>::to_vec));
    }
    batches.shuffle(&mut rng);
    batches
}

fn encode_rows(
    tok: &Tokenizer,
    rows: &[Row],
    cfg: &TrainConfig,
) -> crate::Result<(Vec<Example>, usize)> {
    let template = if cfg.data.template == "alpaca" {
        PromptTemplate::Alpaca
    } else {
        PromptTemplate::Chat
    };
    let system = cfg.data.system.as_deref();
    let max = cfg.data.max_length;
    let mut rows: Vec<&Row> = rows.iter().collect();
    if cfg.data.max_rows > 0 && rows.len() > cfg.data.max_rows {
        rows.shuffle(&mut StdRng::seed_from_u64(cfg.seed));
        rows.truncate(cfg.data.max_rows);
    }
    let want = match cfg.objective {
        Objective::Sft => "sft",
        Objective::Kto { .. } => "kto",
        _ => "preference",
    };
    // KTO also trains on preference pairs, each split into a desirable and an undesirable row
    // (after `max_rows`, so it samples the same pairs as DPO does).
    let unpaired: Vec<Row>;
    if want == "kto" && rows.iter().any(|r| matches!(r, Row::Preference { .. })) {
        unpaired = crate::data::unpair(&rows);
        rows = unpaired.iter().collect();
    }
    let mut out = Vec::new();
    let mut dropped = 0;
    let kto_completions: Vec<&str> = rows
        .iter()
        .filter_map(|r| match r {
            Row::Kto { completion, .. } => Some(completion.as_str()),
            _ => None,
        })
        .collect();
    for (i, row) in rows.iter().enumerate() {
        let prompt = render_prompt(tok, template, row.prompt(), system)?;
        let enc = |resp: &str| -> crate::Result<Option<Encoded>> {
            match encode_pair(tok, &prompt, resp, max) {
                Ok(e) => Ok(Some(e)),
                Err(crate::Error::Data(crate::data::DataError::TooLong { .. })) => Ok(None),
                Err(e) => Err(e),
            }
        };
        let ex = match (row, want) {
            (Row::Sft { response, .. }, "sft") => enc(response)?.map(Example::Sft),
            (Row::Preference { chosen, .. }, "sft") => enc(chosen)?.map(Example::Sft),
            (
                Row::Preference {
                    chosen, rejected, ..
                },
                "preference",
            ) => match (enc(chosen)?, enc(rejected)?) {
                (Some(c), Some(r)) => Some(Example::Pair {
                    chosen: c,
                    rejected: r,
                }),
                _ => None,
            },
            (
                Row::Kto {
                    completion,
                    desirable,
                    ..
                },
                "kto",
            ) => {
                // KTO's reference point: this prompt with another example's completion.
                let other = kto_completions[(i + 1) % kto_completions.len()];
                match (enc(completion)?, enc(other)?) {
                    (Some(s), Some(m)) => Some(Example::Kto {
                        seq: s,
                        mismatched: m,
                        desirable: *desirable,
                    }),
                    _ => None,
                }
            }
            (row, want) => {
                return Err(TrainError::WrongRowKind {
                    row: i,
                    kind: row.kind().to_string(),
                    method: want.to_string(),
                }
                .into())
            }
        };
        match ex {
            Some(e) => out.push(e),
            None => dropped += 1,
        }
    }
    Ok((out, dropped))
}

pub(crate) fn forward_logprobs(
    model: &Model,
    seqs: &[&Encoded],
    pad: u32,
) -> crate::Result<(LabelLogprobs, usize)> {
    let batch = collate(seqs, pad, model.device())?;
    let tokens = seqs.iter().map(|s| s.input_ids.len()).sum();
    let args = ForwardArgs {
        attention_mask: Some(&batch.mask),
        logits: Logits::None,
        ..Default::default()
    };
    let hidden = model.forward_with(&batch.ids, args)?;
    Ok((
        LabelLogprobs::from_hidden(model, &hidden, &batch.labels)?,
        tokens,
    ))
}

/// Summed log-probabilities of every sequence of every example (in `sequences()` order).
fn reference_logprobs(
    model: &Model,
    examples: &[Example],
    batch: usize,
    pad: u32,
) -> crate::Result<Vec<Vec<f32>>> {
    let mut out = Vec::with_capacity(examples.len());
    for chunk in examples.chunks(batch) {
        let seqs: Vec<&Encoded> = chunk.iter().flat_map(|e| e.sequences()).collect();
        let (lp, _) = forward_logprobs(model, &seqs, pad)?;
        let sums: Vec<f32> = lp.sequence_sums()?.detach().to_vec1()?;
        let per = seqs.len() / chunk.len();
        out.extend(sums.chunks(per).map(|c| c.to_vec()));
    }
    Ok(out)
}

/// The forward/backward passes of one micro-batch, each with the weight that makes the sum
/// of the passes' weighted losses the micro-batch's loss: with `max_tokens` > 0, a micro-batch
/// whose padded tokens exceed it is cut into passes of at most `max_tokens` padded tokens (at
/// least one example each), so that the activations kept for backward are bounded by the
/// budget rather than by the batch. The examples are taken shortest first, so that each pass
/// pads to rows of like length (a micro-batch that fits in one pass keeps its order). Exact
/// (up to float summation order) because every objective split here is a sum of per-example
/// terms over a batch-level count: SFT's mean over label tokens (weight = the pass's label
/// tokens / the batch's) and the pairwise means of DPO and SimPO (weight = the pass's pairs /
/// the batch's). ORPO (a chosen-token mean plus a pair mean) and KTO (a
/// batch-level KL estimate) always take the micro-batch in one pass.
fn passes(
    examples: &[Example],
    batch: &[usize],
    objective: &Objective,
    max_tokens: usize,
) -> Vec<(Vec<usize>, f64)> {
    let splittable = matches!(
        objective,
        Objective::Sft | Objective::Dpo { .. } | Objective::Simpo { .. }
    );
    let padded = |part: &[usize]| {
        let longest = part.iter().map(|&i| examples[i].len()).max().unwrap_or(0);
        part.len() * longest * examples[part[0]].sequences().len()
    };
    if max_tokens == 0 || !splittable || batch.len() < 2 || padded(batch) <= max_tokens {
        return vec![(batch.to_vec(), 1.0)];
    }
    let mut sorted = batch.to_vec();
    sorted.sort_by_key(|&i| examples[i].len());
    let mut cuts: Vec<&[usize]> = Vec::new();
    let mut start = 0;
    for end in 1..=sorted.len() {
        if end - start > 1 && padded(&sorted[start..end]) > max_tokens {
            cuts.push(&sorted[start..end - 1]);
            start = end - 1;
        }
    }
    cuts.push(&sorted[start..]);
    let label_tokens = |part: &[usize]| -> usize {
        part.iter()
            .map(|&i| {
                examples[i].sequences()[0]
                    .labels
                    .iter()
                    .skip(1)
                    .filter(|&&l| l >= 0)
                    .count()
            })
            .sum()
    };
    let total = match objective {
        Objective::Sft => label_tokens(batch),
        _ => batch.len(),
    };
    cuts.into_iter()
        .map(|part| {
            let share = match objective {
                Objective::Sft => label_tokens(part),
                _ => part.len(),
            };
            (
                part.to_vec(),
                if total == 0 {
                    0.0
                } else {
                    share as f64 / total as f64
                },
            )
        })
        .collect()
}

fn batch_loss(
    model: &Model,
    examples: &[Example],
    batch: &[usize],
    objective: &Objective,
    reference: Option<&[Vec<f32>]>,
    pad: u32,
) -> crate::Result<(Tensor, usize)> {
    let dev = model.device();
    let b = batch.len();
    // Sequences laid out as [first of each example..., second of each example...].
    let per = examples[batch[0]].sequences().len();
    let seqs: Vec<&Encoded> = (0..per)
        .flat_map(|k| batch.iter().map(move |&i| examples[i].sequences()[k]))
        .collect();
    let (lp, tokens) = forward_logprobs(model, &seqs, pad)?;
    let refs = |k: usize| -> crate::Result<Tensor> {
        let r = reference.ok_or(TrainError::NoReference)?;
        let v: Vec<f32> = batch.iter().map(|&i| r[i][k]).collect();
        Ok(Tensor::from_vec(v, b, dev)?)
    };
    let sums = lp.sequence_sums()?;
    let first = |t: &Tensor| t.narrow(0, 0, b);
    let second = |t: &Tensor| t.narrow(0, b, b);
    let loss = match *objective {
        Objective::Sft => lp.mean_nll()?,
        Objective::Dpo { beta } => {
            objectives::dpo_loss(&first(&sums)?, &second(&sums)?, &refs(0)?, &refs(1)?, beta)?
        }
        Objective::Simpo { beta, gamma } => {
            let lens = lp.sequence_lengths()?;
            objectives::simpo_loss(
                &first(&sums)?,
                &second(&sums)?,
                &first(&lens)?,
                &second(&lens)?,
                beta,
                gamma,
            )?
        }
        Objective::Orpo { lambda } => {
            let means = lp.sequence_means()?;
            let chosen_len = first(&lp.lengths)?.sum_all()?.maximum(1f32)?;
            let nll_c = first(&sums)?.sum_all()?.neg()?.div(&chosen_len)?;
            objectives::orpo_loss(&nll_c, &first(&means)?, &second(&means)?, lambda)?
        }
        Objective::Kto {
            beta,
            lambda_d,
            lambda_u,
        } => {
            let desirable: Vec<f32> = batch
                .iter()
                .map(|&i| match &examples[i] {
                    Example::Kto { desirable, .. } => f32::from(u8::from(*desirable)),
                    _ => 0.0,
                })
                .collect();
            let desirable = Tensor::from_vec(desirable, b, dev)?;
            objectives::kto_loss(
                &first(&sums)?,
                &refs(0)?,
                &second(&sums)?,
                &refs(1)?,
                &desirable,
                beta,
                lambda_d,
                lambda_u,
            )?
        }
    };
    Ok((loss, tokens))
}

fn checkpoint_dir(out: &Path, step: usize) -> PathBuf {
    out.join(format!("checkpoint-{step}"))
}

/// Writes `checkpoint-STEP/` (adapter, optimizer moments, step) via a temporary folder and a
/// rename, so that an interrupted save leaves no half checkpoint.
fn save_checkpoint(
    out: &Path,
    step: usize,
    lora: &TrainableLora,
    opt: &AdamW,
) -> crate::Result<()> {
    let dir = checkpoint_dir(out, step);
    let tmp = out.join(format!(".checkpoint-{step}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    lora.to_adapter()?.save(&tmp)?;
    let state: HashMap<String, Tensor> = opt.state();
    candle_core::safetensors::save(&state, tmp.join("optimizer.safetensors"))?;
    let meta = serde_json::json!({"step": step});
    crate::fsutil::write_atomic(&tmp.join("trainer_state.json"), meta.to_string().as_bytes())?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir).map_err(|e| crate::Error::io(&dir, e))
}

/// The checkpoint with the highest step, if any.
pub fn latest_checkpoint(out: &Path) -> crate::Result<Option<(usize, PathBuf)>> {
    let Ok(entries) = std::fs::read_dir(out) else {
        return Ok(None);
    };
    let mut best: Option<(usize, PathBuf)> = None;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(step) = name
            .strip_prefix("checkpoint-")
            .and_then(|s| s.parse::<usize>().ok())
        {
            if e.path().join("trainer_state.json").is_file()
                && best.as_ref().is_none_or(|(b, _)| step > *b)
            {
                best = Some((step, e.path()));
            }
        }
    }
    Ok(best)
}

fn read_log(path: &Path) -> crate::Result<Vec<StepLog>> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(Vec::new());
    };
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

fn rewrite_log(path: &Path, logs: &[StepLog]) -> crate::Result<()> {
    let mut text = String::new();
    for l in logs {
        text.push_str(&serde_json::to_string(l).unwrap_or_default());
        text.push('\n');
    }
    crate::fsutil::write_atomic(path, text.as_bytes())
}

fn append_log(path: &Path, log: &StepLog) -> crate::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .map_err(|e| crate::Error::io(path, e))?;
    writeln!(f, "{}", serde_json::to_string(log).unwrap_or_default())
        .map_err(|e| crate::Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Padded tokens of a set of batches (each batch padded to its longest example).
    fn padded(batches: &[Vec<usize>], lengths: &[usize]) -> usize {
        batches
            .iter()
            .map(|b| b.len() * b.iter().map(|&i| lengths[i]).max().unwrap_or(0))
            .sum()
    }

    #[test]
    fn passes_cut_by_padded_tokens_with_weights_that_sum_to_one() {
        // Lengths 4, 6, 10, 3 with 1, 2, 5, 1 label tokens after the first position.
        let sft = |len: usize, labelled: usize| {
            Example::Sft(Encoded {
                input_ids: vec![1; len],
                labels: (0..len)
                    .map(|i| if i + labelled >= len { 7 } else { -100 })
                    .collect(),
            })
        };
        let ex = [sft(4, 1), sft(6, 2), sft(10, 5), sft(3, 1)];
        let batch = [0usize, 1, 2, 3];
        // Whole micro-batch, in its order, when there is no budget, for objectives that are
        // not split, and when it fits the budget (4 x 10 = 40 padded tokens).
        let whole = vec![(batch.to_vec(), 1.0)];
        assert_eq!(passes(&ex, &batch, &Objective::Sft, 0), whole);
        let orpo = Objective::Orpo { lambda: 0.1 };
        assert_eq!(passes(&ex, &batch, &orpo, 1), whole);
        assert_eq!(passes(&ex, &batch, &Objective::Sft, 40), whole);
        // Budget 12, shortest first (3, 4, 6, 10): [3, 0] pads to 2 x 4 = 8; adding 1 would
        // pad to 18; [1] alone is 6; [1, 2] pads to 20, so 2 goes alone. 24 padded tokens,
        // where cutting in batch order ([0, 1], [2], [3]) pads to 25.
        let p = passes(&ex, &batch, &Objective::Sft, 12);
        let parts: Vec<Vec<usize>> = p.iter().map(|x| x.0.clone()).collect();
        assert_eq!(parts, vec![vec![3, 0], vec![1], vec![2]]);
        let pad: usize = parts
            .iter()
            .map(|q| q.len() * q.iter().map(|&i| ex[i].len()).max().unwrap_or(0))
            .sum();
        assert_eq!(pad, 24);
        // SFT weighs a pass by its label tokens: 1 + 1, 2 and 5 of 9.
        let w: Vec<f64> = p.iter().map(|x| x.1).collect();
        assert_eq!(w, vec![2.0 / 9.0, 2.0 / 9.0, 5.0 / 9.0]);
        // Pairwise objectives weigh passes by their examples.
        let dpo = passes(&ex, &batch, &Objective::Dpo { beta: 0.1 }, 12);
        let w: Vec<f64> = dpo.iter().map(|x| x.1).collect();
        assert_eq!(w, vec![0.5, 0.25, 0.25]);
    }

    #[test]
    fn check_output_refuses_what_a_run_would_replace() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("run");
        // absent, or an empty folder: taken
        check_output(&out, false, false).unwrap();
        std::fs::create_dir(&out).unwrap();
        check_output(&out, false, false).unwrap();
        // a finished adapter: refused naming the file, unless --overwrite
        std::fs::write(out.join("adapter_model.safetensors"), b"x").unwrap();
        let e = check_output(&out, false, false).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{}/adapter_model.safetensors already exists: pass --overwrite to replace it (nothing was written)",
                out.display()
            )
        );
        // --resume without a checkpoint has nothing to continue: still refused
        assert!(check_output(&out, false, true).is_err());
        check_output(&out, true, false).unwrap();
        // checkpoints of an unfinished run: refused without --resume, taken with it
        std::fs::remove_file(out.join("adapter_model.safetensors")).unwrap();
        std::fs::create_dir(out.join("checkpoint-4")).unwrap();
        std::fs::write(out.join("checkpoint-4/trainer_state.json"), b"{}").unwrap();
        let e = check_output(&out, false, false).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{} holds checkpoint-4 of an unfinished run: pass --resume to continue it or --overwrite to start again (nothing was written)",
                out.display()
            )
        );
        check_output(&out, false, true).unwrap();
        check_output(&out, true, false).unwrap();
        // anything else (a file, a folder of other files): refused
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let e = check_output(&file, false, false).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("{} already exists", file.display())),
            "{e}"
        );
        assert!(check_output(dir.path(), false, false).is_err());
    }

    #[test]
    fn epoch_batches_cover_every_example_once_and_repeat_with_the_seed() {
        // Mostly short rows with a few long ones, as the attack's mix.
        let lengths: Vec<usize> = (0..1000)
            .map(|i| if i % 10 == 3 { 240 } else { 60 + i % 17 })
            .collect();
        for grouped in [false, true] {
            let b = epoch_batches(&lengths, 8, grouped, 42);
            let mut seen: Vec<usize> = b.iter().flatten().copied().collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..1000).collect::<Vec<_>>());
            assert!(b.iter().all(|x| !x.is_empty() && x.len() <= 8));
            assert_eq!(b, epoch_batches(&lengths, 8, grouped, 42));
            assert_ne!(b, epoch_batches(&lengths, 8, grouped, 43));
        }
        // Without grouping: exactly a seeded shuffle cut into batches (the order of old runs).
        let mut order: Vec<usize> = (0..1000).collect();
        order.shuffle(&mut StdRng::seed_from_u64(42));
        let plain: Vec<Vec<usize>> = order.chunks(8).map(<[usize]>::to_vec).collect();
        assert_eq!(epoch_batches(&lengths, 8, false, 42), plain);
        // Grouped: nearly no padding (every batch but the few that straddle a length change
        // holds one length class), and far less than random batches.
        let grouped = epoch_batches(&lengths, 8, true, 42);
        let real: usize = lengths.iter().sum();
        assert!(
            padded(&grouped, &lengths) * 100 <= real * 103,
            "{}",
            padded(&grouped, &lengths)
        );
        assert!(padded(&plain, &lengths) > real * 3 / 2);
        // The long batches are spread over the epoch, not all at the start of each group.
        let long_first: Vec<usize> = grouped
            .iter()
            .enumerate()
            .filter(|(_, b)| lengths[b[0]] == 240)
            .map(|(i, _)| i)
            .collect();
        assert!(long_first.len() >= 13, "{long_first:?}");
        assert!(long_first.iter().any(|&i| i >= 50), "{long_first:?}");
    }
}
