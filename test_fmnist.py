"""Properties of fmnist.py, one claim per test; each docstring says why the claim must hold.

Gradient checks and softmax stability live in test_gradients.py; this file covers everything else:
initialisation, purity, Adam, dropout, augmentation, training (with its learning-rate schedule and
weight averaging), early stopping, resuming, metrics, the split, the real data, the loader,
checkpoints, determinism, the command line (recipes included), bad input (every error is one
clear line and nothing is lost) and the user's tour (pictures, report, predict, gradcheck,
download). Hypothesis is used where a property ranges over inputs; a worked example is used where
it is clearer. The real data is loaded once per module; networks and subsets are kept small.
"""

import argparse
import dataclasses
import functools
import gzip
import hashlib
import http.server
import inspect
import io
import json
import math
import os
import re
import resource
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import types
import zlib
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fmnist
from fmnist import (DATA_FILES, MAX_IDX_BYTES, AdamState, Best, CheckpointError, Config, DataError,
                    Params, RawData, adam_init, adam_step, backward, confusion_matrix, cross_entropy,
                    dropout_masks, early_stopping_update, evaluate, fit, forward, init_params,
                    load_checkpoint, load_fashion_mnist, make_splits, normalise, parse_idx,
                    per_class_metrics, predict_logits, read_idx, save_checkpoint, should_stop,
                    split_indices, top_confusions, train_epoch)

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
REPORT_SIZES = (784, 512, 256, 128, 10)


# ================================================================================================
# Fixtures, helpers and strategies
# ================================================================================================

@pytest.fixture(scope="module")
def raw() -> RawData:
    """The shipped Fashion-MNIST arrays, loaded (and checksummed) once for the whole module."""
    return load_fashion_mnist(DATA)


def exit_code_of_main(argv) -> int:
    """fmnist.main(argv) in this process, for a command that ends in SystemExit (--help, a usage
    error): its exit code."""
    with pytest.raises(SystemExit) as stopped:
        fmnist.main(argv)
    return stopped.value.code


def writable(params) -> dict:
    """A plain dict of fresh, writable copies: a function that wrote into its inputs could, here."""
    return {k: np.array(v) for k, v in params.items()}


def deep_copy(obj):
    """Arrays copied, mappings -> dicts, tuples (named or not) -> tuples; anything else as is."""
    if isinstance(obj, np.ndarray):
        return obj.copy()
    if isinstance(obj, Mapping):
        return {k: deep_copy(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return tuple(deep_copy(v) for v in obj)
    return obj


def assert_same(a, b, where="args"):
    """Equal structure, and arrays equal in shape, dtype and every bit."""
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape, where
        assert a.tobytes() == b.tobytes(), f"{where} changed"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, tuple):
        assert isinstance(b, tuple) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def arrays_in(obj):
    """Every ndarray inside a structure of mappings and tuples."""
    if isinstance(obj, np.ndarray):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from arrays_in(v)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from arrays_in(v)


def bits(params) -> bytes:
    return b"".join(np.ascontiguousarray(a).tobytes() for a in params.values())


@st.composite
def networks(draw, min_hidden=0):
    """A small float64 network: 1-12 inputs, `min_hidden`-3 hidden layers of 1-12 units, 2-5 classes,
    with nonzero biases so that they take part."""
    sizes = (draw(st.integers(1, 12)),
             *draw(st.lists(st.integers(1, 12), min_size=min_hidden, max_size=3)),
             draw(st.integers(2, 5)))
    seed = draw(st.integers(0, 2**32 - 1))
    params = init_params(sizes, seed, "float64")
    rng = np.random.default_rng(seed + 1)
    return Params.from_arrays({k: v + rng.normal(0, 0.5, v.shape) if k.startswith("b") else v
                               for k, v in params.items()})


def batch_for(params, draw, min_size=1):
    """Inputs (B, n_in) with bounded float64 elements for `params`."""
    b = draw(st.integers(min_size, 8))
    return draw(hnp.arrays(np.float64, (b, params["W1"].shape[0]),
                           elements=st.floats(-3, 3, allow_nan=False)))


# ================================================================================================
# Initialisation
# ================================================================================================

def test_init_std_is_he_for_hidden_layers_and_xavier_for_the_output():
    """He keeps ReLU activations' variance constant and Xavier suits the linear output (report 3.1).

    Pooled over 16 seeds, so that even W4's 1,280 numbers per draw tell Xavier (0.1204) from He (0.125).
    """
    draws = [init_params(REPORT_SIZES, seed) for seed in range(16)]
    for l, (fan_in, fan_out) in enumerate(zip(REPORT_SIZES[:-1], REPORT_SIZES[1:]), start=1):
        w = np.concatenate([p[f"W{l}"].ravel() for p in draws]).astype(np.float64)
        expected = np.sqrt(2 / fan_in) if l < 4 else np.sqrt(2 / (fan_in + fan_out))
        rel_se = 1 / np.sqrt(2 * w.size)              # standard error of a sample std, relative
        assert abs(w.std() / expected - 1) < max(4 * rel_se, 0.005), (l, w.std(), expected)
        assert abs(w.mean()) < 4 * expected / np.sqrt(w.size), (l, w.mean())


def test_init_report_network_single_seed_std_within_a_few_percent():
    """The report's network as actually initialised (seed 42) has the He/Xavier scales to within 6%."""
    p = init_params(REPORT_SIZES, 42)
    expected = [np.sqrt(2 / 784), np.sqrt(2 / 512), np.sqrt(2 / 256), np.sqrt(2 / (128 + 10))]
    for l, e in enumerate(expected, start=1):
        assert abs(p[f"W{l}"].std(dtype=np.float64) / e - 1) < 0.06, l


@given(sizes=st.lists(st.integers(1, 20), min_size=2, max_size=5), seed=st.integers(0, 2**32 - 1),
       dtype=st.sampled_from(["float32", "float64"]))
def test_init_keys_shapes_dtype_and_zero_biases(sizes, seed, dtype):
    """Every later stage relies on W1, b1, ..., WL, bL with W_l (fan_in, fan_out) and b_l starting at 0."""
    p = init_params(sizes, seed, dtype)
    L = len(sizes) - 1
    assert list(p) == [k for l in range(1, L + 1) for k in (f"W{l}", f"b{l}")]
    for l in range(1, L + 1):
        assert p[f"W{l}"].shape == (sizes[l - 1], sizes[l])
        assert p[f"b{l}"].shape == (sizes[l],)
        assert p[f"W{l}"].dtype == p[f"b{l}"].dtype == np.dtype(dtype)
        assert not p[f"b{l}"].any()
    assert fmnist.layer_sizes_of(p) == tuple(sizes)


@given(sizes=st.lists(st.integers(1, 20), min_size=2, max_size=5), seed=st.integers(0, 2**32 - 1))
def test_init_with_batch_norm_adds_unit_scales_to_the_same_weights(sizes, seed):
    """Batch norm adds a scale g_l = 1 per hidden layer (not the output) and changes no draw: the
    weights and biases are those of the plain network of the same seed, so the two compare."""
    plain, normed = init_params(sizes, seed), init_params(sizes, seed, batch_norm=True)
    hidden = range(1, len(sizes) - 1)
    assert set(normed) == set(plain) | {f"g{l}" for l in hidden}
    for name in plain:
        assert bits({name: plain[name]}) == bits({name: normed[name]}), name
    for l in hidden:
        assert normed[f"g{l}"].shape == (sizes[l],) and (normed[f"g{l}"] == 1).all()
    assert fmnist.has_batch_norm(normed) == (len(sizes) > 2) and not fmnist.has_batch_norm(plain)
    assert fmnist.layer_sizes_of(normed) == tuple(sizes)
    assert normed.num_weights == plain.num_weights          # AdamW and L2 leave g alone


def test_init_same_seed_is_bit_identical_other_seed_differs():
    """Randomness comes only from the seed argument, so a run can be reproduced exactly."""
    a, b, c = (init_params(REPORT_SIZES, s) for s in (7, 7, 8))
    assert bits(a) == bits(b)
    for k in ("W1", "W2", "W3", "W4"):
        assert not np.array_equal(a[k], c[k]), k


# ================================================================================================
# Purity: inputs are never written to; outputs are read-only
# ================================================================================================

def _setup():
    rng = np.random.default_rng(0)
    params = writable(init_params((12, 8, 6, 4), seed=1, dtype="float64"))
    x, y = rng.normal(size=(10, 12)), rng.integers(0, 4, size=10)
    masks = [np.array(m) for m in dropout_masks(2, 10, (8, 6), 0.5, "float64")]
    return params, x, y, masks


def _raw_small():
    rng = np.random.default_rng(1)
    return RawData(rng.integers(0, 256, (100, 28, 28), dtype=np.uint8),
                   rng.integers(0, 10, 100).astype(np.uint8),
                   rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
                   rng.integers(0, 10, 20).astype(np.uint8))


def _call_forward(setup=_setup):
    params, x, _, masks = setup()
    return forward, (params, x, masks)


def _call_backward(setup=_setup):
    params, x, y, masks = setup()
    _, cache = forward(params, x, masks)
    return backward, (params, cache, y, 1e-3)


def _call_adam_step():
    params, x, y, _ = _setup()
    grads = writable(backward(params, forward(params, x)[1], y))
    state = adam_step(params, grads, adam_init(params))[1]      # nonzero moments, step 1
    return adam_step, (params, grads, state, 1e-2)


def _call_train_epoch(setup=_setup, batch_norm=False):
    params, x, y, _ = setup()
    config = Config(hidden=(8, 6), batch_size=4, dropout=0.2, dtype="float64", batch_norm=batch_norm)
    return train_epoch, (params, adam_init(params), x, y, config, 3)


def _call_train_epoch_with_every_option():
    """Augmentation needs whole 28 x 28 images, so 784 inputs here."""
    config = Config(hidden=(8,), batch_size=4, dtype="float64", lr_schedule="cosine", flip=0.5,
                    shift=1, label_smoothing=0.1, average=0.5, flip_average=True, cutout=5,
                    input_dropout=0.1, weight_decay=0.5)
    params = writable(init_params(config.layer_sizes, seed=1, dtype="float64"))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(10, 784)), rng.integers(0, 10, size=10)
    return train_epoch, (params, adam_init(params), x, y, config, 3)


def _setup_batch_norm():
    """_setup's batch and masks, for its network with batch norm (biases and scales g drawn
    away from init's 0 and 1)."""
    _, x, y, masks = _setup()
    params = init_params((12, 8, 6, 4), seed=1, dtype="float64", batch_norm=True)
    rng = np.random.default_rng(5)
    params = {k: np.array(v) + (rng.normal(0, 0.3, v.shape) if k[0] in "bg" else 0.0)
              for k, v in params.items()}
    return params, x, y, masks


def _call_fold_batch_norm():
    params, x, _, _ = _setup_batch_norm()
    return fmnist.fold_batch_norm, (params, x, 3)


def _call_augment():
    x = np.random.default_rng(0).normal(size=(6, 784))
    return fmnist.augment, (x, np.random.default_rng(1), 0.5, 2)


def _call_augment_cutout_and_input_dropout_only():
    """No flip or shift: cut_out then starts from x itself, not from a copy."""
    x = np.random.default_rng(0).normal(size=(6, 784))
    return fmnist.augment, (x, np.random.default_rng(1), 0.0, 0, 7, 0.3)


def _call_adamw_step():
    """AdamW with L2 too: the shrink path of the kernel, writing into fresh arrays."""
    params, state_args = _call_adam_step()[1][0], _call_adam_step()[1][1:3]
    return adam_step, (params, *state_args, 1e-2, 0.9, 0.999, 1e-8, 1e-3, 0.5)


def _call_average_params():
    average = init_params((12, 8, 4), seed=1, dtype="float64")
    return fmnist.average_params, (average, init_params((12, 8, 4), seed=2, dtype="float64"), 0.9)


PURE_CALLS = {   # name -> () -> (function, fresh writable arguments)
    "init_params": lambda: (init_params, ([12, 8, 4], 3, "float64")),
    "forward": _call_forward,
    "backward": _call_backward,
    "adam_step": _call_adam_step,
    "train_epoch": _call_train_epoch,
    "train_epoch (all options)": _call_train_epoch_with_every_option,
    "augment": _call_augment,
    "augment (cutout and input dropout only)": _call_augment_cutout_and_input_dropout_only,
    "adam_step (AdamW)": _call_adamw_step,
    "average_params": _call_average_params,
    "forward (batch norm)": partial(_call_forward, _setup_batch_norm),
    "backward (batch norm)": partial(_call_backward, _setup_batch_norm),
    "train_epoch (batch norm)": partial(_call_train_epoch, _setup_batch_norm, batch_norm=True),
    "fold_batch_norm": _call_fold_batch_norm,
    "evaluate": lambda: (evaluate, _setup()[:3]),
    "predict_logits": lambda: (predict_logits, (_setup()[0], _setup()[1], 3)),
    "dropout_masks": lambda: (dropout_masks, (5, 16, [8, 5], 0.25)),
    "make_splits": lambda: (make_splits, (_raw_small(), Config(val_size=10, limit=30))),
    "confusion_matrix": lambda: (confusion_matrix, (np.array([0, 1, 2, 2]), np.array([0, 2, 2, 1]), 3)),
    "per_class_metrics": lambda: (per_class_metrics, (np.array([[2, 1], [0, 3]]),)),
}

@pytest.mark.parametrize("name", PURE_CALLS)
def test_public_functions_leave_their_inputs_unchanged(name):
    """Every stage returns new values and never writes into its arguments (module docstring)."""
    fn, args = PURE_CALLS[name]()
    before = deep_copy(args)
    fn(*args)
    assert_same(deep_copy(args), before, name)


@pytest.mark.parametrize("name", ["init_params", "forward", "backward", "adam_step", "train_epoch",
                                  "train_epoch (all options)", "evaluate", "dropout_masks",
                                  "make_splits", "augment", "augment (cutout and input dropout only)",
                                  "adam_step (AdamW)", "average_params", "forward (batch norm)",
                                  "backward (batch norm)", "train_epoch (batch norm)",
                                  "fold_batch_norm", "predict_logits"])
def test_returned_arrays_are_read_only(name):
    """Read-only results turn 'never writes into its inputs' into a check for every later caller."""
    fn, args = PURE_CALLS[name]()
    given_arrays = {id(a) for a in arrays_in(args)}     # the caller's own arrays passed back (cache.inputs[0])
    out = fn(*args)
    returned = [a for a in arrays_in(out) if id(a) not in given_arrays]
    assert returned, "nothing to check"
    for a in returned:
        with pytest.raises(ValueError, match="read-only"):
            a[...] = 0


def test_params_mapping_cannot_be_assigned_to():
    """Params is an immutable mapping: neither its entries nor its numbers can be replaced."""
    p = init_params((6, 4, 3), 0)
    with pytest.raises(TypeError):
        p["W1"] = np.zeros((6, 4), np.float32)
    with pytest.raises(TypeError):
        p["extra"] = np.zeros(1)
    with pytest.raises(TypeError):
        del p["b1"]
    with pytest.raises(ValueError):
        p["W1"][0, 0] = 1.0
    with pytest.raises(ValueError):
        p.flat[0] = 1.0
    assert not isinstance(p, dict) and len(p) == 4


def _misspelled(params):
    d = dict(params)
    d["w2"] = d.pop("W2")
    return d


def _with_cache_of(params, other):
    """backward(params, cache of forward(other, x), y)."""
    _, x, y, _ = _setup()
    return lambda: backward(params, forward(other, x)[1], y)


def _api_misuse():
    """(call, the words of its ValueError) for arguments a user can plausibly get wrong: each
    would otherwise give a silently wrong result or a deep NumPy error."""
    params, x, y, masks = _setup()
    bn = init_params((12, 8, 6, 4), seed=1, dtype="float64", batch_norm=True)
    images = np.random.default_rng(0).normal(size=(3, 784))
    rng = np.random.default_rng(0)
    state = adam_init(params)
    grads = backward(params, forward(params, x)[1], y)
    return {
        "misspelled weight": (lambda: predict_logits(_misspelled(params), x), "W2 is missing"),
        "bias of the wrong shape": (lambda: evaluate({**params, "b3": np.zeros(1)}, x, y), "not a network"),
        "an extra array": (lambda: forward({**params, "b4": np.zeros(4)}, x), "names missing or extra: b4"),
        "float32 inputs, float64 network": (lambda: forward(params, x.astype(np.float32)),
                                            "inputs are float32 but parameters are float64"),
        "uint8 pixels": (lambda: evaluate(params, np.zeros((10, 12), np.uint8), y), "inputs are uint8"),
        "one mask for two layers": (lambda: forward(params, x, masks[0]), "dropout masks must be a tuple"),
        "mask of one row": (lambda: forward(params, x, [m[:1] for m in masks]), "dropout masks"),
        "cache without batch norm": (_with_cache_of(bn, fmnist.fold_batch_norm(bn, x)), "the cache does not"),
        "cache with batch norm": (_with_cache_of(params, bn), "the cache does not"),
        "label -1": (lambda: fmnist.total_loss(params, x, np.r_[y[:-1], -1]), "labels must be integers in 0..3"),
        "fewer labels": (lambda: fmnist.cross_entropy(forward(params, x)[0], y[:1]), "labels must have shape (10,)"),
        "no examples": (lambda: fmnist.cross_entropy(np.zeros((0, 4)), y[:0]), "zero examples"),
        "chunk 0": (lambda: predict_logits(params, x, 0), "chunk"),
        "chunk -1": (lambda: fmnist.fold_batch_norm(bn, x, -1), "chunk"),
        "one flat image": (lambda: fmnist.cut_out(images[0], rng, 4), "(batch, 784)"),
        "flip -0.5": (lambda: fmnist.augment(images, rng, flip=-0.5), "flip must be a probability"),
        "shift 30": (lambda: fmnist.augment(images, rng, shift=30), "shift must be a whole number"),
        "beta1 1": (lambda: adam_step(params, grads, state, beta1=1.0), "beta1 must be in [0, 1)"),
        "eps -1": (lambda: adam_step(params, grads, state, eps=-1.0), "eps must be > 0"),
        "step -1": (lambda: adam_step(params, grads, state._replace(step=-1)), "step must be"),
        "empty epoch": (lambda: train_epoch(params, state, x[:0], y[:0]), "at least one training example"),
        "float labels": (lambda: confusion_matrix(np.array([1.0]), np.array([1])), "integer classes"),
        "one-hot labels": (lambda: confusion_matrix(np.eye(3, dtype=int), np.eye(3, dtype=int)), "1-D"),
        "non-square confusion": (lambda: per_class_metrics(np.ones((2, 3), int)), "square matrix of counts"),
        "int8 images": (lambda: normalise(np.full((1, 28, 28), -1, np.int8)), "uint8 pixels"),
        "float16": (lambda: normalise(np.zeros((1, 28, 28), np.uint8), "float16"), "dtype must be one of"),
        "a list of networks": (lambda: forward([params, params], x), "parameters must be a mapping"),
        "1-D logits": (lambda: fmnist.cross_entropy(np.zeros(4), y[:1]), "logits must be a (batch, classes)"),
        "shift 1.5": (lambda: fmnist.augment(images, rng, shift=1.5), "shift must be a whole number"),
        "step 1.5": (lambda: adam_step(params, grads, state._replace(step=1.5)), "step must be"),
        "augment of one flat image": (lambda: fmnist.augment(images[0], rng, flip=0.5), "(batch, 784)"),
        "drop_pixels of one flat image": (lambda: fmnist.drop_pixels(images[0], rng, 0.5), "(batch, 784)"),
        "uint8 images to cut_out": (lambda: fmnist.cut_out(np.zeros((2, 784), np.uint8), rng, 4),
                                    "float array"),
        "misspelled Params": (lambda: forward(Params.from_arrays(_misspelled(params)), x), "W2 is missing"),
        "backward of misspelled": (lambda: backward(_misspelled(params), forward(params, x)[1], y),
                                   "W2 is missing"),
        "lists for arrays": (lambda: forward({"W1": [[1.0]], "b1": [0.0]}, x), "must map names to NumPy arrays"),
        "a name not a string": (lambda: forward({**params, 5: params["b1"]}, x), "must map names to NumPy"),
        "chunk 2.5": (lambda: predict_logits(params, x, 2.5), "chunk"),
        "flattened pixels": (lambda: normalise(np.zeros((2, 784), np.uint8)), "uint8 pixels of shape"),
        "negative count": (lambda: per_class_metrics(np.array([[1, -1], [0, 1]])), "square matrix of counts"),
        "float counts": (lambda: per_class_metrics(np.array([[1.5, 0], [0, 1]])), "square matrix of counts"),
    }


@pytest.mark.parametrize("case", _api_misuse())
def test_misused_functions_say_what_is_wrong(case):
    call, words = _api_misuse()[case]
    with pytest.raises(ValueError, match=re.escape(words)):
        call()


def _settings_taken_by_functions():
    """(Config field, a value out of its range, a function taking that setting), named."""
    params, x, y, _ = _setup()
    images = np.random.default_rng(0).normal(size=(3, 784))
    logits, cache = forward(params, x)
    state, grads = adam_init(params), backward(params, cache, y)
    averaged = Params.from_arrays(params)
    return {
        "label_smoothing (cross_entropy)": (1.5, lambda v: cross_entropy(logits, y, v)),
        "label_smoothing (backward)": (-0.1, lambda v: backward(params, cache, y, smoothing=v)),
        "l2 (backward)": (-1.0, lambda v: backward(params, cache, y, l2=v)),
        "l2 (total_loss)": (math.nan, lambda v: fmnist.total_loss(params, x, y, l2=v)),
        "average (average_params)": (2.0, lambda v: fmnist.average_params(averaged, averaged, v)),
        "flip": (-0.5, lambda v: fmnist.augment(images, 0, flip=v)),
        "shift": (5, lambda v: fmnist.augment(images, 0, shift=v)),
        "cutout": (29, lambda v: fmnist.cut_out(images, 0, v)),
        "input_dropout": (1.0, lambda v: fmnist.drop_pixels(images, 0, v)),
        "dropout": (1.0, lambda v: dropout_masks(0, 2, (3,), v)),
        "lr": (0.0, lambda v: adam_step(params, grads, state, lr=v)),
        "l2": (math.inf, lambda v: adam_step(params, grads, state, l2=v)),
        "beta1": (-0.1, lambda v: adam_step(params, grads, state, beta1=v)),
        "beta2": (1.0, lambda v: adam_step(params, grads, state, beta2=v)),
        "eps": (math.inf, lambda v: adam_step(params, grads, state, eps=v)),
        "weight_decay": (-1.0, lambda v: adam_step(params, grads, state, weight_decay=v)),
    }


@pytest.mark.parametrize("case", _settings_taken_by_functions())
def test_config_and_the_functions_refuse_a_setting_alike_in_the_same_words(case):
    """A value that train's flag refuses, a function taking the same setting refuses too, with
    the same sentence (one rule for both, so they cannot drift apart)."""
    bad, call = _settings_taken_by_functions()[case]
    with pytest.raises(ValueError) as from_config:
        Config(**{case.split(" ")[0]: bad})
    with pytest.raises(ValueError) as from_function:
        call(bad)
    assert str(from_function.value) == str(from_config.value)


def test_the_order_a_mapping_lists_parameters_in_changes_nothing():
    """Params lays its flat vector out by name, not by the mapping's order: a dict of the same
    arrays listed in another order gets the same Adam step and running average, number for
    number (a layout in the dict's order would pair W2's numbers with W1's gradients)."""
    params, x, y, _ = _setup()
    shuffled = {k: params[k] for k in ["W3", "b2", "W1", "b3", "W2", "b1"]}
    grads = backward(params, forward(params, x)[1], y)
    state = adam_init(params)
    expected, _ = adam_step(params, grads, state)
    got, _ = adam_step(shuffled, grads, state)
    assert all(np.array_equal(got[k], expected[k]) for k in params)
    average = fmnist.average_params(Params.from_arrays(shuffled), Params.from_arrays(params), 0.5)
    assert all(np.array_equal(average[k], params[k]) for k in params)


def test_augmentations_take_a_seed_or_a_generator_alike():
    """augment, cut_out and drop_pixels take a seed or a Generator, as dropout_masks does: the
    same seed gives the same images either way."""
    images = np.random.default_rng(0).normal(size=(4, 784))
    for call in (lambda r: fmnist.augment(images, r, flip=0.5, shift=2, cutout=4, input_dropout=0.2),
                 lambda r: fmnist.cut_out(images, r, 6), lambda r: fmnist.drop_pixels(images, r, 0.3)):
        assert np.array_equal(call(np.int64(7)), call(np.random.default_rng(7)))


def test_config_with_numpy_numbers_saves_as_plain_json(tmp_path):
    """Config accepts NumPy numbers (a value taken from an array) and keeps them as the plain
    Python numbers they are, so what trains is exactly what is saved and loads back."""
    config = Config(hidden=(np.int64(8),), seed=np.int64(3), shift=np.int64(1), limit=100,
                    lr=np.float32(1e-3))
    assert type(config.lr) is float and config.lr == float(np.float32(1e-3))
    assert type(config.seed) is int and type(config.hidden[0]) is int
    params = init_params(config.layer_sizes, 0)
    save_checkpoint(tmp_path / "c.npz", params, config)
    _, loaded, _ = load_checkpoint(tmp_path / "c.npz")
    assert loaded == config and loaded.to_json() == json.loads(json.dumps(config.to_json()))


def test_save_checkpoint_writes_only_what_load_checkpoint_reads(tmp_path):
    """A bias of the wrong shape, or extra metadata named like the format or the config, is
    refused at saving, not found later by load_checkpoint."""
    config = Config(hidden=(8,), limit=100)
    params = init_params(config.layer_sizes, 0)
    with pytest.raises(CheckpointError, match="not a plain 784-8-10 network"):
        save_checkpoint(tmp_path / "a.npz", {**params, "b1": np.zeros((1, 8), np.float32)}, config)
    with pytest.raises(ValueError, match="format is written by save_checkpoint"):
        save_checkpoint(tmp_path / "b.npz", params, config, format="x")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", ["normalise", "cut_out", "drop_pixels", "softmax", "log_softmax",
                                  "split_indices",
                                  "confusion_matrix", "per_class_metrics", "ensemble_logits",
                                  "class_probabilities"])
def test_more_functions_return_read_only_arrays(name):
    """The rest of the public functions that return arrays return them read-only too."""
    params, x, y, _ = _setup()
    images = np.random.default_rng(0).normal(size=(3, 784))
    net = init_params((784, 8, 10), 0, "float64")
    pixels = np.zeros((2, 28, 28), np.uint8)
    out = {"normalise": lambda: normalise(pixels),
           "cut_out": lambda: fmnist.cut_out(images, 0, 4),
           "drop_pixels": lambda: fmnist.drop_pixels(images, 0, 0.5),
           "softmax": lambda: fmnist.softmax(x),
           "log_softmax": lambda: fmnist.log_softmax(x),
           "split_indices": lambda: split_indices(10, 3, 0),
           "confusion_matrix": lambda: confusion_matrix(y, y, 4),
           "per_class_metrics": lambda: per_class_metrics(confusion_matrix(y, y, 4)),
           "ensemble_logits": lambda: fmnist.ensemble_logits([params, params], x),
           "class_probabilities": lambda: fmnist.class_probabilities(net, pixels, "float64")}[name]()
    arrays = list(out) if isinstance(out, tuple) else [out]
    assert arrays
    for a in arrays:
        with pytest.raises(ValueError, match="read-only"):
            a[...] = 0


def test_predict_logits_of_no_images_and_with_flip_averaging_are_read_only_logits():
    params, x, _, _ = _setup()                                    # a 4-class float64 network
    empty = predict_logits(params, x[:0])
    assert empty.shape == (0, 4) and empty.dtype == x.dtype and not empty.flags.writeable
    net = init_params((784, 8, 10), 0, "float64")
    averaged = predict_logits(net, np.random.default_rng(0).normal(size=(3, 784)), flip_average=True)
    assert averaged.shape == (3, 10) and not averaged.flags.writeable


@pytest.mark.parametrize("invert", [False, True])
def test_read_image_returns_read_only_pixels(tmp_path, invert):
    from PIL import Image
    Image.fromarray(np.full((28, 28), 200, np.uint8)).save(tmp_path / "a.png")
    assert not fmnist.read_image(tmp_path / "a.png", invert).flags.writeable


@pytest.mark.parametrize("missing", ["b1", "b2", "b3"])
def test_a_network_with_an_array_missing_names_it(missing):
    """A network short of one array says which, as one with an extra array does."""
    params, x, _, _ = _setup()
    short = {k: v for k, v in params.items() if k != missing}
    with pytest.raises(ValueError, match=rf"names missing or extra: {missing}\)"):
        fmnist.forward(short, x)


@pytest.mark.parametrize("flat", [np.zeros(11), np.zeros(12), np.zeros((10, 1)), np.zeros(9)],
                         ids=["one number too many", "two too many", "a (10, 1) column",
                              "one number too few"])
def test_params_take_a_flat_vector_of_exactly_the_numbers_of_their_shapes(flat):
    """A Params's arrays are views that together cover its flat 1-D vector exactly: a vector
    with numbers to spare, or a (10, 1) column that its 1-D views would slice row by row, is
    refused, not silently taken in part.
    (F29, F30)"""
    with pytest.raises(ValueError, match="does not fit shapes"):
        Params(flat, {"W1": (2, 4), "b1": (2,)})


def test_flat_order_is_the_weights_then_each_layer_in_turn():
    """The documented layout of the flat vector (weights first: Adam's L2 slice is one range)."""
    assert fmnist.flat_order(["b2", "g1", "W2", "b1", "W1", "g2", "W3", "b3"]) == \
        ["W1", "W2", "W3", "b1", "g1", "b2", "g2", "b3"]


def test_flat_order_counts_layers_as_numbers_beyond_nine():
    """A state file stores flat vectors in this order, so it is part of the file format: W1, W2,
    ..., W10, W11, then b1, g1, b2, ..., b11, whatever the number of layers (W10 is not between
    W1 and W2)."""
    names = [f"{kind}{l}" for l in range(1, 12) for kind in "Wbg" if not (kind == "g" and l == 11)]
    assert fmnist.flat_order(names[::-1]) == \
        [f"W{l}" for l in range(1, 12)] + [f"{kind}{l}" for l in range(1, 12) for kind in "bg"
                                           if not (kind == "g" and l == 11)]


# ================================================================================================
# Adam
# ================================================================================================

def test_adam_two_steps_match_the_formula_by_hand():
    """adam_step must be exactly p - lr/(1-b1^t) * m_t/(sqrt(v_t/(1-b2^t)) + eps) (report 4.1)."""
    p0 = {"W1": np.array([[0.5, -1.0, 2.0], [0.0, 3.0, -0.25]]), "b1": np.array([0.1, -0.2, 0.0])}
    g1 = {"W1": np.array([[0.1, -0.3, 2.0], [0.0, 1e-3, -50.0]]), "b1": np.array([-1e-3, 5.0, 0.0])}
    g2 = {"W1": np.array([[-0.2, 0.3, 1.0], [4.0, 1e-3, -50.0]]), "b1": np.array([2e-3, -5.0, 0.0])}
    lr, b1, b2, eps = 0.01, 0.8, 0.99, 1e-8
    params, state = Params.from_arrays(p0), adam_init(p0)
    for k in p0:
        m = v = np.zeros_like(p0[k])
        p = p0[k]
        for t, g in ((1, g1[k]), (2, g2[k])):
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            p = p - lr / (1 - b1 ** t) * m / (np.sqrt(v / (1 - b2 ** t)) + eps)
        p0[k] = (p, m, v)
    for g in (g1, g2):
        params, state = adam_step(params, g, state, lr, b1, b2, eps)
    assert state.step == 2
    for k, (p, m, v) in p0.items():
        np.testing.assert_allclose(params[k], p, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(state.m[k], m, rtol=1e-12, atol=1e-18)
        np.testing.assert_allclose(state.v[k], v, rtol=1e-12, atol=1e-18)
    assert params["b1"][2] == 0.0   # a coordinate that never had a gradient never moves


nonzero_gradients = st.one_of(st.floats(1e-4, 1e4), st.floats(-1e4, -1e-4))


@given(grads=hnp.arrays(np.float64, hnp.array_shapes(max_dims=2, max_side=6), elements=nonzero_gradients),
       lr=st.floats(1e-5, 0.1), dtype=st.sampled_from(["float32", "float64"]))
@example(grads=np.array([1e-4, -1e4]), lr=1e-3, dtype="float32")
def test_adam_first_step_has_size_lr_whatever_the_gradient_scale(grads, lr, dtype):
    """Bias correction makes m/sqrt(v) = sign(g) at t=1, so every coordinate moves by ~lr against g."""
    params = Params.from_arrays({"W1": np.zeros_like(grads), "b1": np.ones(3)}, dtype)
    g = Params.from_arrays({"W1": grads, "b1": np.array([1e-3, -2.0, 300.0])}, dtype)
    new, state = adam_step(params, g, adam_init(params), lr=lr)
    assert state.step == 1
    for k in params:
        delta = np.asarray(new[k], np.float64) - np.asarray(params[k], np.float64)
        rtol = 1e-3 if dtype == "float64" else 1e-3 + 1.2e-7 / lr   # float32: p = 1 +- lr rounds by <= 6e-8
        np.testing.assert_allclose(delta, -lr * np.sign(np.asarray(g[k], np.float64)), rtol=rtol)


@given(st.integers(0, 2**32 - 1), st.floats(1e-6, 1e-1), st.sampled_from([np.float32, np.float64]))
def test_adam_l2_equals_adding_the_l2_gradient_to_the_weights(seed, l2, dtype):
    """adam_step(..., l2) must be Adam on the L2-regularised loss: the same as feeding it the
    gradient backward(..., l2) computes, l2*W added to the weights only, never the biases."""
    rng = np.random.default_rng(seed)
    params = init_params((6, 5, 3), seed, np.dtype(dtype).name)
    params = Params.from_arrays({k: a + rng.normal(0, 0.1, a.shape) for k, a in params.items()}, dtype)
    data_grads = Params.from_arrays({k: rng.normal(0, 1e-2, a.shape) for k, a in params.items()}, dtype)
    state = adam_init(params)
    for _ in range(3):
        total = Params.from_arrays({k: g + (l2 * params[k] if k.startswith("W") else 0)
                                    for k, g in data_grads.items()}, dtype)
        fused, fused_state = adam_step(params, data_grads, state, l2=l2)
        plain, plain_state = adam_step(params, total, state)
        rtol = 1e-5 if dtype == np.float32 else 1e-12
        for k in params:
            np.testing.assert_allclose(fused[k], plain[k], rtol=rtol, atol=rtol * 1e-3)
            np.testing.assert_allclose(fused_state.v[k], plain_state.v[k], rtol=rtol * 10, atol=0)
        params, state = fused, fused_state


def test_adamw_two_steps_match_the_formula_by_hand():
    """AdamW (weight_decay): the weights shrink by (1 - lr * weight_decay) outside Adam's
    division, p_t = (1 - lr wd) p - lr/(1-b1^t) * m_t/(sqrt(v_t/(1-b2^t)) + eps); the biases
    take the plain Adam step; the moments are Adam's, untouched by the decay."""
    p0 = {"W1": np.array([[0.5, -1.0], [0.0, 3.0]]), "b1": np.array([0.1, -0.2])}
    grads = [{"W1": np.array([[0.1, -0.3], [0.0, -50.0]]), "b1": np.array([-1e-3, 5.0])},
             {"W1": np.array([[-0.2, 0.3], [4.0, -50.0]]), "b1": np.array([2e-3, -5.0])}]
    lr, wd, b1, b2, eps = 0.01, 3.0, 0.9, 0.999, 1e-8
    params, state = Params.from_arrays(p0), adam_init(p0)
    for g in grads:
        params, state = adam_step(params, g, state, lr, b1, b2, eps, weight_decay=wd)
    for k, p in p0.items():
        m = v = np.zeros_like(p)
        shrink = 1 - lr * wd if k.startswith("W") else 1.0
        for t, g in enumerate(grads, start=1):
            m = b1 * m + (1 - b1) * g[k]
            v = b2 * v + (1 - b2) * g[k] ** 2
            p = shrink * p - lr / (1 - b1 ** t) * m / (np.sqrt(v / (1 - b2 ** t)) + eps)
        np.testing.assert_allclose(params[k], p, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(state.m[k], m, rtol=1e-12)
        np.testing.assert_allclose(state.v[k], v, rtol=1e-12)


@given(seed=st.integers(0, 2**32 - 1), wd=st.floats(0.0, 99.0), lr=st.floats(1e-5, 1e-2),
       dtype=st.sampled_from(["float32", "float64"]))
def test_adamw_with_no_gradient_only_shrinks_the_weights(seed, wd, lr, dtype):
    """With a zero gradient (and zero moments) Adam moves nothing, so AdamW's step is the decay
    alone: every weight times (1 - lr * wd), rounded once; every bias exactly as it was. With
    wd = 0 that is the identity, bit for bit."""
    params = init_params((7, 5, 3), seed, dtype)
    zero = params.like(np.zeros_like(params.flat))
    new, state = adam_step(params, zero, adam_init(params), lr, weight_decay=wd)
    for k, a in params.items():
        expected = a * np.asarray(1 - lr * wd, dtype) if k.startswith("W") else a
        assert np.array_equal(new[k], expected), k
    assert not state.m.flat.any() and not state.v.flat.any()


@pytest.mark.parametrize("slice_size", [1, 3, 7, 10**9])
@pytest.mark.parametrize("l2, wd", [(0.0, 0.0), (0.1, 0.0), (0.0, 2.0), (0.1, 2.0)])
@pytest.mark.parametrize("in_place", [False, True])
def test_adam_is_the_formula_whatever_the_slice_size_with_l2_and_weight_decay(
        monkeypatch, slice_size, l2, wd, in_place):
    """adam_update works through the flat vector in slices of ADAM_SLICE numbers, weights then
    biases (the report's network: 18 slices of weights, one of biases); every other Adam test
    fits in one slice. Small slices here cross slice boundaries and the weights/biases boundary,
    from moments that differ everywhere, both into fresh arrays (adam_step) and in place
    (train_epoch's way), so a slice loop that skipped, repeated or misplaced numbers, or gave the
    biases the weights' L2 or decay, fails. L2 and AdamW together: L2's gradient goes through
    Adam's division, the decay outside it."""
    monkeypatch.setattr(fmnist, "ADAM_SLICE", slice_size)
    lr, b1, b2, eps, t = 0.01, 0.9, 0.999, 1e-8, 4
    rng = np.random.default_rng(1)
    params = init_params((13, 5, 3), 0, "float64")                     # 65 weights, 8 biases
    grads, m0, v0 = (params.like(rng.normal(0, 1, params.flat.shape)) for _ in range(3))
    v0 = params.like(np.abs(v0.flat))
    if in_place:
        p, m, v = params.flat.copy(), m0.flat.copy(), v0.flat.copy()
        fmnist.adam_update(p, grads.flat, m, v, p, m, v, params.num_weights, t, lr, b1, b2, eps,
                           l2, wd)
        new, state = params.like(p), AdamState(t, params.like(m), params.like(v))
    else:
        new, state = adam_step(params, grads, AdamState(t - 1, m0, v0), lr, b1, b2, eps, l2=l2,
                               weight_decay=wd)
    for k, p in params.items():
        weight = k.startswith("W")
        g = grads[k] + (l2 * p if weight else 0.0)
        m, v = b1 * m0[k] + (1 - b1) * g, b2 * v0[k] + (1 - b2) * g * g
        shrink = 1 - lr * wd if weight else 1.0
        expected = shrink * p - lr / (1 - b1 ** t) * m / (np.sqrt(v / (1 - b2 ** t)) + eps)
        np.testing.assert_allclose(new[k], expected, rtol=1e-12, atol=1e-15, err_msg=k)
        np.testing.assert_allclose(state.m[k], m, rtol=1e-12, atol=0, err_msg=k)
        np.testing.assert_allclose(state.v[k], v, rtol=1e-12, atol=0, err_msg=k)


def test_adam_state_step_counts_updates_and_starts_at_zero():
    """The bias corrections use t, so the state must count each update exactly once."""
    params = init_params((3, 2), 0, "float64")
    state = adam_init(params)
    assert state.step == 0 and not state.m.flat.any() and not state.v.flat.any()
    grads = Params.from_arrays({k: np.ones_like(v) for k, v in params.items()})
    for t in range(1, 4):
        params, state = adam_step(params, grads, state)
        assert isinstance(state, AdamState) and state.step == t


@given(st.sampled_from([np.float32, np.float64]), st.sampled_from([2, 4]),
       hnp.arrays(np.float64, st.integers(1, 50),
                  elements=st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)),
       st.integers(-330, 0))
# Found by the heavy profile against an earlier claim that everything below t became 0:
# 2.6e-10, below t = tiny**(1/4) = 3.3e-10 in float32, came out as 4.7e-10.
@example(np.float32, 4, np.array([2.60055163e-10, -2.60055163e-10, 1.6e-10]), 0)
@example(np.float32, 2, np.array([-0.7 * 2.0 ** -63, 0.99 * 2.0 ** -63, -0.49 * 2.0 ** -63]), 0)
@example(np.float32, 2, np.array([2.0 ** -14, -2.0 ** -14, 2.0 ** -15]), 0)   # 2^(2m+3) t and below
def test_flush_to_zero_leaves_nothing_below_its_threshold_but_zeros(dtype, root, mantissas,
                                                                     exponent):
    """With t = tiny**(1/root): every |x| < t/2 becomes exactly 0, whatever its sign, and no
    result is nonzero but smaller than t, so nothing subnormal can come out or be made later
    from a product of two results. Any number moves by at most 2t or one unit in its last place,
    and numbers far above t do not move at all: the flush cannot change a meaningful value."""
    info = np.finfo(dtype)
    threshold = info.tiny ** (1.0 / root)
    with np.errstate(over="ignore", under="ignore"):
        x = (mantissas * 10.0 ** exponent).astype(dtype)
    x = x[np.isfinite(x)]
    y = fmnist.flush_to_zero(x.copy(), root)
    assert (y[np.abs(x) < threshold / 2] == 0).all()
    assert ((y == 0) | (np.abs(y) >= threshold)).all()
    assert (np.abs(y.astype(np.float64) - x) <= np.maximum(2 * threshold, np.spacing(np.abs(x)))).all()
    big = np.abs(x) >= threshold * 2.0 ** (2 * info.nmant + 3)
    assert (y[big] == x[big]).all()


@pytest.mark.parametrize("l2", [Config().l2, 2e-4], ids=["default-l2", "report-term-as-written"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adam_on_a_dead_unit_reaches_zero_without_subnormals(dtype, l2):
    """A unit that never fires gets no data gradient, only L2's lambda*W, which Adam adds itself
    (as in training). Adam then drives its weights to zero geometrically. They must never pass
    through subnormal numbers, which x86 CPUs process up to 20x slower (see
    fmnist.flush_to_zero), while still shrinking to nothing."""
    rng = np.random.default_rng(0)
    params = Params.from_arrays({"W1": rng.normal(0, 0.05, (20, 10)), "b1": np.zeros(10)}, dtype)
    state, tiny = adam_init(params), np.finfo(dtype).tiny
    no_data_gradient = Params.from_arrays({"W1": np.zeros((20, 10)), "b1": np.zeros(10)}, dtype)
    for _ in range(3000):
        params, state = adam_step(params, no_data_gradient, state, l2=l2)
        for a in (params.flat, state.m.flat, state.v.flat):
            assert not ((a != 0) & (np.abs(a) < tiny)).any()
        if state.step % fmnist.FLUSH_EVERY == 0:   # then no weight is left whose (1 - beta2) (l2 W)^2,
            w = params.flat                       # the next steps' v, could become subnormal
            assert ((w == 0) | (np.abs(w) >= tiny ** 0.25)).all()
    assert np.abs(params["W1"]).max() < 1e-8      # from ~0.1: shrunk by over 10^7


def test_adam_refuses_a_state_that_does_not_match_the_parameters():
    """Moments of another network (or dtype) must be refused by name, not broadcast or cast."""
    params = init_params((6, 5, 3), 0)
    other = adam_init(init_params((6, 4, 3), 0))
    grads = Params.from_arrays({k: np.zeros_like(a) for k, a in params.items()})
    with pytest.raises(ValueError, match="Adam state m"):
        adam_step(params, grads, other)
    with pytest.raises(ValueError, match="Adam state m"):
        adam_step(params, grads, adam_init(init_params((6, 5, 3), 0, "float64")))
    x, y = np.zeros((4, 6), np.float32), np.zeros(4, np.intp)
    with pytest.raises(ValueError, match="Adam state m"):
        train_epoch(params, other, x, y, Config(hidden=(5,)))


# ================================================================================================
# Dropout
# ================================================================================================

@given(data=st.data())
def test_forward_without_masks_is_deterministic_and_is_the_eval_path(data):
    """Inverted dropout is the identity at evaluation time: forward(masks=None) is what evaluate uses."""
    params = data.draw(networks())
    x = batch_for(params, data.draw)
    n_classes = fmnist.layer_sizes_of(params)[-1]
    y = data.draw(hnp.arrays(np.intp, len(x), elements=st.integers(0, n_classes - 1)))
    logits, _ = forward(params, x)
    again, _ = forward(params, x)
    assert np.array_equal(logits, again)
    assert np.array_equal(predict_logits(params, x), logits)
    np.testing.assert_allclose(predict_logits(params, x, chunk=3), logits, rtol=1e-12, atol=1e-12)
    ev = evaluate(params, x, y)
    assert np.array_equal(ev.predictions, logits.argmax(axis=1))
    assert ev.loss == cross_entropy(logits, y)
    assert ev.correct == int((logits.argmax(axis=1) == y).sum()) and ev.accuracy == ev.correct / len(y)


@given(data=st.data(), rate=st.floats(0.05, 0.9))
def test_forward_applies_masks_after_relu_and_ones_masks_change_nothing(data, rate):
    """dropout(ReLU(Z)) = ReLU(Z) * mask on every hidden layer; an all-ones mask is no dropout."""
    params = data.draw(networks(min_hidden=1))
    x = batch_for(params, data.draw)
    sizes = fmnist.layer_sizes_of(params)
    masks = dropout_masks(data.draw(st.integers(0, 2**32 - 1)), len(x), sizes[1:-1], rate, "float64")
    _, cache = forward(params, x, masks)
    a = x
    for l in range(1, len(sizes) - 1):
        a = np.maximum(a @ params[f"W{l}"] + params[f"b{l}"], 0) * masks[l - 1]
        np.testing.assert_allclose(cache.inputs[l], a, rtol=1e-10, atol=1e-12)
    ones = tuple(np.ones_like(m) for m in masks)
    assert np.array_equal(forward(params, x, ones)[0], forward(params, x)[0])


@given(seed=st.integers(0, 2**32 - 1), batch=st.integers(1, 20),
       hidden=st.lists(st.integers(1, 20), min_size=1, max_size=3), rate=st.floats(0.01, 0.95),
       dtype=st.sampled_from(["float32", "float64"]))
def test_dropout_mask_values_are_zero_or_inverse_keep_probability(seed, batch, hidden, rate, dtype):
    """Inverted dropout zeroes a unit or scales it by 1/(1-p); no other value may appear."""
    masks = dropout_masks(seed, batch, hidden, rate, dtype)
    assert len(masks) == len(hidden)
    scale = np.dtype(dtype).type(1 / (1 - rate))
    for m, h in zip(masks, hidden):
        assert m.shape == (batch, h) and m.dtype == np.dtype(dtype)
        assert np.isin(m, [0, scale]).all()


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.5, 0.8])
def test_dropout_mask_mean_is_one_so_activations_keep_their_mean(rate):
    """E[mask] = (1-p) * 1/(1-p) = 1: checked over a million entries within 5 standard errors."""
    masks = dropout_masks(int(rate * 100), 2000, (500, 250), rate)
    for m in masks:
        n = m.size
        assert abs(m.mean(dtype=np.float64) - 1) < 5 * np.sqrt(rate / (1 - rate) / n)
        assert abs((m == 0).mean() - rate) < 5 * np.sqrt(rate * (1 - rate) / n)
    assert not np.array_equal(masks[0][:, :250], masks[1]), "layers must get independent draws"


def test_dropout_rate_zero_is_none_and_out_of_range_rates_are_refused():
    """Rate 0 means no dropout at all (forward then takes the eval path); rate 1 would divide by 0."""
    assert dropout_masks(0, 4, (3,), 0.0) is None
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="dropout"):
            dropout_masks(0, 4, (3,), bad)


def test_dropout_masks_are_reproducible_from_the_seed():
    """Masks come from the seed alone, so an epoch can be replayed exactly."""
    a, b, c = (dropout_masks(s, 8, (5, 4), 0.5) for s in (1, 1, 2))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


# ================================================================================================
# Augmentation: mirror images and shifts
# ================================================================================================

def random_images(seed, n, dtype="float64"):
    """n random (n, 784) 'images': no two pixels alike (almost surely), so no translation or
    mirror image of one can equal another by accident; no pixel already background (black), so
    the pixels an augmentation blacks out are exactly those it changes; and no pixel 0, so the
    pixels dropout zeroes are exactly those that are 0 (and out / x is defined). In float32 a
    normal draw is exactly background about once in 6e7: such a pixel moves one step off it."""
    x = np.random.default_rng(seed).normal(size=(n, 784)).astype(dtype)
    background = x.dtype.type(fmnist.BACKGROUND)
    x[x == background] = np.nextafter(background, x.dtype.type(0))
    assert not (x == background).any() and not (x == 0).any()
    return x


def translated(image, dy, dx):
    """A (28, 28) image moved dy pixels down and dx right, background filling what moves in:
    written with slices, independently of fmnist's pad-and-crop."""
    out = np.full((28, 28), image.dtype.type(fmnist.BACKGROUND))
    out[max(dy, 0):28 + min(dy, 0), max(dx, 0):28 + min(dx, 0)] = \
        image[max(-dy, 0):28 + min(-dy, 0), max(-dx, 0):28 + min(-dx, 0)]
    return out


def explain_augmented(original, augmented, shift):
    """(mirrored, dy, dx) for every way `augmented` (784,) is a translation, by at most `shift`
    pixels each way, of `original` (784,) or of its mirror image."""
    image = original.reshape(28, 28)
    return [(mirrored, dy, dx) for mirrored in (False, True)
            for dy in range(-shift, shift + 1) for dx in range(-shift, shift + 1)
            if np.array_equal(translated(image[:, ::-1] if mirrored else image, dy, dx),
                              augmented.reshape(28, 28))]


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 5), dtype=st.sampled_from(["float32", "float64"]))
def test_mirror_reverses_each_row_of_pixels_and_is_its_own_inverse(seed, n, dtype):
    """mirror swaps left and right (pixel (r, c) goes to (r, 27 - c)), so mirroring twice gives
    back the images bit for bit; and it returns a new array, never a view that aliases x."""
    x = random_images(seed, n, dtype)
    m = fmnist.mirror(x)
    assert m.shape == x.shape and m.dtype == x.dtype and not np.shares_memory(m, x)
    assert np.array_equal(m.reshape(n, 28, 28), x.reshape(n, 28, 28)[:, :, ::-1])
    assert np.array_equal(fmnist.mirror(m), x)


def test_augment_off_returns_x_itself_and_draws_nothing():
    """With flip 0 and shift 0 (the report's recipe) augment must be invisible: the same array
    back, and the generator untouched, so that the epoch's shuffle and dropout masks that follow
    are drawn exactly as before augmentation existed."""
    x, rng = random_images(0, 4), np.random.default_rng(5)
    before = rng.bit_generator.state
    assert fmnist.augment(x, rng) is x
    assert fmnist.augment(x, rng, flip=0.0, shift=0, cutout=0, input_dropout=0.0) is x
    assert rng.bit_generator.state == before
    for on in ({"flip": 0.5}, {"shift": 1}, {"cutout": 4}, {"input_dropout": 0.1}):
        fmnist.augment(x, rng, **on)                   # and when on, it does draw from rng
        assert rng.bit_generator.state != before
        before = rng.bit_generator.state


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 6), dtype=st.sampled_from(["float32", "float64"]),
       flip=st.sampled_from([0.0, 0.5, 1.0]) | st.floats(0, 1), shift=st.integers(0, fmnist.MAX_SHIFT))
def test_augment_returns_a_mirror_image_and_translation_of_each_image(seed, n, dtype, flip, shift):
    """Each output image is the input image, or its mirror image, moved by at most `shift` pixels
    down and across, with background brought in: no pixel is invented, lost in place, rescaled or
    taken from another image. flip 0 never mirrors, flip 1 always does; shift 0 never moves.
    The result is a new read-only array of x's shape and dtype, x is left alone, and the same
    seed gives the same result (an epoch must replay bit for bit)."""
    if not flip and not shift:
        flip = 1.0                                     # the no-op case has its own test
    x = random_images(seed, n, dtype)
    before = x.copy()
    out = fmnist.augment(x, np.random.default_rng(seed), flip, shift)
    assert out.shape == x.shape and out.dtype == x.dtype and not np.shares_memory(out, x)
    assert not out.flags.writeable
    assert np.array_equal(x, before)
    assert np.array_equal(fmnist.augment(x, np.random.default_rng(seed), flip, shift), out)
    for original, augmented in zip(x, out):
        ways = explain_augmented(original, augmented, shift)
        assert len(ways) == 1, ways                    # random pixels: one explanation at most
        mirrored, dy, dx = ways[0]
        assert max(abs(dy), abs(dx)) <= shift
        if flip in (0, 1):
            assert mirrored == (flip == 1)


def test_augment_draws_every_offset_and_mirrors_about_half_the_images():
    """Over 400 images (one fixed seed), shift 1 must use all 9 offsets, and flip 0.5 must mirror
    some but not all: 200 +- 50 is over 5 standard deviations of Binomial(400, 0.5) wide. The
    black fill is what normalise makes of a black pixel (0), not 0.0, which is a grey pixel."""
    x = random_images(1, 400, "float32")
    out = fmnist.augment(x, np.random.default_rng(2), flip=0.5, shift=1)
    ways = [explain_augmented(a, b, 1) for a, b in zip(x, out)]
    assert all(len(w) == 1 for w in ways)
    assert {(dy, dx) for [(_, dy, dx)] in ways} == {(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
    assert 150 <= sum(mirrored for [(mirrored, _, _)] in ways) <= 250
    black = normalise(np.zeros((1, 28, 28), np.uint8), "float32")[0, 0]
    assert black == np.float32(fmnist.BACKGROUND) != 0


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 6), dtype=st.sampled_from(["float32", "float64"]),
       size=st.integers(1, 28))
def test_cut_out_blacks_out_one_square_per_image_clipped_only_by_the_border(seed, n, dtype, size):
    """cut_out changes each image only on one axis-aligned square of background pixels: size x
    size, except where the image border cuts it off; never empty (its centre is in the image);
    every other pixel kept bit for bit. A new array; x untouched; the same seed, the same squares."""
    x = random_images(seed, n, dtype)
    before = x.copy()
    out = fmnist.cut_out(x, np.random.default_rng(seed), size)
    assert out.shape == x.shape and out.dtype == x.dtype and not np.shares_memory(out, x)
    assert np.array_equal(x, before)
    assert np.array_equal(fmnist.cut_out(x, np.random.default_rng(seed), size), out)
    black = np.asarray(fmnist.BACKGROUND, dtype)
    centres = np.random.default_rng(seed).integers(0, 28, size=(2, n))      # cut_out's one draw
    for original, cut, centre in zip(x.reshape(n, 28, 28), out.reshape(n, 28, 28), centres.T):
        hole = cut != original
        assert np.all(cut[hole] == black) and np.array_equal(cut[~hole], original[~hole])
        rows, cols = np.flatnonzero(hole.any(axis=1)), np.flatnonzero(hole.any(axis=0))
        assert rows.size and cols.size
        assert np.array_equal(hole, np.isin(np.arange(28), rows)[:, None] & np.isin(np.arange(28), cols))
        for span in (rows, cols):
            assert np.array_equal(span, np.arange(span[0], span[-1] + 1))      # contiguous
            clipped = span[0] == 0 or span[-1] == 27
            assert span.size == size or (clipped and span.size < size)
        for span, c in zip((rows, cols), centre):        # the square's centre is pixel c: an even
            first = c - size // 2                        # square has one more pixel before it
            assert np.array_equal(span, np.arange(max(first, 0), min(first + size, 28)))


def test_cut_out_centres_fall_everywhere_and_the_corners_get_clipped_squares():
    """Over 2,000 images, every pixel is blacked out by some square (centres are uniform over
    the whole image, so the border is covered too), and squares centred near a corner are cut to
    the part inside the image: both full 8 x 8 squares and smaller ones occur. With 1 x 1
    squares, which are their own centres, every one of the 784 pixels is a centre somewhere in
    20,000 images (each misses with probability (1 - 1/784)^20000 = 1e-11)."""
    x = random_images(3, 2000, "float32")
    out = fmnist.cut_out(x, np.random.default_rng(4), 8)
    holes = out != x
    assert holes.any(axis=0).all()
    sizes = holes.sum(axis=1)
    assert sizes.max() == 64 and sizes.min() < 64 and (sizes >= 16).all()   # 4 x 4 at worst
    single = fmnist.cut_out(np.ones((20_000, 784), np.float32), np.random.default_rng(5), 1)
    assert (single != 1).any(axis=0).all()      # 1 x 1 squares are their centres: all 784 occur


@given(seed=st.integers(0, 2**32 - 1), dtype=st.sampled_from(["float32", "float64"]),
       rate=st.floats(0.01, 0.9))
@example(seed=460, dtype="float32", rate=0.3)    # random_images(460, 64) drew one background pixel
def test_drop_pixels_zeroes_about_rate_of_the_pixels_and_rescales_the_rest(seed, dtype, rate):
    """Inverted dropout on the inputs: each pixel becomes 0 or x / (1 - rate); the fraction
    zeroed is rate within 5 standard deviations of a binomial over 64 x 784 pixels; and the mean
    of out / x over the pixels is ~1: the expected input is unchanged, as for the hidden layers."""
    x = random_images(seed, 64, dtype)
    before = x.copy()
    out = fmnist.drop_pixels(x, np.random.default_rng(seed), rate)
    assert out.dtype == x.dtype and not np.shares_memory(out, x) and np.array_equal(x, before)
    dropped = out == 0
    np.testing.assert_allclose(out[~dropped], x[~dropped] / (1 - rate), rtol=4 * np.finfo(dtype).eps)
    sd = math.sqrt(rate * (1 - rate) / x.size)
    assert abs(dropped.mean() - rate) < 5 * sd
    assert abs((out / x).mean() - 1) < 5 * sd / (1 - rate)


@pytest.mark.parametrize("call", [
    lambda x, rng: fmnist.cut_out(x, rng, -3), lambda x, rng: fmnist.cut_out(x, rng, 29),
    lambda x, rng: fmnist.cut_out(x, rng, 2.5), lambda x, rng: fmnist.drop_pixels(x, rng, 1.0),
    lambda x, rng: fmnist.drop_pixels(x, rng, -0.1), lambda x, rng: fmnist.drop_pixels(x, rng, math.nan),
], ids=["cutout -3", "cutout 29", "cutout 2.5", "input dropout 1", "input dropout -0.1",
        "input dropout nan"])
def test_cut_out_and_drop_pixels_refuse_settings_out_of_range(call):
    """The public functions check their own arguments, with Config's sentence, rather than
    returning all zeros (rate 1.5), dividing by zero (rate 1) or doing nothing (size -3)."""
    with pytest.raises(ValueError, match="cutout|input dropout"):
        call(random_images(0, 2, "float32"), np.random.default_rng(0))


def test_augment_applies_flip_shift_cutout_then_input_dropout_from_one_generator():
    """augment with every option is the composition, in this order, each drawing from the
    same generator in turn: a mirror-or-not and a shift (tested above), then the square, then
    the dropped pixels. That order is part of the contract: it fixes which random numbers each
    step gets, and so the training run."""
    x = random_images(5, 8, "float32")
    out = fmnist.augment(x, np.random.default_rng(6), flip=0.5, shift=2, cutout=6, input_dropout=0.2)
    rng = np.random.default_rng(6)
    steps = fmnist.augment(x, rng, flip=0.5, shift=2)
    steps = fmnist.drop_pixels(fmnist.cut_out(steps, rng, 6), rng, 0.2)
    assert np.array_equal(out, steps) and not out.flags.writeable


# ================================================================================================
# Training
# ================================================================================================

def test_a_small_network_overfits_32_real_images(raw):
    """Forward, backward and Adam together must be able to memorise a tiny batch; if not, one is wrong."""
    x, y = normalise(raw.train_images[:32]), raw.train_labels[:32].astype(np.intp)
    config = Config(hidden=(64,), dropout=0.0, l2=0.0, lr=3e-3, batch_size=32)
    params = init_params(config.layer_sizes, config.seed)
    state = adam_init(params)
    first = evaluate(params, x, y)
    for epoch in range(1, 201):
        params, state, stats = train_epoch(params, state, x, y, config, epoch)
        if evaluate(params, x, y).accuracy == 1.0:
            break
    final = evaluate(params, x, y)
    assert final.accuracy == 1.0, (epoch, final)
    assert final.loss < first.loss
    assert state.step == epoch            # one batch per epoch -> one Adam step per epoch


def _fold_early_stopping(corrects, patience):
    best, stop = Best(), None
    for epoch, c in enumerate(corrects, start=1):
        best = early_stopping_update(best, epoch, c)
        if should_stop(best, patience):
            stop = epoch
            break
    return best, stop


def test_early_stopping_on_a_scripted_sequence():
    """The best epoch is the first to reach the highest count (ties are not improvements), and training
    stops once `patience` epochs in a row fail to beat it."""
    #           epoch: 1   2   3   4   5   6   7   8   9
    corrects = [50, 60, 60, 55, 70, 70, 69, 68, 99]
    assert early_stopping_update(Best(), 1, 0) == Best(1, 0, 0)   # the first epoch always counts
    assert _fold_early_stopping(corrects[:3], 3) == (Best(2, 60, 1), None)   # the tie at 3 waits
    assert _fold_early_stopping(corrects, 3) == (Best(5, 70, 3), 8)
    assert _fold_early_stopping(corrects, 4) == (Best(9, 99, 0), None)
    assert _fold_early_stopping(corrects, 1) == (Best(2, 60, 1), 3)


@given(corrects=st.lists(st.integers(0, 4), min_size=1, max_size=20), patience=st.integers(1, 5))
def test_early_stopping_matches_a_reference(corrects, patience):
    """Best = first epoch at the running maximum; stop = first epoch `patience` epochs after it."""
    best, stop = _fold_early_stopping(corrects, patience)
    expected_stop = None
    for epoch in range(1, len(corrects) + 1):
        best_epoch = int(np.argmax(corrects[:epoch])) + 1          # argmax takes the first maximum
        if epoch - best_epoch >= patience:
            expected_stop = epoch
            break
    seen = corrects[:expected_stop or len(corrects)]
    assert stop == expected_stop
    assert (best.epoch, best.correct) == (int(np.argmax(seen)) + 1, max(seen))
    assert best.waited == len(seen) - best.epoch


def random_labels(n: int) -> np.ndarray:
    """Labels no network can learn: validation accuracy on them rises and falls by chance, so a
    run's best epoch is seldom its last."""
    return np.random.default_rng(0).integers(0, 10, n)


def _tiny_splits(raw, n_train=500, n_val=500, noisy_val=False, dtype="float32"):
    splits = make_splits(raw, Config(limit=n_train, dtype=dtype))
    y_val = random_labels(n_val) if noisy_val else splits.y_val[:n_val]
    return splits._replace(x_val=splits.x_val[:n_val], y_val=y_val)


def test_fit_keeps_the_params_of_the_best_epoch_and_stops_after_patience(raw):
    """best_params must be the best epoch's network (what gets saved), not the last one.

    Validation labels are random, so validation accuracy wanders and early stopping triggers.
    """
    splits = _tiny_splits(raw, noisy_val=True)
    config = Config(hidden=(16,), epochs=30, patience=2, batch_size=64, limit=500)
    run = list(fit(splits, config))
    states, history = [s for s, _ in run], [r for _, r in run]
    final = states[-1]
    corrects = [r["val_correct"] for r in history]
    assert [r["epoch"] for r in history] == list(range(1, len(run) + 1))
    assert final.best.correct == max(corrects) and final.best.epoch == corrects.index(max(corrects)) + 1
    assert len(run) < config.epochs and len(run) == final.best.epoch + config.patience
    assert bits(final.best_params) == bits(states[final.best.epoch - 1].params)
    assert bits(final.best_params) != bits(final.params)
    ev = evaluate(final.best_params, splits.x_val, splits.y_val)
    assert ev.correct == final.best.correct
    assert ev.accuracy == history[final.best.epoch - 1]["val_accuracy"]


def test_patience_zero_never_stops_early(raw):
    """patience 0 means no early stopping: every one of config.epochs epochs is trained."""
    config = Config(hidden=(4,), epochs=3, patience=0, limit=100)
    assert [r["epoch"] for _, r in fit(_tiny_splits(raw, 100, 100), config)] == [1, 2, 3]
    assert not should_stop(Best(1, 5, 1000), 0)


def test_train_epoch_same_seed_bit_identical_other_seed_differs(raw):
    """Every draw (init, shuffle, dropout) comes from the seed, so a run replays bit for bit."""
    x, y = normalise(raw.train_images[:256]), raw.train_labels[:256].astype(np.intp)

    def one_epoch(config, params=None, epoch=1):
        params = params if params is not None else init_params(config.layer_sizes, config.seed)
        return train_epoch(params, adam_init(params), x, y, config, epoch)[0]

    config = Config(hidden=(32,), batch_size=64, dropout=0.3)
    a, b = one_epoch(config), one_epoch(config)
    assert bits(a) == bits(b)
    other = dataclasses.replace(config, seed=43)
    assert bits(one_epoch(other)) != bits(a)
    start = init_params(config.layer_sizes, config.seed)     # same start: shuffle and dropout differ
    assert bits(one_epoch(other, start)) != bits(a)
    assert bits(one_epoch(config, start, epoch=2)) != bits(a)


@given(lr=st.floats(1e-6, 1.0), epochs=st.integers(1, 30), steps=st.integers(1, 40))
def test_constant_learning_rate_is_exactly_lr_at_every_step(lr, epochs, steps):
    """The report's recipe: Adam's lr is config.lr itself at every step, not a number computed
    from it that could differ in the last bit (and move every trained parameter with it)."""
    config = Config(lr=lr, epochs=epochs)
    assert all(fmnist.learning_rate(config, t, steps) == lr for t in range(1, epochs * steps + 3))


@given(lr=st.floats(1e-6, 1.0), epochs=st.integers(1, 30), steps=st.integers(1, 40))
def test_cosine_learning_rate_falls_from_lr_to_zero_over_the_run(lr, epochs, steps):
    """Cosine decay over the T = epochs * steps Adam steps of a full run: exactly lr at step 1,
    never rising, never negative, point-symmetric about the middle (rate(t) + rate(T + 2 - t) = lr,
    so about lr / 2 half-way), below lr * pi^2 / (4 T^2) at the last step (1 - cos a <= a^2 / 2),
    and 0 from step T + 1 on (a run resumed past its end must not see the cosine rise again)."""
    config = Config(lr=lr, epochs=epochs, lr_schedule="cosine")
    T = epochs * steps
    rates = np.array([fmnist.learning_rate(config, t, steps) for t in range(1, T + 4)])   # steps 1..T+3
    tiny = 4 * np.finfo(float).eps * lr
    assert rates[0] == lr
    assert (np.diff(rates) <= 0).all() and (rates >= 0).all()
    np.testing.assert_allclose(rates[:T + 1] + rates[:T + 1][::-1], lr, rtol=0, atol=tiny)
    assert abs(rates[T // 2] - lr / 2) <= lr * math.pi / (4 * T) + tiny     # step T//2 + 1: middle
    assert rates[T - 1] <= lr * math.pi ** 2 / (4 * T ** 2) + tiny
    assert (rates[T:] == 0).all()


def _two_params(data):
    """Two float64 Params of the same network: a running average and new parameters."""
    average = data.draw(networks())
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    return average, average.like(rng.normal(0, 1, average.flat.shape))


@given(data=st.data(), decay=st.floats(0, 1, exclude_max=True))
def test_average_params_is_a_weighted_mean_between_the_average_and_the_params(data, decay):
    """average_params = decay * average + (1 - decay) * params, elementwise: each number lies
    between its two sources (within a rounding), decay 0 gives params itself, and the result is a
    new read-only Params of the same names and shapes, its inputs left as they were."""
    average, params = _two_params(data)
    before = bits(average), bits(params)
    result = fmnist.average_params(average, params, decay)
    assert (bits(average), bits(params)) == before
    assert isinstance(result, Params) and result.shapes == params.shapes
    assert result.flat.dtype == params.flat.dtype and not result.flat.flags.writeable
    a, p, r = average.flat, params.flat, result.flat
    slack = 4 * np.finfo(float).eps * np.maximum(np.abs(a), np.abs(p))
    assert ((np.minimum(a, p) - slack <= r) & (r <= np.maximum(a, p) + slack)).all()
    np.testing.assert_allclose(r, decay * a + (1 - decay) * p, rtol=1e-14, atol=1e-300)
    assert np.array_equal(fmnist.average_params(average, params, 0.0).flat, p)


def test_average_params_refuses_parameters_of_another_network():
    """An average of two different architectures is meaningless: refused, naming both shapes."""
    a, b = init_params((6, 5, 3), 0), init_params((6, 4, 3), 0)
    with pytest.raises(ValueError, match=r"\(6, 5\).*\(6, 4\)"):
        fmnist.average_params(a, b, 0.5)


def test_fit_with_average_evaluates_the_running_average_and_trains_the_params(raw):
    """With config.average = d, what fit evaluates (state.model) is the running average of the
    epochs' parameters: the parameters themselves after epoch 1, then average_params(previous
    model, params, d). Training goes on from the parameters, untouched by the average, so they
    are bit-identical to a run without averaging. The validation figures in each record are the
    model's (with flip averaging, as configured), and best_params is the model of the best epoch."""
    config = Config(hidden=(16,), epochs=3, patience=0, batch_size=64, limit=500,
                    average=0.75, flip=0.5, flip_average=True)   # not 0.5: d, 1 - d must differ
    splits = _tiny_splits(raw, 500, 300)
    run = list(fit(splits, config))
    plain = [s for s, _ in fit(splits, dataclasses.replace(config, average=0.0))]
    states, history = [s for s, _ in run], [r for _, r in run]
    assert bits(states[0].model) == bits(states[0].params)
    for previous, state in zip(states, states[1:]):
        expected = fmnist.average_params(previous.model, state.params, config.average)
        assert bits(state.model) == bits(expected)
        assert bits(state.model) != bits(state.params)
    for state, record, unaveraged in zip(states, history, plain):
        assert bits(state.params) == bits(unaveraged.params)
        ev = evaluate(state.model, splits.x_val, splits.y_val, flip_average=True)
        assert (ev.correct, ev.loss) == (record["val_correct"], record["val_loss"])
    final = states[-1]
    assert bits(final.best_params) == bits(states[final.best.epoch - 1].model)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                            "ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("steps, where", [(1, r"parameters became non-finite in epoch 1"),
                                          (2, r"loss reached nan at epoch 1, step 2")])
def test_train_epoch_never_returns_non_finite_parameters(raw, steps, where):
    """A step of ~1e39 overflows float32: the epoch must stop with DivergedError, naming the step
    whose loss is NaN (the second), or, when that was the epoch's last update, the epoch; it must
    never hand back parameters that are inf or NaN. (Config refuses lr 1e39, infinite in
    float32, and no setting it accepts overflows in one step; the lr is forced past its check,
    as a caller's own Config-like object could be, to reach the defence behind it.)"""
    config = Config(hidden=(8,), batch_size=32)
    object.__setattr__(config, "lr", 1e39)
    x, y = normalise(raw.train_images[:32 * steps]), raw.train_labels[:32 * steps].astype(np.intp)
    params = init_params(config.layer_sizes, 0)
    with pytest.raises(fmnist.DivergedError, match=where):
        train_epoch(params, adam_init(params), x, y, config)


def test_on_step_hears_running_averages_over_the_examples_seen(raw):
    """on_step(step, steps, loss, accuracy) gets averages over the examples seen so far: so
    accuracy * seen counts correct predictions (a whole number that grows by at most a batch),
    and the last call is the epoch's EpochStats."""
    config = Config(hidden=(16,), batch_size=64, dropout=0.2)
    n = 64 * 5 + 17
    x, y = normalise(raw.train_images[:n]), raw.train_labels[:n].astype(np.intp)
    params, calls = init_params(config.layer_sizes, 0), []
    _, _, stats = train_epoch(params, adam_init(params), x, y, config,
                              on_step=lambda *a: calls.append(a))
    assert [c[:2] for c in calls] == [(s, 6) for s in range(1, 7)]
    seen = [min(s * 64, n) for s in range(1, 7)]
    counts = [acc * k for (*_, acc), k in zip(calls, seen)]
    assert np.allclose(counts, np.round(counts), rtol=0, atol=1e-9), counts
    assert all(0 <= b - a <= 64 for a, b in zip([0, *np.round(counts)], np.round(counts)))
    assert calls[-1][2:] == pytest.approx((stats.loss, stats.accuracy), rel=1e-12)


def test_fit_trains_epoch_e_as_train_epoch_with_epoch_e(raw):
    """fit is a fold of train_epoch: its epoch e is train_epoch(previous state, epoch=e), drawing
    from [seed, e], bit for bit (what makes a run reproducible from its config alone)."""
    config = Config(hidden=(16,), epochs=2, limit=300, dropout=0.2)
    splits = _tiny_splits(raw, 300, 100)
    state = fmnist.initial_state(config)
    for fitted, record in fit(splits, config):
        params, opt, _ = train_epoch(state.params, state.opt_state, splits.x_train,
                                     splits.y_train, config, record["epoch"])
        assert bits(fitted.params) == bits(params) and fitted.opt_state.step == opt.step
        state = fitted


def test_history_records_each_epochs_own_validation_count(raw):
    """Each history record describes its own epoch: val_correct is what that epoch's model got
    right (not the best so far), consistent with its val_accuracy."""
    splits = _tiny_splits(raw, noisy_val=True)
    config = Config(hidden=(16,), epochs=30, patience=2, batch_size=64, limit=500)
    for state, record in fit(splits, config):
        ev = evaluate(state.model, splits.x_val, splits.y_val)
        assert (record["val_correct"], record["val_accuracy"]) == (ev.correct, ev.accuracy)
    assert state.best.epoch < state.epoch           # some record was not the best one


def reference_epoch(params, state, x, y, config, epoch):
    """One epoch written as a plain loop of the public pure functions, drawing from the epoch's
    generator in train_epoch's order (shuffle; per batch: augmentation, then dropout masks);
    returns new params, new state and (mean loss, accuracy) of the batches as trained on."""
    rng = np.random.default_rng([config.seed, epoch])
    steps = -(-len(y) // config.batch_size)
    losses, correct = [], 0
    for idx in fmnist.batches(len(y), config.batch_size, rng):
        xb = fmnist.augment(x[idx], rng, config.flip, config.shift, config.cutout,
                            config.input_dropout)
        masks = dropout_masks(rng, len(idx), config.hidden, config.dropout)
        logits, cache = forward(params, xb, masks)
        grads = backward(params, cache, y[idx], smoothing=config.label_smoothing)
        lr = fmnist.learning_rate(config, state.step + 1, steps)
        params, state = adam_step(params, grads, state, lr, config.beta1, config.beta2,
                                  config.eps, config.l2, config.weight_decay)
        losses.append(cross_entropy(logits, y[idx]) * len(idx))
        correct += int((logits.argmax(axis=1) == y[idx]).sum())
    return params, state, (sum(losses) / len(y), correct / len(y))


def assert_epoch_2_matches_the_reference(params, state, x, y, config, steps_after):
    """train_epoch and reference_epoch, from the same start, give bit-identical parameters,
    moments and statistics, and both end at Adam step `steps_after`."""
    fast_params, fast_state, stats = train_epoch(params, state, x, y, config, epoch=2)
    params, state, reference_stats = reference_epoch(params, state, x, y, config, epoch=2)
    assert bits(fast_params) == bits(params)
    assert bits(fast_state.m) == bits(state.m) and bits(fast_state.v) == bits(state.v)
    assert fast_state.step == state.step == steps_after
    assert stats == reference_stats


def test_train_epoch_is_forward_backward_adam_step_bit_for_bit(raw):
    """train_epoch updates its own buffers in place for speed; that must be invisible: the same
    epoch written as a loop of the pure public functions gives bit-identical parameters, moments
    and statistics."""
    config = Config(hidden=(16, 8), batch_size=50, l2=1e-3, limit=230)
    splits = _tiny_splits(raw, 230, 10)
    x, y = splits.x_train, splits.y_train
    params = init_params(config.layer_sizes, 3)
    state = adam_init(params)
    assert_epoch_2_matches_the_reference(params, state, x, y, config, steps_after=5)


def test_train_epoch_with_every_training_option_is_the_public_functions_bit_for_bit(raw):
    """The same check with augmentation, label smoothing, AdamW and the cosine schedule all on,
    in an epoch after the first (so the schedule must count Adam steps over the whole run, not
    within the epoch): per batch, augment then the dropout masks draw from the epoch's generator
    in that order, backward gets the smoothing, and Adam step t gets learning_rate(config, t,
    steps) and the weight decay.
    (The test above is the report's recipe: there augment draws nothing and lr is constant.)
    The statistics stay the plain cross-entropy of the augmented batch: smoothing is a training
    target, not the measure reported."""
    config = Config(hidden=(16, 8), batch_size=50, l2=1e-3, limit=230, epochs=3,
                    lr_schedule="cosine", flip=0.5, shift=2, label_smoothing=0.2, cutout=9,
                    input_dropout=0.2, weight_decay=0.5)
    splits = _tiny_splits(raw, 230, 10)
    x, y = splits.x_train, splits.y_train
    params, state, _ = train_epoch(init_params(config.layer_sizes, 3),
                                   adam_init(init_params(config.layer_sizes, 3)), x, y, config, 1)
    assert_epoch_2_matches_the_reference(params, state, x, y, config, steps_after=10)


# ================================================================================================
# Batch norm: trained over batches, folded into a plain network for prediction
# ================================================================================================

@st.composite
def batch_norm_networks(draw):
    """A small float64 network with batch norm, its biases and scales drawn away from init's."""
    plain = draw(networks(min_hidden=1))
    sizes = fmnist.layer_sizes_of(plain)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scales = {f"g{l}": rng.uniform(0.2, 2.0, sizes[l]) * rng.choice([-1.0, 1.0], sizes[l])
              for l in range(1, len(sizes) - 1)}
    return Params.from_arrays({**plain, **scales})


@given(params=batch_norm_networks(), data=st.data())
def test_folded_network_predicts_what_forward_computes_on_the_batch_it_was_folded_with(params, data):
    """fold_batch_norm(params, x) replaces each batch statistic by the statistic over x. Folded
    with the very batch forward sees, the plain network must give forward's logits (no dropout):
    the folding algebra W' = W g / std, b' = b - mean g / std is exact, up to rounding. Any
    chunk size gives the same statistics (they are sums over the rows).
    Batches whose pre-activations hardly vary are left out: there 1 / std approaches
    1 / sqrt(BN_EPS) ~ 316 and multiplies rounding errors by that at every layer, in both
    computations alike; the two are then both right only to about 1e-7."""
    x = batch_for(params, data.draw, min_size=2)
    chunk = data.draw(st.integers(1, len(x) + 1))
    logits, cache = forward(params, x)
    assume(all(norm.inv_std.max() < 30 for norm in cache.norms))
    folded = fmnist.fold_batch_norm(params, x, chunk)
    assert list(folded) == list(fmnist.param_shapes(fmnist.layer_sizes_of(params)))
    np.testing.assert_allclose(predict_logits(folded, x), logits, rtol=1e-7, atol=1e-7)


def logits_with_statistics_of(params, x, images):
    """The batch-norm network on `images`, each unit normalised by its mean and variance over x
    (propagated through the network the same way): batch norm written out directly, unfolded."""
    A, B = x, images
    for l in range(1, fmnist.num_layers(params)):
        Z, Z_images = A @ params[f"W{l}"], B @ params[f"W{l}"]
        scale = params[f"g{l}"] / np.sqrt(Z.var(axis=0) + fmnist.BN_EPS)
        A, B = (np.maximum((z - Z.mean(axis=0)) * scale + params[f"b{l}"], 0.0) for z in (Z, Z_images))
    L = fmnist.num_layers(params)
    return B @ params[f"W{L}"] + params[f"b{L}"]


def test_fold_batch_norm_uses_the_statistics_of_its_images_not_of_the_batch_predicted():
    """Folded with images x, the network normalises any other batch with x's statistics: its
    logits are those of batch norm written out with x's means and variances. So a prediction no
    longer depends on which other images share the batch: one image alone gets the logits it
    gets among the whole set."""
    params, x, _, _ = _setup_batch_norm()
    others = np.random.default_rng(11).normal(size=(7, x.shape[1]))
    folded = fmnist.fold_batch_norm(params, x)
    np.testing.assert_allclose(predict_logits(folded, others),
                               logits_with_statistics_of(params, x, others), rtol=1e-10, atol=1e-12)
    together = predict_logits(folded, x)
    alone = np.concatenate([predict_logits(folded, x[i:i + 1]) for i in range(len(x))])
    np.testing.assert_allclose(alone, together, rtol=1e-12, atol=1e-12)   # BLAS rounds rows apart
    assert not np.allclose(forward(params, x[:2])[0], together[:2])     # batch stats differ


def test_batch_norm_networks_must_be_folded_before_predicting_and_plain_ones_cannot_be():
    params, x, y, _ = _setup_batch_norm()
    with pytest.raises(ValueError, match="fold_batch_norm"):
        predict_logits(params, x)
    with pytest.raises(ValueError, match="fold_batch_norm"):
        evaluate(params, x, y)
    plain = init_params((12, 8, 4), seed=1, dtype="float64")
    with pytest.raises(ValueError, match="needs a network with batch norm"):
        fmnist.fold_batch_norm(plain, x)
    with pytest.raises(ValueError, match="at least one image"):
        fmnist.fold_batch_norm(params, x[:0])


def test_config_refuses_batch_norm_with_a_running_average():
    """The running average would be of the raw parameters, each folded with other statistics;
    rather than pretend, the combination is refused."""
    with pytest.raises(ValueError, match="batch norm and a running average"):
        Config(batch_norm=True, average=0.5)


def test_train_epoch_with_batch_norm_is_the_public_functions_bit_for_bit(raw):
    """With batch norm the epoch still is forward -> backward -> adam_step per batch (the scales g
    are trained by Adam like the biases, neither decayed), including the 30-row last batch."""
    config = Config(hidden=(16, 8), batch_size=50, l2=1e-3, limit=230, epochs=3, batch_norm=True,
                    flip=0.5, weight_decay=0.5, lr_schedule="cosine")
    splits = _tiny_splits(raw, 230, 10)
    x, y = splits.x_train, splits.y_train
    start = init_params(config.layer_sizes, 3, batch_norm=True)
    params, state, _ = train_epoch(start, adam_init(start), x, y, config, 1)
    assert not np.array_equal(params["g1"], start["g1"])
    assert_epoch_2_matches_the_reference(params, state, x, y, config, steps_after=10)


def test_fit_with_batch_norm_evaluates_the_folded_network_and_resumes_bit_identically(raw, tmp_path):
    """Each epoch, fit folds the trained network with the statistics of the first
    BN_STATISTICS_IMAGES training images: that plain network is the model validated, kept as
    best, saved in best.npz and loadable as any other. state.npz must hold it (it is not the
    parameters), and a run resumed from it ends bit-identical to one never stopped."""
    config = Config(hidden=(32, 16), epochs=4, limit=600, batch_norm=True, lr_schedule="cosine")
    splits = _tiny_splits(raw, 600, 300)
    straight = list(fit(splits, config))
    for state, record in straight:
        assert bits(state.model) == bits(fmnist.fold_batch_norm(
            state.params, splits.x_train[:fmnist.BN_STATISTICS_IMAGES]))
        ev = evaluate(state.model, splits.x_val, splits.y_val)
        assert (ev.correct, ev.loss) == (record["val_correct"], record["val_loss"])
    final = straight[-1][0]
    fmnist.save_checkpoint(tmp_path / "best.npz", final.best_params, config)
    loaded_best, _, _ = fmnist.load_checkpoint(tmp_path / "best.npz")
    assert bits(loaded_best) == bits(final.best_params)
    history = [record for _, record in straight[:2]]
    fmnist.save_state(tmp_path / "state.npz", straight[1][0], config, history)
    with np.load(tmp_path / "state.npz") as saved:
        assert set(saved.files) == {"params", "m", "v", "best_params", "model", "meta"}
    loaded, _, _ = fmnist.load_state(tmp_path / "state.npz")
    resumed = [s for s, _ in fit(splits, config, loaded)][-1]
    for name in ("params", "best_params", "model"):
        assert bits(getattr(resumed, name)) == bits(getattr(final, name)), name
    assert bits(resumed.opt_state.v) == bits(final.opt_state.v) and resumed.best == final.best


# ================================================================================================
# Evaluation: confusion matrix, per-class metrics, top confusions
# ================================================================================================

#                 predicted: 0  1  2  3
HAND_CONFUSION = np.array([[5, 2, 1, 0],     # true 0
                           [1, 3, 0, 0],     # true 1
                           [0, 0, 0, 0],     # true 2: no examples -> recall 0/0
                           [1, 0, 0, 0]])    # true 3: never predicted -> precision 0/0


def test_confusion_matrix_counts_true_rows_predicted_columns():
    """C[i, j] counts class-i examples predicted as j; the metrics read TP, FP, FN off it."""
    y_true = np.array([0] * 5 + [0] * 2 + [0] + [1] + [1] * 3 + [3])
    y_pred = np.array([0] * 5 + [1] * 2 + [2] + [0] + [1] * 3 + [0])
    assert np.array_equal(confusion_matrix(y_true, y_pred, 4), HAND_CONFUSION)


@given(k=st.integers(1, 12), n=st.integers(1, 20), data=st.data())
def test_confusion_matrix_refuses_any_label_outside_the_classes(k, n, data):
    """A label k or above, or below 0, in either argument, is an error, never a miscount: in the
    flat index true * k + predicted, a prediction k would be counted as the next true class's 0."""
    y_true = data.draw(hnp.arrays(np.int64, n, elements=st.integers(0, k - 1)))
    y_pred = data.draw(hnp.arrays(np.int64, n, elements=st.integers(0, k - 1)))
    assert confusion_matrix(y_true, y_pred, k).sum() == n
    bad = data.draw(st.sampled_from([k, k + 1, 2 * k, -1]))
    which, at = data.draw(st.booleans()), data.draw(st.integers(0, n - 1))
    (y_true if which else y_pred)[at] = bad
    with pytest.raises(ValueError, match="must be classes"):
        confusion_matrix(y_true, y_pred, k)


def test_per_class_metrics_by_hand_with_zero_division_as_zero():
    """precision = TP/predicted, recall = TP/actual, F1 = 2TP/(2TP+FP+FN); 0/0 is reported as 0."""
    m = per_class_metrics(HAND_CONFUSION)
    np.testing.assert_allclose(m.precision, [5 / 7, 3 / 5, 0, 0])
    np.testing.assert_allclose(m.recall, [5 / 8, 3 / 4, 0, 0])
    np.testing.assert_allclose(m.f1, [2 / 3, 2 / 3, 0, 0])
    assert list(m.support) == [8, 4, 0, 1]
    assert all(np.isfinite(a).all() for a in m)


@given(y=hnp.arrays(np.intp, st.integers(1, 60), elements=st.integers(0, 9)), data=st.data())
def test_metrics_agree_with_counts_on_random_predictions(y, data):
    """Rows sum to the true counts, the diagonal to the correct ones, and F1 is the harmonic mean."""
    pred = data.draw(hnp.arrays(np.intp, len(y), elements=st.integers(0, 9)))
    c = confusion_matrix(y, pred)
    assert c.shape == (10, 10) and c.sum() == len(y)
    assert np.array_equal(c.sum(axis=1), np.bincount(y, minlength=10))
    assert np.array_equal(c.sum(axis=0), np.bincount(pred, minlength=10))
    assert np.trace(c) == (y == pred).sum()
    m = per_class_metrics(c)
    tp, fp, fn = np.diag(c), c.sum(0) - np.diag(c), c.sum(1) - np.diag(c)
    denom = 2 * tp + fp + fn
    np.testing.assert_allclose(m.f1, np.divide(2 * tp, denom, out=np.zeros(10), where=denom > 0))
    for a in (m.precision, m.recall, m.f1):
        assert ((0 <= a) & (a <= 1)).all()


def test_top_confusions_by_hand():
    """Pairs are ranked by mistakes counted both ways, ties by class order, and zero pairs omitted."""
    assert top_confusions(HAND_CONFUSION) == [(0, 1, 2, 1), (0, 2, 1, 0), (0, 3, 0, 1)]
    assert top_confusions(HAND_CONFUSION, n=2) == [(0, 1, 2, 1), (0, 2, 1, 0)]
    assert top_confusions(np.diag([3, 4, 5])) == []


@given(c=hnp.arrays(np.int64, (10, 10), elements=st.integers(0, 30)), n=st.integers(1, 12))
def test_top_confusions_are_sorted_and_complete(c, n):
    """The report lists the largest confusions first, so no omitted pair may exceed a listed one."""
    top = top_confusions(c, n)
    totals = [ab + ba for _, _, ab, ba in top]
    assert len(top) <= n and totals == sorted(totals, reverse=True) and all(t > 0 for t in totals)
    for i, j, ab, ba in top:
        assert i < j and (ab, ba) == (c[i, j], c[j, i])
    listed = {(i, j) for i, j, *_ in top}
    rest = [c[i, j] + c[j, i] for i in range(10) for j in range(i + 1, 10) if (i, j) not in listed]
    if len(top) == n and rest:
        assert max(rest) <= min(totals)
    elif len(top) < n:
        assert all(t == 0 for t in rest)


def test_confusion_matrix_counts_uint8_labels_without_overflow_and_no_labels_as_zeros():
    c = confusion_matrix(np.array([29, 3], np.uint8), np.array([29, 2], np.uint8), 30)
    assert c[29, 29] == 1 and c[3, 2] == 1 and c.sum() == 2
    np.testing.assert_array_equal(confusion_matrix([], []), np.zeros((10, 10), int))


# ================================================================================================
# The split
# ================================================================================================

def test_split_indices_partition_the_training_set():
    """The report's 50,000 / 10,000 split holds every official training image exactly once."""
    train, val = split_indices(60_000, 10_000, 42)
    assert len(train) == 50_000 and len(val) == 10_000
    assert not np.intersect1d(train, val).size
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(60_000))
    again, other = split_indices(60_000, 10_000, 42), split_indices(60_000, 10_000, 43)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], val)
    assert not np.array_equal(other[1], val)


@given(n=st.integers(2, 3000), seed=st.integers(0, 2**32 - 1), data=st.data())
def test_split_indices_holds_out_the_last_val_size_of_one_seeded_order(n, seed, data):
    """For any 1 <= v < n, a partition of range(n) into n - v and v indices; a larger validation
    set only takes more from the end of the same order, so every v's training indices are the
    head of one permutation fixed by the seed (the report's split is this with v = 10,000).
    val_size 0, negative or n and above is refused."""
    v1, v2 = sorted(data.draw(st.lists(st.integers(1, n - 1), min_size=2, max_size=2)))
    train1, val1 = split_indices(n, v1, seed)
    train2, val2 = split_indices(n, v2, seed)
    assert (len(train2), len(val2)) == (n - v2, v2)
    assert np.array_equal(np.sort(np.concatenate([train2, val2])), np.arange(n))
    assert np.array_equal(train2, train1[:n - v2]) and np.array_equal(val2[v2 - v1:], val1)
    with pytest.raises(ValueError, match="val_size"):
        split_indices(n, data.draw(st.integers(-3, 0) | st.integers(n, n + 3)), seed)


def test_make_splits_with_limit_takes_the_first_training_indices(raw):
    """--limit shrinks only the training set; validation and test stay the report's."""
    config = Config(limit=1234)
    s = make_splits(raw, config)
    train_idx, val_idx = split_indices(60_000, config.val_size, config.split_seed)
    assert (len(s.y_train), len(s.y_val), len(s.y_test)) == (1234, 10_000, 10_000)
    assert s.x_train.shape == (1234, 784) and s.x_train.dtype == np.float32
    assert np.array_equal(s.y_train, raw.train_labels[train_idx[:1234]])
    assert np.array_equal(s.x_train, normalise(raw.train_images[train_idx[:1234]]))
    assert np.array_equal(s.y_val, raw.train_labels[val_idx])
    assert np.array_equal(s.y_test, raw.test_labels)
    assert np.issubdtype(s.y_train.dtype, np.integer)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_make_splits_gives_every_split_in_the_configs_dtype(dtype):
    """Config.dtype decides the dtype of all three splits' images (labels are always intp)."""
    rng = np.random.default_rng(0)
    raw = RawData(rng.integers(0, 256, (50, 28, 28), dtype=np.uint8),
                  rng.integers(0, 10, 50).astype(np.uint8),
                  rng.integers(0, 256, (7, 28, 28), dtype=np.uint8),
                  rng.integers(0, 10, 7).astype(np.uint8))
    s = make_splits(raw, Config(dtype=dtype, val_size=10))
    for x in (s.x_train, s.x_val, s.x_test):
        assert x.dtype == np.dtype(dtype)
    assert np.array_equal(s.x_test, normalise(raw.test_images, dtype))
    assert {y.dtype for y in (s.y_train, s.y_val, s.y_test)} == {np.dtype(np.intp)}


def test_the_reports_split_is_the_one_every_earlier_run_was_made_with():
    """split_seed 42 must keep naming the same 10,000 validation images: a checkpoint stores only
    the seed, so a different permutation (another generator, or a NumPy release that changes
    Generator.permutation) would evaluate old runs' "validation" on images they trained on.
    Pinned: the first indices and the SHA-256 of the validation indices as int64."""
    train, val = split_indices(60_000, 10_000, 42)
    assert train[:5].tolist() == [3493, 57546, 8815, 19332, 15566]
    assert val[:5].tolist() == [40982, 39928, 27078, 2387, 4249]
    assert hashlib.sha256(np.asarray(val, np.int64).tobytes()).hexdigest() == \
        "c0d2647f131076b2a905942959769ece5d1ff9f0d165275792cc2bdee0c7c7ea"


# ================================================================================================
# The real data
# ================================================================================================

def test_real_data_shapes_and_class_balance(raw):
    """Fashion-MNIST has 60,000 + 10,000 28x28 images, 6,000 and 1,000 of each of the 10 classes."""
    assert raw.train_images.shape == (60_000, 28, 28) and raw.test_images.shape == (10_000, 28, 28)
    assert raw.train_labels.shape == (60_000,) and raw.test_labels.shape == (10_000,)
    assert all(a.dtype == np.uint8 for a in raw)
    assert np.array_equal(np.bincount(raw.train_labels, minlength=10), [6000] * 10)
    assert np.array_equal(np.bincount(raw.test_labels, minlength=10), [1000] * 10)


def test_shipped_files_match_the_published_checksums():
    """DATA_FILES are Zalando's SHA-256 and sizes; the shipped files must be those exact bytes."""
    for name, (sha256, size) in DATA_FILES.items():
        data = gzip.decompress((DATA / f"{name}.gz").read_bytes())
        assert len(data) == size, name
        assert hashlib.sha256(data).hexdigest() == sha256, name


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_normalise_is_the_formula_for_every_pixel_value(dtype):
    """The lookup table is (u / 255 - MEAN) / STD computed in float64 and rounded once to the
    dtype, for each of the 256 pixel values: black is BACKGROUND, white is (1 - MEAN) / STD."""
    images = np.resize(np.arange(256, dtype=np.uint8), (3, 28, 28))
    expected = ((images.reshape(3, 784) / 255.0 - fmnist.MEAN) / fmnist.STD).astype(dtype)
    out = normalise(images, dtype)
    assert out.dtype == np.dtype(dtype) and np.array_equal(out, expected)
    assert out[0, 255] == np.asarray((1 - fmnist.MEAN) / fmnist.STD, dtype)


def test_normalised_train_split_has_mean_zero_and_std_one(raw):
    """The report's constants 0.286 and 0.353 are the training pixels' mean and std on [0, 1]."""
    x = make_splits(raw).x_train
    assert abs(x.mean(dtype=np.float64)) < 0.005
    assert abs(x.std(dtype=np.float64) - 1) < 0.005


def readme_python_example() -> str:
    """The README's one Python block (under "Using the functions"), as a reader would copy it."""
    text = (HERE / "README.md").read_text(encoding="utf-8")
    section = text.split("## Using the functions", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the section should hold exactly one Python example"
    return blocks[0]


def test_readme_example_runs_as_written(monkeypatch, capsys):
    """The README's example, copied as is and run from the clone, does what its comments say: a
    hand-rolled step, then an epoch of the report's recipe on the real data, which already
    classifies most validation images (84% here; the running training accuracy, with dropout on
    and the network still learning, is lower: 77%)."""
    monkeypatch.chdir(HERE)                          # it loads "data", relative to the clone
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(readme_python_example(), "README.md", "exec"), namespace)
    assert namespace["logits"].shape == (128, 10)    # as its shape comment says
    assert set(namespace["grads"]) == set(namespace["params"]) == set(init_params().keys())
    assert namespace["state"].step == 1 + 391        # the hand-rolled step, then 391 batches
    stats, printed = namespace["stats"], capsys.readouterr().out.split()
    assert isinstance(stats, fmnist.EpochStats) and stats.accuracy > 0.7
    assert float(printed[-1]) > 0.8                  # the printed validation accuracy


def test_readme_contents_list_every_section_with_its_github_anchor():
    """The README's contents are its `##` headings in order, each linked by the anchor GitHub
    makes of it (lower case, punctuation but hyphens dropped, spaces as hyphens)."""
    text = (HERE / "README.md").read_text(encoding="utf-8")
    contents = text.split("Contents:\n", 1)[1].split("\n## ", 1)[0]
    links = re.findall(r"^- \[(.+)\]\((#[^)]+)\)$", contents, flags=re.M)
    headings = re.findall(r"^## (.+)$", text, flags=re.M)
    assert [title for title, _ in links] == headings
    for title, target in links:
        assert target == "#" + re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-"), title


# ================================================================================================
# The loader
# ================================================================================================

def idx_bytes(magic, dims, payload=b""):
    return struct.pack(f">I{len(dims)}I", magic, *dims) + bytes(payload)


def io_path(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _link(src: Path, dst: Path):
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        dst.symlink_to(src)
    except OSError:
        shutil.copy(src, dst)


@pytest.mark.parametrize("layout", ["zalando, uncompressed labels", "torchvision FashionMNIST/raw"])
def test_loader_reads_gz_and_uncompressed_files_in_both_layouts(raw, tmp_path, layout):
    """The same arrays must come out whichever of the two common layouts and encodings holds them."""
    folder = tmp_path if layout.startswith("zalando") else tmp_path / "FashionMNIST" / "raw"
    for name in DATA_FILES:
        src = DATA / f"{name}.gz"
        if "labels" in name and layout.startswith("zalando"):
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(gzip.decompress(src.read_bytes()))
        else:
            _link(src, folder / f"{name}.gz")
    loaded = load_fashion_mnist(tmp_path)
    for a, b in zip(loaded, raw):
        assert np.array_equal(a, b)


def test_read_idx_gz_and_plain_give_the_same_array_and_hash(tmp_path):
    """The checksum is of the decompressed bytes, so compressing a file must not change anything."""
    data = idx_bytes(2049, [5], [3, 1, 4, 1, 5])
    sha = hashlib.sha256(data).hexdigest()
    (tmp_path / "plain").write_bytes(data)
    (tmp_path / "packed").write_bytes(gzip.compress(data))
    a, b = read_idx(tmp_path / "plain", sha), read_idx(tmp_path / "packed", sha)
    assert np.array_equal(a, [3, 1, 4, 1, 5]) and np.array_equal(a, b) and a.dtype == np.uint8
    images = idx_bytes(2051, [2, 28, 28], bytes(range(256)) * 6 + bytes(1568 - 1536))
    assert read_idx(io_path(tmp_path / "img", images)).shape == (2, 28, 28)


def test_load_refuses_a_file_with_one_label_changed(tmp_path):
    """A flipped byte that still parses must be caught by the checksum, naming the damaged file."""
    for name in DATA_FILES:
        _link(DATA / f"{name}.gz", tmp_path / f"{name}.gz")
    bad = tmp_path / "t10k-labels-idx1-ubyte"
    data = bytearray(gzip.decompress((DATA / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    data[8 + 5] = (data[8 + 5] + 1) % 10                     # still a valid label
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    bad.write_bytes(bytes(data))
    with pytest.raises(DataError, match=re.escape(str(bad)) + ".*checksum"):
        load_fashion_mnist(tmp_path)


def test_load_names_a_missing_file(tmp_path):
    """A user with a missing file must be told which one and where it was looked for."""
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        load_fashion_mnist(tmp_path)


def test_truncated_gz_is_a_data_error_naming_the_file(tmp_path):
    """A half-downloaded file must say so, not raise EOFError from deep inside gzip."""
    packed = (DATA / "t10k-labels-idx1-ubyte.gz").read_bytes()
    bad = io_path(tmp_path / "t10k-labels-idx1-ubyte.gz", packed[:len(packed) // 2])
    with pytest.raises(DataError, match=re.escape(str(bad))):
        read_idx(bad, DATA_FILES["t10k-labels-idx1-ubyte"][0])


BAD_IDX = {
    "empty": b"",
    "wrong magic": idx_bytes(2052, [3], [1, 2, 3]),
    "label above 9": idx_bytes(2049, [3], [1, 10, 2]),
    "header claims 10^9 images": idx_bytes(2051, [10**9, 28, 28], bytes(784)),
    "header claims 10^9 labels": idx_bytes(2049, [10**9], [1, 2, 3]),
    "truncated data": idx_bytes(2049, [5], [1, 2, 3]),
    "data longer than header": idx_bytes(2049, [2], [1, 2, 3]),
    "images not 28x28": idx_bytes(2051, [1, 27, 28], bytes(27 * 28)),
    "truncated header": idx_bytes(2051, [1])[:7],
}


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("case", BAD_IDX)
def test_damaged_idx_files_raise_data_error_naming_the_file(tmp_path, case, gz):
    """Every kind of damage must become one DataError the user can act on: which file, what is wrong."""
    data = BAD_IDX[case]
    path = io_path(tmp_path / ("f.gz" if gz else "f"), gzip.compress(data) if gz else data)
    with pytest.raises(DataError, match=re.escape(str(path))):
        read_idx(path)
    with pytest.raises(DataError, match="the-name"):
        parse_idx(io.BytesIO(data), "the-name")


def test_hostile_header_is_refused_before_allocating(tmp_path):
    """A header claiming 10^9 labels must not make the loader reserve a gigabyte to read them."""
    path = io_path(tmp_path / "f", idx_bytes(2049, [10**9], [1, 2, 3]))
    tracemalloc.start()
    try:
        with pytest.raises(DataError):
            read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, peak


@st.composite
def idx_like_bytes(draw):
    """Mostly well-formed IDX headers with payloads of about the right length and content; about
    a fifth are valid files, so the checks on what the loader returns get exercised too."""
    magic = draw(st.sampled_from([2049, 2051]) if draw(st.integers(0, 3))
                 else st.integers(0, 2**32 - 1))
    if magic == 2051:
        dims = [draw(st.integers(0, 2)), *draw(st.sampled_from([(28, 28), (28, 27), (1, 28)]))]
    else:
        dims = [draw(st.integers(0, 40))]
    size = int(np.prod(dims)) + draw(st.sampled_from([0, 0, 0, -1, 1, -5]))
    payload = draw(st.binary(min_size=max(size, 0), max_size=max(size, 0))
                   | st.lists(st.integers(0, 9), min_size=max(size, 0), max_size=max(size, 0)))
    cut = draw(st.integers(0, 20)) if draw(st.integers(0, 3)) == 0 else None
    return idx_bytes(magic, dims, payload)[:cut]


@given(data=idx_like_bytes() | st.binary(max_size=64))
@example(data=idx_bytes(2049, [0]))
@example(data=idx_bytes(2049, [3], [1, 10, 2]))        # a label above 9: must not come back
@example(data=idx_bytes(2049, [2], [1, 2, 3]))         # longer than its header: must not be cut
def test_parse_idx_returns_a_valid_array_or_raises_data_error(data):
    """Whatever the bytes, the loader either returns well-formed uint8 data or a DataError, never junk."""
    try:
        a = parse_idx(io.BytesIO(data))
    except DataError:
        return
    assert a.dtype == np.uint8 and a.ndim in (1, 3)
    assert a.ndim == 1 or a.shape[1:] == (28, 28)
    assert idx_bytes(2049 if a.ndim == 1 else 2051, a.shape, a.tobytes()) == data
    assert a.ndim == 3 or a.size == 0 or a.max() <= 9


@pytest.mark.parametrize("name", fmnist.TEST_FILES)
def test_load_test_set_checks_the_checksums_too(tmp_path, name):
    """predict --test-index reads only the two test files; they are verified like all four."""
    for test_file in fmnist.TEST_FILES:
        shutil.copy(DATA / f"{test_file}.gz", tmp_path)
    (tmp_path / f"{name}.gz").write_bytes(gzip.compress(one_byte_changed(name)))
    with pytest.raises(DataError, match="checksum mismatch"):
        fmnist.load_test_set(tmp_path)


@pytest.mark.parametrize("rows, cols", [(28, 27), (27, 28), (1, 784), (784, 1)], ids=str)
def test_images_of_any_other_shape_than_28x28_are_refused(rows, cols):
    """Both sides of an image are checked, not only the first: a 28x27 file would otherwise load
    as images of another shape, to fail later as a reshape deep in normalise."""
    data = idx_bytes(2051, [2, rows, cols], bytes(2 * rows * cols))
    with pytest.raises(DataError, match=f"the-name: images are {rows}x{cols}, expected 28x28"):
        parse_idx(io.BytesIO(data), "the-name")


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_a_header_claiming_more_image_bytes_than_any_file_is_refused_before_allocating(tmp_path, gz):
    """The bound is on the bytes a header claims, not on its item count: 100,000 images are
    78 MB, more than MAX_IDX_BYTES though far fewer than MAX_IDX_BYTES items. They are refused
    from the header, without reserving the 78 MB."""
    data = idx_bytes(2051, [100_000, 28, 28], bytes(784))
    path = io_path(tmp_path / ("f.gz" if gz else "f"), gzip.compress(data) if gz else data)
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"header claims 100,000 items \(78,400,000 bytes\)"):
            read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, peak


@pytest.mark.parametrize("kind", ["missing", "a directory"])
def test_read_idx_of_a_path_it_cannot_open_is_a_data_error_naming_it(tmp_path, kind):
    """read_idx's failures are DataErrors (what load_fashion_mnist's callers catch), also when
    the file cannot even be opened, not an OSError from open()."""
    path = tmp_path / "absent" if kind == "missing" else tmp_path
    with pytest.raises(DataError, match=re.escape(f"{path}: cannot be opened")):
        read_idx(path)


# ================================================================================================
# Checkpoints
# ================================================================================================

@given(hidden=st.lists(st.integers(1, 8), min_size=1, max_size=2), seed=st.integers(0, 2**32 - 1),
       dtype=st.sampled_from(["float32", "float64"]), dropout=st.floats(0, 0.9),
       epoch=st.integers(1, 50))
def test_checkpoint_round_trip_is_exact(hidden, seed, dtype, dropout, epoch):
    """Evaluating a saved run must use exactly the trained numbers and the run's own config."""
    config = Config(hidden=tuple(hidden), seed=seed, dtype=dtype, dropout=dropout, limit=100)
    params = init_params(config.layer_sizes, seed, dtype)
    params = params.like(params.flat + np.arange(params.flat.size, dtype=dtype))  # nonzero biases too
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "best.npz"
        save_checkpoint(path, params, config, epoch=epoch)
        loaded, loaded_config, meta = load_checkpoint(path)
    assert loaded_config == config and meta["epoch"] == epoch
    assert list(loaded) == list(params)
    for k in params:
        assert loaded[k].dtype == params[k].dtype and loaded[k].shape == params[k].shape
        assert loaded[k].tobytes() == params[k].tobytes()
    assert not loaded.flat.flags.writeable


def test_checkpoint_with_an_object_array_is_refused(tmp_path):
    """Loading an object array would unpickle, which can run arbitrary code; it must be refused."""
    params = init_params((784, 4, 10), 0)
    meta = json.dumps({"format": fmnist.CHECKPOINT_FORMAT, "config": Config(hidden=(4,)).to_json()})
    path = tmp_path / "evil.npz"
    arrays = dict(params) | {"W1": np.array([{"x": 1}], dtype=object), "meta": np.array(meta)}
    np.savez(path, **arrays)
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(path)


def test_checkpoint_that_does_not_fit_its_config_names_both_shapes(tmp_path):
    """A mismatched checkpoint must say what it holds and what its config needs, not fail in matmul."""
    path = tmp_path / "c.npz"
    with pytest.raises(CheckpointError, match="784-8-10.*784-16-10"):   # refused on save, too
        save_checkpoint(path, init_params((784, 8, 10), 0), Config(hidden=(16,)))
    save_checkpoint(path, init_params((784, 8, 10), 0), Config(hidden=(8,)))
    with np.load(path) as npz:      # rewrite the config inside, as another tool might
        arrays = dict(npz)
    arrays["meta"] = np.array(str(arrays["meta"]).replace('"hidden": [8]', '"hidden": [16]'))
    np.savez(path, **arrays)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert "(784, 8)" in str(err.value) and "(784, 16)" in str(err.value) and str(path) in str(err.value)


def test_save_checkpoint_writes_only_what_load_checkpoint_accepts(tmp_path):
    """A checkpoint that cannot be loaded back is worse than an error when saving: an unfolded
    batch-norm network, parameters of another dtype than the config's, or NaN weights are
    refused by save_checkpoint itself, and nothing is written."""
    config = Config(hidden=(8,))
    params = init_params((784, 8, 10), 0)
    with_nan = Params.from_arrays({k: np.full_like(a, np.nan) if k == "b1" else a
                                   for k, a in params.items()})
    for bad, words in ((init_params((784, 8, 10), 0, "float64"), "W1 is float64"),
                       (with_nan, "b1 is float32 with non-finite values"),
                       (init_params((784, 8, 10), 0, batch_norm=True), "fold batch norm first")):
        with pytest.raises(CheckpointError, match=re.escape(words)):
            fmnist.save_checkpoint(tmp_path / "x.npz", bad, config)
        assert not (tmp_path / "x.npz").exists()
    fmnist.save_checkpoint(tmp_path / "x.npz", params, config)
    assert np.array_equal(load_checkpoint(tmp_path / "x.npz")[0].flat, params.flat)


# ================================================================================================
# Shape errors
# ================================================================================================

def _shape_setup():
    params = init_params((784, 8, 10), 0)
    rng = np.random.default_rng(0)
    return params, rng.normal(size=(5, 784)).astype(np.float32), rng.integers(0, 10, 5)


@pytest.mark.parametrize("call", [
    lambda p, x, y: forward(p, x),
    lambda p, x, y: predict_logits(p, x),
    lambda p, x, y: evaluate(p, x, y),
    lambda p, x, y: train_epoch(p, adam_init(p), x, y, Config(hidden=(8,))),
], ids=["forward", "predict_logits", "evaluate", "train_epoch"])
def test_unflattened_images_give_a_value_error_naming_both_shapes(call):
    """(B, 28, 28) images must be refused with the expected (batch, 784), not broadcast or crash later."""
    params, x, y = _shape_setup()
    with pytest.raises(ValueError, match=r"\(batch, 784\).*\(5, 28, 28\)"):
        call(params, x.reshape(5, 28, 28), y)


@pytest.mark.parametrize("call", [
    lambda p, x, y: evaluate(p, x, y),
    lambda p, x, y: train_epoch(p, adam_init(p), x, y, Config(hidden=(8,))),
    lambda p, x, y: backward(p, forward(p, x)[1], y),
], ids=["evaluate", "train_epoch", "backward"])
def test_labels_of_the_wrong_length_give_a_value_error_naming_both_shapes(call):
    """Labels that do not match the batch would silently score the wrong rows; they must be refused."""
    params, x, y = _shape_setup()
    with pytest.raises(ValueError, match=r"\(5,\).*\(4,\)"):
        call(params, x, y[:4])


@pytest.mark.parametrize("shape", [(2, 27, 28), (2, 784, 1), (2, 28, 28, 1)], ids=str)
def test_normalise_refuses_pixels_of_any_other_shape(shape):
    """Only (N, 28, 28) is images: (2, 784, 1) would otherwise reshape silently to two images,
    and (2, 27, 28) fail with NumPy's reshape message instead of this one."""
    with pytest.raises(ValueError, match=re.escape(f"uint8 pixels of shape (N, 28, 28), got uint8 {shape}")):
        normalise(np.zeros(shape, np.uint8))


# ================================================================================================
# Command line (subprocesses, as a user runs it)
# ================================================================================================

def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "fmnist.py", *map(str, args)], cwd=HERE,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    proc = run_cli("train", "--limit", 2000, "--epochs", 1, "--out", out)
    return out, proc


def test_cli_train_writes_a_complete_run(trained_run, raw):
    """A finished run directory holds the best checkpoint, its config, the history and the metrics."""
    out, proc = trained_run
    assert proc.returncode == 0, proc.stderr
    names = {p.name for p in out.iterdir()}
    assert {"best.npz", "state.npz", "config.json", "history.json", "metrics.json"} <= names
    assert not [n for n in names if n.endswith(".tmp")]         # no temporary file left behind
    config = Config(limit=2000, epochs=1)
    assert json.loads((out / "config.json").read_text()) == config.to_json()
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 1 and history[0]["epoch"] == 1
    assert history[0]["val_accuracy"] == history[0]["val_correct"] / 10_000
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["best_epoch"], metrics["epochs_run"], metrics["stopped_early"]) == (1, 1, False)
    assert metrics["val_accuracy"] == history[0]["val_accuracy"]
    assert 0.5 < metrics["test_accuracy"] <= 1 and 0.5 < metrics["val_accuracy"] <= 1   # chance is 0.1
    confusion = np.array(metrics["confusion"])
    assert confusion.shape == (10, 10) and confusion.sum() == 10_000
    assert np.trace(confusion) / 10_000 == metrics["test_accuracy"]
    assert [c["class"] for c in metrics["per_class"]] == list(fmnist.CLASS_NAMES)
    assert [c["support"] for c in metrics["per_class"]] == [1000] * 10
    params, loaded_config, meta = load_checkpoint(out / "best.npz")
    assert loaded_config == config and meta["epoch"] == 1
    splits = make_splits(raw, config)
    assert evaluate(params, splits.x_val, splits.y_val).correct == history[0]["val_correct"]


def test_cli_evaluate_reproduces_the_run_figures(trained_run):
    """Evaluating the saved checkpoint must give the test accuracy the run reported."""
    out, proc = trained_run
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    ev = run_cli("evaluate", out / "best.npz")
    assert ev.returncode == 0, ev.stderr
    assert re.search(rf"test:\s+loss {metrics['test_loss']:.4f}\s+accuracy {metrics['test_accuracy']:.2%}",
                     ev.stdout), ev.stdout


def test_cli_refuses_to_overwrite_a_finished_run(trained_run, tmp_path):
    """Re-running into a finished run directory must not destroy its results without --force."""
    out, proc = trained_run
    assert proc.returncode == 0, proc.stderr
    copy = shutil.copytree(out, tmp_path / "run")
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in copy.iterdir()}
    again = run_cli("train", "--limit", 2000, "--epochs", 1, "--out", copy)
    assert again.returncode != 0
    assert "--force" in again.stderr and "Traceback" not in again.stderr
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in copy.iterdir()} == before


@pytest.mark.parametrize("flags, word", [
    (["--lr", "-1"], "learning rate"), (["--dropout", "1"], "dropout"), (["--hidden", "0"], "hidden"),
    (["--seed", "-1"], "seed"), (["--split-seed", "-1"], "seed"),
    (["--batch-norm", "--batch-size", "1"], "batch norm needs batches of at least 2"),
    (["--batch-norm", "--limit", "129"], "129 training images in batches of 128 leave 1"),
    (["--jobs", "2"], "--jobs applies to an ensemble recipe only"),
    (["--hidden", "99999999999999999999"], "hidden sizes must be one or more whole numbers from 1 to "
                                           "2,147,483,647, got [99999999999999999999]"),
    (["--flip-average"], "add --flip"),
])
def test_cli_bad_hyperparameter_is_a_usage_error(tmp_path, flags, word):
    """A value out of range is the user's typo: exit 2 with its line last on stderr (after
    argparse's usage line, for a value of the wrong kind), saying which, and touch nothing."""
    out = tmp_path / "never"
    proc = run_cli("train", *flags, "--out", out)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("fmnist train: error: "), proc.stderr
    assert word in proc.stderr.strip().splitlines()[-1], proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("command, word", [
    (["gradcheck", "--hidden", "0"], "--hidden needs one or more widths from 1 to 2,147,483,647, got 0"),
    (["gradcheck", "--batch", "0"], "--batch: expected a number of at least 1, got '0'"),
    (["gradcheck", "--batch", "1", "--batch-norm"], "--batch-norm needs --batch of at least 2"),
    (["gradcheck", "--seed", "-3"], "a seed is a whole number of at least 0, got '-3'"),
    (["predict", "best.npz", "--test-index", "10000"], "a test image number is 0 to 9999"),
    (["download", "--mirror", "/a/folder"], "expected a URL (http://, https:// or file:///folder), "
                                            "got '/a/folder'"),
    (["train", "--force"], "--force overwrites the run in --out; without --out, every run gets a "
                           "new directory"),
])
def test_cli_other_commands_bad_settings_are_usage_errors_naming_the_value(command, word):
    proc = run_cli(*command)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"fmnist {command[0]}: error: ") and word in last, proc.stderr


def test_cli_paths_of_the_wrong_kind_get_one_line_saying_what_was_expected(run_dir, tmp_path):
    """A file where a directory belongs, a directory where a file belongs, a folder that is not
    a run, a run directory that cannot be created: one line each, naming the path and what the
    command takes, never an OS error number."""
    a_file = tmp_path / "a.png"
    a_file.write_bytes(b"not really")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["train", "--resume", a_file], a_file, "not a directory; --resume takes the directory"),
        (["train", "--resume", empty], empty, "no state.npz, so no run to resume"),
        (["train", "--resume", tmp_path / "gone"], tmp_path / "gone", "not found"),
        (["report", run_dir / "best.npz"], run_dir / "best.npz", "report takes the directory"),
        (["predict", run_dir, empty], empty, "a directory, not an image file"),
        (["evaluate", empty], empty, "neither best.npz nor ensemble.json"),
        (["download", "--data-dir", a_file], a_file, "exists and is not a directory"),
        (["evaluate", run_dir, "--data-dir", a_file], a_file,
         "not a directory; --data-dir takes the folder holding the IDX files"),
        (["train", "--limit", 100, "--epochs", 1, "--out", a_file / "run"], a_file / "run",
         "cannot create the directory"),
    ]
    for argv, path, words in cases:
        line = one_line_error(run_cli(*argv), stdout=None)
        assert str(path) in line and words in line and "Errno" not in line, (argv, line)


def test_cli_finds_the_shipped_data_from_any_working_directory(run_dir, tmp_path):
    """Without --data-dir a command reads ./data if there is one, else the data/ beside
    fmnist.py: run from elsewhere, `evaluate` still finds the shipped files; a ./data of the
    user's own comes first (here an empty one, which then has no files to offer, so the error
    points to the copy beside fmnist.py)."""
    def evaluate_from(cwd):
        return subprocess.run([sys.executable, str(HERE / "fmnist.py"), "evaluate", run_dir],
                              cwd=cwd, capture_output=True, text=True, timeout=120)
    proc = evaluate_from(tmp_path)
    assert proc.returncode == 0 and "test:" in proc.stdout, proc.stderr
    (tmp_path / "data").mkdir()
    line = one_line_error(evaluate_from(tmp_path), stdout=None)
    assert "data/train-images-idx3-ubyte[.gz]: file not found" in line, line
    assert line.endswith(f"such as {HERE / 'data'} (the copy beside fmnist.py)"), line


def test_cli_run_and_ensemble_directories_that_are_not_ready_say_what_to_do(ensemble_run, tmp_path):
    """A run stopped before its first epoch (config.json only) has nothing to resume: say to
    start it again (nothing is lost, so no --force is needed). An ensemble whose member has not
    finished is not evaluated, asked or reported on: say which member and how to continue, with
    the path quoted so the command can be pasted. A damaged ensemble.json is called that, not a
    missing one."""
    early = tmp_path / "early"
    early.mkdir()
    (early / "config.json").write_text(json.dumps(Config().to_json()))
    line = one_line_error(run_cli("train", "--resume", early), stdout=None)
    assert "stopped before its first epoch" in line, line
    assert line.endswith("start it again with the command that started it (its settings are in "
                         "config.json)"), line
    out, _ = ensemble_run
    unfinished = shutil.copytree(out, tmp_path / "an ensemble")
    (unfinished / "best-shift" / "metrics.json").unlink()
    written = (unfinished / "best-bn" / "report.md").stat().st_mtime_ns
    for argv in (["evaluate", unfinished], ["predict", unfinished, "--test-index", 1],
                 ["report", unfinished]):
        line = one_line_error(run_cli(*argv), stdout=None)
        assert "has not finished (best-shift still training)" in line, line
        assert line.endswith(f"continue it with `python fmnist.py train --resume '{unfinished}'`"), line
    assert (unfinished / "best-bn" / "report.md").stat().st_mtime_ns == written   # not rewritten
    (unfinished / "ensemble.json").write_text("{ not json")
    line = one_line_error(run_cli("evaluate", unfinished), stdout=None)
    assert "ensemble.json: unreadable" in line, line


def test_cli_evaluate_and_predict_take_a_run_directory_for_its_best_checkpoint(run_dir):
    """The run directory stands for its best.npz, as an ensemble's directory does for its
    members: the same figures, the same predictions."""
    for command in (["evaluate"], ["predict", "--test-index", 3, "--json"]):
        by_file, by_dir = (run_cli(*command, path) for path in (run_dir / "best.npz", run_dir))
        assert by_file.returncode == 0 and by_dir.returncode == 0, by_dir.stderr
        assert by_dir.stdout.replace(str(run_dir / "best.npz"), str(run_dir)) == \
            by_file.stdout.replace(str(run_dir / "best.npz"), str(run_dir))


@pytest.mark.parametrize("command", [[], ["train"], ["evaluate"]], ids=["top", "train", "evaluate"])
def test_cli_help_works_for_each_command(command):
    """--help is how a user finds the flags; it must work everywhere and list them."""
    proc = run_cli(*command, "--help")
    assert proc.returncode == 0 and proc.stdout.startswith("usage: fmnist"), proc.stderr
    expected = {"": ["train", "evaluate"],
                "train": ["--lr", "--dropout", "--hidden", "--limit", "--force", "--recipe",
                          "--lr-schedule", "--flip", "--shift", "--label-smoothing", "--average",
                          "--flip-average", "--no-flip-average", "--cutout", "--input-dropout",
                          "--weight-decay"],
                "evaluate": ["CHECKPOINT", "--data-dir"]}["".join(command)]
    assert all(e in proc.stdout for e in expected), proc.stdout


BEST_TINY = ("--recipe", "best-bn", "--limit", 500, "--epochs", 1, "--hidden", 16)


@pytest.fixture(scope="module")
def best_run(tmp_path_factory):
    """`train --recipe best-bn`, made tiny by explicit flags (500 images, 1 epoch, 16 units)."""
    out = tmp_path_factory.mktemp("best") / "run"
    proc = run_cli("train", *BEST_TINY, "--out", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    return out


def test_cli_recipe_best_trains_with_the_recipe_under_the_explicit_flags(best_run, raw, capsys):
    """--recipe best-bn sets every hyperparameter to the recipe's value, and each flag given
    explicitly overrides just its own: config.json shows both. What was evaluated is what the
    recipe says (flip-averaged), so re-evaluating best.npz with flip averaging reproduces the
    validation accuracy, and `evaluate` prints the run's test figures (it must flip-average too,
    from the checkpoint's config); state.npz holds the arrays the config calls for, and
    report.md says how to repeat the run."""
    config = dataclasses.replace(fmnist.RECIPES["best-bn"], hidden=(16,), epochs=1, limit=500)
    saved = json.loads((best_run / "config.json").read_text())
    assert saved == config.to_json()
    assert (saved["flip"], saved["lr_schedule"], saved["flip_average"], saved["hidden"]) == \
        (0.5, "cosine", True, [16])
    metrics = json.loads((best_run / "metrics.json").read_text())
    params, loaded, _ = load_checkpoint(best_run / "best.npz")
    assert loaded == config
    splits = make_splits(raw, config)
    assert evaluate(params, splits.x_val, splits.y_val, flip_average=True).accuracy == \
        metrics["val_accuracy"]
    with np.load(best_run / "state.npz") as state:                    # "model" if averaging
        assert set(state.files) == {*fmnist.state_arrays(config), "meta"}
    assert fmnist.main(["evaluate", str(best_run / "best.npz")]) == 0
    assert re.search(rf"test:\s+loss {metrics['test_loss']:.4f}\s+accuracy {metrics['test_accuracy']:.2%}",
                     capsys.readouterr().out)
    assert "python fmnist.py train --recipe best-bn --hidden 16 --epochs 1 --limit 500" in \
        (best_run / "report.md").read_text()


def train_config(*argv) -> Config:
    """The Config that `fmnist.py train ARGV` would train, parsed as main parses it."""
    return fmnist.config_from_args(fmnist.parse_args(fmnist.build_parser(), ["train", *map(str, argv)]))


BEST = fmnist.RECIPES["best-bn"]


@pytest.mark.parametrize("argv, expected", [
    ([], Config()),
    (["--recipe", "report"], Config()),
    (["--recipe", "best-bn"], BEST),
    (["--recipe", "best-bn", "--flip", "0", "--no-flip-average"],
     dataclasses.replace(BEST, flip=0.0, flip_average=False)),
    (["--recipe", "best-bn", "--no-flip-average", "--lr-schedule", "constant"],
     dataclasses.replace(BEST, flip_average=False, lr_schedule="constant")),
    (["--hidden", "64", "--recipe", "best-shift", "--average", "0.9"],
     dataclasses.replace(fmnist.RECIPES["best-shift"], hidden=(64,), average=0.9)),
    (["--flip", "0.5", "--flip-average", "--shift", "2", "--label-smoothing", "0.1"],
     Config(flip=0.5, flip_average=True, shift=2, label_smoothing=0.1)),
    (["--recipe", "best-bn", "--dropout", str(BEST.dropout)], BEST),    # the recipe's value, again
    (["--recipe", "best-bn", "--cutout", "8", "--input-dropout", "0.1", "--weight-decay", "0.05"],
     dataclasses.replace(BEST, cutout=8, input_dropout=0.1, weight_decay=0.05)),
], ids=str)
def test_explicit_flags_override_the_recipe_and_nothing_else(argv, expected):
    """A flag not given keeps the recipe's value (flags default to 'absent', not to the report's
    values, or `--recipe best` would be silently undone by every default); a flag given wins,
    wherever it stands on the line."""
    assert train_config(*argv) == expected


def test_train_command_is_the_shortest_line_that_repeats_the_config():
    """report.md's "Reproduce" line: the bare command for the report's recipe, --recipe best for
    the best one, and from whichever recipe is nearer, only the flags that differ."""
    assert fmnist._train_command(Config()) == "python fmnist.py train"
    assert fmnist._train_command(BEST) == "python fmnist.py train --recipe best-bn"
    assert fmnist._train_command(dataclasses.replace(BEST, seed=7, flip_average=False)) == \
        "python fmnist.py train --recipe best-bn --seed 7 --no-flip-average"
    assert fmnist._train_command(Config(seed=7, flip=0.25, flip_average=True)) == \
        "python fmnist.py train --seed 7 --flip 0.25 --flip-average"


TINY32 = float(np.finfo(np.float32).tiny)   # smaller, nonzero: 0 in float32, refused by Config


@st.composite
def configs(draw) -> Config:
    """A recipe with a few of its fields changed to other valid values (val_size excepted: it
    has no flag)."""
    changes = draw(st.fixed_dictionaries({}, optional={
        "hidden": st.lists(st.integers(1, 2048), min_size=1, max_size=4).map(tuple),
        "dropout": st.floats(0, 1, exclude_max=True), "l2": st.just(0.0) | st.floats(TINY32, 1e-2),
        "lr": st.floats(1e-6, 1), "batch_size": st.integers(1, 512), "epochs": st.integers(1, 200),
        "patience": st.integers(0, 20), "seed": st.integers(0, 2**32 - 1),
        "dtype": st.sampled_from(["float32", "float64"]), "limit": st.none() | st.integers(1, 50_000),
        "lr_schedule": st.sampled_from(["constant", "cosine"]), "flip": st.floats(0, 1),
        "shift": st.integers(0, fmnist.MAX_SHIFT), "label_smoothing": st.floats(0, 1, exclude_max=True),
        "average": st.floats(0, 1, exclude_max=True), "flip_average": st.booleans(),
        "cutout": st.integers(0, 28), "input_dropout": st.floats(0, 1, exclude_max=True),
        "weight_decay": st.just(0.0) | st.floats(TINY32, 0.99), "batch_norm": st.booleans()}))
    base = fmnist.RECIPES[draw(st.sampled_from(list(fmnist.RECIPES)))]
    if changes.get("flip", base.flip) == 0:          # mirror averaging needs mirror training
        changes["flip_average"] = False
    if changes.get("batch_norm", base.batch_norm):   # batch norm excludes a running average
        changes["average"] = 0.0                     # and needs batches of two or more,
        size = max(2, changes.get("batch_size", base.batch_size))      # the last one too
        if changes.get("limit", base.limit) == 1:
            changes["limit"] = 2
        images = changes.get("limit", base.limit) or fmnist.TRAIN_IMAGES - base.val_size
        while images % size == 1:
            size += 1
        changes["batch_size"] = size
    return dataclasses.replace(base, **changes)


@given(config=configs())
def test_train_command_parses_back_to_the_same_config(config):
    """Whatever the config, running the printed command trains that config again: its flags,
    parsed as main parses them, give back an equal Config (floats print and parse exactly)."""
    command = fmnist._train_command(config)
    assert command.startswith("python fmnist.py train")
    assert train_config(*command.split()[3:]) == config


def test_a_run_reports_the_best_epoch_and_its_figures_consistently(raw, tmp_path, monkeypatch, capsys):
    """A run whose best epoch is not its last (validation labels are random here): metrics.json,
    best.npz and the printed table describe the best epoch's network, and the per-class figures
    and the largest confusions are those of the test confusion matrix."""
    noisy = fmnist.make_splits

    def make_splits(raw_data, config):
        splits = noisy(raw_data, config)
        return splits._replace(y_val=random_labels(len(splits.y_val)))

    monkeypatch.setattr(fmnist, "make_splits", make_splits)
    out = tmp_path / "run"
    assert fmnist.main(["train", "--limit", "500", "--hidden", "16", "--epochs", "6",
                        "--patience", "0", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    history = json.loads((out / "history.json").read_text())
    best = metrics["best_epoch"]
    assert best < metrics["epochs_run"]
    assert metrics["val_accuracy"] == history[best - 1]["val_accuracy"]
    assert load_checkpoint(out / "best.npz")[2]["epoch"] == best
    c = np.array(metrics["confusion"])
    for i, m in enumerate(metrics["per_class"]):
        assert m["recall"] == pytest.approx(c[i, i] / c[i].sum())
        assert m["precision"] == pytest.approx(c[i, i] / c[:, i].sum())
        assert (f"{m['class']:<12} {m['precision']:9.3f} {m['recall']:7.3f} {m['f1']:6.3f} "
                f"{m['support']:8d}") in printed
    for t in metrics["top_confusions"]:
        a, b = fmnist.CLASS_NAMES.index(t["a"]), fmnist.CLASS_NAMES.index(t["b"])
        assert (t["a_as_b"], t["b_as_a"]) == (c[a, b], c[b, a])


def test_a_run_on_one_image_says_image(tmp_path, capsys):
    assert fmnist.main(["train", *TINY_RUN, "--limit", "1", "--out", str(tmp_path / "r")]) == 0
    assert capsys.readouterr().out.startswith("training 784-8-10 on 1 image (10,000 validation)")


# ================================================================================================
# Resuming: a run saved after any epoch continues to the same result, bit for bit
# ================================================================================================

def test_fit_resumed_from_a_saved_state_is_bit_identical(raw, tmp_path):
    """Epoch e draws its randomness from [seed, e] alone and the saved state is exact, so
    stopping after 2 epochs, saving, loading and continuing equals training straight through."""
    config = Config(hidden=(32, 16), epochs=4, limit=600)
    splits = _tiny_splits(raw, 600, 300)
    straight = [s for s, _ in fit(splits, config)][-1]
    history = []
    for state, record in fit(splits, dataclasses.replace(config, epochs=2)):
        history.append(record)
    fmnist.save_state(tmp_path / "state.npz", state, config, history)
    loaded, loaded_config, loaded_history = fmnist.load_state(tmp_path / "state.npz")
    assert loaded_config == config and loaded_history == history and loaded.epoch == 2
    resumed = [s for s, _ in fit(splits, config, loaded)][-1]
    for a, b in ((straight.params, resumed.params), (straight.best_params, resumed.best_params),
                 (straight.opt_state.m, resumed.opt_state.m), (straight.opt_state.v, resumed.opt_state.v)):
        assert bits(a) == bits(b)
    assert straight.best == resumed.best and straight.opt_state.step == resumed.opt_state.step


def test_a_training_state_of_a_retired_format_is_refused_with_the_reason(raw, tmp_path, monkeypatch):
    """A state saved when the L2 term was l2 * sum ||W||^2 would resume with half its L2: the
    same --l2 value meant twice the regularisation then. Refuse it, saying why, rather than
    continue a run under another objective."""
    config = Config(hidden=(8,), epochs=1, limit=100)
    state, record = next(fit(_tiny_splits(raw, 100, 50), config))
    monkeypatch.setattr(fmnist, "STATE_FORMAT", "fmnist-train-state-1")
    fmnist.save_state(tmp_path / "state.npz", state, config, [record])
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match=r"earlier fmnist \(fmnist-train-state-1: its L2 term"):
        fmnist.load_state(tmp_path / "state.npz")


def test_fit_with_every_option_resumed_from_a_saved_state_is_bit_identical(raw, tmp_path):
    """The same with every new option on. The running average is state too: it cannot be
    recomputed from the parameters, so save_state must store it (as "model") and load_state give
    it back, or the resumed run would restart the average from the current parameters. The run
    is cut after epoch 2 of the same 4-epoch config, as Ctrl-C would (the cosine schedule
    depends on config.epochs, so a 2-epoch config would train differently)."""
    config = Config(hidden=(32, 16), epochs=4, limit=600, lr_schedule="cosine", flip=0.5, shift=1,
                    label_smoothing=0.1, average=0.6, flip_average=True)
    splits = _tiny_splits(raw, 600, 300)
    straight = list(fit(splits, config))
    history = []
    for state, record in fit(splits, config):
        history.append(record)
        if state.epoch == 2:
            break
    fmnist.save_state(tmp_path / "state.npz", state, config, history)
    with np.load(tmp_path / "state.npz") as saved:
        assert set(saved.files) == {"params", "m", "v", "best_params", "model", "meta"}
    loaded, loaded_config, loaded_history = fmnist.load_state(tmp_path / "state.npz")
    assert loaded_config == config and loaded_history == history and loaded.epoch == 2
    assert bits(loaded.model) == bits(state.model) != bits(loaded.params)
    resumed = list(fit(splits, config, loaded))
    assert len(resumed) == 2
    for (a, ra), (b, rb) in zip(straight[2:], resumed):
        for name in ("params", "best_params", "model"):
            assert bits(getattr(a, name)) == bits(getattr(b, name)), (a.epoch, name)
        assert bits(a.opt_state.m) == bits(b.opt_state.m) and bits(a.opt_state.v) == bits(b.opt_state.v)
        assert (a.best, a.opt_state.step) == (b.best, b.opt_state.step)
        assert {**ra, "seconds": 0} == {**rb, "seconds": 0}


@pytest.mark.parametrize("argv", [["--recipe", "best"], ["--recipe", "report"], ["--flip", "0.5"],
                                  ["--no-flip-average"], ["--lr-schedule", "cosine"], ["--limit", "100"],
                                  ["--out", "elsewhere"], ["--force"]],
                         ids=" ".join)
def test_cli_resume_refuses_a_recipe_or_hyperparameters(tmp_path, capsys, argv):
    """--resume continues with the settings stored in state.npz; a recipe or a flag beside it
    would be silently ignored, or worse, change the run half-way. So it is refused: exit 1 and
    one line (`fmnist: error: ...`, raised after parsing, like the other run-directory errors),
    and the run directory left exactly as it was."""
    config = Config(hidden=(4,), limit=100)
    fmnist.save_state(tmp_path / "state.npz", fmnist.initial_state(config), config, [])
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.iterdir()}
    assert fmnist.main(["train", "--resume", str(tmp_path), *argv]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == ("fmnist: error: --resume continues a run in its own directory with its "
                            "stored settings; do not pass a recipe, hyperparameters, --out or "
                            "--force with it\n")
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.iterdir()} == before


def test_the_report_recipe_is_the_default_config_with_every_new_option_off():
    """The report's numbers must not move: RECIPES["report"] is Config(), every option added
    since is off by default, and its state file holds exactly the arrays it always held."""
    assert fmnist.RECIPES["report"] == Config()
    d = Config()
    assert (d.lr_schedule, d.flip, d.shift, d.label_smoothing, d.average, d.flip_average) == \
        ("constant", 0.0, 0, 0.0, 0.0, False)
    assert (d.cutout, d.input_dropout, d.weight_decay) == (0, 0.0, 0.0)
    assert fmnist.state_arrays(d) == ("params", "m", "v", "best_params")
    assert fmnist.state_arrays(Config(average=0.5)) == ("params", "m", "v", "best_params", "model")


def interrupted_train(args, out: Path, run_dirs: Sequence[Path], epochs: int,
                      attempts: int = 3) -> tuple[int, str]:
    """Start `train *args --out out`, send it SIGINT (Ctrl-C) as soon as the history.json of every
    run directory in run_dirs lists `epochs` epochs (or after 120 s), and return its exit code
    and stderr once it has stopped. On a machine so busy that this process does not get to look
    before the run has finished (exit code 0), `out` is removed and the run tried again, up to
    `attempts` times, so that the callers' skip is rare."""
    for _ in range(attempts):
        proc = subprocess.Popen([sys.executable, "fmnist.py", "train", *map(str, args), "--out",
                                 str(out)], cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if all(len(json.loads((d / "history.json").read_text())) >= epochs for d in run_dirs):
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
        if proc.returncode != 0:
            break
        shutil.rmtree(out)
    return proc.returncode, stderr


def test_cli_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path):
    """Ctrl-C (SIGINT) mid-run exits cleanly after saving, prints the command that resumes, and
    `train --resume` then finishes with exactly the parameters of a run never interrupted."""
    args = ["--limit", 2000, "--hidden", "64", "--epochs", 12, "--quiet"]
    assert run_cli("train", *args, "--out", tmp_path / "straight").returncode == 0
    out = tmp_path / "interrupted"
    returncode, stderr = interrupted_train(args, out, [out], epochs=3)
    if returncode == 0:
        pytest.skip("the run finished before it could be interrupted")
    assert returncode == 130, stderr
    assert f"--resume {out}" in stderr and "Traceback" not in stderr
    assert not (out / "metrics.json").exists()
    resumed = run_cli("train", "--resume", out)
    assert resumed.returncode == 0, resumed.stderr
    a, b = np.load(tmp_path / "straight" / "state.npz"), np.load(out / "state.npz")
    for key in ("params", "m", "v", "best_params"):
        assert a[key].tobytes() == b[key].tobytes()
    assert run_cli("train", "--resume", out).returncode != 0       # finished: nothing to resume


@pytest.mark.parametrize("options", [dict(), dict(dtype="float64", average=0.5),
                                     dict(dtype="float64", batch_norm=True)])
def test_every_state_fit_yields_round_trips_through_save_state_exactly(raw, tmp_path, options):
    """save_state then load_state gives back the very TrainState, every field (params, moments,
    step, epoch, best, best_params, model), for each kind of run, float64 ones included."""
    config = Config(hidden=(16,), epochs=4, limit=300, **options)
    splits = _tiny_splits(raw, 300, 200, noisy_val=True, dtype=config.dtype)
    history = []
    for state, record in fit(splits, config):
        history.append(record)
        fmnist.save_state(tmp_path / "state.npz", state, config, history)
        loaded, loaded_config, loaded_history = fmnist.load_state(tmp_path / "state.npz")
        assert (loaded_config, loaded_history) == (config, history)
        assert (loaded.epoch, loaded.best, loaded.opt_state.step) == (state.epoch, state.best,
                                                                      state.opt_state.step)
        for name in ("params", "best_params", "model"):
            assert bits(getattr(loaded, name)) == bits(getattr(state, name)), name
        assert bits(loaded.opt_state.m) == bits(state.opt_state.m)
        assert bits(loaded.opt_state.v) == bits(state.opt_state.v)


def test_resume_refuses_a_config_json_that_is_not_the_states(tmp_path, capsys):
    """The report a resumed run ends with reads config.json: one that disagrees with state.npz
    is found before training, not after the last epoch."""
    config = Config(hidden=(4,), limit=100)
    fmnist.save_state(tmp_path / "state.npz", fmnist.initial_state(config), config, [])
    (tmp_path / "config.json").write_text(json.dumps(Config(hidden=(5,), limit=100).to_json()))
    assert fmnist.main(["train", "--resume", str(tmp_path)]) == 1
    assert capsys.readouterr().err == (f"fmnist: error: {tmp_path / 'config.json'}: does not match "
                                       f"the settings in state.npz; the run's files are not from "
                                       f"one run\n")


def test_a_training_state_with_counters_that_do_not_fit_together_is_refused(tmp_path):
    """step, epoch, best and history come back only if they make sense together: a best epoch
    with more correct answers than validation images, a best epoch after the last one, a negative
    step or a history shorter than the epochs would each corrupt the resumed run quietly."""
    config = Config(hidden=(8,), limit=100, epochs=2)
    splits = make_splits(load_fashion_mnist(DATA), config)
    state, record = next(iter(fit(splits, config)))
    good = tmp_path / "state.npz"
    fmnist.save_state(good, state, config, [record])
    fmnist.load_state(good)
    with np.load(good) as npz:
        arrays = {k: npz[k] for k in npz.files}
    meta = json.loads(str(arrays["meta"][()]))
    for key, value in (("best", [1, 1_000_000, 0]), ("best", [2, 10, 0]), ("step", -1),
                       ("step", "7"), ("history", [])):
        bad = tmp_path / f"bad-{key}.npz"
        np.savez(bad, **arrays | {"meta": np.array(json.dumps(meta | {key: value}))})
        with pytest.raises(CheckpointError, match="incomplete training state"):
            fmnist.load_state(bad)


def test_save_state_writes_only_what_load_state_accepts(raw, tmp_path):
    """save_state runs load_state's checks before writing, so a state file that exists can be
    resumed. A batch-norm state before its first epoch has no folded network yet (its model is
    the unfolded parameters); a state with counters that do not fit together or a NaN in Adam's
    moments is as unusable. Each is refused with load_state's words and nothing is written; the
    same state after one epoch is written and read back."""
    config = Config(hidden=(8,), limit=100, epochs=2, batch_norm=True)
    fresh = fmnist.initial_state(config)
    nan_m = fresh.opt_state.m.flat.copy()
    nan_m[0] = np.nan
    state, record = next(fit(_tiny_splits(raw, 100, 50), config))
    nan_state = state._replace(opt_state=state.opt_state._replace(m=Params(nan_m, state.params.shapes)))
    path = tmp_path / "state.npz"
    for bad, history, words in ((fresh, [], "save_state: best_params has shape"),
                                (state, [], "save_state: incomplete training state"),
                                (nan_state, [record], "save_state: m holds NaN")):
        with pytest.raises(CheckpointError, match=re.escape(words)):
            fmnist.save_state(path, bad, config, history)
        assert not path.exists()
    fmnist.save_state(path, state, config, [record])
    loaded, _, loaded_history = fmnist.load_state(path)
    assert bits(loaded.model) == bits(state.model) and loaded_history == [record]


# ================================================================================================
# Ensembles: members trained as runs, scored by their mean prediction
# ================================================================================================

@given(seeds=st.lists(st.integers(0, 2**16), min_size=1, max_size=4),
       scale=st.sampled_from([1.0, 1e3, 1e30]))
def test_an_ensemble_predicts_the_mean_of_its_members_distributions(seeds, scale):
    """ensemble_logits are log-probabilities whose softmax is the members' mean distribution, even
    for members so confident that their probabilities underflow in float32 (scale 1e30: logits
    of 1e30), and an ensemble of one network is that network's log_softmax."""
    x = np.random.default_rng(seeds[0]).normal(size=(7, 784)).astype(np.float32)   # (7, 784)
    models = []
    for seed in seeds:
        arrays = {k: np.array(a) for k, a in init_params((784, 8, 10), seed).items()}
        arrays["W2"] *= np.float32(scale)
        models.append(Params.from_arrays(arrays))
    z = fmnist.ensemble_logits(models, x)                                           # (7, 10)
    assert np.isfinite(z).all()
    members = [fmnist.softmax(predict_logits(p, x).astype(np.float64)) for p in models]
    np.testing.assert_allclose(np.exp(z.astype(np.float64)), np.mean(members, axis=0), atol=1e-6)
    if len(models) == 1:
        np.testing.assert_allclose(z, fmnist.log_softmax(predict_logits(models[0], x)), atol=1e-6)


def test_evaluate_scores_an_ensemble_by_its_mean_prediction(raw):
    """evaluate([a, b]) predicts argmax of the mean of a's and b's distributions; an ensemble of
    one network, or of a network with itself, scores exactly as the network; an empty ensemble
    is refused."""
    splits = make_splits(raw, Config(limit=100))
    x, y = splits.x_val[:500], splits.y_val[:500]
    a, b = (init_params((784, 32, 10), seed) for seed in (1, 2))
    mean = (fmnist.softmax(predict_logits(a, x).astype(np.float64))
            + fmnist.softmax(predict_logits(b, x).astype(np.float64))) / 2
    assert np.array_equal(evaluate([a, b], x, y).predictions, mean.argmax(axis=1))
    single = evaluate(a, x, y)
    for ensemble in ([a], [a, a]):
        ev = evaluate(ensemble, x, y)
        assert ev.correct == single.correct
        assert ev.loss == pytest.approx(single.loss, rel=1e-5)
    with pytest.raises(ValueError, match="at least one network"):
        evaluate([], x, y)


def test_cli_evaluate_with_several_checkpoints_evaluates_the_ensemble(best_run, tmp_path, capsys):
    """`evaluate A B` names both and scores their ensemble: a checkpoint with a copy of itself
    scores as the checkpoint alone (the same file twice is refused, see load_members). Members
    trained on another split, or predicting with and without mirror averaging, cannot form an
    ensemble (the result would depend on their order)."""
    ckpt = str(best_run / "best.npz")
    copy = str(shutil.copy(ckpt, tmp_path / "copy.npz"))
    metrics = json.loads((best_run / "metrics.json").read_text())
    assert fmnist.main(["evaluate", ckpt, copy]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint {ckpt}:" in out and f"checkpoint {copy}:" in out and "ensemble of 2" in out
    assert re.search(rf"test:\s+loss {metrics['test_loss']:.4f}\s+accuracy {metrics['test_accuracy']:.2%}",
                     out)
    params, config, _ = load_checkpoint(ckpt)
    other = tmp_path / "other.npz"
    fmnist.save_checkpoint(other, params, dataclasses.replace(config, split_seed=7))
    proc = run_cli("evaluate", ckpt, other)
    assert proc.returncode == 1
    assert "split_seed differ" in proc.stderr and str(other) in proc.stderr
    fmnist.save_checkpoint(other, params, dataclasses.replace(config, flip_average=False))
    proc = run_cli("evaluate", ckpt, other)
    assert proc.returncode == 1 and "flip_average differ" in proc.stderr


ENSEMBLE_TINY = ("--recipe", "best", "--limit", 1000, "--epochs", 2, "--hidden", 16, "--quiet")
ENSEMBLE_TINY_ARGV = tuple(map(str, ENSEMBLE_TINY))         # for main(), which takes strings


@pytest.fixture(scope="module")
def ensemble_run(tmp_path_factory):
    """`train --recipe best`, tiny, both members at once."""
    out = tmp_path_factory.mktemp("ensemble") / "run"
    proc = run_cli("train", *ENSEMBLE_TINY, "--jobs", 2, "--out", out)
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_cli_recipe_best_trains_each_member_as_a_run_and_evaluates_their_ensemble(ensemble_run, raw):
    """Each member of ENSEMBLES["best"] is an ordinary run in its own directory, with its
    recipe's settings under the flags given; metrics.json holds the ensemble's figures, which are
    what evaluate gives for the members' checkpoints together, and each member's own."""
    out, proc = ensemble_run
    names = fmnist.ENSEMBLES["best"]
    stored = json.loads((out / "ensemble.json").read_text())["members"]
    assert list(stored) == list(names)
    models = []
    for name in names:
        config = dataclasses.replace(fmnist.RECIPES[name], limit=1000, epochs=2, hidden=(16,))
        assert Config.from_json(stored[name]) == config
        assert json.loads((out / name / "config.json").read_text()) == config.to_json()
        params, loaded, _ = load_checkpoint(out / name / "best.npz")
        assert loaded == config
        models.append(params)
        assert f"[{name}] " in proc.stdout                 # each member's lines carry its name
    metrics = json.loads((out / "metrics.json").read_text())
    splits = make_splits(raw, config)
    ensemble = evaluate(models, splits.x_test, splits.y_test, flip_average=True)
    assert (metrics["test_accuracy"], metrics["test_loss"]) == (ensemble.accuracy, ensemble.loss)
    for name in names:
        member = json.loads((out / name / "metrics.json").read_text())
        assert metrics["members"][name]["test_accuracy"] == member["test_accuracy"]
    assert f"test:               loss {metrics['test_loss']:.4f}" in proc.stdout


def test_ensemble_members_train_the_same_whatever_the_number_of_jobs(ensemble_run, tmp_path):
    """--jobs changes only how many members train at once, never a number: one at a time (in
    one child process, one after the other) gives the same checkpoints bit for bit, and the
    lines of the second member carry its own name only."""
    out, _ = ensemble_run
    proc = run_cli("train", *ENSEMBLE_TINY, "--jobs", 1, "--out", tmp_path / "one")
    assert proc.returncode == 0, proc.stderr
    for name in fmnist.ENSEMBLES["best"]:
        a, b = (np.load(d / name / "best.npz") for d in (out, tmp_path / "one"))
        assert all(a[k].tobytes() == b[k].tobytes() for k in a.files if k != "meta"), name
    assert (json.loads((out / "metrics.json").read_text())["test_accuracy"] ==
            json.loads((tmp_path / "one" / "metrics.json").read_text())["test_accuracy"])
    assert "] [" not in proc.stdout


def test_one_blas_thread_sets_the_thread_variables_and_restores_them(monkeypatch):
    """Ensemble members start inside one_blas_thread, so NumPy loads in them with one BLAS
    thread; the parent's own environment is as it was afterwards, set or unset."""
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with fmnist.one_blas_thread():
        assert all(os.environ[k] == "1" for k in fmnist.THREAD_VARIABLES)
    assert os.environ["OPENBLAS_NUM_THREADS"] == "2" and "OMP_NUM_THREADS" not in os.environ


def test_cli_evaluate_takes_an_ensemble_directory_for_its_members(ensemble_run, capsys):
    out, _ = ensemble_run
    assert fmnist.main(["evaluate", str(out)]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert "ensemble of 2" in printed
    assert f"test:               loss {metrics['test_loss']:.4f}" in printed


def test_cli_ensemble_refuses_to_overwrite_or_resume_a_finished_one_and_names_bad_members(
        ensemble_run, tmp_path, capsys):
    out, _ = ensemble_run
    assert fmnist.main(["train", "--recipe", "best", "--out", str(out)]) == 1
    assert "already holds an ensemble" in capsys.readouterr().err
    assert fmnist.main(["train", "--resume", str(out)]) == 1
    assert "already finished" in capsys.readouterr().err
    for argv, message in ((["--jobs", "0"], "expected a number of at least 1"),
                          (["--average", "0.5"], "member best-bn of --recipe best: batch norm")):
        with pytest.raises(SystemExit):
            fmnist.main(["train", "--recipe", "best", *argv, "--out", str(tmp_path / "never")])
        assert message in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_cli_predict_with_an_ensembles_directory_asks_the_ensemble(ensemble_run, test_set):
    """`predict ENSEMBLE_DIR` answers with the mean of the members' predicted distributions,
    as `evaluate ENSEMBLE_DIR` scores it."""
    out, _ = ensemble_run
    members = [load_checkpoint(out / name / "best.npz") for name in fmnist.ENSEMBLES["best"]]
    images, _ = test_set
    config = members[0][1]
    probs = fmnist.class_probabilities([p for p, _, _ in members], images[[4]], config.dtype,
                                       config.flip_average)[0]
    (result,) = predict_json(out, "--test-index", 4)
    order = np.argsort(-probs)[:3]
    assert [t["label"] for t in result["top"]] == order.tolist()
    np.testing.assert_allclose([t["probability"] for t in result["top"]], probs[order], rtol=1e-6)
    alone = fmnist.class_probabilities(members[0][0], images[[4]], config.dtype, config.flip_average)[0]
    assert not np.allclose(alone, probs)          # the ensemble is not just its first member


def test_cli_report_of_an_ensembles_directory_rewrites_each_members_report(ensemble_run, tmp_path):
    out, _ = ensemble_run
    copy = shutil.copytree(out, tmp_path / "ens")
    for name in fmnist.ENSEMBLES["best"]:
        (copy / name / "report.md").unlink()
    proc = run_cli("report", copy)
    assert proc.returncode == 0, proc.stderr
    for name in fmnist.ENSEMBLES["best"]:
        assert (copy / name / "report.md").read_text() == (out / name / "report.md").read_text()


def test_cli_ensemble_with_force_trains_every_member_anew(tmp_path):
    """--force over a finished ensemble retrains both members with the new settings (it does
    not take the finished ones for done) and rewrites the ensemble's figures."""
    out = tmp_path / "run"
    tiny = ("--recipe", "best", "--limit", 500, "--hidden", 8, "--quiet", "--out", out)
    assert run_cli("train", *tiny, "--epochs", 1).returncode == 0
    proc = run_cli("train", *tiny, "--epochs", 2, "--force")
    assert proc.returncode == 0, proc.stderr
    for name in fmnist.ENSEMBLES["best"]:
        assert len(json.loads((out / name / "history.json").read_text())) == 2
    assert json.loads((out / "metrics.json").read_text())["members"]["best-bn"]["best_epoch"] in (1, 2)


def test_cli_interrupted_ensemble_resumes_to_the_uninterrupted_result(tmp_path):
    """Ctrl-C while the members train: each saves its state, the ensemble says how to go on, and
    `train --resume` on the ensemble's directory finishes both members (and the ensemble) with
    exactly the parameters of a run never interrupted."""
    args = ["--recipe", "best", "--limit", 2000, "--hidden", "32", "--epochs", 40, "--jobs", 2, "--quiet"]
    assert run_cli("train", *args, "--out", tmp_path / "straight").returncode == 0
    out = tmp_path / "interrupted"
    returncode, stderr = interrupted_train(args, out, [out / name for name in fmnist.ENSEMBLES["best"]],
                                           epochs=2)
    if returncode == 0:
        pytest.skip("the ensemble finished before it could be interrupted")
    assert returncode == 130, stderr
    assert f"  python fmnist.py train --resume {out}" in stderr.splitlines()    # the ensemble's
    assert not any(f"--resume {out / name}" in stderr          # not a member's own, which --out refuses
                   for name in fmnist.ENSEMBLES["best"])
    assert "Resume it with" not in stderr and "run the same command again" not in stderr
    assert not (out / "metrics.json").exists()
    resumed = run_cli("train", "--resume", out)
    assert resumed.returncode == 0, resumed.stderr
    for name in fmnist.ENSEMBLES["best"]:
        a, b = (np.load(d / name / "state.npz") for d in (tmp_path / "straight", out))
        assert a.files == b.files
        for key in set(a.files) - {"meta"}:             # params, m, v, best_params (model)
            assert a[key].tobytes() == b[key].tobytes(), (name, key)
    straight = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    assert json.loads((out / "metrics.json").read_text())["test_loss"] == straight["test_loss"]


def test_an_ensemble_refuses_a_member_given_twice_under_any_name(tmp_path):
    """Scoring a network beside itself would report that network as an 'ensemble of 2'."""
    first = small_checkpoint(tmp_path / "best.npz")
    (tmp_path / "sub").mkdir()
    again = tmp_path / "sub" / ".." / "best.npz"
    other = shutil.copy(first, tmp_path / "copy.npz")     # a copy is another file: accepted
    assert len(fmnist.load_members([first, other])) == 2
    for paths, also in (([first, first], ""), ([first, other, again], f" (as {first} too)")):
        with pytest.raises(CheckpointError) as refused:
            fmnist.load_members(paths)
        assert str(refused.value) == (f"{paths[-1]}: given twice{also}; an ensemble takes each "
                                      f"member once")


def test_an_ensemble_members_lines_carry_its_name_and_blank_ones_no_trailing_space():
    stream = io.StringIO()
    fmnist._Prefixed(stream, "[best-bn] ").write("epoch 1\n\nbest epoch: 1\n")
    assert stream.getvalue() == "[best-bn] epoch 1\n[best-bn]\n[best-bn] best epoch: 1\n"


def test_an_ensemble_trains_as_many_members_at_once_as_it_may_use_cores(monkeypatch):
    """--jobs' default counts the cores this process may run on, not those the machine has."""
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    assert fmnist.usable_cpus() == 1


def test_cli_force_turns_an_ensembles_folder_into_a_runs_and_back(tmp_path):
    """--force over a folder of the other kind leaves nothing of the old kind that a later
    --resume, evaluate or predict would pick up: a run written over an ensemble removes its
    ensemble.json, an ensemble written over a run removes the run's best.npz and state."""
    out = tmp_path / "x"
    tiny_ensemble = ("--recipe", "best", "--limit", 500, "--epochs", 1, "--hidden", 8, "--quiet")
    assert run_cli("train", *tiny_ensemble, "--out", out).returncode == 0
    proc = run_cli("train", "--limit", 500, "--epochs", 1, "--hidden", 8, "--quiet", "--out", out,
                   "--force")
    assert proc.returncode == 0, proc.stderr
    assert not (out / "ensemble.json").exists() and fmnist._checkpoints_in(out) == [out / "best.npz"]
    proc = run_cli("train", *tiny_ensemble, "--out", out, "--force")
    assert proc.returncode == 0, proc.stderr
    assert not (out / "best.npz").exists() and not (out / "state.npz").exists()
    assert fmnist._checkpoints_in(out) == [out / n / "best.npz" for n in fmnist.ENSEMBLES["best"]]


def test_cli_ensemble_refuses_a_member_folder_that_holds_another_run(tmp_path):
    """A folder named like a member but holding some other run is refused before ensemble.json
    is written, and on --resume when its settings are not the member's: the ensemble would
    otherwise count a stranger's network as its member."""
    out = tmp_path / "ens"
    stranger = ("--limit", 300, "--epochs", 1, "--hidden", 8, "--quiet")
    assert run_cli("train", *stranger, "--out", out / "best-bn").returncode == 0
    line = one_line_error(run_cli("train", "--recipe", "best", "--limit", 300, "--epochs", 1,
                                  "--hidden", 8, "--out", out), stdout=None)
    assert f"{out / 'best-bn'}: already holds a finished run" in line, line
    assert not (out / "ensemble.json").exists()
    members = {name: fmnist.RECIPES[name] for name in fmnist.ENSEMBLES["best"]}
    fmnist.write_json(out / "ensemble.json", {"recipe": "best", "members": {
        name: c.to_json() for name, c in members.items()}})
    line = one_line_error(run_cli("train", "--resume", out), stdout=None)
    assert "holds a run with other settings than ensemble.json's best-bn" in line, line


# ================================================================================================
# Bad input: clear errors, nothing lost
# ================================================================================================
# One test for each kind of bad input a user can give that the sections above do not cover.
# A failing command ends in one line on stderr naming the file or value and the problem, with a
# non-zero exit (2 for a bad argument, as argparse does), never a traceback; no checkpoint may be
# lost or left half-written. The CLI runs in a subprocess, except the many argument checks, which
# call fmnist.main(argv) in-process; the few cases that must train (divergence, SIGKILL, --force)
# use 256-2,000 images and stop within a few epochs.

FMNIST = HERE / "fmnist.py"


# ================================================================================================
# Bad input: helpers
# ================================================================================================

def run_cli_opts(*args, timeout=120, **kwargs) -> subprocess.CompletedProcess:
    """run_cli with a 120 s default timeout and extra subprocess.run options (e.g. preexec_fn)."""
    return subprocess.run([sys.executable, str(FMNIST), *map(str, args)], cwd=HERE,
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def the_error_line(proc: subprocess.CompletedProcess) -> str:
    """The single line a failed command wrote to stderr: a plain exit > 0, no traceback, one line."""
    assert proc.returncode > 0, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def assert_one_line_error(proc, path, problem: str) -> str:
    """Exit > 0 and one line `fmnist: error: ...` naming `path` and matching the regex `problem`."""
    line = the_error_line(proc)
    assert line.startswith("fmnist: error: "), line
    assert str(path) in line, (str(path), line)
    assert re.search(problem, line, re.IGNORECASE), (problem, line)
    return line


def shipped(name: str) -> bytes:
    """The decompressed bytes of a shipped data file."""
    return gzip.decompress((DATA / f"{name}.gz").read_bytes())


def one_byte_changed(name: str) -> bytes:
    """A shipped data file with its last byte (a label, or a pixel) changed, still in 0-9: it
    parses as a valid IDX file, but it is not the published one, so its checksum fails."""
    wrong = bytearray(shipped(name))
    wrong[-1] = (wrong[-1] + 1) % 10
    return bytes(wrong)


def data_dir(tmp_path: Path, without: str | None = None) -> Path:
    """tmp_path/data: links to the four shipped files, except `without` (left for the caller)."""
    d = tmp_path / "data"
    d.mkdir()
    for name in DATA_FILES:
        if name != without:
            try:
                (d / f"{name}.gz").symlink_to(DATA / f"{name}.gz")
            except OSError:
                shutil.copy(DATA / f"{name}.gz", d / f"{name}.gz")
    return d


def history_of(run: Path) -> list:
    """history.json of a run directory; [] before the first epoch. Never a half-written file:
    a JSONDecodeError here is a failure of the atomic writes."""
    try:
        return json.loads((run / "history.json").read_text())
    except FileNotFoundError:
        return []


def first_best_epoch(history: list) -> int:
    """The epoch early stopping keeps: the first to reach the highest val_correct."""
    corrects = [r["val_correct"] for r in history]
    return corrects.index(max(corrects)) + 1


SMALL = Config(hidden=(8,))


def small_checkpoint(path: Path, epoch: int = 3) -> Path:
    save_checkpoint(path, init_params(SMALL.layer_sizes, 0), SMALL, epoch=epoch)
    return path


def write_npz(path: Path, arrays: dict, config: Config | None = SMALL, **meta) -> Path:
    """An .npz laid out like a checkpoint (arrays + JSON `meta`), with whatever arrays are given."""
    if config is not None:
        meta = {"format": fmnist.CHECKPOINT_FORMAT, "config": config.to_json(), "epoch": 1} | meta
        arrays = arrays | {"meta": np.array(json.dumps(meta))}
    np.savez(path, **arrays)
    return path


# ================================================================================================
# Data files, through the command line: one line naming the file, exit > 0, no traceback
# ================================================================================================

def _missing(d):
    return d / "t10k-labels-idx1-ubyte"


def _gz_cut_in_half(d):
    packed = (DATA / "t10k-labels-idx1-ubyte.gz").read_bytes()
    (d / "t10k-labels-idx1-ubyte.gz").write_bytes(packed[:len(packed) // 2])
    return d / "t10k-labels-idx1-ubyte.gz"


def _gz_scrambled_inside(d):
    packed = bytearray((DATA / "t10k-labels-idx1-ubyte.gz").read_bytes())
    middle = len(packed) // 2
    packed[middle:middle + 16] = bytes(b ^ 0xFF for b in packed[middle:middle + 16])
    (d / "t10k-labels-idx1-ubyte.gz").write_bytes(bytes(packed))
    return d / "t10k-labels-idx1-ubyte.gz"


def _gz_bad_crc(d):
    packed = bytearray((DATA / "t10k-labels-idx1-ubyte.gz").read_bytes())
    packed[-6] ^= 0x01                                          # the CRC-32 in the gzip trailer
    (d / "t10k-labels-idx1-ubyte.gz").write_bytes(bytes(packed))
    return d / "t10k-labels-idx1-ubyte.gz"


def _plain(d, name, data):
    (d / name).write_bytes(data)
    return d / name


def _wrong_magic(d):
    data = bytearray(shipped("train-labels-idx1-ubyte"))
    data[:4] = struct.pack(">I", 2052)
    return _plain(d, "train-labels-idx1-ubyte", data)


def _wrong_dims(d):
    return _plain(d, "train-images-idx3-ubyte", idx_bytes(2051, [60_000, 27, 28], bytes(100)))


def _label_ten(d):
    data = bytearray(shipped("t10k-labels-idx1-ubyte"))
    data[8 + 5] = 10
    return _plain(d, "t10k-labels-idx1-ubyte", data)


def _one_label_changed(d):
    data = bytearray(shipped("t10k-labels-idx1-ubyte"))
    data[8 + 5] = (data[8 + 5] + 1) % 10                         # still a valid label
    return _plain(d, "t10k-labels-idx1-ubyte", data)


def _one_label_fewer(d):
    labels = shipped("train-labels-idx1-ubyte")[8:]
    return _plain(d, "train-labels-idx1-ubyte", idx_bytes(2049, [59_999], labels[:-1]))


def _labels_in_place_of_images(d):
    return _plain(d, "train-images-idx3-ubyte", shipped("train-labels-idx1-ubyte"))


DAMAGED_DATA = {   # id -> (the file replaced, how to damage it -> path named, problem regex)
    "missing file": ("t10k-labels-idx1-ubyte", _missing, r"not found"),
    "gzip cut in half": ("t10k-labels-idx1-ubyte", _gz_cut_in_half, r"damaged|truncated|ended"),
    "gzip scrambled inside": ("t10k-labels-idx1-ubyte", _gz_scrambled_inside,
                              r"damaged|truncated|longer|invalid|corrupt"),
    "gzip CRC wrong": ("t10k-labels-idx1-ubyte", _gz_bad_crc, r"damaged|CRC"),
    "wrong magic number": ("train-labels-idx1-ubyte", _wrong_magic, r"magic"),
    "images 27x28": ("train-images-idx3-ubyte", _wrong_dims, r"27x28|28x28"),
    "label 10": ("t10k-labels-idx1-ubyte", _label_ten, r"label 10|0-9"),
    "one label changed": ("t10k-labels-idx1-ubyte", _one_label_changed, r"checksum"),
    "one label fewer than images": ("train-labels-idx1-ubyte", _one_label_fewer, r"checksum|disagree"),
    "labels file in place of images": ("train-images-idx3-ubyte", _labels_in_place_of_images,
                                       r"checksum|swapped"),
}


@pytest.mark.parametrize("case", DAMAGED_DATA)
def test_cli_damaged_data_file_is_one_line_naming_the_file(tmp_path, case):
    """A half-downloaded or altered data file must stop `train` with one sentence that says which
    file and what is wrong, not a traceback from gzip or NumPy; nothing is trained or evaluated."""
    name, damage, problem = DAMAGED_DATA[case]
    d = data_dir(tmp_path, without=name)
    named = damage(d)
    proc = run_cli_opts("train", "--data-dir", d, "--limit", 100, "--epochs", 1, "--out", tmp_path / "out")
    assert_one_line_error(proc, named, problem)
    assert proc.stdout == "", proc.stdout                      # failed before training began
    assert not (tmp_path / "out" / "best.npz").exists()


def _synthetic_data_dir(tmp_path, n_train_images=5, n_train_labels=5, n_test=3, swap=False) -> Path:
    rng = np.random.default_rng(0)
    images = lambda n: idx_bytes(2051, [n, 28, 28], rng.integers(0, 256, n * 784, dtype=np.uint8))
    labels = lambda n: idx_bytes(2049, [n], rng.integers(0, 10, n, dtype=np.uint8))
    files = {"train-images-idx3-ubyte": images(n_train_images),
             "train-labels-idx1-ubyte": labels(n_train_labels),
             "t10k-images-idx3-ubyte": images(n_test), "t10k-labels-idx1-ubyte": labels(n_test)}
    if swap:
        files["train-images-idx3-ubyte"], files["train-labels-idx1-ubyte"] = (
            files["train-labels-idx1-ubyte"], files["train-images-idx3-ubyte"])
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return tmp_path


def test_counts_that_disagree_raise_a_data_error_with_both_counts(tmp_path):
    """Images and labels that do not pair up would silently mislabel every example after the gap
    (checksums catch this for the shipped files; `verify=False` must catch it too)."""
    d = _synthetic_data_dir(tmp_path, n_train_images=5, n_train_labels=4)
    with pytest.raises(DataError, match=r"disagree.*5 images.*4 labels"):
        load_fashion_mnist(d, verify=False)


def test_swapped_images_and_labels_raise_a_data_error(tmp_path):
    """An images file where the labels belong (and vice versa) must be named as such, not crash."""
    d = _synthetic_data_dir(tmp_path, swap=True)
    with pytest.raises(DataError, match=r"swapped"):
        load_fashion_mnist(d, verify=False)


@pytest.mark.parametrize("swap", [False, True], ids=["counts disagree", "swapped"])
def test_consistency_errors_name_both_files(tmp_path, swap):
    """The issue: each data error names the file; with two files at odds, that is both of them."""
    d = _synthetic_data_dir(tmp_path, n_train_labels=5 if swap else 4, swap=swap)
    with pytest.raises(DataError) as err:
        load_fashion_mnist(d, verify=False)
    assert "train-images-idx3-ubyte" in str(err.value) and "train-labels-idx1-ubyte" in str(err.value)


def test_missing_file_message_suggests_a_command_that_exists(tmp_path, capsys):
    """'What to do' must be something the user can actually do."""
    with pytest.raises(DataError) as err:
        load_fashion_mnist(tmp_path)
    for command in re.findall(r"python fmnist\.py (\w+)", str(err.value)):
        code = exit_code_of_main([command, "--help"])
        assert code == 0, f"`{command}` is not a command: {capsys.readouterr().err}"


def test_the_missing_file_message_suggests_downloading_into_the_folder_searched(tmp_path):
    """The command the message suggests, parsed as main parses it, downloads into the very
    folder the loader searched (quoted: here its name has a space), not into ./data."""
    folder = tmp_path / "my data"
    folder.mkdir()
    with pytest.raises(DataError) as err:
        load_fashion_mnist(folder)
    command = shlex.split(re.search(r"run `([^`]*)`", str(err.value)).group(1))
    args = fmnist.parse_args(fmnist.build_parser(), command[command.index("download"):])
    assert args.command == "download" and Path(args.data_dir) == folder


@pytest.mark.parametrize("in_place_of", ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"])
def test_a_labels_or_images_file_in_the_other_ones_place_is_refused_unverified(tmp_path, in_place_of):
    """Without checksums (verify=False), a labels file where the images belong (or an images
    file where the labels belong) has as many entries as its partner, so only the dimensions
    tell: it is refused, not returned as 1-D "images" or 3-D "labels"."""
    d = _synthetic_data_dir(tmp_path)
    other = {"train-images-idx3-ubyte": "train-labels-idx1-ubyte",
             "train-labels-idx1-ubyte": "train-images-idx3-ubyte"}[in_place_of]
    shutil.copy(d / other, d / in_place_of)
    with pytest.raises(DataError, match="swapped"):
        load_fashion_mnist(d, verify=False)


@pytest.mark.parametrize("split", ["train", "t10k"])
def test_counts_that_disagree_are_refused_in_either_pair_of_files(tmp_path, split):
    """The test images and labels must pair up as the training ones must (verify=False: nothing
    else would notice): 3 images with 2 labels is a DataError naming both files."""
    d = _synthetic_data_dir(tmp_path, n_train_images=5, n_train_labels=5, n_test=3)
    (d / f"{split}-labels-idx1-ubyte").write_bytes(idx_bytes(2049, [2], [1, 2]))
    if split == "train":
        (d / "train-images-idx3-ubyte").write_bytes(idx_bytes(2051, [3, 28, 28], bytes(3 * 784)))
    with pytest.raises(DataError, match=rf"{split}-images-idx3-ubyte and .*{split}-labels-idx1-ubyte "
                                        rf"disagree: 3 images but 2 labels"):
        load_fashion_mnist(d, verify=False)


# ================================================================================================
# The IDX parser under fuzzing: a valid array or a DataError, in bounded time and memory
# ================================================================================================

VALID_LABELS = idx_bytes(2049, [20], [i % 10 for i in range(20)])
VALID_IMAGES = idx_bytes(2051, [2, 28, 28], bytes(range(256)) * 6 + bytes(1568 - 1536))
U32 = (st.sampled_from([0, 1, 2, 27, 28, 2049, 2051, 60_000, 60_000_000, MAX_IDX_BYTES,
                        MAX_IDX_BYTES + 1, 10**9, 2**31, 2**32 - 1])
       | st.integers(0, 2**32 - 1))


@st.composite
def damaged_idx_files(draw) -> bytes:
    """A valid small IDX file, plain or gzipped, with a few header fields, bytes, lengths and
    (if gzipped) compressed bytes changed: the damage a download or a disk can do."""
    data = bytearray(draw(st.sampled_from([VALID_LABELS, VALID_IMAGES])))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["header field", "byte", "truncate", "insert"]))
        if op == "header field" and len(data) >= 4:
            i = 4 * draw(st.integers(0, min(len(data), 16) // 4 - 1))
            data[i:i + 4] = struct.pack(">I", draw(U32))
        elif op == "byte" and data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        elif op == "truncate":
            del data[draw(st.integers(0, len(data))):]
        elif op == "insert":
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
    if draw(st.booleans()):
        data = bytearray(gzip.compress(bytes(data), mtime=0))
        if draw(st.booleans()):
            if draw(st.booleans()):
                data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
            else:
                del data[draw(st.integers(0, len(data) - 1)):]
    return bytes(data)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


HOSTILE_60M_LABELS = idx_bytes(2049, [60_000_000], bytes(100))   # 108 bytes claiming 60 MB of labels


@given(data=damaged_idx_files())
@example(data=HOSTILE_60M_LABELS)
@example(data=gzip.compress(HOSTILE_60M_LABELS, mtime=0))
@example(data=idx_bytes(2051, [2**32 - 1, 28, 28], bytes(784)))
@example(data=gzip.compress(idx_bytes(2049, [10], bytes(10)) + bytes(10**6), mtime=0))
@example(data=gzip.compress(idx_bytes(2049, [3], [1, 10, 2]), mtime=0))    # a label above 9
def test_read_idx_on_damaged_files_is_valid_or_data_error_in_bounded_time_and_memory(scratch, data):
    """Whatever a file holds, read_idx returns well-formed uint8 arrays or raises DataError naming
    the file, within a second and within MAX_IDX_BYTES of memory (plus a little): a damaged or
    hostile file can neither hang the loader nor make it allocate what its header claims."""
    path = scratch / "damaged"
    path.write_bytes(data)
    tracemalloc.start()
    started = time.perf_counter()
    try:
        array = read_idx(path)
    except DataError as e:
        assert str(path) in str(e)
        array = None
    finally:
        elapsed = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert elapsed < 1.0, elapsed
    assert peak < MAX_IDX_BYTES + 4 * 2**20, peak
    if array is not None:
        assert array.dtype == np.uint8 and array.ndim in (1, 3)
        assert array.ndim == 1 or array.shape[1:] == (28, 28)
        assert array.ndim == 3 or array.size == 0 or array.max() <= 9


# ================================================================================================
# Checkpoints, through `evaluate`: one line naming the file and the problem; the file untouched
# ================================================================================================

def _params(sizes=(784, 8, 10), dtype="float32") -> dict:
    return dict(init_params(sizes, 0, dtype))


def _with(name, value_fn):
    def build(path):
        arrays = _params()
        arrays[name] = value_fn(arrays[name])
        return write_npz(path, arrays)
    return build


def _truncated(fraction):
    def build(path):
        data = small_checkpoint(path).read_bytes()
        path.write_bytes(data[:int(len(data) * fraction)])
        return path
    return build


def _one_byte_flipped(path):
    data = bytearray(small_checkpoint(path).read_bytes())
    data[len(data) // 2] ^= 0xFF                 # inside W1's data: the zip's CRC-32 catches it
    path.write_bytes(bytes(data))
    return path


def _training_state(path):
    config = Config(hidden=(8,), limit=100)
    fmnist.save_state(path, fmnist.initial_state(config), config, [])
    return path


def _npy(path):
    np.save(path, np.zeros((784, 8), np.float32))      # path ends in .npy, so np.save keeps it
    return path


BAD_CHECKPOINTS = {   # id -> (file name, build(path) -> path, problem regex)
    "empty file": ("best.npz", lambda p: p.write_bytes(b"") or p, r"not a readable|empty"),
    "cut after 100 bytes": ("best.npz", _truncated(0.004), r"not a readable|zip|truncated"),
    "cut in half": ("best.npz", _truncated(0.5), r"not a readable|zip|truncated"),
    "last 10 bytes missing": ("best.npz", _truncated(0.9996), r"not a readable|zip|truncated"),
    "one byte flipped": ("best.npz", _one_byte_flipped, r"not a readable|CRC|damaged"),
    "a single .npy array": ("best.npy", _npy, r"not a readable|not an? .*checkpoint|npz"),
    "a directory": ("best.npz", lambda p: p.mkdir() or p, r"director|not a readable"),
    "no such file": ("best.npz", lambda p: p, r"not found"),
    "key b2 missing": ("best.npz", lambda p: write_npz(p, {k: v for k, v in _params().items()
                                                            if k != "b2"}), r"b2"),
    "no metadata": ("best.npz", lambda p: write_npz(p, _params(), config=None), r"metadata|meta"),
    "metadata not JSON": ("best.npz", lambda p: np.savez(p, **_params(), meta=np.array("{oops"))
                          or p, r"metadata"),
    "a training state, not a checkpoint": ("state.npz", _training_state,
                                           r"a training state \(for train --resume\), not a model; "
                                           r"give the run.s best.npz, or its directory$"),
    "NaN in W1": ("best.npz", _with("W1", lambda a: np.where(np.arange(a.size).reshape(a.shape) == 7,
                                                             np.nan, a).astype(a.dtype)), r"NaN"),
    "inf in b2": ("best.npz", _with("b2", lambda a: np.full_like(a, np.inf)), r"infinite|inf\b"),
    "float64 arrays, config float32": ("best.npz", lambda p: write_npz(p, _params(dtype="float64")),
                                       r"float64"),
    "integer arrays": ("best.npz", _with("W2", lambda a: a.astype(np.int32)), r"int32|dtype"),
    "arrays 784-16-10, config 784-8-10": ("best.npz", lambda p: write_npz(p, _params((784, 16, 10))),
                                          r"\(784, 16\).*\(784, 8\)|\(784, 8\).*\(784, 16\)"),
    # as many numbers as the (8, 10) the config needs, but another network: refused by its shape
    "W2 transposed": ("best.npz", _with("W2", lambda a: np.ascontiguousarray(a.T)),
                      r"W2 has shape \(10, 8\)"),
    # an unfolded batch-norm network: without its g1 it would predict as another network
    "batch norm's g1 too": ("best.npz", lambda p: write_npz(p, dict(init_params(
        SMALL.layer_sizes, 0, "float32", batch_norm=True))), r"784-8-10 network: unexpected g1$"),
    # a later format's arrays may mean something else, however well they fit
    "another format": ("best.npz", lambda p: write_npz(p, _params(), format="fmnist-checkpoint-2"),
                       r"fmnist-checkpoint-2"),
}


@pytest.mark.parametrize("case", BAD_CHECKPOINTS)
def test_cli_evaluate_bad_checkpoint_is_one_line_and_leaves_the_file_alone(tmp_path, case):
    """Loading must validate before use: a damaged, foreign or mismatched checkpoint gets one
    sentence naming the file and the problem (never a traceback, never numbers from a broken
    network), and evaluating must not change the file."""
    name, build, problem = BAD_CHECKPOINTS[case]
    path = build(tmp_path / name)
    before = path.read_bytes() if path.is_file() else None
    proc = run_cli_opts("evaluate", path)
    line = assert_one_line_error(proc, path, problem)
    assert "pickle" not in line, line                        # nothing here is a pickle
    assert proc.stdout == "", proc.stdout
    assert (path.read_bytes() if path.is_file() else None) == before


NOT_NPZ = {
    "a text file": lambda p: p.write_text("these are not the weights you are looking for\n"),
    "a gzip file": lambda p: p.write_bytes((DATA / "t10k-labels-idx1-ubyte.gz").read_bytes()),
    "a PNG image": lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100)),
}


@pytest.mark.parametrize("case", NOT_NPZ)
def test_cli_evaluate_a_file_that_is_not_a_zip_says_so_not_pickle(tmp_path, case):
    """A text file is not a security threat; calling it a pickle sends the user the wrong way."""
    path = tmp_path / "best.npz"
    NOT_NPZ[case](path)
    line = assert_one_line_error(run_cli_opts("evaluate", path), path, r"not a|npz|checkpoint")
    assert "pickle" not in line, line


def test_checkpoint_of_another_depth_names_both_architectures(tmp_path):
    """The issue: a checkpoint from another architecture gets an error naming both shapes."""
    path = write_npz(tmp_path / "best.npz", _params((784, 8, 10)), config=Config(hidden=(8, 4)))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert re.search(r"784\D+8\D+10\b", message) and re.search(r"784\D+8\D+4\D+10\b", message), message


def test_metadata_over_the_limit_is_refused_before_it_is_read(tmp_path, monkeypatch):
    """The JSON metadata is bounded like the arrays: over MAX_META_BYTES it is refused by the
    size the zip declares, however valid the JSON would be, before it is decompressed or parsed."""
    monkeypatch.setattr(fmnist, "MAX_META_BYTES", 10_000)

    def parse_meta(*args):
        raise AssertionError("the metadata was read before its size was checked")

    monkeypatch.setattr(fmnist, "_parse_meta", parse_meta)
    path = write_npz(tmp_path / "best.npz", _params(), padding="x" * 20_000)
    with pytest.raises(CheckpointError, match="metadata takes"):
        load_checkpoint(path)


def test_a_checkpoint_whose_arrays_would_unpack_far_beyond_its_network_is_refused_unread(tmp_path):
    """The sizes the zip declares are checked against what the stored config can hold before
    anything is decompressed: a 76 KB file that would unpack into 50 MB of zeros beside a
    784-8-10 network (6,370 parameters) is refused, never loaded."""
    params = init_params((784, 8, 10), 0)
    good = tmp_path / "good.npz"
    fmnist.save_checkpoint(good, params, Config(hidden=(8,)))
    with np.load(good) as npz:
        arrays = {k: npz[k] for k in npz.files}
    bomb = tmp_path / "bomb.npz"
    np.savez_compressed(bomb, **arrays, extra=np.zeros(50 * 2**20, np.uint8))
    assert bomb.stat().st_size < 200_000
    tracemalloc.start()
    with pytest.raises(CheckpointError, match="refused: its arrays take 52,4"):
        load_checkpoint(bomb)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 10 * 2**20, peak


# ================================================================================================
# Atomic writes: SIGKILL at any moment leaves the last complete checkpoint loadable
# ================================================================================================

RUN_FILES = {"config.json", "history.json", "best.npz", "state.npz"}
TEMPORARY = re.compile(r"^\.(best\.npz|state\.npz|history\.json|config\.json)\..+\.tmp$")
KILL_CONFIG = Config(limit=2000, epochs=30)


def _temporaries(run: Path, prefix: str) -> bool:
    return any(n.startswith(prefix) and n.endswith(".tmp") for n in os.listdir(run))


def _freeze(proc: subprocess.Popen) -> None:
    """SIGSTOP the process and wait until Linux reports it stopped (state T in /proc/PID/stat)."""
    proc.send_signal(signal.SIGSTOP)
    stat, deadline = Path(f"/proc/{proc.pid}/stat"), time.monotonic() + 5
    while time.monotonic() < deadline:
        if not stat.exists():
            time.sleep(0.05)
            return
        if stat.read_text().rsplit(")", 1)[1].split()[0] in ("T", "t"):
            return
        time.sleep(0.0002)


KILL_MOMENTS = {   # id -> the temporary file that must be half-written when the kill lands (or None)
    "while best.npz is being written": ".best.npz.",
    "while state.npz is being written": ".state.npz.",
    "just after a new best.npz": None,        # best.npz replaced, history.json not yet
}


@pytest.fixture(scope="module")
def kill_splits(raw):
    return make_splits(raw, KILL_CONFIG)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SIGSTOP/SIGKILL and /proc: Linux")
@pytest.mark.parametrize("moment", KILL_MOMENTS)
def test_sigkill_during_training_leaves_a_loadable_best_checkpoint(tmp_path, moment, kill_splits):
    """Every file of a run is replaced atomically, so however abruptly training dies (SIGKILL gives
    no chance to clean up), best.npz is a complete checkpoint: that of the best epoch in
    history.json, or of the epoch just finished; history.json is complete JSON; the only debris
    are temporary files named `.NAME.*.tmp`. To kill in the middle of a write for certain, the
    process is frozen (SIGSTOP) when the temporary file appears and killed only if it is still
    there. (history.json is parsed at every poll, so a half-written one fails the test too.)"""
    run, writing = tmp_path / "run", KILL_MOMENTS[moment]
    proc = subprocess.Popen([sys.executable, str(FMNIST), "train", "--limit", "2000", "--epochs", "30",
                             "--out", str(run)], cwd=HERE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline, armed_ino = time.monotonic() + 60, None
        while True:
            assert time.monotonic() < deadline, "the moment to kill never came"
            if proc.poll() is not None:
                pytest.fail(f"training ended (exit {proc.returncode}) before the moment to kill: "
                            f"{proc.stderr.read()[-2000:]}")
            if armed_ino is None:
                if len(history_of(run)) >= 2 and (run / "best.npz").exists():
                    armed_ino = os.stat(run / "best.npz").st_ino
            elif writing is None:
                if os.stat(run / "best.npz").st_ino != armed_ino:
                    proc.send_signal(signal.SIGKILL)
                    break
            elif _temporaries(run, writing):
                _freeze(proc)
                if _temporaries(run, writing):             # frozen with the write half done
                    proc.send_signal(signal.SIGKILL)
                    break
                proc.send_signal(signal.SIGCONT)             # just missed it: wait for the next one
            time.sleep(0.001)
    finally:
        proc.kill()
        proc.wait(timeout=30)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL

    names = set(os.listdir(run))
    debris = names - RUN_FILES
    assert all(TEMPORARY.match(n) for n in debris), debris
    if writing is not None:
        assert any(n.startswith(writing) for n in debris), debris      # killed mid-write indeed
    assert {"config.json", "history.json", "best.npz"} <= names, names
    history = history_of(run)
    assert [r["epoch"] for r in history] == list(range(1, len(history) + 1))

    params, config, meta = load_checkpoint(run / "best.npz")
    assert config == KILL_CONFIG
    assert meta["epoch"] in (first_best_epoch(history), len(history) + 1), (meta["epoch"], history)
    if meta["epoch"] <= len(history):           # the very network that scored that epoch
        correct = evaluate(params, kill_splits.x_val, kill_splits.y_val).correct
        assert correct == history[meta["epoch"] - 1]["val_correct"]
    if "state.npz" in names:
        state, state_config, _ = fmnist.load_state(run / "state.npz")
        assert state_config == KILL_CONFIG and state.epoch in (len(history), len(history) + 1)

    if moment == "while best.npz is being written":       # the issue's case: it still evaluates
        ev = run_cli_opts("evaluate", run / "best.npz")
        assert ev.returncode == 0, ev.stderr
        assert f"epoch {meta['epoch']}" in ev.stdout


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path):
    """If writing fails half-way, the file is the old one and nothing else is left in the folder;
    the error names the file (a write's error names none), so a full disk says which."""
    path = tmp_path / "file.json"
    path.write_text("old")

    def half(f):
        f.write(b"new, but not")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError) as failed:
        fmnist.atomic_write(path, half)
    assert os.listdir(tmp_path) == ["file.json"] and path.read_text() == "old"
    assert (failed.value.errno, failed.value.filename) == (28, str(path))


def test_a_failed_write_names_the_file_asked_for_not_the_temporary(tmp_path):
    """atomic_write writes through a hidden temporary file; when even that cannot be created,
    the error names the file the caller wanted."""
    target = tmp_path / "missing" / "metrics.json"
    with pytest.raises(FileNotFoundError) as failed:
        fmnist.write_json(target, {"a": 1})
    assert failed.value.filename == str(target) and ".tmp" not in str(failed.value)


# ================================================================================================
# Run directories: --force, and the directory a failed run leaves
# ================================================================================================

def _fake_finished_run(run: Path) -> dict:
    """A finished run of another network (784-8-10, epoch 7): name -> the bytes of each file."""
    run.mkdir()
    small_checkpoint(run / "best.npz", epoch=7)
    old = {"config.json": json.dumps(SMALL.to_json()).encode(), "history.json": b"[]\n",
           "metrics.json": b'{"test_accuracy": 0.9, "best_epoch": 7}\n'}
    for name, data in old.items():
        (run / name).write_bytes(data)
    return old | {"best.npz": (run / "best.npz").read_bytes()}


def test_cli_force_overwrites_a_finished_run(tmp_path):
    """--force is the user's explicit permission: the new run replaces every file of the old one."""
    run = tmp_path / "run"
    old = _fake_finished_run(run)
    proc = run_cli_opts("train", "--force", "--limit", 100, "--epochs", 1, "--out", run)
    assert proc.returncode == 0, proc.stderr
    for name, data in old.items():
        assert (run / name).read_bytes() != data, name
    assert json.loads((run / "config.json").read_text()) == Config(limit=100, epochs=1).to_json()
    assert "test_accuracy" in json.loads((run / "metrics.json").read_text())
    assert load_checkpoint(run / "best.npz")[2]["epoch"] == 1
    assert not [n for n in os.listdir(run) if n.endswith(".tmp")]


def test_cli_train_refuses_an_unfinished_run_without_force(tmp_path):
    """An interrupted run (state.npz, no metrics.json) may be hours of work: a new `train --out`
    into it must refuse, point at --force, and touch nothing."""
    run = tmp_path / "run"
    run.mkdir()
    small_checkpoint(run / "best.npz")
    _training_state(run / "state.npz")
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.iterdir()}
    proc = run_cli_opts("train", "--limit", 100, "--epochs", 1, "--out", run)
    assert "--force" in assert_one_line_error(proc, run, r"already")
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.iterdir()} == before


def test_cli_train_out_that_is_a_file_is_one_line(tmp_path):
    """A typo in --out must get a sentence, and the file it names must survive."""
    target = tmp_path / "notes.txt"
    target.write_text("keep me\n")
    proc = run_cli_opts("train", "--limit", 100, "--epochs", 1, "--out", target)
    assert_one_line_error(proc, target, r"not a (folder|directory)|exists|is a file")
    assert target.read_text() == "keep me\n"


def test_out_folder_with_files_of_a_run_is_not_touched_without_force(tmp_path):
    """Any file a run would write (here a lone best.npz) makes `train --out` refuse without
    --force, and the file stays as it was: nothing already there is overwritten by accident."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "best.npz").write_bytes(b"precious")
    proc = run_cli("train", "--limit", 100, "--epochs", 1, "--out", out)
    assert proc.returncode != 0 and "best.npz" in proc.stderr and "--force" in proc.stderr
    assert (out / "best.npz").read_bytes() == b"precious"


TINY_RUN = ("--limit", "300", "--epochs", "1", "--hidden", "8", "--quiet")


def files_of(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under folder, by relative path: its bytes and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("kind", ["run", "ensemble"])
@pytest.mark.parametrize("holds, words", [
    ({"ensemble.json": "{}"}, "already holds an ensemble; choose another --out, resume it with --resume, or"),
    ({"ensemble.json": "{}", "metrics.json": "{}"}, "already holds an ensemble; choose another --out, or"),
    ({"metrics.json": "{}"}, "already holds a finished run; choose another --out, or pass --force"),
    ({"config.json": '{"my": "settings"}'}, "already holds config.json; choose another --out or pass --force"),
], ids=["unfinished-ensemble", "finished-ensemble", "finished-run", "foreign-config"])
def test_train_refuses_a_folder_holding_a_run_an_ensemble_or_a_file_it_would_write(
        tmp_path, capsys, kind, holds, words):
    """Without --force neither a run nor an ensemble overwrites what is in --out: a run or an
    ensemble (finished, or hours of an unfinished one) or a config.json that is not a run's.
    Exit 1, one line saying what is there, and every file left as it was."""
    out = tmp_path / "out"
    out.mkdir()
    for name, text in holds.items():
        (out / name).write_text(text)
    before = files_of(out)
    argv = ENSEMBLE_TINY_ARGV if kind == "ensemble" else TINY_RUN
    assert fmnist.main(["train", *argv, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"fmnist: error: {out}: {words}") and err.count("\n") == 1, err
    assert files_of(out) == before


@pytest.mark.parametrize("text", ["not json", '{"lr": -1}'])
def test_a_config_json_that_is_not_a_valid_config_is_protected_too(tmp_path, capsys, text):
    """A config.json that does not even parse as a config is not a lone config.json of a run
    stopped early, so it is someone's file: refused like any other without --force."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text(text)
    assert fmnist.main(["train", *TINY_RUN, "--out", str(out)]) == 1
    assert capsys.readouterr().err.startswith(f"fmnist: error: {out}: already holds config.json")
    assert (out / "config.json").read_text() == text


def test_a_run_stopped_before_its_first_epoch_was_saved_is_not_protected(tmp_path):
    """A run stopped before its first epoch was saved leaves only its config.json: nothing to
    resume or lose, so the same command runs again without --force (and writes the new
    settings). Beside a best.npz it is refused: that is what a copied finished model looks like."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(Config(hidden=(4,)).to_json()))
    (out / "best.npz").write_bytes(b"a model")
    assert fmnist.main(["train", *TINY_RUN, "--out", str(out)]) == 1
    assert (out / "best.npz").read_bytes() == b"a model"
    (out / "best.npz").unlink()
    assert fmnist.main(["train", *TINY_RUN, "--out", str(out)]) == 0
    saved = Config.from_json(json.loads((out / "config.json").read_text()))
    assert saved.hidden == (8,) and (out / "metrics.json").exists()


def test_default_run_directories_started_in_the_same_second_are_distinct(tmp_path, monkeypatch):
    """Without --out the directory is runs/<timestamp>, claimed by creating it: a second run (or
    a third) started in the same second gets runs/<timestamp>-2 (-3), never a share of the first."""
    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(out=None)
    base = Path("runs") / "20260101-000000"
    made = [fmnist._create_run_dir(base, args) for _ in range(3)]
    assert made == [base, Path("runs/20260101-000000-2"), Path("runs/20260101-000000-3")]
    assert all(path.is_dir() for path in made)
    given = argparse.Namespace(out=base)                 # an explicit --out is used as it is
    assert fmnist._create_run_dir(base, given) == base


def test_runs_started_in_the_same_second_without_out_each_get_a_directory(tmp_path, monkeypatch,
                                                                         capsys):
    """Two runs and an ensemble, all started in the same second without --out: each trains in
    a directory of its own (runs/<timestamp>, -2, -3); none is refused or written over."""
    data = str(DATA)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(fmnist.time, "strftime", lambda fmt: "20260101-000000")
    for argv in (TINY_RUN, TINY_RUN, ENSEMBLE_TINY_ARGV):
        assert fmnist.main(["train", *argv, "--data-dir", data]) == 0, capsys.readouterr().err
    runs = tmp_path / "runs"
    assert sorted(p.name for p in runs.iterdir()) == [
        "20260101-000000", "20260101-000000-2", "20260101-000000-3"]
    assert all((runs / name / "metrics.json").exists() for name in os.listdir(runs))
    assert (runs / "20260101-000000-3" / "ensemble.json").exists()


def test_a_default_run_directory_that_cannot_be_created_is_one_line(tmp_path, monkeypatch, capsys):
    """runs/<timestamp> that the file system refuses (here a name too long) is one sentence."""
    monkeypatch.chdir(tmp_path)
    strftime = time.strftime
    monkeypatch.setattr(time, "strftime", lambda fmt, *when: "x" * 300       # ENAMETOOLONG
                        if fmt == "%Y%m%d-%H%M%S" else strftime(fmt, *when))
    assert fmnist.main(["train", *TINY_RUN]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fmnist: error: ") and "cannot create the directory" in err, err
    assert "choose a directory with --out" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("flags", [TINY_RUN, ENSEMBLE_TINY_ARGV], ids=["run", "ensemble"])
@pytest.mark.parametrize("refused", ["write", "removal"])
def test_a_run_directory_that_cannot_be_written_is_one_line(tmp_path, monkeypatch, capsys, flags,
                                                            refused):
    """A directory that exists but refuses files (a read-only mount, /sys) gets a sentence
    naming it and what to do, not an errno and a temporary file's name: a run's, or an
    ensemble's (whose first file is ensemble.json). On a read-only mount even clearing an
    earlier run's files fails, files that are not there included (EROFS, not ENOENT)."""
    def refuse(*args, **kwargs):
        raise OSError(30, "Read-only file system", "somewhere")
    if refused == "write":
        monkeypatch.setattr(fmnist, "write_json", refuse)
    else:
        monkeypatch.setattr(Path, "unlink", refuse)
    out = tmp_path / "run"
    assert fmnist.main(["train", *flags, "--out", str(out)]) == 1
    assert capsys.readouterr().err == (f"fmnist: error: {out}: cannot write to the directory "
                                       f"(Read-only file system); choose another --out\n")


# ================================================================================================
# Runs cut short (no memory, a full disk, Ctrl-C): what is saved, and how to go on
# ================================================================================================

def test_not_enough_memory_is_one_line_not_a_traceback(capsys):
    """A batch (or network) far beyond memory ends with `fmnist: error: not enough memory (...)`
    and NumPy's account of what it could not allocate."""
    assert fmnist.main(["gradcheck", "--batch", str(10**12)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fmnist: error: not enough memory (Unable to allocate") and err.count("\n") == 1, err


def test_an_ensemble_members_memory_error_is_one_line(monkeypatch, capsys):
    """A member that runs out of memory says so in one line and fails; the ensemble goes on."""
    def out_of_memory(args, config):
        raise MemoryError("Unable to allocate 1 TiB")
    monkeypatch.setattr(fmnist, "run_train", out_of_memory)
    assert fmnist._train_member("m", None, Config()) == 1
    err = capsys.readouterr().err
    assert "not enough memory (Unable to allocate 1 TiB)" in err and "Traceback" not in err


def _failing_on_call(monkeypatch, name: str, n: int, error: BaseException) -> None:
    """Make fmnist.<name> raise `error` on its n-th call (counting from 1), as itself otherwise."""
    real, calls = getattr(fmnist, name), []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise error
        return real(*args, **kwargs)
    monkeypatch.setattr(fmnist, name, wrapper)


def full_disk(filename: Path | None = None) -> OSError:
    return OSError(28, "No space left on device", *([str(filename)] if filename else []))


@pytest.mark.parametrize("epoch", [1, 2])
def test_a_full_disk_during_training_says_what_is_saved_and_resumes(tmp_path, monkeypatch,
                                                                    capsys, epoch):
    """A disk that fills while epoch e is saved: one message naming the file, and how to go on
    from epoch e - 1 (whose state.npz, written atomically, is whole); no best.npz without a
    state.npz beside it. The resumed run ends with the parameters of a run never stopped."""
    flags = [*TINY_RUN[:3], "2", *TINY_RUN[4:]]                          # two epochs
    whole = tmp_path / "whole"
    assert fmnist.main(["train", *flags, "--out", str(whole)]) == 0
    out = tmp_path / "run"
    _failing_on_call(monkeypatch, "save_state", epoch, full_disk(out / "state.npz"))
    capsys.readouterr()
    assert fmnist.main(["train", *flags, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    if epoch == 1:
        assert err == f"fmnist: error: {out / 'state.npz'}: No space left on device\n"
        assert not (out / "best.npz").exists()
        return
    assert err == (f"fmnist: error: {out / 'state.npz'}: No space left on device; the run is "
                   f"saved after epoch 1. Resume it with:\n  {fmnist._invocation()} train --resume {out}\n")
    monkeypatch.undo()
    assert fmnist.main(["train", "--resume", str(out)]) == 0
    assert np.array_equal(load_checkpoint(out / "best.npz")[0].flat,
                          load_checkpoint(whole / "best.npz")[0].flat)


@pytest.mark.parametrize("where", ["full_evaluation", "write_run_artifacts"])
@pytest.mark.parametrize("error", [KeyboardInterrupt(), full_disk()], ids=["ctrl-c", "full disk"])
def test_a_run_stopped_after_training_says_how_to_finish_it(tmp_path, monkeypatch, capsys,
                                                            where, error):
    """Training done, then Ctrl-C or a full disk: in the final evaluation (no metrics.json yet),
    `train --resume` finishes the run; while drawing the pictures, `report` draws them. Either
    command, run as told, leaves the run complete."""
    out = tmp_path / "run"
    _failing_on_call(monkeypatch, where, 1, error)
    code = fmnist.main(["train", *TINY_RUN, "--out", str(out)])
    assert code == (130 if isinstance(error, KeyboardInterrupt) else 1)
    err = capsys.readouterr().err
    fmnist_ = fmnist._invocation()
    what = ("in the final evaluation; the run is saved after epoch 1. Finish it with:\n"
            f"  {fmnist_} train --resume {out}\n" if where == "full_evaluation" else
            f"while drawing the pictures; draw them with:\n  {fmnist_} report {out}\n")
    assert err == (f"\ninterrupted {what}" if code == 130 else
                   f"fmnist: error: {out}: No space left on device; stopped {what}"), err
    monkeypatch.undo()
    command = ["train", "--resume"] if where == "full_evaluation" else ["report"]
    assert fmnist.main([*command, str(out)]) == 0
    assert {"metrics.json", "report.md"} <= set(os.listdir(out))


def test_a_run_interrupted_before_its_first_epoch_is_saved_leaves_nothing_half_done(
        tmp_path, monkeypatch, capsys):
    """Ctrl-C after best.npz was first written but before state.npz: that best.npz belongs to
    no resumable run, so it is removed; a single run then says it was interrupted, an ensemble
    member leaves the how-to-go-on line to its ensemble."""
    def interrupted_fit(splits, config, *args, **kwargs):
        (out / "best.npz").write_bytes(b"x")
        raise KeyboardInterrupt
        yield                                                  # (a generator, as fit is)
    monkeypatch.setattr(fmnist, "fit", interrupted_fit)
    out = tmp_path / "run"
    assert fmnist.main(["train", *TINY_RUN, "--out", str(out)]) == 130
    assert not (out / "best.npz").exists()
    capsys.readouterr()
    out = tmp_path / "member"
    args = fmnist.build_parser().parse_args(["train", *TINY_RUN, "--out", str(out)])
    args.member, args.data_dir = "member", fmnist.default_data_dir()
    assert fmnist.run_train(args, Config(hidden=(8,), limit=300, epochs=1)) == 130
    assert capsys.readouterr().err.endswith("interrupted before epoch 1 was saved\n")
    assert not (out / "best.npz").exists()


# ================================================================================================
# Numerics: divergence stops training with a message; the best checkpoint so far survives
# ================================================================================================

DIVERGING = ["--lr", "10", "--limit", "256", "--batch-size", "256", "--epochs", "5"]  # 1 step an epoch


@pytest.fixture(scope="module")
def diverged_run(tmp_path_factory):
    """A run that diverges in its second epoch (Adam's steps of ~10^6 overflow float32), started
    with --force in a directory that held a finished run. (With Adam even --lr 10 stays finite:
    each step moves a weight by about lr, however large the gradient.)"""
    run = tmp_path_factory.mktemp("diverged") / "run"
    old = _fake_finished_run(run)
    return run, old, run_cli_opts("train", "--force", *DIVERGING, "--out", run)


def test_cli_divergence_names_epoch_and_step_and_keeps_the_best_checkpoint(diverged_run):
    """A non-finite loss must stop training with exit > 0, say where (epoch, step) and what to do
    (a smaller learning rate), and leave the best checkpoint written before it loadable and usable."""
    run, _, proc = diverged_run
    assert proc.returncode > 0 and "Traceback" not in proc.stderr, proc.stderr
    line = proc.stderr.splitlines()[-1]
    found = re.search(r"^fmnist: error: .*epoch (\d+), step (\d+).*smaller learning rate", line)
    assert found, proc.stderr
    diverged_epoch = int(found.group(1))
    assert diverged_epoch >= 2, line             # so that a best checkpoint exists to be kept
    assert str(run / "best.npz") in line
    params, config, meta = load_checkpoint(run / "best.npz")
    assert meta["epoch"] < diverged_epoch and config == Config(lr=10, limit=256, batch_size=256, epochs=5)
    assert np.isfinite(params.flat).all()
    ev = run_cli_opts("evaluate", run / "best.npz")
    assert ev.returncode == 0, ev.stderr


def test_cli_divergence_message_is_the_only_line_on_stderr(diverged_run):
    """One clear sentence, not six lines of warnings from deep inside NumPy before it."""
    run, _, proc = diverged_run
    assert proc.stderr.startswith("fmnist: error: ") and len(proc.stderr.splitlines()) == 1, proc.stderr


def test_cli_failed_forced_run_does_not_leave_the_old_results_beside_the_new(diverged_run):
    """After `train --force` fails half-way, the folder must not pair the old run's metrics.json
    (which marks it finished, with its accuracy) with the new run's config and checkpoint."""
    run, old, proc = diverged_run
    assert proc.returncode > 0
    new_config = (run / "config.json").read_bytes() != old["config.json"]
    old_metrics = (run / "metrics.json").exists() and (run / "metrics.json").read_bytes() == old["metrics.json"]
    assert not (new_config and old_metrics)


def test_cli_forced_run_failing_in_epoch_1_does_not_present_the_old_checkpoint_as_its_own(tmp_path):
    """After a failed forced run, best.npz must not be the old run's beside the new run's config,
    and the message must not offer it as this run's best checkpoint."""
    run = tmp_path / "run"
    old = _fake_finished_run(run)
    proc = run_cli_opts("train", "--force", "--lr", "1e6", "--limit", 2000, "--epochs", 5, "--out", run)
    assert proc.returncode > 0 and "epoch 1," in proc.stderr, proc.stderr
    old_best_kept = (run / "best.npz").exists() and (run / "best.npz").read_bytes() == old["best.npz"]
    assert not (old_best_kept and "best.npz" in proc.stderr.splitlines()[-1]), proc.stderr
    assert not (old_best_kept and (run / "config.json").read_bytes() != old["config.json"])


def test_cli_lr_10_stops_with_a_message(tmp_path):
    """The issue's own example: `--lr 10` must stop training and suggest a smaller learning rate."""
    proc = run_cli_opts("train", "--lr", 10, "--limit", 2000, "--epochs", 1, "--out", tmp_path / "run")
    assert proc.returncode > 0, proc.stdout[-1000:]
    assert re.search(r"epoch \d+, step \d+.*smaller learning rate", proc.stderr.splitlines()[-1])


def test_cli_divergence_found_only_by_the_validation_pass_is_an_error_not_a_nan_result(tmp_path):
    """An absurd learning rate can leave finite but enormous weights after the last step: the
    training loss never saw a NaN, but the validation loss is NaN. That must end the run with
    the divergence message, not write NaN figures (which are not even JSON)."""
    out = tmp_path / "run"
    proc = run_cli("train", "--limit", 100, "--epochs", 1, "--lr", "1e20", "--hidden", 16,
                   "--out", out, "--quiet")
    assert proc.returncode == 1 and "diverged: the validation loss is nan" in proc.stderr
    assert not (out / "metrics.json").exists()


# ================================================================================================
# Arguments: exit 2 and `fmnist train: error: ...` in the CLI; ValueError, same words, in the API
# ================================================================================================

BAD_HYPERPARAMETERS = {   # CLI flags -> the same setting for Config
    "--lr 0": (["--lr", "0"], {"lr": 0.0}),
    "--lr -0.001": (["--lr", "-0.001"], {"lr": -0.001}),
    "--lr nan": (["--lr", "nan"], {"lr": math.nan}),
    "--lr inf": (["--lr", "inf"], {"lr": math.inf}),
    "--dropout -0.1": (["--dropout", "-0.1"], {"dropout": -0.1}),
    "--dropout 1": (["--dropout", "1"], {"dropout": 1.0}),
    "--dropout 1.5": (["--dropout", "1.5"], {"dropout": 1.5}),
    "--batch-size 0": (["--batch-size", "0"], {"batch_size": 0}),
    "--batch-size -8": (["--batch-size", "-8"], {"batch_size": -8}),
    "--hidden ''": (["--hidden", ""], {"hidden": ()}),
    "--hidden 512,0,128": (["--hidden", "512,0,128"], {"hidden": (512, 0, 128)}),
    "--hidden -4": (["--hidden", "-4"], {"hidden": (-4,)}),
    "--epochs 0": (["--epochs", "0"], {"epochs": 0}),
    "--patience -1": (["--patience", "-1"], {"patience": -1}),
    "--l2 -0.0001": (["--l2", "-0.0001"], {"l2": -0.0001}),
    "--l2 nan": (["--l2", "nan"], {"l2": math.nan}),
    # accepted as numbers, but 0 or infinite in float32: training would silently learn nothing
    "--lr 1e-300 (0 in float32)": (["--lr", "1e-300"], {"lr": 1e-300}),
    "--eps 1e39 (infinite in float32)": (["--eps", "1e39"], {"eps": 1e39}),
    "--l2 1e300 (infinite in float32)": (["--l2", "1e300"], {"l2": 1e300}),
    "--weight-decay 1e-50 (0 in float32)": (["--weight-decay", "1e-50"], {"weight_decay": 1e-50}),
    "--limit 0": (["--limit", "0"], {"limit": 0}),
    "--limit 50001 (more than the training images)": (["--limit", "50001"], {"limit": 50_001}),
    "--flip -0.1": (["--flip", "-0.1"], {"flip": -0.1}),
    "--flip 1.5": (["--flip", "1.5"], {"flip": 1.5}),
    "--flip nan": (["--flip", "nan"], {"flip": math.nan}),
    "--shift -1": (["--shift", "-1"], {"shift": -1}),
    "--shift 5 (more than MAX_SHIFT)": (["--shift", "5"], {"shift": fmnist.MAX_SHIFT + 1}),
    "--label-smoothing 1": (["--label-smoothing", "1"], {"label_smoothing": 1.0}),
    "--label-smoothing -0.1": (["--label-smoothing", "-0.1"], {"label_smoothing": -0.1}),
    "--label-smoothing nan": (["--label-smoothing", "nan"], {"label_smoothing": math.nan}),
    "--average 1": (["--average", "1"], {"average": 1.0}),
    "--average -0.5": (["--average", "-0.5"], {"average": -0.5}),
    "--average nan": (["--average", "nan"], {"average": math.nan}),
    "--recipe best-bn --flip 2": (["--recipe", "best-bn", "--flip", "2"], {"flip": 2.0}),
    "--recipe best-bn --flip 0": (["--recipe", "best-bn", "--flip", "0"], {"flip": 0.0, "flip_average": True}),
    "--cutout -1": (["--cutout", "-1"], {"cutout": -1}),
    "--cutout 29 (larger than the image)": (["--cutout", "29"], {"cutout": 29}),
    "--input-dropout 1": (["--input-dropout", "1"], {"input_dropout": 1.0}),
    "--input-dropout nan": (["--input-dropout", "nan"], {"input_dropout": math.nan}),
    "--weight-decay -0.1": (["--weight-decay", "-0.1"], {"weight_decay": -0.1}),
    "--weight-decay nan": (["--weight-decay", "nan"], {"weight_decay": math.nan}),
    "--weight-decay 1000 (x lr 1e-3 = 1: every weight to 0)":
        (["--weight-decay", "1000"], {"weight_decay": 1000.0}),
    "--recipe best-bn --lr 2 (x its weight decay 0.5 = 1)":
        (["--recipe", "best-bn", "--lr", "2"], {"weight_decay": 0.5, "lr": 2.0, "l2": 0.0}),
}


def test_cli_refuses_abbreviated_flags(tmp_path, capsys):
    """argparse would take `--no-flip` for `--no-flip-average` (a unique prefix), turning off
    mirror averaging while the user meant to turn off flips; abbreviations are refused."""
    err = _train_usage_error(["--recipe", "best", "--no-flip"], tmp_path, capsys)
    assert "unrecognized arguments: --no-flip" in err


def _train_usage_error(argv, tmp_path, capsys) -> str:
    out = tmp_path / "never"
    assert exit_code_of_main(["train", *argv, "--out", str(out)]) == 2
    assert not out.exists()
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    return captured.err


@pytest.mark.parametrize("case", BAD_HYPERPARAMETERS)
def test_cli_bad_hyperparameter_exits_2_with_the_api_message(tmp_path, capsys, case):
    """A value out of range is a usage error: exit 2, one argparse-style line, nothing created;
    and Config(...) raises ValueError with exactly the same words, so the two never drift apart."""
    argv, fields = BAD_HYPERPARAMETERS[case]
    with pytest.raises(ValueError) as err:
        Config(**fields)
    assert _train_usage_error(argv, tmp_path, capsys) == f"fmnist train: error: {err.value}\n"


@pytest.mark.parametrize("argv, flag", [
    (["--dtype", "float16"], "--dtype"), (["--hidden", "512,,128"], "--hidden"),
    (["--hidden", "wide"], "--hidden"), (["--epochs", "2.5"], "--epochs"),
    (["--batch-size", "many"], "--batch-size"), (["--lr", "fast"], "--lr"),
    (["--limit", "1e3"], "--limit"), (["--lr-schedule", "linear"], "--lr-schedule"),
    (["--shift", "1.5"], "--shift"), (["--recipe", "fast"], "--recipe"),
], ids=["--dtype float16", "--hidden 512,,128", "--hidden wide", "--epochs 2.5",
        "--batch-size many", "--lr fast", "--limit 1e3", "--lr-schedule linear", "--shift 1.5",
        "--recipe fast"])
def test_cli_unparsable_argument_exits_2_naming_the_flag(tmp_path, capsys, argv, flag):
    """Argparse's own errors: the usage, then one line `fmnist train: error: argument FLAG: ...`."""
    err = _train_usage_error(argv, tmp_path, capsys)
    *usage, last = err.splitlines()
    assert last.startswith(f"fmnist train: error: argument {flag}"), err
    assert usage and usage[0].startswith("usage: fmnist train")
    assert all(line.startswith(" ") for line in usage[1:]), err


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_cli_infinite_l2_is_a_usage_error(tmp_path, capsys):
    """An infinite penalty is a typo to report as such, not a divergence blamed on --lr."""
    err = _train_usage_error(["--l2", "inf", "--limit", "100", "--epochs", "1"], tmp_path, capsys)
    assert err.startswith("fmnist train: error: l2"), err


def _same_message_as_config(fields, call):
    with pytest.raises(ValueError) as expected:
        Config(**fields)
    with pytest.raises(ValueError) as got:
        call()
    assert str(got.value) == str(expected.value)


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5, math.nan])
def test_dropout_masks_refuses_a_rate_with_the_config_message(rate):
    _same_message_as_config({"dropout": rate}, lambda: dropout_masks(0, 4, (3,), rate))


def _adam_inputs():
    params = init_params((6, 3), 0)
    grads = fmnist.Params.from_arrays({k: np.ones_like(v) for k, v in params.items()})
    return params, grads, adam_init(params)


@pytest.mark.parametrize("lr", [0.0, -1e-3, math.nan])
def test_adam_step_refuses_a_learning_rate_with_the_config_message(lr):
    params, grads, state = _adam_inputs()
    _same_message_as_config({"lr": lr}, lambda: adam_step(params, grads, state, lr=lr))


def test_adam_step_refuses_an_infinite_learning_rate():
    params, grads, state = _adam_inputs()
    _same_message_as_config({"lr": math.inf}, lambda: adam_step(params, grads, state, lr=math.inf))


def test_config_refuses_an_infinite_l2():
    with pytest.raises(ValueError, match="l2"):
        Config(l2=math.inf)


def test_config_refuses_an_unknown_lr_schedule_naming_the_known_ones():
    """The CLI's choices stop a typo there; an API caller gets the same list in a ValueError."""
    with pytest.raises(ValueError, match="constant, cosine.*'linear'"):
        Config(lr_schedule="linear")


@pytest.mark.parametrize("fields", [
    {"flip": 0.0}, {"flip": 1.0}, {"shift": 0}, {"shift": fmnist.MAX_SHIFT},
    {"label_smoothing": 0.0}, {"label_smoothing": 0.99}, {"average": 0.0}, {"average": 0.99},
    {"lr_schedule": "constant"}, {"lr_schedule": "cosine"}, {"flip": 1e-9, "flip_average": True},
    {"lr": float(np.finfo(np.float32).tiny)}, {"eps": float(np.finfo(np.float32).max)},
    {"lr": 1e-300, "dtype": "float64"}, {"l2": 0.0, "weight_decay": 0.0},
], ids=str)
def test_config_accepts_the_ends_of_each_new_range(fields):
    """The refusals above stop exactly at the ends of each range: flip 1 (always mirror) and the
    largest shift are settings, not typos."""
    assert all(getattr(Config(**fields), k) == v for k, v in fields.items())


def test_init_params_refuses_an_unknown_dtype_with_the_config_message():
    _same_message_as_config({"dtype": "float16"}, lambda: init_params((784, 8, 10), 0, "float16"))


@pytest.mark.parametrize("sizes", [(), (784,), (784, 0, 10), (784, 8, -10)], ids=str)
def test_init_params_refuses_empty_or_non_positive_layer_sizes(sizes):
    """The network's widths, named in the message, must be positive; a zero would build an
    empty layer that silently predicts nothing."""
    with pytest.raises(ValueError, match=re.escape(str(list(sizes)))):
        init_params(sizes, 0)


def test_make_splits_refuses_a_limit_larger_than_the_training_images(raw):
    """--limit is checked against the data actually there, not only against 50,000; a limit of
    exactly the training images there is all of them, the same as no limit."""
    small = RawData(raw.train_images[:12_000], raw.train_labels[:12_000], raw.test_images, raw.test_labels)
    with pytest.raises(ValueError, match=r"limit.*2,000.*2,500"):
        make_splits(small, Config(limit=2_500))
    whole, limited = make_splits(small), make_splits(small, Config(limit=2_000))
    assert all(np.array_equal(a, b) for a, b in zip(whole, limited))


def test_make_splits_refuses_a_validation_set_as_large_as_the_data():
    """With fewer images than val_size, the split must be refused, not leave nothing to train on."""
    rng = np.random.default_rng(0)
    raw = RawData(rng.integers(0, 256, (100, 28, 28), dtype=np.uint8),
                  rng.integers(0, 10, 100).astype(np.uint8),
                  rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
                  rng.integers(0, 10, 20).astype(np.uint8))
    with pytest.raises(ValueError, match=r"val.*10,?000.*100|100.*val.*10,?000"):
        make_splits(raw, Config())


OUT_OF_RANGE = {"dropout": 1.5, "l2": -1.0, "lr": -0.5, "beta1": 1.5, "beta2": -0.25, "eps": -1.0,
                "flip": 2.5, "shift": 7, "label_smoothing": 1.25, "average": -0.75, "cutout": 30,
                "input_dropout": 1.75}


@pytest.mark.parametrize("field", OUT_OF_RANGE)
def test_a_refused_setting_is_named_with_the_value_refused(field):
    """'learning rate must be > 0 and finite, got -0.5': the value is in the sentence, so a user
    who set it in a script or a config.json sees which number is wrong. Every setting of
    _SETTINGS has a row here."""
    assert set(OUT_OF_RANGE) == set(fmnist._SETTINGS)
    bad = OUT_OF_RANGE[field]
    with pytest.raises(ValueError) as err:
        Config(**{field: bad})
    assert str(err.value).endswith(f", got {bad}"), str(err.value)


@pytest.mark.parametrize("fields", [
    {"cutout": 28}, {"cutout": 0}, {"hidden": (fmnist.MAX_WIDTH,)}, {"hidden": (1,)},
    {"limit": fmnist.TRAIN_IMAGES - 10_000}, {"limit": 1}, {"val_size": 1},
    {"val_size": fmnist.TRAIN_IMAGES - 1}, {"batch_size": 1}, {"seed": 0}, {"patience": 0},
], ids=str)
def test_config_accepts_the_ends_of_the_other_ranges(fields):
    """The refusals stop exactly at the ends their messages name: a cutout as large as the image,
    a layer of MAX_WIDTH units, a limit of all 50,000 training images are settings, not typos.
    (C09, C22, C27)"""
    assert all(getattr(Config(**fields), k) == v for k, v in fields.items())


@pytest.mark.parametrize("changes, words", [
    ({"epochs": 2.5}, "epochs must be a whole number, got 2.5"),
    ({"batch_size": 64.0}, "batch_size must be a whole number"),
    ({"hidden": (8.9,)}, "hidden must be a list of whole numbers"),
    ({"batch_norm": "false"}, "batch_norm must be true or false, got 'false'"),
    ({"lr": "1e-3"}, "lr must be a number"),
    ({"limit": 1.5}, "limit must be a whole number or none"),
])
def test_config_refuses_a_value_of_the_wrong_kind_instead_of_rounding_or_reading_it_as_true(
        changes, words):
    """A config read back from a file (or built in Python) with 2.5 epochs, a width of 8.9 or
    the string "false" for a switch is refused by name: silently training 3 epochs, a width of
    8, or with batch norm on would be worse than an error."""
    with pytest.raises(ValueError, match=re.escape(words)):
        Config(**changes)


@pytest.mark.parametrize("changes, words", [
    ({"epochs": True}, "epochs must be a whole number, got True"),
    ({"batch_size": np.True_}, "batch_size must be a whole number, got True"),
    ({"batch_norm": 1}, "batch_norm must be true or false, got 1"),
    ({"flip_average": 0}, "flip_average must be true or false, got 0"),
    ({"val_size": fmnist.TRAIN_IMAGES}, "val_size must be in [1, 60000), got 60000"),
], ids=str)
def test_config_refuses_a_switch_for_a_number_a_number_for_a_switch_and_no_training_images(
        changes, words):
    """JSON's true is not 1 epoch and its 1 is not a switch: each is refused by name, as 2.5
    epochs are. A validation set of all 60,000 images leaves none to train on and is refused
    when the config is made, not later by the split. (C14, C17, C26)"""
    with pytest.raises(ValueError, match=re.escape(words)):
        Config(**changes)


def test_a_numpy_bool_in_a_config_becomes_a_bool_that_json_can_write(tmp_path):
    config = Config(batch_norm=np.True_, hidden=(8,), limit=100)
    assert type(config.batch_norm) is bool
    save_checkpoint(tmp_path / "c.npz", init_params(config.layer_sizes, 0, batch_norm=False), config)
    assert load_checkpoint(tmp_path / "c.npz")[1] == config


@pytest.mark.parametrize("argv", [["train", "--out", ""], ["train", "--resume", ""],
                                  ["train", "--data-dir", ""], ["evaluate", ""], ["report", ""],
                                  ["predict", "", "--test-index", "1"], ["download", "--data-dir", ""]],
                         ids=" ".join)
def test_an_empty_path_is_a_usage_error_not_the_current_directory(argv, capsys, tmp_path, monkeypatch):
    """`--out "$OUT"` with OUT unset must not write a run into the current directory: an empty
    path is refused (exit 2) before anything is read or written."""
    monkeypatch.chdir(tmp_path)
    assert exit_code_of_main(argv) == 2
    assert "expected a path, got an empty string" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_an_empty_image_path_after_an_option_is_a_usage_error(tmp_path, capsys):
    """predict's images may follow an option; an empty one there is refused like one before it."""
    code = exit_code_of_main(["predict", str(tmp_path), "a.png", "--invert", ""])
    assert code == 2 and "an image path is an empty string" in capsys.readouterr().err


def test_a_negative_test_index_is_a_usage_error_not_the_last_test_image(capsys):
    """--test-index -1 would otherwise ask silently about image 9,999 (Python's indexing)."""
    assert exit_code_of_main(["predict", "ckpt.npz", "--test-index", "-1"]) == 2
    assert "a test image number is 0 to 9999, got '-1'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "evaluate ckpt.npz", "predict ckpt.npz a.png"])
def test_an_unknown_option_shows_its_commands_usage(command, capsys):
    """`fmnist train --nope` answers with train's usage and name, as `fmnist train` without a
    value would, not with the top-level `usage: fmnist [-h] [--version] COMMAND ...`."""
    name = command.split()[0]
    assert exit_code_of_main([*command.split(), "--nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: fmnist {name} ") and \
        err.splitlines()[-1] == f"fmnist {name}: error: unrecognized arguments: --nope", err


def test_an_unknown_option_before_the_command_gets_the_top_level_usage(capsys):
    """`fmnist --nope train`: the option was given to fmnist, not to train."""
    assert exit_code_of_main(["--nope", "train"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == "fmnist: error: unrecognized arguments: --nope"


@pytest.mark.parametrize("argv", [["a.png", "--invert", "--bogus"], ["--invert", "a.png", "--bogus"]],
                         ids=" ".join)
def test_an_unknown_option_after_predicts_images_is_a_usage_error(argv, capsys):
    """Image files may follow an option, but an unknown option there is still refused as
    argparse refuses it elsewhere (exit 2), not taken for an image file named --bogus."""
    assert exit_code_of_main(["predict", "ckpt.npz", *argv]) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert "unrecognized arguments: " in last and last.endswith("--bogus"), last


def test_predicts_images_after_an_option_are_not_called_unrecognized(capsys):
    """In `predict ckpt.npz --invert a.png --bogus`, a.png is an image file (they may follow an
    option) and only --bogus is unknown."""
    assert exit_code_of_main(["predict", "ckpt.npz", "--invert", "a.png", "--bogus", "b.png"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == \
        "fmnist predict: error: unrecognized arguments: --bogus"


@pytest.mark.parametrize("argv", [["--invert", "--", "-a.png"], ["--", "-a.png"],
                                  ["b.png", "--invert", "--", "-a.png", "--c.png"]], ids=" ".join)
def test_predicts_images_after_dashes_are_images_even_after_an_option(argv):
    """After `--`, a name that starts with a dash is an image file, whether or not an option
    came before (argparse alone handles only the second case)."""
    args = fmnist.parse_args(fmnist.build_parser(), ["predict", "ckpt.npz", *argv])
    assert [str(i) for i in args.images] == [a for a in argv if a not in ("--invert", "--")]
    assert args.invert == ("--invert" in argv)


def test_image_files_after_an_option_do_not_leak_into_the_next_parse():
    """Images given after an option are added to a new list, not to the parser's default one,
    so a second command parsed by the same program sees only its own images."""
    parser = fmnist.build_parser()
    first = fmnist.parse_args(parser, ["predict", "ckpt", "--invert", "a.png"])
    second = fmnist.parse_args(parser, ["predict", "ckpt", "--test-index", "3"])
    assert first.images == [Path("a.png")] and second.images == []


# ================================================================================================
# Labels the parameters cannot score
# ================================================================================================

def _label_setup():
    params = init_params((784, 8, 10), 0)
    x = np.random.default_rng(0).normal(size=(5, 784)).astype(np.float32)
    return params, x


LABEL_CALLS = {
    "evaluate": lambda p, x, y: evaluate(p, x, y),
    "backward": lambda p, x, y: backward(p, forward(p, x)[1], y),
    "train_epoch": lambda p, x, y: train_epoch(p, adam_init(p), x, y, Config(hidden=(8,))),
}


@pytest.mark.parametrize("bad", [10, -1])
@pytest.mark.parametrize("call", LABEL_CALLS)
def test_labels_outside_the_classes_give_a_value_error(call, bad):
    """Like a data file's labels, an API caller's labels must be classes 0-9, said in a ValueError."""
    params, x = _label_setup()
    y = np.array([0, 1, 2, 3, bad])
    with pytest.raises(ValueError, match=r"0.{1,4}9"):
        LABEL_CALLS[call](params, x, y)


@pytest.mark.parametrize("call", [
    lambda p, x, y: fmnist.evaluate(p, x, y),
    lambda p, x, y: fmnist.total_loss(p, x, y),
    lambda p, x, y: fmnist.backward(p, fmnist.forward(p, x)[1], y),
    lambda p, x, y: fmnist.train_epoch(p, fmnist.adam_init(p), x, y, Config(hidden=(8, 6), batch_size=4,
                                                                            dtype="float64")),
], ids=["evaluate", "total_loss", "backward", "train_epoch"])
def test_float_labels_are_refused_in_a_value_error_even_when_whole(call):
    """Labels 0.0, 1.0, ... are floats, not classes: refused in words, not by an IndexError from
    deep inside the loss (or, for evaluate, after a whole forward pass)."""
    params, x, y, _ = _setup()
    with pytest.raises(ValueError, match=re.escape("labels must be integers in 0..3, got float64")):
        call(params, x, y.astype(np.float64))


# ================================================================================================
# predict: a missing, empty, damaged or non-image file, a decompression bomb, no Pillow
# ================================================================================================

def _png(width: int, height: int, idat: bytes) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)       # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _png_bomb(side: int = 32_768) -> bytes:
    """A valid 1 MB PNG of side x side black pixels, 1 GiB once inflated: one deflate block of 128
    zero rows after a full flush is byte-aligned and independent, so it can simply be repeated."""
    rows = bytes(side + 1) * 128                                         # filter byte + pixels
    c = zlib.compressobj(9)
    first = c.compress(rows) + c.flush(zlib.Z_FULL_FLUSH)
    unit = c.compress(rows) + c.flush(zlib.Z_FULL_FLUSH)
    adler = 1
    for _ in range(side // 128):
        adler = zlib.adler32(rows, adler)
    stream = first + unit * (side // 128 - 1) + c.flush()[:-4] + struct.pack(">I", adler)
    return _png(side, side, stream)


NOT_IMAGES = {   # id -> the file's bytes (None: no file), problem regex
    "no such file": (lambda: None, r"cannot be opened|not found|no such"),
    "an empty file": (lambda: b"", r"empty"),
    "a text file": (lambda: b"a photo of a cat, described in words\n", r"not a readable image|image"),
    "a PNG cut short": (lambda: _png(28, 28, zlib.compress(bytes(29 * 28)))[:50],
                        r"not a readable image|truncated|image"),
    "a PNG bomb (32768x32768, 1 GiB inflated)": (_png_bomb, r"too large|pixels"),
}


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (2**30, 2**30))              # 1 GiB of address space


@pytest.mark.parametrize("case", NOT_IMAGES)
def test_cli_predict_refuses_what_is_not_a_usable_image(tmp_path, case):
    """A bad image gets one sentence naming it, with exit > 0; a decompression bomb is refused from
    its header, so the command stays within 1 GiB of address space and a few seconds."""
    make, problem = NOT_IMAGES[case]
    image = tmp_path / "cat.png"
    if (data := make()) is not None:
        image.write_bytes(data)
    checkpoint = small_checkpoint(tmp_path / "best.npz")
    started = time.monotonic()
    proc = run_cli_opts("predict", checkpoint, image, timeout=60, preexec_fn=_limit_memory)
    assert_one_line_error(proc, image, problem)
    assert time.monotonic() - started < 20


def test_cli_predict_without_pillow_says_what_to_install(tmp_path):
    """Pillow is an optional extra, so its absence is a situation to explain, not a crash."""
    image = tmp_path / "cat.png"
    image.write_bytes(_png(28, 28, zlib.compress(bytes(29 * 28))))
    checkpoint = small_checkpoint(tmp_path / "best.npz")
    blocked = ("import runpy, sys; sys.modules['PIL'] = None; sys.argv = sys.argv[1:]; "
               "runpy.run_path(sys.argv[0], run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", blocked, str(FMNIST), "predict", str(checkpoint),
                           str(image)], cwd=HERE, capture_output=True, text=True, timeout=60)
    line = the_error_line(proc)
    assert line.startswith("fmnist: error: ") and re.search(r"pillow|\[predict\]", line, re.IGNORECASE), line


# ================================================================================================
# The user's tour: pictures, report, predict, gradcheck, download
# ================================================================================================
# What a user sees from the command line, so most tests run fmnist.py in a subprocess; one small
# training run (2,000 images, 2 epochs) is shared by this section. The download tests serve the
# shipped files from a local HTTP server on 127.0.0.1 (no internet needed) through the standard-
# library path; the torchvision comparison runs only where torchvision is installed.

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def one_line_error(proc, stdout: str | None = "") -> str:
    """The error a user sees: non-zero exit, exactly one line on stderr, no traceback (and, unless
    stdout is None, nothing else printed)."""
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert stdout is None or proc.stdout == stdout
    return lines[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished tiny training run, made through the command line as a user would."""
    out = tmp_path_factory.mktemp("tour") / "run"
    proc = run_cli("train", "--limit", 2000, "--epochs", 2, "--out", out)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def test_set():
    return fmnist.load_test_set(DATA)


# ================================================================================================
# Pictures and report
# ================================================================================================

def image_mode(path: Path) -> str:
    """The mode Pillow reads an image file in ("L", "I;16", ...), the file closed again."""
    from PIL import Image
    with Image.open(path) as image:
        return image.mode


def assert_reasonable_png(path: Path) -> None:
    """A real PNG, large enough to read and not a blank canvas."""
    from PIL import Image
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    assert 10_000 < path.stat().st_size < 3_000_000, (path, path.stat().st_size)
    with Image.open(path) as image:
        width, height = image.size
        pixels = np.asarray(image.convert("L"), dtype=float)
    assert 600 <= width <= 2000 and 400 <= height <= 2000, (path, image.size)
    assert pixels.std() > 10, f"{path} looks blank"


def test_train_writes_the_three_pictures_and_the_report(run_dir):
    """The end of `train` leaves the pictures and report.md beside the run's figures."""
    for name in fmnist.PICTURES:
        assert_reasonable_png(run_dir / name)
    assert (run_dir / "report.md").stat().st_size > 1000


def test_report_command_regenerates_pictures_and_an_identical_report(run_dir, tmp_path):
    """`report RUN_DIR` rebuilds everything from the run's files alone, and the report is a
    function of those files: regenerating it gives the same text."""
    copy = shutil.copytree(run_dir, tmp_path / "run")
    original = (copy / "report.md").read_text()
    for name in (*fmnist.PICTURES, "report.md"):
        (copy / name).unlink()
    proc = run_cli("report", copy)
    assert proc.returncode == 0, proc.stderr
    for name in fmnist.PICTURES:
        assert_reasonable_png(copy / name)
    assert (copy / "report.md").read_text() == original


def test_report_has_the_seed_reports_sections_with_this_runs_figures(run_dir):
    """Each section of seed-report.md is there, filled from this run's metrics and config."""
    report = (run_dir / "report.md").read_text()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    history = json.loads((run_dir / "history.json").read_text())
    for heading in ("## 2 Dataset and Preprocessing", "### 2.2 Train / Validation / Test Split",
                    "### 2.3 Preprocessing", "## 3 Model Architecture", "### 4.1 Optimization",
                    "### 4.2 Training Results", "### 5.1 Overall Performance",
                    "### 5.2 Per-Class Metrics", "### 5.3 Observations"):
        assert heading in report, heading
    assert f"Test Accuracy: **{metrics['test_accuracy']:.2%}**" in report
    assert f"Test Loss: **{metrics['test_loss']:.4f}**" in report
    assert f"Best checkpoint: epoch {metrics['best_epoch']}" in report
    assert f"Final validation loss: {history[-1]['val_loss']:.4f}" in report
    assert "Training set: 2,000 samples" in report and "784 -> 512 -> 256 -> 128 -> 10" in report
    for c in metrics["per_class"]:
        assert f"| {c['class']} | {c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} |" in report
    weakest = min(metrics["per_class"], key=lambda c: c["f1"])
    assert f"Weakest classes (lowest F1): {weakest['class']} ({weakest['f1']:.3f})" in report
    top = metrics["top_confusions"][0]
    assert f"{top['a']} <-> {top['b']}: {top['a_as_b'] + top['b_as_a']}" in report
    for name in fmnist.PICTURES:
        assert f"]({name})" in report, name
    assert "python fmnist.py train --epochs 2 --limit 2000" in report


@pytest.mark.parametrize("recipe, method, train_figures", [
    ("report", "trained with Adam, dropout and L2 reached",
     "running mean over the epoch, dropout on)"),
    ("best-shift", "trained with AdamW and augmented images reached",
     "running mean over the epoch, augmented images)"),
    ("best-bn", "trained with AdamW, dropout, batch normalisation and augmented images reached",
     "running mean over the epoch, dropout on, augmented images)"),
])
def test_report_says_how_its_own_run_was_trained(run_dir, recipe, method, train_figures):
    """The report describes the run's recipe, not the seed report's: `--recipe best-shift` has
    no dropout and no L2 (it decays weights with AdamW), so its report must not claim them, and
    its train figures are those of augmented images."""
    config = Config() if recipe == "report" else fmnist.RECIPES[recipe]
    history = json.loads((run_dir / "history.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    report = fmnist.report_markdown(config, history, metrics)
    assert method in report and train_figures in report
    if recipe == "best-shift":
        assert "dropout" not in report.split("## 2")[0] and "dropout on" not in report


def test_report_without_matplotlib_skips_pictures_with_one_note(run_dir, tmp_path):
    """matplotlib is optional: without it the report is still written, without images, and the
    user is told in one line what is missing."""
    copy = shutil.copytree(run_dir, tmp_path / "run")
    for name in (*fmnist.PICTURES, "report.md"):
        (copy / name).unlink()
    code = ("import sys; sys.modules['matplotlib'] = None; import fmnist; "
            f"sys.exit(fmnist.main(['report', {str(copy)!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "matplotlib" in proc.stderr
    assert not any((copy / name).exists() for name in fmnist.PICTURES)
    report = (copy / "report.md").read_text()
    assert "![" not in report and "No pictures" in report and "### 5.2 Per-Class Metrics" in report


def test_mistakes_come_from_the_largest_confusions_most_confident_first():
    """choose_mistakes picks, for each pair and direction, wrong predictions only, surest first."""
    labels = np.array([6, 6, 6, 0, 0, 2])
    probs = np.full((6, 10), 0.01)
    probs[[0, 1, 2, 3, 4, 5], [0, 0, 6, 6, 6, 2]] = [0.5, 0.9, 0.9, 0.6, 0.8, 0.9]
    assert fmnist.choose_mistakes(labels, probs, [(6, 0)], per_direction=3) == [[[1, 0], [4, 3]]]


def test_import_fmnist_stays_numpy_only():
    """The optional libraries are imported inside the functions that need them, so the core
    module works (and imports fast) with NumPy alone."""
    code = ("import sys, fmnist; "
            "print(sorted(m for m in ('matplotlib', 'PIL', 'torchvision') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


# ================================================================================================
# Predict
# ================================================================================================

@pytest.fixture(scope="module")
def confident(run_dir, test_set):
    """Test images the trained network classifies with probability > 0.95, and their classes:
    a round trip through a file must not change those."""
    params, config, _ = load_checkpoint(run_dir / "best.npz")
    images, _ = test_set
    probs = fmnist.class_probabilities(params, images[:300], config.dtype)     # (300, 10)
    picked = [i for i in range(300) if probs[i].max() > 0.95
              and probs[i].argmax() in (0, 2, 4, 6, 8, 9, 1)][:4]
    assert len(picked) == 4
    return {i: fmnist.CLASS_NAMES[probs[i].argmax()] for i in picked}


def predict_json(*args) -> list[dict]:
    proc = run_cli("predict", *args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["predictions"]


def test_predict_a_test_image_saved_as_png_both_ways_round(run_dir, test_set, confident, tmp_path):
    """A test image saved as PNG, white on black as stored, or black on white with --invert, is
    classified as the network classifies that test image directly."""
    from PIL import Image
    images, _ = test_set
    plain, inverted = [], []
    for i in confident:
        plain.append(tmp_path / f"{i}.png")
        inverted.append(tmp_path / f"{i}-inverted.png")
        Image.fromarray(images[i]).save(plain[-1])
        Image.fromarray(255 - images[i]).save(inverted[-1])
    expected = list(confident.values())
    for files, flags in ((plain, ()), (inverted, ("--invert",))):
        results = predict_json(run_dir / "best.npz", *flags, *files)
        assert [r["top"][0]["class"] for r in results] == expected
        assert [r["input"] for r in results] == [str(f) for f in files]


def test_predict_refuses_a_picture_with_no_object_instead_of_guessing(run_dir, tmp_path):
    """A blank picture, or a dark object on a transparent background read as a light object on
    black, holds nothing lighter than its border: one line saying so and suggesting --invert,
    not a confident class for an empty square. With --invert, the object is found."""
    from PIL import Image
    blank, dark_on_clear = tmp_path / "blank.png", tmp_path / "dark.png"
    Image.new("L", (60, 40), 0).save(blank)
    rgba = np.zeros((40, 60, 4), np.uint8)
    rgba[5:35, 20:40] = (0, 0, 0, 255)                        # a black block, the rest transparent
    Image.fromarray(rgba).save(dark_on_clear)
    for path in (blank, dark_on_clear):
        line = one_line_error(run_cli("predict", run_dir / "best.npz", path))
        assert str(path) in line and "no object found" in line and "--invert" in line, line
    proc = run_cli("predict", run_dir / "best.npz", "--invert", dark_on_clear)
    assert proc.returncode == 0 and proc.stdout.startswith(f"{dark_on_clear}: "), proc.stderr
    with pytest.raises(ValueError, match="no object found"):
        fmnist.to_fashion_mnist(np.full((28, 28), 9, np.uint8))


def test_a_16_bit_grey_png_reads_as_its_8_bit_twin(test_set, tmp_path):
    """A 16-bit greyscale PNG (values 0-65535) is the same picture as its 8-bit version: Pillow
    would clip every value above 255 when converting it, washing the image out to white."""
    from PIL import Image
    images, _ = test_set
    for i in (0, 1, 2):
        Image.fromarray(images[i]).save(tmp_path / f"{i}-8.png")
        Image.fromarray(images[i].astype(np.uint16) * 257).save(tmp_path / f"{i}-16.png")
        assert image_mode(tmp_path / f"{i}-16.png").startswith("I")
        eight, sixteen = (fmnist.read_image(tmp_path / f"{i}-{bits}.png") for bits in (8, 16))
        assert np.array_equal(sixteen, eight) and np.array_equal(eight, images[i])
    # a 32-bit integer image of 8-bit values (mode I, as some TIFFs are) is not rescaled
    Image.fromarray(images[0].astype(np.int32)).save(tmp_path / "0-32.tif")
    assert image_mode(tmp_path / "0-32.tif") == "I"
    assert np.array_equal(fmnist.read_image(tmp_path / "0-32.tif"), images[0])


def test_predict_a_large_colour_jpeg_off_centre(run_dir, test_set, confident, tmp_path):
    """Any size or colour: the image scaled up 6x, tinted, saved as JPEG and placed off-centre
    on a larger canvas comes back to 28 x 28 close to the original, with the same top class."""
    from PIL import Image
    images, _ = test_set
    files = []
    for i in confident:
        canvas = Image.new("RGB", (300, 220), (0, 0, 0))
        big = Image.fromarray(images[i]).resize((168, 168), Image.Resampling.BICUBIC)
        tinted = Image.merge("RGB", (big, big.point(lambda v: v * 0.8), big.point(lambda v: v * 0.5)))
        canvas.paste(tinted, (110, 30))
        files.append(tmp_path / f"{i}.jpg")
        canvas.save(files[-1], quality=92)
        small = fmnist.to_fashion_mnist(fmnist.read_image(files[-1]))            # (28, 28)
        assert np.abs(small.astype(float) - images[i]).mean() < 20
    results = predict_json(run_dir / "best.npz", *files)
    assert [r["top"][0]["class"] for r in results] == list(confident.values())


def test_most_fashion_mnist_images_come_back_unchanged_from_the_preprocessing(test_set):
    """`to_fashion_mnist` makes an image the way Zalando made the dataset's, so a dataset image
    should mostly pass through untouched: of the first 1,000 test images, at least three in four
    exactly (811 when measured) and 85% within 10 grey levels (904). Putting the spare pixel
    of an odd margin below and right instead changes 597 of them."""
    images, _ = test_set
    diffs = np.array([np.abs(fmnist.to_fashion_mnist(im).astype(int) - im).max()
                      for im in images[:1000]])
    assert (diffs == 0).mean() >= 0.75 and (diffs <= 10).mean() >= 0.85, np.bincount(diffs)[:12]


def test_predict_test_index_matches_direct_evaluation_in_text_and_json(run_dir, test_set):
    """--test-index asks about a test image: the three classes and probabilities are the
    network's own, largest first, in the text output and in --json."""
    params, config, _ = load_checkpoint(run_dir / "best.npz")
    images, labels = test_set
    probs = fmnist.class_probabilities(params, images[[5, 17]], config.dtype)   # (2, 10)
    results = predict_json(run_dir / "best.npz", "--test-index", 5, "--test-index", 17)
    for r, p, i in zip(results, probs, (5, 17)):
        order = np.argsort(-p)[:3]
        assert [t["label"] for t in r["top"]] == order.tolist()
        np.testing.assert_allclose([t["probability"] for t in r["top"]], p[order], rtol=1e-6)
        assert r["true_class"] == fmnist.CLASS_NAMES[labels[i]]
    proc = run_cli("predict", run_dir / "best.npz", "--test-index", 5)
    assert proc.returncode == 0, proc.stderr
    best = fmnist.CLASS_NAMES[probs[0].argmax()]
    assert proc.stdout.startswith(f"test image 5 (true class: {fmnist.CLASS_NAMES[labels[5]]}): "
                                  f"{best} {probs[0].max():.1%}, ")


def test_predict_answers_for_every_usable_image_and_names_each_unusable_one(run_dir, test_set,
                                                                            tmp_path):
    """One bad file among several does not cost the others their answers: each bad one gets an
    error line (text) or an entry under "errors" (--json), the rest are answered in the order
    given, and the exit status is 1."""
    from PIL import Image
    good, bad, missing = tmp_path / "good.png", tmp_path / "bad.png", tmp_path / "missing.png"
    Image.fromarray(test_set[0][0]).save(good)
    bad.write_bytes(b"a text file\n")
    argv = ["predict", run_dir / "best.npz", bad, good, missing, "--test-index", 1]
    proc = run_cli(*argv)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert [line.split(":")[0] for line in proc.stdout.splitlines()] == [str(good), "test image 1 (true class"]
    errors = proc.stderr.splitlines()
    assert len(errors) == 2 and errors[0].startswith(f"fmnist: error: {bad}: not a readable image")
    assert errors[1] == f"fmnist: error: {missing}: cannot be opened (No such file or directory)"
    proc = run_cli(*argv, "--json")
    assert proc.returncode == 1
    out = json.loads(proc.stdout)
    assert [r["input"] for r in out["predictions"]] == [str(good), "test image 1"]
    assert [e["input"] for e in out["errors"]] == [str(bad), str(missing)]
    assert [f"fmnist: error: {e['error']}" for e in out["errors"]] == proc.stderr.splitlines()


def png_header(width: int, height: int) -> bytes:
    """A PNG with a valid header claiming width x height pixels and no pixel data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (PNG_SIGNATURE + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("content, words", [
    (b"this is a text file\n", "not a readable image"),
    (b"", "empty file"),
    (png_header(100_000, 100_000), "too large"),       # 10^10 pixels: a decompression bomb
    (png_header(10_000, 6_000), "too large"),          # 60 MP: refused by fmnist's own limit
    (PNG_SIGNATURE + b"\x00\x00\x00\x0dIHDR", "not a readable image"),   # cut inside the header
], ids=["text", "empty", "bomb", "too-many-pixels", "truncated"])
def test_predict_bad_input_is_one_line_error(run_dir, tmp_path, content, words):
    """A file that is not a usable image gets one line naming the file and the problem, quickly
    and without decoding pixels (the 10^10-pixel header would need 10 GB)."""
    bad = tmp_path / "bad.png"
    bad.write_bytes(content)
    line = one_line_error(run_cli("predict", run_dir / "best.npz", bad, timeout=60))
    assert str(bad) in line and words in line, line


def test_predict_without_pillow_says_what_to_install(run_dir, tmp_path):
    """Pillow is optional: reading an image without it is one line naming the extra to install."""
    code = ("import sys; sys.modules['PIL'] = None; import fmnist; "
            f"sys.exit(fmnist.main(['predict', {str(run_dir / 'best.npz')!r}, 'any.png']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True)
    assert "fmnist[predict]" in one_line_error(proc)


def test_predict_needs_an_image_or_a_test_index(run_dir):
    proc = run_cli("predict", run_dir / "best.npz")
    assert proc.returncode == 2 and "--test-index" in one_line_error(proc)


def test_the_pixel_limit_admits_an_image_of_exactly_that_many_pixels(tmp_path, monkeypatch):
    """MAX_IMAGE_PIXELS is the largest image read, not the first refused (here lowered to 28 x 28
    so that the test stays small)."""
    from PIL import Image
    monkeypatch.setattr(fmnist, "MAX_IMAGE_PIXELS", 28 * 28)
    Image.new("L", (28, 28), 0).save(tmp_path / "limit.png")
    Image.new("L", (28, 29), 0).save(tmp_path / "over.png")
    assert fmnist.read_image(tmp_path / "limit.png").shape == (28, 28)
    with pytest.raises(fmnist.ImageError, match="too large"):
        fmnist.read_image(tmp_path / "over.png")


def test_a_too_large_image_is_refused_in_one_plain_sentence(tmp_path):
    """The pixel limit's own message, not wrapped again as 'not a readable image (ImageError:
    ...)' with the path named twice."""
    path = io_path(tmp_path / "big.png", png_header(10_000, 6_000))
    with pytest.raises(fmnist.ImageError) as err:
        fmnist.read_image(path)
    assert str(err.value) == (f"{path}: 10000 x 6000 pixels is too large (limit 50,000,000 "
                              f"pixels); shrink it first")


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_a_photo_is_read_upright_as_its_exif_orientation_says(tmp_path, suffix):
    """A phone stores a portrait photo as landscape pixels plus an EXIF orientation; read upright,
    a tall dress does not become a wide one. Orientation 6: turn the pixels 90 degrees
    clockwise."""
    from PIL import Image
    pixels = np.zeros((20, 40), np.uint8)
    pixels[2:6, 5:30] = 200
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(tmp_path / f"photo.{suffix}", exif=exif, quality=100)
    gray = fmnist.read_image(tmp_path / f"photo.{suffix}")
    assert gray.shape == (40, 20)
    assert np.abs(gray.astype(int) - np.rot90(pixels, -1)).max() <= 2


def test_a_large_image_is_shrunk_to_the_working_side_keeping_its_shape(tmp_path):
    """read_image bounds the pixels it hands on: the longer side to WORKING_SIDE, the aspect
    ratio kept."""
    from PIL import Image
    Image.new("L", (2048, 1000), 0).save(tmp_path / "wide.png")
    assert fmnist.read_image(tmp_path / "wide.png").shape == (500, fmnist.WORKING_SIDE)


def test_a_big_endian_16_bit_tiff_reads_as_its_8_bit_twin(tmp_path):
    """Pillow reads big-endian 16-bit TIFFs as mode I;16B; like I;16 they hold 0-65535 and are
    scaled to 8 bits, not clipped to 255."""
    from PIL import Image
    pixels = (np.arange(28 * 28).reshape(28, 28) % 256).astype(np.uint8)
    Image.frombytes("I;16B", (28, 28), (pixels.astype(">u2") * 257).tobytes()).save(tmp_path / "b.tif")
    assert image_mode(tmp_path / "b.tif") == "I;16B"
    assert np.array_equal(fmnist.read_image(tmp_path / "b.tif"), pixels)


@given(gray=hnp.arrays(np.uint8, st.tuples(st.integers(2, 9), st.integers(2, 9))))
def test_the_border_is_the_outermost_ring_of_pixels(gray):
    """_border holds each pixel of the first and last rows and columns (a corner is in a row and
    a column, so twice) and nothing else: the background estimate and looks_inverted see the
    picture's edge, not a row inside it. (P13, P14)"""
    count = np.zeros(gray.shape, int)
    count[[0, -1], :] += 1
    count[:, [0, -1]] += 1
    expected = np.repeat(gray.ravel(), count.ravel())
    assert np.array_equal(np.sort(fmnist._border(gray)), np.sort(expected))


@pytest.mark.parametrize("light_object", [True, False])
def test_looks_inverted_goes_by_the_border_not_by_the_object(light_object):
    """An object filling most of the picture decides nothing: a light coat on a dark border is
    as stored, a dark coat on a light border looks inverted."""
    gray = np.full((40, 30), 20 if light_object else 230, np.uint8)
    gray[3:37, 3:27] = 230 if light_object else 20                        # 80% of the picture
    assert fmnist.looks_inverted(gray) is (not light_object)


def test_an_object_one_pixel_wide_keeps_one_column():
    """A thin object (a strap, a belt seen edge-on) is scaled to 28 rows and stays one pixel
    wide, rather than to zero width, which Pillow refuses and predict would call 'no object
    found'."""
    gray = np.zeros((120, 60), np.uint8)
    gray[10:110, 30] = 255
    out = fmnist.to_fashion_mnist(gray)
    assert out.shape == (28, 28) and out.any(axis=1).all()
    assert np.flatnonzero(out.any(axis=0)).tolist() == [14]


@given(probs=st.lists(st.sampled_from([0.05, 0.1, 0.2]), min_size=10, max_size=10),
       k=st.integers(1, 10))
@example(probs=[0.2, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.2], k=3)
def test_top_k_lists_equally_probable_classes_in_class_order(probs, k):
    """Most probable first, and classes of equal probability in class order, so the same
    probabilities give the same answer on every CPU (NumPy's default sort is not stable: on
    AVX-512 it lists [0.2, 0.1, 0.1, ..., 0.2] as classes 0, 9, 2)."""
    p = np.array(probs)
    expected = sorted(range(10), key=lambda i: (-p[i], i))[:k]
    assert [t["label"] for t in fmnist.top_k(p, k)] == expected


# ================================================================================================
# Gradient check
# ================================================================================================

def test_gradcheck_passes_and_reports_every_parameter():
    """The learner's gradient check: a row per parameter and a PASS verdict, in a few seconds."""
    proc = run_cli("gradcheck", "--hidden", "8,6", "--batch", 4, "--seed", 1, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert {line.split()[0] for line in lines[4:-1]} == {"W1", "b1", "W2", "b2", "W3", "b3"}
    assert lines[-1].startswith("PASS")


def test_gradcheck_passes_where_plain_central_differences_would_not():
    """On this batch-norm network the loss curves so sharply that the plain central difference at
    GRADCHECK_H is off by more than the tolerance (truncation, not a wrong backward: it grows as
    h^2). The command's Richardson extrapolation removes that error, so a right backward passes."""
    case = fmnist.gradcheck_case(hidden=(3, 3, 3), batch=3, seed=9, batch_norm=True)
    errors = {}
    for h in (fmnist.GRADCHECK_H, 2 * fmnist.GRADCHECK_H):
        plain = partial(fmnist.numerical_gradient, h=h)
        errors[h] = max(err for _, err in fmnist.gradient_check(case, plain).values())
    assert errors[fmnist.GRADCHECK_H] > fmnist.GRADCHECK_TOL
    assert 3 < errors[2 * fmnist.GRADCHECK_H] / errors[fmnist.GRADCHECK_H] < 5     # ~h^2: truncation
    assert max(err for _, err in fmnist.gradient_check(case).values()) < fmnist.GRADCHECK_TOL / 5


def test_gradcheck_catches_a_wrong_gradient(monkeypatch):
    """A check that cannot fail proves nothing: a backward that is 0.1% off must fail it."""
    case = fmnist.gradcheck_case(hidden=(3,), batch=2, seed=0)
    assert max(err for _, err in fmnist.gradient_check(case).values()) < fmnist.GRADCHECK_TOL
    right = fmnist.backward
    monkeypatch.setattr(fmnist, "backward", lambda *a, **k: right(*a, **k).like(right(*a, **k).flat * 1.001))
    assert min(err for _, err in fmnist.gradient_check(case).values()) > fmnist.GRADCHECK_TOL


# ================================================================================================
# Download
# ================================================================================================

class QuietHandler(http.server.SimpleHTTPRequestHandler):
    requests: list

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.requests.append(self.path)
        super().do_GET()


@pytest.fixture
def serve():
    """serve(folder) -> (base URL on 127.0.0.1, list of requested paths); stopped after the test."""
    servers = []

    def start(folder: Path):
        handler = type("Handler", (QuietHandler,), {"requests": []})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(folder)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/", handler.requests

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def assert_same_data(a, b):
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_download_through_the_standard_library_gives_the_shipped_data(serve, tmp_path, raw):
    """The stdlib path fetches the four .gz files, and the loader reads exactly the shipped arrays.
    A second run finds them valid and fetches nothing."""
    url, requests = serve(DATA)
    target = tmp_path / "fresh"
    proc = run_cli("download", "--data-dir", target, "--mirror", url, "--no-torchvision", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in target.iterdir()) == sorted(f"{n}.gz" for n in DATA_FILES)
    assert_same_data(load_fashion_mnist(target), raw)
    assert len(requests) == 4
    again = run_cli("download", "--data-dir", target, "--mirror", url, "--no-torchvision")
    assert again.returncode == 0 and "present and valid" in again.stdout and len(requests) == 4


@pytest.mark.parametrize("argv0, command", [
    ("/venv/bin/fmnist", "fmnist"),                      # the command pip install makes
    ("fmnist.py", "python fmnist.py"),                   # the README's way, from the clone
    ("/a b/fmnist.py", "python '/a b/fmnist.py'"),       # the file run from elsewhere
    ("/venv/bin/pytest", "python fmnist.py"),            # imported: the README's way
    ("", "python fmnist.py"),
])
def test_suggested_commands_name_the_program_as_it_was_run(monkeypatch, argv0, command):
    monkeypatch.setattr(sys, "argv", [argv0, "train"])
    assert fmnist._invocation() == command


def test_suggested_commands_after_python_m_fmnist_say_so(monkeypatch):
    """`python -m fmnist` puts the module's full path in argv[0]; its __main__ names the module."""
    monkeypatch.setitem(sys.modules, "__main__", types.SimpleNamespace(__spec__=types.SimpleNamespace(name="fmnist")))
    monkeypatch.setattr(sys, "argv", [str(FMNIST), "train"])
    assert fmnist._invocation() == "python -m fmnist"


def test_download_run_from_another_folder_suggests_a_command_that_works_there(tmp_path):
    """Run by its path from elsewhere, `download` (files present: no network) suggests training
    with that path, not with a `python fmnist.py` that does not exist in the user's folder."""
    proc = subprocess.run([sys.executable, str(FMNIST), "download", "--data-dir", DATA,
                           "--no-torchvision"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"ready (python {fmnist._shell(FMNIST)} train --data-dir" in proc.stdout, proc.stdout
    assert not any(tmp_path.iterdir())                   # and it wrote nothing where it ran


def test_download_of_a_truncated_file_leaves_nothing_the_loader_accepts(serve, tmp_path):
    """An interrupted transfer (here: a file cut short on the server) is an error naming the URL;
    the files before it are complete and verified, the cut one is not written at all, and no
    temporary file is left behind."""
    served = tmp_path / "served"
    shutil.copytree(DATA, served)
    cut = served / "t10k-images-idx3-ubyte.gz"
    cut.write_bytes(cut.read_bytes()[:100_000])
    url, _ = serve(served)
    target = tmp_path / "target"
    line = one_line_error(run_cli("download", "--data-dir", target, "--mirror", url,
                                  "--no-torchvision", timeout=120), stdout=None)
    assert "t10k-images-idx3-ubyte.gz" in line and "nothing was written" in line
    assert sorted(p.name for p in target.iterdir()) == ["train-images-idx3-ubyte.gz",
                                                        "train-labels-idx1-ubyte.gz"]
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte"):
        load_fashion_mnist(target)


def test_download_from_a_mirror_with_nothing_leaves_no_empty_folder(serve, tmp_path):
    """A mirror that has none of the files (here an empty folder served on 127.0.0.1) is one
    error naming the URL, and the --data-dir the download created is gone again: no empty
    folder that looks like a data directory."""
    empty = tmp_path / "served"
    empty.mkdir()
    url, _ = serve(empty)
    target = tmp_path / "new" / "data"
    line = one_line_error(run_cli("download", "--data-dir", target, "--mirror", url,
                                  "--no-torchvision", timeout=120), stdout=None)
    assert url in line, line
    assert not (tmp_path / "new").exists()               # nor the folders made on the way


def test_download_refuses_to_write_over_a_directory_of_the_files_name(serve, tmp_path):
    url, requests = serve(DATA)
    target = tmp_path / "data"
    (target / "train-images-idx3-ubyte.gz").mkdir(parents=True)
    line = one_line_error(run_cli("download", "--data-dir", target, "--mirror", url,
                                  "--no-torchvision", timeout=120), stdout=None)
    assert f"{target / 'train-images-idx3-ubyte.gz'}: a directory stands where" in line, line
    assert requests == [] and "Errno" not in line


def test_download_replaces_a_damaged_file_in_place(serve, tmp_path, raw):
    """A damaged uncompressed file would shadow a new .gz beside it, so it is replaced where it
    is, with the verified decompressed bytes."""
    target = tmp_path / "target"
    target.mkdir()
    for name in DATA_FILES:
        shutil.copy(DATA / f"{name}.gz", target)
    damaged = target / "train-labels-idx1-ubyte"
    damaged.write_bytes(gzip.decompress((DATA / "train-labels-idx1-ubyte.gz").read_bytes())[:-1])
    (target / "train-labels-idx1-ubyte.gz").unlink()
    url, requests = serve(DATA)
    fmnist.download_fashion_mnist(target, url, use_torchvision=False, log=lambda _: None)
    assert requests == ["/train-labels-idx1-ubyte.gz"]
    assert_same_data(load_fashion_mnist(target), raw)


def test_download_with_torchvision_puts_verified_files_in_its_layout(monkeypatch, tmp_path, raw):
    """The torchvision path, with a stand-in for torchvision.datasets.FashionMNIST that unpacks
    the shipped files the way torchvision does (root/FashionMNIST/raw/, .gz and unpacked): the
    files land in that layout and load; a stand-in that delivers a bad file leaves nothing."""
    import types

    def fake_dataset(corrupt):
        def FashionMNIST(root, train=True, download=False):
            folder = Path(root) / "FashionMNIST" / "raw"
            folder.mkdir(parents=True, exist_ok=True)
            for name in DATA_FILES:
                if name.startswith("train" if train else "t10k"):
                    shutil.copy(DATA / f"{name}.gz", folder)
                    payload = gzip.decompress((DATA / f"{name}.gz").read_bytes())
                    (folder / name).write_bytes(payload[:-1] if corrupt else payload)
        return FashionMNIST

    for corrupt in (True, False):
        datasets = types.SimpleNamespace(FashionMNIST=fake_dataset(corrupt))
        monkeypatch.setitem(sys.modules, "torchvision", types.SimpleNamespace(datasets=datasets))
        monkeypatch.setitem(sys.modules, "torchvision.datasets", datasets)
        target = tmp_path / ("bad" if corrupt else "good")
        if corrupt:
            with pytest.raises(DataError):
                fmnist.download_fashion_mnist(target, use_torchvision=True, log=lambda _: None)
            assert not target.exists()                      # not even the folder it made
        else:
            fmnist.download_fashion_mnist(target, use_torchvision=True, log=lambda _: None)
            assert sorted(p.name for p in (target / "FashionMNIST" / "raw").iterdir()) == sorted(DATA_FILES)
            assert [p.name for p in target.iterdir()] == ["FashionMNIST"]
            assert_same_data(load_fashion_mnist(target), raw)


def test_torchvision_and_the_loader_read_the_same_arrays(tmp_path, raw):
    """Where torchvision is installed: its FashionMNIST on torchvision's own folder layout gives
    the very images and labels that fmnist's loader reads from that folder."""
    datasets = pytest.importorskip("torchvision.datasets")
    folder = tmp_path / "FashionMNIST" / "raw"
    folder.mkdir(parents=True)
    for name in DATA_FILES:
        (folder / name).write_bytes(gzip.decompress((DATA / f"{name}.gz").read_bytes()))
    ours = load_fashion_mnist(tmp_path)
    assert_same_data(ours, raw)
    for train, images, labels in ((True, ours.train_images, ours.train_labels),
                                  (False, ours.test_images, ours.test_labels)):
        theirs = datasets.FashionMNIST(root=str(tmp_path), train=train, download=False)
        np.testing.assert_array_equal(theirs.data.numpy(), images)
        np.testing.assert_array_equal(theirs.targets.numpy(), labels)


def test_real_torchvision_download_from_a_local_mirror(monkeypatch, serve, tmp_path, raw):
    """Where torchvision is installed: `download` really calls FashionMNIST(download=True), here
    pointed at the shipped files served on 127.0.0.1 (no internet), and the result loads."""
    datasets = pytest.importorskip("torchvision.datasets")
    url, requests = serve(DATA)
    monkeypatch.setattr(datasets.FashionMNIST, "mirrors", [url])
    # torchvision checks the MD5 of each .gz; Debian recompressed the shipped ones (same payload,
    # whose SHA-256 fmnist checks), so tell torchvision the MD5s of the files served here.
    monkeypatch.setattr(datasets.FashionMNIST, "resources", [
        (f"{name}.gz", hashlib.md5((DATA / f"{name}.gz").read_bytes()).hexdigest())
        for name in DATA_FILES])
    fmnist.download_fashion_mnist(tmp_path / "tv", use_torchvision=True, log=lambda _: None)
    assert set(requests) == {f"/{name}.gz" for name in DATA_FILES}   # it probes each URL first
    assert_same_data(load_fashion_mnist(tmp_path / "tv"), raw)


def test_download_replaces_a_well_formed_file_with_a_wrong_checksum(serve, tmp_path):
    """A file that parses but is not the published one (one label changed) is not valid: it is
    replaced in place by the published, decompressed bytes."""
    target = tmp_path / "target"
    target.mkdir()
    for name in DATA_FILES:
        shutil.copy(DATA / f"{name}.gz", target)
    name = "t10k-labels-idx1-ubyte"
    (target / f"{name}.gz").unlink()
    (target / name).write_bytes(one_byte_changed(name))
    url, requests = serve(DATA)
    fmnist.download_fashion_mnist(target, url, use_torchvision=False, log=lambda _: None)
    assert requests == [f"/{name}.gz"]
    assert (target / name).read_bytes() == shipped(name)


def test_download_of_a_file_with_a_wrong_checksum_writes_nothing(serve, tmp_path):
    """A served file of the right size whose bytes differ (one label changed) fails its SHA-256
    check before it is written: an error naming it, and no such file in the data folder."""
    served = tmp_path / "served"
    shutil.copytree(DATA, served)
    name = "t10k-labels-idx1-ubyte"
    (served / f"{name}.gz").write_bytes(gzip.compress(one_byte_changed(name)))
    url, _ = serve(served)
    target = tmp_path / "target"
    with pytest.raises(DataError, match="checksum mismatch"):
        fmnist.download_fashion_mnist(target, url, use_torchvision=False, log=lambda _: None)
    assert not any(p.name.startswith(name) for p in target.iterdir())


# ================================================================================================
# Help
# ================================================================================================

@pytest.mark.parametrize("command, flags", [
    ("report", ["RUN_DIR", "--data-dir"]),
    ("predict", ["CHECKPOINT", "IMAGE", "--invert", "--test-index", "--json"]),
    ("gradcheck", ["--hidden", "--batch", "--seed"]),
    ("download", ["--data-dir", "--mirror", "--no-torchvision"]),
])
def test_help_lists_each_new_commands_flags(command, flags):
    proc = run_cli(command, "--help")
    assert proc.returncode == 0 and proc.stdout.startswith("usage: fmnist"), proc.stderr
    assert all(f in proc.stdout for f in flags), proc.stdout


def parse_recipe_values(text: str) -> dict[str, str]:
    """recipe_values's text back into {recipe: value}."""
    if text.startswith("every recipe: "):
        return dict.fromkeys(fmnist.RECIPES, text.removeprefix("every recipe: "))
    values = {}
    for group in text.split("; "):
        recipes, value = group.split(": ", 1)
        for recipe in recipes.split(", "):
            assert recipe not in values, f"{recipe} named twice in {text!r}"
            values[recipe] = value
    return values


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(Config)])
def test_help_names_every_recipes_value_of_each_hyperparameter_once(field):
    """Recipes that agree are named together ('every recipe: 0.001' when all do), so the help
    stays short, yet every recipe's value can still be read off it."""
    expected = {recipe: fmnist._flag_value(getattr(c, field)) for recipe, c in fmnist.RECIPES.items()}
    assert parse_recipe_values(fmnist.recipe_values(field)) == expected


def test_train_help_shows_each_value_once_for_recipes_that_agree():
    proc = run_cli("train", "--help")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())                  # whatever the terminal's width
    assert "Adam learning rate (every recipe: 0.001)" in text
    assert "(report, best-bn: 0.3; best-single, best-shift: 0.0)" in text


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(Config) if f.type == "bool"])
def test_help_says_on_for_a_recipe_with_a_switch_on(field):
    """--help's 'on' and 'off' for a switch are each recipe's own setting (the round-trip test
    above compares the help with _flag_value, so it cannot tell on from off)."""
    expected = {recipe: "on" if getattr(c, field) else "off" for recipe, c in fmnist.RECIPES.items()}
    assert parse_recipe_values(fmnist.recipe_values(field)) == expected


@pytest.mark.parametrize("columns", [40, 52, 80, 100, 120])
@pytest.mark.parametrize("command", ["", "train", "evaluate", "report", "predict", "gradcheck",
                                     "download"])
def test_help_never_splits_a_hyphenated_name_across_lines(command, columns, monkeypatch, capsys):
    """best-single, --no-flip-average, Fashion-MNIST's or the mirror's URL stay whole at any
    terminal width (argparse wraps to $COLUMNS): description and options wrap at spaces only."""
    monkeypatch.setenv("COLUMNS", str(columns))
    code = exit_code_of_main([*command.split(), "--help"])
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("usage: fmnist")
    assert not re.search(r"[\w-]-\n", out), out


@pytest.mark.parametrize("command", ["train", "evaluate", "report", "predict", "gradcheck", "download"])
def test_help_shows_no_default_for_a_switch_or_an_absent_value(command, capsys):
    """'(default: False)' after --force or --invert, or '(default: None)' after --out, says
    nothing a user can use; _HelpFormatter leaves them out."""
    assert exit_code_of_main([command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for absent in ("(default: False)", "(default: None)", "(default: [])"):
        assert absent not in text, (absent, text)


def test_predict_without_arguments_asks_for_the_checkpoint_only(capsys):
    """Image files are optional (--test-index is the other way to name an image), so the usage
    error names only what is missing: the checkpoint."""
    code = exit_code_of_main(["predict"])
    err = capsys.readouterr().err
    assert code == 2 and "required: CHECKPOINT" in err and "IMAGE" not in err.splitlines()[-1]


# ================================================================================================
# Benchmarks (benchmarks/*.py)
# ================================================================================================

@functools.cache
def load_benchmark(name: str):
    """benchmarks/<name>.py as a module (the folder is not a package), loaded once: the
    benchmarks keep no state between calls."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, HERE / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ================================================================================================
# The benchmark's summary of several runs (benchmarks/bench_train.py --runs N)
# ================================================================================================

def _bench_report(bench, floor, adam, project, torch, evaluate_ms, no_adam=None) -> dict:
    """A report as one benchmark run writes it, with only what the summary reads (the epoch with
    Adam skipped, and what Adam adds inside the loop, only if `no_adam` is given)."""
    c = {"floor": {"name": "GEMM floor", "seconds_per_epoch": floor},
         "adam": {"name": "Adam", "seconds_per_epoch": adam},
         "project": {"name": "fmnist", "seconds_per_epoch": project,
                     "evaluate_test_ms": {"median": evaluate_ms}},
         "torch": ({"name": "PyTorch", "seconds_per_epoch": torch} if torch is not None
                   else bench.skipped("PyTorch", "--skip-torch")),
         "torch_ftz": None,
         "sklearn": bench.skipped("scikit-learn", "--skip-sklearn")}
    if no_adam is not None:
        c["no_adam"] = {"name": "fmnist with Adam skipped", "seconds_per_epoch": no_adam}
        c["adam_in_loop"] = {"name": "Adam inside the loop", "seconds_per_epoch": project - no_adam}
    return {"contenders": c, "ratios": bench.compute_ratios(c),
            "machine": {"other_programs_cpu_seconds": 0.0}}


def test_the_benchmarks_summary_takes_the_median_of_each_runs_own_ratio():
    """Three runs, the second on a machine slow throughout: the ratio's median is over each
    run's own ratio (2.0, 2.0, 3.0 -> 2.0), not the ratio of the medians (1.8 / 0.8 = 2.25),
    and the goal is judged by it."""
    bench = load_benchmark("bench_train")
    reports = [_bench_report(bench, 0.8, 0.4, 1.6, 2.0, 60.0),
               _bench_report(bench, 1.6, 0.8, 3.2, 4.0, 90.0),
               _bench_report(bench, 0.6, 0.4, 1.8, 1.5, 40.0)]
    summary = bench.summarise_runs(reports)
    ratio = summary["ratios"]["project / GEMM floor"]
    assert ratio["runs"] == pytest.approx([2.0, 2.0, 3.0]) and ratio["median"] == pytest.approx(2.0)
    assert summary["ratios"]["project / PyTorch"]["median"] == pytest.approx(0.8)
    assert summary["seconds_per_epoch"]["project"]["median"] == pytest.approx(1.8)
    assert summary["evaluate_test_ms"]["median"] == pytest.approx(60.0)
    table = bench.format_summary(summary)
    assert "project / GEMM floor                            2.00    2.00    3.00    2.00   <= 1.9: NOT met" in table
    assert "project / PyTorch                               0.80    0.80    1.20    0.80   <= 0.5: NOT met" in table
    assert "< 50: NOT met" in table


def test_the_benchmarks_summary_leaves_out_what_no_run_measured_and_meets_a_goal_by_the_median():
    """Without PyTorch in any run its ratios are left out (not printed as n/a); a goal is met
    when the median of the runs' ratios meets it, whatever a single run says."""
    bench = load_benchmark("bench_train")
    reports = [_bench_report(bench, 1.0, 0.4, 1.8, None, 45.0),
               _bench_report(bench, 1.0, 0.4, 2.2, None, 55.0),
               _bench_report(bench, 1.0, 0.4, 1.7, None, 48.0)]
    summary = bench.summarise_runs(reports)
    assert summary["ratios"]["project / PyTorch"]["median"] is None
    table = bench.format_summary(summary)
    assert "PyTorch" not in table
    assert "project / GEMM floor                            1.80    2.20    1.70    1.80   <= 1.9: met" in table
    assert "< 50: met" in table


def test_each_of_several_benchmark_runs_gets_the_same_settings_its_own_out_and_no_runs():
    """A run of several must not start runs of its own (it would, given --runs again), and must
    measure what the user asked for: the same epochs, data and skips."""
    bench = load_benchmark("bench_train")
    args = bench.parse_args(["--runs", "3", "--epochs", "5", "--skip-torch", "--data-dir", "d d"])
    assert bench.one_run_argv(args, Path("x.json"))[2:] == \
        ["--epochs", "5", "--data-dir", "d d", "--out", "x.json", "--skip-torch"]


@pytest.mark.parametrize("abbreviated", [["--run", "3"], ["--ru=3"]])
def test_the_benchmark_refuses_abbreviated_options(abbreviated, capsys):
    """`--run 3` for `--runs 3` is refused rather than guessed."""
    with pytest.raises(SystemExit):
        load_benchmark("bench_train").parse_args(abbreviated)
    assert "unrecognized arguments" in capsys.readouterr().err


def test_the_benchmarks_summary_names_a_contender_skipped_in_some_runs_only():
    """PyTorch skipped in the first run only: its row is named and shows n/a for that run,
    with no median (one run short)."""
    bench = load_benchmark("bench_train")
    first = _bench_report(bench, 0.8, 0.4, 1.6, None, 60.0)
    first["contenders"]["torch"]["name"] = None
    reports = [first, _bench_report(bench, 0.8, 0.4, 1.6, 2.0, 60.0)]
    summary = bench.summarise_runs(reports)
    assert summary["seconds_per_epoch"]["torch"]["name"] == "PyTorch"
    assert summary["seconds_per_epoch"]["torch"]["median"] is None
    assert "PyTorch                                          n/a   2.000     n/a" in \
        bench.format_summary(summary)


def test_with_adam_skipped_an_epoch_runs_as_usual_and_leaves_the_parameters_where_they_were():
    """The benchmark's "fmnist with Adam skipped" times a real `train_epoch` whose optimizer does
    nothing: every step runs (the progress callback hears each), the first step's loss is the
    usual epoch's (the same batch and masks through the same network), the parameters and
    moments stay where they were, and the real `adam_update` is back afterwards."""
    bench = load_benchmark("bench_train")
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((300, 784), dtype=np.float32), rng.integers(0, 10, 300)
    params, config = init_params((784, 16, 10), seed=1), Config(hidden=(16,), batch_size=128)
    state, real_update = adam_init(params), fmnist.adam_update
    heard, heard_trained = [], []
    with bench.adam_skipped():
        assert fmnist.adam_update is not real_update
        same, same_state, _ = train_epoch(params, state, x, y, config, epoch=1,
                                          on_step=lambda *a: heard.append(a))
    assert fmnist.adam_update is real_update
    assert np.array_equal(same.flat, params.flat) and same_state.step == 3
    assert not same_state.m.flat.any() and not same_state.v.flat.any()
    trained, *_ = train_epoch(params, state, x, y, config, epoch=1,
                              on_step=lambda *a: heard_trained.append(a))
    assert [a[0] for a in heard] == [a[0] for a in heard_trained] == [1, 2, 3]
    assert heard[0] == heard_trained[0] and heard[2] != heard_trained[2]
    assert not np.array_equal(trained.flat, params.flat)


def test_the_benchmark_times_floor_adam_fmnist_and_fmnist_without_adam_in_turns(monkeypatch,
                                                                                capsys):
    """On a small made-up split (3 steps an epoch), two rounds: every contender is timed in each
    round; Adam runs for Adam alone and for the real epoch (2 rounds x 3 steps each) but not in
    the epoch with Adam skipped, and is restored after it; and "Adam inside the loop" is the
    real epoch less the one without Adam, round by round."""
    bench = load_benchmark("bench_train")
    calls, real_update = [], fmnist.adam_update
    def counted(*args, **kwargs):
        calls.append(inspect.signature(real_update).bind(*args, **kwargs).arguments["t"])
        return real_update(*args, **kwargs)
    monkeypatch.setattr(fmnist, "adam_update", counted)
    rng = np.random.default_rng(0)
    def part(n):
        return rng.standard_normal((n, 784), dtype=np.float32), rng.integers(0, 10, n)
    splits = fmnist.Splits(*part(300), *part(100), *part(100))
    c = bench.bench_numpy_contenders(splits, Config(), epochs=2)
    assert fmnist.adam_update is counted
    assert calls == [1, 2, 3, 1, 2, 3] + [1, 2, 3, 4, 5, 6]   # alone, real; alone, real
    for key in ("floor", "adam", "no_adam", "adam_in_loop"):
        assert len(c[key]["rounds"]) == 2 and c[key]["seconds_per_epoch"] == c[key]["rounds"][1]
    epochs = [e["seconds"] for e in c["project"]["epochs"]]
    assert c["adam_in_loop"]["rounds"] == pytest.approx(
        [e - t for e, t in zip(epochs, c["no_adam"]["rounds"])])
    assert "fmnist with Adam skipped epoch 2" in capsys.readouterr().out


def test_the_benchmarks_summary_shows_fmnist_without_adam_and_its_ratios():
    """The epoch with Adam skipped and what Adam adds inside the loop get rows of their own in
    the summary of several runs, and their ratios to PyTorch and the floor."""
    bench = load_benchmark("bench_train")
    reports = [_bench_report(bench, floor, 0.4, project, 2.4, 60.0, no_adam=no_adam)
               for floor, project, no_adam in ((0.8, 1.8, 1.2), (1.0, 2.4, 1.5))]
    table = bench.format_summary(bench.summarise_runs(reports))
    assert "fmnist with Adam skipped                       1.200   1.500   1.350" in table
    assert "Adam inside the loop                           0.600   0.900   0.750" in table
    assert "project with Adam skipped / GEMM floor          1.50    1.50    1.50" in table
    assert "project with Adam skipped / PyTorch             0.50    0.62    0.56" in table


def test_the_benchmark_times_the_floor_adam_and_fmnist_from_round_two_on():
    """Round 1 is warm-up for all three, as epoch 1 is for fmnist: it counts in `rounds` but not
    in the median."""
    summary = load_benchmark("bench_train").rounds_summary([9.0, 1.0, 2.0, 3.0])
    assert summary == {"seconds_per_epoch": 2.0, "rounds": [9.0, 1.0, 2.0, 3.0]}


# ================================================================================================
# The speed of each matrix product (benchmarks/gemm_products.py)
# ================================================================================================

def test_the_products_timed_are_the_floors_eleven_on_the_arrays_their_names_say():
    """One step of the recipe: four forward products, four weight gradients, and the input
    gradients of layers 2-4 (none for the images). Each multiplies the very arrays its name
    says, a transposed one as a view of it (the layout training uses, not a copy), into an
    output of the product's shape."""
    products, named = load_benchmark("gemm_products").step_products(128, Config().layer_sizes)
    assert sorted(p["name"] for p in products) == sorted(
        [f"Z{l} = A{l - 1} W{l}" for l in (1, 2, 3, 4)]
        + [f"dW{l} = A{l - 1}^T dZ{l}" for l in (1, 2, 3, 4)]
        + [f"dA{l - 1} = dZ{l} W{l}^T" for l in (2, 3, 4)])

    def same_array(a: np.ndarray, b: np.ndarray) -> bool:       # the same memory, read alike
        return (a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
                and a.shape == b.shape and a.strides == b.strides)

    for p in products:
        left, right = p["name"].split(" = ")[1].split(" ")
        for operand, word in ((p["left"], left), (p["right"], right)):
            expected = named[word[:-2]].T if word.endswith("^T") else named[word]
            assert same_array(operand, expected), (p["name"], word)
        assert p["out"].shape == (p["left"].shape[0], p["right"].shape[1]), p["name"]
    assert named["A0"].shape == (128, 784) and named["W1"].shape == (784, 512)


def test_the_products_table_gives_each_speed_up_and_the_epoch_they_add_up_to():
    rows = [{"name": "Z1 = A0 W1", "mkn": [2, 3, 4], "seconds": 1e-3, "gflops": 0.048,
             "one_thread_seconds": 2e-3, "one_thread_gflops": 0.024},
            {"name": "dW1 = A0^T dZ1", "mkn": [3, 2, 4], "seconds": 3e-3, "gflops": 0.016,
             "one_thread_seconds": 3e-3, "one_thread_gflops": 0.016}]
    lines = load_benchmark("gemm_products").format_table(rows, steps=391).splitlines()
    assert lines[1].split()[-5:] == ["1000.0", "0.0", "2000.0", "0.0", "2.00x"]
    assert lines[2].split()[-1] == "1.00x"
    assert lines[3].split()[-3:] == ["4000.0", "5000.0", "1.25x"]     # one step: 4 ms, 5 ms
    assert lines[4].startswith("391 such steps") and lines[4].endswith(
        ": 1.564 s, one thread 1.955 s")


def test_the_products_benchmark_times_one_thread_and_the_default_and_writes_them(tmp_path,
                                                                                    capsys):
    """A short run prints one row per product, and its JSON has every product timed on the
    default threads and on one (threadpoolctl saw exactly one BLAS thread then), with GFLOP/s
    that are 2 m k n over the seconds."""
    pytest.importorskip("threadpoolctl")
    out = tmp_path / "products.json"
    assert load_benchmark("gemm_products").main(["--repeats", "2", "--batch", "16",
                                                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["batch"] == 16 and report["blas_threads"]["one"] == [1]
    assert len(report["products"]) == 11
    for row in report["products"]:
        m, k, n = row["mkn"]
        assert row["name"] in printed and 16 in (m, k)
        for prefix in ("", "one_thread_"):
            assert math.isclose(row[prefix + "gflops"], 2 * m * k * n / row[prefix + "seconds"] / 1e9)


# ================================================================================================
# The profile of an epoch (benchmarks/profile_epoch.py): samples land in the right category
# ================================================================================================

def matrix_product_lines(source: str, functions: set[str]) -> tuple[set[int], set[int]]:
    """Lines of the named functions of fmnist.py that compute a matrix product (an `@`, or a
    call of np.matmul or np.dot) according to Python's own parser, and all of their lines."""
    import ast
    products, spans = set(), set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef) and node.name in functions:
            spans |= set(range(node.lineno, node.end_lineno + 1))
            for inner in ast.walk(node):
                if (isinstance(inner, ast.BinOp) and isinstance(inner.op, ast.MatMult)) or (
                        isinstance(inner, ast.Call) and isinstance(inner.func, ast.Attribute)
                        and inner.func.attr in ("matmul", "dot")):
                    products.add(inner.lineno)
    return products, spans


def test_the_profile_counts_exactly_the_matrix_products_of_an_epoch_as_matrix_products():
    """The profile tells a matrix product from elementwise work by the text of the line it was
    on. For every function an epoch runs through, the lines it calls matrix products must be the
    lines Python's parser finds one on: otherwise an edit (say, `A @ W` rewritten as np.dot on a
    line of its own) would quietly move time from one category to another."""
    profile = load_benchmark("profile_epoch")
    source = Path(fmnist.__file__).read_text()
    lines = source.splitlines()
    products, spans = matrix_product_lines(source, {"forward", "backward", "_inference",
                                                    "train_epoch", "adam_update", "_adam_slice"})
    assert len(products) >= 5          # forward's two, backward's two, _inference's two
    said = {n for n in spans if profile.MATMUL.search(lines[n - 1].split("#")[0])}
    assert said == products


def test_the_profile_sorts_a_sample_by_its_innermost_line_and_counts_only_profiled_epochs():
    """Samples in py-spy's raw format ('frame;frame;... count'), built from lines of fmnist.py
    found by their text, land in their category; a sample outside the profiled epochs (loading
    the data, the warm-up epoch) is not counted."""
    profile = load_benchmark("profile_epoch")
    lines = Path(fmnist.__file__).read_text().splitlines()

    def at(function: str, text: str) -> str:
        """The frame of `function` on its first line holding `text`."""
        start = next(i for i, line in enumerate(lines) if line.startswith(f"def {function}("))
        number = next(i for i, line in enumerate(lines[start:], start + 1) if text in line)
        return f"{function} (fmnist.py:{number})"

    epoch = f"{profile.PROFILED} (profile_epoch.py:60);" + at("train_epoch", "logits, cache = forward(")
    train = f"{profile.PROFILED} (profile_epoch.py:60);" + at("train_epoch", "adam_update(p, grads")
    gather = f"{profile.PROFILED} (profile_epoch.py:60);" + at("train_epoch", "augment(x[idx]")
    validate = (f"{profile.PROFILED} (profile_epoch.py:62);" + at("evaluate", "logits = model_logits(")
                + ";" + at("model_logits", "predict_logits(members[0]")
                + ";" + at("predict_logits", "_inference(params, x[i"))
    raw = "\n".join([
        epoch + ";" + at("forward", "Z = A @ params") + " 7",
        epoch + ";" + at("forward", "gate = Z > 0") + " 3",
        train + ";" + at("adam_update", "_adam_slice(p[s]") + ";" + at("_adam_slice", "np.sqrt(v_out") + " 5",
        gather + " 2",
        validate + ";" + at("_inference", "Z = A @ params") + " 4",
        validate + ";" + at("_inference", "np.maximum(Z, 0.0") + " 1",
        "child (profile_epoch.py:70);" + at("train_epoch", "adam_update(p, grads") + " 100",
        at("load_fashion_mnist", "raw = RawData(") + " 50",
    ])
    counts = profile.tally(raw, lines)
    assert counts == {"matrix products, training": 7, "forward: bias, ReLU, dropout": 3,
                      "Adam updates": 5, "batch gathers x[idx], y[idx]": 2,
                      "matrix products, validation": 4, "validation: bias, ReLU, loss": 1}
