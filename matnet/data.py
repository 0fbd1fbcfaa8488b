"""Dataset readers, the model's data-space transform and a fast resumable in-memory batch loader.

Supported datasets: MNIST and Fashion-MNIST (IDX files), CIFAR-10 (python pickles), the 28x28 Omniglot
``chardata.mat`` of the IWAE paper, and generic image folders (CelebA/LSUN style). Data locations come from
an argument or the ``MATNET_DATA_DIR`` environment variable.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import struct
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

DATASETS = ("mnist", "fashion-mnist", "cifar10", "omniglot", "folder")
SPLITS = ("train", "val", "test")
BINARIZE_MODES = (None, "dynamic", "fixed", "threshold")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
# validation images taken from the end of the official training set (omniglot: 24345 -> 23000 + 1345)
DEFAULT_VAL_SIZE = {"mnist": 10000, "fashion-mnist": 10000, "cifar10": 5000, "omniglot": 1345}
DEFAULT_BINARIZE = {"mnist": "dynamic", "fashion-mnist": "dynamic", "omniglot": "dynamic"}
HFLIP_DATASETS = ("cifar10",)  # datasets whose training images get random horizontal flips by default
_NOISE_SEED_OFFSET = 0x9E3779B9  # seed offsets keep the loader's generators independent of each other
_FLIP_SEED_OFFSET = 0x7F4A7C15
FIXED_BINARIZE_SEED = 0  # "fixed" binarization: seed of the one draw per image (the test file's: this + 1)
FOLDER_HOLDOUT_MAX = 5000  # folder datasets: default val/test slice = min(5000, 10% of the files)

_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_MNIST_MARKERS = ("train-images-idx3-ubyte.gz", "train-images-idx3-ubyte", "t10k-images-idx3-ubyte.gz",
                  "t10k-images-idx3-ubyte")
# name -> (files identifying the dataset folder, subfolders of a parent directory to look in)
_LAYOUTS = {
    "mnist": (_MNIST_MARKERS, ("mnist", "MNIST/raw")),
    "fashion-mnist": (_MNIST_MARKERS, ("fashion-mnist", "FashionMNIST/raw")),
    "cifar10": (("data_batch_1", "test_batch"), ("cifar-10-batches-py",)),
    "omniglot": (("chardata.mat",), ("omniglot", "OMNIGLOT")),
}


class DataError(ValueError):
    """A dataset file or directory is missing, malformed or inconsistent."""


def _check_choice(kind: str, value: Any, valid: Sequence[Any]) -> None:
    if value not in valid:
        raise DataError(f"unknown {kind} {value!r}; valid: {', '.join(map(repr, valid))}")


# ----------------------------------------------------------------------------------------- file formats
def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzip or plain, detected from the magic bytes) into a native-endian array."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: corrupt gzip data ({e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise DataError(f"{path}: not an IDX file (bad magic {raw[:4].hex() or 'empty'})")
    ndim, header = raw[3], 4 + 4 * raw[3]
    if len(raw) < header:
        raise DataError(f"{path}: truncated: header needs {header} bytes, got {len(raw)}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected, got = math.prod(dims) * dtype.itemsize, len(raw) - header
    if got < expected:
        raise DataError(f"{path}: truncated: expected {expected} bytes, got {got}")
    if got > expected:
        raise DataError(f"{path}: {got - expected} trailing bytes: expected {expected} bytes, got {got}")
    return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def find_dataset_dir(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Locate dataset ``name`` under ``data_dir`` (else ``$MATNET_DATA_DIR``).

    The directory may be the dataset's own folder or a parent holding its standard subfolder
    (``mnist``, ``fashion-mnist``, ``cifar-10-batches-py``, ``omniglot``; torchvision's ``MNIST/raw`` too).
    For ``folder`` the directory itself is returned; for ``omniglot`` a path to the .mat file is accepted too.
    """
    _check_choice("dataset", name, DATASETS)
    if data_dir is not None and not str(data_dir).strip():
        raise DataError("the data directory given is empty: give a folder, or leave it out for $MATNET_DATA_DIR")
    base = data_dir or os.environ.get("MATNET_DATA_DIR")
    if not base:
        raise DataError(f"no data directory given for {name!r}: pass --data-dir or set MATNET_DATA_DIR")
    base = Path(base).expanduser()
    if name == "omniglot" and base.is_file():
        return base
    if not base.is_dir():
        raise DataError(f"data directory {base} {'is a file, not a folder' if base.exists() else 'does not exist'}")
    if name == "folder":
        return base
    markers, subdirs = _LAYOUTS[name]
    candidates = [base / s for s in subdirs] + [base]
    for d in candidates:
        if any((d / m).is_file() for m in markers):
            return d
    raise DataError(f"{name} data not found: looked for {' or '.join(markers)} in "
                    f"{', '.join(str(d) for d in candidates)}")


def _find_file(root: Path, stem: str) -> Path:
    for p in (root / f"{stem}.gz", root / stem):
        if p.is_file():
            return p
    raise FileNotFoundError(f"{root / stem}[.gz]: no such file")


def load_mnist(root: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """MNIST / Fashion-MNIST ``split`` ("train" | "test") -> uint8 images [N,1,28,28], int64 labels [N]."""
    _check_choice("split", split, ("train", "test"))
    prefix = "train" if split == "train" else "t10k"
    ipath = _find_file(Path(root), f"{prefix}-images-idx3-ubyte")
    lpath = _find_file(Path(root), f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(ipath), read_idx(lpath)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{ipath}: expected uint8 images [N,H,W], got {images.dtype} {images.shape}")
    if labels.ndim != 1:
        raise DataError(f"{lpath}: expected labels [N], got shape {labels.shape}")
    if len(images) != len(labels):
        raise DataError(f"{ipath} has {len(images)} images but {lpath} has {len(labels)} labels")
    return images[:, None], labels.astype(np.int64)


_NP_CORE = "numpy._core" if np.lib.NumpyVersion(np.__version__) >= "2.0.0" else "numpy.core"


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays (CIFAR batches are plain dicts of arrays and lists)."""

    _ALLOWED = {(f"{_NP_CORE}.multiarray", "_reconstruct"), (f"{_NP_CORE}.multiarray", "scalar"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str) -> Any:
        module = module.replace("numpy._core", _NP_CORE).replace("numpy.core", _NP_CORE)
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def load_cifar10(root: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 python batches (``data_batch_1..5`` / ``test_batch``) -> uint8 [N,3,32,32], int64 [N]."""
    _check_choice("split", split, ("train", "test"))
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = [], []
    for path in (Path(root) / n for n in names):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        try:
            with open(path, "rb") as f:
                batch = _SafeUnpickler(f, encoding="bytes").load()
            data, lab = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"], dtype=np.int64)
        except Exception as e:  # any unpickling / structure problem is a bad file
            raise DataError(f"{path}: not a CIFAR-10 batch ({type(e).__name__}: {e})") from e
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or lab.shape != (len(data),):
            raise DataError(f"{path}: expected uint8 data [N,3072] and N labels, got {data.dtype} "
                            f"{data.shape} and {lab.shape}")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(lab)
    return np.concatenate(images), np.concatenate(labels)


def load_omniglot(path_or_dir: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """IWAE-paper 28x28 Omniglot ``chardata.mat`` -> uint8 [N,1,28,28] (round(255*v)), int64 labels [N]."""
    import scipy.io

    _check_choice("split", split, ("train", "test"))
    path = Path(path_or_dir)
    path = path / "chardata.mat" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    key, tkey = ("data", "target") if split == "train" else ("testdata", "testtarget")
    try:
        mat = scipy.io.loadmat(path)
    except Exception as e:
        raise DataError(f"{path}: cannot read MATLAB file ({type(e).__name__}: {e})") from e
    if key not in mat:
        keys = sorted(k for k in mat if not k.startswith("__"))
        raise DataError(f"{path}: no {key!r} array (keys: {keys})")
    data = np.asarray(mat[key], dtype=np.float64)
    if data.ndim != 2 or data.shape[0] != 784:
        raise DataError(f"{path}: {key!r} should be 784 x N, got {data.shape}")
    n = data.shape[1]
    images = data.T.reshape(-1, 28, 28, order="F")  # MATLAB stores each image column-major
    images = np.rint(255 * np.clip(images, 0, 1)).astype(np.uint8)[:, None]
    labels = np.zeros(n, np.int64)
    if tkey in mat:
        t = np.asarray(mat[tkey])
        if t.ndim == 2 and n in t.shape:
            labels = t.argmax(axis=0 if t.shape[1] == n else 1).astype(np.int64)
        elif t.size == n:
            labels = t.reshape(-1).astype(np.int64)
        else:
            raise DataError(f"{path}: {tkey!r} has shape {t.shape}, incompatible with {n} images")
    return np.ascontiguousarray(images), labels


class ImageFolder(Dataset):
    """Lazy image-file dataset: item i is file i as RGB, shorter side resized to ``size``, centre-cropped,
    returned as a uint8 tensor [3,size,size]."""

    def __init__(self, files: Sequence[str | os.PathLike], size: int):
        self.files, self.size = [Path(f) for f in files], int(size)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image

        path, s = self.files[i], self.size
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                w, h = im.size
                nw, nh = max(s, round(w * s / min(w, h))), max(s, round(h * s / min(w, h)))
                im = im.resize((nw, nh), Image.Resampling.BICUBIC)
                left, top = (nw - s) // 2, (nh - s) // 2
                arr = np.asarray(im.crop((left, top, left + s, top + s)))
        except Exception as e:
            raise DataError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()

    def load_all(self, workers: int = 4) -> torch.Tensor:
        """Decode every image (threads; PIL releases the GIL) into one uint8 tensor [N,3,size,size]."""
        out = torch.empty((len(self), 3, self.size, self.size), dtype=torch.uint8)
        with ThreadPoolExecutor(max(1, min(workers, os.cpu_count() or 1))) as ex:
            for i, img in enumerate(ex.map(self.__getitem__, range(len(self)))):
                out[i] = img
        return out


def list_images(root: str | os.PathLike) -> list[Path]:
    """All image files below ``root`` (recursive), sorted by path."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} {'is a file, not a folder' if root.exists() else 'does not exist'}")
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def load_image_folder(root: str | os.PathLike, size: int) -> ImageFolder:
    """Lazy :class:`ImageFolder` over every image below ``root`` (.png/.jpg/.jpeg/.bmp/.webp)."""
    files = list_images(root)
    if not files:
        raise DataError(f"image folder {root} contains no {'/'.join(IMAGE_SUFFIXES)} files")
    return ImageFolder(files, size)


# ------------------------------------------------------------------------------------ model data space
class ImageDataset(Dataset):
    """uint8 images [N,C,H,W] mapped to the model's data space by :meth:`to_float`.

    binarize: None -> float32 in [-1,1] (2k/255 - 1); "dynamic" -> fresh Bernoulli(k/255) draws on every use;
    "fixed" -> one Bernoulli(k/255) draw per image made here with ``seed`` (``images`` then holds the
    binarized data as 0/255); "threshold" -> k >= 128.
    """

    def __init__(self, images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor | None = None,
                 binarize: str | None = None, seed: int = 0):
        images = torch.as_tensor(images)
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 [N,C,H,W], got {images.dtype} {tuple(images.shape)}")
        if binarize not in BINARIZE_MODES:
            raise ValueError(f"binarize must be one of {BINARIZE_MODES}, got {binarize!r}")
        labels = torch.zeros(len(images)) if labels is None else torch.as_tensor(labels)
        labels = labels.long()
        if labels.shape != (len(images),):
            raise ValueError(f"labels must have shape ({len(images)},), got {tuple(labels.shape)}")
        if binarize == "fixed":
            g = torch.Generator().manual_seed(seed)
            images = (torch.rand(images.shape, generator=g) < images / 255).to(torch.uint8) * 255
        self.images, self.labels, self.binarize, self.seed = images, labels, binarize, seed

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.to_float(self.images[i]), int(self.labels[i])

    def to_float(self, uint8_batch: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Map uint8 pixels (any shape) to float32 model data; ``generator`` (None: global RNG) drives dynamic
        binarization."""
        if self.binarize is None:
            return uint8_batch.float().div_(127.5).sub_(1.0)
        if self.binarize == "dynamic":
            u = torch.rand(uint8_batch.shape, generator=generator, device=uint8_batch.device)
            return (u < uint8_batch / 255).float()
        return (uint8_batch >= 128).float()  # threshold; "fixed" images are already 0/255


class BatchLoader:
    """Fast in-memory shuffling loader (no per-item Python), with the data held on the training device.

    The uint8 images are copied to ``device`` once; every batch is gathered, flipped (``hflip``: each image
    mirrored left-right with probability 1/2) and converted (dynamic binarization draws fresh noise every
    time an image is used) on that device, so a GPU never waits on host-side work or copies. The epoch order
    comes from a CPU generator; the binarization and flip draws from generators on ``device`` (so on a GPU
    they differ from a CPU run's). Deterministic given ``seed``; :meth:`state_dict` / :meth:`load_state_dict`
    capture the generator states, the epoch and the position inside it, so a loader restored mid-epoch
    yields exactly the batches the original would have.

    ``rows`` (one process of a multi-process run): yield only these rows of each global batch of ``batch_size``.
    Every process draws the same order, and the flip and binarization draws are made for the whole global
    batch, so image i of a batch is the same whatever the number of processes (and the state is theirs too).
    """

    def __init__(self, dataset: ImageDataset, batch_size: int, shuffle: bool = True, drop_last: bool = True,
                 seed: int = 0, device: str | torch.device = "cpu", hflip: bool = False, rows: slice | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if rows is not None and not drop_last:
            raise ValueError("rows of a global batch need drop_last (every batch full)")
        self.dataset, self.batch_size, self.shuffle, self.drop_last = dataset, batch_size, shuffle, drop_last
        self.seed, self.device, self.hflip, self.rows = seed, torch.device(device), hflip, rows
        if len(self) == 0:
            raise ValueError(f"dataset of {len(dataset)} images gives no batches of {batch_size} (drop_last)")
        self.images = dataset.images.to(self.device)  # uint8: 4x smaller than floats, converted per batch
        self._order_gen = torch.Generator().manual_seed(seed)
        self._noise_gen = torch.Generator(self.device).manual_seed(seed + _NOISE_SEED_OFFSET)
        self._flip_gen = torch.Generator(self.device).manual_seed(seed + _FLIP_SEED_OFFSET)
        self.epoch, self.pos = 0, 0  # pos = batches of the current epoch already produced
        self._perm: torch.Tensor | None = None  # the current epoch's order (on the device), drawn lazily
        self._epoch_gen_state = self._order_gen.get_state()

    def __len__(self) -> int:
        n, b = len(self.dataset), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def _start_epoch(self) -> None:
        self._epoch_gen_state = self._order_gen.get_state()
        n = len(self.dataset)
        perm = torch.randperm(n, generator=self._order_gen) if self.shuffle else torch.arange(n)
        self._perm = perm.to(self.device)

    def _flip(self, x: torch.Tensor) -> torch.Tensor:
        """Mirror each image left-right with probability 1/2 (one draw per image)."""
        flip = torch.rand(x.shape[0] if self.rows is None else self.batch_size, generator=self._flip_gen,
                          device=x.device) < 0.5
        flip = flip if self.rows is None else flip[self.rows]
        return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)

    def __iter__(self) -> Iterator[torch.Tensor]:
        """The rest of the current epoch (a whole new one if the previous epoch was finished)."""
        if self._perm is None:  # fresh or restored loader: (re)draw the current epoch's order
            self._start_epoch()
        if self.pos >= len(self):
            self.epoch, self.pos = self.epoch + 1, 0
            self._start_epoch()
        b = self.batch_size
        while self.pos < len(self):
            idx = self._perm[self.pos * b:(self.pos + 1) * b]
            x = self.images[idx if self.rows is None else idx[self.rows]]
            self.pos += 1
            if self.hflip:
                x = self._flip(x)
            yield self._to_float(x)

    def _to_float(self, x: torch.Tensor) -> torch.Tensor:
        if self.rows is None:
            return self.dataset.to_float(x, self._noise_gen)
        whole = x.new_zeros((self.batch_size, *x.shape[1:]))  # binarization noise is drawn per global row
        whole[self.rows] = x
        return self.dataset.to_float(whole, self._noise_gen)[self.rows]

    def forever(self) -> Iterator[torch.Tensor]:
        """Endless stream of batches across epochs."""
        while True:
            yield from self

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos, "num_images": len(self.dataset),
                "batch_size": self.batch_size, "shuffle": self.shuffle, "drop_last": self.drop_last,
                "hflip": self.hflip, "device_type": self.device.type, "order_gen": self._epoch_gen_state.clone(),
                "noise_gen": self._noise_gen.get_state(), "flip_gen": self._flip_gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in ("num_images", "batch_size", "shuffle", "drop_last"):
            mine = len(self.dataset) if k == "num_images" else getattr(self, k)
            if state[k] != mine:
                hint = " (the training images differ: another --val-size or dataset?)" if k == "num_images" else ""
                raise ValueError(f"loader state has {k}={state[k]}, this loader has {mine}{hint}")
        if state.get("hflip", False) != self.hflip:
            raise ValueError(f"loader state has hflip={state.get('hflip', False)}, this loader has {self.hflip}")
        self._order_gen.set_state(state["order_gen"])  # state at the start of the current epoch
        self._epoch_gen_state, self._perm = state["order_gen"].clone(), None
        self.epoch, self.pos = state["epoch"], state["pos"]
        if state.get("device_type", "cpu") == self.device.type:
            self._noise_gen.set_state(state["noise_gen"])
            if "flip_gen" in state:
                self._flip_gen.set_state(state["flip_gen"])
        else:  # another device type's generator states do not fit: continue with fresh, position-derived draws
            fresh = self.seed + 1_000_003 * (self.epoch + 1) + self.pos
            self._noise_gen.manual_seed(fresh + _NOISE_SEED_OFFSET)
            self._flip_gen.manual_seed(fresh + _FLIP_SEED_OFFSET)


# -------------------------------------------------------------------------------------------- datasets
def _holdout(name: str, val_size: int | None, n: int) -> int:
    v = DEFAULT_VAL_SIZE.get(name, min(FOLDER_HOLDOUT_MAX, n // 10)) if val_size is None else val_size
    if not 0 <= v < n:
        raise DataError(f"val_size={v} is invalid for {name} with {n} training images (need 0 <= v < {n})")
    return v


def _folder_split(root: Path, split: str, val_size: int | None) -> list[Path]:
    """Deterministic folder split: a ``test`` (resp. ``val``) subfolder if present, else the last files of
    the sorted list (test: min(5000, 10%) of all files; val: ``val_size`` of the rest); train is the rest."""
    rest = list_images(root)
    if not rest:
        raise DataError(f"image folder {root} contains no {'/'.join(IMAGE_SUFFIXES)} files")
    parts: dict[str, list[Path]] = {}
    for name in ("test", "val"):
        sub = root / name
        if sub.is_dir():
            parts[name] = [f for f in rest if sub in f.parents]
            rest = [f for f in rest if sub not in f.parents]
        else:
            n = len(rest)
            k = min(FOLDER_HOLDOUT_MAX, n // 10) if name == "test" else _holdout("folder", val_size, n)
            parts[name], rest = rest[n - k:], rest[:n - k]
    parts["train"] = rest
    if not parts[split]:
        raise DataError(f"image folder {root} gives an empty {split!r} split"
                        + (" (val_size=0)" if split == "val" else ""))
    return parts[split]


def load_dataset(name: str, split: str, data_dir: str | os.PathLike | None = None, *,
                 binarize: str | None = "auto", val_size: int | None = None, image_size: int = 64,
                 seed: int = FIXED_BINARIZE_SEED) -> ImageDataset:
    """Load ``split`` ("train" | "val" | "test") of dataset ``name`` as an :class:`ImageDataset`.

    "val" is the last ``val_size`` images of the official training set and "train" excludes them
    (defaults: ``DEFAULT_VAL_SIZE``; folders: min(5000, 10%)); ``val_size=0`` keeps everything in "train".
    ``binarize="auto"`` means "dynamic" for mnist/fashion-mnist/omniglot and None (8-bit) otherwise;
    "fixed" binarization draws once over the whole official file, with ``seed`` (train file; ``seed + 1``: test
    file), so an image is binarized the same in every epoch, run and ``val_size``. Image folders are
    resized/cropped to ``image_size`` and decoded into memory; see :func:`_folder_split` for how they are split.
    """
    _check_choice("dataset", name, DATASETS)
    _check_choice("split", split, SPLITS)
    _check_choice("binarize mode", binarize, ("auto", *BINARIZE_MODES))
    root = find_dataset_dir(name, data_dir)
    if name == "folder":
        images, labels = ImageFolder(_folder_split(root, split, val_size), image_size).load_all(), None
    else:
        load = {"cifar10": load_cifar10, "omniglot": load_omniglot}.get(name, load_mnist)
        images, labels = load(root, "test" if split == "test" else "train")
        if binarize == "fixed":  # drawn before the held-out split, so image i's draw never depends on it
            images = ImageDataset(images, binarize="fixed", seed=seed + (split == "test")).images
        if split != "test":
            v = _holdout(name, val_size, len(images))
            if split == "val" and v == 0:
                raise DataError(f"{name}: val_size=0, so there is no 'val' split")
            keep = slice(len(images) - v, None) if split == "val" else slice(0, len(images) - v)
            images, labels = images[keep], labels[keep]
    mode = DEFAULT_BINARIZE.get(name) if binarize == "auto" else binarize
    return ImageDataset(images, labels, mode, seed)
