"""Export a trained model as a Hugging Face folder, atomically."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile

import lightning as L
import torch

log = logging.getLogger("lit_rlhf")

#: Marker written last into every export; its presence means the folder is complete.
MARKER = "lit_rlhf_export.json"


@contextlib.contextmanager
def atomic_output_dir(export_dir: str, info: dict | None = None):
    """Write a stage's output folder atomically.

    Yields a temporary sibling folder; when the block finishes without error the marker file
    ``MARKER`` (holding ``info``) is written last and the folder is renamed into place, so a
    crash never leaves a half-written export that a later run would mistake for a finished one.
    """
    export_dir = os.path.abspath(export_dir)
    parent = os.path.dirname(export_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(export_dir)}.tmp-", dir=parent)
    try:
        yield tmp
        with open(os.path.join(tmp, MARKER), "w") as fh:
            json.dump(info or {}, fh, indent=2, sort_keys=True)
        if os.path.exists(export_dir):
            old = f"{tmp}.old"
            os.replace(export_dir, old)
            os.replace(tmp, export_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, export_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_hf_folder(model, tokenizer, export_dir: str, info: dict | None = None) -> str:
    """``save_pretrained`` model + tokenizer into ``export_dir`` atomically.

    See :func:`atomic_output_dir`.
    """
    with atomic_output_dir(export_dir, info) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    log.info("exported %s to %s", type(model).__name__, export_dir)
    return os.path.abspath(export_dir)


class NonFiniteModelError(RuntimeError):
    """A trained model holds NaN or inf weights; it is not exported."""


def raise_if_nonfinite(trainer: L.Trainer, module: torch.nn.Module, stage: str, export_dir: str):
    """Raise :class:`NonFiniteModelError` on every rank if any rank's weights are not finite.

    Counts the parameters this rank holds (an FSDP2 shard reads its local part), and the
    ranks agree on the decision, so none is left waiting for an export that never comes.
    """
    bad = total = 0
    for p in module.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        bad += int((~torch.isfinite(local.detach())).sum())
        total += local.numel()
    if trainer.strategy.reduce_boolean_decision(bad > 0, all=False):
        raise NonFiniteModelError(
            f"[{stage}] {bad:,} of {total:,} weights are NaN or inf after training, so nothing "
            f"was exported to {export_dir}; the run diverged: lower its learning rate or add warmup"
        )


def is_complete_export(path: str | None) -> bool:
    """True when ``path`` is a finished export of this kit (its marker exists)."""
    return bool(path) and os.path.isfile(os.path.join(path, MARKER))


class HFExportCallback(L.Callback):
    """At the end of ``fit``, save the module's export model and the tokenizer.

    Every rank takes part: under FSDP2 the full weights are gathered for rank 0 (the module's
    ``gathered_export_model``), which writes the folder; the others wait until it exists.

    Args:
        export_dir: Destination folder (replaced atomically).
        tokenizer: Tokenizer saved beside the model.
        info: Extra JSON-able facts written into the marker file (stage, config hash).
    """

    def __init__(self, export_dir: str, tokenizer=None, info: dict | None = None) -> None:
        self.export_dir, self.tokenizer, self.info = export_dir, tokenizer, info or {}

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        stage = self.info.get("stage", "export")
        raise_if_nonfinite(trainer, pl_module, stage, self.export_dir)
        gather = getattr(pl_module, "gathered_export_model", None)
        model = gather() if gather is not None else pl_module.export_model()
        if trainer.is_global_zero and model is not None:
            save_hf_folder(model, self.tokenizer, self.export_dir, self.info)
        # Later stages read the folder right after fit returns, on every rank.
        trainer.strategy.barrier("hf_export")
