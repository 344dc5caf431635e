"""Label words shared by the readers, the synthetic set and the prompts, and the one rule that merges
a post's text label and image label into the post's label.

MVSA (Xu and Mao's rule, as the LLaVA paper's Table 2 counts) and CrisisMMD (its raw annotations)
label the text and the image of a post separately. Both data sets use the same rule to get one
label: equal labels give that label; one modality's *null* label (MVSA: ``neutral``; CrisisMMD:
``not_informative`` / ``not_humanitarian``) gives way to the other modality's label; two different
non-null labels conflict (the post is dropped).
"""

from __future__ import annotations

SENTIMENT_LABELS: tuple[str, ...] = ("positive", "neutral", "negative")
"""The sentiment labels in their fixed order (MVSA-Single / MVSA-Multiple, the synthetic set)."""


def merge_modality_labels(text_label: str, image_label: str, null_label: str) -> str | None:
    """The post's label from its text's and its image's: equal -> it; null + other -> the other; else None."""
    if text_label == image_label:
        return text_label
    if null_label in (text_label, image_label):
        return image_label if text_label == null_label else text_label
    return None
