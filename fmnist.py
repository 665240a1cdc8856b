"""fmnist: a Fashion-MNIST classifier written from scratch in NumPy, as pure functions.

This module reproduces the project report `docs/seed-report.md`: a 784-512-256-128-10 multi-layer
perceptron with ReLU, inverted dropout, L2 regularisation and Adam that reaches about 89% test
accuracy, with per-class precision/recall/F1 and the confusions between classes.

It is meant to be read top to bottom, in the order data flows through it:

    configuration -> files -> data (and its download) -> augmentation -> parameters -> model
         (forward) -> loss -> backward (and its gradient check) -> optimizer -> training
         -> evaluation -> checkpoints -> reporting -> pictures and report.md -> predict
         -> command line

To learn backpropagation, about 600 of its lines are the core; read these in order and skip the
batch-norm branches at first:

    normalise -> init_params -> dropout_masks -> forward -> cross_entropy -> backward
         -> gradient_check -> adam_step -> train_epoch -> evaluate

Configuration checks, the download, augmentation, checkpoints, pictures, predict and the command
line are what make it a tool; they can wait.

The optional parts import their libraries inside the functions that use them (matplotlib for
the pictures, Pillow for predict, torchvision for download), so the module itself needs NumPy only.

Conventions, stated once:

* Rows are examples. A batch `X` has shape (B, 784); a layer computes `Z = A @ W + b` with `W` of
  shape (fan_in, fan_out). (The report writes the column form `Z = W A + b`; it is the same
  network, transposed.)
* `dZ` means dL/dZ, the gradient of the scalar loss with respect to `Z`, with the shape of `Z`.
* The loss is the *mean* over the batch's B examples (the report's sum does not say whether it
  runs over classes or examples), hence the 1/B in
  dL/dZ_L, which then flows into every data gradient (not into L2's lambda W).
* Parameters are an immutable mapping `W1, b1, ..., WL, bL -> read-only array` (with batch norm
  also scales `g1, ..., g_{L-1}`). Every stage
  (init_params, forward, backward, adam_step, train_epoch, evaluate, ...) returns new values and
  never writes into its inputs; the read-only flags make that checkable. The only functions that
  write into arrays they are given are the two kernels that say so (`adam_update`,
  `flush_to_zero`), and they are only ever handed arrays their caller owns: fresh ones, or the
  private copies `train_epoch` makes once an epoch and updates step after step.
  Internally the arrays are views into one flat vector (weights first, then the rest), so the
  optimizer works on one vector rather than looping over layers. Building a `Params` over a
  vector makes that vector read-only: the caller gives the vector up.
* Randomness comes in through explicit seeds (`np.random.default_rng([seed, epoch])`), so a run is
  bit-for-bit reproducible and any epoch can be replayed from its inputs alone. A function that
  takes `rng` (all but `batches`, which needs a Generator) accepts a seed, or a
  `np.random.Generator` that it draws from (and so advances, as drawing does): pass a seed for
  a call that leaves everything as it was.

What it leaves out on purpose: convolutions, automatic differentiation, GPU support. The point is
to see every derivative written by hand, and to make plain NumPy as fast as it can be.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gzip
import hashlib
import io
import itertools
import json
import math
import os
import shlex
import signal
import sys
import tempfile
import textwrap
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

__version__ = "0.1.0"

# ================================================================================================
# Constants and configuration
# ================================================================================================

CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28)
NUM_INPUTS = 784
MEAN, STD = 0.286, 0.353          # report 2.3: normalisation of pixels scaled to [0, 1]
DTYPES = ("float32", "float64")
TRAIN_IMAGES = 60_000              # official training set, split into train and validation
TEST_IMAGES = 10_000               # official test set, for the final evaluation only
SCHEDULES = ("constant", "cosine")
MAX_SHIFT = 4                      # pixels; an item moved further starts to leave the 28 x 28 frame
MAX_WIDTH = 2**31 - 1              # units a layer: BLAS indexes a matrix's rows with 32-bit ints


@dataclasses.dataclass(frozen=True)
class Config:
    """Every hyperparameter of a run; the defaults are the report's recipe (section in brackets)."""

    hidden: tuple[int, ...] = (512, 256, 128)  # [3.1] 784 -> 512 -> 256 -> 128 -> 10
    dropout: float = 0.3                       # [3.1] on the hidden layers, training only
    l2: float = 1e-4                           # [3.3] lambda, but (lambda/2) sum ||W||^2: half the
                                               # report's term (--l2 2e-4 is its); see l2_penalty
    lr: float = 1e-3                           # [4.1] Adam
    beta1: float = 0.9                         # [4.1]
    beta2: float = 0.999                       # [4.1]
    eps: float = 1e-8                          # Adam's usual epsilon
    batch_size: int = 128                      # [4.1]
    epochs: int = 50                           # [4.1] at most
    patience: int = 10                         # [4.1] early stopping on validation accuracy
    seed: int = 42                             # init, shuffling, augmentation, dropout
    split_seed: int = 42                       # [2.2] the train/validation permutation
    val_size: int = 10_000                     # [2.2] 50,000 train / 10,000 validation
    dtype: str = "float32"
    limit: int | None = None                   # train on the first N training images only
    # Beyond the report (README, "How far can an MLP go"): all off by default.
    lr_schedule: str = "constant"              # or "cosine": decay from lr to 0 over `epochs`
    flip: float = 0.0                          # probability of mirroring a training image
    shift: int = 0                             # random shifts of training images, in pixels
    label_smoothing: float = 0.0               # weight of the uniform target mixed into the one-hot
    average: float = 0.0                       # decay of the running average of weights per epoch
    flip_average: bool = False                 # predict from an image and its mirror image
    cutout: int = 0                            # side of a square of background pasted per image
    input_dropout: float = 0.0                 # dropout rate on the input pixels
    weight_decay: float = 0.0                  # AdamW's decoupled decay of the weights, per unit lr
    batch_norm: bool = False                   # normalise each hidden pre-activation over the batch

    def __post_init__(self):
        object.__setattr__(self, "hidden", tuple(int(h) if _is_int(h) else h for h in self.hidden))
        for field in dataclasses.fields(self):      # np.float32(1e-3) -> the float it is: what
            value = getattr(self, field.name)       # trains is then exactly what config.json says
            if isinstance(value, np.generic):       # (and np.True_ -> True, which JSON can write)
                object.__setattr__(self, field.name, value.item())
        check_config(self)

    @property
    def train_size(self) -> int:
        """Training images: the first `limit` of those left after the validation split."""
        return self.limit or TRAIN_IMAGES - self.val_size

    @property
    def layer_sizes(self) -> tuple[int, ...]:
        return (NUM_INPUTS, *self.hidden, NUM_CLASSES)

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"hidden": list(self.hidden)}

    @classmethod
    def from_json(cls, d: Mapping) -> Config:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (tuple(v) if k == "hidden" else v) for k, v in d.items() if k in known})


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_real(v: Any) -> bool:
    return (isinstance(v, (int, float, np.integer, np.floating))
            and not isinstance(v, (bool, np.bool_)))


_KINDS = {   # a Config field's annotation -> (check, what it must be)
    "int": (_is_int, "a whole number"),
    "int | None": (lambda v: v is None or _is_int(v), "a whole number or none"),
    "float": (_is_real, "a number"),
    "bool": (lambda v: isinstance(v, (bool, np.bool_)), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "tuple[int, ...]": (lambda v: isinstance(v, tuple) and all(_is_int(h) for h in v),
                        "a list of whole numbers"),
}


_FRACTION = (lambda v: 0.0 <= v < 1.0, "in [0, 1)")
_SETTINGS = {   # a Config field -> (its name in words, is a value valid, what it must be);
    # check_config and the functions taking the same setting share them, in this order
    "dropout": ("dropout", *_FRACTION),
    "l2": ("l2", lambda v: 0.0 <= v < math.inf, ">= 0 and finite"),
    "lr": ("learning rate", lambda v: 0.0 < v < math.inf, "> 0 and finite"),
    "beta1": ("beta1", *_FRACTION),
    "beta2": ("beta2", *_FRACTION),
    "eps": ("eps", lambda v: 0.0 < v < math.inf, "> 0 and finite"),
    "flip": ("flip", lambda v: 0.0 <= v <= 1.0, "a probability in [0, 1]"),
    "shift": ("shift", lambda v: _is_int(v) and 0 <= v <= MAX_SHIFT,
              f"a whole number of pixels from 0 to {MAX_SHIFT}"),
    "label_smoothing": ("label smoothing", *_FRACTION),
    "average": ("average (the decay of the running average of weights)", *_FRACTION),
    "cutout": ("cutout", lambda v: _is_int(v) and 0 <= v <= IMAGE_SHAPE[0],
               f"a whole number of pixels from 0 to {IMAGE_SHAPE[0]}"),
    "input_dropout": ("input dropout", *_FRACTION),
}


def check_setting(field: str, value: Any) -> None:
    """Raise ValueError, in the words `train` would use for its flag, unless `value` is a valid
    value of the Config field `field` (a key of _SETTINGS)."""
    name, ok, must = _SETTINGS[field]
    if not ok(value):
        raise ValueError(f"{name} must be {must}, got {value}")


def check_weight_decay(weight_decay: float, lr: float) -> None:
    """AdamW's shrink factor 1 - lr * weight_decay must stay in (0, 1]: at or below 0 a step
    would zero or flip the sign of every weight."""
    if not (0.0 <= weight_decay and weight_decay * lr < 1.0):
        raise ValueError(f"weight decay must be >= 0 with weight decay * lr below 1, got weight "
                         f"decay {weight_decay} and lr {lr}")


def check_config(c: Config) -> None:
    """Raise ValueError, with one sentence a user can act on, for a hyperparameter of the wrong
    kind (a file's "hidden": [8.9] or "batch_norm": "false") or out of range."""
    for field in dataclasses.fields(c):
        ok, kind = _KINDS[field.type]
        if not ok(getattr(c, field.name)):
            raise ValueError(f"{field.name} must be {kind}, got {getattr(c, field.name)!r}")
    if not (len(c.hidden) > 0 and all(1 <= h <= MAX_WIDTH for h in c.hidden)):
        raise ValueError(f"hidden sizes must be one or more whole numbers from 1 to {MAX_WIDTH:,}, "
                         f"got {list(c.hidden)}")
    for field in _SETTINGS:
        check_setting(field, getattr(c, field))
    check_weight_decay(c.weight_decay, c.lr)
    checks = [
        (c.batch_size >= 1, f"batch size must be >= 1, got {c.batch_size}"),
        (c.batch_size >= 2 or not c.batch_norm,
         f"batch norm needs batches of at least 2 images (their mean and spread), "
         f"got batch size {c.batch_size}"),
        (not c.batch_norm or c.batch_size < 2 or c.train_size % c.batch_size != 1,
         f"batch norm needs batches of at least 2 images, but {c.train_size:,} training images "
         f"in batches of {c.batch_size} leave 1 for the last; change --batch-size or --limit"),
        (c.seed >= 0, f"seed must be >= 0, got {c.seed}"),
        (c.split_seed >= 0, f"split seed must be >= 0, got {c.split_seed}"),
        (c.epochs >= 1, f"epochs must be >= 1, got {c.epochs}"),
        (c.patience >= 0, f"patience must be >= 0, got {c.patience}"),
        (c.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got {c.dtype!r}"),
        (1 <= c.val_size < TRAIN_IMAGES, f"val_size must be in [1, {TRAIN_IMAGES}), got {c.val_size}"),
        (c.limit is None or 1 <= c.limit <= TRAIN_IMAGES - c.val_size,
         f"limit must be between 1 and the {TRAIN_IMAGES - c.val_size:,} training images, got {c.limit}"),
        (c.lr_schedule in SCHEDULES,
         f"lr schedule must be one of {', '.join(SCHEDULES)}, got {c.lr_schedule!r}"),
        (not (c.batch_norm and c.average),
         "batch norm and a running average of weights do not combine here; drop one of them"),
        (c.flip > 0 or not c.flip_average,
         "flip averaging at prediction needs a network trained on mirror images: add --flip "
         "with a probability above 0, or --no-flip-average"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    info = np.finfo(c.dtype)     # a step size of 1e-300 is 0 in float32, and training learns nothing
    tiny, huge = float(info.tiny), float(info.max)
    for field in ("lr", "eps", "l2", "weight_decay"):
        value = getattr(c, field)
        if value and not tiny <= value <= huge:
            name = _SETTINGS[field][0] if field in _SETTINGS else "weight decay"
            raise ValueError(f"{name} {value} is {'0' if value < tiny else 'infinite'} in "
                             f"{c.dtype}; use a value from {tiny:.3g} to {huge:.3g}")


_WIDE_COSINE = dict(hidden=(1024, 512, 256), epochs=60, patience=0, lr_schedule="cosine",
                    flip=0.5, flip_average=True, l2=0.0)
RECIPES = {
    "report": Config(),
    # README, "How far can an MLP go": every choice made on the validation split.
    "best-single": Config(**_WIDE_COSINE, weight_decay=0.2, batch_norm=True, shift=1, dropout=0.0),
    "best-bn": Config(**_WIDE_COSINE, weight_decay=0.5, batch_norm=True),
    "best-shift": Config(**_WIDE_COSINE, weight_decay=0.2, shift=1, dropout=0.0),
}
# Recipes that train several networks and average their predictions (`train --recipe best`):
# these two regularise differently (dropout and batch norm; shifts), so their mistakes differ.
ENSEMBLES = {"best": ("best-bn", "best-shift")}


class FmnistError(Exception):
    """An error the user can fix: the message says what is wrong and what to do."""


class DataError(FmnistError):
    """A data file is missing, damaged, or not what its name says."""


class CheckpointError(FmnistError):
    """A checkpoint or run directory cannot be used."""


class DivergedError(FmnistError):
    """Training produced a non-finite loss or parameter."""


class ImageError(FmnistError):
    """An image file that cannot be used: missing, empty, not an image, or too large."""


# ================================================================================================
# Files: atomic writes (the download, checkpoints, run files and pictures all use them)
# ================================================================================================

def atomic_write(path: Path, write: Any) -> None:
    """Write a file so that it is either the old one or the complete new one, never half of each:
    write a temporary file in the same folder, flush and fsync it, then os.replace it into place."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}-{os.urandom(4).hex()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)   # the umask applies
    except OSError as e:                # name the file the caller asked for, not our temporary
        raise OSError(e.errno, e.strerror, str(path)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno and e.filename in (None, str(tmp)):
            raise OSError(e.errno, e.strerror, str(path)) from None    # a full disk: which file
        raise


def write_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2, allow_nan=False)  # NaN is not JSON: fail, never write it
    atomic_write(path, lambda f: f.write((text + "\n").encode()))


# ================================================================================================
# Data: IDX files -> arrays -> split -> normalised float matrices
# ================================================================================================

# SHA-256 and size of the four *decompressed* files, as published by Zalando.
DATA_FILES = {
    "train-images-idx3-ubyte": ("c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888", 47_040_016),
    "train-labels-idx1-ubyte": ("bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9", 60_008),
    "t10k-images-idx3-ubyte": ("5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b", 7_840_016),
    "t10k-labels-idx1-ubyte": ("0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34", 10_008),
}
IDX_MAGIC = {2051: 3, 2049: 1}     # images: uint8, 3 dims (N, 28, 28); labels: uint8, 1 dim (N,)
MAX_IDX_BYTES = 64 * 2**20          # larger than any Fashion-MNIST file; bounds a hostile header


def parse_idx(stream: io.BufferedIOBase, name: str = "<bytes>") -> np.ndarray:
    """Read one IDX array (big-endian header, then uint8 data) from a binary stream.

    The header is checked before anything is allocated, so a file that claims 10^9 images is
    refused without trying to make room for them.
    """
    header = stream.read(4)
    if len(header) < 4:
        raise DataError(f"{name}: file too short for an IDX header ({len(header)} bytes)")
    magic = int.from_bytes(header, "big")
    if magic not in IDX_MAGIC:
        raise DataError(f"{name}: not a Fashion-MNIST IDX file (magic number {magic}, "
                        f"expected 2051 for images or 2049 for labels)")
    ndim = IDX_MAGIC[magic]
    raw_dims = stream.read(4 * ndim)
    if len(raw_dims) < 4 * ndim:
        raise DataError(f"{name}: header truncated (expected {ndim} dimensions)")
    dims = tuple(int.from_bytes(raw_dims[4 * i:4 * i + 4], "big") for i in range(ndim))
    if ndim == 3 and dims[1:] != IMAGE_SHAPE:
        raise DataError(f"{name}: images are {dims[1]}x{dims[2]}, expected 28x28")
    size = math.prod(dims)
    if size > MAX_IDX_BYTES:
        raise DataError(f"{name}: header claims {dims[0]:,} items ({size:,} bytes), "
                        f"more than any Fashion-MNIST file; the file is damaged")
    payload = stream.read(size + 1)
    if len(payload) != size:
        problem = "truncated" if len(payload) < size else "longer than its header says"
        raise DataError(f"{name}: {problem} (header says {size:,} bytes of data, "
                        f"found {len(payload) if len(payload) < size else 'more'})")
    array = np.frombuffer(payload, dtype=np.uint8).reshape(dims)
    if ndim == 1 and size and array.max() >= NUM_CLASSES:
        raise DataError(f"{name}: label {int(array.max())} outside 0-9")
    return array


class _HashingReader:
    """A stream that hashes everything read through it (so checking costs no second pass)."""

    def __init__(self, inner):
        self.inner, self.sha256 = inner, hashlib.sha256()

    def read(self, n=-1):
        data = self.inner.read(n)
        self.sha256.update(data)
        return data


def find_data_file(data_dir: Path, name: str) -> Path:
    """Where `name` lives: Zalando's layout (`DIR/name[.gz]`) or torchvision's (`DIR/FashionMNIST/raw/`)."""
    data_dir = Path(data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise DataError(f"{data_dir}: not a directory; --data-dir takes the folder holding the "
                        f"IDX files")
    for folder in (data_dir, data_dir / "FashionMNIST" / "raw"):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    shipped = Path(__file__).resolve().parent / "data"      # a checkout's, which may be elsewhere
    such_as = (f", such as {_shell(shipped)} (the copy beside fmnist.py)"
               if shipped != data_dir.resolve() and (shipped / f"{name}.gz").is_file() else "")
    raise DataError(f"{data_dir / name}[.gz]: file not found (also looked in "
                    f"{data_dir / 'FashionMNIST' / 'raw'}); run `{_invocation()} download "
                    f"--data-dir {_shell(data_dir)}` or point --data-dir at the folder holding "
                    f"it{such_as}")


def read_idx(path: Path, expected_sha256: str | None = None) -> np.ndarray:
    """Read an IDX file, gzip-compressed or not, and check the SHA-256 of its decompressed bytes."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            gzipped = f.read(2) == b"\x1f\x8b"
    except OSError as e:
        raise DataError(f"{path}: cannot be opened ({e.strerror})") from None
    try:
        with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as f:
            reader = _HashingReader(f)
            array = parse_idx(reader, str(path))
            reader.read()  # hash any trailing bytes too (parse_idx already refused them)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot be read ({e}); the file is damaged, download it again") from None
    if expected_sha256 and reader.sha256.hexdigest() != expected_sha256:
        raise DataError(f"{path}: checksum mismatch (SHA-256 {reader.sha256.hexdigest()[:16]}..., "
                        f"expected {expected_sha256[:16]}...); the file is damaged, download it again")
    return array


class RawData(NamedTuple):
    """The official Fashion-MNIST arrays as stored: uint8 images (N, 28, 28), uint8 labels (N,)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def load_fashion_mnist(data_dir: str | Path = "data", verify: bool = True) -> RawData:
    """Load the four official files from `data_dir`, checking checksums and that counts agree."""
    paths = [find_data_file(Path(data_dir), name) for name in DATA_FILES]
    raw = RawData(*(read_idx(path, sha256 if verify else None)
                    for path, (sha256, _) in zip(paths, DATA_FILES.values())))
    for images, labels, image_path, label_path in (
            (raw.train_images, raw.train_labels, paths[0], paths[1]),
            (raw.test_images, raw.test_labels, paths[2], paths[3])):
        if images.ndim != 3 or labels.ndim != 1:
            raise DataError(f"{image_path} and {label_path}: images and labels are swapped")
        if len(images) != len(labels):
            raise DataError(f"{image_path} and {label_path} disagree: {len(images):,} images "
                            f"but {len(labels):,} labels")
    return raw


TEST_FILES = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def load_test_set(data_dir: str | Path = "data") -> tuple[np.ndarray, np.ndarray]:
    """The official test images (10000, 28, 28) uint8 and labels (10000,), checksummed; the two
    small files only, so a picture or a prediction does not wait for the 47 MB training file."""
    images, labels = (read_idx(find_data_file(Path(data_dir), name), DATA_FILES[name][0])
                      for name in TEST_FILES)
    if len(images) != len(labels):
        raise DataError(f"{data_dir}: {len(images):,} test images but {len(labels):,} labels")
    return images, labels


def split_indices(n: int, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation indices: a permutation of range(n) from `seed`, the last `val_size` held out."""
    if not 0 < val_size < n:
        raise ValueError(f"val_size {val_size:,} must be at least 1 and smaller than the {n:,} "
                         f"images to split")
    order = _readonly(np.random.default_rng(seed).permutation(n))
    return order[:n - val_size], order[n - val_size:]


def normalise(images: np.ndarray, dtype: str = "float32") -> np.ndarray:
    """uint8 images (N, 28, 28) -> (N, 784) floats: scale to [0, 1], then (x - 0.286) / 0.353.

    A 256-entry lookup table does it in one gather, with the arithmetic done in float64 once.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.shape[1:] != IMAGE_SHAPE:
        raise ValueError(f"images must be uint8 pixels of shape (N, 28, 28), got {images.dtype} "
                         f"{images.shape}")
    if np.dtype(dtype).name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    table = ((np.arange(256) / 255.0 - MEAN) / STD).astype(dtype)
    return _readonly(table[images.reshape(len(images), NUM_INPUTS)])   # (N, 784)


class Splits(NamedTuple):
    """Normalised inputs (N, 784) and integer labels (N,) for train, validation and test."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def make_splits(raw: RawData, config: Config = Config()) -> Splits:
    """The report's split: 60,000 official training images -> train / validation; test stays apart."""
    train_idx, val_idx = split_indices(len(raw.train_labels), config.val_size, config.split_seed)
    if config.limit is not None:
        if config.limit > len(train_idx):
            raise ValueError(f"limit must be at most the {len(train_idx):,} training images, "
                             f"got {config.limit:,}")
        train_idx = train_idx[:config.limit]
    arrays = []
    for images, labels in ((raw.train_images[train_idx], raw.train_labels[train_idx]),
                           (raw.train_images[val_idx], raw.train_labels[val_idx]),
                           (raw.test_images, raw.test_labels)):
        arrays += [normalise(images, config.dtype), _readonly(labels.astype(np.intp))]
    return Splits(*arrays)


# ================================================================================================
# Download: the four files from torchvision or the official mirror, verified, written atomically
# ================================================================================================

MIRROR = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"   # Zalando's (torchvision's too)
MAX_DOWNLOAD_BYTES = 64 * 2**20     # the largest .gz is 26 MB; bounds what a wrong URL can send


def download_fashion_mnist(data_dir: str | Path = "data", mirror: str = MIRROR,
                           use_torchvision: bool | None = None, log: Any = print) -> Path:
    """Make `data_dir` hold the four official files, each passing the loader's SHA-256 check.

    Files already present and valid are left alone. With torchvision installed (unless
    use_torchvision is False) it downloads as the report did, into torchvision's layout
    DIR/FashionMNIST/raw/; otherwise each .gz comes from `mirror` over plain HTTP (the S3 mirror
    has no HTTPS; the checksum, not the transport, is what makes the file trustworthy). Nothing is
    moved into place before it has passed the checksum, so an interrupted or damaged download
    leaves no file the loader would accept.
    """
    data_dir = Path(data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise DataError(f"{data_dir}: exists and is not a directory; choose another --data-dir")
    targets = {}                                  # name -> where the verified file will go
    for name in DATA_FILES:
        found, valid = _existing_data_file(data_dir, name)
        if not valid:
            targets[name] = found                 # None, or a damaged file to replace in place
    if not targets:
        log(f"{data_dir}: the four Fashion-MNIST files are present and valid")
        return data_dir
    made = _make_dir(data_dir, "--data-dir")     # the folders this call created, outermost first
    if use_torchvision is None:
        import importlib.util
        use_torchvision = importlib.util.find_spec("torchvision") is not None
    try:
        if use_torchvision:
            raw = data_dir / "FashionMNIST" / "raw"
            _download_with_torchvision(data_dir, {n: t or raw / n for n, t in targets.items()}, log)
        else:
            for name, target in targets.items():
                _download_from_mirror(name, target or data_dir / f"{name}.gz", mirror, log)
    except BaseException:
        for folder in reversed(made):             # leave no empty folder behind a failure
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise
    load_fashion_mnist(data_dir)                  # the loader's own verdict, on all four
    return data_dir


def _make_dir(path: Path, flag: str) -> list[Path]:
    """mkdir -p, with one clear line if it cannot be done; returns the folders it created,
    outermost first."""
    missing = [folder for folder in (path, *path.parents) if not folder.exists()][::-1]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FmnistError(f"{path}: cannot create the directory ({e.strerror}); "
                          f"choose another {flag}") from None
    return missing


def _existing_data_file(data_dir: Path, name: str) -> tuple[Path | None, bool]:
    """The file the loader would read for `name` (None if there is none), and whether it is valid."""
    try:
        path = find_data_file(data_dir, name)
    except DataError:
        return None, False
    try:
        read_idx(path, DATA_FILES[name][0])
    except DataError:
        return path, False
    return path, True


def _download_from_mirror(name: str, target: Path, mirror: str, log: Any) -> None:
    """Fetch `name`.gz, check the decompressed bytes' size and SHA-256, then write `target`
    atomically: the .gz as fetched, or the decompressed bytes if `target` is an uncompressed file."""
    url = mirror.rstrip("/") + f"/{name}.gz"
    if target.is_dir():
        raise DataError(f"{target}: a directory stands where the downloaded file belongs; "
                        f"move it away and download again")
    compressed = _fetch(url)
    payload = _gunzip_verified(compressed, name, url)
    data = compressed if target.suffix == ".gz" else payload
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, lambda f: f.write(data))
    log(f"{target}: downloaded from {url}, {len(compressed):,} bytes, SHA-256 verified")


def _fetch(url: str, limit: int = MAX_DOWNLOAD_BYTES) -> bytes:
    """The body of `url`, read into memory (at most `limit` bytes); any failure is a DataError."""
    import http.client
    import urllib.request
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read(limit + 1)
    except (OSError, ValueError, http.client.HTTPException) as e:   # URLError is an OSError
        reason = getattr(e, "reason", None) or e
        raise DataError(f"{url}: download failed ({reason}); check the connection, "
                        f"or pass --mirror with another copy of the files") from None
    if len(data) > limit:
        raise DataError(f"{url}: more than {limit:,} bytes, not a Fashion-MNIST file")
    return data


def _gunzip_verified(compressed: bytes, name: str, url: str) -> bytes:
    """Decompress a downloaded .gz, never past the expected size (a gzip bomb stops there), and
    check the result against DATA_FILES: exact size, complete stream, published SHA-256."""
    sha256, size = DATA_FILES[name]
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)        # 16+: the gzip container
    try:
        payload = inflater.decompress(compressed, size + 1)
    except zlib.error as e:
        raise DataError(f"{url}: not a valid gzip file ({e}); nothing was written") from None
    if len(payload) != size or not inflater.eof:
        raise DataError(f"{url}: truncated or wrong file ({len(payload):,} bytes after "
                        f"decompressing, expected {size:,}); nothing was written")
    if hashlib.sha256(payload).hexdigest() != sha256:
        raise DataError(f"{url}: checksum mismatch (expected SHA-256 {sha256[:16]}...); "
                        f"nothing was written")
    return payload


def _download_with_torchvision(data_dir: Path, targets: Mapping[str, Path], log: Any) -> None:
    """Let torchvision download and unpack into a temporary folder inside data_dir, check each
    file with the loader, then os.replace it into place (same file system, so atomic)."""
    from torchvision.datasets import FashionMNIST    # the report's source (torchvision extra)
    with tempfile.TemporaryDirectory(dir=data_dir, prefix=".download-") as tmp:
        for train in (True, False):
            try:
                FashionMNIST(root=tmp, train=train, download=True)
            except (RuntimeError, OSError) as e:    # torchvision says which mirrors failed
                raise DataError(f"torchvision could not download Fashion-MNIST: "
                                f"{str(e).splitlines()[0]}") from None
        raw = Path(tmp) / "FashionMNIST" / "raw"
        for name, target in targets.items():
            source = raw / (f"{name}.gz" if target.suffix == ".gz" else name)
            read_idx(source, DATA_FILES[name][0])
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)
            log(f"{target}: downloaded with torchvision, SHA-256 verified")


# ================================================================================================
# Augmentation: random mirror images, shifts, cut-out squares and dropped pixels of training batches
# ================================================================================================

BACKGROUND = -MEAN / STD          # a black pixel after normalisation: what a shift brings in
SeedOrRng = int | np.random.Generator   # randomness comes in as a seed, or a Generator to draw from


def mirror(x: np.ndarray) -> np.ndarray:
    """Flattened images (N, 784) mirrored left to right: a new, read-only array."""
    return _readonly(np.ascontiguousarray(x.reshape(-1, *IMAGE_SHAPE)[:, :, ::-1]).reshape(x.shape))


def check_images(x: np.ndarray) -> None:
    """Raise ValueError unless x is a batch of flattened images, (B, 784) floats."""
    if np.ndim(x) != 2 or np.shape(x)[1] != NUM_INPUTS or np.asarray(x).dtype.kind != "f":
        raise ValueError(f"images must be a (batch, {NUM_INPUTS}) float array (normalise gives "
                         f"one), got {np.asarray(x).dtype} {np.shape(x)}")


def augment(x: np.ndarray, rng: SeedOrRng, flip: float = 0.0, shift: int = 0,
            cutout: int = 0, input_dropout: float = 0.0) -> np.ndarray:
    """A randomly altered copy of a batch of normalised images x (B, 784), for training.

    Each image is mirrored left to right with probability `flip` (a mirrored shirt is still a
    shirt; a mirrored digit is not a digit), then moved by a whole number of pixels in
    -shift..shift, independently down and across, with background filling what moves in; then
    a `cutout` x `cutout` square of it is blacked out (`cut_out`) and each pixel dropped with
    probability `input_dropout` (`drop_pixels`). The network sees a slightly different training
    set every epoch, which makes memorising harder. With everything off it returns x and draws
    nothing, so the report's recipe is untouched.
    """
    check_setting("flip", flip)
    check_setting("shift", shift)
    if not (flip or shift or cutout or input_dropout):
        return x
    check_images(x)
    rng = np.random.default_rng(rng)              # a seed, or the Generator itself
    B = len(x)
    images = x.reshape(B, *IMAGE_SHAPE)                               # (B, 28, 28)
    if flip:
        mirrored = rng.random(B) < flip                               # (B,) bool
        images = np.where(mirrored[:, None, None], images[:, :, ::-1], images)
    if shift:
        s, (h, w) = shift, IMAGE_SHAPE
        padded = np.pad(images, ((0, 0), (s, s), (s, s)), constant_values=BACKGROUND)
        top, left = rng.integers(0, 2 * s + 1, size=(2, B))           # corner of each crop
        rows = (top[:, None] + np.arange(h))[:, :, None]              # (B, 28, 1)
        cols = (left[:, None] + np.arange(w))[:, None, :]             # (B, 1, 28)
        images = padded[np.arange(B)[:, None, None], rows, cols]      # (B, 28, 28)
    out = images.reshape(B, NUM_INPUTS).astype(x.dtype, copy=False)   # (B, 784)
    if cutout:
        out = cut_out(out, rng, cutout)
    if input_dropout:
        out = drop_pixels(out, rng, input_dropout)
    return _readonly(out)


def cut_out(x: np.ndarray, rng: SeedOrRng, size: int) -> np.ndarray:
    """Images x (B, 784) with a size x size square of each set to background (black): "cutout"
    (DeVries and Taylor, 2017). The square's centre is uniform over the 28 x 28 pixels, so near
    an edge only part of it falls inside the image. The network must then recognise an item
    from what is left of it, instead of leaning on a few pixels. A new array."""
    check_setting("cutout", size)
    check_images(x)
    rng = np.random.default_rng(rng)              # a seed, or the Generator itself
    B, r = len(x), np.arange(IMAGE_SHAPE[0])
    centre_row, centre_col = rng.integers(0, IMAGE_SHAPE[0], size=(2, B))           # (B,) each
    first_row, first_col = centre_row - size // 2, centre_col - size // 2
    rows = (r >= first_row[:, None]) & (r < first_row[:, None] + size)             # (B, 28)
    cols = (r >= first_col[:, None]) & (r < first_col[:, None] + size)             # (B, 28)
    hole = (rows[:, :, None] & cols[:, None, :]).reshape(B, NUM_INPUTS)            # (B, 784)
    return _readonly(np.where(hole, x.dtype.type(BACKGROUND), x))


def drop_pixels(x: np.ndarray, rng: SeedOrRng, rate: float) -> np.ndarray:
    """Inverted dropout on the input layer: each pixel of x (B, 784) becomes 0 (the mean pixel,
    after normalisation) with probability `rate`, the others are divided by 1 - rate, as
    `dropout_masks` does for the hidden layers (Srivastava et al. used 0.2 on MNIST's pixels).
    A new array."""
    check_setting("input_dropout", rate)
    check_images(x)
    rng = np.random.default_rng(rng)              # a seed, or the Generator itself
    keep = rng.random(x.shape, dtype=np.float32) >= rate                           # (B, 784) bool
    return _readonly(x * keep * (1.0 / (1.0 - rate)))


# ================================================================================================
# Parameters: an immutable mapping of read-only arrays, all views into one flat vector
# ================================================================================================

def flat_order(names: Sequence[str]) -> list[str]:
    """The order of the arrays inside the flat vector: weight matrices first (W1, W2, ...), then
    the rest (b1, g1, b2, g2, ...), so that L2 and AdamW's decay apply to one contiguous prefix.
    The order depends on the names only, not on the order a mapping lists them in: two Params
    with the same names and shapes have the same layout, so their flat vectors line up."""
    def key(name: str) -> tuple:
        layer = name.lstrip("Wbg")
        return not is_weight(name), int(layer) if layer.isdigit() else math.inf, name
    return sorted(names, key=key)


def is_weight(name: str) -> bool:
    return name.startswith("W")


def split_flat(flat: np.ndarray, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Views of `flat` (1-D), one per name, with the given shapes, laid out in `flat_order`."""
    if num_parameters(shapes) != flat.size or flat.ndim != 1:
        raise ValueError(f"a flat vector of {flat.size} numbers does not fit shapes {dict(shapes)}")
    views, start = {}, 0
    for name in flat_order(list(shapes)):
        stop = start + math.prod(shapes[name])
        views[name] = flat[start:stop].reshape(shapes[name])
        start = stop
    return {name: views[name] for name in shapes}


class Params(Mapping):
    """An immutable `name -> read-only array` mapping whose arrays are views into `self.flat`.

    One flat vector lets Adam update all 570k numbers slice by slice, a dozen NumPy calls a slice
    rather than a loop over layers, and lets a gradient be written layer by layer straight into
    its final place. Construction makes `flat`
    read-only (it must be freshly allocated by the caller, who gives it up).
    """

    __slots__ = ("_flat", "_arrays", "_checked")

    def __init__(self, flat: np.ndarray, shapes: Mapping[str, tuple[int, ...]]):
        self._flat = _readonly(flat)
        self._arrays = split_flat(self._flat, shapes)
        self._checked = False             # set by check_params: the names and shapes never change

    @property
    def flat(self) -> np.ndarray:
        """All parameters as one read-only 1-D vector: the weights first, then the biases (and
        batch norm's scales)."""
        return self._flat

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], dtype=None) -> Params:
        """Copy any mapping of arrays into a new Params (keeping the mapping's order of names).
        A Params already of that dtype is returned as it is: it is immutable, so a copy would
        change nothing."""
        if isinstance(arrays, Params) and (dtype is None or arrays.flat.dtype == dtype):
            return arrays
        dtype = dtype or np.result_type(*arrays.values())
        flat = np.concatenate([np.asarray(arrays[k], dtype).ravel() for k in flat_order(list(arrays))])
        return cls(flat, {k: np.shape(a) for k, a in arrays.items()})

    def like(self, flat: np.ndarray) -> Params:
        """A Params with the same names and shapes as this one, over `flat`, which it makes
        read-only (as the constructor does: the caller hands over a freshly allocated vector)."""
        return Params(flat, self.shapes)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: a.shape for k, a in self._arrays.items()}

    @property
    def num_weights(self) -> int:
        """How many numbers the weight matrices hold: they are flat[:num_weights]."""
        return sum(a.size for k, a in self._arrays.items() if is_weight(k))

    def __getitem__(self, key):
        return self._arrays[key]

    def __iter__(self):
        return iter(self._arrays)

    def __len__(self):
        return len(self._arrays)

    def __repr__(self):
        shapes = ", ".join(f"{k}: {a.shape}" for k, a in self._arrays.items())
        return f"Params({shapes}; {self.flat.dtype})"


def check_params(params: Mapping) -> None:
    """Raise ValueError unless params is a network as init_params makes them: W1, b1, (g1), ...,
    WL, bL, nothing else, each of the shape the layer sizes give it. (A misspelled "w2" would
    otherwise make a shorter network without a word, and a (1,) bias would broadcast.)"""
    if isinstance(params, Params) and params._checked:
        return                            # (train_epoch's steps reuse one Params)
    if not isinstance(params, Mapping):
        raise ValueError(f"parameters must be a mapping of names to arrays (init_params makes "
                         f"one), got {type(params).__name__}")
    for name, a in params.items():
        if not (isinstance(name, str) and isinstance(a, np.ndarray)):
            raise ValueError(f"parameters must map names to NumPy arrays, got {name!r}: "
                             f"{type(a).__name__}")
    missing = ""
    try:
        sizes = layer_sizes_of(params)
    except KeyError as e:                 # a gap in W1, W2, ...: name the first missing
        sizes, missing = None, f"; {e.args[0]} is missing"
    except (IndexError, TypeError):       # a W of fewer than two dimensions
        sizes = None
    actual = {k: np.shape(a) for k, a in params.items()}
    expected = param_shapes(sizes, has_batch_norm(params)) if sizes else {}
    if not sizes or actual != expected:
        odd = sorted(set(actual) ^ set(expected))
        raise ValueError(f"parameters {actual} are not a network as init_params makes them"
                         + (f"; a {_dashed(sizes)} one has {expected}" if sizes else
                            f" (W1, b1, W2, b2, ...){missing}")
                         + (f" (names missing or extra: {', '.join(odd)})" if sizes and odd else ""))
    if isinstance(params, Params):
        params._checked = True


def num_layers(params: Mapping) -> int:
    return sum(1 for name in params if is_weight(name))


def has_batch_norm(params: Mapping) -> bool:
    """Whether the network normalises its hidden layers over the batch (it has scales g1, ...)."""
    return "g1" in params


def layer_sizes_of(params: Mapping) -> tuple[int, ...]:
    """(784, 512, 256, 128, 10) for the report's network."""
    L = num_layers(params)
    return (params["W1"].shape[0], *(params[f"W{l}"].shape[1] for l in range(1, L + 1)))


def _arrow(sizes: Sequence[int]) -> str:
    return " -> ".join(map(str, sizes))


def _dashed(sizes: Sequence[int]) -> str:
    return "-".join(map(str, sizes))


def num_parameters(shapes: Mapping[str, tuple[int, ...]]) -> int:
    """How many numbers arrays of these shapes hold (567,434 for the report's network)."""
    return sum(math.prod(shape) for shape in shapes.values())


def param_shapes(layer_sizes: Sequence[int], batch_norm: bool = False) -> dict[str, tuple[int, ...]]:
    """W_l (fan_in, fan_out) and b_l (fan_out,) per layer; with batch norm also a scale g_l
    (fan_out,) per hidden layer (see `batch_norm_forward`)."""
    shapes, L = {}, len(layer_sizes) - 1
    for l, (fan_in, fan_out) in enumerate(zip(layer_sizes[:-1], layer_sizes[1:]), start=1):
        shapes[f"W{l}"], shapes[f"b{l}"] = (fan_in, fan_out), (fan_out,)
        if batch_norm and l < L:
            shapes[f"g{l}"] = (fan_out,)
    return shapes


# ================================================================================================
# Model: initialisation, dropout masks, forward pass
# ================================================================================================

def init_params(layer_sizes: Sequence[int] = Config().layer_sizes, seed: int = 42,
                dtype: str = "float32", batch_norm: bool = False) -> Params:
    """He-normal weights for the ReLU layers, Xavier (Glorot) normal for the output, zero biases;
    with batch norm, scales g = 1 (the weights are the same draws either way).

    He: std = sqrt(2 / fan_in) keeps the variance of each layer's pre-activations Z about the
    same from layer to layer (without dropout), through ReLUs that zero half their inputs.
    Xavier: std = sqrt(2 / (fan_in + fan_out)) suits the linear output.
    """
    if len(layer_sizes) < 2 or any(int(n) < 1 for n in layer_sizes):
        raise ValueError(f"layer sizes must be two or more positive integers, got {list(layer_sizes)}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    rng = np.random.default_rng(seed)
    shapes = param_shapes(layer_sizes, batch_norm)
    flat = np.zeros(num_parameters(shapes), dtype=dtype)
    views, L = split_flat(flat, shapes), len(layer_sizes) - 1     # writable views into flat
    for l, (fan_in, fan_out) in enumerate(zip(layer_sizes[:-1], layer_sizes[1:]), start=1):
        std = math.sqrt(2.0 / fan_in) if l < L else math.sqrt(2.0 / (fan_in + fan_out))
        views[f"W{l}"][...] = rng.normal(0.0, std, size=(fan_in, fan_out))
        if f"g{l}" in views:
            views[f"g{l}"][...] = 1.0
    return Params(flat, shapes)


def dropout_masks(rng: SeedOrRng, batch_size: int, hidden: Sequence[int], rate: float,
                  dtype: str = "float32") -> tuple[np.ndarray, ...] | None:
    """Inverted-dropout masks, one (B, h) array per hidden layer: 0 with probability `rate`,
    else 1 / (1 - rate), so the expected activation is unchanged and evaluation needs no rescaling.
    Returns None when rate is 0 (no dropout)."""
    check_setting("dropout", rate)
    if rate == 0.0:
        return None
    rng = np.random.default_rng(rng)
    scale = 1.0 / (1.0 - rate)
    masks = []
    for h in hidden:
        keep = rng.random((batch_size, h), dtype=np.float32) >= rate        # (B, h) bool
        masks.append(_readonly(np.multiply(keep, scale, dtype=dtype)))      # (B, h) 0 or 1/(1-p)
    return tuple(masks)


class BatchNorm(NamedTuple):
    """What batch norm's backward pass needs: the normalised pre-activations and 1 / std."""

    normalised: np.ndarray           # Z_hat = (Z - mean) / std, (B, n): each column has mean 0
                                     # and variance var / (var + BN_EPS), about 1
    inv_std: np.ndarray              # 1 / sqrt(var + BN_EPS) per unit, (n,)


BN_EPS = 1e-5           # keeps 1 / std finite for a unit that is constant over the batch


def batch_norm_forward(Z: np.ndarray, g: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, BatchNorm]:
    """Batch normalisation (Ioffe and Szegedy, 2015): g * (Z - mean) / std + b, with the mean and
    variance of each unit (column) over the batch. Returns a fresh (B, n) array and the cache.

    Whatever the weights below do, each unit enters the ReLU with the spread g and the centre b
    that training chose, so a change in one layer no longer shifts the inputs of the next, and
    the batch's noise in mean and std regularises a little. The bias moves after the
    normalisation: added before it, the mean subtraction would cancel it. At prediction there is
    no batch: `fold_batch_norm` puts the training set's mean and std in their place.
    """
    mean = Z.mean(axis=0)                                     # (n,)
    centred = Z - mean                                        # (B, n)
    inv_std = 1.0 / np.sqrt(np.mean(np.square(centred), axis=0) + BN_EPS)   # (n,)
    normalised = np.multiply(centred, inv_std, out=centred)   # (B, n)
    out = normalised * g                                      # (B, n)
    out += b
    return out, BatchNorm(_readonly(normalised), _readonly(inv_std.astype(Z.dtype, copy=False)))


def batch_norm_backward(dOut: np.ndarray, norm: BatchNorm, g: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dL/dZ, dL/dg, dL/db) from dL/dOut, for out = g * Z_hat + b over a batch of B rows.

        db = sum_rows dOut                 dg = sum_rows dOut * Z_hat
        dZ = g / (B std) * (B dOut - db - Z_hat dg)

    Derivation, per column, with s = 1 / std and D = dL/dZ_hat = g dOut: Z_hat_i = (Z_i - mean) s,
    where d mean / dZ_i = 1/B and ds / dZ_i = -s^3 (Z_i - mean) / B = -s^2 Z_hat_i / B. So
        dZ_i = s (D_i - mean_j D_j - Z_hat_i mean_j(D_j Z_hat_j)),
    and putting in sum_j D_j = g db and sum_j D_j Z_hat_j = g dg gives the line above.
    (This is exact with BN_EPS inside std.)

    The last line is the classic one: every row's Z enters the batch's mean and std, so dZ of one
    row gets, besides its own dOut, two corrections shared by the whole batch. They remove from
    dOut its mean and its part along Z_hat, the two directions in which the normalisation cannot
    move its output, so each column of dZ sums to zero and is orthogonal to Z_hat (up to a term
    in BN_EPS, which lets a column's scale matter a little).
    """
    B = dOut.shape[0]
    db = dOut.sum(axis=0)                                     # (n,)
    dg = np.einsum("ij,ij->j", dOut, norm.normalised)         # (n,)
    dZ = dOut * B                                             # (B, n)
    dZ -= db
    dZ -= norm.normalised * dg
    dZ *= g * norm.inv_std / B
    return dZ, dg, db


class Cache(NamedTuple):
    """What backward needs from forward: each layer's input A, each hidden layer's gate, the logits.

    gate = 1[Z > 0] * mask is the derivative of dropout(ReLU(Z)) with respect to Z: a diagonal
    matrix, stored as its diagonal. With no dropout it is the boolean 1[Z > 0]. With batch norm
    the gate is taken at the normalised layer's output g * Z_hat + b instead of at A W + b, and
    `norms` keeps what the normalisation's backward pass needs.
    """

    inputs: tuple[np.ndarray, ...]   # A0 = X, A1, ..., A_{L-1}; A_l is (B, n_l)
    gates: tuple[np.ndarray, ...]    # one per hidden layer, (B, n_l)
    logits: np.ndarray               # Z_L, (B, 10)
    norms: tuple[BatchNorm, ...] = ()   # one per hidden layer, with batch norm only


def check_inputs(params: Mapping, x: np.ndarray, y: np.ndarray | None = None) -> None:
    """Raise ValueError naming expected and actual shapes when a batch does not fit the network
    (or the network is not one: check_params), or is not of the network's dtype."""
    check_params(params)
    n_in = params["W1"].shape[0]
    if np.ndim(x) != 2 or np.shape(x)[1] != n_in:
        hint = " (flatten images with x.reshape(len(x), -1))" if np.ndim(x) == 3 else ""
        raise ValueError(f"inputs must have shape (batch, {n_in}), got {np.shape(x)}{hint}")
    dtype, expected = np.asarray(x).dtype, params["W1"].dtype
    if dtype != expected:
        raise ValueError(f"inputs are {dtype} but parameters are {expected}; make them the same "
                         f"dtype (normalise(images, dtype) gives either)")
    if y is not None:
        check_labels(y, len(x), params[f"b{num_layers(params)}"].shape[0])


def check_labels(y: np.ndarray, n: int, classes: int) -> None:
    """Raise ValueError unless y is n integer class labels in 0 .. classes - 1."""
    if np.shape(y) != (n,):
        raise ValueError(f"labels must have shape ({n},) to match the inputs, got {np.shape(y)}")
    y = np.asarray(y)
    if n and (y.dtype.kind not in "iu" or y.min() < 0 or y.max() >= classes):
        raise ValueError(f"labels must be integers in 0..{classes - 1}, "
                         f"got {y.dtype} values {y.min()}..{y.max()}")


def check_masks(masks: Sequence[np.ndarray], batch: int, hidden: Sequence[int]) -> None:
    """Raise ValueError unless masks are one (batch, width) array per hidden layer, as
    dropout_masks makes them (a single array or a (width,) mask would broadcast silently)."""
    shapes = [np.shape(m) for m in masks] if isinstance(masks, (tuple, list)) else None
    expected = [(batch, h) for h in hidden]
    if shapes != expected:
        raise ValueError(f"dropout masks must be a tuple of one array per hidden layer, shapes "
                         f"{expected} (see dropout_masks), got "
                         f"{shapes if shapes is not None else type(masks).__name__}")


def forward(params: Mapping, x: np.ndarray, masks: Sequence[np.ndarray] | None = None
            ) -> tuple[np.ndarray, Cache]:
    """Logits (B, 10) for inputs x (B, 784), and the cache that `backward` needs.

    `masks` are the dropout masks of `dropout_masks` (training) or None (evaluation: dropout is
    the identity then, which is the point of *inverted* dropout).
    """
    check_inputs(params, x)
    L, normalise_batch = num_layers(params), has_batch_norm(params)
    if masks is not None:
        check_masks(masks, len(x), layer_sizes_of(params)[1:-1])
    A, inputs, gates, norms = x, [], [], []
    for l in range(1, L):
        Z = A @ params[f"W{l}"]                               # (B, n_l)
        if normalise_batch:
            Z, norm = batch_norm_forward(Z, params[f"g{l}"], params[f"b{l}"])  # g Z_hat + b
            norms.append(norm)
        else:
            Z += params[f"b{l}"]
        gate = Z > 0                                          # ReLU'(Z), (B, n_l) bool
        if masks is not None:
            gate = np.multiply(gate, masks[l - 1])            # ... times the dropout mask
        inputs.append(A)
        gates.append(_readonly(gate))
        A = _readonly(np.multiply(Z, gate, out=Z))            # dropout(ReLU(Z)), in place on fresh Z
    logits = A @ params[f"W{L}"]                              # (B, 10)
    logits += params[f"b{L}"]
    inputs.append(A)
    return _readonly(logits), Cache(tuple(inputs), tuple(gates), logits, tuple(norms))


# ================================================================================================
# Loss: stable softmax, cross-entropy, L2
# ================================================================================================

def log_softmax(z: np.ndarray) -> np.ndarray:
    """log softmax(z) row-wise, computed as z - max - log(sum(exp(z - max))): never overflows."""
    shifted = z - z.max(axis=1, keepdims=True)                # (B, K), max of each row is 0
    return _readonly(shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True)))


def softmax(z: np.ndarray) -> np.ndarray:
    """softmax(z) row-wise. Subtracting the row maximum first keeps exp() in [0, 1]: it may
    underflow to 0, but it never overflows."""
    return _readonly(_softmax(z))


def _softmax(z: np.ndarray) -> np.ndarray:
    """softmax, writable: backward turns it into dL/dZ in place."""
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return np.divide(e, e.sum(axis=1, keepdims=True), out=e)


def cross_entropy(logits: np.ndarray, labels: np.ndarray, smoothing: float = 0.0) -> float:
    """Mean over the batch of -log p(true class), straight from log_softmax (no clipping needed).

    With label smoothing e the target is (1 - e) one-hot + e uniform, so the loss per example is
    (1 - e) (-log p_true) + e mean_k(-log p_k): a network can no longer drive it to zero by
    growing its logits without bound, which keeps it from becoming overconfident.
    """
    if np.ndim(logits) != 2:
        raise ValueError(f"logits must be a (batch, classes) array, got shape {np.shape(logits)}")
    if len(logits) == 0:
        raise ValueError("cross-entropy of zero examples is undefined")
    check_labels(labels, len(logits), np.shape(logits)[1])
    check_setting("label_smoothing", smoothing)
    log_p = log_softmax(logits)                               # (B, K)
    nll = -log_p[np.arange(len(labels)), labels]              # (B,)
    if smoothing:
        nll = (1.0 - smoothing) * nll - smoothing * log_p.mean(axis=1)
    return float(nll.mean())


def l2_penalty(params: Mapping, l2: float) -> float:
    """(lambda / 2) * sum of squared weights, over the weight matrices only (biases are not
    penalised). Its gradient is lambda * W.

    The factor 1/2 is the usual convention (Nielsen's network2.py, Goodfellow et al., PyTorch's
    weight_decay): it makes the gradient exactly lambda W, so under plain SGD each step shrinks
    the weights by the factor 1 - lr lambda (under Adam it does not; see adam_step). The report
    writes the term as lambda * sum ||W||^2 with lambda = 1e-4, but trained with that term's gradient 2 lambda W the
    network is held back more than the report's own figures show (over three seeds, validation
    89.7% against its 90.1%, 93.3% of its training images against its 94.6%), while with
    gradient lambda W it comes close to them (90.2%, 94.3%; README, "Which L2").
    `--l2 2e-4` trains with the report's term as written.
    """
    return 0.5 * l2 * sum(float(np.vdot(w, w)) for k, w in params.items() if is_weight(k))


def total_loss(params: Mapping, x: np.ndarray, labels: np.ndarray, l2: float = 0.0,
               masks: Sequence[np.ndarray] | None = None, smoothing: float = 0.0) -> float:
    """The objective that `backward` differentiates: cross-entropy + L2 penalty."""
    check_setting("l2", l2)
    logits, _ = forward(params, x, masks)
    return cross_entropy(logits, labels, smoothing) + l2_penalty(params, l2)


# ================================================================================================
# Backward pass: the chain rule, layer by layer, from the loss to the first weights
# ================================================================================================

def flush_to_zero(a: np.ndarray, root: int = 2) -> np.ndarray:
    """Flush numbers near or below t = tiny**(1/root) (tiny: the smallest normal float, 1.2e-38
    in float32) in place on a fresh array, so that nothing smaller than t in magnitude is left
    but zeros: every |x| < t/2 becomes 0, and one between t/2 and t becomes 0 or moves up to
    between t and 2t. Returns `a`.

    Why: a ReLU unit that never fires gets no gradient but the L2 term, and Adam then pulls its
    weights toward zero step after step (how fast depends on what v remembers of the unit's
    earlier gradients), down through the *subnormal* numbers below tiny. x86 CPUs compute with
    subnormals up to 20x slower, in matrix products too: left alone, the report's recipe (with
    L2 gradient 2 lambda W) slowed from 2 s to 25 s an epoch by epoch 25. CPUs can flush them in
    hardware (the FTZ/DAZ flags PyTorch sets with `torch.set_flush_denormal`); NumPy cannot, so
    we zero numbers before they get there: moments and dL/dZ near sqrt(tiny) (1e-19 in float32),
    so that their products stay normal, and weights near tiny**(1/4) (3e-10), so that even
    (1 - beta2) * (lambda W)^2 does. Adam flushes every FLUSH_EVERY = 16 steps, which proved
    often enough: the default run's epochs keep their speed to the end (with a zero gradient, m
    shrinks by x0.9 a step, so from sqrt(tiny) it needs over 400 steps to reach tiny).

    What this changes is tiny, but not nothing. A flushed weight (under 3e-10) is 10^-9 of the
    sums it enters, and a flushed m (at most 1.1e-19) would have moved its weight by about 1e-13
    at most (at lr 1e-3). A flushed v matters most: its square root, up to 3.3e-10, leaves
    Adam's denominator sqrt(v) + eps_hat, about 3% of eps_hat late in training (26% at step 16,
    while eps_hat = eps sqrt(1 - beta2^t) is still small), but only for coordinates whose
    gradients have stayed below about 3e-10 (3e-9 at step 16). And numbers that are not zeroed
    may move too, by at most 2t or one unit in their last place (below). So runs are
    reproducible bit for bit, not identical to runs without the flush.

    Two roundings do it in two passes. With m the mantissa bits, the floats next to
    c = 2^(m+1) t are s apart, with t < s <= 2t, except when c is a power of two (as for root 2):
    then they are s = 2t apart above c but only t apart below it. Adding c rounds x to c itself
    when -s/2 < x < s/2 (-t/2 <= x <= t for a power of two), so every |x| < t/2 either way, and
    subtracting c then leaves exactly 0. Any other small x comes back rounded to a multiple of
    the spacing, so a nonzero result is at least t. Other numbers move by at most 2t or one unit
    in their last place, and not at all once they are 2^(2m+3) t or larger.
    """
    info = np.finfo(a.dtype)
    c = a.dtype.type(info.tiny ** (1.0 / root) * 2.0 ** (info.nmant + 1))
    a += c
    a -= c
    return a


def check_cache(cache: Cache, params: Mapping) -> None:
    """Raise ValueError unless cache is what forward(params, ...) returns: one input per layer
    of the right width, and batch norm's statistics exactly when the network has batch norm."""
    sizes, batch_norm = layer_sizes_of(params), has_batch_norm(params)
    widths = [a.shape[1:] for a in cache.inputs]
    if widths != [(n,) for n in sizes[:-1]] or len(cache.norms) != (len(sizes) - 2) * batch_norm:
        raise ValueError(f"the cache does not come from forward on these parameters (a "
                         f"{_dashed(sizes)} network{' with batch norm' * batch_norm})")


def backward(params: Mapping, cache: Cache, labels: np.ndarray, l2: float = 0.0,
             smoothing: float = 0.0) -> Params:
    """Gradients of `total_loss` with respect to every parameter, same keys and shapes as params.

    For softmax followed by cross-entropy averaged over B rows, dL/dZ_L = (softmax(Z_L) - T) / B,
    where T is the target: one-hot, or (1 - e) one-hot + e / K with label smoothing e. (Per row,
    log p_k = z_k - log sum_j e^{z_j}, so d(-sum_k T_k log p_k)/dz_k = p_k - T_k, as sum_k T_k = 1.)
    Then for each layer l = L, ..., 1 (A_{l-1} is the layer's input):
        dW_l = A_{l-1}^T dZ_l + lambda W_l        (fan_in, fan_out)
        db_l = sum over the batch of dZ_l          (fan_out,)
        dA_{l-1} = dZ_l W_l^T                      (B, fan_in)
        dZ_{l-1} = dA_{l-1} * gate_{l-1}           ReLU and dropout, elementwise
    Why these: Z[i,k] = sum_j A[i,j] W[j,k] + b[k]. W[j,k] enters every row i, so its gradient
    sums dZ[i,k] A[i,j] over the batch, which is the matrix product A^T dZ; b[k] is added to
    every row, so db sums dZ's rows; A[i,j] enters Z[i,k] for every k, so dA sums dZ[i,k] W[j,k]
    over k, which is dZ W^T. The gate passes dA where the unit fired and was kept (scaled by
    dropout's 1 / (1 - p)) and blocks it elsewhere.
    With batch norm, a hidden layer's dZ_l first goes back through the normalisation
    (`batch_norm_backward`, which also gives dg_l and db_l).

    One line is about speed, not math: entries of dL/dZ_L below about 5e-20 (float32) become
    zero, and no nonzero entry below 1.1e-19 is left (`flush_to_zero`; one between the two may
    move up to 2.2e-19). Confidently classified examples give probabilities like 1e-30, which
    multiplied through the weights become *subnormal* numbers that slow the CPU. They are 10^16
    or more times smaller than the largest entries beside them (up to 1/B), far below what
    float32 sums resolve; entries that are not zeroed may move by at most 2.2e-19 or one unit
    in their last place, and those of 6.1e-5 or more not at all (`flush_to_zero`).
    """
    check_params(params)
    L = num_layers(params)
    B = cache.logits.shape[0]
    check_cache(cache, params)
    check_labels(labels, B, cache.logits.shape[1])
    check_setting("l2", l2)
    check_setting("label_smoothing", smoothing)
    shapes = {k: np.shape(a) for k, a in params.items()}
    flat = np.empty(num_parameters(shapes), dtype=cache.logits.dtype)
    grads = split_flat(flat, shapes)                          # writable views, filled below
    dZ = _softmax(cache.logits)                               # p, (B, 10)
    if smoothing:
        dZ -= smoothing / dZ.shape[1]                         # p - e/K
    dZ[np.arange(B), labels] -= 1.0 - smoothing               # p - T: (1 - e) less at the label
    dZ /= B                                                   # dL/dZ_L: the loss is a mean
    dZ = flush_to_zero(dZ)                                    # see flush_to_zero
    for l in range(L, 0, -1):
        A_prev, W = cache.inputs[l - 1], params[f"W{l}"]
        if l < L and cache.norms:                 # back through the batch norm: dL/dOut -> dL/dZ
            dZ, dg, db = batch_norm_backward(dZ, cache.norms[l - 1], params[f"g{l}"])
            grads[f"g{l}"][...] = dg                          # (fan_out,)
            grads[f"b{l}"][...] = db                          # (fan_out,)
        else:
            np.sum(dZ, axis=0, out=grads[f"b{l}"])            # (fan_out,)
        np.matmul(A_prev.T, dZ, out=grads[f"W{l}"])           # (fan_in, fan_out)
        if l2:
            grads[f"W{l}"] += l2 * W
        if l > 1:
            dA = dZ @ W.T                                     # (B, fan_in)
            dZ = np.multiply(dA, cache.gates[l - 2], out=dA)  # (B, fan_in), layer l-1's gate
    return Params(flat, shapes)


# ================================================================================================
# Gradient check: backward against central finite differences, on a small float64 network
# ================================================================================================

GRADCHECK_H = 3e-5        # float64, Richardson: rounding ~1.5 eps |L| / h ~ 1e-11 |L|, truncation
                          # ~h^4 (see richardson_gradient); measured errors below
GRADCHECK_KINK = 1e-2     # kept pre-activations are this far from ReLU's kink (see gradcheck_case)
GRADCHECK_FLOOR = 1e-3    # below this, entries are compared absolutely (see relative_error)
GRADCHECK_TOL = 1e-6      # measured: at most 1.1e-7 over 300 random small networks; a wrong
                          # formula gives 1e-3 to 1


class GradcheckCase(NamedTuple):
    """A fixed problem for the check: network, batch (B, 784), labels (B,), dropout masks
    drawn once at `dropout`, and the L2 strength."""

    params: Params
    x: np.ndarray
    labels: np.ndarray
    masks: tuple[np.ndarray, ...] | None
    dropout: float
    l2: float


def gradcheck_case(hidden: Sequence[int] = (8, 6), batch: int = 4, seed: int = 0,
                   dropout: float = 0.3, l2: float = 1e-3, batch_norm: bool = False
                   ) -> GradcheckCase:
    """A random float64 network, batch, labels and one fixed dropout mask, every kept hidden
    pre-activation at least GRADCHECK_KINK away from ReLU's kink at 0.

    Why the kink matters: if a nudge of h carries Z across 0, the finite difference averages two
    slopes and disagrees with backward although backward is right. The largest nudge, 2h = 6e-5,
    moves Z by 6e-5 times dZ/dparameter, so GRADCHECK_KINK leaves room for a factor of 160.
    Biases are drawn away from 0 (init's zeros would put units with all-zero input exactly on the
    kink), and draws whose Z come too close are redrawn from the same generator, so the case is
    a function of the seed.
    """
    rng = np.random.default_rng(seed)
    sizes = (NUM_INPUTS, *hidden, NUM_CLASSES)
    for _ in range(100):
        arrays = {k: np.array(a) for k, a in
                  init_params(sizes, rng.integers(2**32), "float64", batch_norm).items()}
        for name, a in arrays.items():
            if not is_weight(name):                                   # +-[1/16, 1], never 0
                arrays[name] = rng.uniform(1 / 16, 1, a.shape) * rng.choice([-1.0, 1.0], a.shape)
        params = Params.from_arrays(arrays)
        x = rng.uniform(-3, 3, (batch, NUM_INPUTS))                   # (B, 784)
        labels = rng.integers(0, NUM_CLASSES, batch)                  # (B,)
        masks = dropout_masks(rng, batch, hidden, dropout, "float64")
        if _distance_to_kink(params, x, masks) > GRADCHECK_KINK:
            return GradcheckCase(params, x, labels, masks, dropout, l2)
    raise ValueError("could not draw a network away from ReLU's kinks; try another --seed")


def _distance_to_kink(params: Mapping, x: np.ndarray, masks) -> float:
    """The smallest |Z| over the hidden units that dropout keeps (dropped ones have slope 0 anyway)."""
    _, cache = forward(params, x, masks)
    distance = np.inf
    for l in range(1, num_layers(params)):
        if cache.norms:                                               # ReLU's input, (B, n_l)
            Z = cache.norms[l - 1].normalised * params[f"g{l}"] + params[f"b{l}"]
        else:
            Z = cache.inputs[l - 1] @ params[f"W{l}"] + params[f"b{l}"]
        kept = np.ones(Z.shape, bool) if masks is None else masks[l - 1] != 0
        distance = min(distance, float(np.abs(Z[kept]).min(initial=np.inf)))
    return distance


def numerical_gradient(loss: Any, params: Params, h: float = GRADCHECK_H) -> Params:
    """Central differences (L(p + h e_i) - L(p - h e_i)) / 2h for every coordinate i: the
    definition of the derivative, one parameter at a time (slow, and that is the point)."""
    flat = params.flat
    grad = np.empty_like(flat)                                        # (P,)
    for i in range(flat.size):
        plus, minus = flat.copy(), flat.copy()
        plus[i] += h
        minus[i] -= h
        rise = loss(params.like(plus)) - loss(params.like(minus))
        grad[i] = rise / (plus[i] - minus[i])                         # the step actually taken
    return params.like(grad)


def richardson_gradient(loss: Any, params: Params, h: float = GRADCHECK_H) -> Params:
    """(4 N(h) - N(2h)) / 3, where N(h) is `numerical_gradient` with step h: Richardson's
    extrapolation, twice the work of one central difference.

    Why: the central difference is off by about h^2 / 6 times the loss's third derivative (its
    truncation error), and batch norm on a tiny batch can make that derivative huge (a column
    whose variance is close to BN_EPS). N(2h)'s truncation error is 4 times N(h)'s, so in the
    combination the h^2 terms cancel, leaving h^4 ones; the rounding error, eps |L| / h or so in
    N(h), grows at most (4 + 1/2) / 3 = 1.5 times. So a larger h can be used, which shrinks the
    rounding error. Measured on `gradcheck --batch-norm --hidden 3,3,3 --batch 3 --seed 9`: at
    h = 1e-5, N(h) is off by 1.7e-6 (over the tolerance although backward is right) and the
    extrapolation by 9e-8; at h = 3e-5, 1.55e-5 and 3.3e-8.
    """
    fine, coarse = numerical_gradient(loss, params, h), numerical_gradient(loss, params, 2 * h)
    return params.like((4 * fine.flat - coarse.flat) / 3)


def relative_error(analytic: np.ndarray, numeric: np.ndarray,
                   floor: float = GRADCHECK_FLOOR) -> np.ndarray:
    """|a - n| / max(|a|, |n|, floor), elementwise. Without the floor, an entry of 1e-9 (a weight
    into a unit that dropout switched off, say) would show the finite difference's own rounding
    error, about 1e-10, as a 10% error; with it, such entries are judged by their absolute error."""
    scale = np.maximum(np.maximum(np.abs(analytic), np.abs(numeric)), floor)
    return np.abs(analytic - numeric) / scale


def gradient_check(case: GradcheckCase, numeric_gradient: Any = richardson_gradient
                   ) -> dict[str, tuple[float, float]]:
    """For each parameter: (largest |gradient| from backward, largest relative error against
    finite differences of total_loss with the same fixed masks and L2). `numeric_gradient(loss,
    params)` computes them: Richardson-extrapolated by default; `numerical_gradient` is the plain
    central difference."""
    def loss(p):
        return total_loss(p, case.x, case.labels, case.l2, case.masks)

    _, cache = forward(case.params, case.x, case.masks)
    analytic = backward(case.params, cache, case.labels, case.l2)
    numeric = numeric_gradient(loss, case.params)
    return {name: (float(np.abs(analytic[name]).max()),
                   float(relative_error(analytic[name], numeric[name]).max())) for name in analytic}


# ================================================================================================
# Optimizer: Adam, as a pure function of (params, grads, state)
# ================================================================================================

class AdamState(NamedTuple):
    """Adam's memory: the step count t and running first (m) and second (v) moments of the gradient."""

    step: int
    m: Params
    v: Params


def check_adam_state(state: AdamState, params: Params) -> None:
    """Raise ValueError unless the moments have the parameters' names, shapes and dtype."""
    for name, moment in (("m", state.m), ("v", state.v)):
        if moment.shapes != params.shapes or moment.flat.dtype != params.flat.dtype:
            raise ValueError(f"Adam state {name} ({moment.flat.dtype}, {moment.shapes}) does not "
                             f"match the parameters ({params.flat.dtype}, {params.shapes})")


def adam_init(params: Mapping) -> AdamState:
    """Adam's state before the first step: step 0, both moments zero, shaped like params."""
    params = Params.from_arrays(params)
    zeros = np.zeros_like(params.flat)
    return AdamState(0, params.like(zeros), params.like(zeros.copy()))


def adam_step(params: Mapping, grads: Mapping, state: AdamState, lr: float = 1e-3,
              beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, l2: float = 0.0,
              weight_decay: float = 0.0) -> tuple[Params, AdamState]:
    """One Adam update; returns new parameters and new state, leaving the inputs untouched.

        g   = grads + l2 W                         (only if l2 > 0: see below)
        m_t = beta1 m + (1 - beta1) g              running mean of gradients
        v_t = beta2 v + (1 - beta2) g^2            running mean of squared gradients
        p_t = p - lr/(1 - beta1^t) * m_t / (sqrt(v_t / (1 - beta2^t)) + eps)

    The bias corrections undo the zero start of m and v, so the first step has size ~lr in every
    coordinate whatever the gradient's scale (as long as |g| is well above eps). Multiplying the
    last line's fraction above and below by sqrt(1 - beta2^t) gives the form computed,
    p - step_size * m_t / (sqrt(v_t) + eps_hat), with step_size = lr sqrt(1 - beta2^t) /
    (1 - beta1^t) and eps_hat = eps sqrt(1 - beta2^t): both corrections in two scalars.
    `_adam_slice` computes these formulas, rearranged to use little memory (the moments as
    v + (1 - beta2)(g^2 - v), which does not round exactly as the textbook form does), and
    every FLUSH_EVERY-th step it zeroes numbers near the bottom of the float range
    (`flush_to_zero`).

    `l2` adds the L2 term's gradient l2 * W to the weights' gradients here, which is exactly
    what `backward(..., l2)` would have added (optax calls this `add_decayed_weights` before
    `scale_by_adam`). Training passes the data gradient from `backward(..., l2=0)` and l2 here,
    because here the addition costs two passes over slices already in cache instead of two
    over all the weights.

    `weight_decay` makes it AdamW (Loshchilov and Hutter, 2019): the weights (not the biases)
    also shrink by the factor 1 - lr * weight_decay, outside Adam's division by sqrt(v):
        p_t = (1 - lr weight_decay) p - lr/(1 - beta1^t) * m_t / (sqrt(v_t / (1 - beta2^t)) + eps)
    L2 instead goes through that division, so weights with large, noisy gradients are decayed
    less than quiet ones; AdamW decays every weight at the same rate. (The decay is multiplied
    by lr, as in PyTorch's AdamW; the paper multiplies it by the schedule's factor alone, so
    weight_decay 0.5 with lr 1e-3 here is its 5e-4.)
    """
    for field, value in (("lr", lr), ("l2", l2), ("beta1", beta1), ("beta2", beta2), ("eps", eps)):
        check_setting(field, value)
    check_weight_decay(weight_decay, lr)
    if not (_is_int(state.step) and state.step >= 0):
        raise ValueError(f"Adam state's step must be a whole number >= 0, got {state.step!r}")
    params, grads = Params.from_arrays(params), Params.from_arrays(grads)
    if grads.shapes != params.shapes:
        raise ValueError(f"gradients {grads.shapes} do not match parameters {params.shapes}")
    if grads.flat.dtype != params.flat.dtype:
        raise ValueError(f"gradients are {grads.flat.dtype} but parameters are {params.flat.dtype}")
    check_adam_state(state, params)
    p_new, m_new, v_new = (np.empty_like(params.flat) for _ in range(3))
    adam_update(params.flat, grads.flat, state.m.flat, state.v.flat, p_new, m_new, v_new,
                params.num_weights, state.step + 1, lr, beta1, beta2, eps, l2, weight_decay)
    return params.like(p_new), AdamState(state.step + 1, params.like(m_new), params.like(v_new))


ADAM_SLICE = 32_768     # numbers per slice: in float32, a slice of every array fits in 2 MiB of cache
FLUSH_EVERY = 16        # steps between flushes of tiny numbers (see flush_to_zero)


def adam_update(p, g, m, v, p_out, m_out, v_out, num_weights: int, t: int, lr: float,
                beta1: float, beta2: float, eps: float, l2: float, weight_decay: float) -> None:
    """Adam's step t on flat vectors (weights first, then biases and any batch-norm scales),
    written into p_out, m_out, v_out. The outputs may be p, m, v themselves: `train_epoch`
    updates the buffers it owns in place, which saves writing three fresh 2.3 MB arrays every
    step; `adam_step` passes fresh ones. Either way the arithmetic is the same, so the results
    are bit-identical.

    Speed: the update is memory-bound (a dozen passes over 570k numbers), so it runs slice by
    slice; every array's slice, and the two scratch slices, stay in cache between passes. (On a
    machine whose L3 cache holds the arrays whole, slicing gains nothing: see the README's
    Performance section.)
    """
    bc1, bc2 = 1.0 - beta1 ** t, 1.0 - beta2 ** t                  # the bias corrections
    step_size, eps_hat = lr * math.sqrt(bc2) / bc1, eps * math.sqrt(bc2)
    flush = t % FLUSH_EVERY == 0
    scratch = np.empty((2, min(ADAM_SLICE, p.size)), dtype=p.dtype)
    weights = (0, num_weights, l2, 1.0 - lr * weight_decay)          # L2 and AdamW: weights only
    biases = (num_weights, p.size, 0.0, 1.0)
    for lo, hi, l2_slice, shrink in (weights, biases):
        for start in range(lo, hi, ADAM_SLICE):
            s = slice(start, min(start + ADAM_SLICE, hi))
            a, b = scratch[0, :s.stop - s.start], scratch[1, :s.stop - s.start]
            _adam_slice(p[s], g[s], m[s], v[s], p_out[s], m_out[s], v_out[s], a, b,
                        beta1, beta2, step_size, eps_hat, l2_slice, shrink, flush)


def _adam_slice(p, g, m, v, p_out, m_out, v_out, a, b, beta1, beta2, step_size, eps_hat,
                l2, shrink, flush) -> None:
    """Adam's formulas on one slice. a, b: scratch. Each output is written only after the last
    read of its own input, position by position, so outputs may alias inputs. The moments are
    updated as v + (1 - beta2)(g^2 - v), which is beta2 v + (1 - beta2) g^2 rearranged to need
    no third scratch slice (and likewise m)."""
    if l2:                                       # g + l2 * p: the L2 term's gradient
        np.multiply(p, l2, out=a)
        g = np.add(a, g, out=a)
    np.square(g, out=b)                          # v + (1 - b2)(g^2 - v)
    b -= v
    b *= 1.0 - beta2
    np.add(v, b, out=v_out)
    np.subtract(g, m, out=b)                     # m + (1 - b1)(g - m)
    b *= 1.0 - beta1
    np.add(m, b, out=m_out)
    np.sqrt(v_out, out=b)                        # p - step_size * m / (sqrt(v) + eps_hat)
    b += eps_hat
    np.divide(m_out, b, out=b)
    b *= -step_size
    if shrink != 1.0:                            # AdamW: shrink * p - step_size * ...
        np.multiply(p, shrink, out=p_out)
        p_out += b
    else:
        np.add(p, b, out=p_out)
    if flush:                                    # see flush_to_zero: subnormals are slow
        flush_to_zero(p_out, root=4)
        flush_to_zero(m_out)
        flush_to_zero(v_out)


# ================================================================================================
# Training: epochs of forward -> backward -> Adam, early stopping
# ================================================================================================

EXPLODED_LOSS = 1e3    # cross-entropy this large means diverged: guessing uniformly gives ln 10 = 2.3
OnStep = Callable[[int, int, float, float], None]   # (step, steps, running loss, running accuracy)


class EpochStats(NamedTuple):
    """Running averages over an epoch's batches (with dropout on): loss and accuracy. The loss is
    the plain cross-entropy of the batches as trained on (augmented, if augmentation is on),
    without L2 and not the label-smoothed objective, so runs with and without either can be
    compared."""

    loss: float
    accuracy: float


def batches(n: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Index arrays of a fresh random permutation of range(n), batch_size at a time."""
    order = rng.permutation(n)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


def learning_rate(config: Config, step: int, steps_per_epoch: int) -> float:
    """The learning rate of Adam step `step` (1, 2, ...) under config's schedule.

    constant: config.lr throughout (the report's recipe). cosine: half a cosine wave, from
    config.lr at the first step to nearly 0 at the last step of config.epochs, lr/2 half-way:
    large steps while the network is far from a good solution, then ever smaller ones that let it
    settle into one instead of bouncing around it.
    """
    if config.lr_schedule == "constant":
        return config.lr
    progress = (step - 1) / (config.epochs * steps_per_epoch)             # 0 at the first step
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def train_epoch(params: Mapping, opt_state: AdamState, x: np.ndarray, y: np.ndarray,
                config: Config = Config(), epoch: int = 1, on_step: OnStep | None = None
                ) -> tuple[Params, AdamState, EpochStats]:
    """One pass over (x, y) in shuffled mini-batches; returns new params, new Adam state, stats.

    Every random draw of the epoch (the shuffle, each batch's augmentation and dropout masks)
    comes from `default_rng([config.seed, epoch])`, so an epoch is a pure function of its arguments.
    `on_step(step, steps, loss, accuracy)`, if given, hears the running averages after each
    batch (for a progress bar); it cannot change the result.

    Each step is forward -> backward -> Adam, exactly `adam_step` (a test checks the results are
    bit-identical) except for one thing: the parameters and moments live in three buffers that
    this function copies from its inputs once and then updates in place, step after step, rather
    than allocating three fresh 2.3 MB arrays per step. The caller's arrays are never written,
    and what is returned is read-only.
    """
    check_inputs(params, x, y)
    if len(y) == 0:
        raise ValueError("an epoch needs at least one training example, got none")
    params = Params.from_arrays(params)
    check_adam_state(opt_state, params)
    shapes, hidden, n_w = params.shapes, layer_sizes_of(params)[1:-1], params.num_weights
    p, m, v = params.flat.copy(), opt_state.m.flat.copy(), opt_state.v.flat.copy()  # ours
    # A read-only window onto p: the one Params whose values change (Adam updates p under it,
    # step after step). It never leaves this function.
    current = Params(p.view(), shapes)
    t = opt_state.step
    rng = np.random.default_rng([config.seed, epoch])
    loss_sum, correct, seen = 0.0, 0, 0
    steps = -(-len(y) // config.batch_size)                  # ceil(n / batch_size)
    for step, idx in enumerate(batches(len(y), config.batch_size, rng), start=1):
        xb = augment(x[idx], rng, config.flip, config.shift, config.cutout,
                     config.input_dropout)                    # (B, 784)
        yb = y[idx]                                           # (B,)
        masks = dropout_masks(rng, len(idx), hidden, config.dropout, p.dtype.name)
        logits, cache = forward(current, xb, masks)
        # l2=0 in backward: adam_update adds l2 W itself, bit for bit the same, while in cache
        grads = backward(current, cache, yb, smoothing=config.label_smoothing)
        t += 1
        adam_update(p, grads.flat, m, v, p_out=p, m_out=m, v_out=v, num_weights=n_w, t=t,
                    lr=learning_rate(config, t, steps), beta1=config.beta1, beta2=config.beta2,
                    eps=config.eps, l2=config.l2, weight_decay=config.weight_decay)
        batch_loss = cross_entropy(logits, yb)
        if not batch_loss < EXPLODED_LOSS:                    # also catches NaN
            raise DivergedError(f"training diverged: the loss reached {batch_loss:.4g} at epoch "
                                f"{epoch}, step {step} (a uniform guess scores 2.3); try a "
                                f"smaller learning rate (--lr, now {config.lr})")
        loss_sum += batch_loss * len(idx)
        correct += int((logits.argmax(axis=1) == yb).sum())
        seen += len(idx)
        if on_step is not None:
            on_step(step, steps, loss_sum / seen, correct / seen)
    if not np.isfinite(p).all():
        raise DivergedError(f"parameters became non-finite in epoch {epoch}; "
                            f"try a smaller learning rate (--lr, now {config.lr})")
    new_state = AdamState(t, Params(m, shapes), Params(v, shapes))
    return Params(p, shapes), new_state, EpochStats(loss_sum / len(y), correct / len(y))


class Best(NamedTuple):
    """Early-stopping memory: the best epoch so far, its count of correct validation predictions,
    and how many epochs have passed without beating it. Counts, not rounded accuracies, are
    compared, so a tie is a tie."""

    epoch: int = 0
    correct: int = -1
    waited: int = 0


def early_stopping_update(best: Best, epoch: int, correct: int) -> Best:
    """The new Best after an epoch that got `correct` validation predictions right."""
    if correct > best.correct:
        return Best(epoch, correct, 0)
    return best._replace(waited=best.waited + 1)


def should_stop(best: Best, patience: int) -> bool:
    """Stop once `patience` epochs in a row have not improved on the best (patience 0: never)."""
    return patience > 0 and best.waited >= patience


def average_params(average: Params, params: Params, decay: float) -> Params:
    """The running average of weights after one more epoch: decay * average + (1 - decay) * params,
    an exponential moving average (EMA) taken once an epoch.

    Late in training Adam's steps make the weights wander around a good solution; their average
    over the last few epochs (about 1 / (1 - decay) of them) lies nearer its centre, and can
    generalise better than any single point on the path (the idea behind Polyak averaging and
    SWA, Izmailov et al. 2018). The average is only ever evaluated: training continues from
    `params`.
    """
    check_setting("average", decay)
    if average.shapes != params.shapes:
        raise ValueError(f"average {average.shapes} does not match the parameters {params.shapes}")
    flat = np.multiply(average.flat, decay)
    flat += (1.0 - decay) * params.flat
    return params.like(flat)


class TrainState(NamedTuple):
    """Everything needed to continue training after `epoch` epochs: a run is a fold over these.

    `model` is what gets evaluated: the parameters themselves, their running average when
    config.average is on, or with batch norm the folded network (`fold_batch_norm`; before the
    first epoch, the parameters)."""

    params: Params
    opt_state: AdamState
    epoch: int
    best: Best
    best_params: Params
    model: Params


def initial_state(config: Config) -> TrainState:
    params = init_params(config.layer_sizes, config.seed, config.dtype, config.batch_norm)
    return TrainState(params, adam_init(params), 0, Best(), params, params)


def fit(splits: Splits, config: Config = Config(), state: TrainState | None = None,
        on_step: OnStep | None = None) -> Iterator[tuple[TrainState, dict]]:
    """Train epoch by epoch, yielding (state, record) after each; stops early or after config.epochs.

    A generator, so the caller decides what to print or save between epochs and can stop at will;
    `state` lets a run continue from where a saved one left off, with the same result bit for bit
    (epoch e draws its randomness from [seed, e] alone).
    """
    state = state or initial_state(config)
    while state.epoch < config.epochs and not should_stop(state.best, config.patience):
        started = time.perf_counter()
        epoch = state.epoch + 1
        params, opt_state, stats = train_epoch(state.params, state.opt_state, splits.x_train,
                                               splits.y_train, config, epoch, on_step)
        averaging = config.average and epoch > 1          # it starts at epoch 1's parameters
        model = average_params(state.model, params, config.average) if averaging else params
        if config.batch_norm:     # predict with fixed statistics (both names: see Evaluation)
            model = fold_batch_norm(params, splits.x_train[:BN_STATISTICS_IMAGES])
        val = evaluate(model, splits.x_val, splits.y_val, flip_average=config.flip_average)
        if not math.isfinite(val.loss):                   # finite weights, infinite logits
            raise DivergedError(f"training diverged: the validation loss is {val.loss} after "
                                f"epoch {epoch}; try a smaller learning rate (--lr, now "
                                f"{config.lr})")
        best = early_stopping_update(state.best, epoch, val.correct)
        best_params = model if best.epoch == epoch else state.best_params
        state = TrainState(params, opt_state, epoch, best, best_params, model)
        yield state, {"epoch": epoch, "train_loss": stats.loss, "train_accuracy": stats.accuracy,
                      "val_loss": val.loss, "val_accuracy": val.accuracy,
                      "val_correct": val.correct, "seconds": time.perf_counter() - started}


# ================================================================================================
# Evaluation: loss, accuracy, confusion matrix, per-class precision / recall / F1
# ================================================================================================

class Evaluation(NamedTuple):
    """Loss (mean cross-entropy, no L2), accuracy, number correct, and each example's prediction."""

    loss: float
    accuracy: float
    correct: int
    predictions: np.ndarray


EVAL_CHUNK = 2048   # rows per forward pass: big enough for fast GEMMs, small enough for the cache


def check_chunk(chunk: int) -> None:
    if not (_is_int(chunk) and chunk >= 1):
        raise ValueError(f"chunk (rows per pass) must be a whole number >= 1, got {chunk!r}")


def predict_logits(params: Mapping, x: np.ndarray, chunk: int = EVAL_CHUNK,
                   flip_average: bool = False) -> np.ndarray:
    """Logits (N, 10) without dropout, computed `chunk` rows at a time to bound memory.

    flip_average: ask about each image and its mirror image, and average the two predicted
    distributions (test-time augmentation: the network was trained on both). What is returned
    is then the log of the averaged probabilities, which serve as logits: their softmax is that
    average, so argmax, softmax and cross_entropy work on them unchanged.
    """
    check_inputs(params, x)
    check_chunk(chunk)
    if has_batch_norm(params):
        raise ValueError("a network with batch norm predicts through its plain equivalent: "
                         f"pass fold_batch_norm(params, x_train[:{BN_STATISTICS_IMAGES}]) (fit "
                         "does this every epoch)")
    logits = np.concatenate([_inference(params, x[i:i + chunk]) for i in range(0, len(x), chunk)]
                            or [np.empty((0, layer_sizes_of(params)[-1]), x.dtype)])
    if not flip_average:
        return _readonly(logits)
    mirrored = predict_logits(params, mirror(x), chunk)
    return _readonly(log_mean_softmax([logits, mirrored]))


def _inference(params: Mapping, x: np.ndarray) -> np.ndarray:
    """`forward(params, x)[0]` (no dropout) without building the cache that only backward needs:
    ReLU as one np.maximum in place, instead of a gate array and a multiplication. The logits
    are the same; only a zero's sign may differ (ReLU(-3) is -0.0 in forward), which no sum,
    softmax or argmax can tell apart. (A network that has blown up to -inf pre-activations
    differs too: forward's -inf * 0 is NaN, np.maximum's is 0.)"""
    L = num_layers(params)
    A = x
    for l in range(1, L):
        Z = A @ params[f"W{l}"]                               # (B, n_l)
        Z += params[f"b{l}"]
        A = np.maximum(Z, 0.0, out=Z)
    logits = A @ params[f"W{L}"]                              # (B, 10)
    logits += params[f"b{L}"]
    return logits


BN_STATISTICS_IMAGES = 10_000   # training images whose statistics replace the batch's at prediction


def fold_batch_norm(params: Mapping, x: np.ndarray, chunk: int = EVAL_CHUNK) -> Params:
    """The plain network (W and b only) that predicts as the batch-norm network `params` does,
    with each unit's mean and variance over the images x in place of a batch's.

    At prediction the statistics must not depend on which other images share the batch, so they
    are fixed: here the mean and variance of each pre-activation over x (training images, no
    dropout: the network as it will be used; "precise batch norm"). Then
        g (z - mean) / std + b = z (g / std) + (b - mean g / std)
    is linear in z, so it folds into the layer: W' = W * (g / std), column by column, and
    b' = b - mean * g / std. Layer by layer, since each layer's statistics are those of the
    network already folded below it. Everything downstream (evaluate, checkpoints, ensembles,
    predict) then sees an ordinary network.
    """
    check_inputs(params, x)
    check_chunk(chunk)
    if not has_batch_norm(params):
        raise ValueError("fold_batch_norm needs a network with batch norm (scales g1, g2, ...)")
    if len(x) == 0:
        raise ValueError("fold_batch_norm needs at least one image for the statistics")
    L, folded, dtype, n = num_layers(params), {}, params["W1"].dtype, len(x)
    A = [x[i:i + chunk] for i in range(0, n, chunk)]         # the layer's input, chunk by chunk
    for l in range(1, L):
        Z = [a @ params[f"W{l}"] for a in A]                  # (chunk, n_l) each
        mean = sum(z.sum(axis=0, dtype=np.float64) for z in Z) / n              # (n_l,)
        var = sum(np.square(z - mean).sum(axis=0) for z in Z) / n              # (n_l,)
        scale = params[f"g{l}"] / np.sqrt(var + BN_EPS)      # (n_l,)
        shift = params[f"b{l}"] - mean * scale
        folded[f"W{l}"] = (params[f"W{l}"] * scale).astype(dtype)
        folded[f"b{l}"] = shift.astype(dtype)
        A = [np.maximum(z * scale.astype(dtype) + folded[f"b{l}"], 0.0) for z in Z]
    folded[f"W{L}"], folded[f"b{L}"] = params[f"W{L}"], params[f"b{L}"]
    return Params.from_arrays(folded, dtype)


def log_mean_softmax(logits: Sequence[np.ndarray]) -> np.ndarray:
    """log of the mean of the distributions softmax(z) for z in `logits` (each (N, K)), computed
    in log space, log(sum exp(log p)) - log M with np.logaddexp (which computes
    log(e^a + e^b) as max(a, b) + log1p(e^-|a - b|)), so no probability underflows to log 0."""
    log_p = np.stack([log_softmax(z) for z in logits])               # (M, N, K)
    return np.logaddexp.reduce(log_p, axis=0) - math.log(len(log_p))


def ensemble_logits(models: Sequence[Mapping], x: np.ndarray, flip_average: bool = False,
                    chunk: int = EVAL_CHUNK) -> np.ndarray:
    """An ensemble's prediction: the mean of its members' predicted distributions, as logits
    (their log), like `predict_logits` with flip_average. Members that err differently (the
    "best" ensemble's are differently regularised) are rarely all wrong on the same image, so
    the average is wrong less often than a typical member."""
    return _readonly(log_mean_softmax([predict_logits(p, x, chunk, flip_average) for p in models]))


def class_probabilities(params: Mapping | Sequence[Mapping], images: np.ndarray, dtype: str,
                        flip_average: bool = False) -> np.ndarray:
    """uint8 images (N, 28, 28) -> class probabilities (N, 10), normalised as in training.
    `params` may also be a list of networks, an ensemble (see ensemble_logits)."""
    logits = model_logits(_members(params), normalise(images, dtype), flip_average)
    return softmax(logits.astype(np.float64))                 # (N, 10), read-only


def _members(params: Mapping | Sequence[Mapping]) -> list[Mapping]:
    """One network as a list of one; an ensemble's list as it is, refused if empty."""
    members = [params] if isinstance(params, Mapping) else list(params)
    if not members:
        raise ValueError("an ensemble needs at least one network")
    return members


def model_logits(members: Sequence[Mapping], x: np.ndarray, flip_average: bool = False,
                 chunk: int = EVAL_CHUNK) -> np.ndarray:
    """predict_logits of one network, or ensemble_logits of several."""
    return (predict_logits(members[0], x, chunk, flip_average) if len(members) == 1
            else ensemble_logits(members, x, flip_average, chunk))


def evaluate(params: Mapping | Sequence[Mapping], x: np.ndarray, y: np.ndarray,
             chunk: int = EVAL_CHUNK, flip_average: bool = False) -> Evaluation:
    """Evaluate without dropout: the network as it will be used. `params` may also be a list of
    networks, an ensemble (see ensemble_logits)."""
    members = _members(params)
    for p in members:
        check_inputs(p, x, y)
    if len(y) == 0:
        raise ValueError("cannot evaluate on zero examples")
    logits = model_logits(members, x, flip_average, chunk)
    predictions = _readonly(logits.argmax(axis=1))
    correct = int((predictions == y).sum())
    return Evaluation(cross_entropy(logits, y), correct / len(y), correct, predictions)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, k: int = NUM_CLASSES) -> np.ndarray:
    """C[i, j] = how many examples of true class i were predicted as class j."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    for name, a in (("true labels", y_true), ("predictions", y_pred)):
        if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
            raise ValueError(f"{name} must be a 1-D array of integer classes, got {a.dtype} "
                             f"{a.shape}")
        if a.size and not 0 <= a.min() <= a.max() < k:
            raise ValueError(f"{name} must be classes 0..{k - 1}, got values {a.min()}..{a.max()}")
    if y_true.shape != y_pred.shape:
        raise ValueError(f"true labels {y_true.shape} and predictions {y_pred.shape} differ in shape")
    pairs = y_true.astype(np.int64) * k + y_pred.astype(np.int64)  # (N,): no uint8 overflow,
    #                                                                   and [] (float64) counts nothing
    return _readonly(np.bincount(pairs, minlength=k * k).reshape(k, k))


class ClassMetrics(NamedTuple):
    """Per-class precision, recall, F1 (arrays of length k) and support (true count per class)."""

    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    support: np.ndarray


def per_class_metrics(confusion: np.ndarray) -> ClassMetrics:
    """precision = TP / predicted, recall = TP / actual, F1 = their harmonic mean; 0 where undefined."""
    confusion = np.asarray(confusion)
    if (confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]
            or confusion.dtype.kind not in "iu" or (confusion.size and confusion.min() < 0)):
        raise ValueError(f"a confusion matrix is a square matrix of counts (confusion_matrix "
                         f"gives one), got {confusion.dtype} {confusion.shape}")
    tp = np.diag(confusion).astype(float)
    predicted, actual = confusion.sum(axis=0), confusion.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return ClassMetrics(*map(_readonly, (precision, recall, f1, actual)))


def top_confusions(confusion: np.ndarray, n: int = 6) -> list[tuple[int, int, int, int]]:
    """The n class pairs (i, j), i < j, most often mistaken for each other, counted both ways:
    (i, j, i-predicted-as-j, j-predicted-as-i), largest total first."""
    k = len(confusion)
    pairs = [(i, j, int(confusion[i, j]), int(confusion[j, i]))
             for i in range(k) for j in range(i + 1, k)]
    pairs.sort(key=lambda p: (-(p[2] + p[3]), p[0], p[1]))
    return [p for p in pairs[:n] if p[2] + p[3] > 0]


def full_evaluation(params: Mapping | Sequence[Mapping], splits: Splits,
                    flip_average: bool = False) -> dict:
    """The final figures of a run: train (no dropout), validation and test; per-class test metrics."""
    result = {}
    for name, x, y in (("train", splits.x_train, splits.y_train), ("val", splits.x_val, splits.y_val)):
        ev = evaluate(params, x, y, flip_average=flip_average)
        result[f"{name}_loss"], result[f"{name}_accuracy"] = ev.loss, ev.accuracy
    test = evaluate(params, splits.x_test, splits.y_test, flip_average=flip_average)
    result["test_loss"], result["test_accuracy"] = test.loss, test.accuracy
    confusion = confusion_matrix(splits.y_test, test.predictions)
    metrics = per_class_metrics(confusion)
    result["per_class"] = [
        {"class": CLASS_NAMES[i], "precision": float(metrics.precision[i]),
         "recall": float(metrics.recall[i]), "f1": float(metrics.f1[i]),
         "support": int(metrics.support[i])} for i in range(NUM_CLASSES)]
    result["confusion"] = confusion.tolist()
    result["top_confusions"] = [
        {"a": CLASS_NAMES[i], "b": CLASS_NAMES[j], "a_as_b": ab, "b_as_a": ba}
        for i, j, ab, ba in top_confusions(confusion)]
    return result


# ================================================================================================
# Checkpoints and run directories: saved atomically, loaded without ever unpickling
# ================================================================================================

# Checkpoints written before train-state format 2 store l2 meaning l2 * sum ||W||^2 (see
# l2_penalty); only training reads l2, so such a checkpoint still loads and predicts the same.
CHECKPOINT_FORMAT = "fmnist-checkpoint-1"


def check_params_fit(params: Mapping, expected_sizes: Sequence[int], what: str) -> None:
    actual = layer_sizes_of(params)
    if tuple(actual) != tuple(expected_sizes):
        raise CheckpointError(f"{what}: network is {_dashed(actual)}, "
                              f"expected {_dashed(expected_sizes)}")


def save_checkpoint(path: Path, params: Mapping, config: Config, **extra: Any) -> None:
    """Parameters as named arrays plus the config as a JSON string: an .npz with no pickles.
    Only what load_checkpoint accepts is written: the plain network of the config (a batch-norm
    network folded first, see fold_batch_norm), in its dtype, all finite."""
    check_params_fit(params, config.layer_sizes, "save_checkpoint")
    if "format" in extra:                   # (config is a parameter: Python refuses it twice)
        raise ValueError("save_checkpoint: format is written by save_checkpoint itself; pass "
                         "another name for extra metadata")
    if {k: np.shape(a) for k, a in params.items()} != param_shapes(config.layer_sizes):
        raise CheckpointError(f"save_checkpoint: parameters {sorted(params)} are not a plain "
                              f"{_dashed(config.layer_sizes)} network (fold batch norm first)")
    for name, a in params.items():
        if np.asarray(a).dtype != np.dtype(config.dtype) or not np.isfinite(a).all():
            raise CheckpointError(f"save_checkpoint: {name} is {np.asarray(a).dtype}"
                                  f"{'' if np.isfinite(a).all() else ' with non-finite values'}"
                                  f"; the config says finite {config.dtype}")
    meta = json.dumps({"format": CHECKPOINT_FORMAT, "config": config.to_json(), **extra})
    arrays = {k: np.asarray(a) for k, a in params.items()} | {"meta": np.array(meta)}
    atomic_write(path, lambda f: np.savez(f, **arrays))


MAX_META_BYTES = 16 * 2**20   # a run's JSON metadata (config, history) is kilobytes


def _read_npz(path: Path, expected_format: str) -> tuple[dict[str, np.ndarray], dict]:
    """The arrays and the JSON metadata of an .npz we wrote; never unpickles anything, and
    reads the metadata first, so no array larger than its config allows is ever decompressed."""
    try:
        with open(path, "rb") as f:
            signature = f.read(4)
        if signature != b"PK\x03\x04":          # np.load would take anything else for a pickle
            what = "empty file" if not signature else "no zip signature"
            raise CheckpointError(f"{path}: not a readable .npz file ({what})")
        with np.load(path, allow_pickle=False) as npz:
            sizes = {i.filename.removesuffix(".npy"): i.file_size for i in npz.zip.infolist()}
            if sizes.get("meta", 0) > MAX_META_BYTES:
                raise CheckpointError(f"{path}: refused: its metadata takes {sizes['meta']:,} "
                                      f"bytes (at most {MAX_META_BYTES:,})")
            meta = _parse_meta(path, npz["meta"] if "meta" in sizes else None, expected_format)
            _check_sizes(path, {k: n for k, n in sizes.items() if k != "meta"}, meta["config"])
            arrays = {k: npz[k] for k in npz.files if k != "meta"}
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory, not a file") from None
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise CheckpointError(f"{path}: refused: it holds a pickled object array, "
                                  f"which could run code when loaded") from None
        raise CheckpointError(f"{path}: not a readable .npz file ({e})") from None
    except CheckpointError:
        raise
    except Exception as e:  # zipfile.BadZipFile, OSError, EOFError, ...
        raise CheckpointError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    return arrays, meta


def _parse_meta(path: Path, raw: np.ndarray | None, expected_format: str) -> dict:
    """The JSON metadata of an .npz, its format checked and its config a Config."""
    try:
        if raw is None:
            raise KeyError("meta")
        meta = json.loads(str(raw[()]))
        found = meta.get("format")
        if found in RETIRED_FORMATS:
            raise CheckpointError(f"{path}: written by an earlier fmnist ({found}: "
                                  f"{RETIRED_FORMATS[found]}), which this version cannot resume; "
                                  f"train the run again")
        if found == STATE_FORMAT and expected_format == CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path}: a training state (for train --resume), not a "
                                  f"model; give the run's best.npz, or its directory")
        if found != expected_format:
            raise ValueError(f"format {found!r}, expected {expected_format!r}")
        meta["config"] = Config.from_json(meta["config"])
    except (KeyError, ValueError, TypeError, AttributeError, RecursionError) as e:
        raise CheckpointError(f"{path}: not an fmnist file of this kind (bad or missing "
                              f"metadata: {e})") from None
    return meta


def _check_sizes(path: Path, sizes: Mapping[str, int], config: Config) -> None:
    """Refuse arrays that the config cannot account for, by the sizes the zip declares, before
    any is decompressed: at most five vectors of every parameter in float64 (a training state
    holds five), so a small hostile file cannot unpack into gigabytes."""
    largest = 8 * num_parameters(param_shapes(config.layer_sizes, batch_norm=True)) + 4096
    if sum(sizes.values()) > len(STATE_ARRAYS + ("model",)) * largest:
        raise CheckpointError(f"{path}: refused: its arrays take {sum(sizes.values()):,} bytes, "
                              f"more than a {_dashed(config.layer_sizes)} network's parameters")


def _check_array(path: Path | str, name: str, a: np.ndarray, shape: tuple, config: Config) -> None:
    if a.shape != shape:
        raise CheckpointError(f"{path}: {name} has shape {a.shape}, but its config "
                              f"(hidden {list(config.hidden)}) needs {shape}")
    if a.dtype != np.dtype(config.dtype):
        raise CheckpointError(f"{path}: {name} has dtype {a.dtype}, config says {config.dtype}")
    if not np.isfinite(a).all():
        raise CheckpointError(f"{path}: {name} holds NaN or infinite values")


def load_checkpoint(path: str | Path) -> tuple[Params, Config, dict]:
    """Load (params, config, meta), validating names, shapes, dtypes and finiteness against the config."""
    path = Path(path)
    arrays, meta = _read_npz(path, CHECKPOINT_FORMAT)
    config = meta["config"]
    expected = param_shapes(config.layer_sizes)
    if set(arrays) != set(expected):
        described = _dashed(config.layer_sizes)
        try:
            sizes = layer_sizes_of(arrays)
            held = f"a {_dashed(sizes)} network"
        except (KeyError, IndexError, ValueError):
            sizes, held = None, f"arrays {sorted(arrays)}"
        problem = (f"its arrays are not those of its config's {described} network"
                   if sizes == config.layer_sizes else
                   f"holds {held}, but its config describes {described}")
        differs = [f"{what} {', '.join(sorted(names))}" for what, names in
                   (("unexpected", set(arrays) - set(expected)),
                    ("missing", set(expected) - set(arrays))) if names]
        raise CheckpointError(f"{path}: {problem}: {'; '.join(differs)}")
    for name, shape in expected.items():
        _check_array(path, name, arrays[name], shape, config)
    return Params.from_arrays({k: arrays[k] for k in expected}, config.dtype), config, meta


STATE_FORMAT = "fmnist-train-state-2"
RETIRED_FORMATS = {"fmnist-train-state-1": "its L2 term was l2 * sum ||W||^2, now half that"}
STATE_ARRAYS = ("params", "m", "v", "best_params")   # and "model" when it is not params
TRAINED_ARRAYS = ("params", "m", "v")                 # the others are plain networks (no g)


def state_arrays(config: Config) -> tuple[str, ...]:
    return STATE_ARRAYS + ("model",) * bool(config.average or config.batch_norm)


def save_state(path: Path, state: TrainState, config: Config, history: list[dict]) -> None:
    """Everything `train --resume` needs, in one file (so it can never be half old, half new):
    the flat vectors of parameters, Adam's moments and the best parameters, plus JSON metadata.
    Only what load_state accepts is written (it runs the same checks first): a batch-norm state
    before its first epoch, say, has no folded network yet and is refused."""
    meta = {"format": STATE_FORMAT, "config": config.to_json(), "step": state.opt_state.step,
            "epoch": state.epoch, "best": list(state.best), "history": history}
    flats = {"params": state.params.flat, "m": state.opt_state.m.flat, "v": state.opt_state.v.flat,
             "best_params": state.best_params.flat, "model": state.model.flat}
    arrays = {name: flats[name] for name in state_arrays(config)}
    _state_from(arrays, meta | {"config": config}, "save_state")
    meta_json = np.array(json.dumps(meta, allow_nan=False))
    atomic_write(path, lambda f: np.savez(f, **arrays, meta=meta_json))


def load_state(path: str | Path) -> tuple[TrainState, Config, list[dict]]:
    """Read back what save_state wrote, validated against its config."""
    path = Path(path)
    arrays, meta = _read_npz(path, STATE_FORMAT)
    return _state_from(arrays, meta, path), meta["config"], meta["history"]


def _state_from(arrays: Mapping[str, np.ndarray], meta: Mapping, where: Path | str) -> TrainState:
    """The TrainState that a state file's arrays and metadata describe, or CheckpointError
    naming `where` when they do not fit their config or one another."""
    config = meta["config"]
    trained = param_shapes(config.layer_sizes, config.batch_norm)
    plain = param_shapes(config.layer_sizes)
    names = state_arrays(config)
    if set(arrays) != set(names):
        raise CheckpointError(f"{where}: holds arrays {sorted(arrays)}, expected {list(names)}")
    shapes = {name: trained if name in TRAINED_ARRAYS else plain for name in names}
    for name in names:
        _check_array(where, name, arrays[name], (num_parameters(shapes[name]),), config)
    params, m, v, best_params, *average = (Params(arrays[k].copy(), shapes[k]) for k in names)
    try:
        best, step, epoch, history = Best(*meta["best"]), meta["step"], meta["epoch"], meta["history"]
        if not (all(_is_int(n) for n in (*best, step, epoch)) and 0 <= best.epoch <= epoch
                and 0 <= step and -1 <= best.correct <= config.val_size and best.waited >= 0
                and isinstance(history, list) and len(history) == epoch):
            raise ValueError(f"step {step!r}, epoch {epoch!r}, best {list(best)!r} and "
                             f"{len(history) if isinstance(history, list) else 'no'} history "
                             f"records do not fit together")
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: incomplete training state ({e})") from None
    model = average[0] if average else params
    return TrainState(params, AdamState(step, m, v), epoch, best, best_params, model)


# ================================================================================================
# Reporting: the lines and tables a run prints
# ================================================================================================

def format_epoch(r: Mapping) -> str:
    return (f"epoch {r['epoch']:3d}  train loss {r['train_loss']:.4f} acc {r['train_accuracy']:.2%}"
            f"  val loss {r['val_loss']:.4f} acc {r['val_accuracy']:.2%}  {r['seconds']:.1f}s")


def format_results(m: Mapping) -> str:
    """The end-of-run summary: overall figures, per-class table (report Table 1), major confusions."""
    lines = []
    if "best_epoch" in m:
        lines.append(f"best epoch: {m['best_epoch']} (validation accuracy {m['val_accuracy']:.2%})")
    lines += [f"train (no dropout): loss {m['train_loss']:.4f}  accuracy {m['train_accuracy']:.2%}",
              f"validation:         loss {m['val_loss']:.4f}  accuracy {m['val_accuracy']:.2%}",
              f"test:               loss {m['test_loss']:.4f}  accuracy {m['test_accuracy']:.2%}",
              "", f"{'class':<12} {'precision':>9} {'recall':>7} {'F1':>6} {'support':>8}"]
    for c in m["per_class"]:
        lines.append(f"{c['class']:<12} {c['precision']:9.3f} {c['recall']:7.3f} {c['f1']:6.3f} "
                     f"{c['support']:8d}")
    lines += ["", "largest confusions (test, counted both ways):"]
    for c in m["top_confusions"]:
        lines.append(f"  {c['a']:>11} <-> {c['b']:<11} {c['a_as_b'] + c['b_as_a']:4d}"
                     f"  ({c['a_as_b']} as {c['b']}, {c['b_as_a']} as {c['a']})")
    if "train_seconds" in m:
        lines += ["", f"training time: {m['train_seconds']:.1f}s"]
    return "\n".join(lines)


# ================================================================================================
# Pictures and report: curves.png, confusion.png, mistakes.png and report.md in a run directory
# ================================================================================================

PICTURES = ("curves.png", "confusion.png", "mistakes.png")


def write_run_artifacts(run_dir: str | Path, data_dir: str | Path = "data") -> list[Path]:
    """The three pictures (if matplotlib is installed) and report.md, from the files of a finished
    run; returns the paths written. `train` calls it at the end; `report RUN_DIR` calls it again."""
    run_dir = Path(run_dir)
    pictures = write_pictures(run_dir, data_dir)
    return [*pictures, write_report(run_dir)]


def read_run(run_dir: Path) -> tuple[dict, list, dict]:
    """config.json, history.json and metrics.json of a finished run, with one clear error if not."""
    loaded = []
    for name in ("config.json", "history.json", "metrics.json"):
        try:
            loaded.append(json.loads((run_dir / name).read_text()))
        except FileNotFoundError:
            raise CheckpointError(f"{run_dir}: no {name}; is this the directory of a finished "
                                  f"`train` run?") from None
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{run_dir / name}: cannot be read ({e})") from None
    return tuple(loaded)


def write_pictures(run_dir: Path, data_dir: str | Path = "data") -> list[Path]:
    """Draw the three pictures of a finished run; with no matplotlib, say so in one line and skip."""
    try:
        import matplotlib  # noqa: F401  (only to ask whether it is there)
    except ImportError:
        print("note: matplotlib is not installed, so no pictures were drawn "
              "(pip install 'fmnist[plots]')", file=sys.stderr)
        return []
    _, history, metrics = read_run(run_dir)
    params, config, _ = load_checkpoint(run_dir / "best.npz")
    images, labels = load_test_set(data_dir)
    probs = class_probabilities(params, images, config.dtype, config.flip_average)  # (10000, 10)
    confusion = np.asarray(metrics["confusion"])                      # (10, 10), from the run
    pairs = [(a, b) for a, b, *_ in top_confusions(confusion, n=4)]
    paths = [run_dir / name for name in PICTURES]
    _save_figure(plot_curves(history, metrics["best_epoch"], f"train ({_train_figures(config)})"),
                 paths[0])
    _save_figure(plot_confusion(confusion), paths[1])
    _save_figure(plot_mistakes(images, labels, probs, pairs), paths[2])
    return paths


def _figure(width: float, height: float) -> Any:
    """A matplotlib Figure on the headless Agg canvas, made without pyplot: no window, no global
    backend switch, so it works on a server and leaves a notebook that imported fmnist alone."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_figure(fig: Any, path: Path) -> None:
    atomic_write(path, lambda f: fig.savefig(f, format="png"))


def plot_curves(history: Sequence[Mapping], best_epoch: int,
                train_label: str = "train (running mean, dropout on)") -> Any:
    """Loss and accuracy per epoch, train and validation side by side, the kept epoch marked.

    The train figures are running means over each epoch as trained (with dropout on and
    augmented images, when the run uses them), which is why early on they can be worse than
    validation's: the legend says so (`_train_figures`), so nobody reads it as a bug.
    """
    from matplotlib.ticker import MaxNLocator, PercentFormatter
    epochs = [r["epoch"] for r in history]
    fig = _figure(11, 4.2)
    for ax, key, label in zip(fig.subplots(1, 2), ("loss", "accuracy"),
                              ("cross-entropy loss", "accuracy")):
        ax.plot(epochs, [r[f"train_{key}"] for r in history], "o-", ms=3,
                label=train_label)
        val = [r[f"val_{key}"] for r in history]
        ax.plot(epochs, val, "o-", ms=3, label="validation")
        ax.axvline(best_epoch, color="0.4", ls="--", lw=1,
                   label=f"best epoch ({best_epoch}), the one kept")
        if best_epoch in epochs:
            ax.plot(best_epoch, val[epochs.index(best_epoch)], "*", ms=14, color="C1")
        ax.set(xlabel="epoch", ylabel=label, title=f"{label} per epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.margins(x=0.04)
        if key == "accuracy":
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Training curves: the best epoch is chosen by validation accuracy")
    return fig


def plot_confusion(confusion: np.ndarray) -> Any:
    """The test confusion matrix with every count written in its cell.

    Colours are on a log scale: on a linear one the diagonal (~900) washes out the confusions
    (10-150) that the picture is for. Empty cells stay white, their zeros grey.
    """
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm
    k = len(confusion)
    fig = _figure(8.4, 7.4)
    ax = fig.subplots()
    cmap, norm = colormaps["Blues"], LogNorm(vmin=0.7, vmax=max(2, confusion.max()))
    image = ax.imshow(np.ma.masked_equal(confusion, 0), cmap=cmap, norm=norm)   # zeros masked
    for i in range(k):
        for j in range(k):
            r, g, b, _ = cmap(norm(max(confusion[i, j], 0.7)))
            dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.55               # the cell's luminance
            ax.text(j, i, str(confusion[i, j]), ha="center", va="center", fontsize=9,
                    color="white" if dark else ("0.6" if confusion[i, j] == 0 else "black"))
    ax.set_xticks(range(k), CLASS_NAMES[:k], rotation=40, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(k), CLASS_NAMES[:k])
    accuracy = np.trace(confusion) / max(1, confusion.sum())
    ax.set(xlabel="predicted class", ylabel="true class",
           title=f"Test confusion matrix ({confusion.sum():,} images, {accuracy:.2%} correct)")
    fig.colorbar(image, ax=ax, shrink=0.8, label="images (log scale)")
    return fig


def choose_mistakes(labels: np.ndarray, probs: np.ndarray, pairs: Sequence[tuple[int, int]],
                    per_direction: int = 3) -> list[list[int]]:
    """For each class pair (a, b), the indices of the most confident mistakes both ways: up to
    `per_direction` images of a predicted as b, then of b predicted as a. The most confident
    mistakes are the instructive ones: the network was sure, and wrong."""
    predicted, confidence = probs.argmax(axis=1), probs.max(axis=1)    # (N,), (N,)
    rows = []
    for a, b in pairs:
        row = []
        for true, guess in ((a, b), (b, a)):
            idx = np.flatnonzero((labels == true) & (predicted == guess))
            row.append(idx[np.argsort(-confidence[idx], kind="stable")][:per_direction].tolist())
        rows.append(row)
    return rows


def plot_mistakes(images: np.ndarray, labels: np.ndarray, probs: np.ndarray,
                  pairs: Sequence[tuple[int, int]], per_direction: int = 3) -> Any:
    """A grid of misclassified test images, one row per confused pair of classes (the run's
    largest confusions, as in the report), each titled with true class, prediction, confidence."""
    rows = choose_mistakes(labels, probs, pairs, per_direction)
    cols = 2 * per_direction
    fig = _figure(1.75 * cols + 0.6, 2.4 * max(1, len(rows)) + 0.7)
    if not rows:
        fig.text(0.5, 0.5, "no misclassified test images", ha="center")
        return fig
    fig.get_layout_engine().set(h_pad=0.15)                             # air between the rows
    axes = fig.subplots(len(rows), cols, squeeze=False)                 # (rows, cols)
    for r, ((a, b), (a_as_b, b_as_a)) in enumerate(zip(pairs, rows)):
        gap = [None] * per_direction
        for c, index in enumerate([*(a_as_b + gap)[:per_direction], *(b_as_a + gap)[:per_direction]]):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if index is None:
                ax.set_frame_on(False)
                continue
            ax.imshow(images[index], cmap="gray", vmin=0, vmax=255)
            guess = int(probs[index].argmax())
            percent = math.floor(probs[index, guess] * 1000) / 10     # 0.9996 is 99.9%, not 100%
            ax.set_title(f"true: {CLASS_NAMES[labels[index]]}\npred: {CLASS_NAMES[guess]} "
                         f"{percent:.1f}%", fontsize=8.5)
            ax.set_xlabel(f"#{index}", fontsize=8)
        axes[r, 0].set_ylabel(f"{CLASS_NAMES[a]}\n\u2194\n{CLASS_NAMES[b]}", fontsize=10,
                              fontweight="bold")
    fig.suptitle("The most confident test mistakes of the most confused pairs of classes\n"
                 "(under each image its test index, for predict --test-index N)")
    return fig


def write_report(run_dir: str | Path) -> Path:
    """Write RUN_DIR/report.md from config.json, history.json, metrics.json and whichever of the
    three pictures exist; return its path. Markdown, so it reads on GitHub and in any editor."""
    run_dir = Path(run_dir)
    config, history, metrics = read_run(run_dir)
    pictures = [name for name in PICTURES if (run_dir / name).is_file()]
    text = report_markdown(Config.from_json(config), history, metrics, pictures)
    path = run_dir / "report.md"
    atomic_write(path, lambda f: f.write(text.encode()))
    return path


def report_markdown(config: Config, history: Sequence[Mapping], metrics: Mapping,
                    pictures: Sequence[str] = ()) -> str:
    """The run's report, section by section in the order of the seed report (sections 2-5 keep
    its numbers, so the two can be read side by side), every figure taken from this run."""
    m, last = metrics, history[-1]
    train_size = config.train_size
    stopped = (f"Early stopping triggered after epoch {m['epochs_run']}" if m.get("stopped_early")
               else f"Early stopping did not trigger ({m['epochs_run']} epochs run)" if config.patience
               else f"{m['epochs_run']} epochs run")
    per_class = sorted(m["per_class"], key=lambda c: -c["f1"])
    seconds = m.get("train_seconds")
    lines = [
        "# Fashion-MNIST MLP from scratch in NumPy: run report", "",
        f"Generated by fmnist {__version__} from this run directory's `config.json`, "
        f"`history.json` and `metrics.json`; regenerate with `python fmnist.py report RUN_DIR`.", "",
        "## 1 Summary", "",
        f"A {_arrow(config.layer_sizes)} multi-layer perceptron trained with {_method(config)} "
        f"reached **{m['test_accuracy']:.2%}** test accuracy (test loss {m['test_loss']:.4f}), "
        f"keeping the parameters of epoch {m['best_epoch']} of {m['epochs_run']}. "
        f"(The seed report's default recipe reached 89.01% and 0.328.)", "",
        "## 2 Dataset and Preprocessing", "",
        "### 2.1 Dataset", "",
        "- **Name:** Fashion-MNIST",
        "- **Source:** Zalando's official IDX files (those torchvision downloads), SHA-256 verified",
        "- **Total samples:** 70,000 (60,000 official training images, 10,000 test images)",
        "- **Image size:** 28 x 28 grayscale", f"- **Flattened dimension:** {NUM_INPUTS}", "",
        "### 2.2 Train / Validation / Test Split", "",
        f"- Training set: {train_size:,} samples"
        + (f" (the first {config.limit:,} of the {TRAIN_IMAGES - config.val_size:,}, `--limit`)"
           if config.limit else ""),
        f"- Validation set: {config.val_size:,} samples", "- Test set: 10,000 samples", "",
        f"Split seed: {config.split_seed} (a permutation of the 60,000 official training images; "
        f"the test images are only used for the final evaluation).", "",
        "### 2.3 Preprocessing", "",
        f"- Images flattened to {NUM_INPUTS}-dimensional vectors",
        f"- Pixels scaled to [0, 1], then normalised with mean {MEAN} and standard deviation {STD}",
        f"- {_augmentation_text(config)}", "",
        "## 3 Model Architecture", "",
        "### 3.1 Network Structure", "", f"{_arrow(config.layer_sizes)}", "",
        "- Hidden activations: ReLU", "- Output: softmax (stable: log-sum-exp)",
        f"- Dropout rate: {config.dropout} (hidden layers, training only)",
        f"- Parameters: {num_parameters(param_shapes(config.layer_sizes, config.batch_norm)):,} "
        f"({config.dtype})", *(["- Batch normalisation before each ReLU"] * config.batch_norm), "",
        "### 3.2 Initialization", "", "- He initialization for hidden layers",
        "- Xavier initialization for the output layer", f"- Seed: {config.seed}", "",
        "## 4 Training Procedure", "",
        "### 4.1 Optimization", "",
        "- Optimizer: " + (f"AdamW (decoupled weight decay {config.weight_decay})"
                           if config.weight_decay else "Adam"),
        f"- Learning rate: {config.lr}"
        + (" with cosine decay to 0 over the epochs" if config.lr_schedule == "cosine" else ""),
        f"- beta1 = {config.beta1}, beta2 = {config.beta2}, epsilon = {config.eps}",
        f"- L2 regularization: lambda = {config.l2} (penalty (lambda/2) sum ||W||^2)",
        f"- Batch size: {config.batch_size}",
        f"- Maximum epochs: {config.epochs}",
        f"- Early stopping patience: {config.patience} (based on validation accuracy)"
        if config.patience else "- Early stopping: off (the best epoch is still the one kept)",
        *([f"- Label smoothing: {config.label_smoothing}"] if config.label_smoothing else []),
        *([f"- Evaluated: running average of the weights, decay {config.average} per epoch"]
          if config.average else []),
        "",
        f"{stopped}. The best validation accuracy occurred at epoch {m['best_epoch']}.", "",
        "### 4.2 Training Results", "",
        f"- Final training loss: {last['train_loss']:.4f}, accuracy {last['train_accuracy']:.2%} "
        f"(epoch {last['epoch']}; {_train_figures(config)})",
        f"- Final validation loss: {last['val_loss']:.4f}, accuracy {last['val_accuracy']:.2%} "
        f"(epoch {last['epoch']})",
        f"- Best checkpoint: epoch {m['best_epoch']} (validation accuracy {m['val_accuracy']:.2%}, "
        f"loss {m['val_loss']:.4f})",
        f"- Best checkpoint on the training set, dropout off: loss {m['train_loss']:.4f}, "
        f"accuracy {m['train_accuracy']:.2%}",
        f"- Training time: {_duration(seconds)}" + (
            f" ({seconds / max(1, m['epochs_run']):.1f} s per epoch, CPU)" if seconds else ""), "",
    ]
    lines += _picture("curves.png", "Loss and accuracy per epoch", pictures)
    lines += [
        "## 5 Test Set Evaluation", "",
        "### 5.1 Overall Performance", "",
        f"- Test Accuracy: **{m['test_accuracy']:.2%}**", f"- Test Loss: **{m['test_loss']:.4f}**",
        *(["- Each prediction averages the image's and its mirror image's predicted distributions"]
          if config.flip_average else []), "",
        "### 5.2 Per-Class Metrics", "",
        "| Class | Precision | Recall | F1 Score | Support |", "|---|---:|---:|---:|---:|",
        *(f"| {c['class']} | {c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} | "
          f"{c['support']:,} |" for c in m["per_class"]), "",
        "Table 1: Per-Class Precision, Recall, and F1 Scores (Test Set)", "",
        "### 5.3 Observations", "",
        "- Strongest classes (highest F1): "
        + ", ".join(f"{c['class']} ({c['f1']:.3f})" for c in per_class[:4]),
        "- Weakest classes (lowest F1): "
        + ", ".join(f"{c['class']} ({c['f1']:.3f})" for c in per_class[::-1][:3]),
        "- Major confusions (test set, counted both ways):",
        *(f"  - {c['a']} <-> {c['b']}: {c['a_as_b'] + c['b_as_a']} ({c['a_as_b']} {c['a']} "
          f"predicted as {c['b']}, {c['b_as_a']} {c['b']} predicted as {c['a']})"
          for c in m["top_confusions"]), "",
    ]
    lines += _picture("confusion.png", "Test confusion matrix", pictures)
    lines += _picture("mistakes.png", "The most confident mistakes of the most confused pairs",
                      pictures)
    if not pictures:
        lines += ["(No pictures: matplotlib was not installed when this report was written; "
                  "`pip install 'fmnist[plots]'`, then `python fmnist.py report RUN_DIR`.)", ""]
    lines += ["## Reproduce", "", "```sh", _train_command(config), "```", ""]
    return "\n".join(lines)


def _method(config: Config) -> str:
    """How the run trained, in a few words: 'Adam, dropout and L2' for the report's recipe."""
    parts = ["AdamW" if config.weight_decay else "Adam"]
    parts += [text for on, text in ((config.dropout, "dropout"), (config.l2, "L2"),
                                    (config.batch_norm, "batch normalisation"),
                                    (_augmented(config), "augmented images")) if on]
    return ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]


def _train_figures(config: Config) -> str:
    """What the per-epoch train loss and accuracy are: means over the epoch's batches as they
    were trained on."""
    return ", ".join(["running mean over the epoch", *(["dropout on"] * bool(config.dropout)),
                      *(["augmented images"] * _augmented(config))])


def _augmented(config: Config) -> bool:
    return bool(config.flip or config.shift or config.cutout or config.input_dropout)


def _augmentation_text(config: Config) -> str:
    parts = [text for on, text in (
        (config.flip, f"random horizontal flips (p = {config.flip})"),
        (config.shift, f"random shifts of up to {config.shift} px"),
        (config.cutout, f"a random {config.cutout} x {config.cutout} px square blacked out"),
        (config.input_dropout, f"dropout {config.input_dropout} on the input pixels")) if on]
    return "Training augmentation: " + ", ".join(parts) if parts else "No data augmentation"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "not recorded"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)} min {rest:.0f} s" if minutes else f"{seconds:.1f} s"


def _picture(name: str, caption: str, pictures: Sequence[str]) -> list[str]:
    """A Markdown image line by relative path, so the report still shows them after a move."""
    return [f"![{caption}]({name})", "", f"*{caption}.*", ""] if name in pictures else []


def _train_command(config: Config) -> str:
    """The `train` command line that repeats this run: the nearest recipe, then flags only
    where the run left that recipe's values."""
    commands = []
    for recipe, base in RECIPES.items():
        flags = [] if recipe == "report" else [f"--recipe {recipe}"]
        for field in dataclasses.fields(Config):
            value, flag = getattr(config, field.name), "--" + field.name.replace("_", "-")
            if value == getattr(base, field.name) or field.name == "val_size":  # no flag for it
                continue
            if isinstance(value, bool):
                flags.append(flag if value else f"--no-{flag[2:]}")
            else:
                flags.append(f"{flag} {_flag_value(value)}")
        commands.append(" ".join(["python fmnist.py train", *flags]))
    return min(commands, key=len)


# ================================================================================================
# Predict: ask a trained network about an image file or a test-set image
# ================================================================================================

MAX_IMAGE_PIXELS = 50_000_000  # a 50-megapixel photo decodes in ~200 MB; larger ones are refused unread
WORKING_SIDE = 1024            # images are shrunk to this first: plenty for a 28 x 28 result
TRIM_LEVEL = 0.05 * 255        # Zalando trimmed edges within 5% of the background's colour


def read_image(path: str | Path, invert: bool = False) -> np.ndarray:
    """An image file (PNG, JPEG, anything Pillow reads) -> (H, W) uint8 grayscale with the object
    lighter than the background, as in Fashion-MNIST.

    The rule: the picture is taken as it is (light object, dark background) unless `invert`, for
    a dark object photographed on a light background. Transparent pixels become background.
    The size is checked from the header before any pixel is decoded, so memory stays bounded.
    """
    import warnings
    Image, ImageOps = _pillow()
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ImageError(f"{path}: cannot be opened ({e.strerror})") from None
    if path.is_dir():
        raise ImageError(f"{path}: a directory, not an image file")
    if size == 0:
        raise ImageError(f"{path}: empty file, not an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > MAX_IMAGE_PIXELS:
                    raise ImageError(f"{path}: {img.width} x {img.height} pixels is too large "
                                     f"(limit {MAX_IMAGE_PIXELS:,} pixels); shrink it first")
                img.draft(img.mode, (WORKING_SIDE, WORKING_SIDE))   # JPEG: decode at 1/2..1/8 scale
                img = ImageOps.exif_transpose(img)                  # phone photos: upright
                if _sixteen_bit(img):                 # convert would clip it at 255
                    img = Image.fromarray(np.rint(np.asarray(img) / 257.0).clip(0, 255)
                                          .astype(np.uint8))
                img = img.convert("RGBA")
                img.thumbnail((WORKING_SIDE, WORKING_SIDE))
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"{path}: too large to decode safely ({e})") from None
    except Exception as e:        # UnidentifiedImageError, truncated data, a decoder's complaint
        raise ImageError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
    background = Image.new("RGBA", img.size, (255, 255, 255, 255) if invert else (0, 0, 0, 255))
    gray = np.asarray(Image.alpha_composite(background, img).convert("L"))   # (H, W) uint8
    return _readonly(255 - gray) if invert else gray


def _pillow() -> tuple[Any, Any]:
    """Pillow's Image and ImageOps modules, or one line saying how to install them."""
    try:
        from PIL import Image, ImageOps
    except ImportError:
        raise ImageError("reading image files needs Pillow: pip install 'fmnist[predict]'") from None
    return Image, ImageOps


def _sixteen_bit(img: Any) -> bool:
    """A 16-bit grey image (a 16-bit PNG: Pillow's I;16 modes, or mode I holding values above
    255); an I image of 8-bit values (some TIFFs) reads as it is."""
    return img.mode.startswith("I;16") or (img.mode == "I" and np.asarray(img).max() > 255)


def _border(gray: np.ndarray) -> np.ndarray:
    """The outermost pixels of an (H, W) image: first and last rows, first and last columns."""
    return np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])


def to_fashion_mnist(gray: np.ndarray) -> np.ndarray:
    """(H, W) uint8, object lighter than background -> (28, 28) uint8 made the way Zalando made
    Fashion-MNIST: background to 0, edges trimmed, longest side fitted to 28, the other centred.

    The background is the median of the border pixels; the object's brightest pixel becomes 255,
    as in nearly all Fashion-MNIST images. The spare pixel of an odd margin goes above and to the
    left, as in the dataset, so most Fashion-MNIST images come back unchanged: 7,996 of the
    10,000 test images exactly, 9,024 within 10 grey levels. The others lose faint pixels (at
    most TRIM_LEVEL above the background) outside the object's box, or span fewer than 28 pixels
    in their longer direction and are stretched to 28. A picture with no pixel more than
    TRIM_LEVEL lighter than its border holds no object: ValueError, rather than a confident
    answer about a blank square.
    """
    from PIL import Image
    border = _border(gray)
    x = np.clip(gray.astype(np.float32) - np.median(border), 0, None)     # (H, W), background 0
    rows = np.flatnonzero((x > TRIM_LEVEL).any(axis=1))
    cols = np.flatnonzero((x > TRIM_LEVEL).any(axis=0))
    if not rows.size:
        raise ValueError("no object found: nothing in the picture is lighter than its border")
    x = x[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]                     # (h, w), the object
    x *= 255.0 / x.max()
    h, w = x.shape
    scale = IMAGE_SHAPE[0] / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))            # (width, height) <= 28
    small = np.asarray(Image.fromarray(x).resize(size, Image.Resampling.LANCZOS))
    out = np.zeros(IMAGE_SHAPE, np.uint8)                                  # (28, 28)
    top, left = (IMAGE_SHAPE[0] - size[1] + 1) // 2, (IMAGE_SHAPE[1] - size[0] + 1) // 2
    out[top:top + size[1], left:left + size[0]] = np.clip(np.rint(small), 0, 255)
    return _readonly(out)


def looks_inverted(gray: np.ndarray) -> bool:
    """True when the border is mostly light: probably a dark object on a light background."""
    return bool(np.median(_border(gray)) > 127)


def top_k(probs: np.ndarray, k: int = 3) -> list[dict]:
    """The k most probable classes of one probability vector (10,), most probable first."""
    order = np.argsort(-probs, kind="stable")[:k]
    return [{"class": CLASS_NAMES[i], "label": int(i), "probability": float(probs[i])} for i in order]


# ================================================================================================
# Command line
# ================================================================================================

def run_train(args: argparse.Namespace, config: Config) -> int:
    """`train`: fit, saving the full state every epoch, then evaluate and write the run directory."""
    out, state, history, config = _check_run_dir(args, config)
    splits = make_splits(load_fashion_mnist(args.data_dir), config)
    if state is None:
        out = _start_run_dir(out, args, "config.json", config.to_json())
    n = len(splits.y_train)
    print(f"{'resuming' if state else 'training'} {_dashed(config.layer_sizes)} on "
          f"{n:,} image{'s' * (n != 1)} ({len(splits.y_val):,} validation), {config.dtype}"
          f"{f' after epoch {state.epoch}' if state else ''}; run directory {out}", flush=True)
    progress = _progress_bar(args.quiet, first_epoch=state.epoch + 1 if state else 1)
    saved = state.epoch if state else 0                       # the epoch state.npz holds
    try:
        for state, record in fit(splits, config, state, progress):
            history.append(record)
            if state.best.epoch == state.epoch:
                save_checkpoint(out / "best.npz", state.best_params, config, epoch=state.epoch)
            save_state(out / "state.npz", state, config, history)
            saved = state.epoch
            write_json(out / "history.json", history)
            print(format_epoch(record), flush=True)
    except KeyboardInterrupt:
        _drop_unsaved_best(out)
        if args.member:                                      # the ensemble says how to go on
            print(f"\ninterrupted {f'after epoch {saved}' if saved else 'before epoch 1'} was "
                  f"saved", file=sys.stderr)
        elif saved:
            print(f"\ninterrupted; {_resume_hint(out, saved)}", file=sys.stderr)
        else:
            print("\ninterrupted before the first epoch was saved; nothing to resume "
                  "(run the same command again)", file=sys.stderr)
        return 130
    except OSError as e:              # a full disk: state.npz, written atomically, is still whole
        _drop_unsaved_best(out)
        go_on = f"; {_resume_hint(out, saved)}" if saved and not args.member else ""
        raise _write_failed(e, out, go_on) from None
    except DivergedError as e:
        best = out / "best.npz"
        kept = f"; the best checkpoint so far is intact at {best}" if best.exists() else ""
        raise DivergedError(f"{e}{kept}") from None
    try:
        metrics = _finish_run(out, state, history, splits, config, args.data_dir)
    except KeyboardInterrupt:
        print(f"\ninterrupted {_how_to_finish(out, saved, args.member)}", file=sys.stderr)
        return 130
    except OSError as e:
        raise _write_failed(e, out, f"; stopped {_how_to_finish(out, saved, args.member)}") from None
    print(("early stopping after epoch %d\n" % state.epoch if metrics["stopped_early"] else "")
          + format_results(metrics), flush=True)
    print(f"run directory: {out}")
    return 0


def _finish_run(out: Path, state: TrainState, history: list[dict], splits: Splits,
                config: Config, data_dir: Path) -> dict:
    """A trained run's final evaluation, written to metrics.json, then its pictures and report."""
    write_json(out / "history.json", history)     # again: a resume may have trained no epoch
    metrics = full_evaluation(state.best_params, splits, config.flip_average) | {
        "best_epoch": state.best.epoch, "epochs_run": state.epoch,
        "stopped_early": state.epoch < config.epochs,
        "train_seconds": sum(r["seconds"] for r in history)}
    write_json(out / "metrics.json", metrics)
    write_run_artifacts(out, data_dir)                   # curves/confusion/mistakes.png, report.md
    return metrics


def _write_failed(e: OSError, out: Path, go_on: str) -> FmnistError:
    """One line for a run's file that could not be written (a full disk): which file, why, and
    `go_on`, what to do next."""
    return FmnistError(f"{e.filename or out}: {e.strerror or e}{go_on}")


def _drop_unsaved_best(out: Path) -> None:
    """After a run stopped in its first epoch: a best.npz without state.npz belongs to no
    resumable run, so it goes (a later run with the same --out would refuse it)."""
    if not (out / "state.npz").exists():
        (out / "best.npz").unlink(missing_ok=True)


def _how_to_finish(out: Path, saved: int, member: str | None) -> str:
    """The end of a message about a run stopped after training, before its files were all
    written: metrics.json first (`train --resume` evaluates again), then the pictures and
    report.md (`report` draws them). An ensemble member leaves what to do to its ensemble."""
    if not (out / "metrics.json").exists():
        go_on = f"; {_resume_hint(out, saved, 'finish')}"
        return "in the final evaluation" + ("" if member else go_on)
    go_on = f"; draw them with:\n  {_invocation()} report {_shell(out)}"
    return "while drawing the pictures" + ("" if member else go_on)


def _resume_hint(out: Path, saved: int, verb: str = "resume") -> str:
    """The end of a message about a run stopped after epoch `saved` was saved."""
    return (f"the run is saved after epoch {saved}. {verb.capitalize()} it with:\n"
            f"  {_invocation()} train --resume {_shell(out)}")


THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def usable_cpus() -> int:
    """The CPUs this process may run on (a container or `taskset` may allow fewer than exist)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def run_ensemble(args: argparse.Namespace, members: Mapping[str, Config] | None) -> int:
    """`train --recipe best`: train each member as an ordinary run in out/<member>/, then
    evaluate the ensemble (the mean of the members' predicted distributions).

    Members train in child processes with one BLAS thread each, `--jobs` at a time (default: as
    many as there are members and cores). Most of an epoch's elementwise work runs on one core
    whatever BLAS does, so two one-thread runs side by side finish well before two two-thread
    runs in a row; and with one thread always, a member's result does not depend on --jobs.
    `train --resume OUT` continues the members that did not finish.
    """
    started = time.perf_counter()
    out, members = _check_ensemble_dir(args, members)
    if args.resume:
        todo = {name: c for name, c in members.items()
                if not (out / name / "metrics.json").exists()}
    else:                                            # a new run (or --force): every member anew
        out = _start_run_dir(out, args, "ensemble.json", {"recipe": args.recipe, "members": {
            name: c.to_json() for name, c in members.items()}})
        todo = dict(members)
    jobs = min(args.jobs or usable_cpus(), len(todo)) or 1
    print(f"ensemble of {len(members)} in {out}: {', '.join(members)}; training "
          f"{', '.join(todo) or 'nothing (all finished)'}, {jobs} at a time", flush=True)
    codes = _train_members(args, out, todo, jobs, resume=bool(args.resume))
    failed = [name for name, code in codes.items() if code != 0]
    if failed:
        print(f"not finished: {', '.join(failed)}. Continue the ensemble with:\n"
              f"  {_invocation()} train --resume {_shell(out)}", file=sys.stderr)
        return 130 if 130 in codes.values() else 1
    metrics, loaded = evaluate_checkpoints([out / name / "best.npz" for name in members],
                                           args.data_dir)
    member_metrics = {name: json.loads((out / name / "metrics.json").read_text())
                      for name in members}
    metrics |= {"members": {name: {k: m[k] for k in ("val_accuracy", "test_accuracy",
                                                      "best_epoch", "train_seconds")}
                            for name, m in member_metrics.items()},
                "wall_seconds": time.perf_counter() - started}
    write_json(out / "metrics.json", metrics)
    for name, m in metrics["members"].items():
        print(f"member {name}: validation {m['val_accuracy']:.2%}, test {m['test_accuracy']:.2%} "
              f"(best epoch {m['best_epoch']}, {m['train_seconds']:.0f} s)")
    print(_ensemble_line(len(members), loaded[0][1].flip_average))
    print(format_results(metrics))
    print(f"wall time {_duration(metrics['wall_seconds'])}; ensemble directory: {out}")
    return 0


def _check_ensemble_dir(args: argparse.Namespace, members: Mapping[str, Config] | None
                        ) -> tuple[Path, dict[str, Config]]:
    """The ensemble's directory and members: new, or read back from ensemble.json to resume.
    Each member's own directory is checked by run_train as any run's."""
    if args.resume:
        out = _resumable_dir(args, "ensemble")
        members = _ensemble_members(out)
        for name, config in members.items():       # a member's folder must hold that member
            if (out / name / "config.json").exists() and _stored_config(out / name) != config:
                raise CheckpointError(f"{out / name}: holds a run with other settings than "
                                      f"ensemble.json's {name}; move it away, or start the "
                                      f"ensemble again with --force")
        return out, members
    out = _new_run_dir(args)
    if args.out is not None:                         # (the default is claimed fresh, see below)
        for folder in (out, *(out / name for name in members)):   # before anything is written
            _refuse_to_overwrite(folder, args.force)
    return out, dict(members)


def _ensemble_members(out: Path) -> dict[str, Config]:
    """The members of the ensemble in `out`, by name, from its ensemble.json."""
    try:
        stored = json.loads((out / "ensemble.json").read_text())["members"]
        return {name: Config.from_json(c) for name, c in stored.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{out}/ensemble.json: unreadable ({e})") from None


def _stored_config(run_dir: Path) -> Config:
    """The Config in a run directory's config.json, or one clear error."""
    try:
        return Config.from_json(json.loads((run_dir / "config.json").read_text()))
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{run_dir / 'config.json'}: unreadable ({e})") from None


def _train_members(args: argparse.Namespace, out: Path, todo: Mapping[str, Config],
                   jobs: int, resume: bool) -> dict[str, int]:
    """Train each member in a child process (one BLAS thread each, set before NumPy loads
    there); returns each member's exit code. Ctrl-C reaches the children too: each saves its
    state and exits as an interrupted `train` does."""
    import concurrent.futures
    import multiprocessing
    codes: dict[str, int] = {}
    with one_blas_thread(), concurrent.futures.ProcessPoolExecutor(
            jobs, mp_context=multiprocessing.get_context("spawn"),
            initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN)) as pool:
        futures = {}
        for name, config in todo.items():
            started = resume and (out / name / "state.npz").exists()
            member_args = argparse.Namespace(
                data_dir=args.data_dir, out=out / name, force=args.force,
                resume=out / name if started else None, recipe=None, quiet=args.quiet or jobs > 1,
                member=name)
            futures[name] = pool.submit(_train_member, name, member_args, config)
        try:
            codes = {name: future.result() for name, future in futures.items()}
        except KeyboardInterrupt:           # Ctrl-C reached us; make sure it reaches them
            for future in futures.values():
                future.cancel()                 # the members not started yet
            concurrent.futures.wait(futures.values(), timeout=2)
            for child in multiprocessing.active_children():
                os.kill(child.pid, signal.SIGINT)   # ignored by a child between members
            codes = {name: _exit_code(future) for name, future in futures.items()}
    return codes


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """Within the block, processes started get one BLAS thread (the environment variables that
    OpenBLAS, OpenMP and MKL read when NumPy loads); afterwards they are as they were."""
    saved = {k: os.environ.get(k) for k in THREAD_VARIABLES}
    os.environ.update({k: "1" for k in THREAD_VARIABLES})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _exit_code(future: Any) -> int:
    """A member's exit code once it has stopped: 130 if it was interrupted or never started."""
    try:
        return future.result()
    except BaseException:                    # cancelled, interrupted, or its process died
        return 130


def _train_member(name: str, args: argparse.Namespace, config: Config) -> int:
    """In a child process: run_train, every printed line prefixed with the member's name, Ctrl-C
    heard only while it runs (between members the child ignores it), errors printed as `train`
    prints them."""
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = (_Prefixed(stream, f"[{name}] ") for stream in streams)
    between_members = signal.signal(signal.SIGINT, signal.default_int_handler)   # SIG_IGN
    try:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            return run_train(args, config)
    except KeyboardInterrupt:
        return 130
    except (FmnistError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except MemoryError as e:
        print(f"error: {_not_enough_memory(e)}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, between_members)
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = streams


class _Prefixed:
    """A text stream that starts every line it writes with `prefix`."""

    def __init__(self, stream: Any, prefix: str):
        self.stream, self.prefix, self.at_line_start = stream, prefix, True

    def write(self, text: str) -> int:
        for piece in text.splitlines(keepends=True):
            if self.at_line_start:                  # a blank line gets no trailing space
                self.stream.write(self.prefix if piece.strip() else self.prefix.rstrip())
            self.stream.write(piece)
            self.at_line_start = piece.endswith("\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False


RUN_FILES = ("config.json", "history.json", "metrics.json", "best.npz", "state.npz", "report.md",
             "curves.png", "confusion.png", "mistakes.png")


def _check_run_dir(args: argparse.Namespace, config: Config
                   ) -> tuple[Path, TrainState | None, list[dict], Config]:
    """The run directory, and the state, history and config to continue from (None, [] and the
    given config for a new run). Refuses to overwrite a run by accident; writes nothing."""
    if args.resume:
        out = _resumable_dir(args, "run")
        state, config, history = load_state(out / "state.npz")
        if _stored_config(out) != config:       # the report at the end reads config.json
            raise CheckpointError(f"{out / 'config.json'}: does not match the settings in "
                                  f"state.npz; the run's files are not from one run")
        return out, state, history, config
    out = _new_run_dir(args)
    if args.out is not None:              # the default runs/<timestamp> is claimed fresh
        _refuse_to_overwrite(out, args.force)
    return out, None, [], config


def _refuse_to_overwrite(out: Path, force: bool) -> None:
    """Without --force, refuse a directory holding any file a run or an ensemble writes there:
    a finished run, hours of an unfinished one, or someone's own config.json."""
    if force:
        return
    finished = (out / "metrics.json").exists()
    for name, what in (("ensemble.json", "an ensemble"), ("metrics.json", "a finished run"),
                       ("state.npz", "an unfinished run")):
        if (out / name).exists():
            resume = "" if finished else "resume it with --resume, "
            raise CheckpointError(f"{out}: already holds {what}; choose another --out, "
                                  f"{resume}or pass --force to overwrite it")
    present = [name for name in RUN_FILES if (out / name).exists()]
    if present == ["config.json"] and _holds_config(out):
        return      # a run stopped before its first epoch was saved: nothing to lose or resume
    if present:
        raise CheckpointError(f"{out}: already holds {', '.join(present)}; choose another --out "
                              f"or pass --force to overwrite them")


def _resumable_dir(args: argparse.Namespace, what: str) -> Path:
    """--resume's directory, once it is clear there is something to resume and nothing to
    override (a run or an ensemble keeps the settings it started with)."""
    out = _run_dir_argument(Path(args.resume), "--resume")
    if (out / "metrics.json").exists():
        raise CheckpointError(f"{out}: this {what} has already finished; nothing to resume")
    # an ensemble's directory gets here only with its ensemble.json (see main); a run's needs
    # the state its first finished epoch saved
    if what == "run" and not (out / "state.npz").exists():
        if (out / "config.json").exists():
            raise CheckpointError(f"{out}: stopped before its first epoch was saved, so there "
                                  f"is nothing to resume; start it again with the command that "
                                  f"started it (its settings are in config.json)")
        raise CheckpointError(f"{out}: no state.npz, so no run to resume here; --resume takes "
                              f"the directory a `train` run wrote")
    return out


def _run_dir_argument(path: Path, flag: str) -> Path:
    """`path` if it is a directory, else one line saying what `flag` takes."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: {'not a directory' if path.exists() else 'not found'}; "
                              f"{flag} takes the directory a `train` run wrote")
    return path


def _holds_config(out: Path) -> bool:
    """Whether out/config.json is exactly what a run writes (Config.to_json), rather than some
    other program's file (from_json alone would read any JSON object, ignoring unknown keys)."""
    try:
        stored = json.loads((out / "config.json").read_text())
        return stored == Config.from_json(stored).to_json()
    except (OSError, ValueError, TypeError, AttributeError):
        return False


def _new_run_dir(args: argparse.Namespace) -> Path:
    """--out, or runs/<timestamp>; refused if it names a file. (The default is only a first
    choice: see _create_run_dir.)"""
    out = Path(args.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a directory; choose another --out")
    return out


def _create_run_dir(out: Path, args: argparse.Namespace) -> Path:
    """Create the run directory and return it. Without --out, the default runs/<timestamp> is
    claimed by creating it (the first of runs/<timestamp>, runs/<timestamp>-2, ... that does
    not exist yet), so two runs started in the same second never share a directory."""
    if args.out is not None:
        _make_dir(out, "--out")
        return out
    _make_dir(out.parent, "--out")
    for n in itertools.count(1):
        candidate = out if n == 1 else out.with_name(f"{out.name}-{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
        except OSError as e:
            raise FmnistError(f"{candidate}: cannot create the directory ({e.strerror}); "
                              f"choose a directory with --out") from None
    raise AssertionError("unreachable")


def _start_run_dir(out: Path, args: argparse.Namespace, first_file: str, obj: Any) -> Path:
    """Create the directory of a run or an ensemble (see _create_run_dir), clear what an earlier
    one left there (--force), write its first file (config.json, ensemble.json); returns the
    directory. One clear line if the directory refuses any of it (a read-only file system fails
    even the removal of a file that is not there)."""
    out = _create_run_dir(out, args)
    try:
        for name in (*RUN_FILES, "ensemble.json"):
            (out / name).unlink(missing_ok=True)
        write_json(out / first_file, obj)
    except OSError as e:
        raise FmnistError(f"{out}: cannot write to the directory ({e.strerror}); "
                          f"choose another --out") from None
    return out


def _progress_bar(quiet: bool, first_epoch: int = 1) -> OnStep | None:
    """A tqdm bar over each epoch's batches with the running loss and accuracy, shown only on a
    terminal (a pipe or CI log gets clean line-per-epoch text), and never with --quiet."""
    if quiet or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    bar, epoch = None, first_epoch - 1

    def on_step(step: int, steps: int, loss: float, accuracy: float) -> None:
        nonlocal bar, epoch
        if step == 1:
            epoch += 1
            bar = tqdm(total=steps, desc=f"epoch {epoch}", unit="batch", leave=False,
                       dynamic_ncols=True)
        bar.update(1)
        if step % 10 == 0 or step == steps:
            bar.set_postfix_str(f"loss {loss:.4f} acc {accuracy:.2%}", refresh=False)
        if step == steps:
            bar.close()
    return on_step


def run_evaluate(args: argparse.Namespace) -> int:
    """`evaluate`: one checkpoint, or several as an ensemble (same split, same dtype). The
    directory of an ensemble run stands for its members' checkpoints."""
    paths = [member for path in args.checkpoints for member in _checkpoints_in(path)]
    metrics, loaded = evaluate_checkpoints(paths, args.data_dir)
    for path, (_, c, meta) in zip(paths, loaded):
        print(f"checkpoint {path}: {_dashed(c.layer_sizes)}, seed {c.seed}, "
              f"epoch {meta.get('epoch', '?')}")
    if len(loaded) > 1:
        print(_ensemble_line(len(loaded), loaded[0][1].flip_average))
    print(format_results(metrics))
    return 0


def evaluate_checkpoints(paths: Sequence[Path], data_dir: str | Path
                         ) -> tuple[dict, list[tuple[Params, Config, dict]]]:
    """full_evaluation of one checkpoint, or of several as an ensemble (they must share split,
    dtype and flip averaging), and what was loaded."""
    loaded = load_members(paths)
    config = loaded[0][1]
    splits = make_splits(load_fashion_mnist(data_dir), config)
    models = [params for params, _, _ in loaded]
    return full_evaluation(models, splits, config.flip_average), loaded   # one model: no ensemble


SPLIT_FIELDS = ("split_seed", "val_size", "limit")


def load_members(paths: Sequence[Path], shared: Sequence[str] = (*SPLIT_FIELDS, "dtype",
                                                                    "flip_average")
                 ) -> list[tuple[Params, Config, dict]]:
    """load_checkpoint of each path, refusing members that would not make an ensemble: they
    must share the split (to be evaluated on it), dtype and flip averaging, and be different
    files (a run's directory and its best.npz are one file)."""
    first: dict[Path, int] = {}                     # each file's real path: where first given
    for i, path in enumerate(paths):
        j = first.setdefault(Path(path).resolve(), i)
        if j != i:
            also = "" if str(paths[j]) == str(path) else f" (as {paths[j]} too)"
            raise CheckpointError(f"{path}: given twice{also}; an ensemble takes each member once")
    loaded = [load_checkpoint(path) for path in paths]
    config = loaded[0][1]
    for path, (_, other, _) in zip(paths[1:], loaded[1:]):
        differ = [k for k in shared if getattr(other, k) != getattr(config, k)]
        if differ:
            raise CheckpointError(f"{path}: its {', '.join(differ)} "
                                  f"{'differ' if len(differ) > 1 else 'differs'} from "
                                  f"{paths[0]}'s; the members of an ensemble must agree on "
                                  f"{', '.join(shared)}")
    return loaded


def _ensemble_line(members: int, flip_average: bool) -> str:
    return (f"ensemble of {members}: the mean of their predicted distributions"
            f"{', each averaged with the mirror image' if flip_average else ''}")


def _checkpoints_in(path: Path) -> list[Path]:
    """[path] for a checkpoint file; for a run directory its best.npz; for the directory of an
    ensemble run its members' best.npz."""
    if not path.is_dir():
        return [path]
    if (path / "best.npz").exists() and not (path / "ensemble.json").exists():
        return [path / "best.npz"]
    if not (path / "ensemble.json").exists():
        raise CheckpointError(f"{path}: a directory with neither best.npz nor ensemble.json; "
                              f"pass a checkpoint or the directory of a `train` run")
    members = _ensemble_members(path)
    unfinished = [name for name in members if not (path / name / "metrics.json").exists()]
    if unfinished:
        raise CheckpointError(f"{path}: the ensemble has not finished ({', '.join(unfinished)} "
                              f"still training); continue it with `{_invocation()} train "
                              f"--resume {_shell(path)}`")
    return [path / name / "best.npz" for name in members]


def run_report(args: argparse.Namespace) -> int:
    """Redraw the pictures and rewrite report.md of a finished run (of each member's run, for
    the directory of an ensemble)."""
    run_dir = _run_dir_argument(args.run_dir, "report")
    runs = ([path.parent for path in _checkpoints_in(run_dir)]
            if (run_dir / "ensemble.json").exists() else [run_dir])
    for run in runs:                                  # every member finished before any is written
        read_run(run)
    paths = [p for run in runs for p in write_run_artifacts(run, args.data_dir)]
    print("\n".join(f"wrote {p}" for p in paths))
    return 0


def run_predict(args: argparse.Namespace) -> int:
    """Top-3 classes for each image file and each --test-index, as text lines or one JSON object."""
    loaded = load_members(_checkpoints_in(args.checkpoint),    # one network, or an ensemble
                          shared=("dtype", "flip_average"))      # (no split: nothing is scored)
    models, config = [params for params, _, _ in loaded], loaded[0][1]
    if args.images:
        _pillow()                       # if missing: one line for the command, not one per image
    inputs, images, failed = [], [], []                         # images: (28, 28) uint8 each
    for path in args.images:
        try:
            images.append(_image_to_classify(path, args.invert))
            inputs.append({"input": str(path)})
        except ImageError as e:        # one bad file: say so, answer for the others, exit 1
            print(f"fmnist: error: {e}", file=sys.stderr)
            failed.append({"input": str(path), "error": str(e)})
    if args.test_index:
        test_images, test_labels = load_test_set(args.data_dir)
        for i in args.test_index:                               # 0 <= i < TEST_IMAGES: _test_index
            inputs.append({"input": f"test image {i}", "true_class": CLASS_NAMES[test_labels[i]]})
            images.append(test_images[i])
    probs = (class_probabilities(models, np.stack(images), config.dtype, config.flip_average)
             if images else [])                                              # (N, 10)
    results = [item | {"top": top_k(p)} for item, p in zip(inputs, probs)]
    if args.json:
        print(json.dumps({"checkpoint": str(args.checkpoint), "predictions": results}
                         | ({"errors": failed} if failed else {}), indent=2))
    else:
        for r in results:
            truth = f" (true class: {r['true_class']})" if "true_class" in r else ""
            ranked = ", ".join(f"{t['class']} {t['probability']:.1%}" for t in r["top"])
            print(f"{r['input']}{truth}: {ranked}")
    return 1 if failed else 0


def _image_to_classify(path: Path, invert: bool) -> np.ndarray:
    """An image file as a Fashion-MNIST image (28, 28) uint8, with a note on stderr when the
    object looks darker than its background (then --invert is likely wrong, or missing)."""
    gray = read_image(path, invert)
    try:
        image = to_fashion_mnist(gray)
    except ValueError as e:                                     # nothing to classify
        hint = "" if invert else "; a dark object on a light or transparent background needs --invert"
        raise ImageError(f"{path}: {e}{hint}") from None
    if looks_inverted(gray):
        print(f"note: {path} looks like a dark object on a light background after "
              f"{'--invert' if invert else 'reading'}; {'drop' if invert else 'pass'} --invert "
              f"if so", file=sys.stderr)
    return image


def run_gradcheck(args: argparse.Namespace) -> int:
    """Print backward's largest relative error against finite differences, per parameter."""
    case = gradcheck_case(args.hidden, args.batch, args.seed, batch_norm=args.batch_norm)
    sizes = layer_sizes_of(case.params)
    print(f"gradient check: {_dashed(sizes)} network in float64, batch {args.batch}, "
          f"seed {args.seed}" + ", batch norm" * args.batch_norm)
    print(f"loss: cross-entropy + L2 (lambda {case.l2}), dropout {case.dropout} with one fixed mask")
    print(f"numeric gradient: central differences at h = {GRADCHECK_H:g} and {2 * GRADCHECK_H:g}, "
          f"Richardson-extrapolated")
    print(f"{'parameter':<10} {'shape':>11} {'max |grad|':>11} {'max relative error':>19}")
    worst = 0.0
    for name, (largest, error) in gradient_check(case).items():
        print(f"{name:<10} {str(case.params[name].shape):>11} {largest:11.2e} {error:19.1e}")
        worst = max(worst, error)
    verdict = "PASS" if worst < GRADCHECK_TOL else "FAIL"
    print(f"{verdict}: largest relative error {worst:.1e}, tolerance {GRADCHECK_TOL:.0e} "
          f"(relative error = |backward - numeric| / max(|backward|, |numeric|, {GRADCHECK_FLOOR:g}))")
    return 0 if verdict == "PASS" else 1


def check_gradcheck_args(args: argparse.Namespace) -> None:
    """Raise ValueError for gradcheck settings that build no network (a usage error)."""
    if not args.hidden or not all(1 <= h <= MAX_WIDTH for h in args.hidden):
        raise ValueError(f"--hidden needs one or more widths from 1 to {MAX_WIDTH:,}, got "
                         f"{','.join(map(str, args.hidden)) or 'none'}")
    if args.batch_norm and args.batch < 2:
        raise ValueError(f"--batch-norm needs --batch of at least 2 (a batch's mean and "
                         f"spread), got {args.batch}")


def run_download(args: argparse.Namespace) -> int:
    """Fetch and verify the four data files (torchvision if installed, else the standard library)."""
    download_fashion_mnist(args.data_dir, args.mirror,
                           use_torchvision=False if args.no_torchvision else None)
    print(f"{args.data_dir}: ready ({_invocation()} train --data-dir {_shell(args.data_dir)})")
    return 0


def _whole_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    return value


def _positive_number(text: str) -> int:
    value = _whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number of at least 1, got {text!r}")
    return value


def _seed(text: str) -> int:
    value = _whole_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"a seed is a whole number of at least 0, got {text!r}")
    return value


def _test_index(text: str) -> int:
    value = _whole_number(text)
    if not 0 <= value < TEST_IMAGES:
        raise argparse.ArgumentTypeError(f"a test image number is 0 to {TEST_IMAGES - 1}, "
                                         f"got {text!r}")
    return value


def _path(text: str) -> Path:
    """A path argument; an empty one (an unset shell variable) would quietly mean `.`."""
    if not text:
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return Path(text)


def _url(text: str) -> str:
    """--mirror: a URL the standard library fetches (a bare folder would fail as 'unknown url
    type' only once the download starts)."""
    if text.partition("://")[0] not in ("http", "https", "file"):
        raise argparse.ArgumentTypeError(f"expected a URL (http://, https:// or file:///folder), "
                                         f"got {text!r}")
    return text


def _hidden_sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(h) for h in text.split(",")) if text.strip() else ()
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer widths such as 512,256,128, got {text!r}") from None


def _data_dir_flag(parser: argparse.ArgumentParser, help: str = "folder with the IDX files",
                   default: Path | None = None) -> None:
    """--data-dir; by default (None) the data the command finds: see default_data_dir."""
    parser.add_argument("--data-dir", type=_path, default=default,
                        help=help if default else f"{help} (default: ./data if it exists, "
                                                  f"else the data/ folder beside fmnist.py)")


def default_data_dir() -> Path:
    """./data when it exists (a checkout, or a folder of your own), else the data/ folder that
    ships beside fmnist.py: so a checkout's (or an editable install's) commands work from any
    directory. A plain `pip install` copies fmnist.py only, without data/."""
    here, beside = Path("data"), Path(__file__).resolve().parent / "data"
    return here if here.is_dir() or not beside.is_dir() else beside


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except an absent one (None, []) or a switch's False, and
    wraps lines at spaces only, so that a name like best-single, --no-flip-average or a URL
    stays whole (a word longer than the line runs past its end rather than being cut)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False,
                             break_long_words=False)

    def _fill_text(self, text: str, width: int, indent: str) -> str:       # descriptions
        return "\n".join(indent + line for line in self._split_lines(text, width - len(indent)))

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fmnist", description="A Fashion-MNIST MLP in NumPy, from scratch, as pure functions.",
        allow_abbrev=False, formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"fmnist {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # no abbreviations: `--no-flip` must not quietly mean `--no-flip-average`
    def add_command(name: str, **kw: Any) -> argparse.ArgumentParser:
        command = commands.add_parser(name, allow_abbrev=False, formatter_class=_HelpFormatter,
                                      **kw)
        command.set_defaults(command_parser=command)      # for its usage line (parse_args)
        return command
    train = add_command(
        "train", help="train the MLP and evaluate it",
        description="Train on the shipped data with the report's recipe, or with one found "
                    "here (README: \"How far can an MLP go\"): --recipe best trains two networks "
                    "and averages their predictions, --recipe best-single the best single one. A "
                    "flag given explicitly overrides the recipe's value; each flag's help shows "
                    "every recipe's value.")
    train.add_argument("--recipe", choices=(*RECIPES, *ENSEMBLES), default=None,
                       help="starting values of every hyperparameter: the report's (the "
                            "default) or those found here; 'best' trains an ensemble of "
                            f"{' and '.join(ENSEMBLES['best'])}, and flags then apply to both")
    train.add_argument("--jobs", type=_positive_number, default=None,
                       help="with an ensemble recipe: members trained at once (default: one "
                            "per core)")

    def hyper(flag: str, help: str, **kw: Any) -> None:
        name = flag[2:].replace("-", "_")
        values = recipe_values(name)
        train.add_argument(flag, default=argparse.SUPPRESS, help=f"{help} ({values})", **kw)
    hyper("--hidden", "hidden layer widths, comma-separated", type=_hidden_sizes)
    hyper("--dropout", "dropout rate on hidden layers", type=float)
    hyper("--l2", "L2 strength lambda: the penalty (lambda/2) sum ||W||^2, gradient lambda W; "
                  "--l2 2e-4 is the report's term as written, lambda = 1e-4", type=float)
    hyper("--lr", "Adam learning rate", type=float)
    hyper("--lr-schedule", "learning rate schedule", choices=SCHEDULES)
    hyper("--weight-decay", "AdamW: decay of the weights per step, times the learning rate; "
                            "0: off", type=float)
    hyper("--beta1", "Adam beta1", type=float)
    hyper("--beta2", "Adam beta2", type=float)
    hyper("--eps", "Adam epsilon", type=float)
    hyper("--batch-size", "mini-batch size", type=_whole_number)
    hyper("--epochs", "maximum epochs", type=_whole_number)
    hyper("--patience", "early stopping: epochs without a better validation accuracy; "
                        "0: never stop early", type=_whole_number)
    hyper("--flip", "probability of mirroring a training image", type=float)
    hyper("--shift", "random shifts of training images, up to this many pixels", type=_whole_number)
    hyper("--cutout", "black out a square of this many pixels a side in each training image; "
                      "0: off", type=_whole_number)
    hyper("--input-dropout", "dropout rate on the input pixels", type=float)
    hyper("--label-smoothing", "weight of the uniform distribution in the targets", type=float)
    hyper("--average", "evaluate a running average of the weights, with this decay per epoch; "
                       "0: off", type=float)
    hyper("--flip-average", "predict from each image and its mirror image",
          action=argparse.BooleanOptionalAction)
    hyper("--batch-norm", "normalise each hidden layer's pre-activations over the batch",
          action=argparse.BooleanOptionalAction)
    hyper("--seed", "seed for initialisation, shuffling, augmentation and dropout", type=_seed)
    hyper("--split-seed", "seed of the train/validation permutation", type=_seed)
    hyper("--dtype", "floating-point type", choices=DTYPES)
    train.add_argument("--limit", type=_whole_number, default=argparse.SUPPRESS,
                       help="train on the first N training images only (quick tries)")
    _data_dir_flag(train)
    train.add_argument("--out", type=_path, default=None,
                       help="run directory (default: runs/<timestamp>)")
    train.add_argument("--force", action="store_true",
                       help="overwrite a run already in --out")
    train.add_argument("--resume", type=_path, default=None, metavar="RUN_DIR",
                       help="continue an interrupted run from its last saved epoch, "
                            "with its stored settings (the result is bit-identical)")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.set_defaults(member=None)       # the name of an ensemble's member (set by run_ensemble)
    evaluate_cmd = add_command("evaluate", help="evaluate a saved checkpoint or an ensemble",
                                       description="Print the full evaluation of a checkpoint, or "
                                                   "of several as an ensemble.")
    evaluate_cmd.add_argument("checkpoints", type=_path, nargs="+", metavar="CHECKPOINT",
                              help="a best.npz written by train, a run's directory (its "
                                   "best.npz), or the directory of an ensemble run; several are "
                                   "evaluated as an ensemble (the mean of their predicted "
                                   "distributions)")
    _data_dir_flag(evaluate_cmd)
    report_cmd = add_command("report", help="draw the pictures and write report.md of a run",
                                     description="Redraw curves.png, confusion.png and mistakes.png "
                                                 "and rewrite report.md in a finished run directory.")
    report_cmd.add_argument("run_dir", type=_path, metavar="RUN_DIR", help="a run directory written by train (an "
                                                       "ensemble's: each member's report)")
    _data_dir_flag(report_cmd, "folder with the IDX files (the test images are drawn)")
    predict_cmd = add_command(
        "predict", help="classify image files or test-set images with a checkpoint",
        description="Print the three most probable classes for each image. A PNG or JPEG of any "
                    "size or colour is made into a 28x28 grayscale image the way Fashion-MNIST's "
                    "were: a light object on a dark background, trimmed to the object, longest "
                    "side fitted to 28 and centred. Photos of a dark object on a light background "
                    "need --invert. A file that cannot be classified gets an error line (and "
                    "exit status 1); the other images are still answered.")
    predict_cmd.add_argument("checkpoint", type=_path, metavar="CHECKPOINT",
                             help="a best.npz written by train, a run's directory (its best.npz) "
                                  "or an ensemble's directory (the mean of its members' answers)")
    predict_cmd.add_argument("images", type=_path, nargs="*", metavar="IMAGE", default=[],
                             help="image files (PNG, JPEG, or anything Pillow reads)")
    predict_cmd.add_argument("--invert", action="store_true",
                             help="the images show a dark object on a light background")
    predict_cmd.add_argument("--test-index", type=_test_index, action="append", metavar="N",
                             help="also classify test-set image N (0-9999); repeatable")
    predict_cmd.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    _data_dir_flag(predict_cmd, "folder with the IDX files (for --test-index)")
    gradcheck_cmd = add_command(
        "gradcheck", help="check backward against finite differences on a small network",
        description="Build a small random float64 network (784 inputs, 10 classes), and print for "
                    "every parameter the largest relative error between backward and central "
                    "finite differences of the loss (cross-entropy + L2, one fixed dropout mask), "
                    "Richardson-extrapolated from steps h and 2h. It computes the loss four times "
                    "per parameter, so its time grows with the network: seconds for the default, "
                    "about a minute for --hidden 64.")
    gradcheck_cmd.add_argument("--hidden", type=_hidden_sizes, default="8,6",
                               help="hidden layer widths, comma-separated")
    gradcheck_cmd.add_argument("--batch", type=_positive_number, default=4, help="batch size")
    gradcheck_cmd.add_argument("--seed", type=_seed, default=0,
                               help="seed of the network, batch and dropout mask")
    gradcheck_cmd.add_argument("--batch-norm", action="store_true",
                               help="normalise the hidden layers over the batch")
    download_cmd = add_command(
        "download", help="download and verify the four Fashion-MNIST files",
        description="Fetch the four official files into --data-dir, with torchvision if it is "
                    "installed, else from the mirror with the standard library; checksums are "
                    "verified before a file is written. Files already valid are kept.")
    _data_dir_flag(download_cmd, "where to put the files", default=Path("data"))
    download_cmd.add_argument("--mirror", type=_url, default=MIRROR,
                              help="base URL of the .gz files (without torchvision)")
    download_cmd.add_argument("--no-torchvision", action="store_true",
                              help="use the standard library even if torchvision is installed")
    return parser


def given_hyperparameters(args: argparse.Namespace) -> dict[str, Any]:
    """The hyperparameter flags given on the command line (the others are absent from args)."""
    fields = {f.name for f in dataclasses.fields(Config)}
    return {k: v for k, v in vars(args).items() if k in fields}


def config_from_args(args: argparse.Namespace) -> Config:
    return dataclasses.replace(RECIPES[args.recipe or "report"], **given_hyperparameters(args))


def ensemble_from_args(args: argparse.Namespace) -> dict[str, Config]:
    members = {}
    for name in ENSEMBLES[args.recipe]:
        try:
            members[name] = dataclasses.replace(RECIPES[name], **given_hyperparameters(args))
        except ValueError as e:
            raise ValueError(f"member {name} of --recipe {args.recipe}: {e}") from None
    return members


def recipe_values(field: str) -> str:
    """Each recipe's value of a hyperparameter, for --help, recipes that agree named together:
    'every recipe: 0.001', or 'report, best-bn: 0.3; best-single, best-shift: 0.0'."""
    groups: dict[str, list[str]] = {}
    for recipe, config in RECIPES.items():
        groups.setdefault(_flag_value(getattr(config, field)), []).append(recipe)
    if len(groups) == 1:
        return f"every recipe: {next(iter(groups))}"
    return "; ".join(f"{', '.join(recipes)}: {value}" for value, recipes in groups.items())


def _flag_value(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """parser.parse_args, except that predict's image files may also follow an option
    (`predict CKPT --invert a.png`, or `--invert -- -a.png`): argparse stops filling a list of
    positionals at the first option and would call the rest unrecognized. An unknown option is
    refused with its command's usage line (`train --nope`), not the top-level one argparse
    would show, unless it came before the command (`--nope train`)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args, extra = parser.parse_known_args(argv)
    command = vars(args).pop("command_parser")
    before = set(argv[:argv.index(args.command)])
    if before & set(extra):
        parser.error(f"unrecognized arguments: {' '.join(e for e in extra if e in before)}")
    if args.command == "predict":
        cut = extra.index("--") if "--" in extra else len(extra)    # after --, all are images
        extra, after_dashes = extra[:cut], extra[cut + 1:]
        images = [e for e in extra if not e.startswith("-")] + after_dashes
        extra = [e for e in extra if e.startswith("-")]
        if "" in images:
            command.error("an image path is an empty string")
        args.images = [*args.images, *map(Path, images)]    # (not +=: [] is the default)
    if extra:
        command.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def check_resume_flags(args: argparse.Namespace) -> None:
    """--resume continues a run in its own directory with its stored settings: a recipe,
    hyperparameter, --out or --force beside it would be silently ignored, or worse, change the
    run half-way. Raise ValueError for any of them."""
    if args.resume and (args.recipe or given_hyperparameters(args) or args.out is not None
                        or args.force):
        raise ValueError("--resume continues a run in its own directory with its stored "
                         "settings; do not pass a recipe, hyperparameters, --out or --force "
                         "with it")


def _not_enough_memory(e: MemoryError) -> str:
    """One line for a MemoryError; NumPy's own message says what it could not allocate."""
    return f"not enough memory ({e or 'allocation failed'}); try a smaller network or batch"


def _shell(path: str | Path) -> str:
    """A path as it must be typed in a shell command (quoted if it has spaces and the like)."""
    return shlex.quote(str(path))


def _invocation() -> str:
    """How to run this program in the commands that messages suggest: `fmnist` when the user ran
    the command that `pip install` makes, `python -m fmnist` when they ran the module,
    `python PATH/fmnist.py` when they ran the file from elsewhere, else (run from the clone, or
    from Python) the README's `python fmnist.py`."""
    script = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path()
    if getattr(getattr(sys.modules.get("__main__"), "__spec__", None), "name", None) == "fmnist":
        return "python -m fmnist"
    if script.name == "fmnist":
        return "fmnist"
    if script.name == "fmnist.py" and script != Path("fmnist.py"):
        return f"python {_shell(script)}"
    return "python fmnist.py"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    if "data_dir" in args and args.data_dir is None:
        args.data_dir = default_data_dir()
    try:
        if args.command == "train":
            check_resume_flags(args)
            if args.force and args.out is None:
                parser.exit(2, f"{parser.prog} train: error: --force overwrites the run in --out; "
                               f"without --out, every run gets a new directory\n")
            if args.resume and (Path(args.resume) / "ensemble.json").exists():
                return run_ensemble(args, None)
            ensemble = args.recipe in ENSEMBLES and not args.resume    # resume: refused below
            if args.jobs and not ensemble:
                parser.exit(2, f"{parser.prog} train: error: --jobs applies to an ensemble "
                               f"recipe only (--recipe {', '.join(ENSEMBLES)})\n")
            try:
                members = ensemble_from_args(args) if ensemble else None
                config = Config() if ensemble or args.resume else config_from_args(args)
            except ValueError as e:     # a hyperparameter out of range: a usage error, exit 2
                parser.exit(2, f"{parser.prog} train: error: {e}\n")
            if ensemble:
                return run_ensemble(args, members)
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                return run_train(args, config)      # divergence gets its own one-line message
        if args.command == "evaluate":
            return run_evaluate(args)
        if args.command == "report":
            return run_report(args)
        if args.command == "predict":
            if not args.images and not args.test_index:
                parser.exit(2, f"{parser.prog} predict: error: give one or more image files, "
                               f"or --test-index N\n")
            return run_predict(args)
        if args.command == "gradcheck":
            try:
                check_gradcheck_args(args)
            except ValueError as e:
                parser.exit(2, f"{parser.prog} gradcheck: error: {e}\n")
            return run_gradcheck(args)
        if args.command == "download":
            return run_download(args)
    except BrokenPipeError:                  # `fmnist ... | head`: the reader left; so do we
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (FmnistError, ValueError, OSError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    except MemoryError as e:
        print(f"{parser.prog}: error: {_not_enough_memory(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
