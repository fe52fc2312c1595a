import sys

import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau
from tqdm import tqdm

from base import BaseTrainer
from model.metric import EpochMetrics


class Trainer(BaseTrainer):
    """The training and validation loops; metrics are accumulated on the device and read once per epoch."""

    def __init__(self, model, criterion, metric_ftns, optimizer, config, device, run_dir, data_loader,
                 valid_data_loader=None, lr_scheduler=None):
        super().__init__(model, criterion, metric_ftns, optimizer, config, device, run_dir, lr_scheduler)
        self.data_loader = data_loader
        self.valid_data_loader = valid_data_loader
        self.log_step = config["trainer"]["log_step"]
        self.step_per_batch = lr_scheduler is not None and config["lr_scheduler"]["step_every"] == "batch"
        self.train_metrics = EpochMetrics(metric_ftns)
        self.valid_metrics = EpochMetrics(metric_ftns)

    def _train_epoch(self, epoch):
        self.model.train()
        self.train_metrics.reset()
        self.data_loader.set_epoch(epoch)
        bar = tqdm(self.data_loader, desc=f"epoch {epoch}/{self.epochs}", unit="batch", leave=False,
                   disable=not sys.stderr.isatty(), dynamic_ncols=True)
        for batch_idx, (data, target) in enumerate(bar):
            data, target = data.to(self.device, non_blocking=True), target.to(self.device, non_blocking=True)

            self.optimizer.zero_grad(set_to_none=True)
            output = self.model(data)
            loss = self.criterion(output, target)
            loss.backward()
            self.optimizer.step()
            if self.step_per_batch:
                self.lr_scheduler.step()
            self.global_step += 1

            self.train_metrics.update(loss, output, target)
            if batch_idx % self.log_step == 0:
                step_loss = loss.item()
                bar.set_postfix(loss=f"{step_loss:.4f}", samples_s=f"{(bar.format_dict['rate'] or 0) * len(data):.0f}")
                self.writer.add_scalars("train", {"step_loss": step_loss}, self.global_step)
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

    @torch.inference_mode()
    def _valid_epoch(self):
        self.model.eval()
        self.valid_metrics.reset()
        for data, target in self.valid_data_loader:
            data, target = data.to(self.device, non_blocking=True), target.to(self.device, non_blocking=True)
            output = self.model(data)
            self.valid_metrics.update(self.criterion(output, target), output, target)
        return self.valid_metrics.result()
