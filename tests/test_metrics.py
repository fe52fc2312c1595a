"""Epoch-level metrics against values worked out by hand or with numpy on all the data at once, and the data loader's
stratified validation split."""
import math
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch.utils.data import Dataset

from base.base_data_loader import BaseDataLoader
from model import metric as metric_module
from model.metric import (
    MAE,
    R2,
    RMSE,
    Accuracy,
    ConfusionMatrix,
    EpochMetrics,
    MacroF1,
    MeanAveragePrecision,
    MultilabelF1Macro,
    MultilabelF1Micro,
    TopKAccuracy,
)

N_CLASSES = 5

# three batches of unequal size: (logits, targets), with no ties around any target's rank. Class 4 is never a
# target nor predicted; class 3 is predicted twice but never a target; class 2 is a target but never predicted.
BATCHES = [
    ([[5.0, 1.0, 0.0, 0.0, -1.0],    # 1: predicted 0, target 0
      [0.0, 3.0, 2.0, 0.0, -1.0],    # 2: predicted 1, target 2 ranks 2nd
      [0.0, 0.5, 0.2, 0.1, -1.0]],   # 3: predicted 1, target 1
     [0, 2, 1]),
    ([[0.1, 0.2, 0.3, 4.0, -1.0]],   # 4: predicted 3, target 0 ranks 4th
     [0]),
    ([[2.0, 1.0, 0.0, 0.0, -1.0],    # 5: predicted 0, target 0
      [1.0, 2.0, 0.0, 0.0, -1.0],    # 6: predicted 1, target 1
      [1.0, 2.0, 0.5, 0.0, -1.0],    # 7: predicted 1, target 2 ranks 3rd
      [0.0, 0.3, 0.2, 0.1, -1.0],    # 8: predicted 1, target 0 ranks 4th
      [3.0, 0.5, 1.0, 0.0, -1.0],    # 9: predicted 0, target 1 ranks 3rd
      [0.0, -0.5, 0.5, 9.0, -1.0],   # 10: predicted 3, target 1 ranks 4th
      [1.0, 0.0, 0.5, 0.2, -1.0]],   # 11: predicted 0, target 0
     [0, 1, 2, 0, 1, 1, 0]),
]


def tensors():
    return [(torch.tensor(logits), torch.tensor(targets)) for logits, targets in BATCHES]


def all_samples():
    logits = [row for batch, _ in BATCHES for row in batch]
    targets = [t for _, batch in BATCHES for t in batch]
    return logits, targets


def argmax(row):
    return max(range(len(row)), key=lambda i: (row[i], -i))  # first index of the maximum, as torch.argmax


def by_hand_macro_f1(predicted, targets):
    """F1 per class = 2 TP / (2 TP + FP + FN), averaged over the classes that occur as target or prediction."""
    scores = []
    for cls in sorted(set(predicted) | set(targets)):
        tp = sum(p == cls and t == cls for p, t in zip(predicted, targets))
        fp = sum(p == cls and t != cls for p, t in zip(predicted, targets))
        fn = sum(p != cls and t == cls for p, t in zip(predicted, targets))
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


def run_epoch(metrics, loss_fn=F.cross_entropy):
    tracker = EpochMetrics(metrics)
    for output, target in tensors():
        tracker.update(loss_fn(output, target), output, target)
    return tracker.result()


def test_accuracy_top_k_and_macro_f1_over_an_epoch():
    logits, targets = all_samples()
    predicted = [argmax(row) for row in logits]
    assert predicted == [0, 1, 1, 3, 0, 1, 1, 1, 0, 3, 0]  # as the comments above say

    log = run_epoch({"accuracy": Accuracy(), "top_k_acc": TopKAccuracy(k=2), "top_3": TopKAccuracy(),
                     "macro_f1": MacroF1()})

    assert log["accuracy"] == pytest.approx(5 / 11)  # samples 1, 3, 5, 6, 11
    assert log["top_k_acc"] == pytest.approx(6 / 11)  # k=2: the hits and sample 2
    assert log["top_3"] == pytest.approx(8 / 11)  # the default k=3 adds samples 7 and 9
    # class 0: TP 3, FP 1, FN 2 -> 6/9; class 1: TP 2, FP 3, FN 2 -> 4/9; class 2: TP 0 -> 0; class 3: FP 2 -> 0
    assert by_hand_macro_f1(predicted, targets) == pytest.approx((6 / 9 + 4 / 9 + 0 + 0) / 4)
    assert log["macro_f1"] == pytest.approx(by_hand_macro_f1(predicted, targets))
    assert set(log) == {"loss", "accuracy", "top_k_acc", "top_3", "macro_f1"}


def test_epoch_loss_is_the_mean_over_samples_not_over_batches():
    logits, targets = all_samples()
    per_sample = F.cross_entropy(torch.tensor(logits, dtype=torch.float64), torch.tensor(targets), reduction="none")
    sample_mean = per_sample.sum().item() / len(targets)
    batch_means = [F.cross_entropy(o.double(), t).item() for o, t in tensors()]
    mean_of_batch_means = sum(batch_means) / len(batch_means)

    log = run_epoch({})
    assert log["loss"] == pytest.approx(sample_mean, rel=1e-6)
    assert abs(sample_mean - mean_of_batch_means) > 0.1  # the two differ here, so the check above means something
    assert log["loss"] != pytest.approx(mean_of_batch_means, rel=1e-3)


def test_reset_starts_a_new_epoch():
    tracker = EpochMetrics({"accuracy": Accuracy()})
    for output, target in tensors():
        tracker.update(F.cross_entropy(output, target), output, target)
    tracker.reset()
    assert tracker.result() == {}
    output, target = tensors()[1]  # a single wrong prediction
    tracker.update(F.cross_entropy(output, target), output, target)
    assert tracker.result()["accuracy"] == 0.0


def test_each_metric_names_the_task_kinds_it_scores():
    by_task = {}
    for name in ("accuracy", "top_k_acc", "macro_f1", "f1_micro", "f1_macro", "mean_ap", "rmse", "mae", "r2"):
        for task in getattr(metric_module, name).tasks:
            by_task.setdefault(task, []).append(name)
    assert by_task == {"multiclass": ["accuracy", "top_k_acc", "macro_f1"],
                       "multilabel": ["f1_micro", "f1_macro", "mean_ap"], "regression": ["rmse", "mae", "r2"]}


# --- multilabel and regression metrics, fed in batches, against numpy on all the data at once ----------------------

N_SAMPLES, N_LABELS = 241, 5
_rng = np.random.default_rng(0)
# labels 3 and 4 are never targets (left out of mAP); 3 is sometimes predicted (F1 0), 4 never (left out of macro F1)
LABELS = (_rng.random((N_SAMPLES, N_LABELS)) < [0.5, 0.3, 0.1, 0.0, 0.0]).astype(np.float32)
LOGITS = (_rng.normal(0, 2, (N_SAMPLES, N_LABELS)) + 1.5 * LABELS - [0, 0, 0, 0, 20]).astype(np.float32)
# three target columns, the last constant (left out of R2, though its sums give it a variance of 5e-13)
VALUES = np.stack([_rng.normal(10, 3, N_SAMPLES), _rng.random(N_SAMPLES), np.full(N_SAMPLES, 3.7)], 1).astype("f4")
PREDICTED_VALUES = (VALUES + _rng.normal(0, [1, 0.2, 0.05], VALUES.shape)).astype(np.float32)


def epoch_value(metric, outputs, targets, cuts=()):
    """The metric fed the rows in batches split at `cuts`, its statistics summed as over batches and processes."""
    stats = [metric.batch_stats(torch.from_numpy(o), torch.from_numpy(t))
             for o, t in zip(np.split(outputs, cuts), np.split(targets, cuts))]
    assert len({s.shape for s in stats}) == 1  # of a shape that does not depend on the batch size
    return metric.compute(sum(stats))


def numpy_f1s(logits, labels, threshold):
    """Micro and macro F1 = 2 TP / (2 TP + FP + FN); macro over the labels that occur as target or prediction."""
    predicted, actual = 1 / (1 + np.exp(-logits.astype(np.float64))) >= threshold, labels == 1
    tp, fp, fn = (predicted & actual).sum(0), (predicted & ~actual).sum(0), (~predicted & actual).sum(0)
    micro = 2 * tp.sum() / (2 * tp.sum() + fp.sum() + fn.sum())
    macro = np.mean([2 * tp[c] / (2 * tp[c] + fp[c] + fn[c]) for c in range(labels.shape[1])
                     if predicted[:, c].any() or actual[:, c].any()])
    return micro, macro


def numpy_mean_ap(logits, labels):
    """Exact AP per label: the precision at each positive's rank, scores sorted highest first; mean over the labels
    with a positive."""
    aps = []
    for scores, actual in zip(logits.T.astype(np.float64), labels.T == 1):
        if actual.any():
            hits = actual[np.argsort(-scores)]
            aps.append(np.mean((np.cumsum(hits) / np.arange(1, len(hits) + 1))[hits]))
    return np.mean(aps)


def numpy_regression(outputs, targets):
    """RMSE and MAE over all values; R2 averaged over the columns whose targets vary."""
    targets = targets.astype(np.float64)
    error = outputs - targets
    r2 = [1 - np.sum(error[:, j] ** 2) / np.sum((targets[:, j] - targets[:, j].mean()) ** 2)
          for j in range(targets.shape[1]) if np.ptp(targets[:, j]) > 0]
    return np.sqrt(np.mean(error ** 2)), np.mean(np.abs(error)), np.mean(r2)


@settings(max_examples=50, deadline=None)
@given(st.sets(st.integers(1, N_SAMPLES - 1), max_size=12).map(sorted))
@example([])  # one batch
def test_multilabel_and_regression_metrics_in_any_batches_match_numpy_on_all_data(cuts):
    micro, macro = numpy_f1s(LOGITS, LABELS, 0.5)
    assert epoch_value(MultilabelF1Micro(), LOGITS, LABELS, cuts) == pytest.approx(micro, abs=1e-9)
    assert epoch_value(MultilabelF1Macro(), LOGITS, LABELS, cuts) == pytest.approx(macro, abs=1e-9)
    # binned: scores within 1/1000 of each other count as tied
    assert epoch_value(MeanAveragePrecision(), LOGITS, LABELS, cuts) == pytest.approx(
        numpy_mean_ap(LOGITS, LABELS), abs=0.01)

    rmse, mae, r2 = numpy_regression(PREDICTED_VALUES, VALUES)
    assert epoch_value(RMSE(), PREDICTED_VALUES, VALUES, cuts) == pytest.approx(rmse, abs=1e-9)
    assert epoch_value(MAE(), PREDICTED_VALUES, VALUES, cuts) == pytest.approx(mae, abs=1e-9)
    assert epoch_value(R2(), PREDICTED_VALUES, VALUES, cuts) == pytest.approx(r2, abs=1e-9)


def test_a_threshold_per_label_given_or_set_later():
    thresholds = [0.3, 0.5, 0.7, 0.5, 0.9]
    f1 = MultilabelF1Macro(threshold=thresholds)
    assert epoch_value(f1, LOGITS, LABELS) == pytest.approx(numpy_f1s(LOGITS, LABELS, np.array(thresholds))[1])
    f1.threshold = torch.tensor(thresholds[::-1])  # as when thresholds tuned on out-of-fold predictions are set
    assert epoch_value(f1, LOGITS, LABELS) == pytest.approx(numpy_f1s(LOGITS, LABELS, np.array(thresholds[::-1]))[1])


@pytest.mark.parametrize("threshold", [0, 1.5, float("nan"), "0.5", [], [0.5, 1.0], [[0.5]]])
def test_a_threshold_not_in_0_1_is_refused(threshold):
    with pytest.raises(ValueError, match=r"threshold must be a number in \(0, 1\) or a list of such numbers"):
        MultilabelF1Micro(threshold=threshold)


def test_a_threshold_list_of_another_length_than_the_labels_is_refused():
    with pytest.raises(ValueError, match="threshold has 3 values for 5 classes"):
        epoch_value(MultilabelF1Micro(threshold=[0.5, 0.5, 0.5]), LOGITS, LABELS)


def test_one_regression_column_may_come_as_1d_tensors():
    column, output = VALUES[:, :1], PREDICTED_VALUES[:, :1]
    for metric in (RMSE(), MAE(), R2()):
        as_columns = epoch_value(metric, output, column)
        assert epoch_value(metric, output.ravel(), column.ravel()) == as_columns
        assert epoch_value(metric, output, column.ravel()) == as_columns


def test_r2_of_only_constant_targets_is_nan():
    assert math.isnan(epoch_value(R2(), PREDICTED_VALUES[:, 2:], VALUES[:, 2:]))


# --- stratified split ---------------------------------------------------------------------------------------------

class Labelled(Dataset):
    """1000 samples with classes in proportions 50 / 30 / 15 / 5 %, interleaved."""

    def __init__(self):
        self.targets = [0] * 500 + [1] * 300 + [2] * 150 + [3] * 50
        order = torch.randperm(1000, generator=torch.Generator().manual_seed(0)).tolist()
        self.targets = [self.targets[i] for i in order]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        return torch.tensor([float(index)]), self.targets[index]


def make_loader(seed, validation_split):
    return BaseDataLoader(Labelled(), batch_size=50, shuffle=True, validation_split=validation_split, num_workers=0,
                          seed=seed)


def class_counts(dataset, indices):
    return Counter(dataset.targets[i] for i in indices)


def test_stratified_split_keeps_class_proportions():
    loader = make_loader(seed=3, validation_split=0.2)
    dataset = loader.dataset if isinstance(loader.dataset, Labelled) else loader.dataset.dataset
    assert class_counts(dataset, loader.valid_indices) == {0: 100, 1: 60, 2: 30, 3: 10}
    assert class_counts(dataset, loader.train_indices) == {0: 400, 1: 240, 2: 120, 3: 40}
    assert set(loader.train_indices).isdisjoint(loader.valid_indices)
    assert len(loader.train_indices) + len(loader.valid_indices) == 1000
    assert loader.n_samples == 800


def test_stratified_split_with_uneven_shares_rounds_per_class():
    loader = make_loader(seed=3, validation_split=0.15)  # shares 75, 45, 22.5, 7.5
    dataset = loader.dataset if isinstance(loader.dataset, Labelled) else loader.dataset.dataset
    counts = class_counts(dataset, loader.valid_indices)
    assert sum(counts.values()) == 150
    assert counts[0] == 75 and counts[1] == 45
    assert counts[2] in (22, 23) and counts[3] in (7, 8)


def test_validation_split_as_a_count():
    loader = make_loader(seed=3, validation_split=100)
    dataset = loader.dataset if isinstance(loader.dataset, Labelled) else loader.dataset.dataset
    assert class_counts(dataset, loader.valid_indices) == {0: 50, 1: 30, 2: 15, 3: 5}


def test_split_is_reproducible_for_the_same_seed_and_differs_for_another():
    first, again, other = make_loader(5, 0.2), make_loader(5, 0.2), make_loader(6, 0.2)
    assert list(first.valid_indices) == list(again.valid_indices)
    assert list(first.valid_indices) != list(other.valid_indices)


def test_loaders_serve_exactly_their_split():
    loader = make_loader(seed=4, validation_split=0.2)
    loader.set_epoch(1)
    seen_train = [int(x) for data, _ in loader for x in data.flatten()]
    seen_valid = [int(x) for data, _ in loader.split_validation() for x in data.flatten()]
    assert sorted(seen_train) == sorted(int(i) for i in loader.train_indices)
    assert sorted(seen_valid) == sorted(int(i) for i in loader.valid_indices)

    loader.set_epoch(2)
    epoch2 = [int(x) for data, _ in loader for x in data.flatten()]
    loader.set_epoch(1)
    assert [int(x) for data, _ in loader for x in data.flatten()] == seen_train  # an epoch replays exactly
    assert epoch2 != seen_train  # and is reshuffled from one epoch to the next


def test_no_split_gives_no_validation_loader():
    assert make_loader(seed=1, validation_split=0.0).split_validation() is None


def test_macro_f1_of_20000_classes_needs_no_confusion_matrix_and_metrics_that_cannot_afford_them_refuse():
    output, target = torch.eye(20_000)[:4], torch.tensor([0, 1, 2, 5])
    assert MacroF1().compute(MacroF1().batch_stats(output, target)) == pytest.approx(3 / 5)  # classes 3 and 5 score 0
    with pytest.raises(ValueError, match="a confusion matrix of 20,000 classes would take 3.0 GiB"):
        ConfusionMatrix().batch_stats(output, target)
    with pytest.raises(ValueError, match="its histograms of 20,000 classes would take 0.3 GiB"):
        MeanAveragePrecision().batch_stats(output, torch.eye(20_000)[:4])
