"""Plain helpers for the tests: paths, a small valid config, run-folder readers, and the one check for a failed
command's output (exactly one `error: ...` line on stderr, no traceback).

Every path handed to the code under test is absolute (derived from this file), so the suite does not depend on
the directory pytest is started from. Fixtures and pytest hooks live in conftest.py.
"""
import atexit
import copy
import csv
import importlib.util
import json
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _stand_in_data(n_train=600, n_test=200):
    """A learnable stand-in for data/mnist5k in the same layout, for copies made without the sample images
    (new_project.py): each class is a bright square at its own place on a noisy background. It lies inside the
    project (under saved/), as the sample data does: a checkpoint may name images only there or in its data folder."""
    import numpy as np
    from torchvision.io import write_png

    folder = Path(tempfile.mkdtemp(prefix=".mnist5k-stand-in-", dir=REPO / "saved"))
    atexit.register(shutil.rmtree, folder, True)
    rng = np.random.default_rng(0)
    rows = {"train": [], "test": []}
    for i in range(n_train + n_test):
        split, label = ("train" if i < n_train else "test"), i % 10
        image = rng.integers(0, 60, (1, 28, 28), dtype=np.uint8)
        top, left = 2 + 8 * (label // 4), 2 + 8 * (label % 4)
        image[:, top:top + 7, left:left + 7] = 255
        (folder / split).mkdir(exist_ok=True)
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its image codecs on every call
            warnings.simplefilter("ignore", DeprecationWarning)
            write_png(torch.from_numpy(image), str(folder / split / f"{i:05d}.png"))
        rows[split].append(f"{i:05d},{label}")
    (folder / "train.csv").write_text("id,label\n" + "\n".join(rows["train"]) + "\n")
    (folder / "test_labels.csv").write_text("id,label\n" + "\n".join(rows["test"]) + "\n")
    (folder / "test.csv").write_text("id\n" + "\n".join(r.split(",")[0] for r in rows["test"]) + "\n")
    return folder


DATA = REPO / "data" / "mnist5k"
if not (DATA / "train.csv").exists():
    DATA = _stand_in_data()

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


_scripts = {}


def evaluate(argv):
    """`python test.py ARGV` in-process: the exit code of test.py's main(). test.py is loaded from its path
    (`import test` would find the standard library's `test` package) on first use, not at collection."""
    if "test" not in _scripts:
        spec = importlib.util.spec_from_file_location("template_test_script", REPO / "test.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _scripts["test"] = module
    return _scripts["test"].main([str(a) for a in argv])


N_TRAIN = 300  # rows of data/mnist5k/train.csv in the slice
N_TEST = 100  # rows of data/mnist5k/test_labels.csv / test.csv in the slice
BATCH_SIZE = 32
VALIDATION_SPLIT = 0.2


def make_config(data_dir, save_dir, **trainer):
    """A small, valid config in the shape of the shipped config.json: ConvNet, CsvImageDataLoader, AdamW,
    OneCycleLR, accuracy/top_k_acc/macro_f1, monitored on val_accuracy. `trainer` entries override trainer keys."""
    config = {
        "name": "tiny",
        "n_gpu": 0,
        "seed": 1,
        "arch": {"type": "ConvNet", "args": {"num_classes": 10, "in_channels": 1, "width": 8}},
        "data_loader": {
            "type": "CsvImageDataLoader",
            "args": {
                "data_dir": str(data_dir),
                "train_images": str(DATA / "train"),
                "test_images": str(DATA / "test"),
                "batch_size": BATCH_SIZE,
                "shuffle": True,
                "validation_split": VALIDATION_SPLIT,
                "num_workers": 0,
                "test_csv": "test_labels.csv",
                "mean": [0.1307],
                "std": [0.3081],
            },
        },
        "optimizer": {"type": "AdamW", "args": {"lr": 0.003, "weight_decay": 0.0001}},
        "loss": "cross_entropy",
        "metrics": ["accuracy", "top_k_acc", "macro_f1"],
        "lr_scheduler": {"type": "OneCycleLR", "args": {"max_lr": 0.003}},
        "trainer": {
            "epochs": 2,
            "save_dir": str(save_dir),
            "save_period": 0,
            "verbosity": 1,
            "monitor": "max val_accuracy",
            "early_stop": 0,
            "tensorboard": False,
            "log_step": 2,
        },
    }
    config["trainer"].update(trainer)
    return config


def write_config(config, path):
    path = Path(path)
    path.write_text(json.dumps(config, indent=4))
    return path


def clone(config):
    return copy.deepcopy(config)


def run_dirs(save_dir, name="tiny"):
    """The run folders under save_dir/name, oldest first."""
    parent = Path(save_dir) / name
    return sorted((p for p in parent.iterdir() if p.is_dir()), key=lambda p: p.name) if parent.is_dir() else []


def load(path):
    """A saved checkpoint as the project loads one: plain data only (weights_only), onto the CPU."""
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(a, b):
    """Two state dicts with the same keys and bitwise-equal tensors."""
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def read_history(run_dir):
    """history.csv as a list of dicts of strings (exact values, as a user would read them)."""
    with open(Path(run_dir) / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def read_csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --- a failed command's output --------------------------------------------------------------------------------------

def the_only_line(stderr, stdout="", shown=""):
    """The single line on stderr, with no traceback on stderr or stdout. `shown` is added to failure messages."""
    assert "Traceback" not in stderr + stdout, f"a traceback was printed{shown or chr(10) + stderr}"
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected exactly one line on stderr{shown or ', got:' + chr(10) + stderr}"
    return lines[0]


def stderr_error_line(stderr, stdout="", shown=""):
    """The single `error: ...` line a failed command printed on stderr (no other line, no traceback anywhere)."""
    line = the_only_line(stderr, stdout, shown)
    assert line.startswith("error: "), f"{line}{shown}"
    return line


def error_line(capsys):
    """The single `error: ...` line an in-process command printed on stderr (read from pytest's capsys)."""
    captured = capsys.readouterr()
    return stderr_error_line(captured.err, captured.out)


def shown(proc):
    """A finished process (returncode, stdout, stderr) as text for a failure message."""
    return f"\nexit code {proc.returncode}\n--- stderr ---\n{proc.stderr}\n--- stdout ---\n{proc.stdout}"


def process_error_line(proc):
    """The single `error: ...` line a finished subprocess (text mode) printed on stderr."""
    return stderr_error_line(proc.stderr, proc.stdout, shown(proc))


def fails(config, tmp_path, capsys, *extra):
    """Run train.py on `config`; assert exit code 2, nothing written under save_dir, and return the error line."""
    import train

    path = write_config(config, tmp_path / "config.json")
    assert train.main(["-c", str(path), *extra]) == 2
    assert not (tmp_path / "saved").exists(), "a rejected config must not create a run folder"
    return error_line(capsys)
