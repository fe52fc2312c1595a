"""Evaluate a checkpoint on the test split and write metrics and a submission file.

    python test.py -r saved/<name>/<run id>/model_best.pth [--out DIR]

The model and data loader are rebuilt from the checkpoint's own config (change any of it with -o). Writes
`metrics.json` (when the data has labels) and `predictions.csv` (`id,label`) to DIR, by default
`<run folder>/<split>-<checkpoint name>/`.
"""
import argparse
import sys
from pathlib import Path

import pandas as pd
import torch

from model.metric import EpochMetrics
from utils.checkpoint import load_checkpoint, load_model_weights
from utils.config import apply_overrides, build, build_loss, build_metrics, validate
from utils.util import UserError, resolve_device, seed_everything, write_json


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Evaluate a checkpoint on the test split.")
    parser.add_argument("-r", "--resume", required=True, help="checkpoint to evaluate")
    parser.add_argument("--out", help="folder for metrics.json and predictions.csv")
    parser.add_argument("-d", "--device", help="cpu, cuda, cuda:N or a GPU index (default: from n_gpu)")
    parser.add_argument("--split", choices=("test", "valid"), default="test",
                        help="the test data, or the validation part of the training data (default: test)")
    parser.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights (trainer.ema_decay)")
    parser.add_argument("--bs", type=int, help="batch size for inference (default: the training batch size)")
    parser.add_argument("-o", "--override", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="change the checkpoint's config, e.g. -o data_loader.args.test_csv=test.csv")
    return parser.parse_args(argv)


def build_eval_loader(config, split):
    """The test split, or the training data's validation split exactly as training drew it."""
    if split == "test":
        return build(config, "data_loader", shuffle=False, validation_split=0.0, training=False)
    seed_everything(config["seed"])
    loader = build(config, "data_loader", shuffle=False, training=True).split_validation()
    if loader is None:
        raise UserError("--split valid: the config's data_loader has no validation split")
    return loader


@torch.inference_mode()
def predict(model, data_loader, criterion, metrics, device):
    """Class probabilities for every sample in loader order, and the metrics when the samples are labelled."""
    labelled = getattr(data_loader.dataset, "targets", None) is not None
    tracker = EpochMetrics(metrics)
    probabilities = []
    for data, target in data_loader:
        data, target = data.to(device, non_blocking=True), target.to(device, non_blocking=True)
        output = model(data)
        if labelled:
            tracker.update(criterion(output, target), output, target)
        probabilities.append(output.float().softmax(dim=1))
    return torch.cat(probabilities).cpu(), tracker.result() if labelled else None


def main(argv=None):
    args = parse_args(argv)
    from logger.logger import setup_logging

    logger = setup_logging(1)
    try:
        checkpoint = load_checkpoint(args.resume)
        overrides = args.override + ([f"data_loader.args.batch_size={args.bs}"] if args.bs else [])
        config = validate(apply_overrides(checkpoint["config"], overrides))
        device = resolve_device(args.device, config["n_gpu"], logger)
        data_loader = build_eval_loader(config, args.split)
        model = build(config, "arch")
        if args.ema and checkpoint.get("ema_state_dict") is None:
            raise UserError(f"--ema: checkpoint {args.resume!r} has no EMA weights (train with trainer.ema_decay)")
        load_model_weights(model, checkpoint["ema_state_dict" if args.ema else "state_dict"], args.resume)
        model = model.to(device).eval()
        criterion = build_loss(config)
        if hasattr(criterion, "to"):
            criterion = criterion.to(device)

        probabilities, metrics = predict(model, data_loader, criterion, build_metrics(config), device)
        dataset, rows = data_loader.dataset, data_loader.sampler.indices.tolist()
        # datasets of the competition layout name their rows and classes; other datasets are numbered
        ids = [dataset.ids[i] for i in rows] if hasattr(dataset, "ids") else rows
        classes = getattr(dataset, "classes", None) if hasattr(dataset, "ids") else None
        labels = probabilities.argmax(dim=1).tolist()
        name = f"{args.split}-{Path(args.resume).stem}" + ("-ema" if args.ema else "")
        out = Path(args.out) if args.out else Path(args.resume).parent / name
        out.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"id": list(ids), "label": [classes[i] for i in labels] if classes else labels}).to_csv(
            out / "predictions.csv", index=False)
        if metrics is not None:
            write_json({"checkpoint": str(args.resume), "split": args.split, "ema": args.ema, "n_samples": len(labels),
                        **metrics}, out / "metrics.json")
            logger.info("  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        else:
            logger.info("the test CSV has no labels: wrote predictions only")
        logger.info("wrote %s", out)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
