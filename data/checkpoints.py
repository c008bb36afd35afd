"""When a checkpoint is complete: one rule for every checkpoint, the policy's versions, the preference
models and the step checkpoints inside an update.

A checkpoint is a folder; it is complete once its manifest, ``<folder>.json`` beside it, exists. The
writer writes the folder, then the manifest (a JSON object: what the checkpoint is, e.g. a fingerprint,
the model it started from, metrics), so a process killed while writing leaves a folder that no reader
takes. The manifest sits beside the folder, not in it, so the folder holds exactly what its writer
wrote (a content fingerprint of the folder stays the one the loaded model reports) and listing the
parent lists the complete checkpoints.

Works on a ``Store`` (object stores included); a local folder is ``Store(parent)`` with the folder's name.

Stores written before this marked a policy checkpoint with an empty ``<folder>/_COMPLETE`` file inside
it: such a checkpoint counts as complete, and its manifest is written when it is first read.
"""

from __future__ import annotations

import json

from data.store import Store

LEGACY_MARKER = "_COMPLETE"


def manifest_path(folder: str) -> str:
    """Where the manifest of the checkpoint folder ``folder`` (a store-relative path) lives."""
    return folder.rstrip("/") + ".json"


def mark_complete(store: Store, folder: str, manifest: dict | None = None) -> str:
    """Write the manifest of ``folder``, the last step of writing a checkpoint. Returns its path."""
    return store.write_bytes(manifest_path(folder), json.dumps(manifest or {}, indent=1, sort_keys=True).encode())


def unmark(store: Store, folder: str) -> None:
    """Remove the manifest (first, before the folder is replaced or deleted)."""
    store.delete(manifest_path(folder))


def is_complete(store: Store, folder: str) -> bool:
    """Whether ``folder`` is a complete checkpoint; an old-format one (``_COMPLETE`` inside) gets its manifest."""
    if store.exists(manifest_path(folder)):
        return True
    if store.exists(f"{folder.rstrip('/')}/{LEGACY_MARKER}"):
        mark_complete(store, folder, {"migrated_from": LEGACY_MARKER})
        return True
    return False


def read_manifest(store: Store, folder: str) -> dict:
    """The manifest of a complete checkpoint (FileNotFoundError when it is not complete)."""
    if not is_complete(store, folder):
        raise FileNotFoundError(f"{store.path(folder)} is not a complete checkpoint (it has no manifest {manifest_path(folder)})")
    return json.loads(store.read_bytes(manifest_path(folder)))


def complete_checkpoints(store: Store, parent: str) -> list[str]:
    """The names of the complete checkpoint folders directly in ``parent`` (those with a manifest), sorted."""
    return sorted(name.removesuffix(".json") for name in store.list_files(parent) if name.endswith(".json"))
