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


#: Per-token EOS probability of the ``policy_ragged`` models at initialisation (about).
RAGGED_EOS_PROB = 1 / 12


def write_ragged_policies(root: Path) -> None:
    """``<size>/policy_ragged``: the policy of ``<size>/policy`` with EOS made likely.

    A random-init model almost never samples EOS (~1/512 per token), so its responses all
    run to the limit. Here the final LayerNorm gets a bias ``b u`` and the EOS embedding row
    (tied to the LM head) becomes ``g u`` for one unit vector u: the EOS logit rises by
    ``b g`` while every other logit moves by ``b (u . w_j)`` ~ 0.07, so each step ends the
    response with probability ~ :data:`RAGGED_EOS_PROB` and lengths vary from 1 token to
    the limit. Only pad is suppressed in its generation config.
    """
    import math

    import torch
    from transformers import AutoModelForCausalLM

    for size in SIZES:
        out = root / size / "policy_ragged"
        if (out / "config.json").exists():
            continue
        policy = AutoModelForCausalLM.from_pretrained(root / size / "policy")
        eos, pad = policy.config.eos_token_id, policy.config.pad_token_id
        d = policy.config.n_embd
        u = torch.randn(d, generator=torch.Generator().manual_seed(3))
        u /= u.norm()
        gain = 1.0
        # exp(b g + g^2 / 2) / (exp(...) + ~(V - 1)) = p  (the hidden state's u-part ~ N(0, 1))
        others = VOCAB_SIZE - 1
        bias = (math.log(RAGGED_EOS_PROB / (1 - RAGGED_EOS_PROB) * others) - gain**2 / 2) / gain
        with torch.no_grad():
            policy.transformer.ln_f.bias += bias * u
            policy.get_input_embeddings().weight[eos] = gain * u
        policy.generation_config.suppress_tokens = [pad]
        policy.save_pretrained(out)


def build_artifacts(root: str | os.PathLike) -> Path:
    """Write the shared tokenizer, initial weights and data both frameworks load.

    Layout: ``tokenizer/``; ``<size>/policy`` (GPT2LMHeadModel, EOS and pad suppressed in
    its generation config), ``<size>/policy_ragged`` (:func:`write_ragged_policies`) and
    ``<size>/rm`` (GPT2ForSequenceClassification, 1 label, used
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
        write_ragged_policies(root)  # ... and before ppo_ragged (no-op when present)
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
    write_ragged_policies(root)
    marker.write_text("ok\n")
    return root
