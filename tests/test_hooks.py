"""Hooks and chaining: a script hands hooks to train.main, gets the run folder back, and tests it with test.py."""
import train
from base.hooks import Hook
from tests.helpers import evaluate, read_history, write_config


class Recorder(Hook):
    def __init__(self):
        self.calls = []

    def on_run_start(self, trainer):
        self.calls.append(("start", trainer.start_epoch))

    def on_validation_end(self, trainer, epoch, log):
        self.calls.append(("validation", epoch, sorted(log)))

    def on_epoch_end(self, trainer, epoch, log):
        self.calls.append(("epoch", epoch, log["val_accuracy"], (trainer.run_dir / "checkpoint-last.pth").exists()))

    def on_run_end(self, trainer, log):
        self.calls.append(("end", log["val_accuracy"]))


def test_hooks_see_the_run_and_main_returns_what_it_made(config, tmp_path):
    recorder = Recorder()
    made = train.main(["-c", str(write_config(config, tmp_path / "config.json"))], hooks=[recorder])
    assert made == 0 and made.run_dir.parent == tmp_path / "saved" / "tiny"
    history = read_history(made.run_dir)
    val_keys = sorted(k for k in history[0] if k.startswith("val_"))
    assert recorder.calls == [
        ("start", 1),
        ("validation", 1, val_keys), ("epoch", 1, float(history[0]["val_accuracy"]), True),
        ("validation", 2, val_keys), ("epoch", 2, float(history[1]["val_accuracy"]), True),
        ("end", float(history[1]["val_accuracy"])),
    ]
    tested = evaluate(["-r", made.run_dir / "model_best.pth", "--out", tmp_path / "out"])
    assert tested == 0 and tested.out == tmp_path / "out"
    assert {p.name for p in tested.files} >= {"metrics.json", "predictions.csv", "probabilities.csv"}


def test_a_failed_run_made_nothing(config, tmp_path):
    config["trainer"]["epochs"] = 0
    made = train.main(["-c", str(write_config(config, tmp_path / "config.json"))])
    assert made == 2 and made.run_dir is None
