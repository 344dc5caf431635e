"""Predicting a post's label with a fine-tuned LLaVA: label scoring (default) or greedy generation.

Label scoring (our default; the paper decodes): the model was trained to write one label and
the end-of-turn token (Eq. 1), so it is asked, in **one forward pass per batch**, for the
log-probability of each label's full answer, every token of it and the end token included:

    log p(y | x) = sum_j log p(y_j | x, y_<j)

The prompt is followed by every label's answer side by side, each answer a branch that sees
the prompt and its own earlier tokens only (a 4-D attention mask, positions restarting after
the prompt in each branch), so the prompt is run once whatever the number of labels. The
label is the argmax and the probabilities are the softmax of the C log-probabilities: a
distribution over the labels, with no decoding loop and no unparsable answers. Including the
end token scores the *complete* answer, so a label that is a prefix of another one is not
favoured, and argmax agrees with greedy generation whenever the model is confident.

``decode="generate"`` is the paper's setting: greedy decoding (with a KV cache) until the end
token, the text parsed into a label. An answer naming no label is counted as unparsable
(``extra["parsed"] = False``) and falls back to the label sharing the longest token prefix
with it (the label the decoder started to write; ties go to the first label in order). Greedy
decoding gives no distribution: the probabilities are 1 for the returned label, 0 elsewhere.

Batches are left-padded with positions counting real tokens only, so a post scores the same
alone and in any batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Literal

import torch
from torch import Tensor

from sentilens.data.records import Post
from sentilens.mllm.inputs import LmInputs, Reducer, build_inputs, language_model_hidden, make_batch
from sentilens.mllm.prompt import PromptBuilder
from sentilens.predict import Prediction
from sentilens.progress import progress_bar
from sentilens.stages import stage

Decode = Literal["score", "generate"]


def label_log_probs(vlm, inputs: LmInputs, answers: Sequence[Sequence[int]]) -> Tensor:
    """``(B, C)`` log-probabilities of each answer token sequence after each left-padded prompt, in one pass."""
    mask = inputs.attention_mask.bool()
    if not bool(mask[:, -1].all()):
        raise ValueError("label scoring needs left-padded prompts")
    device = mask.device
    batch, prompt_width = mask.shape
    lengths = [len(a) for a in answers]
    tokens = torch.tensor([t for a in answers for t in a], device=device)
    branch = torch.tensor([c for c, n in enumerate(lengths) for _ in range(n)], device=device)
    step = torch.tensor([j for n in lengths for j in range(n)], device=device)
    width = prompt_width + len(tokens)

    allowed = torch.zeros((batch, width, width), dtype=torch.bool, device=device)
    causal = torch.ones((prompt_width, prompt_width), dtype=torch.bool, device=device).tril()
    allowed[:, :prompt_width, :prompt_width] = causal & mask[:, None, :]
    allowed[:, prompt_width:, :prompt_width] = mask[:, None, :]
    allowed[:, prompt_width:, prompt_width:] = (branch[:, None] == branch[None, :]) & (step[:, None] >= step[None, :])
    allowed |= torch.eye(width, dtype=torch.bool, device=device)  # padding rows attend to themselves only
    dtype = inputs.inputs_embeds.dtype
    additive = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)

    answer_embeds = vlm.get_input_embeddings()(tokens).unsqueeze(0).expand(batch, -1, -1)
    # each branch continues from the prompt's last position (its length for 1-D positions; for 3-D ones the
    # text after the image, where all three components are equal)
    next_position = inputs.position_ids[..., -1:] + 1
    branched = LmInputs(
        input_ids=inputs.input_ids,
        inputs_embeds=torch.cat([inputs.inputs_embeds, answer_embeds], dim=1),
        attention_mask=additive[:, None],
        position_ids=torch.cat([inputs.position_ids, next_position + step], dim=-1),
        targets=None,
        image_tokens=inputs.image_tokens,
        lm_kwargs=inputs.lm_kwargs,
        lm_plan=inputs.lm_plan,
    )
    hidden = language_model_hidden(vlm, branched, use_cache=False).last_hidden_state
    # each answer token is predicted from the prompt's last token (first step) or from its predecessor in the branch
    offsets = torch.arange(len(tokens), device=device) + prompt_width
    predecessor = torch.where(step == 0, torch.full_like(offsets, prompt_width - 1), offsets - 1)
    logits = vlm.lm_head(hidden[:, predecessor]).float()
    token_log_probs = logits.log_softmax(dim=-1).gather(-1, tokens[None, :, None].expand(batch, -1, 1)).squeeze(-1)
    return torch.zeros((batch, len(answers)), device=device).index_add_(1, branch, token_log_probs)


def greedy_answers(vlm, inputs: LmInputs, stop_ids: set[int], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuation of each left-padded prompt until a stop token (kept) or ``max_new_tokens``."""
    from transformers import DynamicCache

    cache = DynamicCache(config=vlm.config)
    with stage("lm"):  # the prefill; the decoding steps after it are timed apart
        out = language_model_hidden(vlm, inputs, past_key_values=cache, use_cache=True)
    mask, position = inputs.attention_mask, inputs.position_ids[..., -1:]
    batch = mask.shape[0]
    generated: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    for _ in range(max_new_tokens):
        token = vlm.lm_head(out.last_hidden_state[:, -1]).argmax(dim=-1)
        for i, t in enumerate(token.tolist()):
            if not done[i]:
                generated[i].append(t)
                done[i] = t in stop_ids
        if all(done):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        position = position + 1
        step = LmInputs(input_ids=token[:, None], inputs_embeds=vlm.get_input_embeddings()(token[:, None]),
                        attention_mask=mask, position_ids=position, targets=None, image_tokens=inputs.image_tokens,
                        lm_plan=inputs.lm_plan)
        out = language_model_hidden(vlm, step, past_key_values=out.past_key_values, use_cache=True)
    return generated


def predict_posts(
    vlm,
    builder: PromptBuilder,
    posts: Sequence[Post],
    batch_size: int = 8,
    reducer: Reducer | None = None,
    decode: Decode = "score",
    description: str = "predicting",
    autocast: str | None = None,
) -> list[Prediction]:
    """Label, label probabilities and visual-token count of each post, in batches, with a progress bar.

    ``autocast`` (e.g. "bfloat16") runs the model under ``torch.autocast`` in that dtype: the run's
    saved evaluation precision, the same on val during training and on test afterwards.
    """
    if decode not in ("score", "generate"):
        raise ValueError(f"decode must be 'score' or 'generate', got {decode!r}")
    labels = builder.labels
    answers = [builder.answer_ids[label] for label in labels]
    predictions: list[Prediction] = []
    device = vlm.lm_head.weight.device
    numerics = torch.autocast(device.type, dtype=getattr(torch, autocast)) if autocast else nullcontext()
    with progress_bar() as progress, torch.no_grad(), numerics:
        task = progress.add_task(description, total=len(posts), unit="posts", status="")
        for start in range(0, len(posts), batch_size):
            chunk = posts[start:start + batch_size]
            with stage("image"):
                batch = make_batch(builder, chunk)
            batch = batch.to(vlm.lm_head.weight.device)
            inputs = build_inputs(vlm, batch, reducer=reducer, padding_side="left")
            if decode == "score":
                with stage("lm"):
                    probs = label_log_probs(vlm, inputs, answers).softmax(dim=-1).tolist()
                for row, kept in zip(probs, inputs.image_tokens, strict=True):
                    best = max(range(len(labels)), key=row.__getitem__)
                    predictions.append(Prediction(labels[best], dict(zip(labels, row, strict=True)), kept))
            else:
                max_new = builder.max_answer_length + 2
                for ids, kept in zip(greedy_answers(vlm, inputs, {builder.end_token_id}, max_new),
                                     inputs.image_tokens, strict=True):
                    predictions.append(_parsed(builder, ids, kept))
            progress.advance(task, len(chunk))
    return predictions


def _parsed(builder: PromptBuilder, ids: list[int], kept: int) -> Prediction:
    text = builder.tokenizer.decode([t for t in ids if t != builder.end_token_id], skip_special_tokens=True)
    label = builder.parse(text)
    parsed = label is not None
    if label is None:
        label = max(builder.labels, key=lambda lab: _common_prefix(builder.answer_ids[lab][:-1], ids))
    probabilities = {lab: float(lab == label) for lab in builder.labels}
    return Prediction(label, probabilities, kept, {"answer": text.strip(), "parsed": parsed})


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
