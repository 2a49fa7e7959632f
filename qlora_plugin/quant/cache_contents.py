"""A cache entry checks itself before it is used: what was written is what is read.

Why: a truncated shard used to end every later run in a safetensors traceback that never named the cache; a
garbage config.json in the entry was reported as the user's model being invalid; packed 4-bit bytes scrambled under
an intact header trained silently on garbage weights.

How, and what it costs: when an entry is written, each of its files' size, SHA-256 and stamp (modification and
change times, inode) are recorded in the entry's `qlora_plugin_cache.json`. When it is used, every file is
stat'ed (microseconds): a missing file or another size is damage; the same stamp means nothing has written to the
file since it was checked (a write changes the change time, which no user call can set back), so it is used as it
is; any other stamp (a rewrite, a touch, a restore) costs one SHA-256 pass over that file: a different digest is
damage, the same one updates the record's stamp, so the pass is paid once. Measured on the project's shared 2-core machine, a 512 MiB entry of 2 shards: the check with unchanged
stamps takes 0.02 ms; the digest pass 2.5 s (about 0.2 GiB/s reading files there; SHA-256 itself runs at 1.1
GiB/s per core in memory), so a 70B model's 37 GB entry costs 30 s to 3 min, paid when the entry is written (the
bytes are still in the page cache, beside minutes of quantizing) and when a stamp changed, never on a plain run.
"""

from __future__ import annotations

import json
import os

from qlora_plugin.quant.cache_source import file_stamp, sha256_file

STAMP = ("mtime_ns", "ctime_ns", "inode")


def record_contents(folder: str, leave_out: tuple[str, ...] = ()) -> dict:
    """Size, SHA-256 and stamp of every file of a finished entry folder (call after its last chmod: that changes
    the change time)."""
    contents = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name in leave_out or not os.path.isfile(path) or os.path.islink(path):
            continue
        contents[name] = {**file_stamp(path), "sha256": sha256_file(path)}
    return contents


def contents_problem(entry: str, contents, restamped: dict | None = None) -> str | None:
    """What is wrong with the files of `entry` against its record (`record_contents`), or None when they are as
    written. Files whose stamp changed but whose digest matched get their new stamp in `restamped` (name -> stamp),
    so the record can be updated and the digest pass is not paid again."""
    if not isinstance(contents, dict) or "config.json" not in contents:
        return "its record of the files it holds is missing or unreadable"
    for name, want in contents.items():
        path = os.path.join(entry, name)
        if os.path.islink(path):
            return f"{name} is a symbolic link, not the file that was written"
        try:
            stamp = file_stamp(path)
        except FileNotFoundError:
            return f"{name} is missing"
        except OSError as err:
            return f"{name} cannot be read ({err.strerror or err})"
        if not isinstance(want, dict) or stamp["size"] != want.get("size"):
            return f"{name} has {stamp['size']} bytes, {want.get('size') if isinstance(want, dict) else '?'} were written"
        if all(stamp[key] == want.get(key) for key in STAMP):
            continue  # not written to since it was checked
        try:
            if sha256_file(path) != want.get("sha256"):
                return f"{name} differs from what was written (SHA-256)"
        except OSError as err:
            return f"{name} cannot be read ({err.strerror or err})"
        if restamped is not None:
            restamped[name] = stamp
    return None


def read_record(path: str) -> dict | None:
    """An entry's `qlora_plugin_cache.json`, or None when it is missing, unreadable or not a JSON object."""
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None
