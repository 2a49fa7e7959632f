"""Files the plugin writes for people and other tools to read: whole or not at all, with normal permissions."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile


def umask() -> int:
    """The process's umask (Linux reports it in /proc; elsewhere it is read by setting it back at once)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = ""):
    """Yield a temporary path beside `path` to write; when the block succeeds it is renamed onto `path`, so a
    reader never sees half a file, and otherwise removed. The file ends with the permissions a plain `open()` would
    give it (0666 less the umask), not the 0600 of `mkstemp`: others and containers can read what we write."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        give_normal_permissions(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def give_normal_permissions(path: str) -> None:
    """Give `path` (a file, or a folder and everything in it) the permissions a plain `open()` / `os.makedirs`
    would have: 0666 / 0777 less the umask.

    Called on what the plugin writes through a temporary file or folder, and on safetensors files: safetensors
    0.8 writes through a temporary file that keeps mode 0600 whatever the umask (safetensors/safetensors#782), and
    `tempfile.mkdtemp` makes folders 0700. Without this an adapter others, a container or a shared cache should
    read is readable by its owner only.
    """
    mask = umask()
    if os.path.isfile(path) and not os.path.islink(path):
        os.chmod(path, 0o666 & ~mask)
        return
    for root, folders, files in os.walk(path):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            file = os.path.join(root, name)
            if not os.path.islink(file):
                os.chmod(file, 0o666 & ~mask)


def write_json_atomic(path: str, data: dict) -> None:
    """`data` as indented JSON at `path`, written through `atomic_path`."""
    with atomic_path(path, ".json") as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
