"""Config building and validation: every mistake is one line naming the culprit, exit code 2, before any work."""
import json
import subprocess
import sys

import pytest
import torch

import train
from tests.helpers import REPO, clone, error_line, fails, process_error_line, read_csv_rows, run_dirs, write_config
from utils.config import load_config
from utils.util import UserError


def test_a_valid_config_is_returned_with_defaults_filled_in(config, tmp_path):
    del config["trainer"]["save_period"], config["trainer"]["early_stop"]
    loaded = load_config(write_config(config, tmp_path / "config.json"))
    assert loaded["trainer"]["save_period"] == 0
    assert loaded["trainer"]["early_stop"] == 0
    assert loaded["optimizer"] == {"type": "AdamW", "args": {"lr": 0.003, "weight_decay": 0.0001}}
    assert loaded["lr_scheduler"]["step_every"] == "batch"  # OneCycleLR steps every batch


def test_malformed_json_names_file_line_and_column(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text('{\n    "name": "x",\n    "arch": ,\n}\n')
    assert train.main(["-c", str(path)]) == 2
    line = error_line(capsys)
    assert f"{path}:3:13:" in line
    assert "malformed JSON" in line


def test_missing_config_file(tmp_path, capsys):
    assert train.main(["-c", str(tmp_path / "nope.json")]) == 2
    assert "nope.json: no such file" in error_line(capsys)


def test_nothing_to_do_without_config_or_checkpoint(capsys):
    assert train.main([]) == 2
    assert "-c config.json" in error_line(capsys)


@pytest.mark.parametrize("section, wrong, culprit, suggestion", [
    ("arch", "ConvNett", "arch.type", "'ConvNet'"),
    ("data_loader", "CsvImageDataLoadr", "data_loader.type", "'CsvImageDataLoader'"),
    ("optimizer", "Adamm", "optimizer.type", "'Adam'"),
    ("lr_scheduler", "OneCycleLRR", "lr_scheduler.type", "'OneCycleLR'"),
    ("loss", "cross_entropi", "loss", "'cross_entropy'"),
    ("loss_class", "CrossEntropyLos", "loss.type", "'CrossEntropyLoss'"),
    ("metrics", "acuracy", "metrics[1].type", "'accuracy'"),
])
def test_unknown_type_suggests_a_close_name(config, tmp_path, capsys, section, wrong, culprit, suggestion):
    if section == "loss":
        config["loss"] = wrong
    elif section == "loss_class":
        config["loss"] = {"type": wrong}
    elif section == "metrics":
        config["metrics"] = ["top_k_acc", wrong]
    else:
        config[section]["type"] = wrong
    line = fails(config, tmp_path, capsys)
    assert line.startswith(f"error: {culprit}")
    assert repr(wrong) in line
    assert "did you mean" in line and suggestion in line


@pytest.mark.parametrize("section, key, suggestion", [
    ("optimizer", "lrr", "'lr'"),
    ("arch", "widht", "'width'"),
    ("data_loader", "batchsize", "'batch_size'"),
    ("lr_scheduler", "max_lrr", "'max_lr'"),
])
def test_arg_not_in_the_class_signature(config, tmp_path, capsys, section, key, suggestion):
    config[section]["args"][key] = 1
    line = fails(config, tmp_path, capsys)
    assert line.startswith(f"error: {section}.args.{key}: not an argument of {config[section]['type']}")
    assert suggestion in line


@pytest.mark.parametrize("section, key, value", [
    ("optimizer", "params", []),
    ("data_loader", "training", False),  # would train on the test CSV
    ("data_loader", "seed", 3),  # the split follows the config's one seed
])
def test_an_argument_the_program_sets_is_refused(config, tmp_path, capsys, section, key, value):
    config[section]["args"][key] = value
    assert f"{section}.args.{key}: set by the program" in fails(config, tmp_path, capsys)


def test_required_constructor_arg_missing(config, tmp_path, capsys):
    config["lr_scheduler"] = {"type": "StepLR", "args": {}}
    assert "lr_scheduler.args: StepLR needs 'step_size'" in fails(config, tmp_path, capsys)


@pytest.mark.parametrize("section", ["arch", "data_loader", "optimizer", "trainer"])
def test_missing_required_section(config, tmp_path, capsys, section):
    del config[section]
    path = write_config(config, tmp_path / "config.json")
    assert train.main(["-c", str(path)]) == 2
    assert error_line(capsys) == f"error: {section}: missing required key"


def test_missing_trainer_epochs(config, tmp_path, capsys):
    del config["trainer"]["epochs"]
    assert fails(config, tmp_path, capsys) == "error: trainer.epochs: missing required key"


def test_monitor_on_validation_metric_without_validation_split(config, tmp_path, capsys):
    config["data_loader"]["args"]["validation_split"] = 0
    line = fails(config, tmp_path, capsys)
    assert line.startswith("error: trainer.monitor: 'val_accuracy' is never produced by training")
    assert "'accuracy'" in line  # the training-set metric is what exists


def test_monitor_on_a_metric_not_listed(config, tmp_path, capsys):
    config["metrics"] = ["accuracy"]
    config["trainer"]["monitor"] = "max val_macro_f1"
    line = fails(config, tmp_path, capsys)
    assert line.startswith("error: trainer.monitor: 'val_macro_f1' is never produced by training")


def test_monitor_misspelled_suggests_the_produced_name(config, tmp_path, capsys):
    config["trainer"]["monitor"] = "max val_acc"
    line = fails(config, tmp_path, capsys)
    assert "'val_acc' is never produced" in line and "'val_accuracy'" in line


def test_monitor_without_mode(config, tmp_path, capsys):
    config["trainer"]["monitor"] = "val_loss"
    assert fails(config, tmp_path, capsys).startswith("error: trainer.monitor: expected \"off\", \"min <metric>\"")


def test_unknown_top_level_key_suggests(config, tmp_path, capsys):
    config["nmae"] = "oops"
    assert fails(config, tmp_path, capsys) == "error: nmae: unknown key; did you mean 'name'?"


def test_unknown_trainer_key_suggests(config, tmp_path, capsys):
    config["trainer"]["epoch"] = 3
    assert fails(config, tmp_path, capsys) == "error: trainer.epoch: unknown key; did you mean 'epochs'?"


def test_unknown_section_key_suggests(config, tmp_path, capsys):
    config["optimizer"]["arg"] = {}
    line = fails(config, tmp_path, capsys)
    assert line.startswith("error: optimizer.arg: unknown key") and "'args'" in line


@pytest.mark.parametrize("key, value, expected", [
    ("epochs", "3", 'trainer.epochs: expected an integer, got "3"'),
    ("epochs", -1, "trainer.epochs: expected an integer >= 1, got -1"),
    ("epochs", 0, "trainer.epochs: expected an integer >= 1, got 0"),
    ("epochs", True, "trainer.epochs: expected an integer, got true"),
    ("epochs", 2.5, "trainer.epochs: expected an integer, got 2.5"),
    ("tensorboard", "yes", 'trainer.tensorboard: expected true or false, got "yes"'),
    ("early_stop", -2, "trainer.early_stop: expected an integer >= 0, got -2"),
    ("save_dir", 5, "trainer.save_dir: expected a string, got 5"),
])
def test_wrong_value_types(config, tmp_path, capsys, key, value, expected):
    config["trainer"][key] = value
    assert fails(config, tmp_path, capsys) == f"error: {expected}"


def test_wrong_top_level_type(config, tmp_path, capsys):
    config["metrics"] = "accuracy"
    assert fails(config, tmp_path, capsys) == 'error: metrics: expected a list, got "accuracy"'


@pytest.mark.parametrize("dotted, value, expected", [
    ("data_loader.args.batch_size", -4, "data_loader.args.batch_size: expected a positive integer, got -4"),
    ("data_loader.args.validation_split", 1.5, "data_loader.args.validation_split: 1.5 leaves no training data"),
    ("trainer.amp", "fp8", 'trainer.amp: expected one of "off", "bf16", "fp16", got "fp8"'),
    ("import_roots", "timm", 'import_roots: expected a list, got "timm"'),
    ("name", "a\nb", "name: expected a folder name"),
    ("name", "x" * 101, "name: expected a folder name"),
    ("trainer.save_dir", "", "trainer.save_dir: expected a folder"),
    ("metrics", [{"type": "accuracy", "name": "loss"}], "metrics[0].name"),
    ("metrics", ["accuracy", {"type": "TopKAccuracy", "name": "val_top"}], "metrics[1].name"),
    ("metrics", ["accuracy", {"type": "TopKAccuracy", "args": {"k": 0}}], "metrics[1]: TopKAccuracy(k=0) failed"),
    ("loss", {"type": "CrossEntropyLoss", "args": {"label_smoothing": -1}}, "loss.args.label_smoothing"),
    ("loss", {"type": "CrossEntropy", "args": {"weight": [1] * 9 + [-1]}}, "loss: CrossEntropy(weight="),
    ("arch", {"type": "TorchvisionClassifier", "args": {"name": "squeezenet1_0", "num_classes": 10}},
     "arch.args.name: squeezenet1_0 has no nn.Linear classifier"),
    ("arch", {"type": "TorchvisionClassifier", "args": {"name": "resnet81", "num_classes": 10}},
     "arch.args.name: no torchvision model 'resnet81'; did you mean 'resnet18'"),
    ("arch", {"type": "TorchvisionClassifier", "args": {"name": "resnet18", "num_classes": 10, "weights": "V9"}},
     "arch.args.weights: resnet18 has no weights 'V9'; it has DEFAULT, IMAGENET1K_V1"),
])
def test_wrong_values_outside_the_trainer_basics(config, tmp_path, capsys, dotted, value, expected):
    *parents, last = dotted.split(".")
    node = config
    for key in parents:
        node = node[key]
    node[last] = value
    assert fails(config, tmp_path, capsys).startswith(f"error: {expected}")


@pytest.mark.parametrize("device, expected", [
    ("cuda:7", "--device 'cuda:7': this machine has"),  # more CUDA devices than any machine running the suite
    ("tpu", "--device 'tpu': expected cpu, cuda, cuda:N or a GPU index N"),
])
def test_device_the_machine_does_not_have(config, tmp_path, capsys, device, expected):
    assert fails(config, tmp_path, capsys, "--device", device).startswith(f"error: {expected}")


def test_top_level_must_be_an_object(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text("[1, 2]")
    assert train.main(["-c", str(path)]) == 2
    assert "expected a JSON object at the top level" in error_line(capsys)


def test_wrongly_typed_project_class_argument_is_one_line(config, tmp_path, capsys):
    config["arch"]["args"]["width"] = "16"
    assert "arch" in fails(config, tmp_path, capsys)


def test_type_naming_a_helper_imported_into_the_module_is_refused(config, tmp_path, capsys):
    config["data_loader"]["type"] = "UserError"
    assert fails(config, tmp_path, capsys).startswith("error: data_loader.type")


@pytest.mark.parametrize("dotted", ["os.system", "subprocess.Popen", "builtins.eval"])
def test_dotted_type_outside_allowed_roots_is_refused(config, tmp_path, capsys, dotted):
    config["optimizer"]["type"] = dotted
    line = fails(config, tmp_path, capsys)
    assert line.startswith(f"error: optimizer.type: {dotted!r} is outside the allowed import roots")
    assert "import_roots" in line


def test_dotted_type_that_cannot_be_imported(config, tmp_path, capsys):
    config["optimizer"]["type"] = "torch.optim.NoSuchOptimizer"
    assert "'torch.optim.NoSuchOptimizer' cannot be imported" in fails(config, tmp_path, capsys)


def test_dotted_type_inside_torch_trains(config, tmp_path):
    config["optimizer"] = {"type": "torch.optim.SGD", "args": {"lr": 0.05, "momentum": 0.9}}
    config["lr_scheduler"] = {"type": "torch.optim.lr_scheduler.StepLR", "args": {"step_size": 1, "gamma": 0.5}}
    config["trainer"]["epochs"] = 1
    path = write_config(config, tmp_path / "config.json")
    assert train.main(["-c", str(path)]) == 0
    (run,) = run_dirs(tmp_path / "saved")
    saved = json.loads((run / "config.json").read_text())
    assert saved["optimizer"]["type"] == "torch.optim.SGD"
    assert saved["lr_scheduler"]["type"] == "torch.optim.lr_scheduler.StepLR"
    assert len(read_csv_rows(run / "history.csv")) == 1
    checkpoint = torch.load(run / "checkpoint-last.pth", weights_only=True)
    assert checkpoint["optimizer"]["param_groups"][0]["momentum"] == 0.9  # SGD, built with the config's args


# --- what only a batch and a step can show ----------------------------------------------------------------------------

@pytest.mark.parametrize("section, spec, culprit", [
    ("arch", {"type": "ConvNet", "args": {"num_classes": 5, "in_channels": 1}}, "arch: ConvNet returns [16, 5]"),
    ("arch", {"type": "ConvNet", "args": {"num_classes": 10, "in_channels": 3}}, "arch: ConvNet cannot take a batch"),
    ("loss", {"type": "CrossEntropyLoss", "args": {"reduction": "none"}}, "loss: returns [16]"),
    ("loss", {"type": "CrossEntropy", "args": {"weight": [1.0, 2.0]}}, "loss: cannot take the model's output"),
    ("loss", "mse_loss", "loss: mse_loss is a loss for regression targets, and this data's task is multiclass"),
    ("metrics", ["accuracy", {"type": "TopKAccuracy", "args": {"k": 10}}], "metrics: TopKAccuracy cannot score"),
    ("optimizer", {"type": "SparseAdam", "args": {}}, "optimizer: SparseAdam cannot take a step"),
    ("optimizer", {"type": "Adam", "args": {"differentiable": True}}, "optimizer: Adam cannot take a step"),
    ("lr_scheduler", {"type": "StepLR", "args": {"step_size": 0}}, "lr_scheduler: StepLR cannot take a step"),
    ("lr_scheduler", {"type": "CosineAnnealingLR", "args": {"T_max": 0}}, "lr_scheduler: CosineAnnealingLR cannot"),
])
def test_a_part_that_fails_on_the_first_batch_or_step_is_one_line_before_anything_is_written(
        config, tmp_path, capsys, section, spec, culprit):
    config[section] = spec
    if section == "optimizer":
        config["lr_scheduler"] = {}
    assert fails(config, tmp_path, capsys).startswith(f"error: {culprit}")


def test_the_trial_step_leaves_weights_and_optimizer_as_built(config, tmp_path, monkeypatch):
    """The check's training step runs on the real model: its weights (and batch-norm statistics) are put back, and
    the optimizer and schedule that train are untouched."""
    from trainer import preflight

    check, seen = preflight.check_one_batch, {}

    def checked(trainer):
        before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        check(trainer)
        seen["weights"] = all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in before.items())
        seen["optimizer"] = not trainer.optimizer.state and trainer.lr_schedule.scheduler.last_epoch == 0
        raise SystemExit(0)

    monkeypatch.setattr(train, "check_one_batch", checked)
    config["arch"] = {"type": "TorchvisionClassifier", "args": {"name": "resnet18", "num_classes": 10,
                                                                "in_channels": 1}}
    with pytest.raises(SystemExit):
        train.main(["-c", str(write_config(config, tmp_path / "config.json"))])
    assert seen == {"weights": True, "optimizer": True}


def test_a_number_for_an_argument_annotated_float_or_tensor(config, tmp_path):
    """LBFGS's `lr: float | Tensor = 1`: the integer default does not make 0.01 wrong."""
    config["optimizer"] = {"type": "LBFGS", "args": {"lr": 0.01}}
    assert load_config(write_config(config, tmp_path / "c.json"))["optimizer"]["args"]["lr"] == 0.01


@pytest.mark.parametrize("arch", [
    {"type": "resnet18", "args": {"weights": "DEFAULT"}},
    {"type": "TorchvisionClassifier", "args": {"name": "resnet18", "num_classes": 10, "weights": "DEFAULT"}},
])
def test_weights_that_cannot_be_downloaded_leave_no_folder_behind(config, tmp_path, capsys, monkeypatch, arch):
    """Offline (as the suite runs), or on a bad address: one line, and no empty download folder left behind."""
    import torch.hub

    def no_network(url, *args, **kwargs):
        raise OSError(f"no network for {url}")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)  # after the download folder is made
    config["arch"] = arch
    assert "no network" in fails(config, tmp_path, capsys)
    assert not (tmp_path / "torch-home").exists()


def test_folds_all_with_a_checkpoint_is_refused(config, tmp_path, capsys):
    """--folds all would silently train every fold from scratch, ignoring -r."""
    config["data_loader"]["args"]["n_folds"] = 2
    line = fails(config, tmp_path, capsys, "--folds", "all", "-r", str(tmp_path / "model_best.pth"))
    assert line.startswith("error: --folds all trains every fold from the start and cannot take -r")


# --- overrides ----------------------------------------------------------------------------------------------------

def test_override_sets_an_integer(config, tmp_path):
    loaded = load_config(write_config(config, tmp_path / "c.json"), ["trainer.epochs=3"])
    assert loaded["trainer"]["epochs"] == 3 and type(loaded["trainer"]["epochs"]) is int


def test_override_non_json_value_is_a_plain_string(config, tmp_path):
    loaded = load_config(write_config(config, tmp_path / "c.json"), ["name=foo"])
    assert loaded["name"] == "foo"


def test_override_json_values(config, tmp_path):
    loaded = load_config(write_config(config, tmp_path / "c.json"),
                         ["trainer.tensorboard=true", "data_loader.args.mean=[0.5]", "data_loader.args.std=[0.25]",
                          "optimizer.args.lr=1e-4", 'name="123"'])
    assert loaded["trainer"]["tensorboard"] is True
    assert loaded["data_loader"]["args"]["mean"] == [0.5]
    assert loaded["optimizer"]["args"]["lr"] == 1e-4
    assert loaded["name"] == "123"


def test_override_adds_a_new_nested_section(config, tmp_path):
    del config["lr_scheduler"]
    loaded = load_config(write_config(config, tmp_path / "c.json"),
                         ["lr_scheduler.type=StepLR", "lr_scheduler.args.step_size=2"])
    assert loaded["lr_scheduler"]["type"] == "StepLR"
    assert loaded["lr_scheduler"]["args"] == {"step_size": 2}


def test_override_removes_a_section_with_an_empty_object(config, tmp_path):
    loaded = load_config(write_config(config, tmp_path / "c.json"), ["lr_scheduler={}"])
    assert not loaded["lr_scheduler"]


def test_override_does_not_touch_the_file(config, tmp_path):
    path = write_config(config, tmp_path / "c.json")
    before = path.read_text()
    load_config(path, ["trainer.epochs=7"])
    assert path.read_text() == before


@pytest.mark.parametrize("override, expected", [
    ("trainer.epoch=3", "trainer.epoch: unknown key; did you mean 'epochs'?"),
    ("optimizer.args.lrr=0.1", "optimizer.args.lrr: not an argument of AdamW; did you mean 'lr'?"),
    ("trainer.epochs=three", 'trainer.epochs: expected an integer, got "three"'),
    ("optimizer.type=Adamm", "optimizer.type: unknown 'Adamm'"),
])
def test_mistake_via_override_is_caught_by_the_same_validation(config, tmp_path, capsys, override, expected):
    assert fails(config, tmp_path, capsys, "-o", override).startswith(f"error: {expected}")


@pytest.mark.parametrize("override", ["trainer.epochs", "=3", "trainer..epochs=3", ".epochs=3", "trainer.=3"])
def test_bad_override_syntax(config, tmp_path, capsys, override):
    line = fails(config, tmp_path, capsys, "-o", override)
    assert line.startswith(f"error: override {override!r}: expected key.path=value")


def test_override_through_a_non_object(config, tmp_path, capsys):
    line = fails(config, tmp_path, capsys, "-o", "name.first=x")
    assert line == "error: override 'name.first=x': name is \"tiny\", not an object"


def test_load_config_raises_user_error(config, tmp_path):
    with pytest.raises(UserError, match=r"^trainer\.epoch: unknown key"):
        load_config(write_config(config, tmp_path / "c.json"), ["trainer.epoch=3"])


def test_shortcuts_and_overrides_land_in_the_saved_config(config, tmp_path):
    path = write_config(config, tmp_path / "config.json")
    code = train.main(["-c", str(path), "--lr", "0.01", "--bs", "16", "-o", "trainer.epochs=1", "-o", "name=foo",
                       "-o", "data_loader.args.cache=false", "-o", 'optimizer={"type": "SGD", "args": {"lr": 0.5}}'])
    assert code == 0
    assert run_dirs(tmp_path / "saved", "tiny") == []
    (run,) = run_dirs(tmp_path / "saved", "foo")
    saved = json.loads((run / "config.json").read_text())
    assert saved["optimizer"]["args"]["lr"] == saved["lr_scheduler"]["args"]["max_lr"] == 0.01
    assert saved["data_loader"]["args"]["batch_size"] == 16
    assert saved["trainer"]["epochs"] == 1
    assert saved["name"] == "foo"
    assert saved["data_loader"]["args"]["cache"] is False
    assert len(read_csv_rows(run / "history.csv")) == 1
    assert json.loads(path.read_text()) == config  # the user's file is left alone


def test_an_optimizer_rate_that_the_schedule_replaces_is_said(config, tmp_path, capsys):
    config["optimizer"]["args"]["lr"] = 0.05  # the shipped schedule, OneCycleLR, peaks at its max_lr 0.003
    config["trainer"].update(epochs=1, limit_train_batches=2)
    assert train.main(["-c", str(write_config(config, tmp_path / "config.json"))]) == 0
    captured = capsys.readouterr()
    assert "warning: optimizer.args.lr 0.05 is not used: OneCycleLR sets the rate from its max_lr 0.003" in \
        captured.out + captured.err


@pytest.mark.slow
def test_bad_config_in_a_real_process(config, tmp_path):
    """What a user sees in the terminal: one `error:` line on stderr, no traceback, exit code 2, no run folder."""
    config["optimizer"]["type"] = "Adamm"
    path = write_config(clone(config), tmp_path / "config.json")
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "-c", str(path)], cwd=tmp_path, check=False,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    line = process_error_line(proc)
    assert line.startswith("error: optimizer.type: unknown 'Adamm'") and "'Adam'" in line
    assert not (tmp_path / "saved").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
