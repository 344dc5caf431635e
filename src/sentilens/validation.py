"""One validation pass over what sentilens loads, before anything is allocated or executed.

Every file a user hands sentilens (a run's ``config.json``, resume state and history, YAML recipes, a base
checkpoint's config, its chat template, the run's weights, the labels) is checked here, and a problem is
one :class:`~sentilens.errors.SentilensError` line naming the file, the field and the bound:

- :func:`load_json_file` / :func:`parse_json`: strict UTF-8, strict JSON (no ``NaN`` / ``Infinity``), no lone
  surrogate, at most :data:`MAX_DEPTH` levels of nesting (:func:`check_tree`, also used for YAML);
- :func:`pydantic_error`: the one way a pydantic ``ValidationError`` becomes that line;
- :func:`check_fits`, :func:`fusion_footprint`, :func:`check_base_config`: sizes bounded by hard caps and by
  what this machine's memory (:func:`sentilens.machine.memory_bytes`) can hold;
- :func:`clean_label`, :func:`label_problem`, :func:`check_labels`: labels NFKC-normalised, invisible
  characters stripped, confusable spellings (mixed scripts, look-alike letters, stray accents) refused;
- :func:`check_weights`: every tensor of a float dtype and finite; :func:`check_probabilities`: no NaN out;
- :func:`check_chat_template`: a template compiled and tried once in transformers' sandbox, in bounded time.

Foundation layer: imports nothing of sentilens but :mod:`sentilens.errors` and :mod:`sentilens.machine`.
"""

from __future__ import annotations

import json
import math
import sys
import time
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from sentilens import machine
from sentilens.errors import SentilensError

if TYPE_CHECKING:
    import torch
    from pydantic import ValidationError

MAX_DEPTH = 64
"""Nesting levels a JSON or YAML file may have: sentilens' own files use at most five; deeper is an attack."""


# ----------------------------------------------------------------------------- text and JSON

def decode_utf8(data: bytes, path: str | Path | None) -> str:
    """``data`` as UTF-8 text (a leading byte-order mark dropped); anything else is a one-line error."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise SentilensError(f"not UTF-8 text (byte {err.start}: {data[err.start:err.start + 1]!r})", path,
                             line) from None


def _surrogate(text: str) -> int | None:
    """Index of the first lone surrogate in ``text`` (which no file can encode), else None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return err.start
    return None


def check_tree(value: object, path: str | Path | None, max_depth: int = MAX_DEPTH) -> None:
    """A parsed JSON / YAML value: at most ``max_depth`` levels deep, no lone surrogate in a key or string.

    Walked with an explicit stack, so no depth makes Python recurse."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            at = _surrogate(item)
            if at is not None:
                raise SentilensError(f"a string holds a lone surrogate (U+{ord(item[at]):04X}), which is not text",
                                     path)
            continue
        if isinstance(item, Mapping):
            children: Iterable = [*item.keys(), *item.values()]
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        if depth > max_depth:
            raise SentilensError(f"nested more than {max_depth} levels deep", path)
        stack.extend((child, depth + 1) for child in children)


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _finite(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):  # 1e999 would read as infinity
        raise ValueError(f"the number {literal[:40]} is too large for a float")
    return value


def parse_json(text: str, path: str | Path | None = None, line: int | None = None) -> object:
    """Strict JSON: ``NaN`` / ``Infinity`` and numbers beyond a float refused, nesting bounded, lone surrogates
    refused; one-line errors (naming ``line``, for a row of a JSON Lines file)."""
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except json.JSONDecodeError as err:
        raise SentilensError(f"not valid JSON ({err.msg})", path, line if line is not None else err.lineno) from None
    except ValueError as err:
        raise SentilensError(f"not strict JSON ({err})", path, line) from None
    except RecursionError:
        raise SentilensError(f"not valid JSON here: nested more than {MAX_DEPTH} levels deep", path, line) from None
    try:
        check_tree(value, path)
    except SentilensError as err:
        if line is None:
            raise
        raise SentilensError(err.problem, path, line) from None
    return value


def load_json_file(path: str | Path) -> object:
    """The value of a JSON file sentilens loads (``config.json``, resume state, history, labels)."""
    path = Path(path)
    if not path.is_file():
        raise SentilensError("no such file", path)
    return parse_json(decode_utf8(path.read_bytes(), path), path)


# ----------------------------------------------------------------------------- pydantic

def validation_problem(err: ValidationError) -> tuple[str | None, str, str]:
    """(field path or None, message, pydantic's error type) of the first problem pydantic found."""
    first = err.errors()[0]
    field = ".".join(str(part) for part in first["loc"]) or None
    message = " ".join(str(first["msg"]).removeprefix("Value error, ").split())
    return field, message, str(first["type"])


def pydantic_error(err: ValidationError, path: str | Path | None = None, what: str = "",
                   names: Mapping[str, str] | None = None) -> SentilensError:
    """The one-line user error for the first problem of a pydantic ``ValidationError``: ``WHAT FIELD: problem``.

    ``names`` maps a top-level field to how the user wrote it (an option name), which then stands for the
    whole field path; ``what`` prefixes it (a problem of the whole model, without a field, is its message)."""
    field, message, _ = validation_problem(err)
    if field is not None and names and field.split(".")[0] in names:
        field = names[field.split(".")[0]]
    return SentilensError(f"{what}{field}: {message}" if field else message, path)


# ----------------------------------------------------------------------------- sizes

def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def memory_problem(needed: float, what: str) -> str | None:
    """Why ``needed`` bytes cannot be had on this machine (:func:`sentilens.machine.memory_bytes`), or None."""
    limit = machine.memory_bytes()
    if limit and needed > limit:
        return f"{what} needs about {gib(needed)}, more than this machine's {gib(limit)} of memory"
    return None


def check_fits(needed: float, what: str, path: str | Path | None = None) -> None:
    """A one-line error when ``needed`` bytes exceed what this machine's memory holds."""
    problem = memory_problem(needed, what)
    if problem:
        raise SentilensError(problem, path)


def fusion_footprint(hidden: int, capsules: int, text_dim: int, image_dim: int, batch_size: int,
                     routed: bool) -> tuple[int, int]:
    """(parameters, activation floats of one batch) of a fusion head of width ``hidden``.

    Projections ``(D_t + D_v) d``, context ``2 d^2``, two attentions ``3 d^2`` each, FC ``d^2``, the RNN at
    most ``8 d^2`` (LSTM), and with routing ``4 x capsules x d^2``; the routing's predictions hold
    ``batch x 4 x capsules x d`` floats, the rest ``batch x d``-sized rows."""
    d = hidden
    params = (text_dim + image_dim) * d + 17 * d * d + (4 * capsules * d * d if routed else 0)
    activations = batch_size * d * (64 + (4 * capsules * 4 if routed else 0))
    return params, activations


SIZE_CAPS = {
    "num_hidden_layers": 1024,
    "hidden_size": 65536,
    "intermediate_size": 262144,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "vocab_size": 1 << 20,
    "image_size": 4096,
    "patch_size": 4096,
    "num_channels": 16,
    "projection_dim": 65536,
}
"""Largest value a base model's config may give each size (a sub-config's too): about ten times the largest
released model's (405B Llama: 126 layers, width 16384; Gemma: a 262144-word vocabulary; 4096-px towers)."""

MAX_PATCHES = 65536
"""Patches one image may become in a base model's vision tower ((image_size / patch_size)^2)."""


def _sub_configs(config: Mapping) -> list[tuple[str, Mapping]]:
    """(dotted name, mapping) of a config and every mapping inside it, iteratively (nesting was bounded)."""
    found, stack = [], [("", config)]
    while stack:
        name, item = stack.pop()
        found.append((name, item))
        stack.extend((f"{name}{key}.", value) for key, value in item.items() if isinstance(value, Mapping))
    return found


def check_base_config(config: Mapping, source: str | Path, bytes_per_param: float = 4.0) -> None:
    """A base checkpoint's config (``config.json`` as a dict), before any model is built from it: every size
    a positive integer within :data:`SIZE_CAPS`, a tower's patches within :data:`MAX_PATCHES`, and its
    weights' estimated bytes within this machine's memory."""
    check_tree(config, source)
    params = 0
    for prefix, sub in _sub_configs(config):
        for key, cap in SIZE_CAPS.items():
            if key not in sub or sub[key] is None:
                continue
            value = sub[key]
            if isinstance(value, bool) or not isinstance(value, int):
                raise SentilensError(f"base model config: {prefix}{key} must be a whole number, got {value!r}", source)
            if not 1 <= value <= cap:
                raise SentilensError(f"base model config: {prefix}{key} is {value}, outside 1..{cap}", source)
        image, patch = sub.get("image_size"), sub.get("patch_size")
        if isinstance(image, int) and isinstance(patch, int) and patch > 0:
            patches = (image // patch) ** 2
            if patches > MAX_PATCHES:
                raise SentilensError(f"base model config: {prefix}image_size {image} / patch_size {patch} makes "
                                     f"{patches} patches per image, more than {MAX_PATCHES}", source)
        hidden, layers = sub.get("hidden_size"), sub.get("num_hidden_layers")
        if isinstance(hidden, int) and isinstance(layers, int):
            inner = sub.get("intermediate_size") if isinstance(sub.get("intermediate_size"), int) else 4 * hidden
            params += layers * (4 * hidden * hidden + 3 * hidden * inner)
            if isinstance(sub.get("vocab_size"), int):
                params += 2 * sub["vocab_size"] * hidden
            if isinstance(image, int) and isinstance(patch, int) and patch > 0:
                params += (image // patch) ** 2 * hidden
    check_fits(params * bytes_per_param, f"the base model ({params / 1e9:.2g} billion parameters)", source)


# ----------------------------------------------------------------------------- labels

LOOKALIKE_SCRIPTS = ("LATIN", "CYRILLIC", "GREEK", "ARMENIAN", "CHEROKEE", "COPTIC")
"""Scripts with letters drawn like Latin ones: a label mixing two of them is a look-alike, not a new word."""

SKELETON = str.maketrans({
    "а": "a", "в": "b", "е": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p", "с": "c", "т": "t", "у": "y",
    "х": "x", "і": "i", "ј": "j", "ѕ": "s", "ԁ": "d", "ԛ": "q", "ԝ": "w", "ы": "bl", "ь": "b",
    "α": "a", "β": "b", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p", "τ": "t", "υ": "u",
    "χ": "x", "ı": "i", "ȷ": "j", "ɡ": "g", "ɩ": "i", "ո": "n", "ս": "u", "օ": "o",
})
"""Letters that pass for Latin ones (after casefolding), mapped to them: two labels with the same skeleton
are one label spelled twice."""


def clean_label(label: str) -> str:
    """``label`` NFKC-normalised (full-width and compatibility forms folded), invisible format characters
    (zero-width spaces and joiners, soft hyphens, byte-order marks) removed, white space collapsed."""
    text = unicodedata.normalize("NFKC", label)
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Cf")
    return " ".join(text.split())


def _describe(ch: str) -> str:
    return f"'{ch}' U+{ord(ch):04X} {unicodedata.name(ch, 'unnamed')}"


def label_problem(label: str) -> str | None:
    """Why a cleaned label cannot be used (empty, a control character, a stray combining mark, letters of two
    look-alike scripts), or None."""
    if not label:
        return "is empty"
    for ch in label:
        category = unicodedata.category(ch)
        if category in ("Cc", "Cs", "Co", "Cn"):
            return f"holds a control or unassigned character U+{ord(ch):04X}"
        if category.startswith("M"):
            return f"holds a combining mark {_describe(ch)}, which makes a look-alike of another spelling"
    scripts: dict[str, str] = {}
    for ch in label:
        if ch.isalpha():
            script = unicodedata.name(ch, "").split(" ")[0]
            if script in LOOKALIKE_SCRIPTS:
                scripts.setdefault(script, ch)
    if len(scripts) > 1:
        (first, _), *others = scripts.items()
        odd = ", ".join(_describe(ch) for _, ch in others)
        return f"mixes {first} letters with {' and '.join(s for s, _ in others)} ones ({odd}): a look-alike"
    return None


def label_skeleton(label: str) -> str:
    """What a label looks like: accents dropped, case folded, look-alike letters mapped to Latin ones."""
    decomposed = unicodedata.normalize("NFKD", label.casefold())
    bare = "".join(ch for ch in decomposed if not unicodedata.category(ch).startswith("M"))
    return bare.translate(SKELETON)


def check_labels(labels: object, path: str | Path | None, minimum: int = 2) -> list[str]:
    """A run's or a manifest's label list: strings, at least ``minimum``, each already clean
    (:func:`clean_label`) and usable (:func:`label_problem`), no two alike (:func:`label_skeleton`)."""
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise SentilensError(f"labels must be a list of strings, got {labels!r}"[:200], path)
    if len(labels) < minimum:
        raise SentilensError(f"needs at least {minimum} distinct labels to tell apart, got {labels}", path)
    seen: dict[str, str] = {}
    for label in labels:
        if clean_label(label) != label:
            raise SentilensError(f"label {label!r} is not in normal form (it would read {clean_label(label)!r}: "
                                 "invisible characters or compatibility forms)", path)
        problem = label_problem(label)
        if problem:
            raise SentilensError(f"label {label!r} {problem}", path)
        twin = seen.setdefault(label_skeleton(label), label)
        if twin != label:
            raise SentilensError(f"labels {twin!r} and {label!r} look the same: one class spelled twice", path)
        if label in labels[labels.index(label) + 1:]:
            raise SentilensError(f"label {label!r} is listed twice", path)
    return labels


def check_training_labels(labels: list[str], train_labels: Iterable[str | None], path: str | Path) -> None:
    """Before training: the manifest's labels pass :func:`check_labels` and the training posts use two or more
    of them (a one-label set trains a model that always answers it)."""
    check_labels(labels, path)
    used = {label for label in train_labels if label is not None}
    if len(used) < 2:
        raise SentilensError(f"the training posts use {len(used)} label{'' if len(used) == 1 else 's'} "
                             f"({', '.join(sorted(used)) or 'none'}): training needs at least 2", path)


# ----------------------------------------------------------------------------- tensors and outputs

COUNTER_TENSORS = ("num_batches_tracked",)
"""Integer tensors a float model legitimately saves (batch norm's update counter)."""


def check_weights(tensors: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Loaded weights: every tensor of a floating dtype (integer counters of :data:`COUNTER_TENSORS` aside) and
    finite. An int8 or bool tensor would be cast silently into a float parameter; a NaN gives NaN answers."""
    import torch

    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            if name.rsplit(".", 1)[-1] in COUNTER_TENSORS and tensor.dtype in (torch.int64, torch.int32):
                continue
            raise SentilensError(f"tensor {name} is {str(tensor.dtype).removeprefix('torch.')}, not a float type: "
                                 "not weights sentilens wrote", path)
        if tensor.numel() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise SentilensError(f"tensor {name} holds {bad} non-finite value{'s' if bad > 1 else ''} (NaN or "
                                 "infinity): the weights are damaged", path)


def check_probabilities(probabilities: Mapping[str, float]) -> None:
    """A prediction's probabilities: all finite (a NaN would be written as bare ``NaN``, which is not JSON)."""
    for label, value in probabilities.items():
        if not math.isfinite(value):
            raise SentilensError(f"the model gave a non-finite probability ({value}) for label {label!r}: its "
                                 "weights are damaged")


# ----------------------------------------------------------------------------- chat templates

TEMPLATE_SECONDS = 2.0
"""Time a chat template may take to render one prompt (a real one takes well under a millisecond)."""

MAX_PROMPT_CHARS = 1 << 20
"""Characters one rendered prompt may have."""


class _TooSlow(BaseException):
    """Raised by the tracer; a BaseException so that no ``except Exception`` in jinja or transformers swallows it."""


def check_chat_template(template: object, render: Callable[[], str], source: str | Path | None = None) -> None:
    """Compile ``template`` in the immutable sandbox transformers renders in, then run ``render``
    (one prompt through the processor) under a deadline of :data:`TEMPLATE_SECONDS`: a syntax error, a
    sandbox refusal (an attribute it forbids), an error it raises, a loop that runs away or a huge output
    is one line, at load."""
    from jinja2 import TemplateError
    from jinja2.exceptions import SecurityError

    # transformers' own environment: the sandbox plus the tags released templates use ({% generation %},
    # loop controls), so a template that renders there compiles here.
    from transformers.utils.chat_template_utils import _compile_jinja_template

    what = "chat template"
    if not isinstance(template, str):
        raise SentilensError(f"{what} must be a string, got {type(template).__name__}", source)
    try:
        _compile_jinja_template(template)
    except TemplateError as err:
        raise SentilensError(f"{what} does not compile: {' '.join(str(err).split())}", source) from None
    deadline = time.monotonic() + TEMPLATE_SECONDS

    def tracer(frame, event, arg):
        if time.monotonic() > deadline:
            raise _TooSlow
        return tracer

    before = sys.gettrace()
    sys.settrace(tracer)
    try:
        rendered = render()
    except _TooSlow:
        raise SentilensError(f"{what} did not finish one prompt within {TEMPLATE_SECONDS:g} s (a runaway loop?)",
                             source) from None
    except SecurityError as err:
        raise SentilensError(f"{what} is unsafe: the sandbox refused it ({' '.join(str(err).split())})",
                             source) from None
    except MemoryError:
        raise SentilensError(f"{what} ran out of memory rendering one prompt", source) from None
    except (TemplateError, TypeError, ValueError, KeyError, AttributeError, IndexError, OverflowError) as err:
        raise SentilensError(f"{what} fails on a prompt: {' '.join(str(err).split())[:300]}", source) from None
    finally:
        sys.settrace(before)
    if not isinstance(rendered, str) or len(rendered) > MAX_PROMPT_CHARS:
        size = len(rendered) if isinstance(rendered, str) else type(rendered).__name__
        raise SentilensError(f"{what} renders one prompt as {size} characters, more than {MAX_PROMPT_CHARS}", source)
