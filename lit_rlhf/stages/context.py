"""What every stage runner receives, and how stages find (or build) their upstream exports.

The stage graph of the recipe::

    pretrain -> sft -> label (comparisons) -> rm -> ppo / ppo_ptx -> eval

Every stage writes an export folder under ``paths.exports_dir`` named
``<stage>-<fingerprint>``; the fingerprint hashes the stage's settings and its upstream
fingerprints, so the same config finds the same folder and reuses it. A user-given input
path (e.g. ``ppo.reward_path=/my/rm``) bypasses the graph; when it does not exist the error
names the stage that makes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import numpy as np
import torch

from lit_rlhf.data.embedded import EmbeddedWorldConfig, EmbeddedWorldFiles, build_embedded_world
from lit_rlhf.stages.registry import STAGES

log = logging.getLogger("lit_rlhf")


@contextmanager
def isolated_rng() -> Iterator[None]:
    """Run a block without changing the caller's Python, NumPy and torch (CPU, CUDA) RNGs."""
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


# Views of the stage registry (lit_rlhf/stages/registry.py), for the code that reads them.
#: stage -> config keys (top-level sections) whose values change its output.
STAGE_SETTINGS = {n: s.settings for n, s in STAGES.items() if s.exports}
#: Stages trained by a Lightning Trainer (their exports depend on its precision).
TRAINED_STAGES = tuple(n for n, s in STAGES.items() if s.trained)
#: stage -> upstream stages it reads.
UPSTREAM = {n: s.upstream for n, s in STAGES.items() if s.exports}
#: stage -> ``data.<key>`` sources it reads (besides ``embedded`` and ``fields``, which every
#: stage's defaults depend on). Upstream data reaches a stage through upstream fingerprints, so
#: e.g. new comparisons retrain the RM and PPO but reuse pretrain and SFT.
STAGE_DATA = {n: s.data for n, s in STAGES.items() if s.exports}
#: Trainer arguments that change what a stage trains -> their neutral value (the shipped
#: trainer configs leave them at it). ``trainer.precision`` is hashed separately.
TRAINER_RESULT_KEYS = {
    "max_steps": -1,
    "max_epochs": None,
    "min_steps": None,
    "min_epochs": None,
    "max_time": None,
    "limit_train_batches": None,
    "overfit_batches": 0.0,
    "accumulate_grad_batches": 1,
    "gradient_clip_val": None,
    "gradient_clip_algorithm": None,
    "devices": 1,
    "num_nodes": 1,
    "deterministic": None,
}
#: Settings added after exports of their stage existed -> the value that behaves as before.
#: At that value a setting is left out of the fingerprint, so a new option does not rename
#: (and retrain) every existing export; any other value is hashed.
ADDED_DEFAULTS = {"ppo": {"advantage_estimator": "gae", "group_size": 1}}
#: Keys that never change a stage's result (where things go, how often to log).
_NEUTRAL = {
    "export_dir",
    "log_every_n_steps",
    "progress",
    "enable_checkpointing",
    "checkpoint_every",
}


class MissingInputError(FileNotFoundError):
    """A user-given stage input does not exist."""


class ConfigError(ValueError):
    """An impossible setting, caught before any training starts."""


#: Each trained stage's run-length setting: (config section, key).
RUN_LENGTH = {n: s.run_length for n, s in STAGES.items() if s.run_length}


def check_run_length(cfg: dict, stage: str) -> None:
    """Raise :class:`ConfigError` unless ``stage``'s run length is an integer >= 1.

    A zero-length run would export the untrained starting model under the stage's name, and
    every later stage would reuse it as if it had been trained. Stages without a run length
    (data, label, eval) pass.
    """
    if stage not in RUN_LENGTH:
        return
    section, key = RUN_LENGTH[stage]
    value = cfg[section].get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(
            f"{section}.{key}={value!r}: a stage must train for at least one step "
            f"(a zero-length run would export the untrained model as finished); use >= 1"
        )


@dataclass
class StageContext:
    """Plain-Python view of a run, handed to every stage runner.

    Attributes:
        cfg: The fully resolved config as nested dicts (no OmegaConf objects).
        run_dir: The Hydra run directory of this invocation.
        make_trainer: ``make_trainer(stage_dir, stage_cfg, callbacks) -> Trainer`` built from
            the trainer/strategy/precision/logger/callbacks config groups.
        runners: Stage name -> runner, so a stage can build a missing upstream stage.
    """

    cfg: dict
    run_dir: str
    make_trainer: Callable[..., L.Trainer]
    runners: dict[str, Callable[[StageContext, str], str]] = field(default_factory=dict)
    _world: EmbeddedWorldFiles | None = None
    _fingerprints: dict[str, str] = field(default_factory=dict)

    # -- data ---------------------------------------------------------------------------
    def world_config(self) -> EmbeddedWorldConfig:
        """The embedded world's settings (``data.embedded`` over the dataclass defaults)."""
        try:
            return EmbeddedWorldConfig(**dict(self.cfg["data"].get("embedded") or {}))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"data.embedded: {err}") from None

    def world(self) -> EmbeddedWorldFiles:
        """The embedded review world's files (generated on first use, then reused)."""
        if self._world is None:
            self._world = build_embedded_world(self.world_config(), self.cfg["paths"]["data_dir"])
        return self._world

    def data_source(self, key: str) -> str:
        """User-given data source ``data.<key>``, or the embedded world's file for it."""
        given = self.cfg["data"].get(key)
        if given:
            return str(given)
        world_attr = {
            "demonstrations": "demos_train",
            "demonstrations_val": "demos_val",
            "pretrain": "pretrain_train",
            "pretrain_val": "pretrain_val",
            "prompts": "prompts_ppo",
            "comparison_prompts": "prompts_comparison",
            "eval_prompts": "prompts_eval",
        }
        if key not in world_attr:
            raise KeyError(f"no embedded default for data.{key}; set data.{key}=<path>")
        return str(getattr(self.world(), world_attr[key]))

    def uses_embedded_world_data(self, key: str) -> bool:
        """True when ``data.<key>`` is not given, i.e. the embedded world provides it."""
        return not self.cfg["data"].get(key)

    @property
    def fields(self) -> dict[str, str]:
        """Field-name mapping for user data (``data.fields``)."""
        return dict(self.cfg["data"].get("fields") or {})

    def uses_embedded_tokenizer(self) -> bool:
        """True when the recipe starts from the tiny model trained on the embedded corpus."""
        return not self.cfg["model"].get("name_or_path")

    def guard(self, stage: str):
        """The training-loop guard of a trained ``stage``, from the ``guard`` section."""
        from lit_rlhf.callbacks.finite_guard import FiniteGuard

        return FiniteGuard(stage, STAGES[stage].lr_setting, **(self.cfg.get("guard") or {}))

    # -- stage graph --------------------------------------------------------------------
    def stage_dir(self, stage: str) -> str:
        """Where a stage writes logs/metrics in this run.

        The run dir itself for a single stage, ``<run_dir>/<stage>`` inside the pipeline.
        """
        if self.cfg["stage"]["name"] == stage:
            return self.run_dir
        path = os.path.join(self.run_dir, stage)
        os.makedirs(path, exist_ok=True)
        return path

    def fingerprint(self, stage: str) -> str:
        """Hash of everything that determines ``stage``'s output, upstream included."""
        if stage not in self._fingerprints:
            parts: dict[str, Any] = {"stage": stage, "seed": self.cfg.get("seed")}
            for key in STAGE_SETTINGS[stage]:
                section = self.cfg.get(key) or {}
                parts[key] = {
                    # A resumed run continues the same result, so it keeps the folder (and
                    # finds its checkpoints); hashed as null to keep older folder names.
                    k: None if k == "resume_from" else v
                    for k, v in section.items()
                    if k not in _NEUTRAL
                    and not (k in ADDED_DEFAULTS.get(key, {}) and v == ADDED_DEFAULTS[key][k])
                }
            data = self.cfg["data"]
            parts["data"] = {k: data.get(k) for k in ("fields", *STAGE_DATA[stage])}
            # The world's fingerprint covers every field (defaults and generator version
            # included), not just the keys the YAML happens to set.
            parts["data"]["embedded"] = self.world_config().fingerprint()
            if stage in ("ppo", "ppo_ptx"):
                # ptx.enabled only selects which of the two PPO stages runs, and plain PPO
                # ignores the other ptx settings: tuning gamma must not retrain PPO.
                ptx = dict(parts["ppo"].get("ptx") or {}) if stage == "ppo_ptx" else {}
                ptx.pop("export_dir", None)
                ptx["enabled"] = stage == "ppo_ptx"
                parts["ppo"]["ptx"] = ptx
            if stage in TRAINED_STAGES:
                trainer = self.cfg.get("trainer") or {}
                # The arithmetic changes the weights: a bf16 run must not reuse fp32 exports.
                parts["precision"] = str(trainer.get("precision", ""))
                # So do run length, accumulation, clipping and the world size. Only settings
                # that differ from the neutral value enter the hash, so the default's folders
                # keep their names.
                changed = {
                    k: trainer[k]
                    for k in sorted(trainer)
                    if k in TRAINER_RESULT_KEYS and trainer[k] != TRAINER_RESULT_KEYS[k]
                }
                if changed:
                    parts["trainer"] = changed
                # Skipping non-finite steps trains other weights than stopping would; the
                # default (stop) adds nothing, so the default's folders keep their names.
                guard = self.cfg.get("guard") or {}
                if guard.get("nonfinite", "stop") != "stop":
                    parts["guard"] = {k: guard.get(k) for k in ("nonfinite", "max_skipped_steps")}
            parts["upstream"] = [self.fingerprint(u) for u in UPSTREAM[stage] if self._in_graph(u)]
            blob = json.dumps(parts, sort_keys=True, default=str).encode()
            self._fingerprints[stage] = hashlib.sha256(blob).hexdigest()[:10]
        return self._fingerprints[stage]

    def _in_graph(self, stage: str) -> bool:
        return not (stage == "pretrain" and not self.uses_embedded_tokenizer())

    def export_dir(self, stage: str) -> str:
        """The export folder of ``stage``: ``<stage>.export_dir`` or the fingerprinted default.

        PPO-ptx reads ``ppo.ptx.export_dir``, and ``ppo.export_dir`` when it is the only PPO
        stage of the run (``stage=ppo ppo.ptx.enabled=true``); inside the pipeline ``ppo`` and
        ``ppo_ptx`` both run, so one ``ppo.export_dir`` cannot name both.
        """
        ppo = self.cfg.get("ppo") or {}
        if stage == "ppo_ptx":
            given = (ppo.get("ptx") or {}).get("export_dir")
            if not given and self.cfg["stage"]["name"] != "pipeline":
                given = ppo.get("export_dir")
        else:
            given = (self.cfg.get(stage) or {}).get("export_dir")
        if given:
            return str(given)
        return os.path.join(self.cfg["paths"]["exports_dir"], f"{stage}-{self.fingerprint(stage)}")

    def checkpoint_dir(self, stage: str) -> str:
        """Where ``stage`` keeps its periodic checkpoints: one folder per config fingerprint."""
        name = f"{stage}-{self.fingerprint(stage)}"
        return os.path.join(self.cfg["paths"]["exports_dir"], ".checkpoints", name)

    def resume_path(self, stage: str, section: str) -> str | None:
        """``<section>.resume_from`` as a checkpoint path; ``last`` is this config's newest.

        Raises:
            MissingInputError: The file does not exist (or ``last`` has none yet).
            ConfigError: The file is not a PyTorch checkpoint (e.g. truncated).
        """
        given = (self.cfg.get(section) or {}).get("resume_from")
        if not given:
            return None
        what = f"{section}.resume_from={given}"
        if given == "last" and stage not in ("ppo", "ppo_ptx"):
            raise ConfigError(
                f"{what}: `last` finds PPO's periodic checkpoints; for {stage} pass the "
                f"last.ckpt under its run's logs folder (logs/<run>/{stage}/.../checkpoints)"
            )
        path = os.path.join(self.checkpoint_dir(stage), "last.ckpt") if given == "last" else given
        if not os.path.exists(path):
            hint = "no checkpoint of this config was saved yet" if given == "last" else "no file"
            raise MissingInputError(f"{what}: {hint} at {path}; start without resume_from")
        if os.path.isfile(path) and not zipfile.is_zipfile(path):
            raise ConfigError(
                f"{what}: {path} is not a PyTorch checkpoint (truncated or another format); "
                "point it at a last.ckpt this kit saved"
            )
        return path

    def require(self, stage: str, given: str | None = None, what: str = "") -> str:
        """Path of an upstream export, building the embedded default's when it is missing.

        Args:
            stage: The stage that makes the input.
            given: A user-given path for it (from an override); must exist.
            what: The override name, for the error message.
        """
        from lit_rlhf.callbacks.hf_export import (
            ExportError,
            export_lock,
            export_problem,
            is_complete_export,
        )

        if given:
            if not os.path.exists(given):
                raise MissingInputError(
                    f"{what or 'input'}='{given}' does not exist; it is made by "
                    f"`python train.py stage={stage.replace('_ptx', '')}` (or point {what} at an "
                    "existing folder)"
                )
            problem = export_problem(given) if is_complete_export(given) else None
            if problem:
                raise ExportError(
                    f"{what or 'input'}='{given}' is damaged: {problem}; rebuild it with "
                    f"`python train.py stage={stage.replace('_ptx', '')}` or restore the folder"
                )
            return given
        path = self.export_dir(stage)
        with export_lock(path, stage):
            if is_complete_export(path):
                problem = export_problem(path)
                if problem is None:
                    log.info("[%s] reusing existing output %s", stage, path)
                    return path
                log.warning(
                    "[%s] %s looks finished, but %s: building it again", stage, path, problem
                )
            else:
                log.info(
                    "[%s] output for this config is missing (%s): building it first", stage, path
                )
            # A stage's result must not depend on whether its upstream was built in this process
            # or reused from disk: the upstream build starts from a fresh seed, and the caller gets
            # its own RNG state back afterwards (measured: without the restore, `stage=sft` from
            # scratch and `stage=sft` with pretrain on disk trained SFT models 0.29 apart).
            with isolated_rng():
                L.seed_everything(self.cfg.get("seed", 0), workers=True, verbose=False)
                return self.runners[stage](self, stage)
