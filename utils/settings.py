"""The config's plain settings, declared once: type, default, bounds and a one-line doc each.

Validation (utils/config.py), the defaults written into a run's config.json and the reference table in
docs/configuration.md all come from these classes; `python -m utils.settings` prints the table.
"""
import copy
import dataclasses
import json
import math
import typing
from typing import Literal, Union

from utils.util import UserError, did_you_mean

REQUIRED = dataclasses.MISSING


def setting(default, doc, minimum=None, below=None):
    """A field with its documentation and bounds: `minimum` included, `below` excluded."""
    metadata = {"doc": doc, "minimum": minimum, "below": below}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunSettings:
    """The top level of a config."""

    name: str = setting("run", "experiment name: runs go to `<save_dir>/<name>/<run id>/`")
    n_gpu: int = setting(1, "`0`: train on the CPU; `1` or more: use CUDA when a GPU is present, else the CPU (with a "
                            "note); for several GPUs start one process per GPU with `torchrun`", minimum=0)
    seed: int = setting(0, "seeds Python, NumPy and torch; the validation split, each epoch's order and each "
                           "sample's augmentation derive from it", minimum=0, below=2**63)
    deterministic: bool = setting(False, "also ask torch for deterministic kernels (slower)")
    import_roots: list = setting([], "extra top-level packages a dotted `type` may come from, e.g. `[\"timm\"]`")
    arch: dict = setting(REQUIRED, "the model: `{\"type\", \"args\"}`")
    data_loader: dict = setting(REQUIRED, "the data: `{\"type\", \"args\"}`")
    optimizer: dict = setting(REQUIRED, "`{\"type\", \"args\", \"param_groups\"}`; the model's trainable "
                                        "parameters are passed first (in groups by name prefix with `param_groups`, "
                                        "below)")
    loss: Union[str, dict] = setting("", "a name (`\"cross_entropy\"`) or `{\"type\", \"args\"}`; `\"\"`: the "
                                         "task's own (`cross_entropy`, `binary_cross_entropy_with_logits`, "
                                         "`mse_loss`); with several label columns it is applied to each head")
    head_weights: list = setting([], "several label columns: the weight of each head's loss in their sum, in column "
                                     "order; `[]`: 1 each")
    metrics: list = setting([], "names (`\"accuracy\"`) or `{\"type\", \"args\", \"name\"}` objects; `name` is what "
                                "it is logged as (default: its `type`)")
    lr_scheduler: dict = setting({}, "`{\"type\", \"args\", \"step_every\"}`, or `{}` for none; the optimizer is "
                                     "passed first")
    trainer: dict = setting(REQUIRED, "the trainer settings below")
    inference: dict = setting({}, "`test.py` settings, below")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainerSettings:
    """The `trainer` section: how training runs, what it writes, what it watches."""

    epochs: int = setting(REQUIRED, "number of epochs", minimum=1)
    save_dir: str = setting("saved/", "where run folders are made")
    save_period: int = setting(0, "also keep `checkpoint-epochN.pth` every N epochs; 0: never", minimum=0)
    verbosity: int = setting(2, "console detail: 0 warnings, 1 info, 2 debug (also prints the model); "
                                "`train.log` always gets everything", minimum=0)
    monitor: str = setting("off", "`\"min <metric>\"` or `\"max <metric>\"`, e.g. `\"max val_accuracy\"`, or "
                                  "`\"off\"`; drives `model_best.pth`, `early_stop` and `save_top_k`")
    early_stop: int = setting(0, "stop after N epochs without improvement of the monitored metric (N "
                                   "validations with `val_every_n_epochs`); 0: never", minimum=0)
    tensorboard: bool = setting(True, "write TensorBoard events to `<run folder>/tensorboard/` (when `trackers` "
                                      "names `\"tensorboard\"`)")
    trackers: list = setting(["tensorboard"], "where the run also reports: any of `\"tensorboard\"`, `\"mlflow\"`, "
                                              "`\"wandb\"`, `\"csv\"` (see docs/experiments.md; mlflow and wandb "
                                              "need requirements-experiments.txt)")
    mlflow_uri: str = setting("", "the MLflow tracking server or store for the `\"mlflow\"` tracker; `\"\"`: "
                                  "`MLFLOW_TRACKING_URI`, else `<save_dir>/mlflow.db`")
    log_step: int = setting(50, "every N batches: update the progress bar, log `train/step_loss`, check that the loss "
                                "is finite", minimum=1)
    save_top_k: int = setting(0, "keep `top-epochN.pth` for the N best epochs by the monitored metric "
                                 "(needs `monitor`); 0: off", minimum=0)
    amp: Literal["off", "bf16", "fp16"] = setting("off", "mixed precision: `\"bf16\"` (CPU or CUDA) or `\"fp16\"` "
                                                         "(CUDA only, with a gradient scaler; elsewhere it warns and "
                                                         "trains in float32)")
    accumulation_steps: int = setting(1, "batches whose gradients are accumulated into one optimizer step", minimum=1)
    clip_grad_norm: float = setting(0.0, "clip the gradients' total norm to this value (and log `train/grad_norm`); 0: "
                                         "off", minimum=0)
    channels_last: bool = setting(False, "keep the model and 4-D inputs in channels-last memory format")
    compile: bool = setting(False, "wrap the model in `torch.compile`")
    ema_decay: float = setting(0.0, "keep an exponential moving average of the weights with this decay (e.g. 0.999), "
                                    "validated as `val_ema_*` and saved in checkpoints; 0: off", minimum=0, below=1)
    limit_train_batches: int = setting(0, "train on at most N batches per epoch; 0: all", minimum=0)
    val_every_n_epochs: int = setting(1, "validate every N epochs (and always after the last); `early_stop` counts "
                                         "validations, and epochs without one leave the `val_` cells of "
                                         "`history.csv` empty", minimum=1)
    limit_val_batches: int = setting(0, "validate on at most N batches; 0: all", minimum=0)
    overfit_batches: int = setting(0, "train and validate on the same first N batches, unshuffled: a check that the "
                                      "model can learn at all; 0: off", minimum=0)
    save_every_n_steps: int = setting(0, "also write `checkpoint-last.pth` every N optimizer steps inside an epoch, so "
                                         "a crash loses at most N steps; 0: only at epoch ends", minimum=0)
    nonfinite_loss: Literal["stop", "skip"] = setting("stop", "`\"stop\"`: end the run (exit code 1) when a loss "
                                                              "becomes NaN or infinite, keeping the last checkpoint; "
                                                              "`\"skip\"`: leave such batches out of the metrics and "
                                                              "skip updates whose gradients are not finite (one host "
                                                              "sync per step)")
    freeze_backbone_epochs: int = setting(0, "train only the new head for the first N epochs (models with "
                                             "`set_backbone_trainable`, e.g. `TorchvisionClassifier`; not under "
                                             "`torchrun`); 0: off", minimum=0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class InferenceSettings:
    """The `inference` section, read by test.py."""

    tta: list = setting([], "test-time augmentation: `{\"type\", \"args\"}` from `torchvision.transforms.v2`, each "
                            "applied to whole (already normalised) batches; the plain view and every augmented view "
                            "are averaged as probabilities")
    sample_submission: str = setting("", "a competition's sample submission CSV: `predictions.csv` then takes its "
                                         "column names and row order (one label column, or one probability column "
                                         "per class)")
    label_format: Literal["name", "index"] = setting("name", "labels in `predictions.csv` as written in `train.csv` "
                                                             "(`\"name\"`) or as class indices (`\"index\"`)")
    combine_heads: bool = setting(False, "several label columns: write one `label` column, the heads' classes "
                                         "combined (first column most significant), instead of one column per head; "
                                         "a sample submission with one label column does so too")
    threshold: Union[float, list, str] = setting(0.5, "multilabel: the probability from which a label is predicted: "
                                                      "a number, a list (one per label), or `\"oof\"` (each label's "
                                                      "best F1 on the run group's `oof.csv`)")


def check_settings(declaration, values, prefix=""):
    """`values` (a JSON object) checked against a declaration; returns them with the defaults filled in."""
    if not isinstance(values, dict):
        raise UserError(f"{prefix.rstrip('.') or 'config'}: expected a JSON object")
    fields = {f.name: f for f in dataclasses.fields(declaration)}
    for key in values:
        if key not in fields:
            hint = did_you_mean(key, fields) or "; known keys: " + ", ".join(fields)
            raise UserError(f"{prefix}{key}: unknown key{hint}")
    checked = {}
    for name, f in fields.items():
        if name not in values:
            if f.default is REQUIRED and f.default_factory is REQUIRED:
                raise UserError(f"{prefix}{name}: missing required key")
            checked[name] = f.default if f.default is not REQUIRED else f.default_factory()
            continue
        problem = value_problem(values[name], f.type, f.metadata)
        if problem:
            raise UserError(f"{prefix}{name}: expected {problem}, got {_json(values[name])}")
        checked[name] = values[name]
    return checked


def value_problem(value, kind, bounds=None):
    """What `value` (parsed JSON) should have been to be of `kind` within `bounds`, or None when it is."""
    bounds = bounds or {}
    if typing.get_origin(kind) is Literal:
        choices = typing.get_args(kind)
        return None if value in choices and type(value) is type(choices[0]) else \
            "one of " + ", ".join(_json(c) for c in choices)
    if typing.get_origin(kind) is Union:
        kinds = typing.get_args(kind)
        problems = [value_problem(value, k) for k in kinds]
        return None if None in problems else " or ".join(problems)
    if not is_json_kind(value, kind):
        return JSON_NAMES[kind]
    if kind is float and not math.isfinite(value):
        return "a finite number"
    low, below = bounds.get("minimum"), bounds.get("below")
    if low is not None and value < low or below is not None and value >= below:
        where = [f">= {low}" if low is not None else "", f"< {below}" if below is not None else ""]
        return f"{JSON_NAMES[kind]} {' and '.join(w for w in where if w)}"
    return None


JSON_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "an object",
              list: "a list"}


def is_json_kind(value, kind):
    """JSON's view of types: true is no number, and 3 is a number (a float setting accepts an integer)."""
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


def _json(value):
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


DECLARATIONS = {"run-settings": RunSettings, "trainer-settings": TrainerSettings,
                "inference-settings": InferenceSettings}


def reference_table(declaration):
    """The declaration as a Markdown table: key, type, default, meaning."""
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for f in dataclasses.fields(declaration):
        default = "required" if f.default is REQUIRED and f.default_factory is REQUIRED else \
            f"`{_json(f.default if f.default is not REQUIRED else f.default_factory())}`"
        rows.append(f"| `{f.name}` | {_type_name(f.type, f.metadata)} | {default} | {f.metadata['doc']} |")
    return "\n".join(rows) + "\n"


def with_reference_tables(text):
    """`text` (docs/configuration.md) with the table between each `<!-- NAME:start -->` and `<!-- NAME:end -->`
    pair written from the declaration of that NAME."""
    for name, declaration in DECLARATIONS.items():
        start, end = f"<!-- {name}:start -->\n", f"<!-- {name}:end -->"
        head, found, rest = text.partition(start)
        if not found or end not in rest:
            raise ValueError(f"no {start.strip()} ... {end} block")
        text = head + start + reference_table(declaration) + end + rest.partition(end)[2]
    return text


def _type_name(kind, bounds):
    if typing.get_origin(kind) is Literal:
        return " / ".join(f'`"{c}"`' for c in typing.get_args(kind))
    if typing.get_origin(kind) is Union:
        return " or ".join(_type_name(k, {}) for k in typing.get_args(kind))
    name = {int: "integer", float: "number", str: "string", bool: "boolean", dict: "object", list: "list"}[kind]
    low, below = bounds.get("minimum"), bounds.get("below")
    limits = [f"≥ {low}" if low is not None else "", f"< {below}" if below is not None and below < 2**32 else ""]
    return " ".join([name, *(x for x in limits if x)])


if __name__ == "__main__":  # python -m utils.settings docs/configuration.md: rewrite the tables in place
    import sys
    from pathlib import Path

    target = Path(sys.argv[1])
    target.write_text(with_reference_tables(target.read_text()))
