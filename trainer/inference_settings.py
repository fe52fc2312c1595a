"""The `inference` section settled for a task: settings the task would ignore refused, class indices only for classes
in a given order, and the multilabel threshold resolved (a number, one per label, or each label's best F1 on a run
group's oof.csv). train.py checks them before training, test.py applies them; no pandas is imported here."""
from pathlib import Path

import numpy as np

from utils.util import UserError


def refuse_sorted_text(task, setting):
    """Class indices written out (a combined label, label_format "index") follow the order the config gives a
    column's text classes, never one the program made up by sorting them."""
    if task.sorted_text:
        column = task.sorted_text[0]
        classes = dict(task.heads)[column]
        raise UserError(f"{setting}: writes class indices, and the text classes of column {column!r} "
                        f"({', '.join(map(str, classes[:5]))}{', ...' if len(classes) > 5 else ''}) have no order "
                        f"given; list them in data_loader.args.classes in the competition's order")


THRESHOLDS = np.linspace(0.05, 0.95, 19)  # tried for each label when the threshold comes from oof.csv


def settle_inference(inference, task, paths=()):
    """The `inference` settings for `task`, refusing those it would ignore, with the multilabel decision threshold
    resolved: a number, one per label, or each label's best F1 on the out-of-fold predictions of the checkpoints'
    run group."""
    several = task.kind == "multiclass" and len(task.heads) > 1
    if inference["combine_heads"] and not several:
        raise UserError(f"inference.combine_heads: combines the heads of several label columns; this data's task is "
                        f"{task.kind} with {len(task.heads)} column(s)")
    unbinned = [c for c, w in zip(task.values, task.joint_widths) if w is None] if several else []
    if inference["combine_heads"] and unbinned:
        raise UserError(f"inference.combine_heads: the column {unbinned[0]!r} holds numbers; give it "
                        f"data_loader.args.bins to cut it into classes of the combined label")
    if inference["combine_heads"] or inference["label_format"] == "index":
        refuse_sorted_text(task, "inference.combine_heads" if inference["combine_heads"] else "inference.label_format")
    if inference["label_format"] != "name" and task.kind != "multiclass":
        raise UserError(f"inference.label_format: chooses class names or indices of a multiclass task; this one is "
                        f"{task.kind}")
    setting = inference["threshold"]
    if task.kind != "multilabel":
        if setting != 0.5:
            raise UserError(f"inference.threshold: decides the labels of a multilabel task; this data's task is "
                            f"{task.kind}: leave it out")
        return inference
    labels = task.columns
    if setting == "oof":
        groups = {Path(p).parent.parent for p in paths}
        found = [g / "oof.csv" for g in groups if (g / "oof.csv").is_file()]
        if len(groups) != 1 or not found:
            raise UserError("inference.threshold: \"oof\" takes the thresholds from the oof.csv of one run group "
                            "(train with --folds all and give its checkpoints with -r)"
                            + ("" if found else "; none was found beside them"))
        from trainer.inference import read_text_csv  # pandas, needed only here

        return {**inference, "threshold": best_f1_thresholds(read_text_csv(found[0]), task)}
    if isinstance(setting, list) and len(setting) != len(labels):
        raise UserError(f"inference.threshold: {len(setting)} thresholds for the {len(labels)} labels "
                        f"({', '.join(labels)[:200]}); give one, or one per label")
    return inference


def best_f1_thresholds(table, task):
    """Per label, the threshold of THRESHOLDS with the best F1 on an oof.csv table (the first of equals)."""
    targets = table[task.target_columns].astype(float).to_numpy() > 0.5
    scores = table[task.columns].astype(float).to_numpy()
    chosen = []
    for label in range(targets.shape[1]):
        predicted = scores[:, label, None] >= THRESHOLDS
        hits = (predicted & targets[:, label, None]).sum(axis=0)
        f1 = 2 * hits / np.maximum(predicted.sum(axis=0) + targets[:, label].sum(), 1)
        chosen.append(float(THRESHOLDS[int(np.argmax(f1))]))
    return chosen
