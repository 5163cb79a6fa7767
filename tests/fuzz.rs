//! Property tests of the parsers that read what users upload (issue 15): random and mutated
//! safetensors files (model weights and adapters), GGUF headers, `adapter_config.json`, data
//! rows, and chat templates never panic, and a header that claims more data than the file holds
//! is an error, not an allocation. Bounded to a few seconds each (`PROPTEST_CASES` overrides
//! the case counts).

mod common;

use std::path::PathBuf;

use candle_core::Device;
use common::{copy_dir, fixtures};
use proptest::prelude::*;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(cases),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// `bytes` with each `(position, value)` written over it (positions taken modulo the length)
/// and then cut to `cut` bytes (modulo the length + 1) when given.
fn mutate(bytes: &[u8], edits: &[(usize, u8)], cut: Option<usize>) -> Vec<u8> {
    let mut out = bytes.to_vec();
    if !out.is_empty() {
        for &(at, v) in edits {
            let n = out.len();
            out[at % n] = v;
        }
    }
    if let Some(c) = cut {
        out.truncate(c % (out.len() + 1));
    }
    out
}

fn edits() -> impl Strategy<Value = (Vec<(usize, u8)>, Option<usize>)> {
    (
        prop::collection::vec((any::<usize>(), any::<u8>()), 0..8),
        prop::option::of(any::<usize>()),
    )
}

/// Mutations aimed at the header: positions in the first `span` bytes.
fn header_edits(span: usize) -> impl Strategy<Value = (Vec<(usize, u8)>, Option<usize>)> {
    (
        prop::collection::vec((0..span, any::<u8>()), 1..6),
        prop::option::of(any::<usize>()),
    )
}

fn temp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn adapter_dir() -> PathBuf {
    fixtures().join("tiny-llama-adapters/aligned")
}

/// A small valid GGUF v3 file: two metadata entries and one 4 x 2 f32 tensor.
fn small_gguf() -> Vec<u8> {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(1u64.to_le_bytes()); // tensors
    b.extend(2u64.to_le_bytes()); // metadata entries
    string(&mut b, "general.architecture");
    b.extend(8u32.to_le_bytes()); // string
    string(&mut b, "llama");
    string(&mut b, "llama.block_count");
    b.extend(4u32.to_le_bytes()); // u32
    b.extend(1u32.to_le_bytes());
    string(&mut b, "token_embd.weight");
    b.extend(2u32.to_le_bytes()); // dims
    b.extend(2u64.to_le_bytes());
    b.extend(4u64.to_le_bytes());
    b.extend(0u32.to_le_bytes()); // f32
    b.extend(0u64.to_le_bytes()); // offset
    while b.len() % 32 != 0 {
        b.push(0);
    }
    for i in 0..8 {
        b.extend((i as f32).to_le_bytes());
    }
    b
}

#[test]
fn the_small_gguf_is_valid() {
    let dir = temp();
    let p = dir.path().join("m.gguf");
    std::fs::write(&p, small_gguf()).unwrap();
    let c = realign::model::gguf::read_content(&p).unwrap();
    assert_eq!(c.tensor_infos.len(), 1);
    assert_eq!(c.metadata.len(), 2);
}

#[test]
fn headers_that_claim_more_than_the_file_are_errors() {
    let dir = temp();
    // safetensors: one tensor of 10^12 elements in a 100-byte file
    let header =
        br#"{"w":{"dtype":"F32","shape":[1000000,1000000],"data_offsets":[0,4000000000000]}}"#;
    let mut st = (header.len() as u64).to_le_bytes().to_vec();
    st.extend(header);
    st.extend([0u8; 16]);
    let p = dir.path().join("huge.safetensors");
    std::fs::write(&p, &st).unwrap();
    let err = realign::model::weights::load_safetensors(
        &p,
        &Device::Cpu,
        realign::model::StorageDtype::Auto,
    )
    .unwrap_err();
    assert!(err.to_string().contains("huge.safetensors"), "{err}");
    // safetensors: a header length of 2^60
    let mut st = (1u64 << 60).to_le_bytes().to_vec();
    st.extend(b"{}");
    std::fs::write(&p, &st).unwrap();
    assert!(realign::model::weights::load_safetensors(
        &p,
        &Device::Cpu,
        realign::model::StorageDtype::Auto
    )
    .is_err());
    // GGUF: 10^12 tensors, a string of 10^12 bytes
    let g = dir.path().join("huge.gguf");
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(1_000_000_000_000u64.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    std::fs::write(&g, &b).unwrap();
    let err = realign::model::gguf::read_content(&g).unwrap_err();
    assert!(err.to_string().contains("huge.gguf"), "{err}");
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.extend(1u64.to_le_bytes());
    b.extend(1_000_000_000_000u64.to_le_bytes());
    b.extend(b"abc");
    std::fs::write(&g, &b).unwrap();
    assert!(realign::model::gguf::read_content(&g).is_err());
}

/// A case the Parquet property test found (CI, 2026-12-05): one byte of the footer changed makes
/// a column chunk's offset negative, on which parquet's reader asserts. It is an error naming
/// the file and the column.
#[test]
fn a_parquet_footer_with_a_negative_offset_is_an_error() {
    let dir = temp();
    let p = dir.path().join("b.parquet");
    common::write_parquet(
        &p,
        &[
            ("Behavior", vec!["one", "two", "three", "four"]),
            ("c", vec!["x", "y", "z", "w"]),
        ],
        Some(("label", vec![1, 0, 1, 0])),
    );
    let src = std::fs::read(&p).unwrap();
    let n = src.len();
    let bytes = mutate(
        &mutate(&src, &[(3687978681975647826, 11)], None),
        &[(n - 15, 17)],
        None,
    );
    std::fs::write(&p, bytes).unwrap();
    let err = realign::data::load_prompts(&p.display().to_string(), None).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("b.parquet") && text.contains("column `"),
        "{text}"
    );
}

proptest! {
    #![proptest_config(config(96))]

    /// Mutated model weights: the loader answers Ok or Err, never panics.
    #[test]
    fn mutated_model_safetensors_never_panic((e, cut) in header_edits(512)) {
        let src = std::fs::read(fixtures().join("tiny-llama/model.safetensors")).unwrap();
        let dir = temp();
        let p = dir.path().join("model.safetensors");
        std::fs::write(&p, mutate(&src, &e, cut)).unwrap();
        let _ = realign::model::weights::load_safetensors(&p, &Device::Cpu, realign::model::StorageDtype::Auto);
    }

    /// Mutated adapter weights (header and data): Ok or Err, never a panic.
    #[test]
    fn mutated_adapter_weights_never_panic((e, cut) in edits(), (h, hcut) in header_edits(256)) {
        let src = std::fs::read(adapter_dir().join("adapter_model.safetensors")).unwrap();
        let dir = temp();
        copy_dir(&adapter_dir(), dir.path());
        let bytes = mutate(&mutate(&src, &e, None), &h, cut.or(hcut));
        std::fs::write(dir.path().join("adapter_model.safetensors"), bytes).unwrap();
        let _ = realign::adapters::Adapter::load(dir.path(), &Device::Cpu);
    }

    /// Random bytes as a safetensors file.
    #[test]
    fn random_bytes_as_safetensors_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let dir = temp();
        let p = dir.path().join("r.safetensors");
        std::fs::write(&p, &bytes).unwrap();
        prop_assert!(realign::model::weights::load_safetensors(&p, &Device::Cpu, realign::model::StorageDtype::Auto).is_err() || bytes.len() >= 8);
    }

    /// Mutated GGUF headers and random bytes after the magic.
    #[test]
    fn mutated_gguf_never_panics((e, cut) in header_edits(200), tail in prop::collection::vec(any::<u8>(), 0..200)) {
        let dir = temp();
        let p = dir.path().join("m.gguf");
        std::fs::write(&p, mutate(&small_gguf(), &e, cut)).unwrap();
        if let Ok(c) = realign::model::gguf::read_content(&p) {
            let _ = realign::model::gguf::config_from_gguf(&c, &p);
        }
        let mut b = b"GGUF\x03\x00\x00\x00".to_vec();
        b.extend(&tail);
        std::fs::write(&p, &b).unwrap();
        let _ = realign::model::gguf::read_content(&p);
    }

    /// adapter_config.json with random values for its keys, and mutated text.
    #[test]
    fn adapter_configs_never_panic(
        r in prop_oneof![Just(serde_json::json!(8)), any::<i64>().prop_map(|v| serde_json::json!(v)), Just(serde_json::json!("8")), Just(serde_json::json!(null)), Just(serde_json::json!(0))],
        alpha in prop_oneof![Just(serde_json::json!(16)), any::<f64>().prop_map(|v| serde_json::json!(v)), Just(serde_json::json!(-1))],
        targets in prop_oneof![Just(serde_json::json!(["q_proj"])), Just(serde_json::json!("all-linear")), Just(serde_json::json!(7)), Just(serde_json::json!([]))],
        peft_type in prop_oneof![Just("LORA"), Just("IA3"), Just(""), Just("lora")],
        (e, cut) in edits(),
    ) {
        let dir = temp();
        copy_dir(&adapter_dir(), dir.path());
        let cfg = dir.path().join("adapter_config.json");
        let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&cfg).unwrap()).unwrap();
        v["r"] = r;
        v["lora_alpha"] = alpha;
        v["target_modules"] = targets;
        v["peft_type"] = serde_json::json!(peft_type);
        std::fs::write(&cfg, serde_json::to_vec(&v).unwrap()).unwrap();
        let _ = realign::adapters::Adapter::load(dir.path(), &Device::Cpu);
        let text = std::fs::read(&cfg).unwrap();
        std::fs::write(&cfg, mutate(&text, &e, cut)).unwrap();
        let _ = realign::adapters::Adapter::load(dir.path(), &Device::Cpu);
    }

    /// Data files of every format with random lines: Ok or an error, never a panic.
    #[test]
    fn data_rows_never_panic(
        lines in prop::collection::vec(
            prop_oneof![
                "[ -~]{0,40}",
                Just("{\"prompt\": \"a\", \"completion\": \"b\"}".to_string()),
                Just("{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\"}".to_string()),
                Just("{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}".to_string()),
                Just("{\"messages\": 3}".to_string()),
                Just("{\"prompt\": null}".to_string()),
                Just("[1, 2]".to_string()),
                Just("\"just a string\"".to_string()),
            ],
            0..6,
        ),
        ext in prop_oneof![Just("jsonl"), Just("json"), Just("csv"), Just("txt")],
    ) {
        let dir = temp();
        let p = dir.path().join(format!("rows.{ext}"));
        std::fs::write(&p, lines.join("\n")).unwrap();
        let _ = realign::data::load_rows(&p);
    }

    /// Mutated Parquet files (footer, page headers, data): Ok or Err, never a panic.
    #[test]
    fn mutated_parquet_never_panics((e, cut) in edits(), (h, hcut) in header_edits(64)) {
        let dir = temp();
        let p = dir.path().join("b.parquet");
        common::write_parquet(
            &p,
            &[("Behavior", vec!["one", "two", "three", "four"]), ("c", vec!["x", "y", "z", "w"])],
            Some(("label", vec![1, 0, 1, 0])),
        );
        let src = std::fs::read(&p).unwrap();
        // the footer (metadata and its length) is at the end: mutate there too
        let n = src.len();
        let tail: Vec<(usize, u8)> = h.iter().map(|&(at, v)| (n - 1 - at % n.min(64), v)).collect();
        std::fs::write(&p, mutate(&mutate(&src, &e, None), &tail, cut.or(hcut))).unwrap();
        let _ = realign::data::load_prompts(&p.display().to_string(), None);
    }

    /// Chat templates assembled from Jinja fragments: rendering answers Ok or Err.
    #[test]
    fn chat_templates_never_panic(
        parts in prop::collection::vec(
            prop_oneof![
                Just("{{ bos_token }}"),
                Just("{% for m in messages %}"),
                Just("{% endfor %}"),
                Just("{{ m['content'] }}"),
                Just("{{ m.role }}"),
                Just("{% if add_generation_prompt %}"),
                Just("{% endif %}"),
                Just("{{ raise_exception('no') }}"),
                Just("{{ messages[5].content }}"),
                Just("{{ undefined_thing }}"),
                Just("{{ messages | length }}"),
                Just("{%"),
                Just("}}"),
                Just("text"),
                Just("{{ (messages | first).content | upper }}"),
                Just("{{ 1 / 0 }}"),
            ],
            0..8,
        ),
    ) {
        let dir = temp();
        copy_dir(&fixtures().join("tiny-llama"), dir.path());
        std::fs::write(dir.path().join("chat_template.jinja"), parts.concat()).unwrap();
        if let Ok(tok) = realign::tokenizer::Tokenizer::from_hf_dir(dir.path()) {
            let msgs = [
                realign::tokenizer::ChatMessage::system("s"),
                realign::tokenizer::ChatMessage::user("u"),
            ];
            let _ = tok.render_chat(&msgs, true);
        }
    }
}

/// The keys of `config.json` that set shapes, counts and constants of the network.
const CONFIG_KEYS: &[&str] = &[
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "num_hidden_layers",
    "vocab_size",
    "rms_norm_eps",
    "max_position_embeddings",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "rope_parameters",
    "sliding_window",
    "model_type",
];

/// Values a hand-edited or damaged `config.json` may hold: zero, negative, odd, huge, the wrong
/// JSON type.
fn config_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::json;
    prop_oneof![
        Just(json!(0)),
        Just(json!(-1)),
        Just(json!(1)),
        Just(json!(3)),
        Just(json!(7)),
        Just(json!(1u64 << 40)),
        Just(json!(u64::MAX)),
        Just(json!(1e300)),
        Just(json!(-0.5)),
        Just(json!("64")),
        Just(json!(null)),
        Just(json!([4, 4])),
        Just(json!({"rope_type": "llama3", "factor": 0.0, "rope_theta": -1.0})),
        Just(json!({"rope_type": "linear", "factor": 0})),
        Just(json!({"rope_type": "yarn"})),
        (0i64..1000).prop_map(|v| json!(v)),
    ]
}

proptest! {
    #![proptest_config(config(48))]

    /// `config.json` with adversarial values for its shape keys: loading the folder and a
    /// forward pass over three tokens answer Ok or Err, never panic.
    #[test]
    fn model_configs_never_panic(
        edits in prop::collection::vec((0..CONFIG_KEYS.len(), config_value()), 1..4),
        arch in prop_oneof![Just("tiny-llama"), Just("tiny-qwen2")],
    ) {
        let dir = temp();
        copy_dir(&fixtures().join(arch), dir.path());
        let cfg = dir.path().join("config.json");
        let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&cfg).unwrap()).unwrap();
        for (k, val) in edits {
            v[CONFIG_KEYS[k]] = val;
        }
        std::fs::write(&cfg, serde_json::to_vec(&v).unwrap()).unwrap();
        let opts = realign::model::LoadOptions::default();
        if let Ok(lm) = realign::model::LoadedModel::load(dir.path(), &opts) {
            let ids = candle_core::Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap();
            let _ = lm.model.forward(&ids);
        }
    }
}

proptest! {
    #![proptest_config(config(48))]

    /// Mutated `tokenizer.json` and `tokenizer_config.json`: loading the tokenizer, encoding a
    /// sentence and rendering a chat answer Ok or Err, never panic.
    #[test]
    fn mutated_tokenizer_files_never_panic(
        (e, cut) in edits(),
        (c, ccut) in edits(),
        which in 0usize..3,
        arch in prop_oneof![Just("tiny-llama"), Just("tiny-qwen2")],
    ) {
        let dir = temp();
        copy_dir(&fixtures().join(arch), dir.path());
        if which != 1 {
            let p = dir.path().join("tokenizer.json");
            let src = std::fs::read(&p).unwrap();
            std::fs::write(&p, mutate(&src, &e, cut)).unwrap();
        }
        if which != 0 {
            let p = dir.path().join("tokenizer_config.json");
            if let Ok(src) = std::fs::read(&p) {
                std::fs::write(&p, mutate(&src, &c, ccut)).unwrap();
            }
        }
        if let Ok(tok) = realign::tokenizer::Tokenizer::from_hf_dir(dir.path()) {
            let _ = tok.encode("Hello, world! Ünïcödé 123", true);
            let msgs = [realign::tokenizer::ChatMessage::user("How do I bake bread?")];
            let _ = tok.render_chat(&msgs, true);
        }
    }
}
