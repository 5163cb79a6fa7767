//! Small file helpers shared by every writer: reading JSON with the file named in errors, and
//! atomic writes (temporary file + rename) so that no command ever leaves a partial output.
//!
//! A temporary file or folder is registered while it is being written; Ctrl-C or `kill`
//! (after [`remove_partial_outputs_on_interrupt`]) removes what is registered before the
//! process exits, and a partial folder left by a process that was killed outright (`kill -9`)
//! is removed by the next writer of the same output.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::{Error, Result};

/// Reads a whole file, naming it in the error.
pub fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

/// Reads a whole UTF-8 file, naming it in the error; text that is not UTF-8 is an error naming
/// the line and byte where it stops being UTF-8.
pub fn read_to_string(path: &Path) -> Result<String> {
    let bytes = read(path)?;
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let bytes = e.as_bytes();
        let line = 1 + bytes[..at].iter().filter(|&&b| b == b'\n').count();
        let column = at
            - bytes[..at]
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |i| i + 1);
        Error::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "not UTF-8 text: byte {} (line {line}, byte {} of the line) is 0x{:02x}; \
                     save the file as UTF-8",
                    at + 1,
                    column + 1,
                    bytes[at]
                ),
            ),
        )
    })
}

/// Parses a JSON file into `T`, naming the file in the error.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = read_to_string(path)?;
    let json_error = |source| Error::Json {
        path: path.to_path_buf(),
        source,
    };
    let mut de = serde_json::Deserializer::from_str(&text);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let key = e.path().to_string();
        let source = e.into_inner();
        if source.is_data() && key != "." {
            Error::JsonValue {
                path: path.to_path_buf(),
                key,
                message: source.to_string(),
            }
        } else {
            json_error(source)
        }
    })?;
    de.end().map_err(json_error)?;
    Ok(value)
}

/// The temporary path used while `path` is being written: same folder (so that the rename is
/// atomic), hidden, with the process id so that concurrent writers do not collide.
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

/// The temporary files and folders being written now (removed on an interrupt).
static IN_PROGRESS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// The registry, locked: what is created while the guard is held is created before any
/// interrupt's removal starts, or not at all (the handler takes this lock and keeps it).
fn registry() -> std::io::Result<std::sync::MutexGuard<'static, Vec<PathBuf>>> {
    IN_PROGRESS
        .lock()
        .map_err(|_| std::io::Error::other("the output registry is poisoned"))
}

/// Creates the folder `path` and its missing parents, as `std::fs::create_dir_all`, but not
/// after an interrupt: the interrupt handler holds the same lock while it removes the
/// partial outputs, so a stage cannot recreate a folder it has just removed.
pub fn create_dir_all(path: &Path) -> Result<()> {
    let _list = registry().map_err(|e| Error::io(path, e))?;
    std::fs::create_dir_all(path).map_err(|e| Error::io(path, e))
}

/// Creates the folder `path` (and its parents) and registers it as a partial output in one
/// step, so an interrupt sees either both or neither.
pub(crate) fn create_registered_dir(path: &Path) -> Result<()> {
    let mut list = registry().map_err(|e| Error::io(path, e))?;
    std::fs::create_dir_all(path).map_err(|e| Error::io(path, e))?;
    list.push(path.to_path_buf());
    Ok(())
}

/// Forgets a temporary output (renamed into place, or removed).
pub(crate) fn unregister(path: &Path) {
    if let Ok(mut list) = IN_PROGRESS.lock() {
        list.retain(|p| p != path);
    }
}

/// Installs a handler for Ctrl-C, `SIGTERM` and `SIGHUP` that removes every temporary output
/// still being written (a `.NAME.partial-PID` folder, a `.NAME.PID.tmp` file), says so on
/// standard error, and exits with status 130, as a shell reports an interrupted command. The
/// outputs already in place are untouched. Call it once, at the start of a command-line
/// program; a second call (or another handler installed first) is an error.
pub fn remove_partial_outputs_on_interrupt() -> std::result::Result<(), String> {
    ctrlc::set_handler(|| {
        // Take the list and keep the lock: no new registration can start after this point.
        let mut guard = match IN_PROGRESS.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let paths: Vec<PathBuf> = guard.drain(..).collect();
        remove_until_gone(&paths);
        eprintln!("interrupted");
        std::process::exit(130);
    })
    .map_err(|e| e.to_string())
}

/// Removes each of `paths` (newest first: a temporary file before the folder it sits in) and
/// repeats until a pass finds none of them, for at most about two seconds. Another thread may
/// still be writing: a stage that is creating a file in a folder just removed recreates the
/// folder, so one pass is not enough. Once the interrupt handler holds the registry's lock, no
/// writer can create a file or folder through this module, so the passes end.
fn remove_until_gone(paths: &[PathBuf]) {
    let mut said = vec![false; paths.len()];
    for _ in 0..100 {
        let mut found = false;
        for (i, path) in paths.iter().enumerate().rev() {
            if std::fs::symlink_metadata(path).is_err() {
                continue;
            }
            found = true;
            if remove_path(path).is_ok() && !said[i] {
                said[i] = true;
                eprintln!("interrupted: removed the partial output {}", path.display());
            }
        }
        if !found {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Whether the process `pid` is running (on systems without `kill(2)`, always `true`).
fn process_alive(pid: u32) -> bool {
    #[cfg(unix)]
    {
        let Ok(pid) = libc::pid_t::try_from(pid) else {
            return false;
        };
        // SAFETY: signal 0 only checks that the process exists; nothing is sent.
        let rc = unsafe { libc::kill(pid, 0) };
        rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

/// Removes the `.NAME.partial-PID` folders beside the output `NAME` whose process is gone
/// (killed before it could clean up): the only trace an output of this module can leave.
fn remove_stale_partials(parent: &Path, name: &str) {
    let prefix = format!(".{name}.partial-");
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(pid) = file_name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !process_alive(pid) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Writes `bytes` to `path` atomically: a temporary file beside it, fsync, then rename; the
/// parent folders are created when missing. On error the temporary file is removed and `path`
/// is untouched.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |f| f.write_all(bytes))
}

/// Like [`write_atomic`], with a closure that streams the content into the file.
pub fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> std::io::Result<()>,
) -> Result<()> {
    let tmp = temp_path(path);
    let result = (|| {
        // Created and registered under the lock that the interrupt handler takes: after an
        // interrupt no writer creates a file or recreates a removed folder.
        let file = {
            let mut list = registry()?;
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent)?;
            }
            list.push(tmp.clone());
            std::fs::File::create(&tmp)?
        };
        let mut w = std::io::BufWriter::new(file);
        fill(&mut w)?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    unregister(&tmp);
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// Refuses an output path that exists already unless `overwrite` is set
/// ([`Error::OutputExists`]).
pub fn refuse_existing(path: &Path, overwrite: bool) -> Result<()> {
    if !overwrite && std::fs::symlink_metadata(path).is_ok() {
        return Err(Error::OutputExists {
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

/// Counts the NaN and infinite values of `values`.
pub fn count_nonfinite(values: &[f32]) -> usize {
    values.iter().filter(|v| !v.is_finite()).count()
}

/// Refuses a tensor with NaN or infinite values ([`Error::NonFinite`], naming `path` and `name`).
/// One pass over the tensor on its device, in its own dtype (`x - x` is 0 for every finite
/// `x`; a bf16 weight is not copied to f32 for it); the exact count is taken only when the
/// check fails.
pub fn check_finite(t: &candle_core::Tensor, path: &Path, name: &str) -> Result<()> {
    let flat = t.flatten_all()?;
    let probe = flat
        .sub(&flat)?
        .sum_all()?
        .to_dtype(candle_core::DType::F32)?
        .to_scalar::<f32>()?;
    if probe == 0.0 {
        return Ok(());
    }
    let values = flat.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
    Err(Error::NonFinite {
        path: path.to_path_buf(),
        tensor: name.to_string(),
        count: count_nonfinite(&values),
    })
}

/// An exclusive hold on a folder that a long run resumes into (`realign experiment`'s output):
/// a second run on the same folder stops at once with [`Error::Busy`], instead of training the
/// same stages beside the first and racing it for their folders. The hold is `flock(2)` on
/// `DIR/.realign.lock`, which the kernel drops when the holder ends, however it ends (Ctrl-C,
/// `kill -9`), so a stale file never blocks a rerun; the file names the holder's pid and start
/// time for the message. Released on drop. On systems without `flock` it holds nothing.
#[derive(Debug)]
pub struct DirLock {
    _file: std::fs::File,
}

impl DirLock {
    /// The name of the lock file inside the folder.
    pub const FILE: &'static str = ".realign.lock";

    /// Takes the hold on `dir` (which must exist), or fails with [`Error::Busy`] naming the
    /// holder when another process has it.
    pub fn acquire(dir: &Path) -> Result<Self> {
        let path = dir.join(Self::FILE);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        #[cfg(unix)]
        {
            use std::io::Write;
            use std::os::fd::AsRawFd;
            // SAFETY: flock on a descriptor this function owns; no memory is involved.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc != 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() == std::io::ErrorKind::WouldBlock {
                    let holder = std::fs::read_to_string(&path).unwrap_or_default();
                    let holder = holder.trim();
                    return Err(Error::Busy {
                        path: dir.to_path_buf(),
                        holder: if holder.is_empty() {
                            "a process that has not written its pid yet".into()
                        } else {
                            holder.to_string()
                        },
                    });
                }
                return Err(Error::io(&path, err));
            }
            let since = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let mut f = &file;
            f.set_len(0)
                .and_then(|()| {
                    writeln!(f, "pid {}, since {since}", std::process::id())?;
                    f.flush()
                })
                .map_err(|e| Error::io(&path, e))?;
        }
        Ok(Self { _file: file })
    }
}

/// An output folder written as a whole: every file goes into a hidden `.NAME.partial-PID`
/// folder beside the target, and [`commit`](Self::commit) renames it into place (replacing an
/// existing target only after the new folder is complete). Dropped without `commit` (an error,
/// a panic), the partial folder is removed, so the target is never left half written; so is it
/// on Ctrl-C (see [`remove_partial_outputs_on_interrupt`]), and a partial folder of a process
/// killed outright is removed when the next `StagedDir` for the same target starts.
#[derive(Debug)]
pub struct StagedDir {
    target: PathBuf,
    partial: PathBuf,
    committed: bool,
}

impl StagedDir {
    /// Starts writing the folder `target`: refuses it if it exists and `overwrite` is not set,
    /// creates its parent folders, and creates the empty partial folder.
    pub fn new(target: &Path, overwrite: bool) -> Result<Self> {
        refuse_existing(target, overwrite)?;
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| {
                Error::io(
                    target,
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        "an output folder needs a name",
                    ),
                )
            })?;
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
        remove_stale_partials(&parent, &name);
        let partial = parent.join(format!(".{name}.partial-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&partial);
        // The folder that refuses is the output's parent: name it, not the hidden folder.
        {
            // Created and registered in one step under the interrupt handler's lock.
            let mut list = registry().map_err(|e| Error::io(&parent, e))?;
            std::fs::create_dir(&partial).map_err(|e| Error::io(&parent, e))?;
            list.push(partial.clone());
        }
        Ok(StagedDir {
            target: target.to_path_buf(),
            partial,
            committed: false,
        })
    }

    /// The folder to write into now.
    pub fn path(&self) -> &Path {
        &self.partial
    }

    /// The final folder (where the files are once committed).
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Renames the finished folder into place; an existing target is moved aside first and
    /// removed once the new folder is in place.
    pub fn commit(mut self) -> Result<()> {
        replace_dir(&self.partial, &self.target)?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.partial);
        }
        unregister(&self.partial);
    }
}

/// Renames the complete folder `tmp` to `dir`, moving an existing `dir` aside first and
/// removing it afterwards (a single file at `dir` is replaced the same way).
pub fn replace_dir(tmp: &Path, dir: &Path) -> Result<()> {
    let old = if std::fs::symlink_metadata(dir).is_ok() {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let aside = dir.with_file_name(format!(".{name}.{}.old", std::process::id()));
        std::fs::rename(dir, &aside).map_err(|e| Error::io(dir, e))?;
        Some(aside)
    } else {
        None
    };
    std::fs::rename(tmp, dir).map_err(|e| Error::io(dir, e))?;
    if let Some(old) = old {
        let _ = remove_path(&old);
    }
    Ok(())
}

/// Removes `path`: a folder with everything in it, or a file or link (a link is removed, not
/// what it points to).
pub fn remove_path(path: &Path) -> std::io::Result<()> {
    if std::fs::symlink_metadata(path)?.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    }
}

/// A read-only memory map of a file: inputs read in place, a tensor at a time, so that memory
/// holds only what is being worked on (`realign patch`, `realign extract`).
pub(crate) struct Mapped {
    map: memmap2::Mmap,
}

impl Mapped {
    /// Maps `path` read-only.
    pub(crate) fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the file is only read; like every reader of files that others may change,
        // we rely on nobody truncating an input while it is read.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Ok(Mapped { map })
    }

    /// The whole file.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// Lets the kernel drop the pages of `locs` from this process (they stay in the page
    /// cache): resident memory then holds only the tensors being worked on.
    pub(crate) fn release(&self, locs: &[&crate::adapters::TensorLoc]) {
        for loc in locs {
            #[cfg(unix)]
            // SAFETY: a read-only file mapping: dropped pages are read back from the file.
            unsafe {
                let _ = self.map.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    loc.range.start,
                    loc.range.len(),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// While the interrupt handler holds the registry, a stage can neither create a folder nor
    /// start a file; it goes on once the lock is released (in the handler's case, never).
    #[test]
    fn no_folder_or_file_is_created_while_the_handler_holds_the_registry() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("stage.partial").join("model");
        let file = dir.path().join("other").join("out.json");
        let guard = IN_PROGRESS.lock().unwrap();
        let (s, f) = (sub.clone(), file.clone());
        let writer = std::thread::spawn(move || {
            create_dir_all(&s).unwrap();
            write_atomic(&f, b"1").unwrap();
        });
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(!dir.path().join("stage.partial").exists());
        assert!(!dir.path().join("other").exists());
        drop(guard);
        writer.join().unwrap();
        assert!(sub.is_dir());
        assert_eq!(std::fs::read(&file).unwrap(), b"1");
    }

    /// The handler's removal takes a registered folder with a registered file inside it.
    #[test]
    fn removal_takes_registered_files_and_folders() {
        let dir = tempfile::tempdir().unwrap();
        let partial = dir.path().join(".x.partial-1");
        std::fs::create_dir_all(partial.join("a")).unwrap();
        let tmp = partial.join("a").join(".f.1.tmp");
        std::fs::write(&tmp, b"half").unwrap();
        let kept = dir.path().join("kept.json");
        std::fs::write(&kept, b"{}").unwrap();
        remove_until_gone(&[partial.clone(), tmp]);
        assert!(!partial.exists());
        assert!(kept.exists());
    }

    #[test]
    fn atomic_write_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.json");
        write_atomic(&p, b"{}").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"{}");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn a_staged_folder_appears_only_when_committed() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("sub").join("out");
        {
            let staged = StagedDir::new(&out, false).unwrap();
            std::fs::write(staged.path().join("a.txt"), b"a").unwrap();
            assert!(!out.exists());
            // dropped without commit: nothing is left, not even the partial folder
        }
        assert!(!out.exists());
        assert_eq!(
            std::fs::read_dir(dir.path().join("sub")).unwrap().count(),
            0
        );
        let staged = StagedDir::new(&out, false).unwrap();
        std::fs::write(staged.path().join("a.txt"), b"a").unwrap();
        staged.commit().unwrap();
        assert_eq!(std::fs::read(out.join("a.txt")).unwrap(), b"a");
        assert_eq!(
            std::fs::read_dir(dir.path().join("sub")).unwrap().count(),
            1
        );
        // an existing output is refused without overwrite, replaced whole with it
        let err = StagedDir::new(&out, false).unwrap_err();
        assert!(matches!(err, Error::OutputExists { .. }), "{err}");
        assert!(err.to_string().contains("--overwrite"), "{err}");
        let staged = StagedDir::new(&out, true).unwrap();
        std::fs::write(staged.path().join("b.txt"), b"b").unwrap();
        staged.commit().unwrap();
        assert!(!out.join("a.txt").exists());
        assert_eq!(std::fs::read(out.join("b.txt")).unwrap(), b"b");
        assert_eq!(
            std::fs::read_dir(dir.path().join("sub")).unwrap().count(),
            1
        );
    }

    #[test]
    fn non_finite_values_are_counted_and_named() {
        let dev = candle_core::Device::Cpu;
        let ok = candle_core::Tensor::new(&[1f32, -2.0, 0.0], &dev).unwrap();
        check_finite(&ok, Path::new("f.safetensors"), "w").unwrap();
        let bad =
            candle_core::Tensor::new(&[[1f32, f32::NAN], [f32::INFINITY, 3.0]], &dev).unwrap();
        let err = check_finite(&bad, Path::new("f.safetensors"), "layers.0.w").unwrap_err();
        assert!(
            matches!(&err, Error::NonFinite { count: 2, tensor, .. } if tensor == "layers.0.w"),
            "{err}"
        );
        assert!(err.to_string().contains("f.safetensors"), "{err}");
    }

    #[test]
    fn failed_write_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.json");
        std::fs::write(&p, b"old").unwrap();
        let err = write_atomic_with(&p, |_| Err(std::io::Error::other("boom"))).unwrap_err();
        assert!(err.to_string().contains("out.json"), "{err}");
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
