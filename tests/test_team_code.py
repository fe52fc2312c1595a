"""A team's own code in a copy, as it is usually written: a model whose heads come back as a dict, a dataset whose
targets are tuples, and an undersampling collate function that must never touch validation, out-of-fold or test
predictions."""
import json

import pytest
import torch

import train
from tests.helpers import DATA, N_TEST, N_TRAIN, evaluate, fails, make_config, read_csv_rows, write_config

TEAM_CODE = '''
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from base import BaseDataLoader
from base.base_data_loader import collate
from data_loader.data_loaders import ImageTransform
from data_loader.datasets import CsvImageDataset
from utils.task import Task


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.digit, self.parity = nn.Linear(128, 10), nn.Linear(128, 2)

    def forward(self, x):
        h = self.body(x)
        return {"parity": self.parity(h), "digit": self.digit(h)}


class DigitParity(Dataset):
    task = Task("multiclass", (("digit", tuple(range(10))), ("parity", ("even", "odd"))))

    def __init__(self, csv_file, image_dir):
        self.images = CsvImageDataset(csv_file, image_dir, classes=list(range(10)), cache=False,
                                      transform=ImageTransform([], [0.13], [0.31]))
        digits = self.images.targets
        self.targets = None if digits is None else [(d, d % 2) for d in digits]
        self.ids, self.classes = self.images.ids, self.task.columns

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        image, _ = self.images[i]
        return image, self.targets[i] if self.targets else (-1, -1)


class Misfit(TwoHeads):
    def __init__(self, how):
        super().__init__()
        self.how = how

    def forward(self, x):
        h = self.body(x)
        if self.how == "swapped":
            return self.parity(h), self.digit(h)
        if self.how == "missing":
            return self.digit(h), None
        if self.how == "extra":
            return {"digit": self.digit(h), "parity": self.parity(h), "aux": self.parity(h)}
        if self.how == "integer":
            return self.digit(h), self.parity(h).long()
        return self.digit(h) * float("nan"), self.parity(h)


class AuxHeads(TwoHeads):
    """The heads as a tuple, and after them an auxiliary digit head that only the loss uses."""

    def __init__(self):
        super().__init__()
        self.aux = nn.Linear(128, 10)

    def forward(self, x):
        h = self.body(x)
        return self.digit(h), self.parity(h), self.aux(h)


class TeamLoss(nn.Module):
    def __init__(self, how="right"):
        super().__init__()
        self.how = how

    def forward(self, output, target):
        digit, parity, aux = output
        digit_target, parity_target = target
        if self.how == "per_sample":
            return F.cross_entropy(digit, digit_target, reduction="none")
        if self.how == "broadcast":
            return F.mse_loss(parity[:, :1], parity_target.float())
        return F.cross_entropy(digit, digit_target) + F.cross_entropy(parity, parity_target) + \
            0.4 * F.cross_entropy(aux, digit_target)


def undersample(samples):
    return collate(samples[::2])


def stack_pairs(samples):
    images, labels = zip(*samples)
    return torch.stack(images), torch.tensor(labels)


class DigitsLoader(BaseDataLoader):
    def __init__(self, data_dir, images, batch_size, shuffle=True, validation_split=0.2, num_workers=0,
                 training=True, seed=0):
        csv = "train.csv" if training else "test_labels.csv"
        dataset = CsvImageDataset(f"{data_dir}/{csv}", images + ("/train" if training else "/test"),
                                  classes=list(range(10)), transform=ImageTransform([], [0.13], [0.31]))
        super().__init__(dataset, batch_size, shuffle, validation_split, num_workers, collate_fn=stack_pairs,
                         seed=seed)


class DigitParityLoader(BaseDataLoader):
    def __init__(self, data_dir, images, batch_size, shuffle=True, validation_split=0.2, num_workers=0,
                 training=True, n_folds=0, fold=0, seed=0):
        csv = "train.csv" if training else "test_labels.csv"
        dataset = DigitParity(f"{data_dir}/{csv}", images + ("/train" if training else "/test"))
        super().__init__(dataset, batch_size, shuffle, validation_split, num_workers, collate_fn=undersample,
                         n_folds=n_folds, fold=fold, seed=seed)
'''


def team_config(data_slice, save_dir):
    config = make_config(data_slice, save_dir, epochs=1)
    config.update(import_roots=["team"], arch={"type": "team.TwoHeads", "args": {}}, metrics=["accuracy"],
                  data_loader={"type": "team.DigitParityLoader",
                               "args": {"data_dir": str(data_slice), "images": str(DATA), "batch_size": 32,
                                        "n_folds": 2}},
                  head_weights=[1.0, 0.5])
    config["trainer"]["monitor"] = "max val_accuracy_digit"
    return config


@pytest.fixture(scope="module")
def team_code(tmp_path_factory):
    folder = tmp_path_factory.mktemp("team")
    (folder / "team").mkdir()
    (folder / "team" / "__init__.py").write_text(TEAM_CODE)
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(folder))
        yield folder


@pytest.fixture(scope="module")
def team_run(team_code, data_slice):
    config = team_config(data_slice, team_code / "saved")
    path = team_code / "config.json"
    path.write_text(json.dumps(config))
    assert train.main(["-c", str(path), "--folds", "all"]) == 0
    return next((team_code / "saved" / config["name"]).iterdir())


def test_dict_heads_and_tuple_targets_train_into_per_head_metrics(team_run):
    group = team_run
    metrics = json.loads((group / "oof_metrics.json").read_text())
    assert {"accuracy", "accuracy_digit", "accuracy_parity"} <= set(metrics)
    table = read_csv_rows(group / "oof.csv")
    assert list(table[0])[:3] == ["id", "target:digit", "target:parity"]
    probabilities = torch.tensor([[float(v) for k, v in row.items() if ":" in k and not k.startswith("target")]
                                  for row in table])
    assert torch.allclose(probabilities[:, :10].sum(dim=1), torch.ones(len(table)), atol=1e-5)
    digits = probabilities[:, :10].argmax(dim=1)
    truth = torch.tensor([int(row["target:digit"]) for row in table])
    assert metrics["accuracy_digit"] == pytest.approx((digits == truth).double().mean().item(), abs=1e-6)


def test_a_training_collate_function_never_touches_out_of_fold_or_test_predictions(team_run, tmp_path):
    group = team_run
    assert json.loads((group / "oof_metrics.json").read_text())["n_samples"] == N_TRAIN
    assert len(read_csv_rows(group / "oof.csv")) == N_TRAIN
    assert evaluate(["-r", group, "-o", 'import_roots=["team"]', "--out", tmp_path / "test"]) == 0
    rows = read_csv_rows(tmp_path / "test" / "predictions.csv")
    assert len(rows) == N_TEST and list(rows[0]) == ["id", "digit", "parity"]
    assert json.loads((tmp_path / "test" / "metrics.json").read_text())["n_samples"] == N_TEST
    assert evaluate(["-r", group / "fold1", "-o", 'import_roots=["team"]', "--split", "valid",
                     "--out", tmp_path / "valid"]) == 0
    assert len(read_csv_rows(tmp_path / "valid" / "predictions.csv")) == N_TRAIN // 2


@pytest.mark.parametrize("how, culprit", [("swapped", "widths [10, 2]"), ("missing", "NoneType"), ("nan", "nan"),
                                          ("extra", "'aux'"), ("integer", "int64")])
def test_heads_that_do_not_fit_are_one_line_before_anything_is_written(how, culprit, team_code, data_slice,
                                                                       tmp_path, capsys):
    config = team_config(data_slice, tmp_path / "saved")
    config["arch"] = {"type": "team.Misfit", "args": {"how": how}}
    assert culprit in fails(config, tmp_path, capsys)


def test_a_loss_of_its_own_takes_the_whole_output_and_one_target_per_head(team_code, data_slice, tmp_path):
    config = team_config(data_slice, tmp_path / "saved")
    del config["head_weights"]
    config.update(arch={"type": "team.AuxHeads", "args": {}}, loss={"type": "team.TeamLoss", "args": {}})
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    assert train.main(["-c", str(path), "--fold", "0"]) == 0
    run = next((tmp_path / "saved" / config["name"]).iterdir())
    assert evaluate(["-r", run / "model_best.pth", "-o", 'import_roots=["team"]', "--out", tmp_path / "test"]) == 0
    rows = read_csv_rows(tmp_path / "test" / "predictions.csv")
    assert len(rows) == N_TEST and list(rows[0]) == ["id", "digit", "parity"]
    assert {"loss", "accuracy_digit", "accuracy_parity"} <= set(json.loads((tmp_path / "test" / "metrics.json")
                                                                          .read_text()))


@pytest.mark.parametrize("arch, loss, culprit", [
    ("AuxHeads", None, "'part 2' beyond its heads"),
    ("AuxHeads", {"how": "per_sample"}, "TeamLoss returns [16]"),
    ("AuxHeads", {"how": "broadcast"}, "TeamLoss compares tensors of different shapes"),
    ("TwoHeads", {}, "loss: cannot take"),
])
def test_a_loss_that_does_not_fit_the_output_is_one_line_before_anything_is_written(arch, loss, culprit, team_code,
                                                                                    data_slice, tmp_path, capsys):
    config = team_config(data_slice, tmp_path / "saved")
    del config["head_weights"]
    config["arch"] = {"type": f"team.{arch}", "args": {}}
    if loss is not None:
        config["loss"] = {"type": "team.TeamLoss", "args": loss}
    assert culprit in fails(config, tmp_path, capsys)


def test_a_collate_function_of_pairs_gets_samples_from_a_data_set_that_serves_whole_batches(team_code, data_slice,
                                                                                          tmp_path):
    config = make_config(data_slice, tmp_path / "saved", epochs=1)
    config.update(import_roots=["team"], data_loader={"type": "team.DigitsLoader", "args": {
        "data_dir": str(data_slice), "images": str(DATA), "batch_size": 32}})
    assert train.main(["-c", str(write_config(config, tmp_path / "config.json"))]) == 0
