"""Subject and modifier suggestion on prompts as A1111 users write them (issue 20, fix 2): a prompt set of our own,
built from the A&E paper's word lists with the decorations real prompts carry (emphasis weights, quality tags,
artists, LoRA tags, BREAK, lighting and camera phrases, predicative modifiers), each with the subjects and pairs a
user means. The rule-based chunker must get every one right (`score` is printed for the closing note: run this file
with `-s`)."""

from __future__ import annotations

import itertools

import pytest

from lib_ae.suggest import modifier_pairs, suggest_subjects
from lib_ae.webui.prompt_syntax import first_step_text

ANIMALS = ["cat", "dog", "bear", "horse", "rabbit", "turtle"]
OBJECTS = ["car", "bench", "clock", "backpack", "chair", "balloon"]
COLOURS = ["red", "blue", "green", "yellow", "black", "white"]
DECORATIONS = [
    ("{body}, cinematic lighting", ()),
    ("{body}, concept art by greg rutkowski", ()),
    ("masterpiece, best quality, {body}, highly detailed, 8k", ()),
    ("{body}, soft lighting, octane render", ()),
    ("<lora:detail_tweaker:0.8> {body}, studio lighting, 4k", ()),
    ("{body} BREAK golden hour, volumetric lighting", ()),
    ("{body}, depth of field, bokeh, 35mm", ()),
    ("photo of {body}, trending on artstation, sharp focus", ()),
    ("{body}, digital painting by artgerm", ()),
    ("{body}, award winning photo, film grain", ()),
]


def bodies() -> list[tuple[str, list[str], list[tuple[str, str]]]]:
    """(prompt body, subjects, pairs): two subjects, with and without colours, attributive and predicative."""
    found: list[tuple[str, list[str], list[tuple[str, str]]]] = []
    for (a, b), (c, d) in zip(itertools.combinations(ANIMALS[:4], 2), itertools.permutations(COLOURS, 2)):
        found.append((f"a {a} and a {b}", [a, b], []))
        found.append((f"a ({c}:1.2) {a} and a {d} {b}", [a, b], [(c, a), (d, b)]))
        found.append((f"a {a} that is {c} and a {d} {b}", [a, b], [(c, a), (d, b)]))
    for a, o, c in zip(ANIMALS, OBJECTS, COLOURS):
        found.append((f"a {a} with a {c} {o}", [a, o], [(c, o)]))
        found.append((f"a {o} which is {c} next to a {a}", [o, a], [(c, o)]))
    return found


CASES = [
    (template.format(body=body), subjects, pairs)
    for (body, subjects, pairs), (template, _) in zip(bodies(), itertools.cycle(DECORATIONS))
]


def suggestion(prompt: str) -> tuple[list[str], list[tuple[str, str]]]:
    text = first_step_text(prompt, 20)
    return suggest_subjects(text, parser="rules"), modifier_pairs(text, parser="rules")


def score() -> float:
    return sum(suggestion(p) == (s, pairs) for p, s, pairs in CASES) / len(CASES)


def test_the_set_is_larger_than_the_papers_templates() -> None:
    assert len(CASES) >= 30 and len({template for template, _ in DECORATIONS}) == 10


@pytest.mark.parametrize("prompt, subjects, pairs", CASES, ids=[p for p, _, _ in CASES])
def test_decorated_prompts(prompt: str, subjects: list[str], pairs: list[tuple[str, str]]) -> None:
    assert suggestion(prompt) == (subjects, pairs)


def test_score_is_reported() -> None:
    print(f"\nsuggestion score on {len(CASES)} decorated prompts: {score():.3f}")
    assert score() == 1.0
