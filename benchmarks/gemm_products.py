"""How fast are the GEMM floor's matrix products? Each product of one training step, timed alone,
in microseconds and GFLOP/s, on BLAS's default threads and on one thread.

    python benchmarks/gemm_products.py [--repeats 400] [--batch 128] [--out FILE.json]

A training step of the report's recipe does eleven matrix products (`bench_train.py`'s GEMM floor:
the forward products, the weight gradients, and the input gradients of every layer but the
first). This times each one alone, `--repeats` calls into a preallocated `out=` array, best of
five, and counts its floating-point work as 2 m k n (a multiply and an add per term). The same
table on one thread comes from a second process started with OPENBLAS_NUM_THREADS=1 (and the
OpenMP and MKL equivalents), because a BLAS reads its thread count when it loads.

What it teaches: the large products already run near the speed both cores can give (about
twice one thread's), so the floor has no slack; the small ones (the 10-class output layer) run
far below it, but cost almost nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))   # so `import fmnist` works from a plain checkout

import fmnist  # noqa: E402

ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def load_bench_train():
    """bench_train.py as a module (benchmarks/ is not a package): its GEMM floor's buffers."""
    spec = importlib.util.spec_from_file_location("bench_train", HERE / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def step_products(batch: int, sizes: tuple[int, ...]) -> list[dict]:
    """The matrix products of one training step, each as its name and the arrays of
    `np.matmul(left, right, out=out)`, on buffers made as the GEMM floor makes them."""
    bench_train = load_bench_train()
    rng = np.random.default_rng(0)
    x = rng.random((batch, sizes[0]), dtype=np.float32)
    buf = bench_train.gemm_buffers(batch, sizes, x, rng)
    W = [rng.standard_normal(shape, dtype=np.float32) for shape in zip(sizes[:-1], sizes[1:])]
    A, Z, dW, dA = buf["A"], buf["Z"], buf["dW"], buf["dA"]
    products = []
    for l in range(len(W)):
        products.append({"name": f"Z{l + 1} = A{l} W{l + 1}", "left": A[l], "right": W[l],
                         "out": Z[l]})                               # (B, n_out)
        products.append({"name": f"dW{l + 1} = A{l}^T dZ{l + 1}", "left": A[l].T, "right": Z[l],
                         "out": dW[l]})                              # (n_in, n_out)
        if l > 0:                                                    # nothing needs dL/dX
            products.append({"name": f"dA{l} = dZ{l + 1} W{l + 1}^T", "left": Z[l],
                             "right": W[l].T, "out": dA[l]})         # (B, n_in)
    return products


def best_seconds(run, repeats: int, trials: int = 5) -> float:
    """The fastest of `trials` timings of `repeats` calls, per call (after one call to warm up):
    the least disturbed measurement on a shared machine."""
    run()
    best = float("inf")
    for _ in range(trials):
        started = time.perf_counter()
        for _ in range(repeats):
            run()
        best = min(best, (time.perf_counter() - started) / repeats)
    return best


def measure(batch: int, repeats: int) -> list[dict]:
    """Each product's name, shape (m, k, n), seconds per call and GFLOP/s, on this process's
    threads."""
    rows = []
    for p in step_products(batch, fmnist.Config().layer_sizes):
        (m, k), n = p["left"].shape, p["right"].shape[1]
        seconds = best_seconds(lambda p=p: np.matmul(p["left"], p["right"], out=p["out"]), repeats)
        rows.append({"name": p["name"], "mkn": [m, k, n], "seconds": seconds,
                     "gflops": 2 * m * k * n / seconds / 1e9})
    return rows


def measure_one_thread(batch: int, repeats: int) -> list[dict]:
    """`measure` in a child process whose BLAS was loaded with one thread."""
    argv = [sys.executable, __file__, "--child", "--batch", str(batch), "--repeats", str(repeats)]
    done = subprocess.run(argv, env={**os.environ, **ONE_THREAD}, capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout)


def format_table(default: list[dict], one: list[dict], steps: int) -> str:
    lines = [f"{'product':<20} {'m x k x n':>15} {'us':>8} {'GFLOP/s':>8} "
             f"{'1 thread us':>12} {'GFLOP/s':>8} {'speed-up':>9}"]
    for d, o in zip(default, one):
        mkn = " x ".join(str(v) for v in d["mkn"])
        lines.append(f"{d['name']:<20} {mkn:>15} {d['seconds'] * 1e6:8.1f} {d['gflops']:8.1f} "
                     f"{o['seconds'] * 1e6:12.1f} {o['gflops']:8.1f} "
                     f"{o['seconds'] / d['seconds']:8.2f}x")
    step, step_one = (sum(r["seconds"] for r in rows) for rows in (default, one))
    lines.append(f"{'one step':<36} {step * 1e6:8.1f} {'':>8} {step_one * 1e6:12.1f} {'':>8} "
                 f"{step_one / step:8.2f}x")
    lines.append(f"{steps} such steps (an epoch's training products, near enough: the last "
                 f"batch is smaller): {step * steps:.3f} s, one thread {step_one * steps:.3f} s")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time each matrix product of one training step, on BLAS's default threads "
                    "and on one, in microseconds and GFLOP/s.", allow_abbrev=False)
    parser.add_argument("--repeats", type=int, default=400,
                        help="calls per timing; the best of five timings counts (default 400)")
    parser.add_argument("--batch", type=int, default=fmnist.Config().batch_size,
                        help="rows per batch (default: the recipe's 128)")
    parser.add_argument("--out", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("repeats", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.batch, args.repeats)))
        return 0
    default = measure(args.batch, args.repeats)
    one = measure_one_thread(args.batch, args.repeats)
    steps = -(-fmnist.Config().train_size // args.batch)
    print(format_table(default, one, steps))
    if args.out:
        args.out.write_text(json.dumps({"batch": args.batch, "repeats": args.repeats,
                                        "default_threads": default, "one_thread": one},
                                       indent=1) + "\n")
        print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
