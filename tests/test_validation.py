"""The one validation pass over what sentilens loads (sentilens.validation): each damaged or hostile input is
one line naming the file, the field and the bound, exit code 2, before anything is allocated."""

from __future__ import annotations

import json
import math
import re
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli_helpers import cli, one_line_error
from sentilens import machine
from sentilens.data.records import Post, write_manifest
from sentilens.errors import SentilensError
from sentilens.fusion.config import parse_fusion_config
from sentilens.predict import Prediction
from sentilens.recipes import read_recipe
from sentilens.runs import load_config, load_training_state, load_weights, save_weights
from sentilens.validation import (
    MAX_DEPTH,
    check_base_config,
    check_chat_template,
    check_labels,
    clean_label,
    load_json_file,
)

HYPOTHESIS = settings(max_examples=40, deadline=None, derandomize=True,
                      suppress_health_check=[HealthCheck.function_scoped_fixture])

CONFUSABLES = {
    "cyrillic o": "p\u043esitive",
    "full-width": "\uff50\uff4f\uff53\uff49\uff54\uff49\uff56\uff45",
    "zero-width space": "pos\u200bitive",
    "dotless i": "pos\u0131tive",
    "combining accent": "positive\u0301",
}
"""The spellings of 'positive' that turned 3 labels into 7."""


def fusion_run_dir(folder: Path, config: object, raw: bytes | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_bytes(raw if raw is not None else json.dumps(config).encode())
    return folder


def refused(fields: dict) -> str:
    with pytest.raises(SentilensError) as info:
        parse_fusion_config(fields, Path("RUN/config.json"))
    message = str(info.value)
    assert "\n" not in message and message.startswith("RUN/config.json: ")
    return message


# ----------------------------------------------------------------------------- run config, base config, recipes


@pytest.mark.parametrize(("fields", "fragment"), [
    ({"hidden": 20000}, "more than this machine's"),
    ({"hidden": 1_000_000}, "hidden: Input should be less than or equal to 65536"),
    ({"hidden": 1e6}, "hidden: Input should be less than or equal to 65536"),
    ({"capsules": 100_000}, "capsules: Input should be less than or equal to 256"),
    ({"routing_iterations": 1_000_000_000}, "routing_iterations: Input should be less than or equal to 100"),
    ({"hidden": -4}, "hidden: Input should be greater than or equal to 8"),
    ({"capsules": 0}, "capsules: Input should be greater than or equal to 1"),
    ({"text_dim": -3}, "text_dim: Input should be greater than or equal to 1"),
    ({"image_dim": 0}, "image_dim: Input should be greater than or equal to 1"),
    ({"family": ["fusion"]}, "family:"),
    ({"hidden": "wide"}, "hidden: Input should be a valid integer"),
    ({"lr": math.inf}, "lr: Input should be a finite number"),
])
def test_fusion_run_config_values_are_bounded(fields, fragment):
    assert fragment in refused(fields)


def test_the_memory_bound_is_the_machines(monkeypatch):
    parse_fusion_config({"hidden": 2048, "capsules": 16})  # fits in this machine's memory (at least 4 GiB)
    monkeypatch.setattr(machine, "memory_bytes", lambda: 2**30)
    assert "more than this machine's 1.0 GiB of memory" in refused({"hidden": 2048, "capsules": 16})


def test_a_family_that_is_not_a_string_is_one_line(tmp_path, monkeypatch, capsys):
    run = fusion_run_dir(tmp_path / "run", {"family": ["fusion"], "labels": ["a", "b"]})
    code, _, err = cli(monkeypatch, capsys, "predict", "--run", str(run), "--text", "hi")
    one_line_error(code, err, "config.json", "does not name a model family", alone=True)


def llava_config(**changes) -> dict:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=64, patch_size=16)
    config = LlavaConfig(vision_config=vision, text_config=text).to_dict()
    for dotted, value in changes.items():
        sub, key = dotted.split("__")
        config[sub][key] = value
    return config


@pytest.mark.parametrize(("changes", "fragment"), [
    ({"text_config__num_hidden_layers": 100_000}, "text_config.num_hidden_layers is 100000, outside 1..1024"),
    ({"vision_config__image_size": 100_000}, "vision_config.image_size is 100000, outside 1..4096"),
    ({"vision_config__image_size": 4096, "vision_config__patch_size": 2}, "patches per image"),
    ({"text_config__hidden_size": -64}, "text_config.hidden_size is -64"),
    ({"text_config__vocab_size": 1.5}, "text_config.vocab_size must be a whole number"),
    ({"text_config__hidden_size": 16384, "text_config__num_hidden_layers": 1000}, "billion parameters"),
])
def test_base_model_config_sizes_are_bounded(changes, fragment):
    check_base_config(llava_config(), "ckpt")
    with pytest.raises(SentilensError, match="^ckpt: base model config|^ckpt: the base model") as info:
        check_base_config(llava_config(**changes), "ckpt")
    assert fragment in str(info.value)


def test_a_base_checkpoint_with_100000_layers_is_refused_before_its_weights_load(tmp_path):
    from transformers import AutoConfig

    from sentilens.mllm.families.llava.tiny import build_tiny
    from sentilens.mllm.model import prepare_model

    folder = build_tiny(tmp_path / "ckpt", corpus=["a post"])
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 100_000
    (folder / "config.json").write_text(json.dumps(config))
    AutoConfig.from_pretrained(folder)  # transformers itself takes it
    with pytest.raises(SentilensError, match="num_hidden_layers is 100000, outside 1..1024") as info:
        prepare_model(folder, training=False)
    assert str(folder / "config.json") in str(info.value)


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


@pytest.mark.parametrize(("recipe", "fragment"), [
    ("tiny: {image_size: 100000}\n", "option tiny.image_size: Input should be less than or equal to 1024"),
    ("tiny_tower: {images: 1000000000}\n", "option tiny_tower.images: Input should be less than or equal to 50000"),
    ("tiny_tower: {images: 1e9}\n", "option tiny_tower.images: Input should be a valid integer"),
    ("tiny: {image_size: 96, patch_size: 97}\n", "an image must be 1 to 4096 patches"),
    ("tiny: {text_hidden: 65, text_heads: 4}\n", "text_hidden 65 is not a multiple of text_heads 4"),
    ("tiny: {vision_layers: -1}\n", "option tiny.vision_layers: Input should be greater than or equal to 2"),
    ("epochs: 0\n", "option epochs: Input should be greater than 0"),
    ("lr: .inf\n", "option lr: Input should be a finite number"),
])
def test_mllm_recipe_sizes_are_bounded(tmp_path, recipe, fragment):
    from sentilens.mllm.train import mllm_train_config

    path = write(tmp_path / "recipe.yaml", recipe)
    with pytest.raises(SentilensError) as info:
        mllm_train_config({"data": tmp_path, "out": tmp_path / "run"}, path)
    assert str(info.value) == f"{path}: {fragment}" or (str(info.value).startswith(str(path))
                                                       and fragment in str(info.value))


def test_the_tiny_tower_corpus_is_sized_against_the_memory(tmp_path, monkeypatch):
    from sentilens.mllm.train import mllm_train_config

    path = write(tmp_path / "recipe.yaml", "tiny: {image_size: 1024, patch_size: 16}\ntiny_tower: {images: 50000}\n")
    monkeypatch.setattr(machine, "memory_bytes", lambda: 8 * 2**30)
    with pytest.raises(SentilensError, match="-image tower corpus\\) needs about .* more than this machine's 8.0 GiB"):
        mllm_train_config({"data": tmp_path, "out": tmp_path / "run"}, path)


@pytest.mark.parametrize(("content", "fragment"), [
    (b"epochs: 3\nname: \xff\xfe\n", "not UTF-8 text"),
    ("a: " + "[" * 5000 + "]" * 5000 + "\n", "nested more than"),
    ('name: "\\ud800"\n', "lone surrogate"),
    ("- 1\n- 2\n", "a recipe must be a mapping"),
])
def test_recipe_files_are_read_strictly(tmp_path, content, fragment):
    path = write(tmp_path / "recipe.yaml", content)
    with pytest.raises(SentilensError, match=fragment) as info:
        read_recipe(path)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


# ----------------------------------------------------------------------------- strict JSON (property tests)


def nested(depth: int, inner: str = "1") -> str:
    opens = "".join('{"k": ' if i % 2 else "[" for i in range(depth))
    closes = "".join("}" if i % 2 else "]" for i in reversed(range(depth)))
    return opens + inner + closes


@HYPOTHESIS
@given(depth=st.integers(min_value=MAX_DEPTH + 1, max_value=200_000))
def test_deep_nesting_in_config_json_is_one_line(depth):
    with tempfile.TemporaryDirectory() as folder:
        run = fusion_run_dir(Path(folder) / "run", None, ('{"family": "fusion", "x": ' + nested(depth) + "}").encode())
        with pytest.raises(SentilensError, match="nested more than 64 levels deep") as info:
            load_config(run)
        assert str(info.value).startswith(str(run / "config.json"))


@HYPOTHESIS
@given(depth=st.integers(min_value=1, max_value=MAX_DEPTH - 1))
def test_nesting_within_the_bound_is_read(depth):
    assert load_json_file_text(nested(depth)) is not None


def load_json_file_text(text: str) -> object:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "x.json"
        path.write_text(text, encoding="utf-8")
        return load_json_file(path)


@HYPOTHESIS
@given(prefix=st.binary(max_size=20), bad=st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xe2\x82"]))
def test_non_utf8_config_json_is_one_line(prefix, bad):
    with tempfile.TemporaryDirectory() as folder:
        raw = b'{"family": "fusion", "prompt": "' + prefix.replace(b'"', b"").replace(b"\\", b"") + bad + b'"}'
        run = fusion_run_dir(Path(folder) / "run", None, raw)
        with pytest.raises(SentilensError) as info:
            load_config(run)
        assert str(info.value).startswith(str(run / "config.json")) and "\n" not in str(info.value)


@HYPOTHESIS
@given(code=st.integers(min_value=0xD800, max_value=0xDFFF), where=st.sampled_from(["key", "value", "label"]))
def test_lone_surrogates_in_config_json_are_refused(code, where):
    escape = f"\\u{code:04x}"
    body = {"key": f'{{"family": "fusion", "{escape}": 1}}', "value": f'{{"family": "fusion", "prompt": "{escape}"}}',
            "label": f'{{"family": "fusion", "labels": ["a", "b{escape}"]}}'}[where]
    with tempfile.TemporaryDirectory() as folder:
        run = fusion_run_dir(Path(folder) / "run", None, body.encode())
        with pytest.raises(SentilensError, match="lone surrogate"):
            load_config(run)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_not_json(tmp_path, constant):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "history.json").write_text(f'[{{"epoch": 1, "train_loss": {constant}}}]')
    from sentilens.runs import load_history

    with pytest.raises(SentilensError, match=f"not strict JSON \\({constant} is not a JSON number\\)"):
        load_history(tmp_path / "run")


@pytest.mark.parametrize("content", [b"\xff\xfe{}", b'{"epochs_done": ' + b"[" * 3000 + b"]" * 3000 + b"}"])
def test_a_damaged_resume_state_is_one_line(tmp_path, content):
    run = fusion_run_dir(tmp_path / "run", {"family": "fusion", "labels": ["a", "b"]})
    (run / "resume").mkdir()
    (run / "resume" / "state.json").write_bytes(content)
    with pytest.raises(SentilensError) as info:
        load_training_state(run)
    assert str(info.value).startswith(str(run / "resume" / "state.json")) and "\n" not in str(info.value)


def test_a_bad_config_json_through_the_cli_is_one_line(tmp_path, monkeypatch, capsys):
    run = fusion_run_dir(tmp_path / "run", None, b'{"family": "fusion", "labels": ' + b"[" * 100_000 + b"}")
    code, _, err = cli(monkeypatch, capsys, "predict", "--run", str(run), "--text", "hi")
    one_line_error(code, err, "config.json", "nested more than 64 levels deep", alone=True)


# ----------------------------------------------------------------------------- labels


@pytest.mark.parametrize("kind", sorted(CONFUSABLES))
def test_a_run_with_a_look_alike_label_is_refused_with_a_reason(tmp_path, kind):
    run = fusion_run_dir(tmp_path / "run", {"family": "fusion", "labels": ["positive", "negative",
                                                                          CONFUSABLES[kind]]})
    with pytest.raises(SentilensError, match="look the same|not in normal form|mixes LATIN letters with CYRILLIC"
                                             "|combining mark") as info:
        load_config(run)
    assert str(info.value).startswith(str(run / "config.json"))


@pytest.mark.parametrize(("labels", "fragment"), [
    (["positive", "positive"], "listed twice"),
    (["positive", "Positive"], "look the same"),
    (["positive"], "needs at least 2 distinct labels"),
    (["positive", 3], "must be a list of strings"),
    (["positive", ""], "is empty"),
    (["positive", "neg\x07ative"], "control or unassigned character U+0007"),
])
def test_label_lists_are_distinct_and_clean(labels, fragment):
    with pytest.raises(SentilensError, match=re.escape(fragment)):
        check_labels(labels, "config.json")


def test_distinct_labels_of_any_script_are_kept():
    labels = ["positive", "négatif", "позитив", "中立", "happy 😀", "not_informative"]
    assert check_labels(labels, "config.json") == labels
    assert clean_label(" \ufeffpos\u200bitive \u00a0") == "positive"


def test_prepare_folds_or_drops_look_alike_labels(tmp_path, monkeypatch, capsys):
    rows = [{"id": f"p{i}", "text": f"post {i}", "label": ("positive", "neutral", "negative")[i % 3]}
            for i in range(30)]
    rows += [{"id": f"v-{kind.replace(' ', '-')}", "text": kind, "label": label} for kind, label in CONFUSABLES.items()]
    table = tmp_path / "posts.jsonl"
    table.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    code, _, err = cli(monkeypatch, capsys, "data", "prepare", "--format", "table", "--root", str(table), "--out",
                       str(tmp_path / "out"), "--json")
    assert code == 0, err
    stats = json.loads((tmp_path / "out" / "stats.json").read_text(encoding="utf-8"))
    assert stats["labels"] == ["positive", "neutral", "negative"]
    dropped = {d["id"]: d["reason"] for d in stats["dropped"]}
    assert {"v-cyrillic-o", "v-dotless-i", "v-combining-accent"} <= set(dropped)
    assert all(reason.startswith(("confusable label: ", "suspect label: ")) for reason in dropped.values())
    kept = {json.loads(line)["id"]: json.loads(line)["label"] for split in ("train", "val", "test")
            for line in (tmp_path / "out" / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()}
    assert kept["v-full-width"] == kept["v-zero-width-space"] == "positive"  # folded, not a suspected typo
    # every spelling joins 'positive' or is dropped with its reason: none becomes a class
    assert all(kept.get(f"v-{kind.replace(' ', '-')}") == "positive" or f"v-{kind.replace(' ', '-')}" in dropped
               for kind in CONFUSABLES)


def test_fold_labels_names_each_look_alike():
    from sentilens.data.prepare import fold_labels
    from sentilens.data.records import RawDataset

    posts = [Post(f"a{i}", "t", None, "positive") for i in range(6)] + [Post("n", "t", None, "negative")]
    posts += [Post(kind, "t", None, label) for kind, label in CONFUSABLES.items()]
    raw = fold_labels(RawDataset(labels=list(dict.fromkeys(p.label for p in posts)), posts=posts, dropped=[]))
    assert raw.labels == ["positive", "negative"]
    reasons = {d.id: d.reason for d in raw.dropped}
    assert "CYRILLIC SMALL LETTER O" in reasons["cyrillic o"]
    assert reasons["dotless i"] == "confusable label: 'pos\u0131tive' looks like 'positive'"
    assert reasons["combining accent"] == "confusable label: 'positive\u0301' looks like 'positive'"
    assert {p.id: p.label for p in raw.posts}["full-width"] == "positive"
    assert raw.source["labels_folded"] == {CONFUSABLES["full-width"]: "positive",
                                           CONFUSABLES["zero-width space"]: "positive"}


def one_label_manifest(folder: Path, labels: list[str]) -> Path:
    """A manifest whose posts all have the label ``positive`` (``labels``: what its stats.json lists)."""
    posts = [Post(f"p{i}", f"post {i}", None, "positive") for i in range(6)]
    write_manifest(folder, {"train": posts, "val": posts[:2], "test": posts[:2]}, labels)
    return folder


@pytest.mark.parametrize("labels", [["positive"], ["positive", "negative"]])
def test_a_one_label_training_set_is_refused_before_training(tmp_path, monkeypatch, capsys, labels):
    data = one_label_manifest(tmp_path / "data", labels)
    code, _, err = cli(monkeypatch, capsys, "train", "fusion", "--data", str(data), "--out", str(tmp_path / "run"),
                       "--device", "cpu", "--no-cache")
    one_line_error(code, err, str(data), alone=True)
    assert "at least 2" in err
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- weights and predictions


@pytest.mark.parametrize(("tensor", "fragment"), [
    (torch.tensor([1.0, float("nan")]), "tensor head.weight holds 1 non-finite value"),
    (torch.tensor([float("inf")] * 3), "tensor head.weight holds 3 non-finite values"),
    (torch.ones(3, dtype=torch.int8), "tensor head.weight is int8, not a float type"),
    (torch.ones(3, dtype=torch.bool), "tensor head.weight is bool, not a float type"),
])
def test_damaged_weights_are_refused_naming_file_and_tensor(tmp_path, tensor, fragment):
    path = tmp_path / "model.safetensors"
    save_weights(path, {"ok": torch.zeros(2), "head.weight": tensor})
    with pytest.raises(SentilensError, match=fragment) as info:
        load_weights(path)
    assert str(info.value).startswith(str(path))


def test_a_batch_norm_counter_is_not_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    save_weights(path, {"bn.num_batches_tracked": torch.tensor(7), "bn.weight": torch.ones(2)})
    assert set(load_weights(path)) == {"bn.num_batches_tracked", "bn.weight"}


def test_a_prediction_never_holds_nan():
    with pytest.raises(SentilensError, match="non-finite probability \\(nan\\) for label 'positive'"):
        Prediction("positive", {"positive": float("nan"), "negative": 0.5})
    assert Prediction("negative", {"positive": 0.25, "negative": 0.75}).label == "negative"


@pytest.fixture(scope="module")
def fusion_run(tmp_path_factory):
    from serve_helpers import train_tiny_fusion

    return train_tiny_fusion(tmp_path_factory.mktemp("validation"))


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["nan", "int8", "bool"])
def test_a_saved_run_with_damaged_weights_predicts_nothing(fusion_run, tmp_path, monkeypatch, capsys, damage):
    import shutil

    from safetensors.torch import load_file, save_file

    run = Path(shutil.copytree(fusion_run, tmp_path / "run"))
    weights = load_file(run / "model.safetensors")
    name = sorted(k for k in weights if weights[k].is_floating_point() and weights[k].dim() == 2)[0]
    weights[name] = {"nan": weights[name].clone().fill_(float("nan")), "int8": weights[name].to(torch.int8),
                     "bool": weights[name] > 0}[damage]
    save_file(weights, str(run / "model.safetensors"))
    output = tmp_path / "out.jsonl"
    posts = tmp_path / "posts.jsonl"
    posts.write_text('{"id": "a", "text": "hello"}\n')
    code, _, err = cli(monkeypatch, capsys, "predict", "--run", str(run), "--input", str(posts), "--output",
                       str(output))
    one_line_error(code, err, "model.safetensors", f"tensor {name}", alone=True)
    assert not output.exists() or "NaN" not in output.read_text()


# ----------------------------------------------------------------------------- chat templates


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from mllm_helpers import tiny_model

    return tiny_model(tmp_path_factory.mktemp("tiny") / "ckpt")


LOOPING = "{% for i in range(100000) %}{% for j in range(100000) %}{{ '' }}{% endfor %}{% endfor %}"


@pytest.mark.parametrize(("template", "fragment"), [
    ("{% for m in messages %}{{ m.role }", "chat template does not compile"),
    ("{{ messages.__class__.__mro__[1].__subclasses__() }}", "chat template is unsafe: the sandbox refused it"),
    ("{{ raise_exception('no system role here') }}", "chat template fails on a prompt: no system role here"),
    (LOOPING, "chat template did not finish one prompt within 2 s"),
    ("{{ 'x' * 3000000 }}", "renders one prompt as 3000000 characters"),
])
def test_broken_unsafe_or_looping_chat_templates_are_refused_at_load(tiny, template, fragment):
    from sentilens.mllm.model import num_image_tokens
    from sentilens.mllm.prompt import PromptBuilder, PromptSettings

    model, _ = tiny
    before = model.processor.chat_template
    model.processor.chat_template = template
    try:
        with pytest.raises(SentilensError, match=fragment.replace("(", "\\(")) as info:
            PromptBuilder(model.processor, PromptSettings(), ["positive", "negative"],
                          num_image_tokens(model.vlm, model.processor))
    finally:
        model.processor.chat_template = before
    assert "\n" not in str(info.value)


def test_a_template_that_is_not_a_string_is_refused():
    with pytest.raises(SentilensError, match="chat template must be a string, got list"):
        check_chat_template(["{{ x }}"], lambda: "", "ckpt")


# ----------------------------------------------------------------------------- CLI misuse


@pytest.mark.parametrize(("device", "fragment"), [
    ("evil", "--device 'evil': not a device (cpu, cuda or cuda:N)"),
    ("meta", "--device 'meta': not a device"),
    pytest.param("cuda", "this machine has no usable CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
])
def test_a_device_that_is_not_there_is_one_line(tmp_path, monkeypatch, capsys, device, fragment):
    data = one_label_manifest(tmp_path / "data", ["positive", "negative"])
    code, _, err = cli(monkeypatch, capsys, "train", "fusion", "--data", str(data), "--out", str(tmp_path / "run"),
                       "--device", device, "--no-cache")
    one_line_error(code, err, fragment, alone=True)


def test_a_cuda_index_past_the_gpus_is_one_line(monkeypatch):
    from sentilens.distributed import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(SentilensError, match="--device cuda:3: this machine has 1 CUDA GPU"):
        resolve_device("cuda:3")


def test_eval_on_an_empty_split_is_one_line(tmp_path, monkeypatch, capsys):
    posts = [Post(f"p{i}", f"post {i}", None, ("positive", "negative")[i % 2]) for i in range(4)]
    write_manifest(tmp_path / "data", {"train": posts, "val": posts, "test": []}, ["positive", "negative"])
    code, _, err = cli(monkeypatch, capsys, "eval", "--run", str(tmp_path / "no-run"), "--data",
                       str(tmp_path / "data"), "--split", "test")
    one_line_error(code, err, "test.jsonl", "the test split is empty: nothing to evaluate", alone=True)


@pytest.mark.parametrize("strategy", ["evil", "all,evil", "3:x", "random+merge"])
def test_sweep_with_an_unknown_strategy_is_one_line(tmp_path, monkeypatch, capsys, strategy):
    code, _, err = cli(monkeypatch, capsys, "sweep", "--run", str(tmp_path), "--data", str(tmp_path),
                       "--strategy", strategy)
    one_line_error(code, err, f"--strategy {strategy!r}: not a filtering strategy", alone=True)
    assert "1048576" not in err
