"""Settings a stage cannot run with, found before anything is built or trained.

Each rule names one key, so the error is one line that says which setting and what to use
(``sft.schedule='cosinee': one of cosine, linear, constant``), instead of a traceback from
the LR scheduler or the sampler mid-run. :func:`check_stage_config` runs for the stage being
started and, in the pipeline, for every step before the first one trains.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from lit_rlhf.ops.critic_free import CRITIC_FREE, check_estimator
from lit_rlhf.ops.schedules import SCHEDULES
from lit_rlhf.rollout.record import split_episodes
from lit_rlhf.stages.context import TRAINED_STAGES, ConfigError, check_run_length
from lit_rlhf.stages.registry import STAGES


def _int_at_least(low: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low


def _positive(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _one_of(choices: tuple[str, ...]) -> Callable[[Any], bool]:
    return lambda v: v in choices


def _non_negative(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def _optional(rule: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or rule(v)


_COUNT = (_int_at_least(1), "an integer >= 1")
_POSITIVE = (_positive, "a finite number > 0")
_SCHEDULE = (_one_of(SCHEDULES), "one of " + ", ".join(SCHEDULES))
_OPTIMIZER = {"lr": _POSITIVE, "schedule": _SCHEDULE, "batch_size": _COUNT}

#: Config section -> key -> (rule, what a valid value is). A key absent from the config is
#: not checked here (the stage's own defaults apply).
RULES: dict[str, dict[str, tuple[Callable[[Any], bool], str]]] = {
    "pretrain": dict(_OPTIMIZER),
    "sft": dict(_OPTIMIZER),
    "rm": dict(_OPTIMIZER),
    "ppo": {
        **_OPTIMIZER,
        "max_new_tokens": _COUNT,
        "temperature": _POSITIVE,
        "clip_range": _POSITIVE,
        "kl_coef": (_non_negative, "a finite number >= 0 (beta of the KL penalty)"),
        "value_clip_range": (_optional(_positive), "null or a finite number > 0"),
        "advantage_estimator": (_one_of(("gae", *CRITIC_FREE)), "gae or " + ", ".join(CRITIC_FREE)),
        "group_size": _COUNT,
    },
    "guard": {
        "nonfinite": (_one_of(("stop", "skip")), "stop or skip"),
        "max_skipped_steps": (_int_at_least(0), "an integer >= 0"),
        "divergence_factor": (lambda v: _positive(v) and v > 1, "a finite number > 1"),
        "divergence_window": _COUNT,
        "on_divergence": (_one_of(("error", "warn")), "error or warn"),
    },
    "label": {
        "k_min": (_int_at_least(2), "an integer >= 2 (a ranking needs two responses)"),
        "k_max": (_int_at_least(2), "an integer >= label.k_min"),
        "temperature": _POSITIVE,
        "max_new_tokens": _COUNT,
        "batch_size": _COUNT,
    },
}

#: Stage -> the config sections it trains or samples with (from the stage registry).
SECTIONS = {n: s.checks for n, s in STAGES.items() if s.checks}


def check_seed(cfg: dict) -> None:
    """Raise :class:`ConfigError` unless ``cfg["seed"]`` is an integer (``seed=abc``)."""
    seed = cfg.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed={seed!r}: the seed must be an integer, e.g. seed=1")


def check_precision(cfg: dict) -> None:
    """Raise :class:`ConfigError` for a precision the run's device would silently replace.

    Lightning swaps ``16-mixed`` for ``bf16-mixed`` on CPU with a warning, so the export
    would be bf16-trained under a 16-mixed fingerprint.
    """
    import torch

    trainer = cfg.get("trainer") or {}
    precision = str(trainer.get("precision", ""))
    accelerator = str(trainer.get("accelerator") or "auto")
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if precision in ("16-mixed", "16") and on_cpu:
        raise ConfigError(
            f"precision={precision} needs a CUDA GPU (fp16 autocast); on CPU Lightning would "
            "run bf16-mixed instead: use precision=bf16-mixed or precision=32-true"
        )


def check_stage_config(cfg: dict, stage: str) -> None:
    """Raise :class:`ConfigError` for the first setting ``stage`` cannot run with.

    Args:
        cfg: The resolved run config as nested dicts.
        stage: A stage name (``pretrain``, ``sft``, ``label``, ``rm``, ``ppo``, ``ppo_ptx``,
            ``eval``); stages without rules pass.
    """
    check_seed(cfg)
    check_run_length(cfg, stage)
    if stage in TRAINED_STAGES:
        check_precision(cfg)
    for section in SECTIONS.get(stage, ()):
        values = cfg.get(section) or {}
        for key, (ok, valid) in RULES[section].items():
            if key in values and not ok(values[key]):
                raise ConfigError(f"{section}.{key}={values[key]!r}: use {valid}")
    if stage == "label":
        k_min, k_max = cfg["label"].get("k_min", 2), cfg["label"].get("k_max", 2)
        if k_max < k_min:
            raise ConfigError(
                f"label.k_min={k_min} > label.k_max={k_max}: K is drawn from [k_min, k_max]; "
                "use k_min <= k_max"
            )
    if stage in ("ppo", "ppo_ptx"):
        ppo = cfg["ppo"]
        _check_advantage_estimator(ppo)
        try:  # divisibility: a remainder would drop episodes from every PPO epoch
            split_episodes(ppo["batch_size"], ppo["num_minibatches"], ppo.get("micro_batch_size"))
        except ValueError as e:
            raise ConfigError(str(e)) from None


def _check_advantage_estimator(ppo: dict) -> None:
    """The estimator, the group size and the batch must fit together (checked as one)."""
    kind, k = ppo.get("advantage_estimator", "gae"), ppo.get("group_size", 1)
    if ppo["batch_size"] % k:
        raise ConfigError(
            f"ppo.batch_size={ppo['batch_size']} is not a multiple of ppo.group_size={k}: "
            "each prompt is sampled group_size times"
        )
    try:
        check_estimator(kind, k)
    except ValueError as err:
        raise ConfigError(f"ppo.advantage_estimator={kind}: {err} (ppo.group_size)") from None
    if kind != "gae" and ppo.get("whiten_advantages"):
        raise ConfigError(
            f"ppo.whiten_advantages=true only applies to gae; {kind} normalizes its own "
            "advantages: set ppo.whiten_advantages=false"
        )
