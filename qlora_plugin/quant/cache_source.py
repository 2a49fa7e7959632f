"""What a cached base is made from, and how the cache recognises it without reading its weights.

Where: a local folder, or a Hub id's snapshot in the Hugging Face cache when it is there (`snapshot_download`
with `local_files_only=True`: no download, `HF_HOME` / `HF_HUB_CACHE`, the `cache_dir` and `revision` kwargs
honoured), then the `subfolder` kwarg inside it, as `from_pretrained` reads it.

Identity (the cache key): for each file that defines the weights, its size, modification and change times and
inode, the SHA-256 of each safetensors header (names, dtypes, shapes, offsets: kilobytes) and of the small JSON
files, plus the snapshot's commit for a Hub id. Nothing reads the weights, so every rank of every node computes it
in milliseconds, outside the lock (it used to hash every byte of the base on every rank: 140 GB per rank at 70B).
Safe: a file rewritten in place changes its change time (ctime), which no user call can set back, even when the
modification time is restored; a copy of the base is a new inode, so it is a new entry (quantized again once).
"""

from __future__ import annotations

import hashlib
import json
import os

SOURCE_FILES = (".safetensors", "config.json", "model.safetensors.index.json")
INDEX = "model.safetensors.index.json"
HEADER_LIMIT = 100 * 1024 * 1024  # safetensors' own cap on a header


def local_source(model_id: str, init_kwargs: dict) -> tuple[str, str | None] | None:
    """(folder holding the weights, snapshot commit or None) for `from_pretrained(model_id, **init_kwargs)`;
    None when they are not on this machine (a Hub id not in the Hugging Face cache)."""
    subfolder = init_kwargs.get("subfolder") or ""
    if os.path.isdir(model_id):
        folder, commit = model_id, None
    else:
        snapshot = hub_snapshot(model_id, init_kwargs.get("revision"), init_kwargs.get("cache_dir"))
        if snapshot is None:
            return None
        folder, commit = snapshot, os.path.basename(os.path.normpath(snapshot))
    folder = os.path.join(folder, subfolder) if subfolder else folder
    return (folder, commit) if os.path.isdir(folder) else None


def hub_snapshot(model_id: str, revision: str | None = None, cache_dir: str | None = None) -> str | None:
    """The local snapshot folder of a Hub model at `revision` (branch, tag or commit), or None (not cached, not a
    valid repo id)."""
    if os.path.exists(model_id) or model_id.count("/") > 1:
        return None
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(model_id, revision=revision, cache_dir=cache_dir, local_files_only=True,
                                 allow_patterns=["*.safetensors", "*.json"])
    except Exception:  # noqa: BLE001 - not on disk, however huggingface_hub says it: the caller loads as usual
        return None


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def safetensors_header_sha256(path: str) -> str:
    """SHA-256 of a safetensors file's header (its 8-byte length and JSON): every tensor's name, dtype, shape and
    offsets, read in one small read."""
    with open(path, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else 0
        return hashlib.sha256(head + f.read(min(length, HEADER_LIMIT))).hexdigest()


def file_stamp(path: str) -> dict:
    """What changes whenever a file's bytes do: size, modification and change times (ns), inode."""
    stat = os.stat(path)
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns, "inode": stat.st_ino}


def source_identity(folder: str, commit: str | None = None) -> dict | None:
    """The cache key's view of a base folder (module docstring); None when it has no complete safetensors weights
    (none at all, or shards its index names are missing: a partial download)."""
    names = sorted(n for n in os.listdir(folder) if n.endswith(SOURCE_FILES))
    shards = {n for n in names if n.endswith(".safetensors")}
    if not shards:
        return None
    if INDEX in names:
        try:
            with open(os.path.join(folder, INDEX), encoding="utf-8") as f:
                needed = set(json.load(f)["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        if not needed <= shards:
            return None
    files = {}
    for name in names:
        path = os.path.realpath(os.path.join(folder, name))  # a Hub snapshot links into blobs/
        item = file_stamp(path)
        item["header" if name.endswith(".safetensors") else "sha256"] = (
            safetensors_header_sha256(path) if name.endswith(".safetensors") else sha256_file(path))
        files[name] = item
    return {"commit": commit, "files": files}
