"""Subject suggestion and modifier pairs (lib_ae/suggest.py), on the rule-based chunker (spaCy is no test dependency).

Targets of issue 13:
* the Attend-and-Excite paper's prompt templates over its word lists. The lists are those of the official evaluation
  prompts (a.e_prompts.txt, linked from the README of yuval-alaluf/Attend-and-Excite at 163efdf; the attachment itself
  is not in the repository, it was read from a copy in Bomingmiao/NoiseDiffusion:a.e_prompts.txt). Its sets are
  "a {animal} and a {animal}" (66), "a {animal} with a {object}" / "a {animal} and a {colour} {object}" (144) and
  "a {colour} {object} and a {colour} {object}" (66). Here every combination of the lists is checked, with both
  articles ("a elephant", as the official file often writes, and "an elephant"), plus the issue's
  "a {animal} with a {colour} {object}".
* the SynGen paper's example prompts (RoyiRa/Linguistic-Binding-in-Diffusion-Models at 50b8eab: README.md, run.py
  default, demo/app.py examples, syngen_notebook.ipynb; the abstract's "a pink sunflower and a yellow flamingo"), with
  the pairs SynGen's own extraction yields for them, and DVMP-style prompts built from dvmp.py's word lists.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace
from typing import Any

import pytest

from lib_ae import suggest as _suggest
from lib_ae.suggest import NounPhrase, phrases_from_dependency_parse
from lib_ae.webui.prompt_syntax import first_step_text


# The suggestion reads plain text; these tests write A1111 prompts, resolved first as the adapter resolves them
# (lib_ae/webui/subjects.py: `first_step_text`, then the suggestion).
def noun_phrases(prompt: str, *, steps: int | None = None, **options: Any) -> list[NounPhrase]:
    return _suggest.noun_phrases(first_step_text(prompt, steps), **options)


def suggest_subjects(prompt: str, *, steps: int | None = None, **options: Any) -> list[str]:
    return _suggest.suggest_subjects(first_step_text(prompt, steps), **options)


def modifier_pairs(prompt: str, *, steps: int | None = None, **options: Any) -> list[tuple[str, str]]:
    return _suggest.modifier_pairs(first_step_text(prompt, steps), **options)


# The official evaluation prompts' word lists (a.e_prompts.txt).
AE_ANIMALS = ["cat", "dog", "bird", "bear", "lion", "horse", "elephant", "monkey", "frog", "turtle", "rabbit", "mouse"]
AE_OBJECTS = [
    "backpack", "glasses", "crown", "suitcase", "chair", "balloon", "bow", "car", "bowl", "bench", "clock", "apple",
]
AE_COLOURS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "gray", "black", "white"]

# A few of the official prompts verbatim, one per set and template.
AE_OFFICIAL_SAMPLES = {
    "an elephant and a rabbit": (["elephant", "rabbit"], []),
    "a dog and a elephant": (["dog", "elephant"], []),
    "a horse with a glasses": (["horse", "glasses"], []),
    "a monkey and a orange apple": (["monkey", "apple"], [("orange", "apple")]),
    "a bear with a bow": (["bear", "bow"], []),
    "a pink crown and a purple bow": (["crown", "bow"], [("pink", "crown"), ("purple", "bow")]),
    "a yellow glasses and a brown bow": (["glasses", "bow"], [("yellow", "glasses"), ("brown", "bow")]),
    "a orange suitcase and a brown bench": (["suitcase", "bench"], [("orange", "suitcase"), ("brown", "bench")]),
}

# SynGen's example prompts and the (modifier, noun) pairs of its parse (compute_loss.extract_attribution_indices).
SYNGEN_EXAMPLES = {
    "a pink sunflower and a yellow flamingo": (
        ["sunflower", "flamingo"], [("pink", "sunflower"), ("yellow", "flamingo")],
    ),
    "A yellow flamingo and a pink sunflower": (
        ["flamingo", "sunflower"], [("yellow", "flamingo"), ("pink", "sunflower")],
    ),
    "a checkered bowl in a cluttered room": (["bowl", "room"], [("checkered", "bowl"), ("cluttered", "room")]),
    "a horned lion and a spotted monkey": (["lion", "monkey"], [("horned", "lion"), ("spotted", "monkey")]),
    "a checkered bowl on a red and blue table": (
        ["bowl", "table"],
        [("checkered", "bowl"), ("red", "table"), ("blue", "table")],
    ),
}

# dvmp.py's lists (DVMP: "{article} {colour?} {modifier...} {item}" phrases joined by " and ").
DVMP_ANIMALS = ["cat", "dog", "bird", "bear", "lion", "horse", "elephant", "monkey", "frog", "turtle", "rabbit",
                "mouse", "panda", "zebra", "gorilla", "penguin"]
DVMP_OBJECTS = ["backpack", "crown", "suitcase", "chair", "balloon", "bow", "car", "bowl", "bench", "clock", "camera",
                "umbrella", "guitar", "shoe", "hat", "surfboard", "skateboard", "bicycle"]
DVMP_FRUIT = ["apple", "tomato", "banana", "strawberry"]
DVMP_COLOURS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "gray", "black", "white",
                "beige", "teal"]
DVMP_ANIMAL_MODIFIERS = ["furry", "baby", "spotted", "sleepy"]
DVMP_OBJECT_MODIFIERS = ["modern", "spotted", "wooden", "metal", "curved", "spiky", "checkered"]
DVMP_FRUIT_MODIFIERS = ["sliced", "skewered"]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _check(prompt: str, subjects: list[str], pairs: list[tuple[str, str]]) -> None:
    assert suggest_subjects(prompt, parser="rules") == subjects, prompt
    assert modifier_pairs(prompt, parser="rules") == pairs, prompt


def test_word_lists_are_the_official_sizes() -> None:
    assert (len(AE_ANIMALS), len(AE_OBJECTS), len(AE_COLOURS)) == (12, 12, 11)
    assert len(set(AE_ANIMALS) | set(AE_OBJECTS) | set(AE_COLOURS)) == 35


@pytest.mark.parametrize("official_article", [True, False])
def test_animal_and_animal(official_article: bool) -> None:
    for first, second in itertools.permutations(AE_ANIMALS, 2):
        a1 = "a" if official_article else _article(first)
        a2 = "a" if official_article else _article(second)
        _check(f"{a1} {first} and {a2} {second}", [first, second], [])


def test_animal_with_object_and_animal_and_coloured_object() -> None:
    for animal, obj in itertools.product(AE_ANIMALS, AE_OBJECTS):
        _check(f"a {animal} with a {obj}", [animal, obj], [])
        for colour in AE_COLOURS:
            _check(f"a {animal} and a {colour} {obj}", [animal, obj], [(colour, obj)])
            prompt = f"{_article(animal)} {animal} with {_article(colour)} {colour} {obj}"
            _check(prompt, [animal, obj], [(colour, obj)])


def test_coloured_object_and_coloured_object() -> None:
    for (c1, o1), (c2, o2) in itertools.permutations(itertools.product(AE_COLOURS, AE_OBJECTS), 2):
        if o1 == o2:
            continue  # the official set never repeats an object; a repeated head is suggested once (tested below)
        _check(f"a {c1} {o1} and a {c2} {o2}", [o1, o2], [(c1, o1), (c2, o2)])


@pytest.mark.parametrize("prompt", sorted(AE_OFFICIAL_SAMPLES))
def test_official_prompt_samples(prompt: str) -> None:
    _check(prompt, *AE_OFFICIAL_SAMPLES[prompt])


@pytest.mark.parametrize("prompt", sorted(SYNGEN_EXAMPLES))
def test_syngen_examples(prompt: str) -> None:
    _check(prompt, *SYNGEN_EXAMPLES[prompt])


def test_dvmp_style_phrases_with_several_modifiers() -> None:
    groups = [
        (DVMP_ANIMALS, DVMP_ANIMAL_MODIFIERS),
        (DVMP_OBJECTS, DVMP_OBJECT_MODIFIERS),
        (DVMP_FRUIT, DVMP_FRUIT_MODIFIERS),
    ]
    checked = 0
    for (items_a, mods_a), (items_b, mods_b) in itertools.product(groups, repeat=2):
        for item_a, item_b in zip(items_a, reversed(items_b)):
            if item_a == item_b:
                continue
            for colour in DVMP_COLOURS:
                for mod_a, mod_b in itertools.product(mods_a, mods_b):
                    phrase_a = [colour, mod_a]
                    phrase_b = [mod_b]
                    prompt = (
                        f"{_article(phrase_a[0])} {' '.join(phrase_a)} {item_a} and "
                        f"{_article(phrase_b[0])} {' '.join(phrase_b)} {item_b}"
                    )
                    pairs = [(m, item_a) for m in phrase_a] + [(m, item_b) for m in phrase_b]
                    _check(prompt, [item_a, item_b], pairs)
                    checked += 1
    assert checked > 1000


# --- A1111 prompt syntax -------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "prompt, subjects, pairs",
    [
        ("a (red:1.3) car and a ((blue)) bench", ["car", "bench"], [("red", "car"), ("blue", "bench")]),
        ("a [red] car and a [[cat]]", ["car", "cat"], [("red", "car")]),
        ("(a cat:1.2) and (a dog)", ["cat", "dog"], []),
        ("a cat BREAK a dog", ["cat", "dog"], []),
        ("a red BREAK car", ["car"], []),  # BREAK starts a new chunk: no phrase spans it
        ("a cat and a dog AND a horse and a frog", ["cat", "dog"], []),
        ("a cat and a dog :1.5 AND a horse", ["cat", "dog"], []),
        ("<lora:myLora_v2:0.8> a cat with a hat <hypernet:h:1>", ["cat", "hat"], []),
        ("a [cat:dog:0.5] on a bench", ["cat", "bench"], []),
        ("a [cat:dog:12] on a bench", ["cat", "bench"], []),
        ("a [cat:dog:0] on a bench", ["dog", "bench"], []),
        ("a cat and a [hat:10]", ["cat"], []),
        ("a cat and a [hat::10]", ["cat", "hat"], []),
        ("a [red|blue] car", ["car"], [("red", "car")]),
        ("a [cat|dog|frog] on a bench", ["cat", "bench"], []),
        ("a cat \\(animal\\) on a bench", ["cat", "animal", "bench"], []),
    ],
)
def test_a1111_syntax(prompt: str, subjects: list[str], pairs: list[tuple[str, str]]) -> None:
    _check(prompt, subjects, pairs)


def test_decimal_edit_against_steps() -> None:
    # A1111: when = int(0.05 * steps); the 'from' side holds at step 1 only when when >= 1.
    assert suggest_subjects("a [cat:dog:0.05]", steps=20, parser="rules") == ["cat"]
    assert suggest_subjects("a [cat:dog:0.05]", steps=10, parser="rules") == ["dog"]
    assert suggest_subjects("a [cat:dog:0.05]", parser="rules") == ["cat"]


def test_first_step_text() -> None:
    assert first_step_text("a (red:1.2) car BREAK [cat|dog] AND horse") == "a  red  car\ncat"
    assert first_step_text("(red)dish") == "red dish"  # A1111 tokenizes each emphasis segment on its own
    assert first_step_text("a [b:c:1] d") == "a  b  d"
    assert first_step_text("unbalanced (cat") == "unbalanced  cat"


def test_embedding_names_are_kept_whole() -> None:
    names = ["my-cat_v2", "style-emb"]
    assert suggest_subjects("a photo of my-cat_v2 and a dog", embeddings=names) == ["my-cat_v2", "dog"]
    assert modifier_pairs("a red my-cat_v2", embeddings=names) == [("red", "my-cat_v2")]
    # Without the names, a name of word characters joined by '-' / '_' is still one word to the chunker.
    assert suggest_subjects("a photo of my-cat_v2 and a dog", parser="rules") == ["my-cat_v2", "dog"]


# --- framing, quantity and style nouns -----------------------------------------------------------------------------

@pytest.mark.parametrize(
    "prompt, subjects",
    [
        ("a photo of a cat and a dog", ["cat", "dog"]),
        ("a painting of a horse", ["horse"]),
        ("an oil painting of a red fox", ["fox"]),
        ("a close-up of a frog", ["frog"]),
        ("a close up of a frog", ["frog"]),
        ("an image of a bear", ["bear"]),
        ("a black and white photo of a lighthouse", ["lighthouse"]),
        ("a portrait of an old man", ["man"]),
        ("a group of penguins on an iceberg", ["penguins", "iceberg"]),
        ("a pair of shoes", ["shoes"]),
        ("a cat looking at a painting", ["cat", "painting"]),
        ("a cat and a dog, highly detailed, 8k, trending on artstation, by greg rutkowski", ["cat", "dog"]),
        ("masterpiece, best quality, a knight, oil painting, dramatic lighting", ["knight"]),
        ("a mouse chased by a cat", ["mouse", "cat"]),
        ("a dog running in a field", ["dog", "field"]),
        ("a cat sits on a mat", ["cat", "mat"]),
        ("a cat's hat", ["cat", "hat"]),
        ("a cat and a cat", ["cat"]),
        ("", []),
        ("   ,, ()[]", []),
    ],
)
def test_framing_and_style(prompt: str, subjects: list[str]) -> None:
    assert suggest_subjects(prompt, parser="rules") == subjects


@pytest.mark.parametrize(
    "prompt, pairs",
    [
        ("a big red car", [("big", "car"), ("red", "car")]),
        ("a big, fluffy dog", [("big", "dog"), ("fluffy", "dog")]),
        ("a running dog", [("running", "dog")]),
        ("a dog running", []),
        ("the car is red", []),
        ("a very tall wooden chair and a small glass vase",
         [("very", "chair"), ("tall", "chair"), ("wooden", "chair"), ("small", "vase"), ("glass", "vase")]),
        ("a teddy bear", [("teddy", "bear")]),
        ("two red cars and three blue cars", [("red", "cars"), ("blue", "cars")]),
        ("a red car and a red car", [("red", "car")]),
    ],
)
def test_modifier_pairs(prompt: str, pairs: list[tuple[str, str]]) -> None:
    assert modifier_pairs(prompt, parser="rules") == pairs


def test_bad_input() -> None:
    with pytest.raises(TypeError):
        _suggest.suggest_subjects(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        suggest_subjects("a cat", parser="nltk")  # type: ignore[arg-type]


# --- the spaCy path's tree walk on a hand-built parse ----------------------------------------------------------------

def _parse(words: list[tuple[str, str, str, int]]) -> list[SimpleNamespace]:
    """(text, pos, dep, head index) -> spaCy-like tokens (`children` in order, as spaCy yields them)."""
    tokens = [SimpleNamespace(text=t, i=i, pos_=p, dep_=d, children=[]) for i, (t, p, d, _) in enumerate(words)]
    for i, (_, _, _, head) in enumerate(words):
        if head != i:
            tokens[head].children.append(tokens[i])
    return tokens


def test_dependency_walk_follows_syngen() -> None:
    # en_core_web_trf's parse of SynGen's run.py default prompt: "blue" is a conj of "red", an amod of "table".
    doc = _parse([
        ("a", "DET", "det", 2), ("checkered", "ADJ", "amod", 2), ("bowl", "NOUN", "ROOT", 2), ("on", "ADP", "prep", 2),
        ("a", "DET", "det", 8), ("red", "ADJ", "amod", 8), ("and", "CCONJ", "cc", 5), ("blue", "ADJ", "conj", 5),
        ("table", "NOUN", "pobj", 3),
    ])
    assert phrases_from_dependency_parse(doc) == [
        NounPhrase("bowl", ("checkered",)), NounPhrase("table", ("red", "blue")),
    ]
    framing = _parse([
        ("a", "DET", "det", 1), ("photo", "NOUN", "ROOT", 1), ("of", "ADP", "prep", 1), ("a", "DET", "det", 4),
        ("cat", "NOUN", "pobj", 2),
    ])
    assert phrases_from_dependency_parse(framing) == [NounPhrase("cat", ())]


def test_spacy_parser_request_without_spacy_is_a_clear_error() -> None:
    from lib_ae import suggest

    if (suggest._spacy_pipeline() is not None):
        pytest.skip("spaCy with an English pipeline is installed here")
    with pytest.raises(RuntimeError, match="spaCy"):
        noun_phrases("a cat", parser="spacy")
    assert suggest_subjects("a cat and a dog") == ["cat", "dog"]  # 'auto' falls back to the rules


def test_spacy_path_with_a_stand_in_pipeline(monkeypatch: pytest.MonkeyPatch) -> None:
    """The spaCy branch end to end, with a stand-in `spacy` module whose pipeline returns a hand-built parse."""
    import sys
    import types

    from lib_ae import suggest

    parses = {
        "a red car and a blue bench": [
            ("a", "DET", "det", 2), ("red", "ADJ", "amod", 2), ("car", "NOUN", "ROOT", 2), ("and", "CCONJ", "cc", 2),
            ("a", "DET", "det", 6), ("blue", "ADJ", "amod", 6), ("bench", "NOUN", "conj", 2),
        ],
    }
    loaded: list[str] = []

    def load(name: str) -> object:
        loaded.append(name)
        if name != "en_core_web_sm":
            raise OSError(f"[E050] Can't find model '{name}'")
        return lambda text: _parse(parses[text])

    monkeypatch.setitem(sys.modules, "spacy", types.SimpleNamespace(load=load))
    suggest._spacy_pipeline.cache_clear()
    try:
        assert (suggest._spacy_pipeline() is not None)
        assert loaded == ["en_core_web_trf", "en_core_web_lg", "en_core_web_md", "en_core_web_sm"]
        assert suggest_subjects("a (red:1.1) car and a blue bench") == ["car", "bench"]
        assert modifier_pairs("a red car and a blue bench", parser="spacy") == [("red", "car"), ("blue", "bench")]
        # Embedding names are not English: the rules handle prompts that carry them.
        assert suggest_subjects("a photo of my-emb", embeddings=["my-emb"]) == ["my-emb"]
    finally:
        suggest._spacy_pipeline.cache_clear()


def test_spacy_without_an_english_pipeline_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    from lib_ae import suggest

    def load(name: str) -> object:
        raise OSError(f"[E050] Can't find model '{name}'")

    monkeypatch.setitem(sys.modules, "spacy", types.SimpleNamespace(load=load))
    suggest._spacy_pipeline.cache_clear()
    try:
        assert not (suggest._spacy_pipeline() is not None)
        assert suggest_subjects("a red car and a blue bench") == ["car", "bench"]
    finally:
        suggest._spacy_pipeline.cache_clear()


@pytest.mark.parametrize(
    "prompt, subjects, pairs",
    [
        ("a red sports car parked in front of a modern house", ["car", "house"],
         [("red", "car"), ("sports", "car"), ("modern", "house")]),
        ("an apple and an orange", ["apple", "orange"], []),
        ("a glass of water and a stone", ["glass", "water", "stone"], []),
        ("a stone bench", ["bench"], [("stone", "bench")]),
        ("a long haired cat", ["cat"], [("long", "cat"), ("haired", "cat")]),
        ("a bird on top of a tree", ["bird", "tree"], []),
        ("photo of a lighthouse on a cliff, dramatic sky, 35mm, f/1.8", ["lighthouse", "cliff", "sky"],
         [("dramatic", "sky")]),
        ("a white cat and a black dog playing in the snow", ["cat", "dog", "snow"],
         [("white", "cat"), ("black", "dog")]),
        ("a man in a blue suit holding an umbrella", ["man", "suit", "umbrella"], [("blue", "suit")]),
    ],
)
def test_everyday_prompts(prompt: str, subjects: list[str], pairs: list[tuple[str, str]]) -> None:
    _check(prompt, subjects, pairs)


def test_dependency_walk_binds_a_relative_clause_as_syngen_does() -> None:
    # spaCy's parse of "a dog that is brown": "is" is a relcl of "dog" and "brown" its acomp; SynGen's
    # extract_attribution_indices_with_verbs walks through the verb and keeps "brown", not "is" or "that".
    doc = _parse([
        ("a", "DET", "det", 1), ("dog", "NOUN", "ROOT", 1), ("that", "PRON", "nsubj", 3), ("is", "AUX", "relcl", 1),
        ("brown", "ADJ", "acomp", 3),
    ])
    assert phrases_from_dependency_parse(doc) == [NounPhrase("dog", ("brown",))]


def test_rules_bind_a_relative_clause_but_not_a_main_clause() -> None:
    assert modifier_pairs("a dog that is brown and a cat", parser="rules") == [("brown", "dog")]
    assert modifier_pairs("a car which is bright red", parser="rules") == [("bright", "car"), ("red", "car")]
    assert modifier_pairs("the car is red", parser="rules") == []
    assert suggest_subjects("a cat and a dog, soft lighting, depth of field, concept art by x", parser="rules") == [
        "cat", "dog"
    ]
