"""The embedded review world: generators, parser, files, determinism and reuse."""

import json
import logging
import random
import re
import statistics
from dataclasses import replace
from pathlib import Path

import pytest
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from lit_rlhf.data import instructions as I
from lit_rlhf.data import review_world as W
from lit_rlhf.data.embedded import EmbeddedWorldConfig, build_embedded_world
from lit_rlhf.data.records import read_records
from lit_rlhf.eval.gold import GoldJudge

TINY = dict(
    n_pretrain_texts=300,
    n_pretrain_val_texts=20,
    n_demos_train=60,
    n_demos_val=10,
    n_ppo_prompts=40,
    n_comparison_prompts=20,
    n_eval_prompts=30,
    tokenizer_vocab_size=400,
)


def tiny_cfg(**kw):
    return EmbeddedWorldConfig(**{**TINY, **kw})


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def all_bytes(root: Path) -> dict:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


# -- generators and parser -----------------------------------------------------------------
def test_parse_instruction_round_trips_every_frame_aspect_and_cue():
    rng = random.Random(0)
    for frame in I.FRAMES:
        for aspect in W.ASPECTS:
            for sign in (1, -1):
                for _ in range(3):
                    prompt = W.make_prompt(rng, sign, aspect, frame, None, None, 0.5, 0.5)
                    assert prompt.endswith(W.RESPONSE_CUE)
                    assert W.parse_instruction(prompt) == (sign, aspect)


def test_instruction_parts_carry_no_cue_term_or_title_words():
    cues = {c for cs in W.SENTIMENT_CUES.values() for c in cs}
    terms = {t for ts in W.ASPECTS.values() for t in ts}
    titles = {w.lower() for w in (*W._TITLE_A, *W._TITLE_B)}
    lexicon = SentimentIntensityAnalyzer().lexicon
    for part in (*I.FRAMES.values(), *I.ASKS, *I.OPENERS, *I.CLOSERS):
        words = set(W.words_of(part.replace("{a_cue}", " ").replace("{cue}", " ")))
        assert not words & (cues | terms | titles | set(lexicon)), part
    for frame in I.FRAMES.values():  # every slot once: one cue, one term, one title
        slots = [s for s in ("{cue}", "{a_cue}") if s in frame]
        assert len(slots) == 1 and frame.count(slots[0]) == 1, frame
        assert frame.count("{term}") == 1 and frame.count("{title}") == 1, frame
        assert ("{ask}" in frame) != ("{Ask}" in frame), frame
    assert len(I.FRAMES) * len(I.ASKS) >= 90  # "dozens of frames, built from parts"


def test_cue_and_aspect_stand_in_varying_positions():
    rng = random.Random(0)
    orders = set()
    for frame in I.FRAMES:
        words = W.words_of(I.fill_frame(rng, frame, "harsh", "soundtrack", "Paper River"))
        orders.add((words.index("harsh") < words.index("soundtrack"), words.index("paper")))
    assert len({o[0] for o in orders}) == 2  # the cue before and after the aspect
    assert len({o[1] for o in orders}) >= 5  # the title at many offsets


def test_parse_instruction_hand_written_and_errors():
    assert W.parse_instruction("Write a glowing review of the STORY.") == (1, "plot")
    assert W.parse_instruction("Be harsh about the soundtrack.\nReview:") == (-1, "music")
    # words after the response cue are not part of the instruction
    assert W.parse_instruction("Be positive about the cast.\nReview: negative plot") == (
        1,
        "acting",
    )
    with pytest.raises(ValueError, match="no sentiment cue"):
        W.parse_instruction("Write a review of the acting.")
    with pytest.raises(ValueError, match="both positive and negative"):
        W.parse_instruction("Write a positive or negative review of the acting.")
    with pytest.raises(ValueError, match="several aspects"):
        W.parse_instruction("Write a positive review of the acting and the plot.")
    with pytest.raises(ValueError, match="no aspect"):
        W.parse_instruction("Write a positive review.")


def test_mentions_aspect_is_whole_word_and_case_insensitive():
    assert W.mentions_aspect("The ACTORS were fine.", "acting")
    assert W.mentions_aspect("the cast, really", "acting")
    assert not W.mentions_aspect("The castle was fine.", "acting")
    assert not W.mentions_aspect("The plot was fine.", "acting")
    with pytest.raises(ValueError, match="unknown aspect"):
        W.mentions_aspect("x", "lighting")


def test_make_prompt_rejects_bad_arguments():
    rng = random.Random(0)
    with pytest.raises(ValueError, match="sentiment"):
        W.make_prompt(rng, 0, "acting", "write")
    with pytest.raises(ValueError, match="unknown aspect"):
        W.make_prompt(rng, 1, "lighting", "write")
    with pytest.raises(ValueError, match="unknown frame"):
        W.make_prompt(rng, 1, "acting", "shout")
    with pytest.raises(ValueError, match="not a term of aspect"):
        W.make_prompt(rng, 1, "acting", "review_of", term="plot")


def test_only_sentiment_words_carry_vader_valence():
    lexicon = SentimentIntensityAnalyzer().lexicon
    vocab = W.vocabulary()
    assert 150 < len(vocab) < 400
    sentiment_words = {w for ws in W._WORDS.values() for w in ws}
    allowed = sentiment_words | {"loved", "hated", "best", "worst", "truly", "recommend"}
    allowed |= {c for cues in W.SENTIMENT_CUES.values() for c in cues}  # prompts only
    assert {w for w in vocab if w in lexicon} <= allowed
    titles = {w.lower() for w in (*W._TITLE_A, *W._TITLE_B)}
    terms = {t for ts in W.ASPECTS.values() for t in ts}
    cues = {c for cs in W.SENTIMENT_CUES.values() for c in cs}
    assert not titles & (terms | cues | set(lexicon))


def test_generators_use_only_the_vocabulary_and_are_deterministic():
    cfg = EmbeddedWorldConfig()
    vocab = W.vocabulary()

    def draw(seed):
        rng = random.Random(seed)
        texts = [W.sample_pretraining_text(rng, cfg) for _ in range(200)]
        texts += [W.sample_demonstration(rng, 1, "plot", cfg) for _ in range(100)]
        texts += [W.sample_ideal_response(rng, -1, "music") for _ in range(20)]
        return texts

    texts = draw(3)
    assert texts == draw(3) and texts != draw(4)
    assert {w for t in texts for w in W.words_of(t)} <= vocab


def test_demonstrations_follow_instructions_imperfectly():
    cfg = EmbeddedWorldConfig()
    judge = GoldJudge()
    rng = random.Random(0)
    demo, ideal, base, echoed = [], [], [], 0
    for _ in range(1500):
        sign = rng.choice((1, -1))
        aspect = rng.choice(cfg.train_aspects())
        term = rng.choice(W.ASPECTS[aspect])
        prompt = W.make_prompt(rng, sign, aspect, rng.choice(cfg.train_frames()), term=term)
        completion = W.sample_demonstration(rng, sign, aspect, cfg, term)
        echoed += term in W.words_of(completion.split(".")[0])
        assert completion.startswith(" ") and not completion.startswith("  ")
        assert len(completion.split()) <= cfg.demo_max_words
        assert W.mentions_aspect(completion.split(".")[0], aspect)
        assert not any(W.mentions_aspect(completion, a) for a in cfg.heldout_aspects)
        demo.append(judge.score(prompt, completion))
        ideal.append(judge.score(prompt, W.sample_ideal_response(rng, sign, aspect)))
        text = W.sample_pretraining_text(rng, cfg).split(W.RESPONSE_CUE)[-1]
        base.append(judge.score(prompt, " " + text.strip()))
    assert 0.6 < statistics.mean(demo) < 1.0  # clearly above chance ...
    assert statistics.mean(ideal) > 1.15 and min(ideal) > 1.0  # ... with room above
    assert statistics.mean(ideal) - statistics.mean(demo) > 0.25
    assert sum(d >= 1.15 for d in demo) / len(demo) < 0.15
    assert abs(statistics.mean(base)) < 0.12  # pretraining text ignores the instruction
    # the first sentence echoes the instruction's own term as often as configured (plus the
    # draws that pick the same term by chance)
    assert cfg.demo_echo_term_prob <= echoed / 1500 < cfg.demo_echo_term_prob + 0.1


def test_config_validation():
    with pytest.raises(ValueError, match="heldout_aspects"):
        EmbeddedWorldConfig(heldout_aspects=("lighting",))
    with pytest.raises(ValueError, match="heldout_frames"):
        EmbeddedWorldConfig(heldout_frames=tuple(I.FRAMES))
    with pytest.raises(ValueError, match="heldout_frames"):
        EmbeddedWorldConfig(heldout_frames=("shout",))
    with pytest.raises(ValueError, match="n_demos_train"):
        EmbeddedWorldConfig(n_demos_train=0)
    with pytest.raises(ValueError, match="demo_match_prob"):
        EmbeddedWorldConfig(demo_match_prob=1.5)
    with pytest.raises(ValueError, match="demo_min_extra"):
        EmbeddedWorldConfig(demo_min_extra=3, demo_max_extra=2)
    with pytest.raises(ValueError, match="eval_heldout_aspect_prob"):
        EmbeddedWorldConfig(heldout_aspects=())
    cfg = EmbeddedWorldConfig(heldout_aspects=["costumes"], eval_heldout_aspect_prob=0.3)
    assert cfg.heldout_aspects == ("costumes",)  # lists from YAML become tuples
    assert cfg.fingerprint() != EmbeddedWorldConfig().fingerprint()


# -- files ----------------------------------------------------------------------------------
def test_same_seed_gives_identical_files(tmp_path):
    a = build_embedded_world(tiny_cfg(), tmp_path / "a")
    b = build_embedded_world(tiny_cfg(), tmp_path / "b")
    assert a.root.name == b.root.name
    files_a, files_b = all_bytes(a.root), all_bytes(b.root)
    assert "manifest.json" in files_a and "tokenizer/tokenizer.json" in files_a
    assert files_a == files_b
    c = build_embedded_world(tiny_cfg(seed=1), tmp_path / "a")
    assert c.root != a.root
    assert c.pretrain_train.read_bytes() != a.pretrain_train.read_bytes()


def test_reuse_when_manifest_matches(tmp_path, caplog):
    first = build_embedded_world(tiny_cfg(), tmp_path)
    stamp = {p: p.stat().st_mtime_ns for p in first.root.rglob("*")}
    with caplog.at_level(logging.INFO, logger="lit_rlhf"):
        again = build_embedded_world(tiny_cfg(), str(tmp_path))
    assert again == first
    assert "reusing" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in first.root.rglob("*")} == stamp
    # no temp folders are left behind; a folder without manifest is rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [first.root.name]
    (first.root / "manifest.json").unlink()
    (first.root / "demos_train.jsonl").write_text("broken")
    rebuilt = build_embedded_world(tiny_cfg(), tmp_path)
    assert (rebuilt.root / "manifest.json").is_file()
    assert len(read_jsonl(rebuilt.demos_train)) == TINY["n_demos_train"]


def test_records_have_the_right_fields_and_splits(tmp_path):
    cfg = tiny_cfg(n_eval_prompts=80)
    files = build_embedded_world(cfg, tmp_path)
    for p in (files.root, files.tokenizer_dir, files.pretrain_train, files.prompts_eval):
        assert Path(p).is_absolute() and Path(p).exists()
    manifest = json.loads((files.root / "manifest.json").read_text())
    assert manifest["config"] == cfg.as_dict()
    assert files.stats["pretrain_train/tokens_est"] > TINY["n_pretrain_texts"] * 10

    for key, n in (("pretrain_train", 300), ("pretrain_val", 20)):
        rows = read_jsonl(getattr(files, key))
        assert len(rows) == n and all(set(r) == {"text"} and r["text"].strip() for r in rows)
    train_prompts = set()
    for key in ("demos_train", "demos_val"):
        rows = read_jsonl(getattr(files, key))
        assert all(set(r) == {"prompt", "completion"} for r in rows)
        assert all(r["completion"].startswith(" ") for r in rows)
        train_prompts |= {r["prompt"] for r in rows}
    for key in ("prompts_ppo", "prompts_comparison"):
        rows = read_jsonl(getattr(files, key))
        assert all(set(r) == {"prompt"} for r in rows)
        train_prompts |= {r["prompt"] for r in rows}
    for prompt in train_prompts:
        assert prompt.endswith(W.RESPONSE_CUE)
        assert W.parse_instruction(prompt)[1] not in cfg.heldout_aspects

    evals = read_jsonl(files.prompts_eval)
    assert len(evals) == 80 and len({r["prompt"] for r in evals}) == 80
    assert not {r["prompt"] for r in evals} & train_prompts
    for r in evals:
        assert isinstance(r["prompt"], str) and isinstance(r["heldout_aspect"], bool)
        sign, aspect = W.parse_instruction(r["prompt"])
        assert (sign, aspect) == ({"positive": 1, "negative": -1}[r["sentiment"]], r["aspect"])
        assert (aspect in cfg.heldout_aspects) == r["heldout_aspect"]
        assert (r["frame"] in cfg.heldout_frames) == r["heldout_frame"]
    assert any(r["heldout_aspect"] for r in evals) and any(r["heldout_frame"] for r in evals)
    for frame in cfg.heldout_frames:
        # no training prompt matches a held-out frame's pattern
        pattern = re.compile(
            ".*".join(re.escape(piece) for piece in re.split(r"\{\w+\}", I.FRAMES[frame]))
        )
        assert not any(pattern.search(p) for p in train_prompts), frame
        assert all(pattern.search(r["prompt"]) for r in evals if r["frame"] == frame)
    # the held-out aspects are still known words of the pretraining corpus
    corpus = " ".join(r["text"] for r in read_jsonl(files.pretrain_train))
    assert all(W.mentions_aspect(corpus, a) for a in cfg.heldout_aspects)
    # the recipe's own reader accepts every file
    assert len(read_records(str(files.demos_train), "demonstrations")) == 60
    assert len(read_records(str(files.prompts_eval), "prompts")) == 80


def test_changing_one_size_keeps_other_files(tmp_path):
    a = build_embedded_world(tiny_cfg(), tmp_path)
    b = build_embedded_world(replace(tiny_cfg(), n_ppo_prompts=41), tmp_path)
    assert a.root != b.root
    assert a.demos_train.read_bytes() == b.demos_train.read_bytes()
    assert read_jsonl(b.prompts_ppo)[:40] == read_jsonl(a.prompts_ppo)
