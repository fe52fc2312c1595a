"""A generated RGB competition set for the task tests (multi-task heads, multi-label, regression): every label is
drawn from the pixels, so a small ConvNet learns all of them in a few CPU epochs.

`make_task_set(folder)` writes, in the competition layout CsvImageDataLoader reads:

    train.csv               id, mask, gender, age, tags, value, group
    test_labels.csv         the same columns for the test ids
    test.csv                id
    sample_submission.csv   ImageID,ans (the test ids shuffled, ans 0: a one-column submission like the mask one)
    train/<id>.png, test/<id>.png   size x size uint8 RGB

What each label looks like (a horizontal flip keeps every one, so flip TTA sees the same labels):

    mask    the level of the whole red channel: correct 40, incorrect 130, none 220
    age     the level of the whole blue channel: 0 -> 40, 1 -> 130, 2 -> 220
    gender  male: a bright green band across the top rows; female: none
    tags    each a bright green patch of its own: cat both middle edges, dog the bottom centre, sun both bottom
            corners; a row has any subset of them, written space-separated in that order (empty: none)
    value   a float in [0, 2) (written with repr): the green level of the centre patch, 40 + 100 * value
    group   three consecutive rows share one (g000, g001, ...)

plus Gaussian noise (standard deviation 8) on every pixel. Deterministic from `seed`.
"""
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

COLUMNS = ["id", "mask", "gender", "age", "tags", "value", "group"]
MASKS = ["correct", "incorrect", "none"]
GENDERS = ["female", "male"]
AGES = [0, 1, 2]
TAGS = ["cat", "dog", "sun"]
LEVELS = [40, 130, 220]  # the red (mask) and blue (age) levels of the classes
NOISE = 8


def _patches(size):
    """The (rows, columns) slices of each green-channel mark, mirror-symmetric left to right."""
    q = size // 4  # a patch is q x q
    centre = slice(size // 2 - q // 2, size // 2 - q // 2 + q)
    middle = slice(size // 2 - q // 2, size // 2 - q // 2 + q)
    left, right, top, bottom = slice(0, q), slice(size - q, size), slice(0, q), slice(size - q, size)
    return {
        "gender": [(top, slice(q, size - q))],
        "cat": [(middle, left), (middle, right)],
        "dog": [(bottom, centre)],
        "sun": [(bottom, left), (bottom, right)],
        "value": [(middle, centre)],
    }


def _image(row, size, rng):
    """One (3, size, size) uint8 image showing the row's labels."""
    image = np.empty((3, size, size), dtype=np.float64)
    image[0] = LEVELS[MASKS.index(row["mask"])]
    image[1] = 30
    image[2] = LEVELS[AGES.index(row["age"])]
    patches = _patches(size)
    marks = (["gender"] if row["gender"] == "male" else []) + (row["tags"].split() if row["tags"] else [])
    for mark in marks:
        for rows, cols in patches[mark]:
            image[1, rows, cols] = 240
    for rows, cols in patches["value"]:
        image[1, rows, cols] = 40 + 100 * row["value"]
    image += rng.normal(0, NOISE, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _labels(n, rng):
    """n rows of labels (ids and groups added by the caller)."""
    rows = []
    for _ in range(n):
        tags = [t for t in TAGS if rng.random() < 0.4]
        rows.append({
            "mask": MASKS[rng.integers(len(MASKS))],
            "gender": GENDERS[rng.integers(len(GENDERS))],
            "age": AGES[rng.integers(len(AGES))],
            "tags": " ".join(tags),
            "value": float(rng.uniform(0, 2)),
        })
    return rows


def _write_png(image, path):
    from torchvision.io import write_png

    with warnings.catch_warnings():  # torchvision 0.29 deprecates its image codecs on every call
        warnings.simplefilter("ignore", DeprecationWarning)
        write_png(torch.from_numpy(image), str(path))


def _write_rows(path, columns, rows):
    lines = [",".join(columns)]
    for row in rows:
        lines.append(",".join(repr(row[c]) if isinstance(row[c], float) else str(row[c]) for c in columns))
    Path(path).write_text("\n".join(lines) + "\n")


def make_task_set(folder, n_train=96, n_test=32, size=16, seed=0):
    """Write the set into `folder` (created if needed) and return the folder as a Path."""
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    rows = _labels(n_train + n_test, rng)
    for i, row in enumerate(rows):
        row["id"] = f"{i:04d}"
        row["group"] = f"g{i // 3:03d}"
    train, test = rows[:n_train], rows[n_train:]
    for split, split_rows in (("train", train), ("test", test)):
        (folder / split).mkdir(parents=True, exist_ok=True)
        for row in split_rows:
            _write_png(_image(row, size, rng), folder / split / f"{row['id']}.png")
    _write_rows(folder / "train.csv", COLUMNS, train)
    _write_rows(folder / "test_labels.csv", COLUMNS, test)
    _write_rows(folder / "test.csv", ["id"], test)
    shuffled = [test[i]["id"] for i in rng.permutation(len(test))]
    _write_rows(folder / "sample_submission.csv", ["ImageID", "ans"], [{"ImageID": i, "ans": 0} for i in shuffled])
    return folder


def read_truth(folder, csv="test_labels.csv"):
    """The labels of a written set as a DataFrame indexed by id, every column as text exactly as written (empty
    tags stay ""), except `value` as a float."""
    table = pd.read_csv(Path(folder) / csv, dtype=str, keep_default_na=False).set_index("id")
    table["value"] = table["value"].astype(float)
    return table
