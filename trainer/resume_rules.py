"""What a resume accepts in the Trainer's own checkpoint fields, and whether a restored schedule has room for the
steps this run has left."""
import math

import torch

from base.resume_rules import saved_mid_epoch
from model.metric import EpochMetrics
from trainer.preflight import first_samples
from utils.checkpoint import clean_state_dict
from utils.checkpoint_rules import UNREAD, Int, MayLack, Number, OneOf
from utils.util import UserError


def loop_fields(trainer, checkpoint):
    """A mid-epoch position within this run's epoch, the metric sums so far (those one batch leaves, or none yet),
    the EMA weights (or none) and the fp16 scaler's state (or the empty one of a run without it)."""
    scaler = torch.amp.GradScaler("cpu", enabled=True).state_dict()
    return {
        "batches_done": MayLack(Int(0, max(trainer.epoch_batches() - 1, 0), "(a batch within an epoch of this run)")),
        "train_metrics": OneOf(EpochMetrics(trainer.train_metrics.metrics).state_dict(),
                               {**metric_sums_of_one_batch(trainer), "count": Int(1)})
        if saved_mid_epoch(checkpoint) else UNREAD,
        "ema_state_dict": MayLack(OneOf(None, clean_state_dict(trainer.ema.module.state_dict())))
        if trainer.ema else UNREAD,
        "scaler": MayLack(OneOf({}, {**scaler, "scale": Number(finite=True, positive=True)})),
    }


@torch.no_grad()
def metric_sums_of_one_batch(trainer):
    """The metric sums after one evaluation batch of two samples: what a mid-epoch checkpoint's sums look like."""
    data, target, output = first_samples(trainer, 2)
    with trainer._autocast():
        loss = trainer.criterion(output, target)
    sums = EpochMetrics(trainer.train_metrics.metrics)
    sums.update(loss, trainer.task.flat(output), target)
    return sums.state_dict()


def check_schedule_room(trainer, checkpoint):
    """A fixed-length schedule (OneCycleLR) restored from `checkpoint` must have room for the steps left in this
    run: stepped past its end, it would stop the run there."""
    cfg, schedule = trainer.cfg, trainer.lr_schedule
    scheduler = getattr(schedule, "scheduler", None)
    if not hasattr(scheduler, "total_steps") or trainer.start_epoch > cfg.epochs:
        return
    epochs_left, accumulation = cfg.epochs - trainer.start_epoch + 1, cfg.accumulation_steps
    left = epochs_left * math.ceil(trainer.epoch_batches() / accumulation) - trainer.resume_batches // accumulation
    left = left if schedule.per_batch else epochs_left
    if scheduler.last_epoch + left > scheduler.total_steps:
        raise UserError(f"checkpoint {checkpoint['path']!r}: lr_scheduler: {type(scheduler).__name__} is at step "
                        f"{scheduler.last_epoch} of {scheduler.total_steps}, with {left} steps of this run left")
