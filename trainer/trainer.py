import contextlib
import itertools
import sys

import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau
from tqdm import tqdm

from base import BaseTrainer
from base.base_trainer import TrainingStopped
from model.metric import EpochMetrics
from utils import dist
from utils.checkpoint import unwrap
from utils.util import UserError


class Trainer(BaseTrainer):
    """The training and validation loops; metrics are accumulated on the device and read once per epoch."""

    def __init__(self, model, criterion, metric_ftns, optimizer, config, device, run_dir, data_loader,
                 valid_data_loader=None, lr_scheduler=None):
        super().__init__(model, criterion, metric_ftns, optimizer, config, device, run_dir, lr_scheduler)
        cfg = config["trainer"]
        self.data_loader = data_loader
        self.valid_data_loader = valid_data_loader
        self.log_step = cfg["log_step"]
        self.accumulation_steps = cfg["accumulation_steps"]
        self.clip_grad_norm = cfg["clip_grad_norm"]
        self.limit_train_batches = cfg["limit_train_batches"]
        self.limit_val_batches = cfg["limit_val_batches"]
        self.memory_format = torch.channels_last if cfg["channels_last"] else torch.preserve_format
        self.save_every_n_steps = cfg["save_every_n_steps"]
        self.grid_written = False  # train/images: the first batch this process trains
        self.freeze_backbone_epochs = cfg["freeze_backbone_epochs"]
        if self.freeze_backbone_epochs and not hasattr(unwrap(model), "set_backbone_trainable"):
            raise UserError(f"trainer.freeze_backbone_epochs: {type(unwrap(model)).__name__} has no "
                            f"set_backbone_trainable(); use TorchvisionClassifier or add that method")
        if self.freeze_backbone_epochs and dist.is_distributed():
            raise UserError("trainer.freeze_backbone_epochs: not supported under torchrun (DDP fixes the trainable "
                            "parameters when it starts)")
        self.skip_nonfinite = cfg["nonfinite_loss"] == "skip"
        self.step_per_batch = lr_scheduler is not None and config["lr_scheduler"]["step_every"] == "batch"
        self.valid_metrics = EpochMetrics(metric_ftns)

    def _train_epoch(self, epoch):
        if self.freeze_backbone_epochs:
            unwrap(self.model).set_backbone_trainable(epoch > self.freeze_backbone_epochs)
        self.model.train()
        skip = self.resume_batches if epoch == self.start_epoch else 0
        if not skip:
            self.train_metrics.reset()
        self.data_loader.set_epoch(epoch, skip)
        n_batches = batches_per_epoch(len(self.data_loader) + skip, self.limit_train_batches)
        bar = tqdm(itertools.islice(self.data_loader, n_batches - skip), total=n_batches, initial=skip, unit="batch",
                   desc=f"epoch {epoch}/{self.epochs}", leave=False, dynamic_ncols=True,
                   disable=not (self.is_main and sys.stderr.isatty()))
        first_nonfinite = torch.full((), -1, device=self.device)  # batch index of the first non-finite loss
        grad_norm = None
        for batch_idx, (data, target) in enumerate(bar, start=skip):
            data, target = self._to_device(data, target)
            group_start = batch_idx - batch_idx % self.accumulation_steps
            group_size = min(self.accumulation_steps, n_batches - group_start)
            update_now = batch_idx == group_start + group_size - 1

            if batch_idx == group_start:
                self.optimizer.zero_grad(set_to_none=True)
            with self._gradient_sync(update_now):
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    output = self.model(data)
                    loss = self.criterion(output, target)
                self.scaler.scale(loss / group_size).backward()
            if update_now:
                if self.clip_grad_norm:
                    self.scaler.unscale_(self.optimizer)
                    grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad_norm)
                if self.skip_nonfinite and not self.scaler.is_enabled() and not grads_finite(self.model):
                    self.logger.warning("non-finite gradients at epoch %d, batch %d: update skipped", epoch, batch_idx)
                else:  # under fp16 the scaler itself skips steps with non-finite gradients
                    self.scaler.step(self.optimizer)
                self.scaler.update()
                if self.ema:
                    self.ema.update(unwrap(self.model))
                if self.step_per_batch:
                    self.lr_scheduler.step()
                self.global_step += 1

            finite = torch.isfinite(loss.detach())
            if not self.skip_nonfinite:
                first_nonfinite = torch.where((first_nonfinite < 0) & ~finite, batch_idx, first_nonfinite)
            if not self.skip_nonfinite or finite:  # skipping costs one host sync per batch; such batches go unscored
                self.train_metrics.update(loss, output, target)
            if batch_idx % self.log_step == 0:
                self._check_finite(first_nonfinite, epoch)
                self._log_step(bar, loss.item(), grad_norm, len(data))
            if not self.grid_written and self.writer.enabled:  # once per run: PNG-encoding costs ~30 ms
                self.writer.add_image_grid("train/images", data[:64].detach().cpu(), epoch)
                self.grid_written = True
            if update_now and batch_idx + 1 < n_batches and (self._stop_requested(batch_idx) or (
                    self.save_every_n_steps and self.global_step % self.save_every_n_steps == 0)):
                self._check_finite(first_nonfinite, epoch)
                if self.is_main:
                    self._save_checkpoint(epoch, batches_done=batch_idx + 1)
                if self.stop_signal:
                    raise self._stopped(epoch, batch_idx + 1)

        self._check_finite(first_nonfinite, epoch)
        log = self.train_metrics.result()
        if self.valid_data_loader is not None:
            log.update({"val_" + k: v for k, v in self._valid_epoch().items()})
        if self.lr_scheduler is not None and not self.step_per_batch:
            if isinstance(self.lr_scheduler, ReduceLROnPlateau):
                watched = log[self.mnt_metric] if self.mnt_mode != "off" else log.get("val_loss", log["loss"])
                self.lr_scheduler.step(watched)
            else:
                self.lr_scheduler.step()
        return log

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
        n_batches = batches_per_epoch(len(self.valid_data_loader), self.limit_val_batches)
        for data, target in itertools.islice(self.valid_data_loader, n_batches):
            data, target = self._to_device(data, target)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                output = model(data)
                loss = self.criterion(output, target)
            self.valid_metrics.update(loss, output, target)
        return self.valid_metrics.result()

    def _to_device(self, data, target):
        data = data.to(self.device, non_blocking=True)
        if data.dim() == 4:
            data = data.contiguous(memory_format=self.memory_format)
        return data, target.to(self.device, non_blocking=True)

    def _check_finite(self, first_nonfinite, epoch):
        """Stop (keeping the last checkpoint, which predates the bad batch) once a loss was NaN or infinite."""
        if dist.all_reduce_sum((first_nonfinite >= 0).float()).item():
            batch = int(first_nonfinite) if first_nonfinite >= 0 else "(on another process)"
            raise TrainingStopped(f"the loss became non-finite at epoch {epoch}, batch {batch}; the last good "
                                  f"checkpoint is kept in {self.run_dir}; set trainer.nonfinite_loss to \"skip\" to "
                                  f"skip such batches", 1)

    def _stop_requested(self, batch_idx):
        """Whether a signal asked to stop; under DDP the ranks agree on it every log_step batches."""
        if not dist.is_distributed():
            return self.stop_signal is not None
        if batch_idx % self.log_step:
            return False
        flag = dist.all_reduce_sum(torch.tensor(float(self.stop_signal is not None), device=self.device))
        if flag.item() and self.stop_signal is None:
            self.stop_signal = "SIGTERM"
        return bool(flag.item())

    def _gradient_sync(self, update_now):
        """Under DDP, skip the gradient all-reduce on micro-batches that only accumulate."""
        if update_now or not hasattr(self.model, "no_sync"):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def _log_step(self, bar, step_loss, grad_norm, batch_size):
        bar.set_postfix(loss=f"{step_loss:.4f}", samples_s=f"{(bar.format_dict['rate'] or 0) * batch_size:.0f}")
        scalars = {"step_loss": step_loss}
        if grad_norm is not None:
            scalars["grad_norm"] = grad_norm.item()
        self.writer.add_scalars("train", scalars, self.global_step)


def grads_finite(model):
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else True


def batches_per_epoch(n_batches, limit):
    return min(n_batches, limit) if limit else n_batches
