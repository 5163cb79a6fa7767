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
/// Runs the `realign` binary with `args` and returns what it did.
pub fn realign(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_realign"))
        .args(args)
        .output()
        .unwrap()
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// A Parquet file as `datasets` writes one: UTF-8 string columns (and an int64 label column
/// when `labels` is given), snappy-compressed, the rows split over two row groups.
pub fn write_parquet(path: &Path, columns: &[(&str, Vec<&str>)], labels: Option<(&str, Vec<i64>)>) {
    write_parquet_with(path, columns, labels, parquet::basic::Compression::SNAPPY);
}

/// [`write_parquet`] with another compression codec.
pub fn write_parquet_with(
    path: &Path,
    columns: &[(&str, Vec<&str>)],
    labels: Option<(&str, Vec<i64>)>,
    compression: parquet::basic::Compression,
) {
    use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use std::sync::Arc;
    let mut fields: Vec<String> = columns
        .iter()
        .map(|(n, _)| format!("REQUIRED BINARY {n} (UTF8);"))
        .collect();
    if let Some((n, _)) = &labels {
        fields.push(format!("REQUIRED INT64 {n};"));
    }
    let schema = Arc::new(
        parquet::schema::parser::parse_message_type(&format!(
            "message schema {{ {} }}",
            fields.join(" ")
        ))
        .unwrap(),
    );
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(compression)
            .build(),
    );
    let mut writer =
        SerializedFileWriter::new(std::fs::File::create(path).unwrap(), schema, props).unwrap();
    let rows = columns[0].1.len();
    for range in [0..rows / 2, rows / 2..rows] {
        let mut group = writer.next_row_group().unwrap();
        let mut i = 0;
        while let Some(mut col) = group.next_column().unwrap() {
            if i < columns.len() {
                let values: Vec<ByteArray> = columns[i].1[range.clone()]
                    .iter()
                    .map(|v| ByteArray::from(*v))
                    .collect();
                col.typed::<ByteArrayType>()
                    .write_batch(&values, None, None)
                    .unwrap();
            } else if let Some((_, l)) = &labels {
                col.typed::<Int64Type>()
                    .write_batch(&l[range.clone()], None, None)
                    .unwrap();
            }
            col.close().unwrap();
            i += 1;
        }
        group.close().unwrap();
    }
    writer.close().unwrap();
}
