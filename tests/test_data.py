"""Local data loading: every format is generated here in tmp_path, decoded, and compared exactly."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from stdeploy.data import DATASETS, DataSplit, events_to_frames, load_dataset, make_loader
from stdeploy.errors import DataError

# --------------------------------------------------------------------------------------------
# digits


def test_digits_sizes_ranges_and_types():
    split = load_dataset("digits")
    assert (len(split.train), len(split.test)) == (1437, 360)
    assert (split.num_classes, split.in_channels, split.image_size, split.timesteps) == (10, 1, 8, None)
    x, y = split.train[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32
    assert y.shape == () and y.dtype == torch.int64
    xs = split.train.tensors[0]
    assert float(xs.min()) == 0.0 and float(xs.max()) == 1.0
    counts = torch.bincount(split.test.tensors[1], minlength=10)
    assert counts.min() >= 35 and counts.sum() == 360      # stratified: ~36 per class


def test_digits_split_is_deterministic_per_seed():
    a, b, c = load_dataset("digits", seed=0), load_dataset("digits", seed=0), load_dataset("digits", seed=1)
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    assert torch.equal(a.test.tensors[1], b.test.tensors[1])
    assert not torch.equal(a.test.tensors[0], c.test.tensors[0])


def test_digits_resize_and_channel_check():
    split = load_dataset("digits", image_size=16)
    assert split.train[0][0].shape == (1, 16, 16) and split.image_size == 16
    with pytest.raises(DataError, match="digits has 1 input channel"):
        load_dataset("digits", in_channels=3)


# --------------------------------------------------------------------------------------------
# CIFAR binaries


def _cifar_records(rng, n, label_columns):
    """(records bytes, pixels (n,3,32,32) uint8, label columns) for a small binary batch."""
    labels = [rng.integers(0, hi, n, dtype=np.uint8) for hi in label_columns]
    pixels = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    records = np.concatenate([np.stack(labels, 1), pixels.reshape(n, -1)], axis=1)
    return records.tobytes(), pixels, labels


def _write_cifar10(folder, rng, per_batch=3):
    folder.mkdir(parents=True, exist_ok=True)
    train_px, train_y = [], []
    for i in range(1, 6):
        raw, px, (y,) = _cifar_records(rng, per_batch, (10,))
        (folder / f"data_batch_{i}.bin").write_bytes(raw)
        train_px.append(px)
        train_y.append(y)
    raw, test_px, (test_y,) = _cifar_records(rng, 2, (10,))
    (folder / "test_batch.bin").write_bytes(raw)
    return np.concatenate(train_px), np.concatenate(train_y), test_px, test_y


def _as_tensors(dataset):
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(xs), torch.stack(ys)


def _expected_images(pixels):
    return torch.from_numpy(pixels).to(torch.float32) / 255.0


@pytest.mark.parametrize("use_parent", [False, True])
def test_cifar10_binary_exact(tmp_path, use_parent):
    folder = tmp_path / "cifar-10-batches-bin"
    train_px, train_y, test_px, test_y = _write_cifar10(folder, np.random.default_rng(0))
    split = load_dataset("cifar10", tmp_path if use_parent else folder)
    assert (split.num_classes, split.in_channels, split.image_size, split.timesteps) == (10, 3, 32, None)
    x, y = _as_tensors(split.train)
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and y[0].shape == ()
    assert torch.equal(x, _expected_images(train_px)) and y.tolist() == train_y.tolist()
    x, y = _as_tensors(split.test)
    assert torch.equal(x, _expected_images(test_px)) and y.tolist() == test_y.tolist()


def test_cifar100_binary_uses_fine_label(tmp_path):
    rng = np.random.default_rng(1)
    raw, train_px, (coarse, fine) = _cifar_records(rng, 4, (20, 100))
    (tmp_path / "cifar-100-binary").mkdir()
    (tmp_path / "cifar-100-binary" / "train.bin").write_bytes(raw)
    raw, test_px, (_, test_fine) = _cifar_records(rng, 2, (20, 100))
    (tmp_path / "cifar-100-binary" / "test.bin").write_bytes(raw)
    split = load_dataset("cifar100", tmp_path)
    assert split.num_classes == 100
    x, y = _as_tensors(split.train)
    assert torch.equal(x, _expected_images(train_px)) and y.tolist() == fine.tolist()
    x, y = _as_tensors(split.test)
    assert torch.equal(x, _expected_images(test_px)) and y.tolist() == test_fine.tolist()


def test_cifar_resize(tmp_path):
    _write_cifar10(tmp_path, np.random.default_rng(2))
    split = load_dataset("cifar10", tmp_path, image_size=16)
    x, _ = split.test[0]
    assert x.shape == (3, 16, 16) and split.image_size == 16 and 0 <= x.min() and x.max() <= 1


def test_cifar_augment_is_a_padded_shift_or_flip_and_train_only(tmp_path):
    train_px, _, test_px, _ = _write_cifar10(tmp_path, np.random.default_rng(3))
    split = load_dataset("cifar10", tmp_path, augment=True, seed=5)
    original = _expected_images(train_px)
    for i in range(len(split.train)):
        x, _ = split.train[i]
        padded = torch.nn.functional.pad(original[i], (4, 4, 4, 4))
        candidates = [padded[:, r:r + 32, c:c + 32] for r in range(9) for c in range(9)]
        candidates += [padded.flip(-1)[:, r:r + 32, c:c + 32] for r in range(9) for c in range(9)]
        assert any(torch.equal(x, c) for c in candidates), i
    assert torch.equal(_as_tensors(split.test)[0], _expected_images(test_px))   # test split untouched
    again = load_dataset("cifar10", tmp_path, augment=True, seed=5)
    assert torch.equal(_as_tensors(split.train)[0], _as_tensors(again.train)[0])  # reproducible
    make_loader(again.train, 4, shuffle=False, epoch=1)                          # next epoch: new draws
    assert not torch.equal(_as_tensors(split.train)[0], _as_tensors(again.train)[0])


def test_cifar_errors(tmp_path):
    with pytest.raises(DataError, match="cifar10 needs a local folder: pass --data-root PATH"):
        load_dataset("cifar10")
    with pytest.raises(DataError, match=f"{re.escape(str(tmp_path / 'nope'))} does not exist; expected .*data_batch_1.bin"):
        load_dataset("cifar10", tmp_path / "nope")
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(DataError, match="is not a folder"):
        load_dataset("cifar10", tmp_path / "file")

    folder = tmp_path / "cifar-10-batches-bin"
    _write_cifar10(folder, np.random.default_rng(4))
    (folder / "data_batch_3.bin").unlink()
    (folder / "test_batch.bin").unlink()
    with pytest.raises(DataError, match=f"folder {re.escape(str(folder))} is missing data_batch_3.bin, test_batch.bin"):
        load_dataset("cifar10", tmp_path)

    _write_cifar10(folder, np.random.default_rng(4))
    batch = folder / "data_batch_2.bin"
    batch.write_bytes(batch.read_bytes()[:-1])
    with pytest.raises(DataError, match=f"{re.escape(str(batch))}: size 9218 bytes .*3073-byte cifar10 record"):
        load_dataset("cifar10", folder)

    _write_cifar10(folder, np.random.default_rng(4))
    raw = bytearray((folder / "test_batch.bin").read_bytes())
    raw[3073] = 10                                                  # label of record 1
    (folder / "test_batch.bin").write_bytes(bytes(raw))
    with pytest.raises(DataError, match=f"{re.escape(str(folder / 'test_batch.bin'))}: record 1 has label byte 0 = 10, expected 0..9"):
        load_dataset("cifar10", folder)

    with pytest.raises(DataError, match="cifar100 folder .* is missing train.bin, test.bin"):
        load_dataset("cifar100", folder)


def test_cifar100_bad_fine_label(tmp_path):
    rng = np.random.default_rng(5)
    raw = bytearray(_cifar_records(rng, 2, (20, 100))[0])
    raw[1] = 100
    (tmp_path / "train.bin").write_bytes(bytes(raw))
    (tmp_path / "test.bin").write_bytes(_cifar_records(rng, 1, (20, 100))[0])
    with pytest.raises(DataError, match=f"{re.escape(str(tmp_path / 'train.bin'))}: record 0 has label byte 1 = 100, expected 0..99"):
        load_dataset("cifar100", tmp_path)


# --------------------------------------------------------------------------------------------
# Image folders

COLOURS = {"cat": (255, 0, 0), "dog": (10, 200, 30), "eel": (0, 0, 255)}


def _write_imagefolder(root, test_name="test", classes=("dog", "cat", "eel"), size=(20, 12)):
    for split in ("train", test_name):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for j, ext in enumerate((".png", ".bmp")):
                Image.new("RGB", size, COLOURS[name]).save(folder / f"{j}{ext}")
            (folder / "notes.txt").write_text("ignored")


def test_imagefolder_rgb_and_grey(tmp_path):
    _write_imagefolder(tmp_path)
    split = load_dataset("imagefolder", tmp_path)
    assert split.classes == ("cat", "dog", "eel") and split.num_classes == 3
    assert (split.in_channels, split.image_size, split.timesteps) == (3, 32, None)
    assert len(split.train) == len(split.test) == 6
    for i in range(len(split.test)):
        x, y = split.test[i]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
        colour = torch.tensor(COLOURS[split.classes[int(y)]], dtype=torch.float32) / 255
        assert torch.equal(x, colour.view(3, 1, 1).expand(3, 32, 32))
    assert [int(split.train[i][1]) for i in range(6)] == [0, 0, 1, 1, 2, 2]

    grey = load_dataset("imagefolder", tmp_path, in_channels=1, image_size=8)
    x, y = grey.train[0]
    expected = Image.new("RGB", (1, 1), COLOURS["cat"]).convert("L").getpixel((0, 0)) / 255
    assert x.shape == (1, 8, 8) and grey.in_channels == 1 and int(y) == 0
    assert torch.allclose(x, torch.full((1, 8, 8), expected), atol=0)


def test_imagefolder_val_folder_and_augment(tmp_path):
    _write_imagefolder(tmp_path, test_name="val")
    split = load_dataset("imagefolder", tmp_path, augment=True, image_size=16)
    x, _ = split.train[0]
    assert x.shape == (3, 16, 16) and len(split.test) == 6
    assert torch.equal(split.test[0][0], torch.tensor([1.0, 0, 0]).view(3, 1, 1).expand(3, 16, 16))


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError, match="imagefolder needs a local folder"):
        load_dataset("imagefolder")
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match=f"folder {re.escape(str(tmp_path))} has no test/ \\(or val/\\)"):
        load_dataset("imagefolder", tmp_path)

    other = tmp_path / "mismatch"
    _write_imagefolder(other, classes=("cat", "dog"))
    (other / "test" / "dog").rename(other / "test" / "eel")
    with pytest.raises(DataError, match=r"class folders differ .*only in train/: \['dog'\]; only in test/: \['eel'\]"):
        load_dataset("imagefolder", other)

    empty = tmp_path / "empty"
    _write_imagefolder(empty, classes=("cat",))
    (empty / "train" / "dog").mkdir()
    with pytest.raises(DataError, match=f"class folder {re.escape(str(empty / 'train' / 'dog'))} holds no"):
        load_dataset("imagefolder", empty)

    broken = tmp_path / "broken"
    _write_imagefolder(broken, classes=("cat",))
    bad = broken / "test" / "cat" / "0.png"
    bad.write_bytes(b"not a png")
    split = load_dataset("imagefolder", broken)
    with pytest.raises(DataError, match=f"{re.escape(str(bad))}: cannot read image"):
        split.test[0]

    with pytest.raises(DataError, match="in_channels must be 1 \\(grey\\) or 3"):
        load_dataset("imagefolder", broken, in_channels=2)


# --------------------------------------------------------------------------------------------
# DVS events

# A tiny recording on a 4x4 sensor, binned to T=2 frames of 2x2 pixels. With t_min = 0 and
# t_max = 10 the bins are t*2//10 (t = 10 joins the last bin), pixels are (x*2//4, y*2//4).
EVENTS = {
    #      e0 e1 e2 e3  e4 e5 e6
    "x": [0, 1, 3, 2, 0, 3, 1],
    "y": [0, 0, 3, 1, 2, 0, 1],
    "t": [0, 4, 5, 10, 9, 2, 1],
    "p": [1, 0, 1, -1, 1, 1, 1],
}


def _expected_frames(size=2):
    frames = torch.zeros(2, 2, size, size)
    # (bin, channel, row, col) of each event, worked out by hand from EVENTS:
    for index in [(0, 1, 0, 0), (0, 0, 0, 0), (1, 1, 1, 1), (1, 0, 0, 1), (1, 1, 1, 0), (0, 1, 0, 1), (0, 1, 0, 0)]:
        frames[index] += 1
    return frames


def _structured(events, t_dtype=np.float64):
    arr = np.zeros(len(events["x"]), dtype=[("x", np.int16), ("y", np.int16), ("t", t_dtype), ("p", np.int8)])
    for f in ("x", "y", "t", "p"):
        arr[f] = events[f]
    return arr


def _write_dvs(root):
    for split in ("train", "test"):
        for label, name in enumerate(("clap", "wave")):
            folder = root / split / name
            folder.mkdir(parents=True)
            np.savez(folder / "a.npz", x=np.array(EVENTS["x"], np.uint16), y=np.array(EVENTS["y"], np.uint16),
                     t=np.array(EVENTS["t"], np.int64) + 1000, p=np.array(EVENTS["p"], np.int8),
                     sensor_size=np.array([4, 4]))
            np.save(folder / "b.npy", _structured(EVENTS))


def test_dvs_npz_and_npy_frames_exact(tmp_path):
    _write_dvs(tmp_path)
    split = load_dataset("dvs", tmp_path, image_size=2, timesteps=2)
    assert split.classes == ("clap", "wave")
    assert (split.num_classes, split.in_channels, split.image_size, split.timesteps) == (2, 2, 2, 2)
    x, y = split.train[0]                                  # clap/a.npz: sensor 4x4 from the file
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and int(y) == 0
    assert torch.equal(x, _expected_frames())
    assert int(split.test[3][1]) == 1

    # b.npy has no sensor size: 128x128 by default, so at 64x64 pixels map as (x//2, y//2) again.
    split = load_dataset("dvs", tmp_path, timesteps=2)
    x, _ = split.train[1]
    assert x.shape == (2, 2, 64, 64) and split.image_size == 64
    assert torch.equal(x[:, :, :2, :2], _expected_frames()) and x.sum() == len(EVENTS["t"])


def test_dvs_defaults_and_sensor_rounding(tmp_path):
    events = {"x": [0, 200], "y": [0, 100], "t": [0.0, 1.0], "p": [True, False]}
    frames = events_to_frames(_save_npy(tmp_path / "r.npy", events), timesteps=10, image_size=64)
    # Max x = 200 -> sensor width 256; max y = 100 -> sensor height 128.
    assert frames.shape == (10, 2, 64, 64)
    assert frames[0, 1, 0, 0] == 1 and frames[9, 0, 100 * 64 // 128, 200 * 64 // 256] == 1 and frames.sum() == 2

    _write_dvs(tmp_path / "d")
    split = load_dataset("dvs", tmp_path / "d")
    assert split.train[0][0].shape == (10, 2, 64, 64) and split.timesteps == 10


def test_dvs_augment_flips_train_only(tmp_path):
    _write_dvs(tmp_path)
    split = load_dataset("dvs", tmp_path, image_size=2, timesteps=2, augment=True, seed=3)
    seen = set()
    for epoch in range(8):
        make_loader(split.train, 1, shuffle=False, epoch=epoch)
        x, _ = split.train[0]
        assert torch.equal(x, _expected_frames()) or torch.equal(x, _expected_frames().flip(-1))
        seen.add(torch.equal(x, _expected_frames()))
    assert seen == {True, False}
    assert torch.equal(split.test[0][0], _expected_frames())


def _save_npz(path, events, **extra):
    np.savez(path, **{k: np.asarray(v) for k, v in events.items()}, **extra)
    return path


def _save_npy(path, events):
    np.save(path, _structured(events, t_dtype=np.asarray(events["t"]).dtype))
    return path


@pytest.mark.parametrize("change, message", [
    (lambda e: e.pop("p"), "missing event field\\(s\\) p"),
    (lambda e: e.update(t=e["t"][:-1]), "mismatched lengths"),
    (lambda e: e.update(x=[-1] + e["x"][1:]), "negative x coordinate -1"),
    (lambda e: e.update({k: [] for k in ("x", "y", "t", "p")}), "holds no events"),
    (lambda e: e.update(y=[[0]] * len(e["y"])), "event array y must be 1-D"),
    (lambda e: e.update(x=[0.5] * len(e["x"])), "x must hold integer pixel coordinates"),
])
def test_dvs_malformed_npz(tmp_path, change, message):
    events = {k: list(v) for k, v in EVENTS.items()}
    change(events)
    path = _save_npz(tmp_path / "bad.npz", events)
    with pytest.raises(DataError, match=f"{re.escape(str(path))}: .*{message}"):
        events_to_frames(path, 2, 2)


def test_dvs_bad_sensor_and_unreadable_files(tmp_path):
    path = _save_npz(tmp_path / "small.npz", EVENTS, sensor_size=np.array([2, 2]))
    with pytest.raises(DataError, match=f"{re.escape(str(path))}: event at .* outside sensor_size"):
        events_to_frames(path, 2, 2)
    path = _save_npz(tmp_path / "odd.npz", EVENTS, sensor_size=np.array([4, 4, 2]))
    with pytest.raises(DataError, match=f"{re.escape(str(path))}: sensor_size must be two positive integers"):
        events_to_frames(path, 2, 2)
    path = tmp_path / "junk.npz"
    path.write_bytes(b"definitely not numpy")
    with pytest.raises(DataError, match=f"{re.escape(str(path))}: cannot read event file"):
        events_to_frames(path, 2, 2)
    path = tmp_path / "plain.npy"
    np.save(path, np.arange(4))
    with pytest.raises(DataError, match=f"{re.escape(str(path))}: expected an .npz with arrays x, y, t, p"):
        events_to_frames(path, 2, 2)
    path = tmp_path / "fields.npy"
    np.save(path, np.zeros(3, dtype=[("x", int), ("y", int), ("t", float)]))
    with pytest.raises(DataError, match=f"{re.escape(str(path))}: missing event field\\(s\\) p"):
        events_to_frames(path, 2, 2)


def test_dvs_errors_through_load_dataset(tmp_path):
    with pytest.raises(DataError, match="dvs needs a local folder: pass --data-root PATH"):
        load_dataset("dvs")
    with pytest.raises(DataError, match=f"{re.escape(str(tmp_path))} has no train/ and no test/"):
        load_dataset("dvs", tmp_path)
    _write_dvs(tmp_path)
    bad = tmp_path / "test" / "wave" / "a.npz"
    _save_npz(bad, {"x": [0], "y": [0], "t": [0]})
    split = load_dataset("dvs", tmp_path)
    with pytest.raises(DataError, match=f"{re.escape(str(bad))}: missing event field"):
        split.test[2]
    with pytest.raises(DataError, match="dvs has 2 input channel"):
        load_dataset("dvs", tmp_path, in_channels=3)


# --------------------------------------------------------------------------------------------
# load_dataset arguments, DataSplit, make_loader


def test_unknown_name_and_bad_arguments():
    with pytest.raises(DataError, match="unknown data set 'mnist'; known: " + ", ".join(DATASETS)):
        load_dataset("mnist")
    with pytest.raises(DataError, match="timesteps must be a positive integer, got 0"):
        load_dataset("dvs", timesteps=0)
    with pytest.raises(DataError, match="image_size must be a positive integer"):
        load_dataset("digits", image_size=-1)
    with pytest.raises(DataError, match="num_classes must be a positive integer"):
        DataSplit("x", [], [], num_classes=0, in_channels=1, image_size=8, timesteps=None)


def test_make_loader_is_deterministic_per_seed_and_epoch():
    dataset = torch.utils.data.TensorDataset(torch.arange(50))

    def order(**kw):
        return torch.cat([b[0] for b in make_loader(dataset, 8, **kw)]).tolist()

    assert order(shuffle=False) == list(range(50))
    assert order(shuffle=True, seed=1, epoch=2) == order(shuffle=True, seed=1, epoch=2)
    assert order(shuffle=True, seed=1, epoch=2) != order(shuffle=True, seed=1, epoch=3)
    assert sorted(order(shuffle=True)) == list(range(50))
    assert len(list(make_loader(dataset, 8, shuffle=True, drop_last=True))) == 6
    sampler = torch.utils.data.SequentialSampler(dataset)
    assert order(shuffle=False, sampler=sampler) == list(range(50))
    with pytest.raises(DataError, match="either shuffle=True or a sampler"):
        make_loader(dataset, 8, shuffle=True, sampler=sampler)
    with pytest.raises(DataError, match="batch_size must be a positive integer"):
        make_loader(dataset, 0, shuffle=False)


def test_worker_processes_load_the_same_batches(tmp_path):
    """make_loader(num_workers=N) gives the same shuffled, augmented batches as loading in the
    training process (each item's draw depends on seed, epoch and index only)."""
    from stdeploy.synthetic import write_dvs

    split = load_dataset("dvs", write_dvs(tmp_path / "events", per_class=4), augment=True, image_size=16, timesteps=3,
                         test_fraction=0.25, roll=2, seed=3)
    for epoch in (0, 1):
        alone = list(make_loader(split.train, 4, shuffle=True, seed=3, epoch=epoch))
        workers = list(make_loader(split.train, 4, shuffle=True, seed=3, epoch=epoch, num_workers=2))
        assert len(alone) == len(workers) == 3
        for (xa, ya), (xw, yw) in zip(alone, workers):
            assert torch.equal(xa, xw) and torch.equal(ya, yw)
    with pytest.raises(DataError, match="num_workers must be an integer >= 0"):
        make_loader(split.train, 4, shuffle=False, num_workers=-1)


# --------------------------------------------------------------------------------------------
# MNIST-1D (generated by the mnist1d package, cached)


def test_mnist1d_shapes_counts_checksum_and_cache(tmp_path, monkeypatch):
    from stdeploy import data as data_mod

    monkeypatch.setenv(data_mod.MNIST1D_CACHE_ENV, str(tmp_path))
    data_mod.mnist1d_arrays.cache_clear()
    split = load_dataset("mnist1d")
    cache = tmp_path / "mnist1d" / data_mod.MNIST1D_FILE
    assert cache.is_file() and not list(cache.parent.glob(".*.tmp"))   # written atomically, nothing left over
    assert (len(split.train), len(split.test)) == (4000, 1000)
    assert (split.num_classes, split.in_channels, split.image_size, split.input_dims) == (10, 1, 40, 1)
    x, y = split.train[0]
    assert x.shape == (1, 1, 40) and x.dtype == torch.float32 and y.dtype == torch.int64
    # the package's canonical seed: these class counts and this checksum, every time
    assert torch.bincount(split.train.tensors[1], minlength=10).tolist() == [398, 396, 411, 394, 394, 402, 401, 404, 402, 398]
    assert torch.bincount(split.test.tensors[1], minlength=10).tolist() == [102, 104, 89, 106, 106, 98, 99, 96, 98, 102]
    xs = split.train.tensors[0]
    assert abs(float(xs.mean())) < 0.01 and 0.95 < float(xs.std()) < 1.05
    with np.load(cache) as f:
        arrays = {k: f[k] for k in f.files}
    assert data_mod.mnist1d_checksum(arrays) == data_mod.MNIST1D_SHA256 == \
        "496b88aa2dac9088b429dc17dfd8598509b68d542d31bcfb2504b31492519f73"
    # the second load reads the cache (same arrays), and the seed does not change the split
    data_mod.mnist1d_arrays.cache_clear()
    again = load_dataset("mnist1d", seed=3)
    assert torch.equal(again.train.tensors[0], xs) and torch.equal(again.test.tensors[1], split.test.tensors[1])
    with pytest.raises(DataError, match="length 40"):
        load_dataset("mnist1d", image_size=32)


def test_mnist1d_generation_leaves_global_random_state_alone():
    import random

    from stdeploy.data import generate_mnist1d

    random.seed(5)
    np.random.seed(5)
    expected = (random.random(), np.random.rand())
    random.seed(5)
    np.random.seed(5)
    generate_mnist1d()
    assert (random.random(), np.random.rand()) == expected


def test_mnist1d_damaged_cache_is_an_error_naming_the_file(tmp_path):
    from stdeploy import data as data_mod

    good = data_mod.mnist1d_arrays(str(tmp_path))                     # generates and caches
    bad = {k: v.copy() for k, v in good.items()}
    bad["x_train"][0, 0] += 1.0
    np.savez(tmp_path / data_mod.MNIST1D_FILE, **bad)
    data_mod.mnist1d_arrays.cache_clear()
    with pytest.raises(DataError, match=re.escape(str(tmp_path / data_mod.MNIST1D_FILE)) + ".*sha256"):
        load_dataset("mnist1d", tmp_path)
    data_mod.mnist1d_arrays.cache_clear()
