"""Synthetic data sets in the real on-disk formats that :mod:`stdeploy.data` reads: random pixels,
labels and events, for tests and for timing the training recipes without downloading anything.

* :func:`write_cifar10`   ``data_batch_1..5.bin`` + ``test_batch.bin``: records of 1 label byte
  (< 10) + 3072 channel-major pixel bytes (3x32x32).
* :func:`write_cifar100`  ``train.bin`` + ``test.bin``: records of 2 label bytes (coarse < 20,
  fine < 100) + 3072 pixel bytes.
* :func:`write_dvs`       CIFAR10-DVS as spikingjelly stores it (``events_np/``): one folder per
  class of ``.npz`` files with arrays ``t, x, y, p`` from a 128x128 sensor (no ``sensor_size``).

Writing is vectorised: the full CIFAR-10 size (50,000 + 10,000 records, 184 MB) takes about a
second. :func:`write_dataset` puts a set in the subfolder its loader looks for (:data:`FOLDERS`).
Defaults are the tiny sizes the tests use.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

__all__ = ["FOLDERS", "write_cifar10", "write_cifar100", "write_dvs", "write_dataset"]

PIXELS = 3 * 32 * 32
FOLDERS = {"cifar10": "cifar-10-batches-bin", "cifar100": "cifar-100-binary", "dvs": "events_np"}
DVS_SENSOR = 128


def _records(rng: np.random.Generator, n: int, label_limits: tuple[int, ...]) -> np.ndarray:
    """``n`` records (n, labels + 3072) uint8: one column per label byte, then random pixels."""
    records = np.empty((n, len(label_limits) + PIXELS), dtype=np.uint8)
    for column, limit in enumerate(label_limits):
        records[:, column] = rng.integers(0, limit, n, dtype=np.uint8)
    records[:, len(label_limits):] = rng.integers(0, 256, (n, PIXELS), dtype=np.uint8)
    return records


def write_cifar10(folder: str | os.PathLike, train: int = 10, test: int = 3, seed: int = 0) -> Path:
    """The CIFAR-10 binary release in ``folder``: ``train`` records spread over the five
    ``data_batch_*.bin`` files (10,000 each at full size; ``train >= 5``) and ``test`` records in
    ``test_batch.bin``."""
    if train < 5 or test < 1:
        raise ValueError(f"cifar10 needs train >= 5 (five batch files) and test >= 1, got {train}, {test}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sizes = [len(part) for part in np.array_split(np.arange(train), 5)]
    for name, n in [(f"data_batch_{i}.bin", k) for i, k in enumerate(sizes, 1)] + [("test_batch.bin", test)]:
        _records(rng, n, (10,)).tofile(folder / name)
    return folder


def write_cifar100(folder: str | os.PathLike, train: int = 10, test: int = 3, seed: int = 0) -> Path:
    """The CIFAR-100 binary release in ``folder``: ``train.bin`` (50,000 records at full size) and
    ``test.bin`` (10,000)."""
    if train < 1 or test < 1:
        raise ValueError(f"cifar100 needs train >= 1 and test >= 1, got {train}, {test}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, n in (("train.bin", train), ("test.bin", test)):
        _records(rng, n, (20, 100)).tofile(folder / name)
    return folder


def write_dvs(folder: str | os.PathLike, classes: int = 3, per_class: int = 2, events: int = 600, seed: int = 0,
              distinct: int | None = None) -> Path:
    """``classes`` folders ``class{c}`` of ``per_class`` recordings ``cifar10_class{c}_{i}.npz``, each
    with ``events`` events: sorted int64 timestamps over one second (microseconds), int16 x and y
    on a 128x128 sensor, int8 polarities (one event in the far corner fixes the inferred sensor
    size at 128). CIFAR10-DVS recordings hold about 100k-300k events.

    ``distinct``: write only this many different recordings per class and make the others hard
    links to them (copies where links fail), to build large folders cheaply. Readers then find
    repeated files in the page cache, so disk reading is not part of what they time.
    """
    if classes < 1 or per_class < 1 or events < 1:
        raise ValueError(f"dvs needs classes, per_class and events >= 1, got {classes}, {per_class}, {events}")
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    unique = per_class if distinct is None else max(1, min(distinct, per_class))
    for c in range(classes):
        sub = folder / f"class{c}"
        sub.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            path = sub / f"cifar10_class{c}_{i}.npz"
            if i >= unique:
                _link(sub / f"cifar10_class{c}_{i % unique}.npz", path)
                continue
            xy = rng.integers(0, DVS_SENSOR, (2, events), dtype=np.int16)
            xy[:, 0] = DVS_SENSOR - 1
            np.savez(path, t=np.sort(rng.integers(0, 10**6, events, dtype=np.int64)), x=xy[0], y=xy[1],
                     p=rng.integers(0, 2, events, dtype=np.int8))
    return folder


def _link(source: Path, target: Path) -> None:
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def write_dataset(name: str, root: str | os.PathLike, **sizes) -> Path:
    """Write data set ``name`` (a key of :data:`FOLDERS`) into ``root/FOLDERS[name]`` with the
    writer's size arguments; returns that folder (what ``--data-root`` takes)."""
    writers = {"cifar10": write_cifar10, "cifar100": write_cifar100, "dvs": write_dvs}
    if name not in writers:
        raise ValueError(f"no synthetic writer for data set {name!r}; have {', '.join(writers)}")
    return writers[name](Path(root) / FOLDERS[name], **sizes)
