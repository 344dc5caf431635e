"""The FLOP count behind the sweep's FLOP-ideal speedup, against torch's own counter on the real forward pass."""

from __future__ import annotations

import pytest
from torch.utils.flop_counter import FlopCounterMode

from mllm_helpers import small_manifest, tiny_model
from sentilens.data.records import read_split
from sentilens.mllm.config import MllmRunConfig
from sentilens.mllm.flops import prediction_flops
from sentilens.mllm.predictor import MllmPredictor


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    """The tiny LLaVA with eager attention everywhere, so that every attention product is a counted matmul."""
    model, builder = tiny_model(tmp_path_factory.mktemp("tiny") / "ckpt")
    model.vlm.set_attn_implementation("eager")
    config = MllmRunConfig(base_model="tiny", labels=builder.labels, num_image_tokens=builder.num_image_tokens)
    return MllmPredictor(model, builder, config, batch_size=1)


@pytest.fixture(scope="module")
def posts(tmp_path_factory):
    return read_split(small_manifest(tmp_path_factory.mktemp("data"), n_train=2, n_val=0, n_test=5), "test")


@pytest.mark.parametrize("strategy, ratio", [("all", None), ("all", 1.0), ("all", 0.4), ("feature", 0.2),
                                             ("random", 0.2), ("inverse", 0.05)])
def test_count_equals_torch_flop_counter_per_post(predictor, posts, strategy, ratio):
    predictor = predictor.with_options(strategy=strategy)
    for post in posts:  # with an image, a long text, and a text-only post
        with FlopCounterMode(display=False) as counter:
            predictor.predict([post], keep_ratio=ratio)
        counted = predictor.flops_per_post([post], keep_ratio=ratio)
        assert counted["total"] == pytest.approx(counter.get_total_flops(), rel=1e-9), (post.id, counted)


def test_language_model_share_grows_with_its_width(predictor):
    config = predictor.model.vlm.config
    narrow = prediction_flops(config, kept=36, text_tokens=60, answer_tokens=8)
    assert narrow["vision"] > 0 and narrow["scoring"] == 0 and narrow["total"] == pytest.approx(
        sum(v for k, v in narrow.items() if k != "total"))
    wide = config.__class__.from_dict(config.to_dict())
    wide.text_config.hidden_size *= 4
    wide.text_config.intermediate_size *= 4
    share = {name: (f["language"] + f["head"]) / f["total"] for name, f in
             (("narrow", narrow), ("wide", prediction_flops(wide, kept=36, text_tokens=60, answer_tokens=8)))}
    assert share["wide"] > share["narrow"]
    text_only = prediction_flops(config, kept=0, text_tokens=60, answer_tokens=8, scored_layers=3)
    assert text_only["vision"] == text_only["scoring"] == text_only["projector"] == 0
