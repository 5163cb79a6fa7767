//! Stage caching: a stage's folder is named by the hash of everything that determines its
//! output — its kind and settings, the keys of the stages it reads, and the content digests of
//! the files it reads — so a rerun finds finished stages and skips them, and any change of an
//! input gives a new key (and a new folder) for that stage and everything downstream.
//!
//! A stage runs in `NAME-KEY.partial/` and becomes `NAME-KEY/` by a rename once its
//! `stage.json` (result + timing) is written: an interrupted stage leaves no finished-looking
//! folder, and Ctrl-C leaves every finished stage usable (and removes the `.partial` folder of
//! the stage it stopped; one left by `kill -9` is removed when the stage runs again).

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::ExperimentError;

/// The marker file of a finished stage.
pub const STAGE_JSON: &str = "stage.json";

/// The hex SHA-256 of a canonical JSON value (object keys sorted by `serde_json`'s map).
pub fn key_of(material: &serde_json::Value) -> String {
    // A `Value` always serialises (its map keys are strings).
    #[allow(clippy::expect_used)]
    let text = serde_json::to_string(material).expect("JSON serialises");
    hex(&Sha256::digest(text.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The content digest of a file, or of every file of a folder (names and bytes, in name
/// order, recursively): what a stage that reads `path` depends on.
pub fn digest_path(path: &Path) -> Result<String, ExperimentError> {
    let mut h = Sha256::new();
    digest_into(path, path, &mut h)?;
    Ok(hex(&h.finalize()))
}

fn digest_into(root: &Path, path: &Path, h: &mut Sha256) -> Result<(), ExperimentError> {
    let io = |source| ExperimentError::Io {
        path: path.to_path_buf(),
        source,
    };
    if path.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(io)?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()
            .map_err(io)?;
        entries.sort();
        for e in entries {
            digest_into(root, &e, h)?;
        }
        return Ok(());
    }
    let rel = path.strip_prefix(root).unwrap_or(path);
    h.update(rel.to_string_lossy().as_bytes());
    h.update([0]);
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(())
}

/// What a finished stage recorded.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageRecord<T> {
    /// Stage name.
    pub name: String,
    /// Its key.
    pub key: String,
    /// Wall time of the run that produced it.
    pub seconds: f64,
    /// Peak resident memory (MiB) of the process while the run that produced it worked on it
    /// (sampled, [`super::memory`]); absent in records of older runs and without `/proc`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_rss_mib: Option<f64>,
    /// The stage's result.
    pub result: T,
}

/// Where stage folders live.
#[derive(Debug, Clone)]
pub struct StageStore {
    root: PathBuf,
}

impl StageStore {
    /// Stages under `root` (created on first use).
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    /// The folder of a finished stage `name` with key `key`.
    pub fn dir(&self, name: &str, key: &str) -> PathBuf {
        self.root
            .join(format!("{name}-{}", &key[..16.min(key.len())]))
    }

    /// The stage's record if it has finished before.
    pub fn finished<T: DeserializeOwned>(
        &self,
        name: &str,
        key: &str,
    ) -> Result<Option<StageRecord<T>>, ExperimentError> {
        let path = self.dir(name, key).join(STAGE_JSON);
        if !path.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).map_err(|source| ExperimentError::Io {
            path: path.clone(),
            source,
        })?;
        let rec: StageRecord<T> =
            serde_json::from_str(&text).map_err(|e| ExperimentError::Config {
                path: path.clone(),
                what: format!("unreadable stage record ({e}); delete the folder to rerun it"),
            })?;
        Ok((rec.key == key).then_some(rec))
    }

    /// Runs a stage in a `.partial` folder and publishes it by rename with its record.
    pub fn run<T: Serialize + DeserializeOwned>(
        &self,
        name: &str,
        key: &str,
        f: impl FnOnce(&Path) -> crate::Result<T>,
    ) -> crate::Result<StageRecord<T>> {
        let dir = self.dir(name, key);
        let partial = partial_dir(&dir);
        let io = |p: &Path, e| crate::Error::io(p, e);
        if partial.exists() {
            std::fs::remove_dir_all(&partial).map_err(|e| io(&partial, e))?;
        }
        // Ctrl-C removes it (it could never be resumed: a rerun starts the stage afresh).
        crate::fsutil::create_registered_dir(&partial)?;
        let published = self.fill_and_publish(name, key, &dir, &partial, f);
        crate::fsutil::unregister(&partial);
        published
    }

    /// [`run`](Self::run) once its `.partial` folder exists: runs the stage in it, writes its
    /// record and renames it into place.
    fn fill_and_publish<T: Serialize + DeserializeOwned>(
        &self,
        name: &str,
        key: &str,
        dir: &Path,
        partial: &Path,
        f: impl FnOnce(&Path) -> crate::Result<T>,
    ) -> crate::Result<StageRecord<T>> {
        let io = |p: &Path, e| crate::Error::io(p, e);
        // Each stage starts from the memory the run holds, not what earlier stages freed.
        super::memory::release_free_memory();
        let memory = super::memory::monitor();
        memory.begin_stage();
        let start = std::time::Instant::now();
        let result = f(partial);
        let peak = memory.stage_peak();
        super::memory::release_free_memory();
        let result = result?;
        let rec = StageRecord {
            name: name.to_string(),
            key: key.to_string(),
            seconds: start.elapsed().as_secs_f64(),
            peak_rss_mib: peak.map(super::memory::mib),
            result,
        };
        let json = serde_json::to_string_pretty(&rec).map_err(|source| crate::Error::Json {
            path: partial.join(STAGE_JSON),
            source,
        })?;
        crate::fsutil::write_atomic(&partial.join(STAGE_JSON), json.as_bytes())?;
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(|e| io(dir, e))?;
        }
        std::fs::rename(partial, dir).map_err(|e| io(dir, e))?;
        // The record as a later run will read it (JSON does not round-trip every f64 bit), so
        // a fresh run and a resumed one report the same numbers.
        Ok(serde_json::from_str(&json).unwrap_or(rec))
    }
}

/// The folder a stage is written in before it is renamed to `dir`: `dir` with `.partial`
/// appended (not `with_extension`: stage names hold dots, `attack-p0.5-KEY`).
pub fn partial_dir(dir: &Path) -> PathBuf {
    let name = dir
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    dir.with_file_name(format!("{name}.partial"))
}

/// The folder a stage written in `partial` will have once published: the inverse of
/// [`partial_dir`] (a path without the suffix is returned as it is).
pub fn published_dir(partial: &Path) -> PathBuf {
    match partial
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_suffix(".partial"))
    {
        Some(name) => partial.with_file_name(name),
        None => partial.to_path_buf(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_and_published_names_are_inverse() {
        let dir = Path::new("runs/x/stages/attack-p0.5-0123abcd");
        let partial = partial_dir(dir);
        assert_eq!(
            partial,
            Path::new("runs/x/stages/attack-p0.5-0123abcd.partial")
        );
        assert_eq!(published_dir(&partial), dir);
        assert_eq!(published_dir(dir), dir);
    }

    #[test]
    fn keys_change_with_any_input() {
        let base = serde_json::json!({"kind": "train", "lr": 1e-4, "deps": ["abc"]});
        let k = key_of(&base);
        assert_eq!(k.len(), 64);
        assert_eq!(k, key_of(&base.clone()));
        for changed in [
            serde_json::json!({"kind": "train", "lr": 2e-4, "deps": ["abc"]}),
            serde_json::json!({"kind": "train", "lr": 1e-4, "deps": ["abd"]}),
            serde_json::json!({"kind": "mix", "lr": 1e-4, "deps": ["abc"]}),
        ] {
            assert_ne!(key_of(&changed), k);
        }
    }

    #[test]
    fn file_digest_follows_content_and_names() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a.txt"), b"one").unwrap();
        let k1 = digest_path(d.path()).unwrap();
        std::fs::write(d.path().join("a.txt"), b"two").unwrap();
        let k2 = digest_path(d.path()).unwrap();
        assert_ne!(k1, k2);
        std::fs::rename(d.path().join("a.txt"), d.path().join("b.txt")).unwrap();
        assert_ne!(digest_path(d.path()).unwrap(), k2);
        // a single file is digested by content alone (its name relative to itself is empty):
        // the known SHA-256 of "\0abc"
        let e = tempfile::tempdir().unwrap();
        std::fs::write(e.path().join("x"), b"abc").unwrap();
        assert_eq!(
            digest_path(&e.path().join("x")).unwrap(),
            "609f6e36d2405585188d5cfd761f407c7cc46a7d3f314c88270469dde315fcd1"
        );
    }

    #[test]
    fn finished_stage_is_found_and_partial_is_not() {
        let d = tempfile::tempdir().unwrap();
        let store = StageStore::new(d.path().to_path_buf());
        let key = key_of(&serde_json::json!(1));
        assert!(store.finished::<u32>("s", &key).unwrap().is_none());
        let failed: crate::Result<StageRecord<u32>> = store.run("s", &key, |_| {
            Err(crate::Error::Neurons(crate::neurons::NeuronError::Invalid(
                "boom".into(),
            )))
        });
        assert!(failed.is_err());
        assert!(store.finished::<u32>("s", &key).unwrap().is_none());
        let rec = store
            .run("s", &key, |dir| {
                std::fs::write(dir.join("out"), b"x").unwrap();
                Ok(7u32)
            })
            .unwrap();
        assert_eq!(rec.result, 7);
        let again = store.finished::<u32>("s", &key).unwrap().unwrap();
        assert_eq!(again.result, 7);
        assert!(store.dir("s", &key).join("out").is_file());
    }
}
