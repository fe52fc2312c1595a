"""K-fold assignment: stratified by label, and group-aware so that no group (a patient, a video) spans two folds."""
import numpy as np


def assign_folds(n_samples, n_folds, seed, targets=None, groups=None):
    """The fold (0..n_folds-1) of every sample, reproducible from `seed`."""
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
