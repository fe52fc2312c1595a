"""The run configuration: read JSON, apply command-line overrides, validate everything, build objects by name.

Each `{"type": ..., "args": {...}}` section names a class or function. It is looked up in the project's own
module for that section first, then in the matching PyTorch namespace, or given as a dotted path under an
allowed root. Validation runs before any data is read or model built, so mistakes cost seconds, not epochs.
"""
import copy
import difflib
import functools
import importlib
import inspect
import json
import traceback

from utils.util import UserError, read_json

# section: (modules searched in order, number of leading positional arguments the trainer supplies)
SECTIONS = {
    "arch": (("model.model", "torchvision.models"), 0),
    "data_loader": (("data_loader.data_loaders",), 0),
    "optimizer": (("torch.optim",), 1),
    "lr_scheduler": (("torch.optim.lr_scheduler",), 1),
    "loss": (("model.loss", "torch.nn", "torch.nn.functional"), 0),
    "metrics": (("model.metric",), 0),
}
REQUIRED_SECTIONS = ("arch", "data_loader", "optimizer", "loss", "trainer")
PROJECT_ROOTS = ("base", "data_loader", "model", "trainer", "logger", "utils")
LIBRARY_ROOTS = ("torch", "torchvision")
BATCH_SCHEDULERS = ("OneCycleLR", "CyclicLR")

# key: (default, type, minimum); a default of None means the key is required
TOP_LEVEL = {
    "name": ("run", str, None),
    "n_gpu": (1, int, 0),
    "seed": (0, int, 0),
    "deterministic": (False, bool, None),
    "import_roots": ([], list, None),
    "arch": (None, dict, None),
    "data_loader": (None, dict, None),
    "optimizer": (None, dict, None),
    "loss": (None, (str, dict), None),
    "metrics": ([], list, None),
    "lr_scheduler": ({}, dict, None),
    "trainer": (None, dict, None),
    "inference": ({}, dict, None),
}
TRAINER = {
    "epochs": (None, int, 1),
    "save_dir": ("saved/", str, None),
    "save_period": (0, int, 0),
    "verbosity": (2, int, 0),
    "monitor": ("off", str, None),
    "early_stop": (0, int, 0),
    "tensorboard": (True, bool, None),
    "log_step": (50, int, 1),
    "save_top_k": (0, int, 0),
    "amp": ("off", str, None),
    "accumulation_steps": (1, int, 1),
    "clip_grad_norm": (0, (int, float), 0),
    "channels_last": (False, bool, None),
    "compile": (False, bool, None),
    "ema_decay": (0, (int, float), 0),
    "limit_train_batches": (0, int, 0),
    "limit_val_batches": (0, int, 0),
    "overfit_batches": (0, int, 0),
    "save_every_n_steps": (0, int, 0),
    "nonfinite_loss": ("stop", str, None),
    "freeze_backbone_epochs": (0, int, 0),
}
INFERENCE = {
    "tta": ([], list, None),
    "sample_submission": ("", str, None),
    "label_format": ("name", str, None),
}
CHOICES = {"trainer.amp": ("off", "bf16", "fp16"), "trainer.nonfinite_loss": ("stop", "skip"),
           "inference.label_format": ("name", "index")}


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
            value = json.loads(raw)
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


def validate(config):
    """Check every key, type, argument and the monitor; return a copy with defaults filled in."""
    config = _check_keys(config, TOP_LEVEL, "")
    config["trainer"] = _check_keys(config["trainer"], TRAINER, "trainer.")
    config["inference"] = validate_inference(config["inference"])
    if config["trainer"]["ema_decay"] >= 1:
        raise UserError(f"trainer.ema_decay: expected a value below 1 (e.g. 0.999), "
                        f"got {config['trainer']['ema_decay']}")
    roots = config["import_roots"]
    if not all(isinstance(r, str) and r for r in roots):
        raise UserError("import_roots: expected a list of module names, e.g. [\"timm\"]")

    for section in ("arch", "data_loader", "optimizer"):
        config[section] = _check_section(config[section], section, roots)
    if isinstance(config["loss"], str):
        resolve("loss", config["loss"], roots)
    else:
        config["loss"] = _check_section(config["loss"], "loss", roots)
    if config["lr_scheduler"]:
        config["lr_scheduler"] = _check_section(config["lr_scheduler"], "lr_scheduler", roots, ("step_every",))
        step_every = config["lr_scheduler"].setdefault(
            "step_every", "batch" if config["lr_scheduler"]["type"] in BATCH_SCHEDULERS else "epoch")
        if step_every not in ("epoch", "batch"):
            raise UserError(f"lr_scheduler.step_every: expected \"epoch\" or \"batch\", got {json.dumps(step_every)}")
    names = []
    for i, entry in enumerate(config["metrics"]):
        if isinstance(entry, str):
            resolve("metrics", entry, roots, where=f"metrics[{i}]")
            names.append(entry)
        else:
            config["metrics"][i] = _check_section(entry, "metrics", roots, ("name",), where=f"metrics[{i}]")
            names.append(metric_name(entry))
    if len(set(names)) != len(names):
        raise UserError(f"metrics: two metrics share a name ({', '.join(names)}); give one a \"name\"")
    _check_monitor(config, names)
    return config


def validate_inference(section):
    """The `inference` section with defaults filled in (test.py --blend needs it without a whole config)."""
    return _check_keys(section, INFERENCE, "inference.")


def metric_name(entry):
    """The name a metric is logged under: the config string itself, or the section's `name`, else its type."""
    return entry if isinstance(entry, str) else entry.get("name", entry["type"])


def produced_metrics(config):
    """Every name an epoch's log can hold, given the metrics and whether the data loader splits off validation."""
    names = ["loss"] + [metric_name(m) for m in config["metrics"]]
    if not (_has_validation(config) or config["trainer"]["overfit_batches"]):
        return names
    ema = ["val_ema_" + n for n in names] if config["trainer"]["ema_decay"] else []
    return names + ["val_" + n for n in names] + ema


def _check_monitor(config, metric_names):
    monitor = config["trainer"]["monitor"]
    if monitor == "off":
        if config["trainer"]["save_top_k"]:
            raise UserError("trainer.save_top_k: keeping the best checkpoints needs a trainer.monitor metric")
        return
    mode, _, metric = monitor.partition(" ")
    if mode not in ("min", "max") or not metric:
        raise UserError(f"trainer.monitor: expected \"off\", \"min <metric>\" or \"max <metric>\", "
                        f"got {json.dumps(monitor)}")
    produced = produced_metrics(config)
    if metric not in produced:
        hint = _suggest(metric, produced) or f"; training produces {', '.join(produced)}"
        raise UserError(f"trainer.monitor: {metric!r} is never produced by training{hint}")
    scheduler = config["lr_scheduler"]
    if scheduler and scheduler["type"].endswith("ReduceLROnPlateau") and scheduler["args"].get("mode", "min") != mode:
        raise UserError(f"lr_scheduler.args.mode: ReduceLROnPlateau is fed {metric!r}, which the monitor wants to "
                        f"{mode}imise; set \"mode\": \"{mode}\"")


def _has_validation(config):
    loader = config["data_loader"]
    if "validation_split" in loader["args"]:
        return bool(loader["args"]["validation_split"])
    cls = resolve("data_loader", loader["type"], config["import_roots"])
    try:
        param = inspect.signature(cls).parameters.get("validation_split")
    except (TypeError, ValueError):
        return True
    if param is None or param.default is param.empty:
        return True
    return bool(param.default)


def _check_keys(config, spec, prefix):
    if not isinstance(config, dict):
        raise UserError(f"{prefix.rstrip('.') or 'config'}: expected a JSON object")
    for key in config:
        if key not in spec:
            raise UserError(f"{prefix}{key}: unknown key{_suggest(key, spec) or '; known keys: ' + ', '.join(spec)}")
    checked = {}
    for key, (default, kind, minimum) in spec.items():
        if key not in config:
            if default is None:
                raise UserError(f"{prefix}{key}: missing required key")
            checked[key] = copy.deepcopy(default)
            continue
        value = config[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds:
            expected = " or ".join(_json_type(k) for k in kinds)
            raise UserError(f"{prefix}{key}: expected {expected}, got {json.dumps(value)}")
        if minimum is not None and value < minimum:
            raise UserError(f"{prefix}{key}: expected a value >= {minimum}, got {json.dumps(value)}")
        if prefix + key in CHOICES and value not in CHOICES[prefix + key]:
            raise UserError(f"{prefix}{key}: expected one of {', '.join(CHOICES[prefix + key])}, "
                            f"got {json.dumps(value)}")
        checked[key] = value
    return checked


def _json_type(kind):
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "an object",
            list: "a list"}[kind]


def _check_section(section, name, roots, extra_keys=(), where=None):
    where = where or name
    if not isinstance(section, dict):
        raise UserError(f"{where}: expected an object with \"type\" and \"args\"")
    for key in section:
        if key not in ("type", "args", *extra_keys):
            raise UserError(f"{where}.{key}: unknown key{_suggest(key, ('type', 'args', *extra_keys))}")
    if not isinstance(section.get("type"), str):
        raise UserError(f"{where}.type: missing; expected the name of a class or function")
    section = {"args": {}, **section}
    if not isinstance(section["args"], dict):
        raise UserError(f"{where}.args: expected an object, got {json.dumps(section['args'])}")
    target = resolve(name, section["type"], roots, where)
    _check_args(target, section["args"], SECTIONS[name][1], where, section["type"])
    return section


def _check_args(target, args, n_supplied, where, type_name):
    try:
        params = list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError):
        return
    if inspect.isroutine(target) and where.startswith("loss"):
        n_supplied = 2  # a loss function is called as fn(output, target, **args)
    supplied, params = params[:n_supplied], params[n_supplied:]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    for key in args:
        if key in {p.name for p in supplied}:
            raise UserError(f"{where}.args.{key}: supplied by the trainer; remove it from the config")
        if key not in named:
            accepted = ", ".join(sorted(named)) or "no arguments"
            hint = _suggest(key, named) or "; it accepts: " + accepted
            raise UserError(f"{where}.args.{key}: not an argument of {type_name}{hint}")
    if inspect.isclass(target):
        missing = [p.name for p in params if p.default is p.empty and p.name in named and p.name not in args]
        if missing:
            raise UserError(f"{where}.args: {type_name} needs {', '.join(repr(m) for m in missing)}")


def resolve(section, type_name, roots=(), where=None):
    """The class or function a section's `type` names; only classes and functions under allowed roots."""
    where = where or section
    if "." in type_name:
        module_name, _, attr = type_name.rpartition(".")
        root = module_name.split(".")[0]
        allowed = PROJECT_ROOTS + LIBRARY_ROOTS + tuple(roots)
        if root not in allowed:
            raise UserError(f"{where}.type: {type_name!r} is outside the allowed import roots "
                            f"({', '.join(allowed)}); add {root!r} to the config's \"import_roots\" to allow it")
        try:
            target = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError):
            raise UserError(f"{where}.type: {type_name!r} cannot be imported") from None
        if not _usable(target):
            raise UserError(f"{where}.type: {type_name!r} is not a class or function")
        return target
    for module_name in SECTIONS[section][0]:
        target = getattr(importlib.import_module(module_name), type_name, None)
        if not type_name.startswith("_") and _usable(target) and _defined_under(target, module_name):
            return target
    candidates = {n for m in SECTIONS[section][0] for n, obj in vars(importlib.import_module(m)).items()
                  if not n.startswith("_") and _usable(obj) and _defined_under(obj, m)}
    searched = " or ".join(SECTIONS[section][0])
    raise UserError(f"{where}.type: unknown {type_name!r} (looked in {searched}){_suggest(type_name, candidates)}")


FUNCTION_MODULES = PROJECT_ROOTS + ("torchvision.models", "torch.nn.functional")


def _usable(target):
    """Classes, and functions only where a config may need them (model builders, functional losses, the
    project's own): never general-purpose functions such as torch.save or os.system."""
    if inspect.isclass(target):
        return True
    module = getattr(target, "__module__", None) or ""
    return inspect.isfunction(target) and any(module == m or module.startswith(m + ".") for m in FUNCTION_MODULES)


def _defined_under(target, module_name):
    """Whether `target` belongs to the package searched, not merely imported into it (a helper, a base class)."""
    return getattr(target, "__module__", "").split(".")[0] == module_name.split(".")[0]


def _suggest(name, candidates):
    close = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def build(config, section, *supplied, **overrides):
    """Instantiate a config section: the class called with the trainer's arguments plus the config's `args`."""
    spec = config[section]
    target = resolve(section, spec["type"], config["import_roots"])
    args = {**spec["args"], **overrides}
    if inspect.isroutine(target) and section == "loss":
        return functools.partial(target, **args) if args else target
    try:
        return target(*supplied, **args)
    except (ValueError, TypeError) as e:
        if target.__module__.split(".")[0] in LIBRARY_ROOTS:
            raise UserError(f"{section}: {spec['type']} rejected its arguments: {e}") from None
        frame = traceback.extract_tb(e.__traceback__)[-1]
        raise UserError(f"{section}: {spec['type']}({', '.join(f'{k}={v!r}' for k, v in args.items())}) failed: "
                        f"{type(e).__name__}: {e} (at {frame.filename}:{frame.lineno})") from None


def build_loss(config):
    loss = config["loss"]
    if isinstance(loss, str):
        target = resolve("loss", loss, config["import_roots"])
        return target() if inspect.isclass(target) else target
    return build(config, "loss")


def build_metrics(config):
    metrics = {}
    for entry in config["metrics"]:
        spec = {"type": entry, "args": {}} if isinstance(entry, str) else entry
        target = resolve("metrics", spec["type"], config["import_roots"])
        metrics[metric_name(entry)] = target(**spec["args"])
    return metrics
