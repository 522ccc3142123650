"""Per-split eval metrics, the held-out-labeler check and the seeds summary."""

import json
import math

import pytest

from lit_rlhf.eval.labeler import SimulatedLabeler
from lit_rlhf.eval.seeds import TARGETS, summarize_seeds, write_seeds_summary
from lit_rlhf.eval.splits import (
    heldout_labeler_agreement,
    policy_split_metrics,
    read_split_flags,
)

P_POS = "Write a glowing review of the soundtrack in Paper River.\nReview:"
P_NEG = "Film: Iron Road. Topic: wardrobe. Tone: harsh. Write a review.\nReview:"


def test_split_flags_from_the_eval_file(tmp_path):
    path = tmp_path / "eval.jsonl"
    rows = [
        {"prompt": P_POS, "heldout_frame": False, "heldout_aspect": False},
        {"prompt": P_NEG, "heldout_frame": True, "heldout_aspect": True},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    flags = read_split_flags(str(path), [P_POS, P_NEG])
    assert flags == {
        "seen": [True, False],
        "heldout_frames": [False, True],
        "heldout_aspects": [False, True],
    }
    plain = tmp_path / "user.jsonl"
    plain.write_text(json.dumps({"prompt": P_POS}) + "\n")
    assert read_split_flags(str(plain), [P_POS]) is None  # user prompts carry no splits


def test_policy_split_metrics_by_hand():
    prompts = [P_POS, P_POS, P_NEG, P_NEG]
    responses = ["The music was great.", "I loved it.", "The outfits were awful.", "Dull."]
    gold = [1.0, 0.5, 0.9, 0.1]
    sft = [0.5, 0.5, 0.2, 0.3]
    splits = {
        "seen": [True, True, False, False],
        "heldout_frames": [False, False, True, True],
        "heldout_aspects": [False, False, True, True],
    }
    m = policy_split_metrics("ppo", prompts, responses, gold, sft, splits)
    assert m["eval/ppo/aspect_mention"] == pytest.approx(0.5)  # "music", "outfits"
    assert m["eval/ppo/gold_seen"] == pytest.approx(0.75)
    assert m["eval/ppo/win_rate_vs_sft_seen"] == pytest.approx(0.75)  # a win and a tie
    assert m["eval/ppo/win_rate_vs_sft_heldout_frames"] == pytest.approx(0.5)
    assert m["eval/ppo/aspect_mention_heldout_aspects"] == pytest.approx(0.5)
    assert m["eval/ppo/prompts_seen"] == 2
    assert "eval/sft/win_rate_vs_sft_seen" not in policy_split_metrics(
        "sft", prompts, responses, sft, None, splits
    )


def test_heldout_labeler_agreement_perfect_and_reversed_rm():
    records = [
        {"completions": ["a", "b", "c", "d"], "ranks": [0, 1, 2, 3], "gold": [1.0, 0.5, 0.0, -1.0]}
        for _ in range(50)
    ]
    tau = SimulatedLabeler(0.85).calibrate([r["gold"] for r in records])
    gold_scores = [g for r in records for g in r["gold"]]
    good = heldout_labeler_agreement(records, gold_scores, tau, seed=3)
    bad = heldout_labeler_agreement(records, [-g for g in gold_scores], tau, seed=3)
    # the gold itself agrees with a noisy labeler as often as that labeler agrees with gold
    assert 0.8 < good["eval/rm/acc_heldout_labeler"] < 0.9
    assert good["eval/rm/acc_heldout_labeler"] + bad["eval/rm/acc_heldout_labeler"] == 1.0
    # labels equal to the gold order: the training labels agree like the gold does
    assert good["eval/rm/inter_labeler_agreement"] == good["eval/rm/acc_heldout_labeler"]
    with pytest.raises(ValueError, match="scores"):
        heldout_labeler_agreement(records, gold_scores[:-1], tau, seed=3)


def _job(rm, win, held, kl, kept, recovered):
    return {
        "eval/rm/acc_gold": rm,
        "eval/ppo/win_rate_vs_sft": win,
        "eval/ppo/win_rate_vs_sft_heldout_frames": held,
        "eval/ppo/kl_to_sft": kl,
        "eval/ptx/gain_kept": kept,
        "eval/ptx/regression_recovered": recovered,
    }


def test_seeds_summary_checks_every_seed_not_the_mean(tmp_path):
    jobs = [
        ("0", _job(0.90, 0.95, 0.90, 5.0, 1.0, 2.0)),
        ("1", _job(0.80, 0.95, 0.90, 12.0, 1.0, 2.0)),  # RM and KL miss on this seed
        ("2", _job(0.95, 0.95, 0.90, 5.0, 1.0, 2.0)),
    ]
    summary = summarize_seeds(jobs)
    rm = summary["stats"]["eval/rm/acc_gold"]
    assert rm["mean"] == pytest.approx(0.883333, abs=1e-6) and rm["min"] == 0.80
    assert rm["sd"] == pytest.approx(math.sqrt(((0.9 - rm["mean"]) ** 2 + (0.8 - rm["mean"]) ** 2
                                                + (0.95 - rm["mean"]) ** 2) / 2))  # fmt: skip
    assert summary["targets"]["eval/rm/acc_gold"]["met_on"] == 2  # mean 0.88 >= 0.85, yet
    assert summary["targets"]["eval/ppo/kl_to_sft"]["met_on"] == 2  # "at most" bound
    assert summary["targets"]["eval/ppo/win_rate_vs_sft"]["met_on"] == 3
    write_seeds_summary(jobs, str(tmp_path), "python train.py -m experiment=seeds", "abc123")
    md = (tmp_path / "seeds_summary.md").read_text()
    assert "`python train.py -m experiment=seeds` at commit `abc123`" in md
    assert "| RM acc vs gold | ≥ 0.85 | 0.900 | 0.800 | 0.950 |" in md and "2/3 ❌" in md
    # For an "at most" bound the worst seed is the max, so the table shows both ends.
    assert "| 7.333 ± 4.041 | 5.000 | 12.000 | 2/3 ❌ |" in md
    assert (tmp_path / "seeds_summary.png").stat().st_size > 1000
    assert json.loads((tmp_path / "seeds_summary.json").read_text())["commit"] == "abc123"
    assert len(TARGETS) == 6
