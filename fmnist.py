"""fmnist: a Fashion-MNIST classifier written from scratch in NumPy, as pure functions.

This module reproduces the project report `seed-report.md`: a 784-512-256-128-10 multi-layer
perceptron with ReLU, inverted dropout, L2 regularisation and Adam that reaches about 89% test
accuracy, with per-class precision/recall/F1 and the confusions between classes.

It is meant to be read top to bottom, in the order data flows through it:

    data -> parameters -> model (forward) -> loss -> backward -> optimizer -> training
         -> evaluation -> checkpoints -> reporting -> command line

Conventions, stated once:

* Rows are examples. A batch `X` has shape (B, 784); a layer computes `Z = A @ W + b` with `W` of
  shape (fan_in, fan_out). (The report writes the column form `Z = W A + b`; it is the same
  network, transposed.)
* `dZ` means dL/dZ, the gradient of the scalar loss with respect to `Z`, with the shape of `Z`.
* Parameters are an immutable mapping `W1, b1, ..., WL, bL -> read-only array`. Every function
  returns new values and never writes into its inputs; the read-only flags make that checkable.
  Internally the arrays are views into one flat vector, so the optimizer is a few vector
  operations rather than a loop over layers.
* Randomness comes in through explicit seeds (`np.random.default_rng([seed, epoch])`), so a run is
  bit-for-bit reproducible and any epoch can be replayed from its inputs alone.

What it leaves out on purpose: convolutions, automatic differentiation, GPU support. The point is
to see every derivative written by hand, and to make plain NumPy as fast as it can be.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import io
import json
import math
import os
import sys
import tempfile
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


@dataclasses.dataclass(frozen=True)
class Config:
    """Every hyperparameter of a run; the defaults are the report's recipe (section in brackets)."""

    hidden: tuple[int, ...] = (512, 256, 128)  # [3.1] 784 -> 512 -> 256 -> 128 -> 10
    dropout: float = 0.3                       # [3.1] on the hidden layers, training only
    l2: float = 1e-4                           # [3.3] lambda * sum ||W||^2 over weight matrices
    lr: float = 1e-3                           # [4.1] Adam
    beta1: float = 0.9                         # [4.1]
    beta2: float = 0.999                       # [4.1]
    eps: float = 1e-8                          # Adam's usual epsilon
    batch_size: int = 128                      # [4.1]
    epochs: int = 50                           # [4.1] at most
    patience: int = 10                         # [4.1] early stopping on validation accuracy
    seed: int = 42                             # [2.2] init, shuffling and dropout draws
    split_seed: int = 42                       # [2.2] the train/validation permutation
    val_size: int = 10_000                     # [2.2] 50,000 train / 10,000 validation
    dtype: str = "float32"
    limit: int | None = None                   # train on the first N training images only

    def __post_init__(self):
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        check_config(self)

    @property
    def layer_sizes(self) -> tuple[int, ...]:
        return (NUM_INPUTS, *self.hidden, NUM_CLASSES)

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"hidden": list(self.hidden)}

    @classmethod
    def from_json(cls, d: Mapping) -> Config:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (tuple(v) if k == "hidden" else v) for k, v in d.items() if k in known})


def check_config(c: Config) -> None:
    """Raise ValueError, with one sentence a user can act on, for a hyperparameter out of range."""
    checks = [
        (len(c.hidden) > 0 and all(h >= 1 for h in c.hidden),
         f"hidden sizes must be one or more positive integers, got {list(c.hidden)}"),
        (0.0 <= c.dropout < 1.0, f"dropout must be in [0, 1), got {c.dropout}"),
        (c.l2 >= 0.0, f"l2 must be >= 0, got {c.l2}"),
        (c.lr > 0.0 and math.isfinite(c.lr), f"learning rate must be > 0, got {c.lr}"),
        (0.0 <= c.beta1 < 1.0, f"beta1 must be in [0, 1), got {c.beta1}"),
        (0.0 <= c.beta2 < 1.0, f"beta2 must be in [0, 1), got {c.beta2}"),
        (c.eps > 0.0, f"eps must be > 0, got {c.eps}"),
        (c.batch_size >= 1, f"batch size must be >= 1, got {c.batch_size}"),
        (c.epochs >= 1, f"epochs must be >= 1, got {c.epochs}"),
        (c.patience >= 0, f"patience must be >= 0, got {c.patience}"),
        (c.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got {c.dtype!r}"),
        (1 <= c.val_size < TRAIN_IMAGES, f"val_size must be in [1, {TRAIN_IMAGES}), got {c.val_size}"),
        (c.limit is None or 1 <= c.limit <= TRAIN_IMAGES - c.val_size,
         f"limit must be between 1 and the {TRAIN_IMAGES - c.val_size:,} training images, got {c.limit}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


class FmnistError(Exception):
    """An error the user can fix: the message says what is wrong and what to do."""


class DataError(FmnistError):
    """A data file is missing, damaged, or not what its name says."""


class CheckpointError(FmnistError):
    """A checkpoint or run directory cannot be used."""


class DivergedError(FmnistError):
    """Training produced a non-finite loss or parameter."""


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


class _HashingReader(io.RawIOBase):
    """A stream that hashes everything read through it (so checking costs no second pass)."""

    def __init__(self, inner):
        self.inner, self.sha256 = inner, hashlib.sha256()

    def readable(self):
        return True

    def read(self, n=-1):
        data = self.inner.read(n)
        self.sha256.update(data)
        return data


def find_data_file(data_dir: Path, name: str) -> Path:
    """Where `name` lives: Zalando's layout (`DIR/name[.gz]`) or torchvision's (`DIR/FashionMNIST/raw/`)."""
    data_dir = Path(data_dir)
    for folder in (data_dir, data_dir / "FashionMNIST" / "raw"):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    raise DataError(f"{data_dir / name}[.gz]: file not found (also looked in "
                    f"{data_dir / 'FashionMNIST' / 'raw'}); run `python fmnist.py download "
                    f"--data-dir {data_dir}` or point --data-dir at the folder holding it")


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
    arrays = []
    for name, (sha256, _) in DATA_FILES.items():
        arrays.append(read_idx(find_data_file(Path(data_dir), name), sha256 if verify else None))
    raw = RawData(*arrays)
    for images, labels, kind in ((raw.train_images, raw.train_labels, "train"),
                                 (raw.test_images, raw.test_labels, "t10k")):
        if images.ndim != 3 or labels.ndim != 1:
            raise DataError(f"{data_dir}: {kind} images and labels files are swapped")
        if len(images) != len(labels):
            raise DataError(f"{data_dir}: {kind} files disagree: {len(images):,} images "
                            f"but {len(labels):,} labels")
    return raw


def split_indices(n: int, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation indices: a permutation of range(n) from `seed`, the last `val_size` held out."""
    order = np.random.default_rng(seed).permutation(n)
    return order[:n - val_size], order[n - val_size:]


def normalise(images: np.ndarray, dtype: str = "float32") -> np.ndarray:
    """uint8 images (N, 28, 28) -> (N, 784) floats: scale to [0, 1], then (x - 0.286) / 0.353.

    A 256-entry lookup table does it in one gather, with the arithmetic done in float64 once.
    """
    table = ((np.arange(256) / 255.0 - MEAN) / STD).astype(dtype)
    return table[images.reshape(len(images), NUM_INPUTS)]   # (N, 784)


class Splits(NamedTuple):
    """Normalised inputs (N, 784) and integer labels (N,) for train, validation and test."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


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
        arrays += [_readonly(normalise(images, config.dtype)), _readonly(labels.astype(np.intp))]
    return Splits(*arrays)


# ================================================================================================
# Parameters: an immutable mapping of read-only arrays, all views into one flat vector
# ================================================================================================

def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def flat_order(names: Sequence[str]) -> list[str]:
    """The order of the arrays inside the flat vector: weight matrices first (W1, W2, ...), then
    the rest (biases), so that the L2 term applies to one contiguous prefix."""
    return sorted(names, key=lambda name: not is_weight(name))


def is_weight(name: str) -> bool:
    return name.startswith("W")


def split_flat(flat: np.ndarray, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Views of `flat` (1-D), one per name, with the given shapes, laid out in `flat_order`."""
    views, start = {}, 0
    for name in flat_order(list(shapes)):
        stop = start + math.prod(shapes[name])
        views[name] = flat[start:stop].reshape(shapes[name])
        start = stop
    if start != flat.size or flat.ndim != 1:
        raise ValueError(f"a flat vector of {flat.size} numbers does not fit shapes {dict(shapes)}")
    return {name: views[name] for name in shapes}


class Params(Mapping):
    """An immutable `name -> read-only array` mapping whose arrays are views into `self.flat`.

    One flat vector lets Adam update all 570k numbers with a handful of NumPy calls, and lets a
    gradient be written layer by layer straight into its final place. Construction makes `flat`
    read-only (it must be freshly allocated by the caller, who gives it up).
    """

    __slots__ = ("_flat", "_arrays")

    def __init__(self, flat: np.ndarray, shapes: Mapping[str, tuple[int, ...]]):
        self._flat = _readonly(flat)
        self._arrays = split_flat(self._flat, shapes)

    @property
    def flat(self) -> np.ndarray:
        """All parameters as one read-only 1-D vector, in the mapping's order."""
        return self._flat

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], dtype=None) -> Params:
        """Copy any mapping of arrays into a new Params (keeping the mapping's order of names)."""
        if isinstance(arrays, Params) and (dtype is None or arrays.flat.dtype == dtype):
            return arrays
        dtype = dtype or np.result_type(*arrays.values())
        flat = np.concatenate([np.asarray(arrays[k], dtype).ravel() for k in flat_order(list(arrays))])
        return cls(flat, {k: np.shape(a) for k, a in arrays.items()})

    def like(self, flat: np.ndarray) -> Params:
        """A Params with the same names and shapes as this one, over a new flat vector."""
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


def num_layers(params: Mapping) -> int:
    return len(params) // 2


def layer_sizes_of(params: Mapping) -> tuple[int, ...]:
    """(784, 512, 256, 128, 10) for the report's network."""
    L = num_layers(params)
    return (params["W1"].shape[0], *(params[f"W{l}"].shape[1] for l in range(1, L + 1)))


def param_shapes(layer_sizes: Sequence[int]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for l, (fan_in, fan_out) in enumerate(zip(layer_sizes[:-1], layer_sizes[1:]), start=1):
        shapes[f"W{l}"], shapes[f"b{l}"] = (fan_in, fan_out), (fan_out,)
    return shapes


# ================================================================================================
# Model: initialisation, dropout masks, forward pass
# ================================================================================================

def init_params(layer_sizes: Sequence[int] = Config().layer_sizes, seed: int = 42,
                dtype: str = "float32") -> Params:
    """He-normal weights for the ReLU layers, Xavier (Glorot) normal for the output, zero biases.

    He: std = sqrt(2 / fan_in) keeps the variance of activations constant through ReLUs, which
    zero half their inputs. Xavier: std = sqrt(2 / (fan_in + fan_out)) suits the linear output.
    """
    if len(layer_sizes) < 2 or any(int(n) < 1 for n in layer_sizes):
        raise ValueError(f"layer sizes must be two or more positive integers, got {list(layer_sizes)}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    rng = np.random.default_rng(seed)
    shapes = param_shapes(layer_sizes)
    flat = np.zeros(sum(math.prod(s) for s in shapes.values()), dtype=dtype)
    L = len(layer_sizes) - 1
    for l, (fan_in, fan_out) in enumerate(zip(layer_sizes[:-1], layer_sizes[1:]), start=1):
        std = math.sqrt(2.0 / fan_in) if l < L else math.sqrt(2.0 / (fan_in + fan_out))
        split_flat(flat, shapes)[f"W{l}"][...] = rng.normal(0.0, std, size=(fan_in, fan_out))
    return Params(flat, shapes)


def dropout_masks(seed_or_rng, batch_size: int, hidden: Sequence[int], rate: float,
                  dtype: str = "float32") -> tuple[np.ndarray, ...] | None:
    """Inverted-dropout masks, one (B, h) array per hidden layer: 0 with probability `rate`,
    else 1 / (1 - rate), so the expected activation is unchanged and evaluation needs no rescaling.
    Returns None when rate is 0 (no dropout)."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {rate}")
    if rate == 0.0:
        return None
    rng = np.random.default_rng(seed_or_rng)
    scale = 1.0 / (1.0 - rate)
    masks = []
    for h in hidden:
        keep = rng.random((batch_size, h), dtype=np.float32) >= rate        # (B, h) bool
        masks.append(_readonly(np.multiply(keep, scale, dtype=dtype)))      # (B, h) 0 or 1/(1-p)
    return tuple(masks)


class Cache(NamedTuple):
    """What backward needs from forward: each layer's input A, each hidden layer's gate, the logits.

    gate = 1[Z > 0] * mask is the derivative of dropout(ReLU(Z)) with respect to Z: a diagonal
    matrix, stored as its diagonal. With no dropout it is the boolean 1[Z > 0].
    """

    inputs: tuple[np.ndarray, ...]   # A0 = X, A1, ..., A_{L-1}; A_l is (B, n_l)
    gates: tuple[np.ndarray, ...]    # one per hidden layer, (B, n_l)
    logits: np.ndarray               # Z_L, (B, 10)


def check_inputs(params: Mapping, x: np.ndarray, y: np.ndarray | None = None) -> None:
    """Raise ValueError naming expected and actual shapes when a batch does not fit the network."""
    n_in = params["W1"].shape[0]
    if np.ndim(x) != 2 or np.shape(x)[1] != n_in:
        hint = " (flatten images with x.reshape(len(x), -1))" if np.ndim(x) == 3 else ""
        raise ValueError(f"inputs must have shape (batch, {n_in}), got {np.shape(x)}{hint}")
    if y is not None and np.shape(y) != (np.shape(x)[0],):
        raise ValueError(f"labels must have shape ({np.shape(x)[0]},) to match the inputs, "
                         f"got {np.shape(y)}")


def forward(params: Mapping, x: np.ndarray, masks: Sequence[np.ndarray] | None = None
            ) -> tuple[np.ndarray, Cache]:
    """Logits (B, 10) for inputs x (B, 784), and the cache that `backward` needs.

    `masks` are the dropout masks of `dropout_masks` (training) or None (evaluation: dropout is
    the identity then, which is the point of *inverted* dropout).
    """
    check_inputs(params, x)
    L = num_layers(params)
    A, inputs, gates = x, [], []
    for l in range(1, L):
        Z = A @ params[f"W{l}"]                               # (B, n_l)
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
    return _readonly(logits), Cache(tuple(inputs), tuple(gates), logits)


# ================================================================================================
# Loss: stable softmax, cross-entropy, L2
# ================================================================================================

def log_softmax(z: np.ndarray) -> np.ndarray:
    """log softmax(z) row-wise, computed as z - max - log(sum(exp(z - max))): never overflows."""
    shifted = z - z.max(axis=1, keepdims=True)                # (B, K), max of each row is 0
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def softmax(z: np.ndarray) -> np.ndarray:
    """softmax(z) row-wise. Subtracting the row maximum first keeps exp() in (0, 1]."""
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean over the batch of -log p(true class), straight from log_softmax (no clipping needed)."""
    return float(-log_softmax(logits)[np.arange(len(labels)), labels].mean())


def l2_penalty(params: Mapping, l2: float) -> float:
    """lambda * sum of squared weights, over the weight matrices only (biases are not penalised)."""
    return l2 * sum(float(np.vdot(w, w)) for k, w in params.items() if is_weight(k))


def total_loss(params: Mapping, x: np.ndarray, labels: np.ndarray, l2: float = 0.0,
               masks: Sequence[np.ndarray] | None = None) -> float:
    """The objective that `backward` differentiates: cross-entropy + L2 penalty."""
    logits, _ = forward(params, x, masks)
    return cross_entropy(logits, labels) + l2_penalty(params, l2)


# ================================================================================================
# Backward pass: the chain rule, layer by layer, from the loss to the first weights
# ================================================================================================

def backward(params: Mapping, cache: Cache, labels: np.ndarray, l2: float = 0.0) -> Params:
    """Gradients of `total_loss` with respect to every parameter, same keys and shapes as params.

    For softmax followed by cross-entropy averaged over B rows, dL/dZ_L = (softmax(Z_L) - onehot) / B.
    Then for each layer l = L, ..., 1 (A_{l-1} is the layer's input):
        dW_l = A_{l-1}^T dZ_l + 2 lambda W_l      (fan_in, fan_out)
        db_l = sum over the batch of dZ_l          (fan_out,)
        dA_{l-1} = dZ_l W_l^T                      (B, fan_in)
        dZ_{l-1} = dA_{l-1} * gate_{l-1}           ReLU and dropout, elementwise

    One line is about speed, not math: entries of dL/dZ_L below 1e-19 (float32) are set to zero.
    Confidently classified examples give probabilities like 1e-30, which multiplied through the
    weights become *subnormal* numbers that slow the CPU (see `flush_to_zero`). They are 10^15
    times smaller than the O(1/B) entries beside them, so the gradient does not change.
    """
    L = num_layers(params)
    B = len(labels)
    if cache.logits.shape[0] != B or np.ndim(labels) != 1:
        raise ValueError(f"labels must have shape ({cache.logits.shape[0]},) to match the batch, "
                         f"got {np.shape(labels)}")
    shapes = {k: np.shape(a) for k, a in params.items()}
    flat = np.empty(sum(math.prod(s) for s in shapes.values()), dtype=cache.logits.dtype)
    grads = split_flat(flat, shapes)                          # writable views, filled below
    dZ = softmax(cache.logits)                                # (B, 10)
    dZ[np.arange(B), labels] -= 1.0
    dZ /= B                                                   # dL/dZ_L
    dZ = flush_to_zero(dZ)                                    # see flush_to_zero
    for l in range(L, 0, -1):
        A_prev, W = cache.inputs[l - 1], params[f"W{l}"]
        np.matmul(A_prev.T, dZ, out=grads[f"W{l}"])           # (fan_in, fan_out)
        if l2:
            grads[f"W{l}"] += (2.0 * l2) * W
        np.sum(dZ, axis=0, out=grads[f"b{l}"])                # (fan_out,)
        if l > 1:
            dA = dZ @ W.T                                     # (B, fan_in)
            dZ = np.multiply(dA, cache.gates[l - 2], out=dA)  # (B, fan_in)
    return Params(flat, shapes)


# ================================================================================================
# Optimizer: Adam, as a pure function of (params, grads, state)
# ================================================================================================

class AdamState(NamedTuple):
    """Adam's memory: the step count t and running first (m) and second (v) moments of the gradient."""

    step: int
    m: Params
    v: Params


def adam_init(params: Mapping) -> AdamState:
    params = Params.from_arrays(params)
    zeros = np.zeros_like(params.flat)
    return AdamState(0, params.like(zeros), params.like(zeros.copy()))


def adam_step(params: Mapping, grads: Mapping, state: AdamState, lr: float = 1e-3,
              beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, l2: float = 0.0
              ) -> tuple[Params, AdamState]:
    """One Adam update; returns new parameters and new state, leaving the inputs untouched.

        g   = grads + 2 l2 W                       (only if l2 > 0: see below)
        m_t = beta1 m + (1 - beta1) g              running mean of gradients
        v_t = beta2 v + (1 - beta2) g^2            running mean of squared gradients
        p_t = p - lr/(1 - beta1^t) * m_t / (sqrt(v_t / (1 - beta2^t)) + eps)

    The bias corrections undo the zero start of m and v, so the first step has size ~lr in every
    coordinate whatever the gradient's scale. The last line is computed in the equivalent form
    p - step_size * m_t / (sqrt(v_t) + eps_hat), moving both corrections into two scalars.

    `l2` adds the L2 term's gradient 2 * l2 * W to the weights' gradients here, which is exactly
    what `backward(..., l2)` would have added (optax calls this `add_decayed_weights` before
    `scale_by_adam`). Training passes the data gradient from `backward(..., l2=0)` and l2 here,
    because here the addition costs one pass over numbers already in cache.

    Speed: the update is memory-bound (a dozen passes over 570k numbers), so it runs slice by
    slice; the seven arrays of one slice stay in the CPU's cache between passes.
    """
    if not lr > 0.0:
        raise ValueError(f"learning rate must be > 0, got {lr}")
    if not l2 >= 0.0:
        raise ValueError(f"l2 must be >= 0, got {l2}")
    params, grads = Params.from_arrays(params), Params.from_arrays(grads)
    if grads.shapes != params.shapes:
        raise ValueError(f"gradients {grads.shapes} do not match parameters {params.shapes}")
    if grads.flat.dtype != params.flat.dtype:
        raise ValueError(f"gradients are {grads.flat.dtype} but parameters are {params.flat.dtype}")
    t = state.step + 1
    bc1, bc2 = 1.0 - beta1 ** t, 1.0 - beta2 ** t
    step_size, eps_hat = lr * math.sqrt(bc2) / bc1, eps * math.sqrt(bc2)
    flush = t % FLUSH_EVERY == 0
    p, g, m, v = params.flat, grads.flat, state.m.flat, state.v.flat
    p_new, m_new, v_new = np.empty_like(p), np.empty_like(p), np.empty_like(p)
    n_w = params.num_weights                      # the flat vector holds weights, then biases
    for lo, hi, decay in ((0, n_w, 2.0 * l2), (n_w, p.size, 0.0)):
        for start in range(lo, hi, ADAM_SLICE):
            s = slice(start, min(start + ADAM_SLICE, hi))
            _adam_update(p[s], g[s], m[s], v[s], p_new[s], m_new[s], v_new[s],
                         beta1, beta2, step_size, eps_hat, decay, flush)
    return params.like(p_new), AdamState(t, params.like(m_new), params.like(v_new))


ADAM_SLICE = 32_768     # numbers per slice: 7 arrays x 128 KiB (float32) fit in a 2 MiB L2 cache
FLUSH_EVERY = 16        # steps between flushes of tiny numbers (see flush_to_zero)


def _adam_update(p, g, m, v, p_out, m_out, v_out, beta1, beta2, step_size, eps_hat,
                 decay, flush) -> None:
    """Adam's formulas on one slice, written into the fresh outputs without temporaries."""
    if decay:                                    # g + decay * p, built in p_out as scratch
        np.multiply(p, decay, out=p_out)
        p_out += g
        g = p_out
    np.square(g, out=v_out)                      # v + (1 - b2)(g^2 - v)
    v_out -= v
    v_out *= 1.0 - beta2
    v_out += v
    np.subtract(g, m, out=m_out)                 # m + (1 - b1)(g - m)
    m_out *= 1.0 - beta1
    m_out += m
    np.sqrt(v_out, out=p_out)                    # p - step_size * m / (sqrt(v) + eps_hat)
    p_out += eps_hat
    np.divide(m_out, p_out, out=p_out)
    p_out *= -step_size
    p_out += p
    if flush:                                    # see flush_to_zero: subnormals are slow
        flush_to_zero(p_out, root=4)
        flush_to_zero(m_out)
        flush_to_zero(v_out)


def flush_to_zero(a: np.ndarray, root: int = 2) -> np.ndarray:
    """Set numbers below tiny**(1/root) to zero, in place on a fresh array (tiny: the smallest
    normal float, 1.2e-38 in float32). Returns `a`.

    Why: a ReLU unit that never fires gets no gradient but the L2 term, and Adam then pulls its
    weights to zero geometrically (about x0.95 per step once |2 lambda W| < eps), down through
    the *subnormal* numbers below tiny. x86 CPUs compute with subnormals up to 20x slower, in
    matrix products too: left alone, the report's recipe slows from 2 s to 25 s an epoch by
    epoch 25. CPUs can flush them in hardware (the FTZ/DAZ flags PyTorch sets with
    `torch.set_flush_denormal`); NumPy cannot, so we zero numbers before they get there:
    moments and dL/dZ below sqrt(tiny) (1e-19 in float32), so that their products stay normal,
    and weights below tiny**(1/4) (2e-10), so that even (1 - beta2) * (2 lambda W)^2 does.
    Neither changes anything at float32 resolution: such a weight is 10^-9 of the sums it enters.
    Adam flushes every FLUSH_EVERY = 16 steps, which is often enough: from these thresholds,
    decaying by x0.95 (weights) or x0.9 (m) a step, nothing reaches tiny in fewer than 400 steps.

    Two roundings do it in two passes: near c = 2^(mantissa bits + 1) * threshold, floats are
    2 * threshold apart, so adding c sends every |x| < threshold to c, and subtracting c leaves 0.
    Other numbers move by at most 2 * threshold or one unit in their last place, and not at all
    once they are 2^(mantissa bits) times larger than c.
    """
    info = np.finfo(a.dtype)
    c = a.dtype.type(info.tiny ** (1.0 / root) * 2.0 ** (info.nmant + 1))
    a += c
    a -= c
    return a


# ================================================================================================
# Training: epochs of forward -> backward -> Adam, early stopping
# ================================================================================================

OnStep = Callable[[int, int, float, float], None]   # (step, steps, running loss, running accuracy)


class EpochStats(NamedTuple):
    """Running averages over an epoch's batches (with dropout on): loss and accuracy."""

    loss: float
    accuracy: float


def batches(n: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Index arrays of a fresh random permutation of range(n), batch_size at a time."""
    order = rng.permutation(n)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


def train_epoch(params: Mapping, opt_state: AdamState, x: np.ndarray, y: np.ndarray,
                config: Config = Config(), epoch: int = 1, on_step: OnStep | None = None
                ) -> tuple[Params, AdamState, EpochStats]:
    """One pass over (x, y) in shuffled mini-batches; returns new params, new Adam state, stats.

    Every random draw of the epoch (the shuffle, each batch's dropout masks) comes from
    `default_rng([config.seed, epoch])`, so an epoch is a pure function of its arguments.
    `on_step(step, steps, loss, accuracy)`, if given, hears the running averages after each
    batch (for a progress bar); it cannot change the result.
    """
    check_inputs(params, x, y)
    params = Params.from_arrays(params)
    if x.dtype != params.flat.dtype:
        raise ValueError(f"inputs are {x.dtype} but parameters are {params.flat.dtype}; "
                         f"make them the same dtype")
    rng = np.random.default_rng([config.seed, epoch])
    hidden = layer_sizes_of(params)[1:-1]
    loss_sum, correct, seen = 0.0, 0, 0
    steps = -(-len(y) // config.batch_size)
    for step, idx in enumerate(batches(len(y), config.batch_size, rng), start=1):
        xb, yb = x[idx], y[idx]                               # (B, 784), (B,)
        masks = dropout_masks(rng, len(idx), hidden, config.dropout, params.flat.dtype)
        logits, cache = forward(params, xb, masks)
        grads = backward(params, cache, yb)                   # data gradient; L2's is added by Adam
        params, opt_state = adam_step(params, grads, opt_state, config.lr, config.beta1,
                                      config.beta2, config.eps, config.l2)
        batch_loss = cross_entropy(logits, yb)
        if not math.isfinite(batch_loss):
            raise DivergedError(f"loss became {batch_loss} at epoch {epoch}, step {step}; "
                                f"try a smaller learning rate (--lr, now {config.lr})")
        loss_sum += batch_loss * len(idx)
        correct += int((logits.argmax(axis=1) == yb).sum())
        seen += len(idx)
        if on_step is not None:
            on_step(step, steps, loss_sum / seen, correct / seen)
    if not np.isfinite(params.flat).all():
        raise DivergedError(f"parameters became non-finite in epoch {epoch}; "
                            f"try a smaller learning rate (--lr, now {config.lr})")
    return params, opt_state, EpochStats(loss_sum / len(y), correct / len(y))


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


class TrainState(NamedTuple):
    """Everything needed to continue training after `epoch` epochs: a run is a fold over these."""

    params: Params
    opt_state: AdamState
    epoch: int
    best: Best
    best_params: Params


def initial_state(config: Config) -> TrainState:
    params = init_params(config.layer_sizes, config.seed, config.dtype)
    return TrainState(params, adam_init(params), 0, Best(), params)


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
        val = evaluate(params, splits.x_val, splits.y_val)
        best = early_stopping_update(state.best, epoch, val.correct)
        best_params = params if best.epoch == epoch else state.best_params
        state = TrainState(params, opt_state, epoch, best, best_params)
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


def predict_logits(params: Mapping, x: np.ndarray, chunk: int = 10_000) -> np.ndarray:
    """Logits (N, 10) without dropout, computed `chunk` rows at a time to bound memory."""
    check_inputs(params, x)
    return np.concatenate([forward(params, x[i:i + chunk])[0] for i in range(0, len(x), chunk)]
                          or [np.empty((0, NUM_CLASSES))])


def evaluate(params: Mapping, x: np.ndarray, y: np.ndarray, chunk: int = 10_000) -> Evaluation:
    """Evaluate without dropout: the network as it will be used."""
    check_inputs(params, x, y)
    if len(y) == 0:
        raise ValueError("cannot evaluate on zero examples")
    logits = predict_logits(params, x, chunk)
    predictions = _readonly(logits.argmax(axis=1))
    correct = int((predictions == y).sum())
    return Evaluation(cross_entropy(logits, y), correct / len(y), correct, predictions)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, k: int = NUM_CLASSES) -> np.ndarray:
    """C[i, j] = how many examples of true class i were predicted as class j."""
    for name, a in (("true labels", y_true), ("predictions", y_pred)):
        if np.size(a) and not 0 <= np.min(a) <= np.max(a) < k:
            raise ValueError(f"{name} must be classes 0..{k - 1}, got values {np.min(a)}..{np.max(a)}")
    if np.shape(y_true) != np.shape(y_pred):
        raise ValueError(f"true labels {np.shape(y_true)} and predictions {np.shape(y_pred)} differ in shape")
    return np.bincount(np.asarray(y_true) * k + np.asarray(y_pred), minlength=k * k).reshape(k, k)


class ClassMetrics(NamedTuple):
    """Per-class precision, recall, F1 (arrays of length k) and support (true count per class)."""

    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    support: np.ndarray


def per_class_metrics(confusion: np.ndarray) -> ClassMetrics:
    """precision = TP / predicted, recall = TP / actual, F1 = their harmonic mean; 0 where undefined."""
    tp = np.diag(confusion).astype(float)
    predicted, actual = confusion.sum(axis=0), confusion.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return ClassMetrics(precision, recall, f1, actual)


def top_confusions(confusion: np.ndarray, n: int = 6) -> list[tuple[int, int, int, int]]:
    """The n class pairs (i, j), i < j, most often mistaken for each other, counted both ways:
    (i, j, i-predicted-as-j, j-predicted-as-i), largest total first."""
    k = len(confusion)
    pairs = [(i, j, int(confusion[i, j]), int(confusion[j, i]))
             for i in range(k) for j in range(i + 1, k)]
    pairs.sort(key=lambda p: (-(p[2] + p[3]), p[0], p[1]))
    return [p for p in pairs[:n] if p[2] + p[3] > 0]


def full_evaluation(params: Mapping, splits: Splits) -> dict:
    """The final figures of a run: train (no dropout), validation and test; per-class test metrics."""
    result = {}
    for name, x, y in (("train", splits.x_train, splits.y_train), ("val", splits.x_val, splits.y_val),
                       ("test", splits.x_test, splits.y_test)):
        ev = evaluate(params, x, y)
        result[f"{name}_loss"], result[f"{name}_accuracy"] = ev.loss, ev.accuracy
    confusion = confusion_matrix(splits.y_test, ev.predictions)
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
# Checkpoints and run directories: atomic writes, loads that never unpickle
# ================================================================================================

CHECKPOINT_FORMAT = "fmnist-checkpoint-1"


def atomic_write(path: Path, write: Any) -> None:
    """Write a file so that it is either the old one or the complete new one, never half of each:
    write a temporary file in the same folder, flush and fsync it, then os.replace it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def save_checkpoint(path: Path, params: Mapping, config: Config, **extra: Any) -> None:
    """Parameters as named arrays plus the config as a JSON string: an .npz with no pickles."""
    check_params_fit(params, config.layer_sizes, "save_checkpoint")
    meta = json.dumps({"format": CHECKPOINT_FORMAT, "config": config.to_json(), **extra})
    arrays = {k: np.asarray(a) for k, a in params.items()} | {"meta": np.array(meta)}
    atomic_write(path, lambda f: np.savez(f, **arrays))


def _read_npz(path: Path, expected_format: str) -> tuple[dict[str, np.ndarray], dict]:
    """The arrays and the JSON metadata of an .npz we wrote; never unpickles anything."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise CheckpointError(f"{path}: refused: it holds a pickled object array, "
                                  f"which could run code when loaded") from None
        raise CheckpointError(f"{path}: not a readable .npz file ({e})") from None
    except Exception as e:  # zipfile.BadZipFile, OSError, EOFError, ...
        raise CheckpointError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    try:
        meta = json.loads(str(arrays.pop("meta")[()]))
        if meta.get("format") != expected_format:
            raise ValueError(f"format {meta.get('format')!r}, expected {expected_format!r}")
        meta["config"] = Config.from_json(meta["config"])
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: not an fmnist file of this kind (bad or missing "
                              f"metadata: {e})") from None
    return arrays, meta


def _check_array(path: Path, name: str, a: np.ndarray, shape: tuple, config: Config) -> None:
    if a.shape != shape:
        raise CheckpointError(f"{path}: {name} has shape {a.shape}, but the stored config "
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
        raise CheckpointError(f"{path}: holds arrays {sorted(arrays)}, expected {list(expected)}")
    for name, shape in expected.items():
        _check_array(path, name, arrays[name], shape, config)
    return Params.from_arrays({k: arrays[k] for k in expected}, config.dtype), config, meta


STATE_FORMAT = "fmnist-train-state-1"
STATE_ARRAYS = ("params", "m", "v", "best_params")


def save_state(path: Path, state: TrainState, config: Config, history: list[dict]) -> None:
    """Everything `train --resume` needs, in one file (so it can never be half old, half new):
    the flat vectors of parameters, Adam's moments and the best parameters, plus JSON metadata."""
    meta = json.dumps({"format": STATE_FORMAT, "config": config.to_json(),
                       "step": state.opt_state.step, "epoch": state.epoch,
                       "best": list(state.best), "history": history})
    flats = (state.params.flat, state.opt_state.m.flat, state.opt_state.v.flat,
             state.best_params.flat)
    arrays = dict(zip(STATE_ARRAYS, flats)) | {"meta": np.array(meta)}
    atomic_write(path, lambda f: np.savez(f, **arrays))


def load_state(path: str | Path) -> tuple[TrainState, Config, list[dict]]:
    """Read back what save_state wrote, validated against its config."""
    path = Path(path)
    arrays, meta = _read_npz(path, STATE_FORMAT)
    config = meta["config"]
    shapes = param_shapes(config.layer_sizes)
    size = sum(math.prod(s) for s in shapes.values())
    if set(arrays) != set(STATE_ARRAYS):
        raise CheckpointError(f"{path}: holds arrays {sorted(arrays)}, expected {list(STATE_ARRAYS)}")
    for name in STATE_ARRAYS:
        _check_array(path, name, arrays[name], (size,), config)
    params, m, v, best_params = (Params(arrays[k].copy(), shapes) for k in STATE_ARRAYS)
    try:
        best, step, epoch, history = Best(*meta["best"]), meta["step"], meta["epoch"], meta["history"]
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: incomplete training state ({e})") from None
    return TrainState(params, AdamState(step, m, v), epoch, best, best_params), config, history


def check_params_fit(params: Mapping, expected_sizes: Sequence[int], what: str) -> None:
    actual = layer_sizes_of(params)
    if tuple(actual) != tuple(expected_sizes):
        raise CheckpointError(f"{what}: network is {'-'.join(map(str, actual))}, "
                              f"expected {'-'.join(map(str, expected_sizes))}")


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
# Command line
# ================================================================================================

def run_train(args: argparse.Namespace, config: Config) -> int:
    """`train`: fit, saving the full state every epoch, then evaluate and write the run directory."""
    out, state, history = _prepare_run_dir(args, config)
    if state is not None:
        config = load_state(out / "state.npz")[1]
    splits = make_splits(load_fashion_mnist(args.data_dir), config)
    print(f"{'resuming' if state else 'training'} {'-'.join(map(str, config.layer_sizes))} on "
          f"{len(splits.y_train):,} images ({len(splits.y_val):,} validation), {config.dtype}"
          f"{f' after epoch {state.epoch}' if state else ''}; run directory {out}", flush=True)
    progress = _progress_bar(quiet=args.quiet)
    try:
        for state, record in fit(splits, config, state, progress):
            history.append(record)
            if state.best.epoch == state.epoch:
                save_checkpoint(out / "best.npz", state.best_params, config, epoch=state.epoch)
            save_state(out / "state.npz", state, config, history)
            write_json(out / "history.json", history)
            print(format_epoch(record), flush=True)
    except KeyboardInterrupt:
        done = f"after epoch {state.epoch}" if state else "before the first epoch ended"
        print(f"\ninterrupted; the run is saved {done}. Resume it with:\n"
              f"  python fmnist.py train --resume {out}", file=sys.stderr)
        return 130
    except DivergedError as e:
        best = out / "best.npz"
        kept = f"; the best checkpoint so far is intact at {best}" if best.exists() else ""
        raise DivergedError(f"{e}{kept}") from None
    stopped_early = state.epoch < config.epochs
    metrics = full_evaluation(state.best_params, splits) | {
        "best_epoch": state.best.epoch, "epochs_run": state.epoch, "stopped_early": stopped_early,
        "train_seconds": sum(r["seconds"] for r in history)}
    write_json(out / "metrics.json", metrics)
    print(("early stopping after epoch %d\n" % state.epoch if stopped_early else "")
          + format_results(metrics), flush=True)
    print(f"run directory: {out}")
    return 0


def _prepare_run_dir(args: argparse.Namespace, config: Config
                     ) -> tuple[Path, TrainState | None, list[dict]]:
    """The run directory, and the state and history to continue from (None, [] for a new run).
    Refuses to overwrite a run by accident."""
    if args.resume:
        out = Path(args.resume)
        if (out / "metrics.json").exists():
            raise CheckpointError(f"{out}: this run has already finished; nothing to resume")
        if config != Config():
            raise ValueError("--resume continues a run with its stored settings; "
                             "do not pass hyperparameters with it")
        state, _, history = load_state(out / "state.npz")
        return out, state, history
    out = Path(args.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    for name, what in (("metrics.json", "a finished run"), ("state.npz", "an unfinished run")):
        if (out / name).exists() and not args.force:
            raise CheckpointError(f"{out}: already holds {what}; choose another --out, "
                                  f"{'resume it with --resume, ' if name == 'state.npz' else ''}"
                                  f"or pass --force to overwrite it")
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").unlink(missing_ok=True)       # --force: the old result is void now
    write_json(out / "config.json", config.to_json())
    return out, None, []


def _progress_bar(quiet: bool) -> OnStep | None:
    """A tqdm bar over each epoch's batches with the running loss and accuracy, shown only on a
    terminal (a pipe or CI log gets clean line-per-epoch text), and never with --quiet."""
    if quiet or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    bar = None

    def on_step(step: int, steps: int, loss: float, accuracy: float) -> None:
        nonlocal bar
        if step == 1:
            bar = tqdm(total=steps, unit="batch", leave=False, dynamic_ncols=True)
        bar.update(1)
        if step % 10 == 0 or step == steps:
            bar.set_postfix_str(f"loss {loss:.4f} acc {accuracy:.2%}", refresh=False)
        if step == steps:
            bar.close()
    return on_step


def run_evaluate(args: argparse.Namespace) -> int:
    params, config, meta = load_checkpoint(args.checkpoint)
    splits = make_splits(load_fashion_mnist(args.data_dir), config)
    metrics = full_evaluation(params, splits)
    print(f"checkpoint {args.checkpoint}: {'-'.join(map(str, config.layer_sizes))}, "
          f"epoch {meta.get('epoch', '?')}")
    print(format_results(metrics))
    return 0


def _whole_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    return value


def _hidden_sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(h) for h in text.split(",")) if text.strip() else ()
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer widths such as 512,256,128, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fmnist", description="A Fashion-MNIST MLP in NumPy, from scratch, as pure functions.")
    parser.add_argument("--version", action="version", version=f"fmnist {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    d = Config()
    train = commands.add_parser("train", help="train the report's MLP and evaluate it",
                                description="Train on the shipped data with the report's recipe "
                                            "(every default below is the report's value).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train.add_argument("--hidden", type=_hidden_sizes, default=d.hidden,
                       help="hidden layer widths, comma-separated")
    train.add_argument("--dropout", type=float, default=d.dropout, help="dropout rate on hidden layers")
    train.add_argument("--l2", type=float, default=d.l2, help="L2 strength lambda")
    train.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate")
    train.add_argument("--beta1", type=float, default=d.beta1, help="Adam beta1")
    train.add_argument("--beta2", type=float, default=d.beta2, help="Adam beta2")
    train.add_argument("--eps", type=float, default=d.eps, help="Adam epsilon")
    train.add_argument("--batch-size", type=_whole_number, default=d.batch_size, help="mini-batch size")
    train.add_argument("--epochs", type=_whole_number, default=d.epochs, help="maximum epochs")
    train.add_argument("--patience", type=_whole_number, default=d.patience,
                       help="early stopping: epochs without a better validation accuracy "
                            "(0: never stop early)")
    train.add_argument("--seed", type=_whole_number, default=d.seed,
                       help="seed for initialisation, shuffling and dropout")
    train.add_argument("--split-seed", type=_whole_number, default=d.split_seed,
                       help="seed of the train/validation permutation")
    train.add_argument("--dtype", choices=DTYPES, default=d.dtype, help="floating-point type")
    train.add_argument("--limit", type=_whole_number, default=None,
                       help="train on the first N training images only (quick tries)")
    train.add_argument("--data-dir", type=Path, default=Path("data"), help="folder with the IDX files")
    train.add_argument("--out", type=Path, default=None,
                       help="run directory (default: runs/<timestamp>)")
    train.add_argument("--force", action="store_true",
                       help="overwrite a run already in --out")
    train.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                       help="continue an interrupted run from its last saved epoch, "
                            "with its stored settings (the result is bit-identical)")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    evaluate_cmd = commands.add_parser("evaluate", help="evaluate a saved checkpoint",
                                       description="Print the full evaluation of a checkpoint.")
    evaluate_cmd.add_argument("checkpoint", type=Path, help="a best.npz written by train")
    evaluate_cmd.add_argument("--data-dir", type=Path, default=Path("data"),
                              help="folder with the IDX files")
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    fields = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: v for k, v in vars(args).items() if k in fields})


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            try:
                config = config_from_args(args)
            except ValueError as e:     # a hyperparameter out of range: a usage error, exit 2
                parser.exit(2, f"{parser.prog} train: error: {e}\n")
            return run_train(args, config)
        if args.command == "evaluate":
            return run_evaluate(args)
    except (FmnistError, ValueError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
