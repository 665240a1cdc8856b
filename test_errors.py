"""Bad input gets a clear error, and nothing is lost (issue 5): one test per case the issue lists
that test_fmnist.py does not already cover.

Every failing command must end in one line on stderr that names the file or value and the problem,
with a non-zero exit code (2 for a bad argument, as argparse does), never a traceback; and no
checkpoint may be lost or left half-written. Tests marked xfail(strict=True) state behaviour the
issue asks for that fmnist.py does not have yet; each reason says what happens today.

The command line is run as a user runs it, in a subprocess (`python fmnist.py ...`), except for the
many argument checks, which call `fmnist.main(argv)` in-process (the same code, minus the start-up
of a new interpreter). Most cases fail before training; the few that must train (divergence,
SIGKILL, --force) use 256-2,000 images and stop within a few epochs.
"""

import gzip
import json
import math
import os
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import fmnist
from fmnist import (DATA_FILES, MAX_IDX_BYTES, CheckpointError, Config, DataError, RawData,
                    adam_init, adam_step, backward, dropout_masks, evaluate, forward, init_params,
                    load_checkpoint, load_fashion_mnist, make_splits, read_idx, save_checkpoint,
                    train_epoch)

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
FMNIST = HERE / "fmnist.py"


# ================================================================================================
# Helpers
# ================================================================================================

def run_cli(*args, timeout=120, **kwargs) -> subprocess.CompletedProcess:
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


def idx_bytes(magic, dims, payload=b"") -> bytes:
    return struct.pack(f">I{len(dims)}I", magic, *dims) + bytes(payload)


def shipped(name: str) -> bytes:
    """The decompressed bytes of a shipped data file."""
    return gzip.decompress((DATA / f"{name}.gz").read_bytes())


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


@pytest.fixture(scope="module")
def raw() -> RawData:
    return load_fashion_mnist(DATA)


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
    proc = run_cli("train", "--data-dir", d, "--limit", 100, "--epochs", 1, "--out", tmp_path / "out")
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
        with pytest.raises(SystemExit) as exit_:
            fmnist.main([command, "--help"])
        assert exit_.value.code == 0, f"`{command}` is not a command: {capsys.readouterr().err}"


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
    "a training state, not a checkpoint": ("state.npz", _training_state, r"format|state|checkpoint"),
    "NaN in W1": ("best.npz", _with("W1", lambda a: np.where(np.arange(a.size).reshape(a.shape) == 7,
                                                             np.nan, a).astype(a.dtype)), r"NaN"),
    "inf in b2": ("best.npz", _with("b2", lambda a: np.full_like(a, np.inf)), r"infinite|inf\b"),
    "float64 arrays, config float32": ("best.npz", lambda p: write_npz(p, _params(dtype="float64")),
                                       r"float64"),
    "integer arrays": ("best.npz", _with("W2", lambda a: a.astype(np.int32)), r"int32|dtype"),
    "arrays 784-16-10, config 784-8-10": ("best.npz", lambda p: write_npz(p, _params((784, 16, 10))),
                                          r"\(784, 16\).*\(784, 8\)|\(784, 8\).*\(784, 16\)"),
}


@pytest.mark.parametrize("case", BAD_CHECKPOINTS)
def test_cli_evaluate_bad_checkpoint_is_one_line_and_leaves_the_file_alone(tmp_path, case):
    """Loading must validate before use: a damaged, foreign or mismatched checkpoint gets one
    sentence naming the file and the problem (never a traceback, never numbers from a broken
    network), and evaluating must not change the file."""
    name, build, problem = BAD_CHECKPOINTS[case]
    path = build(tmp_path / name)
    before = path.read_bytes() if path.is_file() else None
    proc = run_cli("evaluate", path)
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
    line = assert_one_line_error(run_cli("evaluate", path), path, r"not a|npz|checkpoint")
    assert "pickle" not in line, line


def test_checkpoint_of_another_depth_names_both_architectures(tmp_path):
    """The issue: a checkpoint from another architecture gets an error naming both shapes."""
    path = write_npz(tmp_path / "best.npz", _params((784, 8, 10)), config=Config(hidden=(8, 4)))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert re.search(r"784\D+8\D+10\b", message) and re.search(r"784\D+8\D+4\D+10\b", message), message


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
        ev = run_cli("evaluate", run / "best.npz")
        assert ev.returncode == 0, ev.stderr
        assert f"epoch {meta['epoch']}" in ev.stdout


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
    proc = run_cli("train", "--force", "--limit", 100, "--epochs", 1, "--out", run)
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
    proc = run_cli("train", "--limit", 100, "--epochs", 1, "--out", run)
    assert "--force" in assert_one_line_error(proc, run, r"already")
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.iterdir()} == before


def test_cli_train_out_that_is_a_file_is_one_line(tmp_path):
    """A typo in --out must get a sentence, and the file it names must survive."""
    target = tmp_path / "notes.txt"
    target.write_text("keep me\n")
    proc = run_cli("train", "--limit", 100, "--epochs", 1, "--out", target)
    assert_one_line_error(proc, target, r"not a (folder|directory)|exists|is a file")
    assert target.read_text() == "keep me\n"


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
    return run, old, run_cli("train", "--force", *DIVERGING, "--out", run)


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
    ev = run_cli("evaluate", run / "best.npz")
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
    proc = run_cli("train", "--force", "--lr", "1e6", "--limit", 2000, "--epochs", 5, "--out", run)
    assert proc.returncode > 0 and "epoch 1," in proc.stderr, proc.stderr
    old_best_kept = (run / "best.npz").exists() and (run / "best.npz").read_bytes() == old["best.npz"]
    assert not (old_best_kept and "best.npz" in proc.stderr.splitlines()[-1]), proc.stderr
    assert not (old_best_kept and (run / "config.json").read_bytes() != old["config.json"])


def test_cli_lr_10_stops_with_a_message(tmp_path):
    """The issue's own example: `--lr 10` must stop training and suggest a smaller learning rate."""
    proc = run_cli("train", "--lr", 10, "--limit", 2000, "--epochs", 1, "--out", tmp_path / "run")
    assert proc.returncode > 0, proc.stdout[-1000:]
    assert re.search(r"epoch \d+, step \d+.*smaller learning rate", proc.stderr.splitlines()[-1])


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
    "--limit 0": (["--limit", "0"], {"limit": 0}),
    "--limit 50001 (more than the training images)": (["--limit", "50001"], {"limit": 50_001}),
}


def _train_usage_error(argv, tmp_path, capsys) -> str:
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exit_:
        fmnist.main(["train", *argv, "--out", str(out)])
    assert exit_.value.code == 2
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
    (["--limit", "1e3"], "--limit"),
], ids=["--dtype float16", "--hidden 512,,128", "--hidden wide", "--epochs 2.5",
        "--batch-size many", "--lr fast", "--limit 1e3"])
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


def test_init_params_refuses_an_unknown_dtype_with_the_config_message():
    _same_message_as_config({"dtype": "float16"}, lambda: init_params((784, 8, 10), 0, "float16"))


@pytest.mark.parametrize("sizes", [(), (784,), (784, 0, 10), (784, 8, -10)], ids=str)
def test_init_params_refuses_empty_or_non_positive_layer_sizes(sizes):
    """The network's widths, named in the message, must be positive; a zero would build an
    empty layer that silently predicts nothing."""
    with pytest.raises(ValueError, match=re.escape(str(list(sizes)))):
        init_params(sizes, 0)


def test_make_splits_refuses_a_limit_larger_than_the_training_images(raw):
    """--limit is checked against the data actually there, not only against 50,000."""
    small = RawData(raw.train_images[:12_000], raw.train_labels[:12_000], raw.test_images, raw.test_labels)
    with pytest.raises(ValueError, match=r"limit.*2,000.*2,500"):
        make_splits(small, Config(limit=2_500))


def test_make_splits_refuses_a_validation_set_as_large_as_the_data():
    """With fewer images than val_size, the split must be refused, not leave nothing to train on."""
    rng = np.random.default_rng(0)
    raw = RawData(rng.integers(0, 256, (100, 28, 28), dtype=np.uint8),
                  rng.integers(0, 10, 100).astype(np.uint8),
                  rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
                  rng.integers(0, 10, 20).astype(np.uint8))
    with pytest.raises(ValueError, match=r"val.*10,?000.*100|100.*val.*10,?000"):
        make_splits(raw, Config())


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
    proc = run_cli("predict", checkpoint, image, timeout=60, preexec_fn=_limit_memory)
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
