"""The prediction pipeline of issue 13: draft JPEG decoding, encoders on ONNX Runtime, the live
pipeline against the cached-feature path, and ``predict --input`` writing as it goes with ``--resume``.

References are independent of the code under test where one exists: eager PyTorch for ONNX
Runtime, the training path's ``featurize`` + ``probabilities`` for the pipeline, a fresh full run
for a resumed one, Pillow's full decode for draft decoding.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from sentilens.cli import app
from sentilens.data.images import ImageError, ImageLimits, load_image
from sentilens.data.records import Post, read_manifest
from sentilens.data.synth import make_synthetic
from sentilens.errors import SentilensError
from sentilens.fusion.cache import featurize
from sentilens.fusion.config import FusionConfig
from sentilens.fusion.encoders import ImageEncoder, TextEncoder, embedded_text_path, pixel_array
from sentilens.fusion.predictor import FusionPredictor
from sentilens.fusion.train import train_fusion
from sentilens.predict import done_ids
from sentilens.progress import progress_bar

SIZE = 64
runner = CliRunner()


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("SENTILENS_QUIET", "1")


def photo(path, size=(1200, 900), seed=0):
    """A smooth photo-like JPEG (upscaled noise), the kind libjpeg's DCT scaling is meant for."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray((rng.random((9, 12, 3)) * 255).astype(np.uint8))
    small.resize(size, Image.BICUBIC).save(path, quality=90)
    return path


def test_draft_decoding_keeps_the_shorter_side_at_the_target_and_the_limits(tmp_path):
    jpeg = photo(tmp_path / "big.jpg")
    assert load_image(jpeg).size == (1200, 900)
    assert load_image(jpeg, draft_size=224).size == (300, 225)  # 1/4 scale: 225 >= 224, 1/8 would give 112
    assert load_image(jpeg, draft_size=400).size == (600, 450)
    assert load_image(jpeg, draft_size=2000).size == (1200, 900)  # never upscaled
    png = tmp_path / "big.png"
    Image.open(jpeg).save(png)
    assert load_image(png, draft_size=224).size == (1200, 900)  # only JPEGs have DCT scaling
    with pytest.raises(ImageError, match="over the cap"):
        load_image(jpeg, ImageLimits(max_pixels=1000), draft_size=224)
    # The encoder's input from a draft decode is the full decode's, up to resampling differences.
    full, draft = pixel_array(load_image(jpeg), 224), pixel_array(load_image(jpeg, draft_size=224), 224)
    assert np.abs(full - draft).mean() < 0.05 and np.abs(full - draft).max() < 1.0


def test_onnx_text_encoder_agrees_with_pytorch_on_padded_batches_and_follows_new_weights(tmp_path):
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path / "tiny-bert"
    AutoTokenizer.from_pretrained(embedded_text_path()).save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(folder)
    encoder = TextEncoder(str(folder), template="post: {text}")
    texts = ["great day", "", "the worst photo of the cup at the box, ugh " * 4, "love it"]
    eager = encoder.encode(texts)
    assert encoder.use_onnx(tmp_path / "onnx") and encoder.runtime == "onnx"
    fast = encoder.encode(texts)
    for e, f in zip(eager, fast, strict=True):
        assert e["states"].shape == f["states"].shape  # each text keeps its own length, padding dropped
        torch.testing.assert_close(f["states"], e["states"], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(f["pooled"], e["pooled"], atol=1e-4, rtol=1e-4)

    # A fine-tuned encoder (new weights under the same name) gets its own export, not the stale one.
    with torch.no_grad():
        weight = encoder.model.encoder.layer[0].output.dense.weight
        weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(1)))
    encoder._onnx = None
    tuned_eager = encoder.encode(texts)
    assert not torch.allclose(tuned_eager[0]["pooled"], eager[0]["pooled"], atol=1e-3)
    assert encoder.use_onnx(tmp_path / "onnx")
    assert len(list((tmp_path / "onnx").glob("text-*.onnx"))) == 2
    for e, f in zip(tuned_eager, encoder.encode(texts), strict=True):
        torch.testing.assert_close(f["pooled"], e["pooled"], atol=1e-4, rtol=1e-4)


def test_onnx_image_encoder_agrees_with_pytorch(tmp_path):
    encoder = ImageEncoder(image_size=SIZE)
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((40 + 10 * i, 50, 3)) * 255).astype(np.uint8)) for i in range(3)]
    eager = encoder.encode(images)
    assert encoder.use_onnx(tmp_path / "onnx")
    for e, f in zip(eager, encoder.encode(images), strict=True):
        torch.testing.assert_close(f["states"], e["states"], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(f["pooled"], e["pooled"], atol=1e-4, rtol=1e-4)


def test_a_model_onnx_cannot_reproduce_stays_on_pytorch(tmp_path, monkeypatch):
    from sentilens.fusion import runtime

    monkeypatch.setattr(runtime, "AGREEMENT", -1.0)  # no export can agree to better than exactly
    encoder = ImageEncoder(image_size=SIZE)
    with pytest.warns(UserWarning, match="disagrees"):
        assert not encoder.use_onnx(tmp_path / "onnx")
    assert encoder.runtime == "torch" and not list((tmp_path / "onnx").glob("*.onnx"))


@pytest.fixture(scope="module")
def fusion_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline")
    make_synthetic(folder / "data", n=60, seed=0, image_size=SIZE)
    train_fusion(FusionConfig(image_size=SIZE, epochs=2), folder / "data", folder / "run", device="cpu")
    posts = [p for split in read_manifest(folder / "data").values() for p in split]
    # Mixed lengths and missing modalities, in an order the pipeline will change and must restore.
    posts[3] = Post(posts[3].id, "", posts[3].image)
    posts[7] = Post(posts[7].id, posts[7].text * 5, None)
    posts[11] = Post(posts[11].id, "", None)
    return folder / "run", posts


def test_the_pipeline_gives_the_cached_feature_paths_probabilities(fusion_run):
    run, posts = fusion_run
    plain = FusionPredictor.from_run(run, device="cpu", runtime="torch")
    assert plain.runtime == "torch"
    reference = plain.probabilities(featurize(posts, plain.text_encoder, plain.image_encoder, None)[0], posts)
    torch.testing.assert_close(plain.live_probabilities(posts), reference, atol=1e-6, rtol=1e-5)
    fast = FusionPredictor.from_run(run, device="cpu")
    assert fast.runtime == "onnx"
    torch.testing.assert_close(fast.live_probabilities(posts), reference, atol=1e-5, rtol=1e-4)
    assert [p.label for p in fast.predict(posts)] == [plain.labels[int(i)] for i in reference.argmax(dim=1)]


def test_a_corrupt_image_is_a_user_error_naming_it(fusion_run, tmp_path):
    run, posts = fusion_run
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    predictor = FusionPredictor.from_run(run, device="cpu", runtime="torch")
    with pytest.raises(ImageError, match="bad.jpg"):
        predictor.predict([*posts[:40], Post("bad", "hello", str(bad))])


def test_predict_input_writes_as_it_goes_and_resume_skips_what_is_there(fusion_run, tmp_path, monkeypatch):
    from sentilens import predict as predict_module

    run, posts = fusion_run
    source = tmp_path / "posts.jsonl"
    source.write_text("".join(json.dumps({"id": p.id, "text": p.text, "image": p.image}) + "\n" for p in posts))
    args = ["predict", "--run", str(run), "--input", str(source), "--runtime", "torch"]
    fresh = tmp_path / "fresh.jsonl"
    assert runner.invoke(app, [*args, "--output", str(fresh)]).exit_code == 0
    expected = {row["id"]: row for row in map(json.loads, fresh.read_text().splitlines())}
    assert list(expected) == [p.id for p in posts]

    monkeypatch.setattr(predict_module, "WRITE_CHUNK", 8)
    seen = []
    original = FusionPredictor.predict

    def interrupted(self, batch, keep_ratio=None):
        if len(seen) >= 16:
            raise KeyboardInterrupt
        seen.extend(p.id for p in batch)
        return original(self, batch, keep_ratio)

    monkeypatch.setattr(FusionPredictor, "predict", interrupted)
    output = tmp_path / "preds.jsonl"
    result = runner.invoke(app, [*args, "--output", str(output)])
    assert result.exit_code == 130  # typer turns the KeyboardInterrupt into exit code 130
    kept = output.read_text().splitlines()
    assert [json.loads(line)["id"] for line in kept] == [p.id for p in posts[:16]]  # both chunks, as written
    with output.open("a") as f:
        f.write('{"id": "half-writ')  # the process died in the middle of a row

    monkeypatch.setattr(FusionPredictor, "predict", original)
    calls = []
    monkeypatch.setattr(FusionPredictor, "predict",
                        lambda self, batch, keep_ratio=None: calls.extend(batch) or original(self, batch, keep_ratio))
    result = runner.invoke(app, [*args, "--output", str(output), "--resume", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["predicted"], summary["skipped"]) == (len(posts) - 16, 16)
    assert [p.id for p in calls] == [p.id for p in posts[16:]]
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(expected)
    for row in rows:
        assert row["label"] == expected[row["id"]]["label"]
        for label, p in row["probabilities"].items():
            assert p == pytest.approx(expected[row["id"]]["probabilities"][label], abs=1e-6)


def test_resume_refuses_a_file_that_is_not_predictions(tmp_path):
    path = tmp_path / "other.jsonl"
    path.write_text('{"id": "a"}\n[1, 2]\n')
    with pytest.raises(SentilensError, match=r"other.jsonl:2: not a predictions row"):
        done_ids(path)
    assert done_ids(tmp_path / "missing.jsonl") == set()


def test_a_bar_inside_a_bar_is_silent(monkeypatch):
    monkeypatch.delenv("SENTILENS_QUIET", raising=False)
    monkeypatch.delenv("CI", raising=False)
    with progress_bar() as outer, progress_bar() as inner:
        assert not outer.disable and inner.disable
    with progress_bar() as again:
        assert not again.disable
