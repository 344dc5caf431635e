"""Reader of CrisisMMD v2.0 (Alam et al. 2018), the fusion paper's data set.

Two raw forms are read; the official split files win when both are present.

**Official split files** (``ROOT/crisismmd_datasplit_all/task_<task>_text_img_{train,dev,test}.tsv``,
also found one folder deeper, where the zip unpacks to ``crisismmd_datasplit_all/crisismmd_datasplit_all``),
with header ``event_name tweet_id image_id tweet_text image label label_text label_image
label_text_image``. The post's label is ``label`` and its split the file's (``dev`` -> ``val``),
as in the benchmark of Ofli et al. (2020). ``agreed_only`` keeps the rows whose text and
image annotations agree (``label_text == label_image``), that paper's "agreed" setting.

**Raw annotations** (``ROOT/annotations/<event>_final_data.tsv``), one row per image with the
text and image annotations side by side: ``tweet_id image_id text_info text_info_conf
image_info image_info_conf text_human ... image_human ... tweet_text image_url image_path``.
These give no post label, so sentilens derives one, by the same rule the MVSA sets use
(Xu and Mao 2017) with the task's null class in the place of ``neutral``: equal labels give
that label; one null (``not_informative`` / ``not_humanitarian``) and one other label give
the other, since a post is informative when its text or its image is; two different
humanitarian categories are a conflict and the row is dropped. ``agreed_only`` keeps equal
pairs only. The split is then sentilens' seeded 8:1:1 per class, with the images of one
tweet kept in the same split so no tweet text is shared between train and test.

In both forms there is one post per image row (``id`` = ``image_id``; a tweet with three
images gives three posts sharing its text); columns are found by header name, not position;
image paths are relative to ROOT. The tasks: ``informative`` (informative, not_informative)
and ``humanitarian`` (the eight v2.0 categories).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sentilens.data.labels import merge_modality_labels
from sentilens.data.records import Dropped, Post, RawDataset, path_escapes
from sentilens.data.text import csv_records, read_text
from sentilens.errors import SentilensError

SPLIT_DIR = "crisismmd_datasplit_all"
SPLIT_FILES = {"train": "train", "dev": "val", "test": "test"}


@dataclass(frozen=True)
class CrisisTask:
    """A CrisisMMD task: its labels in order, its null class, and its raw-annotation columns."""

    labels: tuple[str, ...]
    null_label: str
    text_column: str
    image_column: str


TASKS = {
    "informative": CrisisTask(("informative", "not_informative"), "not_informative", "text_info", "image_info"),
    "humanitarian": CrisisTask(
        (
            "affected_individuals",
            "infrastructure_and_utility_damage",
            "injured_or_dead_people",
            "missing_or_found_people",
            "not_humanitarian",
            "other_relevant_information",
            "rescue_volunteering_or_donation_effort",
            "vehicle_damage",
        ),
        "not_humanitarian",
        "text_human",
        "image_human",
    ),
}


def read_crisismmd(root: str | Path, task: str = "informative", agreed_only: bool = False) -> RawDataset:
    """Posts of a CrisisMMD v2.0 folder for ``task``, from the official splits or the raw annotations."""
    root = Path(root)
    if task not in TASKS:
        raise SentilensError(f"unknown CrisisMMD task '{task}' (choose from {', '.join(TASKS)})")
    if not root.is_dir():
        raise SentilensError("no such folder (expected the CrisisMMD_v2.0 root)", root)
    split_files = _find_split_files(root, task)
    if split_files:
        return _read_split_files(root, split_files, TASKS[task], task, agreed_only)
    annotation_files = sorted((root / "annotations").glob("*.tsv"))
    if annotation_files:
        return _read_annotations(root, annotation_files, TASKS[task], task, agreed_only)
    raise SentilensError(f"found neither {SPLIT_DIR}/task_{task}_text_img_{{train,dev,test}}.tsv "
                         "nor annotations/*.tsv: is this the CrisisMMD_v2.0 folder?", root)


def combine_labels(text_label: str, image_label: str, task: CrisisTask) -> str | None:
    """The raw-annotation rule (module doc): equal -> it; null + other -> the other; else None."""
    return merge_modality_labels(text_label, image_label, null_label=task.null_label)


def _find_split_files(root: Path, task: str) -> dict[str, Path] | None:
    for folder in (root / SPLIT_DIR, root / SPLIT_DIR / SPLIT_DIR):
        files = {split: folder / f"task_{task}_text_img_{name}.tsv" for name, split in SPLIT_FILES.items()}
        present = [path for path in files.values() if path.is_file()]
        if len(present) == len(files):
            return files
        if present:
            missing = next(path for path in files.values() if not path.is_file())
            raise SentilensError("missing split file (the official split needs train, dev and test)", missing)
    return None


def _read_tsv(path: Path, required: tuple[str, ...]) -> tuple[dict[str, int], list[tuple[int, list[str] | str]]]:
    """Header column positions (by lower-cased name) and the data rows with their line numbers; a record the
    csv module refuses (a field over its size limit) comes as the problem's text, to be dropped as one row."""
    records = csv_records(read_text(path), "\t")
    line_no, header = next(records, (1, None))
    if header is None:
        raise SentilensError("empty file (expected a header line)", path, 1)
    if isinstance(header, str):
        raise SentilensError(f"header line: {header}", path, line_no)
    columns = {name.strip().lower(): i for i, name in enumerate(header)}
    missing = [name for name in required if name not in columns]
    if missing:
        raise SentilensError(f"missing column(s) {', '.join(missing)} in the header "
                             f"(found: {', '.join(columns)})", path, 1)
    rows = []
    for line_no, row in records:
        if isinstance(row, str) or any(field.strip() for field in row):
            rows.append((line_no, row))
    return columns, rows


class _Collector:
    """Turns TSV rows into posts and collects what it drops, for one reading of the data set."""

    def __init__(self, root: Path, task: CrisisTask, task_name: str):
        self.root, self.task, self.task_name = root, task, task_name
        self.posts: list[Post] = []
        self.dropped: list[Dropped] = []
        self.seen: dict[str, str] = {}

    @staticmethod
    def cell(row: list[str], columns: dict[str, int], name: str) -> str:
        index = columns.get(name)
        return row[index].strip() if index is not None and index < len(row) else ""

    def accept_row(self, row: list[str] | str, columns: dict[str, int], required: tuple[str, ...],
                   where: str) -> str | None:
        """The row's image id if the row is well-formed and new, else None (and the row is dropped)."""
        if isinstance(row, str):  # refused by the csv module: one bad row, as the table reader drops it
            self.dropped.append(Dropped(f"line {where.rsplit(':', 1)[-1]}", f"malformed row: {row}", where))
            return None
        image_id = self.cell(row, columns, "image_id") or where
        short = any(columns[name] >= len(row) for name in required)
        if short or len(row) > len(columns):
            self.dropped.append(Dropped(image_id, f"malformed row: {len(row)} fields, header has {len(columns)}",
                                        where))
            return None
        if image_id in self.seen:
            self.dropped.append(Dropped(image_id, f"duplicate id: first listed at {self.seen[image_id]}", where))
            return None
        self.seen[image_id] = where
        return image_id

    def check_label(self, image_id: str, label: str, column: str, where: str) -> bool:
        if not label:
            self.dropped.append(Dropped(image_id, f"missing label: '{column}' is empty", where))
            return False
        if label not in self.task.labels:
            self.dropped.append(Dropped(image_id, f"unknown label: '{label}' in '{column}' is not a label of "
                                                  f"the {self.task_name} task", where))
            return False
        return True

    def add(self, image_id: str, row: list[str], columns: dict[str, int], image_column: str, label: str,
            where: str, meta: dict) -> Post | None:
        image = self.cell(row, columns, image_column)
        if not image:
            self.dropped.append(Dropped(image_id, f"image missing: '{image_column}' is empty", where))
            return None
        unsafe = path_escapes(image)
        if unsafe:  # image paths are relative to ROOT: one leading elsewhere is a tampered file's
            self.dropped.append(Dropped(image_id, f"unsafe path: {unsafe} in '{image_column}'", where))
            return None
        post = Post(id=image_id, text=self.cell(row, columns, "tweet_text"), image=str(self.root / image),
                    label=label, meta={"tweet_id": self.cell(row, columns, "tweet_id"), **meta})
        self.posts.append(post)
        return post

    def labels_present(self) -> list[str]:
        return [label for label in self.task.labels if any(p.label == label for p in self.posts)]


def _read_split_files(root: Path, files: dict[str, Path], task: CrisisTask, task_name: str,
                      agreed_only: bool) -> RawDataset:
    rows_out = _Collector(root, task, task_name)
    fixed_split: dict[str, str] = {}
    required = ("tweet_id", "image_id", "tweet_text", "image", "label")
    if agreed_only:
        required += ("label_text", "label_image")
    for split, path in files.items():
        columns, rows = _read_tsv(path, required)
        for line_no, row in rows:
            where = f"{path}:{line_no}"
            image_id = rows_out.accept_row(row, columns, required, where)
            if image_id is None:
                continue
            label = rows_out.cell(row, columns, "label")
            if not rows_out.check_label(image_id, label, "label", where):
                continue
            text_label, image_label = rows_out.cell(row, columns, "label_text"), rows_out.cell(row, columns,
                                                                                               "label_image")
            if agreed_only and text_label != image_label:
                rows_out.dropped.append(Dropped(image_id, f"annotations disagree: text {text_label}, image "
                                                          f"{image_label} (--agreed-only)", where))
                continue
            meta = {"event": rows_out.cell(row, columns, "event_name"), "label_text": text_label,
                    "label_image": image_label}
            if rows_out.add(image_id, row, columns, "image", label, where, meta) is not None:
                fixed_split[image_id] = split
    source = {"dataset": "CrisisMMD v2.0", "task": task_name, "agreed_only": agreed_only,
              "files": [str(path) for path in files.values()], "form": "official split files"}
    return RawDataset(labels=rows_out.labels_present(), posts=rows_out.posts, dropped=rows_out.dropped,
                      fixed_split=fixed_split, source=source)


def _read_annotations(root: Path, files: list[Path], task: CrisisTask, task_name: str, agreed_only: bool) -> RawDataset:
    rows_out = _Collector(root, task, task_name)
    required = ("tweet_id", "image_id", "tweet_text", "image_path", task.text_column, task.image_column)
    for path in files:
        event = path.stem.removesuffix("_final_data")
        columns, rows = _read_tsv(path, required)
        for line_no, row in rows:
            where = f"{path}:{line_no}"
            image_id = rows_out.accept_row(row, columns, required, where)
            if image_id is None:
                continue
            text_label = rows_out.cell(row, columns, task.text_column)
            image_label = rows_out.cell(row, columns, task.image_column)
            if not (rows_out.check_label(image_id, text_label, task.text_column, where)
                    and rows_out.check_label(image_id, image_label, task.image_column, where)):
                continue
            label = text_label if text_label == image_label else None
            if label is None and agreed_only:
                rows_out.dropped.append(Dropped(image_id, f"annotations disagree: text {text_label}, image "
                                                          f"{image_label} (--agreed-only)", where))
                continue
            label = label or combine_labels(text_label, image_label, task)
            if label is None:
                rows_out.dropped.append(Dropped(image_id, f"label conflict: text {text_label}, image {image_label}",
                                                where))
                continue
            meta = {"event": event, "label_text": text_label, "label_image": image_label}
            rows_out.add(image_id, row, columns, "image_path", label, where, meta)
    source = {"dataset": "CrisisMMD v2.0", "task": task_name, "agreed_only": agreed_only,
              "files": [str(path) for path in files], "form": "raw annotations",
              "label_rule": "equal -> it; null class + other -> the other; two categories -> dropped"}
    return RawDataset(labels=rows_out.labels_present(), posts=rows_out.posts, dropped=rows_out.dropped,
                      group_of=_tweet_of, source=source)


def _tweet_of(post: Post) -> str:
    return post.meta["tweet_id"] or post.id
