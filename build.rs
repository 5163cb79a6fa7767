//! Computes `REALIGN_SOURCE_HASH`: the SHA-256 of the crate's sources (`src/**`, `Cargo.toml`,
//! `Cargo.lock`, this file), so that the experiment's stage keys change when the code does
//! (`src/experiment/cache.rs`) and a rerun after a fix never reuses stale results.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            files(&p, out);
        } else {
            out.push(p);
        }
    }
}

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into()));
    let mut list = Vec::new();
    files(&root.join("src"), &mut list);
    for f in ["Cargo.toml", "Cargo.lock", "build.rs"] {
        list.push(root.join(f));
    }
    list.sort();
    let mut h = Sha256::new();
    for p in &list {
        let rel = p.strip_prefix(&root).unwrap_or(p);
        h.update(rel.to_string_lossy().as_bytes());
        h.update([0]);
        if let Ok(bytes) = std::fs::read(p) {
            h.update(&bytes);
        }
        h.update([0]);
    }
    let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    println!("cargo:rustc-env=REALIGN_SOURCE_HASH={hex}");
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rerun-if-changed=Cargo.toml");
    println!("cargo:rerun-if-changed=Cargo.lock");
    println!("cargo:rerun-if-changed=build.rs");
}
