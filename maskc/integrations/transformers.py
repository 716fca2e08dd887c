"""Hugging Face transformers models with maskc attention.

`register(name, spec, **params)` makes ``name`` an attention implementation of
transformers: a model loaded with ``attn_implementation=name``, or switched
with ``model.set_attn_implementation(name)``, runs every attention layer on
maskc's exact block schedules for the pattern, with the batch's padding
combined into the pattern per batch element.  Needs ``pip install
'maskc[transformers]'`` (transformers >= 4.56); ``import maskc`` never imports
transformers.  Checked with transformers 5.24 (encoders and decoders) and
4.56 (decoders; its BERT-family encoders do not call ``AttentionInterface``
yet, and it passes ``cache_position`` where 5.x passes ``q_offset``).

Example Usage:
    .. code-block:: python

        import maskc
        import maskc.integrations.transformers as maskc_hf
        from transformers import AutoModel, AutoModelForCausalLM

        # an encoder: each token sees 32 tokens on each side
        maskc_hf.register("maskc_window", "sliding_window", w=32)
        model = AutoModel.from_pretrained(path, attn_implementation="maskc_window")
        out = model(**tokenizer(sentences, padding=True, return_tensors="pt"))

        # a decoder: the pattern replaces the model's mask, so it says `causal` itself
        maskc_hf.register("maskc_streaming", "streaming", sinks=4, w=1024)
        model.set_attn_implementation("maskc_streaming")

        # alternating local/global layers (Gemma 2/3, Mistral-style configs): a pattern per kind
        maskc_hf.register("maskc_local_global", {"full": "causal", "sliding": maskc.compile("mistral", w=512)})

How it plugs in.  transformers builds a layer's mask through the mask function
registered under the implementation's name in ``AttentionMaskInterface``; for
a name it does not know it silently passes ``attention_mask=None``, and the
padding is lost.  So `register` registers two functions:

- the mask function, called once per forward (and per kind of layer) with the
  sizes, the offsets and the 2-D padding mask.  It returns a `MaskcMask`, not a
  dense mask: the padding as ids for ``segments`` (0 for a real token, a
  distinct negative id per padded slot), which queries are real, and maskc's
  ``q_offset``.  Every layer of that kind receives it as ``attention_mask``;
- the attention function, called by every layer with
  ``(module, query, key, value, attention_mask, scaling, dropout, softcap, ...)``.
  It runs ``(pattern) & segments(pad_ids)`` — a real query never sees a padded
  key, exactly and per batch element, on the schedule without any [B, L, L]
  tensor — zeroes the rows of padded queries, and returns
  ``(output [B, L, H, D], None)``.  GQA runs without repeating K/V;
  ``scaling`` is the softmax scale and ``softcap`` is applied to the scaled
  logits (``pattern with softcap(c)``).  The layers of one forward pass the
  same ids tensor, so maskc builds each program's schedule once per forward
  (it keeps schedules while their tensor bindings are the same objects).
  A generation step (at most ``DECODE_ROWS`` new queries after cached keys,
  without gradients) runs `Program.decode`, which reads only the cached keys
  the pattern lets the new queries see.

Under ``torch.compile`` both trace without graph breaks: maskc's kernels are
one custom op, and every program a layer may run is compiled beforehand (the
padded and unpadded variants when registering; a logit softcap's variants at
the first forward, or before compiling with `MaskcAttention.compile_for`).

Positions are the cache slots transformers' own masks use: query i of a call
sits at slot ``q_offset + i``, key j at ``kv_offset + j``; maskc's
``q_offset`` is their difference.  Left padding occupies slots, so a window
counts padded slots as transformers' sliding windows do.  Patterns that read
absolute positions (``sink``, ``prefix``, ``global``, ``on blocks``) see slots
too: with left padding a sequence's first tokens are not at slot 0, so give
such patterns unpadded batches; and where transformers crops a sliding layer's
cache to the window (``DynamicCache`` on configs with ``sliding_window``), keys
count from the first one kept, so they belong on full-attention layers.
Window patterns are exact everywhere.

Which pattern a layer runs: with one spec, every layer runs it.  With a dict
the layer's kind picks the entry: ``config.layer_types[module.layer_idx]``
where the config lists layer types (Gemma 2/3, Qwen 2, GPT-OSS, ...);
otherwise ``"sliding_attention"`` for a layer with a sliding window (the
module's ``sliding_window``, or the ``sliding_window`` transformers passes,
as Mistral does for every layer when ``config.sliding_window`` is set) and
``"full_attention"`` for any other.  Keys may be written short (``"full"``,
``"sliding"``, ``"chunked"``) or as transformers' names; a kind without an
entry raises.

Attention dropout: in training mode (``module.training``) the layer's
``dropout`` becomes maskc's ``dropout_p`` (CPU and Triton backends; the keep
mask is drawn from torch's default generator, so a training step is
reproducible under ``torch.manual_seed``); eval mode ignores it.

Not supported: additive position biases (T5), cross-attention, and packed
sequences that transformers detects from restarting ``position_ids``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
except ImportError as error:  # pragma: no cover - exercised in a subprocess without transformers
    raise ImportError(
        "maskc.integrations.transformers needs Hugging Face transformers >= 4.56 "
        "(AttentionInterface and AttentionMaskInterface): pip install 'maskc[transformers]'"
    ) from error

import maskc
from maskc.dsl import ast, printer
from maskc.dsl.errors import MaskTypeError
from maskc.program import Program

__all__ = ["MaskcAttention", "MaskcMask", "layer_type", "register"]

# The tensor parameter that carries the padding, and the names of composed definitions.
PAD_IDS = "maskc_pad_ids"
_USER = "maskc_hf_pattern"
_ENTRY = "maskc_hf_entry"
# transformers' own implementations: registering over them would change every model.
_BUILTIN = {"eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3", "flash_attention_4"}
# Short keys for the kinds of layers transformers names in `config.layer_types`.
_KINDS = {"full": "full_attention", "sliding": "sliding_attention", "chunked": "chunked_attention"}
# Calls with at most this many new queries after cached keys run as decode steps.
DECODE_ROWS = 64


@dataclass
class MaskcMask:
    """What the mask function hands the layers instead of a dense mask.

    Built once per forward (per kind of layer) and shared by those layers:
    the padding as ids for ``segments`` and the queries to zero, both None
    when no token is padded, and maskc's ``q_offset`` (the first query's slot
    counted from the first key's).  maskc keeps a schedule while its tensor
    bindings are the same objects at the same versions, so the layers that
    share these ids share one schedule.
    """

    q_offset: int
    pad_ids: torch.Tensor | None = None  # int64 [batch, kv_length]: 0 real, -(slot + 1) padded
    query_keep: torch.Tensor | None = None  # bool [batch, 1, q_length, 1]: the real queries


def layer_type(module: torch.nn.Module, sliding_window: int | None = None) -> str:
    """The kind of attention layer `module` is, in transformers' names.

    ``config.layer_types[module.layer_idx]`` where the config lists them; else
    ``"sliding_attention"`` when the layer has a sliding window (the module's
    or the one passed to the attention function), ``"full_attention"`` otherwise.
    """
    types = getattr(getattr(module, "config", None), "layer_types", None)
    index = getattr(module, "layer_idx", None)
    if types is not None and isinstance(index, int) and 0 <= index < len(types):
        return types[index]
    if sliding_window is not None or getattr(module, "sliding_window", None) is not None:
        return "sliding_attention"
    return "full_attention"


def _literal(value: object) -> str:
    """A fixed parameter as spec text."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _compiled(spec: str | os.PathLike | Program, pattern: str | None, params: dict) -> Program:
    """A program for `spec`, checked to need nothing the integration cannot bind."""
    if isinstance(spec, Program):
        if pattern is not None or params:
            raise TypeError("pattern= and parameters apply to spec text, not to a compiled maskc.Program")
        program = spec
    else:
        program = maskc.compile(spec, pattern=pattern, **params)
    unbound = [*program.spec.tensor_params, *program.spec.bindable()]
    if unbound:
        raise MaskTypeError(
            f"pattern {program.source().strip()!r} needs {', '.join(unbound)} when called; inside a transformers "
            "model maskc binds only the padding: fix parameters when registering, and use no tensors or grid sizes"
        )
    return program


def _variant(base: Program, padded: bool, softcap: float | None) -> Program:
    """`base` & segments(pad ids), with transformers' logit softcap last: the pattern a layer runs."""
    if not padded and softcap is None:
        return base
    spec = base.spec
    defs = [d.node for d in spec.resolver.local.values()]
    if spec.definition is None:
        defs.append(ast.PatternDef(_USER, (), spec.body))
        call = f"{_USER}()"
    else:
        args = ", ".join(f"{name} = {_literal(value)}" for name, value in spec.params.items())
        call = f"{spec.definition.node.name}({args})"
    header = f"pattern {_ENTRY}({PAD_IDS}: tensor)" if padded else f"pattern {_ENTRY}()"
    body = f"{call} & segments({PAD_IDS})" if padded else call
    if softcap is not None:
        body += f" with softcap({float(softcap)!r})"
    text = printer.to_text(ast.Module(tuple(defs))) + f"\n{header} = {body}\n"
    return maskc.compile(text, pattern=_ENTRY)


class MaskcAttention:
    """A pattern (or one per kind of layer) as transformers' attention and mask functions.

    `register` makes one and registers `__call__` with ``AttentionInterface``
    and `mask_function` with ``AttentionMaskInterface``.  `backend` is maskc's
    ("auto": Triton on CUDA tensors, the CPU executor otherwise).
    """

    def __init__(
        self,
        spec: str | os.PathLike | Program | Mapping[str, str | os.PathLike | Program],
        *,
        pattern: str | None = None,
        backend: str = "auto",
        **params,
    ) -> None:
        if isinstance(spec, Mapping):
            if not spec:
                raise ValueError("a dict of patterns needs at least one entry, e.g. {'full': 'causal'}")
            self.programs: dict[str | None, Program] = {
                _KINDS.get(kind, kind): _compiled(s, pattern, params) for kind, s in spec.items()
            }
        else:
            self.programs = {None: _compiled(spec, pattern, params)}
        self.backend = backend
        self._variants: dict[tuple, Program] = {}
        self._softcaps: set[float | None] = set()
        self._compile_variants(None)

    def __repr__(self) -> str:
        entries = ", ".join(f"{kind or '*'}: {p.source().strip()!r}" for kind, p in self.programs.items())
        return f"MaskcAttention({entries}, backend={self.backend!r})"

    def program(self, kind: str, *, padded: bool = False, softcap: float | None = None) -> Program:
        """The program a layer of this kind runs (with the padding bound, with a softcap)."""
        kind = _KINDS.get(kind, kind)
        base = self.programs.get(None) or self.programs.get(kind)
        if base is None:
            known = ", ".join(repr(k) for k in self.programs)
            raise KeyError(f"no maskc pattern for {kind!r} layers (patterns given for: {known})")
        key = (kind if None not in self.programs else None, padded, softcap)
        if key not in self._variants:
            self._variants[key] = _variant(base, padded, softcap)
        return self._variants[key]

    def compile_for(self, config: object) -> None:
        """Compile the programs a model with this config asks for (its logit softcap, Gemma 2's
        ``attn_logit_softcapping``).  The mask function does it at the first forward; call this
        before `torch.compile` so that no trace parses a spec (which graph-breaks in the mask function)."""
        self._compile_variants(getattr(config, "attn_logit_softcapping", None))

    def _compile_variants(self, softcap: float | None) -> None:
        """Every program a layer may ask for with this softcap, compiled now: the layers only look
        them up, so a traced forward never parses a spec inside attention."""
        for kind in self.programs:
            for padded in (False, True):
                self.program(kind or "full_attention", padded=padded, softcap=softcap)
        self._softcaps.add(softcap)

    # ------------------------------------------------------------ the mask function

    def mask_function(
        self,
        batch_size: int,
        q_length: int | None = None,
        kv_length: int | None = None,
        q_offset: int | torch.Tensor = 0,
        kv_offset: int | torch.Tensor = 0,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> MaskcMask:
        """transformers' mask call -> `MaskcMask`, shared by the layers of one forward.

        `attention_mask` is the 2-D padding mask over cache slots ([batch, seen +
        q_length], True for real tokens) or None.  Before transformers passed
        ``q_length``/``q_offset`` it passed ``cache_position`` (the queries'
        slots); both are read.  The model's own mask function (``mask_function``)
        is ignored: the pattern replaces it.
        """
        # Layers pass softcap=config.attn_logit_softcapping (Gemma 2): its programs, before any layer runs.
        softcap = getattr(kwargs.get("config"), "attn_logit_softcapping", None)
        if softcap not in self._softcaps:
            self._compile_variants(softcap)
        if q_length is None:
            cache_position = kwargs["cache_position"]
            q_length, q_offset = cache_position.shape[0], cache_position[0]
        if kv_length is None:
            kv_length = q_length
        q_offset, kv_offset = _as_int(q_offset), _as_int(kv_offset)
        offset = q_offset - kv_offset  # maskc counts positions from the first key held
        if attention_mask is None:
            return MaskcMask(offset)
        real = attention_mask.to(torch.bool)
        end = kv_offset + kv_length
        if real.shape[-1] < end:  # slots past the 2-D mask hold nothing yet (static caches), as transformers pads
            real = F.pad(real, (0, end - real.shape[-1]))
        real = real[:, kv_offset:end]
        if not torch.compiler.is_compiling() and bool(real.all()):
            return MaskcMask(offset)  # no padding: the static pattern, whose schedule maskc caches
        slots = torch.arange(kv_length, device=real.device)
        pad_ids = torch.where(real, 0, -1 - slots)
        keep = real[:, offset : offset + q_length]
        return MaskcMask(offset, pad_ids, keep[:, None, :, None])

    # ------------------------------------------------------------ the attention function

    def __call__(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: MaskcMask | None,
        scaling: float | None = None,
        dropout: float = 0.0,
        softcap: float | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        """query [B, H, Lq, D], key/value [B, Hkv, Lk, D] -> (output [B, Lq, H, Dv], None)."""
        dropout_p = dropout if dropout and getattr(module, "training", False) else 0.0  # eval: no dropout
        if kwargs.get("position_bias") is not None:
            raise NotImplementedError("maskc does not add transformers' position_bias (T5-style): use eager or sdpa")
        if getattr(module, "is_cross_attention", False):
            raise NotImplementedError("maskc patterns are for self-attention; this layer is cross-attention")
        if attention_mask is not None and not isinstance(attention_mask, MaskcMask):
            raise TypeError(
                f"maskc's attention got attention_mask of type {type(attention_mask).__name__}, not the MaskcMask "
                "its mask function makes: pass the model a 2-D padding mask (or none), not a prepared 4-D mask"
            )
        mask = attention_mask
        padded = mask is not None and mask.pad_ids is not None
        program = self.program(layer_type(module, kwargs.get("sliding_window")), padded=padded, softcap=softcap)
        bindings = {PAD_IDS: mask.pad_ids} if padded else {}
        q_offset = None if mask is None else mask.q_offset
        if not dropout_p and _decoding(query, key, q_offset):  # decoding has no dropout
            position = key.shape[2] - query.shape[2] if q_offset is None else q_offset
            out = program.decode(query, key, value, position, backend=self.backend, scale=scaling, **bindings)
        else:
            out = program(
                query,
                key,
                value,
                backend=self.backend,
                scale=scaling,
                q_offset=q_offset,
                dropout_p=dropout_p,
                **bindings,
            )
        if padded:
            out = out.masked_fill(~mask.query_keep, 0)  # a padded query's row, like SDPA's fully masked rows
        return out.transpose(1, 2).contiguous(), None


def _decoding(query: torch.Tensor, key: torch.Tensor, q_offset: int | None) -> bool:
    """A generation step (a few new queries after cached keys, no gradients): maskc's
    decode path, which reads only the keys the pattern lets them see."""
    rows, keys = query.shape[2], key.shape[2]
    if not rows < keys or rows > DECODE_ROWS or (torch.is_grad_enabled() and query.requires_grad):
        return False
    return q_offset is None or 0 <= q_offset <= keys - rows


def _as_int(x: int | torch.Tensor) -> int:
    """Offsets come as ints, or as tensors from static and older caches."""
    return int(x) if isinstance(x, torch.Tensor) else x


def register(
    name: str,
    spec: str | os.PathLike | Program | Mapping[str, str | os.PathLike | Program],
    /,
    *,
    pattern: str | None = None,
    backend: str = "auto",
    **params,
) -> MaskcAttention:
    """Register `spec` as transformers' attention implementation `name`.

    `spec` is spec text, a ``.mask`` path, a library name or a compiled
    `maskc.Program` — or a dict from kinds of layers (``"full"``,
    ``"sliding"``, ``"chunked"`` or transformers' layer type names) to those,
    for models whose layers differ (see `layer_type`).  `params` fix the
    pattern's parameters (of every spec given as text).  Registers the
    attention function with ``transformers.AttentionInterface`` and the mask
    function with ``AttentionMaskInterface`` under the same name; registering
    a name again replaces the pattern.

    Example Usage:
        .. code-block:: python

            maskc_hf.register("maskc_mistral", "mistral", w=4096)
            model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="maskc_mistral")
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty string, got {name!r}")
    if name in _BUILTIN:
        raise ValueError(f"'{name}' is one of transformers' own attention implementations: choose another name")
    attention = MaskcAttention(spec, pattern=pattern, backend=backend, **params)
    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, attention.mask_function)
    return attention
