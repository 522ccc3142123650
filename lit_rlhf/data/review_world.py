"""The embedded review world: word lists, prompts, text generators and the parser.

A tiny, fully generated stand-in for InstructGPT's task distribution. A prompt asks for a film
review with a requested sentiment (positive/negative) about a requested aspect (acting, plot,
music, ...) of a film with a made-up title, and ends with :data:`RESPONSE_CUE`. The gold judge
(:mod:`lit_rlhf.eval.gold`) scores a response with VADER's sentiment plus a bonus for naming
the aspect, so the world is built around three kinds of text:

- pretraining reviews of mixed sentiment that follow no instruction (the "GPT-3" corpus);
- demonstrations that follow the instruction, but only imperfectly (the SFT data);
- ideal responses, far above the demonstrations, that show the headroom PPO can reach.

Every generated word comes from the lists below (see :func:`vocabulary`), and only the
sentiment words carry VADER valence: the judge then rewards exactly what the instruction asks
for, never an accident of wording. Files, sizes and splits live in
:mod:`lit_rlhf.data.embedded`.
"""

from __future__ import annotations

import functools
import random
import re
from typing import TYPE_CHECKING

from lit_rlhf.data import instructions as I

if TYPE_CHECKING:  # the config module imports this one
    from lit_rlhf.data.embedded import EmbeddedWorldConfig

#: Ends every prompt; the response follows it, starting with one space.
RESPONSE_CUE = "\nReview:"

#: Aspect -> the words that name it (a response "mentions" an aspect through any of them).
ASPECTS: dict[str, tuple[str, ...]] = {
    "acting": ("acting", "actors", "performances", "cast"),
    "plot": ("plot", "story", "storyline", "script"),
    "music": ("music", "soundtrack", "songs", "melodies"),
    "visuals": ("visuals", "cinematography", "camerawork", "photography"),
    "pacing": ("pacing", "tempo", "rhythm"),
    "dialogue": ("dialogue", "conversations", "lines"),
    "ending": ("ending", "finale", "climax"),
    "direction": ("direction", "director", "directing"),
    "costumes": ("costumes", "outfits", "wardrobe"),
    "scenery": ("scenery", "landscapes", "locations", "vistas"),
}

#: Sign (+1 positive, -1 negative) -> instruction words that request it. Prompts only: the
#: generated reviews never use them, so they cannot blur what a response says.
SENTIMENT_CUES: dict[int, tuple[str, ...]] = {
    1: ("positive", "glowing", "favorable", "enthusiastic"),
    -1: ("negative", "harsh", "critical", "scathing"),
}

# Title words: no VADER valence, no aspect terms or cues, so a title never moves the gold.
_TITLE_A = (
    "Silent", "Iron", "Crimson", "Hollow", "Northern", "Distant", "Paper", "Glass",
    "Winter", "Midnight", "Copper", "Velvet", "Golden", "Amber", "Silver", "Painted",
)  # fmt: skip
_TITLE_B = (
    "River", "Harbor", "Garden", "Mountain", "Station", "Lantern", "Orchard", "Tower",
    "Bridge", "Voyage", "Letter", "Island", "Road", "Forest", "Mirror", "Canyon",
)  # fmt: skip
# One title pair in this many is reserved for eval prompts, so they never repeat a training
# prompt while every title word is still familiar.
_EVAL_TITLE_EVERY = 5

#: The sentiment words, the only generated words with VADER valence (besides the fixed
#: phrases "loved", "hated", "best", "worst", "truly", "recommend" in the templates below).
_WORDS: dict[str, tuple[str, ...]] = {
    "pos_strong": (
        "brilliant", "wonderful", "superb", "amazing", "excellent", "outstanding",
        "magnificent", "beautiful", "great", "marvelous",
    ),
    "pos_mild": ("good", "nice", "pleasant", "enjoyable", "engaging", "lively", "clever"),
    "neg_strong": (
        "terrible", "awful", "horrible", "disastrous", "pathetic", "dreadful", "disappointing",
    ),
    "neg_mild": ("dull", "boring", "weak", "messy", "lame", "annoying", "poor"),
    "pos_verb": ("enjoyed", "admired", "appreciated"),
    "neg_verb": ("disliked",),
}  # fmt: skip
# VADER boosters: no valence of their own, they scale the next sentiment word up.
_BOOSTERS = ("really", "very", "absolutely", "so", "incredibly", "thoroughly")

# Sentence templates. {t}: an aspect term, {was}: was/were to agree with it, {adj}/{adj2}:
# sentiment adjectives, {a_adj}: an adjective with its article, {boost}: a booster.
_ASPECT_SIMPLE = ("The {t} {was} {adj}.", "I found the {t} {adj}.", "The {t} felt {adj}.")
_ASPECT_BOOSTED = ("The {t} {was} {boost} {adj}.", "I found the {t} {boost} {adj}.")
_ASPECT_STACKED = ("The {t} {was} {boost} {adj} and {adj2}.",)
_ASPECT_VERB = {1: "I loved the {t}.", -1: "I hated the {t}."}
_ASPECT_MILD_VERB = "I {verb} the {t}."
_CONTRAST = "The {t} {was} {adj}, but the {t2} {was2} {adj2}."
# Whole-film verdicts: "strong" ones stack valence without naming an aspect.
_VERDICT_STRONG = {
    1: (
        "I loved it.",
        "It is truly one of the best films of the year.",
        "I would truly recommend it.",
        "What {a_adj} film!",
    ),
    -1: (
        "I hated it.",
        "It is one of the worst films of the year.",
        "I would not recommend it.",
        "What {a_adj} film!",
    ),
}
_VERDICT_MILD = ("Overall, it was {a_adj} film.", "All in all, {a_adj} movie.")
# No valence at all: they make reviews read like reviews without moving the gold.
_NEUTRAL = (
    "I saw it last week.",
    "We watched it on a Sunday evening.",
    "It runs about two hours.",
    "It came out this spring.",
    "I went with my sister.",
    "The theater was quiet.",
    "It is the second film from this studio.",
)

_WORD_RE = re.compile(r"[a-z]+")
_TERM_TO_ASPECT = {t: a for a, terms in ASPECTS.items() for t in terms}
_CUE_TO_SIGN = {c: s for s, cues in SENTIMENT_CUES.items() for c in cues}


def words_of(text: str) -> list[str]:
    """The lowercase words of ``text`` (letters only; punctuation and digits split words)."""
    return _WORD_RE.findall(text.lower())


@functools.lru_cache(maxsize=1)
def vocabulary() -> frozenset[str]:
    """Every word the generators and prompts can produce (lowercase)."""
    pieces = [RESPONSE_CUE, "a an was were", *_TITLE_A, *_TITLE_B, *_BOOSTERS]
    pieces += [*I.FRAMES.values(), *I.ASKS, *I.OPENERS, *I.CLOSERS]
    pieces += [w for ws in (*ASPECTS.values(), *SENTIMENT_CUES.values()) for w in ws]
    pieces += [w for ws in _WORDS.values() for w in ws]
    pieces += [*_ASPECT_SIMPLE, *_ASPECT_BOOSTED, *_ASPECT_STACKED, *_ASPECT_VERB.values()]
    pieces += [_ASPECT_MILD_VERB, _CONTRAST, *_VERDICT_MILD, *_NEUTRAL]
    pieces += [v for vs in _VERDICT_STRONG.values() for v in vs]
    # Placeholders are not words of the output.
    return frozenset(w for p in pieces for w in words_of(re.sub(r"\{\w+\}", " ", p)))


def mentions_aspect(text: str, aspect: str) -> bool:
    """Whether ``text`` names ``aspect`` through one of its terms (whole word, any case).

    Raises:
        ValueError: for an aspect not in :data:`ASPECTS`.
    """
    if aspect not in ASPECTS:
        raise ValueError(f"unknown aspect {aspect!r}; known aspects: {sorted(ASPECTS)}")
    return not set(ASPECTS[aspect]).isdisjoint(words_of(text))


def parse_instruction(prompt: str) -> tuple[int, str]:
    """Read the requested ``(sign, aspect)`` from a review instruction.

    Only the text before :data:`RESPONSE_CUE` counts, so a response can never change what
    was asked for.

    Args:
        prompt: An instruction such as ``"Be harsh about the soundtrack."``, usually
            followed by the response cue.

    Returns:
        ``(sign, aspect)`` with ``sign`` +1 for positive and -1 for negative cues.

    Raises:
        ValueError: when the instruction has no sentiment cue, cues of both signs, no
            aspect term, or terms of several aspects.
    """
    instruction = prompt.split(RESPONSE_CUE, 1)[0]
    words = words_of(instruction)
    signs = {_CUE_TO_SIGN[w] for w in words if w in _CUE_TO_SIGN}
    if not signs:
        raise ValueError(f"cannot parse {instruction!r}: no sentiment cue")
    if len(signs) > 1:
        raise ValueError(f"cannot parse {instruction!r}: asks for both positive and negative")
    aspects = {_TERM_TO_ASPECT[w] for w in words if w in _TERM_TO_ASPECT}
    if not aspects:
        raise ValueError(f"cannot parse {instruction!r}: no aspect named")
    if len(aspects) > 1:
        raise ValueError(f"cannot parse {instruction!r}: several aspects {sorted(aspects)}")
    return signs.pop(), aspects.pop()


@functools.lru_cache(maxsize=3)
def film_titles(heldout: bool | None = None) -> tuple[str, ...]:
    """Film titles: those of training prompts (False), of eval prompts (True), or all (None).

    Each title word pair comes with and without a leading "The".
    """
    out = []
    for i, a in enumerate(_TITLE_A):
        for j, b in enumerate(_TITLE_B):
            is_eval = (i * len(_TITLE_B) + j) % _EVAL_TITLE_EVERY == 0
            if heldout is None or heldout == is_eval:
                out += [f"{a} {b}", f"The {a} {b}"]
    return tuple(out)


def make_prompt(
    rng: random.Random,
    sign: int,
    aspect: str,
    frame: str,
    title: str | None = None,
    term: str | None = None,
    opener_prob: float = 0.0,
    closer_prob: float = 0.0,
) -> str:
    """One instruction asking for a ``sign`` review of ``aspect``, ending in the response cue.

    Args:
        rng: Source of the random choices (cue, aspect term, request verb, opener, closer,
            title).
        sign: +1 for a positive, -1 for a negative review.
        aspect: A key of :data:`ASPECTS`.
        frame: A key of :data:`lit_rlhf.data.instructions.FRAMES`.
        title: The film's title; None draws one from all :func:`film_titles`.
        term: The aspect term to use; None draws one of ``ASPECTS[aspect]``.
        opener_prob: Chance of an opening sentence before the frame.
        closer_prob: Chance of a closing sentence after it.
    """
    if sign not in (1, -1):
        raise ValueError(f"sentiment sign must be +1 or -1, got {sign!r}")
    if aspect not in ASPECTS:
        raise ValueError(f"unknown aspect {aspect!r}; known aspects: {sorted(ASPECTS)}")
    if frame not in I.FRAMES:
        raise ValueError(f"unknown frame {frame!r}; known frames: {sorted(I.FRAMES)}")
    if term is not None and term not in ASPECTS[aspect]:
        raise ValueError(f"{term!r} is not a term of aspect {aspect!r}: {ASPECTS[aspect]}")
    cue = rng.choice(SENTIMENT_CUES[sign])
    term = term if term is not None else rng.choice(ASPECTS[aspect])
    title = title if title is not None else rng.choice(film_titles())
    text = I.fill_frame(rng, frame, cue, term, title, opener_prob, closer_prob)
    return text + RESPONSE_CUE


# -- sentences ------------------------------------------------------------------------------
def _adj(rng: random.Random, sign: int, strong: bool) -> str:
    return rng.choice(_WORDS[f"{'pos' if sign > 0 else 'neg'}_{'strong' if strong else 'mild'}"])


def _term(rng: random.Random, aspect: str, term: str | None = None) -> tuple[str, str]:
    term = term or rng.choice(ASPECTS[aspect])
    # Plural terms ("actors", "songs") take "were"; none of the singular ones ends in "s".
    return term, "were" if term.endswith("s") else "was"


def _aspect_sentence(
    rng: random.Random,
    sign: int,
    aspect: str,
    strong: bool,
    stacked: bool = False,
    term: str | None = None,
) -> str:
    """One sentence of ``sign`` about ``aspect``, through ``term`` when given.

    Strong sentences may boost, stack or use a verb.
    """
    t, was = _term(rng, aspect, term)
    if stacked:
        template = rng.choice(_ASPECT_STACKED)
    elif strong:
        template = rng.choice((*_ASPECT_SIMPLE, *_ASPECT_BOOSTED, _ASPECT_VERB[sign]))
    else:
        template = rng.choice((*_ASPECT_SIMPLE, _ASPECT_MILD_VERB))
    adj = _adj(rng, sign, strong)
    adj2 = rng.choice([w for w in _WORDS["pos_strong" if sign > 0 else "neg_strong"] if w != adj])
    verb = rng.choice(_WORDS["pos_verb" if sign > 0 else "neg_verb"])
    boost = rng.choice(_BOOSTERS)
    return template.format(t=t, was=was, adj=adj, adj2=adj2, verb=verb, boost=boost)


def _verdict(rng: random.Random, sign: int, strong: bool) -> str:
    """A sentence about the whole film, naming no aspect."""
    template = rng.choice(_VERDICT_STRONG[sign] if strong else _VERDICT_MILD)
    return template.format(a_adj=I.with_article(_adj(rng, sign, strong)))


def _contrast(rng: random.Random, sign: int, aspect: str, other: str) -> str:
    t, was = _term(rng, aspect)
    t2, was2 = _term(rng, other)
    adj, adj2 = _adj(rng, sign, rng.random() < 0.3), _adj(rng, -sign, rng.random() < 0.3)
    return _CONTRAST.format(t=t, was=was, adj=adj, t2=t2, was2=was2, adj2=adj2)


# -- the three kinds of text ----------------------------------------------------------------
def sample_pretraining_text(rng: random.Random, cfg: EmbeddedWorldConfig) -> str:
    """A review that follows no instruction: the base model's pretraining text.

    A review leans positive, negative, or is mixed, and talks about random aspects (held-out
    ones included, so their words are known to the base model). With probability
    ``cfg.pretrain_header_prob`` it starts with a title line and :data:`RESPONSE_CUE`, the way
    responses follow prompts, but it never contains an instruction.
    """
    lean = rng.choice((1, -1, 0))
    aspects = tuple(ASPECTS)
    sentences = []
    for _ in range(rng.randint(2, 6)):
        sign = lean if lean and rng.random() < 0.8 else rng.choice((1, -1))
        strong = rng.random() < 0.4
        kind = rng.random()
        if kind < 0.35:
            sentences.append(
                _aspect_sentence(rng, sign, rng.choice(aspects), strong, rng.random() < 0.1)
            )
        elif kind < 0.42:
            first, second = rng.sample(aspects, 2)
            sentences.append(_contrast(rng, sign, first, second))
        elif kind < 0.75:
            sentences.append(_verdict(rng, sign, strong))
        else:
            sentences.append(rng.choice(_NEUTRAL))
    body = " ".join(sentences)
    if rng.random() < cfg.pretrain_header_prob:
        return f"{rng.choice(film_titles())}{RESPONSE_CUE} {body}"
    return body


def sample_demonstration(
    rng: random.Random,
    sign: int,
    aspect: str,
    cfg: EmbeddedWorldConfig,
    term: str | None = None,
) -> str:
    """A labeler-style completion that follows the instruction, imperfectly.

    The first sentence names ``aspect`` with the requested sentiment, mostly in mild words;
    with probability ``cfg.demo_echo_term_prob`` it uses the instruction's own ``term`` (as a
    person answering "the soundtrack" says "the soundtrack"), otherwise any term of the aspect.
    Then come ``demo_min_extra..demo_max_extra`` extra sentences about other training aspects
    or the whole film, each on the requested sentiment with probability ``demo_match_prob``
    and against it otherwise, up to ``demo_max_words`` words. The gap to
    :func:`sample_ideal_response` (strong words, stacked on-sentiment sentences, no
    off-sentiment drift) is what PPO can learn to close.

    Returns:
        The completion, starting with exactly one space.
    """
    echo = term if term is not None and rng.random() < cfg.demo_echo_term_prob else None
    sentences = [_aspect_sentence(rng, sign, aspect, strong=rng.random() < 0.25, term=echo)]
    n_words = len(sentences[0].split())
    others = [a for a in cfg.train_aspects() if a != aspect] or [aspect]
    for _ in range(rng.randint(cfg.demo_min_extra, cfg.demo_max_extra)):
        extra_sign = sign if rng.random() < cfg.demo_match_prob else -sign
        kind = rng.random()
        if kind < 0.5:
            extra = _aspect_sentence(rng, extra_sign, rng.choice(others), rng.random() < 0.2)
        elif kind < 0.85:
            extra = _verdict(rng, extra_sign, rng.random() < 0.3)
        else:
            extra = rng.choice(_NEUTRAL)
        n_words += len(extra.split())
        if n_words > cfg.demo_max_words:
            break
        sentences.append(extra)
    return " " + " ".join(sentences)


def sample_ideal_response(rng: random.Random, sign: int, aspect: str) -> str:
    """A response near the top of the gold scale for a ``sign`` review of ``aspect``.

    It names the aspect in a boosted, stacked sentence and adds strong whole-film verdicts of
    the same sentiment; nothing pulls the other way.

    Returns:
        The response, starting with exactly one space.
    """
    first = _aspect_sentence(rng, sign, aspect, strong=True, stacked=True)
    second = _ASPECT_VERB[sign].format(t=_term(rng, aspect)[0])
    verdicts = rng.sample(_VERDICT_STRONG[sign], 2)
    closing = [v.format(a_adj=I.with_article(_adj(rng, sign, True))) for v in verdicts]
    middle = [second] if rng.random() < 0.5 else []
    return " " + " ".join([first, *middle, *closing])
