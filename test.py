"""Evaluate checkpoints on the test split and write metrics and a submission file.

    python test.py -r saved/<name>/<run id>/model_best.pth [--out DIR]
    python test.py -r a/model_best.pth -r b/model_best.pth       an ensemble (probabilities averaged)
    python test.py -r saved/<name>/<run group>/                  every fold's best checkpoint of a --folds run
    python test.py --blend x/probabilities.csv y/probabilities.csv --weights 2 1 --out DIR

Models and data are rebuilt from the checkpoints' own configs (the first one's data settings; change any with
-o). Writes metrics.json (when the data has labels), predictions.csv (the submission) and probabilities.csv to
DIR, by default `<run folder>/<split>-<checkpoint name>/`.
"""
import os
import sys
from pathlib import Path

from logger.logger import setup_logging
from trainer.inference import blend, class_names, load_model, predict, row_ids, score, write_predictions
from utils.checkpoint import best_checkpoint, checkpoint_config, load_checkpoint
from utils.config import apply_overrides, build, build_transforms, validate, validate_inference
from utils.util import ArgumentParser, UserError, error_line, resolve_device, write_json


def parse_args(argv):
    parser = ArgumentParser(description="Evaluate checkpoints on the test split.")
    parser.add_argument("-r", "--resume", action="append", default=[],
                        help="checkpoint, or run-group folder of a --folds run; repeat for an ensemble")
    parser.add_argument("--out", help="folder for metrics.json, predictions.csv and probabilities.csv")
    parser.add_argument("-d", "--device", help="cpu, cuda, cuda:N or a GPU index (default: from n_gpu)")
    parser.add_argument("--split", choices=("test", "valid"), default="test",
                        help="the test data, or the validation part of the training data (default: test)")
    parser.add_argument("--ema", action="store_true", help="use the checkpoints' EMA weights (trainer.ema_decay)")
    parser.add_argument("--bs", type=int, help="batch size for inference (default: the training batch size)")
    parser.add_argument("--blend", nargs="+", metavar="CSV", help="average saved probabilities.csv files instead")
    parser.add_argument("--weights", nargs="+", type=float, help="weights for --blend (default: equal)")
    parser.add_argument("-o", "--override", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="change the (first) checkpoint's config, e.g. -o data_loader.args.test_csv=test.csv")
    return parser.parse_args(argv)


def checkpoint_paths(given):
    """Checkpoint files: a run folder stands for its best checkpoint, a run-group folder of a --folds run for each
    fold's."""
    paths = []
    for path in map(Path, given):
        runs = (sorted(path.glob("fold*/")) or [path]) if path.is_dir() else []
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


def default_out(paths, split, ema):
    suffix = "-ema" if ema else ""
    if len(paths) == 1:
        return paths[0].parent / f"{split}-{paths[0].stem}{suffix}"
    return Path(os.path.commonpath([p.parent for p in paths])) / f"{split}-ensemble{suffix}"


def main(argv=None):
    args = parse_args(argv)
    logger = setup_logging(1)
    try:
        if args.blend:
            if not args.out:
                raise UserError("--blend: give --out DIR for the blended submission")
            ids, probabilities, classes = blend(args.blend, args.weights)
            inference = validate_inference(apply_overrides({"inference": {}}, args.override)["inference"])
            write_predictions(Path(args.out), ids, probabilities, classes, inference)
            logger.info("blended %d files into %s", len(args.blend), args.out)
            return 0
        if not args.resume:
            raise UserError("give a checkpoint with -r (repeat it for an ensemble), or probability files with --blend")
        paths = checkpoint_paths(args.resume)
        overrides = args.override + ([f"data_loader.args.batch_size={args.bs}"] if args.bs else [])
        config = validate(apply_overrides(checkpoint_config(load_checkpoint(paths[0], mmap=True)), overrides))
        if args.split == "valid":  # the validation rows are no test set: no sample submission to follow
            config["inference"]["sample_submission"] = ""
        device = resolve_device(args.device, config["n_gpu"], logger)
        data_loader = build_eval_loader(config, args.split)
        tta = [t.to(device) if hasattr(t, "to") else t for t in build_transforms(config["inference"]["tta"],
                                                                                "inference.tta")]
        for path in paths:  # memory-mapped: checked without reading their tensors
            if args.ema and load_checkpoint(path, mmap=True).get("ema_state_dict") is None:
                raise UserError(f"--ema: checkpoint {str(path)!r} has no EMA weights (train with trainer.ema_decay)")
        probabilities = targets = None
        for path in paths:  # one model in memory at a time, its weights only
            model = load_model(path, load_checkpoint(path, mmap=True), args.ema, device)
            model_probabilities, targets = predict(model, data_loader, device, tta)
            if probabilities is not None and model_probabilities.shape != probabilities.shape:
                raise UserError(f"-r: {path} predicts {model_probabilities.shape[1]} classes, {paths[0]} "
                                f"{probabilities.shape[1]}: an ensemble needs models of the same task")
            probabilities = model_probabilities if probabilities is None else probabilities + model_probabilities
            del model
        probabilities /= len(paths)

        out = Path(args.out) if args.out else default_out(paths, args.split, args.ema)
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {str(out)!r}: is a file; expected a folder")
        write_predictions(out, row_ids(data_loader), probabilities, class_names(data_loader, probabilities.shape[1]),
                          config["inference"])
        if getattr(data_loader.dataset, "targets", None) is not None:
            metrics = score(config, probabilities, targets)
            write_json({"checkpoints": [str(p) for p in paths], "split": args.split, "ema": args.ema,
                        "tta_views": len(tta), "n_samples": len(targets), **metrics}, out / "metrics.json")
            logger.info("  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        else:
            logger.info("the data has no labels: wrote predictions only")
        logger.info("wrote %s", out)
    except UserError as e:
        print(error_line(e), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
