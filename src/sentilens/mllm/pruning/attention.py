"""The tower's attention as patch scores (paper, "Reduction of Redundant Visual Features", eq. 2-3).

A CLIP-style tower scores each ViT patch by the attention the CLS query pays to it (eq. 3,
``softmax(q_CLS K^T / sqrt(d_k))``), averaged over heads and over the scored encoder layers.

How the scores are obtained. ``output_attentions=True`` would force eager attention and
materialise every ``T x T`` map of every layer. Instead, forward hooks on each scored layer's
``q_proj`` and ``k_proj`` capture the projections the tower computes anyway; each layer turns the
CLS row of ``q`` and all of ``K`` into its ``1 x T`` CLS logits per head, and one softmax at the end
of the forward makes them the CLS attention rows of every layer: ``O(T * D)`` extra work per
layer against the layer's ``O(T * D^2)``, and the tower keeps
running its own attention kernel (SDPA). The softmax runs over all ``T`` keys (the CLS key
included, exactly as in the eager map); the CLS-to-CLS entry is then dropped, without
renormalising, so the scores are the eager map's row 0, columns 1..T-1, averaged.

Towers without a CLS token (SigLIP, where LLaVA-style models use all patches; SmolVLM's SigLIP; the
Qwen towers). The paper's score does not exist there; the fallback is the attention each patch
*receives*, averaged over all queries, heads and the chosen layers (``mean_i softmax(q_i K^T /
sqrt(d))_j``). That needs every entry of a scored layer's ``T x T`` map, not one row, so a hook cannot
get it for the price of the CLS row. Instead a scored layer computes its attention
itself (:func:`attention_with_received`, installed by :func:`received_attention` as the layer's
attention function): one softmax block feeds both the output and the column sums, so scoring costs a
column sum over the map the layer needs anyway, and no map is held whole. The other layers keep the
tower's kernel. That holds on a CPU, where the tower's own kernel does the same arithmetic. On a GPU
the tower's kernel is a fused flash kernel that never writes the map, and fused float32 blocks beside it
cost several towers: there a scored layer takes its output from the tower's own kernel, unchanged, and the
column sums from a Triton kernel that never writes the map either (:mod:`sentilens.mllm.received_kernel`),
or without Triton from :func:`received_attention_only` (query-key blocks in the inputs' dtype, softmax
accumulating in float32). :func:`scoring_route` picks the route (docs/pruning.md has the measured costs).
Any other tower is refused with a :class:`SentilensError`.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from sentilens.errors import SentilensError
from sentilens.stages import selection

QUERY_CHUNK_ELEMENTS = 1 << 27
"""Largest attention block (maps x queries x keys) :func:`received_attention_only` holds at once on a GPU
(many heads' whole maps per block: few kernel launches; 256 MiB in bfloat16)."""

CPU_QUERY_CHUNK_ELEMENTS = 1 << 20
"""The same on a CPU, where a block is one head's queries (at most all of them) x keys: a 4 MiB block stays
in cache through the matmuls, softmax and column sum (docs/pruning.md has the measurements)."""

NO_CLS_MODEL_TYPES = ("siglip_vision_model", "smolvlm_vision", "idefics3_vision")
"""SigLIP-style towers (no CLS token): SigLIP itself and the SigLIP towers of SmolVLM / Idefics3."""


def tower_name(tower: nn.Module) -> str:
    """The tower config class's own ``model_type``: a released sub-config may carry its parent's instead
    (SmolVLM-256M's ``vision_config`` says ``idefics3``, read into an ``Idefics3VisionConfig``)."""
    config = getattr(tower, "config", None)
    return (getattr(type(config), "model_type", None) or getattr(config, "model_type", None)
            or type(tower).__name__)


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
        with selection():
            self._logits.append((cls_logits(q[:, 0], k, attn.num_heads), attn.scale))

    def _received(self, layer_scores: torch.Tensor) -> None:
        """A no-CLS scored layer's ``(B, T)`` mean attention received, from :func:`attention_with_received`."""
        # a tower split over devices (device_map) sums its layers on the first one
        self._sum = layer_scores if self._sum is None else self._sum + layer_scores.to(self._sum.device)

    def _finish(self, module: nn.Module, args: tuple, output: object) -> None:
        if self._logits:
            with selection():
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
        with selection():  # the scoring: a column sum over the block the layer's output needs anyway
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
        with selection():  # a pass of its own beside the tower's kernel: all of it is the scoring
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

