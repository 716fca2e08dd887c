"""Packed documents from lengths or cu_seqlens, checked against attention run per document."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from maskc.dsl.errors import MaskTypeError

import maskc


def test_ids_from_lengths_and_offsets_agree():
    assert maskc.document_ids([3, 0, 2]).tolist() == [[0, 0, 0, 2, 2]]
    assert torch.equal(maskc.document_ids([3, 2]), maskc.document_ids(cu_seqlens=torch.tensor([0, 3, 5])))
    assert maskc.document_ids([2], total=4).tolist() == [[0, 0, 1, 2]]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({}, "exactly one"),
        ({"seqlens": [1], "cu_seqlens": [0, 1]}, "exactly one"),
        ({"cu_seqlens": [1, 3]}, "must start at 0"),
        ({"seqlens": [2, -1]}, "must be >= 0"),
        ({"seqlens": [2.5]}, "integers"),
        ({"seqlens": [2], "total": 1}, "total must be"),
    ],
)
def test_bad_lengths_are_named(kwargs, message):
    with pytest.raises(MaskTypeError, match=message):
        maskc.document_ids(**kwargs)


@pytest.mark.parametrize("backend", ["cpu", "triton", "flex"])
def test_packed_causal_attention_equals_attention_per_document(backend):
    lengths = [37, 5, 70, 20]
    ids = maskc.document_ids(lengths, total=140)  # 8 padding tokens at the end
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 140, 16, generator=g) for _ in range(3))
    out = maskc.compile("documents_causal")(q, k, v, ids=ids, backend=backend)
    start = 0
    for n in lengths:
        piece = slice(start, start + n)
        want = F.scaled_dot_product_attention(q[:, :, piece], k[:, :, piece], v[:, :, piece], is_causal=True)
        torch.testing.assert_close(out[:, :, piece], want, atol=2e-5, rtol=2e-5)
        start += n
    # a padding token attends only itself
    torch.testing.assert_close(out[:, :, start:], v[:, :, start:], atol=2e-5, rtol=2e-5)


def test_schedule_is_kept_while_the_ids_are_unchanged(monkeypatch):
    from maskc.runtime import prepare

    builds = []
    real_prepare = prepare.prepare_for_backend
    monkeypatch.setattr(prepare, "prepare_for_backend", lambda *a, **kw: builds.append(1) or real_prepare(*a, **kw))
    prog = maskc.compile("documents_causal & window(15, 0)")
    ids = maskc.document_ids([40, 60])
    q = k = v = torch.randn(2, 2, 100, 8)
    first = prog(q, k, v, ids=ids)
    second = prog(q, k, v, ids=ids)
    assert len(builds) == 1 and torch.equal(first, second)
    ids[0, 40:] = 0  # one document now: the schedule must follow
    third = prog(q, k, v, ids=ids)
    assert len(builds) == 2
    torch.testing.assert_close(third, prog(q, k, v, ids=ids, backend="reference"), atol=2e-5, rtol=2e-5)
    fresh = maskc.document_ids([40, 60])  # equal contents, another tensor: built again, same answer
    torch.testing.assert_close(prog(q, k, v, ids=fresh), first, atol=0, rtol=0)
