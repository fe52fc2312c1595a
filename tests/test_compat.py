"""The original victoresque/pytorch-template config.json runs unchanged (only epochs, save_dir and data_dir are
overridden), on fake MNIST raw files written offline from a few hundred mnist5k images."""
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import train
from tests.helpers import DATA, error_line, evaluate, read_csv_rows, read_history, run_dirs

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "victoresque_config.json"
N_TRAIN, N_TEST = 400, 100


def write_idx(folder, prefix, csv_name, image_dir, n):
    """MNIST's raw idx files (uncompressed: torchvision only checks that they exist) for the first n rows."""
    rows = read_csv_rows(DATA / csv_name)[:n]
    images = np.stack([np.array(Image.open(DATA / image_dir / f"{row['id']}.png")) for row in rows])
    labels = np.array([int(row["label"]) for row in rows], dtype=np.uint8)
    assert images.shape == (n, 28, 28) and images.dtype == np.uint8
    (folder / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x0803, n, 28, 28) + images.tobytes())
    (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x0801, n) + labels.tobytes())
    return labels


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("mnist_data")
    raw = data_dir / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx(raw, "train", "train.csv", "train", N_TRAIN)
    test_labels = write_idx(raw, "t10k", "test_labels.csv", "test", N_TEST)
    return data_dir, test_labels


def test_fixture_is_the_original_config():
    config = json.loads(FIXTURE.read_text())
    assert config["data_loader"] == {"type": "MnistDataLoader", "args": {
        "data_dir": "data/", "batch_size": 128, "shuffle": True, "validation_split": 0.1, "num_workers": 2}}
    assert config["optimizer"] == {"type": "Adam", "args": {"lr": 0.001, "weight_decay": 0, "amsgrad": True}}
    assert config["trainer"] == {"epochs": 100, "save_dir": "saved/", "save_period": 1, "verbosity": 2,
                                 "monitor": "min val_loss", "early_stop": 10, "tensorboard": True}


def test_original_config_trains_and_tests(mnist_dir, tmp_path):
    data_dir, test_labels = mnist_dir
    save_dir = tmp_path / "saved"
    code = train.main(["-c", str(FIXTURE), "-o", "trainer.epochs=1", "-o", f"trainer.save_dir={save_dir}",
                       "-o", f"data_loader.args.data_dir={data_dir}"])
    assert code == 0
    (run,) = run_dirs(save_dir, "Mnist_LeNet")
    for name in ("checkpoint-last.pth", "checkpoint-epoch1.pth", "model_best.pth", "config.json", "history.csv"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    (row,) = read_history(run)
    assert {"loss", "accuracy", "top_k_acc", "val_loss", "val_accuracy", "val_top_k_acc"} <= row.keys()
    saved = json.loads((run / "config.json").read_text())
    assert saved["trainer"]["epochs"] == 1 and saved["data_loader"]["args"]["num_workers"] == 2

    assert evaluate(["-r", str(run / "model_best.pth")]) == 0
    out = run / "test-model_best"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_samples"] == N_TEST and {"loss", "accuracy", "top_k_acc"} <= metrics.keys()
    predictions = read_csv_rows(out / "predictions.csv")
    assert [p["id"] for p in predictions] == [str(i) for i in range(N_TEST)]
    hits = sum(int(p["label"]) == label for p, label in zip(predictions, test_labels))
    assert metrics["accuracy"] == pytest.approx(hits / N_TEST)


def test_missing_mnist_offline_is_one_line(tmp_path, monkeypatch, capsys):
    from torchvision.datasets import MNIST

    monkeypatch.setattr(MNIST, "mirrors", ["http://127.0.0.1:9/"])  # refused at once: offline, whatever the network
    code = train.main(["-c", str(FIXTURE), "-o", "trainer.epochs=1", "-o", f"trainer.save_dir={tmp_path / 'saved'}",
                       "-o", f"data_loader.args.data_dir={tmp_path / 'empty'}"])
    assert code == 2
    line = error_line(capsys)
    assert "MNIST" in line and str(tmp_path / "empty") in line
