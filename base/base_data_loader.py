import random
import signal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.dataloader import default_collate

from utils import dist
from utils.util import UserError


class EpochSampler(Sampler):
    """Yields `(index, sample_seed)` pairs for this process, ordered and seeded from (seed, epoch) alone.

    Any epoch, or the rest of one (`skip`), can be replayed exactly, whatever the number of workers. Under
    torch.distributed each process takes every world_size-th item; with `pad` the list is first padded by
    repeating its start so that every process runs the same number of steps (training); without, every
    sample is seen exactly once (evaluation).
    """

    def __init__(self, indices, shuffle, seed=0, pad=True):
        self.indices = torch.as_tensor(indices, dtype=torch.int64)
        self.shuffle = shuffle
        self.seed = seed
        self.pad = pad
        self.rank, self.world_size = dist.rank(), dist.world_size()
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch, skip=0):
        """Select the epoch's order; `skip` leaves out this process's first samples (a resumed epoch)."""
        self.epoch = epoch
        self.skip = skip

    def _order(self):
        generator = torch.Generator().manual_seed(self.seed + 1_000_003 * self.epoch)
        order = self.indices[torch.randperm(len(self.indices), generator=generator)] if self.shuffle else self.indices
        seeds = torch.randint(2**62, (len(order),), generator=generator)
        if self.world_size > 1:
            if self.pad and len(order) % self.world_size:
                extra = self.world_size - len(order) % self.world_size
                order, seeds = torch.cat([order, order[:extra]]), torch.cat([seeds, seeds[:extra]])
            order, seeds = order[self.rank::self.world_size], seeds[self.rank::self.world_size]
        return order, seeds

    def __iter__(self):
        order, seeds = self._order()
        return iter(zip(order[self.skip:].tolist(), seeds[self.skip:].tolist()))

    def __len__(self):
        n = len(self.indices)
        per_rank = -(-n // self.world_size) if self.pad else len(range(self.rank, n, self.world_size))
        return per_rank - self.skip


class SeededDataset(Dataset):
    """Seeds Python, NumPy and torch before each sample is loaded, so augmentation depends on the sample's seed
    alone (not on which worker loads it, nor on where a resumed epoch starts). Other attributes pass through."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getitem__(self, item):
        index, seed = item
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        return self.dataset[index]

    def __len__(self):
        return len(self.dataset)

    def __getattr__(self, name):
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def _ignore_interrupt(worker_id):
    """Ctrl-C reaches the whole process group; workers keep serving so the trainer can save before it exits."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


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
            "generator": torch.Generator(),  # worker base seeds come from here, never from the global generator
            "worker_init_fn": _ignore_interrupt,
        }
        super().__init__(SeededDataset(dataset), sampler=EpochSampler(self.train_indices, shuffle, self.seed),
                         **self.init_kwargs)

    def set_epoch(self, epoch, skip_batches=0):
        """Select the epoch's order and sample seeds; `skip_batches` resumes it after that many batches."""
        self.sampler.set_epoch(epoch, skip_batches * self.batch_size)

    def overfit(self, n_batches):
        """Train and validate on the same first `n_batches` batches, unshuffled: a quick check that the model can
        learn at all. Returns the matching validation loader."""
        self.sampler.indices = self.sampler.indices[: n_batches * self.batch_size]
        self.sampler.shuffle = False
        return self._eval_loader(self.sampler.indices)

    def split_validation(self):
        return self._eval_loader(self.valid_indices) if len(self.valid_indices) else None

    def _eval_loader(self, indices):
        return DataLoader(SeededDataset(self.eval_dataset), sampler=EpochSampler(indices, shuffle=False, pad=False),
                          **self.init_kwargs)
