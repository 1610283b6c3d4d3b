"""The on-device runner: numpy plus one runtime (onnxruntime), no torch, no stdeploy training stack.

On the device, with a bundle written by ``stdeploy package``::

    pip install numpy onnxruntime          # or: pip install 'stdeploy[runtime]' --no-deps + those two
    python -m stdeploy.runtime BUNDLE      # verify, check the samples, time; --json, --out DIR

It needs only this folder, ``stdeploy/__init__.py``, ``stdeploy/errors.py`` and ``stdeploy/files.py``
(none of which imports torch); a test runs it in a fresh virtual environment holding numpy and
onnxruntime alone. See :mod:`stdeploy.runtime.bundle` (the sealed format),
:mod:`stdeploy.runtime.run` (what is checked and timed) and :mod:`stdeploy.runtime.sensors`
(energy where a sensor exists).
"""

from .bundle import FORMAT, Bundle, BundleError, open_bundle, read_bundle

__all__ = ["FORMAT", "Bundle", "BundleError", "open_bundle", "read_bundle"]
