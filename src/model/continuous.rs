//! Continuous batching: a queue of prompts generated through a fixed number of slots. A
//! sequence that stops leaves the batch and prompts waiting in the queue take its place, so the
//! decoding steps run near the full batch until the queue is empty.
//!
//! [`generate`](fn@super::generate) is this with a slot for every prompt. With fixed batches
//! of a few prompts each, a batch runs until its longest reply is done: rows that stopped early
//! leave, and the last steps of every batch decode a handful of rows while reading all the
//! weights. An evaluation of 200 harmful prompts at 64 new tokens spends a large share of its
//! steps at that low occupancy; here those steps carry new prompts.
//!
//! Prompts join in groups ([`admit_at`] free slots; all the slots at the start, prefilled in
//! parts of `admit_at` prompts of similar lengths): a part's prefill is one left-padded batch
//! with the shared prefix computed once ([`shared_prefix`](super::generate::shared_prefix)), and their
//! keys/values are joined to the running cache aligned on the last position
//! ([`KvCache::join`]), the shorter histories padded on the left and masked. Positions come
//! from the mask (the count of real tokens before each one), so a row's positions do not depend
//! on when it joined. Leading positions that are padding for every row left are trimmed
//! ([`KvCache::drop_front`]).
//!
//! Each prompt's tokens are those [`generate`](fn@super::generate) gives it in any batch: the
//! arithmetic of a row does not read other rows, but padding and batch size change the order
//! of some sums, so a greedy reply can differ in the last bits where two tokens are nearly tied
//! (as between two batch sizes of plain batching).

use super::cache::KvCache;
use super::generate::{choose, decode_step, max_positions, prefill, rng_of, GenerationConfig};
use super::llama::Model;

/// Prompts join when at least this many slots are free (out of `slots`): `slots / 4`, at
/// least 1. Larger groups read the weights fewer times during prefill; smaller ones keep the
/// batch fuller.
pub fn admit_at(slots: usize) -> usize {
    (slots / 4).max(1)
}

/// Trim the history when at least this many leading positions are padding for every row.
const TRIM_AT: usize = 32;

/// One sequence in the running batch.
#[derive(Clone, Copy)]
struct Row {
    /// Index of its prompt.
    prompt: usize,
    /// Its newest token (the input of the next step).
    next: u32,
}

/// Generates continuations of every prompt (token ids), at most `slots` at a time, prompts
/// joining in queue order as others stop. Returns the new tokens of each prompt, in prompt order.
/// `done(i)` is called when prompt `i` has finished (for progress reports).
///
/// A reply also stops when its prompt and it fill the model's positions
/// ([`max_positions`]): it then has fewer than `cfg.max_new_tokens` tokens and no stop id,
/// as transformers stops at `max_length`.
///
/// Errors, before anything is generated: a prompt without room for a reply (as many tokens
/// as the model's positions, or more). While generating: logits that are NaN or infinite
/// (a broken model or adapter), naming the generated token.
pub fn generate_continuous(
    model: &Model,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
    slots: usize,
    done: &mut dyn FnMut(usize),
) -> crate::Result<Vec<Vec<u32>>> {
    let n = prompts.len();
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); n];
    if n == 0 || cfg.max_new_tokens == 0 {
        (0..n).for_each(&mut *done);
        return Ok(out);
    }
    if slots == 0 {
        return Err(
            super::ModelError::Input("continuous batching needs at least 1 slot".into()).into(),
        );
    }
    let limit = max_positions(model);
    if let Some((i, p)) = prompts.iter().enumerate().find(|(_, p)| p.len() >= limit) {
        return Err(super::ModelError::Input(format!(
            "prompt {i} has {} tokens, but the model's {}: no room for a reply",
            p.len(),
            model.config().positions_limit()
        ))
        .into());
    }
    // Whether a prompt's reply is done: a stop id, `max_new_tokens`, or the model's positions.
    let finished = |prompt: usize, tokens: &[u32]| {
        tokens.len() >= cfg.max_new_tokens
            || prompts[prompt].len() + tokens.len() >= limit
            || tokens.last().is_some_and(|t| cfg.stop_ids.contains(t))
    };
    let mut rng = rng_of(cfg.sampling);
    let mut cache = KvCache::new(model.config().num_hidden_layers);
    let mut mask: Vec<u8> = Vec::new();
    let mut rows: Vec<Row> = Vec::new();
    let mut queued = 0;
    loop {
        let free = slots - rows.len();
        if queued < n && (rows.is_empty() || free >= admit_at(slots)) {
            let group = queued..(queued + free).min(n);
            queued = group.end;
            // Prefilled in parts of similar lengths (shortest first, see `prefill_parts`): one
            // left-padded batch of all of them computes every short prompt's padding up to the
            // longest (a third of the positions of 32 prompts of 8-39 tokens).
            let mut order: Vec<usize> = group.collect();
            order.sort_by_key(|&i| prompts[i].len());
            let lens: Vec<usize> = order.iter().map(|&i| prompts[i].len()).collect();
            for range in prefill_parts(&lens) {
                let part = &order[range];
                let part_prompts: Vec<Vec<u32>> =
                    part.iter().map(|&i| prompts[i].clone()).collect();
                let pre = prefill(model, &part_prompts, cfg.pad_id)?;
                let first = choose(&pre.logits, cfg.sampling, rng.as_mut(), &|_| 1)?;
                let width = pre.mask.len() / first.len();
                let mut keep = Vec::with_capacity(first.len());
                for (r, (&prompt, &t)) in part.iter().zip(&first).enumerate() {
                    out[prompt].push(t);
                    if finished(prompt, &out[prompt]) {
                        done(prompt);
                    } else {
                        keep.push(r);
                        rows.push(Row { prompt, next: t });
                    }
                }
                if !keep.is_empty() {
                    let mut part_cache = pre.cache;
                    let mut part_mask = Vec::with_capacity(keep.len() * width);
                    for &r in &keep {
                        part_mask.extend_from_slice(&pre.mask[r * width..(r + 1) * width]);
                    }
                    if keep.len() < first.len() {
                        part_cache.retain_rows(&keep)?;
                    }
                    mask = join_masks(&mask, rows.len() - keep.len(), &part_mask, keep.len());
                    cache.join(part_cache)?;
                }
            }
            continue;
        }
        if rows.is_empty() {
            break;
        }
        // One step for every running row.
        let width = mask.len() / rows.len();
        let mut grown = Vec::with_capacity(rows.len() * (width + 1));
        for row in mask.chunks_exact(width) {
            grown.extend_from_slice(row);
            grown.push(1);
        }
        mask = grown;
        let next: Vec<u32> = rows.iter().map(|r| r.next).collect();
        let logits = decode_step(model, &next, &mask, &mut cache)?;
        let chosen = choose(&logits, cfg.sampling, rng.as_mut(), &|r| {
            out[rows[r].prompt].len() + 1
        })?;
        let mut keep = Vec::with_capacity(rows.len());
        for (r, &t) in chosen.iter().enumerate() {
            let prompt = rows[r].prompt;
            out[prompt].push(t);
            rows[r].next = t;
            if finished(prompt, &out[prompt]) {
                done(prompt);
            } else {
                keep.push(r);
            }
        }
        if keep.len() < rows.len() {
            let width = width + 1;
            let mut kept_mask = Vec::with_capacity(keep.len() * width);
            for &r in &keep {
                kept_mask.extend_from_slice(&mask[r * width..(r + 1) * width]);
            }
            mask = kept_mask;
            rows = keep.iter().map(|&r| rows[r]).collect();
            if rows.is_empty() {
                cache = KvCache::new(model.config().num_hidden_layers);
                mask.clear();
                continue;
            }
            cache.retain_rows(&keep)?;
            let lead = leading_padding(&mask, rows.len());
            if lead >= TRIM_AT {
                cache.drop_front(lead)?;
                let width = mask.len() / rows.len();
                mask = mask
                    .chunks_exact(width)
                    .flat_map(|row| row[lead..].iter().copied())
                    .collect();
            }
        }
    }
    Ok(out)
}

/// What one more prefill pass costs, in padded positions: the weights are read once more, and
/// the product of a pass is less efficient the fewer rows it has. On SmolLM2-135M (2 cores) a
/// position costs ~1 ms of prefill and a pass over the weights ~30 ms.
const PART_COST: usize = 32;

/// Splits prompts of these lengths (sorted, shortest first) into consecutive parts, one prefill
/// each, with the fewest padded positions (each part pads to its longest prompt) plus
/// [`PART_COST`] per part: exactly, by dynamic programming over where the parts end.
fn prefill_parts(lens: &[usize]) -> Vec<std::ops::Range<usize>> {
    let n = lens.len();
    // best[i]: the least cost of the first i prompts; from[i]: where its last part starts.
    let mut best = vec![0usize; n + 1];
    let mut from = vec![0usize; n + 1];
    for i in 1..=n {
        (best[i], from[i]) = (0..i)
            .map(|j| (best[j] + (i - j) * lens[i - 1] + PART_COST, j))
            .min()
            .unwrap_or((0, 0));
    }
    let mut parts = Vec::new();
    let mut end = n;
    while end > 0 {
        parts.push(from[end]..end);
        end = from[end];
    }
    parts.reverse();
    parts
}

/// The masks of `a_rows` rows (`a`) and then `b_rows` rows (`b`), each row-major, aligned on
/// their last position: the narrower rows padded with 0 on the left.
fn join_masks(a: &[u8], a_rows: usize, b: &[u8], b_rows: usize) -> Vec<u8> {
    let wa = a.len().checked_div(a_rows).unwrap_or(0);
    let wb = b.len().checked_div(b_rows).unwrap_or(0);
    let w = wa.max(wb);
    let mut out = Vec::with_capacity(w * (a_rows + b_rows));
    for (rows, width, m) in [(a_rows, wa, a), (b_rows, wb, b)] {
        if rows == 0 {
            continue;
        }
        for row in m.chunks_exact(width) {
            out.extend(std::iter::repeat_n(0u8, w - width));
            out.extend_from_slice(row);
        }
    }
    out
}

/// The number of leading positions that are padding (0) in every row of a `rows`-row mask.
fn leading_padding(mask: &[u8], rows: usize) -> usize {
    let width = mask.len() / rows.max(1);
    mask.chunks_exact(width.max(1))
        .map(|row| row.iter().take_while(|&&m| m == 0).count())
        .min()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefill_parts_are_the_cheapest_split() {
        let cost = |lens: &[usize], parts: &[std::ops::Range<usize>]| -> usize {
            parts
                .iter()
                .map(|r| r.len() * lens[r.end - 1] + PART_COST)
                .sum()
        };
        // Every split of up to 10 sorted lengths, by brute force over the 2^(n-1) cut sets.
        let mut seed = 7u64;
        for n in 1..=10usize {
            let mut lens: Vec<usize> = (0..n)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                    (seed >> 40) as usize % 80 + 1
                })
                .collect();
            lens.sort();
            let mut brute = usize::MAX;
            for cuts in 0u32..(1 << (n - 1)) {
                let mut parts = Vec::new();
                let mut start = 0;
                for i in 1..n {
                    if cuts & (1 << (i - 1)) != 0 {
                        parts.push(start..i);
                        start = i;
                    }
                }
                parts.push(start..n);
                brute = brute.min(cost(&lens, &parts));
            }
            let parts = prefill_parts(&lens);
            assert_eq!(parts.first().map(|r| r.start), Some(0));
            assert_eq!(parts.last().map(|r| r.end), Some(n));
            assert!(parts.windows(2).all(|w| w[0].end == w[1].start));
            assert_eq!(cost(&lens, &parts), brute, "{lens:?}");
        }
        // Equal lengths: one part; two far-apart clusters: two parts.
        assert_eq!(prefill_parts(&[20; 8]), vec![0..8]);
        assert_eq!(prefill_parts(&[10, 10, 10, 10, 200, 200]), vec![0..4, 4..6]);
        assert!(prefill_parts(&[]).is_empty());
    }

    #[test]
    fn masks_join_on_their_last_position() {
        // Two rows of width 3 and one of width 5.
        let a = [1u8, 1, 1, 0, 1, 1];
        let b = [1u8, 0, 0, 1, 1];
        assert_eq!(
            join_masks(&a, 2, &b, 1),
            [0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1, 0, 0, 1, 1]
        );
        // Joining to nothing gives the group itself.
        assert_eq!(join_masks(&[], 0, &b, 1), b);
    }

    #[test]
    fn leading_padding_is_the_least_over_rows() {
        assert_eq!(leading_padding(&[0, 0, 1, 0, 1, 1], 2), 1);
        assert_eq!(leading_padding(&[0, 0, 1, 0, 0, 1], 2), 2);
        assert_eq!(leading_padding(&[], 0), 0);
    }

    #[test]
    fn groups_join_at_a_quarter_of_the_slots() {
        assert_eq!(admit_at(32), 8);
        assert_eq!(admit_at(16), 4);
        assert_eq!(admit_at(3), 1);
    }
}
