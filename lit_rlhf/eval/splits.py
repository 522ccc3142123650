"""Per-split evaluation on the embedded world: seen frames, held-out frames, held-out aspects.

The embedded world's eval prompts carry flags (``heldout_frame``, ``heldout_aspect``, see
:mod:`lit_rlhf.data.embedded`). A policy that matched templates instead of reading the
instruction does well on the seen split and falls on the held-out ones, so every policy
metric that measures instruction following is also reported per split:

- ``seen``: prompts whose frame and aspect both occur in training;
- ``heldout_frames``: prompts in a sentence frame no training prompt uses (any aspect);
- ``heldout_aspects``: prompts about an aspect no training prompt asks about (any frame).

The two held-out splits overlap in the prompts that are new in both ways.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from lit_rlhf.data.review_world import mentions_aspect, parse_instruction
from lit_rlhf.eval.labeler import SimulatedLabeler, pairwise_agreement
from lit_rlhf.eval.stats import win_rate

SPLITS = ("seen", "heldout_frames", "heldout_aspects")


def read_split_flags(path: str, prompts: Sequence[str]) -> dict[str, list[bool]] | None:
    """Split membership of each prompt, from an eval-prompt file with the world's flags.

    Args:
        path: JSONL file of eval prompts (the embedded world's ``prompts_eval.jsonl``).
        prompts: The prompts evaluated, in order (a prefix of the file when
            ``eval.n_prompts`` cuts it).

    Returns:
        Split name -> one bool per prompt, or None when the file has no split flags (user
        prompts).
    """
    flags: dict[str, tuple[bool, bool]] = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            if "heldout_frame" not in rec or "heldout_aspect" not in rec:
                return None
            flags[rec["prompt"]] = (bool(rec["heldout_frame"]), bool(rec["heldout_aspect"]))
    if any(p not in flags for p in prompts):
        return None
    frame = [flags[p][0] for p in prompts]
    aspect = [flags[p][1] for p in prompts]
    return {
        "seen": [not f and not a for f, a in zip(frame, aspect)],
        "heldout_frames": frame,
        "heldout_aspects": aspect,
    }


def aspect_mentions(prompts: Sequence[str], responses: Sequence[str]) -> list[bool]:
    """Whether each response names the aspect its prompt asks about."""
    return [mentions_aspect(r, parse_instruction(p)[1]) for p, r in zip(prompts, responses)]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def policy_split_metrics(
    name: str,
    prompts: Sequence[str],
    responses: Sequence[str],
    gold: Sequence[float],
    sft_gold: Sequence[float] | None,
    splits: dict[str, list[bool]] | None,
) -> dict[str, float]:
    """Aspect-mention share overall, and gold / win rate / mention share per split.

    Args:
        name: Policy name (the metric namespace ``eval/<name>/...``).
        prompts: (N) eval prompts.
        responses: (N) the policy's responses.
        gold: (N) their gold scores.
        sft_gold: (N) the SFT policy's gold scores on the same prompts (win rates), or None.
        splits: Split name -> (N) membership, from :func:`read_split_flags`, or None.

    Returns:
        ``eval/<name>/aspect_mention`` and, per split ``s``, ``eval/<name>/gold_<s>``,
        ``eval/<name>/aspect_mention_<s>``, ``eval/<name>/prompts_<s>`` and (with
        ``sft_gold``) ``eval/<name>/win_rate_vs_sft_<s>`` with its ``_lo``/``_hi`` interval.
    """
    mention = [float(m) for m in aspect_mentions(prompts, responses)]
    out = {f"eval/{name}/aspect_mention": _mean(mention)}
    for split, member in (splits or {}).items():
        idx = [i for i, m in enumerate(member) if m]
        if not idx:
            continue
        out[f"eval/{name}/prompts_{split}"] = float(len(idx))
        out[f"eval/{name}/gold_{split}"] = _mean([gold[i] for i in idx])
        out[f"eval/{name}/aspect_mention_{split}"] = _mean([mention[i] for i in idx])
        if sft_gold is not None:
            rate, lo, hi = win_rate([gold[i] for i in idx], [sft_gold[i] for i in idx])
            out[f"eval/{name}/win_rate_vs_sft_{split}"] = rate
            out[f"eval/{name}/win_rate_vs_sft_{split}_lo"] = lo
            out[f"eval/{name}/win_rate_vs_sft_{split}_hi"] = hi
    return out


def heldout_labeler_agreement(
    records: Sequence[dict], scores: Sequence[float], tau: float, seed: int
) -> dict[str, float]:
    """The RM's agreement with a simulated labeler who produced no training data.

    InstructGPT's check: RMs agree with held-out labelers about as often as labelers agree
    with each other (~72 %). A new labeler with the training labeler's noise ``tau`` (and
    another seed) ranks the held-out comparisons from their gold scores; the RM's scores are
    compared with those ranks.

    Args:
        records: Held-out K-wise records with ``completions``, ``ranks`` and ``gold``.
        scores: RM score of every completion, records concatenated in order.
        tau: Noise scale of the training labeler (``label/tau`` of the label stage).
        seed: Seed of the new labeler's noise.

    Returns:
        ``eval/rm/acc_heldout_labeler`` (RM vs the new labeler) and
        ``eval/rm/inter_labeler_agreement`` (the new labeler vs the training labels: the
        level a perfect model of one labeler reaches), over the new labeler's untied pairs.
    """
    total = sum(len(rec["completions"]) for rec in records)
    if total != len(scores):
        raise ValueError(f"{len(scores)} scores for {total} completions")
    labeler = SimulatedLabeler(seed=seed, tau=tau)
    rm_ok = rm_n = lab_ok = lab_n = 0.0
    pos = 0
    for rec in records:
        k = len(rec["completions"])
        new_ranks = labeler.rank(rec["gold"], rec["completions"])
        rm_scores = scores[pos : pos + k]
        pos += k
        # The new ranks as the reference (lower = better), the RM's scores as negated ranks.
        ok, n = pairwise_agreement([-s for s in rm_scores], new_ranks, reference_is_ranks=True)
        rm_ok, rm_n = rm_ok + ok, rm_n + n
        ok, n = pairwise_agreement(rec["ranks"], new_ranks, reference_is_ranks=True)
        lab_ok, lab_n = lab_ok + ok, lab_n + n
    return {
        "eval/rm/acc_heldout_labeler": rm_ok / max(1.0, rm_n),
        "eval/rm/inter_labeler_agreement": lab_ok / max(1.0, lab_n),
    }
