"""Who makes a cache entry, and what a killed maker leaves behind: the entry lock and the staging folders.

Why: one process makes a missing entry while the others wait (a file lock, not a collective: no process-group
timeout however long quantizing takes). A waiter used to print nothing, forever, behind a stopped holder; and a
maker killed with SIGKILL (or SIGTERM, which Python does not turn into cleanup) left its `.tmp-*` staging folder,
as large as the entry, for good.

How: the holder writes its pid, host and start time into the lock file; a waiter polls, says who holds the lock
and since when every `ANNOUNCE_SECONDS`, and takes over a lock whose holder is a process of this host that no
longer exists (an inherited descriptor or a network file system can keep a lock past its owner). Each staging
folder names its owner (`OWNER_FILE`: pid, host, entry); the next run removes those of processes gone from this
host, and, under an entry's lock, every staging folder of that entry (its maker held the same lock and is gone).
A host is its hostname: containers that share a cache folder and a hostname but not a process namespace can take
each other's live processes for gone; then two may make one entry, and the rename into place keeps one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time

from qlora_plugin.core.files import give_normal_permissions

logger = logging.getLogger(__name__)

ANNOUNCE_SECONDS = 30.0  # how often a waiting process says who holds the lock
POLL_SECONDS = 0.5
STAGING_PREFIX = ".tmp-"
OWNER_FILE = ".qlora_plugin_owner.json"
ORPHAN_SECONDS = 24 * 3600  # a staging folder with no owner record (an older version's) is removed after a day


def _host() -> str:
    return socket.gethostname()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # exists, another user's
        return True
    return True


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _gone(owner: dict) -> bool:
    """True when `owner` (pid, host) is a process of this host that no longer exists; unknowable elsewhere."""
    return owner.get("host") == _host() and isinstance(owner.get("pid"), int) and not _alive(owner["pid"])


def _describe(owner: dict) -> str:
    if not owner:
        return "a process that has not said who it is"
    since = owner.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    waited = f", {time.time() - since:.0f} s ago" if isinstance(since, (int, float)) else ""
    return f"process {owner.get('pid')} on {owner.get('host')} since {when}{waited}"


@contextlib.contextmanager
def entry_lock(lock_path: str, what: str, announce_seconds: float = ANNOUNCE_SECONDS):
    """Hold `lock_path` exclusively while making `what` (a cache entry). Waiting, say every `announce_seconds`
    who holds it and since when; take over a lock whose holder is a dead process of this host.
    Without `fcntl` (Windows) nothing is locked: concurrent makers race, and the rename keeps one entry."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    os.makedirs(os.path.dirname(lock_path), exist_ok=True)
    started = last = time.monotonic()
    while True:
        handle = open(lock_path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            owner = _read_json(lock_path)
            if _gone(owner):
                logger.warning("Taking over the cache lock %s for %s: its holder, %s, no longer exists.",
                               lock_path, what, _describe(owner))
                with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(lock_path), delete=False) as fresh:
                    pass
                give_normal_permissions(fresh.name)  # every user of a shared cache opens it
                os.replace(fresh.name, lock_path)  # a new file: the dead holder's lock stays on the old one
                continue
            now = time.monotonic()
            if now - last >= announce_seconds:
                last = now
                logger.warning("Waiting %.0f s for %s: the cache lock %s is held by %s. If that process is stopped "
                               "or stuck, end it (a dead holder's lock is taken over).",
                               now - started, what, lock_path, _describe(owner))
            time.sleep(POLL_SECONDS)
            continue
        if _inode(lock_path) != os.fstat(handle.fileno()).st_ino:  # replaced (taken over) while we waited
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
            continue
        try:
            handle.seek(0)
            handle.truncate()
            json.dump({"pid": os.getpid(), "host": _host(), "since": time.time()}, handle)
            handle.flush()
            yield
        finally:
            with contextlib.suppress(OSError):
                handle.seek(0)
                handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
        return


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def make_staging(root: str, entry_name: str, prefix: str = STAGING_PREFIX) -> str:
    """A new staging folder in `root` for `entry_name`, naming its owner so a later run can tell it is stale (also
    `merge`'s, beside its output, with its own `prefix`)."""
    tmp = tempfile.mkdtemp(prefix=prefix, dir=root)
    with open(os.path.join(tmp, OWNER_FILE), "w", encoding="utf-8") as f:
        json.dump({"pid": os.getpid(), "host": _host(), "entry": entry_name, "since": time.time()}, f)
    return tmp


def remove_stale_staging(root: str, locked_entry: str | None = None, prefix: str = STAGING_PREFIX,
                         where: str = "the cache") -> list[str]:
    """Remove staging folders (names starting with `prefix`) left by killed makers: those of processes gone from
    this host, those with no owner record older than `ORPHAN_SECONDS`, and (called under that entry's lock) every
    one of `locked_entry`. Returns the removed paths."""
    removed = []
    try:
        names = [n for n in os.listdir(root) if n.startswith(prefix)]
    except OSError:
        return removed
    for name in names:
        path = os.path.join(root, name)
        if not os.path.isdir(path) or os.path.islink(path):
            continue
        owner = _read_json(os.path.join(path, OWNER_FILE))
        if owner:
            stale = _gone(owner) or (locked_entry is not None and owner.get("entry") == locked_entry)
        else:
            try:
                stale = time.time() - os.stat(path).st_mtime > ORPHAN_SECONDS
            except OSError:
                continue
        if stale:
            shutil.rmtree(path, ignore_errors=True)
            if not os.path.exists(path):
                removed.append(path)
    if removed:
        logger.warning("Removed %d staging folder(s) left in %s %s by interrupted runs.", len(removed), where, root)
    return removed
