"""The one place that turns a Hydra config into objects and runs a stage.

``train.py`` calls :func:`main`. Everything below this module receives plain Python: the
resolved config as nested dicts, finished Trainer objects, and paths.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lit_rlhf.stages.context import UPSTREAM, StageContext
from lit_rlhf.stages.registry import STAGES

log = logging.getLogger("lit_rlhf")

#: Stage-level keys that are Trainer arguments.
TRAINER_KEYS = (
    "max_epochs",
    "max_steps",
    "val_check_interval",
    "check_val_every_n_epoch",
    "log_every_n_steps",
    "limit_train_batches",
    "limit_val_batches",
    "gradient_clip_val",
    "accumulate_grad_batches",
    "num_sanity_val_steps",
    "enable_checkpointing",
)


def _default_root() -> str:
    return os.environ.get("LIT_RLHF_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache", "lit_rlhf"
    )


def register_resolvers() -> None:
    """Register the ``${lit_rlhf_root:}`` resolver (idempotent)."""
    if not OmegaConf.has_resolver("lit_rlhf_root"):
        OmegaConf.register_new_resolver("lit_rlhf_root", _default_root)


register_resolvers()


def runners() -> dict[str, Callable[[StageContext, str], str]]:
    """Stage name -> runner function, from the stage registry."""
    return {name: spec.load_runner() for name, spec in STAGES.items()}


#: Strategies whose processes come from re-running the script (Lightning's subprocess
#: launcher): under ``-m`` every rank would re-run the whole sweep.
_RELAUNCHING = ("ModelParallelStrategy", "FSDP2Strategy", "DeepSpeedStrategy")


def _check_multirun_strategy(cfg: DictConfig) -> None:
    try:
        mode = HydraConfig.get().mode
    except ValueError:  # composed outside @hydra.main (tests)
        return
    strategy = cfg.trainer.get("strategy")
    if isinstance(strategy, str):
        relaunches = strategy == "ddp" or strategy.startswith(
            ("ddp_find_unused_parameters", "fsdp", "deepspeed")
        )
    else:
        # ddp_fork/ddp_spawn are DDPStrategy too; only the default "popen" start relaunches.
        target = str((strategy or {}).get("_target_", ""))
        start = (strategy or {}).get("start_method") or "popen"
        relaunches = (target.endswith("DDPStrategy") and start == "popen") or target.endswith(
            _RELAUNCHING
        )
    if mode == RunMode.MULTIRUN and relaunches:
        raise SystemExit(
            "refusing `-m` (multirun) with a strategy that relaunches the script per rank "
            "(ddp, fsdp, deepspeed): every rank would re-run the whole sweep. Use "
            "strategy=ddp_fork (CPU) or strategy=ddp_spawn, or launch one job per sweep point "
            "with torchrun/SLURM."
        )


def make_trainer_factory(cfg: DictConfig) -> Callable[..., L.Trainer]:
    """Return ``make_trainer(stage_dir, stage_cfg, callbacks)`` built from the config groups."""

    def make_trainer(stage_dir: str, stage_cfg: dict, callbacks: list | None = None) -> L.Trainer:
        cbs = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
        loggers = [
            instantiate(lg, save_dir=stage_dir) for lg in (cfg.get("logger") or {}).values() if lg
        ]
        overrides = {k: stage_cfg[k] for k in TRAINER_KEYS if stage_cfg.get(k) is not None}
        if stage_cfg.get("trainer"):
            overrides.update(stage_cfg["trainer"])
        return instantiate(
            cfg.trainer,
            default_root_dir=stage_dir,
            callbacks=cbs + list(callbacks or []),
            logger=loggers or False,
            **overrides,
        )

    return make_trainer


def _quiet_transformers() -> None:
    """Progress bars and load reports of transformers drown the stage logs on the CLI."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


#: Where ``+key=value`` may add a key the shipped YAML lacks: open mappings (field renames,
#: logger and callback instances, Hydra's own settings) and Trainer arguments, which are
#: checked against ``lightning.Trainer``'s signature. Elsewhere an added key is a typo or a
#: setting this kit does not have, and would be silently ignored.
_OPEN_PREFIXES = ("data.fields.", "callbacks.", "logger.", "hydra.")


def _check_added_keys() -> None:
    """Refuse ``+key=value`` overrides that name a setting no config file defines."""
    import difflib
    import inspect

    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from lit_rlhf.stages.context import ConfigError

    try:
        hc = HydraConfig.get()
    except ValueError:  # composed outside @hydra.main (tests)
        return
    texts = list(hc.overrides.task)
    parsed = OverridesParser.create().parse_overrides(texts)
    loader = GlobalHydra.instance().config_loader()
    trainer_args = set(inspect.signature(L.Trainer.__init__).parameters) - {"self"}
    suspects = []
    for text, over in zip(texts, parsed, strict=True):
        key = over.key_or_group
        if not (over.is_add() or over.is_force_add()) or key.startswith(_OPEN_PREFIXES):
            continue
        if "." not in key and loader.get_group_options(key):
            continue  # a config group, e.g. +experiment=seeds
        section, _, leaf = key.rpartition(".")
        if section == "trainer" or section.endswith(".trainer"):
            if leaf not in trainer_args:
                close = difflib.get_close_matches(leaf, sorted(trainer_args), n=1)
                hint = f" (did you mean {section}.{close[0]}?)" if close else ""
                raise ConfigError(f"{text}: lightning.Trainer has no argument {leaf!r}{hint}")
            continue
        suspects.append((text, key))
    if not suspects:
        return
    # Which of them exist without the additions (``++sft.lr=1`` on a real key is fine)?
    others = [t for t, o in zip(texts, parsed, strict=True) if t not in {s for s, _ in suspects}]
    base = compose(config_name=hc.job.config_name, overrides=others)
    for text, key in suspects:
        if OmegaConf.select(base, key, default=_ABSENT) is not _ABSENT:
            continue
        parent = OmegaConf.select(base, key.rpartition(".")[0]) if "." in key else base
        known = sorted(parent.keys()) if isinstance(parent, DictConfig) else []
        close = difflib.get_close_matches(key.rpartition(".")[2], [str(k) for k in known], n=1)
        hint = f"did you mean {key.rpartition('.')[0]}.{close[0]}? " if close else ""
        raise ConfigError(
            f"{text}: no config file defines {key!r}, so nothing would read it; {hint}"
            "`python train.py --cfg job` lists every setting"
        )


_ABSENT = object()


def run(cfg: DictConfig) -> str:
    """Run the stage selected by ``cfg.stage.name``; returns its output path."""
    _check_multirun_strategy(cfg)
    _check_added_keys()
    _quiet_transformers()
    from lit_rlhf.stages.checks import check_seed

    check_seed({"seed": cfg.get("seed", 0)})
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    run_dir = _run_dir(cfg)
    os.makedirs(run_dir, exist_ok=True)
    plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    table = runners()
    name = cfg.stage.name
    if name == "ppo" and cfg.ppo.ptx.enabled:
        name = "ppo_ptx"  # the same runner; its own export folder and fingerprint
    if name not in table:
        raise SystemExit(f"unknown stage {name!r}; choose one of {sorted(table)}")
    ctx = StageContext(
        cfg=plain, run_dir=run_dir, make_trainer=make_trainer_factory(cfg), runners=table
    )
    if name in UPSTREAM:  # a stage with an export folder: one builder at a time
        from lit_rlhf.callbacks.hf_export import export_lock

        with export_lock(ctx.export_dir(name), name):
            out = table[name](ctx, name)
    else:
        out = table[name](ctx, name)
    log.info("stage %s finished: %s", name, out)
    return out


def main(cfg: DictConfig) -> float | None:
    """Entry point used by ``train.py``.

    Returns:
        The value of ``cfg.optimized_metric`` when it is set (what Hydra's Optuna sweeper
        optimizes), read from the run's ``metrics.json``; None otherwise.
    """
    from lit_rlhf.callbacks.finite_guard import TrainingGuardError
    from lit_rlhf.callbacks.hf_export import ExportError, NonFiniteModelError
    from lit_rlhf.data.records import DataFormatError
    from lit_rlhf.models.loading import ModelLoadError
    from lit_rlhf.models.packing import PackedAttentionError
    from lit_rlhf.rollout import NonFiniteSamplingError
    from lit_rlhf.stages.context import ConfigError, MissingInputError

    errors = (
        DataFormatError,
        ModelLoadError,
        MissingInputError,
        ConfigError,
        PackedAttentionError,
        NonFiniteModelError,
        TrainingGuardError,
        NonFiniteSamplingError,
        ExportError,
    )
    try:
        run(cfg)
    except errors as err:
        # The terminal gets the line once (SystemExit prints it); train.log keeps a copy.
        _log_to_files(logging.ERROR, str(err))
        raise SystemExit(f"error: {err}") from None
    name = cfg.get("optimized_metric")
    return read_run_metric(_run_dir(cfg), name) if name else None


def _log_to_files(level: int, message: str) -> None:
    """Write ``message`` to the log files only (not to the console handlers)."""
    record = log.makeRecord(log.name, level, __file__, 0, message, None, None)
    for logger in (log, logging.getLogger()):
        for handler in logger.handlers:
            if isinstance(handler, logging.FileHandler) and level >= handler.level:
                handler.handle(record)


def _run_dir(cfg: DictConfig) -> str:
    try:
        return HydraConfig.get().runtime.output_dir
    except ValueError:
        return cfg.paths.output_dir


def read_run_metric(run_dir: str, name: str) -> float:
    """A metric of a finished run: ``<run_dir>/metrics.json``, else a stage folder's one.

    Single stages and the pipeline's final summary write ``<run_dir>/metrics.json``; inside
    the pipeline each training stage also writes ``<run_dir>/<stage>/metrics.json``.

    Raises:
        SystemExit: When no metrics.json of the run holds ``name`` (a config error, e.g. a
            metric the selected stage never logs).
    """
    import glob
    import json

    paths = [os.path.join(run_dir, "metrics.json")]
    paths += sorted(glob.glob(os.path.join(run_dir, "*", "metrics.json")))
    for path in paths:
        if os.path.isfile(path):
            with open(path) as fh:
                metrics = json.load(fh)
            if name in metrics:
                return float(metrics[name])
    raise SystemExit(
        f"error: optimized_metric {name!r} is in no metrics.json under {run_dir}; "
        "choose a metric the selected stage writes"
    )


class SweepSummary(Callback):
    """Hydra callback: after a multirun, plot one metric against another across the jobs.

    Reads ``metrics.json`` of every job under the sweep dir and writes
    ``sweep_summary.png``/``.json``/``.md`` there (used by ``experiment=kl_sweep`` for the
    gold-score-vs-KL picture of reward over-optimization).

    Args:
        x: Metric on the x axis (e.g. ``eval/ppo/kl_to_sft``).
        y: Metric on the y axis (e.g. ``eval/ppo/gold``).
        proxy: Optional second y metric drawn on a twin axis (e.g. the RM score).
        label: Override whose value labels each point (e.g. ``ppo.kl_coef``).
    """

    def __init__(self, x: str, y: str, proxy: str | None = None, label: str | None = None) -> None:
        self.x, self.y, self.proxy, self.label = x, y, proxy, label

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        import json

        from lit_rlhf.eval.report import plot_sweep

        sweep_dir = str(config.hydra.sweep.dir)
        rows = []
        for sub in sorted(os.listdir(sweep_dir)):
            job = os.path.join(sweep_dir, sub)
            path = os.path.join(job, "metrics.json")
            if not os.path.isfile(path):
                continue
            metrics = json.load(open(path))
            overrides = os.path.join(job, ".hydra", "overrides.yaml")
            label = sub
            if self.label and os.path.isfile(overrides):
                for line in OmegaConf.load(overrides):
                    if str(line).startswith(self.label + "="):
                        label = str(line)
            if self.x in metrics and self.y in metrics:
                rows.append(
                    {
                        "job": sub,
                        "label": label,
                        "x": metrics[self.x],
                        "y": metrics[self.y],
                        "proxy": metrics.get(self.proxy) if self.proxy else None,
                    }
                )
        if not rows:
            log.warning("sweep summary: no job wrote %s and %s", self.x, self.y)
            return
        with open(os.path.join(sweep_dir, "sweep_summary.json"), "w") as fh:
            json.dump({"x": self.x, "y": self.y, "proxy": self.proxy, "jobs": rows}, fh, indent=2)
        png = plot_sweep(
            rows, self.x, self.y, self.proxy, os.path.join(sweep_dir, "sweep_summary.png")
        )
        log.info("sweep summary (%d jobs): %s", len(rows), png)


class SeedsSummary(Callback):
    """Hydra callback: after a multirun over ``seed``, summarize the jobs' metrics.

    Writes ``seeds_summary.{md,json,png}`` into the sweep dir (see
    :mod:`lit_rlhf.eval.seeds`): a per-seed table, mean ± sd and min per metric, and whether
    each target was met on every seed. Used by ``experiment=seeds``.

    Args:
        command: The command line shown in the summary.
    """

    def __init__(self, command: str = "python train.py -m experiment=seeds") -> None:
        self.command = command

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        import json

        from lit_rlhf.eval.seeds import git_commit, write_seeds_summary

        sweep_dir = str(config.hydra.sweep.dir)
        jobs = []
        for sub in sorted(os.listdir(sweep_dir), key=lambda s: (len(s), s)):
            path = os.path.join(sweep_dir, sub, "metrics.json")
            if not os.path.isfile(path):
                continue
            with open(path, encoding="utf-8") as fh:
                metrics = json.load(fh)
            seed = sub
            overrides = os.path.join(sweep_dir, sub, ".hydra", "overrides.yaml")
            if os.path.isfile(overrides):
                for line in OmegaConf.load(overrides):
                    if str(line).startswith("seed="):
                        seed = str(line).split("=", 1)[1]
            jobs.append((seed, metrics))
        if not jobs:
            log.warning("seeds summary: no job under %s wrote metrics.json", sweep_dir)
            return
        summary = write_seeds_summary(jobs, sweep_dir, self.command, git_commit())
        failed = [k for k, v in summary["targets"].items() if v["met_on"] < v["of"]]
        log.info(
            "seeds summary (%d seeds): %s; targets missed on some seed: %s",
            len(jobs),
            os.path.join(sweep_dir, "seeds_summary.md"),
            ", ".join(failed) or "none",
        )
