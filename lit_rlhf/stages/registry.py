"""The stage registry: one declaration per stage, read by everything that walks the graph.

The fingerprints (which settings, data and upstream stages a stage's export depends on), the
"build a missing upstream" logic, the run-length and config checks, the training-loop guard
and ``python train.py stage=<name>`` all read :data:`STAGES`. Adding a stage is one runner
module, one :class:`StageSpec` here and its ``conf/`` files.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class StageSpec:
    """What the kit needs to know about one stage.

    Attributes:
        name: ``stage=<name>`` on the command line; exports go to ``<name>-<fingerprint>``.
        runner: ``"module:function"``, the function ``(ctx, name) -> output path``
            (imported when first run, so the registry imports no stage code).
        label: How reports and logs name it.
        settings: Top-level config sections whose values change its output (hashed into its
            fingerprint). Empty for stages without an export (eval, pipeline).
        upstream: Stages whose exports it reads (built first when missing).
        data: ``data.<key>`` sources it reads (besides ``embedded`` and ``fields``, which
            every stage's defaults depend on).
        run_length: ``(section, key)`` of the setting that says how long it trains, for the
            trained stages (a Lightning fit whose export depends on the trainer's settings).
        checks: Config sections whose values :mod:`~lit_rlhf.stages.checks` validates.
        lr_setting: The learning-rate key named by the training-loop guard's advice.
    """

    name: str
    runner: str
    label: str
    settings: tuple[str, ...] = ()
    upstream: tuple[str, ...] = ()
    data: tuple[str, ...] = ()
    run_length: tuple[str, str] | None = None
    checks: tuple[str, ...] = ()
    lr_setting: str | None = None

    @property
    def trained(self) -> bool:
        """Trained by a Lightning Trainer (its export depends on precision and the like)."""
        return self.run_length is not None

    @property
    def exports(self) -> bool:
        """Writes a fingerprinted export folder that later stages and runs reuse."""
        return bool(self.settings)

    def load_runner(self) -> Callable:
        """The runner function (imported now)."""
        module, _, function = self.runner.partition(":")
        return getattr(importlib.import_module(module), function)


_PPO = dict(
    runner="lit_rlhf.stages.ppo:run_ppo",
    settings=("ppo",),
    upstream=("sft", "rm"),
    run_length=("ppo", "n_rollouts"),
    checks=("ppo", "guard"),
    lr_setting="ppo.policy_lr",
)

#: Every stage, in pipeline order. ``ppo_ptx`` is ``stage=ppo ppo.ptx.enabled=true``: the same
#: runner with its own export folder and fingerprint.
STAGES: dict[str, StageSpec] = {
    s.name: s
    for s in (
        StageSpec(
            "pretrain",
            "lit_rlhf.stages.lm:run_pretrain",
            "base (pretrained)",
            settings=("model", "pretrain"),
            data=("pretrain", "pretrain_val"),
            run_length=("pretrain", "max_epochs"),
            checks=("pretrain", "guard"),
            lr_setting="pretrain.lr",
        ),
        StageSpec(
            "sft",
            "lit_rlhf.stages.lm:run_sft",
            "SFT",
            settings=("model", "sft"),
            upstream=("pretrain",),
            data=("demonstrations", "demonstrations_val"),
            run_length=("sft", "max_epochs"),
            checks=("sft", "guard"),
            lr_setting="sft.lr",
        ),
        StageSpec(
            "label",
            "lit_rlhf.stages.label:run_label",
            "comparisons",
            settings=("label",),
            upstream=("sft",),
            data=("comparison_prompts",),
            checks=("label",),
        ),
        StageSpec(
            "rm",
            "lit_rlhf.stages.rm:run_rm",
            "RM",
            settings=("rm",),
            upstream=("sft", "label"),
            data=("comparisons", "comparisons_val", "demonstrations"),
            run_length=("rm", "max_epochs"),
            checks=("rm", "guard"),
            lr_setting="rm.lr",
        ),
        StageSpec("ppo", label="PPO", data=("prompts",), **_PPO),
        StageSpec("ppo_ptx", label="PPO-ptx", data=("prompts", "pretrain"), **_PPO),
        StageSpec("eval", "lit_rlhf.stages.report:run_eval", "evaluation"),
        StageSpec("pipeline", "lit_rlhf.stages.report:run_pipeline", "pipeline"),
    )
}


def pipeline_stages() -> list[str]:
    """What ``stage=pipeline`` runs by default: every other stage, in registry order."""
    return [n for n in STAGES if n != "pipeline"]
