"""Writing a file so that a crash never leaves half of it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, IO


def write_atomically(path: str | Path, write: Callable[[IO], None], text: bool = False) -> Path:
    """Write `path` through `write(f)` on a temporary file in the same folder, flush it to disk, then
    os.replace it onto `path` (atomic on POSIX and Windows): readers, and a crash at any moment,
    see the old file or the new one, never half of one. The temporary file is removed on failure."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w" if text else "wb", **({"newline": ""} if text else {})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
