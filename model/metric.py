"""Epoch-level metrics. Each batch adds summable statistics on the device; the value is computed once per epoch.

A metric is a class with `batch_stats(output, target) -> Tensor` (anything that can be summed over batches and
processes) and `compute(total) -> float`. Config files name them by the lower-case aliases at the bottom.
"""
import torch

from utils import dist


class Metric:
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


class ConfusionMatrix(Metric):
    """Base for metrics derived from the confusion matrix (rows: target, columns: prediction)."""

    def batch_stats(self, output, target):
        n = output.shape[1]
        cells = target * n + output.argmax(dim=1)
        return torch.zeros(n * n, dtype=torch.int64, device=output.device).index_add_(
            0, cells, torch.ones_like(cells)).view(n, n)


class MacroF1(ConfusionMatrix):
    """Unweighted mean over classes of F1; classes absent from both targets and predictions are left out."""

    def compute(self, total):
        total = total.double()
        true_pos = total.diag()
        support = total.sum(dim=1) + total.sum(dim=0)
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
