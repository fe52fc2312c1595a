"""What a resume accepts in each field of a BaseTrainer's checkpoint: an example from the trainer's own fresh state
(the same keys, types, tensor shapes and dtypes), or a Rule where no fresh value shows what a saved one may be."""
from utils.checkpoint_rules import (
    ANYTHING,
    UNREAD,
    AtLeast,
    Entries,
    Equal,
    Int,
    ListOf,
    MayLack,
    Number,
    OneOf,
    check_checkpoint,
    stepped_state,
)

STEP = Int(0)  # global_step: train.py reads it to decide where a resumed run continues
ANOTHER_RUN = " (saved with another optimizer or schedule? start a new run from its weights: -c config.json -r FILE)"


def check_resumable(trainer, checkpoint):
    """Every field of `checkpoint` against `trainer.checkpoint_fields`: a crafted or foreign file is one line naming
    the field, before anything is restored or written."""
    check_checkpoint(checkpoint, trainer.checkpoint_fields(checkpoint), {"optimizer": ANOTHER_RUN,
                                                                         "lr_scheduler": ANOTHER_RUN})


def base_fields(trainer, checkpoint):
    """The fields BaseTrainer.state_dict writes."""
    fresh = trainer.state_dict(epoch=1)
    n_groups = len(trainer.optimizer.param_groups)
    return {
        **fresh,
        "epoch": Int(1, saved_epochs(checkpoint) or 2**63 - 1),
        "batches_done": MayLack(Int(0)),
        "epoch_lr": OneOf(Number(0, finite=True), [Number(0, finite=True)] * n_groups)
        if saved_mid_epoch(checkpoint) else UNREAD,
        "global_step": STEP,
        "optimizer": optimizer_fields(trainer.optimizer, fresh["optimizer"]),
        "lr_scheduler": OneOf(None, fresh["lr_scheduler"]) if trainer.lr_schedule is not None else UNREAD,
        "monitor_best": OneOf(None, Number()) if trainer.mnt_mode != "off" else UNREAD,
        "not_improved_count": Int(0),
        "top_k": MayLack(ListOf([Number(), Int(1)])),
        "rng": rng_fields(fresh["rng"]),
        "config": ANYTHING,  # checked as a config before the trainer is built
    }


def optimizer_fields(optimizer, fresh):
    """This optimizer's groups (every key they have, the same parameters) and, per parameter, the state a step
    leaves; a group may carry keys of another schedule, which nothing reads."""
    stepped = stepped_state(optimizer)
    if stepped is None:
        stepped = dict.fromkeys((i for group in fresh["param_groups"] for i in group["params"]), ANYTHING)
    return {"state": Entries(stepped),
            "param_groups": [AtLeast({**group, "params": Equal(group["params"])})
                             for group in fresh["param_groups"]]}


def rng_fields(fresh):
    """What set_rng_state accepts: the layout get_rng_state writes, numpy's position within its key, Python's cached
    Gaussian (None or a number), and CUDA states for any number of devices (unread on a machine without CUDA)."""
    version, key, _ = fresh["python"]
    name, keys, _, _, _ = fresh["numpy"]
    cuda = ListOf(fresh["cuda"][0]) if fresh.get("cuda") else ANYTHING
    return {"python": [version, key, OneOf(None, Number())],
            "numpy": [name, keys, Int(0, len(keys)), Int(0, 1), Number()],
            "torch": fresh["torch"],
            "cuda": MayLack(cuda)}


def saved_mid_epoch(checkpoint):
    """Whether `checkpoint` was saved inside an epoch (a valid `batches_done` above 0)."""
    batches = checkpoint.get("batches_done", 0)
    return type(batches) is int and batches > 0


def saved_epochs(checkpoint):
    """The number of epochs of the run that saved `checkpoint` (in its own config), or None where it does not say."""
    trainer = checkpoint["config"].get("trainer")
    epochs = trainer.get("epochs") if isinstance(trainer, dict) else None
    return epochs if type(epochs) is int else None
