"""Readers of the raw MVSA-Single and MVSA-Multiple sets (Niu et al. 2016; llava paper,
"Dataset and Preprocessing").

Raw layout, as distributed::

    ROOT/labelResultAll.txt   header line "ID<TAB>text,image", then one line per post:
                              MVSA-Single   "ID<TAB>text_label,image_label"
                              MVSA-Multiple "ID<TAB>t,i<TAB>t,i<TAB>t,i"  (three annotators)
    ROOT/data/ID.txt          the tweet text (bytes of mixed encodings, see sentilens.data.text)
    ROOT/data/ID.jpg          the image

Labels are ``positive``, ``neutral``, ``negative``. One post gets one label by the rule of
Xu and Mao (2017) that the llava paper follows: equal text and image labels give that label;
one neutral and one polar label give the polar label; positive against negative is a
conflict and the post is dropped. On MVSA-Single this keeps 4,511 of 4,869 posts (2,683
positive, 470 neutral, 1,358 negative). For MVSA-Multiple each modality first takes the label
that at least two of its three annotators gave; a modality without such a majority makes
the post unusable and it is dropped.

Fields are split on any whitespace, so a file re-saved with spaces for tabs or with Windows
line ends still reads. A malformed row (wrong field count, an unknown label word, a repeated
ID) drops that post with a reason; only a file with no usable row at all, or whose header
says it holds the other MVSA variant, is an error.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from sentilens.data.labels import SENTIMENT_LABELS, merge_modality_labels
from sentilens.data.records import Dropped, Post, RawDataset, path_escapes
from sentilens.data.text import read_text
from sentilens.errors import SentilensError

LABEL_FILE = "labelResultAll.txt"


def merge_labels(text_label: str, image_label: str) -> str | None:
    """Xu and Mao's rule: equal -> it; neutral + polar -> the polar one; positive vs negative -> None."""
    return merge_modality_labels(text_label, image_label, null_label="neutral")


def majority_label(votes: Sequence[str]) -> str | None:
    """The label a strict majority of annotators gave (two of three; MVSA-Single's only one), else None."""
    label, count = Counter(votes).most_common(1)[0]
    return label if 2 * count > len(votes) else None


def read_mvsa_single(root: str | Path) -> RawDataset:
    """Posts of a raw MVSA-Single folder (one annotator per modality)."""
    return _read_mvsa(Path(root), annotators=1)


def read_mvsa_multiple(root: str | Path) -> RawDataset:
    """Posts of a raw MVSA-Multiple folder (three annotators, majority per modality)."""
    return _read_mvsa(Path(root), annotators=3)


class _BadRow(ValueError):
    """A label line this reader cannot use; its message is the drop reason."""


def _variant(annotators: int) -> str:
    return "MVSA-Single" if annotators == 1 else "MVSA-Multiple"


def _read_mvsa(root: Path, annotators: int) -> RawDataset:
    name = _variant(annotators)
    if not root.is_dir():
        raise SentilensError(f"no such folder (expected the {name} root)", root)
    label_path = root / LABEL_FILE
    if not label_path.is_file():
        raise SentilensError(f"missing {LABEL_FILE}: is this the {name} folder?", label_path)
    data_dir = root / "data"
    if not data_dir.is_dir():
        raise SentilensError("missing the data/ folder holding ID.txt and ID.jpg", data_dir)

    posts: list[Post] = []
    dropped: list[Dropped] = []
    first_line_of: dict[str, int] = {}
    first_error: tuple[int, str] | None = None
    for line_no, line in enumerate(read_text(label_path).split("\n"), start=1):
        fields = line.split()
        if not fields:
            continue
        if fields[0].lower() == "id":
            _check_header(fields, annotators, label_path, line_no)
            continue
        post_id, where = fields[0], f"{label_path}:{line_no}"
        unsafe = path_escapes(post_id)
        if unsafe is None and ("/" in post_id or "\\" in post_id or post_id in (".", "..")):
            unsafe = f"'{post_id}' is not a file name in data/"
        if unsafe:  # the id names data/ID.txt and data/ID.jpg: it must not lead anywhere else
            dropped.append(Dropped(post_id, f"unsafe id: {unsafe}", where))
            continue
        try:
            text_votes, image_votes = _parse_votes(fields[1:], annotators)
        except _BadRow as err:
            first_error = first_error or (line_no, str(err))
            dropped.append(Dropped(post_id, f"malformed row: {err}", where))
            continue
        if post_id in first_line_of:
            dropped.append(Dropped(post_id, f"duplicate id: first listed on line {first_line_of[post_id]}", where))
            continue
        first_line_of[post_id] = line_no
        label, problem = _post_label(text_votes, image_votes)
        if label is None:
            dropped.append(Dropped(post_id, problem, where))
            continue
        text_path = data_dir / f"{post_id}.txt"
        if not text_path.is_file():
            dropped.append(Dropped(post_id, f"text missing: no data/{post_id}.txt", str(text_path)))
            continue
        try:
            text = read_text(text_path).strip()
        except SentilensError as err:
            dropped.append(Dropped(post_id, f"text unreadable: {err.problem}", str(text_path)))
            continue
        meta = {"text_votes": text_votes, "image_votes": image_votes} if annotators > 1 else {
            "text_label": text_votes[0], "image_label": image_votes[0]}
        posts.append(Post(id=post_id, text=text, image=str(data_dir / f"{post_id}.jpg"),
                          label=label, meta=meta))

    if not first_line_of:
        if first_error is None:
            raise SentilensError("no posts listed (expected lines 'ID<TAB>text,image' after the header)", label_path)
        raise SentilensError(f"no usable row; first problem: {first_error[1]}", label_path, first_error[0])
    source = {"dataset": name, "label_file": str(label_path), "annotators": annotators}
    return RawDataset(labels=list(SENTIMENT_LABELS), posts=posts, dropped=dropped, source=source)


def _check_header(fields: list[str], annotators: int, path: Path, line_no: int) -> None:
    pairs = len(fields) - 1
    if pairs == annotators:
        return
    hint = ""
    if {pairs, annotators} == {1, 3}:
        other = "mvsa-multiple" if pairs == 3 else "mvsa-single"
        hint = f" (did you mean --format {other}?)"
    raise SentilensError(f"header has {pairs} text,image column(s) but {_variant(annotators)} has "
                         f"{annotators}{hint}", path, line_no)


def _parse_votes(pairs: list[str], annotators: int) -> tuple[list[str], list[str]]:
    if len(pairs) != annotators:
        raise _BadRow(f"expected {annotators} text,image pair(s) after the ID, found {len(pairs)}")
    text_votes, image_votes = [], []
    for pair in pairs:
        parts = [part.strip().lower() for part in pair.split(",")]
        if len(parts) != 2:
            raise _BadRow(f"'{pair}' is not a text,image label pair")
        for part in parts:
            if part not in SENTIMENT_LABELS:
                raise _BadRow(f"unknown label '{part}' (expected one of {', '.join(SENTIMENT_LABELS)})")
        text_votes.append(parts[0])
        image_votes.append(parts[1])
    return text_votes, image_votes


def _post_label(text_votes: list[str], image_votes: list[str]) -> tuple[str | None, str]:
    """The merged label, or None and the drop reason."""
    text_label, image_label = majority_label(text_votes), majority_label(image_votes)
    missing = [f"{modality} labels {', '.join(votes)}"
               for modality, votes, label in (("text", text_votes, text_label), ("image", image_votes, image_label))
               if label is None]
    if missing:
        return None, f"no majority: {'; '.join(missing)}"
    label = merge_labels(text_label, image_label)
    if label is None:
        return None, f"label conflict: text {text_label}, image {image_label}"
    return label, ""
