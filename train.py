"""Train the model a JSON config describes.

    python train.py -c config.json                      a new run under saved/<name>/<run id>/
    python train.py -r saved/<name>/<run id>/checkpoint-last.pth     resume that run exactly
    python train.py -r saved/.../model_best.pth -c other.json        a new run that starts from those weights
"""
import argparse
import inspect
import math
import sys
import tempfile
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from base.base_trainer import TrainingStopped
from utils import dist
from utils.checkpoint import load_checkpoint, load_model_weights
from utils.config import apply_overrides, build, build_loss, build_metrics, load_config, resolve, validate
from utils.util import UserError, make_run_dir, read_json, resolve_device, seed_everything, write_json


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Train a model described by a JSON config.")
    parser.add_argument("-c", "--config", help="config file (with -r: fine-tune from the checkpoint's weights)")
    parser.add_argument("-r", "--resume", help="checkpoint (or run folder) to resume")
    parser.add_argument("-d", "--device", help="cpu, cuda, cuda:N or a GPU index (default: from n_gpu)")
    parser.add_argument("--lr", type=float, help="shortcut for -o optimizer.args.lr=LR")
    parser.add_argument("--bs", type=int, help="shortcut for -o data_loader.args.batch_size=BS")
    parser.add_argument("--fast-dev-run", action="store_true",
                        help="one training and one validation batch, nothing written under saved/")
    parser.add_argument("-o", "--override", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="set any config value, e.g. -o trainer.epochs=5 (value parsed as JSON); repeatable")
    return parser.parse_args(argv)


FAST_DEV_RUN = ["trainer.epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
                "trainer.tensorboard=false"]


def command_line_overrides(args):
    shortcuts = [f"optimizer.args.lr={args.lr}"] if args.lr is not None else []
    shortcuts += [f"data_loader.args.batch_size={args.bs}"] if args.bs is not None else []
    return shortcuts + args.override


def main(argv=None):
    args = parse_args(argv)
    from logger.logger import add_log_file, setup_logging

    logger = setup_logging()
    try:
        rank, world_size, local_rank = dist.init_distributed()
        checkpoint = load_checkpoint(args.resume) if args.resume else None
        overrides = command_line_overrides(args) + (FAST_DEV_RUN if args.fast_dev_run else [])
        if args.config:
            config = load_config(args.config, overrides)
        elif checkpoint is not None:
            config = validate(apply_overrides(checkpoint["config"], overrides))
        else:
            raise UserError("nothing to do: give a config with -c config.json, or a checkpoint to resume with -r")
        cfg = config["trainer"]
        logger = setup_logging(cfg["verbosity"] if rank == 0 else 0)
        if config["n_gpu"] > 1 and world_size == 1 and args.device is None and torch.cuda.device_count() > 1:
            raise UserError(f"n_gpu is {config['n_gpu']}: start one process per GPU with: torchrun "
                            f"--nproc_per_node={config['n_gpu']} train.py {' '.join(argv or sys.argv[1:])}")
        device = resolve_device(args.device or (f"cuda:{local_rank}" if world_size > 1 and torch.cuda.is_available()
                                                else None), config["n_gpu"], logger)
        seed_everything(config["seed"], config["deterministic"])

        data_loader = build(config, "data_loader")
        valid_data_loader = data_loader.split_validation()
        if cfg["overfit_batches"]:
            valid_data_loader = data_loader.overfit(cfg["overfit_batches"])
        model = build(config, "arch")
        if checkpoint is not None and args.config:
            load_model_weights(model, checkpoint["state_dict"], args.resume)
        model = model.to(device, memory_format=torch.channels_last if cfg["channels_last"] else torch.preserve_format)
        criterion = build_loss(config)
        if hasattr(criterion, "to"):
            criterion = criterion.to(device)
        metrics = build_metrics(config)
        optimizer = build(config, "optimizer", [p for p in model.parameters() if p.requires_grad])
        lr_scheduler = build_scheduler(config, optimizer, len(data_loader)) if config["lr_scheduler"] else None
        if world_size > 1:
            model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if cfg["compile"]:
            model = torch.compile(model)

        with tempfile.TemporaryDirectory(prefix="fast-dev-run-") as scratch:
            run_dir = Path(scratch) if args.fast_dev_run else dist.broadcast_object(
                choose_run_dir(config, args, checkpoint) if rank == 0 else None)
            if rank == 0:
                add_log_file(logger, run_dir / "train.log")
                save_run_config(config, run_dir, checkpoint if not args.config else None)
            logger.debug(str(model))
            logger.info("run folder: %s", "(temporary: --fast-dev-run)" if args.fast_dev_run else run_dir)
            logger.info("training on %s x %d process(es): %d samples, %d for validation", device, world_size,
                        data_loader.n_samples, len(valid_data_loader.sampler) * world_size if valid_data_loader else 0)

            from trainer.trainer import Trainer

            trainer = Trainer(model, criterion, metrics, optimizer, config, device, run_dir, data_loader,
                              valid_data_loader, lr_scheduler)
            if checkpoint is not None and not args.config:
                trainer.resume(checkpoint)
            trainer.train()
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"error: {e}" if e.exit_code == 1 else str(e), file=sys.stderr)
        return e.exit_code
    finally:
        dist.cleanup()
    return 0


def one_line(error):
    """A UserError's message; one raised in a DataLoader worker arrives wrapped in that worker's traceback."""
    text = str(error).strip()
    return text.splitlines()[-1].split("UserError: ", 1)[-1] if "Traceback" in text else text


def build_scheduler(config, optimizer, n_batches):
    """The config's scheduler; one that takes `total_steps` (OneCycleLR) gets the run's optimizer steps unless given."""
    spec, cfg = config["lr_scheduler"], config["trainer"]
    target = resolve("lr_scheduler", spec["type"], config["import_roots"])
    extra = {}
    if "total_steps" in inspect.signature(target).parameters and not {"total_steps", "epochs"} & spec["args"].keys():
        n_batches = min(n_batches, cfg["limit_train_batches"] or n_batches)
        extra["total_steps"] = cfg["epochs"] * math.ceil(n_batches / cfg["accumulation_steps"])
    return build(config, "lr_scheduler", optimizer, **extra)


def choose_run_dir(config, args, checkpoint):
    """A new run folder, except when resuming from a run's newest checkpoint: that run continues in place."""
    if checkpoint is None or args.config:
        return make_run_dir(config["trainer"]["save_dir"], config["name"])
    path = Path(args.resume)
    run_dir = path if path.is_dir() else path.parent
    last = run_dir / "checkpoint-last.pth"
    if last.exists() and load_checkpoint(last)["epoch"] <= checkpoint["epoch"]:
        return run_dir
    return make_run_dir(config["trainer"]["save_dir"], config["name"])


def save_run_config(config, run_dir, resumed_from):
    """Save the resolved config; a resumed run keeps its first config.json and records any change beside it."""
    path = run_dir / "config.json"
    if path.exists() and read_json(path) == config:
        return
    if path.exists():
        path = run_dir / f"config-resume-epoch{resumed_from['epoch']}.json"
    write_json(config, path)


if __name__ == "__main__":
    sys.exit(main())
