"""Writing a file so that a crash never leaves half of it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Callable

try:
    import fcntl  # POSIX file locks: how a later writer tells a crashed writer's temporary file from a live one
except ImportError:  # Windows: a file another process has open cannot be deleted, which does the same job
    fcntl = None


def write_atomically(path: str | Path, write: Callable[[IO], None], text: bool = False,
                     suffix: str = ".tmp") -> Path:
    """Write `path` through `write(f)` on a temporary file in the same folder (named
    `.<name>.<random><suffix>`), flush it to disk, then os.replace it onto `path` (atomic on POSIX
    and Windows): readers, and a crash at any moment, see the old file or the new one, never half of
    one. The temporary file is locked while written (`is_locked`) and removed on failure. The new
    file gets the permissions `open` would give it (0o666 less the umask), not mkstemp's 0o600."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "w" if text else "wb", **({"newline": ""} if text else {})) as f:
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes, or when this process dies
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def current_umask() -> int:
    """The process's umask (reading it means setting it; it is put straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def is_locked(path: Path) -> bool:
    """Whether a live process holds the lock `write_atomically` takes on its temporary file."""
    if fcntl is None:
        return False  # Windows: deleting the file fails while a writer has it open
    with open(path, "rb") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
    return False
