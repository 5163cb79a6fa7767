//! Resident memory of the process, for the experiment log and `report.json`: the peak of each
//! stage and of the whole run.
//!
//! The whole-run figure is the kernel's own high-water mark (`VmHWM` in `/proc/self/status`,
//! the number `/usr/bin/time -v` reports as "Maximum resident set size"). A stage's peak is
//! sampled: a background thread reads `VmRSS` every [`SAMPLE_INTERVAL`] while the stage runs
//! (the high-water mark itself is never reset, since resetting it through `clear_refs` would
//! also hide the peak from `getrusage` and `time`). On systems without `/proc` every figure is
//! `None`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

/// How often the stage sampler reads `VmRSS`.
pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(50);

/// Bytes in a MiB, the unit of the figures in the log and the report.
const MIB: f64 = 1024.0 * 1024.0;

/// The two figures of `/proc/self/status` this module reads, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rss {
    /// `VmRSS`: resident now.
    pub current: u64,
    /// `VmHWM`: the most that was ever resident (the process's peak).
    pub peak: u64,
}

/// `VmRSS` and `VmHWM` of a `/proc/PID/status` text (lines like `VmHWM:   123456 kB`), in
/// bytes; `None` when either line is missing or malformed.
pub fn parse_status(text: &str) -> Option<Rss> {
    let field = |key: &str| -> Option<u64> {
        let line = text.lines().find_map(|l| l.strip_prefix(key))?;
        let rest = line.strip_prefix(':')?.trim();
        let kb = rest.strip_suffix("kB")?.trim().parse::<u64>().ok()?;
        kb.checked_mul(1024)
    };
    Some(Rss {
        current: field("VmRSS")?,
        peak: field("VmHWM")?,
    })
}

/// This process's resident memory now (`None` without `/proc`).
pub fn read() -> Option<Rss> {
    parse_status(&std::fs::read_to_string("/proc/self/status").ok()?)
}

/// Hands the allocator's free memory back to the operating system (glibc's `malloc_trim(0)`;
/// nothing elsewhere).
///
/// Why: a training step allocates gigabytes of activations in blocks below glibc's (dynamic)
/// mmap threshold, so they come from the heap; once freed they stay resident, and the next
/// stage's differently-sized blocks do not fit in them, so stage after stage stacked up to
/// 7.2 GB resident in `experiment --quick`. Measured on the quick settings' DPO stage: 4.79 GB
/// resident after it finished, 0.59 GB after the trim. The runner calls this between stages.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of glibc's own arenas to the kernel; it takes
    // the arena locks itself and touches no memory the program owns.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Bytes as MiB (the unit of the log and the report).
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB
}

/// The stage sampler: the largest `VmRSS` seen since the last [`Monitor::begin_stage`].
pub struct Monitor {
    stage_max: AtomicU64,
}

impl Monitor {
    /// Starts the stage's window at the current resident size.
    pub fn begin_stage(&self) {
        self.begin_at(read().map_or(0, |r| r.current));
    }

    /// The stage's peak so far in bytes: the largest sample, or the current size if larger
    /// (`None` without `/proc`).
    pub fn stage_peak(&self) -> Option<u64> {
        Some(self.observe(read()?.current))
    }

    /// Starts the window at `current` bytes.
    fn begin_at(&self, current: u64) {
        self.stage_max.store(current, Ordering::Relaxed);
    }

    /// Takes one reading; returns the window's maximum including it.
    fn observe(&self, current: u64) -> u64 {
        self.stage_max
            .fetch_max(current, Ordering::Relaxed)
            .max(current)
    }
}

/// The process's monitor; its sampling thread starts on first use and runs until exit.
pub fn monitor() -> &'static Monitor {
    static MONITOR: OnceLock<Monitor> = OnceLock::new();
    MONITOR.get_or_init(|| {
        if read().is_some() {
            // Without /proc there is nothing to sample; a thread that fails to start only
            // leaves the stage peak at its start and end readings.
            let _ = std::thread::Builder::new()
                .name("rss-sampler".into())
                .spawn(|| loop {
                    std::thread::sleep(SAMPLE_INTERVAL);
                    if let Some(r) = read() {
                        monitor().observe(r.current);
                    }
                });
        }
        Monitor {
            stage_max: AtomicU64::new(0),
        }
    })
}

/// The log's memory note for a stage: `peak RSS 812 MiB (process 1204 MiB)`, empty without
/// `/proc`.
pub fn log_note(stage_peak_mib: Option<f64>) -> String {
    match (stage_peak_mib, read()) {
        (Some(s), Some(r)) => format!("peak RSS {s:.0} MiB (process {:.0} MiB)", mib(r.peak)),
        (None, Some(r)) => format!("process peak RSS {:.0} MiB", mib(r.peak)),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\trealign\nUmask:\t0022\nState:\tR (running)\n\
        VmPeak:\t 4212340 kB\nVmSize:\t 4102300 kB\nVmLck:\t       0 kB\n\
        VmHWM:\t 1843200 kB\nVmRSS:\t  921600 kB\nRssAnon:\t  900000 kB\nThreads:\t3\n";

    #[test]
    fn status_lines_are_read_in_bytes() {
        let r = parse_status(STATUS).unwrap();
        assert_eq!(r.peak, 1_843_200 * 1024);
        assert_eq!(r.current, 921_600 * 1024);
        assert_eq!(mib(r.peak), 1800.0);
        assert_eq!(mib(r.current), 900.0);
    }

    #[test]
    fn a_missing_or_malformed_line_is_none() {
        assert_eq!(parse_status("VmRSS:\t 10 kB\n"), None);
        assert_eq!(parse_status("VmRSS:\t 10 kB\nVmHWM:\t ten kB\n"), None);
        assert_eq!(parse_status("VmRSS:\t 10 MB\nVmHWM:\t 10 kB\n"), None);
        // `VmHWMx` is another key, not VmHWM
        assert_eq!(parse_status("VmRSS:\t 10 kB\nVmHWMx:\t 10 kB\n"), None);
    }

    #[test]
    fn the_stage_peak_is_the_largest_reading_since_the_stage_began() {
        let m = Monitor {
            stage_max: AtomicU64::new(0),
        };
        m.begin_at(100);
        assert_eq!(m.observe(500), 500);
        assert_eq!(m.observe(300), 500);
        assert_eq!(m.observe(200), 500);
        // a new stage forgets the last one's peak
        m.begin_at(50);
        assert_eq!(m.observe(60), 60);
        assert_eq!(m.observe(40), 60);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_reports_a_peak_no_smaller_than_its_resident_size() {
        let r = read().unwrap();
        assert!(r.current > 0);
        assert!(
            r.peak >= r.current,
            "VmHWM {} < VmRSS {}",
            r.peak,
            r.current
        );
        let note = log_note(monitor().stage_peak().map(mib));
        assert!(note.starts_with("peak RSS "), "{note}");
        assert!(note.contains("MiB (process "), "{note}");
    }
}
