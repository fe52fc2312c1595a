"""Data loaders named by the config's `data_loader.type`; `training=False` gives test.py the test split."""
import contextlib
import copy
import json
import math
import random
from pathlib import Path

import numpy as np
import torch

from base import BaseDataLoader
from data_loader.datasets import NOT_IN_A_NAME, CsvImageDataset, label_text, read_csv, sorted_classes
from utils.config import build_transforms
from utils.util import UserError


class CsvImageDataLoader(BaseDataLoader):
    """The competition layout: `data_dir/train.csv` (id, label) with images in `data_dir/train/`, and a test CSV
    with images in `data_dir/test/`. `n_folds`/`fold` choose a K-fold validation split instead of
    `validation_split`; `group_column` keeps a group's rows on one side of every split; `balanced` samples
    classes equally. Transforms are lists of torchvision.transforms.v2 `{type, args}` applied to uint8 images;
    the loader then scales to [0, 1] and normalises with `mean`/`std` when given. Image `i` is
    `<images folder>/<id><extension>`; ids may be relative paths below the folder, never out of it (see
    CsvImageDataset)."""

    def __init__(self, data_dir, batch_size, shuffle=True, validation_split=0.1, num_workers=0, training=True,
                 train_csv="train.csv", test_csv="test.csv", train_images="train", test_images="test",
                 id_column="id", label_column="label", extension=".png", classes=None, image_mode="unchanged",
                 train_transforms=(), eval_transforms=(), mean=None, std=None, cache=True, cache_dir=None,
                 group_column=None, n_folds=0, fold=0, stratify=True, balanced=False, seed=0):
        data_dir = Path(data_dir)
        if not data_dir.is_dir():
            raise UserError(f"data_loader.args.data_dir: no such folder {str(data_dir)!r}; put the competition's "
                            f"{train_csv} (id, label) and its {train_images}/ and {test_images}/ image folders there, "
                            f"or point data_dir at them")
        if cache_dir is not None and not cache:
            raise UserError("data_loader.args.cache_dir: needs cache true (it keeps the images that cache decodes)")
        check_columns(id_column, label_column, group_column, extension)
        if classes is None:
            classes = sorted_classes(read_csv(data_dir / train_csv, id_column, required=(label_column,))[label_column])
        check_classes(classes)
        common = dict(classes=classes, id_column=id_column, label_column=label_column, extension=extension,
                      image_mode=image_mode, cache=cache, cache_dir=cache_dir)
        eval_transform = image_transform(eval_transforms, mean, std, "eval_transforms")
        if training:
            train_transform = image_transform(train_transforms, mean, std, "train_transforms")
            dataset = CsvImageDataset(data_dir / train_csv, data_dir / train_images, transform=train_transform,
                                      group_column=group_column, **common)
            if dataset.targets is None:
                raise UserError(f"{data_dir / train_csv}: no labels in a column {label_column!r} to train on")
            eval_dataset = _with_transform(dataset, eval_transform)
            try_transform(dataset)
        else:
            dataset = eval_dataset = CsvImageDataset(data_dir / test_csv, data_dir / test_images,
                                                     transform=eval_transform, **common)
        try_transform(eval_dataset)
        super().__init__(dataset, batch_size, shuffle, validation_split, num_workers, eval_dataset=eval_dataset,
                         n_folds=n_folds if training else 0, fold=fold if training else 0, stratify=stratify,
                         balanced=balanced and training, seed=seed)


def check_columns(id_column, label_column, group_column, extension):
    """The CSV columns are three different ones (labels that are the ids, or groups that are the labels, would
    train on nonsense or validate only on classes never trained on); the extension is a suffix, not a path."""
    if label_column == id_column:
        raise UserError(f"data_loader.args.label_column: {label_column!r} is the id_column too; the labels need a "
                        f"column of their own")
    if group_column is not None and group_column == label_column:
        raise UserError(f"data_loader.args.group_column: {group_column!r} is the label_column; grouping by label "
                        f"would hold out whole classes, so validation would see only classes never trained on")
    if "/" in extension or NOT_IN_A_NAME.search(extension):
        raise UserError(f"data_loader.args.extension: expected a file-name suffix such as \".png\" (no slashes, "
                        f"backslashes or control characters), got {json.dumps(extension)}")


def check_classes(classes):
    """The class list: distinct labels, each text or a number, matched to the CSV's labels by text as written."""
    if not isinstance(classes, (list, tuple)) or not classes:
        raise UserError(f"data_loader.args.classes: expected a non-empty list of labels as the CSV writes them, "
                        f"got {json.dumps(classes, default=repr)}")
    seen = {}
    for i, label in enumerate(classes):
        if isinstance(label, bool) or not isinstance(label, (str, int, float)) or \
                isinstance(label, float) and not math.isfinite(label) or isinstance(label, str) and not label.strip():
            raise UserError(f"data_loader.args.classes[{i}]: expected a label as the CSV writes it (text or a "
                            f"number), got {json.dumps(label, default=repr)}")
        first = seen.setdefault(label_text(label), i)
        if first != i:
            raise UserError(f"data_loader.args.classes: {json.dumps(label)} is listed twice (entries {first} and "
                            f"{i}); each class once")


def try_transform(dataset):
    """Put the first image through the dataset's transform (leaving every random generator as it was), so transforms
    that cannot take the images are one line before anything is written, not a failure in the first epoch."""
    with random_state_kept():
        dataset[0]


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
