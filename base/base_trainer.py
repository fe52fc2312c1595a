import csv
import logging
import math
import os
import shutil
import time

from logger.visualization import TensorboardWriter
from utils.checkpoint import clean_state_dict, load_model_weights, save_checkpoint, unwrap
from utils.util import UserError, get_rng_state, set_rng_state


class BaseTrainer:
    """Owns the epoch loop, monitoring, early stopping, checkpoints and resuming.

    Subclasses implement `_train_epoch(epoch)`, which returns the epoch's log: training values under their names
    and validation values prefixed with `val_`.
    """

    def __init__(self, model, criterion, metric_ftns, optimizer, config, device, run_dir, lr_scheduler=None):
        self.config = config
        cfg = config["trainer"]
        self.logger = logging.getLogger("template")
        self.model = model
        self.criterion = criterion
        self.metric_ftns = metric_ftns
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.device = device
        self.run_dir = run_dir
        self.epochs = cfg["epochs"]
        self.save_period = cfg["save_period"]
        self.early_stop = cfg["early_stop"]

        self.mnt_mode, _, self.mnt_metric = cfg["monitor"].partition(" ")
        self.mnt_best = {"min": math.inf, "max": -math.inf}.get(self.mnt_mode)
        self.not_improved_count = 0
        self.start_epoch = 1
        self.global_step = 0
        self.writer = TensorboardWriter(run_dir / "tensorboard", cfg["tensorboard"])

    def _train_epoch(self, epoch):
        raise NotImplementedError

    def train(self):
        """Run the remaining epochs; returns the last epoch's log."""
        log = {}
        for epoch in range(self.start_epoch, self.epochs + 1):
            started = time.perf_counter()
            log = self._train_epoch(epoch)
            self._report_epoch(epoch, log, time.perf_counter() - started)
            improved = self._update_monitor(log)
            self._save_checkpoint(epoch, save_best=improved)
            if self.early_stop and self.not_improved_count >= self.early_stop:
                self.logger.info("%s did not improve for %d epochs: stopping early", self.mnt_metric, self.early_stop)
                break
        self.writer.close()
        return log

    def _report_epoch(self, epoch, log, seconds):
        values = "  ".join(f"{k} {v:.4f}" for k, v in log.items())
        self.logger.info("epoch %d/%d  %s  (%.1f s)", epoch, self.epochs, values, seconds)
        lr = self.optimizer.param_groups[0]["lr"]
        self.writer.add_scalars("train", {k: v for k, v in log.items() if not k.startswith("val_")} | {"lr": lr}, epoch)
        self.writer.add_scalars("valid", {k[4:]: v for k, v in log.items() if k.startswith("val_")}, epoch)
        history = self.run_dir / "history.csv"
        row = {"epoch": epoch, **log, "lr": lr}
        new_file = not history.exists()
        with open(history, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new_file:
                writer.writeheader()
            writer.writerow(row)

    def _update_monitor(self, log):
        """True when the monitored metric improved this epoch; counts epochs without improvement."""
        if self.mnt_mode == "off":
            return False
        value = log[self.mnt_metric]
        improved = value < self.mnt_best if self.mnt_mode == "min" else value > self.mnt_best
        if improved:
            self.mnt_best = value
            self.not_improved_count = 0
        else:
            self.not_improved_count += 1
        return improved

    def state_dict(self, epoch):
        """Everything needed to continue the run exactly, as tensors and plain data only."""
        return {
            "arch": type(unwrap(self.model)).__name__,
            "epoch": epoch,
            "global_step": self.global_step,
            "state_dict": clean_state_dict(unwrap(self.model).state_dict()),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
            "monitor_best": self.mnt_best,
            "not_improved_count": self.not_improved_count,
            "rng": get_rng_state(),
            "config": self.config,
        }

    def _save_checkpoint(self, epoch, save_best=False):
        last = self.run_dir / "checkpoint-last.pth"
        save_checkpoint(self.state_dict(epoch), last)
        copies = []
        if self.save_period and epoch % self.save_period == 0:
            copies.append(self.run_dir / f"checkpoint-epoch{epoch}.pth")
        if save_best:
            copies.append(self.run_dir / "model_best.pth")
            self.logger.info("saved model_best.pth (%s %.4f)", self.mnt_metric, self.mnt_best)
        for path in copies:
            tmp = path.with_name(path.name + ".tmp")
            shutil.copyfile(last, tmp)
            os.replace(tmp, path)

    def resume(self, checkpoint):
        """Restore model, optimizer, scheduler, counters and random state from a loaded checkpoint."""
        load_model_weights(self.model, checkpoint["state_dict"], "resume")
        try:
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            if self.lr_scheduler is not None and checkpoint["lr_scheduler"] is not None:
                self.lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise UserError(f"resume: the checkpoint's optimizer state does not fit this optimizer ({e})") from None
        self.start_epoch = checkpoint["epoch"] + 1
        self.global_step = checkpoint["global_step"]
        self.mnt_best = checkpoint["monitor_best"]
        self.not_improved_count = checkpoint["not_improved_count"]
        set_rng_state(checkpoint["rng"])
        self.logger.info("resumed from epoch %d; continuing at epoch %d", checkpoint["epoch"], self.start_epoch)

