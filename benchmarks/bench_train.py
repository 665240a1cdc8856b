"""Benchmark: seconds per training epoch of the report's recipe, next to PyTorch, scikit-learn and
the GEMM floor, all measured in one run on this machine with the same data arrays.

    python benchmarks/bench_train.py [--epochs 4] [--out FILE.json] [--data-dir DIR]
                                     [--skip-torch] [--skip-sklearn] [--runs N]

The recipe (report sections 3-4, `fmnist.Config()`): 784-512-256-128-10, ReLU, dropout 0.3 on the
hidden layers, L2 (lambda/2) * sum ||W||^2 over the weights (gradient lambda W), Adam (lr 1e-3,
betas 0.9/0.999, eps 1e-8), batch 128 shuffled every epoch, 50,000 train / 10,000 validation,
float32. An "epoch" is what `fmnist.fit` times: one pass of training (391 steps) plus one
evaluation of the validation split.

What is measured, in this order:

1. In turns, epoch by epoch (an epoch of each, then the next round), so that all of them meet the
   machine in the same state: the GEMM floor, only the matrix products one epoch needs, into
   preallocated arrays (no implementation of this recipe on this BLAS can be faster, so "x times
   the floor" says how much time goes to everything else: elementwise work, the optimizer,
   Python, memory traffic); Adam's updates alone; this project, `fmnist.train_epoch` +
   `fmnist.evaluate`; and the same epoch with Adam's update skipped, which is what everything
   but the optimizer costs. Then `evaluate` on the test set.
2. scikit-learn's `MLPClassifier` (if installed): the closest off-the-shelf NumPy MLP.
3. PyTorch (if installed): the same network, run as a user would (default settings), then once
   more with `torch.set_flush_denormal(True)`.

The project runs before torch and scikit-learn are even imported: importing them loads other
thread pools (OpenMP, SciPy's BLAS), and `set_flush_denormal` changes a CPU flag of the main
thread, either of which could change NumPy's speed if it came first.

Timings on a small, shared machine are noisy: close other programs while it runs, and compare
ratios from one run rather than seconds from different runs. `--runs N` does the whole benchmark
N times, each in a fresh Python process (so that every run measures the project before torch is
imported), one after another, and sums them up as each run's ratio and the median of those;
each run's own JSON is kept beside the summary's (FILE.run1.json, ...).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))   # so `import fmnist` works from a plain checkout, not only installed

import fmnist  # noqa: E402

CONTENDERS = ("floor", "adam", "project", "no_adam", "adam_in_loop", "torch", "torch_ftz",
              "sklearn")      # the keys of a run's "contenders", in the order of the tables
GOALS = {   # from the project issue "Training speed": ratio -> largest value that meets the goal
    "project / PyTorch": 0.5,
    "project / GEMM floor": 1.9,
}
EVALUATE_GOAL_MS = 50.0


# ================================================================================================
# Small helpers
# ================================================================================================

def timed_median(epochs: list[dict], key: str = "seconds") -> float:
    """Median of `key` over epochs 2..N.

    Epoch 1 is a warm-up and is left out: it pays one-off costs that say nothing about training
    speed (first touches of freshly allocated memory, BLAS thread start-up, lazy imports and
    caches inside NumPy, PyTorch and scikit-learn, sklearn's weight initialisation). The median
    rather than the mean, so that one epoch disturbed by another program counts for little.
    """
    return statistics.median(e[key] for e in epochs[1:])


def batch_sizes(n: int, batch_size: int) -> list[int]:
    """Rows in each mini-batch of an epoch: 50,000 at 128 gives 390 full batches and one of 80."""
    return [min(batch_size, n - start) for start in range(0, n, batch_size)]


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b is not None else None


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def busy_cpu_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (Linux /proc/stat), or None.

    Minus this process's own CPU time, the difference over the run is what *other* programs used:
    the honest measure of how noisy the timings are (the load average lags by minutes).
    """
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)          # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")      # user..steal, no guest


def other_programs_cpu(busy_at_start: float | None, own_at_start: float) -> float | None:
    """CPU seconds used by other programs since `busy_at_start` (see busy_cpu_seconds)."""
    busy = busy_cpu_seconds()
    if busy is None or busy_at_start is None:
        return None
    return max(0.0, (busy - busy_at_start) - (time.process_time() - own_at_start))


# ================================================================================================
# Machine information, and which fmnist.py was measured
# ================================================================================================

def code_version() -> dict:
    """The SHA-256 of the fmnist.py that was timed, and the git commit it sits on (with whether
    the file differs from it): a benchmark result is only useful next to the code it measured."""
    path = Path(fmnist.__file__)
    info = {"fmnist_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    try:
        git = ["git", "-C", str(path.parent)]
        info["git_commit"] = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True,
                                            text=True, check=True).stdout.strip()
        info["fmnist_py_modified"] = subprocess.run(git + ["diff", "--quiet", "HEAD", "--",
                                                           path.name]).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        info["git_commit"] = None
    return info


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def blas_info() -> dict:
    """Which BLAS NumPy calls and with how many threads: the GEMM floor depends on nothing else.

    threadpoolctl sees the library actually loaded and its thread count; NumPy's build config only
    says what it was built against. This runs before torch or sklearn is imported, so the thread
    pools listed are NumPy's own.
    """
    info: dict = {}
    try:
        info["numpy_build"] = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    except Exception as e:  # older NumPy: no mode="dicts"
        info["numpy_build"] = f"unavailable ({type(e).__name__})"
    try:
        from threadpoolctl import threadpool_info
        info["loaded"] = [{k: p.get(k) for k in ("internal_api", "version", "num_threads",
                                                 "architecture", "threading_layer", "filepath")}
                          for p in threadpool_info()]
    except ImportError:
        info["loaded"] = "threadpoolctl not installed"
    return info


def machine_info() -> dict:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {"python": platform.python_version(), "platform": platform.platform(),
            "cpu": cpu_model(), "cpu_count": os.cpu_count(), "cpus_usable": affinity,
            "numpy": np.__version__, "blas": blas_info(), "load_average_at_start": load_average()}


# ================================================================================================
# 1. The GEMM floor
# ================================================================================================

def gemm_buffers(batch: int, sizes: tuple[int, ...], x_rows: np.ndarray,
                 rng: np.random.Generator) -> dict:
    """Preallocated float32 arrays for one batch size: layer inputs A, outputs Z (reused as dZ),
    weight gradients dW and input gradients dA. Filled with ordinary (normal, not subnormal)
    numbers, so the floor is what the CPU does at full speed."""
    dt = np.float32
    A = [np.ascontiguousarray(x_rows[:batch], dtype=dt)]                       # real images
    A += [np.abs(rng.standard_normal((batch, n), dtype=dt)) for n in sizes[1:-1]]
    Z = [rng.standard_normal((batch, n), dtype=dt) for n in sizes[1:]]
    dW = [np.empty((n_in, n_out), dt) for n_in, n_out in zip(sizes[:-1], sizes[1:])]
    dA = [None] + [np.empty((batch, n), dt) for n in sizes[1:-1]]             # none for layer 1
    return {"A": A, "Z": Z, "dW": dW, "dA": dA}


def forward_gemms(buf: dict, W: list[np.ndarray]) -> None:
    for l, w in enumerate(W):
        np.matmul(buf["A"][l], w, out=buf["Z"][l])                             # Z_l = A_{l-1} W_l


def backward_gemms(buf: dict, W: list[np.ndarray]) -> None:
    for l, w in enumerate(W):
        np.matmul(buf["A"][l].T, buf["Z"][l], out=buf["dW"][l])                # dW_l = A^T dZ_l
        if l > 0:                                                              # no dX for layer 1
            np.matmul(buf["Z"][l], w.T, out=buf["dA"][l])                      # dA = dZ_l W_l^T


def gemm_floor_epoch(splits, config):
    """A function that times one epoch's matrix products: per training batch the forward
    products, the weight gradients and the input gradients (all layers but the first: nothing
    needs dL/dX), then the validation forward pass in chunks of `fmnist.EVAL_CHUNK` rows, as
    `fmnist.evaluate` runs it; and a description of the work.

    The products read transposed views (`A.T`, `W.T`) exactly like `fmnist.backward`, and write
    with `out=` into preallocated arrays, so allocation is not counted.
    """
    rng = np.random.default_rng(0)
    sizes = config.layer_sizes
    params = fmnist.init_params(sizes, config.seed, "float32")
    W = [np.asarray(params[f"W{l}"]) for l in range(1, len(sizes))]
    steps = batch_sizes(len(splits.y_train), config.batch_size)
    bufs = {b: gemm_buffers(b, sizes, splits.x_train, rng) for b in set(steps)}
    chunks = batch_sizes(len(splits.y_val), fmnist.EVAL_CHUNK)
    val = {b: gemm_buffers(b, sizes, splits.x_val, rng) for b in set(chunks)}

    def one_epoch() -> float:
        started = time.perf_counter()
        for b in steps:
            forward_gemms(bufs[b], W)
            backward_gemms(bufs[b], W)
        for b in chunks:
            forward_gemms(val[b], W)
        return time.perf_counter() - started

    return one_epoch, {"name": "GEMM floor (matrix products only)", "train_steps": len(steps),
                       "validation_rows": len(splits.y_val)}


def adam_epoch(splits, config):
    """A function that times one epoch's Adam updates alone: `fmnist.adam_update` on the recipe's
    flat parameter vector, once per training step, in place as `train_epoch` runs it, on ordinary
    numbers; and a description. Added to the GEMM floor it is the least an epoch can take with
    this project's Adam kernel: both are work no step can skip, and NumPy runs Adam's elementwise
    passes on one core."""
    rng = np.random.default_rng(1)
    params = fmnist.init_params(config.layer_sizes, config.seed, "float32")
    p = params.flat.copy()
    g = rng.standard_normal(p.size, dtype=np.float32) * np.float32(1e-3)
    m, v = g * np.float32(0.1), g * g
    steps = len(batch_sizes(len(splits.y_train), config.batch_size))

    def one_epoch() -> float:
        started = time.perf_counter()
        for t in range(1, steps + 1):
            fmnist.adam_update(p, g, m, v, p, m, v, params.num_weights, t, config.lr,
                               config.beta1, config.beta2, config.eps, config.l2,
                               config.weight_decay)
        return time.perf_counter() - started

    return one_epoch, {"name": "Adam updates only (fmnist.adam_update)", "train_steps": steps,
                       "parameters": int(p.size)}


# ================================================================================================
# 2. This project, with and without Adam, in turns with the floor and Adam alone
# ================================================================================================

@contextmanager
def adam_skipped():
    """Inside it, `fmnist.adam_update` does nothing, so `train_epoch` runs every step's forward
    and backward pass, dropout masks, batch gathers and bookkeeping exactly as usual but leaves
    the parameters where they were. Timed, that is what an epoch costs without its optimizer
    (its loss and accuracy are those of a network that does not learn: only the time means
    anything). Restored on exit, also after an exception."""
    with mock.patch.object(fmnist, "adam_update", lambda *args, **kwargs: None):
        yield


def fmnist_epoch(params, state, splits, config, epoch: int, who: str = "fmnist"):
    """One epoch as `fmnist.fit` times it: `train_epoch`, then `evaluate` on the validation split.
    Returns the new parameters and state, and the epoch's record (`epoch_record`)."""
    t0 = time.perf_counter()
    params, state, _ = fmnist.train_epoch(params, state, splits.x_train, splits.y_train, config,
                                          epoch)
    t1 = time.perf_counter()
    val = fmnist.evaluate(params, splits.x_val, splits.y_val)
    return params, state, epoch_record(who, epoch, t0, t1, time.perf_counter(), val.accuracy)


def epoch_without_adam(params, state, splits, config, epoch: int) -> float:
    """Seconds of `fmnist_epoch` with Adam skipped (`adam_skipped`), from params and state."""
    with adam_skipped():
        *_, record = fmnist_epoch(params, state, splits, config, epoch, "fmnist with Adam skipped")
    return record["seconds"]


def bench_numpy_contenders(splits, config, epochs: int) -> dict:
    """The GEMM floor, Adam alone, this project and this project with Adam skipped, an epoch of
    each in turn, `epochs` rounds; each one's seconds per epoch is the median over rounds 2..N
    (round 1 is warm-up for all).

    In turns rather than one after the other because this shared machine has slow spells lasting
    minutes: measured one after another, the floor and the project timed in different spells
    made fmnist / floor anything from 1.7 to 3.2 in one day. Taking turns, they meet the machine
    in the same state. (A slow spell still slows the project more than the floor, so the ratio
    itself is higher then; and PyTorch and scikit-learn run after them.)

    The project's epoch is `fmnist.train_epoch` then `fmnist.evaluate(validation)`, from
    `init_params`: exactly the work `fmnist.fit` times per epoch, without its early-stopping
    bookkeeping. The epoch with Adam skipped (`adam_skipped`) starts from the same parameters
    as the round's real epoch (so any cost that depends on the weights' values is the same in
    both) and does not move them; the two swap places every round, so neither always runs
    second. "Adam inside the loop" is the real epoch's seconds less its own, round by round: what
    Adam adds to an epoch of training.
    """
    floor, floor_info = gemm_floor_epoch(splits, config)
    adam, adam_info = adam_epoch(splits, config)
    params = fmnist.init_params(config.layer_sizes, config.seed, config.dtype)
    state = fmnist.adam_init(params)
    floor_runs, adam_runs, no_adam_runs, records = [], [], [], []
    for epoch in range(1, epochs + 1):
        floor_runs.append(floor())
        adam_runs.append(adam())
        print(f"  round {epoch}: GEMM floor {floor_runs[-1]:.3f} s, Adam {adam_runs[-1]:.3f} s",
              flush=True)
        round_start = params, state
        if epoch % 2 == 0:                            # the two epochs swap places every round
            no_adam_runs.append(epoch_without_adam(*round_start, splits, config, epoch))
        params, state, record = fmnist_epoch(*round_start, splits, config, epoch)
        records.append(record)
        if epoch % 2 == 1:
            no_adam_runs.append(epoch_without_adam(*round_start, splits, config, epoch))
    project = summarise("fmnist (this project)", records)
    project["evaluate_test_ms"] = bench_evaluate(params, splits)
    return {"floor": floor_info | rounds_summary(floor_runs),
            "adam": adam_info | rounds_summary(adam_runs), "project": project,
            "no_adam": {"name": "fmnist with Adam skipped"} | rounds_summary(no_adam_runs),
            "adam_in_loop": {"name": "Adam inside the loop (round by round)"} | rounds_summary(
                [r["seconds"] - t for r, t in zip(records, no_adam_runs)])}


def rounds_summary(runs: list[float]) -> dict:
    """Seconds per epoch (median over rounds 2..N) and every round's seconds, the first included."""
    return {"seconds_per_epoch": statistics.median(runs[1:]), "rounds": runs}


def bench_evaluate(params, splits, repeats: int = 5) -> dict:
    """`evaluate` on the 10,000 test images: median of `repeats` calls after one warm-up."""
    fmnist.evaluate(params, splits.x_test, splits.y_test)
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        fmnist.evaluate(params, splits.x_test, splits.y_test)
        runs.append(1000 * (time.perf_counter() - started))
    print(f"  fmnist evaluate(test): {', '.join(f'{t:.1f}' for t in runs)} ms", flush=True)
    return {"median": statistics.median(runs), "runs": runs}


def epoch_record(who: str, epoch: int, t0: float, t1: float, t2: float,
                 val_accuracy: float) -> dict:
    """One epoch's timings (train, validation, both) and validation accuracy; printed as it goes."""
    r = {"epoch": epoch, "train_seconds": t1 - t0, "val_seconds": t2 - t1, "seconds": t2 - t0,
         "val_accuracy": float(val_accuracy)}
    print(f"  {who} epoch {epoch}: {r['seconds']:.3f} s (train {r['train_seconds']:.3f}, "
          f"validation {r['val_seconds']:.3f}), val acc {r['val_accuracy']:.2%}", flush=True)
    return r


def summarise(name: str, records: list[dict], **extra) -> dict:
    return {"name": name, "seconds_per_epoch": timed_median(records),
            "train_seconds_per_epoch": timed_median(records, "train_seconds"),
            "val_seconds_per_epoch": timed_median(records, "val_seconds"),
            "final_val_accuracy": records[-1]["val_accuracy"], "epochs": records, **extra}


# ================================================================================================
# 3. scikit-learn
# ================================================================================================

SKLEARN_NOTE = ("scikit-learn's MLPClassifier has no dropout, and its alpha is its own L2 "
                "convention: per batch it adds alpha * W / batch_size to the gradient (loss "
                "0.5 * alpha * ||W||^2 / batch_size), 128x weaker at alpha=1e-4, B=128 than the "
                "recipe's lambda * W; its initialisation is Glorot-uniform. It does more or "
                "less work per step than the recipe, so read its time as a reference point, not a "
                "like-for-like contender.")


def bench_sklearn(splits, config, epochs: int) -> dict:
    """One `partial_fit` per epoch (one shuffled pass of mini-batches), then `score` on the
    validation split."""
    try:
        import sklearn
        from sklearn.neural_network import MLPClassifier
    except ImportError as e:
        return skipped("scikit-learn", f"not importable ({e})")
    model = MLPClassifier(hidden_layer_sizes=config.hidden, alpha=config.l2,
                          batch_size=config.batch_size, learning_rate_init=config.lr,
                          beta_1=config.beta1, beta_2=config.beta2, epsilon=config.eps,
                          solver="adam", shuffle=True, random_state=config.seed)
    classes = np.arange(fmnist.NUM_CLASSES)
    records = []
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        model.partial_fit(splits.x_train, splits.y_train, classes=classes)
        t1 = time.perf_counter()
        accuracy = model.score(splits.x_val, splits.y_val)
        records.append(epoch_record("sklearn", epoch, t0, t1, time.perf_counter(), accuracy))
    return summarise(f"scikit-learn {sklearn.__version__} (no dropout)", records,
                     version=sklearn.__version__, weights_dtype=str(model.coefs_[0].dtype),
                     note=SKLEARN_NOTE)


def skipped(name: str, reason: str) -> dict:
    print(f"  {name}: skipped, {reason}", flush=True)
    return {"name": name, "skipped": reason, "seconds_per_epoch": None}


# ================================================================================================
# 4. PyTorch
# ================================================================================================

def torch_model(torch, config):
    """The recipe as nn.Sequential, starting from the *same* weights as the project
    (`fmnist.init_params`, transposed into nn.Linear's (out, in) layout): the same starting point
    makes the validation accuracies comparable, and the initialisation costs no time per epoch."""
    nn = torch.nn
    params = fmnist.init_params(config.layer_sizes, config.seed, "float32")
    L = len(config.layer_sizes) - 1
    layers = []
    for l, (n_in, n_out) in enumerate(zip(config.layer_sizes[:-1], config.layer_sizes[1:]), 1):
        linear = nn.Linear(n_in, n_out)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(np.ascontiguousarray(params[f"W{l}"].T)))
            linear.bias.copy_(torch.from_numpy(np.array(params[f"b{l}"])))
        layers.append(linear)
        if l < L:
            layers += [nn.ReLU(), nn.Dropout(config.dropout)]
    return nn.Sequential(*layers)


def torch_optimizer(torch, model, config):
    """Adam with L2 on the weights only: torch's (coupled) weight_decay adds wd * W to the
    gradient: the gradient of the recipe's (lambda/2) * ||W||^2 when wd = lambda."""
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    groups = [{"params": [m.weight for m in linears], "weight_decay": config.l2},
              {"params": [m.bias for m in linears], "weight_decay": 0.0}]
    return torch.optim.Adam(groups, lr=config.lr, betas=(config.beta1, config.beta2),
                            eps=config.eps)


def torch_train_epoch(torch, model, opt, x, y, batch_size: int) -> None:
    """One shuffled pass, the way a PyTorch user writes it without a DataLoader. It keeps the
    running loss and accuracy, as `fmnist.train_epoch` does, so both do the same bookkeeping."""
    F = torch.nn.functional
    model.train()
    order = torch.randperm(len(y))
    loss_sum, correct = 0.0, 0
    for start in range(0, len(y), batch_size):
        idx = order[start:start + batch_size]
        xb, yb = x[idx], y[idx]
        logits = model(xb)
        loss = F.cross_entropy(logits, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += loss.item() * len(idx)
        correct += int((logits.argmax(dim=1) == yb).sum())


def torch_accuracy(torch, model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


def torch_tensors(torch, splits) -> tuple:
    """Tensors that share memory with the project's NumPy arrays (no copy, same numbers).

    The arrays are read-only (fmnist's functions never write their inputs) and torch warns that
    it cannot mark a tensor read-only; nothing here writes to them, so the warning is silenced.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return tuple(torch.from_numpy(a) for a in (splits.x_train, splits.y_train,
                                                   splits.x_val, splits.y_val))


def bench_torch_variant(torch, splits, config, epochs: int, flush_denormal: bool) -> dict:
    torch.manual_seed(config.seed)
    supported = torch.set_flush_denormal(flush_denormal)
    label = "PyTorch, flush_denormal" if flush_denormal else "PyTorch"
    try:
        x, y, xv, yv = torch_tensors(torch, splits)
        model = torch_model(torch, config)
        opt = torch_optimizer(torch, model, config)
        records = []
        for epoch in range(1, epochs + 1):
            t0 = time.perf_counter()
            torch_train_epoch(torch, model, opt, x, y, config.batch_size)
            t1 = time.perf_counter()
            accuracy = torch_accuracy(torch, model, xv, yv)
            records.append(epoch_record(label, epoch, t0, t1, time.perf_counter(), accuracy))
    finally:
        torch.set_flush_denormal(False)
    name = (f"PyTorch {torch.__version__}, set_flush_denormal(True)" if flush_denormal
            else f"PyTorch {torch.__version__} (defaults)")
    return summarise(name, records, flush_denormal=flush_denormal,
                     flush_denormal_supported=bool(supported) if flush_denormal else None)


def bench_torch(splits, config, epochs: int) -> list[dict]:
    """PyTorch as a user runs it (default settings, all cores), then the same with
    `set_flush_denormal(True)`: the CPU then treats subnormal floats as zero in hardware, which
    is what `fmnist.flush_to_zero` does by hand. Both start from the same seed and weights."""
    try:
        import torch
    except ImportError as e:
        return [skipped("PyTorch", f"not importable ({e})")]
    torch.set_num_threads(os.cpu_count() or 1)
    info = {"version": torch.__version__, "num_threads": torch.get_num_threads()}
    results = [bench_torch_variant(torch, splits, config, epochs, flush_denormal=False),
               bench_torch_variant(torch, splits, config, epochs, flush_denormal=True)]
    for r in results:
        r.update(info)
    return results


# ================================================================================================
# Ratios and the table
# ================================================================================================

def compute_ratios(c: dict) -> dict:
    """The ratios the issue asks for, and others to read them by; None where a contender was
    skipped (or not measured: a report from before it existed)."""
    s = {k: (c.get(k) or {}).get("seconds_per_epoch") for k in CONTENDERS}
    return {
        "project / PyTorch": ratio(s["project"], s["torch"]),
        "project / PyTorch flush_denormal": ratio(s["project"], s["torch_ftz"]),
        "project / scikit-learn": ratio(s["project"], s["sklearn"]),
        "project / GEMM floor": ratio(s["project"], s["floor"]),
        "project with Adam skipped / PyTorch": ratio(s["no_adam"], s["torch"]),
        "project with Adam skipped / GEMM floor": ratio(s["no_adam"], s["floor"]),
        "(GEMM floor + Adam) / PyTorch": ratio(
            s["floor"] + s["adam"] if s["floor"] is not None and s["adam"] is not None else None,
            s["torch"]),
        "PyTorch / GEMM floor": ratio(s["torch"], s["floor"]),
        "PyTorch flush_denormal / GEMM floor": ratio(s["torch_ftz"], s["floor"]),
        "scikit-learn / GEMM floor": ratio(s["sklearn"], s["floor"]),
    }


def met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def ratio_verdict(name: str, value: float | None) -> str:
    """'<= 0.5: NOT met' for a ratio the issue sets a goal for, '' for the others."""
    goal = GOALS.get(name)
    return "" if goal is None or value is None else f"<= {goal}: {met(value <= goal)}"


def format_table(report: dict) -> str:
    c, cfg = report["contenders"], report["config"]
    lines = [f"Fashion-MNIST MLP {'-'.join(map(str, cfg['layer_sizes']))}, {cfg['dtype']}, batch "
             f"{cfg['batch_size']}, {report['n_train']:,} train / {report['n_val']:,} validation; "
             f"median over epochs 2..{report['epochs']} (epoch 1 is warm-up)", "",
             f"{'contender':<44} {'s/epoch':>8} {'train':>7} {'valid':>7} {'val acc':>8}"]
    for key in CONTENDERS:
        r = c.get(key)
        if r is None:
            continue
        if r.get("skipped"):
            lines.append(f"{r['name']:<44} {'skipped: ' + r['skipped']}")
        elif "train_seconds_per_epoch" not in r:                 # timed as a whole epoch only
            lines.append(f"{r['name']:<44} {r['seconds_per_epoch']:8.3f}")
        else:
            lines.append(f"{r['name']:<44} {r['seconds_per_epoch']:8.3f} "
                         f"{r['train_seconds_per_epoch']:7.3f} {r['val_seconds_per_epoch']:7.3f} "
                         f"{r['final_val_accuracy']:8.2%}")
    lines += ["", f"{'ratio (seconds per epoch)':<44} {'value':>8}   goal"]
    for name, value in report["ratios"].items():
        shown = "n/a" if value is None else f"{value:.2f}"
        lines.append(f"{name:<44} {shown:>8}   {ratio_verdict(name, value)}")
    ev = c["project"]["evaluate_test_ms"]["median"]
    lines += ["", f"fmnist evaluate on 10,000 test images: {ev:.1f} ms (median of 5; goal < "
                  f"{EVALUATE_GOAL_MS:.0f} ms: {met(ev < EVALUATE_GOAL_MS)})"]
    lines += machine_lines(report)
    code = report["code"]
    lines.append(f"measured fmnist.py sha256 {code['fmnist_sha256'][:12]} on commit "
                 f"{(code.get('git_commit') or 'unknown')[:12]}"
                 + (" (with uncommitted changes)" if code.get("fmnist_py_modified") else ""))
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)


def machine_lines(report: dict) -> list[str]:
    m = report["machine"]
    loaded = m["blas"]["loaded"]
    blas = loaded if not isinstance(loaded, list) else ", ".join(
        f"{p['internal_api']} {p['version']} ({p['num_threads']} threads, {p['architecture']})"
        for p in loaded)
    torch = report["contenders"].get("torch") or {}
    lines = ["", f"machine: {m['cpu']}, {m['cpu_count']} CPUs; Python {m['python']}, "
                 f"NumPy {m['numpy']}, BLAS: {blas}"]
    if torch.get("version"):
        lines.append(f"PyTorch {torch['version']}, {torch['num_threads']} threads")
    lines.append(f"load average at start / end: {m['load_average_at_start']} / "
                 f"{m['load_average_at_end']}; total run {report['total_seconds']:.0f} s")
    other = m.get("other_programs_cpu_seconds")
    if other is not None:
        noisy = other > 0.05 * report["total_seconds"]
        lines.append(f"other programs used {other:.1f} CPU-seconds during the run"
                     + (": timings are disturbed, run again on a quiet machine" if noisy else ""))
    return lines


# ================================================================================================
# Command line
# ================================================================================================

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--epochs", type=int, default=4,
                   help="epochs per contender (default 4; for the GEMM floor and Adam alone, "
                        "rounds); the median is over epochs 2..N, so at least 2")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON file to write (default: runs/bench-<timestamp>.json)")
    p.add_argument("--data-dir", type=Path, default=fmnist.default_data_dir(),
                   help="folder with the IDX files (default: ./data if it exists, else the data/ "
                        "beside fmnist.py)")
    p.add_argument("--skip-torch", action="store_true", help="do not run PyTorch")
    p.add_argument("--skip-sklearn", action="store_true", help="do not run scikit-learn")
    p.add_argument("--runs", type=int, default=1,
                   help="whole benchmark runs, one after another, each in a fresh process; with "
                        "more than one, the table gives each run's figures and their median, "
                        "and each run's JSON is kept beside --out's as NAME.runI.json "
                        "(default 1)")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be at least 1")
    if args.epochs < 2:
        p.error("--epochs must be at least 2: epoch 1 is warm-up and is not timed")
    return args


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    busy_at_start, own_at_start = busy_cpu_seconds(), time.process_time()
    config = fmnist.Config(epochs=args.epochs)        # the report's recipe: every other default
    machine = machine_info()                          # before torch/sklearn load their libraries
    splits = fmnist.make_splits(fmnist.load_fashion_mnist(args.data_dir), config)
    print("GEMM floor, Adam alone and this project with and without Adam, an epoch of each in "
          "turn", flush=True)
    c = bench_numpy_contenders(splits, config, args.epochs)
    print("scikit-learn", flush=True)
    c["sklearn"] = (skipped("scikit-learn", "--skip-sklearn") if args.skip_sklearn
                    else bench_sklearn(splits, config, args.epochs))
    print("PyTorch", flush=True)
    torch_results = ([skipped("PyTorch", "--skip-torch")] if args.skip_torch
                     else bench_torch(splits, config, args.epochs))
    c["torch"] = torch_results[0]
    c["torch_ftz"] = torch_results[1] if len(torch_results) > 1 else None
    machine["load_average_at_end"] = load_average()
    machine["other_programs_cpu_seconds"] = other_programs_cpu(busy_at_start, own_at_start)
    notes = ["epoch = training pass (391 steps) + validation pass; epoch 1 excluded as warm-up"]
    if not c["torch"].get("skipped"):
        notes.append("PyTorch starts from fmnist.init_params' weights; L2 as Adam "
                     "weight_decay=lambda on weights only (the gradient of (lambda/2) ||W||^2)")
    if not c["sklearn"].get("skipped"):
        notes.append(SKLEARN_NOTE)
    return {"benchmark": "bench_train", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "fmnist_version": fmnist.__version__, "code": code_version(),
            "config": config.to_json() | {"layer_sizes": list(config.layer_sizes)},
            "epochs": args.epochs, "n_train": len(splits.y_train), "n_val": len(splits.y_val),
            "machine": machine, "contenders": c, "ratios": compute_ratios(c), "notes": notes,
            "total_seconds": time.perf_counter() - started}


# ================================================================================================
# Several runs: each run's figures and their median
# ================================================================================================

def run_in_fresh_processes(args: argparse.Namespace, out: Path) -> dict:
    """The benchmark `args.runs` times, each in a new Python process with the same settings,
    writing its own JSON beside `out` (out.run1.json, ...), and what they measured: every run's
    report, and `summarise_runs` of them. A run that fails stops the rest (exit 1, naming it)."""
    reports = []
    for i in range(1, args.runs + 1):
        print(f"=== run {i} of {args.runs}", flush=True)
        run_out = out.with_name(f"{out.stem}.run{i}.json")
        done = subprocess.run(one_run_argv(args, run_out))
        if done.returncode != 0:
            kept = f"; the runs before it are in {out.stem}.run1.json ..." if i > 1 else ""
            raise SystemExit(f"bench_train.py: run {i} of {args.runs} failed (exit code "
                             f"{done.returncode}){kept}")
        reports.append(json.loads(run_out.read_text()))
    return {"benchmark": "bench_train", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "summary": summarise_runs(reports), "runs": reports}


def one_run_argv(args: argparse.Namespace, out: Path) -> list[str]:
    """The command line of one run of several: the same settings, its own --out, no --runs."""
    return [sys.executable, __file__, "--epochs", str(args.epochs), "--data-dir",
            str(args.data_dir), "--out", str(out),
            *(["--skip-torch"] if args.skip_torch else []),
            *(["--skip-sklearn"] if args.skip_sklearn else [])]


def summarise_runs(reports: list[dict]) -> dict:
    """Per contender, seconds per epoch in each run; per ratio, its value in each run. A ratio
    is taken within a run (both sides measured minutes apart at most) and the median is of
    those values, not the ratio of medians: a run in which the whole machine was slow then
    counts as one run, not as a slow numerator against another run's fast denominator."""
    def median(values: list) -> float | None:
        known = [v for v in values if v is not None]
        return statistics.median(known) if len(known) == len(values) else None
    seconds = {key: [(r["contenders"].get(key) or {}).get("seconds_per_epoch") for r in reports]
               for key in CONTENDERS}
    names = {key: next((r["contenders"][key]["name"] for r in reports
                        if (r["contenders"].get(key) or {}).get("name")), key) for key in seconds}
    ratios = {name: [r["ratios"][name] for r in reports] for name in reports[0]["ratios"]}
    evaluate = [r["contenders"]["project"]["evaluate_test_ms"]["median"] for r in reports]
    other = [r["machine"].get("other_programs_cpu_seconds") for r in reports]
    return {"runs": len(reports), "other_programs_cpu_seconds": other,
            "seconds_per_epoch": {k: {"name": names[k], "runs": v, "median": median(v)}
                                  for k, v in seconds.items()},
            "ratios": {k: {"runs": v, "median": median(v)} for k, v in ratios.items()},
            "evaluate_test_ms": {"runs": evaluate, "median": median(evaluate)}}


def format_summary(summary: dict) -> str:
    n = summary["runs"]
    head = "".join(f"{'run ' + str(i):>8}" for i in range(1, n + 1)) + f"{'median':>8}"
    def row(label: str, values: list, mid: float | None, digits: int = 3, verdict: str = "") -> str:
        cells = "".join("     n/a" if v is None else f"{v:8.{digits}f}" for v in [*values, mid])
        return f"{label:<44}{cells}   {verdict}".rstrip()
    lines = [f"{n} runs, each a median over epochs 2..N; seconds per epoch", "",
             f"{'contender':<44}{head}"]
    for entry in summary["seconds_per_epoch"].values():
        if any(v is not None for v in entry["runs"]):
            lines.append(row(entry["name"], entry["runs"], entry["median"]))
    lines += ["", f"{'ratio (within each run)':<44}{head}   goal (by the median)"]
    for name, entry in summary["ratios"].items():
        if all(v is None for v in entry["runs"]):
            continue                                  # a contender skipped in every run
        lines.append(row(name, entry["runs"], entry["median"], 2,
                         ratio_verdict(name, entry["median"])))
    ev = summary["evaluate_test_ms"]
    lines += ["", row("fmnist evaluate, 10,000 test images (ms)", ev["runs"], ev["median"], 1,
                      f"< {EVALUATE_GOAL_MS:.0f}: {met(ev['median'] < EVALUATE_GOAL_MS)}")]
    other = summary["other_programs_cpu_seconds"]
    lines.append(f"{'CPU-seconds used by other programs':<44}"
                 + "".join("     n/a" if v is None else f"{v:8.1f}" for v in other))
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.out or Path("runs") / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = run(args) if args.runs == 1 else run_in_fresh_processes(args, out)
    out.write_text(json.dumps(report, indent=2) + "\n")
    if args.runs == 1:
        print("\n" + format_table(report))
    else:
        print("\n" + format_summary(report["summary"]))
        print("\n" + "\n".join(machine_lines(report["runs"][-1])[1:2]))
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
