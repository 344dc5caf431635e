"""Released checkpoint files in CI: the real tokenizers, chat templates, processors, configs and weight indexes.

``tests/data/checkpoints/<name>/`` holds the small files of released checkpoints (sources and licences in
each folder's ``SOURCE.md``); weights are written at random by ``benchmarks/real_layout.py`` with the
released names, shards and dtypes (narrowed widths and 2 + 2 layers here, so the test is quick; the
benchmark tool itself runs at the real widths). What is checked, against the released files rather than
against sentilens' own output:

- LLaVA-1.5: the paper's Table-1 prompt tokenizes as the released processor tokenizes it (576 image
  tokens, the post, the question with the label list, the assistant turn); every label's full answer
  (several pieces, a leading-space piece, the end token) is what label scoring sums, equal to the
  released model class's own forward; an image is padded with the processor's mean colour;
  the real-layout checkpoint loads with no missing or unexpected key.
- Qwen2.5-VL / Qwen3-VL: the fast tokenizer built from ``vocab.json`` + ``merges.txt`` + the added tokens.
- What the released files revealed, each held by a test: the Qwen preprocessors' ``SizeDict`` (no mapping);
  templates that join text parts with nothing (the post and the question are one part now); LLaVA-NeXT-Mistral's
  template refusing a system turn; Qwen answering ``label<|im_end|>`` with no leading space; SmolVLM v1
  (``Idefics3ForConditionalGeneration``) refused.
"""

import functools
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from sentilens.data.records import Post
from sentilens.mllm.prompt import LLAVA15_SYSTEM, PromptBuilder, PromptSettings

DATA = Path(__file__).parent / "data" / "checkpoints"
TOOL = Path(__file__).resolve().parents[1] / "benchmarks" / "real_layout.py"
LLAVA = DATA / "llava-1.5-7b-hf"
TEXT = "Flooded streets downtown, the bridge is closed"
SENTIMENT_QUESTION = "What is the sentiment of the given text? Answer with one of: positive, neutral, negative."


def real_layout():
    """benchmarks/real_layout.py, imported by path (benchmarks/ is no package)."""
    if "real_layout" not in sys.modules:
        spec = importlib.util.spec_from_file_location("real_layout", TOOL)
        module = importlib.util.module_from_spec(spec)
        sys.modules["real_layout"] = module
        spec.loader.exec_module(module)
    return sys.modules["real_layout"]


@pytest.fixture(scope="module")
def llava_folder(tmp_path_factory):
    """LLaVA-1.5's released files + random weights in its real layout: 2 LM layers, 2 tower layers, 64 wide."""
    out = tmp_path_factory.mktemp("real") / "llava-1.5"
    report = real_layout().build(LLAVA, out, layers=2, tower_layers=2, width=64, seed=0, check=False)
    return out, report


@pytest.fixture(scope="module")
def llava(llava_folder):
    from sentilens.mllm.model import load_checkpoint

    model, processor = load_checkpoint(llava_folder[0])
    model.eval()
    return model, processor


@pytest.fixture(scope="module")
def wide_image(tmp_path_factory):
    """A 240 x 120 picture with distinct halves, so padding and the content are told apart."""
    path = tmp_path_factory.mktemp("img") / "wide.png"
    image = Image.new("RGB", (240, 120), (200, 30, 30))
    image.paste((20, 160, 60), (120, 0, 240, 120))
    image.save(path)
    return path


def expand2square(image, colour):
    """LLaVA's own padding (llava/mm_utils.py): the image centred on a square of its long side."""
    width, height = image.size
    side = max(width, height)
    square = Image.new(image.mode, (side, side), colour)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def released_prompt(processor, text: str, question: str) -> str:
    """The prompt as the released chat template renders a system turn and a user turn of the image and one
    text: the post, then the question on the next line."""
    messages = [{"role": "system", "content": [{"type": "text", "text": LLAVA15_SYSTEM}]},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"{text}\n{question}"}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


# --- the weights --------------------------------------------------------------------------------------
def test_index_names_match_the_model_and_the_cut_checkpoint_loads_with_no_missing_key(llava_folder):
    import transformers

    out, report = llava_folder
    names = report["names"]
    assert names["model_names_missing_from_index"] == [] and names["index_names_the_model_does_not_read"] == []
    assert names["total_size_matches"] and names["index_total_size"] == 14126854144
    released = json.loads((LLAVA / "model.safetensors.index.json").read_text())["weight_map"]
    written = json.loads((out / "model.safetensors.index.json").read_text())
    # the released names (old layout: language_model.model.*, vision_tower.vision_model.*), layers 0-1 only
    assert set(written["weight_map"]) < set(released)
    layers = {n.split(".layers.")[1].split(".")[0] for n in written["weight_map"] if ".layers." in n}
    assert layers == {"0", "1"}
    assert "language_model.lm_head.weight" in written["weight_map"]
    assert sorted(set(written["weight_map"].values())) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert written["metadata"]["total_size"] == report["weights"]["bytes"]
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == 2 and config["vision_config"]["num_hidden_layers"] == 2
    cls = getattr(transformers, config["architectures"][0])
    model, info = cls.from_pretrained(out, use_safetensors=True, output_loading_info=True)
    assert {key: sorted(map(str, info[key])) for key in ("missing_keys", "unexpected_keys", "mismatched_keys")} == {
        "missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}
    assert model.dtype == torch.float16  # the release's dtype
    assert model.model.language_model.embed_tokens.weight.shape == (32064, 64)


def test_the_tool_refuses_to_overwrite_a_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(real_layout().LayoutError, match="not empty"):
        real_layout().build(LLAVA, out, layers=1, check=False)
    assert (out / "mine.txt").read_text() == "keep"


def test_the_tool_names_a_folder_without_config_in_one_line(tmp_path, capsys):
    # the LLaVA-NeXT copy has no config.json of its own
    assert real_layout().main([str(DATA / "llava-v1.6-mistral-7b-hf"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "config.json" in err and "--config" in err
    assert not (tmp_path / "out").exists()


# --- LLaVA-1.5: prompt, answers, scoring, padding ------------------------------------------------------
def test_llava15_table1_prompt_tokenizes_as_the_released_processor_does(llava, wide_image):
    from sentilens.mllm.inputs import build_inputs, make_batch
    from sentilens.mllm.model import num_image_tokens

    model, processor = llava
    assert num_image_tokens(model, processor) == 576
    builder = PromptBuilder(processor, PromptSettings(), ["positive", "neutral", "negative"], 576)
    # the released template: system text, USER: image first, each text followed by a space, ASSISTANT:
    literal = f"{LLAVA15_SYSTEM} USER: <image>\n{TEXT}\n{SENTIMENT_QUESTION} ASSISTANT:"
    assert released_prompt(processor, TEXT, SENTIMENT_QUESTION) == literal
    assert builder.render(TEXT, has_image=True) == literal

    batch = make_batch(builder, [Post("p", TEXT, str(wide_image))])
    inputs = build_inputs(model, batch, padding_side="left")
    colour = tuple(int(x * 255) for x in processor.image_processor.image_mean)
    square = expand2square(Image.open(wide_image).convert("RGB"), colour)
    expected = processor(text=literal, images=square, return_tensors="pt")
    assert inputs.input_ids[0].tolist() == expected["input_ids"][0].tolist()
    ids = expected["input_ids"][0].tolist()
    assert ids.count(processor.tokenizer.convert_tokens_to_ids("<image>")) == 576 == inputs.image_tokens[0]
    assert ids[0] == processor.tokenizer.bos_token_id
    assert processor.tokenizer.convert_ids_to_tokens(ids[-5:]) == ["▁A", "SS", "IST", "ANT", ":"]


def test_llava15_answers_are_the_full_token_sequences_and_scoring_sums_them(llava, wide_image):
    from sentilens.mllm.inputs import build_inputs, make_batch
    from sentilens.mllm.scoring import label_log_probs

    model, processor = llava
    tokenizer = processor.tokenizer
    labels = ["informative", "not_informative"]
    builder = PromptBuilder(processor, PromptSettings(task="informative"), labels, 576)
    pieces = {label: tokenizer.convert_ids_to_tokens(ids) for label, ids in builder.answer_ids.items()}
    # the Llama-2 vocabulary: a leading-space first piece, words of several pieces, then </s>
    assert pieces == {"informative": ["▁inform", "ative", "</s>"],
                      "not_informative": ["▁not", "▁inform", "ative", "</s>"]}
    prompt = builder.render(TEXT, has_image=True)
    for label, ids in builder.answer_ids.items():
        # in context, after the generation prompt, the released tokenizer splits the answer the same way
        whole = tokenizer(prompt + " " + label.replace("_", " "))["input_ids"]
        assert whole[-(len(ids) - 1):] == ids[:-1] and ids[-1] == tokenizer.eos_token_id

    batch = make_batch(builder, [Post("p", TEXT, str(wide_image))])
    with torch.no_grad():
        scored = label_log_probs(model, build_inputs(model, batch, padding_side="left"),
                                 [builder.answer_ids[label] for label in labels])[0]
        expected_prompt = processor(text=prompt, images=Image.open(wide_image).convert("RGB"))["input_ids"][0]
        for c, label in enumerate(labels):
            answer = builder.answer_ids[label]
            ids = torch.tensor([list(expected_prompt) + answer])
            # the released model class's own forward (its image handling, its positions) on prompt + answer
            logits = model(input_ids=ids, pixel_values=batch.pixel_values).logits[0].float()
            log_probs = logits[len(expected_prompt) - 1:-1].log_softmax(-1)
            reference = log_probs.gather(-1, torch.tensor(answer)[:, None]).sum()
            assert torch.allclose(scored[c], reference, atol=1e-3), (label, scored[c], reference)


def test_llava15_pads_with_the_processor_mean_colour(llava, wide_image):
    from sentilens.mllm.inputs import pixel_values

    _, processor = llava
    image_processor = processor.image_processor
    image = Image.open(wide_image).convert("RGB")
    pixels = pixel_values(image_processor, [image], "pad")[0]
    mean = torch.tensor(image_processor.image_mean)
    colour = tuple(int(x * 255) for x in image_processor.image_mean)
    assert colour == (122, 116, 104)  # CLIP's mean, as LLaVA's expand2square writes it
    reference = image_processor(expand2square(image, colour), return_tensors="pt")["pixel_values"][0]
    assert torch.equal(pixels, reference)
    # the 336-px view: 84 rows of padding above the picture, normalising to (almost) zero
    top = pixels[:, :80].reshape(3, -1)
    std = torch.tensor(image_processor.image_std)
    assert torch.allclose(top, ((torch.tensor(colour) / 255 - mean) / std)[:, None].expand_as(top), atol=1e-5)
    assert top.abs().max() < 0.02


# --- Qwen-VL: the fast tokenizer from vocab + merges --------------------------------------------------
@pytest.mark.parametrize("name", ["Qwen2.5-VL-7B-Instruct", "Qwen3-VL-4B-Instruct"])
def test_qwen_fast_tokenizer_is_built_from_vocab_merges_and_added_tokens(name):
    folder = DATA / name
    assert not (folder / "tokenizer.json").exists()
    tokenizer = released_tokenizer(folder)
    assert tokenizer.is_fast
    config = json.loads((folder / "config.json").read_text())
    added = json.loads((folder / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    for token_id, token in added.items():
        assert tokenizer.convert_tokens_to_ids(token["content"]) == int(token_id)
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == config["image_token_id"]
    assert tokenizer.convert_tokens_to_ids("<|vision_start|>") == config["vision_start_token_id"]
    assert tokenizer.eos_token == "<|im_end|>"
    ids = tokenizer("Hello world <|image_pad|> not informative")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["Hello", "Ġworld", "Ġ", "<|image_pad|>", "Ġnot", "Ġinformative"]


@pytest.mark.parametrize("name, family", [("Qwen2.5-VL-7B-Instruct", "qwen2.5-vl"),
                                          ("Qwen3-VL-4B-Instruct", "qwen3-vl")])
def test_qwen_family_loads_the_released_processor(name, family):
    from sentilens.mllm.families import get_family

    processor = get_family(family).load_processor(str(DATA / name))
    assert processor.image_token == "<|image_pad|>"
    from sentilens.mllm.families.qwen_vl.family import MAX_IMAGE_TOKENS
    from sentilens.mllm.families.qwen_vl.processor import preprocess_images

    image_processor = processor.image_processor
    cell = image_processor.patch_size * image_processor.merge_size
    # the released processors allow 16,384 tokens an image; the family caps them, in the processor's own SizeDict
    assert image_processor.size["longest_edge"] == MAX_IMAGE_TOKENS * cell * cell
    images = preprocess_images(image_processor, [Image.new("RGB", (2000, 1500))])
    assert int(images.grid_thw.prod()) // image_processor.merge_size ** 2 <= MAX_IMAGE_TOKENS


# --- mismatches with the other released folders ----------------------------------------------------------
def test_smolvlm_prompt_separates_the_post_from_the_question():
    from sentilens.mllm.families import get_family

    processor = get_family("smolvlm").load_processor(str(DATA / "SmolVLM-256M-Instruct"))
    builder = PromptBuilder(processor, PromptSettings(), ["positive", "neutral", "negative"], 64,
                            family=get_family("smolvlm"))
    prompt = builder.render(TEXT, has_image=True)
    assert prompt.startswith(f"<|im_start|>System: {LLAVA15_SYSTEM}<end_of_utterance>\nUser:<image>")
    assert prompt.endswith(f"User:<image>{TEXT}\n{SENTIMENT_QUESTION}<end_of_utterance>\nAssistant:")


def test_smolvlm_v1_config_is_accepted():
    from transformers import AutoConfig

    from sentilens.mllm.families import family_for_config

    config = AutoConfig.from_pretrained(DATA / "SmolVLM-256M-Instruct")
    family = family_for_config(config, "SmolVLM-256M-Instruct")
    assert family.name == "smolvlm" and family.model_class(config).__name__ == "Idefics3ForConditionalGeneration"



def test_smolvlm_v1_processor_is_saved_back_as_its_own_class(tmp_path):
    from transformers import AutoProcessor

    from sentilens.mllm.families import get_family

    # what an exported SmolVLM v1 run carries: transformers' Idefics3Processor loads it, with no video part
    get_family("smolvlm").load_processor(str(DATA / "SmolVLM-256M-Instruct")).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "processor_config.json").read_text())["processor_class"] == "Idefics3Processor"
    assert type(AutoProcessor.from_pretrained(tmp_path)).__name__ == "Idefics3Processor"


def test_llava_next_mistral_template_renders_the_prompt():
    from transformers import AutoProcessor

    from sentilens.mllm.families import get_family

    processor = AutoProcessor.from_pretrained(DATA / "llava-v1.6-mistral-7b-hf")
    builder = PromptBuilder(processor, PromptSettings(), ["positive", "neutral", "negative"], 2928,
                            family=get_family("llava-next"))
    prompt = builder.render(TEXT, has_image=True)
    # the template takes no system turn: its text opens the user's, as Mistral's own template writes it
    assert prompt == f"[INST] <image>\n{LLAVA15_SYSTEM}\n\n{TEXT}\n{SENTIMENT_QUESTION} [/INST]"
    assert not builder.system_turn
    tokenizer = processor.tokenizer
    assert tokenizer.convert_ids_to_tokens(builder.answer_ids["negative"]) == ["▁negative", "</s>"]


# --- Qwen-VL: the released ChatML templates ---------------------------------------------------------------
@functools.cache
def released_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


class ReleasedQwenProcessor:
    """The tokenizer, image processor and processor-level chat template of a released Qwen folder, as a
    processor for :class:`PromptBuilder` (transformers' Qwen processors need torchvision for their video part)."""

    def __init__(self, folder: Path):
        from transformers import AutoImageProcessor

        self.tokenizer = released_tokenizer(folder)
        self.image_processor = AutoImageProcessor.from_pretrained(folder)
        self.chat_template = json.loads((folder / "chat_template.json").read_text())["chat_template"]
        self.image_token = "<|image_pad|>"

    def apply_chat_template(self, messages, chat_template=None, **kwargs):
        return self.tokenizer.apply_chat_template(messages, chat_template=chat_template or self.chat_template, **kwargs)


QWEN = [("Qwen2.5-VL-7B-Instruct", "qwen2.5-vl"), ("Qwen3-VL-4B-Instruct", "qwen3-vl")]


@pytest.mark.parametrize("name, family", QWEN)
def test_qwen_prompt_has_the_released_turns_and_one_image_placeholder(name, family):
    from sentilens.mllm.families import get_family

    processor = ReleasedQwenProcessor(DATA / name)
    builder = PromptBuilder(processor, PromptSettings(), ["positive", "neutral", "negative"], 256,
                            family=get_family(family))
    prompt = builder.render(TEXT, has_image=True)
    assert prompt.startswith(f"<|im_start|>system\n{LLAVA15_SYSTEM}<|im_end|>\n<|im_start|>user\n"
                             "<|vision_start|><|image_pad|><|vision_end|>")
    assert prompt.endswith(f"{SENTIMENT_QUESTION}<|im_end|>\n<|im_start|>assistant\n")
    ids = builder.prompt_ids(TEXT, has_image=True)
    tokenizer = processor.tokenizer
    at = ids.index(tokenizer.convert_tokens_to_ids("<|image_pad|>"))
    around = tokenizer.convert_ids_to_tokens(ids[at - 1:at + 2])
    assert around == ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>"]
    assert ids.count(tokenizer.convert_tokens_to_ids("<|image_pad|>")) == 1
    assert builder.end_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")


@pytest.mark.parametrize("name, family", QWEN)
def test_qwen_answers_are_the_released_assistant_turn(name, family):
    from sentilens.mllm.families import get_family

    processor = ReleasedQwenProcessor(DATA / name)
    labels = ["informative", "not_informative"]
    builder = PromptBuilder(processor, PromptSettings(task="informative"), labels, 256, family=get_family(family))
    tokenizer = processor.tokenizer
    for label, answer in builder.answer_ids.items():
        messages = [{"role": "user", "content": [{"type": "text", "text": "x"}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        words = label.replace("_", " ")
        turn = processor.apply_chat_template(
            messages + [{"role": "assistant", "content": [{"type": "text", "text": words}]}], tokenize=False)
        assert turn.startswith(prompt + words + "<|im_end|>")
        assert answer == tokenizer(words + "<|im_end|>", add_special_tokens=False)["input_ids"]


def test_qwen_prompt_separates_the_post_from_the_question():
    from sentilens.mllm.families import get_family

    processor = ReleasedQwenProcessor(DATA / "Qwen2.5-VL-7B-Instruct")
    builder = PromptBuilder(processor, PromptSettings(), ["positive", "neutral", "negative"], 256,
                            family=get_family("qwen2.5-vl"))
    assert f"{TEXT}\n{SENTIMENT_QUESTION}<|im_end|>" in builder.render(TEXT, has_image=True)


@pytest.mark.parametrize("name, family", QWEN)
def test_a_qwen_run_saved_before_the_layout_keeps_the_prompt_it_trained_with(name, family):
    from sentilens.mllm.config import load_run_config
    from sentilens.mllm.families import get_family

    processor = ReleasedQwenProcessor(DATA / name)
    saved = {"family": "mllm", "base_model": name, "labels": ["informative", "not_informative"],
             "num_image_tokens": 256, "prompt": {"task": "informative", "question": None, "label_wording": None,
                                                 "chat_template": processor.chat_template}}
    settings = load_run_config(saved).prompt
    assert (settings.layout, settings.answer_prefix) == ("parts", " ")
    builder = PromptBuilder(processor, settings, saved["labels"], 256, family=get_family(family))
    # two text parts, which this template runs together, and ' label': what such a run was trained on
    assert TEXT + "Is this post informative" in builder.render(TEXT, has_image=True)
    assert processor.tokenizer.convert_ids_to_tokens(builder.answer_ids["informative"]) == ["Ġinformative",
                                                                                             "<|im_end|>"]


# --- the other folders' real layouts (slower: each builds and loads a checkpoint) ----------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", ["Qwen2.5-VL-7B-Instruct", "Qwen3-VL-4B-Instruct", "SmolVLM-256M-Instruct",
                                  "llava-v1.6-mistral-7b-hf"])
def test_real_layout_of_the_other_folders_loads_with_no_missing_key(tmp_path, name):
    # the LLaVA-NeXT copy has no config.json: its SOURCE.md says where the reconstructed one comes from
    config = DATA / name / "config.reconstructed.json"
    report = real_layout().build(DATA / name, tmp_path / name, layers=2, tower_layers=2, width=64, seed=0,
                                 config=config if config.is_file() else None)
    names = report.get("names")
    if names is not None:  # SmolVLM-256M is a single-file release: no index to compare with
        assert names["model_names_missing_from_index"] == [] and names["index_names_the_model_does_not_read"] == []
        assert names["total_size_matches"]
    assert report["check"]["load"] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}
    assert report["check"]["tokenizer"]["fast"]
    if name == "llava-v1.6-mistral-7b-hf":  # through sentilens' own loader too, any-resolution processor included
        assert report["check"]["sentilens_processor"] == "llava-next: LlavaNextProcessor"
    config = json.loads((tmp_path / name / "config.json").read_text())
    vision = config["vision_config"]
    assert vision.get("depth", vision.get("num_hidden_layers")) == 2
    if "deepstack_visual_indexes" in vision:  # Qwen3-VL: two deepstack layers left, their mergers kept
        assert vision["deepstack_visual_indexes"] == [0, 1]
    if "fullatt_block_indexes" in vision:  # Qwen2.5-VL: a windowed block, then the full-attention one
        assert vision["fullatt_block_indexes"] == [1]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["Qwen2.5-VL-7B-Instruct", "Qwen3-VL-4B-Instruct"])
def test_qwen_real_layout_scores_through_sentilens_as_the_released_model_class(tmp_path, wide_image, name):
    from sentilens.mllm.inputs import build_inputs, make_batch
    from sentilens.mllm.model import load_checkpoint, num_image_tokens
    from sentilens.mllm.scoring import label_log_probs

    out = tmp_path / name
    real_layout().build(DATA / name, out, layers=2, tower_layers=2, width=64, check=False)
    model, processor = load_checkpoint(out)
    model.eval()
    labels = ["informative", "not_informative"]
    builder = PromptBuilder(processor, PromptSettings(task="informative", image_aspect="pad"), labels,
                            num_image_tokens(model, processor))
    batch = make_batch(builder, [Post("p", TEXT, str(wide_image))])
    grid = batch.image_extras["image_grid_thw"]
    image_id = model.config.image_token_id
    with torch.no_grad():
        inputs = build_inputs(model, batch, padding_side="left")
        ids = inputs.input_ids[0].tolist()
        merge = processor.image_processor.merge_size
        assert ids.count(image_id) == int(grid.prod()) // merge ** 2 == inputs.image_tokens[0]
        scored = label_log_probs(model, inputs, [builder.answer_ids[label] for label in labels])[0]
        for c, label in enumerate(labels):
            answer = builder.answer_ids[label]
            full = torch.tensor([ids + answer])
            # the released class's forward: its own 3-D rope positions (from the token types) and image merge
            logits = model(input_ids=full, pixel_values=batch.pixel_values, image_grid_thw=grid,
                           mm_token_type_ids=(full == image_id).int()).logits[0].float()
            reference = logits[len(ids) - 1:-1].log_softmax(-1).gather(-1, torch.tensor(answer)[:, None]).sum()
            assert torch.allclose(scored[c], reference, atol=1e-4), (label, scored[c], reference)


def test_smolvlm_answers_are_the_released_assistant_turn():
    from sentilens.mllm.families import get_family

    processor = get_family("smolvlm").load_processor(str(DATA / "SmolVLM-256M-Instruct"))
    tokenizer = processor.tokenizer
    labels = ["informative", "not_informative"]
    builder = PromptBuilder(processor, PromptSettings(task="informative"), labels, 64, family=get_family("smolvlm"))
    messages = [{"role": "user", "content": [{"type": "text", "text": "x"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    for label, answer in builder.answer_ids.items():
        turn = processor.apply_chat_template(
            messages + [{"role": "assistant", "content": [{"type": "text", "text": label.replace("_", " ")}]}],
            tokenize=False)
        ids = tokenizer(turn, add_special_tokens=False)["input_ids"]
        assert ids[:len(prompt_ids)] == prompt_ids
        end = ids.index(tokenizer.convert_tokens_to_ids("<end_of_utterance>"), len(prompt_ids))
        assert answer == ids[len(prompt_ids):end + 1]  # the released turn: ' label' then <end_of_utterance>
    pieces = tokenizer.convert_ids_to_tokens(builder.answer_ids["not_informative"])
    assert pieces[0].startswith("Ġ") and pieces[-1] == "<end_of_utterance>" and len(pieces) >= 3
