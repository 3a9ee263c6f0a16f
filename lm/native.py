"""Building lm's C files (lm/csrc) on first use: the compiler, the cache folder, the atomic build.

Two parts of lm run a little C where Python or torch leave speed on the table: `lm.cpu_kernels`
(decoding's products and attention, csrc/decode.c) and the tokenizers' byte-pair merging
(`lm.tokenizers.bpe_core`, csrc/bpe.c). Neither is built when lm is installed: `build` compiles a
file with the system's C compiler the first time it is needed (under a second) into `kernel_dir()`,
named by a hash of the source, the flags and the compiler's version, and the callers load it with
ctypes. Wherever that fails (no compiler, LM_CPU_KERNELS=0 in the environment) they keep their
Python or torch code, which computes the same results.

Standard library only, and nothing from lm: the tokenizers' worker processes load this file by its
path without importing lm (and so torch); see `bpe_core`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

CSRC = Path(__file__).resolve().parent / "csrc"
COMPILE_TIMEOUT_S = 120


def switched_off() -> bool:
    """Whether LM_CPU_KERNELS=0 asks lm to run none of its compiled code."""
    return os.environ.get("LM_CPU_KERNELS", "1") == "0"


def unbuildable() -> str | None:
    """Why nothing can be compiled here (LM_CPU_KERNELS=0, or no C compiler), or None."""
    if switched_off():
        return "LM_CPU_KERNELS=0 is set"
    if compiler() is None:
        return f"no C compiler found ({os.environ.get('CC') or 'cc or gcc'}); install one, or set CC"
    return None


def kernel_dir() -> Path:
    """Where compiled files are kept: $LM_KERNEL_DIR, else $XDG_CACHE_HOME/lm/kernels, else
    ~/.cache/lm/kernels."""
    if os.environ.get("LM_KERNEL_DIR"):
        return Path(os.environ["LM_KERNEL_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lm" / "kernels"


def compiler() -> str | None:
    """The C compiler: $CC if set (None if it is not a program), else cc, else gcc."""
    if os.environ.get("CC"):
        return shutil.which(os.environ["CC"])
    return shutil.which("cc") or shutil.which("gcc")


def _private_dir(path: Path) -> bool:
    """Whether `path` is a directory of this user that nobody else may write to."""
    try:
        info = path.stat()
    except OSError:
        return False
    return path.is_dir() and info.st_uid == os.getuid() and not info.st_mode & 0o022


def build(source: Path, flags: tuple[str, ...], cc: str) -> Path:
    """The shared library compiled from `source` with `flags` by the compiler `cc`, compiling it first
    if this source, these flags and this compiler have not been compiled into `kernel_dir()` yet (a
    private temporary folder where that one cannot be made or others may write to it). The file is
    written under a temporary name and renamed, so a process that stops half-way, or two compiling at
    once, never leave a partial one. Raises RuntimeError with the compiler's message when it fails."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    headers = b"".join(path.read_bytes() for path in sorted(source.parent.glob("*.h")))  # what it may include
    key = hashlib.sha256(source.read_bytes() + headers + repr(flags).encode() + version.encode()).hexdigest()[:16]
    try:
        folder = kernel_dir()
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    except (OSError, RuntimeError):  # no home folder, or a read-only one
        folder = None
    if folder is None or not _private_dir(folder):  # nor a folder others may write to: build privately
        folder = Path(tempfile.mkdtemp(prefix="lm-kernels-"))
    target = folder / f"{source.stem}-{key}.so"
    if target.is_file() and target.stat().st_uid == os.getuid():
        return target
    handle, partial = tempfile.mkstemp(prefix=f"{source.stem}-", suffix=".so.partial", dir=folder)
    os.close(handle)
    try:
        done = subprocess.run([cc, *flags, str(source), "-o", partial, "-lm"], capture_output=True,
                              text=True, timeout=COMPILE_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"{Path(cc).name} failed: {done.stderr.strip()[-500:]}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target
