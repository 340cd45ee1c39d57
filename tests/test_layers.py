"""`resolve_layer`: the one rule every stage uses to turn a --layer or a stored layer into a block number."""

from __future__ import annotations

import pytest

from saevctl.errors import LayerError
from saevctl.layers import layer_text, model_n_blocks, resolve_layer


def test_non_negative_layers_pass_through() -> None:
    assert resolve_layer(0, 12) == 0
    assert resolve_layer(11, 12) == 11
    assert resolve_layer(5, None) == 5  # nothing to check it against


@pytest.mark.parametrize(("layer", "want"), [(-1, 11), (-12, 0), (-3, 9)])
def test_negative_counts_from_the_end(layer: int, want: int) -> None:
    assert resolve_layer(layer, 12) == want
    assert resolve_layer(layer, 12, available=[want]) == want


def test_none_is_the_last_available_else_the_last_block() -> None:
    assert resolve_layer(None, 12) == 11
    assert resolve_layer(None, 12, available=[6, 10]) == 10
    assert resolve_layer(None, None, available=[3]) == 3
    with pytest.raises(LayerError, match="no layer given and the number of blocks of the SAE's model is unknown"):
        resolve_layer(None, None, what="the SAE's model")
    with pytest.raises(LayerError, match="holds no layers"):
        resolve_layer(None, 12, available=[])


@pytest.mark.parametrize("layer", [12, 40, -13])
def test_out_of_range_names_the_blocks(layer: int) -> None:
    with pytest.raises(LayerError, match=rf"layer {layer} is outside timm:x, which has blocks 0\.\.11") as info:
        resolve_layer(layer, 12, what="timm:x")
    assert "choose layers between 0 and 11" in info.value.hint


@pytest.mark.parametrize(("layer", "shown"), [(9, "9"), (-2, "-2"), (3, "3")])
def test_layer_not_stored_names_the_stored_ones(layer: int, shown: str) -> None:
    with pytest.raises(LayerError, match=rf"the store at s holds layers \[6, 11\], not {shown}") as info:
        resolve_layer(layer, 12, available=[6, 11], what="the store at s")
    assert "pick --layer from [6, 11]" in info.value.hint


def test_negative_layer_with_unknown_block_count_is_refused() -> None:
    with pytest.raises(LayerError, match="layer -1 counts from the end, but the number of blocks of m is unknown"):
        resolve_layer(-1, None, what="m")
    with pytest.raises(LayerError, match="counts from the end") as info:
        resolve_layer(-1, None, available=[0, 2], what="m")
    assert info.value.hint == "pick --layer from [0, 2]"


def test_block_count_and_display() -> None:
    assert model_n_blocks({"n_blocks": 12}) == 12
    assert model_n_blocks({"depth": 4}) == 4
    assert model_n_blocks({}) is None
    assert layer_text(None) == "unknown" and layer_text(-1) == "unknown"  # -1: what older imports stored
    assert layer_text(7) == "7"
