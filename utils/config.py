"""The run configuration: read JSON, apply command-line overrides, validate everything, build objects by name.

Each `{"type": ..., "args": {...}}` object names a class or function. It is looked up in the project's own module
for that section first, then in the matching PyTorch namespace, or given as a dotted path under an allowed root,
and it must be of the section's kind (an optimizer section builds an optimizer and nothing else). Its `args` are
checked against the signature, and their types against the annotations or defaults, before anything is built.
"""
import contextlib
import copy
import functools
import importlib
import inspect
import json
import math
import re
import sys
import traceback
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from utils import schedule
from utils.settings import InferenceSettings, RunSettings, TrainerSettings, check_settings, value_problem
from utils.task import DEFAULT_LOSS, HeadsLoss, Task, WholeLoss, head_kind, head_name, task_metrics
from utils.util import UserError, did_you_mean, first_line, listed, no_new_folders_on_failure, read_json

PROJECT_ROOTS = ("base", "data_loader", "model", "trainer", "logger", "utils")
LIBRARY_ROOTS = ("torch", "torchvision")


@dataclass(frozen=True)
class Section:
    """Where a section's `type` is looked up, what it must be, and which arguments the program supplies."""

    modules: tuple  # searched in order for an undotted name
    kind: str  # what the resolved object must be: a key of KINDS
    positional: int = 0  # leading positional arguments the program passes (the optimizer's parameters, ...)
    program_args: tuple = ()  # keyword arguments the program sets; a config may not


SECTIONS = {
    "arch": Section(("model.model", "torchvision.models"), "model"),
    "data_loader": Section(("data_loader.data_loaders",), "data_loader", program_args=("training", "seed")),
    "optimizer": Section(("model.optim", "torch.optim"), "optimizer", positional=1),
    "lr_scheduler": Section(("torch.optim.lr_scheduler",), "lr_scheduler", positional=1),
    "loss": Section(("model.loss", "torch.nn", "torch.nn.functional"), "loss"),
    "metrics": Section(("model.metric",), "metric"),
    "transforms": Section(("torchvision.transforms.v2",), "transform"),
}


def load_config(path, overrides=()):
    """Read a config file, apply `key.path=value` overrides and return the validated config."""
    config = read_json(path)
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a JSON object at the top level")
    return validate(apply_overrides(config, overrides))


def apply_overrides(config, overrides):
    """Set `key.path=value` pairs on a copy of `config`; the value is parsed as JSON, else taken as a string."""
    config = copy.deepcopy(config)
    for item in overrides:
        path, sep, raw = item.partition("=")
        keys = path.split(".")
        if not sep or not all(keys):
            raise UserError(f"override {item!r}: expected key.path=value, e.g. trainer.epochs=5")
        try:
            value = json.loads(raw, parse_constant=lambda name: name)
        except json.JSONDecodeError:
            value = raw
        node = config
        for depth, key in enumerate(keys[:-1]):
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise UserError(f"override {item!r}: {'.'.join(keys[:depth + 1])} is {json.dumps(child)}, "
                                f"not an object")
            node = child
        node[keys[-1]] = value
    return config


def overridden_keys(overrides):
    """The dotted keys that `-o` overrides set, down to their leaves (`-o inference={...}` sets each key inside)."""
    def leaves(node, prefix):
        if not isinstance(node, dict) or not node:
            return [prefix]
        return [key for name, child in node.items() for key in leaves(child, f"{prefix}.{name}" if prefix else name)]
    return leaves(apply_overrides({}, overrides), "") if overrides else []


def validate(config):
    """Check every key, type, argument and the monitor; return a copy with defaults filled in."""
    config = check_settings(RunSettings, config)
    config["trainer"] = check_settings(TrainerSettings, config["trainer"], "trainer.")
    config["inference"] = validate_inference(config["inference"])
    name = config["name"]
    if not name or name in (".", "..") or len(name) > 100 or any(c in name for c in "/\\") or not name.isprintable():
        raise UserError(f"name: expected a folder name of at most 100 printable characters (no slashes, not \".\" "
                        f"or \"..\"), got {json.dumps(name)}")
    if not config["trainer"]["save_dir"].strip():
        raise UserError("trainer.save_dir: expected a folder, got an empty string (use \".\" for this folder)")
    roots = config["import_roots"]
    for root in roots:
        if not isinstance(root, str) or not root.isidentifier():
            raise UserError(f"import_roots: expected a list of package names, e.g. [\"timm\"], got {root!r}")
        if root in sys.stdlib_module_names or root in PROJECT_ROOTS + LIBRARY_ROOTS:
            raise UserError(f"import_roots: {root!r} is not a package of models or layers to add")

    for section in ("arch", "data_loader"):
        config[section] = check_spec(config[section], section, roots)
    config["optimizer"] = check_spec(config["optimizer"], "optimizer", roots, ("param_groups",))
    check_param_groups(config["optimizer"], roots)
    config["loss"] = config["loss"] if isinstance(config["loss"], str) else check_spec(config["loss"], "loss", roots)
    if config["loss"] and isinstance(config["loss"], str):
        resolve("loss", config["loss"], roots)
    if config["lr_scheduler"]:
        spec = config["lr_scheduler"] = check_spec(config["lr_scheduler"], "lr_scheduler", roots, ("step_every",))
        step_every = spec.setdefault("step_every", schedule.default_step_every(resolve("lr_scheduler", spec["type"],
                                                                                       roots)))
        if step_every not in ("epoch", "batch"):
            raise UserError(f"lr_scheduler.step_every: expected \"epoch\" or \"batch\", got {json.dumps(step_every)}")
    names = []
    for i, entry in enumerate(config["metrics"]):
        if isinstance(entry, str):
            resolve("metrics", entry, roots, where=f"metrics[{i}]")
        else:
            config["metrics"][i] = check_spec(entry, "metrics", roots, ("name",), where=f"metrics[{i}]")
        name = metric_name(entry)
        if not isinstance(name, str) or not METRIC_NAME.fullmatch(name) or name in RESERVED_NAMES or \
                name.startswith(RESERVED_PREFIXES):
            raise UserError(f"metrics[{i}].name: expected letters, digits, \"_\", \".\" or \"-\", not "
                            f"{', '.join(RESERVED_NAMES)} and not starting with {' or '.join(RESERVED_PREFIXES)} "
                            f"(names the log uses itself), got {json.dumps(name)}")
        names.append(name)
    if len(set(names)) != len(names):
        raise UserError(f"metrics: two metrics share a name ({', '.join(names)}); give one a \"name\"")
    check_monitor(config)
    return config


RESERVED_NAMES = ("loss", "lr", "epoch", "step_loss", "grad_norm")  # what the epoch log and history.csv hold besides
RESERVED_PREFIXES = ("val_", "ema_")
METRIC_NAME = re.compile(r"[\w.-]{1,100}")


def validate_inference(section):
    """The `inference` section with defaults filled in (test.py --blend needs it without a whole config)."""
    section = check_settings(InferenceSettings, section, "inference.")
    threshold = section["threshold"]
    values = threshold if isinstance(threshold, list) else [threshold]
    if threshold != "oof" and (isinstance(threshold, str) or not values or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1 for v in values)):
        raise UserError(f"inference.threshold: expected a number between 0 and 1 (excluded), a list of them (one per "
                        f"label), or \"oof\"; got {json.dumps(threshold)}")
    for i, spec in enumerate(section["tta"]):
        check_spec(spec, "transforms", (), where=f"inference.tta[{i}]")
    return section


def metric_name(entry):
    """The name a metric is logged under: the config string itself, or the section's `name`, else its type."""
    return entry if isinstance(entry, str) else entry.get("name", entry["type"])


def produced_metrics(config, task=None):
    """Every name an epoch's log can hold, given the metrics (per head and for the joint class too, with several
    label columns, once the data's `task` is known) and whether the data loader splits off validation."""
    names = [metric_name(m) for m in config["metrics"]]
    if task is not None and task.kind == "multiclass" and len(task.heads) > 1:
        kinds = [metric_kinds(m, config["import_roots"]) for m in config["metrics"]]
        heads = [f"{name}_{head_name(column)}" for name, fits in zip(names, kinds)
                 for h, (column, _) in enumerate(task.heads) if head_kind(task, h) in fits]
        names = ([n for n, fits in zip(names, kinds) if "multiclass" in fits] if task.scores_joint else []) + heads
    names = ["loss"] + names
    mixed = bool(config["data_loader"]["args"].get("batch_transforms"))  # training batches then log their loss only
    training = names[:1] if mixed else names
    if not (_has_validation(config) or config["trainer"]["overfit_batches"]):
        return training
    ema = ["val_ema_" + n for n in names] if config["trainer"]["ema_decay"] else []
    return training + ["val_" + n for n in names] + ema


def metric_kinds(entry, roots):
    """The task kinds a config's metric entry scores."""
    target = resolve("metrics", entry if isinstance(entry, str) else entry["type"], roots)
    return getattr(target, "tasks", ("multiclass",))


def check_monitor(config, task=None):
    """The monitor names a metric training produces. Before the data is built (`task` None), a name that may be a
    per-head one (`<metric>_<column>`) is left for the check once it is."""
    monitor = config["trainer"]["monitor"]
    if monitor == "off":
        if config["trainer"]["save_top_k"]:
            raise UserError("trainer.save_top_k: keeping the best checkpoints needs a trainer.monitor metric")
        return
    mode, _, metric = monitor.partition(" ")
    if mode not in ("min", "max") or not metric:
        raise UserError(f"trainer.monitor: expected \"off\", \"min <metric>\" or \"max <metric>\", "
                        f"got {json.dumps(monitor)}")
    produced = produced_metrics(config, task)
    if task is None and any(metric.startswith(name + "_") for name in produced):
        return
    if metric not in produced:
        hint = did_you_mean(metric, produced) or f"; training produces {listed(produced)}"
        raise UserError(f"trainer.monitor: {metric!r} is never produced by training{hint}")
    spec = config["lr_scheduler"]
    if spec and schedule.watches_a_metric(resolve("lr_scheduler", spec["type"], config["import_roots"])) and \
            spec["args"].get("mode", "min") != mode:
        raise UserError(f"lr_scheduler.args.mode: {spec['type']} is fed {metric!r}, which the monitor wants to "
                        f"{mode}imise; set \"mode\": \"{mode}\"")


SPLIT_SETTINGS = ("validation_split", "n_folds", "fold", "group_column", "stratify")


def split_of(config):
    """What decides the rows a run validates on: the seed and the data loader's split arguments (their defaults where
    the config leaves them out)."""
    loader = config["data_loader"]
    params = _parameters(resolve("data_loader", loader["type"], config["import_roots"]))
    defaults = {k: p.default for k, p in params.items() if p.default is not p.empty}
    return {"seed": config["seed"], **{f"data_loader.args.{k}": loader["args"].get(k, defaults.get(k))
                                       for k in SPLIT_SETTINGS}}


def split_change(then, now):
    """The first split setting that differs between two configs, as `key: old and new`, or None."""
    ours, theirs = split_of(then), split_of(now)
    changed = [key for key in ours if ours[key] != theirs[key]]
    return f"{changed[0]}: {json.dumps(ours[changed[0]])} and {json.dumps(theirs[changed[0]])}" if changed else None


def _has_validation(config):
    loader = config["data_loader"]
    if "validation_split" in loader["args"]:
        return bool(loader["args"]["validation_split"])
    param = _parameters(resolve("data_loader", loader["type"], config["import_roots"])).get("validation_split")
    return param is None or param.default is param.empty or bool(param.default)


def check_spec(spec, section, roots, extra_keys=(), where=None):
    """A `{type, args}` object checked against the section and the signature it names; returns it with `args`."""
    where = where or section
    if not isinstance(spec, dict):
        raise UserError(f"{where}: expected an object with \"type\" and \"args\", got {json.dumps(spec)}")
    for key in spec:
        if key not in ("type", "args", *extra_keys):
            raise UserError(f"{where}.{key}: unknown key{did_you_mean(key, ('type', 'args', *extra_keys))}")
    if not isinstance(spec.get("type"), str):
        raise UserError(f"{where}.type: missing; expected the name of a class or function")
    spec = {"args": {}, **spec}
    if not isinstance(spec["args"], dict):
        raise UserError(f"{where}.args: expected an object, got {json.dumps(spec['args'])}")
    target = resolve(section, spec["type"], roots, where)
    _check_args(target, spec["args"], SECTIONS[section], where, spec["type"])
    return spec


def check_param_groups(spec, roots):
    """optimizer.param_groups: objects of a parameter name prefix (`params`) and optimizer arguments for it."""
    groups = spec.get("param_groups", [])
    form = "{\"params\": \"<parameter name prefix>\", \"lr\": ...}"
    if not isinstance(groups, list):
        raise UserError(f"optimizer.param_groups: expected a list of {form}, got {json.dumps(groups)}")
    target = resolve("optimizer", spec["type"], roots)
    for i, group in enumerate(groups):
        where = f"optimizer.param_groups[{i}]"
        if not isinstance(group, dict) or not isinstance(group.get("params"), str) or not group["params"]:
            raise UserError(f"{where}: expected {form}, got {json.dumps(group)}")
        args = {k: v for k, v in group.items() if k != "params"}
        _check_args(target, {**spec["args"], **args}, SECTIONS["optimizer"], where, spec["type"])


def optimizer_params(spec, model):
    """The model's trainable parameters as the optimizer takes them: with `param_groups`, a parameter joins the first
    group whose prefix its name starts with (the group is named after the prefix), the rest form a group with
    `args`."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not spec.get("param_groups"):
        return [p for _, p in named]
    groups = [{**group, "params": [], "name": group["params"].rstrip(".") or group["params"]}
              for group in spec["param_groups"]]
    rest = []
    for name, param in named:
        prefix = next((g for g, entry in zip(groups, spec["param_groups"]) if name.startswith(entry["params"])), None)
        (prefix["params"] if prefix else rest).append(param)
    for i, group in enumerate(groups):
        if not group["params"]:
            starts = sorted({n.split(".")[0] + "." for n, _ in named})
            raise UserError(f"optimizer.param_groups[{i}].params: no trainable parameter of {type(model).__name__} "
                            f"has a name starting with {spec['param_groups'][i]['params']!r} (they start with "
                            f"{', '.join(starts)})")
    return groups + ([{"params": rest, "name": "rest"}] if rest else [])


def _parameters(target):
    try:
        return dict(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        return {}


def _check_args(target, args, section, where, type_name):
    params = list(_parameters(target).values())
    supplied = section.positional + (2 if section.kind == "loss" and not inspect.isclass(target) else 0)
    by_program = {p.name for p in params[:supplied]} | set(section.program_args)
    params = params[supplied:]
    named = {p.name: p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    open_ended = any(p.kind is p.VAR_KEYWORD for p in params)
    for key, value in args.items():
        if key in by_program:
            raise UserError(f"{where}.args.{key}: set by the program; remove it from the config")
        if key not in named and not open_ended:
            hint = did_you_mean(key, named) or "; it accepts: " + (", ".join(sorted(named)) or "no arguments")
            raise UserError(f"{where}.args.{key}: not an argument of {type_name}{hint}")
        problem = _argument_problem(named[key], value, target) if key in named else None
        if problem:
            raise UserError(f"{where}.args.{key}: expected {problem}, got {json.dumps(value)}")
    if inspect.isclass(target) and params:
        missing = [n for n, p in named.items() if p.default is p.empty and n not in args and n not in by_program]
        if missing:
            raise UserError(f"{where}.args: {type_name} needs {', '.join(repr(m) for m in missing)}")


PLAIN = (bool, int, float, str)
ANY = "any"  # an annotation that admits values other than JSON's plain ones: not checked here
RANGES = {"label_smoothing": (0.0, 1.0)}  # arguments some torch classes take without checking them


def _argument_problem(param, value, target):
    """What a JSON value given for `param` should have been, judged by its annotation, else by its default; None
    when it fits or when the annotation allows more than JSON's plain values (lists, anything)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "a finite number"
    low, high = RANGES.get(param.name, (-math.inf, math.inf))
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not low <= value <= high:
        return f"a number from {low} to {high}"
    kinds = _annotated_kinds(param, target)
    if kinds is None and type(param.default) in PLAIN:
        kinds = {type(param.default)}
    if kinds in (None, ANY) or value is None and (type(None) in kinds or param.default is None):
        return None
    problems = [value_problem(value, kind) for kind in PLAIN if kind in kinds]
    return None if None in problems else " or ".join(dict.fromkeys(problems))


def _annotated_kinds(param, target):
    """The plain JSON types (and None) an annotation allows; ANY when it allows others or cannot be read; None when
    there is no annotation. A tensor in a union (`float | Tensor`) is left out: JSON cannot give one."""
    import torch

    annotation = param.annotation
    if isinstance(annotation, str):
        try:
            annotation = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)[param.name]
        except Exception:
            return ANY
    if annotation is param.empty:
        return None
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    members = [m for m in (typing.get_args(annotation) if union else (annotation,)) if m is not torch.Tensor]
    if not members or not all(m in PLAIN or m is type(None) for m in members):
        return ANY
    return set(members)


def resolve(section, type_name, roots=(), where=None):
    """The class or function a section's `type` names, checked to be of the section's kind before anything is
    built: an optimizer section can only ever build an optimizer."""
    where = where or section
    kind = SECTIONS[section].kind
    if "." in type_name:
        module_name, _, attr = type_name.rpartition(".")
        root = module_name.split(".")[0]
        allowed = PROJECT_ROOTS + LIBRARY_ROOTS + tuple(roots)
        if root not in allowed:
            raise UserError(f"{where}.type: {type_name!r} is outside the allowed import roots "
                            f"({', '.join(allowed)}); add {root!r} to the config's \"import_roots\" to allow it")
        try:
            target = None if attr.startswith("_") else getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError, SystemExit):  # SystemExit: a module that ends the program on import
            target = None
        if target is None:
            raise UserError(f"{where}.type: {type_name!r} cannot be imported")
    else:
        modules = SECTIONS[section].modules
        found = (getattr(importlib.import_module(m), type_name, None) for m in modules)  # imported only as needed
        target = next((t for t, m in zip(found, modules) if t is not None and _defined_under(t, m)), None)
        if target is None or type_name.startswith("_"):
            candidates = {n for m in modules for n, obj in vars(importlib.import_module(m)).items()
                          if not n.startswith("_") and _defined_under(obj, m) and _is_kind(kind, obj, roots)}
            raise UserError(f"{where}.type: unknown {type_name!r} (looked in {' or '.join(modules)})"
                            f"{did_you_mean(type_name, candidates)}")
    if not _is_kind(kind, target, roots):
        raise UserError(f"{where}.type: {type_name!r} is not {KIND_NAMES[kind]}")
    return target


KIND_NAMES = {
    "model": "a model: an nn.Module class, or a model-building function of torchvision.models, model/ or an "
             "import_roots package",
    "data_loader": "a data loader: a DataLoader class of the project or of an import_roots package",
    "optimizer": "an optimizer: a torch.optim.Optimizer class",
    "lr_scheduler": "a learning-rate scheduler class",
    "loss": "a loss: an nn.Module class, or a function of torch.nn.functional or model/loss.py",
    "metric": "a metric: a class with batch_stats() and compute(), as in model/metric.py",
    "transform": "a torchvision.transforms.v2 transform",
}


def _is_kind(kind, target, roots):
    """Whether a resolved object is of the kind a section builds (decided on the object, never on its name)."""
    import torch

    if inspect.isclass(target):
        if kind == "model" or kind == "loss":
            return issubclass(target, torch.nn.Module)
        if kind == "optimizer":
            return issubclass(target, torch.optim.Optimizer)
        if kind == "lr_scheduler":
            from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

            return issubclass(target, (LRScheduler, ReduceLROnPlateau))
        if kind == "data_loader":
            return issubclass(target, torch.utils.data.DataLoader) and _module_under(target, (*PROJECT_ROOTS, *roots))
        if kind == "metric":
            return callable(getattr(target, "batch_stats", None)) and callable(getattr(target, "compute", None))
        if kind == "transform":
            from torchvision.transforms import v2

            return issubclass(target, v2.Transform)
    if inspect.isfunction(target):
        if kind == "model":
            return _module_under(target, ("torchvision.models", "model", *roots))
        if kind == "loss":
            return _module_under(target, ("torch.nn.functional", "model.loss"))
    return False


def _module_under(target, prefixes):
    module = getattr(target, "__module__", None) or ""
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _defined_under(target, module_name):
    """Whether `target` belongs to the package searched, not merely imported into it (a helper, a base class)."""
    return (getattr(target, "__module__", None) or "").split(".")[0] == module_name.split(".")[0]


OPTIONAL_PROGRAM_ARGS = ("seed",)  # passed only to classes that take them
SINGLE_LABEL = Task()


def build(config, section, *supplied, **program):
    """Instantiate a config section: the class called with the program's arguments plus the config's `args`."""
    return build_spec(config[section], section, config["import_roots"], *supplied, **program)


def build_spec(spec, section, roots=(), *supplied, where=None, **program):
    """Instantiate one `{type, args}` object of a section (a loss function comes back with its args bound)."""
    where = where or section
    target = resolve(section, spec["type"], roots, where)
    params = _parameters(target)
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    program = {k: v for k, v in program.items() if k not in OPTIONAL_PROGRAM_ARGS or k in params or takes_any}
    args = {**spec.get("args", {}), **program}
    if inspect.isfunction(target) and section == "loss":
        return functools.partial(target, **args) if args else target
    try:
        with no_new_folders_on_failure(_download_dir()) if section == "arch" else contextlib.nullcontext():
            built = target(*supplied, **args)
    except UserError:
        raise
    except SystemExit as e:  # a package's command-line main, say: the run must not end as if it had finished
        raise UserError(f"{where}: {spec['type']} tried to end the program (sys.exit({e.code!r})) while being built; "
                        f"it is not {KIND_NAMES[SECTIONS[section].kind]}") from None
    except Exception as e:  # a library class fails on the config's arguments; the project's own code on a bug too
        if _module_under(target, LIBRARY_ROOTS):
            raise UserError(f"{where}: {spec['type']} failed with these arguments: {first_line(e)}") from None
        if not isinstance(e, (ValueError, TypeError)):
            raise
        frame = traceback.extract_tb(e.__traceback__)[-1]
        raise UserError(f"{where}: {spec['type']}({', '.join(f'{k}={v!r}' for k, v in args.items())}) failed: "
                        f"{type(e).__name__}: {e} (at {frame.filename}:{frame.lineno})") from None
    if section == "arch" and not _is_kind("model", type(built), roots):
        raise UserError(f"{where}: {spec['type']} returned a {type(built).__name__}, not an nn.Module")
    return built


def _download_dir():
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def build_loss(config, task=SINGLE_LABEL):
    """The config's loss (the task's own when none is named). A loss of torch's, or one marked `per_head` (those of
    model/loss.py), is applied to each head (HeadsLoss); any other loss of the project's takes the model's whole
    output and the whole target (WholeLoss)."""
    loss = config["loss"] or DEFAULT_LOSS[task.kind]
    if isinstance(loss, str):
        target = resolve("loss", loss, config["import_roots"])
        criterion = target() if inspect.isclass(target) else target
    else:
        criterion = build(config, "loss")
    if takes_whole_output(criterion):
        if config["head_weights"]:
            raise UserError("head_weights: weighs the heads for a built-in loss; the config's loss takes the whole "
                            "output and weighs the heads itself")
        return WholeLoss(criterion, task)
    check_loss_fits(criterion, task)
    if config["head_weights"] and not (task.kind == "multiclass" and len(task.heads) > 1):
        raise UserError("head_weights: weighs the heads of several label columns; this data has one")
    return HeadsLoss(criterion, task, config["head_weights"])


def takes_whole_output(criterion):
    """Whether a loss is the project's own (not torch's, not marked `per_head`): such a loss is written for the
    model it trains and gets its whole output."""
    target = getattr(criterion, "func", criterion)  # a function with the config's args bound
    named = target if inspect.isfunction(target) or inspect.isclass(target) else type(target)
    return not _module_under(named, ("torch",)) and not getattr(named, "per_head", False)


LOSS_TASKS = {  # losses that would train on something else than the task's targets without failing
    "multiclass": ("cross_entropy", "nll_loss", "CrossEntropyLoss", "NLLLoss", "CrossEntropy", "FocalLoss"),
    "multilabel": ("binary_cross_entropy_with_logits", "binary_cross_entropy", "BCEWithLogitsLoss", "BCELoss"),
    "regression": ("mse_loss", "l1_loss", "huber_loss", "smooth_l1_loss", "MSELoss", "L1Loss", "HuberLoss",
                   "SmoothL1Loss"),
}


def check_loss_fits(criterion, task):
    """Refuse a well-known loss of another task (cross-entropy on numbers learns nothing, yet runs)."""
    target = getattr(criterion, "func", criterion)  # a function with the config's args bound
    named = target if inspect.isfunction(target) or inspect.isclass(target) else type(target)
    if not (named.__module__ or "").startswith(("torch.nn", "model.loss")):
        return
    for kind, names in LOSS_TASKS.items():
        if named.__name__ in names and kind != task.kind:
            raise UserError(f"loss: {named.__name__} is a loss for {kind} targets, and this data's task is "
                            f"{task.kind}; leave loss out for the task's own ({DEFAULT_LOSS[task.kind]}) or name "
                            f"one of {', '.join(LOSS_TASKS[task.kind][:4])}")


def build_metrics(config, task=SINGLE_LABEL):
    """The config's metrics by the names they are logged under (per head too, with several label columns); each
    must score the task's kind of target."""
    metrics = {}
    for i, entry in enumerate(config["metrics"]):
        metric = build_spec({"type": entry} if isinstance(entry, str) else entry, "metrics", config["import_roots"],
                            where=f"metrics[{i}]")
        kinds = getattr(metric, "tasks", ("multiclass",))
        if not {head_kind(task, h) for h in range(len(task.heads))} & set(kinds):
            module = importlib.import_module(SECTIONS["metrics"].modules[0])
            fitting = [n for n, m in vars(module).items() if n.islower() and task.kind in getattr(m, "tasks", ())]
            raise UserError(f"metrics[{i}]: {metric_name(entry)} scores {' or '.join(kinds)} targets, not this "
                            f"data's {task.kind} ones; for those use {', '.join(fitting)} (a metric of your own "
                            f"names the kinds it scores in `tasks`)")
        metrics[metric_name(entry)] = metric
    return task_metrics(metrics, task)


def build_transforms(specs, where):
    """torchvision.transforms.v2 transforms from a list of `{type, args}` objects; a transform that takes others
    (RandomChoice, RandomApply, Compose) takes them as such a list too."""
    if not isinstance(specs, (list, tuple)):
        raise UserError(f"{where}: expected a list of {{\"type\": ..., \"args\": {{...}}}} objects, got {specs!r}")
    built = []
    for i, spec in enumerate(specs):
        spec = check_spec(spec, "transforms", (), where=f"{where}[{i}]")
        inner = spec["args"].get("transforms")
        if isinstance(inner, list):
            spec = {**spec, "args": {**spec["args"], "transforms": build_transforms(inner, f"{where}[{i}].args"
                                                                                          f".transforms")}}
        built.append(build_spec(spec, "transforms", where=f"{where}[{i}]"))
    return built
