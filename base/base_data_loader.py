import os
import random
import signal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.dataloader import default_collate

from base.splits import split_indices
from utils import dist
from utils.task import as_targets, task_of
from utils.util import UserError, epoch_seed, release_folders


class EpochSampler(Sampler):
    """Yields `(index, sample_seed)` pairs for this process, ordered and seeded from (seed, epoch) alone.

    Any epoch, or the rest of one (`skip`), can be replayed exactly, whatever the number of workers. Under
    torch.distributed each process takes every world_size-th item; with `pad` the list is first padded by
    repeating its start so that every process runs the same number of steps (training); without, every
    sample is seen exactly once (evaluation).
    """

    def __init__(self, indices, shuffle, seed=0, pad=True, weights=None):
        self.indices = torch.as_tensor(indices, dtype=torch.int64)
        self.weights = weights  # per index: draw with replacement in proportion to them (class balancing)
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
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        if self.weights is not None:
            order = self.indices[torch.multinomial(self.weights, len(self.indices), True, generator=generator)]
        elif self.shuffle:
            order = self.indices[torch.randperm(len(self.indices), generator=generator)]
        else:
            order = self.indices
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

    def __init__(self, dataset, finish_on_device=False, batches=True):
        self.dataset = dataset
        self.finish_on_device = finish_on_device
        self.batches = batches  # False: always sample by sample (a collate function of the project's takes samples)

    def __getitem__(self, item):
        index, seed = item
        seed_sample(seed)
        return self.dataset[index]

    def __getitems__(self, items):
        """A batch: in one piece from a dataset that can serve it so (nothing random per sample), else sample by
        sample. Either way the random state is left seeded by the last sample's seed: a dataset may serve batches
        only once its decoded-image cache is complete, so one run (or its resumption) may load either way."""
        if self.batches and getattr(self.dataset, "serves_batches", False):
            seed_sample(items[-1][1])
            return Batch(self.dataset.get_batch([index for index, _ in items], finish=not self.finish_on_device))
        return [self[item] for item in items]

    def __len__(self):
        return len(self.dataset)

    def __getattr__(self, name):
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def device_finisher(dataset):
    """What is left to do on the GPU to the batches `dataset` serves whole (scaling and normalising the decoded
    images, with a quarter of the bytes to copy), or None: without a GPU, or for datasets that serve samples."""
    return dataset.finish_batch if torch.cuda.is_available() and getattr(dataset, "serves_batches", False) else None


def inputs_to(device, data, loader):
    """A batch's inputs on `device`, the images finished there when `loader` left that to the device: one tensor, or
    a tuple (images, features, ...) of which the first is finished and the rest moved."""
    if isinstance(data, (tuple, list)):
        return (inputs_to(device, data[0], loader), *(part.to(device, non_blocking=True) for part in data[1:]))
    data = data.to(device, non_blocking=True)
    finish = getattr(loader, "finish", None)
    return data if finish is None else finish(data)


def seed_sample(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)  # torch.manual_seed would also seed (and probe) every GPU backend


class Batch(tuple):
    """(inputs, targets) already batched by the dataset: collation passes it through."""


def collate(samples):
    """default_collate, with samples of different shapes reported in one line instead of a stack error."""
    if isinstance(samples, Batch):
        return tuple(samples)
    try:
        return default_collate(samples)
    except RuntimeError:
        shapes = sorted({str(list(s[0].shape)) for s in samples if hasattr(s[0], "shape")})
        if len(shapes) < 2:
            raise
        raise UserError(f"data: samples of one batch have different shapes after the transforms "
                        f"({', '.join(shapes[:3])}): give the images one size and channel count (image_mode, or a "
                        f"Resize in the transforms)") from None


class MixedCollate:
    """A training batch collated, then mixed (in the worker that loads it, from its samples' seeds)."""

    def __init__(self, collate_fn, mixing):
        self.collate_fn = collate_fn
        self.mixing = mixing

    def __call__(self, samples):
        images, targets = self.collate_fn(samples)
        return self.mixing(images, as_targets(targets))


def _init_worker(worker_id):
    """Ctrl-C reaches the whole process group; workers keep serving so the trainer can save before it exits. A
    worker does not hold the run folder: it is free again as soon as the trainer's process ends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    release_folders()


WORKERS_PER_CPU = 4  # more workers than CPUs can hide slow reads (a network disk); many more only take memory


def available_cpus():
    """The CPUs this process may run on (its affinity, which containers and taskset narrow), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on this platform
        return os.cpu_count() or 1


class Loader(DataLoader):
    """A DataLoader that lets its dataset keep what it fills as it is read (a decoded-image cache): the dataset's
    `settle_cache` runs before each pass and, in a pass where it has something left to keep, on receiving the last
    batch (every sample of the pass has been read by then, in the workers too)."""

    def __iter__(self):
        settle = getattr(self.dataset, "settle_cache", None)
        if settle is None or settle():
            return super().__iter__()
        return settled_at_end(super().__iter__(), settle)


def settled_at_end(batches, settle):
    last = len(batches)
    for number, batch in enumerate(batches, 1):
        if number == last:
            settle()
        yield batch


class BaseDataLoader(Loader):
    """A DataLoader with a seeded validation split or K-fold: stratified by the dataset's `targets`, grouped by its
    `groups` when it has them; `balanced` draws training samples with equal weight per class.

    `eval_dataset` holds the same samples with evaluation transforms; the validation split is drawn from it so
    validation never sees training augmentation. The split and every epoch's order derive from `seed` (the
    config's, passed by the program), so runs and resumes repeat exactly. `collate_fn` serves training batches
    only, and always gets a list of samples: validation, test and out-of-fold predictions are collated plainly.
    `num_workers` is refused above 4 per available CPU: results do not depend on it, and thousands of worker
    processes exhaust the memory. A
    training epoch never ends in a batch of one sample, on which batch norm cannot train: that sample is left to
    the next epoch's order. `mixing(images, targets)` (CutMix, MixUp) is applied to training batches only.
    """

    def __init__(self, dataset, batch_size, shuffle, validation_split, num_workers, collate_fn=collate,
                 eval_dataset=None, n_folds=0, fold=0, stratify=True, balanced=False, seed=0, mixing=None):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"data_loader.args.batch_size: expected a positive integer, got {batch_size!r}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise UserError(f"data_loader.args.num_workers: expected an integer >= 0, got {num_workers!r}")
        cpus = available_cpus()
        if num_workers > WORKERS_PER_CPU * cpus:
            raise UserError(f"data_loader.args.num_workers: {num_workers} worker processes for the {cpus} CPUs this "
                            f"process may use; at most {WORKERS_PER_CPU * cpus} (each worker is a process with "
                            f"memory of its own; about {cpus} keep the CPUs busy)")
        if not len(dataset):
            raise UserError(f"data_loader: the dataset ({type(dataset).__name__}) has no samples")
        self.seed = seed
        targets = getattr(dataset, "targets", None)
        strata = None if targets is None else task_of(dataset).strata(targets)
        self.train_indices, self.valid_indices = split_indices(
            len(dataset), validation_split, self.seed, strata if stratify else None, getattr(dataset, "groups", None),
            n_folds, fold)
        self.n_samples = len(self.train_indices)
        self.eval_dataset = dataset if eval_dataset is None else eval_dataset
        self.init_kwargs = {
            "batch_size": batch_size,
            "collate_fn": collate_fn,
            "num_workers": num_workers,
            "pin_memory": torch.cuda.is_available(),
            "generator": torch.Generator(),  # worker base seeds come from here, never from the global generator
            "worker_init_fn": _init_worker,
            "persistent_workers": num_workers > 0,  # safe: augmentation depends on the sample seeds, not the worker
        }
        weights = None
        if balanced:
            if targets is None:
                raise UserError("data_loader.args.balanced: class-balanced sampling needs a dataset with `targets`")
            train_strata = torch.as_tensor(np.unique(strata[self.train_indices], return_inverse=True)[1])
            weights = 1.0 / torch.bincount(train_strata)[train_strata].double()
        plain = collate_fn is collate  # another collate function takes a list of samples, never a whole batch
        finish = None if mixing or not plain else device_finisher(dataset)  # mixing takes finished images
        sampler = EpochSampler(self.train_indices, shuffle, self.seed, weights=weights)
        lone_last = len(sampler) > 1 and len(sampler) % batch_size == 1  # batch norm cannot train on one sample
        training_kwargs = {**self.init_kwargs, "collate_fn": MixedCollate(collate_fn, mixing) if mixing else collate_fn}
        super().__init__(SeededDataset(dataset, finish is not None, plain), sampler=sampler, drop_last=lone_last,
                         **training_kwargs)
        self.finish = finish
        self.mixing = mixing

    def write_caches(self):
        """Let the datasets write what they keep for later runs (a decoded-image cache), once a run has begun."""
        for dataset in (self.dataset, self.eval_dataset):
            getattr(dataset, "write_cache", lambda: None)()

    def set_epoch(self, epoch, skip_batches=0):
        """Select the epoch's order and sample seeds; `skip_batches` resumes it after that many batches."""
        self.sampler.set_epoch(epoch, skip_batches * self.batch_size)

    def overfit(self, n_batches):
        """Train and validate on the same first `n_batches` batches, unshuffled: a quick check that the model can
        learn at all. Returns the matching validation loader."""
        self.sampler.indices = self.sampler.indices[: n_batches * self.batch_size]
        self.sampler.shuffle, self.sampler.weights = False, None
        return self._eval_loader(self.sampler.indices)

    def evaluation_loader(self):
        """Every sample once, in order, with evaluation transforms and plain batches: test.py's test split."""
        return self._eval_loader(np.arange(len(self.eval_dataset)))

    def split_validation(self):
        return self._eval_loader(self.valid_indices) if len(self.valid_indices) else None

    def _eval_loader(self, indices):
        finish = device_finisher(self.eval_dataset)
        loader = Loader(SeededDataset(self.eval_dataset, finish is not None),
                        sampler=EpochSampler(indices, shuffle=False, pad=False),
                        **{**self.init_kwargs, "collate_fn": collate})
        loader.finish = finish
        return loader
