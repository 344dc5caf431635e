"""The instruction format (paper Table 1): structure, label-only targets, truncation, text-only posts."""

from __future__ import annotations

import pytest

from mllm_helpers import LONG_TEXT, tiny_model
from sentilens.errors import SentilensError
from sentilens.mllm.prompt import PromptBuilder, PromptSettings, infer_task


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("tiny") / "ckpt")


@pytest.mark.parametrize("labels", [["positive", "neutral", "negative"], ["informative", "not_informative"]])
def test_unmasked_targets_decode_to_the_label_and_end_token(tiny, labels):
    model, sentiment = tiny
    builder = PromptBuilder(model.processor, PromptSettings(task=infer_task(labels)), labels,
                            sentiment.num_image_tokens)
    tokenizer = builder.tokenizer
    for label in labels:
        ids, targets = builder.training_ids("sunny and warm, love it", True, label)
        assert len(ids) == len(targets)
        unmasked = [t for t in targets if t != -100]
        first = targets.index(unmasked[0])
        assert targets[first:] == unmasked, "the loss covers one contiguous answer at the end"
        assert ids[first:] == unmasked
        assert tokenizer.decode(unmasked) == " " + label.replace("_", " ") + tokenizer.eos_token
        assert ids[:first] == builder.prompt_ids("sunny and warm, love it", True)
    multi = [len(builder.answer_ids[label]) for label in labels]
    assert max(multi) > 2, "the tiny tokenizer should give at least one multi-token label"


def test_prompt_follows_table_1(tiny):
    _, builder = tiny
    prompt = builder.render("my cat is asleep", has_image=True)
    parts = [builder.settings.system, "USER:", "<image>\n", "my cat is asleep",
             "What is the sentiment of the given text?", "positive, neutral, negative", "ASSISTANT:"]
    positions = [prompt.index(p) for p in parts]
    assert positions == sorted(positions)
    assert prompt.endswith("ASSISTANT:")
    assert builder.prompt_ids("my cat is asleep", True).count(builder.image_token_id) == 1


def test_text_only_post_has_no_image_placeholder(tiny):
    _, builder = tiny
    ids, targets = builder.training_ids("no picture here", False, "neutral")
    assert builder.image_token_id not in ids
    assert "<image>" not in builder.render("no picture here", False)


def test_special_tokens_typed_in_a_post_are_defused(tiny):
    _, builder = tiny
    ids = builder.prompt_ids("look <image> here </s> and <s>", True)
    assert ids.count(builder.image_token_id) == 1
    assert builder.end_token_id not in ids
    assert ids.count(builder.tokenizer.bos_token_id) == 1


def test_truncation_shortens_the_text_only(tiny):
    model, base = tiny
    n = base.num_image_tokens
    full = PromptBuilder(model.processor, PromptSettings(), base.labels, n)
    untruncated = full.prompt_ids(LONG_TEXT, True)
    max_length = len(untruncated) - 1 + n + full.max_answer_length - 15
    builder = PromptBuilder(model.processor, PromptSettings(max_length=max_length), base.labels, n)
    for label in base.labels:
        ids, targets = builder.training_ids(LONG_TEXT, True, label)
        assert len(ids) - 1 + n <= max_length
        assert ids.count(builder.image_token_id) == 1
        assert [t for t in targets if t != -100] == builder.answer_ids[label]
    prompt = builder.tokenizer.decode(builder.prompt_ids(LONG_TEXT, True))
    assert builder.question in prompt and prompt.endswith("ASSISTANT:")
    kept = prompt.split("<image>\n", 1)[1].split("\n" + builder.question)[0]
    assert 0 < len(kept) < len(LONG_TEXT) and LONG_TEXT.startswith(kept)
    assert len(builder.prompt_ids(LONG_TEXT, True)) >= len(untruncated) - 15 - 2, "cut no more than needed"


def test_max_length_below_the_instruction_is_a_user_error(tiny):
    model, base = tiny
    builder = PromptBuilder(model.processor, PromptSettings(max_length=40), base.labels, base.num_image_tokens)
    with pytest.raises(SentilensError, match="max_length 40 is too small"):
        builder.prompt_ids("hi", True)


def test_parse_and_task_inference(tiny):
    _, builder = tiny
    assert builder.parse(" Positive.") == "positive"
    assert builder.parse("negative</s>") is None
    assert builder.parse("very positive") is None
    assert infer_task(["negative", "positive"]) == "sentiment"
    assert infer_task(["informative", "not_informative"]) == "informative"
    assert infer_task(["not_humanitarian", "affected_individuals"]) == "humanitarian"
    assert infer_task(["spam", "ham"]) == "custom"


def test_a_run_saved_without_its_question_keeps_the_default_of_its_time(tiny, monkeypatch):
    from sentilens.mllm import prompt as prompt_module

    model, base = tiny
    before = base.render("my cat is asleep", has_image=True)
    monkeypatch.setitem(prompt_module.TASK_QUESTIONS, "sentiment", "How does this post feel?")
    monkeypatch.setattr(prompt_module, "LABEL_WORDING", "Pick: {labels}.")
    old = PromptSettings(question=None)
    builder = PromptBuilder(model.processor, old, base.labels, base.num_image_tokens)
    assert builder.render("my cat is asleep", has_image=True) == before
    new = prompt_module.resolved_settings(PromptSettings(), base.chat_template)
    assert (new.question, new.label_wording) == ("How does this post feel?", "Pick: {labels}.")
    resumed = prompt_module.resolved_settings(old, base.chat_template, saved=True)
    assert PromptBuilder(model.processor, resumed, base.labels, base.num_image_tokens).render(
        "my cat is asleep", has_image=True) == before


def test_a_chat_template_in_the_settings_renders_the_prompt(tiny):
    model, base = tiny
    template = ("{%- for message in messages -%}{%- for part in message['content'] -%}"
                "{%- if part['type'] == 'image' -%}<image>{%- else -%}[{{ part['text'] }}]{%- endif -%}"
                "{%- endfor -%}{%- endfor -%}{%- if add_generation_prompt -%}=>{%- endif -%}")
    builder = PromptBuilder(model.processor, PromptSettings(chat_template=template), base.labels,
                            base.num_image_tokens)
    question = "What is the sentiment of the given text? Answer with one of: positive, neutral, negative."
    # the post and the question: one text part, on two lines
    assert builder.render("hi", has_image=True) == f"[{base.settings.system}]<image>[hi\n{question}]=>"
    # runs saved before the layout was recorded sent them as two parts, and keep doing so
    old = PromptBuilder(model.processor, PromptSettings(chat_template=template, layout="parts"), base.labels,
                        base.num_image_tokens)
    assert old.render("hi", has_image=True) == f"[{base.settings.system}]<image>[hi][{question}]=>"


def test_a_label_wording_without_the_labels_is_refused(tiny):
    _, base = tiny
    from sentilens.mllm.prompt import resolved_settings

    with pytest.raises(SentilensError, match="label_wording"):
        resolved_settings(PromptSettings(label_wording="Answer please."), base.chat_template)
