//! The machine a figure was measured on: CPU model, logical CPUs, the threads realign used and
//! the kernels its CPU chose. Speed figures mean little without it (`experiment --quick` took
//! 6 minutes on two Zen 4 cores and 10-19 on two AVX2-only Zen 1 cores, with the same results),
//! so `realign bench` prints it with every figure and `realign experiment` records it in its
//! log, `report.json` and `report.md`.

use serde::{Deserialize, Serialize};

/// Where a run happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Host {
    /// The CPU's model name (`/proc/cpuinfo`'s `model name`; `unknown` where it is not there).
    pub cpu: String,
    /// Logical CPUs the process may use.
    pub logical_cpus: usize,
    /// Threads of realign's compute pools (`RAYON_NUM_THREADS`, else the logical CPUs).
    pub threads: usize,
    /// The instruction set of realign's own kernels on this CPU ([`crate::model::tile`]'s
    /// choice): `avx512f`, `avx2+fma` or `portable`.
    pub kernels: String,
    /// The software-prefetch hints of decoding's weight streams and why
    /// ([`crate::model::prefetch::Choice`]): `gemv t0, tiles t0 (vendor default)`, or the
    /// `REALIGN_PREFETCH` override. Empty in reports written before it was recorded.
    #[serde(default)]
    pub prefetch: String,
}

impl Host {
    /// This machine, now.
    pub fn detect() -> Self {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|text| cpu_model(&text))
            .unwrap_or_else(|| "unknown".into());
        Self {
            cpu,
            logical_cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            threads: rayon::current_num_threads(),
            kernels: crate::model::tile::kernel_set().into(),
            prefetch: crate::model::prefetch::choice().to_string(),
        }
    }
}

impl std::fmt::Display for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({} logical CPUs), {} kernels, {} threads",
            self.cpu, self.logical_cpus, self.kernels, self.threads
        )?;
        if !self.prefetch.is_empty() {
            write!(f, ", prefetch {}", self.prefetch)?;
        }
        Ok(())
    }
}

/// The first `model name` of a `/proc/cpuinfo` text, whitespace collapsed.
fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key.trim() == "model name")
            .then(|| value.split_whitespace().collect::<Vec<_>>().join(" "))
            .filter(|v| !v.is_empty())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_model_takes_the_first_model_name() {
        let text = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel\t\t: 1\n\
                    model name\t: AMD EPYC  7551 32-Core Processor\nflags\t\t: fpu\n\n\
                    processor\t: 1\nmodel name\t: Other\n";
        assert_eq!(
            cpu_model(text).as_deref(),
            Some("AMD EPYC 7551 32-Core Processor")
        );
        assert_eq!(cpu_model("processor\t: 0\nmodel\t\t: 1\n"), None);
        assert_eq!(cpu_model("model name\t:   \n"), None);
    }

    #[test]
    fn display_names_every_part() {
        let host = Host {
            cpu: "Intel(R) Xeon(R) Processor".into(),
            logical_cpus: 2,
            threads: 2,
            kernels: "avx512f".into(),
            prefetch: String::new(),
        };
        assert_eq!(
            host.to_string(),
            "Intel(R) Xeon(R) Processor (2 logical CPUs), avx512f kernels, 2 threads"
        );
        let host = Host {
            prefetch: "gemv t0, tiles t0 (vendor default)".into(),
            ..host
        };
        assert_eq!(
            host.to_string(),
            "Intel(R) Xeon(R) Processor (2 logical CPUs), avx512f kernels, 2 threads, \
             prefetch gemv t0, tiles t0 (vendor default)"
        );
        // a report written before the field existed still reads
        let old: Host = serde_json::from_str(
            r#"{"cpu":"x","logical_cpus":2,"threads":2,"kernels":"avx2+fma"}"#,
        )
        .expect("a host record without prefetch");
        assert_eq!(old.prefetch, "");
    }
}
