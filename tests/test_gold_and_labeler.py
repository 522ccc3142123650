"""Gold judge, simulated labeler, comparison building and evaluation statistics."""

import math
import random
import statistics

import pytest
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from lit_rlhf.eval.gold import GoldJudge, vader_compound
from lit_rlhf.eval.labeler import (
    SimulatedLabeler,
    build_comparisons,
    expected_agreement,
    pairwise_agreement,
)
from lit_rlhf.eval.stats import mean_ci, t_quantile, win_rate

POS = "Write a positive review of the acting in The Silent River.\nReview:"
NEG = "Write a negative review of the acting in The Silent River.\nReview:"


# -- gold judge -----------------------------------------------------------------------------
def test_gold_on_hand_written_examples():
    judge = GoldJudge()
    good = " The acting was absolutely brilliant. I loved the cast, they were so wonderful."
    bad = " The acting was terrible. I hated the cast, they were so awful."
    assert judge.score(POS, good) > 1.0
    assert judge.score(NEG, good) < -0.6
    assert judge.score(NEG, bad) > 1.0
    assert judge.score(POS, bad) < -0.6
    # right sentiment about another aspect: no aspect bonus
    assert judge.score(POS, " The music was absolutely brilliant.") == pytest.approx(
        vader_compound(" The music was absolutely brilliant."), abs=1e-12
    )
    assert judge.score(POS, "") == 0.0
    # the exact value of one example: VADER compound 0.624 + bonus 0.25
    assert judge.score(POS, "The acting was absolutely brilliant.") == pytest.approx(0.874)


def test_gold_matches_the_documented_formula():
    vader = SentimentIntensityAnalyzer()
    judge = GoldJudge(aspect_weight=0.4)
    cases = [
        (POS, " The CAST was fine, but the plot was dull."),
        (NEG, " The performances were okay. The music was awful."),
        ("Be glowing about the soundtrack.", " I loved the songs!"),
        ("Be harsh about the story.", " The storyline was boring. Overall, a bad film."),
        (NEG, " The castle was awful."),  # "castle" is not "cast"
    ]
    terms = {"acting": {"acting", "actors", "performances", "cast"}, "music": {"music",
             "soundtrack", "songs"}, "plot": {"plot", "story", "storyline"}}  # fmt: skip
    for prompt, response in cases:
        sign = 1 if ("positive" in prompt or "glowing" in prompt) else -1
        aspect = next(a for a in terms if any(t in prompt.lower() for t in terms[a]))
        words = [w.strip(".,!").lower() for w in response.split()]
        mention = any(w in terms[aspect] for w in words)
        expected = sign * vader.polarity_scores(response)["compound"] + 0.4 * mention
        assert judge.score(prompt, response) == pytest.approx(expected, abs=1e-12)
    prompts, responses = zip(*cases)
    assert judge.score_batch(prompts, responses) == [judge.score(p, r) for p, r in cases]
    assert judge(list(prompts), list(responses)) == judge.score_batch(prompts, responses)


def test_gold_errors():
    with pytest.raises(ValueError, match="align"):
        GoldJudge().score_batch([POS], [])
    with pytest.raises(ValueError, match="cannot parse"):
        GoldJudge().score("Tell me a joke.", " ok")
    assert GoldJudge(unparsable=-1.0).score("Tell me a joke.", " ok") == -1.0
    with pytest.raises(ValueError, match="aspect_weight"):
        GoldJudge(aspect_weight=-0.1)


# -- labeler --------------------------------------------------------------------------------
def synthetic_groups(n, seed):
    rng = random.Random(seed)
    return [[rng.gauss(0.5, 0.5) for _ in range(rng.randint(4, 9))] for _ in range(n)]


def naive_expected_agreement(groups, tau):
    total, pairs = 0.0, 0
    for g in groups:
        for i in range(len(g)):
            for j in range(len(g)):
                if i < j and g[i] != g[j]:
                    total += 1.0 / (1.0 + math.exp(-abs(g[i] - g[j]) / tau))
                    pairs += 1
    return total / pairs


def test_calibration_hits_the_target_in_expectation():
    groups = synthetic_groups(200, 0)
    for target in (0.6, 0.75, 0.9):
        labeler = SimulatedLabeler(target_agreement=target)
        tau = labeler.calibrate(groups)
        assert naive_expected_agreement(groups, tau) == pytest.approx(target, abs=1e-5)
    gaps = [0.1, 0.5]
    assert expected_agreement(gaps, 0.0) == 1.0
    naive = naive_expected_agreement([[0.1, 0.0], [0.0, 0.5]], 0.3)
    assert expected_agreement(gaps, 0.3) == pytest.approx(naive)


@pytest.mark.parametrize("target", [0.75, 0.9])
def test_labeler_agreement_on_a_large_sample(target):
    groups = synthetic_groups(3000, 1)
    labeler = SimulatedLabeler(target_agreement=target, seed=5)
    labeler.calibrate(groups)
    agree = pairs = 0
    for g in groups:
        a, n = pairwise_agreement(labeler.rank(g), g)
        agree, pairs = agree + a, pairs + n
    assert pairs > 40000
    assert agree / pairs == pytest.approx(target, abs=0.02)


def test_noiseless_labeler_and_ties():
    scores = [0.3, 0.9, -0.2, 0.9, 0.5]
    labeler = SimulatedLabeler(target_agreement=1.0)
    assert labeler.tau == 0.0
    assert labeler.rank(scores) == [2, 0, 3, 0, 1]  # dense ranks, equal gold ties
    assert pairwise_agreement(labeler.rank(scores), scores) == (9.0, 9)
    noisy = SimulatedLabeler(tau=5.0, seed=0)
    comps = ["a", "b", "a", "c", "a"]
    for _ in range(20):
        ranks = noisy.rank([0.1, 0.2, 0.1, 0.3, 0.1], comps)
        assert ranks[0] == ranks[2] == ranks[4]  # identical completions always tie
        assert sorted(set(ranks)) == list(range(len(set(ranks))))
    assert SimulatedLabeler(tau=0.01, tie_margin=10.0).rank([0.0, 1.0, 2.0]) == [0, 0, 0]
    # tie_margin groups by distance to the group's best score (not chained)
    assert SimulatedLabeler(tau=0.0, tie_margin=0.15).rank([1.0, 0.9, 0.8, 0.7]) == [0, 0, 1, 1]


def test_labeler_errors_and_determinism():
    with pytest.raises(ValueError, match="target_agreement"):
        SimulatedLabeler(target_agreement=0.5)
    with pytest.raises(ValueError, match="not calibrated"):
        SimulatedLabeler().rank([0.0, 1.0])
    with pytest.raises(ValueError, match="different scores"):
        SimulatedLabeler().calibrate([[1.0, 1.0], [0.0]])
    a, b = SimulatedLabeler(tau=1.0, seed=3), SimulatedLabeler(tau=1.0, seed=3)
    seq = [[0.1 * i for i in range(8)]] * 10
    assert [a.rank(s) for s in seq] == [b.rank(s) for s in seq]


def test_pairwise_agreement_against_hand_counts():
    # reference scores 3 > 2 > 1; ranks put the last two in the wrong order
    assert pairwise_agreement([0, 2, 1], [3.0, 2.0, 1.0]) == (2.0, 3)
    assert pairwise_agreement([0, 1, 1], [3.0, 2.0, 1.0]) == (2.5, 3)  # a tie counts 1/2
    assert pairwise_agreement([0, 1, 2], [1.0, 1.0, 0.0]) == (2.0, 2)  # gold ties skipped
    assert pairwise_agreement([0, 1], [0, 1], reference_is_ranks=True) == (1.0, 1)
    assert pairwise_agreement([1, 0], [0, 1], reference_is_ranks=True) == (0.0, 1)
    with pytest.raises(ValueError):
        pairwise_agreement([0, 1], [1.0])


def test_build_comparisons_samples_once_and_ranks_by_gold():
    calls = []

    def sample_fn(prompts, ks):
        calls.append((list(prompts), list(ks)))
        return [[f"{p}-{j % 3}" for j in range(k)] for p, k in zip(prompts, ks)]

    def score_fn(prompts, responses):
        return [float(r[-1]) for r in responses]  # "-2" scores 2

    prompts = [f"p{i}" for i in range(50)]
    records = build_comparisons(
        prompts, sample_fn, score_fn, SimulatedLabeler(target_agreement=1.0), seed=1
    )
    assert len(calls) == 1 and calls[0][0] == prompts
    assert all(4 <= k <= 9 for k in calls[0][1]) and len(set(calls[0][1])) > 2
    assert len(records) == 50
    for rec, k in zip(records, calls[0][1]):
        assert set(rec) == {"prompt", "completions", "ranks", "gold"}
        assert len(rec["completions"]) == len(rec["ranks"]) == len(rec["gold"]) == k
        assert all(isinstance(r, int) for r in rec["ranks"])
        assert rec["gold"] == score_fn(None, rec["completions"])
        assert rec["ranks"] == [2 - int(c[-1]) for c in rec["completions"]]  # noiseless
    again = build_comparisons(prompts, sample_fn, score_fn, SimulatedLabeler(1.0), seed=1)
    assert again == records


def test_build_comparisons_calibrates_and_validates():
    rng = random.Random(0)

    def sample_fn(prompts, ks):
        return [[f"r{rng.random()}" for _ in range(k)] for k in ks]

    labeler = SimulatedLabeler(target_agreement=0.8)
    records = build_comparisons(
        ["a", "b", "c"], sample_fn, lambda p, r: [rng.random() for _ in r], labeler
    )
    assert labeler.tau is not None and labeler.tau > 0 and len(records) == 3
    with pytest.raises(ValueError, match="k_min"):
        build_comparisons(["a"], sample_fn, lambda p, r: [0.0] * len(r), labeler, k_min=1)
    with pytest.raises(ValueError, match="sample_fn"):
        build_comparisons(["a"], lambda p, ks: [["x"]], lambda p, r: [0.0] * len(r), labeler)
    all_same = build_comparisons(
        ["a", "b"], lambda p, ks: [["same"] * k for k in ks], lambda p, r: [0.0] * len(r), labeler
    )
    assert all_same == []  # nothing to learn from a group of identical responses


# -- statistics -----------------------------------------------------------------------------
def naive_t_cdf(t, dof, steps=200000):
    """P(T <= t) by the midpoint rule on the t density from 0 to t."""
    c = math.gamma((dof + 1) / 2) / (math.sqrt(dof * math.pi) * math.gamma(dof / 2))
    h = t / steps
    area = sum(c * (1 + ((k + 0.5) * h) ** 2 / dof) ** (-(dof + 1) / 2) * h for k in range(steps))
    return 0.5 + area


@pytest.mark.parametrize("dof", [1, 2, 3, 4, 9, 30, 250])
def test_t_quantile_against_numeric_integration(dof):
    q = t_quantile(0.975, dof)
    assert naive_t_cdf(q, dof) == pytest.approx(0.975, abs=2e-6)
    assert t_quantile(0.025, dof) == pytest.approx(-q)
    table = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 9: 2.2622, 30: 2.0423, 250: 1.9695}
    assert q == pytest.approx(table[dof], abs=1e-4)


def test_mean_ci_against_naive():
    xs = [0.3, -0.1, 0.8, 0.5, 0.2, 0.9, -0.4, 0.6]
    n = len(xs)
    m = sum(xs) / n
    sd = (sum((x - m) ** 2 for x in xs) / (n - 1)) ** 0.5
    mean, lo, hi = mean_ci(xs)
    assert mean == pytest.approx(m)
    assert hi - mean == pytest.approx(2.3646 * sd / n**0.5, abs=1e-4)  # t_{0.975, 7}
    assert mean - lo == pytest.approx(hi - mean)
    assert mean_ci(xs, confidence=0.5)[2] < hi
    one = mean_ci([2.0])
    assert one[0] == 2.0 and math.isnan(one[1]) and math.isnan(one[2])
    with pytest.raises(ValueError, match="empty"):
        mean_ci([])
    with pytest.raises(ValueError, match="confidence"):
        mean_ci([1.0, 2.0], confidence=1.0)


def test_win_rate_counts_ties_half():
    a = [1.0, 2.0, 3.0, 0.0, 5.0]
    b = [0.0, 2.0, 4.0, 0.0, 1.0]
    outcomes = [1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)]
    rate, lo, hi = win_rate(a, b)
    assert rate == pytest.approx(statistics.mean(outcomes)) == 0.6
    assert 0.0 <= lo < rate < hi <= 1.0
    assert win_rate(b, a)[0] == pytest.approx(1 - rate)
    r, lo, hi = win_rate([1.0] * 100, [0.0] * 100)
    assert r == 1.0 and 0.95 < lo < 1.0 and hi == 1.0  # Wilson: not a degenerate interval
    with pytest.raises(ValueError, match="paired"):
        win_rate([1.0], [1.0, 2.0])


def test_report_table_prints_no_negative_zero():
    from lit_rlhf.eval.report import policy_table

    m = {"eval/sft/gold": 0.7, "eval/sft/gold_lo": 0.6, "eval/sft/gold_hi": 0.8}
    m.update({"eval/sft/kl_to_sft": -3e-7, "eval/sft/rm_score": -0.5})
    row = policy_table(m)[0]
    assert "0.00" in row and "-0.00" not in row and "-0.500" in row
