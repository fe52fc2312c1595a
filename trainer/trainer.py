import contextlib
import itertools
import sys

import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau
from tqdm import tqdm

from base import BaseTrainer
from model.metric import EpochMetrics
from utils import dist
from utils.checkpoint import unwrap


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
        self.step_per_batch = lr_scheduler is not None and config["lr_scheduler"]["step_every"] == "batch"
        self.train_metrics = EpochMetrics(metric_ftns)
        self.valid_metrics = EpochMetrics(metric_ftns)

    def _train_epoch(self, epoch):
        self.model.train()
        self.train_metrics.reset()
        self.data_loader.set_epoch(epoch)
        n_batches = batches_per_epoch(len(self.data_loader), self.limit_train_batches)
        bar = tqdm(itertools.islice(self.data_loader, n_batches), total=n_batches, desc=f"epoch {epoch}/{self.epochs}",
                   unit="batch", leave=False, disable=not (self.is_main and sys.stderr.isatty()), dynamic_ncols=True)
        grad_norm = None
        for batch_idx, (data, target) in enumerate(bar):
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
                self.scaler.step(self.optimizer)
                self.scaler.update()
                if self.ema:
                    self.ema.update(unwrap(self.model))
                if self.step_per_batch:
                    self.lr_scheduler.step()
                self.global_step += 1

            self.train_metrics.update(loss, output, target)
            if batch_idx % self.log_step == 0:
                self._log_step(bar, loss.item(), grad_norm, len(data))
            if batch_idx == 0 and self.writer.writer:
                self.writer.add_image_grid("train/images", data[:64].detach().cpu(), epoch)

        log = self.train_metrics.result()
        if self.valid_data_loader is not None:
            log.update({"val_" + k: v for k, v in self._valid_epoch().items()})
        if self.lr_scheduler is not None and not self.step_per_batch:
            if isinstance(self.lr_scheduler, ReduceLROnPlateau):
                self.lr_scheduler.step(log[self.mnt_metric] if self.mnt_mode != "off" else log.get("val_loss", log["loss"]))
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


def batches_per_epoch(n_batches, limit):
    return min(n_batches, limit) if limit else n_batches
