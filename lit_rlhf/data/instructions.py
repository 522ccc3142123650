"""Instruction frames of the embedded review world, built from parts.

An instruction asks for a review with a sentiment (a cue word such as "harsh") about an
aspect (a term such as "soundtrack") of a film. To follow it a model has to find the cue and
the term wherever they stand; a world with a handful of fixed sentences teaches template
matching instead. So an instruction is composed of three parts:

- an optional **opener** ("Quick request.") and an optional **closer** ("Keep it brief."),
  which carry no cue, no aspect term, no title and no word of VADER's lexicon;
- a **frame**: a sentence pattern that places the cue, the aspect term and the title in one
  of several orders and syntactic roles ("Write {a_cue} review of the {term} in {title}.",
  "Tone: {cue}. Topic: ..."), and
- a **request verb** filling the frame's ``{ask}`` slot ("Write", "Give me", "Draft", ...).

:data:`FRAMES` times :data:`ASKS` gives 96 sentence frames, and with openers and closers
several thousand surface forms. Whole frames can be held out of training
(``data.embedded.heldout_frames``): they reuse the cue words, aspect terms, request verbs and
title words of training, in sentence patterns no training prompt has.

None of these parts contains a sentiment cue, an aspect term or a film-title word (tested),
so :func:`~lit_rlhf.data.review_world.parse_instruction` reads every instruction exactly.
"""

from __future__ import annotations

import random

#: Frame name -> pattern. Slots: ``{ask}`` a request verb (capitalised at a sentence start as
#: ``{Ask}``), ``{cue}`` the sentiment cue, ``{a_cue}`` the cue with its article, ``{term}``
#: the aspect term, ``{title}`` the film. The comment gives the order of cue (C), aspect (A)
#: and title (T).
FRAMES: dict[str, str] = {
    "review_of": "{Ask} {a_cue} review of the {term} in {title}.",  # C A T
    "focus": "{Ask} {a_cue} review of {title} that focuses on its {term}.",  # C T A
    "make_it": "{Ask} a review of the {term} in {title}, and make it {cue}.",  # A T C
    "tone_after": "{Ask} a short review of {title} about its {term}. The tone should be {cue}.",
    "title_first": "{title}: {ask} {a_cue} review of its {term}.",  # T C A
    "watched": "I just watched {title}. {Ask} {a_cue} review of its {term}.",  # T C A
    "keep_it": "Keep it {cue}: {ask} a review of the {term} in {title}.",  # C A T
    "be": "Be {cue} about the {term} of {title} when you {ask} a review.",  # C A T
    "for_title": "For {title}, {ask} a review of the {term} that sounds {cue}.",  # T A C
    "aspect_first": "The {term} of {title} is the subject. {Ask} {a_cue} review of it.",
    "question": "What did you think of the {term} in {title}? {Ask} {a_cue} answer.",  # A T C
    "labels": "Film: {title}. Topic: {term}. Tone: {cue}. {Ask} a review.",  # T A C
    "voice": "In {a_cue} voice, {ask} a few words on the {term} of {title}.",  # C A T
    "need": "I need {a_cue} review of {title}. {Ask} one about the {term}.",  # C T A
    "only_aspect": "{Ask} a review of {title}, only about the {term}, and keep the mood {cue}.",
    "neighbor": "My neighbor asked about {title}. {Ask} {a_cue} note on its {term}.",  # T C A
}

#: Request verbs for the ``{ask}`` slot (all read well before "a review").
ASKS: tuple[str, ...] = ("write", "give me", "compose", "draft", "send", "post")

#: Optional sentences before and after the frame (no cue, term or title words).
OPENERS: tuple[str, ...] = (
    "Quick request.",
    "Hello there.",
    "Here is a task for you.",
    "For the weekly newsletter:",
    "A reader sent this in.",
    "One more for the list.",
)
CLOSERS: tuple[str, ...] = (
    "Keep it brief.",
    "A short paragraph is enough.",
    "That is all.",
    "Skip the spoilers.",
    "Use simple words.",
    "Write in the first person.",
)

#: Frames held out of training by default: each puts the cue in a role no training frame uses
#: ("answer", "Tone:" label, "voice").
DEFAULT_HELDOUT_FRAMES: tuple[str, ...] = ("question", "labels", "voice")


def with_article(word: str) -> str:
    """``word`` with its indefinite article ("a harsh", "an enthusiastic")."""
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def fill_frame(
    rng: random.Random,
    frame: str,
    cue: str,
    term: str,
    title: str,
    opener_prob: float = 0.0,
    closer_prob: float = 0.0,
) -> str:
    """One instruction from ``frame`` (a key of :data:`FRAMES`), without the response cue.

    Args:
        rng: Source of the request verb, opener and closer.
        frame: Name of the sentence pattern.
        cue: Sentiment cue word.
        term: Aspect term.
        title: Film title.
        opener_prob: Chance of an opening sentence from :data:`OPENERS`.
        closer_prob: Chance of a closing sentence from :data:`CLOSERS`.

    Raises:
        ValueError: for an unknown frame.
    """
    if frame not in FRAMES:
        raise ValueError(f"unknown frame {frame!r}; known frames: {sorted(FRAMES)}")
    ask = rng.choice(ASKS)
    text = FRAMES[frame].format(
        ask=ask, Ask=ask[0].upper() + ask[1:], cue=cue, a_cue=with_article(cue), term=term,
        title=title,
    )  # fmt: skip
    # The draws below happen whatever the probabilities, so the stream stays aligned.
    opener, closer = rng.choice(OPENERS), rng.choice(CLOSERS)
    use_opener, use_closer = rng.random() < opener_prob, rng.random() < closer_prob
    return " ".join([*([opener] if use_opener else []), text, *([closer] if use_closer else [])])
