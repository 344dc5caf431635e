"""Visual token filtering by CLS attention (paper, "Reduction of Redundant Visual Features", eq. 2-3).

Each ViT patch is scored by the attention the CLS query pays to it (eq. 3,
``softmax(q_CLS K^T / sqrt(d_k))``), averaged over heads and over every encoder layer of the
vision tower (the paper's rule); only the ``ceil(r * N)`` best patches reach the language model,
in their original spatial order.

How the scores are obtained. ``output_attentions=True`` would force eager attention and
materialise every ``T x T`` map of every layer. Instead, forward hooks on each scored layer's
``q_proj`` and ``k_proj`` capture the projections the tower computes anyway; each layer turns the
CLS row of ``q`` and all of ``K`` into its ``1 x T`` CLS logits per head, and one softmax at the end
of the forward makes them the CLS attention rows of every layer: ``O(T * D)`` extra work per
layer against the layer's ``O(T * D^2)``, and the tower keeps
running its own attention kernel (SDPA). The softmax runs over all ``T`` keys (the CLS key
included, exactly as in the eager map); the CLS-to-CLS entry is then dropped, without
renormalising, so the scores are the eager map's row 0, columns 1..T-1, averaged.

Which layers. ``"all"`` (default, the paper): every encoder layer, including the last, which
LLaVA-1.5 does not need for its features (it reads ``vision_feature_layer = -2``); the HF LLaVA
tower runs all its layers anyway, so the all-layer mean costs no extra layer there. ``"feature"``
scores only the layer that produces LLaVA's features (the ``-2`` layer, as FasterVLM does), so a
tower cut after that layer still has everything it needs. ``"last"``, ``"A:B"`` (a Python slice
over the encoder layers) and ``"K"`` (one layer) are also accepted. Hidden state ``h`` is produced
by encoder layer ``h - 1``; for a negative ``vision_feature_layer`` ``f`` that is layer ``L + f``.

Towers without a CLS token (SigLIP, where LLaVA-style models use all patches; SmolVLM's SigLIP; the
Qwen towers). The paper's score does not exist there; the fallback is the attention each patch
*receives*, averaged over all queries, heads and the chosen layers (``mean_i softmax(q_i K^T /
sqrt(d))_j``). That needs every entry of a scored layer's ``T x T`` map, not one row, so a hook cannot
get it for the price of the CLS row: recomputing ``QK^T`` and its softmax beside the tower's own
kernel cost 1.22x the tower on the SmolVLM CPU proxy. Instead a scored layer computes its attention
itself (:func:`attention_with_received`, installed by :func:`received_attention` as the layer's
attention function): one softmax block feeds both the output and the column sums, so scoring costs a
column sum over the map the layer needs anyway, and no map is held whole. The other layers keep the
tower's kernel. That holds on a CPU, where the tower's own kernel does the same arithmetic. On a GPU
the tower's kernel is a fused flash kernel that never writes the map, and the fused float32 blocks cost
2.7-4.5x the tower (H200, Qwen3-VL-8B, all 27 layers scored): there a scored layer takes its output from
the tower's own kernel, unchanged, and the column sums from a Triton kernel that never writes the map
either (:mod:`sentilens.mllm.received_kernel`; 1.9x there), or without Triton from
:func:`received_attention_only` (query-key blocks in the inputs' dtype, softmax accumulating in float32;
2.3x). :func:`scoring_route` picks the route. Any other tower is refused with a :class:`SentilensError`.

Beyond the paper, ``merge`` (after VisionZip): instead of discarding the low-score patches, the
same token budget ``k = ceil(r * N)`` is split into ``k - k // 6`` dominant patches (top scores,
spatial order) and ``k // 6`` contextual tokens (VisionZip keeps 54 + 10 of 64, about 1/6). The
contextual tokens summarise every other patch: ``k // 6`` targets are taken evenly spaced (in
spatial order) among the non-dominant patches, each remaining non-dominant patch joins the target
whose key (from the feature layer's attention, heads concatenated) is most cosine-similar, and a
contextual token is the mean of its group's features. They follow the dominant tokens, in their
targets' spatial order. With ``k < 6`` there are no contextual tokens and merge equals discard.

Baselines, to show what CLS attention buys over chance (the paper has none): ``random`` keeps a
uniformly random set of the same ``ceil(r * N)`` patches (seeded by the image's pixels, so an
image gets the same draw alone or in a batch, and a smaller ratio keeps a subset of a larger
one's patches; no scoring pass is run), and ``inverse`` keeps the ``ceil(r * N)`` *lowest*-scored
patches under the paper's all-layer CLS scores.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from sentilens.errors import SentilensError

CONTEXT_SHARE = 6
"""One contextual token per this many kept tokens under ``merge`` (VisionZip's 10 of 64)."""

QUERY_CHUNK_ELEMENTS = 1 << 27
"""Largest attention block (maps x queries x keys) :func:`received_attention_only` holds at once on a GPU
(many heads' whole maps per block: few kernel launches; 256 MiB in bfloat16)."""

CPU_QUERY_CHUNK_ELEMENTS = 1 << 20
"""The same on a CPU, where a block is one head's queries (at most all of them) x keys: a 4 MiB block stays
in cache through the matmuls, softmax and column sum. Measured on one core, 3 tiles x 12 heads x 1,024
tokens (SmolVLM proxy): 181 ms a layer against SDPA's 134 ms; blocks spanning every head, 200-245 ms."""

NO_CLS_MODEL_TYPES = ("siglip_vision_model", "smolvlm_vision", "idefics3_vision")
"""SigLIP-style towers (no CLS token): SigLIP itself and the SigLIP towers of SmolVLM / Idefics3."""

RANDOM_SEED = 0
"""Seed of the ``random`` baseline, mixed with each image's pixel checksum."""

BASELINES = ("random", "inverse")


@dataclass(frozen=True)
class FilterSpec:
    """Which layers score the patches, which patches are kept, and what happens to the dropped ones.

    Parsed from ``LAYERS``, ``LAYERS+merge`` or ``LAYERS+native``, where ``LAYERS`` is ``all`` (the
    paper), ``feature`` (LLaVA's feature layer, FasterVLM), ``last``, ``A:B`` or ``K``; or from one
    of the baselines ``random`` (a seeded uniform draw) and ``inverse`` (the lowest all-layer
    scores), alone or with ``+native``.

    ``+native`` (LLaVA-1.5 only; our addition, not the paper's): the kept visual tokens keep the
    rotary positions they have at r = 1 (the image's first position plus the patch index) and the
    text after the image keeps its own, so the language model sees exactly the relative distances
    it was trained on, minus the dropped tokens: the same computation as attending to the full
    sequence with the dropped tokens masked out. The paper drops the tokens and lets the sequence
    close up (positions renumbered), which moves the text closer to the image by the number
    dropped. Measured on the demo's tiny LLaVA (README): renumbering cost 0.05 accuracy at r = 0.4,
    native positions none. Qwen-VL keeps native positions always; the tiled families refuse it.
    """

    layers: str = "all"
    merge: bool = False
    select: str = "top"
    native: bool = False

    @classmethod
    def parse(cls, text: str) -> FilterSpec:
        name = text.strip()
        layers, _, suffix = name.partition("+")
        if suffix not in ("", "merge", "native") or (layers in BASELINES and suffix == "merge"):
            raise SentilensError(f"unknown filtering strategy '{text}': expected LAYERS, LAYERS+merge, "
                                 f"LAYERS+native, {' or '.join(BASELINES)} (with or without +native)")
        if layers in BASELINES:
            return cls(layers="all", select=layers, native=suffix == "native")
        spec = cls(layers=layers or "all", merge=suffix == "merge", native=suffix == "native")
        # syntax check only, against a huge tower: a lazy range, never listed (the predictor parses the
        # strategy on every predict call, and listing 2^20 layers cost 37 ms a call)
        spec._layer_range(num_layers=1 << 20, vision_feature_layer=-2)
        return spec

    def __str__(self) -> str:
        suffix = "+merge" if self.merge else "+native" if self.native else ""
        return (self.select if self.select != "top" else self.layers) + suffix

    def layer_indices(self, num_layers: int, vision_feature_layer: int | Sequence[int] = -2) -> list[int]:
        """The 0-based encoder layers whose attention is averaged."""
        return list(self._layer_range(num_layers, vision_feature_layer))

    def _layer_range(self, num_layers: int, vision_feature_layer: int | Sequence[int]) -> Sequence[int]:
        """:meth:`layer_indices` as a ``range`` where it is one (cheap to check for any tower size)."""
        name = self.layers
        if name == "all":
            return range(num_layers)
        if name == "last":
            return [num_layers - 1]
        if name == "feature":
            feature_layers = [vision_feature_layer] if isinstance(vision_feature_layer, int) else vision_feature_layer
            return sorted({feature_layer_index(f, num_layers) for f in feature_layers})
        try:
            if ":" in name:
                start, stop = (int(part) if part.strip() else None for part in name.split(":", 1))
                chosen = range(num_layers)[slice(start, stop)]
            else:
                chosen = [range(num_layers)[int(name)]]
        except (ValueError, IndexError):
            raise SentilensError(
                f"bad scoring layers '{name}': use all, feature, last, a layer K or a slice A:B "
                f"(the tower has {num_layers} layers)") from None
        if not chosen:
            raise SentilensError(f"scoring layers '{name}' select no layer of a {num_layers}-layer tower")
        return chosen


def feature_layer_index(vision_feature_layer: int, num_layers: int) -> int:
    """The encoder layer whose output is ``hidden_states[vision_feature_layer]``."""
    hidden = vision_feature_layer if vision_feature_layer >= 0 else num_layers + 1 + vision_feature_layer
    if not 1 <= hidden <= num_layers:
        raise SentilensError(f"vision_feature_layer {vision_feature_layer} is not the output of an attention layer "
                             f"of a {num_layers}-layer tower")
    return hidden - 1


def tower_name(tower: nn.Module) -> str:
    return getattr(getattr(tower, "config", None), "model_type", None) or type(tower).__name__


def encoder_layers(tower: nn.Module) -> nn.ModuleList:
    """The tower's attention layers, checked to have the ``self_attn.q_proj`` / ``k_proj`` the hooks need."""
    layers = getattr(getattr(tower, "encoder", None), "layers", None)
    usable = getattr(tower, "embeddings", None) is not None and isinstance(layers, nn.ModuleList) and len(layers) > 0
    if not usable or not all(isinstance(getattr(getattr(layer, "self_attn", None), name, None), nn.Linear)
                             for layer in layers for name in ("q_proj", "k_proj")):
        supported = ", ".join(NO_CLS_MODEL_TYPES)
        raise SentilensError(f"vision tower '{tower_name(tower)}' is not supported for token filtering: supported "
                             f"are CLIP-style towers (CLS token) and SigLIP-style towers ({supported})")
    return layers


def has_cls_token(tower: nn.Module) -> bool:
    """True for CLIP-style towers (CLS first), False for SigLIP-style ones; refuses anything else."""
    encoder_layers(tower)
    if isinstance(getattr(tower.embeddings, "class_embedding", None), nn.Parameter):
        return True
    if tower_name(tower) in NO_CLS_MODEL_TYPES:
        return False
    raise SentilensError(f"vision tower '{tower_name(tower)}' has no CLS token and is not a known SigLIP-style "
                         f"tower; token filtering supports CLIP-style and {', '.join(NO_CLS_MODEL_TYPES)} towers")


class AttentionScorer:
    """Scores patches from the projections the tower computes anyway (see the module docstring).

    Use :meth:`capture` around any forward of ``tower`` (yours or someone else's), or
    :meth:`score` to run the tower itself. After a captured forward, ``scores`` is ``(B, N)``
    (patches only, float32) and, when ``keep_keys_of`` is set, ``keys`` is that layer's
    ``(B, N, D)`` patch keys.
    """

    def __init__(self, tower: nn.Module, layers: Sequence[int], keep_keys_of: int | None = None):
        self.tower = tower
        self.cls = has_cls_token(tower)
        self.layers = sorted(set(layers))
        self.keep_keys_of = keep_keys_of
        self.scores: torch.Tensor | None = None
        self.keys: torch.Tensor | None = None
        self.pixel_values: torch.Tensor | None = None
        self._sum: torch.Tensor | None = None
        self._pending: dict[int, dict[str, torch.Tensor]] = {}
        self._logits: list[tuple[torch.Tensor, float]] = []

    @contextmanager
    def capture(self) -> Iterator[AttentionScorer]:
        """Hooks installed for the duration: every tower forward inside refreshes the scores. A CLS tower's
        scored layers are read from their ``q_proj`` / ``k_proj`` outputs; a no-CLS tower's scored layers
        compute their own attention with :func:`attention_with_received` (module docstring)."""
        handles = [self.tower.register_forward_pre_hook(self._start, with_kwargs=True)]
        all_layers = encoder_layers(self.tower)
        hooked = set(self.layers) if self.cls else set()
        for index in sorted(hooked | ({self.keep_keys_of} - {None})):
            attn = all_layers[index].self_attn
            handles.append(attn.q_proj.register_forward_hook(self._stash(index, "q", attn)))
            handles.append(attn.k_proj.register_forward_hook(self._stash(index, "k", attn)))
        handles.append(self.tower.register_forward_hook(self._finish))
        sinks = {} if self.cls else {all_layers[index].self_attn: self._received for index in self.layers}
        try:
            with received_attention(sinks):
                yield self
        finally:
            for handle in handles:
                handle.remove()
            self._pending.clear()
            self._logits = []
            self._sum = None

    @torch.no_grad()
    def score(self, pixel_values: torch.Tensor, **tower_kwargs) -> torch.Tensor:
        """Run the tower on ``pixel_values`` and return the ``(B, N)`` patch scores."""
        with self.capture():
            self.tower(pixel_values, **tower_kwargs)
        return self.scores

    def _start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._sum = None
        self._logits = []
        self.keys = None
        self.scores = None
        self.pixel_values = args[0] if args else kwargs.get("pixel_values")

    def _stash(self, index: int, name: str, attn: nn.Module):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            captured = self._pending.setdefault(index, {})
            captured[name] = output.detach()[:, :1] if name == "q" and self.cls else output.detach()
            if len(captured) == 2:
                self._layer_done(index, self._pending.pop(index), attn)
        return hook

    def _layer_done(self, index: int, captured: dict[str, torch.Tensor], attn: nn.Module) -> None:
        q, k = captured["q"], captured["k"]
        if index == self.keep_keys_of:
            self.keys = k[:, 1:] if self.cls else k
        if index not in self.layers or not self.cls:
            return
        # Only the 1 x T logits of the CLS row are computed per layer, in the tower's dtype (as its own eager
        # attention does); softmax and the means wait for the end of the forward, where they run once over all
        # layers. Per-layer float copies of K and per-layer softmaxes cost x1.27-1.59 over the tower on an H200
        # (launch- and memory-bound; token_filtering_gpu.json).
        self._logits.append((cls_logits(q[:, 0], k, attn.num_heads), attn.scale))

    def _received(self, layer_scores: torch.Tensor) -> None:
        """A no-CLS scored layer's ``(B, T)`` mean attention received, from :func:`attention_with_received`."""
        # a tower split over devices (device_map) sums its layers on the first one
        self._sum = layer_scores if self._sum is None else self._sum + layer_scores.to(self._sum.device)

    def _finish(self, module: nn.Module, args: tuple, output: object) -> None:
        if self._logits:
            self._sum = cls_scores_from_logits(self._logits)
            self._logits = []
        if self._sum is None:
            raise RuntimeError("the vision tower ran without reaching the scored layers")
        self.scores = self._sum / len(self.layers)
        self._sum = None


def cls_logits(q_cls: torch.Tensor, keys: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Unscaled CLS-row logits of one layer per head, ``(B, H, T)``; ``q_cls``: ``(B, D)``, ``keys``: ``(B, T, D)``."""
    batch, tokens, dim = keys.shape
    head_dim = dim // num_heads
    return torch.einsum("bhd,bthd->bht", q_cls.reshape(batch, num_heads, head_dim),
                        keys.view(batch, tokens, num_heads, head_dim))


def cls_scores_from_logits(layers: Sequence[tuple[torch.Tensor, float]]) -> torch.Tensor:
    """Sum over layers of eq. 3 (softmax over all T keys, patch columns, mean over heads): ``(B, T - 1)`` float32."""
    total = None
    groups: dict[tuple, list[torch.Tensor]] = {}
    for logits, scale in layers:  # one stacked softmax per device and scale (one in a plain tower)
        groups.setdefault((logits.device, scale), []).append(logits)
    for (_, scale), stacked in groups.items():
        weights = torch.softmax(torch.stack(stacked).float() * scale, dim=-1)  # (L, B, H, T)
        part = weights[..., 1:].mean(dim=2).sum(dim=0)
        # a tower split over devices (device_map) sums its layers on the first one
        total = part if total is None else total + part.to(total.device)
    return total


def refuse_padding(attention_mask: torch.Tensor | None) -> None:
    """Received-attention scoring reads whole maps of unpadded images: a mask means something else was given."""
    if attention_mask is not None:
        raise ValueError("received-attention scoring takes unpadded images only (the tower was given an "
                         "attention mask)")


def attention_blocks(maps: int, tokens: int, budget: int) -> Iterator[tuple[slice, slice]]:
    """``(maps, queries)`` slices covering ``maps x tokens`` query rows, each block at most ``budget``
    attention entries (queries x keys) when it can: whole maps per block, or queries of one map."""
    rows = max(1, budget // tokens)  # queries x maps per block
    group, chunk = max(1, rows // tokens), min(rows, tokens)
    for first in range(0, maps, group):
        for start in range(0, tokens, chunk):
            yield slice(first, first + group), slice(start, start + chunk)


def attention_with_received(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float,
                            attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's attention and the attention each token receives, computed together (module docstring).

    ``query``, ``key``, ``value``: ``(B, heads, T, d)`` (``B`` images or tiles, each attending to itself).
    Returns the attention output ``(B, T, heads, d)`` (the layout transformers' attention functions return)
    and ``(B, T)`` float32: ``mean_i softmax(q_i K^T * scaling)_j`` over the heads and the image's queries.
    Each ``(queries x keys)`` softmax block, a head or several at a time (:data:`QUERY_CHUNK_ELEMENTS`), serves
    both the output and the column sums: scoring costs a column sum, not a second query-key product.
    """
    refuse_padding(attention_mask)
    batch, heads, tokens, dim = query.shape
    maps = batch * heads
    q = (query.float() * scaling).reshape(maps, tokens, dim)
    k_t = key.float().reshape(maps, tokens, dim).transpose(-1, -2)
    v = value.reshape(maps, tokens, value.shape[-1])
    out = torch.empty(maps, tokens, value.shape[-1], dtype=value.dtype, device=value.device)
    received = torch.zeros(maps, tokens, dtype=torch.float32, device=query.device)
    budget = CPU_QUERY_CHUNK_ELEMENTS if query.device.type == "cpu" else QUERY_CHUNK_ELEMENTS
    for block, queries in attention_blocks(maps, tokens, budget):
        weights = torch.softmax(torch.matmul(q[block, queries], k_t[block]), dim=-1)
        received[block] += weights.sum(dim=-2)
        out[block, queries] = torch.matmul(weights.to(v.dtype), v[block])
    out = out.view(batch, heads, tokens, -1).transpose(1, 2).contiguous()
    return out, received.view(batch, heads, tokens).sum(dim=1) / (tokens * heads)


def received_attention_only(query: torch.Tensor, key: torch.Tensor, scaling: float,
                            attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The ``(B, T)`` float32 received attention of :func:`attention_with_received`, without the output.

    For a GPU, where the layer's output comes from the tower's flash kernel: each block's query-key product
    runs in the inputs' dtype (bfloat16 on tensor cores) and its softmax accumulates in float32; the column
    sums are float32.
    """
    refuse_padding(attention_mask)
    batch, heads, tokens, dim = query.shape
    maps = batch * heads
    q = (query * scaling).reshape(maps, tokens, dim)
    k_t = key.reshape(maps, tokens, dim).transpose(-1, -2)
    received = torch.zeros(maps, tokens, dtype=torch.float32, device=query.device)
    for block, queries in attention_blocks(maps, tokens, QUERY_CHUNK_ELEMENTS):
        weights = torch.softmax(torch.matmul(q[block, queries], k_t[block]), dim=-1)
        received[block] += weights.sum(dim=-2, dtype=torch.float32)
    return received.view(batch, heads, tokens).sum(dim=1) / (tokens * heads)


def scoring_route(device: torch.device) -> str:
    """How a scored layer gets its received attention on ``device``.

    ``"layer"`` (CPU): the layer computes its attention itself, :func:`attention_with_received`.
    ``"kernel"`` (CUDA with Triton): the tower's own attention kernel, and the column sums from
    :func:`sentilens.mllm.received_kernel.received_attention_fused` (no map in memory).
    ``"blocks"`` (any other device): the tower's own kernel beside :func:`received_attention_only`.
    """
    if device.type == "cpu":
        return "layer"
    if device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        return "kernel"
    return "blocks"


def received_by_route(route: str, query: torch.Tensor, key: torch.Tensor, scaling: float,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The ``(B, T)`` received attention by the ``"kernel"`` or ``"blocks"`` route of :func:`scoring_route`."""
    refuse_padding(attention_mask)
    if route != "kernel":
        return received_attention_only(query, key, scaling)
    from sentilens.mllm.received_kernel import received_attention_fused

    return received_attention_fused(query, key, scaling)


SCORING_ATTENTION = "sentilens_received_attention"
"""The attention implementation a tower runs under while :func:`received_attention` scores some of its layers."""

_SCORED: dict[nn.Module, Callable[[torch.Tensor], None]] = {}
"""Attention modules being scored now -> where each call's ``(B, T)`` received attention goes."""

_ORIGINAL: dict[int, str] = {}
"""Config (by id) of the modules being scored now -> the attention implementation it was loaded with."""


def _scoring_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The attention function of a tower being scored: scored modules run :func:`attention_with_received`
    (CPU) or their own kernel beside :func:`received_attention_only` (GPU), the others the implementation
    the model was loaded with (a flash implementation: SDPA, which takes the
    same per-image calls and masks)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    original = _ORIGINAL.get(id(module.config), "sdpa")
    kernel = (sys.modules[type(module).__module__].eager_attention_forward if original == "eager"
              else ALL_ATTENTION_FUNCTIONS.get_interface("sdpa" if "flash" in original else original, None))
    sink = _SCORED.get(module)
    if sink is None:
        return kernel(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    route = scoring_route(query.device)
    if route == "layer":
        out, received = attention_with_received(query, key, value, scale, attention_mask)
    else:
        received = received_by_route(route, query, key, scale, attention_mask)
        out = kernel(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)[0]
    sink(received)
    return out, None


@contextmanager
def received_attention(sinks: dict[nn.Module, Callable[[torch.Tensor], None]]) -> Iterator[None]:
    """For the duration, each attention module in ``sinks`` (a transformers attention module that calls
    ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``) computes with :func:`attention_with_received`
    and hands every call's ``(B, T)`` received attention to its sink; the other modules sharing their
    config keep the implementation it was loaded with. Masks are built as for SDPA (none for unpadded
    images)."""
    if not sinks:
        yield
        return
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    if SCORING_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(SCORING_ATTENTION, _scoring_attention)
        AttentionMaskInterface.register(SCORING_ATTENTION, sdpa_mask)
    configs = {id(module.config): module.config for module in sinks}
    before = {key: config._attn_implementation_internal for key, config in configs.items()}
    for key, config in configs.items():
        _ORIGINAL[key] = before[key] or "sdpa"
        config._attn_implementation_internal = SCORING_ATTENTION
    _SCORED.update(sinks)
    try:
        yield
    finally:
        for module in sinks:
            _SCORED.pop(module, None)
        for key, config in configs.items():
            config._attn_implementation_internal = before[key]
            _ORIGINAL.pop(key, None)


def keep_count(num_patches: int, keep_ratio: float) -> int:
    """``ceil(r * N)``, at least 1. ``r * N`` is rounded to 9 decimals first so that a product
    that is an integer in exact arithmetic (0.2 * 5) is not pushed up by float error."""
    if not 0.0 < keep_ratio <= 1.0:
        raise SentilensError(f"keep ratio must be in (0, 1], got {keep_ratio}")
    return max(1, min(num_patches, math.ceil(round(keep_ratio * num_patches, 9))))


def top_patches(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` highest ``scores`` (1-D), in increasing (spatial) order.

    Ties go to the earlier patch: a stable descending sort keeps equal scores in index order.
    """
    order = torch.sort(scores, descending=True, stable=True).indices
    return torch.sort(order[:count]).values


def merge_context(features: torch.Tensor, keys: torch.Tensor, dominant: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` contextual tokens summarising the non-dominant patches (rule in the module docstring).

    ``features``: ``(N, Dv)``; ``keys``: ``(N, Dk)``; ``dominant``: kept indices. Returns ``(count, Dv)``.
    """
    is_rest = torch.ones(features.shape[0], dtype=torch.bool, device=features.device)
    is_rest[dominant] = False
    rest = torch.nonzero(is_rest).flatten()
    count = min(count, rest.numel())
    if count == 0:
        return features.new_zeros(0, features.shape[1])
    target_pos = torch.div(torch.arange(count, device=rest.device) * rest.numel(), count, rounding_mode="floor")
    unit = nn.functional.normalize(keys[rest].float(), dim=-1)
    group = (unit @ unit[target_pos].T).argmax(dim=-1)  # each non-dominant patch -> most similar target
    group[target_pos] = torch.arange(count, device=rest.device)  # a target always stays in its own group
    sums = torch.zeros(count, features.shape[1], dtype=torch.float32, device=features.device)
    sums.index_add_(0, group, features[rest].float())
    sizes = torch.bincount(group, minlength=count).unsqueeze(1)
    return (sums / sizes).to(features.dtype)


@dataclass
class Selection:
    """What the filter did to one image: the reduced features and the patches kept."""

    features: torch.Tensor
    kept: torch.Tensor
    scores: torch.Tensor


def random_priorities(pixel_values: torch.Tensor, count: int) -> torch.Tensor:
    """``(B, count)`` uniform draws, each image's seeded by ``RANDOM_SEED`` and a checksum of its pixels."""
    rows = []
    for image in pixel_values:
        checksum = zlib.crc32(image.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        generator = torch.Generator().manual_seed(RANDOM_SEED * (1 << 32) + checksum)
        rows.append(torch.rand(count, generator=generator))
    return torch.stack(rows)


def reduce_image(features: torch.Tensor, scores: torch.Tensor, keep_ratio: float, keys: torch.Tensor | None = None,
                 merge: bool = False, lowest: bool = False) -> Selection:
    """Filter one image's ``(N, Dv)`` features by its ``(N,)`` scores to ``ceil(r * N)`` tokens
    (the highest scores, or with ``lowest`` the lowest ones)."""
    total = keep_count(features.shape[0], keep_ratio)
    n_context = total // CONTEXT_SHARE if merge and total < features.shape[0] else 0
    kept = top_patches(-scores if lowest else scores, total - n_context)
    reduced = features[kept]
    if n_context:
        reduced = torch.cat([reduced, merge_context(features, keys, kept, n_context)])
    return Selection(features=reduced, kept=kept, scores=scores)


class TokenFilter:
    """The reducer of :mod:`sentilens.mllm.inputs`: ``filter(features, pixel_values) -> [(k_i, Dv), ...]``.

    :func:`sentilens.mllm.inputs.visual_tokens` enters :meth:`capture` around the tower forward
    that produces ``features``, so the scores come from that very pass; called on pixels the
    tower did not just see, the filter runs the tower itself once. ``last`` keeps each image's
    :class:`Selection` of the latest call (kept patches and scores, for heatmaps).
    """

    def __init__(self, tower: nn.Module, keep_ratio: float, spec: FilterSpec | str = FilterSpec(),
                 vision_feature_layer: int | Sequence[int] = -2):
        self.spec = FilterSpec.parse(spec) if isinstance(spec, str) else spec
        keep_count(1, keep_ratio)
        self.keep_ratio = keep_ratio
        num_layers = len(encoder_layers(tower))
        layers = self.spec.layer_indices(num_layers, vision_feature_layer)
        key_layer = None
        if self.spec.merge:
            first = vision_feature_layer if isinstance(vision_feature_layer, int) else vision_feature_layer[-1]
            key_layer = feature_layer_index(first, num_layers)
        self.scorer = AttentionScorer(tower, layers, keep_keys_of=key_layer)
        self.last: list[Selection] = []
        self.native_positions = self.spec.native
        """Whether :func:`sentilens.mllm.inputs.build_inputs` gives the kept tokens their r = 1 positions."""

    @contextmanager
    def capture(self, llava: nn.Module | None = None) -> Iterator[TokenFilter]:
        """Score during the caller's own tower forward (no second tower pass; none at all for ``random``)."""
        with nullcontext() if self.spec.select == "random" else self.scorer.capture():
            yield self

    @torch.no_grad()
    def __call__(self, features: torch.Tensor, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        if self.spec.select == "random":
            priorities = random_priorities(pixel_values, features.shape[1]).to(features.device)
            self.last = [reduce_image(features[i], priorities[i], self.keep_ratio) for i in range(features.shape[0])]
            return [selection.features for selection in self.last]
        scorer = self.scorer
        seen = scorer.pixel_values
        fresh = (scorer.scores is not None and seen is not None and seen.shape == pixel_values.shape
                 and torch.equal(seen, pixel_values.to(device=seen.device, dtype=seen.dtype)))
        if not fresh:
            tower = scorer.tower
            scorer.score(pixel_values.to(device=tower.device, dtype=tower.dtype))
        scores = scorer.scores
        if scores.shape != features.shape[:2]:
            raise SentilensError(f"token filtering scores {scores.shape[1]} patches per image but the features have "
                                 f"{features.shape[1]} rows (a CLIP tower needs vision_feature_select_strategy "
                                 f"'default', which drops the CLS feature)")
        lowest = self.spec.select == "inverse"
        self.last = [
            reduce_image(features[i], scores[i], self.keep_ratio,
                         None if scorer.keys is None else scorer.keys[i], self.spec.merge, lowest)
            for i in range(features.shape[0])
        ]
        return [selection.features for selection in self.last]


def make_reducer(llava: nn.Module, keep_ratio: float, strategy: str = "all") -> TokenFilter:
    """The filter for a ``LlavaForConditionalGeneration`` (the ``pruning`` section of an MLLM run config)."""
    return TokenFilter(llava.model.vision_tower, keep_ratio, FilterSpec.parse(strategy),
                       llava.config.vision_feature_layer)


class TiledTokenFilter:
    """What the filters of the tiled families share (LLaVA-NeXT's :class:`~sentilens.mllm.families.llava_next.
    AnyResTokenFilter`, SmolVLM's :class:`~sentilens.mllm.families.smolvlm.ShuffleTokenFilter`): an
    :class:`AttentionScorer` on the tower's chosen ``layers``, entered by the family's own tower pass over every
    tile (:meth:`capture`; no scoring for ``random``), one ``ceil(r N)`` budget per image chosen by the
    subclass's ``choose``, and ``last``, each image's :class:`Selection` of the latest call."""

    family = ""
    """The family's name, for the messages."""
    no_merge_reason = ""
    """Why ``+merge`` is refused (appended to the message)."""

    def __init__(self, tower: nn.Module, keep_ratio: float, spec: FilterSpec, layers: Sequence[int]):
        if spec.merge:
            raise SentilensError(f"strategy '{spec}': +merge is not available for {self.family}{self.no_merge_reason}; "
                                 "use the strategy without +merge")
        if spec.native:
            raise SentilensError(f"strategy '{spec}': +native is offered for LLaVA-1.5 only, not {self.family}; "
                                 "use the strategy without +native")
        keep_count(1, keep_ratio)
        self.spec = spec
        self.keep_ratio = keep_ratio
        self.scorer = AttentionScorer(tower, layers)
        self.last: list[Selection] = []

    @contextmanager
    def capture(self, model: nn.Module | None = None) -> Iterator[TiledTokenFilter]:
        with nullcontext() if self.spec.select == "random" else self.scorer.capture():
            yield self

    def tile_scores(self) -> torch.Tensor:
        """``(all tiles of the batch, patches)`` float32 scores of the latest captured tower pass."""
        if self.scorer.scores is None:
            raise RuntimeError(f"the {self.family} filter chose before the tower ran under its capture")
        return self.scorer.scores.float().cpu()
