"""File helpers shared by the checkpoint and tokenizer caches: content hashes and atomic writes."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
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


# A temp folder of an atomic write untouched this long belongs to a writer that was killed.
STALE_TEMP_S = 600.0


def atomic_write(file: Path, write: Callable[[Path], None]) -> None:
    """Create `file` through `write(temp_path)` so that it appears complete or not at all.

    The data goes to a file in a fresh temp folder beside `file` (so that whatever the writer
    makes of its own, e.g. safetensors' temp file, lands there too), is fsynced, given the
    umask's permissions (as `open` would; some writers create 0600 files), then renamed over
    `file`. Any exception (KeyboardInterrupt included) removes the folder; a folder left by a
    killed writer (SIGTERM, SIGKILL) is removed by the next write of the same file once it is
    STALE_TEMP_S old.
    """
    file.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(file)
    work = Path(tempfile.mkdtemp(prefix=f".{file.name}.", suffix=".tmp", dir=file.parent))
    tmp = work / file.name
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, file)
    finally:
        shutil.rmtree(work, ignore_errors=True)
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


def remove_stale_temps(file: Path, now: float | None = None) -> list[Path]:
    """Remove the temp folders of atomic writes of `file` that nothing touched for STALE_TEMP_S
    (their writer was killed); returns them."""
    now = time.time() if now is None else now
    removed = []
    for work in file.parent.glob(f".{file.name}.*.tmp"):
        try:
            touched = max([work.lstat().st_mtime] + [p.lstat().st_mtime for p in work.iterdir()])
        except OSError:  # gone meanwhile, or not a folder
            continue
        if now - touched > STALE_TEMP_S:
            shutil.rmtree(work, ignore_errors=True)
            removed.append(work)
    return removed


def umask() -> int:
    """This process's file-creation mask (from /proc where it says, else set and restored)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
