"""The changes competition teams make to a copy, each as a team writes it: a project module (a package named in
`import_roots`) and a config, or a short script around train.main and test.py. Each trains, and resumes exactly."""
import csv
import importlib
import json
import textwrap

import pytest

import train
from base.hooks import Hook
from tests.helpers import DATA, assert_same_tensors, evaluate, fails, load, read_history, run_dirs, write_config


@pytest.fixture
def project(tmp_path, monkeypatch):
    """Write a team's package `name` (its __init__.py holding `code`) where the config's import_roots find it."""
    def write(name, code):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(textwrap.dedent(code))
        monkeypatch.syspath_prepend(str(tmp_path))
        importlib.invalidate_caches()
        return name
    return write


def trained(config, tmp_path, hooks=()):
    made = train.main(["-c", str(write_config(config, tmp_path / f"{config['name']}.json"))], hooks=hooks)
    assert made == 0
    return made.run_dir


def assert_resumes_exactly(run_dir, epoch=1, roots=()):
    """Resumed from `epoch`'s checkpoint (trusting the team's packages `roots` again: a checkpoint never imports by
    itself), the run ends with the same weights, optimizer state and history."""
    trust = ["-o", f"import_roots={json.dumps(list(roots))}"] if roots else []
    resumed = train.main(["-r", str(run_dir / f"checkpoint-epoch{epoch}.pth"), *trust]).run_dir
    assert resumed != run_dir
    mine, reference = load(resumed / "checkpoint-last.pth"), load(run_dir / "checkpoint-last.pth")
    assert_same_tensors(mine["state_dict"], reference["state_dict"])
    for a, b in zip(mine["optimizer"]["state"].values(), reference["optimizer"]["state"].values(), strict=True):
        assert_same_tensors(a, b)
    assert read_history(resumed) == read_history(run_dir)[epoch:]


def small(config, epochs=2, **trainer):
    config["trainer"].update(epochs=epochs, save_period=1, limit_train_batches=3, limit_val_batches=1, **trainer)
    return config


SAM = """
    import torch

    class SAM(torch.optim.Optimizer):
        '''Sharpness-aware minimisation: step to the worst point within rho, take the gradient there, step back.'''

        def __init__(self, params, lr=0.01, rho=0.05):
            super().__init__(params, {"lr": lr, "rho": rho})

        @torch.no_grad()
        def step(self, closure):
            params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
            norm = torch.stack([p.grad.norm() for p in params]).norm()
            for group in self.param_groups:
                for p in (p for p in group["params"] if p.grad is not None):
                    self.state[p]["e"] = p.grad * group["rho"] / (norm + 1e-12)
                    p.add_(self.state[p]["e"])
            closure()  # the loss and gradients again, at the perturbed weights
            for group in self.param_groups:
                for p in (p for p in group["params"] if p.grad is not None):
                    p.sub_(self.state[p]["e"]).sub_(group["lr"] * p.grad)
"""


def test_sam_a_closure_optimizer_from_a_project_module(config, tmp_path, project):
    config.update(import_roots=[project("team_sam", SAM)], lr_scheduler={},
                  optimizer={"type": "team_sam.SAM", "args": {"lr": 0.05, "rho": 0.05}})
    run_dir = trained(small(config), tmp_path)
    assert set(load(run_dir / "checkpoint-last.pth")["optimizer"]["state"][0]) == {"e"}  # SAM's own steps ran
    assert_resumes_exactly(run_dir, roots=["team_sam"])


@pytest.mark.parametrize("key, value", [("accumulation_steps", 2), ("clip_grad_norm", 1.0),
                                        ("nonfinite_loss", "skip")])
def test_settings_a_closure_step_would_not_see_are_one_line(key, value, config, tmp_path, project, capsys):
    """Accumulation, clipping and skipping act on the first pass's gradients; SAM steps with the second pass's."""
    config.update(import_roots=[project("team_sam", SAM)], lr_scheduler={}, optimizer={"type": "team_sam.SAM"})
    config["trainer"][key] = value
    assert f"trainer.{key}: SAM steps through a closure" in fails(config, tmp_path, capsys)


def test_sam_by_config_from_the_projects_optimizers(config, tmp_path):
    config.update(lr_scheduler={}, optimizer={"type": "SAM", "args": {"lr": 0.05, "rho": 0.1, "momentum": 0.9}})
    run_dir = trained(small(config), tmp_path)
    (group,) = load(run_dir / "checkpoint-last.pth")["optimizer"]["param_groups"]
    assert (group["rho"], group["momentum"]) == (0.1, 0.9)  # model/optim.py's SAM, around SGD with momentum
    assert_resumes_exactly(run_dir)


LAZY_MODEL = """
    import torch.nn as nn

    class LazyHead(nn.Module):
        '''A convolution and a head whose input width is found on the first batch (nn.LazyLinear).'''

        def __init__(self, num_classes=10):
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(num_classes))

        def forward(self, x):
            return self.net(x)
"""


def test_a_model_with_lazy_layers_trains_and_resumes_exactly(config, tmp_path, project):
    config.update(import_roots=[project("team_lazy", LAZY_MODEL)], arch={"type": "team_lazy.LazyHead", "args": {}})
    run_dir = trained(small(config), tmp_path)
    assert_resumes_exactly(run_dir, roots=["team_lazy"])


def test_a_frozen_backbone_then_a_ten_times_lower_backbone_rate_by_config(config, tmp_path):
    config["arch"] = {"type": "TorchvisionClassifier", "args": {"name": "resnet18", "num_classes": 10,
                                                                "in_channels": 1}}
    config["optimizer"]["param_groups"] = [{"params": "net.fc.", "lr": 0.003}, {"params": "net.", "lr": 0.0003}]
    start = Snapshot()
    run_dir = trained(small(config, freeze_backbone_epochs=1), tmp_path, hooks=[start])
    after = [load(run_dir / f"checkpoint-epoch{e}.pth")["state_dict"]["net.conv1.weight"] for e in (1, 2)]
    assert after[0].equal(start.conv1) and not after[1].equal(start.conv1)  # frozen for one epoch, then trained
    history = read_history(run_dir)
    assert {"lr_net.fc", "lr_net"} <= set(history[0]) and "lr" not in history[0]
    for row in history:  # OneCycleLR's scalar max_lr is scaled per group: the backbone stays 10x lower
        assert float(row["lr_net"]) == pytest.approx(float(row["lr_net.fc"]) / 10)
    assert_resumes_exactly(run_dir)


class Snapshot(Hook):
    def on_run_start(self, trainer):
        self.conv1 = trainer.model.state_dict()["net.conv1.weight"].clone()


def test_a_parameter_group_prefix_that_matches_nothing_is_one_line(config, tmp_path, capsys):
    from tests.helpers import fails

    config["optimizer"]["param_groups"] = [{"params": "backbone.", "lr": 0.001}]
    assert fails(config, tmp_path, capsys).startswith("error: optimizer.param_groups[0].params: no trainable "
                                                      "parameter of ConvNet has a name starting with 'backbone.'")


class Tracker(Hook):
    """An experiment tracker's per-epoch logging: one JSON line per epoch."""

    def __init__(self, path):
        self.path = path

    def on_epoch_end(self, trainer, epoch, log):
        with open(self.path, "a") as f:
            f.write(json.dumps({"epoch": epoch, **log}) + "\n")


def test_a_per_epoch_tracker_is_a_hook(config, tmp_path):
    run_dir = trained(small(config), tmp_path, hooks=[Tracker(tmp_path / "tracked.jsonl")])
    tracked = [json.loads(line) for line in (tmp_path / "tracked.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in tracked] == [1, 2]
    assert [f"{row['val_accuracy']}" for row in tracked] == [row["val_accuracy"] for row in read_history(run_dir)]


CONSTANT_METRIC = """
    import torch

    class Constant:
        '''A metric that never improves: the number of samples scored, divided by itself.'''

        def batch_stats(self, output, target):
            return torch.tensor([float(len(target))], device=target.device)

        def compute(self, total):
            return (total[0] / total[0]).item()
"""


def test_validation_every_two_epochs_with_patience_on_a_custom_metric(config, tmp_path, project):
    config.update(import_roots=[project("team_metric", CONSTANT_METRIC)],
                  metrics=["accuracy", {"type": "team_metric.Constant", "args": {}, "name": "constant"}],
                  lr_scheduler={"type": "ReduceLROnPlateau", "args": {"mode": "max", "patience": 0, "factor": 0.5}},
                  optimizer={"type": "SGD", "args": {"lr": 0.01}})
    run_dir = trained(small(config, epochs=8, val_every_n_epochs=2, monitor="max val_constant", early_stop=2,
                            save_top_k=2), tmp_path)
    history = read_history(run_dir)
    assert [row["epoch"] for row in history] == ["1", "2", "3", "4", "5", "6"]  # 2 validations without improvement
    assert [row["val_constant"] for row in history] == ["", "1.0", "", "1.0", "", "1.0"]
    assert [float(row["lr"]) for row in history] == [0.01] * 4 + [0.005] * 2  # the plateau waits for validations
    assert sorted(p.name for p in run_dir.glob("top-epoch*.pth")) == ["top-epoch2.pth", "top-epoch4.pth"]
    assert_resumes_exactly(run_dir, epoch=3, roots=["team_metric"])


def test_pseudo_labelling_chains_train_and_test(config, data_slice, tmp_path):
    config["data_loader"]["args"].update(train_images=str(DATA), test_images=str(DATA / "test"))
    labelled = [f"train/{line}" for line in (data_slice / "train.csv").read_text().splitlines()[1:]]
    (tmp_path / "round0").mkdir()
    (tmp_path / "round0" / "train.csv").write_text("\n".join(["id,label", *labelled]) + "\n")
    (tmp_path / "round0" / "test.csv").write_text((data_slice / "test.csv").read_text())
    config["data_loader"]["args"].update(data_dir=str(tmp_path / "round0"), test_csv="test.csv")
    first = trained(small(config, epochs=1), tmp_path)
    tested = evaluate(["-r", first / "model_best.pth", "--out", tmp_path / "pseudo"])
    (predictions,) = [p for p in tested.files if p.name == "predictions.csv"]
    with open(predictions, newline="") as f:
        pseudo = [f"test/{row['id']},{row['label']}" for row in csv.DictReader(f)]
    (tmp_path / "round1").mkdir()
    (tmp_path / "round1" / "train.csv").write_text("\n".join(["id,label", *labelled, *pseudo]) + "\n")
    (tmp_path / "round1" / "test.csv").write_text((data_slice / "test.csv").read_text())
    config["data_loader"]["args"]["data_dir"] = str(tmp_path / "round1")
    second = trained(config, tmp_path)
    assert second != first and len(run_dirs(tmp_path / "saved")) == 2
    assert len(pseudo) == 100 and len(read_history(second)) == 1


def test_class_balanced_batches(config, data_slice, tmp_path):
    """Class-balanced sampling on data where one class has most of the rows: the batches draw classes evenly."""
    from utils.config import build, load_config

    rows = (data_slice / "train.csv").read_text().splitlines()
    skewed = rows[:1] + [r for r in rows[1:] if r.endswith(",1")] + [
        r for digit in "023456789" for r in [r for r in rows[1:] if r.endswith(f",{digit}")][:3]]
    (tmp_path / "train.csv").write_text("\n".join(skewed) + "\n")
    config["data_loader"]["args"].update(data_dir=str(tmp_path), balanced=True, validation_split=0.0)
    config["data_loader"]["args"].pop("test_csv")
    config["trainer"]["monitor"] = "off"
    loader = build(load_config(write_config(config, tmp_path / "c.json")), "data_loader", seed=1)
    loader.set_epoch(1)
    labels = [label for _, target in loader for label in target.tolist()]
    assert labels.count(1) < 2 * len(labels) / 10  # a tenth of the draws, not the half of the rows it holds
    run_dir = trained(small(config), tmp_path)
    assert_resumes_exactly(run_dir)
