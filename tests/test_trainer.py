"""The Fashion-MNIST trainer on a tiny synthetic set written in the real format (gzip IDX files).

Covers finding and verifying the data, the errors for corrupt or missing data, a 2-epoch run with
every output file, exact resumption (after a finished epoch and after Ctrl-C mid-epoch), and the
fused loss training to the same parameters as PyTorch's.
"""

from __future__ import annotations

import gzip
import json
import signal
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from softmax_ext.fashion_mnist import data as D
from softmax_ext.fashion_mnist import recipe as R
from softmax_ext.fashion_mnist import train as T
from softmax_ext.fashion_mnist.checkpoint import save_checkpoint
from softmax_ext.fashion_mnist.loop import Trainer

N_TRAIN, N_TEST = 320, 96
REAL_DEBIAN_FILES = D.debian_files  # before the fixture below hides it


def _images_and_labels(n: int, seed: int) -> tuple:
    """Learnable images: class c lights up rows 2c..2c+4, plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.uint8) % 10
    rng.shuffle(labels)
    images = rng.integers(0, 90, size=(n, 28, 28), dtype=np.uint8)
    for i, c in enumerate(labels):
        images[i, 2 * c + 2 : 2 * c + 6, 4:24] = 230
    return images, labels


def write_idx(folder: Path, name: str, array: np.ndarray, gz: bool = True) -> Path:
    """Write ``array`` as an IDX file (images when 3-D, labels when 1-D)."""
    if array.ndim == 3:
        header = struct.pack(">iiii", D.IMAGE_MAGIC, len(array), 28, 28)
    else:
        header = struct.pack(">ii", D.LABEL_MAGIC, len(array))
    payload = header + array.astype(np.uint8).tobytes()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (name + ".gz" if gz else name)
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)
    return path


def write_set(folder: Path, gz: bool = True) -> Path:
    """A tiny Fashion-MNIST in ``folder``: 320 training and 96 test images."""
    for split, n, seed in (("train", N_TRAIN, 0), ("test", N_TEST, 1)):
        images, labels = _images_and_labels(n, seed)
        write_idx(folder, D.IMAGES[split], images, gz)
        write_idx(folder, D.LABELS[split], labels, gz)
    return folder


@pytest.fixture(autouse=True)
def _no_outside_data(monkeypatch):
    """Tests see only the data they write: no $FASHION_MNIST_DIR, no Debian package, no network."""
    monkeypatch.delenv(D.ENV_VAR, raising=False)
    monkeypatch.setattr(D, "debian_files", lambda: None)

    def no_download(data_dir):
        raise RuntimeError("network disabled in tests")

    monkeypatch.setattr(D, "_download", no_download)


@pytest.fixture
def source(tmp_path) -> Path:
    return write_set(tmp_path / "src")


def run(tmp_path: Path, source: Path, out: str, *extra: str) -> int:
    return T.main(
        [
            "--data-dir",
            str(source),
            "--out",
            str(tmp_path / out),
            "--batch-size",
            "32",
            "--device",
            "cpu",
            *extra,
        ]
    )


def final_params(out: Path) -> dict:
    return torch.load(out / "checkpoint.pt", weights_only=True)["model"]


# ------------------------------------------------------------------------------------------------
# Finding, verifying, loading


def test_env_dir_is_found_verified_and_prepared_for_torchvision(tmp_path, source, monkeypatch):
    monkeypatch.setenv(D.ENV_VAR, str(source))
    root, origin = D.locate(tmp_path / "data", download=False)
    assert D.ENV_VAR in origin
    assert root == tmp_path / "data"
    for name in D.FILE_NAMES:  # decompressed where torchvision's check_exists looks
        assert (root / "FashionMNIST" / "raw" / name).is_file()
    data = D.load(tmp_path / "data", "cpu", download=False)
    assert data.origin.startswith("--data-dir")  # prepared now, so found there first
    assert data.train_x.shape == (N_TRAIN, 1, 28, 28) and data.test_x.shape == (N_TEST, 1, 28, 28)
    assert data.train_x.dtype == torch.float32
    assert 0.0 <= data.train_x.min() and data.train_x.max() <= 1.0
    images, labels = _images_and_labels(N_TRAIN, 0)
    assert torch.equal(data.train_y, torch.from_numpy(labels).long())
    assert torch.equal(data.train_x[:, 0], torch.from_numpy(images).float() / 255)


def test_data_dir_comes_before_env(tmp_path, source, monkeypatch):
    other = tmp_path / "other"
    write_set(other / "FashionMNIST" / "raw", gz=False)  # torchvision's layout, decompressed
    monkeypatch.setenv(D.ENV_VAR, str(source))
    root, origin = D.locate(other, download=False)
    assert origin.startswith("--data-dir") and root == other


def test_debian_package_is_used_when_nothing_else(tmp_path, source, monkeypatch):
    monkeypatch.setattr(D, "debian_files", lambda: {n: source / (n + ".gz") for n in D.FILE_NAMES})
    root, origin = D.locate(tmp_path / "data", download=False)
    assert "Debian" in origin and (root / "FashionMNIST" / "raw" / D.FILE_NAMES[0]).is_file()


def test_torchvision_download_is_the_last_resort(tmp_path, source, monkeypatch):
    def fake_download(data_dir):
        write_set(Path(data_dir) / "FashionMNIST" / "raw", gz=False)
        return Path(data_dir)

    monkeypatch.setattr(D, "_download", fake_download)
    root, origin = D.locate(tmp_path / "data")
    assert origin == "torchvision download" and root == tmp_path / "data"


def test_the_real_debian_package_passes_verification():
    files = REAL_DEBIAN_FILES()
    if files is None:
        pytest.skip(f"Debian's {D.DEBIAN_PACKAGE} is not installed")
    contents = D.verify(files)  # structure and the real set's md5 sums
    assert len(contents[D.IMAGES["train"]]) == 16 + 60000 * 784


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _flip_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def _bad_label(path: Path) -> None:
    write_idx(path.parent, D.LABELS["train"], np.full(N_TRAIN, 12, np.uint8))


def _bad_magic(path: Path) -> None:
    with gzip.open(path, "rb") as f:
        content = bytearray(f.read())
    content[3] = 0x01
    with gzip.open(path, "wb") as f:
        f.write(bytes(content))


def _short_payload(path: Path) -> None:
    images, _ = _images_and_labels(N_TRAIN, 0)
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">iiii", D.IMAGE_MAGIC, N_TRAIN, 28, 28) + images.tobytes()[:-784])


def _count_mismatch(path: Path) -> None:
    write_idx(path.parent, D.LABELS["train"], np.zeros(N_TRAIN - 1, np.uint8))


@pytest.mark.parametrize(
    "corrupt, file, message",
    [
        (_truncate, D.IMAGES["train"], "truncated"),
        (_flip_byte, D.IMAGES["train"], "corrupt"),
        (_bad_label, D.LABELS["train"], "out of range"),
        (_bad_magic, D.IMAGES["train"], "magic number"),
        (_short_payload, D.IMAGES["train"], "header announces"),
        (_count_mismatch, D.IMAGES["train"], "labels"),
    ],
)
def test_corrupt_file_is_named_in_a_clear_error(tmp_path, source, corrupt, file, message):
    corrupt(source / (file + ".gz"))
    with pytest.raises(D.DataError, match=message) as err:
        D.locate(source, download=False)
    assert file in str(err.value)
    assert not (source / "FashionMNIST" / "raw" / D.IMAGES["train"]).exists()


def test_corrupt_file_stops_the_trainer(tmp_path, source, capsys):
    _truncate(source / (D.IMAGES["test"] + ".gz"))
    assert run(tmp_path, source, "out", "--epochs", "1") == 1
    assert D.IMAGES["test"] in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_file_with_the_real_size_must_have_the_real_content(tmp_path, source):
    write_idx(source, D.LABELS["test"], np.zeros(10000, np.uint8))
    write_idx(source, D.IMAGES["test"], np.zeros((10000, 28, 28), np.uint8))
    with pytest.raises(D.DataError, match="md5"):
        D.locate(source, download=False)


def test_partial_set_is_named(tmp_path, source):
    (source / (D.LABELS["test"] + ".gz")).unlink()
    with pytest.raises(D.DataError, match=D.LABELS["test"]):
        D.locate(source, download=False)


def test_no_data_anywhere_names_the_three_ways(tmp_path, capsys):
    with pytest.raises(D.DataError) as err:
        D.locate(tmp_path / "empty")
    text = str(err.value)
    assert (
        "--data-dir" in text
        and D.ENV_VAR in text
        and "apt-get install dataset-fashion-mnist" in text
        and "download failed" in text
    )
    assert T.main(["--data-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 1
    assert D.ENV_VAR in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# Training runs


def test_defaults_are_the_chapters_recipe():
    config = R.make_config(T.parse_args([]), torch.device("cpu"))
    assert {
        k: config[k]
        for k in ("model", "loss", "epochs", "batch_size", "lr", "optimizer", "label_smoothing")
    } == {
        "model": "softmax",
        "loss": "fused",
        "epochs": 10,
        "batch_size": 256,
        "lr": 0.1,
        "optimizer": "sgd",
        "label_smoothing": 0.0,
    }


def test_two_epoch_run_writes_every_output(tmp_path, source, capsys):
    assert run(tmp_path, source, "out", "--epochs", "2") == 0
    out = tmp_path / "out"
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("epoch ")]
    assert len(lines) == 2 and lines[1].startswith("epoch 2, loss ") and "test acc" in lines[1]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["model"] == "softmax" and metrics["config"]["epochs"] == 2
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    assert set(metrics["epochs"][0]) == {"epoch", "train_loss", "train_acc", "test_acc", "seconds"}
    assert metrics["train_seconds"] == pytest.approx(
        sum(e["seconds"] for e in metrics["epochs"]), abs=1e-3
    )
    assert metrics["epochs"][1]["train_loss"] < metrics["epochs"][0]["train_loss"]
    for name in ("curves.png", "predictions.png", "confusion.png", "checkpoint.pt"):
        assert (out / name).stat().st_size > 0, name
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no temp files


@pytest.mark.parametrize("model", ["softmax", "scratch", "mlp"])
def test_fused_and_torch_losses_end_with_the_same_parameters(tmp_path, source, model):
    data = D.load(source, "cpu", download=False)
    params = {}
    for loss in ("fused", "torch"):
        args = T.parse_args(
            ["--model", model, "--loss", loss, "--label-smoothing", "0.1", "--batch-size", "32"]
        )
        config = R.make_config(args, torch.device("cpu"))
        trainer = Trainer(
            *R.build(config, torch.device("cpu")),
            data.train_x,
            data.train_y,
            data.test_x,
            data.test_y,
            config["batch_size"],
            config["seed"],
        )
        assert trainer.run(2, on_epoch=lambda e: None)
        params[loss] = trainer.model.state_dict()
    assert params["fused"].keys() == params["torch"].keys()
    for k, v in params["fused"].items():
        assert torch.allclose(v, params["torch"][k], rtol=1e-5, atol=1e-6), k
    assert not torch.equal(
        params["fused"][k], R.build(config, torch.device("cpu"))[0].state_dict()[k]
    )  # it did train


@pytest.mark.parametrize("model", ["softmax", "mlp"])
def test_fused_linear_head_trains_like_the_fused_loss(tmp_path, source, model):
    """--loss fused-linear: the output layer and the loss are one LinearCrossEntropyLoss; from
    the same seed it ends with the parameters of --loss fused (renamed: head.linear.* instead of
    the last layer's), and the same epoch metrics."""
    data = D.load(source, "cpu", download=False)
    params, history = {}, {}
    for loss in ("fused", "fused-linear"):
        args = T.parse_args(
            ["--model", model, "--loss", loss, "--label-smoothing", "0.1", "--batch-size", "32"]
        )
        config = R.make_config(args, torch.device("cpu"))
        model_, loss_fn, opt = R.build(config, torch.device("cpu"))
        assert (loss_fn is None) == (loss == "fused-linear")
        trainer = Trainer(
            model_, loss_fn, opt, data.train_x, data.train_y, data.test_x, data.test_y,
            config["batch_size"], config["seed"],
        )  # fmt: skip
        assert trainer.run(2, on_epoch=lambda e: None)
        params[loss] = list(trainer.model.state_dict().values())
        history[loss] = trainer.progress.history
    assert len(params["fused"]) == len(params["fused-linear"])
    for a, b in zip(params["fused"], params["fused-linear"], strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(history["fused"], history["fused-linear"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["test_acc"] == b["test_acc"]
    with pytest.raises(ValueError, match="fused-linear"):
        R.build(
            R.make_config(
                T.parse_args(["--model", "scratch", "--loss", "fused-linear"]),
                torch.device("cpu"),
            ),
            torch.device("cpu"),
        )


def test_resume_after_an_epoch_matches_an_uninterrupted_run(tmp_path, source):
    flags = ("--model", "mlp", "--optimizer", "adam", "--lr-schedule", "cosine")
    assert run(tmp_path, source, "straight", "--epochs", "2", *flags) == 0
    assert run(tmp_path, source, "resumed", "--epochs", "1", *flags) == 0
    # Resuming takes the run's settings from the checkpoint; only --epochs may change.
    assert run(tmp_path, source, "resumed", "--epochs", "2", "--resume") == 0
    straight, resumed = final_params(tmp_path / "straight"), final_params(tmp_path / "resumed")
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    a = json.loads((tmp_path / "straight" / "metrics.json").read_text())["epochs"]
    b = json.loads((tmp_path / "resumed" / "metrics.json").read_text())["epochs"]
    assert [e["train_loss"] for e in a] == [e["train_loss"] for e in b]


def test_ctrl_c_saves_mid_epoch_and_resume_continues_exactly(tmp_path, source, monkeypatch):
    assert run(tmp_path, source, "straight", "--epochs", "2") == 0
    real_bar = T._tqdm

    def interrupting_bar(iterable, **kwargs):
        for i, step in enumerate(real_bar(iterable, **kwargs)):
            if kwargs["desc"] == "epoch 2" and i == 3:
                signal.raise_signal(signal.SIGINT)  # as Ctrl-C would, between two steps
            yield step

    monkeypatch.setattr(T, "_tqdm", interrupting_bar)
    before = signal.getsignal(signal.SIGINT)
    assert run(tmp_path, source, "resumed", "--epochs", "2") == 130
    state = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert state["progress"]["epoch"] == 1 and state["progress"]["step"] == 3
    monkeypatch.setattr(T, "_tqdm", real_bar)
    assert signal.getsignal(signal.SIGINT) is before  # the trainer's handler is gone
    assert run(tmp_path, source, "resumed", "--resume") == 0
    straight, resumed = final_params(tmp_path / "straight"), final_params(tmp_path / "resumed")
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k


def test_resume_without_checkpoint_is_an_error(tmp_path, source, capsys):
    assert run(tmp_path, source, "nothing", "--resume") == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    save_checkpoint({"v": 1}, tmp_path)

    def failing_save(obj, path):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError):
        save_checkpoint({"v": 2}, tmp_path)
    monkeypatch.undo()
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_loss_in_trainer_benchmark_alternates_both_losses(tmp_path, source):
    from benchmarks import loss_in_trainer

    assert (
        loss_in_trainer.main(
            ["--epochs", "2", "--data-dir", str(source), "--out", str(tmp_path / "res")]
        )
        == 0
    )
    doc = json.loads((tmp_path / "res" / "loss_in_trainer.json").read_text())
    assert len(doc["seconds"]["fused"]) == len(doc["seconds"]["torch"]) == 2
    assert doc["ratio_fused_over_torch"] > 0 and doc["same_parameters"] is True
