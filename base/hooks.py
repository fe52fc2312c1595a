"""What a run tells the outside while it trains: custom logging, experiment trackers and pruners subclass `Hook`,
override what they need, and are handed to the trainer (`train.main(argv, hooks=[...])`)."""


class Hook:
    """Called by BaseTrainer at fixed points of a run; every method does nothing unless overridden. Only the main
    process calls them. A hook that raises ends the run, with the last checkpoint kept."""

    def on_run_start(self, trainer):
        """Before the first epoch this run trains (`trainer.start_epoch`; a resumed run starts later)."""

    def on_validation_end(self, trainer, epoch, log):
        """After validating at the end of `epoch`; `log` holds the validation values (prefixed `val_`)."""

    def on_epoch_end(self, trainer, epoch, log):
        """After `epoch` is logged and checkpointed; `log` is its row of history.csv (training and validation values
        and the learning rate: `lr`, or `lr_<group>` per parameter group)."""

    def on_run_end(self, trainer, log):
        """After the last epoch (or an early stop); `log` is the last epoch's. Not called when the run fails."""
