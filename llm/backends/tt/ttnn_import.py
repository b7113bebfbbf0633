"""Importing real ttnn without its log lines on stdout (no torch here, so the real wheel can be
probed from an interpreter that has only ttnn).

Real ttnn 0.81.1 logs from C++ (tt-logger over spdlog) to stdout unless `TT_LOGGER_FILE` names a
file, which would mix its lines into generated text. `import_real_ttnn` first points
`TT_LOGGER_FILE` at stderr, or, when stderr is a regular file (tt-logger opens its file with
truncation, which would erase what was logged before), at a log file in the temp directory. A
`TT_LOGGER_FILE` set by the user is kept. ttnn's Python logger (loguru) writes to stderr already.
"""

from __future__ import annotations

import importlib
import os
import stat
import sys
import tempfile
from types import ModuleType

LOG_ENV = "TT_LOGGER_FILE"
REASON_CHARS = 240


def log_destination(fd: int = 2) -> str:
    """Where tt-logger should write so that nothing reaches stdout: "/dev/stderr" when `fd` is a
    terminal, pipe or socket; a per-process file in the temp directory when it is a regular file
    (or closed)."""
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        regular = True
    if regular:
        return os.path.join(tempfile.gettempdir(), f"llm-ttnn-{os.getpid()}.log")
    return "/dev/stderr"


def import_real_ttnn() -> ModuleType:
    """`import ttnn` with tt-logger routed away from stdout (only effective on the first import:
    tt-logger reads its environment when the library loads)."""
    if "ttnn" not in sys.modules and LOG_ENV not in os.environ:
        os.environ[LOG_ENV] = log_destination()
    return importlib.import_module("ttnn")


def short_reason(e: BaseException) -> str:
    """`Type: message` on one line, without ttnn's backtrace, at most REASON_CHARS long."""
    text = str(e).split("backtrace:")[0]
    text = " ".join(text.split())
    line = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return line if len(line) <= REASON_CHARS else line[:REASON_CHARS - 3] + "..."
