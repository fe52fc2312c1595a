"""Evaluate checkpoints on the test split and write metrics and a submission file.

    python test.py -r saved/<name>/<run id>/model_best.pth [--out DIR]
    python test.py -r a/model_best.pth -r b/model_best.pth       an ensemble (probabilities averaged)
    python test.py -r saved/<name>/<run group>/                  every fold's best checkpoint of a --folds run
    python test.py --blend x/probabilities.csv y/probabilities.csv --weights 2 1 --out DIR
    python test.py -r saved/<name>/<run id>/ --track mlflow       also report metrics and files to the run's tracker

Models and data are rebuilt from the checkpoints' own configs (the first one's data settings; change any with
-o). Writes metrics.json (when the data has labels), predictions.csv (the submission), probabilities.csv and
report.html to DIR, by default `<run folder>/<split>-<checkpoint name>/`.
"""
import dataclasses
import os
import sys
import tempfile
from pathlib import Path

from logger.logger import setup_logging
from logger.report import report_from_test
from trainer.inference import (
    blend,
    check_class_order,
    check_same_inputs,
    check_same_validation,
    class_names,
    placeholder_labels,
    predict_ensemble,
    row_ids,
    score,
    try_one_batch,
    write_predictions,
)
from trainer.inference_settings import settle_inference
from trainer.trackers import TestReport, tracker_hosts
from utils import run_group, withheld
from utils.checkpoint import best_checkpoint, checkpoint_config, load_checkpoint
from utils.config import apply_overrides, build, build_transforms, overridden_keys, validate, validate_inference
from utils.settings import RunSettings
from utils.task import TASK_FILE, task_of
from utils.util import (
    ArgumentParser,
    Outcome,
    UserError,
    error_line,
    fault_line,
    no_new_folders_on_failure,
    offline,
    resolve_device,
    write_json,
)

USED_SECTIONS = ("n_gpu", "seed", "import_roots", "data_loader", "loss", "metrics", "inference")
UNUSED_SECTIONS = tuple(f.name for f in dataclasses.fields(RunSettings) if f.name not in USED_SECTIONS)
BLEND_SETTINGS = ("inference.sample_submission", "inference.label_format", "inference.combine_heads",
                  "inference.threshold")
SET_BY_TEST = ("data_loader.args.shuffle",)  # test.py never shuffles; validation_split is its own for --split test


def parse_args(argv):
    parser = ArgumentParser(description="Evaluate checkpoints on the test split.")
    parser.add_argument("-r", "--resume", action="append", default=[],
                        help="checkpoint, or run-group folder of a --folds run; repeat for an ensemble")
    parser.add_argument("--out", help="folder for metrics.json, predictions.csv and probabilities.csv")
    parser.add_argument("-d", "--device", help="cpu, cuda, cuda:N or a GPU index (default: from n_gpu)")
    parser.add_argument("--split", choices=("test", "valid"),
                        help="the test data, or the validation part of the training data (default: test)")
    parser.add_argument("--ema", action="store_true", help="use the checkpoints' EMA weights (trainer.ema_decay)")
    parser.add_argument("--bs", type=int, help="batch size for inference (default: the training batch size)")
    parser.add_argument("--blend", nargs="+", metavar="CSV", help="average saved probabilities.csv files instead")
    parser.add_argument("--weights", nargs="+", type=float, help="weights for --blend (default: equal)")
    parser.add_argument("--track", nargs="+", default=[], choices=("mlflow", "wandb", "csv"), metavar="TRACKER",
                        help="report the metrics and written files (mlflow, wandb, csv) to the checkpoint's training "
                             "run, or to a new run named after --out for an ensemble or a blend")
    parser.add_argument("-o", "--override", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="change the (first) checkpoint's config, e.g. -o data_loader.args.test_csv=test.csv")
    return parser.parse_args(argv)


def check_arguments(args):
    """Refuse values that make no sense and inputs the chosen mode would silently ignore, before any work."""
    if args.bs is not None and args.bs < 1:
        raise UserError(f"--bs: expected an integer >= 1, got {args.bs}")
    if args.out == "":
        raise UserError("--out: expected a folder, got an empty path")
    (check_blend_arguments if args.blend else check_evaluation_arguments)(args)


def check_evaluation_arguments(args):
    """With -r: no blend weights, and no -o key that test.py would not read."""
    if args.weights:
        raise UserError("--weights: only for --blend (the models of an ensemble count equally)")
    for key in overridden_keys(args.override):
        if key.split(".")[0] in UNUSED_SECTIONS:
            raise UserError(f"-o {key}: not used by test.py (it builds each model from its checkpoint and reads "
                            f"only {', '.join(USED_SECTIONS)})")
        if key in SET_BY_TEST or key == "data_loader.args.validation_split" and args.split != "valid":
            raise UserError(f"-o {key}: not used by test.py (it reads the data in order, every sample once)")
        if key == "inference.sample_submission" and args.split == "valid":
            raise UserError(f"-o {key}: not used with --split valid (the validation rows follow no sample "
                            f"submission)")


def check_blend_arguments(args):
    """With --blend: an output folder, and none of the flags or -o keys that only matter when models run."""
    model_flags = {"-r": args.resume, "--ema": args.ema, "--split": args.split, "--bs": args.bs is not None,
                   "-d": args.device}
    flag = next((flag for flag, given in model_flags.items() if given), None)
    if flag:
        raise UserError(f"{flag}: not used with --blend (it averages saved probabilities; no model runs)")
    for key in overridden_keys(args.override):
        if key not in BLEND_SETTINGS:
            raise UserError(f"-o {key}: not used with --blend (it reads only {' and '.join(BLEND_SETTINGS)})")
    if not args.out:
        raise UserError("--blend: give --out DIR for the blended submission")


def check_out(out, given):
    """Refuse an output folder that is a file, or lies under one, before any work."""
    for path in (out, *out.parents):
        if path.is_dir():
            return
        if path.exists() or path.is_symlink():
            where = "--out" if given else "output folder"
            raise UserError(f"{where} {str(out)!r}: {str(path)!r} is a file, not a folder")


def checkpoint_paths(given):
    """Checkpoint files: a run folder stands for its best checkpoint, a run-group folder of a --folds run for each
    fold's (exactly the folds its manifest planned, all finished)."""
    paths = []
    for path in map(Path, given):
        runs = run_group.complete_folds(path) if run_group.is_run_group(path) else [path] if path.is_dir() else []
        if runs == [path] and not best_checkpoint(path).is_file():
            raise UserError(f"-r {str(path)!r}: a folder without model_best.pth or checkpoint-last.pth; give a run "
                            f"folder, a run group of --folds all, or a checkpoint file")
        paths += [best_checkpoint(run) for run in runs] or [path]
    return paths


def build_eval_loader(config, split):
    """The test split, or the training data's validation split exactly as training drew it."""
    if split == "test":
        return build(config, "data_loader", shuffle=False, validation_split=0.0, training=False,
                     seed=config["seed"]).evaluation_loader()
    loader = build(config, "data_loader", shuffle=False, training=True, seed=config["seed"]).split_validation()
    if loader is None:
        raise UserError("--split valid: the config's data_loader has no validation split")
    return loader


def load_members(paths, overrides, batch_size, use_ema):
    """The config test.py works with (the first checkpoint's, with the overrides), and every checkpoint as (path, its
    own validated config), all read and checked before any data is loaded. No checkpoint is held: each model's
    weights are read (memory-mapped) when it is built, one model at a time."""
    overrides = overrides + ([f"data_loader.args.batch_size={batch_size}"] if batch_size else [])
    config, members = None, []
    for path in paths:
        checkpoint = load_checkpoint(path, mmap=True)
        if config is None:
            config = validate(checkpoint_config(checkpoint, overrides))
        members.append((path, validate({**checkpoint_config(checkpoint), "import_roots": config["import_roots"]})))
        if use_ema and checkpoint.get("ema_state_dict") is None:
            raise UserError(f"--ema: checkpoint {str(path)!r} has no EMA weights (train with trainer.ema_decay)")
        del checkpoint
    return config, members


def default_out(paths, split, ema, tta):
    """`<run folder>/<split>-<checkpoint name>[-ema][-tta]/`: evaluations that differ get folders of their own."""
    suffix = ("-ema" if ema else "") + ("-tta" if tta else "")
    if len(paths) == 1:
        return paths[0].parent / f"{split}-{paths[0].stem}{suffix}"
    return Path(os.path.commonpath([p.parent for p in paths])) / f"{split}-ensemble{suffix}"


def run_blend(args, logger):
    """Blend saved probability files into --out."""
    check_out(Path(args.out), given=True)
    inference = validate_inference(apply_overrides({"inference": {}}, args.override)["inference"])
    written = (Path(args.out) / "probabilities.csv").resolve()
    if any(Path(path).resolve() == written for path in args.blend):
        raise UserError(f"--out {args.out!r}: would overwrite {str(written)!r}, one of the files to blend")
    reports = [TestReport(name, args.out, "blends", "blend") for name in args.track]
    ids, probabilities, classes, task = blend(args.blend, args.weights)
    write_outputs(Path(args.out), ids, probabilities, classes, settle_inference(inference, task), task)
    logger.info("blended %d files into %s", len(args.blend), args.out)
    return Path(args.out), reports, None


def evaluate(args, logger):
    """Predict with the checkpoints (averaged), score when the data has labels, and write the outputs. Everything a
    user gives is checked first, and every model and TTA view is tried on one batch before predicting."""
    split = args.split or "test"
    paths = checkpoint_paths(args.resume)
    config, members = load_members(paths, args.override, args.bs, args.ema)
    out = Path(args.out) if args.out else default_out(paths, split, args.ema, config["inference"]["tta"])
    check_out(out, bool(args.out))
    reports = [TestReport(name, paths[0].parent if len(paths) == 1 else out, config["name"], split)
               for name in args.track]
    if split == "valid":  # the validation rows are no test set: no sample submission to follow
        config["inference"]["sample_submission"] = ""
    device = resolve_device(args.device, config["n_gpu"], logger)
    tta = [t.to(device) if hasattr(t, "to") else t for t in build_transforms(config["inference"]["tta"],
                                                                            "inference.tta")]
    data_loader = build_eval_loader(config, split)
    check_class_order(members, config, data_loader)
    check_same_inputs(members)
    if split == "valid":
        check_same_validation(members, config)
    n_classes = try_one_batch(members, config, data_loader, tta, args.ema, device)
    task = task_of(data_loader.dataset)
    inference = config["inference"] = settle_inference(config["inference"], task, paths)
    probabilities, targets = predict_ensemble(members, data_loader, tta, args.ema, device)
    labelled = getattr(data_loader.dataset, "targets", None) is not None
    placeholder = placeholder_labels(config, split, targets) if labelled else None
    labelled = labelled and not placeholder
    metrics = score(config, task, probabilities, targets, inference["threshold"]) if labelled else None
    threshold = {"threshold": inference["threshold"]} if task.kind == "multilabel" else {}
    summary = {"checkpoints": [str(p) for p in paths], "split": split, "ema": args.ema, "tta_views": len(tta),
               **threshold, "n_samples": len(targets), **metrics} if labelled else None
    write_outputs(out, row_ids(data_loader), probabilities, class_names(data_loader, n_classes), inference, task,
                  summary, report=lambda folder: report_from_test(folder, paths, task, probabilities,
                                                                  targets if labelled else None, data_loader))
    if metrics:
        logger.info("  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    elif placeholder:
        logger.warning("no metrics: the labels look like placeholders (%s); wrote predictions only", placeholder)
    else:
        logger.info("the data has no labels: wrote predictions only")
    logger.info("wrote %s", out)
    return out, reports, metrics


def write_outputs(out, ids, probabilities, classes, inference, task, metrics=None, report=None):
    """probabilities.csv, the submission, metrics.json (when given) and `report(folder)`'s report.html into `out`,
    all or none: they are written into a temporary folder beside it and moved in once all are complete; a folder
    that cannot be written is one line."""
    try:
        with no_new_folders_on_failure(out.parent):
            out.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
                write_predictions(Path(tmp), ids, probabilities, classes, inference, task)
                if metrics:
                    write_json(metrics, Path(tmp) / "metrics.json")
                if report:
                    report(Path(tmp))
                move_into(Path(tmp), out)
    except OSError as e:
        raise UserError(f"--out {str(out)!r}: cannot write there ({e.strerror or e})") from None


def move_into(written, out):
    """Move every file of `written` into `out` (renames in one file system), and drop a task.json left there by an
    earlier task that this one does not have."""
    out.mkdir(exist_ok=True)
    names = [path.name for path in written.iterdir()]
    for name in names:
        os.replace(written / name, out / name)
    if TASK_FILE not in names:
        (out / TASK_FILE).unlink(missing_ok=True)


def main(argv=None):
    """Evaluate or blend as the command line says; returns the exit status, whose `out` is the output folder and
    `files` the files in it (None on failure)."""
    args = parse_args(argv)
    logger = setup_logging(1)
    withheld.forget()
    try:
        check_arguments(args)
        if not (args.blend or args.resume):
            raise UserError("give a checkpoint with -r (repeat it for an ensemble), or probability files with --blend")
        with offline("test.py", allow=tracker_hosts(args.track)):  # checkpoints and probability files are data
            out, reports, metrics = (run_blend if args.blend else evaluate)(args, logger)
        files = sorted(path for path in out.iterdir() if path.is_file())
        for report in reports:  # the trackers the user named, at the addresses the user gave
            report(metrics, files)
    except UserError as e:
        print(error_line(e), file=sys.stderr)
        return Outcome(2)
    except (OSError, RecursionError, MemoryError) as e:  # a full disk, a read-only folder: nothing half-written
        print(fault_line(e), file=sys.stderr)
        return Outcome(2)
    finally:
        withheld.forget()  # the next command in this process starts with none
    return Outcome(0, out=out, files=files)


if __name__ == "__main__":
    sys.exit(main())
