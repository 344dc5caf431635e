"""Write a loadable checkpoint of a released model's real layout, with random weights.

A released folder without its weight files (``../shared/checkpoints/<name>``: config, tokenizer,
processor, chat template and ``model.safetensors.index.json``) becomes a folder that
``from_pretrained`` loads like the user's download:

- the folder's own small files are copied as they are (only ``config.json`` is rewritten when layers
  are cut or widths narrowed; the weight index is written anew);
- the tensor names are the index's (the released names, which transformers renames on load); every
  name's shape comes from the model built on the meta device from the config, found through
  transformers' own checkpoint renaming, and its dtype is the config's;
- tensors are sharded as the index says; shards left empty once layers are cut are dropped and the rest
  renumbered, with a new index (``metadata.total_size`` recomputed). A folder with no index (a single-file
  release such as SmolVLM-256M) gets one ``model.safetensors`` with the names ``save_pretrained`` writes;
- ``--layers N`` / ``--tower-layers N`` keep the first N decoder / vision-tower layers (the config's
  ``num_hidden_layers`` / ``depth``; the layer lists that index into the tower are cut to match) and the
  removed layers' weights are dropped; ``--width W`` narrows the language model and tower (hidden W,
  4 heads) for a test, keeping the vocabulary, image size, patch size and every name.

Before writing, the full-depth model's names are checked against the index: a name the model has that
the index lacks, or one the index has that the model does not read, is reported (and ``--strict``
makes it an error). After writing, the folder is loaded back (``--no-load-check`` skips it): the
tokenizer (AutoTokenizer: the Qwen folders have no ``tokenizer.json``, so transformers builds the fast
tokenizer from ``vocab.json``, ``merges.txt`` and the added tokens), the processor (AutoProcessor, and
sentilens' own processor of the family when sentilens supports it), and the model with its loading
info (missing / unexpected / mismatched keys). The report is printed as JSON.

Weights are random: normal(0, the config's ``initializer_range``) for matrices and embeddings, ones for
1-D ``.weight`` tensors (norms), zeros for biases, each tensor from its own generator seeded by
``--seed`` and its name, so the same arguments write the same bytes.

A folder without ``config.json`` (the LLaVA-NeXT copy) takes one with ``--config FILE``; a folder without an
index is written as one ``model.safetensors`` under the names ``save_pretrained`` uses.

Usage: ``python benchmarks/real_layout.py SRC_DIR OUT_DIR [--layers 2] [--tower-layers 2] [--seed 0]
[--width W] [--config FILE] [--strict] [--no-load-check]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import zlib
from pathlib import Path

import torch

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class LayoutError(Exception):
    """A folder this tool cannot turn into a checkpoint; printed as one line, exit status 2."""


# --- the config -------------------------------------------------------------------------------------
def text_section(raw: dict) -> dict:
    """The part of the raw config that describes the language model (Qwen2.5-VL keeps it at the top level)."""
    return raw["text_config"] if isinstance(raw.get("text_config"), dict) else raw


def spread(indexes: list[int], depth: int) -> list[int]:
    """Deepstack layers fitted into ``depth`` tower layers: the entries that still exist, else as many as fit,
    spread evenly over the new depth, the last one always kept (their mergers beyond that count are dropped)."""
    kept = [i for i in indexes if i < depth]
    if kept:
        return kept
    count = min(len(indexes), depth)
    return [depth - 1 - (count - 1 - j) * (depth - 1) // max(count - 1, 1) for j in range(count)] if count else []


def reduced_config(raw: dict, layers: int | None, tower_layers: int | None, width: int | None,
                   released=None) -> dict:
    """The raw config with fewer layers and optionally narrower widths; everything else as released.
    ``released``: the release's parsed config, for the values its ``config.json`` leaves at their defaults."""
    raw = copy.deepcopy(raw)
    text = text_section(raw)
    if layers is not None:
        text["num_hidden_layers"] = layers
        if isinstance(text.get("layer_types"), list):
            text["layer_types"] = text["layer_types"][:layers]
        if "max_window_layers" in text:
            text["max_window_layers"] = min(text["max_window_layers"], layers)
    vision = raw.get("vision_config")
    if tower_layers is not None:
        if not isinstance(vision, dict):
            raise LayoutError("config.json has no vision_config: --tower-layers cannot apply")
        key = "depth" if "depth" in vision else "num_hidden_layers"
        old = vision.get(key)
        vision[key] = tower_layers
        if isinstance(vision.get("deepstack_visual_indexes"), list) and old:
            vision["deepstack_visual_indexes"] = spread(vision["deepstack_visual_indexes"], tower_layers)
        if isinstance(vision.get("fullatt_block_indexes"), list) and old:
            # the released towers end on a full-attention block; windowed blocks before it stay windowed
            vision["fullatt_block_indexes"] = [i for i in vision["fullatt_block_indexes"] if i < tower_layers] or [
                tower_layers - 1]
        if isinstance(raw.get("vision_feature_layer"), list):
            raw["vision_feature_layer"] = [x for x in raw["vision_feature_layer"]
                                           if -tower_layers - 1 <= x <= tower_layers] or [-1]
    if width is not None:
        narrow(raw, text, vision, width, released.get_text_config())
    return raw


def narrow(raw: dict, text: dict, vision: dict | None, width: int, parsed_text) -> None:
    """LM and tower ``width`` wide with 4 heads (2 KV heads where the model groups them); the rotary
    sections of a 3-D rope are scaled to the new head size."""
    if width % 16:
        raise LayoutError(f"--width {width} must be a multiple of 16")
    heads = 4
    old_head = getattr(parsed_text, "head_dim", None) or parsed_text.hidden_size // parsed_text.num_attention_heads
    kv_heads = getattr(parsed_text, "num_key_value_heads", None) or parsed_text.num_attention_heads
    grouped = kv_heads < parsed_text.num_attention_heads
    text.update(hidden_size=width, intermediate_size=2 * width, num_attention_heads=heads,
                num_key_value_heads=2 if grouped else heads)
    if "head_dim" in text:
        text["head_dim"] = width // heads
    for rope_key in ("rope_scaling", "rope_parameters"):
        rope = text.get(rope_key)
        if isinstance(rope, dict) and isinstance(rope.get("mrope_section"), list):
            rope["mrope_section"] = scaled_sections(rope["mrope_section"], old_head, width // heads)
    if vision is not None:
        vision.update(hidden_size=width, intermediate_size=2 * width)
        vision["num_heads" if "num_heads" in vision else "num_attention_heads"] = heads
        if "out_hidden_size" in vision:
            vision["out_hidden_size"] = width
        if "projection_dim" in vision:
            vision["projection_dim"] = width


def scaled_sections(sections: list[int], old_head: int, new_head: int) -> list[int]:
    """3-D rope sections (summing to half the head size) rescaled to a new head size, each at least 1."""
    total = new_head // 2
    scaled = [max(1, s * new_head // old_head) for s in sections]
    scaled[0] += total - sum(scaled)
    if scaled[0] < 1:
        raise LayoutError(f"head size {new_head} is too small for the rope sections {sections}")
    return scaled


def config_dtype(raw: dict) -> torch.dtype:
    """The dtype the release stores its weights in (``torch_dtype`` / ``dtype``, at the top or in the text part)."""
    for part in (raw, raw.get("text_config") or {}):
        for key in ("torch_dtype", "dtype"):
            if isinstance(part.get(key), str):
                if part[key] not in DTYPES:
                    raise LayoutError(f"config.json: dtype '{part[key]}' is not one of {sorted(DTYPES)}")
                return DTYPES[part[key]]
    return torch.float32


# --- the model's names and shapes ----------------------------------------------------------------------
def meta_model(folder: Path, raw: dict | None = None):
    """The checkpoint's model class built on the meta device from ``folder/config.json`` (or the config ``raw``):
    names and shapes, no memory."""
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.for_model(**copy.deepcopy(raw)) if raw is not None else AutoConfig.from_pretrained(folder)
    architectures = getattr(config, "architectures", None) or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    with torch.device("meta"):
        if cls is None:
            return transformers.AutoModelForImageTextToText.from_config(config)
        return cls(config)


def expected_keys(model) -> dict[str, torch.Size]:
    """The model's state names a checkpoint must provide (tied copies excluded) and their shapes."""
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    return {name: tensor.shape for name, tensor in model.state_dict().items() if name not in tied}


def checkpoint_to_model(model, names) -> dict[str, str]:
    """Checkpoint name -> the model's name, by transformers' own renaming on load (old LLaVA / Qwen2.5-VL
    releases name their tensors ``language_model.model.*``, ``visual.*``...)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    conversions = get_model_conversion_mapping(model)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    state = model.state_dict()
    mapped = {}
    for name in names:
        target, pattern = rename_source_key(name, renamings, converters, model.base_model_prefix, state)
        if pattern is not None:
            raise LayoutError(f"the index's tensor '{name}' is converted (not just renamed) on load; this tool "
                              "cannot derive its stored shape")
        mapped[name] = target
    return mapped


def saved_names(model) -> dict[str, str]:
    """Model name -> the name ``save_pretrained`` writes (for a release with no index)."""
    from transformers.core_model_loading import revert_weight_conversion

    keys = expected_keys(model)
    state = {name: tensor for name, tensor in model.state_dict().items() if name in keys}
    # placeholder tensors: the reverse renaming needs only the names
    reverted = revert_weight_conversion(model, {name: torch.empty(0).new_empty(1) for name in state})
    if len(reverted) != len(state):
        raise LayoutError("the model's save names are not one-to-one with its parameters")
    back = checkpoint_to_model(model, reverted)
    return {model_name: saved for saved, model_name in back.items()}


def compare_names(model, weight_map: dict[str, str], total_size: int | None, dtype: torch.dtype) -> dict:
    """The full-depth model against the index: names either side lacks, and the bytes the index declares."""
    keys = expected_keys(model)
    mapped = checkpoint_to_model(model, weight_map)
    unread = sorted(name for name, target in mapped.items() if target not in keys)
    covered = set(mapped.values())
    lacking = sorted(name for name in keys if name not in covered)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    size = sum(keys[mapped[n]].numel() for n in weight_map if mapped[n] in keys) * itemsize
    return {"model_names_missing_from_index": lacking, "index_names_the_model_does_not_read": unread,
            "index_total_size": total_size, "model_total_size": size,
            "total_size_matches": total_size is None or total_size == size}


# --- writing -----------------------------------------------------------------------------------------
def random_tensor(name: str, shape, dtype: torch.dtype, std: float, seed: int) -> torch.Tensor:
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=dtype)
    if len(shape) == 1 and name.endswith(".weight"):
        return torch.ones(shape, dtype=dtype)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.empty(shape, dtype=dtype).normal_(0.0, std, generator=generator)


def copy_small_files(src: Path, out: Path, skip: Path) -> list[str]:
    copied = []
    for path in sorted(src.iterdir()):
        if path.resolve() == skip.resolve() or path.name in (INDEX, "config.json"):
            continue
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES):
            shutil.copyfile(path, out / path.name)
            copied.append(path.name)
    return copied


def plan_shards(model, weight_map: dict[str, str] | None) -> dict[str, dict[str, str]]:
    """Shard file -> {checkpoint name: model name} for the model to write, in the index's shard order."""
    keys = expected_keys(model)
    if weight_map is None:
        return {SINGLE: {saved: name for name, saved in sorted(saved_names(model).items())}}
    mapped = checkpoint_to_model(model, weight_map)
    kept = {name: target for name, target in mapped.items() if target in keys}
    lacking = sorted(set(keys) - set(kept.values()))
    if lacking:
        raise LayoutError(f"the reduced model has {len(lacking)} tensors the index does not name, e.g. {lacking[0]}")
    order = list(dict.fromkeys(sorted(weight_map.values())))
    groups = {shard: {} for shard in order}
    for name in sorted(kept):
        groups[weight_map[name]][name] = kept[name]
    used = [shard for shard in order if groups[shard]]
    return {f"model-{i:05d}-of-{len(used):05d}.safetensors": groups[shard] for i, shard in enumerate(used, 1)}


def write_weights(out: Path, model, shards: dict[str, dict[str, str]], dtype: torch.dtype, std: float,
                  seed: int) -> dict:
    from safetensors.torch import save_file

    keys = expected_keys(model)
    weight_map, total = {}, 0
    for shard, names in shards.items():
        tensors = {name: random_tensor(name, keys[target], dtype, std, seed) for name, target in names.items()}
        save_file(tensors, str(out / shard), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({name: shard for name in names})
        del tensors
    if len(shards) > 1 or SINGLE not in shards:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return {"shards": list(shards), "tensors": len(weight_map), "bytes": total}


# --- checking the written folder ---------------------------------------------------------------------
def load_check(out: Path, dtype: torch.dtype, model_too: bool) -> dict:
    import transformers
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer

    report: dict = {}
    tokenizer = AutoTokenizer.from_pretrained(out)
    report["tokenizer"] = {"class": type(tokenizer).__name__, "size": len(tokenizer),
                           "fast": bool(getattr(tokenizer, "is_fast", False))}
    try:
        processor = AutoProcessor.from_pretrained(out)
        report["auto_processor"] = type(processor).__name__
    except Exception as err:  # reported, not fatal: the family's own processor may still load
        report["auto_processor"] = f"failed: {type(err).__name__}: {str(err).strip().splitlines()[0]}"
    config = AutoConfig.from_pretrained(out)
    try:
        from sentilens.mllm.families import family_for_config

        family = family_for_config(config, str(out))
        processor = family.load_processor(str(out))
        report["sentilens_processor"] = f"{family.name}: {type(processor).__name__}"
    except Exception as err:
        report["sentilens_processor"] = f"failed: {type(err).__name__}: {str(err).strip().splitlines()[0]}"
    if model_too:
        cls = getattr(transformers, config.architectures[0])
        _, info = cls.from_pretrained(out, dtype=dtype, use_safetensors=True, output_loading_info=True)
        report["load"] = {k: sorted(map(str, v)) for k, v in info.items() if k != "error_msgs"}
    return report


def build(src: Path, out: Path, layers: int | None = None, tower_layers: int | None = None, width: int | None = None,
          seed: int = 0, strict: bool = False, check: bool = True, config: Path | None = None) -> dict:
    """Write ``out`` from ``src`` (see the module docstring) and return the report; ``config``: the config to
    use when the folder has none (LLaVA-NeXT's copy), else the folder's ``config.json``."""
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    config = config or src / "config.json"
    if not config.is_file():
        raise LayoutError(f"{config}: no such config (a folder without config.json needs --config FILE)")
    if out.exists() and any(out.iterdir()):
        raise LayoutError(f"{out}: the folder exists and is not empty (nothing is overwritten)")
    try:
        raw = json.loads(config.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise LayoutError(f"{config}: not JSON ({err})") from None
    index = json.loads((src / INDEX).read_text(encoding="utf-8")) if (src / INDEX).is_file() else None
    weight_map = index["weight_map"] if index else None
    dtype = config_dtype(raw)
    report: dict = {"source": str(src), "out": str(out), "dtype": str(dtype).removeprefix("torch.")}
    if weight_map is not None:
        declared = (index.get("metadata") or {}).get("total_size")
        report["names"] = compare_names(meta_model(src, raw), weight_map, declared, dtype)
        problems = report["names"]["model_names_missing_from_index"] + report["names"][
            "index_names_the_model_does_not_read"]
        if strict and problems:
            raise LayoutError(f"{src / INDEX}: {len(problems)} names differ from the model's, e.g. {problems[0]}")
    out.mkdir(parents=True, exist_ok=True)
    report["copied"] = copy_small_files(src, out, skip=config)
    new_raw = reduced_config(raw, layers, tower_layers, width, AutoConfig.for_model(**copy.deepcopy(raw)))
    (out / "config.json").write_text(json.dumps(new_raw, indent=2) + "\n", encoding="utf-8")
    model = meta_model(out)
    text = model.config.get_text_config()
    if layers is not None and text.num_hidden_layers != layers:
        raise LayoutError(f"config.json: the text config read back has {text.num_hidden_layers} layers, not {layers}")
    std = float(getattr(text, "initializer_range", None) or 0.02)
    report["weights"] = write_weights(out, model, plan_shards(model, weight_map), dtype, std, seed)
    if check:
        report["check"] = load_check(out, dtype, model_too=True)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="a released folder (config, tokenizer, processor, index; no weights)")
    parser.add_argument("out", type=Path, help="the checkpoint folder to write (new or empty)")
    parser.add_argument("--layers", type=int, help="decoder layers to keep (default: all)")
    parser.add_argument("--tower-layers", type=int, help="vision-tower layers to keep (default: all)")
    parser.add_argument("--width", type=int, help="narrow the LM and tower to this hidden size (tests only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", type=Path, help="the config for a folder that has no config.json")
    parser.add_argument("--strict", action="store_true", help="names differing from the index are an error")
    parser.add_argument("--no-load-check", action="store_true", help="skip loading the written folder back")
    args = parser.parse_args(argv)
    for flag in ("layers", "tower_layers", "width"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    try:
        report = build(args.src, args.out, args.layers, args.tower_layers, args.width, args.seed, args.strict,
                       check=not args.no_load_check, config=args.config)
    except LayoutError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
