"""Files that are complete or absent: the one atomic-write helper of the kit.

Folders (exports, the embedded world) have their own tmp-folder-and-rename in
``callbacks/hf_export.py`` and ``data/embedded.py``, because they also hold a lock or a marker.
"""

from __future__ import annotations

import os
import uuid


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never half.

    The text goes to a temporary sibling with a per-process, per-call name (two writers never
    share it), which is then renamed over ``path``; parent folders are created.
    """
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(
        parent, f".{os.path.basename(path)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    )
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
