import logging
import math
import shlex
import signal
import threading
import time

from base.resume_rules import base_fields, check_resumable, saved_epochs
from logger.history import append_row, rate_columns, trim_history
from logger.visualization import TensorboardWriter
from utils import dist
from utils.checkpoint import clean_state_dict, load_model_weights, save_checkpoint, unwrap
from utils.checkpoint_rules import restoring
from utils.settings import TrainerSettings
from utils.util import atomic_write, epoch_seed, get_rng_state, link_or_copy, seed_everything, set_rng_state


class TrainingStopped(Exception):
    """Training ended before its last epoch (a signal, a non-finite loss); the message says what to do next."""

    def __init__(self, message, exit_code):
        super().__init__(message)
        self.exit_code = exit_code


class BaseTrainer:
    """The generic machinery around the batch loop: epochs, monitoring, early stopping, checkpoints, resuming and
    signals.

    Subclasses implement `_train_epoch(epoch)`, which returns the epoch's log: training values under their names
    and validation values prefixed with `val_`. Only the main process writes logs, events and checkpoints.
    """

    def __init__(self, model, optimizer, config, run_dir, lr_schedule=None, hooks=()):
        self.config = config
        self.hooks = list(hooks)
        self.cfg = TrainerSettings(**config["trainer"])
        self.logger = logging.getLogger("template")
        self.model = model
        self.optimizer = optimizer
        self.lr_schedule = lr_schedule
        self.run_dir = run_dir
        self.is_main = dist.is_main_process()
        self.mnt_mode, _, self.mnt_metric = self.cfg.monitor.partition(" ")
        self.mnt_best = {"min": math.inf, "max": -math.inf}.get(self.mnt_mode)
        self.mnt_last = None
        self.not_improved_count = 0
        self.top_k = []  # [monitored value, epoch] of the checkpoints kept by save_top_k, best first
        self.start_epoch = 1
        self.resume_batches = 0  # batches of start_epoch already trained (a checkpoint saved mid-epoch)
        self.global_step = 0
        self.stop_signal = None
        self.epoch_lr = None  # the learning rate the current epoch started with, as logged in history.csv
        self.writer = None  # TensorBoard, under the run folder as finally created

    def _train_epoch(self, epoch):
        raise NotImplementedError

    def train(self):
        """Run the remaining epochs; returns the last epoch's log. SIGINT/SIGTERM save a checkpoint, then stop."""
        log = {}
        handled = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
        previous = {s: signal.signal(s, self._request_stop) for s in handled}
        tensorboard = self.cfg.tensorboard and "tensorboard" in self.cfg.trackers
        self.writer = TensorboardWriter(self.run_dir / "tensorboard", tensorboard and self.is_main)
        if self.is_main:
            trim_history(self.run_dir / "history.csv", self.start_epoch)
        try:
            self.on_run_start()
            for epoch in range(self.start_epoch, self.cfg.epochs + 1):
                if not (epoch == self.start_epoch and self.resume_batches):
                    seed_everything(epoch_seed(self.config["seed"], epoch) + 7919 * dist.rank())
                    self.epoch_lr = group_rates(self.optimizer)
                started = time.perf_counter()
                log = self._train_epoch(epoch)
                if self.lr_schedule is not None:
                    self.lr_schedule.after_epoch(self._watched_value(epoch, log))
                improved = self._update_monitor(log)
                if self.is_main:
                    row = self._report_epoch(epoch, log, self.epoch_lr, time.perf_counter() - started)
                    self._save_checkpoint(epoch, save_best=improved)
                self.on_epoch_end(epoch, row if self.is_main else log)
                dist.barrier()
                if self.stop_signal and epoch < self.cfg.epochs:
                    raise self._stopped(epoch, 0)
                if self.cfg.early_stop and self.not_improved_count >= self.cfg.early_stop:
                    self.logger.info("%s did not improve for %d measurements: stopping early", self.mnt_metric,
                                     self.cfg.early_stop)
                    break
            self.on_run_end(log)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.writer.close()
        return log

    def _watched_value(self, epoch, log):
        """What a scheduler watching a metric (ReduceLROnPlateau) is given: the monitored value, else the validation
        loss (the training loss when nothing is validated); None after an epoch without validation: it waits."""
        if self.mnt_mode != "off":
            return log.get(self.mnt_metric)
        return log.get("val_loss", log["loss"]) if self.should_validate(epoch) else None

    def should_validate(self, epoch):
        """Whether `epoch` ends with validation: every `val_every_n_epochs` epochs, and the last one."""
        return epoch % self.cfg.val_every_n_epochs == 0 or epoch == self.cfg.epochs

    def on_run_start(self):
        self._call_hooks("on_run_start")

    def on_validation_end(self, epoch, log):
        self._call_hooks("on_validation_end", epoch, log)

    def on_epoch_end(self, epoch, log):
        self._call_hooks("on_epoch_end", epoch, log)

    def on_run_end(self, log):
        self._call_hooks("on_run_end", log)

    def _call_hooks(self, name, *args):
        """Call `name` on every hook (base.hooks.Hook), in the main process only; a hook that raises there ends the
        run in every process (the others would wait for it forever)."""
        if not self.hooks:
            return
        failed = None
        try:
            if self.is_main:
                for hook in self.hooks:
                    getattr(hook, name)(self, *args)
        except BaseException as e:
            failed = e
        if dist.broadcast_object(failed is not None) and failed is None:
            raise TrainingStopped(f"a hook failed in the main process during {name}", 1)
        if failed is not None:
            raise failed

    def _request_stop(self, signum, frame):
        """First signal: finish the current optimizer step, save, exit. A second one stops at once."""
        self.stop_signal = signal.Signals(signum).name
        signal.signal(signum, signal.SIG_DFL if signum != signal.SIGINT else signal.default_int_handler)

    def _stopped(self, epoch, batches_done):
        """The exception that ends a run stopped by a signal, once its state is saved: it says how to resume."""
        dist.barrier()
        last = self.run_dir / "checkpoint-last.pth"
        where = f"epoch {epoch}, batch {batches_done}" if batches_done else f"the end of epoch {epoch}"
        return TrainingStopped(f"stopped by {self.stop_signal} at {where}: state saved to {last}; "
                               f"resume with: python train.py -r {shlex.quote(str(last))}",
                               128 + getattr(signal, self.stop_signal))

    def _report_epoch(self, epoch, log, lr, seconds):
        """Log line, TensorBoard scalars and a history.csv row, which it returns (without the epoch); `lr` is the rate
        (one per parameter group) the epoch started with: `lr`, or `lr_<group>` for each group."""
        values = "  ".join(f"{k} {v:.4f}" for k, v in log.items())
        self.logger.info("epoch %d/%d  %s  (%.1f s)", epoch, self.cfg.epochs, values, seconds)
        rates = rate_columns(lr, self.optimizer.param_groups)
        self.writer.add_scalars("train", {k: v for k, v in log.items() if not k.startswith("val_")} | rates, epoch)
        self.writer.add_scalars("valid", {k[4:]: v for k, v in log.items() if k.startswith("val_")}, epoch)
        append_row(self.run_dir / "history.csv", {"epoch": epoch, **log, **rates})
        return {**log, **rates}

    def _update_monitor(self, log):
        """True when the monitored metric improved this epoch; counts measurements without improvement (an epoch
        without validation measures no validation metric)."""
        self.mnt_last = log.get(self.mnt_metric)
        if self.mnt_mode == "off" or self.mnt_last is None:
            return False
        value = self.mnt_last
        improved = value < self.mnt_best if self.mnt_mode == "min" else value > self.mnt_best
        if improved:
            self.mnt_best = value
            self.not_improved_count = 0
        else:
            self.not_improved_count += 1
        return improved

    def state_dict(self, epoch, batches_done=0):
        """Everything needed to continue the run exactly, as tensors and plain data only; subclasses add their own.

        `batches_done` > 0 marks a checkpoint taken inside `epoch`, after that many batches."""
        return {
            "epoch": epoch,
            "batches_done": batches_done,
            "epoch_lr": self.epoch_lr,
            "global_step": self.global_step,
            "state_dict": clean_state_dict(unwrap(self.model).state_dict()),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_schedule.state_dict() if self.lr_schedule is not None else None,
            "monitor_best": self.mnt_best,
            "not_improved_count": self.not_improved_count,
            "top_k": self.top_k,
            "rng": get_rng_state(),
            "config": self.config,
        }

    def _save_checkpoint(self, epoch, save_best=False, batches_done=0):
        """checkpoint-last.pth always (mid-epoch too); at an epoch's end also the periodic, best and top-k copies."""
        if batches_done:
            save_checkpoint(self.state_dict(epoch, batches_done), self.run_dir / "checkpoint-last.pth")
            return
        copies = []
        if self.cfg.save_period and epoch % self.cfg.save_period == 0:
            copies.append(self.run_dir / f"checkpoint-epoch{epoch}.pth")
        if save_best:
            copies.append(self.run_dir / "model_best.pth")
            self.logger.info("saved model_best.pth (%s %.4f)", self.mnt_metric, self.mnt_best)
        if self.cfg.save_top_k and self._enters_top_k(epoch):
            copies.append(self.run_dir / f"top-epoch{epoch}.pth")
        last = self.run_dir / "checkpoint-last.pth"
        save_checkpoint(self.state_dict(epoch), last)
        for path in copies:  # a hard link stays valid: checkpoint-last.pth is always replaced, never rewritten
            atomic_write(path, lambda tmp: link_or_copy(last, tmp))

    def _enters_top_k(self, epoch):
        """Add this epoch to the best-k list if it belongs there; delete the checkpoint that drops out."""
        if self.mnt_last is None or math.isnan(self.mnt_last):
            return False
        self.top_k.append([self.mnt_last, epoch])
        self.top_k.sort(key=lambda item: item[0], reverse=self.mnt_mode == "max")
        for _, dropped in self.top_k[self.cfg.save_top_k:]:
            (self.run_dir / f"top-epoch{dropped}.pth").unlink(missing_ok=True)
        del self.top_k[self.cfg.save_top_k:]
        return any(e == epoch for _, e in self.top_k)

    def checkpoint_fields(self, checkpoint):
        """What resume accepts in each field of `checkpoint` (base.resume_rules); subclasses add their own fields."""
        return base_fields(self, checkpoint)

    def resume(self, checkpoint):
        """Restore weights, optimizer, schedule, counters and random state from a loaded checkpoint once every field
        has passed `checkpoint_fields`: a crafted or foreign file is one line naming the field, before anything is
        restored or written."""
        check_resumable(self, checkpoint)
        with restoring(checkpoint, "state_dict"):
            load_model_weights(self.model, checkpoint["state_dict"], checkpoint["path"])
        with restoring(checkpoint, "optimizer"):
            self.optimizer.load_state_dict(checkpoint["optimizer"])
        if self.lr_schedule is not None and checkpoint["lr_scheduler"] is not None:
            with restoring(checkpoint, "lr_scheduler"):
                self.lr_schedule.load_state_dict(checkpoint["lr_scheduler"],
                                                 saved_epochs(checkpoint) or self.cfg.epochs)
        self.resume_batches = checkpoint.get("batches_done", 0)
        self.start_epoch = checkpoint["epoch"] + (0 if self.resume_batches else 1)
        if self.resume_batches:
            self.epoch_lr = checkpoint["epoch_lr"]
        self.global_step = checkpoint["global_step"]
        if self.mnt_mode != "off" and checkpoint["monitor_best"] is not None:
            self.mnt_best = checkpoint["monitor_best"]
        self.not_improved_count = checkpoint["not_improved_count"]
        self.top_k = [list(item) for item in checkpoint.get("top_k", [])]
        with restoring(checkpoint, "rng"):
            set_rng_state(checkpoint["rng"])


def group_rates(optimizer):
    """The optimizer's learning rate: one number, or one per parameter group where it has several."""
    rates = [group["lr"] for group in optimizer.param_groups]
    return rates if len(rates) > 1 else rates[0]
