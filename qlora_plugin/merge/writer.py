"""Writing a merged model without ever leaving a half-written one: a temporary folder beside the output, renamed
into place only when complete, and safetensors shards written as they fill so memory holds one shard at most."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile

from qlora_plugin.core.errors import QLoRAPluginError
from qlora_plugin.core.files import give_normal_permissions
from qlora_plugin.quant.cache_lock import OWNER_FILE, make_staging, remove_stale_staging

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


MARKER_FILE = "qlora_plugin_merge.json"  # written into every merged folder: what `--force` may replace


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_output(out: str, force: bool, keep: tuple[str, ...] = ()) -> None:
    """Refuse an --out merge may not write to: a file; a non-empty folder without `force`; and, even with `force`,
    a folder that is or contains one of `keep` (the adapter, the base) or that `qlora-plugin merge` did not write
    (no MARKER_FILE). `--force` replaces only an earlier merge's output."""
    if os.path.isfile(out):
        raise QLoRAPluginError(f"--out {out!r} is a file; pass a folder path for the merged model.")
    real = os.path.realpath(out)
    for folder in keep:
        if folder and _inside(os.path.realpath(folder), real):
            raise QLoRAPluginError(
                f"--out {out!r} is or contains {folder}, an input of this merge; merge never replaces its inputs, "
                "--force or not. Choose another --out."
            )
    if not (os.path.isdir(out) and os.listdir(out)):
        return
    if not force:
        raise QLoRAPluginError(
            f"Output folder {out!r} exists and is not empty. Choose a new --out, or pass --force to replace it "
            "(only an earlier merge's output can be replaced)."
        )
    if not os.path.isfile(os.path.join(out, MARKER_FILE)) or os.path.islink(os.path.join(out, MARKER_FILE)):
        raise QLoRAPluginError(
            f"--force replaces only a folder that `qlora-plugin merge` wrote (it holds {MARKER_FILE}); {out!r} has "
            "none, so it is left as it is. Choose another --out, or move that folder away yourself."
        )


def disk_error(err: OSError, where: str, needed: int | None = None) -> QLoRAPluginError:
    """A write failure as a user error: say why and what to do; nothing was left behind."""
    if err.errno == errno.ENOSPC:
        size = f" (the merged model needs about {needed / 2**30:.2f} GiB)" if needed else ""
        return QLoRAPluginError(
            f"No space left on the device while writing the merged model to {where}{size}. Nothing was kept; free "
            "some space or pass an --out on another disk."
        )
    if err.errno == errno.EFBIG:
        return QLoRAPluginError(
            f"Could not write the merged model to {where}: a file grew past the largest size allowed here (a "
            "file-size limit such as `ulimit -f`, or the file system's). Nothing was kept; raise the limit, or pass "
            "a smaller --max_shard_size (or an --out on another file system)."
        )
    return QLoRAPluginError(f"Could not write the merged model to {where}: {err.strerror or err}. Nothing was kept.")


def _as_os_error(err: Exception) -> OSError:
    """safetensors reports a failed write as its own error with the OS's text ("File too large (os error 27)")."""
    match = re.search(r"os error (\d+)", str(err))
    code = int(match.group(1)) if match else errno.EIO
    return OSError(code, os.strerror(code))


@contextlib.contextmanager
def staged_folder(out: str, force: bool, keep: tuple[str, ...] = ()):
    """Yield a temporary folder beside `out`; on success it replaces `out`, on any failure it is removed. The
    folder names its owner (pid, host): one left by a merge that was killed (kill -9 gives no chance to clean up)
    is removed by the next merge to the same `out`."""
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    prefix = f".{os.path.basename(out)}.merging-"
    try:
        os.makedirs(parent, exist_ok=True)
        remove_stale_staging(parent, prefix=prefix, where="the output's folder")
        tmp = make_staging(parent, out, prefix=prefix)
    except OSError as err:
        raise disk_error(err, out) from None
    try:
        yield tmp
        os.remove(os.path.join(tmp, OWNER_FILE))  # the staging record is not part of the model
        give_normal_permissions(tmp)  # mkdtemp's 0700 and safetensors' 0600: the model is for others to read too
        old = None
        if os.path.exists(out):
            check_output(out, force, keep)  # it may have appeared while we merged
            old = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out)}.old-")
            os.replace(out, os.path.join(old, "previous"))
        os.replace(tmp, out)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class ShardWriter:
    """Collects output tensors and writes a safetensors shard whenever `max_shard_bytes` would be exceeded.

    Shards get their final names (`model-0000i-of-0000n.safetensors` + index, or `model.safetensors` when one
    shard suffices) in `finish`, once their number is known.
    """

    def __init__(self, folder: str, max_shard_bytes: int):
        self.folder = folder
        self.max_shard_bytes = max_shard_bytes
        self.pending: dict = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_shard_bytes:
            self.flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        from safetensors.torch import save_file

        from safetensors import SafetensorError

        path = self._draft(len(self.shards))
        try:
            save_file(self.pending, path, metadata={"format": "pt"})
        except SafetensorError as err:
            raise _as_os_error(err) from None
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def _draft(self, i: int) -> str:
        return os.path.join(self.folder, f".shard-{i:05d}.safetensors")

    def finish(self) -> None:
        self.flush()
        if len(self.shards) == 1:
            os.replace(self._draft(0), os.path.join(self.folder, SINGLE_FILE))
            return
        weight_map = {}
        for i, names in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{len(self.shards):05d}.safetensors"
            os.replace(self._draft(i), os.path.join(self.folder, final))
            weight_map.update({name: final for name in names})
        with open(os.path.join(self.folder, INDEX_FILE), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, f, indent=2)
            f.write("\n")
