"""The task by config alone (issue 12): multi-task heads, multi-label and regression, and CutMix/MixUp batches, end
to end on the generated RGB set of tests/task_data.py. Every fold of each task is trained once (module fixtures);
the tests recompute the written metrics from the written probabilities, check the submissions against them (with a
one-column sample submission and in blends too), and see mismatched configs refused before anything is written."""
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

import train
from tests.helpers import error_line, evaluate, fails, make_config, read_history, run_dirs, write_config
from tests.task_data import AGES, GENDERS, MASKS, TAGS, make_task_set, read_truth

N_TRAIN, N_TEST, N_FOLDS, EPOCHS = 96, 32, 2, 15
TOLERANCE = 1e-6

TASKS = {
    "multitask": SimpleNamespace(label_column=["mask", "gender", "age"], task=None, width=8, metrics=["accuracy"],
                                 monitor="max val_accuracy", metric="accuracy",
                                 heads=[["mask", MASKS], ["gender", GENDERS], ["age", [str(a) for a in AGES]]]),
    "multilabel": SimpleNamespace(label_column="tags", task="multilabel", width=3,
                                  metrics=["f1_micro", "f1_macro", "mean_ap"], monitor="max val_f1_micro",
                                  metric="f1_micro", heads=[["tags", TAGS]]),
    "regression": SimpleNamespace(label_column="value", task="regression", width=1, metrics=["rmse", "mae", "r2"],
                                  monitor="min val_rmse", metric="rmse", heads=[["value", None]]),
}
KINDS = {"multitask": "multiclass", "multilabel": "multilabel", "regression": "regression"}
TEST_LABELS = ["-o", "data_loader.args.test_csv=test_labels.csv"]
FLIP_TTA = ["-o", 'inference.tta=[{"type": "RandomHorizontalFlip", "args": {"p": 1.0}}]']


def task_config(name, data, save_dir, **trainer):
    """A small config for task `name` on the generated set, by config alone: the label column(s), the task kind,
    the model's width and the task's metrics; no loss, so the task's default applies."""
    task = TASKS[name]
    config = make_config(data, save_dir, **{"epochs": EPOCHS, "monitor": task.monitor, **trainer})
    config["name"] = name
    config["arch"]["args"].update(num_classes=task.width, in_channels=3)
    args = config["data_loader"]["args"]
    for key in ("train_images", "test_images", "mean", "std"):  # the set's own train/ and test/ folders, RGB
        del args[key]
    args.update(label_column=task.label_column, test_csv="test.csv", batch_size=16, group_column="group")
    if task.task:
        args["task"] = task.task
    if name == "multitask":  # text classes in the competition's order: the combined label's indices follow it
        args["classes"] = [MASKS, GENDERS, AGES]
    config["metrics"] = task.metrics
    del config["loss"]
    config["optimizer"]["args"]["lr"] = 0.01
    config["lr_scheduler"]["args"]["max_lr"] = 0.01
    return config


# --- reading what the program wrote -------------------------------------------------------------------------------

def read_task(folder):
    """task.json of a folder, class names as text (the CSV's labels as written)."""
    task = json.loads((Path(folder) / "task.json").read_text())
    task["heads"] = [[column, [str(c) for c in classes] if classes is not None else None]
                     for column, classes in task["heads"]]
    return task


def read_table(path):
    return pd.read_csv(path, dtype={"id": str}).set_index("id")


def read_text_table(path):
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def output_columns(task):
    """The probability (or value) columns of a task, in order."""
    if task["kind"] == "multiclass":
        return [f"{column}:{c}" for column, classes in task["heads"] for c in classes]
    if task["kind"] == "multilabel":
        return list(task["heads"][0][1])
    return [column for column, _ in task["heads"]]


def target_columns(task):
    if task["kind"] == "multilabel":
        return [f"target:{c}" for c in task["heads"][0][1]]
    return [f"target:{column}" for column, _ in task["heads"]]


def targets_from_truth(truth, ids, task):
    """The targets of rows `ids` from the ground truth, in the form of oof.csv's target columns."""
    rows = truth.loc[ids]
    if task["kind"] == "multiclass":
        return np.stack([[classes.index(v) for v in rows[column]] for column, classes in task["heads"]], axis=1)
    if task["kind"] == "multilabel":
        labels = task["heads"][0][1]
        return np.array([[float(label in tags.split()) for label in labels] for tags in rows[task["heads"][0][0]]])
    return rows[[column for column, _ in task["heads"]]].to_numpy(dtype=float)


def head_indices(table, task):
    """Per multi-task head, the argmax class index of its probability columns: (N, heads)."""
    return np.stack([table[[f"{column}:{c}" for c in classes]].to_numpy().argmax(axis=1)
                     for column, classes in task["heads"]], axis=1)


def recomputed(table, targets, task):
    """The task's main metric (and for multi-task each head's accuracy) from probabilities and targets."""
    if task["kind"] == "multiclass":
        hits = head_indices(table, task) == targets
        return {"accuracy": hits.all(axis=1).mean(),
                **{f"accuracy_{column}": hits[:, h].mean() for h, (column, _) in enumerate(task["heads"])}}
    outputs = table[output_columns(task)].to_numpy()
    if task["kind"] == "multilabel":
        predicted = outputs >= 0.5
        tp = (predicted & (targets == 1)).sum()
        return {"f1_micro": 2 * tp / (predicted.sum() + (targets == 1).sum())}
    return {"rmse": float(np.sqrt(np.mean((outputs - targets) ** 2)))}


def assert_metrics_match(written, expected):
    for name, value in expected.items():
        assert written[name] == pytest.approx(value, abs=TOLERANCE), name


def assert_predictions_follow(predictions, table, task):
    """predictions.csv (as text) says what probabilities.csv does: per head its most probable class as written in
    the CSV, the labels with p >= 0.5 joined by the delimiter, or the values."""
    assert list(predictions["id"]) == list(table.index)
    if task["kind"] == "multiclass":
        indices = head_indices(table, task)
        assert list(predictions.columns) == ["id", *[column for column, _ in task["heads"]]]
        for h, (column, classes) in enumerate(task["heads"]):
            assert list(predictions[column]) == [classes[i] for i in indices[:, h]], column
    elif task["kind"] == "multilabel":
        (column, labels), = task["heads"]
        assert list(predictions.columns) == ["id", column]
        expected = [task["delimiter"].join(label for label in labels if row[label] >= 0.5)
                    for _, row in table.iterrows()]
        assert list(predictions[column]) == expected
    else:
        columns = output_columns(task)
        assert list(predictions.columns) == ["id", *columns]
        np.testing.assert_allclose(predictions[columns].astype(float).to_numpy(), table[columns].to_numpy(),
                                   rtol=1e-6, atol=1e-7)


# --- the trained groups, shared ----------------------------------------------------------------------------------

class Runs:
    """Each task's `--folds all` run group and test.py's outputs on it, made on first use."""

    def __init__(self, data, base):
        self.data, self.base, self.groups, self.outputs = data, base, {}, {}

    def group(self, name):
        if name not in self.groups:
            save_dir = self.base / "saved"
            config = task_config(name, self.data, save_dir)
            config["data_loader"]["args"]["n_folds"] = N_FOLDS
            path = write_config(config, self.base / f"{name}.json")
            assert train.main(["-c", str(path), "--folds", "all"]) == 0
            (self.groups[name],) = run_dirs(save_dir, name)
        return self.groups[name]

    def evaluated(self, name, how):
        """test.py's output folder on test_labels.csv: `ensemble` (the group), `fold0`/`fold1` (one run's best
        checkpoint) or `tta` (fold1 with a flip)."""
        if (name, how) not in self.outputs:
            group = self.group(name)
            source = group if how == "ensemble" else group / ("fold0" if how == "fold0" else "fold1") / "model_best.pth"
            out = self.base / "test" / name / how
            extra = FLIP_TTA if how == "tta" else []
            assert evaluate(["-r", source, *TEST_LABELS, *extra, "--out", out]) == 0
            self.outputs[name, how] = out
        return self.outputs[name, how]


@pytest.fixture(scope="module")
def task_set(tmp_path_factory):
    return make_task_set(tmp_path_factory.mktemp("task_set"), n_train=N_TRAIN, n_test=N_TEST)


@pytest.fixture(scope="module")
def runs(task_set, tmp_path_factory):
    return Runs(task_set, tmp_path_factory.mktemp("task_runs"))


# --- training by config alone: out-of-fold files --------------------------------------------------------------------

@pytest.mark.parametrize("name", TASKS)
def test_out_of_fold_metrics_are_those_of_oof_csv(name, runs, task_set):
    group = runs.group(name)
    task = read_task(group)
    assert task == {"kind": KINDS[name], "heads": TASKS[name].heads, "delimiter": " "}

    oof = read_table(group / "oof.csv")
    assert sorted(oof.index) == sorted(read_truth(task_set, "train.csv").index)  # every training row once
    assert list(oof.columns) == [*target_columns(task), *output_columns(task)]
    targets = oof[target_columns(task)].to_numpy()
    np.testing.assert_allclose(targets, targets_from_truth(read_truth(task_set, "train.csv"), oof.index, task),
                               rtol=1e-6)
    assert_metrics_match(json.loads((group / "oof_metrics.json").read_text()), recomputed(oof, targets, task))


# --- test.py: an ensemble of the folds, one run, TTA ----------------------------------------------------------------

@pytest.mark.parametrize("how", ["ensemble", "fold1", "tta"])
@pytest.mark.parametrize("name", TASKS)
def test_test_metrics_and_predictions_are_those_of_probabilities_csv(name, how, runs, task_set):
    out = runs.evaluated(name, how)
    task = read_task(out)
    table = read_table(out / "probabilities.csv")
    assert sorted(table.index) == sorted(read_truth(task_set).index) and list(table.columns) == output_columns(task)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tta_views"] == (1 if how == "tta" else 0)  # the augmented views besides the plain one
    assert_metrics_match(metrics, recomputed(table, targets_from_truth(read_truth(task_set), table.index, task), task))
    assert_predictions_follow(read_text_table(out / "predictions.csv"), table, task)


def test_every_task_is_learned_from_the_pixels(runs):
    """The labels line up with the images all the way: the ensembles score far above chance on the test images."""
    multitask, multilabel, regression = (json.loads((runs.evaluated(name, "ensemble") / "metrics.json").read_text())
                                         for name in TASKS)
    assert min(multitask[f"accuracy_{column}"] for column in ("mask", "gender", "age")) >= 0.6, multitask
    assert multilabel["f1_micro"] >= 0.7 and multilabel["mean_ap"] >= 0.7, multilabel
    assert regression["r2"] >= 0.3, regression


def test_multi_task_submission_in_a_one_column_sample_layout(runs, task_set, tmp_path):
    """A sample submission with one value column gets the heads' class indices combined, first head most
    significant: 3 masks x 2 genders x 3 ages -> mask * 6 + gender * 3 + age."""
    sample = task_set / "sample_submission.csv"
    group = runs.group("multitask")
    assert evaluate(["-r", group, "-o", f"inference.sample_submission={sample}", "--out", tmp_path]) == 0
    assert (tmp_path / "predictions.csv").read_text().splitlines()[0] == "ImageID,ans"
    predictions = read_text_table(tmp_path / "predictions.csv")
    assert list(predictions["ImageID"]) == list(read_text_table(sample)["ImageID"])
    indices = head_indices(read_table(tmp_path / "probabilities.csv"), read_task(tmp_path))
    combined = dict(zip(read_table(tmp_path / "probabilities.csv").index, indices @ np.array([6, 3, 1])))
    assert [int(a) for a in predictions["ans"]] == [combined[i] for i in predictions["ImageID"]]
    assert len(set(predictions["ans"])) > 1


@pytest.mark.parametrize("name", TASKS)
def test_blend_of_two_runs_is_the_weighted_mean(name, runs, tmp_path):
    a, b = (runs.evaluated(name, how) / "probabilities.csv" for how in ("fold0", "fold1"))
    assert evaluate(["--blend", a, b, "--weights", "3", "1", "--out", tmp_path]) == 0
    task = read_task(tmp_path)
    assert task == read_task(a.parent)
    blended, first, second = read_table(tmp_path / "probabilities.csv"), read_table(a), read_table(b)
    assert list(blended.columns) == output_columns(task) and sorted(blended.index) == sorted(first.index)
    expected = (3 * first + second.loc[first.index]) / 4
    np.testing.assert_allclose(blended.to_numpy(), expected.loc[blended.index].to_numpy(), rtol=1e-5, atol=1e-6)
    assert_predictions_follow(read_text_table(tmp_path / "predictions.csv"), blended, task)


# --- CutMix / MixUp by config -----------------------------------------------------------------------------------------

CUTMIX = [{"type": "CutMix"}]
EITHER = [{"type": "RandomChoice",
           "args": {"transforms": [{"type": "CutMix"}, {"type": "MixUp", "args": {"alpha": 1.0}}]}}]


@pytest.mark.parametrize("name, batch_transforms", [("digits", CUTMIX), ("multitask", EITHER)],
                         ids=["cutmix-digits", "cutmix-or-mixup-multitask"])
def test_mixed_batches_train_with_validation_metrics_only(name, batch_transforms, data_slice, task_set, tmp_path):
    """Mixed training batches have soft targets: the history logs the training loss but no training metric."""
    if name == "digits":
        config = make_config(data_slice, tmp_path / "saved", epochs=2, limit_train_batches=3)
        validation = ["val_accuracy", "val_top_k_acc", "val_macro_f1"]
    else:
        config = task_config(name, task_set, tmp_path / "saved", epochs=2)
        validation = ["val_accuracy", "val_accuracy_mask", "val_accuracy_gender", "val_accuracy_age"]
    config["data_loader"]["args"]["batch_transforms"] = batch_transforms
    assert train.main(["-c", str(write_config(config, tmp_path / "config.json"))]) == 0
    (run_dir,) = run_dirs(tmp_path / "saved", config["name"])
    history = read_history(run_dir)
    assert len(history) == 2
    assert set(history[0]) == {"epoch", "loss", "val_loss", *validation, "lr"}
    assert all(np.isfinite(float(row[key])) for row in history for key in ("loss", *validation))


# --- refused before anything is written -----------------------------------------------------------------------------

def too_narrow(config):
    config["arch"]["args"]["num_classes"] = 5
    return r"\b5\b", r"\b8\b"


def regression_on_text(config):
    config["data_loader"]["args"].update(label_column="mask")
    return ("mask",)


def cutmix_with_num_classes(config):
    config["data_loader"]["args"]["batch_transforms"] = [{"type": "CutMix", "args": {"num_classes": 8}}]
    return "batch_transforms", "num_classes"


def accuracy_of_numbers(config):
    config.update(metrics=["accuracy"], trainer={**config["trainer"], "monitor": "min val_loss"})
    return r"metrics\[0\]: accuracy", "rmse"


def focal_loss_on_mixed_targets(config):
    config["loss"] = "FocalLoss"
    config["data_loader"]["args"]["batch_transforms"] = CUTMIX
    return "loss: cannot take a training batch", "soft targets"


def combined_without_class_order(config):
    config["inference"]["combine_heads"] = True
    del config["data_loader"]["args"]["classes"]
    return "inference.combine_heads", "no order given"


def setting(path, value, *culprits):
    """A change that sets one config value (a dotted path) and expects `culprits` (regular expressions)."""
    def change(config):
        *parents, key = path.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[key] = value
        return culprits
    return change


MISFITS = {
    "width-5-for-3+2+3-classes": ("multitask", too_narrow),
    "regression-on-a-text-column": ("regression", regression_on_text),
    "cutmix-num-classes-set": ("multitask", cutmix_with_num_classes),
    "cross-entropy-on-numbers": ("regression", setting("loss", "cross_entropy", "loss: cross_entropy", "regression")),
    "mse-on-labels": ("multilabel", setting("loss", "mse_loss", "loss: mse_loss", "multilabel")),
    "every-head-weighed-0": ("multitask", setting("head_weights", [0, 0, 0], "head_weights", "not all 0")),
    "two-head-weights-for-3": ("multitask", setting("head_weights", [1, 2], "head_weights", "3 numbers")),
    "metric-named-as-a-head-metric": ("multitask", setting("metrics", ["accuracy", {"type": "macro_f1", "name":
                                                                                   "accuracy_mask"}],
                                                           "metrics", "accuracy_mask")),
    "accuracy-of-numbers": ("regression", accuracy_of_numbers),
    "monitor-of-no-head": ("multitask", setting("trainer.monitor", "max val_accuracy_nose", "val_accuracy_nose")),
    "delimiter-of-heads": ("multitask", setting("data_loader.args.delimiter", ",", "delimiter", "multiclass")),
    "label-holding-the-delimiter": ("multilabel", setting("data_loader.args.classes", ["cat", "dog", "sun", "cat dog"],
                                                         "classes", "cat dog")),
    "threshold-above-1": ("multilabel", setting("inference.threshold", 1.5, "inference.threshold")),
    "class-lists-for-2-of-3-heads": ("multitask", setting("data_loader.args.classes", [["a"], ["b"]], "classes",
                                                          "3 class lists")),
    "focal-loss-on-mixed-targets": ("multitask", focal_loss_on_mixed_targets),
    "a name among mixing transforms": ("multitask", setting("data_loader.args.batch_transforms", [
        {"type": "RandomChoice", "args": {"transforms": [{"type": "CutMix"}, "MixUp"]}}],
        r"batch_transforms\[0\]\.args\.transforms\[1\]")),
    "combined-label-of-unordered-text-classes": ("multitask", combined_without_class_order),
    "combined-label-of-a-single-head": ("regression", setting("inference.combine_heads", True,
                                                              "inference.combine_heads", "regression")),
    "top-3-of-a-3-class-head": ("multitask", setting("metrics", ["accuracy", "top_k_acc"],
                                                     "metrics: top_k_acc_mask cannot")),
}


@pytest.mark.parametrize("name, change", MISFITS.values(), ids=MISFITS.keys())
def test_a_config_that_does_not_fit_the_task_is_refused(name, change, task_set, tmp_path, capsys):
    config = task_config(name, task_set, tmp_path / "saved")
    config.setdefault("inference", {})
    culprits = change(config)
    line = fails(config, tmp_path, capsys)
    assert all(re.search(culprit, line) for culprit in culprits), line


def test_a_resumed_run_keeps_its_targets_and_validation_rows(runs, tmp_path, capsys):
    """Resuming with other classes, columns or task would go on training on other targets in the same run; with
    another fold or seed, its monitor would score rows it trained on."""
    run = runs.group("multitask") / "fold0"
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    permuted = '[["none", "incorrect", "correct"], ["female", "male"], [0, 1, 2]]'
    two_columns = ['data_loader.args.label_column=["mask", "gender"]', "-o",
                   f"data_loader.args.classes={json.dumps([MASKS, GENDERS])}"]
    for change, culprit in (([f"data_loader.args.classes={permuted}"], "keeps its targets"),
                            (two_columns, "keeps its targets"),
                            (["data_loader.args.fold=1"], "keeps its validation rows (data_loader.args.fold: 0 "),
                            (["seed=5"], "keeps its validation rows (seed: ")):
        assert train.main(["-r", str(run), "-o", *change, "-o", "trainer.epochs=20"]) == 2
        assert culprit in error_line(capsys), change
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before


def edited_task(folder, **change):
    task = json.loads((folder / "task.json").read_text())
    (folder / "task.json").write_text(json.dumps({**task, **change}))


def test_evaluation_mistakes_of_a_task_are_one_line_and_write_nothing(runs, task_set, tmp_path, capsys):
    group = runs.group("multilabel")
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("probabilities.csv", "task.json"):
        (copy / name).write_bytes((runs.evaluated("multilabel", "fold0") / name).read_bytes())
    edited_task(copy, heads=[])
    cases = {
        "--split valid of folds": (["-r", group, "--split", "valid"], "--split valid"),
        "--split valid of another fold": (["-r", group / "fold0", "--split", "valid", "-o", "data_loader.args.fold=1"],
                                          "data_loader.args.fold: 0 and 1"),
        "threshold per label, wrong count": (["-r", group, "-o", "inference.threshold=[0.5, 0.5]"], "2 thresholds"),
        "combine_heads of one column": (["-r", group, "-o", "inference.combine_heads=true"], "combine_heads"),
        "another task's data": (["-r", group, "-o", "data_loader.args.task=regression", "-o",
                                 "data_loader.args.label_column=value"], "trained on multilabel targets"),
        "blend over its own input": (["--blend", copy / "probabilities.csv", "--out", copy], "would overwrite"),
        "edited task.json": (["--blend", copy / "probabilities.csv", "--out", tmp_path / "blend"], "task.json"),
    }
    for argv, culprit in cases.values():
        assert evaluate([*argv, *([] if "--out" in argv else ["--out", tmp_path / "out"])]) == 2, argv
        assert culprit in error_line(capsys), argv
    assert not (tmp_path / "out").exists() and not (tmp_path / "blend").exists()


def test_a_one_column_sample_named_after_a_head_gets_that_heads_labels(runs, task_set, tmp_path):
    sample = tmp_path / "sample.csv"
    ids = read_text_table(task_set / "test.csv")["id"]
    sample.write_text("id,gender\n" + "".join(f"{i},x\n" for i in ids))
    assert evaluate(["-r", runs.group("multitask"), "-o", f"inference.sample_submission={sample}",
                     "--out", tmp_path / "out"]) == 0
    predictions = read_text_table(tmp_path / "out" / "predictions.csv")
    assert list(predictions.columns) == ["id", "gender"] and set(predictions["gender"]) <= set(GENDERS)


def test_a_metric_keeps_its_own_threshold_in_test_py(runs, tmp_path):
    """inference.threshold decides the labels and scores the metrics given none of their own."""
    metrics = '["f1_micro", {"type": "f1_micro", "args": {"threshold": 0.02}, "name": "f1_low"}]'
    assert evaluate(["-r", runs.group("multilabel"), *TEST_LABELS, "-o", f"metrics={metrics}", "--out", tmp_path]) == 0
    written, table = json.loads((tmp_path / "metrics.json").read_text()), read_table(tmp_path / "probabilities.csv")
    targets = targets_from_truth(read_truth(runs.data), table.index, read_task(tmp_path)) == 1
    predicted = table.to_numpy() >= 0.02
    f1_low = 2 * (predicted & targets).sum() / (predicted.sum() + targets.sum())
    assert written["f1_low"] == pytest.approx(f1_low, abs=TOLERANCE) and written["f1_low"] != written["f1_micro"]


def test_heads_of_too_many_joint_classes_log_per_head_metrics_only(task_set, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("utils.task.MAX_JOINT", 10)  # the 3 x 2 x 3 heads have 18 joint classes
    config = task_config("multitask", task_set, tmp_path / "saved", epochs=1)
    assert "'val_accuracy' is never produced" in fails(config, tmp_path, capsys)
    config["trainer"]["monitor"] = "max val_accuracy_mask"
    assert train.main(["-c", str(write_config(config, tmp_path / "config.json"))]) == 0
    (run,) = run_dirs(tmp_path / "saved", "multitask")
    assert "val_accuracy" not in read_history(run)[0] and "val_accuracy_age" in read_history(run)[0]


# --- heads of both kinds: classes and numbers -----------------------------------------------------------------------

MIXED = {"mask": "multiclass", "gender": "multiclass", "value": "regression"}
TEAM_CODE = '''
import torch.nn as nn
import torch.nn.functional as F

from model.model import ConvNet


class MaskGenderAge(ConvNet):
    def __init__(self):
        super().__init__(num_classes=6, in_channels=3, width=8)

    def forward(self, x):
        mask, gender, age = super().forward(x).split([3, 2, 1], dim=1)
        return mask, gender, age.squeeze(1)


class MaskGenderAgeLoss(nn.Module):
    def forward(self, output, target):
        mask, gender, age = output
        mask_target, gender_target, age_target = target
        return F.cross_entropy(mask, mask_target) + F.cross_entropy(gender, gender_target) + \\
            0.015 * F.mse_loss(age, age_target)
'''


def mixed_config(task_set, save_dir, **args):
    config = task_config("multitask", task_set, save_dir)
    del config["data_loader"]["args"]["classes"]
    config["data_loader"]["args"].update(label_column=list(MIXED), task=MIXED, **args)
    config["arch"]["args"]["num_classes"] = 6
    config["metrics"] = ["accuracy", "rmse"]
    config["trainer"]["monitor"] = "max val_accuracy_mask"
    return config


def test_heads_of_classes_and_numbers_train_by_config_and_combine_through_bins(task_set, tmp_path, capsys):
    config = mixed_config(task_set, tmp_path / "saved", bins={"value": [1.0]})
    assert train.main(["-c", str(write_config(config, tmp_path / "config.json"))]) == 0
    (run,) = run_dirs(tmp_path / "saved", "multitask")
    assert {"val_accuracy", "val_accuracy_mask", "val_accuracy_gender", "val_rmse_value"} <= set(read_history(run)[0])
    assert not {"val_rmse_mask", "val_accuracy_value", "val_rmse"} & set(read_history(run)[0])
    out = tmp_path / "test"
    assert evaluate(["-r", run / "model_best.pth", *TEST_LABELS, "--out", out]) == 0
    table, truth = read_table(out / "probabilities.csv"), read_truth(task_set)
    assert list(read_text_table(out / "predictions.csv").columns) == ["id", "mask", "gender", "value"]
    metrics = json.loads((out / "metrics.json").read_text())
    rmse = np.sqrt(np.mean((table["value"].to_numpy() - truth.loc[table.index, "value"].to_numpy()) ** 2))
    assert metrics["rmse_value"] == pytest.approx(rmse, rel=1e-5) and rmse < truth["value"].std()
    combine = ["-r", run / "model_best.pth", *TEST_LABELS, "-o", "inference.combine_heads=true"]
    assert evaluate([*combine, "--out", tmp_path / "refused"]) == 2
    assert "list them in data_loader.args.classes" in error_line(capsys) and not (tmp_path / "refused").exists()
    classes = json.dumps([MASKS, GENDERS, None])
    assert evaluate([*combine, "-o", f"data_loader.args.classes={classes}", "--out", tmp_path / "combined"]) == 0
    combined = read_text_table(tmp_path / "combined" / "predictions.csv")
    mask = table[[f"mask:{m}" for m in MASKS]].to_numpy().argmax(axis=1)
    gender = table[[f"gender:{g}" for g in GENDERS]].to_numpy().argmax(axis=1)
    expected = mask * 4 + gender * 2 + (table["value"].to_numpy() >= 1.0)
    assert list(combined["label"].astype(int)) == list(expected)


def test_a_teams_three_head_model_and_loss_drop_in_unchanged(task_set, tmp_path, monkeypatch):
    (tmp_path / "maskteam").mkdir()
    (tmp_path / "maskteam" / "__init__.py").write_text(TEAM_CODE)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = mixed_config(task_set, tmp_path / "saved")
    config.update(import_roots=["maskteam"], arch={"type": "maskteam.MaskGenderAge", "args": {}},
                  loss={"type": "maskteam.MaskGenderAgeLoss", "args": {}})
    assert train.main(["-c", str(write_config(config, tmp_path / "config.json"))]) == 0
    (run,) = run_dirs(tmp_path / "saved", "multitask")
    assert float(read_history(run)[-1]["val_accuracy_mask"]) > 0.8
    assert evaluate(["-r", run / "model_best.pth", *TEST_LABELS, "-o", 'import_roots=["maskteam"]',
                     "--out", tmp_path / "test"]) == 0
    assert list(read_text_table(tmp_path / "test" / "predictions.csv").columns) == ["id", "mask", "gender", "value"]
    report = (tmp_path / "test" / "report.html").read_text()
    assert "Confusion matrix (mask)" in report and "Predicted against true (value)" in report


# --- the files the program writes and reads back ------------------------------------------------------------------

def rewritten_set(task_set, folder, change):
    """A copy of the task set's train.csv and images in `folder`, the rows changed by `change(table)`."""
    import shutil

    shutil.copytree(task_set / "train", folder / "train")
    table = read_text_table(task_set / "train.csv")
    table = change(table)
    table.to_csv(folder / "train.csv", index=False)
    return folder


def test_ids_and_regression_targets_come_back_from_oof_csv_exactly_as_the_csv_gives_them(task_set, tmp_path):
    """Ids NA, null and None stay ids; targets near 1.7e9 that float32 would merge keep every digit."""
    def change(table):
        for old, new in zip(table["id"][:3], ("NA", "null", "None")):
            (tmp_path / "data" / "train" / f"{old}.png").rename(tmp_path / "data" / "train" / f"{new}.png")
        table["id"] = ["NA", "null", "None", *table["id"][3:]]
        table["value"] = [str(1_700_000_000 + i) for i in range(len(table))]
        return table

    data = rewritten_set(task_set, tmp_path / "data", change)
    config = task_config("regression", data, tmp_path / "saved", epochs=1)
    config["data_loader"]["args"]["n_folds"] = 2
    assert train.main(["-c", str(write_config(config, tmp_path / "config.json")), "--folds", "all"]) == 0
    (group,) = run_dirs(tmp_path / "saved", "regression")
    oof = read_text_table(group / "oof.csv").set_index("id")
    truth = read_text_table(data / "train.csv").set_index("id")
    assert {"NA", "null", "None"} <= set(oof.index) and len(oof) == len(truth)
    assert [float(v) for v in oof["target:value"]] == [float(truth.loc[i, "value"]) for i in oof.index]
    error = oof["value"].astype(float) - oof["target:value"].astype(float)
    rmse = json.loads((group / "oof_metrics.json").read_text())["rmse"]
    assert rmse == pytest.approx(float(np.sqrt(np.mean(error ** 2))), rel=1e-6)


@pytest.mark.parametrize("name, change, args, culprit", [
    ("regression", lambda t: t.assign(value=["3.5e38", *t["value"][1:]]), {}, "must lie within"),
    ("multitask", lambda t: t.assign(mask=["target", *t["mask"][1:]]), {"label_column": "mask"},
     "'target' would name two columns"),
    ("multilabel", lambda t: t.assign(tags=["id", *t["tags"][1:]]), {}, "'id' would name two columns"),
    ("regression", lambda t: t.rename(columns={"id": "image", "value": "id"}), {"id_column": "image",
                                                                                 "label_column": "id"},
     "'id' would name two columns"),
])
def test_labels_the_written_files_cannot_hold_are_one_line_before_training(name, change, args, culprit, task_set,
                                                                            tmp_path, capsys):
    data = rewritten_set(task_set, tmp_path / "data", change)
    config = task_config(name, data, tmp_path / "saved", epochs=1)
    config["data_loader"]["args"].pop("classes", None)
    config["data_loader"]["args"].update(args)
    assert culprit in fails(config, tmp_path, capsys)


def test_the_default_regression_config_beats_the_mean_within_three_epochs_on_targets_of_1_to_100(tmp_path):
    """Targets train standardised, and come back in their own units."""
    bigger = make_task_set(tmp_path / "bigger", n_train=480, n_test=8)
    data = rewritten_set(bigger, tmp_path / "data",
                         lambda t: t.assign(value=[repr(1 + 49.5 * float(v)) for v in t["value"]]))
    config = task_config("regression", data, tmp_path / "saved", epochs=3)
    assert train.main(["-c", str(write_config(config, tmp_path / "config.json"))]) == 0
    (run,) = run_dirs(tmp_path / "saved", "regression")
    assert evaluate(["-r", run / "model_best.pth", "--split", "valid", "--out", tmp_path / "valid"]) == 0
    truth = read_text_table(data / "train.csv").set_index("id")["value"].astype(float)
    predicted = read_text_table(tmp_path / "valid" / "predictions.csv").set_index("id")["value"].astype(float)
    mean = truth.drop(predicted.index).mean()
    rmse = json.loads((tmp_path / "valid" / "metrics.json").read_text())["rmse"]
    assert rmse == pytest.approx(float(np.sqrt(((predicted - truth[predicted.index]) ** 2).mean())), rel=1e-6)
    assert rmse < float(np.sqrt(((truth[predicted.index] - mean) ** 2).mean()))


# --- inputs beyond one image --------------------------------------------------------------------------------------

def test_feature_columns_reach_the_model_with_the_image_in_every_batch(task_set, tmp_path):
    from model.model import ImageAndFeatures
    from utils.config import build, validate

    config = task_config("regression", task_set, tmp_path / "saved")
    config["data_loader"]["args"].update(feature_columns=["age"], test_csv="test_labels.csv")
    config = validate(config)
    training = build(config, "data_loader", seed=1)
    test = build(config, "data_loader", training=False, shuffle=False, validation_split=0.0, seed=1)
    for loader, csv in ((training.split_validation(), "train.csv"), (training, "train.csv"),
                        (test.evaluation_loader(), "test_labels.csv")):
        (images, features), _ = next(iter(loader))
        ages = set(read_truth(task_set, csv)["age"].astype(float).tolist())
        assert images.shape[1:] == (3, 16, 16) and features.shape == (len(images), 1) and \
            set(features[:, 0].tolist()) <= ages
    rows = loader.sampler.indices.tolist()[:len(images)]
    truth = read_truth(task_set, "test_labels.csv")
    assert features[:, 0].tolist() == [float(truth.loc[loader.dataset.ids[i], "age"]) for i in rows]
    model = ImageAndFeatures(num_classes=1, num_features=1, name="resnet18").eval()
    assert model(images, features).shape == (len(images), 1)


def test_feature_columns_beat_the_image_alone_where_the_target_depends_on_them(task_set, tmp_path):
    """The same backbone with and without a numeric column that the target is drawn from."""
    rng = np.random.default_rng(0)
    data = rewritten_set(task_set, tmp_path / "data", lambda t: t.assign(
        x=rng.uniform(0, 10, len(t)).round(3)).assign(value=lambda t: (5 * t["x"] + 1).map(repr)))
    best = {}
    for name, arch in (("image", {"type": "TorchvisionClassifier", "args": {"name": "resnet18", "num_classes": 1}}),
                       ("features", {"type": "ImageAndFeatures", "args": {"num_classes": 1, "num_features": 1}})):
        config = task_config("regression", data, tmp_path / "saved", epochs=8)
        config.update(name=name, arch=arch)
        if name == "features":
            config["data_loader"]["args"]["feature_columns"] = ["x"]
        assert train.main(["-c", str(write_config(config, tmp_path / f"{name}.json"))]) == 0
        (run,) = run_dirs(tmp_path / "saved", name)
        best[name] = min(float(row["val_rmse"]) for row in read_history(run))
    assert best["features"] < 0.5 * best["image"], best


@pytest.mark.parametrize("columns, culprit", [(["gender"], "a feature needs a finite number"),
                                              (["value"], "is the id, label or group column"),
                                              ("age", "expected a list of distinct column names")])
def test_feature_columns_that_are_not_numbers_of_their_own_are_one_line(columns, culprit, task_set, tmp_path,
                                                                        capsys):
    config = task_config("regression", task_set, tmp_path / "saved", epochs=1)
    config["data_loader"]["args"]["feature_columns"] = columns
    assert culprit in fails(config, tmp_path, capsys)
