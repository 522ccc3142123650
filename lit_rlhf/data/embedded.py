"""Build (or reuse) the files of the embedded review world under a data folder.

The world is generated, deterministic and offline (see :mod:`lit_rlhf.data.review_world`).
One config gives one folder ``<data_dir>/embedded-<fingerprint>`` holding::

    pretrain_train.jsonl, pretrain_val.jsonl   {"text"}                  base-model corpus
    demos_train.jsonl, demos_val.jsonl         {"prompt", "completion"}  SFT demonstrations
    prompts_ppo.jsonl, prompts_comparison.jsonl {"prompt"}               PPO / label prompts
    prompts_eval.jsonl     {"prompt", "sentiment", "aspect", "frame", "heldout_aspect",
                            "heldout_frame"}
    tokenizer/             byte-level BPE trained on the pretraining texts
    manifest.json          {"config": ..., "stats": ...}; written last, marks a complete folder

Each file draws from its own random stream (seed + file name), so changing one size leaves
every other file byte-identical, and a longer file extends the shorter one. Eval prompts use
film titles no training prompt uses, so they are disjoint from training prompts by
construction, whatever the sizes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lit_rlhf.data import instructions as I
from lit_rlhf.data import review_world as W
from lit_rlhf.data.records import write_jsonl

log = logging.getLogger("lit_rlhf")

# Bump when the generators change, so folders of an older world are not reused.
_FORMAT_VERSION = 3
_JSONL = (
    "pretrain_train",
    "pretrain_val",
    "demos_train",
    "demos_val",
    "prompts_ppo",
    "prompts_comparison",
    "prompts_eval",
)
_SIGN_NAMES = {1: "positive", -1: "negative"}


@dataclass(frozen=True)
class EmbeddedWorldConfig:
    """Sizes, splits and knobs of the embedded review world (``data.embedded`` in the config).

    Attributes:
        seed: Seed of every random stream.
        n_pretrain_texts: Pretraining reviews (``pretrain_train``).
        n_pretrain_val_texts: Held-out pretraining reviews (``pretrain_val``).
        n_demos_train: SFT demonstrations.
        n_demos_val: Validation demonstrations.
        n_ppo_prompts: PPO prompts.
        n_comparison_prompts: Prompts the label stage samples K responses for.
        n_eval_prompts: Eval prompts (unique, never a training prompt).
        heldout_aspects: Aspects no training prompt or demonstration asks about; eval only.
        heldout_frames: Instruction frames (keys of
            :data:`lit_rlhf.data.instructions.FRAMES`) kept out of training; eval only.
        eval_heldout_aspect_prob: Chance that an eval prompt asks about a held-out aspect.
        eval_heldout_frame_prob: Chance that an eval prompt uses a held-out frame.
        opener_prob: Chance that an instruction starts with an opening sentence.
        closer_prob: Chance that an instruction ends with a closing sentence.
        demo_match_prob: Chance that an extra demonstration sentence keeps the requested
            sentiment (otherwise it drifts to the opposite one). At 0.8 the SFT policy's
            samples mostly stay on sentiment, so "more, stronger sentiment" already predicts
            gold without reading the instruction: a first-order signal a ~1M-parameter reward
            model can learn from ~5k ranked responses. At 0.5 the pairs carry only the
            instruction-times-sentiment interaction and the tiny RM stays at chance.
        demo_echo_term_prob: Chance that a demonstration names the aspect with the
            instruction's own term (otherwise another term of the aspect). Echoing is what
            lets a policy answer about aspects it never saw in a demonstration.
        demo_min_extra: Fewest extra sentences after a demonstration's first one.
        demo_max_extra: Most extra sentences after a demonstration's first one.
        demo_max_words: Word limit of a demonstration.
        pretrain_header_prob: Chance that a pretraining review starts with a title line and
            the response cue.
        tokenizer_vocab_size: Vocabulary size of the world's tokenizer.
    """

    seed: int = 0
    n_pretrain_texts: int = 30000
    n_pretrain_val_texts: int = 500
    n_demos_train: int = 2500
    n_demos_val: int = 200
    n_ppo_prompts: int = 2000
    n_comparison_prompts: int = 3000
    n_eval_prompts: int = 512
    heldout_aspects: tuple[str, ...] = ("costumes", "scenery")
    heldout_frames: tuple[str, ...] = I.DEFAULT_HELDOUT_FRAMES
    eval_heldout_aspect_prob: float = 0.25
    eval_heldout_frame_prob: float = 0.3
    opener_prob: float = 0.3
    closer_prob: float = 0.3
    demo_match_prob: float = 0.8
    demo_echo_term_prob: float = 0.8
    demo_min_extra: int = 1
    demo_max_extra: int = 3
    demo_max_words: int = 28
    pretrain_header_prob: float = 0.5
    tokenizer_vocab_size: int = 1024

    def __post_init__(self) -> None:
        # Hydra hands lists over; tuples keep the config hashable and comparable.
        for name in ("heldout_aspects", "heldout_frames"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        self._validate()

    def _validate(self) -> None:
        for f in dataclasses.fields(self):
            if f.name.startswith("n_") and getattr(self, f.name) < 1:
                raise ValueError(f"{f.name} must be >= 1, got {getattr(self, f.name)}")
        for name, known, chosen in (
            ("heldout_aspects", W.ASPECTS, self.heldout_aspects),
            ("heldout_frames", I.FRAMES, self.heldout_frames),
        ):
            unknown = [x for x in chosen if x not in known]
            if unknown:
                raise ValueError(f"{name}: unknown {unknown}; choose from {sorted(known)}")
            if len(set(chosen)) >= len(known):
                raise ValueError(f"{name} must leave at least one for training, got {chosen}")
        for name in (
            "eval_heldout_aspect_prob",
            "eval_heldout_frame_prob",
            "opener_prob",
            "closer_prob",
            "demo_match_prob",
            "demo_echo_term_prob",
            "pretrain_header_prob",
        ):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name, held in (
            ("eval_heldout_aspect_prob", self.heldout_aspects),
            ("eval_heldout_frame_prob", self.heldout_frames),
        ):
            if getattr(self, name) > 0 and not held:
                kind = name.split("_")[2]
                raise ValueError(f"{name} must be 0 when there are no held-out {kind}s")
        if not 0 <= self.demo_min_extra <= self.demo_max_extra:
            raise ValueError(
                f"demo_min_extra must be in [0, demo_max_extra], got demo_min_extra="
                f"{self.demo_min_extra}, demo_max_extra={self.demo_max_extra}"
            )
        # A demonstration's first sentence (the one naming the aspect, at most 6 words) is
        # never cut, so the limit must fit it.
        if self.demo_max_words < 6:
            raise ValueError(f"demo_max_words must be >= 6, got {self.demo_max_words}")
        if self.tokenizer_vocab_size < 258:
            raise ValueError(
                f"tokenizer_vocab_size must be >= 258 (bytes + 2 special tokens), "
                f"got {self.tokenizer_vocab_size}"
            )

    def train_aspects(self) -> tuple[str, ...]:
        """Aspects that training prompts and demonstrations may ask about."""
        return tuple(a for a in W.ASPECTS if a not in self.heldout_aspects)

    def train_frames(self) -> tuple[str, ...]:
        """Instruction frames that training prompts may use."""
        return tuple(f for f in I.FRAMES if f not in self.heldout_frames)

    def prompt(
        self, rng: random.Random, sign: int, aspect: str, frame: str, title: str
    ) -> tuple[str, str]:
        """``(prompt, aspect term)`` of one instruction drawn with this world's settings."""
        term = rng.choice(W.ASPECTS[aspect])
        prompt = W.make_prompt(
            rng, sign, aspect, frame, title, term, self.opener_prob, self.closer_prob
        )
        return prompt, term

    def as_dict(self) -> dict[str, Any]:
        """The config as JSON-ready plain values (tuples become lists)."""
        plain = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in plain.items()}

    def fingerprint(self) -> str:
        """Short hash of the config and the generator version: the world folder's name."""
        blob = json.dumps({"version": _FORMAT_VERSION, **self.as_dict()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


@dataclass(frozen=True)
class EmbeddedWorldFiles:
    """Absolute paths of a built embedded world, plus its statistics.

    Attributes:
        root: The world folder.
        pretrain_train: ``{"text"}`` pretraining reviews.
        pretrain_val: ``{"text"}`` held-out reviews (alignment-tax probe).
        demos_train: ``{"prompt", "completion"}`` demonstrations.
        demos_val: ``{"prompt", "completion"}`` validation demonstrations.
        prompts_ppo: ``{"prompt"}`` PPO prompts.
        prompts_comparison: ``{"prompt"}`` prompts of the label stage.
        prompts_eval: Eval prompts with their requested sentiment and aspect.
        tokenizer_dir: Folder of the world's tokenizer (``AutoTokenizer``-loadable).
        stats: Record counts, sizes in MB and token estimates, keyed ``"<file>/<what>"``.
    """

    root: Path
    pretrain_train: Path
    pretrain_val: Path
    demos_train: Path
    demos_val: Path
    prompts_ppo: Path
    prompts_comparison: Path
    prompts_eval: Path
    tokenizer_dir: Path
    stats: dict[str, float] = field(default_factory=dict, hash=False)

    @classmethod
    def at(cls, root: Path, stats: dict[str, float]) -> EmbeddedWorldFiles:
        """The file layout of the world folder ``root``."""
        paths = {name: root / f"{name}.jsonl" for name in _JSONL}
        return cls(root=root, tokenizer_dir=root / "tokenizer", stats=dict(stats), **paths)


# -- generation -----------------------------------------------------------------------------
def _stream(cfg: EmbeddedWorldConfig, name: str) -> random.Random:
    # A string seed is hashed with SHA-512 by `random`: stable across runs and processes.
    return random.Random(f"lit_rlhf/embedded/{cfg.seed}/{name}")


def _train_prompts(rng: random.Random, cfg: EmbeddedWorldConfig, n: int):
    """Yield ``(prompt, sign, aspect, term)`` for training prompts.

    Only training aspects, frames and film titles are drawn.
    """
    aspects, frames = cfg.train_aspects(), cfg.train_frames()
    titles = W.film_titles(heldout=False)
    for _ in range(n):
        sign = rng.choice((1, -1))
        aspect = rng.choice(aspects)
        frame = rng.choice(frames)
        prompt, term = cfg.prompt(rng, sign, aspect, frame, rng.choice(titles))
        yield prompt, sign, aspect, term


def _demonstrations(rng: random.Random, cfg: EmbeddedWorldConfig, n: int) -> list[dict]:
    return [
        {"prompt": prompt, "completion": W.sample_demonstration(rng, sign, aspect, cfg, term)}
        for prompt, sign, aspect, term in _train_prompts(rng, cfg, n)
    ]


def _eval_prompts(rng: random.Random, cfg: EmbeddedWorldConfig) -> list[dict]:
    titles = W.film_titles(heldout=True)
    seen: set[str] = set()
    out = []
    for _ in range(100 * cfg.n_eval_prompts):  # repeats are rare; this bound is never reached
        held_aspect = rng.random() < cfg.eval_heldout_aspect_prob
        held_frame = rng.random() < cfg.eval_heldout_frame_prob
        sign = rng.choice((1, -1))
        aspect = rng.choice(cfg.heldout_aspects if held_aspect else cfg.train_aspects())
        frame = rng.choice(cfg.heldout_frames if held_frame else cfg.train_frames())
        prompt, _ = cfg.prompt(rng, sign, aspect, frame, rng.choice(titles))
        if prompt in seen:
            continue
        seen.add(prompt)
        out.append(
            {
                "prompt": prompt,
                "sentiment": _SIGN_NAMES[sign],
                "aspect": aspect,
                "frame": frame,
                "heldout_aspect": held_aspect,
                "heldout_frame": held_frame,
            }
        )
        if len(out) == cfg.n_eval_prompts:
            return out
    raise RuntimeError(f"could not draw {cfg.n_eval_prompts} distinct eval prompts")


def _records(cfg: EmbeddedWorldConfig) -> dict[str, list[dict]]:
    """All records of the world, file name -> records, each file from its own stream."""

    def texts(name: str, n: int) -> list[dict]:
        rng = _stream(cfg, name)
        return [{"text": W.sample_pretraining_text(rng, cfg)} for _ in range(n)]

    def prompts(name: str, n: int) -> list[dict]:
        return [{"prompt": p} for p, *_ in _train_prompts(_stream(cfg, name), cfg, n)]

    return {
        "pretrain_train": texts("pretrain_train", cfg.n_pretrain_texts),
        "pretrain_val": texts("pretrain_val", cfg.n_pretrain_val_texts),
        "demos_train": _demonstrations(_stream(cfg, "demos_train"), cfg, cfg.n_demos_train),
        "demos_val": _demonstrations(_stream(cfg, "demos_val"), cfg, cfg.n_demos_val),
        "prompts_ppo": prompts("prompts_ppo", cfg.n_ppo_prompts),
        "prompts_comparison": prompts("prompts_comparison", cfg.n_comparison_prompts),
        "prompts_eval": _eval_prompts(_stream(cfg, "prompts_eval"), cfg),
    }


def _tokens_estimate(tokenizer, texts: list[str]) -> int:
    """Token count of ``texts``, extrapolated by characters from the first 2000 texts."""
    sample = texts[:2000]
    tokens = sum(len(ids) for ids in tokenizer(sample)["input_ids"])
    return round(tokens * sum(map(len, texts)) / max(1, sum(map(len, sample))))


def _write_world(cfg: EmbeddedWorldConfig, folder: Path) -> dict[str, float]:
    """Write every file of the world into ``folder``; returns the statistics."""
    from lit_rlhf.models.tokenizer import train_corpus_tokenizer

    stats: dict[str, float] = {}
    records = _records(cfg)
    for name, recs in records.items():
        path = folder / f"{name}.jsonl"
        write_jsonl(recs, str(path))
        stats[f"{name}/records"] = len(recs)
        stats[f"{name}/mb"] = round(path.stat().st_size / 1e6, 3)
    corpus = [r["text"] for r in records["pretrain_train"]]
    tokenizer = train_corpus_tokenizer(
        corpus, cfg.tokenizer_vocab_size, save_dir=folder / "tokenizer"
    )
    stats["tokenizer/vocab_size"] = len(tokenizer)
    for name in ("pretrain_train", "pretrain_val"):
        texts = [r["text"] for r in records[name]]
        stats[f"{name}/tokens_est"] = _tokens_estimate(tokenizer, texts)
    return stats


def _read_manifest(root: Path, cfg: EmbeddedWorldConfig) -> dict | None:
    """The manifest of a complete world folder built from ``cfg``, else None."""
    try:
        manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if manifest.get("version") != _FORMAT_VERSION or manifest.get("config") != cfg.as_dict():
        return None
    files = EmbeddedWorldFiles.at(root, {})
    if not all(getattr(files, n).is_file() for n in _JSONL) or not files.tokenizer_dir.is_dir():
        return None
    return manifest


def build_embedded_world(
    cfg: EmbeddedWorldConfig, data_dir: str | os.PathLike
) -> EmbeddedWorldFiles:
    """The embedded world's files for ``cfg`` under ``data_dir``, generating them if needed.

    A folder whose manifest matches ``cfg`` is reused untouched. Otherwise the world is written
    into a temporary folder next to it and renamed into place, so an interrupted build never
    leaves a folder that looks complete; a stale folder without manifest is replaced.

    Args:
        cfg: The world's config.
        data_dir: Parent folder of the ``embedded-<fingerprint>`` world folders.

    Returns:
        The absolute paths of the files and their statistics.
    """
    data_dir = Path(data_dir).expanduser().resolve()
    root = data_dir / f"embedded-{cfg.fingerprint()}"
    manifest = _read_manifest(root, cfg)
    if manifest is not None:
        log.info("[data] reusing the embedded review world %s", root)
        return EmbeddedWorldFiles.at(root, manifest["stats"])

    start = time.perf_counter()
    data_dir.mkdir(parents=True, exist_ok=True)
    # A unique name per process (not mkdtemp: its 0700 mode would stick to the renamed folder).
    tmp = data_dir / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        stats = _write_world(cfg, tmp)
        manifest = {"version": _FORMAT_VERSION, "config": cfg.as_dict(), "stats": stats}
        # The manifest goes last: its presence marks a complete folder.
        (tmp / "manifest.json").write_text(
            json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8"
        )
        if _read_manifest(root, cfg) is not None:  # another process finished first
            return EmbeddedWorldFiles.at(root, stats)
        if root.exists():
            shutil.rmtree(root)
        try:
            os.replace(tmp, root)
        except OSError:
            # Another process (a DDP rank, say) renamed its copy into place in between.
            if _read_manifest(root, cfg) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info(
        "[data] built the embedded review world in %.1f s: %s (%d pretraining texts, ~%d tokens)",
        time.perf_counter() - start,
        root,
        cfg.n_pretrain_texts,
        stats["pretrain_train/tokens_est"],
    )
    return EmbeddedWorldFiles.at(root, stats)
