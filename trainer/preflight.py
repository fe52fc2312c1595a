"""The pre-run trial: the user's real model, loss, metrics, optimizer and schedule run once on the first samples of
the data before anything is written, so that whatever does not fit is one line naming the part that failed."""
import contextlib
import copy
import functools
import inspect
import warnings

import torch

from trainer.steps import evaluation_step
from utils import dist
from utils.checkpoint import unwrap
from utils.util import UserError, first_line


def check_one_batch(trainer):
    """One evaluation batch through the model, the loss and the metrics, then one real training step on a copy of
    the state (weights, optimizer, schedule and counters are put back). Warnings are shown only once it fits."""
    if trainer.closure_step:
        check_closure_fit(trainer)
    with warnings.catch_warnings(record=True) as caught:
        data, target, output = first_samples(trainer, 16)
        flat = flat_output(trainer, output)
        check_width(flat, trainer.task, len(data[0]), type(unwrap(trainer.model)).__name__)
        with torch.no_grad(), trainer._autocast():
            checked_loss_and_metrics(trainer.criterion, trainer.valid_metrics.metrics, output, target,
                                     "the model's output", flat)
        trial_step(trainer, *mixed(trainer, data, target))
    for w in caught:
        warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def check_closure_fit(trainer):
    """Refuse the trainer settings that act on the gradients of the first pass, which an optimizer stepping through
    a closure (SAM, LBFGS) does not step with, or that it cannot take."""
    cfg, name = trainer.cfg, type(trainer.optimizer).__name__
    unfit = {
        "trainer.accumulation_steps": (cfg.accumulation_steps > 1, f"its closure recomputes one batch, not "
                                       f"{cfg.accumulation_steps} accumulated ones; use 1 and a larger batch_size"),
        "trainer.amp": (trainer.scaler.is_enabled(), "fp16 scales the gradients, which a closure step cannot take; "
                                                     "use \"bf16\""),
        "trainer.clip_grad_norm": (bool(cfg.clip_grad_norm), "clipping would act on the gradients of the first "
                                                             "pass, not those it steps with; leave it out"),
        "trainer.nonfinite_loss": (cfg.nonfinite_loss == "skip", "skipping checks the gradients of the first pass, "
                                                                 "not those it steps with; leave it out"),
    }
    for key, (given, why) in unfit.items():
        if given:
            raise UserError(f"{key}: {name} steps through a closure: {why}")


def needs_closure(optimizer):
    """Whether the optimizer's `step` requires a closure that recomputes the loss (SAM, LBFGS)."""
    param = inspect.signature(optimizer.step).parameters.get("closure")
    return param is not None and param.default is param.empty


def check_freezable(model, freeze_backbone_epochs):
    """trainer.freeze_backbone_epochs needs a model that can freeze its backbone, in a run without DDP."""
    if freeze_backbone_epochs and not hasattr(model, "set_backbone_trainable"):
        raise UserError(f"trainer.freeze_backbone_epochs: {type(model).__name__} has no set_backbone_trainable(); "
                        f"use TorchvisionClassifier or add that method")
    if freeze_backbone_epochs and dist.is_distributed():
        raise UserError("trainer.freeze_backbone_epochs: not supported under torchrun (DDP fixes the trainable "
                        "parameters when it starts)")


@torch.no_grad()
def first_samples(trainer, n):
    """The first `n` samples of the evaluation data on the device and the model's whole output for them in
    evaluation mode; a model that cannot take them is one line."""
    loader = trainer.valid_data_loader or trainer.data_loader
    data, target = next(iter(loader))
    data, target = trainer._to_device(data, target, loader)
    data, target = tuple(x[:n] for x in data), target[:n]
    model = unwrap(trainer.model)
    was_training = model.training
    model.eval()
    shapes = ", ".join(str(list(x.shape)) for x in data)
    try:
        with failure_is(f"arch: {type(model).__name__} cannot take a batch of the data (inputs of shape {shapes})"), \
                trainer._autocast():
            output = evaluation_step(model, data)
    finally:
        model.train(was_training)
    return data, target, output


def flat_output(trainer, output):
    """The model's output joined into one [samples, outputs] tensor, as the metrics take it."""
    try:
        return trainer.task.flat(output)
    except (RuntimeError, TypeError) as e:
        raise UserError(f"arch: {type(unwrap(trainer.model)).__name__} returns heads that cannot be joined into one "
                        f"[samples, outputs] tensor: {first_line(e)}") from None


def mixed(trainer, data, target):
    """The batch as training sees it: mixed by CutMix or MixUp when the training loader mixes."""
    mixing = getattr(trainer.data_loader, "mixing", None)
    if not mixing:
        return data, target
    try:
        images, target = mixing(data[0], target)
    except Exception as e:
        raise UserError(f"data_loader.args.batch_transforms: cannot mix a training batch of shape "
                        f"{list(data[0].shape)}: {first_line(e)}") from None
    return (images, *data[1:]), target


def trial_step(trainer, data, target):
    """Trainer.train_step on one batch, then the schedule's epoch step; everything they change is put back."""
    model, schedule = unwrap(trainer.model), trainer.lr_schedule
    saved = copy.deepcopy({"model": model.state_dict(), "optimizer": trainer.optimizer.state_dict(),
                           "schedule": schedule.state_dict() if schedule else None,
                           "scaler": trainer.scaler.state_dict(), "step": trainer.global_step,
                           "ema": trainer.ema.module.state_dict() if trainer.ema else None})
    was_training = model.training
    mixing = " (soft targets: data_loader.args.batch_transforms mix them)" if target.is_floating_point() else ""
    try:
        with torch.enable_grad(), \
                blamed(trainer, "criterion", f"loss: cannot take a training batch of targets shaped "
                                             f"{list(target.shape)}{mixing}"), \
                blamed(trainer.optimizer, "step", f"optimizer: {type(trainer.optimizer).__name__} cannot take a step"):
            model.train()
            loss, _ = train_one_batch(trainer, data, target)
        if schedule is not None:
            with blamed(schedule, "after_epoch", f"lr_scheduler: {type(schedule.scheduler).__name__} cannot take "
                                                 f"a step"):
                schedule.after_epoch(loss.item())
    finally:
        model.load_state_dict(saved["model"])
        trainer.optimizer.load_state_dict(saved["optimizer"])
        if schedule is not None:
            schedule.scheduler.load_state_dict(saved["schedule"])
        trainer.scaler.load_state_dict(saved["scaler"])
        trainer.global_step = saved["step"]
        if trainer.ema:
            trainer.ema.module.load_state_dict(saved["ema"])
        model.zero_grad(set_to_none=True)
        model.train(was_training)


def train_one_batch(trainer, data, target):
    """The real training step on one batch; what fails outside the parts blamed by name is one line too."""
    schedule = trainer.lr_schedule
    name = type(getattr(schedule, "scheduler", None)).__name__
    with failure_is("loss: cannot be backpropagated to the model's weights"), \
            blamed(schedule, "after_optimizer_step", f"lr_scheduler: {name} cannot take a step"):
        return trainer.train_step(data, target, 0, 1)


@contextlib.contextmanager
def failure_is(message):
    """While inside, a failure of the user's code is the UserError `message: <the error>`."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{message}: {first_line(e)}") from None


@contextlib.contextmanager
def blamed(owner, name, message):
    """While inside, a failure of `owner.name(...)` is the UserError `message: <the error>`."""
    if owner is None:
        yield
        return
    original = getattr(owner, name)

    @functools.wraps(original)
    def call(*args, **kwargs):
        with failure_is(message):
            return original(*args, **kwargs)

    had_own = name in vars(owner)
    setattr(owner, name, call)
    try:
        yield
    finally:
        if had_own:
            setattr(owner, name, original)
        else:
            delattr(owner, name)


def check_width(output, task, n, model_name):
    """The model's (joined) output must be [n, the task's width]; one line naming both sides otherwise."""
    if isinstance(output, torch.Tensor) and output.dim() == 2 and output.shape[1] == (task.width or output.shape[1]):
        return
    shape = list(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
    width = task.width or "classes"
    scores = {"multilabel": "one score per label", "regression": "one value per target column"}.get(
        task.kind, "one score per class of each label column" if len(task.heads) > 1 else "one score per class")
    raise UserError(f"arch: {model_name} returns {shape} for {n} samples; expected [{n}, {width}], {scores} of the "
                    f"data ({task.describe()}; set its num_classes to {width}, or return one tensor per head)")


def checked_loss_and_metrics(criterion, metrics, output, target, what, flat=None):
    """Score one batch with the loss (on the whole `output`) and each of `metrics` (on `flat`, the joined output,
    by default `output`), refusing in one line a loss or a metric that cannot take them, and a loss that is not one
    finite number."""
    flat = output if flat is None else flat
    with failure_is(f"loss: cannot take {what} of shape {list(flat.shape)} and targets of shape "
                    f"{list(target.shape)}"):
        loss = criterion(output, target)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise UserError(f"loss: returns {list(getattr(loss, 'shape', []))}; expected one number per batch "
                        f"(a reduction of \"mean\" or \"sum\", not \"none\")")
    if not torch.isfinite(loss):
        raise UserError(f"loss: {loss.item()} on the first samples of the data, before any training: {what} holds "
                        f"{'NaN or infinite values' if not torch.isfinite(flat).all() else 'only finite values'}")
    for name, metric in metrics.items():
        try:
            metric.compute(metric.batch_stats(flat.detach(), target))
        except Exception as e:
            raise UserError(f"metrics: {name} cannot score {what} of shape {list(flat.shape)}: "
                            f"{first_line(e)}") from None
