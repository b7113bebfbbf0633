"""File helpers shared by the checkpoint and tokenizer caches: content hashes and atomic writes."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

_HASH_CHUNK = 16 << 20
_HASH_PROGRESS_MIN_BYTES = 256 << 20


def file_sha256(path: Path, progress: bool = True) -> str:
    """Hex sha256 of a file's bytes, read in chunks (tqdm bar for big files)."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    quiet = not progress or size < _HASH_PROGRESS_MIN_BYTES
    with open(path, "rb") as f, tqdm(
        total=size, desc=f"hashing {path.name}", unit="B", unit_scale=True, disable=quiet
    ) as bar:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def atomic_write(file: Path, write: Callable[[Path], None]) -> None:
    """Create `file` through `write(temp_path)` so that it appears complete or not at all.

    The data goes to a temp file in the same directory, is fsynced, then renamed over `file`;
    any exception (KeyboardInterrupt included) removes the temp file.
    """
    file.parent.mkdir(parents=True, exist_ok=True)
    # A unique name, created by the writer itself so that the file gets the umask's permissions.
    tmp = file.with_name(f".{file.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, file)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable; not possible on every platform / file system
        dir_fd = os.open(file.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
