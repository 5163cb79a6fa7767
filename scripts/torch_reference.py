#!/usr/bin/env python3
"""PyTorch reference for `realign bench train|forward|gemm` (run by scripts/bench-vs-torch.sh).

Same shapes as realign's bench: SmolLM2-135M in f32 (dequantised from the GGUF by transformers),
random token ids (seed 0) in [100, vocab), batch 8 x 128.

* prefill: logits at every position, `torch.inference_mode()`; and a long prompt, batch 2 x 1024,
  logits at the last position only (`prefill_long_tokens_per_s`).
* decode: `generate`, greedy, exactly 64 new tokens: batch 1 after a 16-token prompt, in f32
  and with the model cast to bf16 (`decode_bf16_tokens_per_s`); batch 16 and 32 after
  left-padded prompts of 8.. tokens (`batched_decode_tokens_per_s`, `batched32_...`), as
  `realign bench forward` measures them.
* train: peft LoRA r 16, alpha 32, dropout 0 on q,k,v,o,gate,up,down; labels on the last 64
  positions of each row (-100 elsewhere); one step = forward with labels (transformers' loss),
  backward, torch.optim.AdamW (lr 1e-4).
* gemm (no model): `torch.nn.functional.linear(x, W)` with x [1024, in] and W [out, in] uniform
  in [-1, 1) on SmolLM2-135M's prefill shapes (gate/up 1536 x 576, down 576 x 1536, q/o 576 x
  576, LM head 49152 x 576), in GFLOP/s, as `realign bench gemm` measures `x Wᵀ`.

Prints one JSON line per figure, best of --repeats after one warm-up, like `realign bench`.
"""
import argparse
import json
import os
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a .gguf file or a Hugging Face model folder")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repetitions, best reported (default 3)")
    ap.add_argument("--only", choices=["train", "forward", "gemm"], help="run one benchmark only")
    args = ap.parse_args()

    import torch
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)

    def best_of(f):
        f()  # warm-up
        best = float("inf")
        for _ in range(args.repeats):
            t = time.perf_counter()
            f()
            best = min(best, time.perf_counter() - t)
        return best

    def emit(bench, metric, value, detail, unit="tokens/s"):
        print(json.dumps({"bench": bench, "metric": metric, "value": value, "unit": unit,
                          "detail": detail + f"; torch {torch.__version__}, {args.threads} threads, best of {args.repeats}"}),
              flush=True)

    if args.only == "gemm":
        gen = torch.Generator().manual_seed(0)
        m = 1024
        for name, n, k in [("gate_up", 1536, 576), ("down", 576, 1536), ("q_o", 576, 576), ("lm_head", 49152, 576)]:
            x = torch.rand(m, k, generator=gen) * 2 - 1
            w = torch.rand(n, k, generator=gen) * 2 - 1
            with torch.inference_mode():
                secs = best_of(lambda: torch.nn.functional.linear(x, w))
            emit("gemm", f"{name}_gflops", 2 * m * n * k / secs / 1e9,
                 f"torch.nn.functional.linear, x [{m}, {k}], W [{n}, {k}]", unit="GFLOP/s")
        return

    from transformers import AutoModelForCausalLM

    if args.model.endswith(".gguf"):
        folder, name = os.path.split(os.path.abspath(args.model))
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    vocab = model.config.vocab_size
    b, s = 8, 128
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, vocab, (b, s), generator=gen)


    if args.only in (None, "forward"):
        model.eval()

        def prefill():
            with torch.inference_mode():
                model(ids).logits

        emit("forward", "prefill_tokens_per_s", b * s / best_of(prefill),
             f"transformers, batch {b} x {s}, logits at every position")

        lb, ls = 2, 1024
        long_ids = torch.randint(100, vocab, (lb, ls), generator=gen)

        def prefill_long():
            with torch.inference_mode():
                model(long_ids, logits_to_keep=1).logits

        emit("forward", "prefill_long_tokens_per_s", lb * ls / best_of(prefill_long),
             f"transformers, batch {lb} x {ls}, logits at the last position only")

        new = 64

        def decode(m, prompts):
            width = max(len(p) for p in prompts)
            pad = 0
            input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
            with torch.inference_mode():
                m.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new,
                           min_new_tokens=new, do_sample=False, pad_token_id=pad)

        def rand_prompt(n):
            return torch.randint(100, vocab, (n,), generator=gen).tolist()

        one = [rand_prompt(16)]
        emit("forward", "decode_tokens_per_s", new / best_of(lambda: decode(model, one)),
             f"transformers generate, f32, batch 1, 16-token prompt, {new} greedy tokens")
        for batch, metric in [(16, "batched_decode_tokens_per_s"), (32, "batched32_decode_tokens_per_s")]:
            prompts = [rand_prompt(8 + i) for i in range(batch)]
            emit("forward", metric, batch * new / best_of(lambda: decode(model, prompts)),
                 f"transformers generate, f32, batch {batch}, left-padded 8..{8 + batch - 1}-token prompts, {new} greedy tokens each")
        bf16 = model.to(torch.bfloat16)
        emit("forward", "decode_bf16_tokens_per_s", new / best_of(lambda: decode(bf16, one)),
             f"transformers generate, model cast to bf16, batch 1, 16-token prompt, {new} greedy tokens")
        model = bf16.to(torch.float32)  # back to f32 (in place) for the train figure

    if args.only in (None, "train"):
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        peft_model = get_peft_model(model, cfg)
        peft_model.train()
        labels = ids.clone()
        labels[:, : s - 64] = -100
        opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = peft_model(input_ids=ids, labels=labels).loss
            loss.backward()
            opt.step()

        emit("train", "train_tokens_per_s", b * s / best_of(step),
             f"transformers + peft, LoRA r 16 on q,k,v,o,gate,up,down; batch {b} x {s}; forward + backward + AdamW")


if __name__ == "__main__":
    main()
