"""The shared benchmark inputs both frameworks load: tokenizer, initial weights, data files.

Written once by :func:`build_artifacts` (kit venv only: it imports lit_rlhf) into
``benchmarks/.cache/artifacts``; the measurement scripts of both sides read the files.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from common import MAX_POSITIONS, PPO, RAGGED_FILES, RM, RM_KWISE, SFT, SIZES, VOCAB_SIZE


def _single_token_words(tokenizer) -> list[str]:
    """Vocabulary entries ``" word"`` that encode back to exactly their own single id.

    Texts made of such words have a known token count on every tokenizer call path (a
    prompt tokenized alone, a prompt + completion string, ...), so both frameworks see
    sequences of exactly the intended length.
    """
    words = []
    for idx in range(len(tokenizer)):
        text = tokenizer.decode([idx])
        if len(text) > 2 and text[0] == " " and text[1:].isalpha() and text[1:].islower():
            if tokenizer(text, add_special_tokens=False)["input_ids"] == [idx]:
                words.append(text)
    return words


def _text(rng: random.Random, words: list[str], n: int) -> str:
    return "".join(rng.choice(words) for _ in range(n))


def write_kwise(root: Path, tokenizer, rng: random.Random) -> None:
    """``kwise.jsonl`` (K-wise records) and ``kwise_pairs.jsonl`` (the same pairs expanded,
    prompt by prompt, better response as ``chosen``); every response has RM["seq_len"] tokens.
    """
    words = _single_token_words(tokenizer)
    k = RM_KWISE
    n_resp = RM["seq_len"] - RM["prompt_len"] - 1
    records, pairs = [], []
    for _ in range(k["n_prompts"]):
        prompt = _text(rng, words, RM["prompt_len"])
        n = rng.randint(k["k_min"], k["k_max"])
        completions = [_text(rng, words, n_resp) for _ in range(n)]
        ranks = rng.sample(range(n), n)  # 0 = best; no ties
        records.append({"prompt": prompt, "completions": completions, "ranks": ranks})
        for i in range(n):
            for j in range(n):
                if ranks[i] < ranks[j]:
                    pairs.append(
                        {"prompt": prompt, "chosen": completions[i], "rejected": completions[j]}
                    )
    for name, rows in (("kwise_pairs.jsonl", pairs), ("kwise.jsonl", records)):
        with open(root / name, "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)


def write_ragged(root: Path, tokenizer, rng: random.Random) -> None:
    """``demos_ragged.jsonl`` and ``pairs_ragged.jsonl``: responses of random length."""
    words = _single_token_words(tokenizer)
    longest = SFT["seq_len"] - SFT["prompt_len"] - 1

    def response() -> str:
        return _text(rng, words, rng.randint(1, longest))

    demos = [
        {"prompt": _text(rng, words, SFT["prompt_len"]), "completion": response()}
        for _ in range(1024)
    ]
    pairs = [
        {
            "prompt": _text(rng, words, RM["prompt_len"]),
            "chosen": response(),
            "rejected": response(),
        }
        for _ in range(512)
    ]
    for name, rows in ((RAGGED_FILES["sft"], demos), (RAGGED_FILES["rm"], pairs)):
        with open(root / name, "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)


def build_artifacts(root: str | os.PathLike) -> Path:
    """Write the shared tokenizer, initial weights and data both frameworks load.

    Layout: ``tokenizer/``; ``<size>/policy`` (GPT2LMHeadModel, EOS and pad suppressed in
    its generation config) and ``<size>/rm`` (GPT2ForSequenceClassification, 1 label, used
    as reward model and value init); ``prompts.jsonl``, ``demos.jsonl``, ``pairs.jsonl``.
    Idempotent: an existing complete folder is reused.
    """
    root = Path(root)
    marker = root / "DONE"
    if marker.exists():
        from lit_rlhf.models.loading import load_tokenizer

        if not (root / "kwise.jsonl").exists():  # folders made before the K-wise bench
            write_kwise(root, load_tokenizer(str(root / "tokenizer")), random.Random(1))
        if not (root / RAGGED_FILES["rm"]).exists():  # ... and before the ragged benches
            write_ragged(root, load_tokenizer(str(root / "tokenizer")), random.Random(2))
        return root
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from lit_rlhf.data.embedded import EmbeddedWorldConfig
    from lit_rlhf.data.review_world import sample_pretraining_text
    from lit_rlhf.models.tiny import tiny_config
    from lit_rlhf.models.tokenizer import train_corpus_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    cfg = EmbeddedWorldConfig()
    corpus = [sample_pretraining_text(rng, cfg) for _ in range(4000)]
    tok = train_corpus_tokenizer(corpus, VOCAB_SIZE, save_dir=root / "tokenizer")
    words = _single_token_words(tok)
    if len(words) < 50:
        raise RuntimeError(f"only {len(words)} single-token words in the benchmark tokenizer")

    for size, shape in SIZES.items():
        config = tiny_config("gpt2", 0, max_positions=MAX_POSITIONS, tokenizer=tok, **shape)
        torch.manual_seed(1)
        policy = AutoModelForCausalLM.from_config(config)
        policy.generation_config.suppress_tokens = [tok.eos_token_id, tok.pad_token_id]
        policy.save_pretrained(root / size / "policy")
        config.num_labels = 1
        torch.manual_seed(2)
        AutoModelForSequenceClassification.from_config(config).save_pretrained(root / size / "rm")

    def dump(name: str, records: list[dict]) -> None:
        with open(root / name, "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in records)

    q = PPO["prompt_len"]
    dump("prompts.jsonl", [{"prompt": _text(rng, words, q)} for _ in range(256)])
    n_sft = SFT["seq_len"] - SFT["prompt_len"] - 1  # + EOS
    dump(
        "demos.jsonl",
        [
            {"prompt": _text(rng, words, SFT["prompt_len"]), "completion": _text(rng, words, n_sft)}
            for _ in range(1024)
        ],
    )
    n_rm = RM["seq_len"] - RM["prompt_len"] - 1
    dump(
        "pairs.jsonl",
        [
            {
                "prompt": _text(rng, words, RM["prompt_len"]),
                "chosen": _text(rng, words, n_rm),
                "rejected": _text(rng, words, n_rm),
            }
            for _ in range(512)
        ],
    )
    write_kwise(root, tok, random.Random(1))
    write_ragged(root, tok, random.Random(2))
    marker.write_text("ok\n")
    return root
