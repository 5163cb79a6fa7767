//! Software prefetch of the weights that decoding streams (each weight read once per token),
//! chosen per CPU vendor from measurements, because the same hint helps on one and hurts on the
//! other:
//!
//! - [`super::gemv`] (one to six input rows): on the AVX2-only Zen 1 machine the non-temporal
//!   hint 4 KiB ahead beat `_MM_HINT_T0` by ~20 % (29.4 against 24.5 GB/s, LM head, bf16). On
//!   the Intel Xeon (family 6, model 207, AVX-512) the same non-temporal prefetch held one
//!   decode step's products of SmolLM2-135M to 13-16 GB/s of weights (a matrix in cache too),
//!   no software prefetch reached 15-18 (f32) / 11-14 (bf16), and `_MM_HINT_T0` at the same
//!   distance 22-23 / 15-20 (`examples/gemv_rates.rs`, three runs alternating the hints; a plain
//!   two-thread read reaches 17.5 GB/s there). A likely reason: on Intel a non-temporal
//!   prefetch does not fill L2, so a line fetched 4 KiB ahead can be evicted from L1 before
//!   its read.
//! - [`super::tile`] (7-64 rows, batched decoding): each tile prefetches the rows of the next
//!   tile into L1 as it runs (`_MM_HINT_T0`); on the Intel Xeon a batch-16 decode step's linear
//!   products took 34-46 ms against 40-56 without (`examples/decode_profile.rs`, `BATCH=16`,
//!   three runs alternating). Not measured on AMD, where the tiles keep their previous
//!   behaviour (the hardware prefetchers alone).
//!
//! `REALIGN_PREFETCH=t0|nta|off` overrides both choices, to measure another CPU; [`choice`]
//! says which applies and why (an unknown value is named there and otherwise ignored), and
//! [`crate::host::Host`] records it beside every figure.

/// A prefetch hint for a kernel's weight stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hint {
    /// Into every cache level (`_MM_HINT_T0`).
    T0,
    /// Non-temporal (`_MM_HINT_NTA`): into L1, bypassing what it can of the rest.
    Nta,
    /// No software prefetch: the hardware prefetchers alone.
    Off,
}

/// The hint [`super::gemv`]'s streamed dot products use on this CPU.
pub fn gemv_hint() -> Hint {
    choice().gemv
}

/// The hint [`super::tile`]'s few-row tiles use on this CPU.
pub fn tile_hint() -> Hint {
    choice().tile
}

/// What [`gemv_hint`] and [`tile_hint`] return on this CPU, and why: for the record of a
/// measurement ([`crate::host::Host`]), since a figure taken under `REALIGN_PREFETCH` is not the
/// default's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    /// The batch-1 products' hint.
    pub gemv: Hint,
    /// The few-row tiles' hint.
    pub tile: Hint,
    /// `REALIGN_PREFETCH` as set (`None`: not set).
    pub forced: Option<String>,
    /// Whether `forced` named a hint (`t0`, `nta` or `off`); an unknown value is ignored and
    /// the vendor's default applies.
    pub understood: bool,
}

impl Choice {
    /// The choice for `REALIGN_PREFETCH = forced` on a CPU that is (or is not) Intel.
    fn new(forced: Option<String>, intel: bool) -> Self {
        let parsed = forced.as_deref().and_then(parse);
        let (gemv, tile) = match parsed {
            Some(h) => (h, h),
            None if intel => (Hint::T0, Hint::T0),
            None => (Hint::Nta, Hint::Off),
        };
        Self {
            gemv,
            tile,
            understood: parsed.is_some(),
            forced,
        }
    }
}

impl std::fmt::Display for Choice {
    /// `gemv t0, tiles t0`, then where it came from: `(vendor default)`,
    /// `(REALIGN_PREFETCH=off)` or `(REALIGN_PREFETCH='t1' not understood, …: vendor default)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "gemv {}, tiles {} ", self.gemv, self.tile)?;
        match (&self.forced, self.understood) {
            (None, _) => write!(f, "(vendor default)"),
            (Some(v), true) => write!(f, "(REALIGN_PREFETCH={})", v.trim()),
            (Some(v), false) => write!(
                f,
                "(REALIGN_PREFETCH='{v}' not understood, give t0, nta or off: vendor default)"
            ),
        }
    }
}

impl std::fmt::Display for Hint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Hint::T0 => "t0",
            Hint::Nta => "nta",
            Hint::Off => "off",
        })
    }
}

/// The hints of this process, decided once (the first product reads `REALIGN_PREFETCH` and the
/// CPU's vendor).
pub fn choice() -> &'static Choice {
    static CHOICE: std::sync::OnceLock<Choice> = std::sync::OnceLock::new();
    CHOICE.get_or_init(|| Choice::new(std::env::var("REALIGN_PREFETCH").ok(), intel()))
}

/// `t0`, `nta` or `off` (any case).
fn parse(value: &str) -> Option<Hint> {
    match value.trim().to_ascii_lowercase().as_str() {
        "t0" => Some(Hint::T0),
        "nta" => Some(Hint::Nta),
        "off" => Some(Hint::Off),
        _ => None,
    }
}

/// Whether the CPU's vendor string (CPUID leaf 0) is `GenuineIntel`.
fn intel() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // `__cpuid` is safe on newer toolchains and `unsafe` on older ones; leaf 0 exists on
        // every x86-64 CPU.
        #[allow(unused_unsafe)]
        let r = unsafe { std::arch::x86_64::__cpuid(0) };
        let mut vendor = [0u8; 12];
        for (dst, word) in vendor.chunks_exact_mut(4).zip([r.ebx, r.edx, r.ecx]) {
            dst.copy_from_slice(&word.to_le_bytes());
        }
        &vendor == b"GenuineIntel"
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Prefetches the cache line at `p` with hint `H` (`0` non-temporal, `3` T0, anything else
/// nothing): a const parameter, so the kernels' inner loops carry no branch.
///
/// # Safety
/// The CPU has SSE (every x86-64 CPU). `p` may point anywhere: a prefetch never faults.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn line<const H: i32>(p: *const f32) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_NTA, _MM_HINT_T0};
    match H {
        0 => _mm_prefetch::<_MM_HINT_NTA>(p.cast()),
        3 => _mm_prefetch::<_MM_HINT_T0>(p.cast()),
        _ => {}
    }
}

impl Hint {
    /// The const parameter of [`line`] for this hint.
    pub(crate) const fn code(self) -> i32 {
        match self {
            Hint::T0 => 3,
            Hint::Nta => 0,
            Hint::Off => -1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_override() {
        assert_eq!(parse("T0"), Some(Hint::T0));
        assert_eq!(parse(" nta\n"), Some(Hint::Nta));
        assert_eq!(parse("off"), Some(Hint::Off));
        assert_eq!(parse("t1"), None);
        assert_eq!(parse(""), None);
    }

    #[test]
    fn choice_follows_the_override_then_the_vendor() {
        let intel = Choice::new(None, true);
        assert_eq!((intel.gemv, intel.tile), (Hint::T0, Hint::T0));
        assert_eq!(intel.to_string(), "gemv t0, tiles t0 (vendor default)");
        let other = Choice::new(None, false);
        assert_eq!((other.gemv, other.tile), (Hint::Nta, Hint::Off));
        let forced = Choice::new(Some("OFF".into()), true);
        assert_eq!((forced.gemv, forced.tile), (Hint::Off, Hint::Off));
        assert_eq!(
            forced.to_string(),
            "gemv off, tiles off (REALIGN_PREFETCH=OFF)"
        );
        // an unknown value is named, and the vendor's default applies
        let unknown = Choice::new(Some("t1".into()), false);
        assert_eq!((unknown.gemv, unknown.tile), (Hint::Nta, Hint::Off));
        assert!(!unknown.understood);
        assert_eq!(
            unknown.to_string(),
            "gemv nta, tiles off (REALIGN_PREFETCH='t1' not understood, give t0, nta or off: \
             vendor default)"
        );
    }

    #[test]
    fn codes_are_the_intrinsics_hints() {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_MM_HINT_NTA, _MM_HINT_T0};
            assert_eq!(Hint::T0.code(), _MM_HINT_T0);
            assert_eq!(Hint::Nta.code(), _MM_HINT_NTA);
        }
        assert!(Hint::Off.code() < 0);
    }

    #[test]
    fn vendor_agrees_with_cpuinfo() {
        // On Linux, /proc/cpuinfo names the vendor too: both readings must agree.
        let Ok(text) = std::fs::read_to_string("/proc/cpuinfo") else {
            return;
        };
        let Some(vendor) = text.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == "vendor_id").then(|| v.trim().to_string())
        }) else {
            return;
        };
        assert_eq!(intel(), vendor == "GenuineIntel", "vendor_id {vendor}");
    }
}
