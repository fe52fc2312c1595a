import contextlib
import itertools
import sys

import torch
from tqdm import tqdm

from base import BaseTrainer
from base.base_data_loader import inputs_to
from base.base_trainer import TrainingStopped
from model.metric import EpochMetrics
from trainer.ema import ModelEma
from trainer.preflight import check_freezable, needs_closure
from trainer.resume_rules import check_schedule_room, loop_fields
from trainer.steps import as_inputs, evaluation_step
from utils import dist
from utils.checkpoint import clean_state_dict, load_model_weights, unwrap
from utils.checkpoint_rules import restoring
from utils.task import as_targets, task_of

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Trainer(BaseTrainer):
    """The training and validation loops with mixed precision, gradient accumulation, clipping, EMA and DDP;
    metrics are accumulated on the device and read once per epoch."""

    def __init__(self, model, criterion, metrics, optimizer, config, device, run_dir, data_loader,
                 valid_data_loader=None, lr_schedule=None, hooks=()):
        super().__init__(model, optimizer, config, run_dir, lr_schedule, hooks)
        self.criterion = criterion
        self.device = device
        self.data_loader = data_loader
        self.valid_data_loader = valid_data_loader
        self.task = task_of(data_loader.dataset)
        mixing = getattr(data_loader, "mixing", None)
        self.train_metrics = EpochMetrics({} if mixing else metrics)
        if mixing and metrics:
            self.logger.info("training batches are mixed (data_loader.args.batch_transforms): the metrics are scored "
                             "on validation only; training logs its loss")
        self.valid_metrics = EpochMetrics(metrics)
        self.amp_dtype = AMP_DTYPES[self.cfg.amp]
        if self.amp_dtype is torch.float16 and device.type != "cuda":
            self.logger.warning("warning: trainer.amp \"fp16\" needs a CUDA device; training in float32 instead "
                                "(\"bf16\" works on the CPU)")
            self.amp_dtype = None
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype is torch.float16)
        self.ema = ModelEma(unwrap(model), self.cfg.ema_decay) if self.cfg.ema_decay else None
        self.closure_step = needs_closure(optimizer)
        self.memory_format = torch.channels_last if self.cfg.channels_last else torch.preserve_format
        self.grid_written = False  # train/images: the first batch this process trains
        self.epoch = 0  # the epoch being trained; 0 before the first (the pre-run trial)
        check_freezable(unwrap(model), self.cfg.freeze_backbone_epochs)

    def _train_epoch(self, epoch):
        skip, n_batches = self._start_epoch(epoch)
        for batch_idx, (data, target) in enumerate(self._progress(epoch, skip, n_batches), start=skip):
            data, target = self._to_device(data, target, self.data_loader)
            loss, output = self.train_step(data, target, batch_idx, n_batches)
            self._track(epoch, batch_idx, loss, output, target, data)
            if self._accumulation(batch_idx, n_batches)[2] and batch_idx + 1 < n_batches:
                self._save_mid_epoch_if_due(epoch, batch_idx)

        self._check_finite(epoch)
        log = self.train_metrics.result()
        if self.valid_data_loader is not None and self.should_validate(epoch):
            val_log = {"val_" + k: v for k, v in self._valid_epoch().items()}
            self.on_validation_end(epoch, val_log)
            log.update(val_log)
        return log

    def train_step(self, data, target, batch_idx, n_batches):
        """One batch: forward, loss and backward; at the end of an accumulation group, the optimizer step. An
        optimizer whose `step` requires a closure (SAM, LBFGS) is given one that recomputes the loss and gradients."""
        starts_group, group_size, ends_group = self._accumulation(batch_idx, n_batches)
        if starts_group:
            self.optimizer.zero_grad(set_to_none=True)
        with self._gradient_sync(ends_group):
            loss, output = self._forward_backward(data, target, group_size)
        if ends_group:
            self._optimizer_step(lambda: self._forward_backward(data, target, group_size, zero_grad=True)[0],
                                 batch_idx)
        return loss, output

    def _forward_backward(self, data, target, group_size, zero_grad=False):
        """The model's whole output and the loss on it, whose gradients (scaled under fp16) are accumulated."""
        with torch.enable_grad():
            if zero_grad:
                self.optimizer.zero_grad(set_to_none=True)
            with self._autocast():
                output = self.model(*data)
                loss = self.criterion(output, target)
            self.scaler.scale(loss / group_size).backward()
        return loss, output

    def _optimizer_step(self, closure, batch_idx):
        """Clip, step (unless non-finite gradients are to be skipped), then update EMA and a per-batch schedule."""
        if self.cfg.clip_grad_norm:
            self.scaler.unscale_(self.optimizer)
            self.grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad_norm)
        if self.cfg.nonfinite_loss == "skip" and not self.scaler.is_enabled() and not grads_finite(self.model):
            self.logger.warning("non-finite gradients at epoch %d, batch %d: update skipped", self.epoch, batch_idx)
        elif self.closure_step:
            self.optimizer.step(closure)
        else:  # under fp16 the scaler itself skips steps with non-finite gradients
            self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema:
            self.ema.update(unwrap(self.model))
        if self.lr_schedule is not None:
            self.lr_schedule.after_optimizer_step()
        self.global_step += 1

    def _accumulation(self, batch_idx, n_batches):
        """(whether the batch starts an accumulation group, the group's size, whether it ends it); the epoch's last
        group may be shorter."""
        group_start = batch_idx - batch_idx % self.cfg.accumulation_steps
        group_size = min(self.cfg.accumulation_steps, n_batches - group_start)
        return batch_idx == group_start, group_size, batch_idx == group_start + group_size - 1

    def _gradient_sync(self, update_now):
        """Under DDP, skip the gradient all-reduce on micro-batches that only accumulate."""
        if update_now or not hasattr(self.model, "no_sync"):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def _start_epoch(self, epoch):
        """Prepare the model, metrics and loader for an epoch; returns (batches already trained, batches in it)."""
        if self.cfg.freeze_backbone_epochs:
            unwrap(self.model).set_backbone_trainable(epoch > self.cfg.freeze_backbone_epochs)
        self.model.train()
        self.epoch = epoch
        skip = self.resume_batches if epoch == self.start_epoch else 0
        if not skip:
            self.train_metrics.reset()
        self.data_loader.set_epoch(epoch, skip)
        self.first_nonfinite = torch.full((), -1, device=self.device)  # batch index of the first non-finite loss
        self.grad_norm = None
        return skip, batches_per_epoch(len(self.data_loader) + skip, self.cfg.limit_train_batches)

    def _progress(self, epoch, skip, n_batches):
        """The epoch's remaining batches behind a progress bar (drawn only in a terminal, by the main process)."""
        self.bar = tqdm(itertools.islice(self.data_loader, n_batches - skip), total=n_batches, initial=skip,
                        unit="batch", desc=f"epoch {epoch}/{self.cfg.epochs}", leave=False, dynamic_ncols=True,
                        disable=not (self.is_main and sys.stderr.isatty()))
        return self.bar

    def _track(self, epoch, batch_idx, loss, output, target, data):
        """Metrics, the non-finite-loss watch, the progress bar and TensorBoard, without a host sync per batch."""
        finite = torch.isfinite(loss.detach())
        skipping = self.cfg.nonfinite_loss == "skip"
        if not skipping:
            self.first_nonfinite = torch.where((self.first_nonfinite < 0) & ~finite, batch_idx, self.first_nonfinite)
        if not skipping or finite:  # skipping costs one host sync per batch; such batches go unscored
            self.train_metrics.update(loss, self.task.flat(output), target)
        if batch_idx % self.cfg.log_step == 0:
            self._check_finite(epoch)
            self._log_step(loss.item(), len(data[0]))
        if not self.grid_written and self.writer.enabled:  # once per run: encoding the grid is costly
            self.writer.add_image_grid("train/images", data[0][:64].detach().cpu(), epoch)
            self.grid_written = True

    def _save_mid_epoch_if_due(self, epoch, batch_idx):
        """Save checkpoint-last.pth inside the epoch every save_every_n_steps steps, or on a stop request, then stop."""
        due = self.cfg.save_every_n_steps and self.global_step % self.cfg.save_every_n_steps == 0
        if not (self._stop_requested(batch_idx) or due):
            return
        self._check_finite(epoch)
        if self.is_main:
            self._save_checkpoint(epoch, batches_done=batch_idx + 1)
        if self.stop_signal:
            raise self._stopped(epoch, batch_idx + 1)

    def _valid_epoch(self):
        """Metrics of the raw weights and, with EMA on, of the averaged weights (prefixed `ema_`)."""
        model = unwrap(self.model)
        dist.broadcast_buffers(model)
        log = self.evaluate(model)
        if self.ema:
            dist.broadcast_buffers(self.ema.module)
            log.update({"ema_" + k: v for k, v in self.evaluate(self.ema.module).items()})
        return log

    @torch.inference_mode()
    def evaluate(self, model):
        model.eval()
        self.valid_metrics.reset()
        n_batches = batches_per_epoch(len(self.valid_data_loader), self.cfg.limit_val_batches)
        for data, target in itertools.islice(self.valid_data_loader, n_batches):
            data, target = self._to_device(data, target, self.valid_data_loader)
            with self._autocast():
                output = evaluation_step(model, data)
                loss = self.criterion(output, target)
            self.valid_metrics.update(loss, self.task.flat(output), target)
        return self.valid_metrics.result()

    def _to_device(self, data, target, loader):
        """The batch on the device: its inputs as a tuple (the images first, in the trainer's memory format)."""
        images, *others = as_inputs(inputs_to(self.device, data, loader))
        if images.dim() == 4:
            images = images.contiguous(memory_format=self.memory_format)
        return (images, *others), as_targets(target).to(self.device, non_blocking=True)

    def _autocast(self):
        if self.amp_dtype is None:  # entering even a disabled autocast asks CUDA for its device count
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _check_finite(self, epoch):
        """Stop (keeping the last checkpoint, which predates the bad batch) once a loss was NaN or infinite."""
        if dist.all_reduce_sum((self.first_nonfinite >= 0).float()).item():
            batch = int(self.first_nonfinite) if self.first_nonfinite >= 0 else "(on another process)"
            kept = f"the last good checkpoint is kept in {self.run_dir}" if (self.run_dir / "checkpoint-last.pth") \
                .exists() else f"no checkpoint was saved yet in {self.run_dir}"
            raise TrainingStopped(f"the loss became non-finite at epoch {epoch}, batch {batch}; {kept}; set "
                                  f"trainer.nonfinite_loss to \"skip\" to skip such batches", 1)

    def _stop_requested(self, batch_idx):
        """Whether a signal asked to stop; under DDP the ranks agree on it every log_step batches."""
        if not dist.is_distributed():
            return self.stop_signal is not None
        if batch_idx % self.cfg.log_step:
            return False
        flag = dist.all_reduce_sum(torch.tensor(float(self.stop_signal is not None), device=self.device))
        if flag.item() and self.stop_signal is None:
            self.stop_signal = "SIGTERM"
        return bool(flag.item())

    def _log_step(self, step_loss, batch_size):
        rate = (self.bar.format_dict["rate"] or 0) * batch_size
        self.bar.set_postfix(loss=f"{step_loss:.4f}", samples_s=f"{rate:.0f}")
        scalars = {"step_loss": step_loss}
        if self.grad_norm is not None:
            scalars["grad_norm"] = self.grad_norm.item()
        self.writer.add_scalars("train", scalars, self.global_step)

    def state_dict(self, epoch, batches_done=0):
        """The generic state plus the mixed-precision scaler, the EMA weights and a mid-epoch's metric sums."""
        return {
            **super().state_dict(epoch, batches_done),
            "train_metrics": self.train_metrics.state_dict() if batches_done else None,
            "ema_state_dict": clean_state_dict(self.ema.module.state_dict()) if self.ema else None,
            "scaler": self.scaler.state_dict(),
        }

    def checkpoint_fields(self, checkpoint):
        """The generic fields and the trainer's own (trainer.resume_rules)."""
        return {**super().checkpoint_fields(checkpoint), **loop_fields(self, checkpoint)}

    def epoch_batches(self):
        """The batches an epoch of this run trains."""
        return batches_per_epoch(len(self.data_loader), self.cfg.limit_train_batches)

    def resume(self, checkpoint):
        super().resume(checkpoint)
        check_schedule_room(self, checkpoint)
        if self.ema:  # a checkpoint without EMA weights starts the average at its own weights
            saved = checkpoint.get("ema_state_dict")
            with restoring(checkpoint, "ema_state_dict"):
                load_model_weights(self.ema.module, clean_state_dict(unwrap(self.model).state_dict())
                                   if saved is None else saved, checkpoint["path"])
        if checkpoint.get("scaler"):
            with restoring(checkpoint, "scaler"):
                self.scaler.load_state_dict(checkpoint["scaler"])
        if self.resume_batches:
            saved = checkpoint["train_metrics"]
            with restoring(checkpoint, "train_metrics"):
                if saved["count"] is None:  # every batch so far was skipped as non-finite
                    self.train_metrics.reset()
                else:
                    self.train_metrics.load_state_dict(saved, self.device)


def grads_finite(model):
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else True


def batches_per_epoch(n_batches, limit):
    return min(n_batches, limit) if limit else n_batches
