"""Epoch-level metrics against values worked out by hand, and the data loader's stratified validation split."""
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from base.base_data_loader import BaseDataLoader
from model.metric import Accuracy, EpochMetrics, MacroF1, TopKAccuracy

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
