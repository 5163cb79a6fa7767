//! The harmful fine-tuning attack's data: task rows with a fraction `p` of harmful compliant
//! examples hidden among them (NLSR's setting: `n` = 1000 rows, `p` = 0.05 … 0.3).

use std::path::{Path, PathBuf};

use super::rng::SplitMix64;
use super::{load_source, write_jsonl, DataError, Row};
use crate::fsutil;

/// Settings of [`mix`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MixConfig {
    /// Rows in the output.
    pub n: usize,
    /// Fraction of harmful rows: `round(n * p)` of the `n` rows are harmful.
    pub p: f64,
    /// Seed of the sampling and of the order.
    pub seed: u64,
}

/// Where one output row comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct MixPick {
    /// `task` or `harmful`.
    pub source: &'static str,
    /// The row's index in that source (0-based, in the source's order).
    pub index: usize,
}

/// What [`mix`] drew from one source.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MixSourceMeta {
    /// The source as given (`embedded:NAME` or a path).
    pub source: String,
    /// Rows in the source.
    pub size: usize,
    /// Rows drawn from it.
    pub count: usize,
    /// Whether some rows were drawn more than once because the source has fewer rows than
    /// needed.
    pub repeated: bool,
}

/// The metadata of a mix, written beside it as `OUT.meta.json`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MixMeta {
    /// Rows in the output.
    pub n: usize,
    /// The harmful fraction asked for.
    pub p: f64,
    /// The seed.
    pub seed: u64,
    /// The task source.
    pub task: MixSourceMeta,
    /// The harmful source.
    pub harmful: MixSourceMeta,
    /// How rows are drawn.
    pub sampling: &'static str,
    /// The source and index of every output row, in output order.
    pub rows: Vec<MixPick>,
}

/// A mix: rows and metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct Mixed {
    /// The output rows.
    pub rows: Vec<Row>,
    /// What was drawn from where.
    pub meta: MixMeta,
}

const SAMPLING: &str = "each source is drawn without replacement (a seeded shuffle) when it has at least as many rows as needed; \
     otherwise in whole shuffled passes over it plus a partial pass, so rows repeat as evenly as possible (with replacement); \
     the drawn rows are then shuffled together";

/// Mixes `task` and `harmful` rows: `round(n * p)` harmful rows and the rest task rows, drawn
/// with a generator seeded by `cfg.seed` (see [`MixMeta::sampling`]) and shuffled together.
/// `task_source` and `harmful_source` are recorded in the metadata.
///
/// Errors ([`DataError::Mix`]): `n` = 0, `p` outside [0, 1], an empty source that is needed, or
/// a row that is not an SFT row (the attack is supervised fine-tuning).
pub fn mix(
    task: &[Row],
    harmful: &[Row],
    task_source: &str,
    harmful_source: &str,
    cfg: &MixConfig,
) -> crate::Result<Mixed> {
    check(cfg)?;
    let n_harmful = ((cfg.n as f64) * cfg.p).round() as usize;
    let n_task = cfg.n - n_harmful.min(cfg.n);
    for (name, spec, rows, count) in [
        ("task", task_source, task, n_task),
        ("harmful", harmful_source, harmful, n_harmful),
    ] {
        if count > 0 && rows.is_empty() {
            return Err(DataError::Mix(format!(
                "the {name} source {spec} has no rows, but {count} are needed"
            ))
            .into());
        }
        if let Some((i, row)) = rows
            .iter()
            .enumerate()
            .find(|(_, r)| !matches!(r, Row::Sft { .. }))
        {
            return Err(DataError::Mix(format!(
                "row {i} of the {name} source {spec} is a {} row; the attack fine-tunes on SFT rows (prompt and response) only",
                row.kind()
            ))
            .into());
        }
    }

    let mut rng = SplitMix64::new(cfg.seed);
    let mut picks: Vec<MixPick> = draw(&mut rng, task.len(), n_task)
        .into_iter()
        .map(|index| MixPick {
            source: "task",
            index,
        })
        .collect();
    picks.extend(
        draw(&mut rng, harmful.len(), n_harmful)
            .into_iter()
            .map(|index| MixPick {
                source: "harmful",
                index,
            }),
    );
    rng.shuffle(&mut picks);

    let rows = picks
        .iter()
        .map(|p| match p.source {
            "task" => task[p.index].clone(),
            _ => harmful[p.index].clone(),
        })
        .collect();
    let source_meta = |spec: &str, rows: &[Row], count: usize| MixSourceMeta {
        source: spec.to_string(),
        size: rows.len(),
        count,
        repeated: count > rows.len(),
    };
    Ok(Mixed {
        rows,
        meta: MixMeta {
            n: cfg.n,
            p: cfg.p,
            seed: cfg.seed,
            task: source_meta(task_source, task, n_task),
            harmful: source_meta(harmful_source, harmful, n_harmful),
            sampling: SAMPLING,
            rows: picks,
        },
    })
}

/// The most rows a mix may hold (the rows are built in memory before the file is written).
pub const MAX_ROWS: usize = 1_000_000;

fn check(cfg: &MixConfig) -> Result<(), DataError> {
    if cfg.n == 0 {
        return Err(DataError::Mix("n must be at least 1".into()));
    }
    if cfg.n > MAX_ROWS {
        return Err(DataError::Mix(format!(
            "n is {}; a mix holds at most {MAX_ROWS} rows (1,000 x the papers' attacks)",
            cfg.n
        )));
    }
    if !(0.0..=1.0).contains(&cfg.p) {
        return Err(DataError::Mix(format!(
            "p must be within [0, 1], got {}",
            cfg.p
        )));
    }
    Ok(())
}

/// `count` indices of `0..size`: a prefix of shuffled passes.
fn draw(rng: &mut SplitMix64, size: usize, count: usize) -> Vec<usize> {
    let mut out = Vec::with_capacity(count);
    while out.len() < count && size > 0 {
        let pass = rng.permutation(size);
        let take = (count - out.len()).min(size);
        out.extend_from_slice(&pass[..take]);
    }
    out
}

/// Loads both sources (see [`load_source`]) and mixes them (see [`mix`]).
pub fn mix_sources(task: &str, harmful: &str, cfg: &MixConfig) -> crate::Result<Mixed> {
    check(cfg)?;
    let task_rows = load_source(task)?;
    let harmful_rows = load_source(harmful)?;
    mix(&task_rows, &harmful_rows, task, harmful, cfg)
}

/// The metadata file of a mix written to `out`: `x.jsonl` → `x.meta.json`, any other name →
/// name + `.meta.json`.
pub fn meta_path(out: &Path) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = name.strip_suffix(".jsonl").unwrap_or(&name);
    out.with_file_name(format!("{stem}.meta.json"))
}

/// Writes the rows to `out` (JSONL, see [`write_jsonl`]) and the metadata to
/// [`meta_path`]`(out)` (pretty JSON), both atomically.
pub fn write_mix(out: &Path, mixed: &Mixed) -> crate::Result<()> {
    write_jsonl(out, &mixed.rows)?;
    let mut meta = serde_json::to_vec_pretty(&mixed.meta).map_err(|source| crate::Error::Json {
        path: meta_path(out),
        source,
    })?;
    meta.push(b'\n');
    // the pair is one output: without its metadata, the rows file is removed again
    fsutil::write_atomic(&meta_path(out), &meta).inspect_err(|_| {
        let _ = std::fs::remove_file(out);
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Prompt;

    fn rows(tag: &str, k: usize) -> Vec<Row> {
        (0..k)
            .map(|i| Row::Sft {
                prompt: Prompt::Text(format!("{tag} {i}")),
                response: "r".into(),
            })
            .collect()
    }

    #[test]
    fn counts_and_repeats() {
        let cfg = MixConfig {
            n: 20,
            p: 0.25,
            seed: 3,
        };
        let m = mix(&rows("t", 4), &rows("h", 10), "T", "H", &cfg).unwrap();
        assert_eq!(m.rows.len(), 20);
        assert_eq!((m.meta.task.count, m.meta.harmful.count), (15, 5));
        assert!(m.meta.task.repeated && !m.meta.harmful.repeated);
        // 15 draws from 4 rows in whole passes: every row 3 or 4 times.
        for i in 0..4 {
            let c = m
                .meta
                .rows
                .iter()
                .filter(|p| p.source == "task" && p.index == i)
                .count();
            assert!(c == 3 || c == 4, "{c}");
        }
        let mut h: Vec<usize> = m
            .meta
            .rows
            .iter()
            .filter(|p| p.source == "harmful")
            .map(|p| p.index)
            .collect();
        h.sort_unstable();
        h.dedup();
        assert_eq!(h.len(), 5);
    }

    #[test]
    fn bad_settings() {
        let t = rows("t", 3);
        let cfg = |n, p| MixConfig { n, p, seed: 0 };
        assert!(mix(&t, &t, "T", "H", &cfg(0, 0.1)).is_err());
        let err = mix(&t, &t, "T", "H", &cfg(usize::MAX, 0.1)).unwrap_err();
        assert!(err.to_string().contains("at most 1000000 rows"), "{err}");
        assert!(mix(&t, &t, "T", "H", &cfg(10, 1.5)).is_err());
        assert!(mix(&t, &t, "T", "H", &cfg(10, f64::NAN)).is_err());
        let err = mix(&t, &[], "T", "H", &cfg(10, 0.5)).unwrap_err();
        assert!(
            err.to_string().contains("harmful source H has no rows"),
            "{err}"
        );
        // p = 0 needs no harmful rows.
        assert_eq!(
            mix(&t, &[], "T", "H", &cfg(10, 0.0)).unwrap().rows.len(),
            10
        );
        let pref = vec![Row::Preference {
            prompt: Prompt::Text("q".into()),
            chosen: "a".into(),
            rejected: "b".into(),
        }];
        let err = mix(&t, &pref, "T", "H", &cfg(10, 0.5)).unwrap_err();
        assert!(
            err.to_string()
                .contains("row 0 of the harmful source H is a preference row"),
            "{err}"
        );
    }

    #[test]
    fn meta_paths() {
        assert_eq!(
            meta_path(Path::new("d/out.jsonl")),
            Path::new("d/out.meta.json")
        );
        assert_eq!(
            meta_path(Path::new("out.txt")),
            Path::new("out.txt.meta.json")
        );
    }
}
