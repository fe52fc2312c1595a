"""Data loaders named by the config's `data_loader.type`; `training=False` gives test.py the test split."""
import contextlib
import copy
import dataclasses
import inspect
import json
import logging
import math
import random
from pathlib import Path

import numpy as np
import torch

from base import BaseDataLoader
from data_loader.datasets import (
    NOT_IN_A_NAME,
    CsvImageDataset,
    label_text,
    numbers,
    read_csv,
    reads_as_numbers,
    sorted_classes,
    split_labels,
)
from data_loader.images import MAX_PIXELS
from utils.config import build_transforms, resolve
from utils.task import KINDS, Task
from utils.util import UserError, listed
from utils.withheld import shown


class CsvImageDataLoader(BaseDataLoader):
    """The competition layout: `data_dir/train.csv` (id, label) with images in `data_dir/train/`, and a test CSV
    with images in `data_dir/test/`. `n_folds`/`fold` choose a K-fold validation split instead of
    `validation_split`; `group_column` keeps a group's rows on one side of every split; `balanced` samples
    classes equally. Transforms are lists of torchvision.transforms.v2 `{type, args}` applied to uint8 images;
    the loader then scales to [0, 1] and normalises with `mean`/`std` when given. Image `i` is
    `<images folder>/<id><extension>`; ids may be relative paths below the folder, never out of it (see
    CsvImageDataset). `task` says what the label columns hold (utils/task.py): one class per column
    ("multiclass"; a list of columns trains one head each), labels separated by `delimiter` ("multilabel"), or
    numbers ("regression"); per column (`{"mask": "multiclass", "age": "regression"}`) for heads of both kinds,
    where `bins` (`{"age": [30, 60]}`) cuts a column of numbers into classes of the heads' joint label. Columns of
    numbers train `standardize`d by the training CSV's mean and standard deviation (utils/task.py).
    `feature_columns` hand numeric CSV columns to the model with the image: model(image, features).
    `batch_transforms` (CutMix, MixUp) mix whole training batches, never evaluation ones. An image of more than
    `max_image_pixels` pixels (width x height, read from its header) is refused undecoded."""

    def __init__(self, data_dir, batch_size, shuffle=True, validation_split=0.1, num_workers=0, training=True,
                 train_csv="train.csv", test_csv="test.csv", train_images="train", test_images="test",
                 id_column="id", label_column: str | list = "label", task: str | dict = "multiclass", delimiter=" ",
                 extension=".png", classes: list | None = None, image_mode="unchanged", train_transforms=(),
                 eval_transforms=(), batch_transforms=(), mean=None, std=None, cache=True, cache_dir=None,
                 group_column=None, n_folds=0, fold=0, stratify=True, balanced=False, seed=0,
                 bins: dict | None = None, standardize=True, feature_columns: list | None = None,
                 max_image_pixels=MAX_PIXELS):
        data_dir = Path(data_dir)
        if not data_dir.is_dir():
            raise UserError(f"data_loader.args.data_dir: no such folder {str(data_dir)!r}; put the competition's "
                            f"{train_csv} (id, label) and its {train_images}/ and {test_images}/ image folders there, "
                            f"or point data_dir at them")
        if cache_dir is not None and not cache:
            raise UserError("data_loader.args.cache_dir: needs cache true (it keeps the images that cache decodes)")
        if isinstance(max_image_pixels, bool) or not isinstance(max_image_pixels, int) or max_image_pixels < 1:
            raise UserError(f"data_loader.args.max_image_pixels: expected a whole number of pixels above 0 (width x "
                            f"height), got {json.dumps(max_image_pixels, default=repr)}")
        columns = check_columns(id_column, label_column, group_column, extension)
        feature_columns = check_feature_columns(feature_columns, id_column, columns, group_column, batch_transforms)
        task = task_from_csv(data_dir / train_csv, id_column, columns, task, delimiter, classes, bins)
        if standardize and (task.kind == "regression" or task.values):
            task = dataclasses.replace(task, scale=column_scales(data_dir / train_csv, id_column, task))
        clash = task.clashing_name()
        if clash is not None:
            raise UserError(f"data_loader.args.label_column and classes: {clash!r} would name two columns of "
                            f"predictions.csv, probabilities.csv or oof.csv (their ids are 'id', their targets "
                            f"'target' or 'target:<column>'); rename that column or label in the CSV")
        if task.values and batch_transforms:
            raise UserError("data_loader.args.batch_transforms: mix class targets; this task has heads of numbers "
                            f"({', '.join(task.values)})")
        common = dict(task=task, id_column=id_column, extension=extension, image_mode=image_mode, cache=cache,
                      cache_dir=cache_dir, feature_columns=feature_columns, max_image_pixels=max_image_pixels)
        eval_transform = image_transform(eval_transforms, mean, std, "eval_transforms")
        if training:
            train_transform = image_transform(train_transforms, mean, std, "train_transforms")
            dataset = CsvImageDataset(data_dir / train_csv, data_dir / train_images, transform=train_transform,
                                      group_column=group_column, **common)
            if dataset.targets is None:
                raise UserError(f"{data_dir / train_csv}: no labels in column {columns[0]!r} to train on")
            eval_dataset = _with_transform(dataset, eval_transform)
            try_transform(dataset)
        else:
            dataset = eval_dataset = CsvImageDataset(data_dir / test_csv, data_dir / test_images,
                                                     transform=eval_transform, **common)
        try_transform(eval_dataset)
        refuse_num_classes(batch_transforms, "data_loader.args.batch_transforms", task)
        mixing = BatchMixing(build_transforms(batch_transforms, "data_loader.args.batch_transforms"), task) \
            if batch_transforms and training else None
        super().__init__(dataset, batch_size, shuffle, validation_split, num_workers, eval_dataset=eval_dataset,
                         n_folds=n_folds if training else 0, fold=fold if training else 0, stratify=stratify,
                         balanced=balanced if training else False, seed=seed, mixing=mixing)


def class_source(config):
    """What a config's CsvImageDataLoader takes its output columns from: the training CSV, its label columns, the
    task and the classes when the config lists them; None for other loaders, whose classes cannot be known without
    building them."""
    spec = config["data_loader"]
    target = resolve("data_loader", spec["type"], config["import_roots"])
    if getattr(target, "__init__", None) is not CsvImageDataLoader.__init__:
        return None
    params = inspect.signature(CsvImageDataLoader).parameters
    args = {**{name: param.default for name, param in params.items()}, **spec["args"]}
    kind = args["task"] if isinstance(args["task"], str) else "multiclass"
    return (Path(args["data_dir"], args["train_csv"]).absolute(), args["id_column"], json.dumps(args["label_column"]),
            kind, args["delimiter"], json.dumps(args["classes"]), json.dumps([args["task"], args["bins"]]))


def read_classes(source, path):
    """The output's column names a source gives, as CsvImageDataLoader finds them; None (with a note) when its
    training CSV cannot be read any more."""
    csv_file, id_column, label_column, _, delimiter, classes, kind_and_bins = source
    columns, (kind, bins) = json.loads(label_column), json.loads(kind_and_bins)
    try:
        return task_from_csv(csv_file, id_column, [columns] if isinstance(columns, str) else columns, kind, delimiter,
                             json.loads(classes), bins).columns
    except UserError as e:
        logging.getLogger("template").warning(shown(f"note: cannot check that {path} was trained on the data's class "
                                                    f"list ({e})"))
        return None


def check_columns(id_column, label_column, group_column, extension):
    """The label columns (as a list): each a column other than the ids and the groups (labels that are the ids, or
    groups that are the labels, would train on nonsense or validate only on classes never trained on); the
    extension is a suffix, not a path."""
    columns = [label_column] if isinstance(label_column, str) else label_column
    if not isinstance(columns, list) or not columns or not all(isinstance(c, str) and c for c in columns) or \
            len(set(columns)) < len(columns):
        raise UserError(f"data_loader.args.label_column: expected a column name or a list of distinct column "
                        f"names, got {json.dumps(label_column)}")
    if id_column in columns:
        raise UserError(f"data_loader.args.label_column: {id_column!r} is the id_column too; the labels need a "
                        f"column of their own")
    if group_column is not None and group_column in columns:
        raise UserError(f"data_loader.args.group_column: {group_column!r} is the label_column; grouping by label "
                        f"would hold out whole classes, so validation would see only classes never trained on")
    if "/" in extension or NOT_IN_A_NAME.search(extension):
        raise UserError(f"data_loader.args.extension: expected a file-name suffix such as \".png\" (no slashes, "
                        f"backslashes or control characters), got {json.dumps(extension)}")
    return columns


def task_from_csv(train_csv, id_column, columns, kind, delimiter, classes, bins=None):
    """The task the label columns describe, with each head's classes: given, else the sorted labels of the
    training CSV."""
    kinds = column_kinds(kind, columns)
    if len(set(kinds)) > 1:
        return mixed_task(train_csv, id_column, columns, kinds, delimiter, classes, bins)
    if bins is not None:
        raise UserError("data_loader.args.bins: cuts a column of numbers into classes of the heads' joint label, in "
                        "a task of class and number columns (task per column); this task has none")
    kind = kinds[0]
    if kind not in KINDS:
        raise UserError(f"data_loader.args.task: expected one of {', '.join(map(json.dumps, KINDS))}, "
                        f"got {json.dumps(kind)}")
    if not isinstance(delimiter, str) or not delimiter or not delimiter.isprintable():
        raise UserError(f"data_loader.args.delimiter: expected a non-empty string, got {json.dumps(delimiter)}")
    if delimiter != " " and kind != "multilabel":
        raise UserError(f"data_loader.args.delimiter: separates the labels of a multilabel task; this one is {kind}")
    if kind == "multilabel" and len(columns) != 1:
        raise UserError(f"data_loader.args.label_column: a multilabel task reads one column of labels separated by "
                        f"the delimiter, got {json.dumps(columns)}")
    if kind == "regression":
        if classes is not None:
            raise UserError("data_loader.args.classes: a regression task has no classes; leave it out")
        read_csv(train_csv, id_column, required=columns)
        return Task(kind, tuple((c, None) for c in columns), delimiter)
    per_column = [classes] if len(columns) == 1 else classes
    sorted_text = ()
    if classes is None:
        table = read_csv(train_csv, id_column, required=() if kind == "multilabel" else columns)
        if columns[0] not in table:
            raise UserError(f"{train_csv}: no column {columns[0]!r} (columns: {listed(table)})")
        labels = {c: table[c] for c in columns}
        if kind == "multilabel":
            labels = {c: [label for v in values for label in split_labels(v, delimiter)]
                      for c, values in labels.items()}
        per_column = [sorted_classes(labels[c]) for c in columns]
        sorted_text = tuple(c for c, cl in zip(columns, per_column) if kind == "multiclass" and
                            not reads_as_numbers(cl))
    elif len(columns) > 1 and not (isinstance(classes, list) and len(classes) == len(columns) and all(
            isinstance(c, list) for c in classes)):
        raise UserError(f"data_loader.args.classes: with {len(columns)} label columns, expected a list of "
                        f"{len(columns)} class lists (one per column, in order), got {json.dumps(classes)[:200]}")
    for column, column_classes in zip(columns, per_column):
        check_classes(column_classes, "" if len(columns) == 1 else f"[{columns.index(column)}]", column)
    joined = [c for c in per_column[0] if kind == "multilabel" and delimiter in label_text(c)]
    if joined:
        raise UserError(f"data_loader.args.classes: the label {label_text(joined[0])!r} holds the delimiter "
                        f"{delimiter!r}, so it could not be told from two labels in predictions.csv")
    return Task(kind, tuple((c, tuple(cl)) for c, cl in zip(columns, per_column)), delimiter,
                sorted_text=sorted_text)


def check_feature_columns(feature_columns, id_column, label_columns, group_column, batch_transforms):
    """The feature columns as a list: distinct names, none of them the ids, a label or the groups; not with batch
    transforms, which mix images alone."""
    if feature_columns is None:
        return []
    if not isinstance(feature_columns, list) or not feature_columns or not all(
            isinstance(c, str) and c for c in feature_columns) or len(set(feature_columns)) < len(feature_columns):
        raise UserError(f"data_loader.args.feature_columns: expected a list of distinct column names, got "
                        f"{json.dumps(feature_columns)[:200]}")
    taken = next((c for c in feature_columns if c in (id_column, group_column, *label_columns)), None)
    if taken is not None:
        raise UserError(f"data_loader.args.feature_columns: {taken!r} is the id, label or group column; a feature "
                        f"is a column of its own")
    if batch_transforms:
        raise UserError("data_loader.args.batch_transforms: mix images alone, not the feature_columns given with "
                        "them")
    return feature_columns


def column_scales(train_csv, id_column, task):
    """(column, mean, std) of each column of numbers over the training CSV's rows: the same for every fold and for
    test.py, which rebuilds them from the same file (a constant column keeps std 1)."""
    table = read_csv(train_csv, id_column)
    scales = []
    for h, (column, _) in enumerate(task.heads):
        if task.is_value(h):
            values = np.array(numbers(train_csv, table.lines, table[column], column), dtype=np.float64)
            std = float(values.std())
            scales.append((column, float(values.mean()), std if std > 0 and math.isfinite(std) else 1.0))
    return tuple(scales)


def column_kinds(kind, columns):
    """Each label column's kind: the task's, or the one a per-column task gives it."""
    if not isinstance(kind, dict):
        return [kind] * len(columns)
    if list(kind) != columns or not all(k in ("multiclass", "regression") for k in kind.values()):
        raise UserError(f"data_loader.args.task: per column, expected {{column: \"multiclass\" or \"regression\"}} "
                        f"for exactly the label columns {json.dumps(columns)} in their order, got "
                        f"{json.dumps(kind)[:200]}")
    return list(kind.values())


def mixed_task(train_csv, id_column, columns, kinds, delimiter, classes, bins):
    """A task of class heads and heads of numbers (`values`); `bins` cut some of the latter into joint classes."""
    values = [c for c, k in zip(columns, kinds) if k == "regression"]
    named = [c for c in columns if c not in values]
    if classes is not None:
        if not (isinstance(classes, list) and len(classes) == len(columns) and all(
                (c is None) == (column in values) for c, column in zip(classes, columns))):
            raise UserError(f"data_loader.args.classes: expected a list of {len(columns)} entries in column order, "
                            f"a class list for each class column and null for each number column "
                            f"({', '.join(values)}), got {json.dumps(classes)[:200]}")
        classes = [c for c in classes if c is not None]
        classes = classes[0] if len(named) == 1 else classes
    named_task = task_from_csv(train_csv, id_column, named, "multiclass", delimiter, classes)
    heads = dict(named_task.heads)
    read_csv(train_csv, id_column, required=values)
    bins = {} if bins is None else bins
    for column, edges in bins.items() if isinstance(bins, dict) else [(None, None)]:
        if column not in values or not (isinstance(edges, list) and edges and all(
                isinstance(e, (int, float)) and not isinstance(e, bool) and math.isfinite(e) for e in edges)
                and edges == sorted(set(edges))):
            raise UserError(f"data_loader.args.bins: expected {{column: [increasing numbers]}} for columns of "
                            f"numbers ({', '.join(values)}), got {json.dumps(bins)[:200]}")
    return Task("multiclass", tuple((c, heads.get(c)) for c in columns), delimiter, tuple(values),
                tuple((c, tuple(bins[c])) for c in values if c in bins), named_task.sorted_text)


def refuse_num_classes(specs, where, task):
    """Batch transforms take their class count from the data; one that the config sets is refused, nested too."""
    for i, spec in enumerate(specs if isinstance(specs, (list, tuple)) else ()):
        args = spec.get("args", {}) if isinstance(spec, dict) else {}
        if isinstance(args, dict) and "num_classes" in args:
            raise UserError(f"{where}[{i}].args.num_classes: set by the program (the task's width, {task.width}); "
                            f"remove it")
        if isinstance(args, dict) and isinstance(args.get("transforms"), list):
            refuse_num_classes(args["transforms"], f"{where}[{i}].args.transforms", task)


class BatchMixing:
    """Batch transforms (CutMix, MixUp) on a whole training batch: the images mixed, and the targets, as (N, width)
    soft targets of the task, mixed alike."""

    def __init__(self, transforms, task):
        self.transforms = transforms
        self.task = task
        for transform in transforms:
            for inner in [transform, *getattr(transform, "transforms", ())]:
                if hasattr(inner, "num_classes"):
                    inner.num_classes = task.width

    def __call__(self, images, target):
        target = self.task.soft_targets(target)
        for transform in self.transforms:
            images, target = transform(images, target)
        return images, target


def check_classes(classes, where="", column="label"):
    """The class list: distinct labels, each text or a number, matched to the CSV's labels by text as written."""
    if not isinstance(classes, (list, tuple)) or not classes:
        raise UserError(f"data_loader.args.classes{where}: expected a non-empty list of labels as the CSV writes "
                        f"them, got {json.dumps(classes, default=repr)} (for column {column!r})")
    seen = {}
    for i, label in enumerate(classes):
        if isinstance(label, bool) or not isinstance(label, (str, int, float)) or \
                isinstance(label, float) and not math.isfinite(label) or isinstance(label, str) and not label.strip():
            raise UserError(f"data_loader.args.classes{where}[{i}]: expected a label as the CSV writes it (text or a "
                            f"number), got {json.dumps(label, default=repr)}")
        first = seen.setdefault(label_text(label), i)
        if first != i:
            raise UserError(f"data_loader.args.classes{where}: {json.dumps(label)} is listed twice (entries {first} "
                            f"and {i}); each class once")


def try_transform(dataset):
    """Put the first image through the dataset's transform once per branch of its random steps (leaving every random
    generator as it was), so transforms that cannot take the images are one line before anything is written, not a
    failure in the first epoch or in the one epoch a random branch is taken."""
    with random_state_kept():
        for transform in branches(dataset.transform):
            _with_transform(dataset, transform)[0]


def branches(transform):
    """Copies of an ImageTransform with its random choices pinned, together reaching every branch: every random step
    applied (RandomApply, flips, ...) with each option of the RandomChoices in turn, then every such step skipped."""
    random_steps = [step for step in walk(getattr(transform, "steps", ())) if hasattr(step, "p")]
    if not random_steps:
        return [transform]
    options = max((len(step.p) for step in random_steps if isinstance(step.p, (list, tuple))), default=1)
    return [pinned(transform, option, 1.0) for option in range(options)] + [pinned(transform, 0, 0.0)]


def walk(steps):
    """The steps and, depth first, the steps they hold (Compose, RandomApply, RandomChoice, RandomOrder)."""
    for step in steps:
        yield step
        yield from walk(getattr(step, "transforms", ()))


def pinned(transform, option, p):
    """A copy of `transform` whose RandomChoices take their `option`-th step (cycling) and whose other random steps
    have probability `p`."""
    copied = copy.deepcopy(transform)
    for step in walk(copied.steps):
        if isinstance(getattr(step, "p", None), (list, tuple)):
            step.p = [float(i == option % len(step.p)) for i in range(len(step.p))]
        elif isinstance(getattr(step, "p", None), (int, float)) and not isinstance(step.p, bool):
            step.p = p
    return copied


@contextlib.contextmanager
def random_state_kept():
    state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])


def _with_transform(dataset, transform):
    """The same samples (and decoded-image cache) under another transform."""
    view = copy.copy(dataset)
    view.transform = transform
    return view


def image_transform(specs, mean, std, where):
    """The named torchvision.transforms.v2 transforms (imported only when some are named), then scaling to [0, 1]
    and optional normalisation."""
    if (mean is None) != (std is None):
        raise UserError("data_loader.args.mean and data_loader.args.std: give both or neither")
    for key, values in (("mean", mean), ("std", std)):
        if values is not None and not (isinstance(values, (list, tuple)) and values and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                and (key == "mean" or v > 0) for v in values)):
            raise UserError(f"data_loader.args.{key}: expected a list of finite numbers (one per channel"
                            f"{', each above 0' if key == 'std' else ''}), got {values!r}")
    where = f"data_loader.args.{where}"
    return ImageTransform(build_transforms(specs, where) if specs else [], mean, std, where)


class ImageTransform:
    """`steps` on the decoded image, then float in [0, 1] (integer images divided by their type's maximum), then
    `(x - mean) / std` per channel when given. A step that cannot take an image is one line naming it in the config
    (`where`), in a DataLoader worker too."""

    def __init__(self, steps, mean=None, std=None, where="transforms"):
        self.steps = steps
        self.where = where
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.on_device = {}  # device: (mean, std) there, for batches finished on a GPU

    def __call__(self, image):
        for i, step in enumerate(self.steps):
            try:
                image = step(image)
            except Exception as e:
                detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise UserError(f"{self.where}[{i}]: {type(step).__name__} cannot take an image of shape "
                                f"{list(getattr(image, 'shape', []))}: {detail}") from None
        image = image.float() if image.is_floating_point() else image.float().div_(torch.iinfo(image.dtype).max)
        if self.mean is None:
            return image
        channels = image.shape[-3] if image.dim() >= 3 else 1
        if {len(self.mean), len(self.std)} - {1, channels}:
            raise UserError(f"data_loader.args.mean and data_loader.args.std: {len(self.mean)} and {len(self.std)} "
                            f"values for {channels}-channel images; give one per channel (or one for all), or "
                            f"set image_mode")
        if image.device not in self.on_device:
            self.on_device[image.device] = (self.mean.to(image.device), self.std.to(image.device))
        mean, std = self.on_device[image.device]
        return (image - mean) / std


class MnistDataLoader(BaseDataLoader):
    """torchvision's MNIST, as in victoresque/pytorch-template; downloads into `data_dir` when online."""

    def __init__(self, data_dir, batch_size, shuffle=True, validation_split=0.0, num_workers=1, training=True, seed=0):
        from torchvision import datasets, transforms

        transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
        try:
            self.dataset = datasets.MNIST(data_dir, train=training, download=True, transform=transform)
        except (OSError, RuntimeError) as e:
            raise UserError(f"MNIST in {data_dir!r} is missing and could not be downloaded ({e}); put the raw files "
                            f"in {data_dir}/MNIST/raw or use CsvImageDataLoader on data/mnist5k") from None
        super().__init__(self.dataset, batch_size, shuffle, validation_split, num_workers, seed=seed)
