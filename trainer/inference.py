"""Inference: class probabilities with test-time augmentation, ensembles, out-of-fold files, submissions, blends.

Probabilities are the common currency: models are averaged as probabilities, metrics are computed from them
(their log is a valid input to cross-entropy and NLL alike), and probability CSVs can be blended later.
"""
import math

import numpy as np
import pandas as pd
import torch

from base.base_data_loader import inputs_to
from model.metric import EpochMetrics
from utils.checkpoint import checkpoint_config, load_model_weights, unwrap
from utils.config import build, build_loss, build_metrics, validate
from utils.util import UserError, write_json

CHUNK = 4096


@torch.no_grad()
def predict(model, data_loader, device, tta=()):
    """Probabilities for every sample in loader order (the plain view averaged with each TTA view), and targets."""
    model.eval()
    probabilities, targets = [], []
    for data, target in data_loader:
        data = inputs_to(device, data, data_loader)
        views = [data] + [transform(data) for transform in tta]
        probabilities.append(torch.stack([model(view).float().softmax(dim=1) for view in views]).mean(dim=0).cpu())
        targets.append(target)
    return torch.cat(probabilities), torch.cat(targets)


def score(config, probabilities, targets):
    """The config's loss and metrics of averaged probabilities, over all samples at once."""
    criterion, tracker = build_loss(config), EpochMetrics(build_metrics(config))
    for start in range(0, len(targets), CHUNK):
        log_p = probabilities[start:start + CHUNK].clamp_min(1e-12).log()
        target = targets[start:start + CHUNK]
        tracker.update(criterion(log_p, target), log_p, target)
    return tracker.result()


def row_ids(data_loader):
    """The id of every sample in loader order: the dataset's `ids` (competition layout) or its index."""
    dataset, rows = data_loader.dataset, data_loader.sampler.indices.tolist()
    return [dataset.ids[i] for i in rows] if hasattr(dataset, "ids") else rows


def class_names(data_loader, n_classes):
    classes = getattr(data_loader.dataset, "classes", None) if hasattr(data_loader.dataset, "ids") else None
    return [str(c) for c in classes] if classes is not None else [str(i) for i in range(n_classes)]


def write_out_of_fold(trainer, checkpoint, path):
    """Predict a fold's validation rows with its best weights: id, target index and one column per class."""
    model = unwrap(trainer.model)
    load_model_weights(model, checkpoint["state_dict"], "the fold's best checkpoint")
    loader = trainer.valid_data_loader
    probabilities, targets = predict(model, loader, trainer.device)
    table = pd.DataFrame(probabilities.numpy(), columns=class_names(loader, probabilities.shape[1]))
    table.insert(0, "target", targets.numpy())
    table.insert(0, "id", row_ids(loader))
    table.to_csv(path, index=False)


def combine_out_of_fold(config, paths, group_dir):
    """Join the folds' out-of-fold files into oof.csv (every training row once) and score it."""
    table = pd.concat([pd.read_csv(p, dtype={"id": str}) for p in paths], ignore_index=True)
    if table["id"].duplicated().any():
        raise UserError(f"out-of-fold rows overlap between folds: {table['id'][table['id'].duplicated()].iloc[0]!r}")
    table.to_csv(group_dir / "oof.csv", index=False)
    probabilities = torch.tensor(table.iloc[:, 2:].to_numpy(), dtype=torch.float32)
    metrics = score(config, probabilities, torch.tensor(table["target"].to_numpy()))
    write_json({"n_samples": len(table), **metrics}, group_dir / "oof_metrics.json")
    return metrics


def load_model(path, checkpoint, use_ema, device):
    """The model of a loaded checkpoint, rebuilt from its own config, with its (EMA) weights, on `device`, in eval
    mode."""
    model = build(validate(checkpoint_config(checkpoint)), "arch")
    load_model_weights(model, checkpoint["ema_state_dict" if use_ema else "state_dict"], path)
    return model.to(device).eval()


def write_predictions(out, ids, probabilities, classes, inference):
    """probabilities.csv (id, one column per class) and the submission: `predictions.csv` as id,label, or in the
    layout of `inference.sample_submission` (its columns and row order; per-class columns get probabilities).
    Both are checked before either is written."""
    table = pd.DataFrame(probabilities.numpy(), columns=classes)
    table.insert(0, "id", ids)
    indices = probabilities.argmax(dim=1).tolist()
    labels = [classes[i] for i in indices] if inference["label_format"] == "name" else indices
    submission = pd.DataFrame({"id": ids, "label": labels})
    sample_path = inference["sample_submission"]
    if sample_path:
        submission = match_sample_submission(submission, table, sample_path)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "probabilities.csv", index=False)
    submission.to_csv(out / "predictions.csv", index=False)


def match_sample_submission(submission, table, sample_path):
    try:
        sample = pd.read_csv(sample_path, dtype=str)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise UserError(f"inference.sample_submission: cannot read {sample_path!r} ({e})") from None
    id_column, value_columns = sample.columns[0], list(sample.columns[1:])
    missing = set(sample[id_column]) - set(submission["id"])
    if missing or len(sample) != len(submission):
        raise UserError(f"inference.sample_submission: {sample_path} lists {len(sample)} ids, the predictions "
                        f"{len(submission)}; e.g. no prediction for {sorted(missing)[:3]}")
    if set(value_columns) <= set(table.columns[1:]) and len(value_columns) > 1:
        result = table.set_index("id").loc[sample[id_column], value_columns].reset_index()
    elif len(value_columns) == 1:
        result = submission.set_index("id").loc[sample[id_column]].reset_index()
    else:
        raise UserError(f"inference.sample_submission: expected an id column and a label column, or one column per "
                        f"class; got {', '.join(sample.columns)}")
    result.columns = [id_column, *value_columns]
    return result


def blend(paths, weights):
    """Weighted mean of saved probabilities.csv files (same ids and classes): ids, probabilities, class names."""
    weights = weights or [1.0] * len(paths)
    if len(weights) != len(paths):
        raise UserError(f"--weights: {len(weights)} weights for {len(paths)} probability files")
    if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise UserError(f"--weights: expected finite numbers >= 0 with a positive sum, got "
                        f"{' '.join(map(str, weights))}")
    tables = []
    for path in paths:
        try:
            tables.append(pd.read_csv(path, dtype={"id": str}).set_index("id"))
        except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, KeyError, UnicodeDecodeError) as e:
            raise UserError(f"--blend: cannot read {str(path)!r} as a probabilities.csv ({e})") from None
        table = tables[-1]
        if table.index.duplicated().any():
            raise UserError(f"--blend: {path} lists id {table.index[table.index.duplicated()][0]!r} more than once")
        numeric = table.apply(pd.to_numeric, errors="coerce")
        if table.empty or numeric.isna().any().any() or not np.isfinite(numeric.to_numpy()).all():
            raise UserError(f"--blend: {path} has cells that are not finite numbers (expected id and one "
                            f"probability column per class)")
        tables[-1] = numeric
    first = tables[0]
    for path, table in zip(paths[1:], tables[1:]):
        if set(table.index) != set(first.index) or list(table.columns) != list(first.columns):
            raise UserError(f"--blend: {path} has other ids or classes than {paths[0]}")
    total = sum(w * t.loc[first.index].to_numpy() for w, t in zip(weights, tables)) / sum(weights)
    return list(first.index), torch.tensor(total, dtype=torch.float32), list(first.columns)
