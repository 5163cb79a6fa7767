//! The real SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised), fetched by `scripts/setup.sh`.
//! Without it these tests fail, unless `REALIGN_SKIP_ASSETS=1`.

mod common;

use std::path::PathBuf;

use realign::model::{
    generate, GenerationConfig, LoadOptions, LoadedModel, RopeScalingKind, Sampling,
};
use realign::tokenizer::ChatMessage;

fn model_path() -> Option<PathBuf> {
    common::smollm2_gguf()
}

#[test]
fn config_from_gguf_metadata() {
    let Some(p) = model_path() else { return };
    let m = LoadedModel::load(&p, &LoadOptions::default()).unwrap();
    let c = m.model.config();
    assert_eq!(
        (
            c.num_hidden_layers,
            c.hidden_size,
            c.intermediate_size,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
            c.vocab_size
        ),
        (30, 576, 1536, 9, 3, 64, 49152)
    );
    assert!(c.tie_word_embeddings);
    assert_eq!(c.rope_theta, 100_000.0);
    assert_eq!(
        RopeScalingKind::of(&c.rope_scaling),
        RopeScalingKind::Default
    );
    assert_eq!(m.model.num_parameters(), 134_515_008);
    assert_eq!(m.source.dtype, "Q4_1");
}

#[test]
fn greedy_answer_names_paris() {
    let Some(p) = model_path() else { return };
    let m = LoadedModel::load(&p, &LoadOptions::default()).unwrap();
    let text = m
        .tokenizer
        .render_chat(&[ChatMessage::user("What is the capital of France?")], true)
        .unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    );
    let ids = m.tokenizer.encode(&text, false).unwrap();
    let cfg = GenerationConfig {
        max_new_tokens: 24,
        sampling: Sampling::Greedy,
        stop_ids: m.tokenizer.stop_token_ids(),
        pad_id: m.tokenizer.pad_token_id().unwrap(),
    };
    let out = generate(&m.model, &[ids], &cfg).unwrap().remove(0);
    // The reply ends with <|im_end|> (id 2), the template's end token.
    assert_eq!(out.last(), Some(&2), "{out:?}");
    let reply = m.tokenizer.decode(&out, true).unwrap();
    assert!(reply.contains("Paris"), "{reply:?}");
}

/// Batched generation with left padding gives each prompt the tokens it gets alone.
#[test]
fn batched_greedy_equals_single() {
    let Some(p) = model_path() else { return };
    let m = LoadedModel::load(&p, &LoadOptions::default()).unwrap();
    let prompts: Vec<Vec<u32>> = [
        "What is the capital of France?",
        "Name a colour.",
        "Write one word about the sea, please, and nothing else.",
    ]
    .iter()
    .map(|q| {
        let t = m
            .tokenizer
            .render_chat(&[ChatMessage::user(*q)], true)
            .unwrap();
        m.tokenizer.encode(&t, false).unwrap()
    })
    .collect();
    let cfg = GenerationConfig {
        max_new_tokens: 10,
        sampling: Sampling::Greedy,
        stop_ids: vec![2],
        pad_id: 2,
    };
    let batched = generate(&m.model, &prompts, &cfg).unwrap();
    for (i, p) in prompts.iter().enumerate() {
        let single = generate(&m.model, std::slice::from_ref(p), &cfg)
            .unwrap()
            .remove(0);
        assert_eq!(batched[i], single, "prompt {i}");
    }
}

/// Ten prompts (the register-blocked few-row products: 9-16 rows use 16-lane tiles, 5-8 rows
/// 8-lane tiles, fewer the dot products), with stop tokens picked so that some sequences stop
/// early and leave the batch while the others run on: every prompt still gets the tokens it
/// gets alone, in one batch and through continuous batching.
#[test]
fn batched_greedy_with_early_stops_equals_single() {
    let Some(p) = model_path() else { return };
    let m = LoadedModel::load(&p, &LoadOptions::default()).unwrap();
    let prompts: Vec<Vec<u32>> = [
        "What is the capital of France?",
        "Name a colour.",
        "Write one word about the sea, please, and nothing else.",
        "How many legs does a spider have?",
        "Say hello.",
        "What is 2 + 2?",
        "Give me a synonym of happy.",
        "Which planet is the largest?",
        "Tell me a fruit that is yellow.",
        "What do bees make?",
    ]
    .iter()
    .map(|q| {
        let t = m
            .tokenizer
            .render_chat(&[ChatMessage::user(*q)], true)
            .unwrap();
        m.tokenizer.encode(&t, false).unwrap()
    })
    .collect();
    let max_new_tokens = 12;
    let free = GenerationConfig {
        max_new_tokens,
        sampling: Sampling::Greedy,
        stop_ids: vec![],
        pad_id: 2,
    };
    let alone = |p: &Vec<u32>, cfg: &GenerationConfig| {
        generate(&m.model, std::slice::from_ref(p), cfg)
            .unwrap()
            .remove(0)
    };
    // Stop on what prompt 0 emits third and prompt 1 emits sixth.
    let (a, b) = (alone(&prompts[0], &free), alone(&prompts[1], &free));
    let cfg = GenerationConfig {
        stop_ids: vec![a[2], b[5]],
        ..free
    };
    let batched = generate(&m.model, &prompts, &cfg).unwrap();
    let singles: Vec<Vec<u32>> = prompts.iter().map(|p| alone(p, &cfg)).collect();
    for (i, single) in singles.iter().enumerate() {
        assert_eq!(&batched[i], single, "prompt {i}");
    }
    // Continuous batching through 4 slots: prompts join one at a time as others stop (the
    // shared system turn computed per group, histories of different lengths aligned on the
    // right), and still every prompt gets its tokens alone.
    let mut finished = Vec::new();
    let queued =
        realign::model::generate_continuous(&m.model, &prompts, &cfg, 4, &mut |i| finished.push(i))
            .unwrap();
    assert_eq!(queued, singles);
    finished.sort_unstable();
    assert_eq!(finished, (0..prompts.len()).collect::<Vec<_>>());
    // Sequences left the batch early and others ran to the end.
    assert!(batched[0].len() <= 3, "{:?}", batched[0]);
    assert!(batched[1].len() <= 6, "{:?}", batched[1]);
    assert!(
        batched.iter().any(|o| o.len() == max_new_tokens),
        "{batched:?}"
    );
}
