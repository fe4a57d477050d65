"""Subject suggestion: the head nouns of a prompt's noun phrases, and the modifiers bound to them.

    suggest_subjects("a photo of a red car and a blue bench")  -> ["car", "bench"]
    modifier_pairs("a big red car and a blue bench")  -> [("big", "car"), ("red", "car"), ("blue", "bench")]

What is read: plain text, in which `SEGMENT_BREAK` separates segments no phrase spans (BREAK). A host turns its
prompt syntax into it first (A1111's: `lib_ae.webui.prompt_syntax.first_step_text`, the text conditioned on at the
first step); textual-inversion embedding names, passed as `embeddings`, are kept whole, each one a noun.

Framing nouns that only say what kind of picture it is ("a photo of", "an oil painting of", "a close-up of",
"an image of" ...) are left out, as are quantity and place nouns before "of" ("a group of", "a pair of",
"in front of") and common quality / style tags ("masterpiece", "8k", "35mm", "trending on artstation", "by <artist>"
without an article).

Two parsers, same output format:
* spaCy, when `spacy` and an English pipeline are importable (as SynGen does; `en_core_web_trf` first). Pairs follow
  SynGen's `extract_attribution_indices` (compute_loss.py `extract_attribution_indices`): a noun's children with a
  modifier dependency (amod, nmod, compound, npadvmod, advmod, acomp) and, below them, further modifiers and conjuncts.
* otherwise a built-in rule-based chunker (this module): function words (determiners, numerals, prepositions,
  conjunctions, pronouns, auxiliaries, a compact verb list) and punctuation close a phrase; a phrase's last word is its
  head and the words before it are its modifiers ("big red car" -> head car, modifiers big, red); adjectives joined by
  "and", "or" or a comma stay in one phrase ("a red and blue table"); a participle after a noun starts a
  verb phrase ("a dog running", "a car parked"), before one it is a modifier ("a running dog"); a colour or material
  word alone after an article is a noun ("an orange"); a relative clause's adjectives modify its noun ("a dog that
  is brown"), but a main clause's do not ("the car is red" binds nothing). Photography and rendering phrases ("depth of
  field", "golden hour", "soft lighting", "concept art by ...") name nothing in the picture and are left out.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

logger = logging.getLogger(__name__)

Parser = Literal["auto", "rules", "spacy"]


@dataclass(frozen=True)
class NounPhrase:
    """One noun phrase: its head noun and the words that modify it, as written in the prompt."""

    head: str
    modifiers: tuple[str, ...]


SEGMENT_BREAK = "\n"
"""Separates the segments of a suggestion's text (where A1111's BREAK was): no phrase spans it."""


# --- word classes of the rule-based chunker ------------------------------------------------------------------------

def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


DETERMINERS = _words(
    "a an the this that these those my your his her its our their some any each every no another several many few "
    "much more most all both either neither such what whatever"
)
NUMERALS = _words(
    "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen "
    "eighteen nineteen twenty thirty forty fifty hundred thousand dozen dozens single double triple first second "
    "third"
)
PREPOSITIONS = _words(
    "of in on at with by from to into onto under over above below beside besides behind near next through across "
    "inside outside around between among amongst against along toward towards without within for like upon beneath "
    "underneath amid amidst via during before after beyond past off out up down atop throughout versus vs"
)
CONJUNCTIONS = _words("and or but nor plus & yet so")
FUNCTION_WORDS = _words(
    "is are was were be been being am has have had do does did will would can could should may might must "
    "it they he she them him we us i you me there here while where when as than not too also then "
    "which who whom whose that's it's there's how why if"
)
VERBS = _words(
    "sit sits sat stand stands stood hold holds held wear wears wore eat eats ate drink drinks drank ride rides rode "
    "play plays played read reads lie lies lay lays jump jumps jumped look looks looked watch watches watched sleep "
    "sleeps slept carry carries carried chase chases chased climb climbs climbed sing sings sang fight fights fought "
    "hug hugs hugged kiss kisses kissed sail sails sailed drive drives drove rest rests rested perch perches perched "
    "float floats floated hang hangs hung cook cooks cooked throw throws threw catch catches caught kick kicks kicked "
    "smile smiles smiled laugh laughs laughed cry cries cried stare stares stared gaze gazes gazed lean leans leaned "
    "kneel kneels knelt crawl crawls crawled graze grazes grazed hunt hunts hunted run runs ran walk walks walked "
    "fly flies flew swim swims swam dance dances danced make makes made take takes took give gives gave eating "
    "sitting standing holding wearing riding playing reading lying jumping looking watching sleeping carrying "
    "chasing climbing singing fighting hugging kissing sailing driving resting perching floating hanging cooking "
    "throwing catching kicking smiling laughing crying staring gazing leaning kneeling crawling grazing hunting "
    "running walking flying swimming dancing making taking giving trending featuring"
)
ADVERBS = _words(
    "very highly extremely really incredibly slightly super ultra intricately beautifully brightly softly "
    "partially fully completely mostly almost quite rather somewhat"
)
COLOURS = _words(
    "red orange yellow green blue purple pink brown gray grey black white beige teal cyan magenta violet indigo "
    "turquoise gold golden silver bronze crimson scarlet maroon navy olive lime lavender ivory tan amber emerald "
    "dark light pale bright colorful colourful multicolored multicoloured transparent translucent neon pastel "
    "vibrant rainbow"
)
MATERIALS = _words(
    "wooden wood metal metallic steel iron glass plastic stone marble leather paper silk wool woolen woollen cotton "
    "denim velvet ceramic porcelain crystal concrete brick rubber furry fluffy fuzzy hairy feathered"
)
SIZES = _words(
    "big small large tiny huge giant little tall short long wide narrow thick thin massive miniature enormous "
    "gigantic mini"
)
SHAPES_PATTERNS = _words(
    "round square circular triangular rectangular oval flat curved spiky pointy sharp straight curly checkered "
    "striped spotted dotted plaid floral patterned horned winged"
)
QUALITIES = _words(
    "old new young ancient modern vintage antique retro futuristic broken rusty shiny dirty clean wet dry hot cold "
    "warm empty full open closed sleepy happy sad angry cute beautiful pretty ugly scary fat skinny hungry sliced "
    "skewered realistic detailed intricate cinematic dramatic epic solo elegant majestic fancy cozy"
)
ADJECTIVES = COLOURS | MATERIALS | SIZES | SHAPES_PATTERNS | QUALITIES
ALSO_NOUNS = _words(
    "orange gold silver bronze emerald amber ivory lime olive lavender turquoise rainbow glass stone brick crystal "
    "marble metal wood paper plastic rubber leather concrete iron steel silk cotton wool velvet denim porcelain giant "
    "baby"
)
"""Modifier words that are also things: alone after an article they are the noun ("an apple and an orange")."""
_ADJECTIVE_SUFFIXES = ("ful", "ous", "less", "ish")
NOUNS_LOOKING_LIKE_ADJECTIVES = _words(
    "fish goldfish starfish jellyfish catfish swordfish radish polish bed shed sled seed weed steed reed "
    "speed feed hundred vegetable timetable turntable constable infrared watershed"
)
NOUNS_ENDING_IN_ING = _words(
    "painting building ring king wing string ceiling clothing drawing swing sling pudding wedding earring icing "
    "lightning morning evening spring thing something nothing everything anything viking duckling dumpling "
    "sapling seedling gosling railing stocking ping sibling darling pudding bedding frosting filling landing "
    "earrings rings wings kings paintings buildings drawings swings things"
)
FRAMING_NOUNS = _words(
    "photo photograph photography picture image painting drawing portrait illustration render rendering sketch "
    "shot snapshot still view close-up closeup watercolor watercolour artwork art poster cartoon scene depiction "
    "screenshot selfie photoshoot print engraving etching lithograph mural fresco collage diagram graphic icon "
    "logo sticker wallpaper frame cinematic macro"
)
RELATION_NOUNS = _words("front top middle side edge center centre back bottom corner left right rest end surface")
"""Nouns that only say where, before "of": "in front of a house", "on top of a hill"."""
QUANTITY_NOUNS = _words(
    "group pair couple bunch herd flock pack swarm school lot lots number set collection crowd team dozen handful "
    "kind type sort variety piece pile stack row array series cluster family"
)
STYLE_NOUNS = _words(
    "masterpiece quality detail details resolution style background lighting light focus bokeh composition "
    "artstation deviantart pixiv cgsociety behance unreal engine octane render rendering photorealism "
    "hyperrealism realism wallpaper trending aesthetic aesthetics 4k 8k 16k hd uhd hdr dof"
)
_RESOLUTION_TAG = re.compile(r"^\d+(?:k|p|px|mm|fps|x\d+)?$", re.IGNORECASE)

_TOKEN = re.compile(r"[A-Za-z0-9]+(?:['’\-_][A-Za-z0-9]+)*|[^\sA-Za-z0-9]")
_CLOSE_UP = re.compile(r"\bclose[\s-]+up\b", re.IGNORECASE)
_STYLE_PHRASES = re.compile(
    r"\b(?:depth of field|golden hour|blue hour|award[\s-]+winning|film grain|ray[\s-]+tracing|wide[\s-]+angle|"
    r"colou?r grading)\b",
    re.IGNORECASE,
)
"""Photography and rendering phrases that name no thing in the picture; each becomes a tag boundary."""


def _is_adjective(word: str) -> bool:
    lower = word.lower()
    if lower in ADJECTIVES or lower in ADVERBS:
        return True
    if lower in NOUNS_LOOKING_LIKE_ADJECTIVES or lower.endswith(("fish", "bed", "shed", "sled")):
        return False
    if len(lower) > 4 and lower.endswith("ed") and not lower.endswith("eed"):
        return True
    return len(lower) > 5 and lower.endswith(_ADJECTIVE_SUFFIXES)


def _is_lexicon_adjective(word: str) -> bool:
    lower = word.lower()
    return lower in ADJECTIVES or lower in ADVERBS


def _is_participle(word: str) -> bool:
    lower = word.lower()
    return len(lower) > 4 and lower.endswith("ing") and lower not in NOUNS_ENDING_IN_ING and lower not in STYLE_NOUNS


def _is_boundary_word(lower: str) -> bool:
    return lower in DETERMINERS or lower in NUMERALS or lower in PREPOSITIONS or lower in FUNCTION_WORDS


# --- the rule-based chunker -----------------------------------------------------------------------------------------

@dataclass
class _PhraseSpan:
    words: list[str]
    determined: bool  # an article / determiner / numeral stood right before it
    tag_start: bool  # it starts a comma-separated tag (segment start or right after a comma)
    next_word: str = ""  # the word right after it ("of" marks framing and quantity nouns)
    tag_end: bool = False
    after_by: bool = False
    last: int = -1  # index of its last token in the segment's tokens


def _tokens(segment: str, embeddings: Sequence[str]) -> list[str]:
    """Words and punctuation of one segment; embedding names (longest first) are kept whole."""
    if not embeddings:
        return _TOKEN.findall(segment)
    pattern = "|".join(re.escape(name) for name in sorted(embeddings, key=len, reverse=True))
    tokens: list[str] = []
    position = 0
    for match in re.finditer(rf"(?<!\S)(?:{pattern})(?!\S)", segment):
        tokens.extend(_TOKEN.findall(segment[position : match.start()]))
        tokens.append(match.group(0))
        position = match.end()
    tokens.extend(_TOKEN.findall(segment[position:]))
    return tokens


def _phrase_spans(tokens: list[str], embeddings: Collection[str]) -> list[_PhraseSpan]:
    chunks: list[_PhraseSpan] = []
    run: list[str] = []
    last = -1
    determined = False
    after_by = False
    pending_start = True  # the next run starts a tag

    def flush(next_word: str, tag_end: bool) -> None:
        nonlocal run, determined, pending_start
        if run:
            chunks.append(_PhraseSpan(run, determined, pending_start, next_word.lower(), tag_end, after_by, last))
        run = []
        determined = False
        pending_start = False

    for index, token in enumerate(tokens):
        lower = token.lower()
        following = tokens[index + 1] if index + 1 < len(tokens) else ""
        if token in embeddings:
            run.append(token)
            last = index
            continue
        if not (token[0].isalnum()):
            if token in ",;" and run and all(_is_adjective(w) for w in run) and _starts_content(following):
                continue  # "a big, fluffy dog": coordinated modifiers
            flush(following, tag_end=token in ",;.!?")
            pending_start = token in ",;.!?"
            after_by = False if token in ",;.!?" else after_by
            continue
        if lower.endswith(("'s", "’s")):
            run.append(token[:-2])
            last = index
            flush(following, tag_end=False)
            determined = True  # "a cat's hat": the possessor acts as the determiner of what follows
            continue
        if lower in CONJUNCTIONS:
            if run and all(_is_adjective(w) for w in run) and _starts_content(following):
                continue  # "a red and blue table"
            flush(following, tag_end=False)
            continue
        if _is_boundary_word(lower):
            flush(token, tag_end=False)
            if lower == "by":
                after_by = True
            elif lower in DETERMINERS or lower in NUMERALS:
                determined = True
            continue
        if lower in VERBS and run and not _is_adjective(run[-1]):
            flush(token, tag_end=False)  # "a cat sits", "a dog running"; but "a red bow" keeps "bow"
            continue
        if _is_participle(token) and run and not all(_is_adjective(w) for w in run):
            flush(token, tag_end=False)  # "a dog running"; "a running dog" keeps "running" as a modifier
            continue
        if run and not _is_adjective(run[-1]) and _is_adjective(token) and not _is_lexicon_adjective(token):
            flush(token, tag_end=False)  # "a car parked ...": a participle after a noun; "a long haired cat" stays
            continue
        if lower in VERBS and not run and not determined and lower.endswith("ing"):
            continue  # "..., sitting on a bench": a verb phrase without its subject
        run.append(token)
        last = index
    flush("", tag_end=True)
    return chunks


RELATIVE_PRONOUNS = _words("that which who")
COPULAS = _words("is are was were")


def _predicative_modifiers(tokens: list[str]) -> dict[int, list[str]]:
    """Token index of a noun -> the modifiers a relative clause gives it ("a dog that is brown", "a car which is
    bright red"): the adjectives right after "that/which/who is/are"."""
    found: dict[int, list[str]] = {}
    for index in range(1, len(tokens) - 2):
        if tokens[index].lower() not in RELATIVE_PRONOUNS or tokens[index + 1].lower() not in COPULAS:
            continue
        if not tokens[index - 1][0].isalnum():
            continue
        adjectives: list[str] = []
        for word in tokens[index + 2 :]:
            if not word[0].isalnum() or not _is_adjective(word):
                break
            adjectives.append(word)
        if adjectives:
            found[index - 1] = adjectives
    return found


def _starts_content(token: str) -> bool:
    lower = token.lower()
    return bool(token) and token[0].isalnum() and not _is_boundary_word(lower) and lower not in CONJUNCTIONS


def _phrases_by_rules(text: str, embeddings: Sequence[str]) -> list[NounPhrase]:
    names = frozenset(embeddings)
    phrases: list[NounPhrase] = []
    for segment in text.split(SEGMENT_BREAK):
        segment = _STYLE_PHRASES.sub(",", _CLOSE_UP.sub("close-up", segment))
        tokens = _tokens(segment, embeddings)
        predicative = _predicative_modifiers(tokens)
        for chunk in _phrase_spans(tokens, names):
            phrase = _phrase_of_span(chunk, names)
            if phrase is not None:
                extra = tuple(w for w in predicative.get(chunk.last, ()) if w not in phrase.modifiers)
                phrases.append(NounPhrase(phrase.head, phrase.modifiers + extra))
    return phrases


def _phrase_of_span(chunk: _PhraseSpan, embeddings: Collection[str]) -> NounPhrase | None:
    words = [w for w in chunk.words if not _RESOLUTION_TAG.match(w)]
    if not words:
        return None
    head = words[-1]
    lower = head.lower()
    if head not in embeddings:
        # "an orange", "a glass": a colour or material word alone after an article is the thing itself.
        as_noun = len(words) == 1 and chunk.determined and lower in ALSO_NOUNS
        if (_is_adjective(head) and not as_noun) or lower in VERBS or lower in STYLE_NOUNS or len(head) < 2:
            return None  # a tag like "highly detailed", "8k", or a predicate adjective ("the car is red")
        if chunk.next_word == "of" and (lower in FRAMING_NOUNS or lower in QUANTITY_NOUNS or lower in RELATION_NOUNS):
            return None  # "a photo of", "a group of", "in front of"
        if lower in FRAMING_NOUNS and chunk.tag_start and not chunk.determined and (
            chunk.tag_end or chunk.next_word == "by"
        ):
            return None  # a standalone style tag: ", oil painting,", ", concept art by ..."
        if chunk.after_by and not chunk.determined:
            return None  # "by greg rutkowski": an artist, not a thing in the picture
    modifiers = tuple(w for w in words[:-1] if w.lower() not in STYLE_NOUNS)
    return NounPhrase(head, modifiers)


# --- the spaCy path -------------------------------------------------------------------------------------------------

SPACY_MODELS = ("en_core_web_trf", "en_core_web_lg", "en_core_web_md", "en_core_web_sm")
MODIFIER_DEPENDENCIES = frozenset({"amod", "nmod", "compound", "npadvmod", "advmod", "acomp"})
"""SynGen's modifier dependencies (compute_loss.py `extract_attribution_indices`)."""
TRAVERSED_DEPENDENCIES = MODIFIER_DEPENDENCIES | {"relcl"}
"""With a relative clause's verb walked through but not kept, as SynGen's `extract_attribution_indices_with_verbs`
binds "a dog that is red"."""


@lru_cache(maxsize=1)
def _spacy_pipeline() -> Any | None:
    try:
        import spacy  # type: ignore[import-not-found]
    except Exception:  # noqa: BLE001 - any import problem means "not available"
        return None
    for name in SPACY_MODELS:
        try:
            return spacy.load(name)
        except Exception:  # noqa: BLE001 - model not installed (OSError) or broken
            continue
    logger.info(
        "spaCy is installed but no English pipeline (%s); using the rule-based chunker", ", ".join(SPACY_MODELS)
    )
    return None


def phrases_from_dependency_parse(tokens: Iterable[Any]) -> list[NounPhrase]:
    """Noun phrases from a dependency parse: tokens with spaCy's attributes `text`, `i`, `pos_`, `dep_`, `children`,
    `head`. Heads: NOUN/PROPN that are not themselves modifiers; modifiers: SynGen's subtree walk
    (compute_loss.py `extract_attribution_indices_with_verbs`: relative clauses too, their verbs left out), in prompt
    order. Framing and quantity nouns with an "of" child are
    left out."""
    phrases: list[NounPhrase] = []
    for word in tokens:
        if word.pos_ not in ("NOUN", "PROPN") or word.dep_ in MODIFIER_DEPENDENCIES:
            continue
        lower = word.text.lower()
        has_of = any(child.dep_ == "prep" and child.text.lower() == "of" for child in word.children)
        if has_of and (lower in FRAMING_NOUNS or lower in QUANTITY_NOUNS):
            continue
        if lower in STYLE_NOUNS:
            continue
        found = []
        stack = []
        for child in word.children:
            if child.dep_ in TRAVERSED_DEPENDENCIES:
                if child.pos_ not in ("AUX", "VERB"):
                    found.append(child)
                stack.extend(child.children)
        while stack:
            node = stack.pop()
            if node.dep_ in TRAVERSED_DEPENDENCIES or node.dep_ == "conj":
                if node.pos_ not in ("AUX", "VERB"):  # "a dog that is red": not "is", but what it says of the dog
                    found.append(node)
                stack.extend(node.children)
        found.sort(key=lambda token: token.i)
        phrases.append(NounPhrase(word.text, tuple(token.text for token in found)))
    return phrases


# --- public API -----------------------------------------------------------------------------------------------------

def noun_phrases(text: str, *, embeddings: Sequence[str] = (), parser: Parser = "auto") -> list[NounPhrase]:
    """The noun phrases of plain `text` in prompt order (framing, quantity and style nouns left out)."""
    if not isinstance(text, str):
        raise TypeError(f"prompt must be a string, got {type(text).__name__}")
    if parser not in ("auto", "rules", "spacy"):
        raise ValueError(f"parser must be 'auto', 'rules' or 'spacy', got {parser!r}")
    nlp = _spacy_pipeline() if parser in ("auto", "spacy") else None
    if parser == "spacy" and nlp is None:
        raise RuntimeError(
            "parser='spacy' needs spaCy and an English pipeline (python -m spacy download en_core_web_sm)"
        )
    if nlp is None or embeddings:
        # Embedding names are not English words; the chunker keeps them whole, a tagger might split or mis-tag them.
        return _phrases_by_rules(text, embeddings)
    phrases: list[NounPhrase] = []
    for segment in text.split(SEGMENT_BREAK):
        # Removed brackets leave runs of spaces, which spaCy would turn into SPACE tokens.
        phrases.extend(phrases_from_dependency_parse(nlp(" ".join(segment.split()))))
    return phrases


def suggest_subjects(text: str, *, embeddings: Sequence[str] = (), parser: Parser = "auto") -> list[str]:
    """Head nouns of the noun phrases of plain `text`, in prompt order, each once (case-insensitive), as spelled in
    the prompt. `embeddings`: names of textual-inversion embeddings that may appear in it."""
    subjects: list[str] = []
    seen: set[str] = set()
    for phrase in noun_phrases(text, embeddings=embeddings, parser=parser):
        key = phrase.head.lower()
        if key not in seen:
            seen.add(key)
            subjects.append(phrase.head)
    return subjects


def modifier_pairs(text: str, *, embeddings: Sequence[str] = (), parser: Parser = "auto") -> list[tuple[str, str]]:
    """(modifier, noun) pairs in prompt order, one per modifier: "a big red car" -> [("big", "car"), ("red", "car")].
    A pair appears once even when the phrase repeats."""
    pairs: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for phrase in noun_phrases(text, embeddings=embeddings, parser=parser):
        for modifier in phrase.modifiers:
            key = (modifier.lower(), phrase.head.lower())
            if key not in seen:
                seen.add(key)
                pairs.append((modifier, phrase.head))
    return pairs
