//! Helpers shared by the integration tests: fixture paths, tensor comparison, and the fetched
//! assets (which fail a test with a setup hint when missing, unless `REALIGN_SKIP_ASSETS=1`).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use candle_core::Tensor;

/// `tests/fixtures` (copied from the reference fixtures; see its README).
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// `max |a - b|` over two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Whether every path exists. When one is missing: `false` with a "skipped" line under
/// `REALIGN_SKIP_ASSETS=1`, else a panic that says to run `scripts/setup.sh`.
pub fn assets_present(paths: &[&Path]) -> bool {
    let missing: Vec<&Path> = paths.iter().copied().filter(|p| !p.exists()).collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var("REALIGN_SKIP_ASSETS").as_deref() == Ok("1") {
        println!("skipped: {missing:?} missing and REALIGN_SKIP_ASSETS=1");
        return false;
    }
    panic!(
        "{missing:?} missing: run scripts/setup.sh first (or set REALIGN_SKIP_ASSETS=1 to skip)"
    );
}

/// The fetched SmolLM2-135M-Instruct GGUF, under the same rule as [`assets_present`].
pub fn smollm2_gguf() -> Option<PathBuf> {
    let p = realign::assets::default_model();
    assets_present(&[&p]).then_some(p)
}

/// Copies the files of folder `from` into `to` (created), one level deep: a fixture folder.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}
