"""Old name of :mod:`stdeploy.runner` (the run path), kept importable while other branches move
over; new code imports :mod:`stdeploy.runner`."""

from __future__ import annotations

from pathlib import Path

from .runner import list_targets, load_reference, run_export

__all__ = ["DEFAULT_DEVICE", "list_targets", "reference_model", "run_export"]

# each target's own ``default_device`` is the source of truth
DEFAULT_DEVICE = {"onnxruntime": "cpu", "tvm": "cpu", "lava": "loihi2"}


def reference_model(export_dir: str | Path):
    """The folded PyTorch model an export directory was validated against."""
    return load_reference(export_dir).model
