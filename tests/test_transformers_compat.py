"""The transformers internals sentilens relies on, named and checked in one place (pyproject caps
transformers below 6; a new release that moves any of these fails here, not deep in a training run).

Used by ``mllm/``: ``llava.model.language_model`` (run on assembled embeddings), ``llava.model.
multi_modal_projector`` (``linear_1`` sets the dtype), ``llava.model.vision_tower`` (hooked by the token
filter, ``output_hidden_states``), ``llava.lm_head``, the config's ``vision_feature_layer`` /
``vision_feature_select_strategy`` / ``image_token_id``, the LoRA target pattern
``.*language_model\\..*\\.(q_proj|...)``, and the CLIP image processor's module path.
"""

import re
from pathlib import Path

import pytest
import torch
import transformers
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[1]


def test_the_installed_transformers_is_inside_the_declared_range():
    (spec,) = re.findall(r'"(transformers[^"]*)"', (REPO / "pyproject.toml").read_text())
    assert SpecifierSet(spec.removeprefix("transformers")).contains(transformers.__version__)
    assert "<" in spec, "transformers needs an upper bound: the internals below are not a public API"


def test_the_clip_image_processor_lives_where_build_tiny_imports_it():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    assert CLIPImageProcessorPil(size={"shortest_edge": 32}).size["shortest_edge"] == 32


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    from sentilens.mllm.families.llava.tiny import build_tiny

    folder = build_tiny(tmp_path_factory.mktemp("tiny"), corpus=["a post"])
    return transformers.LlavaForConditionalGeneration.from_pretrained(folder).eval()


def test_the_llava_modules_and_config_fields_sentilens_uses_exist(llava):
    from sentilens.mllm.model import LM_PROJECTIONS

    model = llava.model
    assert isinstance(model.language_model, torch.nn.Module) and isinstance(llava.lm_head, torch.nn.Linear)
    assert isinstance(model.multi_modal_projector.linear_1, torch.nn.Linear)
    assert isinstance(llava.config.vision_feature_layer, int | list)
    assert llava.config.vision_feature_select_strategy in ("default", "full")
    assert isinstance(llava.config.image_token_id, int)
    pattern = re.compile(rf".*language_model\..*\.({'|'.join(LM_PROJECTIONS)})")
    targets = [name for name, _ in llava.named_modules() if pattern.fullmatch(name)]
    assert targets and all("vision_tower" not in name for name in targets)


def test_the_language_model_runs_on_embeddings_as_the_full_model_does(llava):
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        hidden = llava.model.language_model(inputs_embeds=llava.get_input_embeddings()(ids),
                                            attention_mask=torch.ones_like(ids),
                                            position_ids=torch.arange(4)[None]).last_hidden_state
        logits = llava(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(llava.lm_head(hidden), logits, atol=1e-5, rtol=1e-5)
    pixels = torch.zeros(1, 3, llava.config.vision_config.image_size, llava.config.vision_config.image_size)
    with torch.no_grad():
        states = llava.model.vision_tower(pixels, output_hidden_states=True).hidden_states
    assert len(states) == llava.config.vision_config.num_hidden_layers + 1
