"""Greedy generation from a small Llama-style model with maskc attention.

Builds a random-initialised Llama model from a config (no weights to
download), generates from a left-padded batch with transformers' sdpa and
with maskc's `causal` (the same tokens), then with StreamingLLM (`streaming`:
4 sink tokens and a 32-token window), and prints the tokens and the time per
generated token.  Needs ``pip install 'maskc[transformers]'``.
"""

from __future__ import annotations

import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import maskc.integrations.transformers as maskc_hf

NEW_TOKENS = 32


def generate(model, impl: str, input_ids, attention_mask):
    model.set_attn_implementation(impl)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            input_ids,
            attention_mask=attention_mask,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            cache=DynamicCache(config=model.config),
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return out, (time.perf_counter() - start) / NEW_TOKENS


def main() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,  # GQA: maskc reads the 2 KV heads without repeating them
        max_position_embeddings=1024,
        initializer_range=0.1,
        pad_token_id=0,
        eos_token_id=None,  # random weights: generate all NEW_TOKENS
    )
    model = LlamaForCausalLM(config).eval()

    # Two prompts of 96 and 60 tokens, left-padded to one batch.
    input_ids = torch.randint(1, config.vocab_size, (2, 96))
    attention_mask = torch.ones_like(input_ids)
    input_ids[1, :36], attention_mask[1, :36] = 0, 0

    maskc_hf.register("maskc_causal", "causal")
    results = {impl: generate(model, impl, input_ids, attention_mask) for impl in ("sdpa", "maskc_causal")}
    reference = results["sdpa"][0]
    for impl, (out, per_token) in results.items():
        same = torch.equal(out.sequences, reference.sequences)
        logits = max((a - b).abs().max().item() for a, b in zip(out.logits, reference.logits, strict=True))
        print(
            f"{impl}: {per_token * 1e3:.1f} ms per token, same tokens as sdpa: {same}, max |logits - sdpa| {logits:.2e}"
        )
        for row in out.sequences[:, input_ids.shape[1] :].tolist():
            print("   ", row[:16], "...")

    # StreamingLLM keeps the first 4 positions: with left padding those would be pad slots, so one
    # unpadded prompt here (positions are cache slots, see maskc.integrations.transformers).
    maskc_hf.register("maskc_streaming", "streaming", sinks=4, w=32)
    out, per_token = generate(model, "maskc_streaming", input_ids[:1], attention_mask[:1])
    new = out.sequences[0, input_ids.shape[1] :]
    agree = int((new == reference.sequences[0, input_ids.shape[1] :]).sum())
    print(f"maskc_streaming: {per_token * 1e3:.1f} ms per token, {agree} of {NEW_TOKENS} tokens as full attention's")
    print("   ", new[:16].tolist(), "...")


if __name__ == "__main__":
    main()
