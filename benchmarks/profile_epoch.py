"""Where an epoch's time goes: a line-by-line profile of training, summed into a few categories.

    python -m pip install py-spy
    python benchmarks/profile_epoch.py [--epochs 4] [--rate 250] [--data-dir data] [--out FILE.json]

It trains the report's recipe for `--epochs` epochs, each one `fmnist.train_epoch` followed by
`fmnist.evaluate` on the validation split (what `fmnist.fit` times as an epoch), under py-spy: a
sampling profiler that looks, `--rate` times a second, at which line of Python the program is on,
from outside the process. Epoch 1 is warm-up and is not counted. Each sample is credited to the
innermost line of fmnist.py it was on, and that line decides its category: a line with `@` or
`np.matmul` is a matrix product; everything under `adam_update` is Adam; and so on (`category`).

Sampling costs a little time itself, so the seconds are the profiled run's; read the shares.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))   # so `import fmnist` works from a plain checkout, not only installed

import fmnist  # noqa: E402

CATEGORIES = (   # in the printed order
    "matrix products, training",
    "matrix products, validation",
    "Adam updates",
    "dropout masks (random numbers)",
    "forward: bias, ReLU, dropout",
    "backward: softmax, gates, bias sums",
    "batch gathers x[idx], y[idx]",
    "running loss and accuracy",
    "validation: bias, ReLU, loss",
    "Python bookkeeping (checks, views, lookups)",
)
FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*):(?P<line>\d+)\)$")
MATMUL = re.compile(r"\s@\s|np\.matmul\(")
PROFILED = "profiled_epochs"    # the child's function that runs the counted epochs


# ================================================================================================
# The profiled program: the epochs themselves
# ================================================================================================

def profiled_epochs(splits, config, params, state, epochs: range) -> list[float]:
    """Epochs as `fit` runs them (train, then evaluate on validation); returns their seconds.
    Only samples inside this function are counted."""
    seconds = []
    for epoch in epochs:
        started = time.perf_counter()
        params, state, _ = fmnist.train_epoch(params, state, splits.x_train, splits.y_train,
                                              config, epoch)
        fmnist.evaluate(params, splits.x_val, splits.y_val)
        seconds.append(time.perf_counter() - started)
        print(f"  epoch {epoch}: {seconds[-1]:.3f} s", flush=True)
    return seconds


def child(args: argparse.Namespace) -> None:
    config = fmnist.Config(epochs=args.epochs)
    splits = fmnist.make_splits(fmnist.load_fashion_mnist(args.data_dir), config)
    params = fmnist.init_params(config.layer_sizes, config.seed, config.dtype)
    state = fmnist.adam_init(params)
    params, state, _ = fmnist.train_epoch(params, state, splits.x_train, splits.y_train, config, 1)
    fmnist.evaluate(params, splits.x_val, splits.y_val)                       # warm-up epoch
    seconds = profiled_epochs(splits, config, params, state, range(2, args.epochs + 1))
    Path(args.child).write_text(json.dumps(seconds))


# ================================================================================================
# Sorting the samples
# ================================================================================================

def parse_frame(frame: str) -> tuple[str, str, int]:
    """'forward (fmnist.py:871)' -> ('forward', 'fmnist.py', 871); py-spy's raw format."""
    m = FRAME.match(frame)
    return (m["function"], m["file"], int(m["line"])) if m else (frame, "", 0)


def category(stack: list[tuple[str, str, int]], source: list[str]) -> str:
    """The category of one sample, from its stack (outermost first) of (function, file, line)
    and the lines of fmnist.py. Only fmnist.py's frames matter: the innermost one says which
    line was running (NumPy's C code has no frames of its own), the outer ones which stage."""
    ours = [(f, line) for f, file, line in stack if Path(file).name == "fmnist.py"]
    if not ours:
        return CATEGORIES[-1]
    functions = {f for f, _ in ours}
    function, line = ours[-1]
    code = source[line - 1] if 0 < line <= len(source) else ""
    validating = "evaluate" in functions
    if MATMUL.search(code.split("#")[0]):
        return CATEGORIES[1] if validating else CATEGORIES[0]
    if validating:
        return CATEGORIES[8]
    if "adam_update" in functions:
        return CATEGORIES[2]
    if "dropout_masks" in functions:
        return CATEGORIES[3]
    if function == "forward":
        return CATEGORIES[4]
    if "backward" in functions and function in ("backward", "softmax", "flush_to_zero"):
        return CATEGORIES[5]
    if function == "train_epoch" and "[idx]" in code:
        return CATEGORIES[6]
    if functions & {"cross_entropy", "log_softmax"} or "argmax" in code:
        return CATEGORIES[7]
    return CATEGORIES[-1]


def tally(raw: str, source: list[str]) -> Counter:
    """Samples per category, from py-spy's raw output ('frame;frame;... count' per line),
    counting only samples taken inside PROFILED."""
    counts = Counter()
    for line in raw.splitlines():
        frames, _, n = line.rpartition(" ")
        stack = [parse_frame(f) for f in frames.split(";")]
        if any(f == PROFILED for f, _, _ in stack):
            counts[category(stack, source)] += int(n)
    return counts


def format_table(counts: Counter, seconds: float) -> str:
    total = sum(counts.values())
    rows = [f"{'where the time goes':46s} {'share':>6s} {'s/epoch':>8s}"]
    for name in CATEGORIES:
        share = counts[name] / total
        rows.append(f"{name:46s} {100 * share:5.1f}% {share * seconds:8.3f}")
    rows.append(f"{'one epoch (median of the profiled epochs)':46s} {'100%':>6s} {seconds:8.3f}")
    return "\n".join(rows)


# ================================================================================================
# Command line
# ================================================================================================

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=4,
                   help="epochs to train (default 4); epoch 1 is warm-up and is not counted")
    p.add_argument("--rate", type=int, default=250, help="samples per second (default 250)")
    p.add_argument("--data-dir", type=Path, default=fmnist.default_data_dir(),
                   help="folder with the IDX files (default: ./data if it exists, else the "
                        "data/ folder beside fmnist.py)")
    p.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    p.add_argument("--child", help=argparse.SUPPRESS)   # internal: run the epochs, write seconds
    args = p.parse_args(argv)
    args.data_dir = args.data_dir.resolve()          # the profiled child runs it too
    if args.epochs < 2:
        p.error("--epochs must be at least 2: epoch 1 is warm-up and is not counted")
    if not 1 <= args.rate <= 10_000:
        p.error("--rate must be between 1 and 10000 samples per second")
    return args


def error(message: str, code: int) -> int:
    print(f"profile_epoch: error: {message}", file=sys.stderr)
    return code


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        return error("py-spy not found; install it with `python -m pip install py-spy`", 2)
    try:
        for name in fmnist.DATA_FILES:                # fail here, not inside the profiled run
            fmnist.find_data_file(args.data_dir, name)
    except fmnist.DataError as e:
        return error(str(e), 2)
    with tempfile.TemporaryDirectory() as tmp:
        raw, times = Path(tmp) / "samples.txt", Path(tmp) / "seconds.json"
        command = [py_spy, "record", "--rate", str(args.rate), "--format", "raw",
                   "--output", str(raw), "--", sys.executable, str(Path(__file__).resolve()),
                   "--child", str(times), "--epochs", str(args.epochs),
                   "--data-dir", str(args.data_dir)]
        done = subprocess.run(command, stdout=None, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0 or not times.exists() or not raw.exists():
            # py-spy's own exit code is 0 even when the program it ran failed: show the last
            # line of the program's error instead
            last = [line for line in done.stderr.splitlines()
                    if line.strip() and not line.startswith("py-spy>")][-1:] or ["no message"]
            return error(f"the profiled run failed: {last[0].strip()}", 1)
        seconds = json.loads(times.read_text())
        counts = tally(raw.read_text(), Path(fmnist.__file__).read_text().splitlines())
    if not counts:
        return error("py-spy took no samples inside the profiled epochs; try a higher --rate", 1)
    epoch = statistics.median(seconds)
    print(f"\n{sum(counts.values())} samples at {args.rate} per second in epochs "
          f"2-{args.epochs}\n")
    print(format_table(counts, epoch))
    if args.out:
        total = sum(counts.values())
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rate": args.rate,
            "epoch_seconds": seconds, "samples": total,
            "shares": {name: counts[name] / total for name in CATEGORIES}}, indent=2) + "\n")
        print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
