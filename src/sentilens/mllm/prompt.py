"""The instruction format of the paper's Table 1, and the label-only training target (Eq. 1).

One single-turn conversation per post::

    X_system <STOP> USER: X_v <STOP> X_t <STOP> X_p ASSISTANT: Y_s <STOP>

``X_v`` is the image (one ``<image>`` placeholder here; the model input builder in
:mod:`sentilens.mllm.inputs` widens it to one position per visual token), ``X_t`` the post
text, ``X_p`` the question ("What is the sentiment of the given text?" for sentiment, a
per-task question for CrisisMMD) followed by the label words (our default; ``label_list=False``
asks the bare question, as the paper does), and ``Y_s`` the label word.

Choices where the paper is silent, and why:

- The conversation is rendered by the checkpoint's own chat template (LLaVA-1.5 checkpoints
  ship one); a checkpoint without one gets its model family's (for LLaVA-1.5
  ``mllm/families/llava/template.jinja``, the Vicuna-v1 format LLaVA-1.5 was trained with, which is
  also what ``--model tiny`` ships).
- The post text and the question are one text part, on two lines (``layout: joined``): released
  templates differ in what they put between parts (LLaVA-1.5 a space, Qwen and SmolVLM nothing, so
  two parts would run the post into the question). Runs saved before the layout was recorded sent
  them as two parts and keep doing so (``layout: parts``, :data:`UNSAVED_PROMPT_DEFAULTS`).
- The system text is a system turn; a template that refuses system turns (LLaVA-NeXT-Mistral's
  raises "Only user and assistant roles are supported!") gets it at the top of the user's text
  instead, as Mistral's own template writes a system prompt.
- The answer is ``answer_prefix + label`` (underscores read as spaces: "not informative")
  followed by the end-of-turn token, by default the tokenizer's end-of-sequence token
  (``</s>`` after the answer is exactly LLaVA-1.5's turn separator). The prefix is what the chat
  template itself writes between the generation prompt and an assistant's text (rendered once:
  LLaVA-1.5 and SmolVLM a space, Qwen's ChatML nothing); a run saves it. Its tokens are the ones
  the tokenizer gives after a real generation prompt, computed once per label, and are the
  same sequences in training, label scoring and generation.
- The loss covers the answer tokens and the end token only; every other target is -100.
- A post without an image gets no placeholder at all (not a blank image): the language model
  sees only text, which is what LLaVA does for text-only turns, and no visual tokens are spent.
- ``max_length`` counts the full visual-token count of an image (before any token filtering,
  so a post is truncated the same way whatever the keep ratio) and the longest answer; only
  the post text is shortened (at a token boundary), never the placeholder, question or label.
- Special-token strings typed inside a post (``<image>``, ``</s>``...) are defused by a space
  after their ``<`` so that user text can never add placeholders or end a turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, Field

from sentilens.data.labels import SENTIMENT_LABELS
from sentilens.data.text import clip_text
from sentilens.errors import SentilensError
from sentilens.validation import check_chat_template

LLAVA15_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

Task = Literal["sentiment", "informative", "humanitarian", "custom"]

TASK_QUESTIONS: dict[str, str] = {
    "sentiment": "What is the sentiment of the given text?",
    "informative": "Is this post informative for humanitarian aid?",
    "humanitarian": "Which humanitarian category does this post belong to?",
    "custom": "Which label fits this post?",
}
"""Table 1's X_p for sentiment (the paper's wording) and our questions for CrisisMMD's two tasks."""

LABEL_WORDING = "Answer with one of: {labels}."
"""The sentence after X_p naming the label words (``{labels}``: the labels, comma-separated)."""

UNSAVED_PROMPT_DEFAULTS: dict = {
    "question": {
        "sentiment": "What is the sentiment of the given text?",
        "informative": "Is this post informative for humanitarian aid?",
        "humanitarian": "Which humanitarian category does this post belong to?",
        "custom": "Which label fits this post?",
    },
    "label_wording": "Answer with one of: {labels}.",
    "layout": "parts",
    "answer_prefix": " ",
}
"""The prompt of runs saved before a run recorded each part: the question and label wording
(``question: null``), the layout of the user turn and the answer prefix (keys absent from the saved
``prompt``); the defaults as they stood then, frozen here so that changing :data:`TASK_QUESTIONS`,
:data:`LABEL_WORDING` or the settings' defaults never changes the prompt of an existing run."""

SAVED_LATER = ("layout", "answer_prefix")
"""Prompt settings a saved run may lack: :func:`saved_prompt` gives them their value of that time."""

HUMANITARIAN_LABELS = {
    "affected_individuals", "infrastructure_and_utility_damage", "injured_or_dead_people",
    "missing_or_found_people", "rescue_volunteering_or_donation_effort", "vehicle_damage",
    "other_relevant_information", "not_humanitarian",
}


DEFAULT_MAX_LENGTH = 2048
TEXT_ROOM = 400
"""Tokens a prompt keeps beside its image's visual tokens (the post, the instruction and the answer) when the
default :data:`DEFAULT_MAX_LENGTH` cannot hold them (LLaVA-NeXT's up to 2,928 visual tokens: 3,328, the
budget of its recipe)."""


def default_max_length(image_tokens: int) -> int:
    """The prompt budget when none is given: 2048 tokens, raised for a model whose largest image takes most of it."""
    return max(DEFAULT_MAX_LENGTH, image_tokens + TEXT_ROOM)


class PromptSettings(BaseModel):
    """Everything that shapes the model's input (the instruction, and how an image is fitted to the
    tower); saved in a run's config so scoring rebuilds it exactly."""

    task: Task = "sentiment"
    system: str = LLAVA15_SYSTEM
    question: str | None = Field(None, description="X_p; training saves the task's question here. None (runs saved "
                                                   "before it was recorded): the question of that time")
    label_list: bool = Field(True, description="append 'Answer with one of: <labels>.' to X_p (our default); "
                                               "False: Table 1's bare question, as the paper asked it")
    label_wording: str | None = Field(None, description="the sentence naming the labels after X_p, '{labels}' "
                                                        "standing for them; None: the wording of that time")
    chat_template: str | None = Field(None, description="the Jinja chat template the prompt is rendered with; None "
                                                        "(runs saved before it was recorded): the checkpoint's own, "
                                                        "else its model family's")
    layout: Literal["joined", "parts"] = Field(
        "joined", description="joined: the post text and the question in one text part, on two lines; parts: two "
                              "text parts (runs saved before the layout was recorded), which templates that join "
                              "parts with nothing run together")
    answer_prefix: str | None = Field(None, description="text between the generation prompt and the label; None: "
                                                        "what the chat template writes there")
    end_token: str | None = Field(None, description="end-of-turn token; None = the tokenizer's eos token")
    max_length: int = Field(DEFAULT_MAX_LENGTH, gt=0, le=1 << 17, description="tokens, visual tokens and answer "
                                                                            "included (training and zero-shot "
                                                                            "runs: default_max_length)")
    image_aspect: Literal["pad", "crop"] = Field(
        "crop", description="pad: pad to a square with the processor's mean colour first (LLaVA-1.5); crop: the "
                            "processor's resize + centre crop. Runs made before this setting existed cropped.")


def infer_task(labels: Sequence[str]) -> Task:
    """The task a label set belongs to: MVSA sentiment, CrisisMMD informative or humanitarian, else custom."""
    names = {label.lower() for label in labels}
    if names <= set(SENTIMENT_LABELS):
        return "sentiment"
    if names == {"informative", "not_informative"}:
        return "informative"
    if names <= HUMANITARIAN_LABELS:
        return "humanitarian"
    return "custom"


def label_text(label: str) -> str:
    """How a label is written in the answer: underscores as spaces."""
    return label.replace("_", " ")


def full_question(settings: PromptSettings, labels: Sequence[str]) -> str:
    """X_p followed by the label words, e.g. "... text? Answer with one of: positive, neutral, negative.",
    or with ``label_list=False`` the bare X_p of Table 1 (the labels are then learnt from the answers only)."""
    question = settings.question or UNSAVED_PROMPT_DEFAULTS["question"][settings.task]
    if not settings.label_list:
        return question
    wording = settings.label_wording or UNSAVED_PROMPT_DEFAULTS["label_wording"]
    return f"{question} {wording.replace('{labels}', ', '.join(label_text(x) for x in labels))}"


def saved_prompt(prompt: dict | None) -> dict:
    """A saved run's ``prompt`` mapping with the settings it predates (:data:`SAVED_LATER`) as they were then."""
    prompt = dict(prompt or {})
    for key in SAVED_LATER:
        prompt.setdefault(key, UNSAVED_PROMPT_DEFAULTS[key])
    return prompt


def resolved_settings(settings: PromptSettings, chat_template: str, saved: bool = False,
                      answer_prefix: str | None = None) -> PromptSettings:
    """``settings`` with the question, label wording, chat template and answer prefix (``answer_prefix``: the
    one the builder derived, :attr:`PromptBuilder.answer_prefix`) a run is trained with written out,
    so the saved run keeps its prompt whatever the defaults later become. ``saved``: the settings come from
    an existing run (a resumed one), whose unset values are the defaults of its time, not today's."""
    if settings.label_wording is not None and "{labels}" not in settings.label_wording:
        raise SentilensError(f"label_wording '{settings.label_wording}' must contain '{{labels}}' where the "
                             "label words go")
    questions, wording = ((UNSAVED_PROMPT_DEFAULTS["question"], UNSAVED_PROMPT_DEFAULTS["label_wording"]) if saved
                          else (TASK_QUESTIONS, LABEL_WORDING))
    return settings.model_copy(update={
        "question": settings.question or questions[settings.task],
        "label_wording": settings.label_wording or wording,
        "chat_template": settings.chat_template or chat_template,
        "answer_prefix": settings.answer_prefix if settings.answer_prefix is not None else answer_prefix,
    })


class PromptBuilder:
    """Token ids of prompts and answers for one processor, one label list and one setting.

    ``num_image_tokens`` is the count of visual tokens one image becomes (used for
    ``max_length``); prompts carry a single image placeholder that the input builder widens.
    ``family`` (:mod:`sentilens.mllm.families`) gives the default chat template and the image
    preprocessing; None: the family whose processor class ``processor`` is (LLaVA-1.5 if none).
    """

    def __init__(self, processor, settings: PromptSettings, labels: Sequence[str], num_image_tokens: int,
                 family=None):
        from sentilens.mllm.families import family_for_processor

        self.family = family or family_for_processor(processor)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.settings = settings
        self.labels = list(labels)
        if len(set(self.labels)) != len(self.labels) or not self.labels:
            raise SentilensError(f"labels must be distinct and non-empty, got {self.labels}")
        self.num_image_tokens = num_image_tokens
        self.image_token = processor.image_token
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        self.chat_template = (settings.chat_template or getattr(processor, "chat_template", None)
                              or self.family.chat_template)
        self.question = full_question(settings, self.labels)
        end = settings.end_token or self.tokenizer.eos_token
        if end is None:
            raise SentilensError("the tokenizer has no end-of-sequence token: set the prompt's end_token")
        self.end_token_id = self.tokenizer.convert_tokens_to_ids(end)
        self._specials = [t for t in self.tokenizer.all_special_tokens if t.startswith("<")]
        if self.image_token not in self._specials:
            self._specials.append(self.image_token)
        self.system_turn = True
        self.answer_prefix = settings.answer_prefix

        def first_prompt() -> str:
            # what the template does with a system turn and an assistant's answer, found by rendering it:
            # inside the template check, so these renders run under its deadline and sandbox too
            self.system_turn = self._accepts_system_turn()
            if self.answer_prefix is None:
                self.answer_prefix = self._template_answer_prefix()
            return self.render("", has_image=True)

        check_chat_template(self.chat_template, first_prompt,
                            getattr(self.tokenizer, "name_or_path", None) or None)
        probe = self._encode(self.render("", has_image=False))
        self.answer_ids = {label: self._answer_tokens(probe, label) + [self.end_token_id] for label in self.labels}
        self.max_answer_length = max(len(ids) for ids in self.answer_ids.values())

    def render(self, text: str, has_image: bool) -> str:
        """The prompt string up to and including the assistant's generation prompt."""
        return self._apply(self.messages(self._defuse(text), has_image), add_generation_prompt=True)

    def messages(self, text: str, has_image: bool, system_turn: bool | None = None) -> list[dict]:
        """The conversation of one post: a system turn (or its text atop the user's) and the user turn, ``text``
        as it goes in (:meth:`render` defuses a post's text first); ``system_turn`` None: what the template takes."""
        system_turn = self.system_turn if system_turn is None else system_turn
        system = self.settings.system
        if self.settings.layout == "parts":
            texts = [text, self.question]
        else:
            texts = ["\n".join(part for part in (text, self.question) if part)]
        if not system_turn:
            texts = [system, *texts] if self.settings.layout == "parts" else [f"{system}\n\n{texts[0]}"]
        content = ([{"type": "image"}] if has_image else []) + [{"type": "text", "text": t} for t in texts]
        messages = [{"role": "user", "content": content}]
        if system_turn:
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
        return messages

    def _apply(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(messages, chat_template=self.chat_template,
                                                  add_generation_prompt=add_generation_prompt, tokenize=False)

    def _accepts_system_turn(self) -> bool:
        """Whether the chat template renders a system turn: False when it raises on one but renders the
        conversation without it."""
        from jinja2.exceptions import TemplateError

        try:
            self._apply(self.messages("", False, system_turn=True), add_generation_prompt=True)
        except TemplateError:
            self._apply(self.messages("", False, system_turn=False), add_generation_prompt=True)
            return False
        return True

    def _template_answer_prefix(self) -> str:
        """What the chat template writes between the generation prompt and an assistant's text (a space
        after LLaVA-1.5's ``ASSISTANT:``, nothing after Qwen's ``assistant\\n``); a template that renders no
        assistant turn after its generation prompt gets a space."""
        from jinja2.exceptions import TemplateError

        marker = "answer"
        messages = self.messages("", False)
        try:
            prompt = self._apply(messages, add_generation_prompt=True)
            turn = self._apply(messages + [{"role": "assistant", "content": [{"type": "text", "text": marker}]}],
                               add_generation_prompt=False)
        except TemplateError:
            return " "
        if not turn.startswith(prompt) or marker not in turn[len(prompt):]:
            return " "
        return turn[len(prompt):turn.index(marker, len(prompt))]

    def prompt_ids(self, text: str, has_image: bool) -> list[int]:
        """Prompt token ids (one image placeholder if ``has_image``), the text truncated to fit ``max_length``."""
        budget = self.settings.max_length - self.max_answer_length - (self.num_image_tokens if has_image else 0)
        text = clip_text(text, budget)  # before any tokenizing, whose cost grows with the whole text
        ids = self._encode(self.render(text, has_image))
        if self._length(ids, has_image) <= budget:
            return self._checked(ids, has_image)
        empty = self._encode(self.render("", has_image))
        if self._length(empty, has_image) > budget:
            raise SentilensError(
                f"max_length {self.settings.max_length} is too small: the instruction alone takes "
                f"{self._length(empty, has_image) + self.max_answer_length + self.num_image_tokens * has_image} tokens"
            )
        text = self._defuse(text)
        offsets = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        keep = max(len(offsets) - (self._length(ids, has_image) - budget), 0)
        while True:
            cut = text[: offsets[keep - 1][1]] if keep > 0 else ""
            ids = self._encode(self.render(cut, has_image))
            if self._length(ids, has_image) <= budget:
                return self._checked(ids, has_image)
            keep -= 1

    def training_ids(self, text: str, has_image: bool, label: str) -> tuple[list[int], list[int]]:
        """(input ids, targets): the prompt then the answer; targets are -100 except answer and end token."""
        if label not in self.answer_ids:
            raise SentilensError(f"label '{label}' is not one of {self.labels}")
        prompt = self.prompt_ids(text, has_image)
        answer = self.answer_ids[label]
        return prompt + answer, [-100] * len(prompt) + answer

    def parse(self, answer: str) -> str | None:
        """The label a generated answer names, or None: case, spaces/underscores and final punctuation ignored."""
        wanted = " ".join(answer.strip().strip(".!,;:'\"").lower().replace("_", " ").split())
        for label in self.labels:
            if " ".join(label_text(label).lower().split()) == wanted:
                return label
        return None

    def _answer_tokens(self, probe: list[int], label: str) -> list[int]:
        """The tokens ``answer_prefix + label`` adds after a generation prompt (the tokenizer's own split there)."""
        answer = self.answer_prefix + label_text(label)
        full = self._encode(self.render("", has_image=False) + answer)
        if full[: len(probe)] == probe and len(full) > len(probe):
            return full[len(probe):]
        return self.tokenizer(answer, add_special_tokens=False)["input_ids"]

    def _encode(self, prompt: str) -> list[int]:
        bos = self.tokenizer.bos_token
        add_special = not (bos and prompt.startswith(bos))
        return list(self.tokenizer(prompt, add_special_tokens=add_special)["input_ids"])

    def _length(self, ids: list[int], has_image: bool) -> int:
        return len(ids) - (1 if has_image else 0)

    def _checked(self, ids: list[int], has_image: bool) -> list[int]:
        found = ids.count(self.image_token_id)
        if found != int(has_image):
            raise SentilensError(
                f"the chat template produced {found} image placeholders for a post with "
                f"{'an image' if has_image else 'no image'}; it must produce exactly {int(has_image)}"
            )
        return ids

    def _defuse(self, text: str) -> str:
        for token in self._specials:
            if token in text:
                text = text.replace(token, "< " + token[1:])
        return text
