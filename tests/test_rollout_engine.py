"""The rollout-engine seam: PPO and evaluation sample through an engine given as an argument."""

from __future__ import annotations

import pytest
import torch
from test_ppo import SMALL, data_files, fit, make_module  # noqa: F401 (data_files: a fixture)

from lit_rlhf.eval.policy_eval import sample_with_kl
from lit_rlhf.models.tiny import build_tiny_causal_lm
from lit_rlhf.rollout import HFGenerateEngine, RolloutEngine, sample_rollouts


class CountingEngine(HFGenerateEngine):
    """The default engine, counting its calls and the policies it was handed."""

    def __init__(self) -> None:
        self.generated = 0
        self.loaded: list[torch.nn.Module] = []

    def load_weights(self, policy):
        self.loaded.append(policy)

    def generate(self, policy, *args, **kwargs):
        self.generated += 1
        return super().generate(policy, *args, **kwargs)


class InexactEngine(HFGenerateEngine):
    """Samples like the default but reports log-probs it does not stand behind (all -3)."""

    exact_logprobs = False

    def generate(self, *args, **kwargs):
        ro = super().generate(*args, **kwargs)
        ro.logprobs = torch.full_like(ro.logprobs, -3.0)
        return ro


def test_ppo_samples_through_the_engine_it_is_given(tok, data_files):  # noqa: F811
    engine = CountingEngine()
    module = make_module(tok, engine=engine)
    fit(module, tok, data_files)
    assert engine.generated == module.rollouts_done == 2
    # Weights reach the engine before every rollout, from the training policy itself.
    assert len(engine.loaded) == 2 and all(p is module.policy for p in engine.loaded)


def test_inexact_engine_gets_its_old_logprobs_recomputed(tok, data_files):  # noqa: F811
    module = make_module(tok, engine=InexactEngine())
    fit(module, tok, data_files)
    # The first minibatch's ratio is pi/pi_old = 1 only if pi_old came from a policy forward.
    for h in module.history:
        assert h["policy/ratio_first"] == pytest.approx(1.0, abs=1e-5)


def test_an_engine_must_implement_generate():
    class Incomplete(RolloutEngine):
        pass

    with pytest.raises(TypeError, match="generate"):
        Incomplete()


def test_eval_kl_is_the_same_through_an_inexact_engine(tok):
    policy = build_tiny_causal_lm("gpt2", tokenizer=tok, seed=0, **SMALL).eval()
    reference = build_tiny_causal_lm("gpt2", tokenizer=tok, seed=1, **SMALL).eval()
    prompts = [f"Review {i}: the film was" for i in range(6)]
    out = {}
    for name, engine in (("exact", None), ("inexact", InexactEngine())):
        torch.manual_seed(0)
        out[name] = sample_with_kl(policy, tok, prompts, reference, 6, 1.0, 4, engine=engine)
    assert out["exact"].responses == out["inexact"].responses
    assert out["exact"].kl == pytest.approx(out["inexact"].kl, abs=1e-4)
    assert any(abs(k) > 1e-3 for k in out["exact"].kl)  # two different models: KL is not 0


def test_sampling_keeps_the_prompt_order_or_sorts_by_length(tok):
    policy = build_tiny_causal_lm("gpt2", tokenizer=tok, seed=0, **SMALL)
    policy.train()
    prompts = ["a much longer prompt than the others here", "short", "mid length one"]
    kept = [
        rows
        for rows, _ in sample_rollouts(
            policy, tok, prompts, 1, 3, batch_size=2, sort_by_length=False
        )
    ]
    assert kept == [[0, 1], [2]]
    by_len = [rows for rows, _ in sample_rollouts(policy, tok, prompts, [1, 2, 1], 3, batch_size=2)]
    assert [i for rows in by_len for i in rows] == [1, 1, 2, 0]
    assert policy.training  # the mode it had is restored


def test_callbacks_get_each_rollout_through_the_step_outputs(tok, data_files):  # noqa: F811
    import lightning as L

    from lit_rlhf.callbacks.gold_tracking import GoldTrackingCallback

    seen = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((outputs["rollout"], outputs["metrics"]))

    def length_judge(prompts, responses):
        return [float(len(r)) for r in responses]

    module = make_module(tok)
    fit(module, tok, data_files, callbacks=[GoldTrackingCallback(length_judge, tok), Spy()])
    assert len(seen) == module.rollouts_done == 2
    for (ro, metrics), row in zip(seen, module.history):
        assert metrics is row  # the history row itself: added keys reach history.json
        texts = tok.batch_decode(ro.response_ids, skip_special_tokens=True)
        assert row["gold/train_score"] == pytest.approx(sum(map(len, texts)) / len(texts))
        assert ro.advantages is not None and ro.returns is not None
