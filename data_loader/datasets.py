"""Datasets for the competition layout: a CSV of image ids (and labels) beside a folder of images."""
import csv
import functools
import hashlib
import logging
import re
import zipfile
from pathlib import Path

import torch
from torch.utils.data import Dataset

from data_loader.images import MODES, decode
from utils.util import UserError, atomic_write

NO_LABEL = -1
IMAGE_MODES = tuple(MODES)
INTEGER = re.compile(r"[+-]?[0-9]+")
FLOAT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
BOOLEAN = {"true": True, "false": False}


class CsvImageDataset(Dataset):
    """Images `image_dir/<id><extension>` listed in a CSV; labels come from `label_column` when the CSV has it.

    `group_column` names rows that belong together (a patient, a video) for group-aware splits.
    Labels are mapped to indices through `classes` (the sorted distinct labels of the training CSV unless given).
    A CSV without the label column gives unlabelled samples (target -1) for inference. With `cache` every image
    is decoded once up front, which also surfaces a missing or corrupt file before training starts; with
    `cache_dir` as well, the decoded images are kept there and reused by later runs while the files are unchanged.
    """

    def __init__(self, csv_file, image_dir, classes, id_column="id", label_column="label", extension=".png",
                 image_mode="unchanged", transform=None, cache=True, cache_dir=None, group_column=None):
        table = read_csv(csv_file, id_column, required=(group_column,) if group_column else ())
        self.image_dir = Path(image_dir)
        if not self.image_dir.is_dir():
            raise UserError(f"image folder {str(self.image_dir)!r}: no such folder")
        if str(image_mode).lower() not in IMAGE_MODES:
            raise UserError(f"image_mode: unknown {image_mode!r}; expected one of {', '.join(IMAGE_MODES)}")
        self.image_mode = image_mode.lower()
        self.ids = table[id_column]
        self.paths = [self.image_dir / f"{i}{extension}" for i in self.ids]
        self.classes = list(classes)
        self.targets = None
        if label_column in table:
            index = {c: i for i, c in enumerate(self.classes)}
            for row, label in enumerate(table[label_column]):
                if label not in index:
                    raise UserError(f"{csv_file}: row {row + 2} has label {label!r}, "
                                    f"not one of the {len(self.classes)} classes {self.classes[:10]}")
            self.targets = [index[label] for label in table[label_column]]
        self.groups = table[group_column] if group_column else None
        self.transform = transform
        self.images = None
        self.stacked = None  # the decoded images as one (N, C, H, W) block when they share one shape
        self.unsaved_cache = []  # (path, contents) of a cache file, written by write_cache once a run has begun
        if cache:
            self.images = self.decode_all() if cache_dir is None else self.load_or_decode(Path(cache_dir), csv_file)
            if self.images and all(image.shape == self.images[0].shape for image in self.images):
                self.stacked = torch.stack(self.images)
                self.images = list(self.stacked)
        self.target_tensor = torch.tensor(self.targets if self.targets is not None else [NO_LABEL] * len(self.paths))

    def read(self, index):
        path = self.paths[index]
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise UserError(f"image {str(path)!r}: no such file (listed in the CSV)") from None
        except OSError as e:
            raise UserError(f"image {str(path)!r}: cannot be read ({e.strerror})") from None
        if not data:
            raise UserError(f"image {str(path)!r}: the file is empty")
        try:
            return decode(data, self.image_mode)
        except ValueError as e:
            raise UserError(f"image {str(path)!r}: cannot be decoded ({e})") from None

    def decode_all(self):
        """Every image, decoded; images of different shapes are refused unless a transform can make them one size."""
        images = [self.read(i) for i in range(len(self.paths))]
        if not getattr(self.transform, "steps", self.transform is not None):
            for path, image in zip(self.paths, images):
                if image.shape != images[0].shape:
                    raise UserError(f"image {str(path)!r}: {list(image.shape)} (channels, height, width), but "
                                    f"{self.paths[0].name} is {list(images[0].shape)}; give the images one size and "
                                    f"channel count (image_mode), or add a Resize to the transforms")
        return images

    def load_or_decode(self, cache_dir, csv_file):
        """The decoded images from `cache_dir` when its file matches the image files as they are now; otherwise
        decoded now, to be written there for the next run by `write_cache`."""
        place = hashlib.sha256(f"{self.image_dir.resolve()}|{self.image_mode}".encode()).hexdigest()[:16]
        path = cache_dir / f"{Path(csv_file).stem}-{self.image_mode}-{place}.pt"
        signature = self.files_signature()
        if path.is_file():
            try:
                if not zipfile.is_zipfile(path):
                    raise ValueError("not a file written by torch.save, or a truncated one")
                saved = torch.load(path, weights_only=True)
                if saved["signature"] == signature:
                    return as_views(saved["images"], saved["shapes"])
            except Exception as e:  # an unreadable cache is rebuilt, never trusted
                self.warn(f"decoded-image cache {path}: unreadable ({str(e).splitlines()[0]}); decoding again")
        images = self.decode_all()
        if len({image.dtype for image in images}) > 1:
            self.warn(f"decoded-image cache {path}: not written (the images have different sample types)")
            return images
        shapes = torch.tensor([list(image.shape) for image in images], dtype=torch.int64).view(-1, 3)
        flat = torch.cat([image.flatten() for image in images]) if images else torch.empty(0, dtype=torch.uint8)
        self.unsaved_cache.append((path, {"signature": signature, "shapes": shapes, "images": flat}))
        return as_views(flat, shapes)  # one block of memory, as a cached run has

    def write_cache(self):
        """Write the decoded-image cache file that loading found missing or stale (nothing is written before a run
        has passed its checks)."""
        while self.unsaved_cache:
            path, contents = self.unsaved_cache.pop()
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(path, functools.partial(torch.save, contents))
            except OSError as e:
                self.warn(f"decoded-image cache {path}: not written ({e.strerror or e})")

    def files_signature(self):
        """A digest of every listed file's name, size, modification and status-change times: a file replaced
        with its old modification time restored (cp -p, rsync -a) still has a new status-change time."""
        digest = hashlib.sha256()
        for path in self.paths:
            try:
                stat = path.stat()
            except FileNotFoundError:
                raise UserError(f"image {str(path)!r}: no such file (listed in the CSV)") from None
            digest.update(f"{path.name}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}\n".encode())
        return digest.hexdigest()

    @staticmethod
    def warn(message):
        logging.getLogger("template").warning(message)

    def __len__(self):
        return len(self.paths)

    @property
    def serves_batches(self):
        """Whether whole batches can be cut from the decoded block: one shape, and a transform without random or
        per-image steps (scaling and normalising work on batches alike)."""
        return self.stacked is not None and not getattr(self.transform, "steps", self.transform is not None)

    def get_batch(self, indices):
        index = torch.as_tensor(indices)
        images = self.stacked[index]
        return (self.transform(images) if self.transform is not None else images), self.target_tensor[index]

    def __getitem__(self, index):
        image = self.images[index] if self.images is not None else self.read(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index] if self.targets is not None else NO_LABEL


def as_views(flat, shapes):
    """The images stored back to back in `flat`, as views of it."""
    shapes = shapes.tolist()
    return [part.view(shape) for part, shape in zip(flat.split([c * h * w for c, h, w in shapes]), shapes)]


def read_csv(csv_file, id_column, required=()):
    """A CSV as {column: values}. Ids stay strings (leading zeros kept); other columns whose every value is an
    integer, a decimal number or true/false are converted, so labels 2 and 10 sort as numbers."""
    try:
        with open(csv_file, newline="", encoding="utf-8-sig") as f:
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
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise UserError(f"{csv_file}: the header names {', '.join(map(repr, repeated))} more than once")
    for column in (id_column, *required):
        if column not in header:
            raise UserError(f"{csv_file}: no column {column!r} (columns: {', '.join(header)})")
    for line, row in rows:
        if len(row) != len(header):
            raise UserError(f"{csv_file}: line {line} has {len(row)} fields, expected {len(header)} like the header")
    table = {}
    for i, name in enumerate(header):
        values = [row[i] for _, row in rows]
        if name in (id_column, *required) and "" in values:
            raise UserError(f"{csv_file}: line {rows[values.index('')][0]} has no value in column {name!r}")
        table[name] = values if name == id_column else typed(values)
    first_line = {}
    for (line, _), image_id in zip(rows, table[id_column]):
        if first_line.setdefault(image_id, line) != line:
            raise UserError(f"{csv_file}: id {image_id!r} on line {line} is listed on line {first_line[image_id]} "
                            f"too; each id once")
    return table


def typed(values):
    """A column's values as ints, floats or booleans when every one of them reads as such, else as written."""
    stripped = [v.strip() for v in values]
    if not values:
        return values
    if all(INTEGER.fullmatch(v) for v in stripped):
        return [int(v) for v in stripped]
    if all(FLOAT.fullmatch(v) for v in stripped):
        return [float(v) for v in stripped]
    if all(v.lower() in BOOLEAN for v in stripped):
        return [BOOLEAN[v.lower()] for v in stripped]
    return values
