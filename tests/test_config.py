"""Every shipped YAML composes; CPU trainers instantiate; CLI errors are one clear line."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import MissingConfigException
from hydra.types import RunMode
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy
from omegaconf import OmegaConf, open_dict, read_write

from lit_rlhf.run import _check_multirun_strategy, make_trainer_factory
from lit_rlhf.stages.context import ConfigError, StageContext

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
#: Choices whose Trainer needs hardware this CPU-only test machine lacks.
NEEDS_GPU = {("trainer", "gpu"), ("trainer", "multinode")}
#: Choices whose strategy needs the deepspeed package (GPU only; not installed here).
NEEDS_DEEPSPEED = {("strategy", "deepspeed")}


def _choices() -> list[tuple[str, str]]:
    out = []
    for group in sorted(p for p in CONF.iterdir() if p.is_dir()):
        for path in sorted(group.rglob("*.yaml")):
            out.append((group.name, path.relative_to(group).with_suffix("").as_posix()))
    return out


CHOICES = _choices()


def test_every_group_has_choices():
    groups = {g for g, _ in CHOICES}
    assert {"stage", "model", "trainer", "strategy", "precision", "logger", "callbacks"} <= groups
    # Every default named in train.yaml exists.
    train = OmegaConf.load(CONF / "train.yaml")
    for entry in train.defaults:
        if isinstance(entry, str):
            continue
        for group, choice in entry.items():
            if choice is not None:
                assert (CONF / group / f"{choice}.yaml").is_file(), f"{group}/{choice}.yaml"


def test_default_config_resolves(compose_cfg, tmp_path):
    cfg = compose_cfg()
    # hydra.sweep.subdir needs hydra.job.num, which only a multirun sets: resolve the rest.
    body = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    plain = OmegaConf.to_container(body, resolve=True, throw_on_missing=True)
    plain["hydra"] = {"run": {"dir": cfg.hydra.run.dir}, "job": {"chdir": cfg.hydra.job.chdir}}
    assert plain["stage"]["name"] == "pipeline"
    assert plain["paths"]["root_dir"] == str(tmp_path)
    assert plain["paths"]["exports_dir"] == str(tmp_path / "exports")
    assert plain["data"]["embedded"]["seed"] == plain["seed"]
    assert plain["hydra"]["run"]["dir"].startswith(str(tmp_path / "logs" / "pipeline"))
    assert plain["hydra"]["job"]["chdir"] is False


@pytest.mark.parametrize(("group", "choice"), CHOICES, ids=[f"{g}={c}" for g, c in CHOICES])
def test_every_yaml_composes(compose_cfg, tmp_path, group, choice):
    text = (CONF / group / f"{choice}.yaml").read_text()
    try:
        cfg = compose_cfg(f"{group}={choice}")
    except MissingConfigException:
        plugin = importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper")
        if "optuna" in text and plugin is None:
            pytest.skip("needs the optional `sweep` extra (hydra-optuna-sweeper)")
        raise
    assert cfg.hydra.runtime.choices[group] == choice
    # Everything outside hydra.* resolves (model=hf deliberately leaves name_or_path ???).
    body = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    OmegaConf.to_container(body, resolve=True, throw_on_missing=(group, choice) != ("model", "hf"))

    if (group, choice) in NEEDS_GPU and not torch.cuda.is_available():
        assert cfg.trainer.accelerator == "gpu"
        return
    if (group, choice) in NEEDS_DEEPSPEED and importlib.util.find_spec("deepspeed") is None:
        assert cfg.trainer.strategy._target_.endswith("DeepSpeedStrategy")
        return
    make_trainer = make_trainer_factory(cfg)
    trainer = make_trainer(str(tmp_path / "stage"), {"max_steps": 3, "lr": 0.1})
    assert trainer.max_steps == 3
    if group == "strategy" and choice.startswith("ddp"):
        assert isinstance(trainer.strategy, DDPStrategy)
    if group == "precision" and choice != "16-mixed":  # Lightning maps 16-mixed to bf16 on CPU
        assert trainer.precision == choice
    if group == "logger":
        expected = {"none": 0, "many": 2}.get(choice, 1)
        assert len(trainer.loggers) == expected
        for lg in trainer.loggers:
            assert lg.save_dir == str(tmp_path / "stage")


def test_stage_settings_reach_the_trainer(compose_cfg, tmp_path):
    cfg = compose_cfg("stage=sft")
    extra = L.Callback()
    trainer = make_trainer_factory(cfg)(
        str(tmp_path / "stage"),
        {"max_epochs": 3, "gradient_clip_val": 0.5, "lr": 1e-3, "trainer": {"max_steps": 5}},
        [extra],
    )
    assert (trainer.max_epochs, trainer.max_steps, trainer.gradient_clip_val) == (3, 5, 0.5)
    assert trainer.default_root_dir == str(tmp_path / "stage")
    assert extra in trainer.callbacks
    assert any(isinstance(c, TQDMProgressBar) for c in trainer.callbacks)
    assert any(isinstance(c, ModelCheckpoint) and c.save_last for c in trainer.callbacks)
    assert isinstance(trainer.logger, CSVLogger)


@pytest.mark.parametrize(
    "override, message",
    [
        ("+sft.lrr=1e-3", "+sft.lrr=1e-3: no config file defines 'sft.lrr'"),
        ("+model.gradient_checkpointing=true", "no config file defines 'model.gradient_checkpoint"),
        ("+trainer.max_stepz=2", "lightning.Trainer has no argument 'max_stepz'"),
    ],
)
def test_cli_unknown_added_key_is_one_clear_line(tmp_path, override, message):
    proc = _train_cli(tmp_path, "stage=sft", "debug=fast", override)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-3000:]
    assert not (tmp_path / "data").exists()  # found before the world is generated


def test_callback_can_be_nulled(compose_cfg, tmp_path):
    cfg = compose_cfg("callbacks.checkpoint=null", "logger=none")
    trainer = make_trainer_factory(cfg)(str(tmp_path / "stage"), {})
    assert not any(isinstance(c, ModelCheckpoint) and c.save_last for c in trainer.callbacks)
    assert trainer.loggers == []


def test_unknown_choice_is_a_clear_hydra_error(compose_cfg):
    with pytest.raises(MissingConfigException) as err:
        compose_cfg("stage=nonsense")
    msg = str(err.value)
    assert "stage/nonsense" in msg and "sft" in msg  # names the bad choice and the options


def _as_multirun(cfg):
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.mode = RunMode.MULTIRUN
    HydraConfig().set_config(cfg)
    return cfg


def test_hydra_state_is_cleared_between_tests():
    # Runs after the compose tests above (file order): the fixture left no HydraConfig behind.
    assert not HydraConfig.initialized()
    assert not GlobalHydra.instance().is_initialized()


def test_multirun_with_ddp_is_refused(compose_cfg):
    cfg = _as_multirun(compose_cfg("strategy=ddp"))
    with pytest.raises(SystemExit, match="ddp_fork"):
        _check_multirun_strategy(cfg)
    popen = _as_multirun(compose_cfg("strategy=ddp_fork", "trainer.strategy.start_method=popen"))
    with pytest.raises(SystemExit, match="multirun"):
        _check_multirun_strategy(popen)
    for ok in ("ddp_fork", "ddp_spawn", "auto"):  # no relaunch of the script: allowed
        _check_multirun_strategy(_as_multirun(compose_cfg(f"strategy={ok}")))
    _check_multirun_strategy(compose_cfg("strategy=ddp"))  # a single run is fine


def _train_cli(tmp_path, *overrides, timeout=120):
    """``python train.py *overrides`` with LIT_RLHF_HOME=tmp_path, quiet and single-threaded."""
    env = {
        **os.environ,
        "LIT_RLHF_HOME": str(tmp_path),
        "TQDM_DISABLE": "1",
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cli_missing_data_file_is_one_clear_line(tmp_path, tok, tiny_gpt2):
    pytest.importorskip("lit_rlhf.data.embedded")
    base = tmp_path / "base"
    tiny_gpt2(num_layers=1).save_pretrained(base)
    tok.save_pretrained(base)
    missing = tmp_path / "no_such_demos.jsonl"
    proc = _train_cli(
        tmp_path,
        "stage=sft",
        f"data.demonstrations={missing}",
        f"model.name_or_path={base}",
        "logger=none",
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if str(missing) in ln]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith("error:") and "does not exist" in errors[0]
    # Once on the terminal (stdout and stderr together), and kept in the run's train.log.
    assert sum(str(missing) in ln for ln in (proc.stdout + proc.stderr).splitlines()) == 1
    logs = list((tmp_path / "logs").rglob("train.log"))
    assert logs and any(str(missing) in p.read_text() for p in logs)
    exports = tmp_path / "exports"  # no export folder (the hidden .locks folder is not one)
    assert not exports.exists() or not [p for p in exports.iterdir() if not p.name.startswith(".")]


def test_isolated_rng_hands_the_caller_its_rng_state_back():
    import random

    import numpy as np
    import torch

    from lit_rlhf.stages.context import isolated_rng

    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    expected = (torch.rand(2), random.random(), np.random.rand())
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    with isolated_rng():
        torch.manual_seed(99)
        torch.rand(5), random.random(), np.random.rand()
    got = (torch.rand(2), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


def test_beta_sweeps_fix_beta(compose_cfg):
    # The default PPO adapts beta towards ppo.kl_target; a sweep over beta needs it fixed, or
    # every job would be steered to the same KL and the gold-vs-KL curve would be one point.
    assert compose_cfg().ppo.kl_target is not None
    assert compose_cfg("experiment=kl_sweep").ppo.kl_target is None
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    assert compose_cfg("hparams_search=ppo_kl").ppo.kl_target is None


def test_ppo_micro_batch_that_would_drop_episodes_stops_before_loading(compose_cfg, tmp_path):
    from lit_rlhf.stages.ppo import run_ppo

    # 64 prompts in 2 minibatches of 32: micro-batches of 5 would train on 30 of each 32.
    cfg = compose_cfg("stage=ppo", "ppo.micro_batch_size=5")
    with open_dict(cfg):
        cfg.pop("hydra")
    cfg = OmegaConf.to_container(cfg, resolve=True)
    ctx = StageContext(cfg=cfg, run_dir=str(tmp_path), make_trainer=None)
    with pytest.raises(ConfigError, match=r"micro_batch_size \(5\).*2 episodes"):
        run_ppo(ctx)
    assert not (tmp_path / "exports").exists()  # nothing was built or loaded first


@pytest.mark.parametrize(
    ("stage", "override"),
    [
        ("pretrain", "pretrain.max_epochs=0"),
        ("sft", "sft.max_epochs=0"),
        ("rm", "rm.max_epochs=0"),
        ("ppo", "ppo.n_rollouts=0"),
        ("ppo", "ppo.n_rollouts=-3"),
        ("pipeline", "rm.max_epochs=0"),  # found before pretrain and SFT train
    ],
)
def test_zero_length_runs_are_refused_before_anything_is_built(
    compose_cfg, tmp_path, stage, override
):
    from lit_rlhf.stages.lm import run_pretrain, run_sft
    from lit_rlhf.stages.ppo import run_ppo
    from lit_rlhf.stages.report import run_pipeline
    from lit_rlhf.stages.rm import run_rm

    runners = {"pretrain": run_pretrain, "sft": run_sft, "rm": run_rm, "ppo": run_ppo}
    runners["pipeline"] = run_pipeline
    cfg = compose_cfg(f"stage={stage}", override)
    with open_dict(cfg):
        cfg.pop("hydra")
    cfg = OmegaConf.to_container(cfg, resolve=True)
    ctx = StageContext(cfg=cfg, run_dir=str(tmp_path), make_trainer=None)
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{key}=.*at least one step"):
        runners[stage](ctx)
    assert not (tmp_path / "exports").exists() and not (tmp_path / "data").exists()


@pytest.mark.parametrize(
    ("stage", "override", "message"),
    [
        ("sft", "sft.schedule=cosinee", "sft.schedule='cosinee': use one of cosine"),
        ("pretrain", "pretrain.lr=0", "pretrain.lr=0: use a finite number > 0"),
        ("rm", "rm.batch_size=0", "rm.batch_size=0: use an integer >= 1"),
        ("ppo", "ppo.temperature=0", "ppo.temperature=0: use a finite number > 0"),
        ("ppo", "ppo.clip_range=-1", "ppo.clip_range=-1: use a finite number > 0"),
        ("ppo", "ppo.max_new_tokens=0", "ppo.max_new_tokens=0: use an integer >= 1"),
        ("label", "label.k_max=3", "label.k_min=4 > label.k_max=3"),
        ("label", "label.k_min=1", "label.k_min=1: use an integer >= 2"),
        ("pipeline", "ppo.batch_size=0", "ppo.batch_size=0"),  # before pretrain trains
        ("pipeline", "ppo.micro_batch_size=3", "ppo.micro_batch_size (3) must be >= 1 and divide"),
        ("sft", "seed=abc", "seed='abc': the seed must be an integer"),
        ("ppo", "ppo.kl_coef=-0.1", "ppo.kl_coef=-0.1: use a finite number >= 0"),
        ("sft", "precision=16-mixed", "precision=16-mixed needs a CUDA GPU"),
        ("rm", "guard.nonfinite=ignore", "guard.nonfinite='ignore': use stop or skip"),
        ("ppo", "guard.divergence_factor=0.5", "guard.divergence_factor=0.5: use a finite"),
        ("sft", "guard.on_divergence=quiet", "guard.on_divergence='quiet': use error or warn"),
        ("pipeline", "stage.stages=[pretrain,sftt]", "stage.stages has ['sftt']: choose from"),
        ("ppo", "ppo.advantage_estimator=grpo", "ppo.advantage_estimator=grpo: grpo compares"),
        ("ppo", "experiment=dr_grpo ppo.group_size=1", "dr_grpo: dr_grpo compares each"),
        ("ppo", "ppo.advantage_estimator=ppo2", "ppo.advantage_estimator='ppo2': use gae or"),
        ("ppo", "experiment=rloo ppo.group_size=3", "ppo.batch_size=64 is not a multiple of"),
        ("ppo", "experiment=grpo ppo.whiten_advantages=true", "ppo.whiten_advantages=true only"),
    ],
)
def test_impossible_settings_are_one_line_before_anything_is_built(
    compose_cfg, tmp_path, stage, override, message
):
    from lit_rlhf.run import runners

    cfg = compose_cfg(f"stage={stage}", *override.split())
    with open_dict(cfg):
        cfg.pop("hydra")
    cfg = OmegaConf.to_container(cfg, resolve=True)
    ctx = StageContext(cfg=cfg, run_dir=str(tmp_path), make_trainer=None)
    with pytest.raises(ConfigError, match=re.escape(message)):
        runners()[stage](ctx, stage)
    assert not (tmp_path / "exports").exists() and not (tmp_path / "data").exists()


@pytest.mark.parametrize("extra", [(), ("debug=fast",)])
def test_default_settings_pass_every_stage_check(compose_cfg, extra):
    from lit_rlhf.stages.checks import SECTIONS, check_stage_config

    cfg = compose_cfg(*extra)
    with open_dict(cfg):
        cfg.pop("hydra")
    cfg = OmegaConf.to_container(cfg, resolve=True)
    for stage in [*SECTIONS, "eval"]:
        check_stage_config(cfg, stage)


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_nan_loss_stops_stage_and_exports_nothing(tmp_path, tok, tiny_gpt2, stage):
    base = tmp_path / "base"
    tiny_gpt2(num_layers=1).save_pretrained(base)
    tok.save_pretrained(base)
    # The RM starts from the (finite) base model, so only its own lr can diverge.
    init = [f"rm.init_from={base}", "rm.bias_samples=0"] if stage == "rm" else []
    proc = _train_cli(
        tmp_path,
        "debug=fast",
        f"stage={stage}",
        f"{stage}.lr=1e30",
        f"model.name_or_path={base}",
        "logger=none",
        *init,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    # Stopped by the training-loop guard at the first non-finite loss, naming stage and step.
    assert len(errors) == 1 and f"[{stage}]" in errors[0], proc.stderr[-3000:]
    assert re.search(r"loss is nan at optimizer step \d+", errors[0]), errors[0]
    exports = tmp_path / "exports"
    assert not list(exports.glob(f"{stage}-*")), list(exports.iterdir())
