"""The one markdown-table helper and the one label-merge rule."""

from sentilens.data.labels import SENTIMENT_LABELS, merge_modality_labels
from sentilens.tables import markdown_table


def test_markdown_table_right_aligns_number_columns_and_prints_four_decimals():
    table = markdown_table(["run", "accuracy", "best epoch"], [["a", 0.5, 3], ["b", 1 / 3, None]])
    assert table.splitlines() == ["| run | accuracy | best epoch |", "|---|---:|---:|", "| a | 0.5000 | 3 |",
                                  "| b | 0.3333 |  |"]


def test_one_rule_merges_text_and_image_labels_for_mvsa_and_crisismmd():
    for text, image, expected in [("positive", "positive", "positive"), ("neutral", "negative", "negative"),
                                  ("positive", "neutral", "positive"), ("positive", "negative", None)]:
        assert merge_modality_labels(text, image, null_label="neutral") == expected
    assert merge_modality_labels("not_informative", "informative", null_label="not_informative") == "informative"
    assert merge_modality_labels("vehicle_damage", "rescue_volunteering_or_donation_effort",
                                 null_label="not_humanitarian") is None
    assert SENTIMENT_LABELS == ("positive", "neutral", "negative")
