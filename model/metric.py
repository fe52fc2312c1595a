"""Epoch-level metrics. Each batch adds summable statistics on the device; the value is computed once per epoch.

A metric is a class with `batch_stats(output, target) -> Tensor` (anything that can be summed over batches and
processes) and `compute(total) -> float`. Config files name them by the lower-case aliases at the bottom.
"""
import torch

from utils import dist


class Metric:
    """`tasks`: the task kinds ("multiclass", "multilabel", "regression") the metric scores."""

    tasks = ("multiclass",)

    def batch_stats(self, output, target):
        raise NotImplementedError

    def compute(self, total):
        raise NotImplementedError


class Accuracy(Metric):
    """Fraction of samples whose highest-scoring class is the target."""

    def batch_stats(self, output, target):
        hits = output.argmax(dim=1) == target
        return torch.stack([hits.sum(), torch.full((), target.numel(), device=target.device)])

    def compute(self, total):
        return (total[0].double() / total[1]).item()


class TopKAccuracy(Metric):
    """Fraction of samples whose target is among the k highest-scoring classes."""

    def __init__(self, k=3):
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        self.k = k

    def batch_stats(self, output, target):
        if self.k >= output.shape[1]:
            raise ValueError(f"k={self.k} of {output.shape[1]} classes would always score 1.0; choose a smaller k")
        hits = (output.topk(self.k, dim=1).indices == target.unsqueeze(1)).any(dim=1)
        return torch.stack([hits.sum(), torch.full((), target.numel(), device=target.device)])

    def compute(self, total):
        return (total[0].double() / total[1]).item()


class ClassCounts(Metric):
    """Base for metrics of per-class counts, (3, C): true positives, predictions and targets of each class (linear in
    the class count, where a confusion matrix is quadratic)."""

    def batch_stats(self, output, target):
        n = output.shape[1]
        predicted = output.argmax(dim=1)
        cells = torch.cat([target[predicted == target], predicted + n, target + 2 * n])
        return torch.zeros(3 * n, dtype=torch.int64, device=output.device).index_add_(
            0, cells, torch.ones_like(cells)).view(3, n)


class ConfusionMatrix(Metric):
    """Base for metrics derived from the confusion matrix (rows: target, columns: prediction), for up to
    `max_classes` classes (its size grows with their square: 20,000 classes would take 3 GiB)."""

    max_classes = 4096

    def batch_stats(self, output, target):
        n = output.shape[1]
        if n > self.max_classes:
            raise ValueError(f"a confusion matrix of {n:,} classes would take {n * n * 8 / 2 ** 30:.1f} GiB; "
                             f"{type(self).__name__} scores up to {self.max_classes:,} classes")
        cells = target * n + output.argmax(dim=1)
        return torch.zeros(n * n, dtype=torch.int64, device=output.device).index_add_(
            0, cells, torch.ones_like(cells)).view(n, n)


class MacroF1(ClassCounts):
    """Unweighted mean over classes of F1; classes absent from both targets and predictions are left out."""

    def compute(self, total):
        true_pos, predicted, actual = total.double()
        return mean_f1(true_pos, predicted + actual)


class MultilabelMetric(Metric):
    """Base for metrics of logits (N, C) against multi-hot targets (N, C): a label is predicted when sigmoid(logit) >=
    `threshold`, a number in (0, 1) or a (C,) tensor of them (code may replace it after construction)."""

    tasks = ("multilabel",)

    def __init__(self, threshold=0.5):
        try:
            value = torch.as_tensor(threshold, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            value = None
        if value is None or value.dim() > 1 or value.numel() == 0 or not ((value > 0) & (value < 1)).all():
            raise ValueError(f"threshold must be a number in (0, 1) or a list of such numbers, one per class, "
                             f"got {threshold!r}")
        self.threshold = value.item() if value.dim() == 0 else value

    def batch_stats(self, output, target):
        """Per class: true positives, predictions and targets, (3, C)."""
        threshold = torch.as_tensor(self.threshold, dtype=torch.float64, device=output.device)
        if threshold.dim() == 1 and threshold.numel() != output.shape[1]:
            raise ValueError(f"threshold has {threshold.numel()} values for {output.shape[1]} classes")
        predicted, target = (output.double().sigmoid() >= threshold).double(), target.double()
        return torch.stack([(predicted * target).sum(0), predicted.sum(0), target.sum(0)])


class MultilabelF1Micro(MultilabelMetric):
    """F1 over all (sample, class) pairs at once."""

    def compute(self, total):
        true_pos, predicted, actual = total.sum(dim=1)
        return (2 * true_pos / (predicted + actual)).item()


class MultilabelF1Macro(MultilabelMetric):
    """Unweighted mean over classes of F1; classes absent from both targets and predictions are left out."""

    def compute(self, total):
        true_pos, predicted, actual = total
        return mean_f1(true_pos, predicted + actual)


class MeanAveragePrecision(Metric):
    """Mean over classes with a positive target of average precision, binned: sigmoid scores are counted in 1000 bins
    and scores sharing a bin tie, which moves it from the exact value by up to about 0.01 (0.001 when scores are
    spread out)."""

    tasks = ("multilabel",)
    bins = 1000
    max_classes = 10_000  # its histograms take 16 KB per class

    def batch_stats(self, output, target):
        """Per class, the histograms of the scores of positive and of negative targets, (2, C, bins)."""
        n_classes, bins = output.shape[1], self.bins
        if n_classes > self.max_classes:
            raise ValueError(f"its histograms of {n_classes:,} classes would take "
                             f"{2 * n_classes * bins * 8 / 2 ** 30:.1f} GiB; it scores up to {self.max_classes:,}")
        cells = ((output.double().sigmoid() * bins).long().clamp_(0, bins - 1)
                 + torch.arange(n_classes, device=output.device) * bins).flatten()
        target = target.double().flatten()
        return torch.zeros(2 * n_classes * bins, dtype=torch.float64, device=output.device).index_add_(
            0, torch.cat([cells, cells + n_classes * bins]), torch.cat([target, 1 - target])).view(2, n_classes, bins)

    def compute(self, total):
        positives, negatives = total.flip(-1)
        precision = (positives.cumsum(-1) / (positives + negatives).cumsum(-1)).nan_to_num()
        support = positives.sum(-1)
        return ((positives * precision).sum(-1)[support > 0] / support[support > 0]).mean().item()


class RegressionMetric(Metric):
    """Base for metrics of outputs (N, R) against targets (N, R), or both (N,)."""

    tasks = ("regression",)

    def batch_stats(self, output, target):
        """Per column: count, sum of targets, of squared targets, of squared errors and of absolute errors, (5, R)."""
        output, target = output.double().reshape(len(output), -1), target.double().reshape(len(target), -1)
        if output.shape != target.shape:
            raise ValueError(f"output {tuple(output.shape)} and target {tuple(target.shape)} differ in shape")
        error = output - target
        return torch.stack([target.new_full(target.shape[1:], len(target)), target.sum(0), target.square().sum(0),
                            error.square().sum(0), error.abs().sum(0)])


class RMSE(RegressionMetric):
    """Root mean squared error over all values."""

    def compute(self, total):
        return (total[3].sum() / total[0].sum()).sqrt().item()


class MAE(RegressionMetric):
    """Mean absolute error over all values."""

    def compute(self, total):
        return (total[4].sum() / total[0].sum()).item()


class R2(RegressionMetric):
    """Mean over columns of 1 - SSE / SST; columns whose targets are constant are left out, nan if all are."""

    def compute(self, total):
        count, sum_y, sum_sq, squared_error, _ = total
        variation = sum_sq - sum_y.square() / count
        varies = variation > 1e-12 * sum_sq
        return (1 - squared_error[varies] / variation[varies]).mean().item()


def mean_f1(true_pos, support):
    """The mean over classes of F1 = 2 TP / (predictions + targets), leaving out classes with neither."""
    present = support > 0
    return (2 * true_pos[present] / support[present]).mean().item()


class EpochMetrics:
    """Accumulates the mean loss and every metric over one epoch without synchronising with the device."""

    def __init__(self, metrics):
        self.metrics = metrics
        self.reset()

    def reset(self):
        self.loss_sum = self.count = None
        self.totals = {}

    def update(self, loss, output, target):
        n = target.shape[0]
        if self.count is None:
            self.loss_sum, self.count = torch.zeros((), device=loss.device, dtype=torch.float64), 0
        self.loss_sum += loss.detach().double() * n
        self.count += n
        for name, metric in self.metrics.items():
            stats = metric.batch_stats(output.detach(), target)
            self.totals[name] = stats if name not in self.totals else self.totals[name] + stats

    def state_dict(self):
        return {"loss_sum": self.loss_sum, "count": self.count, "totals": self.totals}

    def load_state_dict(self, state, device):
        self.loss_sum, self.count = state["loss_sum"].to(device), state["count"]
        self.totals = {name: total.to(device) for name, total in state["totals"].items()}

    def result(self):
        """The epoch's values as plain floats, summed over all processes: the only synchronisation point."""
        if self.count is None:
            return {}
        loss_and_count = dist.all_reduce_sum(torch.stack([self.loss_sum, torch.tensor(
            float(self.count), dtype=torch.float64, device=self.loss_sum.device)]))
        log = {"loss": (loss_and_count[0] / loss_and_count[1]).item()}
        for name, metric in self.metrics.items():
            log[name] = metric.compute(dist.all_reduce_sum(self.totals[name]))
        return log


accuracy = Accuracy
top_k_acc = TopKAccuracy
macro_f1 = MacroF1
f1_micro = MultilabelF1Micro
f1_macro = MultilabelF1Macro
mean_ap = MeanAveragePrecision
rmse = RMSE
mae = MAE
r2 = R2
