"""Bad input, as a user meets it in the terminal: `python train.py ...` / `python test.py ...` as real processes.

Every case must end with exit code 2 and a single `error: ...` line on stderr that names the culprit (a key path,
a file, a value), with no traceback anywhere, and must leave an existing save_dir exactly as it was: no file
changed or removed, no new run folder. Each case gets its own copy of a save_dir holding one real finished run.

The cases here need files on disk (config, data, image, checkpoint, run and probability files) or the process
itself. Mistakes inside a readable config (unknown keys and types, wrong values, overrides, --device) are
test_config.py's, checked in-process, with one of them also in a real process there.

A process costs a few seconds of interpreter and torch start-up, so the cases run concurrently, once per session
(only those selected), and each parametrized test below reads its case's outcome.
"""
import random
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest
import torch

import train
from tests.helpers import DATA, N_TRAIN, REPO, make_config, read_csv_rows, run_dirs, stderr_error_line, write_config

TIMEOUT_S = 300  # per process; they finish in seconds, but the machine is shared
WORKERS = 4


# --- the cases ------------------------------------------------------------------------------------------------------

@dataclass
class Case:
    id: str
    make: Callable  # make(ctx) -> the script's arguments; it may write files into ctx.dir
    culprit: tuple  # substrings the error line must contain
    script: str = "train.py"
    must_not_exist: tuple = ()  # paths (relative to the case folder) the failed command must not create


def with_config(change, *extra):
    """A case that runs `train.py -c config.json *extra` on the small valid config after `change(config, ctx)`."""
    def make(ctx):
        config = ctx.config()
        change(config, ctx)
        return ["-c", write_config(config, ctx.dir / "config.json"), *extra]
    return make


def setting(dotted, value):
    """A change that sets the config entry at a dotted key path."""
    def change(config, ctx):
        *parents, last = dotted.split(".")
        node = config
        for key in parents:
            node = node[key]
        node[last] = value
    return change


def folder(ctx, name):
    """An empty folder ctx.dir/name."""
    path = ctx.dir / name
    path.mkdir()
    return path


def file_case(flag, name, content):
    """A case passing `flag ctx.dir/name` (a config with -c, a checkpoint with -r), whose bytes `content(ctx)` gives."""
    def make(ctx):
        path = ctx.dir / name
        path.write_bytes(content(ctx))
        return [flag, path]
    return make


def data_copy(ctx, n_rows=40):
    """A data folder with the first n_rows of train.csv and a copy of exactly those images: (folder, ids)."""
    folder, images = ctx.dir / "data", ctx.dir / "data" / "train"
    images.mkdir(parents=True)
    rows = read_csv_rows(DATA / "train.csv")[:n_rows]
    (folder / "train.csv").write_text("id,label\n" + "".join(f"{r['id']},{r['label']}\n" for r in rows))
    for row in rows:
        shutil.copy(DATA / "train" / f"{row['id']}.png", images / f"{row['id']}.png")
    return folder, [r["id"] for r in rows]


# The image the image cases break: the 13th row of train.csv (00014.png in the sample data, another id in the
# stand-in data of a project made without it). The labels of the config's 300-row slice run up to 9; the first row
# with label 9 is the one a 9-class config rejects (line numbers count the header as line 1).
BROKEN = f"{read_csv_rows(DATA / 'train.csv')[12]['id']}.png"
FIRST_NINE_LINE = 2 + [row["label"] for row in read_csv_rows(DATA / "train.csv")[:N_TRAIN]].index("9")
FIRST_LABEL = read_csv_rows(DATA / "train.csv")[0]["label"]


def point_at(config, folder):
    config["data_loader"]["args"]["data_dir"] = str(folder)
    config["data_loader"]["args"]["train_images"] = "train"


def missing_image(config, ctx):
    folder, ids = data_copy(ctx)
    (folder / "train" / f"{ids[12]}.png").unlink()
    point_at(config, folder)


def image_bytes(content):
    """A change pointing the config at a copy of 40 images in which the 13th holds `content(original bytes)`."""
    def change(config, ctx):
        folder, ids = data_copy(ctx)
        path = folder / "train" / f"{ids[12]}.png"
        path.write_bytes(content(path.read_bytes()))
        point_at(config, folder)
    return change


def train_csv(content):
    """A change pointing the config at a copy of 40 images whose train.csv is `content(its text)` (bytes), or
    missing with content None."""
    def change(config, ctx):
        folder, _ = data_copy(ctx)
        path = folder / "train.csv"
        if content is None:
            path.unlink()
        else:
            path.write_bytes(content(path.read_text()))
        point_at(config, folder)
    return change


def zero_padded_labels_and_numbered_classes(config, ctx):
    """Labels written "07" in train.csv, classes given as the numbers 0 to 9."""
    folder, _ = data_copy(ctx)
    rows = read_csv_rows(folder / "train.csv")
    (folder / "train.csv").write_text("id,label\n" + "".join(f"{r['id']},0{r['label']}\n" for r in rows))
    point_at(config, folder)
    config["data_loader"]["args"]["classes"] = list(range(10))


def csv_without_labels(config, ctx):
    folder, ids = data_copy(ctx)
    (folder / "train.csv").write_text("id\n" + "".join(f"{i}\n" for i in ids))
    point_at(config, folder)


def save_dir_file(config, ctx):
    """trainer.save_dir naming a file where the run folder would go."""
    (ctx.dir / "savefile").write_text("not a folder\n")
    config["trainer"]["save_dir"] = str(ctx.dir / "savefile")


def truncated(ctx):
    data = (ctx.run / "checkpoint-last.pth").read_bytes()
    return data[: len(data) // 2]


def not_a_checkpoint(ctx):
    path = ctx.dir / "scratch.pth"
    torch.save({"a": 1}, path)
    return path.read_bytes()


def fine_tune_other_width(ctx):
    config = ctx.config()
    config["arch"]["args"]["width"] = 16
    return ["-c", write_config(config, ctx.dir / "config.json"), "-r", ctx.run / "model_best.pth"]


def blend_mismatch(ctx):
    (ctx.dir / "a.csv").write_text("id,0,1\n00002,0.9,0.1\n00005,0.2,0.8\n")
    (ctx.dir / "b.csv").write_text("id,0,1\n00002,0.7,0.3\n00009,0.4,0.6\n")
    return ["--blend", ctx.dir / "a.csv", ctx.dir / "b.csv", "--out", ctx.dir / "blended"]


def blend_missing(ctx):
    (ctx.dir / "a.csv").write_text("id,0,1\n00002,0.9,0.1\n00005,0.2,0.8\n")
    return ["--blend", ctx.dir / "a.csv", ctx.dir / "gone.csv", "--out", ctx.dir / "blended"]


def blend_without_ids(ctx):
    (ctx.dir / "a.csv").write_text("id,0,1\n00002,0.9,0.1\n00005,0.2,0.8\n")
    (ctx.dir / "b.csv").write_text("name,0,1\n00002,0.7,0.3\n00005,0.4,0.6\n")
    return ["--blend", ctx.dir / "a.csv", ctx.dir / "b.csv", "--out", ctx.dir / "blended"]


def evaluating_best(*overrides):
    """A test.py case evaluating the finished run's model_best.pth into ctx.dir/out, with `-o` overrides."""
    def make(ctx):
        return ["-r", ctx.run / "model_best.pth", *[a for o in overrides for a in ("-o", o)], "--out", ctx.dir / "out"]
    return make


def changed_checkpoint(name, change):
    """A copy of the finished run's model_best.pth, changed by `change(checkpoint)`, as ctx.dir/name."""
    def make(ctx):
        checkpoint = torch.load(ctx.run / "model_best.pth", weights_only=True)
        change(checkpoint)
        torch.save(checkpoint, ctx.dir / name)
        return ctx.dir / name
    return make


def classes_reversed(checkpoint):
    checkpoint["config"]["data_loader"]["args"]["classes"] = list(range(9, -1, -1))


def nan_weights(checkpoint):
    weights = next(v for v in checkpoint["state_dict"].values() if v.is_floating_point())
    weights.fill_(float("nan"))


def ensemble_with(name, change):
    """A test.py case ensembling the finished run's model_best.pth with a changed copy of it into ctx.dir/out."""
    def make(ctx):
        return ["-r", ctx.run / "model_best.pth", "-r", changed_checkpoint(name, change)(ctx), "--out", ctx.dir / "out"]
    return make


def out_under_a_file(ctx):
    (ctx.dir / "notes.txt").write_text("a file\n")
    return ["-r", ctx.run / "model_best.pth", "--out", ctx.dir / "notes.txt" / "sub"]


def blend_a_predictions_file(ctx):
    (ctx.dir / "predictions.csv").write_text("id,label\n00002,1\n00005,1\n")
    return ["--blend", ctx.dir / "predictions.csv", "--out", ctx.dir / "blended"]


def sample_submission_of_other_ids(ctx):
    (ctx.dir / "sample.csv").write_text("id,label\nx1,0\nx2,0\n")
    return ["-r", ctx.run / "model_best.pth", "-o", f"inference.sample_submission={ctx.dir / 'sample.csv'}",
            "--out", ctx.dir / "out"]


CASES = [
    # the config file itself (mistakes inside a readable config are test_config.py's, checked in-process)
    Case("config-is-a-folder", lambda ctx: ["-c", folder(ctx, "configs")], ("configs", "cannot read")),
    Case("config-empty-file", file_case("-c", "empty.json", lambda ctx: b""), ("empty.json", "malformed JSON")),
    # data folders and CSV files
    Case("missing-data-folder", with_config(setting("data_loader.args.data_dir", "/nonexistent/mnist5k")),
         ("data_loader.args.data_dir", "/nonexistent/mnist5k")),
    Case("missing-image-folder", with_config(setting("data_loader.args.train_images", "/nonexistent/train")),
         ("/nonexistent/train", "no such folder")),
    Case("missing-train-csv", with_config(train_csv(None)), ("train.csv", "no such file")),
    Case("train-csv-not-utf8", with_config(train_csv(lambda text: text.replace("id,label", "id,l\u00e4bel")
                                                     .encode("latin-1"))), ("train.csv", "not a readable CSV")),
    Case("csv-without-label-column", with_config(csv_without_labels), ("train.csv", "'label'")),
    Case("label-outside-classes", with_config(setting("data_loader.args.classes", list(range(9)))),
         ("train.csv", f"line {FIRST_NINE_LINE} ", "label 9,")),
    Case("label-spelt-otherwise-than-classes", with_config(zero_padded_labels_and_numbered_classes),
         ("train.csv", "line 2 ", f"'0{FIRST_LABEL}' is not '{FIRST_LABEL}'")),
    Case("id-outside-image-folder", with_config(train_csv(lambda text: (text + "../../outside,3\n").encode())),
         ("train.csv", "line 42 ", "'../../outside'", "inside the image folder")),
    # image files
    Case("missing-image", with_config(missing_image), (BROKEN, "no such file")),
    Case("corrupt-image", with_config(image_bytes(lambda data: random.Random(0).randbytes(300))),
         (BROKEN, "cannot be decoded")),
    Case("corrupt-png", with_config(image_bytes(lambda data: data[:8] + random.Random(0).randbytes(300))),
         (BROKEN, "cannot be decoded")),
    Case("truncated-image", with_config(image_bytes(lambda data: data[: len(data) // 2])),
         (BROKEN, "cannot be decoded")),
    Case("empty-image", with_config(image_bytes(lambda data: b"")), (BROKEN, "empty")),
    # the run folder
    Case("save-dir-is-a-file", with_config(save_dir_file), ("trainer.save_dir", "savefile", "Not a directory")),
    # checkpoints and run folders
    Case("checkpoint-truncated", file_case("-r", "truncated.pth", truncated), ("truncated.pth",)),
    Case("checkpoint-empty", file_case("-r", "empty.pth", lambda ctx: b""), ("empty.pth", "empty")),
    Case("checkpoint-not-a-checkpoint", file_case("-r", "other.pth", not_a_checkpoint),
         ("other.pth", "not a checkpoint")),
    Case("checkpoint-random-bytes", file_case("-r", "noise.pth", lambda ctx: random.Random(1).randbytes(4096)),
         ("noise.pth",)),
    Case("checkpoint-other-architecture", fine_tune_other_width, ("model_best.pth", "size mismatch")),
    Case("resume-deleted-run-folder", lambda ctx: ["-r", ctx.run.parent / "1231_235959"], ("1231_235959",
                                                                                          "no such file")),
    Case("resume-folder-without-checkpoint", lambda ctx: ["-r", folder(ctx, "empty-run")], ("empty-run",)),
    Case("resume-with-another-rate", lambda ctx: ["-r", ctx.run, "--lr", "0.5"], ("--lr", "restores its optimizer")),
    Case("resume-with-other-optimizer-args", lambda ctx: ["-r", ctx.run, "-o", "optimizer.args.weight_decay=0.1"],
         ("-o optimizer.args.weight_decay", "rates included")),
    # test.py
    Case("test-missing-checkpoint", lambda ctx: ["-r", ctx.run / "model_bets.pth"], ("model_bets.pth", "no such file"),
         script="test.py"),
    Case("test-truncated-checkpoint", file_case("-r", "truncated.pth", truncated), ("truncated.pth",),
         script="test.py"),
    Case("test-folder-without-checkpoint", lambda ctx: ["-r", folder(ctx, "empty-run")],
         ("empty-run", "a folder without model_best.pth or checkpoint-last.pth"), script="test.py"),
    Case("test-missing-test-csv", evaluating_best("data_loader.args.test_csv=nope.csv"), ("nope.csv", "no such file"),
         script="test.py", must_not_exist=("out",)),
    Case("test-sample-submission-missing", evaluating_best("inference.sample_submission=/nonexistent/sample.csv"),
         ("inference.sample_submission", "/nonexistent/sample.csv"), script="test.py"),
    Case("test-sample-submission-other-ids", sample_submission_of_other_ids,
         ("inference.sample_submission", "sample.csv", "'x1'"), script="test.py"),
    Case("test-ensemble-other-class-order", ensemble_with("reordered.pth", classes_reversed),
         ("model_best.pth", "reordered.pth", "class 0"), script="test.py", must_not_exist=("out",)),
    Case("test-nan-weights", ensemble_with("nan.pth", nan_weights), ("nan.pth", "NaN"), script="test.py",
         must_not_exist=("out",)),
    Case("test-tta-crop-larger-than-images",
         evaluating_best('inference.tta=[{"type": "Identity"}, {"type": "RandomCrop", "args": {"size": 64}}]'),
         ("inference.tta[1]", "RandomCrop"), script="test.py", must_not_exist=("out",)),
    Case("test-out-under-a-file", out_under_a_file, ("--out", "notes.txt", "not a folder"), script="test.py"),
    Case("test-blend-mismatch", blend_mismatch, ("--blend", "b.csv", "a.csv"), script="test.py",
         must_not_exist=("blended",)),
    Case("test-blend-missing-file", blend_missing, ("--blend", "gone.csv"), script="test.py",
         must_not_exist=("blended",)),
    Case("test-blend-without-id-column", blend_without_ids, ("--blend", "b.csv"), script="test.py",
         must_not_exist=("blended",)),
    Case("test-blend-a-predictions-file", blend_a_predictions_file, ("--blend", "predictions.csv"), script="test.py",
         must_not_exist=("blended",)),
]


def test_the_table_covers_at_least_thirty_distinct_cases():
    """Thirty distinct situations with files and processes: a config file that is a folder or empty; missing data
    folders, CSV files and images, CSVs and images that cannot be read; a save_dir that is a file; damaged, foreign
    and missing checkpoints and run folders; test.py's own files (test CSV, sample submission, blended CSVs, an
    output path through a file), ensembles of models trained on other class orders, NaN weights, failing TTA."""
    assert len(CASES) >= 30
    assert len({case.id for case in CASES}) == len(CASES)
    assert all(case.culprit for case in CASES)


# --- running them ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def finished_run(data_slice, tmp_path_factory):
    """One real, small, finished run (config.json, history.csv, train.log, checkpoint-last.pth, model_best.pth)."""
    base = tmp_path_factory.mktemp("finished_run")
    config = make_config(data_slice, base / "saved", epochs=1)
    assert train.main(["-c", str(write_config(config, base / "config.json"))]) == 0
    (run,) = run_dirs(base / "saved")
    assert {p.name for p in run.iterdir()} >= {"checkpoint-last.pth", "model_best.pth", "history.csv", "config.json"}
    return SimpleNamespace(save_dir=base / "saved", data=data_slice)


def snapshot(root):
    """Every path under root with (mtime, size) for files; folders are recorded as present."""
    state = {}
    for path in root.rglob("*"):
        stat = path.stat()
        state[str(path.relative_to(root))] = "folder" if path.is_dir() else (stat.st_mtime_ns, stat.st_size)
    return state


@dataclass
class Outcome:
    case: Case
    command: list
    folder: Path
    before: dict
    after: dict = None
    returncode: int = None
    stdout: str = ""
    stderr: str = ""

    def report(self):
        return (f"\n$ {' '.join(self.command)}\nexit code: {self.returncode}\n--- stderr ---\n{self.stderr}"
                f"--- stdout ---\n{self.stdout}")


def prepare(case, finished, root):
    """The case's folder with its own copy of the finished save_dir (mtimes kept) and the files the case writes."""
    folder = root / case.id
    save_dir = folder / "saved"
    shutil.copytree(finished.save_dir, save_dir)
    (run,) = run_dirs(save_dir)
    ctx = SimpleNamespace(dir=folder, save_dir=save_dir, run=run,
                          config=lambda: make_config(finished.data, save_dir))
    command = [sys.executable, str(REPO / case.script), *map(str, case.make(ctx))]
    return Outcome(case, command, folder, before=snapshot(save_dir))


def execute(outcome):
    try:
        proc = subprocess.run(outcome.command, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S,
                              check=False)
        outcome.returncode, outcome.stdout, outcome.stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        outcome.stderr = f"(killed after {TIMEOUT_S} s)\n{e.stderr or ''}"
    outcome.after = snapshot(outcome.folder / "saved")
    return outcome


@pytest.fixture(scope="module")
def outcomes(request, finished_run, tmp_path_factory):
    """Run every selected case once, a few processes at a time: {case id: Outcome}."""
    selected = {item.callspec.params["case"].id for item in request.session.items
                if getattr(item, "module", None) is request.module and "case" in getattr(
                    getattr(item, "callspec", None), "params", {})}
    root = tmp_path_factory.mktemp("bad_input")
    prepared = [prepare(case, finished_run, root) for case in CASES if case.id in selected]
    with ThreadPoolExecutor(WORKERS) as pool:
        return {outcome.case.id: outcome for outcome in pool.map(execute, prepared)}


CASE_PARAMS = [pytest.param(case, id=case.id) for case in CASES]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_exit_code_2_without_traceback(case, outcomes):
    outcome = outcomes[case.id]
    assert "Traceback" not in outcome.stdout + outcome.stderr, outcome.report()
    assert outcome.returncode == 2, outcome.report()


@pytest.mark.slow
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_one_error_line_naming_the_culprit(case, outcomes):
    outcome = outcomes[case.id]
    line = stderr_error_line(outcome.stderr, outcome.stdout, outcome.report())
    missing = [text for text in case.culprit if text not in line]
    assert not missing, f"the error line does not mention {missing}{outcome.report()}"


@pytest.mark.slow
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_save_dir_left_exactly_as_it_was(case, outcomes):
    outcome = outcomes[case.id]
    changed = sorted(p for p, state in outcome.before.items() if outcome.after.get(p) != state)
    added = sorted(set(outcome.after) - set(outcome.before))
    assert not changed, f"changed or removed under save_dir: {changed}{outcome.report()}"
    assert not added, f"created under save_dir: {added}{outcome.report()}"
    created = [name for name in case.must_not_exist if (outcome.folder / name).exists()]
    assert not created, f"created: {created}{outcome.report()}"
