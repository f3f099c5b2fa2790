"""Crash-safe file writing, shared by the checkpointer, the exporter and the proposal files."""

import contextlib
import os

__all__ = ["atomic_open"]


@contextlib.contextmanager
def atomic_open(path, mode="wb"):
    """
    Open ``path`` for writing through a temporary file that replaces ``path`` only once it has
    been completely written and flushed to disk.
    """
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
