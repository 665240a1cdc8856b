"""How fast are the GEMM floor's matrix products? Each product of one training step, timed alone,
in microseconds and GFLOP/s, on BLAS's default threads and on one thread.

    python -m pip install threadpoolctl
    python benchmarks/gemm_products.py [--repeats 400] [--batch 128] [--out FILE.json]

A training step of the report's recipe does eleven matrix products (`bench_train.py`'s GEMM floor:
the forward products, the weight gradients, and the input gradients of every layer but the
first). This times each one alone: `--repeats` calls into a preallocated `out=` array, the best
of five such timings, on BLAS's default threads and, in turns with them, on one thread
(threadpoolctl lowers the thread count of the BLAS that NumPy loaded, then restores it). Taking
turns product by product means both settings meet the machine in the same state, even on a
shared machine whose speed changes for minutes at a time. GFLOP/s counts a product's work as
2 m k n (a multiply and an add per term) for an (m x k) by (k x n) product.

What it teaches: comparing a product's speed on two threads with its speed on one shows how
well BLAS shares it between the cores (about twice as fast, at best, on a 2-core machine).
Products too small for OpenBLAS to split (the 10-class output layer) run on one thread either
way. The operands are random numbers, not images and trained weights: a product's speed does
not depend on the values (ordinary numbers, no subnormals). Repeating one product keeps its
operands in cache and includes about a microsecond of NumPy's call overhead, so read the figures
as what BLAS can do at best, not as a share of an epoch.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))   # so `import fmnist` works from a plain checkout
sys.path.insert(0, str(HERE))          # and `import bench_train`: the floor's buffers, the machine

import bench_train  # noqa: E402
import fmnist  # noqa: E402


def step_products(batch: int, sizes: tuple[int, ...]) -> tuple[list[dict], dict]:
    """The matrix products of one training step, each as its name and the arrays of
    `np.matmul(left, right, out=out)`, on buffers made as the GEMM floor makes them (random
    numbers); and the arrays by the names the products use (A0 = X, ..., W1, ..., dZ1, ...).

    As in `fmnist.backward`, a transposed operand is a view (`A.T`, `W.T`), not a copy: BLAS
    reads it in place, so the layout timed is the one training uses."""
    rng = np.random.default_rng(0)
    x = rng.random((batch, sizes[0]), dtype=np.float32)
    buf = bench_train.gemm_buffers(batch, sizes, x, rng)
    W = [rng.standard_normal(shape, dtype=np.float32) for shape in zip(sizes[:-1], sizes[1:])]
    A, dZ, dW, dA = buf["A"], buf["Z"], buf["dW"], buf["dA"]   # the floor reuses Z as dZ
    named = {**{f"A{l}": a for l, a in enumerate(A)}, **{f"W{l + 1}": w for l, w in enumerate(W)},
             **{f"dZ{l + 1}": z for l, z in enumerate(dZ)}}
    products = []
    for l in range(len(W)):
        products.append({"name": f"Z{l + 1} = A{l} W{l + 1}", "left": A[l], "right": W[l],
                         "out": dZ[l]})                              # (B, n_out)
        products.append({"name": f"dW{l + 1} = A{l}^T dZ{l + 1}", "left": A[l].T,
                         "right": dZ[l], "out": dW[l]})              # (n_in, n_out)
        if l > 0:                                                    # nothing needs dL/dX
            products.append({"name": f"dA{l} = dZ{l + 1} W{l + 1}^T", "left": dZ[l],
                             "right": W[l].T, "out": dA[l]})         # (B, n_in)
    return products, named


def seconds_per_call(run, repeats: int) -> float:
    """Seconds per call of `repeats` calls of run(), after one call to warm up."""
    run()
    started = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - started) / repeats


def measure(batch: int, repeats: int, trials: int = 5) -> tuple[list[dict], dict]:
    """Each product's name, shape (m, k, n), and seconds per call and GFLOP/s on the default
    threads and on one: the fastest of `trials` timings of each, the two settings in turns.
    Also the BLAS thread counts each setting ran with, as threadpoolctl reports them."""
    from threadpoolctl import threadpool_info, threadpool_limits

    def blas_threads() -> list[int]:
        return [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]

    threads = {"default": blas_threads()}
    with threadpool_limits(limits=1, user_api="blas"):
        threads["one"] = blas_threads()
    rows = []
    for p in step_products(batch, fmnist.Config().layer_sizes)[0]:
        (m, k), n = p["left"].shape, p["right"].shape[1]

        def run(p=p):
            np.matmul(p["left"], p["right"], out=p["out"])

        default, one = float("inf"), float("inf")
        for _ in range(trials):
            default = min(default, seconds_per_call(run, repeats))
            with threadpool_limits(limits=1, user_api="blas"):
                one = min(one, seconds_per_call(run, repeats))
        flops = 2 * m * k * n
        rows.append({"name": p["name"], "mkn": [m, k, n],
                     "seconds": default, "gflops": flops / default / 1e9,
                     "one_thread_seconds": one, "one_thread_gflops": flops / one / 1e9})
    return rows, threads


def format_table(rows: list[dict], steps: int) -> str:
    lines = [f"{'product':<20} {'m x k x n':>15} {'us':>8} {'GFLOP/s':>8} "
             f"{'1 thread us':>12} {'GFLOP/s':>8} {'speed-up':>9}"]
    for r in rows:
        mkn = " x ".join(str(v) for v in r["mkn"])
        lines.append(f"{r['name']:<20} {mkn:>15} {r['seconds'] * 1e6:8.1f} {r['gflops']:8.1f} "
                     f"{r['one_thread_seconds'] * 1e6:12.1f} {r['one_thread_gflops']:8.1f} "
                     f"{r['one_thread_seconds'] / r['seconds']:8.2f}x")
    step = sum(r["seconds"] for r in rows)
    step_one = sum(r["one_thread_seconds"] for r in rows)
    lines.append(f"{'one step':<36} {step * 1e6:8.1f} {'':>8} {step_one * 1e6:12.1f} {'':>8} "
                 f"{step_one / step:8.2f}x")
    lines.append(f"{steps} such steps (an epoch's training products, near enough: the last "
                 f"batch is smaller): {step * steps:.3f} s, one thread {step_one * steps:.3f} s")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time each matrix product of one training step, on BLAS's default threads "
                    "and on one, in microseconds and GFLOP/s (needs threadpoolctl).",
        allow_abbrev=False)
    parser.add_argument("--repeats", type=int, default=400,
                        help="calls per timing; the best of five timings counts (default 400)")
    parser.add_argument("--batch", type=int, default=fmnist.Config().batch_size,
                        help="rows per batch (default: the recipe's 128)")
    parser.add_argument("--out", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    for name in ("repeats", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.out is not None and not args.out.parent.is_dir():
        parser.error(f"--out: no folder {args.out.parent}")
    if importlib.util.find_spec("threadpoolctl") is None:
        parser.error("needs threadpoolctl to time one thread: python -m pip install threadpoolctl")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    rows, threads = measure(args.batch, args.repeats)
    steps = -(-fmnist.Config().train_size // args.batch)
    print(format_table(rows, steps))
    print(f"BLAS threads: {threads['default']} by default, {threads['one']} for one thread")
    if args.out:
        report = {"benchmark": "gemm_products", "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "batch": args.batch, "repeats": args.repeats, "blas_threads": threads,
                  "code": bench_train.code_version(), "machine": bench_train.machine_info(),
                  "products": rows}
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
