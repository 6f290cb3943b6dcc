"""sfd_jax.data: file formats (tiny synthetic files), safety of the CIFAR unpickler, transforms, BatchStream,
prefetch, and the real Fashion-MNIST from the Debian package `dataset-fashion-mnist`."""
from __future__ import annotations

import gzip
import os
import pickle
import struct
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sfd_jax.data import (BatchStream, DatasetError, ImageDataset, dataset_from_config, device_put_fn, load_dataset,
                          prefetch, random_flip, to_model_space)
from sfd_jax.data import formats

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def _rng(seed=0):
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------------------------------------------------
# CIFAR-10

def _cifar_rows(images_hwc: np.ndarray) -> np.ndarray:
    return images_hwc.transpose(0, 3, 1, 2).reshape(len(images_hwc), 3072)


def _write_cifar(root: Path, per_batch=3, bytes_keys=False):
    """Five train batches + test batch + meta, pickled with protocol 2 from numpy arrays. Returns truth."""
    root.mkdir(parents=True, exist_ok=True)
    rng = _rng(1)
    truth = {}
    k = (lambda s: s.encode()) if bytes_keys else (lambda s: s)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        imgs = rng.integers(0, 256, (per_batch, 32, 32, 3), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        d = {k("batch_label"): "x", k("labels"): labels, k("data"): _cifar_rows(imgs),
             k("filenames"): [f"{name}_{i}.png" for i in range(per_batch)]}
        (root / name).write_bytes(pickle.dumps(d, protocol=2))
        truth[name] = (imgs, np.array(labels))
    names = [f"class{i}" for i in range(10)]
    (root / "batches.meta").write_bytes(pickle.dumps({k("label_names"): names, k("num_vis"): 3072}, protocol=2))
    return truth, tuple(names)


def _expected(truth, files):
    return (np.concatenate([truth[f][0] for f in files]), np.concatenate([truth[f][1] for f in files]))


TRAIN = [f"data_batch_{i}" for i in range(1, 6)]


@pytest.mark.parametrize("bytes_keys", [False, True])
def test_cifar_directory_round_trip(tmp_path, bytes_keys):
    truth, names = _write_cifar(tmp_path / "cifar-10-batches-py", bytes_keys=bytes_keys)
    ds = load_dataset("CIFAR10", tmp_path)                      # finds the torchvision sub-folder
    imgs, labels = _expected(truth, TRAIN)
    assert ds.images.dtype == np.uint8 and ds.images.shape == (15, 32, 32, 3)
    assert ds.labels.dtype == np.int64
    np.testing.assert_array_equal(ds.images, imgs)
    np.testing.assert_array_equal(ds.labels, labels)
    assert ds.class_names == names and ds.n_classes == 10 and ds.name == "cifar10"
    test = load_dataset("cifar10", tmp_path / "cifar-10-batches-py", split="test")
    np.testing.assert_array_equal(test.images, truth["test_batch"][0])
    both = load_dataset("cifar10", tmp_path, split="train+test")
    assert len(both) == 18


def test_cifar_orientation(tmp_path):
    """A single byte at a known CHW row offset lands at the expected (row, col, channel)."""
    root = tmp_path / "c"
    root.mkdir()
    data = np.zeros((1, 3072), np.uint8)
    data[0, 0 * 1024 + 0 * 32 + 31] = 200     # red, row 0, col 31 (top right)
    data[0, 1 * 1024 + 5 * 32 + 2] = 100      # green, row 5, col 2
    for name in TRAIN:
        (root / name).write_bytes(pickle.dumps({"data": data, "labels": [3]}, protocol=2))
    ds = load_dataset("cifar10", root)          # no batches.meta: built-in names
    img = ds.images[0]
    assert img[0, 31, 0] == 200 and img[5, 2, 1] == 100 and int(img.sum()) == 300
    assert ds.class_names[0] == "airplane"


def _py2_batch(row: np.ndarray, label: int) -> bytes:
    """A batch as Python 2's cPickle (protocol 2) wrote the real CIFAR files: numpy.core names, str payloads."""
    payload = row.astype(np.uint8).tobytes()
    return (b"\x80\x02}(U\x04data"
            b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R"
            b"(K\x01M\x01\x00M\x00\x0c\x86cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R"
            b"(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
            b"\x89T" + struct.pack("<I", len(payload)) + payload + b"tb"
            b"U\x06labels]K" + bytes([label]) + b"au.")


def test_cifar_python2_format(tmp_path):
    rows = _rng(9).integers(0, 256, (6, 3072), dtype=np.uint8)
    for i, name in enumerate(TRAIN + ["test_batch"]):
        (tmp_path / name).write_bytes(_py2_batch(rows[i], i))
    ds = load_dataset("cifar10", tmp_path, split="train+test")
    np.testing.assert_array_equal(ds.images, rows.reshape(6, 3, 32, 32).transpose(0, 2, 3, 1))
    assert ds.labels.tolist() == [0, 1, 2, 3, 4, 5]


def test_cifar_tar_gz_read_in_place(tmp_path):
    truth, names = _write_cifar(tmp_path / "src" / "cifar-10-batches-py")
    tar_dir = tmp_path / "data"
    tar_dir.mkdir()
    tar_path = tar_dir / "cifar-10-python.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tf:
        tf.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    for p in (tar_path, tar_dir):                 # the archive itself, or a directory holding it
        ds = load_dataset("cifar10", p, split="train+test")
        imgs, labels = _expected(truth, TRAIN + ["test_batch"])
        np.testing.assert_array_equal(ds.images, imgs)
        np.testing.assert_array_equal(ds.labels, labels)
        assert ds.class_names == names
    assert sorted(os.listdir(tar_dir)) == ["cifar-10-python.tar.gz"]   # nothing extracted


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvilExec:
    def __reduce__(self):
        return (exec, ("raise SystemExit('executed')",))


@pytest.mark.parametrize("kind", ["system", "exec"])
def test_cifar_malicious_pickle_refused(tmp_path, kind):
    root = tmp_path / "c"
    _write_cifar(root)
    marker = tmp_path / "pwned"
    payload = _Evil(marker) if kind == "system" else _EvilExec()
    evil = {"data": np.zeros((1, 3072), np.uint8), "labels": [0], "x": payload}
    (root / "data_batch_3").write_bytes(pickle.dumps(evil, protocol=2))
    with pytest.raises(DatasetError) as ei:
        load_dataset("cifar10", root)
    msg = str(ei.value)
    assert "\n" not in msg and "refusing to unpickle global" in msg and "data_batch_3" in msg
    assert ("system" in msg) if kind == "system" else (".exec'" in msg)
    assert not marker.exists()


def test_safe_unpickle_accepts_numpy_pickles():
    obj = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": [np.int64(5)], "c": np.array([1, 2], ">i4")}
    for proto in (2, 4, 5):
        out = formats.safe_unpickle(pickle.dumps(obj, protocol=proto), "t")
        np.testing.assert_array_equal(out["a"], obj["a"])
        np.testing.assert_array_equal(out["c"], obj["c"])
        assert out["b"][0] == 5


def test_cifar_missing_and_malformed(tmp_path):
    with pytest.raises(DatasetError, match="data_batch_1..5") as ei:
        load_dataset("cifar10", tmp_path / "nowhere")
    assert "nowhere" in str(ei.value) and "\n" not in str(ei.value)
    root = tmp_path / "c"
    _write_cifar(root)
    (root / "data_batch_2").write_bytes(pickle.dumps({"data": np.zeros((2, 10), np.uint8), "labels": [0, 1]}, 2))
    with pytest.raises(DatasetError, match=r"data_batch_2.*uint8 \[N, 3072\]"):
        load_dataset("cifar10", root)
    (root / "data_batch_2").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match="data_batch_2: not a readable pickle"):
        load_dataset("cifar10", root)


# ---------------------------------------------------------------------------------------------------------------
# STL-10

def _stl_bytes(images_hwc):
    # Per image: 3 planes, each column-major: [C][W][H].
    return images_hwc.transpose(0, 3, 2, 1).tobytes()


def _write_stl(root: Path, n_train=3, n_test=2):
    root.mkdir(parents=True, exist_ok=True)
    rng = _rng(2)
    out = {}
    for part, n in (("train", n_train), ("test", n_test)):
        imgs = rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)
        labels = rng.integers(1, 11, n).astype(np.uint8)
        (root / f"{part}_X.bin").write_bytes(_stl_bytes(imgs))
        (root / f"{part}_y.bin").write_bytes(labels.tobytes())
        out[part] = (imgs, labels.astype(np.int64) - 1)
    return out


def test_stl10_round_trip_and_orientation(tmp_path):
    truth = _write_stl(tmp_path / "stl10_binary")
    ds = load_dataset("STL10", tmp_path, split="train+test")
    np.testing.assert_array_equal(ds.images, np.concatenate([truth["train"][0], truth["test"][0]]))
    np.testing.assert_array_equal(ds.labels, np.concatenate([truth["train"][1], truth["test"][1]]))
    assert ds.labels.min() >= 0 and ds.labels.max() <= 9 and ds.class_names[2] == "car"
    # Orientation from the file layout directly: byte (c=0, col=95, row=0) is the top-right red pixel.
    raw = np.zeros(3 * 96 * 96, np.uint8)
    raw[0 * 9216 + 95 * 96 + 0] = 250
    raw[2 * 9216 + 1 * 96 + 40] = 7               # blue, col 1, row 40
    root = tmp_path / "o"
    root.mkdir()
    (root / "train_X.bin").write_bytes(raw.tobytes())
    (root / "train_y.bin").write_bytes(bytes([10]))
    one = load_dataset("stl10", root, split="train")
    assert one.images[0, 0, 95, 0] == 250 and one.images[0, 40, 1, 2] == 7 and int(one.images.sum()) == 257
    assert one.labels.tolist() == [9]


def test_stl10_resize_is_pil_bilinear(tmp_path):
    truth = _write_stl(tmp_path, n_train=2, n_test=1)
    ds = load_dataset("stl10", tmp_path, split="train", image_size=64)
    assert ds.images.shape == (2, 64, 64, 3)
    ref = np.asarray(Image.fromarray(truth["train"][0][1]).resize((64, 64), Image.BILINEAR))
    np.testing.assert_array_equal(ds.images[1], ref)


def test_stl10_bad_files(tmp_path):
    _write_stl(tmp_path)
    (tmp_path / "test_X.bin").write_bytes(b"\0" * 100)
    with pytest.raises(DatasetError, match="test_X.bin"):
        load_dataset("stl10", tmp_path, split="test")
    with pytest.raises(DatasetError, match="train_X.bin and train_y.bin"):
        load_dataset("stl10", tmp_path / "empty")


# ---------------------------------------------------------------------------------------------------------------
# idx (MNIST / Fashion-MNIST)

def _idx(arr: np.ndarray) -> bytes:
    return struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def _write_mnist(root: Path, gz: bool, n=4):
    root.mkdir(parents=True, exist_ok=True)
    rng = _rng(3)
    out = {}
    for prefix in ("train", "t10k"):
        imgs = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        imgs[0] = 0
        imgs[0, 0, 27] = 255                       # top-right
        imgs[0, 20, 3] = 128
        labels = rng.integers(0, 10, n).astype(np.uint8)
        for kind, arr in (("images-idx3", imgs), ("labels-idx1", labels)):
            data = _idx(arr)
            name = f"{prefix}-{kind}-ubyte"
            if gz:
                (root / (name + ".gz")).write_bytes(gzip.compress(data))
            else:
                (root / name).write_bytes(data)
        out[prefix] = (imgs, labels)
    return out


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
    truth = _write_mnist(tmp_path / "MNIST" / "raw", gz)
    ds = load_dataset("MNIST", tmp_path)
    assert ds.images.shape == (4, 28, 28, 1) and ds.images.dtype == np.uint8
    np.testing.assert_array_equal(ds.images[..., 0], truth["train"][0])
    np.testing.assert_array_equal(ds.labels, truth["train"][1].astype(np.int64))
    assert ds.images[0, 0, 27, 0] == 255 and ds.images[0, 20, 3, 0] == 128 and int(ds.images[0].sum()) == 383
    test = load_dataset("mnist", tmp_path / "MNIST" / "raw", split="test")
    np.testing.assert_array_equal(test.images[..., 0], truth["t10k"][0])


def test_idx_resize_and_channels(tmp_path):
    truth = _write_mnist(tmp_path, gz=True)
    ds = load_dataset("fashion_mnist", tmp_path, image_size=32, channels=3)
    assert ds.images.shape == (4, 32, 32, 3)
    ref = np.asarray(Image.fromarray(truth["train"][0][2]).resize((32, 32), Image.BILINEAR))
    for c in range(3):
        np.testing.assert_array_equal(ds.images[2, ..., c], ref)
    assert ds.class_names[-1] == "Ankle boot"


def test_idx_bad_header(tmp_path):
    _write_mnist(tmp_path, gz=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x0d\x01" + struct.pack(">I", 4) + b"\0" * 16)
    with pytest.raises(DatasetError, match=r"train-labels-idx1-ubyte: idx data type 0x0d unsupported"):
        load_dataset("mnist", tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01" + struct.pack(">I", 9) + b"\0" * 4)
    with pytest.raises(DatasetError, match="header says shape"):
        load_dataset("mnist", tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# npz, digits, names, config

def test_npz_value_ranges(tmp_path):
    rng = _rng(4)
    u8 = rng.integers(0, 256, (5, 6, 7, 3), dtype=np.uint8)
    labels = np.array([0, 1, 2, 1, 0])
    for name, images in (("u8", u8), ("unit", u8 / 255.0), ("sym", u8.astype(np.float32) / 127.5 - 1.0)):
        p = tmp_path / f"{name}.npz"
        np.savez(p, images=images, labels=labels)
        ds = load_dataset("npz", p)
        np.testing.assert_array_equal(ds.images, u8)
        np.testing.assert_array_equal(ds.labels, labels)
        assert ds.n_classes == 3
    # Raw sample outputs may overshoot [-1, 1]: clamped.
    np.savez(tmp_path / "over.npz", images=np.full((1, 2, 2, 1), -1.3, np.float32), labels=np.array([0]))
    assert load_dataset("npz", tmp_path / "over.npz").images.max() == 0
    np.savez(tmp_path / "bad.npz", images=np.full((1, 2, 2, 3), 7.0), labels=np.array([0]))
    with pytest.raises(DatasetError, match=r"bad.npz: float 'images' must lie in \[0, 1\] or \[-1, 1\]"):
        load_dataset("npz", tmp_path / "bad.npz")
    np.savez(tmp_path / "nolab.npz", images=u8)
    with pytest.raises(DatasetError, match="nolab.npz: missing array"):
        load_dataset("npz", tmp_path / "nolab.npz")


def test_digits_split():
    from sklearn.datasets import load_digits
    full = load_dataset("digits", split="all")
    train, test = load_dataset("Digits", split="train"), load_dataset("digits", split="test")
    assert (len(full), len(train), len(test)) == (1797, 1437, 360)
    assert full.images.shape == (1797, 8, 8, 1) and full.images.dtype == np.uint8
    np.testing.assert_array_equal(full.images[..., 0], np.round(load_digits().images * 255 / 16).astype(np.uint8))
    assert full.images.max() == 255 and 128 in full.images      # 8 -> 127.5 -> 128
    tr_idx, te_idx = formats.digits_split_indices()
    assert not set(tr_idx) & set(te_idx) and len(set(tr_idx) | set(te_idx)) == 1797
    np.testing.assert_array_equal(train.images, full.images[tr_idx])
    again = load_dataset("digits", split="test")
    np.testing.assert_array_equal(again.images, test.images)
    np.testing.assert_array_equal(again.labels, test.labels)
    counts = np.bincount(test.labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37               # stratified
    up = load_dataset("digits", split="test", image_size=16, channels=3)
    assert up.images.shape == (360, 16, 16, 3)


def test_names_and_errors(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet", tmp_path)
    with pytest.raises(DatasetError, match="unknown split 'val'"):
        load_dataset("cifar10", tmp_path, split="val")
    with pytest.raises(DatasetError, match="fashion_mnist"):
        load_dataset("Fashion-MNIST", tmp_path)
    assert issubclass(DatasetError, ValueError)


def test_dataset_from_config(tmp_path):
    from sfd_jax.ddpm.config import ddpm_base
    _write_mnist(tmp_path, gz=True)
    cfg = ddpm_base(dataset="MNIST", image_size=32)
    cfg.data.path = str(tmp_path)
    ds = dataset_from_config(cfg)
    assert ds.images.shape == (4, 32, 32, 3) and ds.name == "mnist"
    cfg.data.n_classes = 5
    with pytest.raises(DatasetError, match="config.data.n_classes=5"):
        dataset_from_config(cfg)
    _write_stl(tmp_path / "stl", n_train=2, n_test=3)
    cfg = ddpm_base(dataset="STL10", image_size=64)
    cfg.data.path = str(tmp_path / "stl")
    ds = dataset_from_config(cfg)                                  # STL-10 defaults to train+test
    assert ds.images.shape == (5, 64, 64, 3)


def test_image_dataset_helpers():
    imgs = np.arange(6 * 2 * 2, dtype=np.uint8).reshape(6, 2, 2, 1)
    ds = ImageDataset(imgs, np.array([0, 1, 2, 0, 1, 2]), 3, "t")
    assert len(ds.select_labels([1, 2])) == 4 and ds.subset([5, 0]).labels.tolist() == [2, 0]
    with pytest.raises(DatasetError, match=r"labels must lie in \[0, 2\)"):
        ImageDataset(imgs, np.array([0, 1, 2, 0, 1, 2]), 2, "t")


# ---------------------------------------------------------------------------------------------------------------
# transforms

def test_to_model_space_and_flip():
    x = np.array([0, 1, 127, 128, 254, 255], np.uint8).reshape(1, 1, 6, 1)
    y = to_model_space(x)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, (x.astype(np.float32) / np.float32(255)) * np.float32(2) - np.float32(1))
    assert y.min() == -1.0 and y.max() == 1.0
    imgs = _rng(5).integers(0, 256, (64, 3, 4, 2), dtype=np.uint8)
    f = random_flip(np.random.default_rng(0), imgs)
    flipped = [bool((f[i] == imgs[i, :, ::-1]).all()) for i in range(64)]
    kept = [bool((f[i] == imgs[i]).all()) for i in range(64)]
    assert all(a or b for a, b in zip(flipped, kept)) and 10 < sum(flipped) < 54
    import jax
    fj = np.asarray(random_flip(jax.random.key(0), imgs))
    assert all((fj[i] == imgs[i]).all() or (fj[i] == imgs[i, :, ::-1]).all() for i in range(64))


# ---------------------------------------------------------------------------------------------------------------
# BatchStream

def _toy(n=23, size=4):
    rng = _rng(6)
    imgs = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    imgs[:, 0, 0, 0] = np.arange(n)                # identify an image by its first byte
    return ImageDataset(imgs, np.arange(n) % 5, 5, "toy")


def _ids(ds, images):
    u8 = np.round((images + 1) / 2 * 255).astype(np.int64)
    # The id sits at (0, 0) or, if flipped, at (0, W-1).
    matches = [np.flatnonzero((ds.images == u8[i]).all(axis=(1, 2, 3)) |
                              (ds.images == u8[i, :, ::-1]).all(axis=(1, 2, 3))) for i in range(len(u8))]
    assert all(len(m) == 1 for m in matches)
    return np.array([m[0] for m in matches])


def test_stream_definition_and_determinism():
    ds = _toy()
    s = BatchStream(ds, 8, seed=7, process_index=0, process_count=1)
    stream = np.concatenate([np.random.default_rng([7, e]).permutation(23) for e in range(4)])
    for k in range(10):
        np.testing.assert_array_equal(s.global_indices(k), stream[k * 8:(k + 1) * 8])
        x, y = s.local_batch(k)
        assert x.dtype == np.float32 and y.dtype == np.int32 and x.shape == (8, 4, 4, 3)
        np.testing.assert_array_equal(_ids(ds, x), stream[k * 8:(k + 1) * 8])
        np.testing.assert_array_equal(y, ds.labels[stream[k * 8:(k + 1) * 8]])
    t = BatchStream(ds, 8, seed=7, process_index=0, process_count=1)
    for k in (3, 0, 9):
        np.testing.assert_array_equal(s.local_batch(k)[0], t.local_batch(k)[0])
    other = BatchStream(ds, 8, seed=8, process_index=0, process_count=1)
    assert not np.array_equal(other.global_indices(0), s.global_indices(0))
    # flips happen, and are a function of the step only
    x0 = s.local_batch(0)[0]
    plain = BatchStream(ds, 8, seed=7, flip=False, process_index=0, process_count=1).local_batch(0)[0]
    assert not np.array_equal(x0, plain) and np.array_equal(np.abs(x0).sum(), np.abs(plain).sum())


def test_stream_resume_equals_uninterrupted():
    ds = _toy()
    full = BatchStream(ds, 6, seed=1, process_index=0, process_count=1)
    first = [b for _, b in zip(range(12), full.iterate(0))]
    resumed = BatchStream(ds, 6, seed=1, process_index=0, process_count=1)
    later = [b for _, b in zip(range(7), resumed.iterate(5))]
    for a, b in zip(first[5:], later):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.parametrize("procs", [2, 4])
def test_stream_process_slices(procs):
    ds = _toy()
    g = BatchStream(ds, 8, seed=3, process_index=0, process_count=1)
    shards = [BatchStream(ds, 8, seed=3, process_index=i, process_count=procs) for i in range(procs)]
    for k in (0, 2, 5):
        xs, ys = zip(*(s.local_batch(k) for s in shards))
        gx, gy = g.global_batch(k)
        np.testing.assert_array_equal(np.concatenate(xs), gx)
        np.testing.assert_array_equal(np.concatenate(ys), gy)
        assert xs[0].shape[0] == 8 // procs
    with pytest.raises(ValueError, match="not divisible by the process count 3"):
        BatchStream(ds, 8, process_index=0, process_count=3)


def test_stream_label_filter():
    ds = _toy()
    s = BatchStream(ds, 5, seed=0, labels_keep=[1, 3], process_index=0, process_count=1)
    kept = np.flatnonzero(np.isin(ds.labels, [1, 3]))
    assert len(s) == len(kept)
    seen = np.concatenate([s.global_indices(k) for k in range(4)])
    assert set(np.unique(ds.labels[seen])) <= {1, 3}
    n = len(kept)
    np.testing.assert_array_equal(np.sort(s.positions_to_indices(0, n)), kept)   # one epoch = each once
    ys = np.concatenate([s.local_batch(k)[1] for k in range(4)])
    assert set(ys.tolist()) <= {1, 3}
    with pytest.raises(ValueError, match=r"labels_keep must lie in \[0, 5\)"):
        BatchStream(ds, 5, labels_keep=[7], process_index=0, process_count=1)


def test_stream_from_config():
    from sfd_jax.ddpm.config import ddpm_base
    cfg = ddpm_base()
    cfg.training.batch_size = 4
    s = BatchStream.from_config(_toy(), cfg, process_index=0, process_count=1)
    assert (s.batch_size, s.seed, s.flip) == (4, 1234, True)
    cfg.data.logit_transform = True
    with pytest.raises(ValueError, match="config.data.logit_transform"):
        BatchStream.from_config(_toy(), cfg, process_index=0, process_count=1)


# ---------------------------------------------------------------------------------------------------------------
# prefetch

def test_prefetch_order_device_fn_and_exception():
    def gen():
        for i in range(5):
            yield i
        raise RuntimeError("boom at 5")

    got = []
    with pytest.raises(RuntimeError, match="boom at 5"):
        for v in prefetch(gen(), size=2, to_device=lambda v: v * 10):
            got.append(v)
    assert got == [0, 10, 20, 30, 40]
    assert list(prefetch(iter(range(4)), size=1)) == [0, 1, 2, 3]

    def bad_device(v):
        raise ValueError("device fail")
    with pytest.raises(ValueError, match="device fail"):
        next(prefetch(iter(range(3)), to_device=bad_device))


def test_prefetch_bounded_and_clean_shutdown():
    pulled = []

    def gen():
        i = 0
        while True:
            pulled.append(i)
            yield i
            i += 1

    p = prefetch(gen(), size=2)
    assert next(p) == 0
    time.sleep(0.2)
    assert len(pulled) <= 4                       # bounded: 1 consumed + 2 queued + 1 in hand
    assert p._thread.daemon
    p.close()
    assert not p._thread.is_alive()
    with pytest.raises(StopIteration):
        next(p)
    assert not [t for t in threading.enumerate() if t.name == "sfd-prefetch" and t.is_alive()]


def test_prefetch_batchstream_to_jax():
    import jax
    s = BatchStream(_toy(), 4, seed=0, process_index=0, process_count=1)
    with prefetch(s.iterate(2), to_device=jax.device_put) as p:
        x, y = next(p)
        assert isinstance(x, jax.Array)
        np.testing.assert_array_equal(np.asarray(x), s.local_batch(2)[0])
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
    with prefetch(s.iterate(0), to_device=device_put_fn(sharding)) as p:
        x, y = next(p)
        assert x.sharding == sharding and y.shape == (4,)
        np.testing.assert_array_equal(np.asarray(y), s.global_batch(0)[1])


# ---------------------------------------------------------------------------------------------------------------
# real data

@pytest.mark.skipif(not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file(),
                    reason="real Fashion-MNIST absent: apt-get install dataset-fashion-mnist "
                           "(puts idx files in /usr/share/datasets/fashion-mnist)")
def test_real_fashion_mnist():
    train = load_dataset("FashionMNIST", FASHION_DIR, split="train")
    test = load_dataset("fashion_mnist", FASHION_DIR, split="test")
    assert train.images.shape == (60000, 28, 28, 1) and test.images.shape == (10000, 28, 28, 1)
    assert train.n_classes == 10 and len(train.class_names) == 10
    np.testing.assert_array_equal(np.bincount(train.labels), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(test.labels), [1000] * 10)
    assert train.labels[:5].tolist() == [9, 0, 0, 3, 0]           # ankle boot, T-shirt, T-shirt, dress, T-shirt
    assert 60 < train.images.mean() < 80                           # ~72.9: real images, not zeros
