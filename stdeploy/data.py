"""Local data sets: read from disk, never downloaded.

One entry point, :func:`load_dataset`, returns a :class:`DataSplit` whose ``train`` and ``test``
datasets yield ``(x, y)`` with ``x`` a float32 tensor and ``y`` an int64 scalar tensor::

    static images  x: (C, H, W)      in [0, 1]         timesteps is None
    event data     x: (T, 2, H, W)   event counts      timesteps is T

Formats (nothing else is read; pickled files never are):

* ``digits``       scikit-learn's bundled 8x8 digits (offline), stratified 80/20 split by seed.
* ``mnist1d``      MNIST-1D (Greydanus 2020): 4,000 train / 1,000 test sequences of length 40,
                   10 classes, generated offline by the ``mnist1d`` package with its canonical
                   arguments (``make_dataset(get_dataset_args())``, the package's seed 42), so the
                   split is the same every time (the seed argument does not change it). Items are
                   one-row images ``x: (1, 1, 40)`` (``DataSplit.input_dims == 1``); the arrays are
                   cached as ``.npz`` (see :func:`mnist1d_cache_dir`) and checked against
                   :data:`MNIST1D_SHA256` on every load.
* ``cifar10``      the official *binary* release: ``data_batch_{1..5}.bin`` + ``test_batch.bin``,
                   records of 1 label byte + 3072 pixel bytes (3x32x32, channel-major).
* ``cifar100``     the official binary release: ``train.bin`` + ``test.bin``, records of 2 label
                   bytes (coarse, fine; the fine label is used) + 3072 pixel bytes.
* ``imagefolder``  ``train/`` and ``test/`` (or ``val/``), one subfolder per class of images.
* ``dvs``          ``train/`` and ``test/``, one subfolder per class of ``.npz`` recordings
                   (arrays ``x, y, t, p``; optional ``sensor_size`` = (H, W)) or ``.npy``
                   structured arrays with fields ``x, y, t, p``. With ``test_fraction`` f > 0 the
                   folder holds the class subfolders itself (CIFAR10-DVS has no official split)
                   and the last ``n - ceil(n (1 - f))`` files of each class, in name order, are
                   the test split (spikingjelly's ``split_to_train_test_set(1 - f, ...,
                   random_split=False)``). Events are binned into T frames, two polarity channels
                   (``p > 0`` is channel 1), and scaled to ``image_size`` by integer division
                   (``x * image_size // sensor_w``). Frames hold raw counts, not clipped to 1:
                   a model that wants binary input thresholds them itself. Binning:
                   ``"time"``: frames of equal time span over ``[t_min, t_max]``;
                   ``"count"``: frames of equal event count in time order, the last frame also
                   taking the remainder (frames 0..T-2 hold ``N // T`` events each; spikingjelly's
                   ``split_by="number"``, which the Spikformer and Spike-driven Transformer
                   CIFAR10-DVS results use).

Augmentation (``augment=True``, train split only): random crop with 4-pixel zero padding and a
horizontal flip for CIFAR and image folders, a horizontal flip for DVS; ignored for ``digits``
and ``mnist1d``.
``roll=r`` adds a random translation by ``-r..r`` pixels in each direction with wrap-around
(``torch.roll``; for DVS frames, where padding would add fake silent borders).
Each item's draw depends only on ``(seed, epoch, index)``, so a run is reproducible whatever the
order of access; :func:`make_loader` advances the epoch.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .errors import DataError
from .files import atomic_write

__all__ = ["DATASETS", "DataSplit", "load_dataset", "make_loader", "events_to_frames"]

DATASETS = ("digits", "mnist1d", "cifar10", "cifar100", "imagefolder", "dvs")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm")
EVENT_EXTENSIONS = (".npz", ".npy")
EVENT_FIELDS = ("x", "y", "t", "p")

CIFAR_PIXELS = 3 * 32 * 32
CROP_PADDING = 4                 # zero padding of the random crop, in pixels
DEFAULT_IMAGE_SIZE = 32          # image folders
DEFAULT_DVS_IMAGE_SIZE = 64
DEFAULT_TIMESTEPS = 10           # DVS frames per recording
DVS_SENSOR_STEP = 128            # sensor size when a file has none: max coordinate + 1 rounded up to this
BINNINGS = ("time", "count")     # DVS frames of equal time span / of equal event count


@dataclass(frozen=True)
class DataSplit:
    name: str
    train: Dataset               # items (x, y): x float32, y int64 scalar
    test: Dataset
    num_classes: int
    in_channels: int             # C: 1 digits, 3 CIFAR, 1 or 3 image folders, 2 DVS polarities
    image_size: int              # H = W of x
    timesteps: int | None        # None: x is (C, H, W); T: x is (T, C, H, W)
    classes: tuple[str, ...] = ()  # class names in label order, where the data set has them
    input_dims: int = 2          # 2: x is (C, H, W) with H = W = image_size; 1: a sequence held as a
                                 # one-row image (C, 1, image_size), image_size being its length

    def __post_init__(self):
        problems = []
        for field in ("num_classes", "in_channels", "image_size"):
            if not _is_positive_int(getattr(self, field)):
                problems.append(f"{field} must be a positive integer, got {getattr(self, field)!r}")
        if self.timesteps is not None and not _is_positive_int(self.timesteps):
            problems.append(f"timesteps must be None or a positive integer, got {self.timesteps!r}")
        if self.input_dims not in (1, 2):
            problems.append(f"input_dims must be 1 (sequences) or 2 (images), got {self.input_dims!r}")
        if self.classes and len(self.classes) != self.num_classes:
            problems.append(f"{len(self.classes)} class names for num_classes={self.num_classes}")
        if problems:
            raise DataError(f"invalid data split {self.name!r}: " + "; ".join(problems))


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    *,
    image_size: int | None = None,
    timesteps: int | None = None,
    augment: bool = False,
    seed: int = 0,
    in_channels: int | None = None,
    roll: int = 0,
    binning: str = "time",
    test_fraction: float = 0.0,
) -> DataSplit:
    """Load data set ``name`` from the local folder ``root`` (ignored for ``digits``; for
    ``mnist1d`` the cache folder, default :func:`mnist1d_cache_dir`).

    ``image_size`` resizes static images (default: the native size, 32 for image folders) and
    sets the DVS frame size (default 64). ``timesteps`` is the number of DVS frames (default 10)
    and is ignored for static images. ``in_channels`` picks 1 (grey) or 3 (RGB) for image folders;
    for the other sets it may only repeat their native channel count. ``roll`` (with ``augment``)
    is the largest random translation in pixels; ``binning`` (``"time"`` or ``"count"``) and
    ``test_fraction`` (0: ``train/`` and ``test/`` folders) apply to ``dvs`` only.
    """
    loader = _LOADERS.get(name)
    if loader is None:
        raise DataError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}")
    for key, value in (("image_size", image_size), ("timesteps", timesteps), ("in_channels", in_channels)):
        if value is not None and not _is_positive_int(value):
            raise DataError(f"{key} must be a positive integer, got {value!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise DataError(f"seed must be an integer, got {seed!r}")
    if not (isinstance(roll, int) and not isinstance(roll, bool) and roll >= 0):
        raise DataError(f"roll must be an integer >= 0, got {roll!r}")
    if roll and not augment:
        raise DataError(f"roll={roll} is an augmentation: it needs augment=True")
    if binning not in BINNINGS:
        raise DataError(f"binning must be one of {', '.join(BINNINGS)}, got {binning!r}")
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 <= test_fraction < 1:
        raise DataError(f"test_fraction must be in [0, 1), got {test_fraction!r}")
    if name != "dvs" and (binning != "time" or test_fraction):
        raise DataError(f"binning and test_fraction apply to dvs recordings only, not to {name}")
    return loader(root, image_size=image_size, timesteps=timesteps, augment=bool(augment),
                  seed=seed, in_channels=in_channels, roll=roll, binning=binning, test_fraction=float(test_fraction))


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0, epoch: int = 0,
                drop_last: bool = False, sampler=None, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """A DataLoader whose order and items depend only on ``(seed, epoch)``, whatever ``num_workers``
    (each item's augmentation draws from its own generator seeded by seed, epoch and index).

    Call it once per epoch. When shuffling, the permutation comes from a generator seeded with
    ``seed * 1000 + epoch``; a dataset with a ``set_epoch`` method (augmented train splits) is
    moved to ``epoch`` so its random crops and flips change from epoch to epoch, reproducibly.
    """
    if not _is_positive_int(batch_size):
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
    if shuffle and sampler is not None:
        raise DataError("pass either shuffle=True or a sampler, not both")
    if not (isinstance(num_workers, int) and not isinstance(num_workers, bool) and num_workers >= 0):
        raise DataError(f"num_workers must be an integer >= 0, got {num_workers!r}")
    set_epoch = getattr(dataset, "set_epoch", None)
    if callable(set_epoch):
        set_epoch(epoch)
    generator = torch.Generator().manual_seed(seed * 1000 + epoch) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler, drop_last=drop_last,
                      num_workers=num_workers, generator=generator, pin_memory=pin_memory)


# --------------------------------------------------------------------------------------------
# Shared helpers


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_channels(name: str, in_channels: int | None, native: int) -> None:
    if in_channels is not None and in_channels != native:
        raise DataError(f"{name} has {native} input channel(s), got in_channels={in_channels}")


def _resolve_root(name: str, root, expected: str) -> Path:
    """The existing folder ``root``, or a DataError saying what was expected there."""
    if root is None:
        raise DataError(f"{name} needs a local folder: pass --data-root PATH ({expected})")
    path = Path(root).expanduser()
    if not path.exists():
        raise DataError(f"{name} data folder {path} does not exist; expected {expected}")
    if not path.is_dir():
        raise DataError(f"{name} data path {path} is not a folder; expected {expected}")
    return path


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of (..., C, H, W) images to (size, size); identity when already there."""
    if x.shape[-2:] == (size, size):
        return x
    batched = x.reshape(-1, *x.shape[-3:])
    out = F.interpolate(batched, size=(size, size), mode="bilinear", align_corners=False,
                        antialias=size < x.shape[-1])
    return out.reshape(*x.shape[:-2], size, size).clamp_(0.0, 1.0)


class _Augmented(Dataset):
    """Random horizontal flip, (optionally) padded random crop and (optionally) a random roll by
    up to ``roll`` pixels of another dataset's items.

    The draw for item ``i`` comes from a generator seeded with ``(seed, epoch, i)``.
    """

    def __init__(self, base: Dataset, seed: int, crop: bool, roll: int = 0):
        self.base = base
        self.seed = seed
        self.crop = crop
        self.roll = roll
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        x, y = self.base[index]
        item_seed = ((self.seed * 1_000_003 + self.epoch) * 1_000_003 + int(index)) % (2 ** 63)
        generator = torch.Generator().manual_seed(item_seed)
        if torch.rand((), generator=generator) < 0.5:
            x = x.flip(-1)
        if self.crop:
            h, w = x.shape[-2:]
            top, left = torch.randint(0, 2 * CROP_PADDING + 1, (2,), generator=generator).tolist()
            padded = F.pad(x, (CROP_PADDING,) * 4)
            x = padded[..., top:top + h, left:left + w].contiguous()
        if self.roll:
            dy, dx = torch.randint(-self.roll, self.roll + 1, (2,), generator=generator).tolist()
            x = torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
        return x, y


# --------------------------------------------------------------------------------------------
# digits (scikit-learn, offline)


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # slow import, only when needed

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)   # (N, 1, 8, 8) in [0, 1]
    y = bunch.target.astype(np.int64)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def _load_digits(root, *, image_size, timesteps, augment, seed, in_channels, roll, binning, test_fraction) -> DataSplit:
    from sklearn.model_selection import train_test_split

    _check_channels("digits", in_channels, 1)
    x, y = _digits_arrays()
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)
    size = image_size or 8

    def dataset(xs, ys):
        return TensorDataset(_resize(torch.tensor(xs), size), torch.tensor(ys))

    return DataSplit(name="digits", train=dataset(x_train, y_train), test=dataset(x_test, y_test),
                     num_classes=10, in_channels=1, image_size=size, timesteps=None,
                     classes=tuple(str(d) for d in range(10)))


# --------------------------------------------------------------------------------------------
# MNIST-1D (generated offline by the mnist1d package, cached on disk)

MNIST1D_LENGTH = 40
MNIST1D_SIZES = (4000, 1000)       # train, test
MNIST1D_CACHE_ENV = "STDEPLOY_CACHE_DIR"
MNIST1D_FILE = "mnist1d-v1.npz"
# sha256 of the float32 arrays x_train, y_train (int64), x_test, y_test (int64), in that order, as
# C-contiguous bytes: what ``mnist1d==0.0.2.post1`` generates with its canonical arguments.
MNIST1D_SHA256 = "496b88aa2dac9088b429dc17dfd8598509b68d542d31bcfb2504b31492519f73"
_MNIST1D_KEYS = ("x_train", "y_train", "x_test", "y_test")


def mnist1d_cache_dir() -> Path:
    """Where the generated MNIST-1D arrays are cached: ``$STDEPLOY_CACHE_DIR/mnist1d`` if that
    variable is set, else ``~/.cache/stdeploy/mnist1d``."""
    base = os.environ.get(MNIST1D_CACHE_ENV)
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "stdeploy") / "mnist1d"


def mnist1d_checksum(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over the four arrays (dtype, shape and bytes, in :data:`_MNIST1D_KEYS` order)."""
    h = hashlib.sha256()
    for key in _MNIST1D_KEYS:
        a = np.ascontiguousarray(arrays[key])
        h.update(f"{key}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def generate_mnist1d() -> dict[str, np.ndarray]:
    """Run the package's own generator with its canonical arguments (offline: ``make_dataset``
    never downloads; the package imports ``requests`` at import time only). The generator seeds
    Python's and numpy's global random state; both are restored afterwards."""
    import random

    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as err:
        raise DataError(f"mnist1d needs the packages mnist1d and requests ({err}); "
                        "pip install mnist1d==0.0.2.post1 requests") from err
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        raw = make_dataset(get_dataset_args())
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return {"x_train": np.asarray(raw["x"], np.float32), "y_train": np.asarray(raw["y"], np.int64),
            "x_test": np.asarray(raw["x_test"], np.float32), "y_test": np.asarray(raw["y_test"], np.int64)}


def _check_mnist1d(arrays: dict[str, np.ndarray], source: str) -> None:
    digest = mnist1d_checksum(arrays)
    if digest != MNIST1D_SHA256:
        raise DataError(f"{source}: MNIST-1D arrays have sha256 {digest[:16]}..., expected {MNIST1D_SHA256[:16]}... "
                        "(a cached file that is damaged: delete it; or another mnist1d/numpy/scipy than 0.0.2.post1 "
                        "generated different data)")


@functools.lru_cache(maxsize=4)
def mnist1d_arrays(cache_dir: str | None = None) -> dict[str, np.ndarray]:
    """The MNIST-1D arrays (read-only), from the cache file in ``cache_dir`` (default
    :func:`mnist1d_cache_dir`) or generated and written there atomically; checked by sha256."""
    folder = Path(cache_dir) if cache_dir is not None else mnist1d_cache_dir()
    path = folder / MNIST1D_FILE
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: np.asarray(f[k]) for k in _MNIST1D_KEYS}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
            raise DataError(f"{path}: cannot read the cached MNIST-1D arrays ({err}); delete it to regenerate") from err
        _check_mnist1d(arrays, str(path))
    else:
        arrays = generate_mnist1d()
        _check_mnist1d(arrays, "generated by the mnist1d package")

        def write(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

        atomic_write(path, write)
    for a in arrays.values():
        a.flags.writeable = False
    return arrays


def _load_mnist1d(root, *, image_size, timesteps, augment, seed, in_channels, roll, binning, test_fraction) -> DataSplit:
    _check_channels("mnist1d", in_channels, 1)
    if image_size is not None and image_size != MNIST1D_LENGTH:
        raise DataError(f"mnist1d sequences have length {MNIST1D_LENGTH}, got image_size={image_size} "
                        "(a model for images? use --model sdt-1d-tiny or spikformer-1d-tiny)")
    arrays = mnist1d_arrays(str(mnist1d_cache_dir() if root is None else Path(root).expanduser()))  # cached per folder

    def dataset(xs, ys):  # (N, 40) -> one-row images (N, 1, 1, 40)
        return TensorDataset(torch.tensor(xs).view(-1, 1, 1, MNIST1D_LENGTH), torch.tensor(ys))

    return DataSplit(name="mnist1d", train=dataset(arrays["x_train"], arrays["y_train"]),
                     test=dataset(arrays["x_test"], arrays["y_test"]), num_classes=10, in_channels=1,
                     image_size=MNIST1D_LENGTH, timesteps=None, classes=tuple(str(d) for d in range(10)), input_dims=1)


# --------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (official binary format)


@dataclass(frozen=True)
class _CifarFormat:
    name: str
    folder: str                  # subfolder of the release archive
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_bytes: int             # leading label bytes per record; the last one is the class
    label_limits: tuple[int, ...]  # exclusive upper bound of each label byte

    @property
    def record_size(self) -> int:
        return self.label_bytes + CIFAR_PIXELS

    @property
    def files(self) -> tuple[str, ...]:
        return self.train_files + self.test_files

    @property
    def expected(self) -> str:
        return f"a folder with {', '.join(self.files)}, or its parent holding {self.folder}/"


_CIFAR = {
    "cifar10": _CifarFormat("cifar10", "cifar-10-batches-bin",
                            tuple(f"data_batch_{i}.bin" for i in range(1, 6)), ("test_batch.bin",),
                            label_bytes=1, label_limits=(10,)),
    "cifar100": _CifarFormat("cifar100", "cifar-100-binary", ("train.bin",), ("test.bin",),
                             label_bytes=2, label_limits=(20, 100)),
}


def _cifar_folder(fmt: _CifarFormat, root) -> Path:
    path = _resolve_root(fmt.name, root, fmt.expected)
    candidates = [path / fmt.folder, path] if (path / fmt.folder).is_dir() else [path]
    for folder in candidates:
        if all((folder / f).is_file() for f in fmt.files):
            return folder
    folder = candidates[0]
    missing = [f for f in fmt.files if not (folder / f).is_file()]
    raise DataError(f"{fmt.name} folder {folder} is missing {', '.join(missing)}; expected {fmt.expected}")


def _read_cifar(fmt: _CifarFormat, paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels (N, 3, 32, 32) uint8 and class labels (N,) int64 from binary batch files."""
    pixels, labels = [], []
    for path in paths:
        raw = np.fromfile(path, dtype=np.uint8)
        if raw.size == 0 or raw.size % fmt.record_size:
            raise DataError(f"{path}: size {raw.size} bytes is not a positive multiple of the "
                            f"{fmt.record_size}-byte {fmt.name} record "
                            f"({fmt.label_bytes} label byte(s) + {CIFAR_PIXELS} pixel bytes)")
        records = raw.reshape(-1, fmt.record_size)
        for column, limit in enumerate(fmt.label_limits):
            bad = np.flatnonzero(records[:, column] >= limit)
            if bad.size:
                raise DataError(f"{path}: record {bad[0]} has label byte {column} = "
                                f"{records[bad[0], column]}, expected 0..{limit - 1}")
        labels.append(records[:, fmt.label_bytes - 1].astype(np.int64))
        pixels.append(records[:, fmt.label_bytes:].reshape(-1, 3, 32, 32).copy())
    return torch.from_numpy(np.concatenate(pixels)), torch.from_numpy(np.concatenate(labels))


class _ImageTensorDataset(Dataset):
    """uint8 images held in memory, returned as float32 in [0, 1] at ``size``."""

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor, size: int):
        self.pixels = pixels      # (N, C, H, W) uint8
        self.labels = labels      # (N,) int64
        self.size = size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        x = self.pixels[index].to(torch.float32).div_(255.0)
        return _resize(x, self.size), self.labels[index]


def _load_cifar(name: str):
    fmt = _CIFAR[name]

    def load(root, *, image_size, timesteps, augment, seed, in_channels, roll, binning, test_fraction) -> DataSplit:
        _check_channels(name, in_channels, 3)
        folder = _cifar_folder(fmt, root)
        size = image_size or 32
        train = _ImageTensorDataset(*_read_cifar(fmt, [folder / f for f in fmt.train_files]), size)
        test = _ImageTensorDataset(*_read_cifar(fmt, [folder / f for f in fmt.test_files]), size)
        if augment:
            train = _Augmented(train, seed, crop=True, roll=roll)
        return DataSplit(name=name, train=train, test=test, num_classes=fmt.label_limits[-1],
                         in_channels=3, image_size=size, timesteps=None)

    return load


# --------------------------------------------------------------------------------------------
# Class folders (image folders and DVS recordings)


def _split_folders(name: str, root, expected: str) -> tuple[Path, Path]:
    path = _resolve_root(name, root, expected)
    train = path / "train"
    test = next((path / s for s in ("test", "val") if (path / s).is_dir()), None)
    missing = ([] if train.is_dir() else ["train/"]) + ([] if test else ["test/ (or val/)"])
    if missing:
        raise DataError(f"{name} folder {path} has no {' and no '.join(missing)}; expected {expected}")
    return train, test


def _list_classes(name: str, folder: Path, extensions: tuple[str, ...]) -> dict[str, list[Path]]:
    """Class name -> sorted files with one of ``extensions``, for every subfolder of ``folder``."""
    classes = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(f for f in sub.iterdir() if f.is_file() and f.suffix.lower() in extensions)
        if not files:
            raise DataError(f"{name} class folder {sub} holds no {'/'.join(extensions)} files")
        classes[sub.name] = files
    if not classes:
        raise DataError(f"{name} folder {folder} has no class subfolders")
    return classes


def _class_samples(name: str, train_dir: Path, test_dir: Path, extensions: tuple[str, ...]):
    """Class names and ``[(file, label)]`` of both splits, checking the class lists agree."""
    train, test = _list_classes(name, train_dir, extensions), _list_classes(name, test_dir, extensions)
    if list(train) != list(test):
        only_train, only_test = sorted(set(train) - set(test)), sorted(set(test) - set(train))
        raise DataError(f"{name}: class folders differ between {train_dir} and {test_dir}: "
                        f"only in {train_dir.name}/: {only_train or 'none'}; "
                        f"only in {test_dir.name}/: {only_test or 'none'}")
    classes = tuple(train)

    def samples(per_class):
        return [(f, label) for label, c in enumerate(classes) for f in per_class[c]]

    return classes, samples(train), samples(test)


class _ImageFileDataset(Dataset):
    """Images read lazily with PIL, converted to grey or RGB and resized bilinearly."""

    def __init__(self, samples: list[tuple[Path, int]], size: int, in_channels: int):
        self.samples = samples
        self.size = size
        self.mode = "L" if in_channels == 1 else "RGB"

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        from PIL import Image

        path, label = self.samples[index]
        try:
            with Image.open(path) as image:
                image = image.convert(self.mode).resize((self.size, self.size), Image.Resampling.BILINEAR)
                array = np.asarray(image, dtype=np.float32) / 255.0
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise DataError(f"{path}: cannot read image: {err}") from err
        x = torch.from_numpy(array.reshape(self.size, self.size, -1)).permute(2, 0, 1).contiguous()
        return x, torch.tensor(label, dtype=torch.int64)


def _load_imagefolder(root, *, image_size, timesteps, augment, seed, in_channels, roll, binning, test_fraction) -> DataSplit:
    channels = 3 if in_channels is None else in_channels
    if channels not in (1, 3):
        raise DataError(f"imagefolder in_channels must be 1 (grey) or 3 (RGB), got {channels}")
    expected = "train/ and test/ (or val/) folders with one subfolder of images per class"
    classes, train, test = _class_samples("imagefolder", *_split_folders("imagefolder", root, expected),
                                          IMAGE_EXTENSIONS)
    size = image_size or DEFAULT_IMAGE_SIZE
    train_set = _ImageFileDataset(train, size, channels)
    return DataSplit(name="imagefolder",
                     train=_Augmented(train_set, seed, crop=True, roll=roll) if augment else train_set,
                     test=_ImageFileDataset(test, size, channels), num_classes=len(classes),
                     in_channels=channels, image_size=size, timesteps=None, classes=classes)


# --------------------------------------------------------------------------------------------
# DVS event recordings


def _read_events(path: Path) -> tuple[dict[str, np.ndarray], tuple[int, int] | None]:
    """The arrays x, y, t, p of a recording and its (H, W) sensor size if the file has one."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                names = set(loaded.files)
                arrays = {f: np.asarray(loaded[f]) for f in EVENT_FIELDS if f in names}
                sensor = np.asarray(loaded["sensor_size"]) if "sensor_size" in names else None
        elif isinstance(loaded, np.ndarray) and loaded.dtype.names:
            arrays = {f: np.asarray(loaded[f]) for f in EVENT_FIELDS if f in loaded.dtype.names}
            sensor = None
        else:
            raise DataError(f"{path}: expected an .npz with arrays {', '.join(EVENT_FIELDS)} "
                            f"or a structured .npy with those fields")
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(f"{path}: cannot read event file: {err}") from err
    missing = [f for f in EVENT_FIELDS if f not in arrays]
    if missing:
        raise DataError(f"{path}: missing event field(s) {', '.join(missing)} (expected {', '.join(EVENT_FIELDS)})")
    return arrays, None if sensor is None else _sensor_size(path, sensor)


def _sensor_size(path: Path, value: np.ndarray) -> tuple[int, int]:
    flat = value.reshape(-1)
    if flat.size != 2 or not np.issubdtype(flat.dtype, np.number) or not np.all(flat >= 1) \
            or not np.all(np.mod(flat, 1) == 0):
        raise DataError(f"{path}: sensor_size must be two positive integers (H, W), got {value.tolist()}")
    return int(flat[0]), int(flat[1])


def _integer_coords(path: Path, name: str, values: np.ndarray) -> np.ndarray:
    if np.issubdtype(values.dtype, np.integer):
        coords = values.astype(np.int64)
    elif np.issubdtype(values.dtype, np.floating) and np.all(np.isfinite(values)) and np.all(np.mod(values, 1) == 0):
        coords = values.astype(np.int64)
    else:
        raise DataError(f"{path}: {name} must hold integer pixel coordinates, got dtype {values.dtype}")
    if coords.min() < 0:
        raise DataError(f"{path}: negative {name} coordinate {coords.min()}")
    return coords


def events_to_frames(path: Path, timesteps: int, image_size: int, binning: str = "time") -> torch.Tensor:
    """Bin one recording into (T, 2, image_size, image_size) float32 event counts, by equal time
    spans (``binning="time"``) or equal event counts (``"count"``; module docstring)."""
    if binning not in BINNINGS:
        raise DataError(f"binning must be one of {', '.join(BINNINGS)}, got {binning!r}")
    arrays, sensor = _read_events(path)
    for field, values in arrays.items():
        if values.ndim != 1:
            raise DataError(f"{path}: event array {field} must be 1-D, got shape {values.shape}")
    lengths = {f: len(v) for f, v in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise DataError(f"{path}: event arrays have mismatched lengths {lengths}")
    if lengths["t"] == 0:
        raise DataError(f"{path}: recording holds no events")
    x = _integer_coords(path, "x", arrays["x"])
    y = _integer_coords(path, "y", arrays["y"])
    t, p = arrays["t"], arrays["p"]
    if not (np.issubdtype(t.dtype, np.number) and np.all(np.isfinite(t))):
        raise DataError(f"{path}: timestamps t must be finite numbers, got dtype {t.dtype}")
    if not (np.issubdtype(p.dtype, np.number) or p.dtype == np.bool_):
        raise DataError(f"{path}: polarities p must be numbers or booleans, got dtype {p.dtype}")

    if sensor is None:
        sensor = tuple(DVS_SENSOR_STEP * math.ceil((int(c.max()) + 1) / DVS_SENSOR_STEP) for c in (y, x))
    elif x.max() >= sensor[1] or y.max() >= sensor[0]:
        raise DataError(f"{path}: event at (x={x.max()}, y={y.max()}) lies outside sensor_size (H, W) = {sensor}")
    sensor_h, sensor_w = sensor

    if binning == "count":
        # Equal event counts in time order (stable: files are usually sorted already); frames
        # 0..T-2 get N // T events each and the last frame the rest, as spikingjelly does.
        order = np.argsort(t, kind="stable")
        x, y, p = x[order], y[order], p[order]
        per_frame = len(t) // timesteps
        rank = np.arange(len(t), dtype=np.int64)
        bins = rank // per_frame if per_frame else np.full(len(t), timesteps - 1, np.int64)
    # Time bins of equal span over [t_min, t_max]; t_max falls in the last bin.
    elif np.issubdtype(t.dtype, np.integer):
        offset = t.astype(np.int64) - int(t.min())
        span = int(offset.max())
        bins = offset * timesteps // span if span else np.zeros_like(offset)
    else:
        offset = t.astype(np.float64) - float(t.min())
        span = float(offset.max())
        bins = np.floor(offset * timesteps / span).astype(np.int64) if span else np.zeros(len(t), np.int64)
    bins = np.minimum(bins, timesteps - 1)

    channel = (p > 0).astype(np.int64)
    row = y * image_size // sensor_h
    col = x * image_size // sensor_w
    flat = ((bins * 2 + channel) * image_size + row) * image_size + col
    counts = np.bincount(flat, minlength=timesteps * 2 * image_size * image_size)
    return torch.from_numpy(counts.astype(np.float32).reshape(timesteps, 2, image_size, image_size))


class _EventDataset(Dataset):
    """Event recordings read and binned lazily into (T, 2, H, W) count frames."""

    def __init__(self, samples: list[tuple[Path, int]], timesteps: int, size: int, binning: str = "time"):
        self.samples = samples
        self.timesteps = timesteps
        self.size = size
        self.binning = binning

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        return events_to_frames(path, self.timesteps, self.size, self.binning), torch.tensor(label, dtype=torch.int64)


def _split_by_fraction(name: str, root, test_fraction: float, extensions: tuple[str, ...]):
    """Class names and ``[(file, label)]`` of both splits from one folder of class subfolders:
    the first ``ceil(n (1 - test_fraction))`` files of each class (name order) train."""
    expected = "one subfolder of .npz/.npy event recordings per class (test_fraction > 0)"
    folder = _resolve_root(name, root, expected)
    if (folder / "train").is_dir():
        raise DataError(f"{name} folder {folder} is split into train/ already: use test_fraction = 0")
    per_class = _list_classes(name, folder, extensions)
    train, test = [], []
    for label, files in enumerate(per_class.values()):
        cut = math.ceil(round(len(files) * (1 - test_fraction), 9))
        train += [(f, label) for f in files[:cut]]
        test += [(f, label) for f in files[cut:]]
    if not test:
        raise DataError(f"{name}: test_fraction={test_fraction} leaves no test recordings in {folder}")
    return tuple(per_class), train, test


def _load_dvs(root, *, image_size, timesteps, augment, seed, in_channels, roll, binning, test_fraction) -> DataSplit:
    _check_channels("dvs", in_channels, 2)
    if test_fraction:
        classes, train, test = _split_by_fraction("dvs", root, test_fraction, EVENT_EXTENSIONS)
    else:
        expected = "train/ and test/ folders with one subfolder of .npz/.npy event recordings per class"
        classes, train, test = _class_samples("dvs", *_split_folders("dvs", root, expected), EVENT_EXTENSIONS)
    size = image_size or DEFAULT_DVS_IMAGE_SIZE
    steps = timesteps or DEFAULT_TIMESTEPS
    train_set = _EventDataset(train, steps, size, binning)
    return DataSplit(name="dvs", train=_Augmented(train_set, seed, crop=False, roll=roll) if augment else train_set,
                     test=_EventDataset(test, steps, size, binning), num_classes=len(classes), in_channels=2,
                     image_size=size, timesteps=steps, classes=classes)


_LOADERS = {
    "digits": _load_digits,
    "mnist1d": _load_mnist1d,
    "cifar10": _load_cifar("cifar10"),
    "cifar100": _load_cifar("cifar100"),
    "imagefolder": _load_imagefolder,
    "dvs": _load_dvs,
}
