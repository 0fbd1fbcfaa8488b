import gzip
import io
import os
import pickle
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from matnet.data import (
    BatchLoader,
    DataError,
    ImageDataset,
    find_dataset_dir,
    load_cifar10,
    load_dataset,
    load_image_folder,
    load_mnist,
    load_omniglot,
    read_idx,
)

IDX_CODES = {np.dtype("u1"): 0x08, np.dtype("i1"): 0x09, np.dtype(">i2"): 0x0B, np.dtype(">i4"): 0x0C,
             np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}


def idx_bytes(arr: np.ndarray, dtype: str = "u1") -> bytes:
    dt = np.dtype(dtype)
    head = bytes([0, 0, IDX_CODES[dt], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + arr.astype(dt).tobytes()


def write(path: Path, data: bytes, gz: bool = False) -> Path:
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def make_mnist(root: Path, n_train: int = 30, n_test: int = 7, gz: bool = True) -> tuple[np.ndarray, ...]:
    """Fake MNIST whose image i has constant value i (train) or 200 + i (test)."""
    root.mkdir(parents=True, exist_ok=True)
    sfx = ".gz" if gz else ""
    tr = np.repeat(np.arange(n_train, dtype=np.uint8), 784).reshape(n_train, 28, 28)
    te = np.repeat(200 + np.arange(n_test, dtype=np.uint8), 784).reshape(n_test, 28, 28)
    ltr, lte = np.arange(n_train) % 10, (np.arange(n_test) + 3) % 10
    for name, arr in [("train-images-idx3-ubyte", tr), ("train-labels-idx1-ubyte", ltr),
                      ("t10k-images-idx3-ubyte", te), ("t10k-labels-idx1-ubyte", lte)]:
        write(root / (name + sfx), idx_bytes(arr), gz)
    return tr, ltr, te, lte


# ------------------------------------------------------------------------------------------------ IDX
@pytest.mark.parametrize("gz", [True, False])
def test_mnist_roundtrip(tmp_path, gz):
    rng = np.random.default_rng(0)
    imgs, labels = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8), np.array([3, 1, 4, 1, 5])
    write(tmp_path / f"train-images-idx3-ubyte{'.gz' * gz}", idx_bytes(imgs), gz)
    write(tmp_path / f"train-labels-idx1-ubyte{'.gz' * gz}", idx_bytes(labels), gz)
    x, y = load_mnist(tmp_path, "train")
    assert x.shape == (5, 1, 28, 28) and x.dtype == np.uint8 and y.dtype == np.int64
    np.testing.assert_array_equal(x[:, 0], imgs)
    np.testing.assert_array_equal(y, labels)


def test_gzip_detected_by_magic_not_suffix(tmp_path):
    a = np.arange(12, dtype=np.uint8).reshape(3, 4)
    np.testing.assert_array_equal(read_idx(write(tmp_path / "plain.gz", idx_bytes(a))), a)
    np.testing.assert_array_equal(read_idx(write(tmp_path / "packed", idx_bytes(a), gz=True)), a)


@pytest.mark.parametrize("dtype", ["i1", ">i2", ">i4", ">f4", ">f8"])
def test_read_idx_dtypes(tmp_path, dtype):
    a = (np.arange(24).reshape(2, 3, 4) - 7) * (1.5 if "f" in dtype else 1)
    out = read_idx(write(tmp_path / "a.idx", idx_bytes(a, dtype)))
    assert out.shape == (2, 3, 4) and out.dtype == np.dtype(dtype).newbyteorder("=")
    np.testing.assert_array_equal(out, a)


@pytest.mark.parametrize("gz", [True, False])
def test_truncated_idx(tmp_path, gz):
    p = write(tmp_path / "imgs-idx3-ubyte", idx_bytes(np.zeros((4, 28, 28), np.uint8))[:-10], gz)
    with pytest.raises(DataError, match=r"truncated: expected 3136 bytes, got 3126") as e:
        read_idx(p)
    assert str(p) in str(e.value)


def test_trailing_bytes(tmp_path):
    p = write(tmp_path / "x-idx1-ubyte", idx_bytes(np.zeros(4, np.uint8)) + b"\0")
    with pytest.raises(DataError, match="trailing") as e:
        read_idx(p)
    assert str(p) in str(e.value)


@pytest.mark.parametrize("head", [b"\x00\x01\x08\x01", b"\x00\x00\x07\x01", b"\x00\x00\x08\x00", b"PK\x03"])
def test_bad_magic(tmp_path, head):
    p = write(tmp_path / "bad-idx", head + b"\0" * 16)
    with pytest.raises(DataError, match="not an IDX file") as e:
        read_idx(p)
    assert str(p) in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere"):
        read_idx(tmp_path / "nothere")
    make_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_mnist(tmp_path, "test")


@pytest.mark.parametrize("kind", ["garbage", "cut"])
def test_corrupt_gzip(tmp_path, kind):
    packed = gzip.compress(idx_bytes(np.arange(1000, dtype=np.uint8) % 7))
    data = packed[:10] + b"\xff" * 40 if kind == "garbage" else packed[: len(packed) // 2]
    p = write(tmp_path / "c-idx1-ubyte.gz", data)
    with pytest.raises(DataError, match="corrupt gzip") as e:
        read_idx(p)
    assert str(p) in str(e.value)


def test_count_mismatch(tmp_path):
    make_mnist(tmp_path, n_train=6)
    write(tmp_path / "train-labels-idx1-ubyte.gz", idx_bytes(np.zeros(5)), gz=True)
    with pytest.raises(DataError, match="6 images but .*train-labels-idx1-ubyte.gz has 5 labels"):
        load_mnist(tmp_path, "train")


# --------------------------------------------------------------------------------------------- CIFAR
def make_cifar(root: Path, n: int = 4) -> Path:
    """Batch b, image i: R = 10*b + i, G = 100, B = 200, plus pixel (row 1, col 2) of R set to 255."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for b, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        data = np.empty((n, 3, 1024), np.uint8)
        data[:, 0] = (10 * b + np.arange(n))[:, None]
        data[:, 1], data[:, 2] = 100, 200
        data[:, 0, 1 * 32 + 2] = 255
        batch = {b"batch_label": b"batch", b"labels": [(b + i) % 10 for i in range(n)],
                 b"data": data.reshape(n, 3072), b"filenames": [b"x.png"] * n}
        (d / name).write_bytes(pickle.dumps(batch, protocol=2))
    return d


def test_cifar10(tmp_path):
    d = make_cifar(tmp_path)
    x, y = load_cifar10(d, "train")
    assert x.shape == (20, 3, 32, 32) and x.dtype == np.uint8 and y.dtype == np.int64
    np.testing.assert_array_equal(x[:, 0, 0, 0], [10 * b + i for b in range(5) for i in range(4)])
    assert (x[:, 1] == 100).all() and (x[:, 2] == 200).all()
    assert (x[:, 0, 1, 2] == 255).all() and (x[:, 0, 2, 1] != 255).all()
    np.testing.assert_array_equal(y[:4], [0, 1, 2, 3])
    xt, yt = load_cifar10(d, "test")
    assert xt.shape == (4, 3, 32, 32) and xt[0, 0, 0, 0] == 50
    np.testing.assert_array_equal(yt, [5, 6, 7, 8])


def test_cifar10_bad_files(tmp_path):
    d = make_cifar(tmp_path)
    (d / "data_batch_3").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}, protocol=2))
    with pytest.raises(DataError, match="data_batch_3"):
        load_cifar10(d, "train")
    (d / "data_batch_3").write_bytes(pickle.dumps(os.system, protocol=2))  # no code from pickles
    with pytest.raises(DataError, match="data_batch_3.*refusing"):
        load_cifar10(d, "train")
    (d / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match="test_batch"):
        load_cifar10(d, "test")


# ------------------------------------------------------------------------------------------ Omniglot
def make_omniglot(root: Path, targets: bool = True) -> Path:
    """Train image 0: top row white; image 1: left column 0.5; test image 0: bottom-right pixel white."""
    root.mkdir(parents=True, exist_ok=True)
    tr, te = np.zeros((3, 28, 28)), np.zeros((2, 28, 28))
    tr[0, 0, :], tr[1, :, 0], tr[2] = 1.0, 0.5, 0.2
    te[0, 27, 27] = 1.0
    col = lambda imgs: np.stack([im.reshape(-1, order="F") for im in imgs], axis=1)  # MATLAB column-major
    mat = {"data": col(tr), "testdata": col(te)}
    if targets:
        mat["target"], mat["testtarget"] = np.eye(50)[:, [7, 0, 49]], np.eye(50)[:, [3, 3]]
    scipy.io.savemat(root / "chardata.mat", mat)
    return root


def test_omniglot(tmp_path):
    d = make_omniglot(tmp_path / "omniglot")
    x, y = load_omniglot(d, "train")
    assert x.shape == (3, 1, 28, 28) and x.dtype == np.uint8
    assert (x[0, 0, 0] == 255).all() and x[0, 0, 1:].sum() == 0
    assert (x[1, 0, :, 0] == 128).all() and x[1, 0, :, 1:].sum() == 0  # round(127.5) -> 128
    assert (x[2] == 51).all()
    np.testing.assert_array_equal(y, [7, 0, 49])
    xt, yt = load_omniglot(d / "chardata.mat", "test")
    assert xt.shape == (2, 1, 28, 28) and xt[0, 0, 27, 27] == 255 and xt[0].sum() == 255
    np.testing.assert_array_equal(yt, [3, 3])


def test_omniglot_without_targets_and_bad_file(tmp_path):
    d = make_omniglot(tmp_path, targets=False)
    np.testing.assert_array_equal(load_omniglot(d, "train")[1], [0, 0, 0])
    (d / "chardata.mat").write_bytes(b"not a mat file at all" * 10)
    with pytest.raises(DataError, match="chardata.mat"):
        load_omniglot(d, "train")


# ------------------------------------------------------------------------------------- image folders
def marker_png(path: Path, w: int, h: int, color=(255, 0, 0), mode: str = "RGB") -> None:
    """Black image with a coloured square (1/4 of the shorter side) in the centre."""
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.zeros((h, w, 3), np.uint8)
    r = min(w, h) // 8
    a[h // 2 - r:h // 2 + r, w // 2 - r:w // 2 + r] = color
    Image.fromarray(a).convert(mode).save(path)


def test_image_folder(tmp_path):
    marker_png(tmp_path / "b.png", 80, 40)
    marker_png(tmp_path / "sub" / "a.jpg", 48, 96, color=(0, 255, 0))
    marker_png(tmp_path / "c.PNG", 64, 64, mode="L", color=(255, 255, 255))
    (tmp_path / "notes.txt").write_text("ignored")
    ds = load_image_folder(tmp_path, 16)
    assert [p.relative_to(tmp_path).as_posix() for p in ds.files] == ["b.png", "c.PNG", "sub/a.jpg"]
    for img, color in zip([ds[0], ds[1], ds[2]], [(255, 0, 0), (255, 255, 255), (0, 255, 0)]):
        assert img.shape == (3, 16, 16) and img.dtype == torch.uint8
        centre = img[:, 7:9, 7:9].float().mean((1, 2))
        assert torch.allclose(centre, torch.tensor(color, dtype=torch.float), atol=40)
        assert img[:, 0, 0].max() < 40 and img[:, -1, -1].max() < 40  # corners stay black
    # a wide image is cropped, not squeezed: the marker keeps its aspect ratio (4x4 of 16 px)
    assert ((ds[0][0] > 128).sum(0) > 0).sum() == 4


def test_image_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .*png"):
        load_image_folder(tmp_path / "empty", 8)
    (tmp_path / "empty" / "broken.png").write_bytes(b"\x89PNG not really")
    ds = load_image_folder(tmp_path / "empty", 8)
    with pytest.raises(DataError, match="broken.png"):
        ds[0]


# -------------------------------------------------------------------------------------- ImageDataset
def test_image_dataset_8bit():
    k = torch.tensor([0, 51, 128, 255], dtype=torch.uint8).reshape(1, 1, 2, 2)
    ds = ImageDataset(k.numpy(), binarize=None)
    x, y = ds[0]
    assert x.dtype == torch.float32 and x.shape == (1, 2, 2) == ds.shape and y == 0
    torch.testing.assert_close(x.flatten(), torch.tensor([-1.0, 2 * 51 / 255 - 1, 2 * 128 / 255 - 1, 1.0]))


def test_image_dataset_threshold():
    k = torch.tensor([0, 127, 128, 255], dtype=torch.uint8).reshape(1, 1, 1, 4)
    x, _ = ImageDataset(k, torch.tensor([9]), binarize="threshold")[0]
    assert x.flatten().tolist() == [0.0, 0.0, 1.0, 1.0]


def test_image_dataset_dynamic():
    k = torch.arange(0, 256, 5, dtype=torch.uint8).reshape(1, 1, 1, -1).expand(1, 1, 8, -1).contiguous()
    ds = ImageDataset(k, binarize="dynamic")
    a, b = ds[0][0], ds[0][0]
    assert set(a.unique().tolist()) <= {0.0, 1.0} and not torch.equal(a, b)
    g = torch.Generator().manual_seed(1)
    mean = ds.to_float(k.expand(500, -1, -1, -1), g).mean((0, 1, 2))  # 4000 draws per value
    torch.testing.assert_close(mean, k[0, 0, 0].float() / 255, atol=0.03, rtol=0)
    assert mean[0] == 0 and mean[-1] == 1


def test_image_dataset_fixed():
    k = torch.full((40, 1, 10, 10), 77, dtype=torch.uint8)
    ds, ds2, other = (ImageDataset(k, binarize="fixed", seed=s) for s in (3, 3, 4))
    assert torch.equal(ds[5][0], ds[5][0]) and torch.equal(ds.images, ds2.images)
    assert not torch.equal(ds.images, other.images)
    assert set(ds.images.unique().tolist()) == {0, 255}
    xs = torch.stack([ds[i][0] for i in range(len(ds))])
    assert set(xs.unique().tolist()) == {0.0, 1.0} and abs(xs.mean() - 77 / 255) < 0.03
    assert torch.equal(ds.to_float(ds.images), xs)


def test_image_dataset_validation():
    with pytest.raises(ValueError):
        ImageDataset(np.zeros((2, 1, 4, 4), np.float32))
    with pytest.raises(ValueError):
        ImageDataset(np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="binarize"):
        ImageDataset(np.zeros((2, 1, 4, 4), np.uint8), binarize="stochastic")
    with pytest.raises(ValueError, match="labels"):
        ImageDataset(np.zeros((2, 1, 4, 4), np.uint8), labels=np.zeros(3))


# --------------------------------------------------------------------------------------- BatchLoader
def index_dataset(n: int = 10, binarize: str | None = None) -> ImageDataset:
    """Image i has every pixel equal to i, so batches reveal which images they hold."""
    images = torch.arange(n, dtype=torch.uint8).reshape(n, 1, 1, 1).expand(n, 1, 3, 3).contiguous()
    return ImageDataset(images, binarize=binarize)


def ids(batch: torch.Tensor) -> list[int]:
    return torch.round((batch[:, 0, 0, 0] + 1) * 127.5).long().tolist()


def take(it, n: int) -> list[torch.Tensor]:
    return [next(it) for _ in range(n)]


def test_loader_epochs_and_len():
    loader = BatchLoader(index_dataset(10), batch_size=3, seed=0)
    assert len(loader) == 3
    e1, e2 = [ids(b) for b in loader], [ids(b) for b in loader]
    assert all(len(b) == 3 for b in e1 + e2) and loader.epoch == 1
    for ep in (e1, e2):
        flat = sum(ep, [])
        assert len(set(flat)) == 9 and set(flat) <= set(range(10))
    assert e1 != e2
    full = BatchLoader(index_dataset(10), batch_size=3, shuffle=False, drop_last=False)
    assert len(full) == 4 and [ids(b) for b in full] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    batch = next(iter(full))
    assert batch.dtype == torch.float32 and batch.shape == (3, 1, 3, 3)
    with pytest.raises(ValueError):
        BatchLoader(index_dataset(2), batch_size=3)


def test_loader_determinism():
    ds = index_dataset(20, binarize="dynamic")
    a, b, c = (take(BatchLoader(ds, 4, seed=s).forever(), 12) for s in (7, 7, 8))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("stop", [2, 4, 9])  # mid-epoch, exactly at the end of an epoch, a later epoch
@pytest.mark.parametrize("binarize", [None, "dynamic"])
def test_loader_exact_resume(stop, binarize):
    ds = index_dataset(23, binarize=binarize)
    orig = BatchLoader(ds, 5, seed=11)
    it = orig.forever()
    take(it, stop)
    buf = io.BytesIO()
    torch.save(orig.state_dict(), buf)
    expected = take(it, 9)
    restored = BatchLoader(ds, 5, seed=999)
    buf.seek(0)
    restored.load_state_dict(torch.load(buf))
    again = BatchLoader(ds, 5)
    again.load_state_dict(restored.state_dict())  # re-saving a restored, not yet used loader is lossless
    for loader in (restored, again):
        got = take(loader.forever(), 9)
        assert all(torch.equal(x, y) for x, y in zip(expected, got))
    assert (restored.epoch, restored.pos) == (orig.epoch, orig.pos)


def test_loader_resume_via_iter_and_checks():
    ds = index_dataset(12)
    orig = BatchLoader(ds, 3, seed=2)
    it = iter(orig)
    first = next(it)
    state = orig.state_dict()
    rest = [ids(b) for b in it]
    restored = BatchLoader(ds, 3, seed=5)
    restored.load_state_dict(state)
    assert [ids(b) for b in restored] == rest and len(rest) == 3
    assert ids(first)[0] not in sum(rest, [])
    end_state, next_epoch = orig.state_dict(), [ids(b) for b in orig]  # saved right after an epoch ended
    restored.load_state_dict(end_state)
    assert [ids(b) for b in restored] == next_epoch and restored.epoch == orig.epoch == 1
    with pytest.raises(ValueError, match="batch_size"):
        BatchLoader(ds, 4).load_state_dict(state)
    with pytest.raises(ValueError, match="num_images"):
        BatchLoader(index_dataset(13), 3).load_state_dict(state)


# ------------------------------------------------------------------------------------ load_dataset
def test_mnist_splits(tmp_path):
    make_mnist(tmp_path / "mnist", n_train=30)
    tr = load_dataset("mnist", "train", tmp_path, val_size=10)
    va = load_dataset("mnist", "val", tmp_path, val_size=10)
    te = load_dataset("mnist", "test", tmp_path, val_size=10)
    assert (len(tr), len(va), len(te)) == (20, 10, 7)
    assert tr.binarize == "dynamic" and tr.shape == (1, 28, 28)
    assert tr.images[:, 0, 0, 0].tolist() == list(range(20))
    assert va.images[:, 0, 0, 0].tolist() == list(range(20, 30))
    assert va.labels.tolist() == [i % 10 for i in range(20, 30)]
    assert te.images[:, 0, 0, 0].tolist() == list(range(200, 207))
    full = load_dataset("mnist", "train", tmp_path, val_size=0, binarize=None)
    assert len(full) == 30 and full.binarize is None
    for split, val_size in [("val", 0), ("train", 30), ("val", -1)]:
        with pytest.raises(DataError, match="val_size"):
            load_dataset("mnist", split, tmp_path, val_size=val_size)


def test_dataset_names_and_splits(tmp_path):
    with pytest.raises(DataError, match="'fashion-mnist'.*'cifar10'"):
        load_dataset("svhn", "train", tmp_path)
    with pytest.raises(DataError, match="'train', 'val', 'test'"):
        load_dataset("mnist", "valid", tmp_path)
    with pytest.raises(DataError, match="binarize"):
        load_dataset("mnist", "train", tmp_path, binarize="yes")


def test_cifar_and_omniglot_splits(tmp_path):
    make_cifar(tmp_path)
    tr, va = (load_dataset("cifar10", s, tmp_path, val_size=6) for s in ("train", "val"))
    assert (len(tr), len(va)) == (14, 6) and tr.binarize is None and tr.shape == (3, 32, 32)
    assert set(tr.images[:, 0, 0, 0].tolist()).isdisjoint(va.images[:, 0, 0, 0].tolist())
    make_omniglot(tmp_path / "omniglot")
    om = load_dataset("omniglot", "val", tmp_path, val_size=1)
    assert len(om) == 1 and om.binarize == "dynamic" and om.labels.tolist() == [49]


def make_folder(root: Path, n: int, w: int = 12, h: int = 10) -> None:
    for i in range(n):
        root.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((h, w, 3), 10 * i + 5, np.uint8)).save(root / f"{i:03d}.png")


def colours(ds: ImageDataset) -> list[int]:
    return ds.images[:, 0, 4, 4].tolist()


def test_folder_splits(tmp_path):
    make_folder(tmp_path / "imgs", 20)
    load = lambda split, **kw: load_dataset("folder", split, tmp_path / "imgs", image_size=8, **kw)
    tr, va, te = load("train"), load("val"), load("test")
    # 20 files: test = last 2 (10%), val = last 1 of the remaining 18 (10%), train = the first 17
    assert tr.binarize is None and tr.images.shape == (17, 3, 8, 8)
    assert colours(te) == [185, 195] and colours(va) == [175]
    assert colours(tr) == [10 * i + 5 for i in range(17)]
    va3 = load("val", val_size=3)
    assert colours(va3) == [155, 165, 175]
    make_folder(tmp_path / "imgs" / "test", 3)  # a test subfolder replaces the test slice
    te2, tr2 = load("test"), load("train", val_size=0)
    assert colours(te2) == [5, 15, 25] and len(tr2) == 20
    with pytest.raises(DataError, match="val"):
        load("val", val_size=0)


# ---------------------------------------------------------------------------------- find_dataset_dir
def test_find_dataset_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("MATNET_DATA_DIR", raising=False)
    make_mnist(tmp_path / "mnist", gz=False)
    make_mnist(tmp_path / "fashion-mnist")
    make_cifar(tmp_path)
    make_omniglot(tmp_path / "omniglot")
    assert find_dataset_dir("mnist", tmp_path / "mnist") == tmp_path / "mnist"
    assert find_dataset_dir("mnist", str(tmp_path)) == tmp_path / "mnist"
    assert find_dataset_dir("fashion-mnist", tmp_path) == tmp_path / "fashion-mnist"
    assert find_dataset_dir("cifar10", tmp_path) == tmp_path / "cifar-10-batches-py"
    assert find_dataset_dir("omniglot", tmp_path) == tmp_path / "omniglot"
    assert find_dataset_dir("folder", tmp_path) == tmp_path
    monkeypatch.setenv("MATNET_DATA_DIR", str(tmp_path))
    assert find_dataset_dir("cifar10") == tmp_path / "cifar-10-batches-py"
    assert find_dataset_dir("mnist", tmp_path / "fashion-mnist") == tmp_path / "fashion-mnist"  # arg wins
    assert len(load_dataset("mnist", "test")) == 7


def test_find_dataset_dir_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("MATNET_DATA_DIR", raising=False)
    with pytest.raises(DataError, match="--data-dir.*MATNET_DATA_DIR"):
        find_dataset_dir("mnist")
    with pytest.raises(DataError, match="chardata.mat.*" + re.escape(str(tmp_path / "omniglot"))):
        find_dataset_dir("omniglot", tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        find_dataset_dir("mnist", tmp_path / "nope")
    with pytest.raises(DataError, match="'mnist'"):
        find_dataset_dir("imagenet", tmp_path)


# ------------------------------------------------------------------------------------------ real data
@pytest.mark.data
def test_real_mnist():
    repo_root = Path(__file__).resolve().parents[1]
    base = os.environ.get("MATNET_DATA_DIR") or repo_root.parent / "shared" / "datasets"
    try:
        root = find_dataset_dir("mnist", base)
    except DataError as e:
        if os.environ.get("MATNET_REQUIRE_DATA") == "1":
            pytest.fail(f"MNIST required but not found: {e}")
        pytest.skip(f"MNIST not available: {e}")
    x, y = load_mnist(root, "train")
    assert x.shape == (60000, 1, 28, 28) and set(np.unique(y).tolist()) == set(range(10))
    assert abs(x.mean() / 255 - 0.1307) < 0.002
    sizes = [len(load_dataset("mnist", s, root)) for s in ("train", "val", "test")]
    assert sizes == [50000, 10000, 10000]
    te = load_dataset("mnist", "test", root)
    assert te.labels.min() >= 0 and te.labels.max() <= 9 and te.binarize == "dynamic"
