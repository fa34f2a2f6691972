import pytest

from workbench.world.grammar import (
    COLORS, DIRECTIONS, SHAPES, PromptError, Scene, all_scenes, heldout_scenes, parse_prompt, training_scenes,
)


def test_grammar_size_meets_the_spec():
    assert len(COLORS) >= 6 and len(SHAPES) >= 4 and len(DIRECTIONS) >= 4
    assert len(all_scenes()) == len(set(all_scenes())) == 192


def test_prompt_round_trip_for_every_scene():
    for s in all_scenes():
        assert parse_prompt(s.prompt) == s


@pytest.mark.parametrize("text,expected", [
    ("a red circle moving left", Scene("red", "circle", "left", "slow")),
    ("A FAST Blue square moving UP", Scene("blue", "square", "up", "fast")),
    ("green triangles going down quickly", Scene("green", "triangle", "down", "fast")),
])
def test_free_wording(text, expected):
    assert parse_prompt(text) == expected


@pytest.mark.parametrize("text,needle", [
    ("a purple circle moving left", "purple"),
    ("a red circle", "no direction"),
    ("a red blue circle moving left", "more than one color"),
    ("", "empty prompt"),
])
def test_bad_prompts_name_the_problem_and_list_the_vocabulary(text, needle):
    with pytest.raises(PromptError) as e:
        parse_prompt(text)
    assert needle in str(e.value)
    assert "red" in str(e.value) or "exactly one" in str(e.value) or "e.g." in str(e.value)


def test_heldout_is_disjoint_from_training_and_covers_every_word():
    held, train = set(heldout_scenes()), set(training_scenes())
    assert len(held) == 16 and not (held & train) and len(held | train) == 192
    for attr, words in (("color", COLORS), ("shape", SHAPES), ("direction", DIRECTIONS)):
        assert {getattr(s, attr) for s in held} == set(words)
