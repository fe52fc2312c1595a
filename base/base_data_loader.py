import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler
from torch.utils.data.dataloader import default_collate

from utils.util import UserError


class EpochSampler(Sampler):
    """Yields a fixed list of indices, reshuffled from (seed, epoch) alone, so any epoch can be replayed exactly."""

    def __init__(self, indices, shuffle, seed=0):
        self.indices = torch.as_tensor(indices, dtype=torch.int64)
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        if not self.shuffle:
            return iter(self.indices.tolist())
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(self.indices[torch.randperm(len(self.indices), generator=generator)].tolist())

    def __len__(self):
        return len(self.indices)


def split_indices(n_samples, validation_split, targets, seed):
    """Train and validation indices; stratified by class when targets are known. A float is a ratio, an int a count."""
    if isinstance(validation_split, bool) or not isinstance(validation_split, (int, float)):
        raise UserError(f"validation_split: expected a ratio in [0, 1) or a sample count, got {validation_split!r}")
    n_valid = round(n_samples * validation_split) if isinstance(validation_split, float) else validation_split
    if validation_split < 0 or (isinstance(validation_split, float) and validation_split >= 1) or n_valid >= n_samples:
        raise UserError(f"validation_split: {validation_split} leaves no training data "
                        f"(expected a ratio in [0, 1) or a count below {n_samples})")
    rng = np.random.default_rng(seed)
    if n_valid == 0:
        return np.arange(n_samples), np.array([], dtype=np.int64)
    if targets is None:
        order = rng.permutation(n_samples)
        return np.sort(order[n_valid:]), np.sort(order[:n_valid])
    targets = np.asarray(targets)
    valid = []
    classes, counts = np.unique(targets, return_counts=True)
    quotas = _largest_remainder(counts * n_valid / n_samples, n_valid)
    for cls, quota in zip(classes, quotas):
        valid.append(rng.permutation(np.flatnonzero(targets == cls))[:quota])
    valid = np.sort(np.concatenate(valid))
    return np.setdiff1d(np.arange(n_samples), valid), valid


def _largest_remainder(shares, total):
    counts = np.floor(shares).astype(int)
    counts[np.argsort(counts - shares)[: total - counts.sum()]] += 1
    return counts


class BaseDataLoader(DataLoader):
    """A DataLoader with a seeded (stratified when the dataset has `targets`) validation split.

    `eval_dataset` holds the same samples with evaluation transforms; the validation split is drawn from it so
    validation never sees training augmentation. The split and every epoch's order derive from the torch seed
    that train.py sets from the config, so runs and resumes repeat exactly.
    """

    def __init__(self, dataset, batch_size, shuffle, validation_split, num_workers, collate_fn=default_collate,
                 eval_dataset=None):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"batch_size: expected a positive integer, got {batch_size!r}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise UserError(f"num_workers: expected an integer >= 0, got {num_workers!r}")
        self.seed = torch.initial_seed()
        targets = getattr(dataset, "targets", None)
        self.train_indices, self.valid_indices = split_indices(len(dataset), validation_split, targets, self.seed)
        self.n_samples = len(self.train_indices)
        self.eval_dataset = dataset if eval_dataset is None else eval_dataset
        self.init_kwargs = {
            "batch_size": batch_size,
            "collate_fn": collate_fn,
            "num_workers": num_workers,
            "pin_memory": torch.cuda.is_available(),
        }
        super().__init__(dataset, sampler=EpochSampler(self.train_indices, shuffle, self.seed),
                         generator=torch.Generator(), **self.init_kwargs)

    def set_epoch(self, epoch):
        """Fix this epoch's shuffle and the worker seeds (hence augmentation) from the seed and the epoch number."""
        self.sampler.set_epoch(epoch)
        self.generator.manual_seed(self.seed + 7919 * epoch)

    def split_validation(self):
        if len(self.valid_indices) == 0:
            return None
        return DataLoader(self.eval_dataset, sampler=EpochSampler(self.valid_indices, shuffle=False),
                          **self.init_kwargs)
