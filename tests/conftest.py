"""Fixtures and pytest hooks. The plain helpers (paths, configs, readers, the error-line check) are in helpers.py."""
from pathlib import Path

import pytest

from tests.helpers import DATA, N_TEST, N_TRAIN, make_config


def pytest_configure(config):
    # torchvision 0.29 warns on every decoded image that torchvision.io is deprecated; one note, not hundreds
    config.addinivalue_line("filterwarnings", "ignore:The image decoding and encoding capabilities of TorchVision"
                                              ":DeprecationWarning")


def _head(src, dst, n_rows):
    lines = Path(src).read_text().splitlines(keepends=True)
    Path(dst).write_text("".join(lines[: n_rows + 1]))


@pytest.fixture(scope="session", autouse=True)
def one_cpu_thread():
    """The models here are tiny: one intra-op thread beats two fighting over a small (often busy) machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def data_slice(tmp_path_factory):
    """A data folder with train.csv (300 labelled rows), test_labels.csv and test.csv (the same 100 test ids).

    The images stay in the repository: configs point `train_images`/`test_images` at them by absolute path.
    """
    folder = tmp_path_factory.mktemp("mnist5k_slice")
    _head(DATA / "train.csv", folder / "train.csv", N_TRAIN)
    _head(DATA / "test_labels.csv", folder / "test_labels.csv", N_TEST)
    _head(DATA / "test.csv", folder / "test.csv", N_TEST)
    return folder


@pytest.fixture
def config(data_slice, tmp_path):
    """A fresh small config dict whose runs go under tmp_path/saved."""
    return make_config(data_slice, tmp_path / "saved")
