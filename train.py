"""Train the model a JSON config describes.

    python train.py -c config.json                      a new run under saved/<name>/<run id>/
    python train.py -r saved/<name>/<run id>/checkpoint-last.pth     resume that run exactly
    python train.py -r saved/.../model_best.pth -c other.json        a new run that starts from those weights
"""
import gc
import logging
import shutil
import signal
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from base.base_trainer import TrainingStopped
from base.resume_rules import STEP
from data_loader.data_loaders import class_source, read_classes
from logger.logger import add_log_file, setup_logging
from logger.report import report_from_out_of_fold
from trainer.inference_settings import settle_inference
from trainer.preflight import check_one_batch
from trainer.trackers import build_trackers, tracker_hosts
from trainer.trainer import Trainer
from utils import dist, run_group, withheld
from utils.checkpoint import best_checkpoint, checkpoint_config, load_checkpoint, load_model_weights
from utils.checkpoint_rules import check_checkpoint
from utils.config import (
    apply_overrides,
    build,
    build_loss,
    build_metrics,
    check_monitor,
    load_config,
    optimizer_params,
    overridden_keys,
    split_change,
    validate,
)
from utils.schedule import build_schedule
from utils.task import task_of
from utils.util import (
    ArgumentParser,
    Outcome,
    UserError,
    create_run_dir,
    error_line,
    fault_line,
    new_run_dir,
    offline,
    quiet_handover_errors,
    read_json,
    release_folders,
    resolve_device,
    seed_everything,
    steady_allocator,
    worker_died,
    write_json,
)


def parse_args(argv):
    parser = ArgumentParser(description="Train a model described by a JSON config.")
    parser.add_argument("-c", "--config", help="config file (with -r: fine-tune from the checkpoint's weights)")
    parser.add_argument("-r", "--resume", help="checkpoint (or run folder) to resume")
    parser.add_argument("-d", "--device", help="cpu, cuda, cuda:N or a GPU index (default: from n_gpu)")
    parser.add_argument("--lr", type=float, help="shortcut for -o optimizer.args.lr=LR (and the scheduler's "
                        "max_lr, when it has one)")
    parser.add_argument("--bs", type=int, help="shortcut for -o data_loader.args.batch_size=BS")
    parser.add_argument("--fold", type=int, help="train this fold: shortcut for -o data_loader.args.fold=K")
    parser.add_argument("--folds", choices=("all",),
                        help="train every fold of data_loader.args.n_folds in one run group")
    parser.add_argument("--fast-dev-run", action="store_true",
                        help="one training and one validation batch, nothing written under saved/")
    parser.add_argument("-o", "--override", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="set any config value, e.g. -o trainer.epochs=5 (value parsed as JSON); repeatable")
    return parser.parse_args(argv)


FAST_DEV_RUN = ["trainer.epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
                "trainer.tensorboard=false", "trainer.trackers=[]"]


def command_line_overrides(args):
    """-o's changes, then the shortcuts' (an -o that sets a whole `optimizer` block keeps --lr's rate)."""
    shortcuts = [f"optimizer.args.lr={args.lr}"] if args.lr is not None else []
    shortcuts += [f"data_loader.args.batch_size={args.bs}"] if args.bs is not None else []
    shortcuts += [f"data_loader.args.fold={args.fold}"] if args.fold is not None else []
    return args.override + shortcuts


def run_config(args, group):
    """The validated config of this command (-c, a checkpoint's, or a run group's) with the command line's changes,
    and the checkpoint given with -r (None for a run group or none)."""
    if args.folds and args.resume:
        raise UserError("--folds all trains every fold from the start and cannot take -r; finish a run group with "
                        "python train.py -r <run group>, resume one fold with -r <run group>/fold<K>")
    if group and (args.config or args.fold is not None):
        raise UserError(f"-r {args.resume}: a run group resumes as a whole, with its own config (no -c, no "
                        f"--fold); resume one fold with -r {args.resume}/fold<K>")
    checkpoint = load_checkpoint(args.resume) if args.resume and not group else None
    overrides = command_line_overrides(args) + (FAST_DEV_RUN if args.fast_dev_run else [])
    restored = next((k for k in overridden_keys(overrides) if k.startswith(("optimizer.", "lr_scheduler.")) and
                     k != "lr_scheduler.type"), None) if args.resume and not args.config else None
    if restored:
        raise UserError(f"{'--lr' if args.lr is not None else '-o ' + restored}: a resumed run restores its optimizer "
                        f"and schedule from the checkpoint, rates included, so this would change nothing; start a new "
                        f"run from its weights to change them: -c config.json -r {args.resume}")
    if args.config:
        config = load_config(args.config, overrides)
    elif group or checkpoint is not None:
        config = validate(checkpoint_config(run_group.as_checkpoint(group) if group else checkpoint, overrides,
                                            saving=True))
    else:
        raise UserError("nothing to do: give a config with -c config.json, or a checkpoint to resume with -r")
    if args.lr is not None and "max_lr" in config["lr_scheduler"].get("args", {}):
        config["lr_scheduler"]["args"]["max_lr"] = args.lr  # the rate OneCycleLR or CyclicLR really trains at
    return config, checkpoint


def main(argv=None, hooks=()):
    """Train as the command line says; returns the exit status, whose `run_dir` is the run folder (or run group) made
    (None for --fast-dev-run and on failure). `hooks` (base.hooks.Hook) are told of the run's progress."""
    args = parse_args(argv)
    logger = setup_logging()
    withheld.forget()
    quiet_handover_errors()
    steady_allocator()
    try:
        group = Path(args.resume) if args.resume and run_group.is_run_group(args.resume) else None
        rank, world_size, local_rank = dist.init_distributed()
        config, checkpoint = run_config(args, group)
        logger = setup_logging(config["trainer"]["verbosity"] if rank == 0 else 0)
        if config["n_gpu"] > 1 and world_size == 1 and args.device is None and torch.cuda.device_count() > 1:
            raise UserError(f"n_gpu is {config['n_gpu']}: start one process per GPU with: torchrun "
                            f"--nproc_per_node={config['n_gpu']} train.py {' '.join(argv or sys.argv[1:])}")
        device = resolve_device(args.device or (f"cuda:{local_rank}" if world_size > 1 and torch.cuda.is_available()
                                                else None), config["n_gpu"], logger)
        if (args.fold is not None or args.folds) and not config["data_loader"]["args"].get("n_folds"):
            raise UserError("--fold/--folds: set data_loader.args.n_folds (e.g. -o data_loader.args.n_folds=5)")
        scratch = tempfile.TemporaryDirectory(prefix="fast-dev-run-") if args.fast_dev_run else nullcontext()
        resuming = group or checkpoint is not None and not args.config
        from_checkpoint = offline(f"resuming {args.resume}", allow=tracker_hosts(
            config["trainer"]["trackers"], config["trainer"]["mlflow_uri"])) if resuming else None
        with scratch as scratch_dir, from_checkpoint or nullcontext():
            if scratch_dir:
                config["trainer"]["save_dir"] = scratch_dir
                if config["data_loader"]["args"].get("cache_dir"):
                    config["data_loader"]["args"]["cache_dir"] = None  # decoded in memory: nothing written to disk
            if args.folds == "all" or group:
                run_dir = train_all_folds(config, device, group, hooks)
            else:
                run_dir = Path(scratch_dir) / "run" if scratch_dir else dist.broadcast_object(
                    choose_run_dir(config, args, checkpoint) if rank == 0 else None)
                run_dir = train_one(config, device, run_dir, checkpoint, resume=checkpoint is not None and
                                    not args.config, hooks=hooks).run_dir
    except UserError as e:
        print(error_line(e), file=sys.stderr)
        return Outcome(2)
    except TrainingStopped as e:
        print(f"error: {e}" if e.exit_code == 1 else str(e), file=sys.stderr)
        return Outcome(e.exit_code)
    except (RuntimeError, OSError, EOFError, MemoryError) as e:
        if hasattr(signal, "SIGCHLD"):
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report a dead worker again, anywhere
        if isinstance(e, (OSError, RecursionError, MemoryError)) and not worker_died(e):
            print(fault_line(e), file=sys.stderr)  # a full disk, a read-only folder: checkpoints stay whole
            return Outcome(2)
        if not worker_died(e):
            raise
        detail = " ".join(str(e).split()) or type(e).__name__
        print(f"error: DataLoader worker failed: {detail} (out of memory? try fewer data_loader.args.num_workers); "
              f"the last checkpoint is intact: resume with python train.py -r <run folder>", file=sys.stderr)
        return Outcome(1)
    finally:
        dist.cleanup()
        withheld.forget()  # the next command in this process (a tune.py trial, a script) starts with none
    return Outcome(0, run_dir=None if args.fast_dev_run else run_dir)


def train_one(config, device, run_dir, checkpoint=None, resume=False, hooks=()):
    """Build everything the config names and train in `run_dir` (created only once all is checked); `checkpoint` is
    resumed, or with resume=False fine-tuned from. Returns the trainer."""
    cfg = config["trainer"]
    logger = logging.getLogger("template")
    seed_everything(config["seed"], config["deterministic"])
    data_loader = build(config, "data_loader", seed=config["seed"])
    valid_data_loader = data_loader.split_validation()
    if cfg["overfit_batches"]:
        valid_data_loader = data_loader.overfit(cfg["overfit_batches"])
    model = build(config, "arch")
    if checkpoint is not None and not resume:
        load_model_weights(model, checkpoint["state_dict"], checkpoint["path"])
    # a memory format only when asked: converting one asks every weight its shape, which lazy layers do not know yet
    model = model.to(device, memory_format=torch.channels_last) if cfg["channels_last"] else model.to(device)
    task = task_of(data_loader.dataset)
    check_monitor(config, task)
    check_inference(config["inference"], task)
    if resume:
        check_same_targets(checkpoint, config, task)
    criterion = build_loss(config, task)
    if hasattr(criterion, "to"):
        criterion = criterion.to(device)
    metrics = build_metrics(config, task)

    optimizer = build(config, "optimizer", optimizer_params(config["optimizer"], model))
    lr_schedule = build_schedule(config, optimizer, len(data_loader))
    if dist.world_size() > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg["compile"]:
        model = torch.compile(model)

    trainer = Trainer(model, criterion, metrics, optimizer, config, device, run_dir, data_loader, valid_data_loader,
                      lr_schedule, [*hooks, *build_trackers(config)])
    check_one_batch(trainer)
    if resume:
        trainer.resume(checkpoint)
    if dist.is_main_process():  # the first write: everything above has been checked
        run_dir = trainer.run_dir = create_run_dir(run_dir, continuing=resume)
    try:
        if dist.is_main_process():
            data_loader.write_caches()
            add_log_file(logger, run_dir / "train.log")
            save_run_config(config, run_dir, checkpoint if resume else None)
        log_start(trainer, model, run_dir, device, data_loader, valid_data_loader, checkpoint, resume)
        gc.freeze()  # the objects of torch and the set-up, which the collector would otherwise walk again and again
        trainer.train()
    finally:
        gc.unfreeze()  # what this run leaves behind (one fold of several) can be collected again
        release_folders()
    return trainer


def check_inference(inference, task):
    """test.py's settings for this task, refused now rather than after training (thresholds from oof.csv are
    settled by test.py, once the run group has one)."""
    oof = inference["threshold"] == "oof" and task.kind == "multilabel"
    settle_inference({**inference, "threshold": 0.5} if oof else inference, task)


def check_same_targets(checkpoint, config, task):
    """A resumed run goes on training on the targets it began with (the label columns, the task and its classes) and
    validating on the rows it began with (the seed and the split settings)."""
    then = validate({**checkpoint_config(checkpoint), "import_roots": config["import_roots"]})
    change = split_change(then, config)
    if change:
        raise UserError(f"-r: checkpoint {checkpoint['path']!r}: a resumed run keeps its validation rows ({change} "
                        f"when it began and now); fine-tune from it with -c to change them")
    source = class_source(then)
    columns = None if source is None else read_classes(source, checkpoint["path"])
    if columns is not None and (source[3], columns) != (task.kind, task.columns):
        raise UserError(f"-r: checkpoint {checkpoint['path']!r} was trained on {source[3]} targets "
                        f"{', '.join(columns)[:120]}, and the data now gives {task.kind} ones "
                        f"{', '.join(task.columns or [])[:120]} (data_loader.args: label_column, task, classes); a "
                        f"resumed run keeps its targets: fine-tune from it with -c to change them")


def log_start(trainer, model, run_dir, device, data_loader, valid_data_loader, checkpoint, resume):
    logger = logging.getLogger("template")
    logger.debug(str(model))
    logger.info("run folder: %s", run_dir)
    logger.info("training on %s x %d process(es)%s: %d samples, %d for validation", device, dist.world_size(),
                f" ({torch.distributed.get_backend()})" if dist.is_distributed() else "", data_loader.n_samples,
                len(valid_data_loader.sampler) * dist.world_size() if valid_data_loader else 0)
    if resume and trainer.start_epoch > trainer.cfg.epochs:
        fixed = hasattr(getattr(trainer.lr_schedule, "scheduler", None), "total_steps")  # OneCycleLR: sized once
        logger.info("the run already finished its %d epochs: nothing to train (%s)", trainer.cfg.epochs,
                    "fine-tune from it to train on: -c config.json -r <checkpoint>" if fixed else
                    "raise them with -o trainer.epochs=N")
    elif resume:
        logger.info("resumed at epoch %d, batch %d (global step %d)", trainer.start_epoch, trainer.resume_batches,
                    trainer.global_step)
    elif checkpoint is not None:
        logger.info("fine-tuning: starting from the weights of %s", checkpoint["path"])


def train_all_folds(config, device, group_dir=None, hooks=()):
    """Train every fold into one run group, then score the out-of-fold predictions over the whole training set;
    returns the group's folder. With `group_dir`, finish that group: its finished folds are kept, a fold with a
    checkpoint resumes, the others train."""
    from trainer.inference import combine_out_of_fold, write_out_of_fold  # pandas, needed only here

    n_folds = config["data_loader"]["args"]["n_folds"]
    manifest = run_group.read_manifest(group_dir) if group_dir else {"folds": range(n_folds), "finished": []}
    if len(manifest["folds"]) != n_folds:
        raise UserError(f"data_loader.args.n_folds: the run group {str(group_dir)!r} planned "
                        f"{len(manifest['folds'])} folds, not {n_folds}")
    group_dir = group_dir or dist.broadcast_object(
        new_run_dir(config["trainer"]["save_dir"], config["name"]) if dist.is_main_process() else None)
    logger = logging.getLogger("template")
    trainer = None
    for fold in (k for k in range(n_folds) if k not in manifest["finished"]):
        fold_config = apply_overrides(config, [f"data_loader.args.fold={fold}"])
        run_dir = group_dir / f"fold{fold}"
        logger.info("fold%d (%d of %d)", fold, fold + 1, n_folds)
        checkpoint = load_checkpoint(run_dir) if (run_dir / "checkpoint-last.pth").exists() else None
        if checkpoint is None and run_dir.exists() and dist.is_main_process():  # killed before its first save
            shutil.rmtree(run_dir)
        first = dist.is_main_process() and not (group_dir / run_group.MANIFEST).exists()
        with run_group.planned(group_dir, config, n_folds) if first else nullcontext():
            trainer = train_one(fold_config, device, run_dir, checkpoint, resume=checkpoint is not None,
                                hooks=hooks)
        if dist.is_main_process():
            write_out_of_fold(trainer, load_checkpoint(best_checkpoint(run_dir)), run_dir / "oof.csv")
            run_group.finish(group_dir, fold)
        dist.barrier()
    if dist.is_main_process():
        task = trainer.task if trainer else task_of(build(config, "data_loader", seed=config["seed"]).dataset)
        metrics = combine_out_of_fold(config, task, [group_dir / f"fold{k}" / "oof.csv" for k in range(n_folds)],
                                      group_dir)
        report_from_out_of_fold(group_dir, task)
        logger.info("out-of-fold over %d folds: %s", n_folds, "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return group_dir


def choose_run_dir(config, args, checkpoint):
    """A new run folder, except when resuming from a run's newest checkpoint: that run continues in place."""
    if checkpoint is None or args.config:
        return new_run_dir(config["trainer"]["save_dir"], config["name"])
    path = Path(args.resume)
    run_dir = path if path.is_dir() else path.parent
    last = run_dir / "checkpoint-last.pth"
    if last.exists() and saved_step(load_checkpoint(last)) <= saved_step(checkpoint):
        return run_dir
    return new_run_dir(config["trainer"]["save_dir"], config["name"])


def saved_step(checkpoint):
    """A checkpoint's global_step, checked as resume checks it."""
    check_checkpoint(checkpoint, {"global_step": STEP})
    return checkpoint["global_step"]


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
