"""The learning-rate schedule: which scheduler steps when, how it is sized and how it resumes.

Schedulers sized in optimizer steps (OneCycleLR, CyclicLR) step after every optimizer step, the others after every
epoch; ReduceLROnPlateau is fed the monitored value. All of it is decided by the resolved class, so a scheduler
behaves the same whether the config names it "OneCycleLR" or "torch.optim.lr_scheduler.OneCycleLR".
"""
import inspect
import logging
import math

from torch.optim.lr_scheduler import CyclicLR, OneCycleLR, ReduceLROnPlateau

from utils.util import UserError

STEPPED_PER_BATCH = (OneCycleLR, CyclicLR)


def default_step_every(cls):
    return "batch" if issubclass(cls, STEPPED_PER_BATCH) else "epoch"


def watches_a_metric(cls):
    return issubclass(cls, ReduceLROnPlateau)


class LrSchedule:
    """A scheduler and its step rule; `planned_epochs` is the run's length a fixed-length schedule was sized for."""

    def __init__(self, scheduler, step_every, planned_epochs):
        self.scheduler = scheduler
        self.per_batch = step_every == "batch"
        self.planned_epochs = planned_epochs

    def after_optimizer_step(self):
        if self.per_batch:
            self.scheduler.step()

    def after_epoch(self, monitored):
        """Step an epoch-wise scheduler; `monitored` is the value ReduceLROnPlateau watches (None on an epoch
        without validation: it then waits for the next one)."""
        if self.per_batch:
            return
        if isinstance(self.scheduler, ReduceLROnPlateau):
            if monitored is not None:
                self.scheduler.step(monitored)
        else:
            self.scheduler.step()

    def state_dict(self):
        return self.scheduler.state_dict()

    def load_state_dict(self, state, epochs_then):
        """Restore a saved schedule. A fixed-length one (OneCycleLR) resumed with another number of steps per epoch
        (another process count or batch size) continues at the same fraction of the run; a longer run cannot be
        planned for."""
        sized = {k: v for k, v in vars(self.scheduler).items() if k in ("total_steps", "_schedule_phases")}
        self.scheduler.load_state_dict(state)
        if not sized or sized["total_steps"] == self.scheduler.total_steps:
            return
        name = type(self.scheduler).__name__
        if epochs_then != self.planned_epochs:
            raise UserError(f"trainer.epochs: {name} was sized for {epochs_then} epochs when the run started and "
                            f"cannot be extended; to train longer, fine-tune from this checkpoint with -c config.json "
                            f"-r <checkpoint>")
        scale = sized["total_steps"] / self.scheduler.total_steps
        vars(self.scheduler).update(sized)
        self.scheduler.last_epoch = round(self.scheduler.last_epoch * scale)
        self.scheduler._step_count = self.scheduler.last_epoch + 1
        logging.getLogger("template").info("%s rescaled to %d steps for the new steps per epoch", name,
                                           sized["total_steps"])


def build_schedule(config, optimizer, batches_per_epoch):
    """The config's schedule, or None; a scheduler that takes `total_steps` (OneCycleLR) is given the run's number
    of optimizer steps unless the config sets it (or `epochs`)."""
    from utils.config import build, resolve  # utils.config imports this module for its checks

    spec, cfg = config["lr_scheduler"], config["trainer"]
    if not spec:
        return None
    cls = resolve("lr_scheduler", spec["type"], config["import_roots"])
    extra = {}
    if "total_steps" in inspect.signature(cls).parameters and not {"total_steps", "epochs"} & spec["args"].keys():
        batches = min(batches_per_epoch, cfg["limit_train_batches"] or batches_per_epoch)
        extra["total_steps"] = cfg["epochs"] * math.ceil(batches / cfg["accumulation_steps"])
    extra.update(per_group_rates(cls, spec["args"], optimizer))
    warn_unused_rate(cls, spec["args"], optimizer)
    return LrSchedule(build(config, "lr_scheduler", optimizer, **extra), spec["step_every"], cfg["epochs"])


def per_group_rates(cls, args, optimizer):
    """A scheduler's scalar `max_lr`/`base_lr` (OneCycleLR, CyclicLR) scaled per parameter group, in the ratio of
    each group's rate to the optimizer's own, so that the groups keep their relative rates."""
    groups, base = optimizer.param_groups, optimizer.defaults.get("lr")
    if len(groups) < 2 or not isinstance(base, (int, float)) or not base:
        return {}
    names = inspect.signature(cls).parameters.keys() & {"max_lr", "base_lr"}
    return {name: [args[name] * group["lr"] / base for group in groups]
            for name in names if isinstance(args.get(name), (int, float))}


def warn_unused_rate(cls, args, optimizer):
    """Say so when a scheduler that sets the rate from its own `max_lr` (OneCycleLR, CyclicLR) makes the optimizer's
    single `lr` unused: a value the user changed would otherwise do nothing."""
    lr, max_lr = optimizer.defaults.get("lr"), args.get("max_lr")
    if len(optimizer.param_groups) == 1 and isinstance(max_lr, (int, float)) and isinstance(lr, (int, float)) \
            and not math.isclose(lr, max_lr) and "max_lr" in inspect.signature(cls).parameters:
        logging.getLogger("template").warning(
            "warning: optimizer.args.lr %g is not used: %s sets the rate from its max_lr %g (change "
            "lr_scheduler.args.max_lr, or give --lr to set both)", lr, cls.__name__, max_lr)
