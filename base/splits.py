"""Train/validation splits and K-fold assignment, reproducible from a seed: stratified by label, and group-aware so
that no group (a patient, a video) spans two sides."""
import numpy as np

from utils.util import UserError


def split_indices(n_samples, validation_split, seed, targets=None, groups=None, n_folds=0, fold=0):
    """Train and validation indices, reproducible from `seed`.

    With `n_folds`, validation is fold `fold` of a K-fold split. Otherwise `validation_split` is a ratio (float)
    or a count (int). Splits are stratified when `targets` are given and never split a group when `groups` are
    (a group-aware ratio split takes one fold of round(1 / ratio) folds).
    """
    if n_folds:
        if isinstance(n_folds, bool) or not isinstance(n_folds, int) or n_folds < 2:
            raise UserError(f"data_loader.args.n_folds: expected an integer >= 2, got {n_folds!r}")
        if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < n_folds:
            raise UserError(f"data_loader.args.fold: expected an integer from 0 to {n_folds - 1}, got {fold!r}")
        return _fold_split(n_samples, n_folds, fold, seed, targets, groups, "data_loader.args.n_folds")
    if fold:
        raise UserError(f"data_loader.args.fold: {fold!r} needs data_loader.args.n_folds")
    if isinstance(validation_split, bool) or not isinstance(validation_split, (int, float)):
        raise UserError(f"data_loader.args.validation_split: expected a ratio in [0, 1) or a sample count, "
                        f"got {validation_split!r}")
    n_valid = round(n_samples * validation_split) if isinstance(validation_split, float) else validation_split
    if validation_split < 0 or (isinstance(validation_split, float) and validation_split >= 1) or n_valid >= n_samples:
        raise UserError(f"data_loader.args.validation_split: {validation_split} leaves no training data "
                        f"(expected a ratio in [0, 1) or a count below {n_samples})")
    if n_valid == 0 and validation_split:
        raise UserError(f"data_loader.args.validation_split: {validation_split} of {n_samples} samples holds out "
                        f"none; give 0 for no validation, or a larger ratio or a count")
    if n_valid == 0:
        return np.arange(n_samples), np.array([], dtype=np.int64)
    if groups is not None:
        n_folds = max(2, round(n_samples / n_valid))
        return _fold_split(n_samples, n_folds, 0, seed, targets, groups,
                           f"data_loader.args.validation_split: {validation_split} with a group_column is one fold "
                           f"of {n_folds}")
    rng = np.random.default_rng(seed)
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


def _fold_split(n_samples, n_folds, fold, seed, targets, groups, where):
    try:
        folds = assign_folds(n_samples, n_folds, seed, targets, groups)
    except ValueError as e:
        raise UserError(f"{where}: {e}") from None
    return np.flatnonzero(folds != fold), np.flatnonzero(folds == fold)


def _largest_remainder(shares, total):
    counts = np.floor(shares).astype(int)
    counts[np.argsort(counts - shares)[: total - counts.sum()]] += 1
    return counts


def assign_folds(n_samples, n_folds, seed, targets=None, groups=None):
    """The fold (0..n_folds-1) of every sample, reproducible from `seed`."""
    if n_samples < n_folds:
        raise ValueError(f"{n_samples} samples cannot fill {n_folds} folds")
    rng = np.random.default_rng(seed)
    if groups is not None:
        return _group_folds(np.asarray(groups), n_folds, rng, None if targets is None else np.asarray(targets))
    folds = np.empty(n_samples, dtype=np.int64)
    if targets is None:
        folds[rng.permutation(n_samples)] = np.arange(n_samples) % n_folds
        return folds
    targets = np.asarray(targets)
    offset = 0
    for cls in np.unique(targets):
        members = rng.permutation(np.flatnonzero(targets == cls))
        folds[members] = (offset + np.arange(len(members))) % n_folds  # carry on where the last class stopped
        offset += len(members)
    return folds


def _group_folds(groups, n_folds, rng, targets):
    """Greedy stratified group K-fold: largest groups first, each to the fold it keeps closest to the ideal
    per-class counts (plain sizes when there are no labels)."""
    names, group_of = np.unique(groups, return_inverse=True)
    if len(names) < n_folds:
        raise ValueError(f"{len(names)} groups cannot fill {n_folds} folds")
    labels = np.zeros(len(groups), dtype=np.int64) if targets is None else np.unique(targets, return_inverse=True)[1]
    counts = np.zeros((len(names), labels.max() + 1))
    np.add.at(counts, (group_of, labels), 1)
    ideal = counts.sum(axis=0) / n_folds
    fold_counts = np.zeros((n_folds, counts.shape[1]))
    group_fold = np.empty(len(names), dtype=np.int64)
    order = rng.permutation(len(names))
    order = order[np.argsort(-counts[order].sum(axis=1), kind="stable")]
    for g in order:
        cost = (((fold_counts + counts[g]) - ideal) ** 2).sum(axis=1) - ((fold_counts - ideal) ** 2).sum(axis=1)
        fold = int(np.argmin(cost + 1e-9 * fold_counts.sum(axis=1)))
        group_fold[g] = fold
        fold_counts[fold] += counts[g]
    return group_fold[group_of]
