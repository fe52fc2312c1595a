"""Where a run reports besides its folder (`trainer.trackers`): MLflow, Weights & Biases or a CSV file, each a Hook
that gets the flattened config as parameters, every epoch's metrics, tags (git commit, fold, trial) and the run's
files. TensorBoard is the trainer's own writer. Their packages are optional: requirements-experiments.txt."""
import csv
import importlib
import io
import json
import math
import os
import stat
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from base.hooks import Hook
from utils.checkpoint import made_in
from utils.util import UserError, first_line

RUN_FILES = ("config.json", "history.csv")


def build_trackers(config):
    """One hook per tracker named in `trainer.trackers`, each started far enough to refuse here, before training
    and before the run folder exists: an unknown name, a missing package or an unreachable server is one line."""
    hooks = []
    for name in config["trainer"]["trackers"]:
        if name not in TRACKERS:
            raise UserError(f"trainer.trackers: unknown tracker {name!r}; expected some of {', '.join(TRACKERS)}")
        if TRACKERS[name] is not None:
            hooks.append(TRACKERS[name](config))
    return hooks


def tracker_hosts(trackers, mlflow_uri=""):
    """The servers `trackers` report to (an MLflow server, W&B's), which a resumed run or test.py may reach: a
    checkpoint's own trackers are dropped (utils.checkpoint), so these are the ones the user named."""
    from urllib.parse import urlsplit

    urls = [mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI", "")] if "mlflow" in trackers else []
    urls += [wandb_url()] if "wandb" in trackers else []
    return {urlsplit(url).hostname for url in urls if urlsplit(url).hostname}


def flatten(config, prefix=""):
    """A nested config as {"a.b.c": value}; lists stay whole (as JSON)."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, dict)) else value
    return flat


def run_tags(trainer):
    """git commit (of the working directory, when it is a repository), fold, and trial (a run inside a study
    folder `study-*`)."""
    tags = {"run_dir": str(Path(trainer.run_dir).resolve())}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            tags["git_commit"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    fold = trainer.config["data_loader"]["args"].get("fold")
    if fold is not None:
        tags["fold"] = str(fold)
    if any(parent.name.startswith("study-") for parent in Path(trainer.run_dir).parents):
        tags["trial"] = Path(trainer.run_dir).name
    return tags


def epoch_metrics(log):
    """The numbers of an epoch's log (an epoch without validation has no val_ values)."""
    return {k: float(v) for k, v in log.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def best_checkpoint_path(trainer):
    best = Path(trainer.run_dir) / "model_best.pth"
    return best if best.exists() else Path(trainer.run_dir) / "checkpoint-last.pth"


def _package(tracker, module):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"trainer.trackers: {tracker!r} needs the {module} package: pip install -r "
                        f"requirements-experiments.txt") from None


def probe_mlflow(client, uri, what):
    """Ask an MLflow server once, without retries, so that one out of reach is one line before any work."""
    if uri.startswith("sqlite:") or "://" not in uri:
        return
    try:
        with _no_retries():
            client.search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 (any failure of the client means the same to the user)
        raise UserError(f"{what}: cannot reach {uri}: {first_line(e)}") from None


def mlflow_experiment(client, name, uri):
    """The id of MLflow experiment `name`, created when missing; a local store keeps its files beside it
    (`<store folder>/mlartifacts/<name>`), and one whose experiment says to keep them elsewhere (a store that came
    with a run folder) is refused."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        home = artifacts_home(uri)
        return client.create_experiment(name, artifact_location=(home / name).as_uri() if home else None)
    return checked_experiment(experiment, uri).experiment_id


def artifacts_home(uri):
    """Where a local (SQLite) store keeps its experiments' files: `<store folder>/mlartifacts`; None for a server."""
    return Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts" if uri.startswith("sqlite:///") else None


def checked_experiment(experiment, uri):
    """`experiment`, refused when a local store would keep its files elsewhere (a store that came with a run folder
    cannot send the written files to another path or machine)."""
    home, where = artifacts_home(uri), experiment.artifact_location or ""
    if home and not (where.startswith("file://") and Path(where[len("file://"):]).resolve().is_relative_to(home)):
        raise UserError(f"mlflow: the store {uri} keeps experiment {experiment.name!r}'s files at {where[:200]!r}, "
                        f"outside {str(home)!r}; use a store of your own (MLFLOW_TRACKING_URI)")
    return experiment


def mlflow_run_of(client, experiment_ids, run_dir):
    """The MLflow run tagged with `run_dir`, or None."""
    if "'" in str(run_dir) or not experiment_ids:
        return None
    found = client.search_runs(experiment_ids, f"tags.run_dir = '{run_dir}'", max_results=1)
    return found[0].info.run_id if found else None


def wandb_mode(wandb, what):
    """WANDB_MODE when set, else online only for a user who has logged in; online, W&B's server is asked once here,
    so that one out of reach is one line before any work."""
    mode = os.environ.get("WANDB_MODE") or ("online" if wandb.login(prompt=False, verify=False) else "offline")
    if mode == "online":
        try:
            urllib.request.urlopen(wandb_url(), timeout=10).close()
        except urllib.error.HTTPError:
            pass  # it answered
        except (OSError, ValueError) as e:
            raise UserError(f"{what}: cannot reach {wandb_url()} ({first_line(e)}); set WANDB_MODE=offline to report "
                            f"offline and sync later") from None
    return mode


def wandb_url():
    return os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")


@contextmanager
def _no_retries():
    """MLflow's HTTP client retries for minutes by default; probing a server should fail fast."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")
    try:
        yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


class MlflowTracker(Hook):
    """An MLflow run per run folder (a resumed run continues its MLflow run), in the experiment `name`. The store is
    `trainer.mlflow_uri`, else MLFLOW_TRACKING_URI, else `<save_dir>/mlflow.db` (`mlflow ui --backend-store-uri
    sqlite:///saved/mlflow.db` shows it offline)."""

    def __init__(self, config):
        mlflow = _package("mlflow", "mlflow")
        self.uri = (config["trainer"]["mlflow_uri"] or os.environ.get("MLFLOW_TRACKING_URI")
                    or f"sqlite:///{Path(config['trainer']['save_dir']).resolve() / 'mlflow.db'}")
        self.client = mlflow.MlflowClient(self.uri)
        self.entities = mlflow.entities
        probe_mlflow(self.client, self.uri, "trainer.trackers: mlflow")
        with _no_retries():
            experiment = self.client.get_experiment_by_name(config["name"])
        if experiment is not None:  # checked before the run folder exists
            checked_experiment(experiment, self.uri)
        self.run_id = None

    def on_run_start(self, trainer):
        experiment_id = mlflow_experiment(self.client, trainer.config["name"], self.uri)
        tags = run_tags(trainer)
        self.run_id = mlflow_run_of(self.client, [experiment_id], tags["run_dir"])
        if self.run_id:
            self.client.update_run(self.run_id, status="RUNNING")
            return
        self.run_id = self.client.create_run(experiment_id, run_name=Path(trainer.run_dir).name, tags=tags).info.run_id
        params = [self.entities.Param(k, str(v)[:6000]) for k, v in flatten(trainer.config).items()]
        for start in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[start:start + 100])

    def on_epoch_end(self, trainer, epoch, log):
        now = int(time.time() * 1000)
        metrics = [self.entities.Metric(k, v, now, epoch) for k, v in epoch_metrics(log).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def on_run_end(self, trainer, log):
        for name in RUN_FILES:
            if (Path(trainer.run_dir) / name).exists():
                self.client.log_artifact(self.run_id, str(Path(trainer.run_dir) / name))
        self.client.set_tag(self.run_id, "best_checkpoint", str(best_checkpoint_path(trainer)))
        self.client.set_terminated(self.run_id)


class WandbTracker(Hook):
    """A Weights & Biases run in project `name`, written under the run folder (`wandb/`): offline unless the user
    has logged in (`wandb login`); WANDB_MODE decides when set."""

    def __init__(self, config):
        self.wandb = _package("wandb", "wandb")
        self.mode = wandb_mode(self.wandb, "trainer.trackers: wandb")
        self.run = None

    def on_run_start(self, trainer):
        tags = [f"{k}:{v}"[:64] for k, v in run_tags(trainer).items() if k != "run_dir"]
        self.run = self.wandb.init(project=trainer.config["name"], name=Path(trainer.run_dir).name,
                                   mode=self.mode, dir=str(trainer.run_dir),
                                   config=flatten(trainer.config), tags=tags)

    def on_epoch_end(self, trainer, epoch, log):
        self.run.log(epoch_metrics(log), step=epoch)

    def on_run_end(self, trainer, log):
        for name in RUN_FILES:
            if (Path(trainer.run_dir) / name).exists():
                self.run.save(str(Path(trainer.run_dir) / name), base_path=str(trainer.run_dir), policy="now")
        self.run.summary["best_checkpoint"] = str(best_checkpoint_path(trainer))
        self.run.finish()


class CsvTracker(Hook):
    """Every run of the save folder in one long file, `<save_dir>/tracking.csv` (time, run folder, kind, key, epoch,
    value: parameters, tags, metrics and files), for pandas or a spreadsheet; runs append to it side by side."""

    COLUMNS = ("time", "run_dir", "kind", "key", "epoch", "value")

    def __init__(self, config):
        self.path = Path(config["trainer"]["save_dir"]) / "tracking.csv"

    def _append(self, trainer, rows, epoch=""):
        self.append_rows(self.path, trainer.run_dir, rows, epoch)

    @classmethod
    def append_rows(cls, path, run_dir, rows, epoch=""):
        """Append `rows` in one write to a file opened for appending, so that runs writing side by side (the trials
        of several tune.py workers) never interleave their lines; the first writer alone writes the header."""
        stamp, body = time.strftime("%Y-%m-%dT%H:%M:%S"), io.StringIO()
        csv.writer(body).writerows((stamp, str(Path(run_dir).resolve()), kind, key, epoch, value)
                                   for kind, key, value in rows)
        flags = os.O_WRONLY | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        try:
            fd, head = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o644), ",".join(cls.COLUMNS) + "\r\n"
        except FileExistsError:
            fd, head = os.open(path, flags), ""  # a link is refused (ELOOP), a FIFO opened without waiting
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(f"{path}: not a regular file")
            os.write(fd, (head + body.getvalue()).encode())
        finally:
            os.close(fd)

    def on_run_start(self, trainer):
        self._append(trainer, [("param", k, v) for k, v in flatten(trainer.config).items()]
                     + [("tag", k, v) for k, v in run_tags(trainer).items()])

    def on_epoch_end(self, trainer, epoch, log):
        self._append(trainer, [("metric", k, v) for k, v in epoch_metrics(log).items()], epoch)

    def on_run_end(self, trainer, log):
        run_dir = Path(trainer.run_dir).resolve()
        files = [("file", name, str(run_dir / name)) for name in RUN_FILES if (run_dir / name).exists()]
        self._append(trainer, files + [("file", "best_checkpoint", str(best_checkpoint_path(trainer).resolve()))])


def store_of(run_dir, experiment, name):
    """The save folder's `name` (mlflow.db, tracking.csv) of a run folder laid out as train.py makes them,
    `<save_dir>/<experiment>/<run>`, when it is a regular file and not a link; else None. Nothing further up is
    looked at: a run folder is data, and does not choose the files the program writes to."""
    save_dir = made_in(run_dir, experiment)
    store = save_dir / name if save_dir else None
    return store if store and store.is_file() and not store.is_symlink() else None


class TestReport:
    """`test.py --track NAME`: a test's metrics and written files (the submission among them) reported to the
    training run of the checkpoint's run folder, found in the store that run used; started before predicting."""

    def __init__(self, name, run_dir, experiment, prefix):
        self.name, self.run_dir, self.experiment, self.prefix = name, Path(run_dir).resolve(), experiment, prefix
        getattr(self, f"_start_{name}")()

    def _start_mlflow(self):
        mlflow = _package("mlflow", "mlflow")
        store = store_of(self.run_dir, self.experiment, "mlflow.db")
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (f"sqlite:///{store}" if store else None)
        if uri is None:
            raise UserError(f"--track mlflow: no mlflow.db in the save folder of {str(self.run_dir)!r}; set "
                            f"MLFLOW_TRACKING_URI to the store the run used")
        self.uri, self.client, self.entities = uri, mlflow.MlflowClient(uri), mlflow.entities
        probe_mlflow(self.client, uri, "--track mlflow")
        with _no_retries():  # the training run, and where its files would go, known before anything is written
            self.training_run = mlflow_run_of(self.client, [e.experiment_id for e in self.client.search_experiments()],
                                              self.run_dir)
            experiment = self.client.get_experiment(self.client.get_run(self.training_run).info.experiment_id) \
                if self.training_run else self.client.get_experiment_by_name(self.experiment)
            if experiment is not None:
                checked_experiment(experiment, uri)

    def _start_wandb(self):
        self.wandb = _package("wandb", "wandb")
        self.mode = wandb_mode(self.wandb, "--track wandb")
        runs = sorted((self.run_dir / "wandb").glob("*run-*-*"))
        self.wandb_id = runs[-1].name.rsplit("-", 1)[1] if runs else None

    def _start_csv(self):
        self.path = store_of(self.run_dir, self.experiment, "tracking.csv") or self.run_dir / "tracking.csv"

    def __call__(self, metrics, files):
        metrics = {f"{self.prefix}_{k}": v for k, v in epoch_metrics(metrics or {}).items()}
        try:
            getattr(self, f"_report_{self.name}")(metrics, [Path(f).resolve() for f in files])
        except Exception as e:  # noqa: BLE001 (the files are written; the tracker's failure is one line)
            raise UserError(f"--track {self.name}: could not report ({first_line(e)}); the files are written "
                            f"in {str(files[0].parent) if files else '--out'!r}") from None

    def _report_mlflow(self, metrics, files):
        training_run = self.training_run
        run_id = training_run or self.client.create_run(
            mlflow_experiment(self.client, self.experiment, self.uri), run_name=self.run_dir.name,
            tags={"run_dir": str(self.run_dir)}).info.run_id
        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[self.entities.Metric(k, v, now, 0) for k, v in metrics.items()])
        for path in files:
            self.client.log_artifact(run_id, str(path), artifact_path=path.parent.name)
        if not training_run:
            self.client.set_terminated(run_id)

    def _report_wandb(self, metrics, files):
        run = self.wandb.init(project=self.experiment, id=self.wandb_id, resume="allow" if self.wandb_id else None,
                              name=self.run_dir.name, dir=str(self.run_dir), mode=self.mode)
        run.summary.update(metrics)
        for path in files:
            run.save(str(path), base_path=str(path.parent.parent), policy="now")
        run.finish()

    def _report_csv(self, metrics, files):
        CsvTracker.append_rows(self.path, self.run_dir, [("metric", k, v) for k, v in metrics.items()]
                               + [("file", path.name, str(path)) for path in files])


TRACKERS = {"tensorboard": None, "mlflow": MlflowTracker, "wandb": WandbTracker, "csv": CsvTracker}
