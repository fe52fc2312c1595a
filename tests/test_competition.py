"""Competition workflow: K-fold and group-aware splits, out-of-fold predictions, class-balanced sampling, test.py's
ensembles, TTA, submissions and blends, the extra losses, torchvision backbones and new_project.py."""
import json
import math
import os
import re
import shutil
import subprocess
import sys
import urllib.error
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import new_project
import train
from base.splits import assign_folds
from tests.helpers import (
    DATA,
    N_TEST,
    N_TRAIN,
    REPO,
    error_line,
    evaluate,
    fails,
    load,
    make_config,
    read_csv_rows,
    read_history,
    run_dirs,
    write_config,
)
from utils.config import build, build_loss, validate
from utils.util import seed_everything

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def write_csv(path, header, rows):
    path.write_text(",".join(header) + "\n" + "".join(",".join(map(str, row)) + "\n" for row in rows))
    return path


def build_loader(config):
    """The training data loader exactly as train.py builds it (seeded from the config first)."""
    config = validate(config)
    seed_everything(config["seed"])
    return build(config, "data_loader")


def dataset_of(loader):
    return loader.dataset.dataset  # the CsvImageDataset inside the loader's seeding wrapper


def read_table(path):
    """A probabilities.csv as {id: [p per class]} plus its class columns."""
    rows = read_csv_rows(path)
    classes = [c for c in rows[0] if c != "id"]
    return {row["id"]: [float(row[c]) for c in classes] for row in rows}, classes


def assert_same_probabilities(a, b):
    table_a, classes_a = read_table(a)
    table_b, classes_b = read_table(b)
    assert classes_a == classes_b and list(table_a) == list(table_b)
    np.testing.assert_allclose(np.array(list(table_a.values())), np.array(list(table_b.values())), rtol=1e-5,
                               atol=1e-7)


# --- fold assignment -----------------------------------------------------------------------------------------------

def imbalanced_targets(n=1000):
    """Classes in proportions 50 / 30 / 15 / 5 %, shuffled."""
    targets = np.array([0] * (n // 2) + [1] * (3 * n // 10) + [2] * (3 * n // 20) + [3] * (n // 20))
    return np.random.default_rng(0).permutation(targets)


def uneven_groups(n):
    """Group names for n samples: groups of 1 to 9 consecutive samples."""
    groups, size, start = [], 1, 0
    while start < n:
        groups += [f"patient{len(set(groups))}"] * min(size, n - start)
        start += size
        size = size % 9 + 1
    return np.array(groups)


def test_stratified_folds_partition_the_data_and_keep_class_ratios():
    targets = imbalanced_targets()
    folds = assign_folds(len(targets), 5, seed=3, targets=targets)
    members = [np.flatnonzero(folds == k) for k in range(5)]
    assert sorted(np.concatenate(members).tolist()) == list(range(len(targets)))  # disjoint and covering
    assert [len(m) for m in members] == [200] * 5
    overall = np.bincount(targets) / len(targets)
    for m in members:
        assert np.abs(np.bincount(targets[m], minlength=4) / len(m) - overall).max() <= 0.01


@pytest.mark.parametrize("labelled", [True, False])
def test_group_folds_never_split_a_group(labelled):
    n = 600
    groups = uneven_groups(n)
    targets = np.random.default_rng(1).integers(0, 3, n) if labelled else None
    folds = assign_folds(n, 4, seed=0, targets=targets, groups=groups)
    assert sorted(set(folds.tolist())) == [0, 1, 2, 3]
    for group in set(groups.tolist()):
        assert len(set(folds[groups == group].tolist())) == 1, group
    sizes = np.bincount(folds)
    assert sizes.min() >= 0.8 * n / 4 and sizes.max() <= 1.2 * n / 4  # still about equal folds


@pytest.mark.parametrize("grouped", [False, True])
def test_folds_are_reproducible_for_a_seed_and_differ_for_another(grouped):
    targets = imbalanced_targets(600)
    groups = uneven_groups(600) if grouped else None
    first = assign_folds(600, 5, seed=7, targets=targets, groups=groups)
    assert np.array_equal(first, assign_folds(600, 5, seed=7, targets=targets, groups=groups))
    assert not np.array_equal(first, assign_folds(600, 5, seed=8, targets=targets, groups=groups))


# --- data loaders: groups and class balance ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def grouped_csv(data_slice, tmp_path_factory):
    """train.csv of the slice with a `patient` column: groups of 1 to 9 rows."""
    folder = tmp_path_factory.mktemp("grouped")
    rows = read_csv_rows(data_slice / "train.csv")
    groups = uneven_groups(len(rows))
    write_csv(folder / "train.csv", ["id", "label", "patient"],
              [(row["id"], row["label"], group) for row, group in zip(rows, groups)])
    return folder


@pytest.mark.parametrize("split", [{"validation_split": 0.2}, {"n_folds": 3, "fold": 1}])
def test_validation_and_training_never_share_a_group(grouped_csv, tmp_path, split):
    config = make_config(grouped_csv, tmp_path / "saved")
    config["data_loader"]["args"].update(group_column="patient", **split)
    loader = build_loader(config)
    groups = dataset_of(loader).groups
    train_groups = {groups[i] for i in loader.train_indices}
    valid_groups = {groups[i] for i in loader.valid_indices}
    assert valid_groups and train_groups
    assert not train_groups & valid_groups
    assert len(loader.train_indices) + len(loader.valid_indices) == N_TRAIN
    assert 0.1 * N_TRAIN <= len(loader.valid_indices) <= 0.5 * N_TRAIN


def test_balanced_sampling_draws_classes_about_equally(tmp_path):
    """60 / 15 / 5 rows of three classes; five balanced epochs draw each class about a third of the time."""
    rows = read_csv_rows(DATA / "train.csv")
    by_label = {label: [r for r in rows if r["label"] == label] for label in ("1", "7", "3")}
    chosen = by_label["1"][:60] + by_label["7"][:15] + by_label["3"][:5]
    write_csv(tmp_path / "train.csv", ["id", "label"], [(r["id"], r["label"]) for r in chosen])

    def drawn(balanced):
        config = make_config(tmp_path, tmp_path / "saved", monitor="off")
        config["data_loader"]["args"].update(validation_split=0.0, balanced=balanced, batch_size=16)
        loader = build_loader(config)
        classes = dataset_of(loader).classes
        counts = Counter()
        for epoch in range(1, 6):
            loader.set_epoch(epoch)
            counts.update(str(classes[t]) for _, target in loader for t in target.tolist())
        return counts

    assert drawn(False) == {"1": 300, "7": 75, "3": 25}  # five plain epochs: every row once per epoch
    balanced = drawn(True)
    assert sum(balanced.values()) == 400  # an epoch still has as many samples as the data
    for label in ("1", "7", "3"):
        assert 100 <= balanced[label] <= 170, balanced  # about 133 each


# --- K folds end to end -------------------------------------------------------------------------------------------

N_FOLDS = 2


def fold_config(data_slice, save_dir):
    config = make_config(data_slice, save_dir, epochs=1, limit_train_batches=2)
    config["data_loader"]["args"]["n_folds"] = N_FOLDS
    return config


@pytest.fixture(scope="module")
def folds_run(data_slice, tmp_path_factory):
    base = tmp_path_factory.mktemp("folds")
    config = fold_config(data_slice, base / "saved")
    path = write_config(config, base / "config.json")
    assert train.main(["-c", str(path), "--folds", "all"]) == 0
    (group,) = run_dirs(base / "saved")
    return SimpleNamespace(group=group, config=config, path=path, base=base)


def fold_ids(data_slice, config, fold):
    """The ids of fold `fold` as assign_folds draws them (the loader seeds from the config's seed)."""
    rows = read_csv_rows(data_slice / "train.csv")
    targets = [int(r["label"]) for r in rows]  # classes are the sorted digit labels: index == digit
    folds = assign_folds(len(rows), N_FOLDS, config["seed"], targets)
    return sorted(r["id"] for r, f in zip(rows, folds) if f == fold)


def test_all_folds_write_one_best_checkpoint_each_and_out_of_fold_predictions(folds_run, data_slice):
    group = folds_run.group
    assert sorted(p.name for p in group.iterdir()) == ["fold0", "fold1", "group.json", "oof.csv", "oof_metrics.json",
                                                      "report.html"]
    for k in range(N_FOLDS):
        best = load(group / f"fold{k}" / "model_best.pth")
        assert best["config"]["data_loader"]["args"]["fold"] == k

    truth = {r["id"]: r["label"] for r in read_csv_rows(data_slice / "train.csv")}
    oof = read_csv_rows(group / "oof.csv")
    ids = [row["id"] for row in oof]
    assert len(ids) == len(set(ids)) == N_TRAIN and set(ids) == set(truth)  # every training row exactly once
    for row in oof:
        assert row["target"] == truth[row["id"]]
        assert sum(float(row[str(d)]) for d in range(10)) == pytest.approx(1, abs=1e-5)
    for k in range(N_FOLDS):  # each fold predicted its own validation rows
        assert sorted(r["id"] for r in read_csv_rows(group / f"fold{k}" / "oof.csv")) == fold_ids(
            data_slice, folds_run.config, k)

    metrics = json.loads((group / "oof_metrics.json").read_text())
    assert metrics["n_samples"] == N_TRAIN
    hits = sum(max(range(10), key=lambda d: float(row[str(d)])) == int(row["target"]) for row in oof)
    assert metrics["accuracy"] == pytest.approx(hits / N_TRAIN)


def test_one_fold_validates_on_that_folds_ids(folds_run, data_slice, tmp_path):
    config = fold_config(data_slice, tmp_path / "saved")
    path = write_config(config, tmp_path / "config.json")
    assert train.main(["-c", str(path), "--fold", "1"]) == 0
    (run_dir,) = run_dirs(tmp_path / "saved")
    assert not (run_dir / "fold0").exists()
    assert json.loads((run_dir / "config.json").read_text())["data_loader"]["args"]["fold"] == 1

    assert evaluate(["-r", run_dir / "checkpoint-last.pth", "--split", "valid", "--out", tmp_path / "valid"]) == 0
    valid_ids = sorted(row["id"] for row in read_csv_rows(tmp_path / "valid" / "predictions.csv"))
    assert valid_ids == fold_ids(data_slice, config, 1)
    assert valid_ids == sorted(r["id"] for r in read_csv_rows(folds_run.group / "fold1" / "oof.csv"))


def test_fast_dev_run_of_all_folds_writes_nothing(data_slice, tmp_path):
    path = write_config(fold_config(data_slice, tmp_path / "saved"), tmp_path / "config.json")
    assert train.main(["-c", str(path), "--folds", "all", "--fast-dev-run"]) == 0
    assert not (tmp_path / "saved").exists()


def test_fold_without_n_folds_is_an_error(data_slice, tmp_path, capsys):
    assert "n_folds" in fails(make_config(data_slice, tmp_path / "saved", epochs=1), tmp_path, capsys, "--fold", "1")


# --- test.py: ensembles, TTA, submissions, blends ------------------------------------------------------------------

def test_the_same_checkpoint_twice_is_the_same_as_once(folds_run, tmp_path):
    best = folds_run.group / "fold0" / "model_best.pth"
    assert evaluate(["-r", best, "--out", tmp_path / "one"]) == 0
    assert evaluate(["-r", best, "-r", best, "--out", tmp_path / "two"]) == 0
    assert_same_probabilities(tmp_path / "one" / "probabilities.csv", tmp_path / "two" / "probabilities.csv")
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert len(two["checkpoints"]) == 2
    for name in ("loss", "accuracy", "top_k_acc", "macro_f1"):
        assert two[name] == pytest.approx(one[name], rel=1e-6), name
    assert read_csv_rows(tmp_path / "two" / "predictions.csv") == read_csv_rows(tmp_path / "one" / "predictions.csv")


def test_identity_tta_changes_nothing_and_a_flip_does(folds_run, tmp_path):
    best = folds_run.group / "fold0" / "model_best.pth"
    assert evaluate(["-r", best, "--out", tmp_path / "plain"]) == 0
    assert evaluate(["-r", best, "--out", tmp_path / "identity", "-o", 'inference.tta=[{"type": "Identity"}]']) == 0
    assert json.loads((tmp_path / "identity" / "metrics.json").read_text())["tta_views"] == 1
    assert_same_probabilities(tmp_path / "plain" / "probabilities.csv", tmp_path / "identity" / "probabilities.csv")

    flip = 'inference.tta=[{"type": "RandomHorizontalFlip", "args": {"p": 1.0}}]'
    assert evaluate(["-r", best, "--out", tmp_path / "flip", "-o", flip]) == 0
    plain, _ = read_table(tmp_path / "plain" / "probabilities.csv")
    flipped, _ = read_table(tmp_path / "flip" / "probabilities.csv")
    assert np.abs(np.array(list(plain.values())) - np.array(list(flipped.values()))).max() > 1e-3

    shutil.copytree(best.parent, tmp_path / "run")  # by default, evaluations with TTA get a folder of their own
    assert evaluate(["-r", tmp_path / "run" / "model_best.pth"]).out.name == "test-model_best"
    assert evaluate(["-r", tmp_path / "run" / "model_best.pth", "-o", flip]).out.name == "test-model_best-tta"


def test_a_run_group_folder_ensembles_its_folds(folds_run, tmp_path):
    group = folds_run.group
    assert evaluate(["-r", group, "--out", tmp_path / "group"]) == 0
    folds = [group / f"fold{k}" / "model_best.pth" for k in range(N_FOLDS)]
    assert evaluate([*(a for f in folds for a in ("-r", f)), "--out", tmp_path / "explicit"]) == 0
    metrics = json.loads((tmp_path / "group" / "metrics.json").read_text())
    assert metrics["checkpoints"] == [str(f) for f in folds]
    assert_same_probabilities(tmp_path / "group" / "probabilities.csv", tmp_path / "explicit" / "probabilities.csv")


def copied_group(folds_run, folder, change):
    """A copy of the run group in `folder`, changed by `change(group, manifest)` (the manifest written back)."""
    group = folder / "group"
    shutil.copytree(folds_run.group, group)
    manifest = json.loads((group / "group.json").read_text())
    change(group, manifest)
    (group / "group.json").write_text(json.dumps(manifest))
    return group


def unfinished_fold1(group, manifest):
    """As a group killed while fold 1 trained: fold 1's checkpoint is there, its out-of-fold file and the group's
    are not."""
    manifest["finished"] = [0]
    for name in ("oof.csv", "oof_metrics.json", "fold1/oof.csv"):
        (group / name).unlink()


def without_fold1(group, manifest):
    """As a group killed before fold 1 began."""
    unfinished_fold1(group, manifest)
    shutil.rmtree(group / "fold1")


@pytest.mark.parametrize("change, culprit", [
    (without_fold1, "fold(s) 1 of 2 not finished"),
    (unfinished_fold1, "fold(s) 1 of 2 not finished"),
    (lambda group, manifest: shutil.copytree(group / "fold1", group / "fold2"), "fold2/ is no fold it planned"),
    (lambda group, manifest: manifest.pop("folds"), "not a run-group manifest"),
], ids=["fold-missing", "fold-unfinished", "extra-fold", "no-plan"])
def test_an_incomplete_run_group_is_refused(change, culprit, folds_run, tmp_path, capsys):
    group = copied_group(folds_run, tmp_path, change)
    assert evaluate(["-r", group, "--out", tmp_path / "out"]) == 2
    assert culprit in error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_a_folder_beside_the_folds_is_no_fold(folds_run, tmp_path):
    group = copied_group(folds_run, tmp_path, lambda group, _: shutil.copytree(group / "fold0", group / "fold0_old"))
    assert evaluate(["-r", group, "--out", tmp_path / "out"]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["checkpoints"] == [str(group / f"fold{k}" / "model_best.pth") for k in range(N_FOLDS)]


@pytest.mark.parametrize("change", [without_fold1, unfinished_fold1], ids=["fold-missing", "fold-unfinished"])
def test_a_killed_run_group_is_finished_by_resuming_it(change, folds_run, tmp_path):
    """train.py -r <group> keeps the finished folds, resumes or trains the others, and writes the group's files."""
    group = copied_group(folds_run, tmp_path, change)
    fold0 = (group / "fold0" / "model_best.pth").read_bytes()
    assert train.main(["-r", str(group)]) == 0
    assert (group / "fold0" / "model_best.pth").read_bytes() == fold0
    assert json.loads((group / "group.json").read_text())["finished"] == [0, 1]
    assert sorted(row["id"] for row in read_csv_rows(group / "oof.csv")) == sorted(
        row["id"] for row in read_csv_rows(folds_run.group / "oof.csv"))
    assert evaluate(["-r", group, "--out", tmp_path / "out"]) == 0


def test_a_run_group_that_fails_its_checks_leaves_nothing(data_slice, tmp_path, capsys):
    config = fold_config(data_slice, tmp_path / "saved")
    config["trainer"]["monitor"] = "max val_accuracy_label"  # a per-head name: known wrong once the data is read
    assert "trainer.monitor" in fails(config, tmp_path, capsys, "--folds", "all")


@pytest.fixture(scope="module")
def shuffled_ids(data_slice):
    ids = [row["id"] for row in read_csv_rows(data_slice / "test.csv")]
    return [ids[i] for i in np.random.default_rng(0).permutation(len(ids))]


def test_submission_follows_the_sample_submission(folds_run, tmp_path, shuffled_ids):
    best = folds_run.group / "fold0" / "model_best.pth"
    assert evaluate(["-r", best, "--out", tmp_path / "plain"]) == 0
    labels = {row["id"]: row["label"] for row in read_csv_rows(tmp_path / "plain" / "predictions.csv")}

    sample = write_csv(tmp_path / "sample_submission.csv", ["ImageId", "Digit"], [(i, 0) for i in shuffled_ids])
    out = tmp_path / "sample"
    assert evaluate(["-r", best, "--out", out, "-o", f"inference.sample_submission={sample}"]) == 0
    lines = (out / "predictions.csv").read_text().splitlines()
    assert lines[0] == "ImageId,Digit"
    rows = read_csv_rows(out / "predictions.csv")
    assert [row["ImageId"] for row in rows] == shuffled_ids
    assert all(row["Digit"] == labels[row["ImageId"]] for row in rows)


def test_submission_with_one_column_per_class_in_the_samples_order(folds_run, tmp_path, shuffled_ids):
    best = folds_run.group / "fold0" / "model_best.pth"
    columns = ["9", "0", "5", "1", "8", "2", "7", "3", "6", "4"]
    sample = write_csv(tmp_path / "sample_submission.csv", ["image", *columns],
                       [(i, *[0.1] * 10) for i in shuffled_ids])
    out = tmp_path / "sample"
    assert evaluate(["-r", best, "--out", out, "-o", f"inference.sample_submission={sample}"]) == 0
    assert (out / "predictions.csv").read_text().splitlines()[0] == ",".join(["image", *columns])
    probabilities, _ = read_table(out / "probabilities.csv")
    rows = read_csv_rows(out / "predictions.csv")
    assert [row["image"] for row in rows] == shuffled_ids
    for row in rows:
        expected = probabilities[row["image"]]
        assert [float(row[c]) for c in columns] == pytest.approx([expected[int(c)] for c in columns], rel=1e-5)


@pytest.mark.parametrize("labels", ["constant", "sample submission"])
def test_placeholder_labels_give_predictions_and_no_metrics(folds_run, data_slice, tmp_path, capsys, labels):
    best = folds_run.group / "fold0" / "model_best.pth"
    ids = [row["id"] for row in read_csv_rows(data_slice / "test.csv")]
    placeholders = write_csv(tmp_path / "sample_submission.csv", ["id", "label"],
                             [(i, 0 if labels == "constant" else n % 10) for n, i in enumerate(ids)])
    sample = ["-o", f"inference.sample_submission={placeholders}"] if labels == "sample submission" else []
    out = tmp_path / "out"
    assert evaluate(["-r", best, "--out", out, "-o", f"data_loader.args.test_csv={placeholders}", *sample]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["predictions.csv", "probabilities.csv", "report.html"]
    assert "no labels: no scores" in (out / "report.html").read_text()
    notes = [line for line in "".join(capsys.readouterr()).splitlines() if "placeholders" in line]
    assert len(notes) == 1 and "no metrics" in notes[0]


@pytest.fixture(scope="module")
def words_run(data_slice, tmp_path_factory):
    """A run on labels that are words, as competitions often have: the class index is the sorted position."""
    base = tmp_path_factory.mktemp("words")
    for name in ("train.csv", "test_labels.csv"):
        rows = read_csv_rows(data_slice / name)
        write_csv(base / name, ["id", "label"], [(r["id"], WORDS[int(r["label"])]) for r in rows])
    (base / "test.csv").write_text((data_slice / "test.csv").read_text())
    config = make_config(base, base / "saved", epochs=1, limit_train_batches=2)
    assert train.main(["-c", str(write_config(config, base / "config.json"))]) == 0
    (run_dir,) = run_dirs(base / "saved")
    return run_dir


def test_label_format_name_or_index_in_the_order_given(words_run, tmp_path, capsys):
    best = words_run / "model_best.pth"
    assert evaluate(["-r", best, "--out", tmp_path / "name"]) == 0
    index = ["-r", best, "-o", "inference.label_format=index"]
    assert evaluate([*index, "--out", tmp_path / "index"]) == 2  # text classes the program sorted: no order given
    assert "inference.label_format" in error_line(capsys) and not (tmp_path / "index").exists()
    classes = json.dumps(sorted(WORDS))
    assert evaluate([*index, "-o", f"data_loader.args.classes={classes}", "--out", tmp_path / "index"]) == 0
    names = read_csv_rows(tmp_path / "name" / "predictions.csv")
    indices = read_csv_rows(tmp_path / "index" / "predictions.csv")
    assert len(names) == N_TEST and [r["id"] for r in names] == [r["id"] for r in indices]
    classes = sorted(WORDS)
    assert read_table(tmp_path / "name" / "probabilities.csv")[1] == classes
    for name, index in zip(names, indices):
        assert name["label"] in WORDS
        assert classes[int(index["label"])] == name["label"]


def test_blend_is_the_weighted_mean(tmp_path):
    classes = ["cat", "dog", "eel"]
    a = {"a1": [0.7, 0.2, 0.1], "a2": [0.1, 0.1, 0.8], "NA": [0.3, 0.4, 0.3]}  # NA: an id, not a missing value
    b = {"a1": [0.1, 0.1, 0.8], "a2": [0.1, 0.6, 0.3], "NA": [0.3, 0.3, 0.4]}
    write_csv(tmp_path / "a.csv", ["id", *classes], [(i, *p) for i, p in a.items()])
    write_csv(tmp_path / "b.csv", ["id", *classes], [(i, *b[i]) for i in ("NA", "a1", "a2")])  # another row order
    out = tmp_path / "blend"
    weights = ["--weights", "1.5e308", "0.5e308"]  # 3 to 1, and a sum beyond float64
    assert evaluate(["--blend", tmp_path / "a.csv", tmp_path / "b.csv", *weights, "--out", out]) == 0
    blended, blended_classes = read_table(out / "probabilities.csv")
    assert blended_classes == classes and list(blended) == ["a1", "a2", "NA"]
    for i in a:
        assert blended[i] == pytest.approx([(3 * p + q) / 4 for p, q in zip(a[i], b[i])], abs=1e-6)
    assert [(r["id"], r["label"]) for r in read_csv_rows(out / "predictions.csv")] == [
        ("a1", "cat"), ("a2", "eel"), ("NA", "dog")]  # a1: .55/.175/.275; a2: .1/.225/.675; NA: .3/.375/.325


def test_blend_of_a_saved_probabilities_file_gives_its_predictions(folds_run, tmp_path):
    """The rows of a probabilities.csv as test.py writes it (float32 as text) sum to 1 closely enough for --blend."""
    best = folds_run.group / "fold0" / "model_best.pth"
    assert evaluate(["-r", best, "--out", tmp_path / "one"]) == 0
    assert evaluate(["--blend", tmp_path / "one" / "probabilities.csv", "--out", tmp_path / "blend"]) == 0
    assert read_csv_rows(tmp_path / "blend" / "predictions.csv") == read_csv_rows(tmp_path / "one" / "predictions.csv")


def test_a_model_from_an_import_roots_package_is_evaluated_with_o_import_roots(data_slice, tmp_path, monkeypatch):
    """A checkpoint's own import_roots are dropped; the ones given with -o reach its model as well as its data."""
    (tmp_path / "extra_models").mkdir()
    (tmp_path / "extra_models" / "__init__.py").write_text("from model.model import ConvNet as Net\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = make_config(data_slice, tmp_path / "saved")
    config.update(import_roots=["extra_models"], arch={**config["arch"], "type": "extra_models.Net"})
    torch.save({"state_dict": build(validate(config), "arch").state_dict(), "config": config}, tmp_path / "model.pth")
    roots = 'import_roots=["extra_models"]'
    assert evaluate(["-r", tmp_path / "model.pth", "-o", roots, "--out", tmp_path / "out"]) == 0
    assert len(read_csv_rows(tmp_path / "out" / "predictions.csv")) == N_TEST


# --- test.py: mistakes are one line, before anything is predicted or written ---------------------------------------

def tta(*specs):
    return ["-o", f"inference.tta={json.dumps(list(specs))}"]


def eval_transforms(*specs):
    return ["-o", f"data_loader.args.eval_transforms={json.dumps(list(specs))}"]


RESIZE_7 = {"type": "Resize", "args": {"size": 7}}
REFUSED_EVALUATIONS = {
    # TTA transforms that fail on a batch of images, or whose views the model cannot take
    "tta-lambda": (tta({"type": "Lambda", "args": {"lambd": "x"}}), ("inference.tta[0]", "Lambda")),
    "tta-to-pil-image": (tta({"type": "Identity"}, {"type": "ToPILImage"}), ("inference.tta[1]", "ToPILImage")),
    "tta-five-crop": (tta({"type": "FiveCrop", "args": {"size": 20}}), ("inference.tta[0]", "FiveCrop", "tuple")),
    "tta-too-small-for-the-model": (tta(RESIZE_7), ("inference.tta[0]", "ConvNet", "[4, 1, 7, 7]")),
    # data the model cannot take, classes in another order than the model's, a loss that cannot take probabilities
    "eval-transforms-too-small": (eval_transforms(RESIZE_7), ("model_best.pth", "ConvNet", "[4, 1, 7, 7]")),
    "eval-transforms-failing": (eval_transforms({"type": "RandomCrop", "args": {"size": 64}}), ("data_loader", "crop")),
    "classes-reordered": (["-o", "data_loader.args.classes=[1, 0, 2, 3, 4, 5, 6, 7, 8, 9]"], ("model_best.pth",
                                                                                             "class 0")),
    "loss-of-other-shapes": (["-o", 'loss={"type": "BCELoss"}'], ("loss:",)),
    # flags and overrides that make no sense or would be ignored
    "batch-size-0": (["--bs", "0"], ("--bs", ">= 1")),
    "empty-out": (["--out", ""], ("--out", "empty")),
    "weights-without-blend": (["--weights", "1"], ("--weights", "--blend")),
    "override-of-the-model": (["-o", "arch.args.num_classes=5"], ("-o arch.args.num_classes", "not used")),
    "override-of-shuffle": (["-o", "data_loader.args.shuffle=true"], ("-o data_loader.args.shuffle", "not used")),
    "sample-submission-with-split-valid": (["--split", "valid", "-o", "inference.sample_submission=s.csv"],
                                           ("inference.sample_submission", "--split valid")),
}


@pytest.mark.parametrize("extra, culprit", REFUSED_EVALUATIONS.values(), ids=REFUSED_EVALUATIONS.keys())
def test_evaluation_mistakes_are_refused_before_anything_is_written(extra, culprit, folds_run, tmp_path, capsys):
    best = folds_run.group / "fold0" / "model_best.pth"
    before = sorted(best.parent.iterdir())
    assert evaluate(["-r", best, "--out", tmp_path / "out", *extra]) == 2
    line = error_line(capsys)
    assert all(text in line for text in culprit), line
    assert not (tmp_path / "out").exists() and sorted(best.parent.iterdir()) == before


def test_an_ensemble_of_models_trained_on_other_inputs_is_refused(folds_run, tmp_path, capsys):
    """Every model of an ensemble is fed the inputs the first one's settings make: one trained on another
    normalisation would silently get inputs it never saw."""
    checkpoint = load(folds_run.group / "fold1" / "model_best.pth")
    checkpoint["config"]["data_loader"]["args"]["mean"] = [0.5]
    torch.save(checkpoint, tmp_path / "other-mean.pth")
    best = folds_run.group / "fold0" / "model_best.pth"
    assert evaluate(["-r", best, "-r", tmp_path / "other-mean.pth", "--out", tmp_path / "out"]) == 2
    assert "data_loader.args.mean: [0.1307] and [0.5]" in error_line(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, culprit", [
    (lambda ids: "id,label\n" + "".join(f"{i},0\n" for i in ids[:-1] + ids[:1]), "more than once"),
    (lambda ids: bytes(range(128, 256)), "cannot read"),
], ids=["repeated-id", "not-text"])
def test_a_sample_submission_that_cannot_be_followed_is_refused(content, culprit, folds_run, tmp_path, capsys,
                                                                 shuffled_ids):
    sample = tmp_path / "sample.csv"
    text = content(shuffled_ids)
    sample.write_bytes(text if isinstance(text, bytes) else text.encode())
    best = folds_run.group / "fold0" / "model_best.pth"
    assert evaluate(["-r", best, "-o", f"inference.sample_submission={sample}", "--out", tmp_path / "out"]) == 2
    line = error_line(capsys)
    assert "inference.sample_submission" in line and culprit in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, culprit", [
    ("id,cat,dog\na1,-0.5,1.5\n", "in [0, 1]"),
    ("id,cat,dog\na1,0.5,0.6\n", "sum to 1.1"),
    ("id,cat,cat\na1,0.5,0.5\n", "'cat' more than once"),
], ids=["negative", "not-summing-to-one", "repeated-class"])
def test_blend_refuses_a_file_that_is_not_probabilities(content, culprit, tmp_path, capsys):
    (tmp_path / "scores.csv").write_text(content)
    assert evaluate(["--blend", tmp_path / "scores.csv", "--out", tmp_path / "out"]) == 2
    line = error_line(capsys)
    assert "scores.csv" in line and culprit in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, culprit", [
    (["--ema"], "--ema"), (["--split", "valid"], "--split"), (["--bs", "8"], "--bs"), (["-d", "cpu"], "-d"),
    (["-r", "model.pth"], "-r"), (["-o", "inference.tta=[]"], "-o inference.tta"), (["-o", "seed=1"], "-o seed"),
    (["--out", "{tmp}/notes.txt"], "notes.txt"),
], ids=["ema", "split", "bs", "device", "checkpoint", "tta", "seed", "out-is-a-file"])
def test_blend_refuses_what_it_would_ignore_or_cannot_write(extra, culprit, tmp_path, capsys):
    write_csv(tmp_path / "a.csv", ["id", "cat", "dog"], [("a1", 0.25, 0.75)])
    (tmp_path / "notes.txt").write_text("a file\n")
    extra = [arg.format(tmp=tmp_path) for arg in extra]
    assert evaluate(["--blend", tmp_path / "a.csv", "--out", tmp_path / "out", *extra]) == 2
    assert culprit in error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "notes.txt"]


# --- losses --------------------------------------------------------------------------------------------------------

def test_cross_entropy_with_label_smoothing_and_class_weights_trains(data_slice, tmp_path):
    weight = [1.0, 2.0, 0.5, 1.0, 1.0, 3.0, 1.0, 1.0, 0.25, 1.0]
    config = make_config(data_slice, tmp_path / "saved", epochs=1, limit_train_batches=3)
    config["loss"] = {"type": "CrossEntropy", "args": {"label_smoothing": 0.1, "weight": weight}}
    assert train.main(["-c", str(write_config(config, tmp_path / "config.json"))]) == 0
    (run_dir,) = run_dirs(tmp_path / "saved")
    (row,) = read_history(run_dir)
    assert math.isfinite(float(row["loss"]))

    # the logged validation loss is that loss of the saved model's validation outputs, worked out here
    assert evaluate(["-r", run_dir / "checkpoint-last.pth", "--split", "valid", "--out", tmp_path / "valid"]) == 0
    probabilities, _ = read_table(tmp_path / "valid" / "probabilities.csv")
    truth = {r["id"]: int(r["label"]) for r in read_csv_rows(data_slice / "train.csv")}
    log_p = torch.tensor(list(probabilities.values())).log()
    target = torch.tensor([truth[i] for i in probabilities])
    expected = F.cross_entropy(log_p, target, weight=torch.tensor(weight), label_smoothing=0.1).item()
    assert float(row["val_loss"]) == pytest.approx(expected, rel=1e-4)
    assert float(row["val_loss"]) != pytest.approx(F.cross_entropy(log_p, target).item(), rel=1e-3)


def test_focal_loss_with_gamma_zero_is_cross_entropy(config):
    config["loss"] = {"type": "FocalLoss", "args": {"gamma": 0}}
    focal = build_loss(validate(config))
    logits = torch.randn(64, 10, generator=torch.Generator().manual_seed(0)) * 3
    target = torch.randint(10, (64,), generator=torch.Generator().manual_seed(1))
    assert focal(logits, target).item() == pytest.approx(F.cross_entropy(logits, target).item(), rel=1e-6)

    config["loss"]["args"]["gamma"] = 2
    assert build_loss(validate(config))(logits, target) < F.cross_entropy(logits, target)  # easy samples count less


# --- torchvision backbones -----------------------------------------------------------------------------------------

def resnet_config(data_slice, save_dir, **args):
    """resnet18 for 1-channel 28x28 digits; `args` are extra TorchvisionClassifier arguments."""
    config = make_config(data_slice, save_dir, epochs=1)
    config["arch"] = {"type": "TorchvisionClassifier",
                      "args": {"name": "resnet18", "num_classes": 10, "in_channels": 1, **args}}
    return config


def test_torchvision_resnet18_fast_dev_run(data_slice, tmp_path, capsys):
    config = resnet_config(data_slice, tmp_path / "saved")
    assert train.main(["-c", str(write_config(config, tmp_path / "config.json")), "--fast-dev-run"]) == 0
    assert "epoch 1/1" in capsys.readouterr().out
    assert not (tmp_path / "saved").exists()


def test_pretrained_weights_offline_say_where_the_file_goes(data_slice, tmp_path, capsys, monkeypatch):
    import torch.hub
    import torchvision

    def offline(*args, **kwargs):
        raise urllib.error.URLError("offline")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(torch.hub, "urlopen", offline)
    config = resnet_config(data_slice, tmp_path / "saved", weights="DEFAULT")
    path = write_config(config, tmp_path / "config.json")
    assert train.main(["-c", str(path), "--fast-dev-run"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]  # torch.hub announces the download on stderr first
    assert line.startswith("error: arch.args.weights")
    file_name = torchvision.models.ResNet18_Weights.DEFAULT.url.rsplit("/", 1)[1]
    folder = tmp_path / "torch-home" / "hub" / "checkpoints"
    assert file_name in line and str(folder) in line

    folder.mkdir(parents=True, exist_ok=True)  # doing what the message says makes it work offline
    torch.save(torchvision.models.resnet18().state_dict(), folder / file_name)
    assert train.main(["-c", str(path), "--fast-dev-run"]) == 0


def test_frozen_backbone_trains_only_the_head_first(data_slice, tmp_path):
    """Fine-tune from a known starting point: epoch 1 (frozen) moves only the new head, epoch 2 the backbone too."""
    from model.model import TorchvisionClassifier

    torch.manual_seed(0)
    start = TorchvisionClassifier("resnet18", num_classes=10, in_channels=1)
    config = resnet_config(data_slice, tmp_path / "saved")
    config["trainer"].update(epochs=2, save_period=1, freeze_backbone_epochs=1, limit_train_batches=2,
                             limit_val_batches=1, monitor="off")
    config.update(optimizer={"type": "SGD", "args": {"lr": 0.05}}, lr_scheduler={})
    torch.save({"state_dict": start.state_dict(), "config": config}, tmp_path / "start.pth")
    path = write_config(config, tmp_path / "config.json")
    assert train.main(["-c", str(path), "-r", str(tmp_path / "start.pth")]) == 0
    (run_dir,) = run_dirs(tmp_path / "saved")

    initial = start.state_dict()
    epoch1 = load(run_dir / "checkpoint-epoch1.pth")["state_dict"]
    epoch2 = load(run_dir / "checkpoint-epoch2.pth")["state_dict"]
    head = {"net.fc.weight", "net.fc.bias"}
    backbone = [name for name, _ in start.named_parameters() if name not in head]
    assert len(backbone) > 50
    assert all(torch.equal(epoch1[name], initial[name]) for name in backbone)
    assert not any(torch.equal(epoch1[name], initial[name]) for name in head)
    changed = [name for name in backbone if not torch.equal(epoch2[name], epoch1[name])]
    assert len(changed) == len(backbone)


# --- new_project.py ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_new_project_copies_the_project_without_the_templates_own_parts_and_its_tests_pass(tmp_path, capsys):
    target = tmp_path / "new"
    assert new_project.main([str(target)]) == 0
    names = {p.relative_to(target).as_posix() for p in target.rglob("*")}
    assert {"train.py", "test.py", "config.json", "pytest.ini", "tests/conftest.py", "tests/helpers.py",
            "model/model.py"} <= names
    assert [p.name for p in (target / "saved").iterdir()] == [".gitkeep"]
    assert not (target / ".git").exists()
    assert not [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".pth"))]
    assert not (target / "data" / "mnist5k").exists()
    # the template's own proof stays behind: its benchmarks and how the sample data was made
    assert not (target / "benchmarks").exists()
    assert not (target / "data" / "make_mnist5k.py").exists() and not (target / "data" / "README.md").exists()
    out = capsys.readouterr().out
    assert f"next: cd {target} && git init && python -m pytest -q tests" in out
    assert "data/mnist5k" in out and "--with-sample-data" in out
    readme = (target / "README.md").read_text()
    assert readme.startswith("# new\n") and "`data/mnist5k`" in readme and "digits" not in readme.lower()
    assert (target / "docs" / "template.md").read_text().startswith("# PyTorch project template")

    # the copy's own tests (its fast subset) pass on the stand-in data its helpers generate without data/mnist5k
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow",
                             "tests"], cwd=target, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert int(re.search(r"(\d+) passed", result.stdout).group(1)) >= 150  # the suite ran, not skipped
    assert not (target / "data" / "mnist5k").exists()


@pytest.mark.skipif(not (REPO / "data" / "mnist5k" / "train.csv").exists(),
                    reason="a project made without the sample data has none to copy")
def test_new_project_with_sample_data(tmp_path):
    target = tmp_path / "new"
    assert new_project.main([str(target), "--with-sample-data"]) == 0
    copied = target / "data" / "mnist5k"
    for name in ("train.csv", "test.csv", "test_labels.csv"):
        assert (copied / name).read_bytes() == (REPO / "data" / "mnist5k" / name).read_bytes()
    for split in ("train", "test"):
        source = sorted(p.name for p in (REPO / "data" / "mnist5k" / split).iterdir())
        assert sorted(p.name for p in (copied / split).iterdir()) == source and source
    first = sorted((REPO / "data" / "mnist5k" / "train").iterdir())[0]
    assert (copied / "train" / first.name).read_bytes() == first.read_bytes()
    assert (target / "data" / "README.md").read_bytes() == (REPO / "data" / "README.md").read_bytes()  # licence


def test_new_project_copies_what_git_tracks_not_runs_or_stray_outputs(tmp_path):
    template = tmp_path / "template"
    for name in ("train.py", "config.json", "README.md", "docs/guide.md", "benchmarks/benchmark.py"):
        (template / name).parent.mkdir(parents=True, exist_ok=True)
        (template / name).write_text(f"{name}\n")
    (template / "config.json").write_text(json.dumps({"name": "leaf", "data_loader": {"args": {"data_dir": "data/"
                                                                                                       "leaves"}}}))
    (template / "README.md").write_text("# PyTorch project template\nsee [the guide](docs/guide.md), [train](train.py)"
                                        " and [the site](https://pytorch.org)\n")
    subprocess.run(["git", "init", "-q", str(template)], check=True)
    subprocess.run(["git", "-C", str(template), "add", "."], check=True)
    (template / "runs" / "leaf" / "1").mkdir(parents=True)  # a custom save_dir's run folder and a stray output
    (template / "runs" / "leaf" / "1" / "model_best.pth").write_bytes(b"weights")
    (template / "submission.csv").write_text("id,label\n")
    (template / "train.py").write_text("edited, not committed\n")

    target = new_project.copy_template(tmp_path / "leaf-competition", template=template)
    copied = sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file())
    assert copied == ["README.md", "config.json", "docs/guide.md", "docs/template.md", "saved/.gitkeep", "train.py"]
    assert (target / "train.py").read_text() == "edited, not committed\n"
    assert (target / "docs" / "template.md").read_text() == ("# PyTorch project template\nsee [the guide](guide.md), "
                                                             "[train](../train.py) and [the site](https://pytorch.org)\n")
    readme = (target / "README.md").read_text()
    assert readme.startswith("# leaf-competition\n") and "`data/leaves`" in readme and "saved/leaf/" in readme


def test_a_copy_given_only_git_init_copies_what_it_does_not_ignore(tmp_path):
    """The copy's own next step is `git init`, then its tests, which copy it in turn before anything is added."""
    template = tmp_path / "copy"
    for name, text in (("train.py", "x\n"), (".gitignore", "saved/*\n"), ("saved/run/model_best.pth", "w")):
        (template / name).parent.mkdir(parents=True, exist_ok=True)
        (template / name).write_text(text)
    subprocess.run(["git", "init", "-q", str(template)], check=True)
    target = new_project.copy_template(tmp_path / "again", template=template)
    copied = sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file())
    assert copied == [".gitignore", "README.md", "saved/.gitkeep", "train.py"]


def test_new_project_refuses_a_folder_that_is_not_empty(tmp_path):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not empty"):
        new_project.main([str(target)])
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
