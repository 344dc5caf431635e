"""The predictor protocol: what each family says it can do, how it describes itself, configured copies
(tests/test_architecture.py checks that no caller outside a family package asks which family a run is)."""

import pytest
from typer.testing import CliRunner

from mllm_helpers import small_manifest, train_tiny_mllm
from sentilens.cli import app
from sentilens.data.records import Post, read_split
from sentilens.errors import SentilensError
from sentilens.fusion.config import FusionConfig
from sentilens.mllm.pruning import strategy_names
from sentilens.predict import Predictor, describe_run, load_predictor
from serve_helpers import train_tiny_fusion

pytestmark = pytest.mark.slow  # trains real models: left out of `make test-fast`, run by `make test`


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return small_manifest(tmp_path_factory.mktemp("data"), n_train=8, n_val=4, n_test=8)


@pytest.fixture(scope="module")
def mllm_run(data, tmp_path_factory):
    return train_tiny_mllm(data, tmp_path_factory.mktemp("runs") / "tiny-mllm")


@pytest.fixture(scope="module")
def fusion_run(tmp_path_factory):
    return train_tiny_fusion(tmp_path_factory.mktemp("fusion"))


def test_the_fusion_predictor_says_it_filters_no_tokens_and_refuses_those_options(fusion_run, data):
    predictor = load_predictor(fusion_run, device="cpu")
    assert isinstance(predictor, Predictor)
    can = predictor.capabilities
    assert (can.supports_keep_ratio, can.supports_explain, can.decodings, can.strategies) == (False, False,
                                                                                              ("score",), ())
    assert predictor.with_options() is predictor and predictor.with_options(decode="score") is predictor
    for options in ({"decode": "generate"}, {"strategy": "feature"}):
        with pytest.raises(SentilensError, match="not supported by this fusion run"):
            predictor.with_options(**options)
    post = read_split(data, "test")[0]
    with pytest.raises(SentilensError, match="keep-ratio"):
        predictor.predict([post], keep_ratio=0.5)
    with pytest.raises(SentilensError, match="explain"):
        predictor.explain(post, 0.5)
    described = predictor.describe()
    config = FusionConfig.model_validate_json((fusion_run / "config.json").read_text())
    assert described["family"] == "fusion" and described["labels"] == config.labels == predictor.labels
    assert described["base_model"] == f"{config.text_encoder} + {config.image_encoder}"
    assert described["description"].startswith("fusion full (")
    assert described["config"]["variant"] == "full" and "labels" not in described["config"]  # scalars only
    assert describe_run(fusion_run) == described


def test_the_mllm_predictor_filters_explains_and_returns_configured_copies(mllm_run, data):
    predictor = load_predictor(mllm_run, device="cpu")
    assert isinstance(predictor, Predictor)
    can = predictor.capabilities
    assert (can.supports_keep_ratio, can.supports_explain) == (True, True)
    assert can.strategies == strategy_names("llava") and "feature" in can.strategies
    assert set(can.decodings) == {"score", "generate"}
    generating = predictor.with_options(decode="generate", strategy="feature+merge")
    assert generating is not predictor and generating.model is predictor.model  # one loaded model, two configurations
    assert (generating.decode, generating.strategy) == ("generate", "feature+merge")
    assert (predictor.decode, predictor.strategy) == ("score", "all")  # the original is unchanged
    with pytest.raises(SentilensError, match="--decode must be one of score, generate"):
        predictor.with_options(decode="beam")
    with pytest.raises(SentilensError):
        predictor.with_options(strategy="nonsense")
    post = next(p for p in read_split(data, "test") if p.image)
    found = predictor.explain(post, 0.25)
    assert int(found.kept.sum()) == 9 and found.kept.shape == found.scores.shape == (6, 6)  # ceil(0.25 * 36)
    assert found.prediction.kept_tokens == 9 and found.strategy == "all"
    with pytest.raises(SentilensError, match="needs an image"):
        predictor.explain(Post("t", "text only", None), 0.5)
    described = predictor.describe()
    assert described["family"] == "mllm" and described["labels"] == predictor.labels
    assert described["base_model"] == "base-model" and described["config"]["num_image_tokens"] == 36
    assert described["description"] == "LLaVA-1.5 (tiny, full fine-tuning)"
    assert describe_run(mllm_run) == described


def test_cli_options_a_fusion_run_lacks_are_one_line_errors(fusion_run, data, tmp_path):
    for args in (["eval", "--run", str(fusion_run), "--data", str(data), "--decode", "generate"],
                 ["explain", "--run", str(fusion_run), "--image", str(read_split(data, "test")[0].image),
                  "--out", str(tmp_path / "heat.png")]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code != 0 and isinstance(result.exception, SentilensError), result.output
        assert "\n" not in str(result.exception)
