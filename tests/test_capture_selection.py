"""Pure helpers: the one selection grammar (attnstore.selection) through the capture parsers, the eval
config and the readers' lookups; capture/ layout helpers and tiny dims (no torch needed)."""

from __future__ import annotations

import numpy as np
import pytest

from attnstore.capture import layout, tiny
from attnstore.errors import CaptureError
from attnstore.selection import parse_denoise_steps, parse_layers
from attnstore.schema import TokenLayout


@pytest.mark.parametrize(
    ("spec", "n", "want"),
    [
        ("last:2", 18, (16, 17)),
        ("last:1", 2, (1,)),
        ("all", 2, (0, 1)),
        ("-1,-2", 18, (16, 17)),
        (" 3, 1 ,3", 18, (1, 3)),
        ((17, 0), 18, (0, 17)),
        (-18, 18, (0,)),
    ],
)
def test_parse_layers(spec, n, want):
    assert parse_layers(spec, n) == want


@pytest.mark.parametrize("spec", ["last:0", "last:19", "last:x", "18", "-19", "", "a,b", [], True, "first"])
def test_parse_layers_rejects(spec):
    with pytest.raises(CaptureError) as info:
        parse_layers(spec, 18)
    assert "\n" not in str(info.value)


def test_parse_denoise_steps():
    assert parse_denoise_steps("final", 10) == (9,)
    assert parse_denoise_steps("all", 3) == (0, 1, 2)
    assert parse_denoise_steps([-1, 0], 10) == (0, 9)
    with pytest.raises(CaptureError, match="denoise step 10 is out of range"):
        parse_denoise_steps("10", 10)


def test_camera_slots_follow_present_first_order():
    keys = [f"observation.images.{c}" for c in ("a", "b", "c", "empty_camera_0")]
    got = layout.camera_slots(keys, {keys[1], keys[3]})
    assert got == (("b", "empty_camera_0", "a", "c"), (True, True, False, False))


def test_key_valid_matches_a_hand_built_mask():
    lay = TokenLayout(("image", "image2", "empty_camera_0"), (True, True, False))
    mask = np.zeros((2, 200), bool)
    mask[0, :41] = True
    mask[1, :7] = True
    valid = layout.key_valid(lay, mask)
    assert valid.shape == (2, 1018)
    for b, n in enumerate((41, 7)):
        want = np.r_[np.ones(512), np.zeros(256), np.ones(n), np.zeros(200 - n), np.ones(50)].astype(bool)
        np.testing.assert_array_equal(valid[b], want)
    with pytest.raises(CaptureError):
        layout.key_valid(lay, np.ones((1, 199), bool))


def test_tiny_dims_validation():
    with pytest.raises(CaptureError, match="patch_size"):
        tiny.TinyDims(image_size=225)
    assert tiny.TinyDims.from_dict(tiny.TinyDims(depth=3).to_dict()) == tiny.TinyDims(depth=3)


# ---- one grammar: parser, eval config and readers agree on every input --------------------------------
SAME_SELECTIONS = ["[16,17]", "16,17", [16, 17], (16, 17), " [16, 17] ", "last:2", "-2,-1", "[-2, -1]", "[17,16,17]"]


@pytest.mark.parametrize("spec", SAME_SELECTIONS)
def test_parser_and_config_agree_on_layer_spellings(spec):
    from attnstore.evaluation.config import AttentionConfig, parse_selection

    assert parse_layers(spec, 18) == (16, 17)
    text = spec if isinstance(spec, str) else str(list(spec))  # draccus hands the config a string
    normalised = AttentionConfig(layers=text).layer_selection
    assert normalised == parse_selection(spec, "layers")
    assert parse_layers(normalised, 18) == (16, 17)  # what the recorder receives from the config


@pytest.mark.parametrize(
    ("spec", "n", "want"),
    [("all", 10, tuple(range(10))), ("final", 10, (9,)), ("last:1", 10, (9,)), ("[0,9]", 10, (0, 9)),
     ("0,-1", 10, (0, 9)), (-1, 10, (9,)), ([9, 0], 10, (0, 9))],
)
def test_parser_and_config_agree_on_denoise_steps(spec, n, want):
    from attnstore.evaluation.config import AttentionConfig

    assert parse_denoise_steps(spec, n) == want
    text = spec if isinstance(spec, str) else str(spec if isinstance(spec, int) else list(spec))
    assert parse_denoise_steps(AttentionConfig(denoise_steps=text).denoise_selection, n) == want


@pytest.mark.parametrize("spec", ["final", "-1", "last:1", "[-1]", "17", 17, [17]])
def test_final_and_negatives_work_for_layers_too(spec):
    assert parse_layers(spec, 18) == (17,)


@pytest.mark.parametrize("spec", ["first", "last:0", "last:x", "", "[]", "a,b", "[16,17", "1.5", "16 17", "last:"])
def test_syntax_errors_agree_and_are_one_line(spec):
    from attnstore.errors import EvalConfigError
    from attnstore.evaluation.config import AttentionConfig

    with pytest.raises(CaptureError) as parser_error:
        parse_layers(spec, 18)
    with pytest.raises(EvalConfigError) as config_error:
        AttentionConfig(layers=spec)
    for message in (str(parser_error.value), str(config_error.value)):
        assert "\n" not in message
    # the same reason after each caller's own start ("<what> selection '<spec>'" / "--attention.layers=<spec>")
    assert str(parser_error.value).split(": ", 1)[1] == str(config_error.value).split(": ", 1)[1]
    assert str(config_error.value).startswith(f"--attention.layers={spec}: ")


def test_range_errors_name_the_valid_range():
    from attnstore.errors import EvalConfigError

    with pytest.raises(CaptureError) as info:
        parse_layers("[16,18]", 18)
    assert str(info.value) == "action-expert layer 18 is out of range: this model has 18 (valid 0..17, or -18..-1)"
    with pytest.raises(EvalConfigError) as info:
        parse_layers((0, 5), 2, error=EvalConfigError, label="--attention.layers=[0, 5]")
    assert str(info.value).startswith("--attention.layers=[0, 5]: action-expert layer 5 is out of range")
    assert "(valid 0..1, or -2..-1)" in str(info.value)
    with pytest.raises(CaptureError, match=r"last:N needs N in 1\.\.18"):
        parse_layers("last:19", 18)


def test_episodes_use_the_grammar_where_it_fits():
    from attnstore.errors import EvalConfigError
    from attnstore.evaluation.config import AttentionConfig, parse_attention_args

    for spec in ("[3,0,3]", "3,0", "0, 3", [3, 0]):
        assert AttentionConfig(episodes=spec).episodes == [0, 3]
    assert AttentionConfig(episodes="all").episodes is None
    assert parse_attention_args(["--attention.episodes=3,0"]).episodes == [0, 3]
    for bad, fragment in (("last:2", "use all or episode indices"), ("[-1]", "start at 0"), ("x", "use all")):
        with pytest.raises(EvalConfigError, match=fragment):
            AttentionConfig(episodes=bad)


def test_prefix_takes_the_grammar_after_its_booleans():
    from attnstore.evaluation.config import AttentionConfig
    from attnstore.selection import parse_layers as shared

    assert AttentionConfig(prefix="true").prefix_selection is True
    assert AttentionConfig(prefix="0").prefix_selection is False  # yaml's boolean, as before
    for spec, want in (("[0]", (0,)), ("final", (1,)), ("last:2", (0, 1)), ("-1", (1,)), ("0,1", (0, 1))):
        assert shared(AttentionConfig(prefix=spec).prefix_selection, 2, what="VLM layer") == want


@pytest.mark.parametrize(
    ("wanted", "want"), [(None, 17), (16, 16), ("16", 16), ("[16]", 16), (-1, 17), ("final", 17), ("last:1", 17)]
)
def test_readers_pick_layers_with_the_same_grammar(tmp_path_factory, wanted, want):
    from attnstore.readers.selection import pick_coord

    ds = _small_store(tmp_path_factory)
    assert pick_coord(ds, "layer", wanted, "layer") == want


@pytest.mark.parametrize(
    ("wanted", "fragment"),
    [("3", "layer 3 was not captured; this store holds layers 16-17"),
     ("all", "picks 18 layers; pick one (this store holds layers 16-17)"),
     ("18", "out of range: this model has 18 (valid 0..17, or -18..-1); this store holds layers 16-17"),
     ("first", "this store holds layers 16-17")],
)
def test_readers_layer_errors_list_what_exists(tmp_path_factory, wanted, fragment):
    from attnstore.errors import SelectionError
    from attnstore.readers.selection import pick_coord

    ds = _small_store(tmp_path_factory)
    with pytest.raises(SelectionError) as info:
        pick_coord(ds, "layer", wanted, "layer")
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_readers_pick_denoise_steps_with_the_same_grammar(tmp_path_factory):
    from attnstore.errors import SelectionError
    from attnstore.readers.selection import pick_coord

    ds = _small_store(tmp_path_factory)  # captured denoise steps 0 and 9 of 10
    assert [pick_coord(ds, "denoise", w, "denoise step") for w in ("final", -1, "[0]", None)] == [9, 9, 0, 9]
    with pytest.raises(SelectionError, match="denoise step 4 was not captured; this store holds denoise steps 0, 9"):
        pick_coord(ds, "denoise", "4", "denoise step")


def _small_store(tmp_path_factory):
    import synthetic

    from attnstore.store.open import open_attention

    path = tmp_path_factory.getbasetemp() / "selection_store.zarr"
    if not path.exists():
        spec = synthetic.make_spec(num_language=4, num_action=2, grid=2, num_heads=1, layers=(16, 17),
                                   denoise_steps=(0, 9), images=False, actions=False)
        synthetic.write_synthetic_store(path, spec, episodes={0: 1})
    return open_attention(path)
