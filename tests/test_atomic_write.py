"""`atomic_write`: the file appears complete or not at all, with the umask's permissions even
where the writer creates 0600 files (safetensors does), and what a killed writer left beside it
is removed by the next write of that file."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from llm.model.checkpoint.safetensors_io import write_safetensors_atomic
from llm.model.files import STALE_TEMP_S, atomic_write, remove_stale_temps, umask


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_the_file_gets_the_umasks_permissions_and_no_temp_stays(tmp_path) -> None:
    entry = tmp_path / "c" / "w.safetensors"
    write_safetensors_atomic(entry, {"a": torch.ones(3)}, {"k": "v"})
    assert _mode(entry) == 0o666 & ~umask()
    assert sorted(p.name for p in entry.parent.iterdir()) == ["w.safetensors"]
    assert torch.equal(safetensors.torch.load_file(str(entry))["a"], torch.ones(3))

    def private(tmp: Path) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"x")
        os.close(fd)

    atomic_write(tmp_path / "p.bin", private)
    assert _mode(tmp_path / "p.bin") == 0o666 & ~umask()


def test_a_failed_write_leaves_nothing(tmp_path) -> None:
    def half(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        (tmp.parent / ".tmpOWN").write_bytes(b"the writer's own temp")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "f.bin", half)
    assert list(tmp_path.iterdir()) == []


def test_a_killed_writers_folder_is_removed_by_the_next_write_once_stale(tmp_path) -> None:
    target = tmp_path / "w.safetensors"
    dead = tmp_path / ".w.safetensors.abc123.tmp"  # as a SIGKILL leaves it
    dead.mkdir()
    (dead / ".tmpX").write_bytes(b"0" * 10)
    live = tmp_path / ".w.safetensors.def456.tmp"  # another process writing right now
    live.mkdir()
    other = tmp_path / ".other.bin.aaa.tmp"  # another file's: not ours to judge
    other.mkdir()
    old = time.time() - STALE_TEMP_S - 5
    for p in (dead / ".tmpX", dead, other):
        os.utime(p, (old, old))
    write_safetensors_atomic(target, {"a": torch.zeros(2)}, {})
    assert not dead.exists() and live.exists() and other.exists()
    assert remove_stale_temps(target, now=time.time() + STALE_TEMP_S + 5) == [live]
