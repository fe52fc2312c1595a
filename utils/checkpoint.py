"""Writing and reading checkpoints: atomic saves, `weights_only` loads, clean state-dict keys, and the config a
checkpoint carries, read as data: it imports nothing, downloads nothing and names no path outside its folders."""
import logging
import os
import pickle
import warnings
import zipfile
from pathlib import Path

import torch

from utils.checkpoint_rules import MayLack, OneOf, Weights, check_checkpoint
from utils.config import apply_overrides, overridden_keys
from utils.util import MAX_NESTING, UserError, atomic_write
from utils.withheld import withhold

WRAPPER_PREFIXES = ("module.", "_orig_mod.")
REQUIRED_KEYS = ("state_dict", "config")


def save_checkpoint(state, path):
    """Save atomically: a crash mid-save leaves the previous file intact."""
    def write(tmp):
        with open(tmp, "wb") as f:
            torch.save(state, f)

    atomic_write(path, write)


def best_checkpoint(run_dir):
    """The checkpoint that stands for a run folder: model_best.pth, else checkpoint-last.pth (no monitor)."""
    best = Path(run_dir) / "model_best.pth"
    return best if best.exists() else Path(run_dir) / "checkpoint-last.pth"


def load_state_dict_file(path):
    """The weights in a file of pretrained weights: a state dict, or a checkpoint holding one under `state_dict`."""
    state = read_torch_file(path, "arch.args.weights_file")
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if Weights().mismatch(state, ""):
        raise UserError(f"arch.args.weights_file {str(path)!r}: not a state dict (names mapped to tensors)")
    return state


def load_checkpoint(path, mmap=False):
    """Load a checkpoint onto the CPU with `weights_only=True`; anything else is refused with one clear line, as are
    weights (read by every use of a checkpoint) that are not names mapped to tensors. With `mmap` its tensors stay
    in the file until used (inference reads the weights, never the optimizer state)."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint-last.pth"
    state = read_torch_file(path, "checkpoint", mmap)
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS) or not isinstance(
            state["config"], dict):
        raise UserError(f"checkpoint {str(path)!r}: not a checkpoint of this template "
                        f"(expected a dict with keys {', '.join(REQUIRED_KEYS)})")
    state["path"] = str(path)
    if nesting_over(state, MAX_NESTING):
        raise UserError(f"checkpoint {str(path)!r}: nested more than {MAX_NESTING} levels deep")
    check_checkpoint(state, {"state_dict": Weights(), "ema_state_dict": MayLack(OneOf(None, Weights()))})
    return state


def checkpoint_config(checkpoint, overrides=(), saving=False):
    """A checkpoint's config with the command line's `overrides`, to be validated like any other. What only the
    checkpoint says is data: its `import_roots` are dropped (code outside the project, torch and torchvision is
    imported only when the user's own config or command line allows it), pretrained weights are not fetched (its
    own weights replace them), and a path it names must lie in its run folder, its data folder or the working
    folder, and must not be a URL; a data folder it alone names outside the run folder and the working folder is
    read, but no printed line quotes its files (utils/withheld.py). With `saving` (train.py -r), new run folders and
    trackers' files go beside the checkpoint's run, and only trackers the command line names report."""
    config = apply_overrides({**checkpoint["config"], "import_roots": []}, overrides)
    own = set(overridden_keys(overrides))
    args = config.get("arch", {}).get("args") if isinstance(config.get("arch"), dict) else None
    if isinstance(args, dict):
        for key, off in OFFLINE_ARGS.items():
            if key in args and f"arch.args.{key}" not in own:
                args[key] = off
    run_dir = Path(os.path.realpath(Path(checkpoint["path"]).parent))
    writable = _confine_paths(config, run_dir, own, checkpoint["path"])
    if saving and isinstance(config.get("trainer"), dict):
        _resumed_reporting(config, run_dir, writable, own)
    return config


OFFLINE_ARGS = {"weights": None, "weights_backbone": None, "pretrained": False}  # what fetches pretrained weights
IN_DATA_DIR = ("train_csv", "test_csv", "train_images", "test_images")  # data loader paths relative to data_dir
IN_WORKING_DIR = ("data_loader.args.data_dir", "data_loader.args.cache_dir", "inference.sample_submission",
                  "arch.args.weights_file")
WRITTEN = ("data_loader.args.cache_dir",)  # paths the program writes to, not only reads


def _confine_paths(config, run_dir, own, source):
    """Refuse a path that only the checkpoint names (not `own`, the command line's keys) outside the run folder, the
    data folder and the working folder, or a URL: loading a checkpoint reads and creates nothing elsewhere. Returns
    the folders it may write to (not a data folder that only it names)."""
    def value(key):
        node = config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node if isinstance(node, str) and node else None

    data_dir = Path(os.path.realpath(value("data_loader.args.data_dir") or "."))
    if "data_loader.args.data_dir" not in own and (data_dir == data_dir.parent or not data_dir.is_dir()):
        raise UserError(f"checkpoint {source!r}: data_loader.args.data_dir {str(data_dir)!r} is "
                        f"{'the file system root' if data_dir.is_dir() else 'no folder'}; give the data folder with "
                        f"-o data_loader.args.data_dir=...")
    keys = IN_WORKING_DIR + tuple(f"data_loader.args.{k}" for k in IN_DATA_DIR)
    roots = [data_dir, Path(os.path.realpath(run_dir)), Path.cwd().resolve()]
    elsewhere = "data_loader.args.data_dir" not in own and not any(data_dir.is_relative_to(r) for r in roots[1:])
    for key in (k for k in keys if value(k) and k not in own):
        named = value(key)
        path = Path(os.path.realpath(data_dir / named if key.split(".")[-1] in IN_DATA_DIR else named))
        allowed = roots[1:] if key in WRITTEN and elsewhere else roots  # a data folder only it names is read only
        if "://" in named:
            problem = "a URL"
        elif not any(path.is_relative_to(root) for root in allowed):
            problem = f"outside its run folder, {'' if allowed is roots else 'its (read-only) '}data folder and the " \
                      f"working folder"
        else:
            continue
        raise UserError(f"checkpoint {source!r}: {key} {named[:200]!r} is {problem}; a checkpoint may not name it "
                        f"(give it with -o {key}=... to use it)")
    if elsewhere:
        withhold(value("data_loader.args.data_dir") or ".", source)
    return roots[1:] if elsewhere else roots


def _resumed_reporting(config, run_dir, roots, own):
    """Where a resumed run writes besides its folder: under the save folder the checkpoint names only when that lies
    in one of `roots` (the folders it may write to: its run folder, the working folder, a data folder the user
    trusts) or is the one `run_dir` lies in; else in `run_dir`, the checkpoint's own folder. Only the trackers the
    command line names start (TensorBoard, inside the run folder, stays)."""
    trainer, logger = config["trainer"], logging.getLogger("template")
    named = trainer.get("save_dir")
    kept = Path(os.path.realpath(named)) if isinstance(named, str) and named and "://" not in named else None
    if "trainer.save_dir" not in own and not (kept and (kept == made_in(run_dir, config.get("name")) or
                                                         any(map(kept.is_relative_to, roots)))):
        trainer["save_dir"] = str(run_dir)
        logger.info("trainer.save_dir: the checkpoint's lies elsewhere; a resumed run saves in %s (choose another "
                    "with -o trainer.save_dir=...)", trainer["save_dir"])
    trackers = trainer.get("trackers")
    if "trainer.trackers" not in own and isinstance(trackers, list) and set(trackers) - {"tensorboard"}:
        trainer["trackers"] = [t for t in trackers if t == "tensorboard"]
        logger.info("trainer.trackers: a checkpoint starts no tracker of its own (%s); name them with -o "
                    "trainer.trackers=[...] to report there", ", ".join(map(str, set(trackers) - {"tensorboard"})))
    if "trainer.mlflow_uri" not in own:
        trainer.pop("mlflow_uri", None)


def made_in(run_dir, name):
    """The save folder a run folder lies in by the layout train.py makes, `<save_dir>/<name>/<run>` (a fold's:
    `<save_dir>/<name>/<group>/fold<k>`), or None; never the file system's root."""
    group = (run_dir.parent / "group.json").is_file()
    named = run_dir.parents[1] if group and len(run_dir.parents) > 2 else run_dir.parent
    save_dir = named.parent
    return save_dir if named.name == name and save_dir != save_dir.parent else None


def nesting_over(value, limit):
    """Whether lists, tuples and dicts nest more than `limit` deep in `value` (walked without recursion)."""
    stack = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node if isinstance(node, (list, tuple)) else ()
        stack.extend((child, depth + 1) for child in children)
    return False


def read_torch_file(path, what, mmap=False):
    """A file written by torch.save, loaded with `weights_only=True` onto the CPU; anything else is one clear line.
    Its records are checked to be stored uncompressed, as torch.save writes them, before any is read: loading then
    allocates no more than the file's size (and with `mmap` reads tensors only when used)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {str(path)!r}: no such file")
    if path.stat().st_size == 0:
        raise UserError(f"{what} {str(path)!r}: the file is empty")
    if not zipfile.is_zipfile(path):
        raise UserError(f"{what} {str(path)!r}: not a file written by torch.save (a zip archive), or a truncated one")
    _check_records(path, what)
    try:
        with warnings.catch_warnings():  # what torch says of a sparse or legacy tensor it reads is no concern here
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        reason = "it holds objects other than tensors and plain data"
        if "weights_only" not in str(e):
            reason = str(e).splitlines()[0]
        raise UserError(f"{what} {str(path)!r}: refused to load: {reason}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise UserError(f"{what} {str(path)!r}: not readable (truncated or another format): "
                        f"{str(e).splitlines()[0]}") from None


def _check_records(path, what):
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise UserError(f"{what} {str(path)!r}: not readable as a zip archive: {str(e)[:200]}") from None
    size = path.stat().st_size
    packed = next((r for r in records if r.compress_type != zipfile.ZIP_STORED), None)
    if packed is not None or sum(r.file_size for r in records) > size:
        detail = f"record {packed.filename[:100]!r} is compressed" if packed else "records larger than the file"
        raise UserError(f"{what} {str(path)!r}: not a file as torch.save writes it ({detail})")


def clean_state_dict(state_dict):
    """Drop the prefixes that DDP and torch.compile wrappers add, so saved keys match the bare model."""
    cleaned = {}
    for key, value in state_dict.items():
        for prefix in WRAPPER_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        cleaned[key] = value
    return cleaned


def unwrap(model):
    """The bare module inside DDP or torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def kind_of(tensor):
    """Complex, floating or whole numbers: a cast between kinds loses what a cast within one keeps."""
    return tensor.is_complex(), tensor.is_floating_point()


def load_model_weights(model, state_dict, source):
    """Load weights strictly; a checkpoint of another architecture, or a weight of another kind of number than the
    model's (complex for real, floating for integer), which loading would cast silently, gets one line naming it."""
    own = unwrap(model).state_dict()
    for key, value in clean_state_dict(state_dict).items():
        if key in own and kind_of(value) != kind_of(own[key]):
            raise UserError(f"checkpoint {str(source)!r}: {key}: a {str(value.dtype).removeprefix('torch.')} tensor "
                            f"where the model holds {str(own[key].dtype).removeprefix('torch.')}")
    try:
        unwrap(model).load_state_dict(clean_state_dict(state_dict))
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:3])
        raise UserError(f"checkpoint {str(source)!r} does not fit model {type(unwrap(model)).__name__}: "
                        f"{detail[:300]}") from None
