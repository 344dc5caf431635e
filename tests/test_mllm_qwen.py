"""Qwen2.5-VL and Qwen3-VL input building and visual-token filtering (sentilens.mllm.families.qwen_vl), on tiny random
models saved and loaded back with from_pretrained, checked against the native HF models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from sentilens.errors import SentilensError
from sentilens.mllm.families.qwen_vl import flops as qwen_flops
from sentilens.mllm.families.qwen_vl import positions as qwen_positions
from sentilens.mllm.families.qwen_vl import processor as qwen_processor
from sentilens.mllm.families.qwen_vl import tiny as qwen_tiny
from sentilens.mllm.families.qwen_vl import vision as qwen_vision
from sentilens.mllm.inputs import LmInputs, language_model_hidden
from sentilens.mllm.model import load_checkpoint
from sentilens.mllm.pruning import parse_strategy

FAMILIES = ("qwen2.5-vl", "qwen3-vl")


@pytest.fixture(scope="module", params=FAMILIES)
def tiny_folder(request, tmp_path_factory):
    return qwen_tiny.build_tiny_qwen(tmp_path_factory.mktemp(request.param), request.param,
                                corpus=["the sun is out", "another terrible storm"])


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    model, processor = load_checkpoint(tiny_folder)
    model.eval()
    return model, processor


def _images(seed: int = 0):
    """A square image (12 x 12 patches = 36 tokens) and a wide one (10 x 18 patches = 45 tokens)."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random(shape) * 255).astype("uint8")) for shape in ((168, 168, 3), (100, 180, 3))]


def _prompt(processor, text: str, image: bool = True) -> list[int]:
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]
    rendered = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return processor.tokenizer(rendered)["input_ids"]


def _native_logits(model, ids: list[int], images: qwen_processor.QwenImages | None, count: int) -> torch.Tensor:
    """HF's own forward on one post: the placeholder repeated ``count`` times, HF's get_rope_index positions."""
    image_id = model.config.image_token_id
    if images is None:
        expanded = torch.tensor([ids])
        return model(input_ids=expanded, attention_mask=torch.ones_like(expanded)).logits[0]
    at = ids.index(image_id)
    expanded = torch.tensor([ids[:at] + [image_id] * count + ids[at + 1:]])
    return model(input_ids=expanded, pixel_values=images.pixel_values, image_grid_thw=images.grid_thw,
                 attention_mask=torch.ones_like(expanded), mm_token_type_ids=(expanded == image_id).int()).logits[0]


def _logits(model, inputs: LmInputs) -> torch.Tensor:
    return model.lm_head(language_model_hidden(model, inputs).last_hidden_state)


@torch.no_grad()
def test_all_tokens_reproduce_the_native_model(tiny):
    """r = 1 (no filter) gives HF's logits, in a left-padded batch mixing a square, a wide and no image."""
    model, processor = tiny
    images = qwen_processor.preprocess_images(processor.image_processor, _images())
    assert images.grid_thw.tolist() == [[1, 12, 12], [1, 10, 18]]
    ids = [_prompt(processor, "what a day"), _prompt(processor, "hi"), _prompt(processor, "no picture", False)]
    filt = qwen_vision.QwenTokenFilter(model, 1.0)
    for token_filter in (None, filt):
        inputs = qwen_positions.build_inputs(model, ids, images, [0, 1, None], token_filter, padding_side="left")
        assert inputs.image_tokens == [36, 45, 0]
        mine = _logits(model, inputs)
        for i, row in enumerate([0, 1, None]):
            native = _native_logits(model, ids[i], None if row is None else images.select([row]),
                                    inputs.image_tokens[i])
            torch.testing.assert_close(mine[i, -native.shape[0]:], native, atol=1e-5, rtol=0)


@torch.no_grad()
def test_kept_tokens_keep_their_native_positions(tiny):
    """Each kept token has the 3-D position HF gives it in the full sequence; the text after the image too."""
    model, processor = tiny
    images = qwen_processor.preprocess_images(processor.image_processor, _images()[1:])
    ids = _prompt(processor, "a wide picture")
    image_id = model.config.image_token_id
    at = ids.index(image_id)
    full = torch.tensor([ids[:at] + [image_id] * 45 + ids[at + 1:]])
    native, _ = model.model.get_rope_index(full, mm_token_type_ids=(full == image_id).int(),
                                           image_grid_thw=images.grid_thw)
    filt = qwen_vision.QwenTokenFilter(model, 0.3)
    inputs = qwen_positions.build_inputs(model, [ids], images, [0], filt)
    kept = filt.last[0].kept
    assert inputs.image_tokens == [math.ceil(0.3 * 45)]
    keep_rows = torch.cat([torch.arange(at), at + kept, torch.arange(at + 45, full.shape[1])])
    assert torch.equal(inputs.position_ids[:, 0], native[:, 0, keep_rows])
    # the text after the image starts at s + max(H/2, W/2) = at + 9, not at + the kept count
    assert inputs.position_ids[0, 0, at + len(kept)].item() == at + 9


@pytest.mark.parametrize("ratio", [0.05, 0.4, 0.75])
@torch.no_grad()
def test_kept_count_reaching_the_language_model(tiny, ratio):
    """ceil(r * N) visual tokens per image reach the language model (N = 36 and 45 here)."""
    model, processor = tiny
    images = qwen_processor.preprocess_images(processor.image_processor, _images())
    ids = [_prompt(processor, "one"), _prompt(processor, "two")]
    seen = {}
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"].shape), with_kwargs=True)
    try:
        inputs = qwen_positions.build_inputs(model, ids, images, [0, 1], qwen_vision.QwenTokenFilter(model, ratio))
        language_model_hidden(model, inputs)
    finally:
        hook.remove()
    expected = [math.ceil(ratio * 36), math.ceil(ratio * 45)]
    image_id = model.config.image_token_id
    assert ((inputs.input_ids == image_id) & inputs.attention_mask.bool()).sum(dim=1).tolist() == expected
    assert seen["embeds"][1] == max(len(ids[i]) - 1 + expected[i] for i in range(2))
    for level in inputs.lm_kwargs.get("deepstack_visual_embeds", []):
        assert level.shape[0] == sum(expected)


@pytest.mark.parametrize("strategy", ["all", "random", "inverse"])
@torch.no_grad()
def test_batched_equals_one_by_one(tiny, strategy):
    """A batch of images with different kept counts gives each post the logits it gets alone."""
    model, processor = tiny
    images = qwen_processor.preprocess_images(processor.image_processor, _images())
    ids = [_prompt(processor, "first post"), _prompt(processor, "the second, longer post")]
    batch = qwen_positions.build_inputs(model, ids, images, [0, 1], qwen_vision.QwenTokenFilter(model, 0.4, strategy),
                              padding_side="left")
    assert batch.image_tokens == [15, 18]
    together = _logits(model, batch)
    for i in range(2):
        alone = qwen_positions.build_inputs(model, [ids[i]], images.select([i]), [0],
                                            qwen_vision.QwenTokenFilter(model, 0.4, strategy), padding_side="left")
        single = _logits(model, alone)[0]
        torch.testing.assert_close(together[i, -single.shape[0]:], single, atol=1e-5, rtol=0)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding by hand: x * cos + rotate_half(x) * sin, per token over (heads, head_dim)."""
    half = x.shape[-1] // 2
    turned = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None].float() + turned * sin[:, None].float()


def _reference_scores(model, images: qwen_processor.QwenImages, layers: list[int]) -> list[torch.Tensor]:
    """Received attention written out by hand: the full eager softmax map of each image at each scored layer
    (from the block's input, its norm and qkv weights and the rotary angles the tower passes it), mean over
    heads and queries, mean over the layers, mean over each 2x2 block, in raster order. The tower's patch order
    (window by window for Qwen2.5-VL) is found by matching the patch embeddings row by row."""
    visual = model.model.visual
    captured: dict = {}
    hooks = [visual.patch_embed.register_forward_hook(lambda m, a, out: captured.update(embedded=out))]
    for index in layers:
        def grab(module, args, kwargs, index=index):
            captured[index] = (args[0] if args else kwargs["hidden_states"], kwargs["position_embeddings"])
        hooks.append(visual.blocks[index].register_forward_pre_hook(grab, with_kwargs=True))
    first = {}
    hooks.append(visual.blocks[0].register_forward_pre_hook(
        lambda m, args, kwargs: first.update(x=args[0] if args else kwargs["hidden_states"]), with_kwargs=True))
    try:
        with torch.no_grad():
            visual(images.pixel_values, grid_thw=images.grid_thw)
    finally:
        for hook in hooks:
            hook.remove()
    embedded, tower_order = captured["embedded"], first["x"]
    if hasattr(visual, "pos_embed"):  # Qwen3-VL adds learned positions before the blocks: no reordering
        permutation = torch.arange(embedded.shape[0])
    else:
        distance = torch.cdist(tower_order.float(), embedded.float())
        permutation = distance.argmin(dim=1)  # tower row -> raster row
        assert torch.equal(torch.sort(permutation).values, torch.arange(embedded.shape[0]))
    heads = visual.blocks[0].attn.num_heads
    sizes = images.patch_counts()
    total = torch.zeros(embedded.shape[0])
    for index in layers:
        hidden, (cos, sin) = captured[index]
        attn = visual.blocks[index].attn
        qkv = attn.qkv(visual.blocks[index].norm1(hidden)).reshape(hidden.shape[0], 3, heads, -1)
        q, k = qkv[:, 0].float(), qkv[:, 1].float()

        q, k = (_rotate(x, cos, sin) for x in (q, k))
        received = torch.zeros(hidden.shape[0])
        raster_start = 0
        for size in sizes:
            rows = torch.nonzero((permutation >= raster_start) & (permutation < raster_start + size)).flatten()
            qi, ki = q[rows].transpose(0, 1), k[rows].transpose(0, 1)  # (heads, T, d)
            weights = torch.softmax(qi @ ki.transpose(1, 2) * attn.scaling, dim=-1)  # (heads, T, T)
            received[rows] = weights.mean(dim=(0, 1))
            raster_start += size
        raster = torch.zeros_like(received)
        raster[permutation] = received
        total += raster
    per_block = (total / len(layers)).view(-1, 4).mean(dim=1)
    return list(torch.split(per_block, [s // 4 for s in sizes]))


@torch.no_grad()
def test_scores_match_hand_computed_attention_maps(tiny):
    model, processor = tiny
    images = qwen_processor.preprocess_images(processor.image_processor, _images())
    filt = qwen_vision.QwenTokenFilter(model, 0.4)
    qwen_positions.build_inputs(model, [_prompt(processor, "a"), _prompt(processor, "b")], images, [0, 1], filt)
    layers = qwen_vision.scored_layers(model.model.visual, filt.strategy)
    if model.config.model_type == "qwen2_5_vl":
        assert layers == [1, 3]  # the tiny tower's full-attention layers; 0 and 2 are windowed
    else:
        assert layers == [0, 1, 2, 3]
    reference = _reference_scores(model, images, layers)
    for got, want in zip(filt.last, reference, strict=True):
        torch.testing.assert_close(got.scores, want, atol=1e-8, rtol=1e-5)
        assert torch.equal(got.kept, torch.sort(torch.topk(want, got.kept.numel()).indices).values)


def test_windowed_layers_and_merge_are_refused(tiny):
    model, _ = tiny
    if model.config.model_type == "qwen2_5_vl":
        with pytest.raises(SentilensError, match="windowed-attention layers"):
            qwen_vision.QwenTokenFilter(model, 0.5, "0")
        assert qwen_vision.scored_layers(model.model.visual, parse_strategy("0:2")) == [1]
    else:  # Qwen3-VL: "feature" = the layers whose outputs reach the language model (deepstack + last)
        assert model.config.vision_config.deepstack_visual_indexes == [2]
        assert qwen_vision.scored_layers(model.model.visual, parse_strategy("feature")) == [2, 3]
    assert qwen_vision.scored_layers(model.model.visual, parse_strategy("last")) == [3]
    with pytest.raises(SentilensError, match=r"\+merge"):
        qwen_vision.QwenTokenFilter(model, 0.5, "all+merge")
    with pytest.raises(SentilensError, match=r"native 3-D position always"):
        qwen_vision.QwenTokenFilter(model, 0.5, "all+native")


@torch.no_grad()
def test_deepstack_features_follow_the_kept_tokens(tiny):
    """Qwen3-VL: the deepstack features reach the language model for exactly the kept tokens, and matter.
    Qwen2.5-VL has none."""
    model, processor = tiny
    images = qwen_processor.preprocess_images(processor.image_processor, _images()[:1])
    ids = [_prompt(processor, "deep")]
    filt = qwen_vision.QwenTokenFilter(model, 0.5)
    inputs = qwen_positions.build_inputs(model, ids, images, [0], filt)
    if model.config.model_type == "qwen2_5_vl":
        assert inputs.lm_kwargs == {}
        return
    full = qwen_vision.visual_tokens(model, images)[0]
    kept = filt.last[0].kept
    deepstack = inputs.lm_kwargs["deepstack_visual_embeds"]
    assert len(deepstack) == len(model.config.vision_config.deepstack_visual_indexes) > 0
    for level, features in enumerate(deepstack):
        torch.testing.assert_close(features, full.deepstack[level][kept], atol=1e-6, rtol=0)
    without = LmInputs(**{**inputs.__dict__, "lm_kwargs": {}})
    assert not torch.allclose(_logits(model, inputs), _logits(model, without), atol=1e-4)


@torch.no_grad()
def test_label_scoring_matches_the_native_model(tiny):
    """One-pass label scoring (answers as branches after the prompt, at the native positions that follow it)
    gives each label the log-probability HF's own forward gives prompt + answer, at r = 1 and r = 0.5."""
    from sentilens.mllm.scoring import label_log_probs

    model, processor = tiny
    images = qwen_processor.preprocess_images(processor.image_processor, _images())
    ids = [_prompt(processor, "what a day"), _prompt(processor, "hi"), _prompt(processor, "no image", False)]
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    answers = [processor.tokenizer(word)["input_ids"] + [end] for word in ("positive", "neutral", "not informative")]
    image_id = model.config.image_token_id
    for ratio in (None, 0.5):
        token_filter = None if ratio is None else qwen_vision.QwenTokenFilter(model, ratio)
        inputs = qwen_positions.build_inputs(model, ids, images, [0, 1, None], token_filter, padding_side="left")
        scored = label_log_probs(model, inputs, answers)
        for i, row in enumerate([0, 1, None]):
            for c, answer in enumerate(answers):
                if row is None:
                    expanded, pixels, grid = ids[i] + answer, None, None
                else:
                    at = ids[i].index(image_id)
                    n = images.patch_counts()[row] // 4
                    expanded = ids[i][:at] + [image_id] * n + ids[i][at + 1:] + answer
                    one = images.select([row])
                    pixels, grid = one.pixel_values, one.grid_thw
                tokens = torch.tensor([expanded])
                if ratio is not None and row is not None:
                    # the native model on the same kept tokens: drop the others from its full input, keeping
                    # every remaining token's native position (HF's get_rope_index on the full sequence)
                    native_positions, _ = model.model.get_rope_index(
                        tokens, mm_token_type_ids=(tokens == image_id).int(), image_grid_thw=grid)
                    kept = token_filter.last[row].kept
                    full_embeds = model.get_input_embeddings()(tokens)
                    features = model.model.get_image_features(pixels, grid).pooler_output[0]
                    full_embeds[0, at:at + n] = features
                    rows = torch.cat([torch.arange(at), at + kept, torch.arange(at + n, tokens.shape[1])])
                    extra = {}
                    if model.config.model_type == "qwen3_vl":
                        deep = model.model.get_image_features(pixels, grid).deepstack_features
                        extra = {"visual_pos_masks": (tokens[:, rows] == image_id),
                                 "deepstack_visual_embeds": [_first(level)[kept] for level in deep]}
                    hidden = model.model.language_model(inputs_embeds=full_embeds[:, rows],
                                                        position_ids=native_positions[:, :, rows], **extra)
                    logits = model.lm_head(hidden.last_hidden_state)[0]
                else:
                    logits = (model(input_ids=tokens, pixel_values=pixels, image_grid_thw=grid,
                                    mm_token_type_ids=(tokens == image_id).int()).logits[0] if pixels is not None
                              else model(input_ids=tokens).logits[0])
                steps = logits[-len(answer) - 1:-1].log_softmax(dim=-1)
                expected = steps.gather(1, torch.tensor(answer)[:, None]).sum()
                torch.testing.assert_close(scored[i, c], expected, atol=1e-4, rtol=0)


def test_picture_is_the_image_the_tower_sees(tiny):
    """The flattened patches put back together: a left-red / right-blue image stays so, at the grid's size."""
    _, processor = tiny
    left_right = Image.new("RGB", (200, 120), (255, 0, 0))
    left_right.paste((0, 0, 255), (100, 0, 200, 120))
    images = qwen_processor.preprocess_images(processor.image_processor, [left_right])
    _, gh, gw = images.grid_thw[0].tolist()
    view = qwen_processor.picture(processor.image_processor, images)
    p = processor.image_processor.patch_size
    assert tuple(view.shape) == (gh * p, gw * p, 3) and gw > gh
    half = view.shape[1] // 2
    torch.testing.assert_close(view[:, : half - p].mean(dim=(0, 1)), torch.tensor([1.0, 0.0, 0.0]), atol=0.02, rtol=0)
    torch.testing.assert_close(view[:, half + p:].mean(dim=(0, 1)), torch.tensor([0.0, 0.0, 1.0]), atol=0.02, rtol=0)


def test_flop_count_matches_the_operations_run(tiny):
    """prediction_flops against torch's FLOP counter on the real forward passes (eager attention, so the
    attention matmuls are counted too): tower, scoring (no matmul of its own), merger(s) on the kept tokens,
    language model."""
    from torch.utils.flop_counter import FlopCounterMode

    model, processor = tiny
    model.set_attn_implementation("eager")
    try:
        images = qwen_processor.preprocess_images(processor.image_processor, _images()[:1])
        ids = [_prompt(processor, "count me")]
        filt = qwen_vision.QwenTokenFilter(model, 0.5)
        counted = {}
        with torch.no_grad():
            for name, run in (("vision", lambda: qwen_vision.encode_images(model, images)),
                              ("scored", lambda: qwen_vision.encode_images(model, images, filt.scorer)),
                              ("tokens", lambda: qwen_vision.visual_tokens(model, images, filt))):
                with FlopCounterMode(display=False) as counter:
                    out = run()
                counted[name] = counter.get_total_flops()
            inputs = qwen_positions.assemble(model, ids, out)
            with FlopCounterMode(display=False) as counter:
                language_model_hidden(model, inputs)
            counted["language"] = counter.get_total_flops()
    finally:
        model.set_attn_implementation("sdpa")
    flops = qwen_flops.prediction_flops(model.config, 36, 18, len(ids[0]) - 1, 0, len(filt.scorer.layers))
    assert flops["vision"] == counted["vision"]
    # a scored layer's map serves its output too: no extra matmul, one addition per head and map entry
    assert counted["scored"] == counted["vision"]
    heads = model.config.vision_config.num_heads
    assert flops["scoring"] == len(filt.scorer.layers) * heads * 144 ** 2
    assert flops["projector"] == counted["tokens"] - counted["scored"]
    assert flops["language"] == counted["language"]


def _first(level):
    """Image 0's rows of a deepstack level (HF splits the levels per image, or gives one tensor)."""
    return level[0] if isinstance(level, (list, tuple)) else level


def test_image_token_count_follows_the_processor(tiny):
    _, processor = tiny
    for size in ((168, 168), (180, 100), (37, 400)):
        images = qwen_processor.preprocess_images(processor.image_processor, [Image.new("RGB", size)])
        assert qwen_processor.image_tokens_for(processor.image_processor, size) == images.patch_counts()[0] // 4


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_fine_tuning_trains_the_mergers_and_the_language_model_only(tiny_folder, mode):
    """The tower stays frozen; the merger(s) (the projector, deepstack mergers included) and the language
    model (or its LoRA adapters) train, and one loss step reaches them."""
    from sentilens.mllm.inputs import MllmBatch
    from sentilens.mllm.model import prepare_model

    torch.manual_seed(0)
    model = prepare_model(tiny_folder, mode, training=True)
    trainable = [name for name, p in model.net.named_parameters() if p.requires_grad]
    assert not any(".visual.blocks." in name or ".visual.patch_embed." in name for name in trainable)
    assert any(".visual.merger." in name for name in trainable)
    if model.vlm.config.model_type == "qwen3_vl":
        assert any(".visual.deepstack_merger_list." in name for name in trainable)
    lm = [name for name in trainable if ".language_model." in name]
    assert lm and (mode == "full" or all("lora_" in name for name in lm))
    images = qwen_processor.preprocess_images(model.processor.image_processor, _images())
    ids = [_prompt(model.processor, "one"), _prompt(model.processor, "two")]
    end = model.processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    answer = model.processor.tokenizer("positive")["input_ids"] + [end]
    batch = MllmBatch([i + answer for i in ids], images.pixel_values, [0, 1],
                      [[-100] * len(i) + answer for i in ids], {"image_grid_thw": images.grid_thw})
    model(batch).backward()
    merger = model.vlm.model.visual.merger
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in merger.parameters())


@torch.no_grad()
def test_greedy_generation_matches_the_native_model(tiny):
    """Generation with a KV cache from the assembled 3-D positions gives the tokens a native HF greedy loop
    (full forward at every step, HF's own positions) gives."""
    from sentilens.mllm.scoring import greedy_answers

    model, processor = tiny
    images = qwen_processor.preprocess_images(processor.image_processor, _images())
    ids = [_prompt(processor, "what a day"), _prompt(processor, "hi")]
    special = torch.tensor(processor.tokenizer.convert_tokens_to_ids(qwen_tiny.QWEN_SPECIALS))

    def no_specials(module, args, logits):  # a random model may "generate" an image token; HF then refuses it
        return logits.index_fill(-1, special.to(logits.device), float("-inf"))

    hook = model.lm_head.register_forward_hook(no_specials)
    try:
        _compare_greedy(model, processor, ids, images, greedy_answers)
    finally:
        hook.remove()


def _compare_greedy(model, processor, ids, images, greedy_answers):
    inputs = qwen_positions.build_inputs(model, ids, images, [0, 1], padding_side="left")
    generated = greedy_answers(model, inputs, stop_ids=set(), max_new_tokens=4)
    image_id = model.config.image_token_id
    for i in range(2):
        at = ids[i].index(image_id)
        sequence = ids[i][:at] + [image_id] * inputs.image_tokens[i] + ids[i][at + 1:]
        one = images.select([i])
        for _ in range(4):
            tokens = torch.tensor([sequence])
            logits = model(input_ids=tokens, pixel_values=one.pixel_values, image_grid_thw=one.grid_thw,
                           mm_token_type_ids=(tokens == image_id).int()).logits[0, -1]
            sequence.append(int(logits.argmax()))
        assert generated[i] == sequence[-4:]


def test_a_processor_level_chat_template_is_read(tiny_folder, tmp_path):
    """Qwen2.5-VL releases keep the chat template in chat_template.json beside a tokenizer without one."""
    import json
    import shutil

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_folder, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    template = "{% for m in messages %}<|im_start|>{{ m['role'] }}<|im_end|>{% endfor %}"
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    assert qwen_processor.QwenProcessor.from_pretrained(str(folder)).chat_template == template
