"""The user's tour: pictures, the generated report, predict, gradcheck and download.

These are claims about what a user sees from the command line, so most tests run `fmnist.py` in a
subprocess, as a user would. One small training run (2,000 images, 2 epochs) is shared by the
whole module. The download tests serve the shipped files from a local HTTP server on 127.0.0.1
(no internet is needed) and go through the standard-library path, whether or not torchvision is
installed; the torchvision comparison runs only where torchvision is installed.
"""

import gzip
import http.server
import json
import shutil
import struct
import subprocess
import sys
import threading
import zlib
from functools import partial
from pathlib import Path

import numpy as np
import pytest

import fmnist
from fmnist import DATA_FILES, DataError, load_checkpoint, load_fashion_mnist

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "fmnist.py", *map(str, args)], cwd=HERE,
                          capture_output=True, text=True, timeout=timeout)


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
    assert "--test-index" in one_line_error(run_cli("predict", run_dir / "best.npz"))
    assert "0..9999" in one_line_error(run_cli("predict", run_dir / "best.npz", "--test-index", 10_000))


# ================================================================================================
# Gradient check
# ================================================================================================

def test_gradcheck_passes_and_reports_every_parameter():
    """The learner's gradient check: a row per parameter and a PASS verdict, in about a second."""
    proc = run_cli("gradcheck", "--hidden", "8,6", "--batch", 4, "--seed", 1, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert {line.split()[0] for line in lines[3:-1]} == {"W1", "b1", "W2", "b2", "W3", "b3"}
    assert lines[-1].startswith("PASS")


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


@pytest.fixture(scope="module")
def raw():
    return load_fashion_mnist(DATA)


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
            assert list(target.iterdir()) == []
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


# ================================================================================================
# Help
# ================================================================================================

@pytest.mark.parametrize("command, flags", [
    ("report", ["run_dir", "--data-dir"]),
    ("predict", ["checkpoint", "IMAGE", "--invert", "--test-index", "--json"]),
    ("gradcheck", ["--hidden", "--batch", "--seed"]),
    ("download", ["--data-dir", "--mirror", "--no-torchvision"]),
])
def test_help_lists_each_new_commands_flags(command, flags):
    proc = run_cli(command, "--help")
    assert proc.returncode == 0 and proc.stdout.startswith("usage: fmnist"), proc.stderr
    assert all(f in proc.stdout for f in flags), proc.stdout
