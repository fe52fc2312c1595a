"""tune.py: an Optuna study over a config's key paths, every trial an ordinary run folder under
saved/<name>/study-<study>/; pruning through the trainer's hooks; a killed study continues; several workers share one
study on PostgreSQL; the summary is a table, best_config.json and plots."""
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import runs
import train
import tune
from tests.helpers import REPO, error_line, evaluate, make_config, read_history, shown, write_config

optuna = pytest.importorskip("optuna")

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
EPOCHS = 3
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TIMEOUT_S = 600  # a generous ceiling per process; a study here takes seconds
SEARCH = {
    "lr_scheduler.args.max_lr": {"low": 1e-3, "high": 3e-2, "log": True},
    "arch.args.width": {"low": 4, "high": 12, "step": 4},
    "optimizer": [{"type": "AdamW", "args": {"lr": 0.003}}, {"type": "SGD", "args": {"lr": 0.01, "momentum": 0.9}}],
}


def study_files(data_slice, tmp_path, search=SEARCH, **trainer):
    """config.json (a small run of EPOCHS epochs) and search.json in tmp_path; returns their paths and the study's
    folder."""
    config = make_config(data_slice, tmp_path / "saved", **{"epochs": EPOCHS, "limit_val_batches": 1, **trainer})
    (tmp_path / "search.json").write_text(json.dumps(search))
    return write_config(config, tmp_path / "config.json"), tmp_path / "search.json", tmp_path / "saved" / "tiny" / \
        "study-search"


def load_study(study_dir, storage=None):
    return optuna.load_study(study_name="search", storage=storage or f"sqlite:///{study_dir / 'study.db'}")


def finished(study):
    return [t for t in study.get_trials() if t.state in FINISHED]


def trial_table(out):
    """The header and the rows of the trials' table tune.py printed."""
    lines = out[out.index("trial  state"):].splitlines()
    return lines[0], [line for line in lines[1:] if line.split()[0].isdigit()]


def command(*args):
    return [sys.executable, str(REPO / "tune.py"), *map(str, args)]


def test_a_study_with_pruning_finishes_and_its_best_config_trains(data_slice, tmp_path, capsys):
    config, search, study_dir = study_files(data_slice, tmp_path)
    assert tune.main(["-c", str(config), "-s", str(search), "--trials", "6"]) == 0
    out = capsys.readouterr().out
    study = load_study(study_dir)
    trials = study.get_trials()
    assert len(trials) == len(finished(study)) == 6
    for t in trials:  # every validation was reported to the pruner; a pruned trial stopped before its epoch's row
        run = Path(t.user_attrs["run_dir"])
        history = read_history(run) if (run / "history.csv").exists() else []  # pruned at epoch 1: no row yet
        reported = {epoch: value for epoch, value in t.intermediate_values.items() if epoch <= len(history)}
        assert reported == {int(r["epoch"]): float(r["val_accuracy"]) for r in history}
        if t.state == optuna.trial.TrialState.COMPLETE:  # the objective: the run's best monitored value
            assert len(history) == EPOCHS and t.value == max(reported.values())
    pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned, "the median pruner stops a trial well below the others (here, the one with a small max_lr)"
    header, rows = trial_table(out)
    assert header.split()[:6] == ["trial", "state", "value", *SEARCH]
    assert [row.split()[:2] for row in rows] == [[str(t.number), t.state.name.lower()] for t in trials]
    assert f"pruned at epoch {max(pruned[0].intermediate_values)}: val_accuracy" in rows[pruned[0].number]

    best = json.loads((study_dir / "best_config.json").read_text())
    assert best["lr_scheduler"]["args"]["max_lr"] == study.best_params["lr_scheduler.args.max_lr"]
    assert best["arch"]["args"]["width"] == study.best_params["arch.args.width"]
    assert json.dumps(best["optimizer"]) == study.best_params["optimizer"]
    for name in ("optimization_history", "param_importances", "parallel_coordinate"):
        assert (study_dir / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert train.main(["-c", str(study_dir / "best_config.json")]) == 0

    capsys.readouterr()  # the study's runs table, and a report of its best trial
    assert runs.main([str(study_dir)]) == 0 and (study_dir / "runs.html").exists()
    lines = capsys.readouterr().out.splitlines()[1:]
    assert {study_dir / line.split()[0] for line in lines} == {Path(t.user_attrs["run_dir"]) for t in trials}
    assert {line.split()[0].split("/")[0] for line in lines if "pruned trial" in line} == {
        f"trial{t.number}" for t in pruned}
    made = evaluate(["-r", study.best_trial.user_attrs["run_dir"]])
    assert made == 0 and (made.out / "report.html").exists()


def test_an_impossible_drawn_config_is_a_failed_trial_and_the_study_goes_on(data_slice, tmp_path, capsys):
    search = {"arch.args.num_classes": [10, 2, 3], "lr_scheduler.args.max_lr": {"low": 1e-3, "high": 1e-2}}
    config, search, study_dir = study_files(data_slice, tmp_path, search, epochs=1)
    assert tune.main(["-c", str(config), "-s", str(search), "--trials", "3"]) == 0
    study = load_study(study_dir)
    failed = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.FAIL]
    assert len(finished(study)) == 3 and failed  # the config's seed draws num_classes 3 for trials 2 and 3
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    for t in failed:
        assert t.params["arch.args.num_classes"] != 10
        assert t.user_attrs["reason"].startswith("error: arch: ConvNet returns [")
        assert t.user_attrs["reason"] in out  # the table's note
        assert not list((study_dir / f"trial{t.number}").glob("*/")), "a config that cannot train makes no run"


def test_a_study_where_no_config_trains_stops_with_one_line(data_slice, tmp_path, capsys):
    config, search, study_dir = study_files(data_slice, tmp_path, {"arch.args.num_classes": [3, 4]})
    assert tune.main(["-c", str(config), "-s", str(search), "--trials", "2"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"error: {tune.FAILED_IN_A_ROW} trials in a row failed and none has trained; the last: "
                           f"arch: ConvNet returns [")
    assert len(load_study(study_dir).get_trials()) == tune.FAILED_IN_A_ROW


@pytest.mark.parametrize("search, expected", [
    ("{", "search.json:1:2: malformed JSON"),
    ({}, "search.json: expected an object mapping config key paths to spaces"),
    ({"optimizer.args.lr": {"low": 0.1, "high": 0.01}}, "search.json: optimizer.args.lr: expected low < high"),
    ({"optimizer.args.lr": {"low": 0, "high": 0.1, "log": True}}, "a log space needs low > 0"),
    ({"optimizer.args.lr": {"lo": 0.1, "high": 1}}, 'expected a list of choices or {"low": L, "high": H}'),
    ({"optimizer.args.lrr": [0.1]}, "search.json: optimizer.args.lrr: 0.1: not an argument"),
    ({"optimizer.type": ["AdamW", "Adamm"]}, "search.json: optimizer.type: \"Adamm\": unknown"),
    ({"arch.args.width": []}, "search.json: arch.args.width: expected at least one choice"),
])
def test_bad_search_json_is_one_line_and_nothing_is_created(data_slice, tmp_path, capsys, search, expected):
    config, search_path, _ = study_files(data_slice, tmp_path)
    search_path.write_text(search if isinstance(search, str) else json.dumps(search))
    assert tune.main(["-c", str(config), "-s", str(search_path), "--trials", "2"]) == 2
    assert expected in error_line(capsys)
    assert not (tmp_path / "saved").exists()


def test_a_study_continued_from_another_config_is_one_line(data_slice, tmp_path, capsys):
    config, search, study_dir = study_files(data_slice, tmp_path, {"lr_scheduler.args.max_lr": [0.003, 0.01]},
                                            epochs=1, limit_val_batches=1)
    assert tune.main(["-c", str(config), "-s", str(search), "--trials", "1"]) == 0
    capsys.readouterr()
    for more in ([], ["--summary"]):  # an edited config, or the same one changed with -o
        assert tune.main(["-c", str(config), "-s", str(search), "--trials", "2", "-o", "trainer.epochs=2", *more]) == 2
        assert "was started from another config (trainer.epochs: 1 then, 2 now)" in error_line(capsys)
    assert len(load_study(study_dir).get_trials()) == 1


def test_a_monitor_of_the_training_batches_is_one_line(data_slice, tmp_path, capsys):
    config, search, _ = study_files(data_slice, tmp_path, monitor="min loss")
    assert tune.main(["-c", str(config), "-s", str(search), "--trials", "2"]) == 2
    assert error_line(capsys).startswith("error: trainer.monitor: tune.py scores and prunes trials by a validation")
    assert not (tmp_path / "saved").exists()


def test_folds_all_scores_each_trial_by_its_out_of_fold_metric(data_slice, tmp_path):
    config, search, study_dir = study_files(data_slice, tmp_path, {"lr_scheduler.args.max_lr": [0.003, 0.01]},
                                            epochs=1, limit_val_batches=0)
    conf = json.loads(config.read_text())
    conf["data_loader"]["args"]["n_folds"] = 2
    write_config(conf, config)
    assert tune.main(["-c", str(config), "-s", str(search), "--trials", "2", "--folds", "all"]) == 0
    for t in finished(load_study(study_dir)):
        group = Path(t.user_attrs["run_dir"])
        assert sorted(p.name for p in group.glob("fold*/")) == ["fold0", "fold1"]
        assert t.value == json.loads((group / "oof_metrics.json").read_text())["accuracy"]


class Tuning:
    """`python tune.py args` in the background; output goes to files, so nothing blocks on a full pipe."""

    def __init__(self, folder, *args):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / "stdout.txt", "w") as out, open(self.folder / "stderr.txt", "w") as err:
            self.proc = subprocess.Popen(command(*args), cwd=REPO, env=ENV, stdout=out, stderr=err)

    def wait(self):
        self.proc.wait(timeout=TIMEOUT_S)
        return self

    @property
    def output(self):
        return shown(subprocess.CompletedProcess(self.proc.args, self.proc.returncode,
                                                 (self.folder / "stdout.txt").read_text(),
                                                 (self.folder / "stderr.txt").read_text()))

    def stop_in_the_middle_of(self, trial_dir):
        """Wait until the trial's run has finished its first epoch, not yet its last, then SIGSTOP the process and
        confirm on the now frozen files."""
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"tune.py ended before the trial was interrupted{self.output}"
            epochs = [len(read_history(run)) for run in trial_dir.glob("*/") if (run / "history.csv").exists()]
            if epochs and 0 < epochs[0] < EPOCHS:
                self.proc.send_signal(signal.SIGSTOP)
                if 0 < len(read_history(next(trial_dir.glob("*/")))) < EPOCHS:
                    return
                self.proc.send_signal(signal.SIGCONT)
            time.sleep(0.01)
        pytest.fail("the trial did not start in time")


@pytest.mark.slow
def test_a_killed_study_continues_with_the_same_command_to_exactly_its_trials(data_slice, tmp_path):
    config, search, study_dir = study_files(data_slice, tmp_path, limit_val_batches=0)
    args = ("-c", config, "-s", search, "--trials", 6)
    first = Tuning(tmp_path / "first", *args)
    first.stop_in_the_middle_of(study_dir / "trial2")
    first.proc.send_signal(signal.SIGKILL)
    first.wait()
    before = {t.number: (t.state, t.value) for t in finished(load_study(study_dir))}
    assert sorted(before) == [0, 1]

    second = Tuning(tmp_path / "second", *args).wait()
    assert second.proc.returncode == 0, second.output
    study = load_study(study_dir)
    trials = study.get_trials()
    assert len(finished(study)) == 6
    assert [t.number for t in trials if t.state not in FINISHED] == [2] and trials[2].state.name == "FAIL"
    assert {t.number: (t.state, t.value) for t in trials if t.number in before} == before
    assert len({json.dumps(t.params, sort_keys=True) for t in finished(study)}) == 6, "a trial was drawn again"
    for t in finished(study):
        assert len(list((study_dir / f"trial{t.number}").glob("*/"))) == 1, f"trial {t.number} ran twice"
    _, rows = trial_table((tmp_path / "second" / "stdout.txt").read_text())
    assert rows[2].split()[1] == "fail" and rows[2].endswith("its process stopped during the trial (killed?)")


def test_ctrl_c_stops_the_study_and_marks_its_trial_failed(data_slice, tmp_path):
    config, search, study_dir = study_files(data_slice, tmp_path, limit_val_batches=0)
    tuning = Tuning(tmp_path / "run", "-c", config, "-s", search, "--trials", 6)
    tuning.stop_in_the_middle_of(study_dir / "trial1")
    tuning.proc.send_signal(signal.SIGINT)
    tuning.proc.send_signal(signal.SIGCONT)
    assert tuning.wait().proc.returncode == 130, tuning.output
    stderr = (tmp_path / "run" / "stderr.txt").read_text()
    assert "Traceback" not in stderr and stderr.splitlines()[-1] == (
        "the study stopped (a trial it was running is marked failed); continue it with the same command")
    trials = load_study(study_dir).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL"]
    assert trials[1].user_attrs["reason"].startswith("stopped by SIGINT at ")


def postgres_binaries():
    """The folder of PostgreSQL's server programs (initdb, pg_ctl), or None where PostgreSQL is not installed."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    installed = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    return Path(installed[-1]).parent if installed else None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres_url():
    """A PostgreSQL server of its own, in a temporary folder on a free port, for the test's duration. The server
    refuses to run as root: there it runs as the `postgres` user the package creates."""
    bin_dir = postgres_binaries()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (CI installs the postgresql package)")
    folder = Path(tempfile.mkdtemp(prefix="tune-postgres-"))
    as_user = []
    if os.geteuid() == 0:
        import pwd

        user = pwd.getpwnam("postgres")
        os.chown(folder, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    port, data = free_port(), folder / "data"

    def pg(*args):
        return subprocess.run([*as_user, *map(str, args)], capture_output=True, text=True, timeout=120, check=True)

    pg(bin_dir / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8")
    pg(bin_dir / "pg_ctl", "-D", data, "-l", folder / "server.log", "-w", "-o",
       f"-p {port} -h 127.0.0.1 -k {folder} -c fsync=off", "start")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        pg(bin_dir / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_share_one_study_on_postgresql(postgres_url, data_slice, tmp_path):
    config, search, study_dir = study_files(data_slice, tmp_path)
    args = ("-c", config, "-s", search, "--trials", 6, "--storage", postgres_url)
    workers = [Tuning(tmp_path / f"worker{i}", *args) for i in range(2)]
    for worker in workers:
        assert worker.wait().proc.returncode == 0, worker.output
    study = load_study(study_dir, storage=postgres_url)
    done = finished(study)
    assert len(done) == 6 and len({t.number for t in done}) == 6
    assert {t.user_attrs["worker"].split(":")[1] for t in done} == {str(w.proc.pid) for w in workers}
    for t in done:
        assert len(list((study_dir / f"trial{t.number}").glob("*/"))) == 1, f"trial {t.number} ran twice"
    assert not (study_dir / "study.db").exists()
