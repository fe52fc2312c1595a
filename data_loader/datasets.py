"""Datasets for the competition layout: a CSV of image ids (and labels) beside a folder of images."""
import collections
import csv
import hashlib
import math
import re
from pathlib import Path

import torch
from torch.utils.data import Dataset

from data_loader.image_cache import DecodedImages, ImageCache
from data_loader.images import MAX_PIXELS, MODES, image_file, read_image
from utils.files import open_regular
from utils.task import Task
from utils.util import UserError, listed

NO_LABEL = -1
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
IMAGE_MODES = tuple(MODES)
NOT_IN_A_NAME = re.compile(r"[\\\x00-\x1f\x7f]")  # backslashes and control characters


class CsvImageDataset(Dataset):
    """Images `image_dir/<id><extension>` listed in a CSV; labels come from `label_column` when the CSV has it.

    An id names a file inside `image_dir`: a plain name, or a relative path below it (`n01440764/img_10026`, as
    in class-per-folder layouts); an absolute path, a `.` or `..` part, a backslash or a control character is
    refused, so a CSV from elsewhere cannot make a run read files outside the image folder (symbolic links placed
    in it are followed, as the folder's owner intends). `group_column` names rows that belong together (a patient,
    a video) for group-aware splits. Labels are mapped to indices through `classes` (the sorted distinct labels of
    the training CSV unless given), matched by their text as the CSV writes it (`"07"` is not the class `7`). A CSV
    without the label column, or with it empty, gives unlabelled samples (target -1). With `cache` every image
    is decoded once, when the decoded images fit in memory (data_loader/image_cache.py): up front when that is
    quick, which also surfaces a missing or corrupt file before training starts, else as each image is first read
    (such a file then surfaces when first read, as with `cache` false). With `cache_dir` as well, they are kept
    there once all decoded, shared by the machine's processes and reused by later runs while the files are unchanged.
    `feature_columns` are numeric columns handed to the model with the image: a sample's input is then
    (image, features), a float32 vector in the columns' order, and the model is called as model(image, features).
    """

    def __init__(self, csv_file, image_dir, classes=None, id_column="id", label_column="label", extension=".png",
                 image_mode="unchanged", transform=None, cache=True, cache_dir=None, group_column=None, task=None,
                 feature_columns=(), max_image_pixels=MAX_PIXELS):
        table = read_csv(csv_file, id_column, required=((group_column,) if group_column else ()) + tuple(
            feature_columns))
        self.image_dir = Path(image_dir)
        if not self.image_dir.is_dir():
            raise UserError(f"image folder {str(self.image_dir)!r}: no such folder")
        if str(image_mode).lower() not in IMAGE_MODES:
            raise UserError(f"image_mode: unknown {image_mode!r}; expected one of {', '.join(IMAGE_MODES)}")
        self.image_mode = image_mode.lower()
        self.max_pixels = max_image_pixels
        self.ids = table[id_column]
        self.paths = [self.image_dir / f"{i}{extension}" for i in self.ids]
        self.task = task or Task.single(classes, label_column)
        self.classes = list(self.task.heads[0][1] or ()) if self.task.single_label else self.task.columns
        self.targets = read_targets(csv_file, table, self.task)
        self.groups = table[group_column] if group_column else None
        self.features = torch.tensor([numbers(csv_file, table.lines, table[c], c, "feature") for c in feature_columns],
                                     dtype=torch.float32).T.contiguous() if feature_columns else None
        self.transform = transform
        self.images = self.cache = None
        if cache:
            self.cache = ImageCache(self.paths, self.image_mode, cache_dir, Path(csv_file).stem, max_image_pixels)
            self.images = self.cache.images(self.files_signature())
        if isinstance(self.images, DecodedImages) and self.stacked is None and not self.transforms_per_image:
            refuse_mixed_shapes(self.paths, self.images)
        self.target_tensor = target_tensor(self.targets, self.task, len(self.paths))

    def read(self, index):
        return read_image(self.paths[index], self.image_mode, max_pixels=self.max_pixels)

    def write_cache(self):
        """Keep the decoded images for later runs (nothing is written before a run has passed its checks)."""
        if self.cache is not None:
            self.cache.commit()

    def settle_cache(self):
        """Keep images decoded as read once all are (a loader calls it around its passes); True when nothing is left
        to keep."""
        return self.cache is None or self.cache.settle()

    def files_signature(self):
        """A digest of every listed file's name, size, modification and status-change times: a file replaced
        with its old modification time restored (cp -p, rsync -a) still has a new status-change time."""
        digest = hashlib.sha256()
        for path in self.paths:
            with image_file(path):
                stat = path.stat()
            digest.update(f"{path.name}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}\n".encode())
        return digest.hexdigest()

    def __len__(self):
        return len(self.paths)

    @property
    def transforms_per_image(self):
        """Whether the transform has random or per-image steps (scaling and normalising work on batches alike)."""
        return getattr(self.transform, "steps", self.transform is not None)

    @property
    def stacked(self):
        """Every decoded image as one (N, C, H, W) tensor, when they share one shape and all are decoded."""
        return self.images.stacked() if self.images is not None else None

    @property
    def serves_batches(self):
        """Whether whole batches can be cut from the decoded images: one shape, all decoded, and a transform
        without random or per-image steps."""
        return not self.transforms_per_image and self.stacked is not None

    def get_batch(self, indices, finish=True):
        """Images and targets of `indices` in one piece; without `finish` the images stay as decoded, for
        `finish_batch` to scale and normalise on the device."""
        index = torch.as_tensor(indices)
        images = self.stacked[index]
        images = self.finish_batch(images) if finish else images
        return (images if self.features is None else (images, self.features[index])), self.target_tensor[index]

    def finish_batch(self, images):
        return self.transform(images) if self.transform is not None else images

    def __getitem__(self, index):
        image = self.images.get(index, self.read) if self.images is not None else self.read(index)
        if self.transform is not None:
            image = self.transform(image)
        if self.features is not None:
            image = (image, self.features[index])
        if not self.task.single_label:
            return image, self.target_tensor[index]
        return image, self.targets[index] if self.targets is not None else NO_LABEL


def read_targets(csv_file, table, task):
    """Every row's target from the task's label columns: a class index (one per head), the labels as 0/1 per label,
    or the values; None when the CSV has none of the columns, or leaves them empty (a test CSV)."""
    columns = [column for column, _ in task.heads]
    present = [c for c in columns if c in table and not all(isinstance(v, str) and not v.strip() for v in table[c])]
    if not present:
        return None
    if len(present) < len(columns):
        missing = next(c for c in columns if c not in present)
        raise UserError(f"{csv_file}: no labels in column {missing!r} (columns: {listed(table)})")
    if task.kind == "multilabel":
        return multi_hot(csv_file, table.lines, table[columns[0]], task.heads[0][1], task.delimiter, columns[0])
    if task.kind == "regression":
        return [list(row) for row in zip(*(numbers(csv_file, table.lines, table[c], c) for c in columns))]
    per_head = [numbers(csv_file, table.lines, table[c], c) if c in task.values else
                class_indices(csv_file, table.lines, table[c], list(classes), c) for c, classes in task.heads]
    return per_head[0] if task.single_label else [list(row) for row in zip(*per_head)]


def target_tensor(targets, task, n):
    """The targets as one tensor (int64 classes, float32 labels, float64 values, or classes and values as float64:
    values keep every digit the CSV gives); unlabelled rows hold -1 or NaN."""
    if task.single_label:
        return torch.tensor(targets if targets is not None else [NO_LABEL] * n)
    dtype = torch.int64 if task.kind == "multiclass" and not task.values else \
        torch.float32 if task.kind == "multilabel" else torch.float64
    if targets is None:
        return torch.full((n, len(task.heads) if task.kind == "multiclass" else task.width),
                          NO_LABEL if dtype is torch.int64 else float("nan"), dtype=dtype)
    return torch.tensor(targets, dtype=dtype)


def split_labels(value, delimiter):
    """A multi-label cell's labels, without surrounding spaces (none for an empty cell)."""
    return [label.strip() for label in label_text(value).split(delimiter) if label.strip()]


def multi_hot(csv_file, lines, values, classes, delimiter, column):
    """Each row's labels as 0/1 per class; one line naming the first label that is none of the classes."""
    index = {label_text(c): i for i, c in enumerate(classes)}
    rows = []
    for line, value in zip(lines, values):
        row = [0.0] * len(classes)
        for label in split_labels(value, delimiter):
            if label not in index:
                raise UserError(f"{csv_file}: line {line} has label {label!r} in column {column!r}, not one of the "
                                f"{len(classes)} labels {list(classes)[:10]}")
            row[index[label]] = 1.0
        rows.append(row)
    return rows


def numbers(csv_file, lines, values, column, what="regression target"):
    """A regression column's (or feature column's) values; one line naming the first row that holds no finite
    number, or one beyond what float32, which the model computes in, holds."""
    result = []
    for line, value in zip(lines, values):
        number = None if "_" in str(value) else _number(value)  # float() would read "1_000"
        if number is None or not math.isfinite(number):
            raise UserError(f"{csv_file}: line {line} has {value!r} in column {column!r}; a {what} needs a finite "
                            f"number in every row")
        if abs(number) > FLOAT32_MAX:
            raise UserError(f"{csv_file}: line {line} has {value!r} in column {column!r}; a {what} must lie "
                            f"within ±{FLOAT32_MAX:.4g} (float32, in which the model computes)")
        result.append(number)
    return result


def refuse_mixed_shapes(paths, images):
    """One line naming the first image whose shape differs from the first one's (no transform can fix it)."""
    for path, image in zip(paths, images):
        if image.shape != images[0].shape:
            raise UserError(f"image {str(path)!r}: {list(image.shape)} (channels, height, width), but "
                            f"{paths[0].name} is {list(images[0].shape)}; give the images one size and channel "
                            f"count (image_mode), or add a Resize to the transforms")


class Table(dict):
    """A CSV's columns by name, and the file's line number of every row (for messages)."""

    def __init__(self, columns, lines):
        super().__init__(columns)
        self.lines = lines


def read_csv(csv_file, id_column, required=()):
    """A CSV as {column: values}. Ids stay strings (leading zeros kept) and must name files inside the image
    folder; other columns whose every value is a number written as Python writes it are converted, so labels 2 and
    10 sort as numbers while "07" stays "07"."""
    try:
        with open_regular(csv_file, "r", newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            rows = [(reader.line_num, row) for row in reader if "".join(row).strip()]
    except FileNotFoundError:
        raise UserError(f"{csv_file}: no such file") from None
    except OSError as e:
        raise UserError(f"{csv_file}: cannot be read ({e.strerror})") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{csv_file}: not a readable CSV ({str(e).splitlines()[0]})") from None
    if not header:
        raise UserError(f"{csv_file}: not a readable CSV (no header line)")
    if not rows:
        raise UserError(f"{csv_file}: no rows below the header")
    repeated = sorted(name for name, n in collections.Counter(header).items() if n > 1)
    if repeated:
        raise UserError(f"{csv_file}: the header names {', '.join(map(repr, repeated))} more than once")
    for column in (id_column, *required):
        if column not in header:
            raise UserError(f"{csv_file}: no column {column!r} (columns: {listed(header)})")
    for line, row in rows:
        if len(row) != len(header):
            raise UserError(f"{csv_file}: line {line} has {len(row)} fields, expected {len(header)} like the header")
    table = Table({}, [line for line, _ in rows])
    for i, name in enumerate(header):
        values = [row[i] for _, row in rows]
        blank = next((line for (line, _), v in zip(rows, values) if not v.strip()), None)
        if name in (id_column, *required) and blank is not None:
            raise UserError(f"{csv_file}: line {blank} has no value in column {name!r}")
        table[name] = values if name == id_column else typed(values)
    first_line = {}
    for line, image_id in zip(table.lines, table[id_column]):
        if not is_relative_name(image_id):
            raise UserError(f"{csv_file}: line {line} has id {image_id!r}, which names no file inside the image "
                            f"folder (expected a file name or a relative path, without '.' or '..' parts, "
                            f"backslashes or control characters)")
        if first_line.setdefault(image_id, line) != line:
            raise UserError(f"{csv_file}: id {image_id!r} on line {line} is listed on line {first_line[image_id]} "
                            f"too; each id once")
    return table


def is_relative_name(text):
    """Whether `text` is a relative path of plain names (`a`, `a/b`): nothing that leads out of a folder."""
    return not NOT_IN_A_NAME.search(text) and all(part not in ("", ".", "..") for part in text.split("/"))


def typed(values):
    """A column's values as ints, else as floats, when every one of them is written exactly as Python writes that
    number, so that writing it back gives the same text ("07", "+3", "2.50" or "1e3" keep the column as written)."""
    stripped = [v.strip() for v in values]
    for kind in (int, float):
        try:
            numbers = [kind(v) for v in stripped]
        except ValueError:
            continue
        if all(repr(n) == v and (kind is int or math.isfinite(n)) for n, v in zip(numbers, stripped)):
            return numbers
    return values


def label_text(label):
    """A label (or a class) as the CSV writes it, and as predictions.csv writes it back."""
    return label if isinstance(label, str) else repr(label)


def reads_as_numbers(labels):
    return all(n is not None and math.isfinite(n) for n in map(_number, labels))


def sorted_classes(labels):
    """The distinct labels in numeric order when every one reads as a number (2 < 10, and "07" < "8" < "10"),
    else in text order."""
    distinct = list({label_text(label): label for label in labels}.values())
    numbers = [_number(label) for label in distinct]
    if reads_as_numbers(distinct):
        return [label for _, _, label in sorted(zip(numbers, map(label_text, distinct), distinct))]
    return sorted(distinct)


def class_indices(csv_file, lines, labels, classes, label_column):
    """Each label's index in `classes`, matched by text; one line naming the first row whose label is none."""
    index = {label_text(c): i for i, c in enumerate(classes)}
    targets = [index.get(label_text(label)) for label in labels]
    if None not in targets:
        return targets
    row = targets.index(None)
    line, label = lines[row], labels[row]
    if isinstance(label, str) and not label.strip():
        raise UserError(f"{csv_file}: line {line} has no value in column {label_column!r} (a CSV without labels "
                        f"leaves the whole column empty or out)")
    same = [c for c in classes if _number(c) is not None and _number(c) == _number(label)]
    hint = (f"; classes are matched as written, and {label_text(label)!r} is not {label_text(same[0])!r} "
            f"(give it as {label_text(label)!r} in data_loader.args.classes)") if same else ""
    raise UserError(f"{csv_file}: line {line} has label {label!r}, not one of the {len(classes)} classes "
                    f"{classes[:10]}{hint}")


def _number(value):
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return None
