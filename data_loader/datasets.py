"""Datasets for the competition layout: a CSV of image ids (and labels) beside a folder of images."""
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import Dataset

from utils.util import UserError

NO_LABEL = -1


class CsvImageDataset(Dataset):
    """Images `image_dir/<id><extension>` listed in a CSV; labels come from `label_column` when the CSV has it.

    `group_column` names rows that belong together (a patient, a video) for group-aware splits.
    Labels are mapped to indices through `classes` (the sorted distinct labels of the training CSV unless given).
    A CSV without the label column gives unlabelled samples (target -1) for inference. With `cache` every image
    is decoded once up front, which also surfaces a missing or corrupt file before training starts.
    """

    def __init__(self, csv_file, image_dir, classes, id_column="id", label_column="label", extension=".png",
                 image_mode="unchanged", transform=None, cache=True, group_column=None):
        from torchvision.io import ImageReadMode

        table = read_csv(csv_file, id_column, required=(group_column,) if group_column else ())
        self.image_dir = Path(image_dir)
        if not self.image_dir.is_dir():
            raise UserError(f"image folder {str(self.image_dir)!r}: no such folder")
        try:
            self.mode = ImageReadMode[image_mode.upper()]
        except KeyError:
            raise UserError(f"image_mode: unknown {image_mode!r}; expected one of "
                            f"{', '.join(m.name.lower() for m in ImageReadMode)}") from None
        self.ids = table[id_column].tolist()
        self.paths = [self.image_dir / f"{i}{extension}" for i in self.ids]
        self.classes = list(classes)
        self.targets = None
        if label_column in table.columns:
            index = {c: i for i, c in enumerate(self.classes)}
            bad = table[~table[label_column].isin(self.classes)]
            if len(bad):
                row = bad.index[0]
                label = table[label_column][row]
                raise UserError(f"{csv_file}: row {row + 2} has label {getattr(label, 'item', lambda: label)()!r}, "
                                f"not one of the {len(self.classes)} classes {self.classes[:10]}")
            self.targets = [index[label] for label in table[label_column]]
        self.groups = table[group_column].tolist() if group_column else None
        self.transform = transform
        self.images = [self.read(i) for i in range(len(self.paths))] if cache else None

    def read(self, index):
        from torchvision.io import decode_image

        path = self.paths[index]
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise UserError(f"image {str(path)!r}: no such file (listed in the CSV)") from None
        if not data:
            raise UserError(f"image {str(path)!r}: the file is empty")
        try:
            return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=self.mode)
        except RuntimeError as e:
            raise UserError(f"image {str(path)!r}: cannot be decoded ({str(e).splitlines()[0]})") from None

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        image = self.images[index] if self.images is not None else self.read(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index] if self.targets is not None else NO_LABEL


def read_csv(csv_file, id_column, required=()):
    """A CSV as strings (ids keep their leading zeros), with the named columns checked."""
    try:
        table = pd.read_csv(csv_file, dtype={id_column: str})
    except FileNotFoundError:
        raise UserError(f"{csv_file}: no such file") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise UserError(f"{csv_file}: not a readable CSV ({str(e).splitlines()[0]})") from None
    for column in (id_column, *required):
        if column not in table.columns:
            raise UserError(f"{csv_file}: no column {column!r} (columns: {', '.join(map(str, table.columns))})")
    return table
