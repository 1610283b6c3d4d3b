"""What stdeploy writes to the console, kept fit for a log file.

- Progress bars only where stderr is a terminal (:func:`show_progress`): a bar redrawn hundreds of
  times is noise in a file.
- Third-party native libraries (TVM's C++ logging) write warnings straight to file descriptor 2,
  where Python's ``warnings`` filters cannot reach them. :func:`native_notes` captures that
  descriptor around a call, writes every unknown line back unchanged, and replaces each known
  message by one line per process that says what it means for the user (:data:`NATIVE_NOTES`).
"""

from __future__ import annotations

import os
import sys
import tempfile
from contextlib import contextmanager
from typing import Iterator, Mapping

__all__ = ["NATIVE_NOTES", "native_notes", "show_progress"]

# message fragment -> what it means for a user of stdeploy
NATIVE_NOTES: dict[str, str] = {
    "Fast mode segfaults when there are out-of-bounds indices":
        "TVM compiles the ONNX graph's Gather/take without bounds checks; its indices are constants of the "
        "exported graph and in bounds, so this needs no action",
}

_said: set[str] = set()


def show_progress(requested: bool = True, stream=None) -> bool:
    """Whether to draw a progress bar: asked for, and ``stream`` (stderr) is a terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(requested) and stream.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def _replay(text: str, notes: Mapping[str, str], stream) -> None:
    counts: dict[str, int] = {}
    for line in text.splitlines(keepends=True):
        key = next((k for k in notes if k in line), None)
        if key is None:
            stream.write(line)
        else:
            counts[key] = counts.get(key, 0) + 1
    for key, n in counts.items():
        if key not in _said:
            _said.add(key)
            stream.write(f"note: a third-party library warned {n}x \"{key}\": {notes[key]} (said once)\n")
    stream.flush()


@contextmanager
def native_notes(notes: Mapping[str, str] = NATIVE_NOTES) -> Iterator[None]:
    """Capture file descriptor 2 for the duration of the block (native libraries' logging), then
    write it back to ``sys.stderr`` with each known message of ``notes`` said once per process."""
    fd = 2  # native code writes to the descriptor, whatever Python's sys.stderr is
    try:
        saved = os.dup(fd)
    except OSError:  # no descriptor 2 (a detached process): nothing to capture
        yield
        return
    sys.stderr.flush()
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), fd)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            tmp.seek(0)
            _replay(tmp.read().decode("utf-8", errors="replace"), notes, sys.stderr)
