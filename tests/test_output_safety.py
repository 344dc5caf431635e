"""Nothing the user has is lost: an output that is an input is refused, whole files are written to a temporary
file and renamed, growing files are appended under a lock, and a failed write (a full disk, a device, a FIFO)
is the one-line error with every complete row kept for ``--resume``."""

from __future__ import annotations

import errno
import json
import os
import threading
from pathlib import Path

import pytest

from cli_helpers import cli, one_line_error, use_length_predictor
from sentilens import outputs, predict
from sentilens.errors import SentilensError
from sentilens.jsonio import dumps
from sentilens.outputs import RowAppender, atomic_write_text, check_output, path_problem, save_figure, write_json

DEV_FULL = Path("/dev/full")


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("SENTILENS_QUIET", "1")


def posts_file(path: Path, n: int, prefix: str = "p") -> Path:
    path.write_text("".join(json.dumps({"id": f"{prefix}{i}", "text": "x" * i}) + "\n" for i in range(n)),
                    encoding="utf-8")
    return path


def ids_in(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text(encoding="utf-8").split("\n") if line]


def predict_args(source: Path, output: Path, *extra: str) -> list[str]:
    return ["predict", "--run", "unused-run", "--input", str(source), "--output", str(output), *extra]


# ----------------------------------------------------------------------------- an output that is an input


@pytest.mark.parametrize("resume", [False, True])
@pytest.mark.parametrize("link", ["same path", "symbolic link", "hard link"])
def test_predict_refuses_to_write_over_its_input(tmp_path, monkeypatch, capsys, link, resume):
    predictor = use_length_predictor(monkeypatch)
    source = posts_file(tmp_path / "posts.jsonl", 30)
    before = source.read_bytes()
    output = source
    if link == "symbolic link":
        output = tmp_path / "link.jsonl"
        output.symlink_to(source)
    elif link == "hard link":
        output = tmp_path / "hard.jsonl"
        os.link(source, output)
    code, out, err = cli(monkeypatch, capsys, *predict_args(source, output, *(["--resume"] if resume else [])))
    one_line_error(code, err, str(output), "is also an input")
    assert source.read_bytes() == before
    assert predictor.seen == []  # refused before a post was predicted


def test_explain_refuses_to_write_over_its_image(tmp_path, monkeypatch, capsys):
    image = tmp_path / "cat.png"
    image.write_bytes(b"\x89PNG not really")
    code, out, err = cli(monkeypatch, capsys, "explain", "--run", "unused-run", "--image", str(image), "--out",
                         str(image))
    one_line_error(code, err, "is also an input")
    assert image.read_bytes() == b"\x89PNG not really"


def test_prepare_refuses_a_table_inside_its_own_output(tmp_path, monkeypatch, capsys):
    table = tmp_path / "train.jsonl"
    table.write_text("".join(json.dumps({"id": f"p{i}", "text": "t", "label": "positive"}) + "\n"
                             for i in range(5)))
    before = table.read_bytes()
    code, out, err = cli(monkeypatch, capsys, "data", "prepare", "--format", "table", "--root", str(table), "--out",
                         str(tmp_path))
    one_line_error(code, err, "is also an input")
    assert table.read_bytes() == before


# ----------------------------------------------------------------------------- two writers


def test_a_second_predict_on_a_locked_output_is_refused(tmp_path, monkeypatch, capsys):
    predictor = use_length_predictor(monkeypatch)
    source = posts_file(tmp_path / "posts.jsonl", 20)
    output = tmp_path / "preds.jsonl"
    with RowAppender(output, fresh=True) as first:  # another process's job, still writing
        first.write([{"id": "p0", "label": "even", "probabilities": {"even": 1.0, "odd": 0.0}}])
        for extra in (["--resume"], []):
            code, out, err = cli(monkeypatch, capsys, *predict_args(source, output, *extra))
            one_line_error(code, err, str(output), "is being written by another sentilens process")
    assert ids_in(output) == ["p0"] and predictor.seen == []
    code, out, err = cli(monkeypatch, capsys, *predict_args(source, output, "--resume", "--json"))
    assert code == 0, err
    assert ids_in(output) == [f"p{i}" for i in range(20)]  # the first job's row once, then the rest, once each
    assert predictor.seen == [f"p{i}" for i in range(1, 20)]


def test_the_lock_is_held_against_another_process(tmp_path):
    import subprocess
    import sys

    output = tmp_path / "preds.jsonl"
    holder = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
              "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()")
    process = subprocess.Popen([sys.executable, "-c", holder, str(output)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "locked"
        with pytest.raises(SentilensError, match="is being written by another sentilens process"), \
                RowAppender(output, fresh=False):
            pass
    finally:
        process.communicate("", timeout=30)
    with RowAppender(output, fresh=False) as appender:  # released with its process
        appender.write([{"id": "a"}])
    assert ids_in(output) == ["a"]


# ----------------------------------------------------------------------------- failed writes


def test_a_full_disk_keeps_every_complete_row_and_resume_finishes(tmp_path, monkeypatch, capsys):
    predictor = use_length_predictor(monkeypatch)
    monkeypatch.setattr(predict, "WRITE_CHUNK", 4)
    source = posts_file(tmp_path / "posts.jsonl", 23)
    output = tmp_path / "preds.jsonl"
    real_write = os.write
    calls = []

    def disk_fills(fd, data):
        calls.append(len(data))
        if len(calls) < 3:
            return real_write(fd, data)
        real_write(fd, bytes(data)[: len(data) // 2])  # half the third chunk lands, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs.os, "write", disk_fills)
    code, out, err = cli(monkeypatch, capsys, *predict_args(source, output))
    one_line_error(code, err, str(output), "no space left on the device", "the 8 complete rows", "--resume")
    assert ids_in(output) == [f"p{i}" for i in range(8)]
    assert output.read_text().endswith("\n")  # no half row

    monkeypatch.setattr(outputs.os, "write", real_write)
    predictor.seen.clear()
    code, out, err = cli(monkeypatch, capsys, *predict_args(source, output, "--resume"))
    assert code == 0, err
    assert ids_in(output) == [f"p{i}" for i in range(23)]
    assert predictor.seen == [f"p{i}" for i in range(8, 23)]


def test_a_bad_post_midway_keeps_the_rows_before_it_and_says_so(tmp_path, monkeypatch, capsys):
    predictor = use_length_predictor(monkeypatch)
    monkeypatch.setattr(predict, "WRITE_CHUNK", 5)
    source = posts_file(tmp_path / "posts.jsonl", 12)
    output = tmp_path / "preds.jsonl"
    real = predictor.predict

    def fails_on_p7(posts, keep_ratio=None):
        if any(post.id == "p7" for post in posts):
            raise SentilensError("image file not found", "p7.jpg")
        return real(posts, keep_ratio)

    monkeypatch.setattr(predictor, "predict", fails_on_p7)
    code, out, err = cli(monkeypatch, capsys, *predict_args(source, output))
    one_line_error(code, err, "p7.jpg: image file not found", "the 5 predictions before it are kept", "--resume")
    assert ids_in(output) == [f"p{i}" for i in range(5)]


@pytest.mark.skipif(not DEV_FULL.exists(), reason="no /dev/full on this system")
def test_dev_full_is_refused_in_one_line_by_predict_explain_and_synth(tmp_path, monkeypatch, capsys):
    use_length_predictor(monkeypatch)
    source = posts_file(tmp_path / "posts.jsonl", 3)
    for args in (predict_args(source, DEV_FULL),
                 ["explain", "--run", "unused-run", "--image", str(tmp_path / "x.png"), "--out", str(DEV_FULL)],
                 ["data", "synth", "--out", str(DEV_FULL), "--n", "20"]):
        code, out, err = cli(monkeypatch, capsys, *args)
        one_line_error(code, err, "/dev/full", "a device")


def test_a_fifo_output_is_refused_without_blocking(tmp_path, monkeypatch, capsys):
    use_length_predictor(monkeypatch)
    source = posts_file(tmp_path / "posts.jsonl", 3)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    results = {}

    def run(resume: bool):
        results[resume] = cli(monkeypatch, capsys, *predict_args(source, fifo, *(["--resume"] if resume else [])))

    for resume in (False, True):
        worker = threading.Thread(target=run, args=(resume,), daemon=True)
        worker.start()
        worker.join(timeout=60)
        assert not worker.is_alive(), "writing to a FIFO blocked"
        code, out, err = results[resume]
        one_line_error(code, err, "named pipe (FIFO)")
    with pytest.raises(SentilensError, match="named pipe"):
        atomic_write_text(fifo, "x")


def test_a_failed_whole_file_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "metrics-test.json"
    write_json(target, {"accuracy": 0.5})
    before = target.read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs.os, "fsync", full)
    with pytest.raises(SentilensError, match=r"no space left on the device\); the file is as it was") as caught:
        write_json(target, {"accuracy": 0.9})
    assert "\n" not in str(caught.value)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics-test.json"]


def test_a_figure_that_fails_to_save_leaves_no_empty_png(tmp_path):
    from matplotlib.figure import Figure

    class FullDiskFigure(Figure):
        def savefig(self, fname, **options):
            fname.write(b"\x89PNG\r\n")  # the header made it, the rest did not
            raise OSError(errno.ENOSPC, "No space left on device")

    figure = FullDiskFigure()
    with pytest.raises(SentilensError, match="no space left"):
        save_figure(figure, tmp_path / "plots" / "sweep.png")
    assert list((tmp_path / "plots").iterdir()) == []
    plain = Figure()
    plain.subplots().plot([0, 1], [1, 0])
    save_figure(plain, tmp_path / "plots" / "sweep.png")
    assert (tmp_path / "plots" / "sweep.png").read_bytes().startswith(b"\x89PNG")


def test_a_rewritten_file_keeps_its_permissions(tmp_path):
    target = tmp_path / "report.md"
    target.write_text("old")
    target.chmod(0o640)
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and target.stat().st_mode & 0o777 == 0o640


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_named(tmp_path, monkeypatch, capsys):
    use_length_predictor(monkeypatch)
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        code, out, err = cli(monkeypatch, capsys, *predict_args(posts_file(tmp_path / "p.jsonl", 2),
                                                               folder / "preds.jsonl"))
        one_line_error(code, err, "is read-only")
    finally:
        folder.chmod(0o700)


def test_path_problems_are_named_accurately(tmp_path):
    (tmp_path / "file").write_text("x")
    assert path_problem(tmp_path) == "names a folder; give the path of a file to write"
    assert path_problem(tmp_path / "file" / "out.json") == f"{tmp_path / 'file'} is a file, so it cannot hold the " \
                                                           "output"
    assert "over the file system's limit" in path_problem(tmp_path / ("n" * 300))
    assert "over the file system's limit" in path_problem(tmp_path / ("n" * 300) / "out.json")
    assert "4096-byte limit" in path_problem(tmp_path / "/".join(["d" * 200] * 25))
    assert path_problem(tmp_path / "new" / "deeper" / "out.json") is None  # the writers create folders
    with pytest.raises(SentilensError, match="over the file system's limit"):
        atomic_write_text(tmp_path / ("n" * 300), "x")


def test_no_json_writer_writes_nan_or_a_lone_surrogate(tmp_path):
    for value, reason in ((float("nan"), "NaN or infinite"), (float("inf"), "NaN or infinite"),
                          ("\udcff", r"lone surrogate U\+DCFF")):
        with pytest.raises(SentilensError, match=reason):
            write_json(tmp_path / "metrics.json", {"value": value})
        with pytest.raises(SentilensError, match=reason), RowAppender(tmp_path / "rows.jsonl", fresh=True) as rows:
            rows.write([{"id": "a", "p": value}])
    assert not (tmp_path / "metrics.json").exists() and (tmp_path / "rows.jsonl").read_bytes() == b""
    assert dumps({"a": "é\u2028"}) == '{"a": "é\u2028"}'


def test_check_output_accepts_a_new_file_beside_the_input(tmp_path):
    source = posts_file(tmp_path / "posts.jsonl", 1)
    check_output(tmp_path / "preds.jsonl", source, None)


def test_a_read_only_file_system_is_one_line(tmp_path, monkeypatch):
    """Root writes through permission bits, not through a read-only mount: the file system's refusal is
    simulated where the temporary file is made."""
    target = tmp_path / "stats.json"

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(outputs.tempfile, "mkstemp", read_only)
    with pytest.raises(SentilensError, match=r"stats.json: cannot write \(Read-only file system\)"):
        write_json(target, {"labels": []})
    assert not target.exists()


class FullAfter:
    """A file object that raises "no space left" on every write once ``files`` files were opened whole."""

    opened = 0

    def __init__(self, f, files: int):
        self.f, self.full = f, FullAfter.opened >= files
        FullAfter.opened += 1

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.f.__exit__(*exc)

    def write(self, data):
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.f.write(data)


def test_synth_on_a_full_disk_is_one_line_and_leaves_no_temporary(tmp_path, monkeypatch, capsys):
    real_fdopen = os.fdopen
    monkeypatch.setattr(FullAfter, "opened", 0)
    monkeypatch.setattr(outputs.os, "fdopen", lambda fd, *a, **k: FullAfter(real_fdopen(fd, *a, **k), files=5))
    code, out, err = cli(monkeypatch, capsys, "data", "synth", "--out", str(tmp_path / "synth"), "--n", "20")
    one_line_error(code, err, "no space left on the device")
    images = sorted(p.name for p in (tmp_path / "synth" / "images").iterdir())
    assert images == [f"synth-{i:05d}.png" for i in range(5)]  # the five written whole, no temporary file


def test_an_os_error_of_a_full_disk_from_a_library_writer_is_one_line(tmp_path, monkeypatch, capsys):
    def library_write(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "model.safetensors"))

    monkeypatch.setattr("sentilens.data.synth.make_synthetic", library_write)
    code, out, err = cli(monkeypatch, capsys, "data", "synth", "--out", str(tmp_path / "synth"))
    one_line_error(code, err, "model.safetensors: No space left on device")


def test_an_over_long_output_name_is_one_line(tmp_path, monkeypatch, capsys):
    use_length_predictor(monkeypatch)
    source = posts_file(tmp_path / "posts.jsonl", 2)
    code, out, err = cli(monkeypatch, capsys, *predict_args(source, tmp_path / ("p" * 300 + ".jsonl")))
    one_line_error(code, err, "over the file system's limit of 255")
    code, out, err = cli(monkeypatch, capsys, "data", "synth", "--out", str(tmp_path / ("d" * 300)))
    one_line_error(code, err, "over the file system's limit of 255")


def test_a_whole_file_rewrite_through_a_symbolic_link_keeps_the_link(tmp_path):
    real = tmp_path / "shared" / "stats.json"
    real.parent.mkdir()
    real.write_text("{}")
    link = tmp_path / "stats.json"
    link.symlink_to(real)
    write_json(link, {"labels": ["a"]})
    assert link.is_symlink() and json.loads(real.read_text()) == {"labels": ["a"]}


def test_weights_that_do_not_fit_on_the_disk_are_one_line_and_keep_the_old_file(tmp_path, monkeypatch):
    import torch

    from sentilens import runs

    target = tmp_path / "model.safetensors"
    runs.save_weights(target, {"w": torch.ones(2)})
    before = target.read_bytes()

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                           'left on device" })')  # how safetensors reports it

    monkeypatch.setattr(runs, "save_file", full_disk)
    with pytest.raises(SentilensError, match="model.safetensors: cannot write .*StorageFull.*the file is as it was"):
        runs.save_weights(target, {"w": torch.zeros(2)})
    assert target.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
