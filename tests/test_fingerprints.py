"""Export fingerprints: what changes a stage's folder name, and what must not."""

from __future__ import annotations

from omegaconf import OmegaConf, open_dict

from lit_rlhf.stages.context import StageContext


def _fingerprints(compose_cfg, tmp_path, stages, *overrides) -> dict[str, str]:
    """Stage -> export fingerprint of the train config composed with ``overrides``."""
    cfg = compose_cfg(*overrides)
    with open_dict(cfg):
        cfg.pop("hydra")
    cfg = OmegaConf.to_container(cfg, resolve=True)
    ctx = StageContext(cfg=cfg, run_dir=str(tmp_path), make_trainer=None)
    return {s: ctx.fingerprint(s) for s in stages}


def test_precision_is_part_of_trained_stages_fingerprints(compose_cfg, tmp_path):
    def prints(*overrides):
        return _fingerprints(
            compose_cfg, tmp_path, ("pretrain", "sft", "label", "rm", "ppo"), *overrides
        )

    fp32, bf16 = prints(), prints("precision=bf16-mixed")
    # Every trained stage (and the label stage, downstream of SFT) gets a new export folder.
    assert all(fp32[s] != bf16[s] for s in fp32)
    assert prints() == fp32


def test_guard_skip_mode_is_in_the_fingerprint_and_the_defaults_are_not(compose_cfg, tmp_path):
    def prints(*overrides):
        return _fingerprints(compose_cfg, tmp_path, ("pretrain", "sft", "rm", "ppo"), *overrides)

    default = prints()
    # Stop (the default) or warn leaves the weights of a finished run as they are.
    assert prints("guard.on_divergence=warn", "guard.divergence_window=5") == default
    skip = prints("guard.nonfinite=skip")  # skipped steps train other weights
    assert all(skip[s] != default[s] for s in default)


def test_settings_added_later_keep_old_folder_names_at_their_old_behaviour(compose_cfg, tmp_path):
    def prints(*overrides):
        f = _fingerprints(compose_cfg, tmp_path, ("ppo", "ppo_ptx"), *overrides)
        return f["ppo"], f["ppo_ptx"]

    default = prints()
    assert prints("ppo.advantage_estimator=gae", "ppo.group_size=1") == default
    assert prints("experiment=grpo") != default
    assert prints("ppo.group_size=2") != default  # GAE over two samples per prompt


def test_trainer_settings_that_change_results_are_in_the_fingerprint(compose_cfg, tmp_path):
    def prints(*overrides):
        return _fingerprints(compose_cfg, tmp_path, ("pretrain", "sft", "rm"), *overrides)

    default = prints()
    for override in (
        "+trainer.max_steps=2",
        "+trainer.accumulate_grad_batches=2",
        "trainer.devices=2",
    ):
        assert all(prints(override)[s] != default[s] for s in default), override
    # The neutral values keep the default's folder names (exports made before stay reused).
    assert prints("+trainer.accumulate_grad_batches=1", "trainer.log_every_n_steps=3") == default
