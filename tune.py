"""Search a config's hyper-parameters with an Optuna study; every trial is an ordinary run.

    python tune.py -c config.json -s search.json --trials 40        runs (or continues) the study to 40 finished trials
    python tune.py -c config.json -s search.json --summary          the table, best_config.json and plots, nothing run

The study lives in saved/<name>/study-<study>/: its SQLite storage (study.db, unless --storage names a shared
database), one folder per trial (drawn_config.json and its run folder), best_config.json and the plots.
"""
import contextlib
import functools
import io
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import train
from base.hooks import Hook
from trainer.trackers import flatten
from utils.config import apply_overrides, load_config, validate
from utils.util import ArgumentParser, UserError, atomic_write, error_line, first_line, read_json, write_json

INSTALL = "pip install -r requirements-experiments.txt"


def parse_args(argv):
    parser = ArgumentParser(description="Search a config's hyper-parameters with an Optuna study.")
    parser.add_argument("-c", "--config", required=True, help="the config every trial starts from")
    parser.add_argument("-s", "--search", required=True, help="search.json: config key path -> space")
    parser.add_argument("--trials", type=int, default=20, help="finished (complete or pruned) trials the study needs")
    parser.add_argument("--folds", choices=("all",), help="score each trial by its out-of-fold metric over all folds")
    parser.add_argument("--storage", help="a database URL shared by several workers (default: SQLite in the study "
                                          "folder), e.g. postgresql+psycopg://user@host/db")
    parser.add_argument("--study", help="the study's name (default: the search file's name)")
    parser.add_argument("--pruner", choices=("median", "hyperband", "none"), default="median")
    parser.add_argument("--summary", action="store_true", help="only summarise the study: table, best config, plots")
    parser.add_argument("-o", "--override", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="change the config every trial starts from, as for train.py (e.g. -o trainer.epochs=3)")
    return parser.parse_args(argv)


def main(argv=None):
    """Run the study to --trials finished trials (or only summarise it); returns the exit status."""
    args = parse_args(argv)
    try:
        optuna = import_optuna()
        config = load_config(args.config, args.override)
        space = read_space(args.search, config)
        if args.trials < 1:
            raise UserError(f"--trials: expected a positive number, got {args.trials}")
        direction = objective_direction(config, args.folds)
        study_name = args.study or Path(args.search).stem
        study_dir = Path(config["trainer"]["save_dir"]) / config["name"] / f"study-{study_name}"
        study = open_study(optuna, args, study_dir, study_name, direction, space, config)
        if not args.summary:
            run_study(optuna, study, args.trials, Objective(optuna, config, space, study_dir, args.folds))
        summarise(optuna, study, config, space, study_dir)
    except UserError as e:
        print(error_line(e), file=sys.stderr)
        return 2
    except (StudyStopped, KeyboardInterrupt) as e:
        code = e.exit_code if isinstance(e, StudyStopped) else 128 + signal.SIGINT
        print("the study stopped (a trial it was running is marked failed); continue it with the same command",
              file=sys.stderr)
        return code
    return 0


def import_optuna():
    try:
        import optuna
    except ImportError:
        raise UserError(f"tune.py needs Optuna: {INSTALL}") from None
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed trial is reported by tune.py, in one line
    return optuna


# --- the search space ----------------------------------------------------------------------------------------------

def read_space(path, config):
    """search.json checked: every key path a space, and each choice (each bound of a range), set alone in the config,
    a config train.py accepts. Values that clash only together are found when drawn: a failed trial."""
    space = read_json(path)
    if not isinstance(space, dict) or not space:
        raise UserError(f"{path}: expected an object mapping config key paths to spaces, e.g. "
                        f'{{"optimizer.args.lr": {{"low": 1e-4, "high": 1e-2, "log": true}}}}')
    for key, spec in space.items():
        check_space(path, key, spec)
        for value in spec if isinstance(spec, list) else (spec["low"], spec["high"]):
            try:
                validate(apply_overrides(config, [f"{key}={json.dumps(value)}"]))
            except UserError as e:
                raise UserError(f"{path}: {key}: {json.dumps(value)}: {str(e).removeprefix(f'{key}: ')}") from None
    return space


def check_space(path, key, spec):
    where = f"{path}: {key}"
    if not key or not all(key.split(".")):
        raise UserError(f"{path}: {key!r}: expected a config key path such as optimizer.args.lr")
    if isinstance(spec, list):
        if not spec:
            raise UserError(f"{where}: expected at least one choice")
        return
    if not isinstance(spec, dict) or set(spec) - {"low", "high", "log", "step"} or not {"low", "high"} <= set(spec):
        raise UserError(f'{where}: expected a list of choices or {{"low": L, "high": H}} with optional "log" and '
                        f'"step", got {json.dumps(spec)}')
    numbers = [spec[k] for k in ("low", "high", "step") if k in spec]
    if not all(isinstance(n, (int, float)) and not isinstance(n, bool) for n in numbers):
        raise UserError(f"{where}: low, high and step must be numbers, got {json.dumps(spec)}")
    if not spec["low"] < spec["high"]:
        raise UserError(f"{where}: expected low < high, got {spec['low']} and {spec['high']}")
    if spec.get("log") and spec["low"] <= 0:
        raise UserError(f"{where}: a log space needs low > 0, got {spec['low']}")
    if spec.get("log") and "step" in spec:
        raise UserError(f"{where}: a space takes log or step, not both")
    if not isinstance(spec.get("log", False), bool):
        raise UserError(f"{where}: log must be true or false")
    if "step" in spec and spec["step"] <= 0:
        raise UserError(f"{where}: step must be positive, got {spec['step']}")


def is_int_space(spec):
    return all(isinstance(spec[k], int) for k in ("low", "high", "step") if k in spec)


def scalar_choices(choices):
    """Choices Optuna stores as they are; a list with an object or list among them is stored as JSON text."""
    return all(c is None or isinstance(c, (bool, int, float, str)) for c in choices)


def suggest(trial, key, spec):
    """Draw one value of `spec` for the config key path `key`."""
    if isinstance(spec, list):
        if scalar_choices(spec):
            return trial.suggest_categorical(key, spec)
        return json.loads(trial.suggest_categorical(key, [json.dumps(c) for c in spec]))
    if is_int_space(spec):
        return trial.suggest_int(key, spec["low"], spec["high"], step=spec.get("step", 1), log=spec.get("log", False))
    return trial.suggest_float(key, spec["low"], spec["high"], step=spec.get("step"), log=spec.get("log", False))


def drawn_config(config, space, params):
    """The config with a trial's drawn values (Optuna's `params`) set."""
    values = {key: json.loads(params[key]) if isinstance(space[key], list) and not scalar_choices(space[key])
              else params[key] for key in space}
    return apply_overrides(config, [f"{key}={json.dumps(values[key])}" for key in sorted(space, key=len)])


# --- the study -----------------------------------------------------------------------------------------------------

def objective_direction(config, folds):
    mode, _, metric = config["trainer"]["monitor"].partition(" ")
    if mode == "off":
        raise UserError('trainer.monitor: tune.py optimises the monitored metric: set it, e.g. "max val_accuracy"')
    if not metric.startswith("val_"):
        raise UserError(f"trainer.monitor: tune.py scores and prunes trials by a validation value; {metric!r} is "
                        f"measured on the training batches (monitor \"{mode} val_{metric}\")")
    if folds and not config["data_loader"]["args"].get("n_folds"):
        raise UserError("--folds all: set data_loader.args.n_folds (e.g. 5)")
    if folds and out_of_fold_metric(config).startswith("ema_"):
        raise UserError(f"--folds all: the out-of-fold predictions are scored without EMA names; monitor "
                        f"{metric.replace('ema_', '', 1)!r} instead of {metric!r}")
    return "maximize" if mode == "max" else "minimize"


def out_of_fold_metric(config):
    """The name the monitored metric has in a run group's oof_metrics.json."""
    return config["trainer"]["monitor"].partition(" ")[2].removeprefix("val_")


def open_study(optuna, args, study_dir, study_name, direction, space, config):
    """Create the study, or open it again with the same command: the same space, direction and objective. --summary
    only opens one that exists."""
    if args.storage is None and args.summary and not (study_dir / "study.db").exists():
        raise UserError(f"--summary: no study at {study_dir}")
    if args.storage is None:
        study_dir.mkdir(parents=True, exist_ok=True)
    url = args.storage or f"sqlite:///{study_dir / 'study.db'}"
    options = {"storage": connect(optuna, url), "study_name": study_name, "sampler": make_sampler(optuna, config),
               "pruner": make_pruner(optuna, args.pruner, config, args.folds)}
    try:
        study = (optuna.load_study(**options) if args.summary else
                 optuna.create_study(**options, direction=direction, load_if_exists=True))
    except KeyError:
        raise UserError(f"--summary: no study named {study_name!r} in {url}") from None
    setting = {"search": space, "objective": "out-of-fold" if args.folds else "run", "direction": direction}
    config = json.loads(json.dumps(config))  # as the storage keeps it
    if not study.user_attrs and not args.summary:
        for name, value in {**setting, "config": config}.items():
            study.set_user_attr(name, value)
    elif {k: study.user_attrs.get(k) for k in setting} != setting:
        raise UserError(f"study {study_name!r} was started with another search space, objective or direction; "
                        f"name a new one with --study")
    elif study.user_attrs.get("config", config) != config:
        then, now = flatten(study.user_attrs["config"]), flatten(config)
        key = next(k for k in sorted(then.keys() | now.keys()) if then.get(k) != now.get(k))
        raise UserError(f"study {study_name!r} was started from another config ({key}: {then.get(key)!r} then, "
                        f"{now.get(key)!r} now): its trials would not compare; go back to that config, or name a new "
                        f"study with --study")
    return study


def connect(optuna, url):
    """The study's storage, with a heartbeat so that a trial whose process was killed is marked failed."""
    import sqlalchemy

    try:
        for attempt in range(3):
            try:
                with optuna_quiet():
                    return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT, grace_period=3 * HEARTBEAT)
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
                if attempt == 2:
                    raise
                time.sleep(1)  # workers creating a new database's tables at once: the others find them made
    except (ImportError, ValueError, sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as e:
        hint = " (install the database's Python driver: psycopg for PostgreSQL, in requirements-experiments.txt)" \
            if isinstance(e, ImportError) else ""
        raise UserError(f"--storage: cannot open {without_password(sqlalchemy, url)}: "
                        f"{first_line(e.__cause__ or e)}{hint}") from None


def without_password(sqlalchemy, url):
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return repr(url)


HEARTBEAT = 2  # seconds: a trial whose process stopped beating for three of them is marked failed


def make_pruner(optuna, name, config, folds):
    if name == "hyperband":
        steps = config["trainer"]["epochs"] * (config["data_loader"]["args"]["n_folds"] if folds else 1)
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=steps)
    return optuna.pruners.MedianPruner() if name == "median" else optuna.pruners.NopPruner()


def make_sampler(optuna, config):
    """Optuna's TPE sampler, seeded per trial from the config's seed and the trial's number: the same command draws
    the same trials, a continued study does not draw its first trials again, and workers sharing a study draw
    different ones."""

    class PerTrialSeed(optuna.samplers.BaseSampler):
        def __init__(self):
            self.tpe = None

        def before_trial(self, study, trial):
            self.tpe = optuna.samplers.TPESampler(seed=(config["seed"] * 1_000_003 + trial.number) % 2**32)
            self.tpe.before_trial(study, trial)

        def infer_relative_search_space(self, study, trial):
            return self.tpe.infer_relative_search_space(study, trial)

        def sample_relative(self, study, trial, search_space):
            return self.tpe.sample_relative(study, trial, search_space)

        def sample_independent(self, study, trial, param_name, param_distribution):
            return self.tpe.sample_independent(study, trial, param_name, param_distribution)

        def after_trial(self, study, trial, state, values):
            self.tpe.after_trial(study, trial, state, values)

    return PerTrialSeed()


FAILED_IN_A_ROW = 5  # failed trials in a row, none finished yet: the space may hold no config that trains


def run_study(optuna, study, target, objective):
    """Run trials until the study holds `target` finished ones, with any number of workers on one storage."""
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    objective.budget = target
    while True:
        with optuna_quiet():
            optuna.storages.fail_stale_trials(study)
        trials = study.get_trials(deepcopy=False)
        n_finished = sum(t.state in finished for t in trials)
        n_running = sum(t.state == optuna.trial.TrialState.RUNNING for t in trials)
        if n_finished >= target:
            return
        if n_finished + n_running >= target:
            time.sleep(1)  # another worker's trial may yet fail and need running again
            continue
        if objective.failed_in_a_row >= FAILED_IN_A_ROW and not n_finished:
            raise UserError(f"{FAILED_IN_A_ROW} trials in a row failed and none has trained; the last: "
                            f"{objective.last_reason.removeprefix('error: ')}")
        study.optimize(objective, n_trials=1, catch=(TrialFailed,))


class StudyStopped(Exception):
    """A trial's training was stopped by a signal (Ctrl-C, SIGTERM): the study stops with it."""

    def __init__(self, exit_code):
        super().__init__(f"stopped by signal {exit_code - 128}")
        self.exit_code = exit_code


class TrialFailed(Exception):
    """A trial whose config could not train: recorded as failed, with its reason, and the study goes on."""


class Objective:
    """One trial: draw a config, write it into the trial's folder and train it with train.py; the monitored value
    (or the out-of-fold metric) is the result."""

    def __init__(self, optuna, config, space, study_dir, folds):
        self.optuna, self.config, self.space, self.study_dir, self.folds = optuna, config, space, study_dir, folds
        self.budget = None
        self.failed_in_a_row, self.last_reason = 0, None

    def __call__(self, trial):
        self.check_budget(trial)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        for key, spec in self.space.items():
            suggest(trial, key, spec)
        drawn = drawn_config(self.config, self.space, trial.params)
        trial_dir = self.study_dir / f"trial{trial.number}"
        trial_dir.mkdir(parents=True, exist_ok=True)
        drawn["name"], drawn["trainer"]["save_dir"] = f"trial{trial.number}", str(self.study_dir)
        drawn_path = trial_dir / "drawn_config.json"  # not config.json: runs.py lists the run folder, not this one
        write_json(drawn, drawn_path)
        pruning = Pruning(self.optuna, trial, self.config, self.folds)
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(Tee(stderr, sys.stderr)):
                made = train.main(["-c", str(drawn_path)] + (["--folds", "all"] if self.folds else []),
                                  hooks=[pruning])
        except self.optuna.TrialPruned as e:
            trial.set_user_attr("reason", str(e))
            self.failed_in_a_row = 0
            raise
        except Exception as e:  # noqa: BLE001 - out of memory, say: this config failed, the study goes on
            self.fail(trial, first_line(e), counts=True)
        said = (stderr.getvalue().strip().splitlines() or [f"exit status {int(made)}"])[-1]
        if made >= 128:
            trial.set_user_attr("reason", said)
            raise StudyStopped(int(made))
        if made != 0:
            self.fail(trial, said, counts=True)
        self.failed_in_a_row = 0
        return self.out_of_fold_value(trial, made.run_dir) if self.folds else pruning.best

    def out_of_fold_value(self, trial, group_dir):
        scores, metric = read_json(group_dir / "oof_metrics.json"), out_of_fold_metric(self.config)
        if metric not in scores:
            self.fail(trial, f"{group_dir / 'oof_metrics.json'} has no {metric!r}, the monitored metric; it has "
                             f"{', '.join(scores)}")
        return scores[metric]

    def check_budget(self, trial):
        """Two workers may start a trial at once: the one past the budget fails at once instead of training."""
        states = (self.optuna.trial.TrialState.COMPLETE, self.optuna.trial.TrialState.PRUNED,
                  self.optuna.trial.TrialState.RUNNING)
        ahead = [t for t in trial.study.get_trials(deepcopy=False, states=states) if t.number < trial.number]
        if len(ahead) >= self.budget:
            self.fail(trial, "not run: the study had its trials running or finished when this one started")

    def fail(self, trial, reason, counts=False):
        """Record the trial as failed with its one-line reason; `counts`: its config could not train."""
        trial.set_user_attr("reason", reason)
        if counts:
            self.failed_in_a_row, self.last_reason = self.failed_in_a_row + 1, reason
        raise TrialFailed(reason)


class Tee(io.TextIOBase):
    """Write to several streams: a trial's error line is shown and recorded."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for stream in self.streams:
            stream.write(text)
        return len(text)


class Pruning(Hook):
    """Records the trial's run folder, reports each validation's monitored value to the trial and stops a trial the
    pruner gives up on; keeps the run's best value. With --folds all the steps run on across the folds."""

    def __init__(self, optuna, trial, config, folds):
        self.optuna, self.trial, self.folds = optuna, trial, folds
        self.epochs = config["trainer"]["epochs"]
        self.best = None

    def on_run_start(self, trainer):
        self.trial.set_user_attr("run_dir", str(trainer.run_dir.parent if self.folds else trainer.run_dir))

    def on_validation_end(self, trainer, epoch, log):
        value = log[trainer.mnt_metric]
        fold = trainer.config["data_loader"]["args"].get("fold") or 0
        self.trial.report(value, fold * self.epochs + epoch)
        if self.trial.should_prune():
            raise self.optuna.TrialPruned(f"pruned at epoch {epoch}: {trainer.mnt_metric} {value:.4f}")

    def on_run_end(self, trainer, log):
        self.best = trainer.mnt_best


# --- the summary ---------------------------------------------------------------------------------------------------

def summarise(optuna, study, config, space, study_dir):
    """Print the trials' table; write the best trial's config as best_config.json and the plots."""
    trials = study.get_trials(deepcopy=False)
    print(trial_table(trials, space))
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    study_dir.mkdir(parents=True, exist_ok=True)
    for t in trials:  # each trial's outcome beside its run folder, for runs.py
        if (study_dir / f"trial{t.number}").is_dir():
            write_json({"state": t.state.name.lower(), "value": t.value, "note": note(t)},
                       study_dir / f"trial{t.number}" / "trial.json")
    if not complete:
        print("no complete trial yet: no best_config.json")
        return
    best = study.best_trial
    write_json(drawn_config(config, space, best.params), study_dir / "best_config.json")
    print(f"best: trial {best.number}, {config['trainer']['monitor'].split(' ')[1]} {best.value:.6g}; "
          f"train it with: python train.py -c {study_dir / 'best_config.json'}")
    write_plots(optuna, study, complete, study_dir / "plots")


def trial_table(trials, space):
    keys = list(space)
    rows = [["trial", "state", "value", *keys, "note"]]
    for t in trials:
        value = "" if t.value is None else f"{t.value:.6g}"
        params = [short(t.params.get(k, "")) for k in keys]
        rows.append([str(t.number), t.state.name.lower(), value, *params, note(t)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows)


def note(trial):
    """Why a trial was pruned or failed; a trial failed without a reason was running when its process was killed."""
    if "reason" in trial.user_attrs:
        return trial.user_attrs["reason"]
    return "its process stopped during the trial (killed?)" if trial.state.name == "FAIL" else ""


def short(value):
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def write_plots(optuna, study, complete, folder):
    """Optimisation history, parameter importances and parallel coordinates as PNG files; a plot that cannot be
    drawn (too few trials, a package missing) is skipped with one line saying why."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from optuna.visualization import matplotlib as plots
    except ImportError as e:
        print(f"plots: skipped ({first_line(e)}; {INSTALL})")
        return
    varying = [k for k in complete[0].params if len({json.dumps(t.params.get(k)) for t in complete}) > 1]
    skip = {"param_importances": None if len(complete) >= 2 and varying else
            "parameter importances need two complete trials and a parameter that varies",
            "parallel_coordinate": None if varying else "parallel coordinates need a parameter that varies"}
    # PED-ANOVA (numpy only; Optuna 5's default) rather than Optuna 4's default fANOVA, which needs scikit-learn
    evaluator = {"param_importances": {"evaluator": optuna.importance.PedAnovaImportanceEvaluator()}}
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("optimization_history", "param_importances", "parallel_coordinate"):
        plot = functools.partial(getattr(plots, f"plot_{name}"), **evaluator.get(name, {}))
        reason = skip.get(name) or draw(plot, study, folder / f"{name}.png")
        if reason:
            print(f"plot {name}: skipped ({reason})")
    print(f"plots in {folder}")


def draw(plot, study, path):
    """`plot` of the study as a PNG file at `path`; returns why it could not be drawn, else None."""
    import matplotlib.pyplot as plt

    try:
        with optuna_quiet():
            axes = plot(study)
    except ImportError as e:
        return f"{first_line(e).split('. ')[0]}; {INSTALL}"
    figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
    atomic_write(path, functools.partial(figure.savefig, format="png", bbox_inches="tight"))
    plt.close(figure)
    return None


@contextlib.contextmanager
def optuna_quiet():
    """Optuna marks its heartbeat and matplotlib plots experimental and warns on every call."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


if __name__ == "__main__":
    sys.exit(main())
