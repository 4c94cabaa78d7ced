"""`model.language_model_layers`: a LLaVA cut to its language model's first N decoder layers (a cheap proxy).

Reference: the full build's hidden state after layer N, under the LM's final norm and head, is what the cut
model computes; kept weights are the full build's, bit for bit; bad values are refused naming them.
"""

from __future__ import annotations

import pytest
import torch

from lightning_tive.model import LlavaModule, TinyLlavaConfig

TINY = TinyLlavaConfig(num_hidden_layers=3)


def built(layers: int | None = None) -> LlavaModule:
    """The tiny model, fully trainable, cut to `layers` decoder layers (None: all three)."""
    return LlavaModule(tiny=TINY, finetune="full", language_model_layers=layers)


def test_the_cut_model_computes_the_full_models_hidden_state_after_its_last_kept_layer():
    full, cut = built(), built(2)
    ids = torch.randint(5, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = full.model.model(input_ids=ids, output_hidden_states=True).hidden_states[2]
        expected = full.model.lm_head(full.model.model.language_model.norm(hidden))
        logits = cut.model(input_ids=ids).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert len(cut.model.model.language_model.layers) == 2
    assert cut.model.config.text_config.num_hidden_layers == 2


def test_kept_weights_are_the_full_builds_and_nothing_else_remains():
    full, cut = built().model.state_dict(), built(1).model.state_dict()
    assert set(cut) < set(full)
    assert not [k for k in cut if "language_model.layers." in k and "language_model.layers.0." not in k]
    assert all(torch.equal(cut[k], full[k]) for k in cut)


def test_a_rebuild_from_the_saved_hyper_parameters_is_cut_the_same_way():
    cut = built(1)
    again = LlavaModule(**dict(cut.hparams))
    assert len(again.model.model.language_model.layers) == 1
    state, rebuilt = cut.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(state[k], rebuilt[k]) for k in state)


def test_the_skeleton_of_a_cut_model_has_its_names_and_shapes():
    """A later process builds the skeleton and receives process 0's weights by name: both must be cut alike."""
    from lightning_tive.model.build import LlavaBuilder, LlavaSource

    builder = LlavaBuilder(LlavaSource(tiny=TINY, language_model_layers=2))
    processor = builder.processor()
    real, skeleton = builder.model(processor, quantize_4bit=False), builder.skeleton(processor)
    assert {k: v.shape for k, v in skeleton.state_dict().items()} == {k: v.shape for k, v in real.state_dict().items()}
    assert skeleton.config.text_config.num_hidden_layers == 2


def test_more_layers_than_the_model_has_is_refused_naming_both():
    with pytest.raises(ValueError, match=r"language_model_layers=5 exceeds the language model's 3 decoder layers"):
        built(5)


@pytest.mark.parametrize("value", [0, -1, True, 1.5])
def test_a_non_positive_or_non_integer_count_is_refused(value):
    with pytest.raises(ValueError, match=rf"language_model_layers must be a positive integer, got {value!r}"):
        built(value)
