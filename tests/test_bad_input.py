"""Bad input, as a user meets it in the terminal: `python train.py ...` / `python test.py ...` as real processes.

Every case must end with exit code 2 and a single `error: ...` line on stderr that names the culprit (a key path,
a file, a value), with no traceback anywhere, and must leave an existing save_dir exactly as it was: no file
changed or removed, no new run folder. Each case gets its own copy of a save_dir holding one real finished run.

A process costs a few seconds of interpreter and torch start-up, so the cases run concurrently, once per session
(only those selected), and each parametrized test below reads its case's outcome.
"""
import random
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest
import torch

import train
from tests.conftest import DATA, REPO, make_config, read_csv_rows, run_dirs, write_config

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
    bugs: dict = field(default_factory=dict)  # check ("exit", "message" or "files") -> the known bug failing it


def with_config(change, *extra):
    """A case that runs `train.py -c config.json *extra` on the small valid config after `change(config, ctx)`."""
    def make(ctx):
        config = ctx.config()
        change(config, ctx)
        return ["-c", write_config(config, ctx.dir / "config.json"), *extra]
    return make


DELETE = object()


def setting(dotted, value):
    """A change that sets (or with value DELETE, removes) the config entry at a dotted key path."""
    def change(config, ctx):
        *parents, last = dotted.split(".")
        node = config
        for key in parents:
            node = node[key]
        if value is DELETE:
            del node[last]
        else:
            node[last] = value
    return change


def flags(*extra):
    """A case that runs the small valid config with extra command-line arguments."""
    return with_config(lambda config, ctx: None, *extra)


def overriding(*overrides):
    return flags(*[a for o in overrides for a in ("-o", o)])


def malformed_json(ctx):
    path = ctx.dir / "bad.json"
    path.write_text('{\n    "name": "tiny",\n    "arch": ,\n}\n')
    return ["-c", path]


def data_copy(ctx, n_rows=40):
    """A data folder with the first n_rows of train.csv and a copy of exactly those images: (folder, ids)."""
    folder, images = ctx.dir / "data", ctx.dir / "data" / "train"
    images.mkdir(parents=True)
    rows = read_csv_rows(DATA / "train.csv")[:n_rows]
    (folder / "train.csv").write_text("id,label\n" + "".join(f"{r['id']},{r['label']}\n" for r in rows))
    for row in rows:
        shutil.copy(DATA / "train" / f"{row['id']}.png", images / f"{row['id']}.png")
    return folder, [r["id"] for r in rows]


def point_at(config, folder):
    config["data_loader"]["args"]["data_dir"] = str(folder)
    config["data_loader"]["args"]["train_images"] = "train"


def missing_image(config, ctx):
    folder, ids = data_copy(ctx)
    (folder / "train" / f"{ids[12]}.png").unlink()
    point_at(config, folder)


def image_bytes(content):
    """A change pointing the config at a copy of 40 images in which 00014.png holds `content(original bytes)`."""
    def change(config, ctx):
        folder, ids = data_copy(ctx)
        path = folder / "train" / f"{ids[12]}.png"
        path.write_bytes(content(path.read_bytes()))
        point_at(config, folder)
    return change


def csv_without_labels(config, ctx):
    folder, ids = data_copy(ctx)
    (folder / "train.csv").write_text("id\n" + "".join(f"{i}\n" for i in ids))
    point_at(config, folder)


def checkpoint_file(name, content):
    """A case resuming from ctx.dir/name, whose bytes `content(ctx)` gives."""
    def make(ctx):
        path = ctx.dir / name
        path.write_bytes(content(ctx))
        return ["-r", path]
    return make


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


LIBPNG_NOISE = ("libpng prints 'libpng error: ...' on stderr itself (torchvision decode_png) before the one error line "
                "of data_loader/datasets.py CsvImageDataset.read: a PNG with a valid signature and corrupt data gives "
                "two lines")

CASES = [
    Case("malformed-json", malformed_json, ("bad.json:3:13:", "malformed JSON")),
    Case("unknown-arch-type", with_config(setting("arch.type", "ConvNett")), ("arch.type", "'ConvNett'")),
    Case("unknown-data-loader-type", with_config(setting("data_loader.type", "CsvLoader")),
         ("data_loader.type", "'CsvLoader'")),
    Case("unknown-optimizer-type", with_config(setting("optimizer.type", "Adamm")), ("optimizer.type", "'Adamm'")),
    Case("unknown-lr-scheduler-type", with_config(setting("lr_scheduler.type", "StepLRR")),
         ("lr_scheduler.type", "'StepLRR'")),
    Case("unknown-loss", with_config(setting("loss", "cross_entropi")), ("loss", "'cross_entropi'")),
    Case("unknown-metric", with_config(setting("metrics", ["accuracy", "acuracy"])), ("metrics[1].type", "'acuracy'")),
    Case("wrong-args-key", with_config(setting("optimizer.args.learning_rate", 0.1)),
         ("optimizer.args.learning_rate", "AdamW")),
    Case("missing-arch-section", with_config(setting("arch", DELETE)), ("arch: missing",)),
    Case("missing-optimizer-section", with_config(setting("optimizer", DELETE)), ("optimizer: missing",)),
    Case("missing-trainer-section", with_config(setting("trainer", DELETE)), ("trainer: missing",)),
    Case("missing-epochs", with_config(setting("trainer.epochs", DELETE)), ("trainer.epochs: missing",)),
    Case("string-epochs", with_config(setting("trainer.epochs", "3")), ("trainer.epochs", '"3"')),
    Case("negative-epochs", with_config(setting("trainer.epochs", -1)), ("trainer.epochs", "-1")),
    Case("negative-batch-size", with_config(setting("data_loader.args.batch_size", -4)),
         ("data_loader.args.batch_size", "-4")),
    Case("validation-split-above-1", with_config(setting("data_loader.args.validation_split", 1.5)),
         ("data_loader.args.validation_split", "1.5")),
    Case("unknown-top-level-key", with_config(setting("nmae", "x")), ("nmae: unknown key", "'name'")),
    Case("unknown-trainer-key", with_config(setting("trainer.epoch", 3)), ("trainer.epoch: unknown key", "'epochs'")),
    Case("amp-fp8", with_config(setting("trainer.amp", "fp8")), ("trainer.amp", '"fp8"')),
    Case("monitor-never-produced", with_config(setting("trainer.monitor", "max val_f1")),
         ("trainer.monitor", "'val_f1'")),
    Case("override-bad-key-path", overriding("trainer.epochs.x=1"), ("trainer.epochs.x=1", "trainer.epochs")),
    Case("override-bad-value", overriding("trainer.epochs=abc"), ("trainer.epochs", '"abc"')),
    Case("override-bad-syntax", overriding("foo"), ("override 'foo'", "key.path=value")),
    Case("missing-data-folder", with_config(setting("data_loader.args.data_dir", "/nonexistent/mnist5k")),
         ("data_loader.args.data_dir", "/nonexistent/mnist5k")),
    Case("csv-without-label-column", with_config(csv_without_labels), ("train.csv", "'label'")),
    Case("label-outside-classes", with_config(setting("data_loader.args.classes", list(range(9)))),
         ("train.csv", "row 20", "label 9,")),
    Case("missing-image", with_config(missing_image), ("00014.png", "no such file")),
    Case("corrupt-image", with_config(image_bytes(lambda data: random.Random(0).randbytes(300))),
         ("00014.png", "cannot be decoded")),
    Case("corrupt-png", with_config(image_bytes(lambda data: data[:8] + random.Random(0).randbytes(300))),
         ("00014.png", "cannot be decoded"), bugs={"message": LIBPNG_NOISE}),
    Case("truncated-image", with_config(image_bytes(lambda data: data[: len(data) // 2])),
         ("00014.png", "cannot be decoded")),
    Case("empty-image", with_config(image_bytes(lambda data: b"")), ("00014.png", "empty")),
    Case("checkpoint-truncated", checkpoint_file("truncated.pth", truncated), ("truncated.pth",)),
    Case("checkpoint-empty", checkpoint_file("empty.pth", lambda ctx: b""), ("empty.pth", "empty")),
    Case("checkpoint-not-a-checkpoint", checkpoint_file("other.pth", not_a_checkpoint),
         ("other.pth", "not a checkpoint")),
    Case("checkpoint-random-bytes", checkpoint_file("noise.pth", lambda ctx: random.Random(1).randbytes(4096)),
         ("noise.pth",)),
    Case("checkpoint-other-architecture", fine_tune_other_width, ("model_best.pth", "size mismatch")),
    Case("resume-deleted-run-folder", lambda ctx: ["-r", ctx.run.parent / "1231_235959"], ("1231_235959",
                                                                                          "no such file")),
    Case("device-cuda-7", flags("--device", "cuda:7"), ("--device", "'cuda:7'")),
    Case("device-tpu", flags("--device", "tpu"), ("--device", "'tpu'")),
    Case("dotted-type-outside-roots", with_config(setting("optimizer.type", "os.system")),
         ("optimizer.type", "'os.system'", "import_roots")),
    Case("import-roots-not-a-list", with_config(setting("import_roots", "timm")), ("import_roots",)),
    Case("test-missing-checkpoint", lambda ctx: ["-r", ctx.run / "model_bets.pth"], ("model_bets.pth", "no such file"),
         script="test.py"),
    Case("test-truncated-checkpoint", checkpoint_file("truncated.pth", truncated), ("truncated.pth",),
         script="test.py"),
    Case("test-blend-mismatch", blend_mismatch, ("--blend", "b.csv", "a.csv"), script="test.py",
         must_not_exist=("blended",)),
]


def test_the_table_covers_at_least_thirty_distinct_cases():
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


def cases_for(check):
    """The table as parameters; a case with a known bug for this check is a strict xfail naming the bug."""
    return [pytest.param(case, id=case.id, marks=[pytest.mark.xfail(strict=True, reason=case.bugs[check])]
                         if check in case.bugs else []) for case in CASES]


@pytest.mark.parametrize("case", cases_for("exit"))
def test_exit_code_2_without_traceback(case, outcomes):
    outcome = outcomes[case.id]
    assert "Traceback" not in outcome.stdout + outcome.stderr, outcome.report()
    assert outcome.returncode == 2, outcome.report()


@pytest.mark.parametrize("case", cases_for("message"))
def test_one_error_line_naming_the_culprit(case, outcomes):
    outcome = outcomes[case.id]
    lines = outcome.stderr.splitlines()
    assert len(lines) == 1, f"expected exactly one line on stderr{outcome.report()}"
    assert lines[0].startswith("error: "), outcome.report()
    missing = [text for text in case.culprit if text not in lines[0]]
    assert not missing, f"the error line does not mention {missing}{outcome.report()}"


@pytest.mark.parametrize("case", cases_for("files"))
def test_save_dir_left_exactly_as_it_was(case, outcomes):
    outcome = outcomes[case.id]
    changed = sorted(p for p, state in outcome.before.items() if outcome.after.get(p) != state)
    added = sorted(set(outcome.after) - set(outcome.before))
    assert not changed, f"changed or removed under save_dir: {changed}{outcome.report()}"
    assert not added, f"created under save_dir: {added}{outcome.report()}"
    created = [name for name in case.must_not_exist if (outcome.folder / name).exists()]
    assert not created, f"created: {created}{outcome.report()}"
