"""Files written the way a run folder needs: atomic, with ordinary modes, temporaries accounted for.

- ``atomic_write_*``: a temporary sibling, fsync, then a rename: a kill never leaves a half-written
  file under a final name, and a rename replaces a symlink itself, never its target;
- modes follow the umask like any ordinary file (0644 usually), whoever created the temporary;
- every temporary this process creates is tracked, so ``cleanup_temps`` (called when a command
  ends, however it ends) leaves none behind;
- a refused write (full disk, file-size limit, read-only, permissions) is ``StorageError``, exit 2,
  naming the file, with the file under its final name untouched.
"""
from __future__ import annotations

import errno
import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from .errors import BadInput


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()
PENDING: set[Path] = set()  # temporaries of this process not yet renamed into place
DISK_ERRORS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


class StorageError(BadInput):
    """The file system refused a write (full disk, file-size limit, read-only, permissions)."""


def storage_error(path: Path, err: BaseException, lead: str = "cannot write") -> StorageError:
    """The user-facing error for a refused write; ``err`` is the OSError, or a library's wrapper of one."""
    errno_ = getattr(err, "errno", None)
    why = os.strerror(errno_) if errno_ else " ".join(str(err).split())[:200]
    return StorageError(f"{lead} {path}: {why}. Nothing under its final name was changed; free space or fix "
                        "the permissions, then run the command again (distill and run continue from their last "
                        "checkpoint, which is intact, with --resume)")


def temp_path(final: Path, suffix: str = ".tmp") -> Path:
    """A fresh temporary sibling of ``final`` for writers that need a path (torch.save, ONNX export).

    Rename it into place with ``commit``; if the command ends first, ``cleanup_temps`` removes it.
    ``suffix`` starts with ``.tmp`` (writers that insist on an extension get ``.tmp.onnx``).
    """
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=suffix, dir=final.parent)
    except OSError as err:
        raise storage_error(final, err) from None
    os.close(fd)
    os.chmod(name, FILE_MODE)
    return track(Path(name))


def track(tmp: Path) -> Path:
    """Register a temporary file (e.g. one a library writes beside ours) for removal when the command ends."""
    PENDING.add(Path(tmp))
    return Path(tmp)


def commit(tmp: Path, final: Path) -> None:
    """Rename a finished temporary over ``final`` (atomic; replaces a symlink itself, never its target).

    The mode is set here, whoever wrote the file (some writers recreate it 0600)."""
    os.chmod(tmp, FILE_MODE)
    os.replace(tmp, final)
    PENDING.discard(Path(tmp))


def discard(tmp: Path) -> None:
    """Remove a temporary, best effort: on a read-only or failing file system even the unlink of a file that
    was never created fails (EROFS), and that must not replace the error being reported; a temporary left
    behind is removed by the next writer of the folder."""
    try:
        Path(tmp).unlink(missing_ok=True)
    except OSError:
        pass
    PENDING.discard(Path(tmp))


def cleanup_temps() -> None:
    """Remove every temporary this process created and did not commit (called when a command ends)."""
    for tmp in list(PENDING):
        discard(tmp)


def refused_write(err: BaseException) -> bool:
    """Whether ``err`` is the file system refusing a write, raised directly or wrapped by a library
    (torch.save: RuntimeError "... write failed"; safetensors: "I/O error ... (os error N)")."""
    if isinstance(err, OSError):
        return err.errno in DISK_ERRORS
    text = str(err)
    return isinstance(err, Exception) and ("I/O error" in text or "os error" in text or "write failed" in text)


def disk_error_in(err: BaseException) -> Optional[OSError]:
    """The OSError of a refused write (full disk, quota, read-only, permissions) that ``err`` is, or that caused
    it somewhere along its chain (``raise ... from``, or raised while handling it); None if there is none."""
    seen = set()
    while err is not None and id(err) not in seen and len(seen) < 32:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in DISK_ERRORS:
            return err
        err = err.__cause__ or err.__context__
    return None


def raise_if_refused(final: Path, err: BaseException) -> None:
    """Raise the StorageError for ``final`` (exit 2) when ``err`` is, wraps or was caused by a refused write."""
    disk = disk_error_in(err)
    if disk is not None or refused_write(err):
        raise storage_error(final, disk or err) from None


@contextmanager
def written(final: Path) -> Iterator[Path]:
    """A temporary path to write ``final`` through: renamed into place when the block succeeds; removed,
    with a refused write reported as StorageError (exit 2, the final file untouched), when it fails."""
    tmp = temp_path(final)
    try:
        yield tmp
    except BaseException as err:
        discard(tmp)
        raise_if_refused(final, err)
        raise
    try:
        commit(tmp, final)
    except OSError as err:
        discard(tmp)
        raise storage_error(final, err) from None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with written(Path(path)) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def json_safe(obj: Any) -> Any:
    """A JSON-safe copy: NaN/Inf become null (not valid JSON for jq or browsers), paths and others strings."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return str(obj)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(json_safe(obj), indent=2) + "\n")


def read_json_file(path: Path, what: str = "") -> dict:
    """A JSON object from ``path``; a missing, truncated or malformed file is exit 2 naming it."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise BadInput(f"{path} not found" + (f" ({what})" if what else "")) from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise BadInput(f"{path} is unreadable or malformed ({type(err).__name__}: {str(err)[:200]}); it was not "
                       "modified. Re-create it (re-run the stage that writes it) or restore it") from None
    if not isinstance(obj, dict):
        raise BadInput(f"{path} must hold a JSON object, found {type(obj).__name__}")
    return obj
