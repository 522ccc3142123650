"""Export a trained model as a Hugging Face folder, atomically."""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import logging
import os
import shutil
import socket
import tempfile

import lightning as L
import torch

log = logging.getLogger("lit_rlhf")

#: Marker written last into every export; its presence means the folder is complete.
MARKER = "lit_rlhf_export.json"


class ExportError(OSError):
    """An export folder cannot be written, or a finished-looking one is damaged."""


def _file_sizes(folder: str) -> dict[str, int]:
    """``{relative path: size in bytes}`` of every file under ``folder`` (the marker excluded)."""
    sizes = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if rel != MARKER:
                sizes[rel] = os.path.getsize(path)
    return dict(sorted(sizes.items()))


def _write_json(path: str, obj) -> None:
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True)


def remove_stale_tmp(export_dir: str) -> int:
    """Delete tmp siblings of ``export_dir`` left by killed runs; returns how many.

    Call it only while holding :func:`export_lock` for ``export_dir``: a live run building the
    same folder holds that lock, so every tmp folder seen then belongs to a dead run.
    """
    export_dir = os.path.abspath(export_dir)
    pattern = os.path.join(os.path.dirname(export_dir), f".{os.path.basename(export_dir)}.tmp-*")
    stale = glob.glob(pattern)
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    if stale:
        log.info("removed %d unfinished folder(s) of killed runs beside %s", len(stale), export_dir)
    return len(stale)


@contextlib.contextmanager
def atomic_output_dir(export_dir: str, info: dict | None = None, extras=None):
    """Write a stage's output folder atomically.

    Yields a temporary sibling folder. When the block finishes without error, the JSON files
    ``extras()`` returns (``{file name: object}``: metrics, history) are written into it, then
    the marker file ``MARKER`` (``info`` plus the size of every file) is written last and the
    folder is renamed into place. A crash therefore never leaves a folder that a later run
    would mistake for a finished one, and :func:`export_problem` can tell a damaged one.
    The folder is readable by the group and others (umask permitting), as on a shared cluster.
    """
    export_dir = os.path.abspath(export_dir)
    parent = os.path.dirname(export_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(export_dir)}.tmp-", dir=parent)
    try:
        yield tmp
        for name, obj in (extras() if extras else {}).items():
            _write_json(os.path.join(tmp, name), obj)
        _write_json(os.path.join(tmp, MARKER), {**(info or {}), "files": _file_sizes(tmp)})
        _share(tmp)
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


def _share(folder: str) -> None:
    # mkdtemp makes 0700 folders; exports are meant to be read by other users of a shared
    # folder, so give them the permissions a plain mkdir/open would (0777/0666 minus umask).
    umask = os.umask(0)
    os.umask(umask)
    for root, _dirs, names in os.walk(folder):
        os.chmod(root, 0o777 & ~umask)
        for name in names:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


def save_hf_folder(model, tokenizer, export_dir: str, info: dict | None = None, extras=None) -> str:
    """``save_pretrained`` model + tokenizer into ``export_dir`` atomically.

    See :func:`atomic_output_dir` (``extras``: more JSON files written before the marker).
    """
    with atomic_output_dir(export_dir, info, extras) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    log.info("exported %s to %s", type(model).__name__, export_dir)
    return os.path.abspath(export_dir)


def _is_rank_zero_process() -> bool:
    # Before the Trainer exists, only the launchers' env vars tell the ranks apart (torchrun
    # sets RANK; Lightning's relaunch of the script sets LOCAL_RANK and NODE_RANK).
    if "RANK" in os.environ:
        return int(os.environ["RANK"]) == 0
    return int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0


@contextlib.contextmanager
def export_lock(export_dir: str, stage: str = "export"):
    """Hold an exclusive lock on building ``export_dir`` (``.locks/<name>.lock`` beside it).

    A second run that needs the same folder waits here until the first finishes (the lock is
    released when its process exits, even on kill -9), then finds the export complete and
    reuses it. While the lock is held, tmp folders of killed runs are removed. Only the
    rank-0 process locks: the ranks of one distributed run build the folder together.
    """
    if not _is_rank_zero_process():
        yield
        return
    export_dir = os.path.abspath(export_dir)
    parent = os.path.dirname(export_dir)
    locks = os.path.join(parent, ".locks")
    try:
        os.makedirs(locks, exist_ok=True)
        fh = open(os.path.join(locks, f"{os.path.basename(export_dir)}.lock"), "a+")
    except OSError as err:
        raise ExportError(
            f"[{stage}] cannot write to the exports folder {parent} ({err.strerror}); set "
            "paths.exports_dir (or LIT_RLHF_HOME) to a writable folder"
        ) from None
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            owner = fh.read().strip() or "another process"
            log.info("[%s] %s is being built by %s: waiting for it", stage, export_dir, owner)
            fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        fh.flush()
        try:
            remove_stale_tmp(export_dir)
            yield
        finally:
            fh.seek(0)
            fh.truncate()
            fcntl.flock(fh, fcntl.LOCK_UN)


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


def export_problem(path: str) -> str | None:
    """What is wrong with the marked export ``path`` (a missing or resized file), else None.

    Exports written before the marker listed its files carry no sizes and pass.
    """
    try:
        with open(os.path.join(path, MARKER)) as fh:
            files = json.load(fh).get("files")
    except (OSError, ValueError, AttributeError) as err:
        return f"its marker {MARKER} cannot be read ({err})"
    for rel, size in (files or {}).items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            return f"{rel} is missing"
        actual = os.path.getsize(full)
        if actual != size:
            return f"{rel} is {actual:,} bytes, but {size:,} were written"
    return None


class HFExportCallback(L.Callback):
    """At the end of ``fit``, save the module's export model and the tokenizer.

    Every rank takes part: under FSDP2 the full weights are gathered for rank 0 (the module's
    ``gathered_export_model``), which writes the folder; the others wait until it exists.

    Args:
        export_dir: Destination folder (replaced atomically).
        tokenizer: Tokenizer saved beside the model.
        info: Extra JSON-able facts written into the marker file (stage, config hash).
        extras: ``extras() -> {file name: object}``, JSON files written into the folder before
            its marker (the stage's metrics and history), called on rank 0 only.
    """

    def __init__(
        self, export_dir: str, tokenizer=None, info: dict | None = None, extras=None
    ) -> None:
        self.export_dir, self.tokenizer, self.info = export_dir, tokenizer, info or {}
        self.extras = extras

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        stage = self.info.get("stage", "export")
        raise_if_nonfinite(trainer, pl_module, stage, self.export_dir)
        gather = getattr(pl_module, "gathered_export_model", None)
        model = gather() if gather is not None else pl_module.export_model()
        if trainer.is_global_zero and model is not None:
            save_hf_folder(model, self.tokenizer, self.export_dir, self.info, self.extras)
        # Later stages read the folder right after fit returns, on every rank.
        trainer.strategy.barrier("hf_export")
