"""The manifest of a run group (`train.py --folds all`): the folds it plans, the ones finished, and its config.

A group is complete when every planned fold is finished; `test.py` ensembles exactly those folds and `train.py -r`
finishes the others. The manifest comes from a folder and is read as data: checked field by field.
"""
import contextlib
import re
from pathlib import Path

from utils.util import UserError, no_new_folders_on_failure, read_json, write_json

MANIFEST = "group.json"
FOLD_FOLDER = re.compile(r"fold(0|[1-9][0-9]*)")


def is_run_group(path):
    """Whether `path` is a run-group folder: one with a manifest, or with fold folders (an incomplete old one)."""
    path = Path(path)
    return path.is_dir() and ((path / MANIFEST).exists() or any(fold_folders(path)))


def fold_folders(group_dir):
    """The folders of a group named as folds (`fold3`), by fold number; `fold0_old` is no fold."""
    matches = ((FOLD_FOLDER.fullmatch(p.name), p) for p in Path(group_dir).iterdir() if p.is_dir())
    return {int(m.group(1)): p for m, p in matches if m}


def plan(group_dir, config, n_folds):
    """Write the manifest of a new group: folds 0 to n_folds-1 planned, none finished."""
    write_json({"folds": list(range(n_folds)), "finished": [], "config": config}, Path(group_dir) / MANIFEST)


@contextlib.contextmanager
def planned(group_dir, config, n_folds):
    """The manifest of a new group, written before its first fold trains so that a kill leaves a group to finish;
    taken back, with the folders made for it, when that fold fails before its run folder exists (bad input)."""
    group_dir = Path(group_dir)
    with no_new_folders_on_failure(group_dir):
        group_dir.mkdir(parents=True, exist_ok=True)
        plan(group_dir, config, n_folds)
        try:
            yield
        except BaseException:
            if [p.name for p in group_dir.iterdir()] == [MANIFEST]:
                (group_dir / MANIFEST).unlink()
            raise


def as_checkpoint(group_dir):
    """The group's config in the form a checkpoint holds it, for `checkpoint_config` (read as data, as a
    checkpoint's is)."""
    return {"config": read_manifest(group_dir)["config"], "path": str(Path(group_dir) / MANIFEST)}


def finish(group_dir, fold):
    """Record that `fold` finished (its out-of-fold file written)."""
    manifest = read_manifest(group_dir)
    write_json({**manifest, "finished": sorted({*manifest["finished"], fold})}, Path(group_dir) / MANIFEST)


def read_manifest(group_dir):
    """The group's manifest, checked: `folds` 0..K-1, `finished` among them, `config` an object."""
    path = Path(group_dir) / MANIFEST
    if not path.exists():
        raise UserError(f"run group {str(group_dir)!r}: no {MANIFEST} (written by train.py --folds all), so the "
                        f"folds it planned are unknown")
    manifest = read_json(path)
    folds = manifest.get("folds") if isinstance(manifest, dict) else None
    finished = manifest.get("finished") if isinstance(manifest, dict) else None
    if not (isinstance(folds, list) and 1 < len(folds) <= 1000 and folds == list(range(len(folds)))
            and isinstance(finished, list) and all(type(k) is int and k in folds for k in finished)
            and isinstance(manifest.get("config"), dict)):
        raise UserError(f"{path}: not a run-group manifest (expected folds 0..K-1, the finished ones among them, "
                        f"and the config)")
    return manifest


def complete_folds(group_dir):
    """The fold folders of a finished group, in fold order; a fold planned but unfinished, or a fold folder the
    group did not plan, is refused."""
    manifest = read_manifest(group_dir)
    found = fold_folders(group_dir)
    extra = sorted(set(found) - set(manifest["folds"]))
    if extra:
        raise UserError(f"run group {str(group_dir)!r}: {found[extra[0]].name}/ is no fold it planned "
                        f"({len(manifest['folds'])} folds); move it out of the group")
    unfinished = [k for k in manifest["folds"] if k not in manifest["finished"] or k not in found]
    if unfinished:
        raise UserError(f"run group {str(group_dir)!r}: fold(s) {', '.join(map(str, unfinished))} of "
                        f"{len(manifest['folds'])} not finished; finish the group with python train.py -r {group_dir}")
    return [found[k] for k in manifest["folds"]]
