"""Read and validate the record formats of the recipe.

Formats (field names configurable through ``fields``):

- ``demonstrations``: ``{"prompt": str, "completion": str}``
- ``pretrain``: ``{"text": str}``
- ``prompts``: ``{"prompt": str}``
- ``comparisons``: K-wise ``{"prompt", "completions": [..K..], "ranks": [..K..]}`` (0 = best,
  equal ranks = tie) or pairwise ``{"prompt", "chosen", "rejected"}`` (read as K=2).

Sources: a ``.jsonl``/``.json``/``.parquet`` file or an HF dataset name (``name`` or
``name:split``). Every problem raises :class:`DataFormatError` naming the file, line (for
JSONL/JSON arrays the 1-based line/item) and field, and what to do.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping
from typing import Any

from lit_rlhf.fileio import atomic_write_text

FORMATS = {
    "demonstrations": ("prompt", "completion"),
    "pretrain": ("text",),
    "prompts": ("prompt",),
    "comparisons": ("prompt", "completions", "ranks"),
}


class DataFormatError(ValueError):
    """A data source is missing, unreadable, or holds a malformed record."""


def _where(source: str, index: int, kind: str) -> str:
    unit = "line" if kind == "jsonl" else "record"
    return f"{source}, {unit} {index}"


def _require_file(source: str) -> None:
    """Raise one clear line unless the local data file ``source`` exists."""
    if not os.path.isfile(source):
        raise DataFormatError(f"data file '{source}' does not exist; check the path override")


def _iter_raw(source: str) -> Iterator[tuple[int, Any, str]]:
    """Yield ``(1-based index, raw record, kind)`` from a file or HF dataset."""
    if os.path.isdir(source):
        raise DataFormatError(
            f"data file '{source}' is a folder; give the file inside it (.jsonl, .json, .parquet)"
        )
    lower = source.lower()
    if lower.endswith(".jsonl"):
        _require_file(source)
        with open(source, "rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise DataFormatError(
                        f"{source}, line {lineno}: not valid UTF-8 ({err.reason}); "
                        "re-encode the file as UTF-8"
                    ) from None
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line), "jsonl"
                except json.JSONDecodeError as err:
                    raise DataFormatError(
                        f"{source}, line {lineno}: not valid JSON ({err.msg} at column "
                        f"{err.colno}); each line must be one JSON object"
                    ) from None
    elif lower.endswith(".json"):
        _require_file(source)
        try:
            with open(source, encoding="utf-8") as fh:
                data = json.load(fh)
        except UnicodeDecodeError as err:
            raise DataFormatError(f"{source}: not valid UTF-8 ({err.reason})") from None
        except json.JSONDecodeError as err:
            raise DataFormatError(
                f"{source}, line {err.lineno}: not valid JSON ({err.msg})"
            ) from None
        if isinstance(data, Mapping) and "data" in data:
            data = data["data"]
        if not isinstance(data, list):
            raise DataFormatError(
                f"{source}: expected a JSON array of objects (or {{'data': [...]}})"
            )
        for i, rec in enumerate(data, start=1):
            yield i, rec, "json"
    elif lower.endswith(".parquet"):
        _require_file(source)
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(source)
        except Exception as err:  # pyarrow raises several types for corrupt files
            raise DataFormatError(f"{source}: not a readable Parquet file ({err})") from None
        for i, rec in enumerate(table.to_pylist(), start=1):
            yield i, rec, "parquet"
    else:
        if os.path.exists(source) or source.endswith((".csv", ".txt")):
            raise DataFormatError(
                f"'{source}': unsupported data file; use .jsonl, .json or .parquet"
            )
        yield from _iter_hf_dataset(source)


def _iter_hf_dataset(source: str) -> Iterator[tuple[int, Any, str]]:
    name, _, split = source.partition(":")
    try:
        import datasets

        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as err:  # the hub client raises many types; all mean "cannot load"
        raise DataFormatError(
            f"'{source}' is not a local .jsonl/.json/.parquet file and could not be loaded "
            f"as a Hugging Face dataset ({type(err).__name__}: {err})"
        ) from None
    for i, rec in enumerate(ds, start=1):
        yield i, rec, "hf"


def _text_field(
    rec: Mapping, f: Mapping[str, str], canonical: str, where: str, allow_empty: bool = False
) -> str:
    key = f[canonical]
    if key not in rec:
        # The mapping is keyed by the canonical name, whatever the source calls the field.
        raise DataFormatError(
            f"{where}: missing field '{key}' (has {sorted(rec)}); rename the field or set "
            f"the field mapping (e.g. data.fields.{canonical}=<your name>)"
        )
    value = rec[key]
    if not isinstance(value, str):
        raise DataFormatError(
            f"{where}: field '{key}' must be a string, got {type(value).__name__}"
        )
    if not allow_empty and not value.strip():
        raise DataFormatError(f"{where}: field '{key}' is empty; remove or fill the record")
    return value


def _comparison(rec: Mapping, f: Mapping[str, str], where: str) -> dict:
    prompt = _text_field(rec, f, "prompt", where, allow_empty=True)
    if f["completions"] not in rec and f["chosen"] in rec:
        chosen = _text_field(rec, f, "chosen", where)
        rejected = _text_field(rec, f, "rejected", where)
        if chosen == rejected:
            # A preference between a text and itself teaches nothing; it is a data bug.
            raise DataFormatError(
                f"{where}: '{f['chosen']}' and '{f['rejected']}' are the same text; "
                "fix or remove the record"
            )
        return {"prompt": prompt, "completions": [chosen, rejected], "ranks": [0, 1]}
    for key in ("completions", "ranks"):
        if f[key] not in rec:
            raise DataFormatError(
                f"{where}: missing field '{f[key]}'; K-wise records need 'completions' and "
                "'ranks' (pairwise records need 'chosen' and 'rejected')"
            )
    comps, ranks = rec[f["completions"]], rec[f["ranks"]]
    if not isinstance(comps, list) or len(comps) < 2:
        raise DataFormatError(f"{where}: '{f['completions']}' must be a list of >= 2 strings")
    for j, c in enumerate(comps):
        # An empty response is a legitimate (bad) sample of a policy: it is ranked, not refused.
        if not isinstance(c, str):
            raise DataFormatError(
                f"{where}: completion {j} must be a string, got {type(c).__name__}"
            )
    if not isinstance(ranks, list) or len(ranks) != len(comps):
        n = len(ranks) if isinstance(ranks, list) else type(ranks).__name__
        raise DataFormatError(
            f"{where}: '{f['ranks']}' must be a list with one rank per completion "
            f"({len(comps)} completions, got {n})"
        )
    for j, r in enumerate(ranks):
        # The upper bound keeps ranks inside the int64 tensors they become (10**30 overflowed).
        if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < 2**31:
            raise DataFormatError(
                f"{where}: rank {j} is {r!r}; ranks must be non-negative integers (0 = best)"
            )
    out = {"prompt": prompt, "completions": list(comps), "ranks": list(ranks)}
    gold = _gold(rec, f["gold"], len(comps), where)
    if gold is not None:
        out["gold"] = gold
    return out


def _gold(rec: Mapping, key: str, k: int, where: str) -> list[float] | None:
    """The optional per-completion gold scores of a K-wise record (evaluation only)."""
    if rec.get(key) is None:
        return None
    gold = rec[key]
    ok = isinstance(gold, list) and len(gold) == k
    ok = ok and all(
        isinstance(g, int | float) and not isinstance(g, bool) and math.isfinite(g) for g in gold
    )
    if not ok:
        raise DataFormatError(
            f"{where}: field '{key}' must be a list of {k} finite numbers (one gold score per "
            "completion); fix or remove it"
        )
    return [float(g) for g in gold]


def read_records(
    source: str, kind: str, fields: Mapping[str, str] | None = None, limit: int | None = None
) -> list[dict]:
    """Read and validate all records of one data source.

    Args:
        source: Path to a ``.jsonl``/``.json``/``.parquet`` file or an HF dataset name
            (optionally ``name:split``).
        kind: One of ``demonstrations``, ``pretrain``, ``prompts``, ``comparisons``.
        fields: Maps canonical field names to the names used in the source, e.g.
            ``{"prompt": "question"}``.
        limit: Read at most this many records.

    Returns:
        Records with canonical field names (extra fields dropped, except a K-wise
        comparison's optional per-completion ``gold`` scores).

    Raises:
        DataFormatError: naming the file, line and field of the first problem.
    """
    if kind not in FORMATS:
        raise DataFormatError(f"unknown record kind {kind!r}; use one of {sorted(FORMATS)}")
    names = {
        k: k
        for k in (
            "prompt",
            "completion",
            "text",
            "completions",
            "ranks",
            "chosen",
            "rejected",
            "gold",
        )
    }
    names.update(fields or {})
    out: list[dict] = []
    for index, rec, src_kind in _iter_raw(str(source)):
        where = _where(str(source), index, src_kind)
        if not isinstance(rec, Mapping):
            raise DataFormatError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        if kind == "comparisons":
            out.append(_comparison(rec, names, where))
        elif kind == "demonstrations":
            out.append(
                {
                    "prompt": _text_field(rec, names, "prompt", where, allow_empty=True),
                    "completion": _text_field(rec, names, "completion", where),
                }
            )
        elif kind == "pretrain":
            out.append({"text": _text_field(rec, names, "text", where)})
        else:
            out.append({"prompt": _text_field(rec, names, "prompt", where)})
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise DataFormatError(f"'{source}' holds no {kind} records")
    return out


def write_jsonl(records: list[dict], path: str) -> None:
    """Write records as JSONL atomically (:func:`~lit_rlhf.fileio.atomic_write_text`)."""
    atomic_write_text(path, "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records))
