"""The task: what the targets are and how a model's output maps onto them. The data loader describes it; the loss,
metrics, folds, out-of-fold files, ensembles, blends and test.py's outputs follow from it.

- "multiclass": one head per label column, each scored over its own classes (one column: today's single label).
- "multilabel": one column of labels separated by `delimiter`; any number per sample, each scored on its own.
- "regression": one or more numeric columns, one value each.
- heads of both kinds: a multiclass task whose `values` columns are numbers (a head of width 1 each), each taking
  part in the heads' joint class once `bins` cut it into classes.

A model emits the heads' outputs concatenated in column order, or a tuple (or a dict keyed by column) of them,
possibly with outputs only a loss of its own uses after them (a tuple's further parts, a dict's other keys);
`flat` joins the heads into one (N, width) tensor, which metrics and predictions see. A loss of the project's own
gets the whole output and the whole target (`split_targets`); the built-in ones are applied per head (HeadsLoss).
"""
import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from utils.util import UserError, first_line, read_json, write_json

KINDS = ("multiclass", "multilabel", "regression")
DEFAULT_LOSS = {"multiclass": "cross_entropy", "multilabel": "binary_cross_entropy_with_logits",
                "regression": "mse_loss"}
MAX_JOINT = 1_000  # joint classes of a multi-task run beyond which the joint label is not scored
QUANTILE_BINS = 10  # strata of a regression target for stratified splits


@dataclass(frozen=True)
class Task:
    """A kind of target and its heads: (label column, classes) pairs in column order (one for a multilabel task,
    whose classes are its labels; classes None for regression columns, or when a dataset does not name them).
    `values`: the columns of a multiclass task that hold numbers; `bins`: (column, edges) of those that join the
    heads' joint class, bin i holding the values from edges[i - 1] up to below edges[i]. `sorted_text`: the columns
    whose text classes were put in text order because the config gave none (their indices follow no given order).
    `scale`: (column, mean, std) of the columns of numbers that train standardised: the model's output and what the
    loss compares are in standard units, probabilities (the values written) and metrics in the column's own."""

    kind: str = "multiclass"
    heads: tuple = (("label", None),)
    delimiter: str = " "
    values: tuple = ()
    bins: tuple = ()
    sorted_text: tuple = ()
    scale: tuple = ()

    @classmethod
    def single(cls, classes, column="label"):
        """One label column over `classes` (None when they are unknown): the template's first task."""
        return cls("multiclass", ((column, None if classes is None else tuple(classes)),))

    @property
    def scores_joint(self):
        """Whether metrics are logged for the heads' joint class too (several heads of few enough classes)."""
        widths = self.joint_widths
        return self.kind == "multiclass" and len(self.heads) > 1 and None not in widths and \
            math.prod(widths) <= MAX_JOINT

    def is_value(self, head):
        """Whether head `head` (an index) holds numbers."""
        return self.kind == "regression" or self.heads[head][0] in self.values

    @property
    def joint_widths(self):
        """Classes per head in the joint class: its classes, a binned value's bins (None: takes no part)."""
        edges = dict(self.bins)
        return tuple((len(edges[c]) + 1 if c in edges else None) if self.is_value(h) else w
                     for h, ((c, _), w) in enumerate(zip(self.heads, self.widths)))

    @property
    def single_label(self):
        return self.kind == "multiclass" and len(self.heads) == 1

    @property
    def widths(self):
        """Output columns per head (None where the classes are unknown)."""
        return tuple(1 if self.is_value(h) else None if c is None else len(c) for h, (_, c) in enumerate(self.heads))

    @property
    def width(self):
        return None if None in self.widths else sum(self.widths)

    @property
    def segments(self):
        """Each head's columns of the flat output, as slices."""
        starts = np.cumsum((0, *self.widths))
        return [slice(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])]

    @property
    def columns(self):
        """The output's column names, as probabilities.csv writes them."""
        if self.kind == "multilabel":
            return [str(c) for c in self.heads[0][1]]
        if self.kind == "regression":
            return [column for column, _ in self.heads]
        if self.single_label:
            return None if self.heads[0][1] is None else [str(c) for c in self.heads[0][1]]
        return [name for h, (column, classes) in enumerate(self.heads)
                for name in ([column] if self.is_value(h) else [f"{column}:{c}" for c in classes])]

    @property
    def target_columns(self):
        """The target's column names in oof.csv."""
        if self.single_label:
            return ["target"]
        names = self.columns if self.kind == "multilabel" else [column for column, _ in self.heads]
        return [f"target:{name}" for name in names]

    def clashing_name(self):
        """A name that two columns of a file the program writes would share (predictions.csv: id and the heads;
        oof.csv and probabilities.csv: id, the targets and the outputs), or None."""
        if "id" in [column for column, _ in self.heads]:
            return "id"
        names = ["id", *self.target_columns, *(self.columns or [])]
        return next((name for i, name in enumerate(names) if name in names[:i]), None)

    def describe(self):
        """The expected output width in words, for messages."""
        if self.kind == "multiclass" and len(self.heads) > 1:
            return f"{' + '.join(f'{c} {w}' for (c, _), w in zip(self.heads, self.widths))} = {self.width}"
        return str(self.width)

    def extras(self, output):
        """The parts of a model's output beyond its heads, by name or position: what only a loss of its own uses."""
        if isinstance(output, dict):
            return [str(key) for key in output if key not in {column for column, _ in self.heads}]
        if isinstance(output, (tuple, list)):
            return [f"part {i}" for i in range(len(self.heads), len(output))]
        return []

    def flat(self, output):
        """The model's heads as one (N, width) tensor: heads given as a tuple, list or dict joined in column order,
        each checked to be a tensor of its head's width; parts beyond the heads are left to the loss."""
        if isinstance(output, dict):
            missing = [column for column, _ in self.heads if column not in output]
            if missing:
                raise UserError(f"arch: the model returns a dict with keys {sorted(map(str, output))}; expected "
                                f"one per label column ({', '.join(c for c, _ in self.heads)}), and "
                                f"{missing[0]!r} is missing")
            output = [output[column] for column, _ in self.heads]
        if isinstance(output, (tuple, list)):
            output = output[:len(self.heads)]
            parts = [part.unsqueeze(1) if isinstance(part, torch.Tensor) and part.dim() == 1 else part
                     for part in output]
            widths = [part.shape[1] if isinstance(part, torch.Tensor) and part.dim() == 2 and part.is_floating_point()
                      else None for part in parts]
            expected = list(self.widths) if len(self.heads) > 1 else [self.width]
            if None in widths or None not in expected and len(parts) > 1 and widths != expected:
                got = [f"{list(p.shape)} {str(p.dtype).removeprefix('torch.')}" if isinstance(p, torch.Tensor)
                       else type(p).__name__ for p in parts]
                raise UserError(f"arch: the model returns {len(parts)} heads shaped {got}; expected "
                                f"{len(self.heads)} of widths {expected} ({self.describe()}), one [samples, width] "
                                f"float tensor per label column in column order")
            return torch.cat(parts, dim=1)
        if isinstance(output, torch.Tensor) and output.dim() == 1 and self.kind == "regression":
            return output.unsqueeze(1)
        return output

    def probabilities(self, flat):
        """Scores as probabilities (each head's softmax; each label's sigmoid), or values for regression (in their
        own units, float64, when trained standardised)."""
        flat = flat.float()
        if self.kind == "multilabel":
            return flat.sigmoid()
        if self.kind == "regression" or self.single_label or self.width is None:
            return self.in_units(flat) if self.kind == "regression" else flat.softmax(dim=1)
        return self.in_units(torch.cat([flat[:, s] if self.is_value(h) else flat[:, s].softmax(dim=1)
                                        for h, s in enumerate(self.segments)], dim=1))

    def logits(self, probabilities):
        """Scores that `probabilities` turns back into the same probabilities: what losses and metrics take."""
        if self.kind == "regression":
            return self.in_units(probabilities, inverse=True)
        p = probabilities.clamp(1e-12, 1 - 1e-7 if self.kind == "multilabel" else 1)
        if self.values:
            values = self.in_units(probabilities, inverse=True)
            return torch.cat([values[:, s] if self.is_value(h) else p[:, s].log().to(values.dtype)
                              for h, s in enumerate(self.segments)], dim=1)
        return p.log() - (-p).log1p() if self.kind == "multilabel" else p.log()

    def _units(self, per_head, like):
        """(mean, std) of the standardised columns as float64 tensors on `like`'s device, 0 and 1 elsewhere: one
        entry per head (`per_head`) or per output column."""
        units = {column: (mean, std) for column, mean, std in self.scale}
        n = len(self.heads) if per_head else self.width
        mean, std = torch.zeros(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64)
        for h, ((column, _), s) in enumerate(zip(self.heads, self.segments)):
            if column in units:
                mean[h if per_head else s], std[h if per_head else s] = units[column]
        return mean.to(like.device), std.to(like.device)

    def in_units(self, output, inverse=False):
        """A joined output's standardised columns in their own units (from them, `inverse`); unchanged when the
        task standardises none."""
        if not self.scale:
            return output
        mean, std = self._units(False, output)
        return (output.double() - mean) / std if inverse else output.double() * std + mean

    def standardised(self, target):
        """A batch's targets (N, heads) with the standardised columns in standard units, as the loss takes them."""
        if not self.scale:
            return target
        mean, std = self._units(True, target)
        return (target.double() - mean) / std

    def soft_targets(self, target):
        """Targets as (N, width) floats, the form batch transforms mix."""
        if target.is_floating_point() and target.dim() == 2 and target.shape[1] == self.width:
            return target
        if self.kind != "multiclass":
            return target.float().reshape(len(target), -1)
        target = target.reshape(len(target), -1)
        return torch.cat([F.one_hot(target[:, h], w).float() for h, w in enumerate(self.widths)], dim=1)

    def split_targets(self, target):
        """A batch's targets as a loss of its own takes them: one per head in column order (class indices, or soft
        targets of the head's width; values), or the tensor itself for a task of one head (and for multilabel)."""
        if len(self.heads) == 1 or self.kind == "multilabel":
            return target
        if target.is_floating_point() and self.kind == "multiclass" and not self.values and \
                target.shape[1:] == (self.width,):
            return tuple(target[:, s] for s in self.segments)
        return tuple(target[:, h] if self.is_value(h) else target[:, h].long() for h in range(len(self.heads)))

    def joint(self, indices):
        """Per-head class indices (N, heads; binned values for value heads) as one class of the heads combined,
        first head most significant."""
        code = torch.zeros(len(indices), dtype=torch.int64, device=indices.device)
        for h, w in enumerate(self.joint_widths):
            code = code * w + self.head_classes(indices, h)
        return code

    def head_classes(self, indices, head):
        """Head `head`'s classes of per-head indices (N, heads): its class indices, or its values' bins."""
        column = indices[:, head]
        return self.binned(column, head) if self.is_value(head) else column.long()

    def binned(self, values, head):
        """Values (N,) of value head `head` as its bins."""
        edges = torch.tensor(dict(self.bins)[self.heads[head][0]], dtype=values.dtype, device=values.device)
        return torch.bucketize(values.contiguous(), edges, right=True)

    def decide(self, probabilities, threshold=0.5):
        """Per-head class indices (N, heads), labels chosen (N, labels) as booleans, or values."""
        if self.kind == "multilabel":
            return probabilities >= torch.as_tensor(threshold, dtype=probabilities.dtype)
        if self.kind == "regression":
            return probabilities
        if self.values:
            return torch.stack([probabilities[:, s.start] if self.is_value(h) else
                                probabilities[:, s].argmax(dim=1).to(probabilities.dtype)
                                for h, s in enumerate(self.segments)], dim=1)
        return torch.stack([probabilities[:, s].argmax(dim=1) for s in self.segments], dim=1)

    def strata(self, targets):
        """One integer per sample that stratified splits keep in proportion: the class, the heads' joint class, the
        set of labels (or, when some set is too rare, the sample's most frequent label), or a quantile bin."""
        targets = np.asarray(targets)
        if targets.ndim == 1:
            return targets
        if self.kind == "regression":
            return quantile_bins(targets[:, 0])
        if self.values:
            edges = dict(self.bins)
            targets = np.stack([(np.searchsorted(edges[c], targets[:, h], side="right") if c in edges else
                                 quantile_bins(targets[:, h])) if self.is_value(h) else targets[:, h]
                                for h, (c, _) in enumerate(self.heads)], axis=1)
        codes, counts = np.unique(targets, axis=0, return_inverse=True, return_counts=True)[1:]
        codes = codes.reshape(-1)
        if self.kind == "multilabel" and counts.min() < 2:
            frequency = targets.sum(axis=0)
            return np.where(targets.any(axis=1), np.argmax(targets * (frequency + 1), axis=1), -1)
        return codes

    def to_json(self):
        values = {"values": list(self.values), "bins": [[column, list(edges)] for column, edges in self.bins]}
        return {"kind": self.kind, "heads": [[column, None if c is None else list(c)] for column, c in self.heads],
                "delimiter": self.delimiter, **(values if self.values else {}),
                **({"sorted_text": list(self.sorted_text)} if self.sorted_text else {})}

    @classmethod
    def from_json(cls, data):
        """A task as to_json wrote it; anything else raises ValueError."""
        kind, heads, delimiter = data["kind"], data["heads"], data["delimiter"]
        values, bins, sorted_text = data.get("values", []), data.get("bins", []), data.get("sorted_text", [])
        names = [head[0] for head in heads if isinstance(head, list) and head]
        if not (isinstance(values, list) and set(values) <= set(names) and isinstance(bins, list) and all(
                isinstance(b, list) and len(b) == 2 and b[0] in values and isinstance(b[1], list) and b[1] and
                all(isinstance(e, (int, float)) and math.isfinite(e) for e in b[1]) for b in bins)):
            raise ValueError("values name label columns, and bins pair one of them with a list of numbers")
        if not (isinstance(sorted_text, list) and set(sorted_text) <= set(names)):
            raise ValueError("sorted_text names label columns")
        if kind not in KINDS or not isinstance(heads, list) or not heads or not isinstance(delimiter, str) or \
                not delimiter:
            raise ValueError("expected a kind of " + ", ".join(KINDS) + ", a list of heads and a delimiter")
        for head in heads:
            if not (isinstance(head, list) and len(head) == 2 and isinstance(head[0], str) and (
                    head[1] is None if kind == "regression" or head[0] in values else
                    isinstance(head[1], list) and head[1])):
                raise ValueError(f"head {json.dumps(head)[:100]} is not [column, classes]")
        if kind == "multilabel" and (len(heads) != 1 or any(delimiter in str(c) for c in heads[0][1])):
            raise ValueError("a multilabel task has one column, and no label holds the delimiter")
        for _, classes in heads:
            if classes is not None and len(set(map(str, classes))) != len(classes):
                raise ValueError("a head lists a class twice")
        return cls(kind, tuple((column, None if c is None else tuple(c)) for column, c in heads), delimiter,
                   tuple(values), tuple((column, tuple(edges)) for column, edges in bins), tuple(sorted_text))


def quantile_bins(values, n=QUANTILE_BINS):
    """Each value's bin among `n` of about equal counts."""
    edges = np.quantile(values, np.linspace(0, 1, n + 1)[1:-1])
    return np.searchsorted(edges, values, side="right")


TASK_FILE = "task.json"  # beside probabilities.csv and oof.csv when the task is not a single label


def task_of(dataset):
    """The task of a dataset: its own `task`, else a single label over its `classes` (when it names them)."""
    task = getattr(dataset, "task", None)
    return task if isinstance(task, Task) else Task.single(getattr(dataset, "classes", None))


def as_targets(target):
    """A batch's targets as one tensor: parts given as a tuple, list or dict (in order) stacked as columns."""
    if isinstance(target, dict):
        target = list(target.values())
    if isinstance(target, (tuple, list)):
        parts = [torch.as_tensor(t) for t in target]
        dtype = torch.float32 if any(p.is_floating_point() for p in parts) else torch.int64
        return torch.stack([p.to(dtype) for p in parts], dim=1)
    return target


def write_task(task, folder):
    """task.json into `folder`; for a single label none (and none left from an earlier task in that folder)."""
    if task.single_label:
        (Path(folder) / TASK_FILE).unlink(missing_ok=True)
    else:
        write_json(task.to_json(), Path(folder) / TASK_FILE)


def read_task(folder):
    """The task a folder's probabilities were written for: its task.json, else a single label."""
    path = Path(folder) / TASK_FILE
    if not path.exists():
        return None
    try:
        return Task.from_json(read_json(path))
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not a task description written by test.py ({first_line(e)})") from None


class HeadsLoss(torch.nn.Module):
    """A built-in loss on a model's heads: for several label columns `loss` on each head's columns of the output and
    its targets (class indices, or soft targets of the head's width), MSE on a head of values, weighted and summed;
    else `loss` on the whole (joined) output. Outputs beyond the heads are refused: this loss would leave them
    untrained."""

    def __init__(self, loss, task, weights=()):
        super().__init__()
        if weights and (len(weights) != len(task.heads) or not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and 0 <= w < float("inf") for w in weights)
                        or not sum(weights)):
            raise UserError(f"head_weights: expected {len(task.heads)} numbers >= 0, not all 0, one per label column "
                            f"({', '.join(c for c, _ in task.heads)}), got {json.dumps(weights)}")
        self.loss = loss
        self.task = task
        self.per_head = task.kind == "multiclass" and len(task.heads) > 1
        self.weights = list(weights) or [1.0] * len(task.heads)

    def forward(self, output, target):
        extras = self.task.extras(output)
        if extras:
            raise UserError(f"loss: the model returns {', '.join(map(repr, extras))} beyond its heads "
                            f"({', '.join(c for c, _ in self.task.heads)}), which the built-in loss leaves unused; "
                            f"name a loss of your own that takes the whole output (docs/tasks.md)")
        output, target = self.task.flat(output), self.task.standardised(target)
        if not self.per_head:
            return self.loss(output, target.float() if target.dtype == torch.float64 else target)
        soft = target.is_floating_point() and not self.task.values
        return sum(w * (F.mse_loss(output[:, s], target[:, h:h + 1].float()) if self.task.is_value(h) else
                        self.loss(output[:, s], target[:, s] if soft else target[:, h].long()))
                   for h, (s, w) in enumerate(zip(self.task.segments, self.weights)))


class WholeLoss(torch.nn.Module):
    """A loss of the project's own on the model's whole output (tensor, tuple or dict, as the model returns it) and
    the whole target (`Task.split_targets`). On its first batch (the pre-run check) a result that is not one number,
    or one computed from shapes torch had to broadcast, is one line."""

    def __init__(self, loss, task):
        super().__init__()
        self.loss = loss
        self.task = task
        self.checked = False

    def forward(self, output, target):
        target = self.task.standardised(target)
        if self.checked:
            return self.loss(output, self.task.split_targets(target))
        name = getattr(getattr(self.loss, "func", self.loss), "__name__", type(self.loss).__name__)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="Using a target size", category=UserWarning)
            try:
                loss = self.loss(output, self.task.split_targets(target))
            except UserWarning as e:
                raise UserError(f"loss: {name} compares tensors of different shapes, which torch broadcasts into "
                                f"wrong pairs ({first_line(e)})") from None
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            shape = list(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise UserError(f"loss: {name} returns {shape}; expected one number per batch (a 0-dim tensor)")
        self.checked = True
        return loss


def head_name(column):
    """A label column as it appears in metric names."""
    return re.sub(r"[^\w.-]", "_", str(column))


def head_kind(task, head):
    return "regression" if task.is_value(head) else task.kind


def task_metrics(metrics, task):
    """The metrics as logged for `task`: unchanged for one head; for several, each one per head of a kind it scores
    (`<name>_<column>`) and, for a class metric, for the heads' joint class (`<name>`, as the mixed-radix label a
    one-column submission holds)."""
    if task.kind == "regression" and task.scale:
        return {name: InUnits(metric, task) for name, metric in metrics.items()}
    if task.kind != "multiclass" or len(task.heads) == 1:
        return metrics
    per_head = {f"{name}_{head_name(column)}": HeadMetric(metric, s, h, task)
                for name, metric in metrics.items() for h, ((column, _), s) in enumerate(zip(task.heads,
                                                                                              task.segments))
                if head_kind(task, h) in getattr(metric, "tasks", ("multiclass",))}
    joint = {name: JointMetric(metric, task) for name, metric in metrics.items()
             if "multiclass" in getattr(metric, "tasks", ("multiclass",))} if task.scores_joint else {}
    taken = sorted(set(per_head) & set(metrics))
    if taken:
        raise UserError(f"metrics: {taken[0]!r} is also the name of a metric of one head (<metric>_<column>); give "
                        f"it another \"name\"")
    return {**joint, **per_head}


class HeadMetric:
    """A metric on one head of a multi-task output."""

    def __init__(self, metric, segment, head, task):
        self.metric, self.segment, self.head, self.task = metric, segment, head, task

    def batch_stats(self, output, target):
        target = target[:, self.head]
        if self.task.is_value(self.head):
            return self.metric.batch_stats(self.task.in_units(output)[:, self.segment], target)
        return self.metric.batch_stats(output[:, self.segment], target.long())

    def compute(self, total):
        return self.metric.compute(total)


class InUnits:
    """A metric of values in their own units, from an output in standard units."""

    def __init__(self, metric, task):
        self.metric, self.task = metric, task

    def batch_stats(self, output, target):
        return self.metric.batch_stats(self.task.in_units(output), target)

    def compute(self, total):
        return self.metric.compute(total)


class JointMetric:
    """A metric on the heads' joint class: the joint scores are the sums of the heads' log-probabilities."""

    def __init__(self, metric, task):
        self.metric, self.task = metric, task

    def batch_stats(self, output, target):
        joint = None
        for h, (s, w) in enumerate(zip(self.task.segments, self.task.joint_widths)):
            if self.task.is_value(h):  # a value's bin is certain: log-probability 0 there, -inf elsewhere
                values = self.task.in_units(output)[:, s.start]
                log_p = F.one_hot(self.task.binned(values, h), w).float().log()
            else:
                log_p = output[:, s].float().log_softmax(dim=1)
            joint = log_p if joint is None else (joint[:, :, None] + log_p[:, None, :]).flatten(1)
        return self.metric.batch_stats(joint, self.task.joint(target))

    def compute(self, total):
        return self.metric.compute(total)
