"""End to end on a slice of mnist5k: the run folder, test.py's outputs, checkpoints, resuming, fine-tuning,
early stopping and TensorBoard, checked through the files a user looks at."""
import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch

import train
from tests.helpers import (
    BATCH_SIZE,
    N_TEST,
    N_TRAIN,
    VALIDATION_SPLIT,
    assert_same_tensors,
    error_line,
    evaluate,
    load,
    make_config,
    read_csv_rows,
    read_history,
    run_dirs,
    write_config,
)
from utils.util import hold_folder, release_folders

BATCHES_PER_EPOCH = math.ceil(round(N_TRAIN * (1 - VALIDATION_SPLIT)) / BATCH_SIZE)
CHECKPOINT_KEYS = {"state_dict", "optimizer", "lr_scheduler", "epoch", "global_step", "monitor_best",
                   "not_improved_count", "rng", "config"}
BATCHNORM_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def new_runs(save_dir, before, name="tiny"):
    return [run for run in run_dirs(save_dir, name) if run not in before]


@pytest.fixture(scope="module")
def four_epochs(data_slice, tmp_path_factory):
    """One uninterrupted 4-epoch run with a checkpoint every epoch, shared by the tests that only read it."""
    base = tmp_path_factory.mktemp("four_epochs")
    config = make_config(data_slice, base / "saved", epochs=4, save_period=1)
    path = write_config(config, base / "config.json")
    assert train.main(["-c", str(path)]) == 0
    (run,) = run_dirs(base / "saved")
    final = base / "uninterrupted-checkpoint-last.pth"
    shutil.copyfile(run / "checkpoint-last.pth", final)
    return SimpleNamespace(run=run, config=config, config_path=path, save_dir=base / "saved", final=final,
                           history=read_history(run))


def test_run_folder_holds_checkpoints_config_log_and_history(four_epochs):
    run = four_epochs.run
    for name in ("checkpoint-last.pth", "model_best.pth", "config.json", "train.log", "history.csv"):
        assert (run / name).is_file(), name
    assert not (run / "tensorboard").exists()  # tensorboard is off in this config

    history = four_epochs.history
    assert [row["epoch"] for row in history] == ["1", "2", "3", "4"]
    assert list(history[0])[0] == "epoch"
    assert {"loss", "accuracy", "top_k_acc", "macro_f1", "val_loss", "val_accuracy", "val_top_k_acc", "val_macro_f1",
            "lr"} <= history[0].keys()
    assert float(history[-1]["val_accuracy"]) > 0.2  # it learns something on 240 images

    saved = json.loads((run / "config.json").read_text())
    assert saved["trainer"]["epochs"] == 4 and saved["arch"] == four_epochs.config["arch"]
    log = (run / "train.log").read_text()
    assert "epoch 4/4" in log and str(run) in log


def test_model_best_is_the_epoch_with_the_best_monitored_value(four_epochs):
    values = [float(row["val_accuracy"]) for row in four_epochs.history]
    best_epoch = values.index(max(values)) + 1  # the first epoch reaching the maximum: improvement is strict
    best = load(four_epochs.run / "model_best.pth")
    assert best["epoch"] == best_epoch
    assert best["monitor_best"] == max(values)


def test_save_period_writes_a_checkpoint_every_epoch(four_epochs):
    for epoch in range(1, 5):
        assert load(four_epochs.run / f"checkpoint-epoch{epoch}.pth")["epoch"] == epoch


def test_checkpoint_contents(four_epochs):
    for name in ("checkpoint-last.pth", "model_best.pth", "checkpoint-epoch2.pth"):
        checkpoint = load(four_epochs.run / name)  # weights_only=True: tensors and plain data only
        assert CHECKPOINT_KEYS <= checkpoint.keys(), name
        assert not [k for k in checkpoint["state_dict"] if k.startswith(("module.", "_orig_mod."))]
        assert type(checkpoint["config"]) is dict
        assert json.loads(json.dumps(checkpoint["config"])) == checkpoint["config"]

    last = load(four_epochs.run / "checkpoint-last.pth")
    assert last["epoch"] == 4
    assert last["global_step"] == 4 * BATCHES_PER_EPOCH
    assert last["config"] == json.loads((four_epochs.run / "config.json").read_text())
    assert last["monitor_best"] == max(float(row["val_accuracy"]) for row in four_epochs.history)
    assert isinstance(last["not_improved_count"], int)
    assert set(last["state_dict"]) >= {"features.0.weight", "classifier.3.bias"}


def test_save_period_two(data_slice, tmp_path):
    config = make_config(data_slice, tmp_path / "saved", epochs=3, save_period=2)
    assert train.main(["-c", str(write_config(config, tmp_path / "config.json"))]) == 0
    (run,) = run_dirs(tmp_path / "saved")
    assert sorted(p.name for p in run.glob("checkpoint-*.pth")) == ["checkpoint-epoch2.pth", "checkpoint-last.pth"]


def test_test_script_writes_metrics_and_predictions(four_epochs, data_slice):
    best = four_epochs.run / "model_best.pth"
    assert evaluate(["-r", str(best)]) == 0
    out = four_epochs.run / "test-model_best"

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_samples"] == N_TEST
    assert {"loss", "accuracy", "top_k_acc", "macro_f1"} <= metrics.keys()

    predictions = read_csv_rows(out / "predictions.csv")
    truth = read_csv_rows(data_slice / "test_labels.csv")
    assert list(predictions[0]) == ["id", "label"]
    assert [p["id"] for p in predictions] == [t["id"] for t in truth]  # one row per id, leading zeros kept
    assert predictions[0]["id"].startswith("0")  # read as text, not as the number 2
    assert {p["label"] for p in predictions} <= {str(d) for d in range(10)}
    hits = sum(p["label"] == t["label"] for p, t in zip(predictions, truth))
    assert metrics["accuracy"] == pytest.approx(hits / N_TEST)  # metrics.json agrees with predictions.csv


def test_test_script_without_labels_writes_only_predictions_into_out(four_epochs, data_slice, tmp_path):
    best = four_epochs.run / "model_best.pth"
    out = tmp_path / "submission"
    assert evaluate(["-r", str(best), "-o", "data_loader.args.test_csv=test.csv", "--out", str(out)]) == 0
    assert (out / "predictions.csv").is_file()
    assert not (out / "metrics.json").exists()
    predictions = read_csv_rows(out / "predictions.csv")
    assert [p["id"] for p in predictions] == [row["id"] for row in read_csv_rows(data_slice / "test.csv")]

    labelled = tmp_path / "labelled"
    assert evaluate(["-r", str(best), "--out", str(labelled)]) == 0
    assert (labelled / "metrics.json").is_file()
    assert read_csv_rows(labelled / "predictions.csv") == predictions  # same model, same images, same answers


def test_test_script_errors_are_one_line(tmp_path, capsys):
    assert evaluate(["-r", str(tmp_path / "missing.pth")]) == 2
    assert "no such file" in error_line(capsys)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    assert evaluate(["-r", str(garbage)]) == 2
    assert "garbage.pth" in error_line(capsys)


def test_two_runs_of_one_config_never_share_a_folder(data_slice, tmp_path):
    config = make_config(data_slice, tmp_path / "saved", epochs=1)
    path = write_config(config, tmp_path / "config.json")
    assert train.main(["-c", str(path)]) == 0
    assert train.main(["-c", str(path)]) == 0
    first, second = run_dirs(tmp_path / "saved")
    assert first != second
    assert len(read_history(first)) == 1 and len(read_history(second)) == 1


def test_resume_from_an_earlier_checkpoint_is_bitwise_exact(four_epochs):
    before = run_dirs(four_epochs.save_dir)
    assert train.main(["-r", str(four_epochs.run / "checkpoint-epoch2.pth")]) == 0

    # the original run already went past epoch 2: the resumed run gets a new folder, the old one is left alone
    (resumed,) = new_runs(four_epochs.save_dir, before)
    original = load(four_epochs.run / "checkpoint-last.pth")
    assert original["epoch"] == 4
    assert_same_tensors(original["state_dict"], load(four_epochs.final)["state_dict"])

    mine, reference = load(resumed / "checkpoint-last.pth"), load(four_epochs.final)
    assert mine["epoch"] == 4 and mine["global_step"] == reference["global_step"]
    assert_same_tensors(mine["state_dict"], reference["state_dict"])
    assert len(mine["optimizer"]["state"]) == len(reference["optimizer"]["state"])
    for mine_state, ref_state in zip(mine["optimizer"]["state"].values(), reference["optimizer"]["state"].values()):
        assert_same_tensors(mine_state, ref_state)
    assert mine["lr_scheduler"]["last_epoch"] == reference["lr_scheduler"]["last_epoch"]

    assert read_history(resumed) == four_epochs.history[2:4]  # epochs 3 and 4, to the last digit


def _two_epoch_run(data_slice, tmp_path, **changes):
    config = make_config(data_slice, tmp_path / "saved", epochs=2)
    config.update(changes)
    assert train.main(["-c", str(write_config(config, tmp_path / "config.json"))]) == 0
    (run,) = run_dirs(tmp_path / "saved")
    return run


def test_resume_the_latest_checkpoint_with_more_epochs_continues_in_place(data_slice, tmp_path):
    run = _two_epoch_run(data_slice, tmp_path, lr_scheduler={"type": "StepLR", "args": {"step_size": 1, "gamma": 0.5}})
    assert train.main(["-r", str(run / "checkpoint-last.pth"), "-o", "trainer.epochs=3"]) == 0
    assert run_dirs(tmp_path / "saved") == [run]
    assert [row["epoch"] for row in read_history(run)] == ["1", "2", "3"]
    assert load(run / "checkpoint-last.pth")["epoch"] == 3
    lrs = [float(row["lr"]) for row in read_history(run)]
    assert lrs[1] / lrs[0] == pytest.approx(0.5) and lrs[2] / lrs[1] == pytest.approx(0.5)  # StepLR state restored
    # the run's first config stays; the change is recorded beside it
    assert json.loads((run / "config.json").read_text())["trainer"]["epochs"] == 2
    assert json.loads((run / "config-resume-epoch2.json").read_text())["trainer"]["epochs"] == 3

    # a run folder works as -r too: it means its checkpoint-last.pth; with fewer metrics, each value keeps its column
    assert train.main(["-r", str(run), "-o", "trainer.epochs=4", "-o", 'metrics=["accuracy"]']) == 0
    assert run_dirs(tmp_path / "saved") == [run]
    history = read_history(run)
    assert [row["epoch"] for row in history] == ["1", "2", "3", "4"]
    assert float(history[3]["lr"]) == pytest.approx(0.003 * 0.5 ** 3) and history[3]["val_macro_f1"] == ""
    assert history[2]["val_macro_f1"] != "" and 0 <= float(history[3]["val_accuracy"]) <= 1


def test_a_run_whose_folder_was_taken_meanwhile_takes_the_next_one(data_slice, tmp_path, monkeypatch):
    """Two runs started in the same second (a sweep from a script) both train, in neighbouring folders."""
    taken = tmp_path / "saved" / "tiny" / "1130_120000"
    taken.mkdir(parents=True)
    monkeypatch.setattr(train, "new_run_dir", lambda save_dir, name: taken)
    config = make_config(data_slice, tmp_path / "saved", epochs=1, limit_train_batches=1)
    assert train.main(["-c", str(write_config(config, tmp_path / "config.json"))]) == 0
    assert run_dirs(tmp_path / "saved") == [taken, taken.with_name("1130_120000_1")]
    assert list(taken.iterdir()) == []


def test_a_run_folder_another_process_trains_in_is_refused(data_slice, tmp_path, capsys):
    run = _two_epoch_run(data_slice, tmp_path, lr_scheduler={})
    before = sorted((p.name, p.stat().st_mtime_ns) for p in run.iterdir())
    hold_folder(run)  # as a second `train.py -r` of the same run would find it
    try:
        assert train.main(["-r", str(run), "-o", "trainer.epochs=3"]) == 2
    finally:
        release_folders()
    assert "is in use: another process is training in it" in error_line(capsys)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in run.iterdir()) == before


def test_history_lr_is_the_rate_the_epoch_trained_with(data_slice, tmp_path):
    run = _two_epoch_run(data_slice, tmp_path, lr_scheduler={"type": "StepLR", "args": {"step_size": 1, "gamma": 0.5}})
    assert [float(row["lr"]) for row in read_history(run)] == pytest.approx([0.003, 0.0015])


def test_resume_finished_run_without_changes_trains_nothing_more(data_slice, tmp_path):
    run = _two_epoch_run(data_slice, tmp_path, lr_scheduler={})
    assert train.main(["-r", str(run / "checkpoint-last.pth")]) == 0
    assert [row["epoch"] for row in read_history(run)] == ["1", "2"]
    assert not list(run.glob("config-resume-*.json"))


def test_resume_with_more_epochs_under_one_cycle_lr_is_refused(data_slice, tmp_path, capsys):
    """OneCycleLR's schedule is fixed when the run starts: extending it is refused in one line, nothing written."""
    run = _two_epoch_run(data_slice, tmp_path)  # OneCycleLR, as in config.json
    before = (run / "checkpoint-last.pth").stat().st_mtime_ns
    assert train.main(["-r", str(run / "checkpoint-last.pth"), "-o", "trainer.epochs=3"]) == 2
    line = error_line(capsys)
    assert line.startswith("error: trainer.epochs: OneCycleLR was sized for") and "fine-tune" in line
    assert (run / "checkpoint-last.pth").stat().st_mtime_ns == before


def test_resuming_a_finished_run_trains_nothing_and_says_how_to_go_on(four_epochs, tmp_path, capsys):
    run = tmp_path / "saved" / "tiny" / "run"
    shutil.copytree(four_epochs.run, run)
    capsys.readouterr()
    assert train.main(["-r", str(run)]) == 0
    out = capsys.readouterr().out
    assert "the run already finished its 4 epochs: nothing to train (fine-tune from it to train on" in out  # OneCycleLR
    assert read_history(run) == four_epochs.history


def test_fine_tune_starts_a_new_run_from_the_checkpoint_weights(four_epochs):
    """With -c, -r only supplies weights. lr=0 for one epoch leaves every parameter as loaded, so they must equal
    the checkpoint's bit for bit; only BatchNorm running statistics move (training mode)."""
    best = four_epochs.run / "model_best.pth"
    source = load(best)
    before = run_dirs(four_epochs.save_dir)
    code = train.main(["-c", str(four_epochs.config_path), "-r", str(best), "-o", "optimizer.args.lr=0",
                       "-o", "lr_scheduler={}", "-o", "trainer.epochs=1"])
    assert code == 0
    (tuned,) = new_runs(four_epochs.save_dir, before)
    result = load(tuned / "checkpoint-last.pth")
    assert result["epoch"] == 1 and [row["epoch"] for row in read_history(tuned)] == ["1"]

    parameters = [k for k in source["state_dict"] if not k.endswith(BATCHNORM_BUFFERS)]
    assert parameters
    for key in parameters:
        assert torch.equal(result["state_dict"][key], source["state_dict"][key]), key
    # the buffers came from the checkpoint too: its batch count plus this epoch's
    assert result["state_dict"]["features.1.num_batches_tracked"] == (
        source["state_dict"]["features.1.num_batches_tracked"] + BATCHES_PER_EPOCH)
    assert load(best)["epoch"] == source["epoch"]  # the source run is untouched
    assert f"fine-tuning: starting from the weights of {best}" in (tuned / "train.log").read_text()


def test_early_stopping_when_the_monitor_cannot_improve(data_slice, tmp_path):
    """lr=0 and a model without BatchNorm: validation (eval mode, fixed order) gives the same val_loss every
    epoch, so epoch 2 cannot improve on epoch 1 and early_stop=1 ends the run after epoch 2 of 10."""
    config = make_config(data_slice, tmp_path / "saved", epochs=10, monitor="min val_loss", early_stop=1)
    config.update(arch={"type": "MnistModel", "args": {}}, loss="nll_loss", lr_scheduler={},
                  optimizer={"type": "SGD", "args": {"lr": 0.0}})
    assert train.main(["-c", str(write_config(config, tmp_path / "config.json"))]) == 0
    (run,) = run_dirs(tmp_path / "saved")
    history = read_history(run)
    assert [row["epoch"] for row in history] == ["1", "2"]
    assert history[0]["val_loss"] == history[1]["val_loss"]
    assert load(run / "model_best.pth")["epoch"] == 1
    assert load(run / "checkpoint-last.pth")["not_improved_count"] == 1
    assert "stopping early" in (run / "train.log").read_text()


def test_tensorboard_events(data_slice, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = make_config(data_slice, tmp_path / "saved", epochs=2, tensorboard=True, log_step=2)
    assert train.main(["-c", str(write_config(config, tmp_path / "config.json"))]) == 0
    (run,) = run_dirs(tmp_path / "saved")
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "valid/loss", "train/lr", "train/step_loss", "train/accuracy",
            "valid/accuracy"} <= set(tags["scalars"])
    assert "train/images" in tags["images"]

    for tag in ("train/loss", "valid/loss", "train/lr", "valid/macro_f1"):
        assert [e.step for e in events.Scalars(tag)] == [1, 2], tag
    (grid,) = events.Images("train/images")  # once per run: the first batch, eight digits to a row
    assert (grid.step, grid.width, grid.height) == (1, 8 * 28, 28 * math.ceil(BATCH_SIZE / 8))
    history = read_history(run)
    assert [e.value for e in events.Scalars("valid/loss")] == pytest.approx([float(r["val_loss"]) for r in history])

    steps = [e.step for e in events.Scalars("train/step_loss")]
    assert len(steps) == 2 * math.ceil(BATCHES_PER_EPOCH / 2)  # every log_step-th batch
    assert steps == sorted(steps) and len(set(steps)) == len(steps) and steps[-1] <= 2 * BATCHES_PER_EPOCH


def test_batches_finished_on_the_device_train_exactly_like_batches_finished_by_the_loader(data_slice, tmp_path,
                                                                                          monkeypatch):
    """With a GPU, batches served whole leave the loader as decoded images and are scaled and normalised after the
    copy (a quarter of the bytes to move). Forced here on the CPU: the same arithmetic, so the same run."""
    import base.base_data_loader

    def run(name):
        config = make_config(data_slice, tmp_path / name, epochs=2)
        assert train.main(["-c", str(write_config(config, tmp_path / f"{name}.json"))]) == 0
        (run_dir,) = run_dirs(tmp_path / name)
        return load(run_dir / "checkpoint-last.pth")["state_dict"], read_history(run_dir)

    by_loader = run("loader")
    finished = []

    def finisher(dataset):
        def finish(images):
            finished.append(images.dtype)
            return dataset.finish_batch(images)
        return finish if dataset.serves_batches else None

    monkeypatch.setattr(base.base_data_loader, "device_finisher", finisher)
    on_device = run("device")
    assert finished and set(finished) == {torch.uint8}
    assert_same_tensors(by_loader[0], on_device[0])
    assert by_loader[1] == on_device[1]
