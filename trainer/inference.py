"""Inference: class probabilities with test-time augmentation, ensembles, out-of-fold files, submissions, blends.

Probabilities are the common currency (values, for regression): models are averaged as probabilities, metrics are
computed from them (the task turns them back into the scores losses and metrics take), and probability CSVs can be
blended later.
"""
import itertools
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from base.base_data_loader import inputs_to
from data_loader.data_loaders import class_source, read_classes
from model.metric import EpochMetrics
from trainer.inference_settings import refuse_sorted_text
from trainer.preflight import check_width, checked_loss_and_metrics
from trainer.steps import evaluation_step, tta_view
from utils.checkpoint import load_checkpoint, load_model_weights, unwrap
from utils.config import build, build_loss, build_metrics, metric_name, split_change
from utils.files import open_regular
from utils.task import Task, WholeLoss, as_targets, read_task, task_of, write_task
from utils.util import UserError, first_line, listed, worker_died, write_json

CHUNK = 4096
PROBE = 4  # samples of the first batch that every model and TTA view is tried on before predicting
SUM_TOLERANCE = 1e-3  # how far a saved row of probabilities may sum from 1 (float32 values written as text)
MODEL_ERRORS = (RuntimeError, ValueError, TypeError, IndexError)


@torch.no_grad()
def predict(model, data_loader, device, tta=()):
    """Probabilities (values, for regression) for every sample in loader order, the plain view averaged with each
    TTA view, and the targets."""
    model.eval()
    task = task_of(data_loader.dataset)
    probabilities, targets = [], []
    for data, target in data_loader:
        data = inputs_to(device, data, data_loader)
        views = [data] + [tta_view(transform, data) for transform in tta]
        scores = [task.probabilities(task.flat(evaluation_step(model, view))) for view in views]
        probabilities.append(torch.stack(scores).mean(dim=0).cpu())
        targets.append(as_targets(target))
    return torch.cat(probabilities), torch.cat(targets)


def score(config, task, probabilities, targets, threshold=None):
    """The config's loss and metrics of averaged probabilities, over all samples at once; a multilabel decision
    `threshold` replaces the metrics' own."""
    criterion, tracker = scoring_loss(config, task), EpochMetrics(build_metrics(config, task))
    own = {metric_name(m) for m in config["metrics"] if isinstance(m, dict) and "threshold" in m.get("args", {})}
    for name, metric in tracker.metrics.items():
        if threshold is not None and hasattr(metric, "threshold") and name not in own:
            metric.threshold = torch.as_tensor(threshold, dtype=torch.float32)
    for start in range(0, len(targets), CHUNK):
        scores = task.logits(probabilities[start:start + CHUNK])
        target = targets[start:start + CHUNK]
        tracker.update(criterion(scores, target), scores, target)
    return tracker.result()


def scoring_loss(config, task):
    """The loss that scores saved or averaged probabilities: the config's, or the task's default one when the
    config's takes the model's whole output (probabilities keep the heads only, not what else the model returns)."""
    criterion = build_loss(config, task)
    return build_loss({**config, "loss": None}, task) if isinstance(criterion, WholeLoss) else criterion


def placeholder_labels(config, split, targets):
    """Why the data's labels look like placeholders rather than truth (every row the same, or the test CSV holding the
    sample submission's rows, as where a competition ships no test labels), or None."""
    if len(targets) > 1 and bool((targets == targets[:1]).all()):
        return f"all {len(targets):,} rows have the same label"
    sample_path, args = config["inference"]["sample_submission"], config["data_loader"]["args"]
    if split != "test" or not sample_path or "data_dir" not in args:
        return None
    test_csv = Path(args["data_dir"], args.get("test_csv", "test.csv"))
    try:
        with open_regular(test_csv) as f:
            test = pd.read_csv(f, dtype=str, keep_default_na=False)
    except (OSError, ValueError):
        return None
    sample = read_sample(sample_path)
    common = [c for c in sample.columns if c in test.columns]
    if len(common) > 1 and len(sample) == len(test) and \
            set(sample[common].itertuples(index=False)) == set(test[common].itertuples(index=False)):
        return f"{test_csv} holds the rows of the sample submission {sample_path}"
    return None


def row_ids(data_loader):
    """The id of every sample in loader order: the dataset's `ids` (competition layout) or its index."""
    dataset, rows = data_loader.dataset, data_loader.sampler.indices.tolist()
    return [dataset.ids[i] for i in rows] if hasattr(dataset, "ids") else rows


def data_classes(data_loader):
    """The data's class names in index order (the output's column names), when its dataset names them (the
    competition layout), else None."""
    dataset = data_loader.dataset
    classes = getattr(dataset, "classes", None) if hasattr(dataset, "ids") else None
    return None if classes is None else [str(c) for c in classes]


def class_names(data_loader, n_classes):
    return data_classes(data_loader) or [str(i) for i in range(n_classes)]


# --- checks before predicting: class lists, one probe batch through every model and TTA view -----------------------

def first_difference(a, b):
    """(position, item of a, item of b) where two lists first differ; "none" past the end of the shorter."""
    shown = [(i, *("none" if x is None else repr(x) for x in pair))
             for i, pair in enumerate(itertools.zip_longest(a, b)) if pair[0] != pair[1]]
    return shown[0]


def check_class_order(members, data_config, data_loader):
    """Refuse checkpoints trained on other classes, or on the same ones in another order, than the data's class list:
    an ensemble averages probabilities, and the output files name them, column by column. `members` are (path,
    its config)."""
    names, kind = data_classes(data_loader), task_of(data_loader.dataset).kind
    if names is None:
        return
    sources = [class_source(config) for _, config in members]
    for (path, _), source in zip(members, sources):
        if source is not None and source[3] != kind:
            raise UserError(f"-r: checkpoint {str(path)!r} was trained on {source[3]} targets, and the data's task is "
                            f"{kind} (data_loader.args.task)")
    data_source = class_source(data_config)
    known = {data_source: names} if data_source else {}
    paths, trained = [path for path, _ in members], []
    for path, source in zip(paths, sources):
        if source is not None and source not in known:
            known[source] = read_classes(source, path)
        trained.append(known.get(source))
    for k, (path, classes) in enumerate(zip(paths, trained)):
        if classes is None or classes == names:
            continue
        i, ours, theirs = first_difference(classes, names)
        read_from = f"; read from {sources[k][0]}" + (f" and {data_source[0]}" if data_source else "")
        if k and trained[0] == names:
            raise UserError(f"-r: checkpoints {str(paths[0])!r} and {str(path)!r} were trained on different class "
                            f"lists, from class {i} (an ensemble averages probabilities class by class): {theirs} in "
                            f"the first, {ours} in the second{read_from}")
        raise UserError(f"-r: checkpoint {str(path)!r} was trained on another class list than the data, from class "
                        f"{i} (data_loader.args.classes, else the sorted labels of the training CSV): {ours} for the "
                        f"checkpoint, {theirs} for the data{read_from}")


INPUT_SETTINGS = ("image_mode", "eval_transforms", "mean", "std")  # what makes the inputs a model was trained on


def check_same_validation(members, config):
    """--split valid: every model must have validated on the rows predicted (a model scored on rows it trained on,
    another fold's or another split's, would score as if they were unseen)."""
    for path, member in members:
        change = split_change(member, config)
        if change:
            raise UserError(f"--split valid: checkpoint {str(path)!r} validated on other rows than these "
                            f"({change} for the checkpoint and here) and trained on some of these; give one fold's "
                            f"checkpoints with their own split settings (a run group's oof.csv scores every fold)")


def check_same_inputs(members):
    """Refuse an ensemble whose models were trained on inputs made otherwise (another normalisation, image mode or
    evaluation transform): every model is fed the inputs the first one's settings make. `members` are (path,
    its config)."""
    first_path, first = members[0]
    for path, config in members[1:]:
        for key in ("type", *(f"args.{name}" for name in INPUT_SETTINGS)):
            group, _, name = key.partition(".")
            ours = first["data_loader"].get(group, {}).get(name) if name else first["data_loader"][group]
            theirs = config["data_loader"].get(group, {}).get(name) if name else config["data_loader"][group]
            if ours != theirs:
                raise UserError(f"-r: checkpoints {str(first_path)!r} and {str(path)!r} were trained on inputs made "
                                f"otherwise (data_loader.{key}: {json.dumps(ours)} and {json.dumps(theirs)}); an "
                                f"ensemble feeds every model the first one's inputs")


def try_one_batch(members, config, data_loader, tta, use_ema, device):
    """Every TTA transform, every model on every view, then the loss and metrics, on a few samples of the data, so
    that any of them failing is one line before anything is predicted. Returns the number of classes."""
    probe, targets = probe_batch(data_loader, device)
    task = task_of(data_loader.dataset)
    views, n_classes = tta_views(probe, tta), task.width
    for path, model_config in members:  # one model in memory at a time
        model = load_model(path, model_config, use_ema, device)
        probabilities = check_model(model, path, probe, views, task)
        n_classes = probabilities.shape[1]
        del model
    if getattr(data_loader.dataset, "targets", None) is not None:
        check_scoring(config, task, probabilities, targets)
    return n_classes


def predict_ensemble(members, data_loader, tta, use_ema, device):
    """The members' probabilities averaged, and the targets; a model giving NaN or infinite ones is refused."""
    total = targets = None
    for path, model_config in members:  # one model in memory at a time
        model = load_model(path, model_config, use_ema, device)
        probabilities, targets = predict(model, data_loader, device, tta)
        check_finite(probabilities, path, model)
        total = probabilities if total is None else total + probabilities
        del model
    return total / len(members), targets


def probe_batch(data_loader, device):
    """The first few samples of the data (inputs on `device`, targets), for trying every model and TTA view on before
    anything is predicted."""
    try:
        data, target = next(iter(data_loader))
    except StopIteration:
        raise UserError("data: no samples to predict") from None
    except MODEL_ERRORS as e:
        if worker_died(e):
            raise
        raise UserError(f"data_loader: cannot load a batch of the data: {first_line(e)}") from None
    data = [part[:PROBE] for part in data] if isinstance(data, (tuple, list)) else data[:PROBE]
    return inputs_to(device, data, data_loader), as_targets(target)[:PROBE]


def tta_views(probe, tta):
    """Every TTA transform applied to the probe batch's images (the first input, with feature columns), named by its
    place in `inference.tta`; one that fails, or that gives anything but a batch of as many images, is refused in one
    line."""
    views = []
    rest = tuple(probe[1:]) if isinstance(probe, (tuple, list)) else None
    probe = probe[0] if rest is not None else probe
    for i, transform in enumerate(tta):
        where = f"inference.tta[{i}]: {type(transform).__name__}"
        with torch.random.fork_rng(devices=[]):  # random TTA draws as if the probe had not run
            try:
                view = transform(probe)
            except Exception as e:  # torchvision's own code: any failure is a misuse of this transform
                raise UserError(f"{where} fails on a batch of the data (shape {list(probe.shape)}): "
                                f"{first_line(e)}") from None
        if not isinstance(view, torch.Tensor) or view.dim() != probe.dim() or len(view) != len(probe):
            got = list(view.shape) if isinstance(view, torch.Tensor) else f"a {type(view).__name__}"
            raise UserError(f"{where} turns a batch of shape {list(probe.shape)} into {got}; a TTA transform must "
                            f"give a batch of as many images")
        views.append((f"inference.tta[{i}]", view if rest is None else (view, *rest)))
    return views


@torch.no_grad()
def check_model(model, path, probe, views, task):
    """Run the model on the probe batch and on each TTA view of it: each must give finite scores of shape
    [samples, the task's width] (the first one's width when the task does not know it). Returns the probe's
    probabilities, averaged over the views."""
    inputs = tuple(probe) if isinstance(probe, (tuple, list)) else (probe,)
    name, n = type(unwrap(model)).__name__, len(inputs[0])
    probabilities = []
    for where, view in [(None, probe), *views]:
        prefix = f"{where}: checkpoint {str(path)!r}:" if where else f"checkpoint {str(path)!r}:"
        view = tuple(view) if isinstance(view, (tuple, list)) else (view,)
        try:
            output = task.flat(evaluation_step(model, view))
        except MODEL_ERRORS as e:
            shapes = ", ".join(str(list(part.shape)) for part in view)
            raise UserError(f"{prefix} {name} cannot take {'the view it makes' if where else 'a batch of the data'} "
                            f"(shape {shapes}): {first_line(e)}") from None
        try:
            check_width(output, task, n, name)
        except UserError as e:
            raise UserError(f"{prefix} {str(e).removeprefix('arch: ')}") from None
        if task.width is None:
            task = Task.single(range(output.shape[1]))
        probabilities.append(task.probabilities(output).cpu())
        check_finite(probabilities[-1], path, model)
    return torch.stack(probabilities).mean(dim=0)


def check_finite(probabilities, path, model):
    """Refuse NaN or infinite probabilities, naming the checkpoint (and a weight that holds such values)."""
    bad = int((~torch.isfinite(probabilities)).any(dim=1).sum())
    if not bad:
        return
    weight = next((key for key, value in model.state_dict().items()
                   if value.is_floating_point() and not torch.isfinite(value).all()), None)
    cause = f": its weight {weight!r} holds NaN or infinite values" if weight else ""
    raise UserError(f"checkpoint {str(path)!r}: the model gives NaN or infinite scores for {bad} of "
                    f"{len(probabilities)} samples{cause}")


def check_scoring(config, task, probabilities, targets):
    """Score the probe's probabilities with the config's loss and metrics, so that a loss or metric that cannot take
    them is one line before anything is predicted."""
    checked_loss_and_metrics(scoring_loss(config, task), build_metrics(config, task), task.logits(probabilities),
                             targets, "the model's scores")


def write_out_of_fold(trainer, checkpoint, path):
    """Predict a fold's validation rows with its best weights: id, the target column(s) and the probabilities."""
    model = unwrap(trainer.model)
    load_model_weights(model, checkpoint["state_dict"], "the fold's best checkpoint")
    loader = trainer.valid_data_loader
    probabilities, targets = predict(model, loader, trainer.device)
    columns = class_names(loader, probabilities.shape[1])
    targets = targets.reshape(len(targets), -1).numpy()
    table = pd.DataFrame({"id": row_ids(loader), **dict(zip(trainer.task.target_columns, targets.T)),
                          **dict(zip(columns, probabilities.numpy().T))})
    table.to_csv(path, index=False)


def combine_out_of_fold(config, task, paths, group_dir):
    """Join the folds' out-of-fold files into oof.csv (every training row once, as the folds wrote it) and score
    it."""
    table = pd.concat([read_text_csv(p) for p in paths], ignore_index=True)
    if table["id"].duplicated().any():
        raise UserError(f"out-of-fold rows overlap between folds: {table['id'][table['id'].duplicated()].iloc[0]!r}")
    table.to_csv(group_dir / "oof.csv", index=False)
    write_task(task, group_dir)
    n_targets = len(task.target_columns)
    probabilities = torch.tensor(table.iloc[:, 1 + n_targets:].astype(float).to_numpy())
    targets = torch.tensor(table.iloc[:, 1:1 + n_targets].astype(float).to_numpy())
    targets = targets.squeeze(1).to(torch.int64) if task.single_label else targets.to(
        torch.int64 if task.kind == "multiclass" and not task.values else torch.float64)
    metrics = score(config, task, probabilities, targets)
    write_json({"n_samples": len(table), **metrics}, group_dir / "oof_metrics.json")
    return metrics


def read_text_csv(path):
    """A CSV the program wrote, every cell as its text: ids such as `NA`, `null` or `None` stay ids."""
    with open_regular(path) as f:
        return pd.read_csv(f, dtype=str, keep_default_na=False)


def load_model(path, config, use_ema, device):
    """The model of a checkpoint, built from its own (validated) `config`, with its (EMA) weights, on `device`, in
    eval mode. The checkpoint is memory-mapped and let go once its weights are in: the optimizer state is never
    read, and an ensemble holds one checkpoint at a time."""
    model = build(config, "arch")
    checkpoint = load_checkpoint(path, mmap=True)
    load_model_weights(model, checkpoint["ema_state_dict" if use_ema else "state_dict"], path)
    del checkpoint
    return model.to(device).eval()


def write_predictions(out, ids, probabilities, classes, inference, task=None):
    """probabilities.csv (id, one column per output column), task.json (beside it, for tasks other than one label)
    and the submission: `predictions.csv` as id,label (per head, per target column), or in the layout of
    `inference.sample_submission` (its columns and row order; per-class columns get probabilities). All are checked
    before any is written."""
    task = task or Task.single(classes)
    table = pd.DataFrame(probabilities.numpy(), columns=classes)
    table.insert(0, "id", ids)
    sample = read_sample(inference["sample_submission"]) if inference["sample_submission"] else None
    heads = [column for column, _ in task.heads]
    combine = inference["combine_heads"] or sample is not None and len(sample.columns) == 2 and \
        sample.columns[1] not in heads
    if combine:
        refuse_sorted_text(task, "inference.sample_submission")
    if combine and None in task.joint_widths:
        column = task.heads[task.joint_widths.index(None)][0]
        raise UserError(f"inference.sample_submission: its one label column asks for the heads combined, and the "
                        f"column {column!r} holds numbers; give it data_loader.args.bins to cut it into classes")
    submission = pd.DataFrame({"id": ids, **submission_columns(probabilities, classes, task, inference, combine)})
    if sample is not None:
        submission = match_sample_submission(submission, table, sample, inference["sample_submission"])
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "probabilities.csv", index=False)
    write_task(task, out)
    submission.to_csv(out / "predictions.csv", index=False)


def submission_columns(probabilities, classes, task, inference, combine):
    """The submission's columns by name: the label (each head's, or the heads' joint class), the labels chosen
    (joined by the delimiter), or the values."""
    decided = task.decide(probabilities, inference["threshold"])
    if task.kind == "regression":
        return dict(zip(classes, decided.numpy().T))
    if task.kind == "multilabel":
        names = task.columns
        return {task.heads[0][0]: [task.delimiter.join(n for n, on in zip(names, row) if on) for row in
                                   decided.tolist()]}
    if task.single_label or combine:
        indices = decided[:, 0] if task.single_label else task.joint(decided)
        labels = [classes[i] for i in indices.tolist()] if inference["label_format"] == "name" and \
            task.single_label else indices.tolist()
        return {"label": labels}
    return {column: decided[:, h].tolist() if task.is_value(h) else
            [heads[int(i)] for i in decided[:, h].tolist()] if inference["label_format"] == "name" else
            decided[:, h].long().tolist() for h, (column, heads) in enumerate(task.heads)}


def read_sample(sample_path):
    try:
        with open_regular(sample_path) as f:  # a local regular file: no URL, FIFO or device
            sample = pd.read_csv(f, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as e:
        raise UserError(f"inference.sample_submission: cannot read {sample_path!r} ({first_line(e)})") from None
    id_column = sample.columns[0]
    if sample[id_column].duplicated().any():
        raise UserError(f"inference.sample_submission: {sample_path} lists id "
                        f"{sample[id_column][sample[id_column].duplicated()].iloc[0]!r} more than once")
    return sample


def match_sample_submission(submission, table, sample, sample_path):
    """The submission in the sample's row order, under its column names: its label column, or its columns named as
    the submission's own (one per head or target) or as the classes (probabilities)."""
    id_column, value_columns = sample.columns[0], list(sample.columns[1:])
    missing = set(sample[id_column]) - set(submission["id"])
    if missing or len(sample) != len(submission):
        extra = sorted(set(map(str, submission["id"])) - set(sample[id_column]))
        example = f"no prediction for {sorted(missing)[:3]}" if missing else f"{extra[:3]} are not in it"
        raise UserError(f"inference.sample_submission: {sample_path} lists {len(sample)} ids, the predictions "
                        f"{len(submission)}; e.g. {example}")
    own = list(submission.columns[1:])
    if value_columns and set(value_columns) <= set(own):
        result = submission.set_index("id").loc[sample[id_column], value_columns].reset_index()
    elif len(value_columns) > 1 and set(value_columns) <= set(table.columns[1:]):
        result = table.set_index("id").loc[sample[id_column], value_columns].reset_index()
    elif len(value_columns) == 1 and len(own) == 1:
        result = submission.set_index("id").loc[sample[id_column]].reset_index()
    else:
        raise UserError(f"inference.sample_submission: {sample_path}: expected an id column and {' '.join(own)} "
                        f"{'column' if len(own) == 1 else 'columns'}, one label column, or one column per class; "
                        f"got {listed(list(map(repr, sample.columns)))}")
    result.columns = [id_column, *value_columns]
    return result


def blend(paths, weights):
    """Weighted mean of saved probabilities.csv files (same task, ids and columns): ids, probabilities, column names
    and the task (from the task.json beside the first file)."""
    weights = weights or [1.0] * len(paths)
    if len(weights) != len(paths):
        raise UserError(f"--weights: {len(weights)} weights for {len(paths)} probability files")
    if not all(math.isfinite(w) and w >= 0 for w in weights) or not max(weights) > 0:
        raise UserError(f"--weights: expected finite numbers >= 0 with a positive sum, got "
                        f"{' '.join(map(str, weights))}")
    top = max(weights)
    weights = [w / top for w in weights]  # 1e308 and 1e308 sum to no finite number
    tasks = [read_task(Path(path).parent) for path in paths]
    for path, task in zip(paths[1:], tasks[1:]):
        if task != tasks[0]:
            beside = "another task.json beside each" if task and tasks[0] else "a task.json beside only one of them"
            raise UserError(f"--blend: {path} and {paths[0]} were written for different tasks ({beside})")
    tables = [read_probabilities(path, tasks[0]) for path in paths]
    first = tables[0]
    for path, table in zip(paths[1:], tables[1:]):
        if list(table.columns) != list(first.columns):
            i, ours, theirs = first_difference(list(table.columns), list(first.columns))
            raise UserError(f"--blend: {path} and {paths[0]} have other class columns (column {i + 2}: {ours} in "
                            f"the first, {theirs} in the second)")
        other = sorted(set(table.index) ^ set(first.index))
        if other:
            raise UserError(f"--blend: {path} and {paths[0]} list other ids: {other[0]!r} is in one only")
    total = sum(w * t.loc[first.index].to_numpy() for w, t in zip(weights, tables)) / sum(weights)
    columns = list(first.columns)
    task = tasks[0] or Task.single(columns)
    dtype = torch.float32 if task.kind != "regression" and not task.values else torch.float64  # values keep digits
    return list(first.index), torch.tensor(total, dtype=dtype), columns, task


def read_probabilities(path, task=None):
    """A probabilities.csv as numbers indexed by id. Anything else (a predictions.csv, scores or logits, a damaged
    file) is refused in one line naming the file: every value must lie in [0, 1] and every row sum to 1 (each head's
    part of it, with several label columns; not at all for labels chosen one by one); values of a regression need
    only be finite."""
    try:
        with open_regular(path) as f:
            raw = pd.read_csv(f, header=None, dtype=str, keep_default_na=False).fillna("")
    except (OSError, ValueError) as e:
        raise UserError(f"--blend: cannot read {str(path)!r} as a probabilities.csv ({first_line(e)})") from None
    header, body = list(raw.iloc[0]) if len(raw) else [], raw.iloc[1:]
    repeated = sorted(name for name, count in Counter(header).items() if count > 1)
    if repeated:
        raise UserError(f"--blend: {path} names column {repeated[0]!r} more than once")
    least = 2 if task is not None and task.kind != "multiclass" else 3
    if "id" not in header or len(header) < least or body.empty:
        raise UserError(f"--blend: {path} has columns {listed(header) or 'none'} and {len(body)} rows; expected an "
                        f"id column and one probability column per class (a probabilities.csv, not a predictions.csv)")
    table = body.set_axis(header, axis=1).set_index("id")
    if "" in table.index or table.index.duplicated().any():
        issue = "a row without an id" if "" in table.index else f"id {table.index[table.index.duplicated()][0]!r} twice"
        raise UserError(f"--blend: {path} lists {issue}")
    if task is not None and list(table.columns) != task.columns:
        raise UserError(f"--blend: {path} has columns {', '.join(table.columns)[:200]}; the task.json beside it "
                        f"names {', '.join(task.columns)[:200]}")
    numbers = table.apply(pd.to_numeric, errors="coerce").astype(float)
    values = numbers.to_numpy()
    regression = np.array([task is not None and (task.kind == "regression" or column in task.values)
                           for column in table.columns])
    bad = ~np.isfinite(values) | (~regression & ((values < 0) | (values > 1 + SUM_TOLERANCE)))
    if bad.any():
        row, column = np.argwhere(bad)[0]
        expected = "a finite number" if regression[column] else "probabilities in [0, 1]"
        raise UserError(f"--blend: {path}: id {table.index[row]!r} has {table.iat[row, column]!r} in column "
                        f"{table.columns[column]!r}; expected {expected}")
    if task is not None and task.kind != "multiclass":
        return numbers
    for h, s in enumerate(task.segments if task is not None else [slice(None)]):
        if task is not None and task.is_value(h):
            continue
        sums = values[:, s].sum(axis=1)
        off = np.flatnonzero(np.abs(sums - 1) > SUM_TOLERANCE)
        if len(off):
            raise UserError(f"--blend: {path}: the probabilities of id {table.index[off[0]]!r} sum to "
                            f"{sums[off[0]]:.6g}, not 1")
    return numbers
