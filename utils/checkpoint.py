"""Writing and reading checkpoints: atomic saves, `weights_only` loads, clean state-dict keys."""
import pickle
import warnings
import zipfile
from pathlib import Path

import torch

from utils.checkpoint_rules import MayLack, OneOf, Weights, check_checkpoint
from utils.util import UserError, atomic_write

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
    check_checkpoint(state, {"state_dict": Weights(), "ema_state_dict": MayLack(OneOf(None, Weights()))})
    return state


def checkpoint_config(checkpoint):
    """A checkpoint's config, to be validated like any other, without its `import_roots`: code outside the project,
    torch and torchvision is imported only when the user's own config or command line allows it."""
    return {**checkpoint["config"], "import_roots": []}


def read_torch_file(path, what, mmap=False):
    """A file written by torch.save, loaded with `weights_only=True` onto the CPU; anything else is one clear line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {str(path)!r}: no such file")
    if path.stat().st_size == 0:
        raise UserError(f"{what} {str(path)!r}: the file is empty")
    if not zipfile.is_zipfile(path):
        raise UserError(f"{what} {str(path)!r}: not a file written by torch.save (a zip archive), or a truncated one")
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


def load_model_weights(model, state_dict, source):
    """Load weights strictly; a checkpoint of another architecture gets one line naming the mismatch."""
    try:
        unwrap(model).load_state_dict(clean_state_dict(state_dict))
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:3])
        raise UserError(f"checkpoint {str(source)!r} does not fit model {type(unwrap(model)).__name__}: "
                        f"{detail[:300]}") from None
