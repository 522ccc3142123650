"""PPOModule: invariants of the step, frozen models, ptx, adaptive KL, checkpoints and resume."""

import json

import lightning as L
import pytest
import torch
from transformers import AutoModelForSequenceClassification, ByT5Tokenizer

from lit_rlhf.data.ppo_datamodule import PPODataModule
from lit_rlhf.models.heads import sequence_scores
from lit_rlhf.models.tiny import build_tiny_causal_lm, tiny_config
from lit_rlhf.modules.ppo import PPOModule
from lit_rlhf.rollout import Rollout, generate, response_logprobs, score

SMALL = dict(hidden_size=32, num_layers=2, num_heads=2)


@pytest.fixture
def tok():
    return ByT5Tokenizer()


@pytest.fixture
def data_files(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Review {i}:"}) + "\n" for i in range(40)))
    text = tmp_path / "text.jsonl"
    text.write_text(
        "".join(json.dumps({"text": f"a film review number {i}"}) + "\n" for i in range(40))
    )
    return str(prompts), str(text)


def _classifier(tok, arch, seed):
    cfg = tiny_config(arch, 0, tokenizer=tok, **SMALL)
    cfg.num_labels = 1
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(cfg)


def make_module(tok, arch="gpt2", **kw):
    policy = build_tiny_causal_lm(arch, tokenizer=tok, seed=0, **SMALL)
    ref = build_tiny_causal_lm(arch, tokenizer=tok, seed=0, **SMALL)
    args = dict(
        n_rollouts=2,
        max_new_tokens=6,
        ppo_epochs=2,
        num_minibatches=2,
        micro_batch_size=2,
        policy_lr=1e-3,
        value_lr=1e-3,
    )
    args.update(kw)
    return PPOModule(
        policy,
        _classifier(tok, arch, 1),
        ref,
        _classifier(tok, arch, 2),
        tok.eos_token_id,
        tok.pad_token_id,
        **args,
    )


def fit(
    module,
    tok,
    data_files,
    ptx_ratio=0.0,
    ckpt_path=None,
    seed=0,
    precision="32-true",
    group_size=1,
    callbacks=(),
):
    L.seed_everything(seed, verbose=False)
    dm = PPODataModule(
        data_files[0],
        data_files[1] if ptx_ratio else None,
        batch_size=8,
        ptx_ratio=ptx_ratio,
        group_size=group_size,
    ).connect(tok)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        precision=precision,
        callbacks=list(callbacks),
    )
    trainer.fit(module, dm, ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_ratio_is_exactly_one_on_first_minibatch(tok, data_files, arch, temperature):
    module = make_module(tok, arch, temperature=temperature)
    fit(module, tok, data_files)
    for h in module.history:  # every rollout starts from the policy that sampled it
        assert h["policy/ratio_first"] == pytest.approx(1.0, abs=1e-5)
    assert module.rollouts_done == 2


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_sampling_logprobs_equal_a_full_forward(tok, arch):
    policy = build_tiny_causal_lm(arch, tokenizer=tok, seed=0, **SMALL).eval()
    pad = tok.pad_token_id
    # Left-padded prompts of different lengths; responses that end at different steps.
    query = torch.tensor([[pad, pad, 10, 11], [12, 13, 14, 15], [pad, 16, 17, 18]])
    torch.manual_seed(0)
    ro = generate(policy, query, (query != pad).long(), 12, 0.7, tok.eos_token_id, pad)
    again, _ = response_logprobs(policy, ro, 0.7)
    mask = ro.response_mask
    assert torch.allclose(ro.logprobs[mask], again[mask], atol=1e-5)
    assert (ro.logprobs[~mask] == 0).all()


def test_frozen_models_unchanged_trained_models_move(tok, data_files):
    module = make_module(tok)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    fit(module, tok, data_files)
    after = module.state_dict()
    for prefix, should_change in (
        ("ref_model.", False),
        ("reward_model.", False),
        ("policy.", True),
        ("value_model.", True),
    ):
        keys = [k for k in before if k.startswith(prefix) and before[k].is_floating_point()]
        changed = any(not torch.equal(before[k], after[k]) for k in keys)
        assert changed == should_change, prefix


def test_score_is_read_at_eos_not_at_pad(tok):
    rm = _classifier(tok, "gpt2", 3)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    query = torch.tensor([[pad, 10, 11], [12, 13, 14]])
    qmask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    resp = torch.tensor([[20, eos, pad, pad], [21, 22, 23, eos]])
    rmask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    ro = Rollout(query, qmask, resp, rmask, torch.tensor([True, True]))
    got = score(rm, ro)
    alone = sequence_scores(
        rm, torch.tensor([[10, 11, 20, eos]]), torch.ones(1, 4, dtype=torch.long)
    )
    assert got[0] == pytest.approx(float(alone[0]), abs=1e-5)
    # A different token in the padded tail does not change the score.
    ro.response_ids = torch.tensor([[20, eos, 99, 98], [21, 22, 23, eos]])
    assert score(rm, ro)[0] == pytest.approx(float(got[0]), abs=1e-6)


def test_ptx_gradient_reaches_the_policy(tok, data_files):
    base = make_module(tok)
    fit(base, tok, data_files)
    with_ptx = make_module(tok, ptx_coef=5.0)
    fit(with_ptx, tok, data_files, ptx_ratio=1.0)
    assert "ptx/loss" in with_ptx.history[-1]
    diff = [
        not torch.equal(a, b)
        for a, b in zip(base.policy.parameters(), with_ptx.policy.parameters())
    ]
    assert any(diff)
    batch = with_ptx.trainer.datamodule.rollout_batch(0)["ptx"]
    with_ptx.policy.zero_grad()
    with_ptx._ptx_loss(batch).backward()
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0
        for n, p in with_ptx.policy.named_parameters()
        if "wte" in n
    )


def test_adaptive_kl_coef_moves(tok, data_files):
    module = make_module(tok, kl_coef=0.1, kl_target=1000.0, kl_horizon=10.0)
    fit(module, tok, data_files)
    # KL of a few steps is far below the target: the controller lowers beta.
    assert module.kl_ctl.value < 0.1


def test_checkpoint_leaves_out_frozen_models_and_loads_weights_only(tok, data_files, tmp_path):
    module = make_module(tok, ema_decay=0.9)
    trainer = fit(module, tok, data_files)
    path = tmp_path / "ppo.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    assert not [k for k in ckpt["state_dict"] if k.startswith(("ref_model.", "reward_model."))]
    assert ckpt["ppo_state"]["rollouts_done"] == 2
    assert ckpt["ppo_state"]["ema"]["shadow"]
    exported = module.export_model()
    assert any(
        not torch.equal(a, b) for a, b in zip(exported.parameters(), module.policy.parameters())
    )


def test_resume_equals_uninterrupted_run(tok, data_files, tmp_path):
    full = make_module(tok, n_rollouts=4, kl_target=3.0, ema_decay=0.9)
    fit(full, tok, data_files, ptx_ratio=1.0)

    half = make_module(tok, n_rollouts=2, kl_target=3.0, ema_decay=0.9)
    trainer = fit(half, tok, data_files, ptx_ratio=1.0)
    path = tmp_path / "half.ckpt"
    trainer.save_checkpoint(path)

    resumed = make_module(tok, n_rollouts=4, kl_target=3.0, ema_decay=0.9)
    fit(resumed, tok, data_files, ptx_ratio=1.0, ckpt_path=str(path), seed=123)
    assert resumed.rollouts_done == 4
    for a, b in zip(full.policy.parameters(), resumed.policy.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert resumed.kl_ctl.value == pytest.approx(full.kl_ctl.value, rel=1e-6)
    for key in ("objective/scores", "objective/kl", "policy/approx_kl"):
        assert resumed.history[-1][key] == pytest.approx(full.history[-1][key], abs=1e-5)


def test_bad_settings_raise_before_training(tok):
    with pytest.raises(ValueError, match="kl_coef"):
        make_module(tok, kl_coef=-0.1)
    with pytest.raises(ValueError, match="pretraining data"):
        PPODataModule("prompts.jsonl", None, ptx_ratio=1.0)


class _NoParameters(torch.nn.Module):
    """A "reward model" with nothing to train or to read a device from."""

    def forward(self, input_ids, attention_mask=None, **kw):
        return torch.zeros(input_ids.shape[0], 1)


def test_model_without_parameters_is_one_line_at_construction(tok):
    policy = build_tiny_causal_lm("gpt2", tokenizer=tok, seed=0, **SMALL)
    ref = build_tiny_causal_lm("gpt2", tokenizer=tok, seed=0, **SMALL)
    value = _classifier(tok, "gpt2", 1)
    with pytest.raises(ValueError, match=r"^the reward model \(_NoParameters\) has no parameters"):
        PPOModule(policy, value, ref, _NoParameters(), tok.eos_token_id, tok.pad_token_id)
    with pytest.raises(ValueError, match=r"^the value model \(_NoParameters\) has no parameters"):
        PPOModule(policy, _NoParameters(), ref, value, tok.eos_token_id, tok.pad_token_id)


@pytest.mark.parametrize(
    ("batch", "minibatches", "micro", "expected"),
    [(16, 2, None, (8, 8)), (16, 2, 4, (8, 4)), (16, 2, 8, (8, 8)), (16, 2, 32, (8, 8))],
)
def test_split_episodes_uses_every_episode(batch, minibatches, micro, expected):
    from lit_rlhf.modules.ppo import split_episodes

    mb, mu = split_episodes(batch, minibatches, micro)
    assert (mb, mu) == expected
    assert mb * minibatches == batch and mb % mu == 0


@pytest.mark.parametrize(
    ("batch", "minibatches", "micro", "message"),
    [
        (16, 2, 3, "2 episodes of each minibatch would be dropped"),
        (16, 3, None, "must be divisible by ppo.num_minibatches"),
        (16, 2, 0, "must be >= 1"),
    ],
)
def test_split_episodes_refuses_uneven_splits(batch, minibatches, micro, message):
    from lit_rlhf.modules.ppo import split_episodes

    with pytest.raises(ValueError, match=message):
        split_episodes(batch, minibatches, micro)
