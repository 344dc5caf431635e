"""Encoders through the real loading paths: tiny GPT-2 / ResNet saved and reloaded, the embedded defaults."""

import numpy as np
import pytest
import torch
from PIL import Image

from fusion_helpers import save_tiny_gpt2, save_tiny_resnet  # noqa: F401
from sentilens.errors import SentilensError
from sentilens.fusion.config import PROMPTS, FusionConfig
from sentilens.fusion.encoders import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageEncoder,
    TextEncoder,
    build_encoders,
    pixel_batch,
)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return save_tiny_gpt2(tmp_path_factory.mktemp("gpt2"))


def test_causal_lm_pools_the_last_real_token_of_the_prompt(gpt2_dir):
    encoder = TextEncoder(str(gpt2_dir), template="Post: {text} feels", max_tokens=64)
    assert encoder.causal and encoder.tokenizer.pad_token == encoder.tokenizer.eos_token
    texts = ["great day", "worst day ever, so sad and awful"]
    features = encoder.encode(texts)
    for text, feats in zip(texts, features, strict=True):
        ids = encoder.tokenizer(f"Post: {text} feels", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            alone = encoder.model(input_ids=ids).last_hidden_state[0]
        assert feats["states"].shape == alone.shape  # the prompt's tokens, no padding
        assert torch.allclose(feats["states"], alone, atol=1e-5)
        assert torch.allclose(feats["pooled"], alone[-1], atol=1e-5)


def test_no_prompt_template_feeds_the_bare_post(gpt2_dir):
    bare, prompted = TextEncoder(str(gpt2_dir), "{text}"), TextEncoder(str(gpt2_dir), "Post: {text} feels")
    n_bare = bare.encode(["great day"])[0]["states"].shape[0]
    assert n_bare == len(bare.tokenizer("great day")["input_ids"])
    assert prompted.encode(["great day"])[0]["states"].shape[0] > n_bare
    assert bare.fingerprint != prompted.fingerprint
    assert bare.fingerprint == TextEncoder(str(gpt2_dir), "{text}").fingerprint


def test_embedded_minilm_mean_pools_its_tokens():
    encoder = TextEncoder()
    assert not encoder.causal and encoder.dim == 384
    short, long = encoder.encode(["happy", "a much longer post about a rainy commute to the office"])
    ids = encoder.tokenizer("happy", return_tensors="pt")
    with torch.no_grad():
        alone = encoder.model(**ids).last_hidden_state[0]
    assert torch.allclose(short["states"], alone, atol=1e-5)
    assert torch.allclose(short["pooled"], alone.mean(0), atol=1e-5)
    assert long["states"].shape[0] > short["states"].shape[0]


def test_auto_prompt_wraps_posts_for_a_causal_lm_only(gpt2_dir):
    config = FusionConfig(variant="text", text_encoder=str(gpt2_dir))
    assert config.prompt == "auto" and config.prompt_template is None
    gpt2, _ = build_encoders(config)
    minilm, _ = build_encoders(FusionConfig(variant="text"))
    assert gpt2.template == PROMPTS["sentiment"]
    assert minilm.template == "{text}"  # a sentence encoder embeds the bare post, as it was trained
    ids = minilm.tokenizer("a sunny day at the beach", return_tensors="pt")
    with torch.no_grad():
        bare = minilm.model(**ids).last_hidden_state[0].mean(0)
    assert torch.allclose(minilm.encode(["a sunny day at the beach"])[0]["pooled"], bare, atol=1e-5)


def test_pixels_are_imagenet_normalised_without_torchvision():
    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    pixels = pixel_batch([Image.fromarray(rgb)], 32)
    expected = (rgb.astype(np.float32) / 255 - IMAGENET_MEAN) / IMAGENET_STD
    assert torch.allclose(pixels[0], torch.from_numpy(expected).permute(2, 0, 1), atol=1e-6)
    wide = pixel_batch([Image.new("RGB", (90, 30), (255, 0, 0))], 32)
    assert wide.shape == (1, 3, 32, 32)


def test_embedded_efficientnet_regions_are_its_last_feature_map():
    encoder = ImageEncoder(image_size=64)
    images = [Image.new("RGB", (80, 64), (200, 120, 40)), Image.new("RGB", (64, 64), (20, 30, 90))]
    features = encoder.encode(images)
    with torch.no_grad():
        grid = encoder.model.extract_features(pixel_batch(images, 64))
    assert grid.shape == (2, 1280, 2, 2)
    for i, feats in enumerate(features):
        assert feats["states"].shape == (4, encoder.dim)
        assert torch.allclose(feats["states"], grid[i].flatten(1).T, atol=1e-5)
        assert torch.allclose(feats["pooled"], grid[i].mean(dim=(1, 2)), atol=1e-5)
    assert not torch.allclose(features[0]["pooled"], features[1]["pooled"])


def test_hf_resnet_backbone_through_from_pretrained(tmp_path):
    folder = save_tiny_resnet(tmp_path / "resnet")
    encoder = ImageEncoder(str(folder), image_size=64)
    assert encoder.dim == 16
    image = Image.new("RGB", (64, 64), (10, 200, 30))
    (feats,) = encoder.encode([image])
    with torch.no_grad():
        grid = encoder.model(pixel_values=pixel_batch([image], 64)).last_hidden_state[0]
    assert grid.shape == (16, 8, 8)  # stem stride 4, one stride-2 stage
    assert torch.allclose(feats["states"], grid.flatten(1).T, atol=1e-6)
    assert torch.allclose(feats["pooled"], feats["states"].mean(0), atol=1e-5)
    assert encoder.fingerprint != ImageEncoder(str(folder), image_size=96).fingerprint


def test_unloadable_models_are_user_errors(tmp_path):
    with pytest.raises(SentilensError, match="cannot load"):
        TextEncoder(str(tmp_path / "no-such-model"))
    with pytest.raises(SentilensError, match="cannot load vision model"):
        ImageEncoder(str(tmp_path / "no-such-model")).dim  # noqa: B018
    with pytest.raises(SentilensError, match="not a local folder"):
        ImageEncoder(str(tmp_path / "no-such-model")).fingerprint  # noqa: B018


def test_encoders_saved_only_as_pickles_are_refused_not_unpickled(tmp_path, monkeypatch):
    """A folder whose weights exist only as pytorch_model.bin is a user error; torch.load is never reached."""
    from safetensors.torch import load_file

    folders = {"text": save_tiny_gpt2(tmp_path / "gpt2"), "image": save_tiny_resnet(tmp_path / "resnet")}
    for folder in folders.values():
        torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called on a pickle")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(SentilensError, match="cannot load text model"):
        TextEncoder(str(folders["text"]))
    with pytest.raises(SentilensError, match="cannot load vision model"):
        ImageEncoder(str(folders["image"])).model  # noqa: B018


def save_tiny_mpnet(folder, tokenizer_source):
    """A 3-layer MPNet (relative position buckets, a layer stack under encoder.layer like BERT's) with the
    embedded MiniLM's WordPiece tokenizer (MPNet's own vocabulary is a WordPiece one of the same kind)."""
    import shutil

    from transformers import MPNetConfig, MPNetModel

    torch.manual_seed(0)
    MPNetModel(MPNetConfig(vocab_size=30527, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                           intermediate_size=64)).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (tokenizer_source / name).is_file():
            shutil.copy(tokenizer_source / name, folder / name)
    return folder


@pytest.mark.parametrize("architecture", ["minilm", "mpnet"])
def test_top_layers_on_cached_lower_states_give_the_whole_encoders_output(architecture, tmp_path):
    from sentilens.fusion.cache import PostFeatures
    from sentilens.fusion.encoders import TopLayers, embedded_text_path
    from sentilens.fusion.model import collate

    name = str(save_tiny_mpnet(tmp_path / "mpnet", embedded_text_path())) if architecture == "mpnet" else None
    encoder = TextEncoder(name) if name else TextEncoder()
    texts = ["great day at the beach", "worst service ever, never again!!", "ok"]
    ids, mask = encoder.pad(encoder.tokenize(texts))
    with torch.no_grad():
        whole = encoder.model(input_ids=ids, attention_mask=mask).last_hidden_state  # the reference: one HF pass
    depth = len(encoder.model.encoder.layer)
    fingerprints = set()
    for count in range(1, depth + 1):
        top = TopLayers(encoder, count)
        fingerprints.add(top.fingerprint)
        lower = top.encode(texts)
        assert [f["states"].shape[0] for f in lower] == mask.sum(dim=1).tolist()  # unpadded, as cached
        batch = collate([PostFeatures(text=f) for f in lower], encoder.dim, 1)
        with torch.no_grad():
            states, pooled = top(batch.text_states, batch.text_mask)
        for i in range(len(texts)):
            real = mask[i].bool()
            assert torch.allclose(states[i, real], whole[i, real], atol=1e-5)
            assert torch.allclose(pooled[i], whole[i, real].mean(0), atol=1e-5)
        trained = {id(p) for p in top.layers.parameters()}
        assert all(p.requires_grad == (id(p) in trained) for p in encoder.model.parameters())
        top_modules = encoder.model.encoder.layer[depth - count:]
        assert len(trained) == sum(1 for layer in top_modules for _ in layer.parameters())
    assert len(fingerprints) == depth and encoder.fingerprint not in fingerprints  # each split caches its own states
    top = TopLayers(encoder, 1)
    top.layers.train()
    top.encode(texts)  # encoding the lower states leaves every module's mode as it found it
    assert all(m.training for m in top.layers.modules()) and not encoder.model.embeddings.training
    with pytest.raises(SentilensError, match=f"has {depth} layers"):
        TopLayers(encoder, depth + 1)


def test_top_layers_refuse_a_causal_lm_in_one_line(gpt2_dir):
    from sentilens.fusion.encoders import TopLayers

    with pytest.raises(SentilensError, match="bidirectional encoder") as err:
        TopLayers(TextEncoder(str(gpt2_dir)), 1)
    assert "\n" not in str(err.value)


def split_zip_of(folder, name, out_dir, parts=3):
    """``folder`` zipped as ``name/...`` (as the released split archive is) and cut into ``parts`` files."""
    import zipfile

    archive = out_dir / f"{name}.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(folder.iterdir()):
            z.write(f, f"{name}/{f.name}")
        z.writestr(f"{name}/README.md", "not needed by from_pretrained")
    data = archive.read_bytes()
    step = -(-len(data) // parts)
    paths = []
    for i in range(parts):
        path = out_dir / f"{name}.zip.{i + 1:03d}"
        path.write_bytes(data[i * step:(i + 1) * step])
        paths.append(path)
    return paths


@pytest.fixture
def split_mpnet(tmp_path, monkeypatch):
    """A tiny MPNet folder packed like all-mpnet-base-v2's five PyPI parts, the cache in tmp_path."""
    from sentilens.fusion import embedded
    from sentilens.fusion.encoders import embedded_text_path

    source = save_tiny_mpnet(tmp_path / "source", embedded_text_path())
    (tmp_path / "parts").mkdir()
    parts = split_zip_of(source, "all-mpnet-base-v2", tmp_path / "parts", parts=5)
    packages = dict(zip(embedded.EMBEDDED_TEXT_ENCODERS["all-mpnet-base-v2"].packages, parts, strict=True))
    monkeypatch.setattr(embedded, "_package_files", lambda package: [packages[package]] if package in packages else [])
    monkeypatch.setenv("SENTILENS_CACHE", str(tmp_path / "cache"))
    return source, parts


def test_a_split_embedded_encoder_is_joined_once_into_the_cache_and_loads_by_name(split_mpnet):
    from sentilens.fusion.embedded import MODEL_FILES, embedded_folder

    source, _ = split_mpnet
    encoder = TextEncoder("sentence-transformers/all-mpnet-base-v2")
    folder = embedded_folder("all-mpnet-base-v2")
    assert encoder.source == str(folder) and sorted(p.name for p in folder.iterdir()) == sorted(MODEL_FILES)
    for name in MODEL_FILES:  # byte for byte the released files
        assert (folder / name).read_bytes() == (source / name).read_bytes()
    reference = TextEncoder(str(source))
    assert torch.equal(encoder.encode(["great day"])[0]["states"], reference.encode(["great day"])[0]["states"])
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert embedded_folder("all-mpnet-base-v2") == folder and (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_a_damaged_or_missing_split_encoder_is_one_line_and_leaves_no_folder(split_mpnet, monkeypatch, tmp_path):
    from sentilens.fusion import embedded

    _, parts = split_mpnet
    data = bytearray(parts[2].read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the weights
    parts[2].write_bytes(bytes(data))
    with pytest.raises(SentilensError, match="do not hold a readable model") as err:
        TextEncoder("all-mpnet-base-v2")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "cache" / "embedded" / "all-mpnet-base-v2").exists()
    monkeypatch.setattr(embedded, "_package_files", lambda package: [])
    with pytest.raises(SentilensError, match=r"pip install 'sentilens\[mpnet\]'"):
        TextEncoder("all-mpnet-base-v2")
