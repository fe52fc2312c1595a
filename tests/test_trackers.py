"""trainer.trackers: a run reports to MLflow, Weights & Biases (offline) or a CSV file besides its folder; a tracker
that cannot start is one line before anything is written."""
import json
import os
import sys

import pytest

import train
from tests.helpers import error_line, evaluate, fails, read_csv_rows, read_history, write_config


def train_with(config, tmp_path, trackers, **trainer):
    config["trainer"].update(trackers=trackers, **trainer)
    made = train.main(["-c", str(write_config(config, tmp_path / "config.json"))])
    assert made == 0
    return made.run_dir


def test_an_mlflow_run_is_readable_with_mlflows_client(config, tmp_path):
    mlflow = pytest.importorskip("mlflow")
    run_dir = train_with(config, tmp_path, ["mlflow"])
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'saved' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.data.params["optimizer.args.lr"] == "0.003" and run.data.params["trainer.epochs"] == "2"
    assert run.data.tags["run_dir"] == str(run_dir) and run.info.status == "FINISHED"
    history = read_history(run_dir)
    logged = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert [(m.step, m.value) for m in logged] == [(int(r["epoch"]), float(r["val_accuracy"])) for r in history]
    rates = client.get_metric_history(run.info.run_id, "lr")
    assert [(m.step, m.value) for m in rates] == [(int(r["epoch"]), float(r["lr"])) for r in history]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert artifacts == {"config.json", "history.csv"}
    assert run_dir / "model_best.pth" == type(run_dir)(client.get_run(run.info.run_id).data.tags["best_checkpoint"])


def test_wandb_offline_writes_its_run_folder(config, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = train_with(config, tmp_path, ["wandb"], epochs=1)
    [offline_run] = (run_dir / "wandb").glob("offline-run-*")
    assert list(offline_run.glob("*.wandb"))


def test_the_csv_tracker_writes_one_long_file_for_the_save_folder(config, tmp_path):
    config["data_loader"]["args"].update(n_folds=2, fold=1)
    run_dir = train_with(config, tmp_path, ["csv"])
    rows = read_csv_rows(tmp_path / "saved" / "tracking.csv")
    assert {"param", "tag", "metric", "file"} <= {r["kind"] for r in rows} and {r["run_dir"] for r in rows} == {
        str(run_dir)}
    assert {(r["key"], r["value"]) for r in rows if r["kind"] == "tag"} >= {("fold", "1"), ("run_dir", str(run_dir))}
    accuracy = [(r["epoch"], r["value"]) for r in rows if r["key"] == "val_accuracy"]
    assert [(e, float(v)) for e, v in accuracy] == [(r["epoch"], float(r["val_accuracy"])) for r in
                                                    read_history(run_dir)]


@pytest.mark.parametrize("trackers, expected", [
    (["mlflw"], "trainer.trackers: unknown tracker 'mlflw'"),
    (["mlflow"], "trainer.trackers: 'mlflow' needs the mlflow package"),
    (["mlflow"], "trainer.trackers: mlflow: cannot reach http://127.0.0.1:9"),
    (["wandb"], "trainer.trackers: wandb: cannot reach http://127.0.0.1:9"),
])
def test_a_tracker_that_cannot_start_is_one_line_before_training(config, tmp_path, capsys, monkeypatch, trackers,
                                                                 expected):
    if "package" in expected:
        monkeypatch.setitem(sys.modules, "mlflow", None)
    elif "wandb" in expected:
        pytest.importorskip("wandb")
        monkeypatch.setenv("WANDB_MODE", "online")  # as for a user who has logged in
        monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    elif "reach" in expected:
        pytest.importorskip("mlflow")
        config["trainer"]["mlflow_uri"] = "http://127.0.0.1:9"
    config["trainer"]["trackers"] = trackers
    assert fails(config, tmp_path, capsys).startswith(f"error: {expected}")


def test_test_py_reports_its_metrics_and_submission_to_the_training_run(config, tmp_path):
    mlflow = pytest.importorskip("mlflow")
    relative = os.path.relpath(tmp_path / "saved")  # a relative save_dir, as config.json's "saved/"
    run_dir = train_with(config, tmp_path, ["mlflow", "csv"], epochs=1, save_dir=relative)
    made = evaluate(["-r", run_dir, "--track", "mlflow", "csv"])
    assert made == 0
    metrics = json.loads((made.out / "metrics.json").read_text())
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'saved' / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert run.data.metrics["test_accuracy"] == pytest.approx(metrics["accuracy"])
    assert {a.path for a in client.list_artifacts(run.info.run_id, made.out.name)} >= {
        f"{made.out.name}/predictions.csv", f"{made.out.name}/probabilities.csv"}
    rows = read_csv_rows(tmp_path / "saved" / "tracking.csv")
    assert ("file", "predictions.csv", str(made.out.resolve() / "predictions.csv")) in {
        (r["kind"], r["key"], r["value"]) for r in rows}
    assert {r["run_dir"] for r in rows} == {str(run_dir.resolve())}  # training's rows and test.py's: one run


@pytest.mark.parametrize("tracker, server, expected", [
    ("mlflow", None, "no mlflow.db in the save folder of"),
    ("mlflow", "http://127.0.0.1:9", "cannot reach http://127.0.0.1:9"),
    ("wandb", "http://127.0.0.1:9", "cannot reach http://127.0.0.1:9"),
])
def test_test_py_refuses_a_tracker_without_a_store_before_predicting(tracker, server, expected, config, tmp_path,
                                                                     capsys, monkeypatch):
    pytest.importorskip(tracker)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    if server and tracker == "mlflow":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    elif server:
        monkeypatch.setenv("WANDB_MODE", "online")  # as for a user who has logged in
        monkeypatch.setenv("WANDB_BASE_URL", server)
    run_dir = train_with(config, tmp_path, ["tensorboard"], epochs=1)
    capsys.readouterr()
    assert evaluate(["-r", run_dir, "--track", tracker]) == 2
    assert error_line(capsys).startswith(f"error: --track {tracker}: {expected}")
    assert not list(run_dir.glob("test-*"))


@pytest.mark.parametrize("planted", ["tracking.csv linked to a file", "mlflow.db keeping files elsewhere"])
def test_a_store_that_came_with_a_run_folder_cannot_choose_where_test_py_writes(planted, config, tmp_path, capsys):
    """A run folder from elsewhere, under a save folder holding a planted store: the victim file is left alone, and
    no artifact lands outside the store's own folder."""
    mlflow = pytest.importorskip("mlflow")
    run_dir = train_with(config, tmp_path, [], epochs=1)  # saved/tiny/<run>
    victim = tmp_path / "victim.sh"
    victim.write_text("# mine\n")
    if planted.startswith("tracking.csv"):
        (tmp_path / "saved" / "tracking.csv").symlink_to(victim)
        track = "csv"
    else:
        mlflow.MlflowClient(f"sqlite:///{tmp_path / 'saved' / 'mlflow.db'}").create_experiment(
            "tiny", artifact_location=(tmp_path / "elsewhere").as_uri())
        track = "mlflow"
    capsys.readouterr()
    made = evaluate(["-r", run_dir, "--track", track])
    assert victim.read_text() == "# mine\n" and not (tmp_path / "elsewhere").exists()
    if track == "mlflow":  # refused before any prediction: nothing written
        assert made == 2 and "keeps experiment 'tiny''s files at" in error_line(capsys)
        assert not list(run_dir.glob("test-*"))
    else:
        assert made == 0 and (run_dir / "tracking.csv").is_file()  # the run folder's own file instead
