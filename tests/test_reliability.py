"""What survives when things go wrong: kill -9, Ctrl-C and SIGTERM mid-epoch, a crash while a checkpoint is being
written, a loss that turns NaN, untrusted checkpoint files and configs, a DataLoader worker that fails.

train.py runs as a real process wherever the user would see the difference (signals, exit codes, messages), with
one intra-op thread (OMP_NUM_THREADS=1, for reference and resumed runs alike) on this small, shared machine.
Nothing here asserts on time: waits are for files and process exits, with generous timeouts.
"""
import errno
import io
import math
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from multiprocessing import connection, resource_sharer
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import train
from base.base_data_loader import BaseDataLoader
from tests.helpers import (
    DATA,
    REPO,
    error_line,
    evaluate,
    load,
    make_config,
    process_error_line,
    read_csv_rows,
    read_history,
    run_dirs,
    shown,
    the_only_line,
    write_config,
)
from utils import checkpoint as checkpoint_module
from utils.checkpoint import best_checkpoint

pytestmark = pytest.mark.slow  # real processes throughout, and runs interrupted and resumed

TIMEOUT_S = 600  # a generous ceiling per process; a normal run here takes seconds
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
EPOCHS = 3
SAVE_EVERY = 3  # optimizer steps between mid-epoch checkpoints: 8 batches an epoch, so 2-3 per epoch


# --- helpers --------------------------------------------------------------------------------------------------------

def small_config(data_dir, save_dir, **trainer):
    """The shared small config (ConvNet, AdamW, OneCycleLR, 240 training images in 8 batches) for EPOCHS epochs,
    with a mid-epoch checkpoint every SAVE_EVERY optimizer steps."""
    return make_config(data_dir, save_dir, epochs=EPOCHS, save_every_n_steps=SAVE_EVERY, **trainer)


def command(script, *args):
    return [sys.executable, str(REPO / script), *map(str, args)]


def run(script, *args, timeout=TIMEOUT_S):
    """`python script args` from the repository root, to completion."""
    return subprocess.run(command(script, *args), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout,
                          check=False)


class Training:
    """`python train.py args` in the background; output goes to files, so nothing blocks on a full pipe."""

    def __init__(self, folder, *args):
        self.folder = Path(folder)
        self.out, self.err = open(self.folder / "stdout.txt", "w"), open(self.folder / "stderr.txt", "w")
        self.proc = subprocess.Popen(command("train.py", *args), cwd=REPO, env=ENV, stdout=self.out,
                                     stderr=self.err)

    def wait(self):
        try:
            return self.proc.wait(timeout=TIMEOUT_S)
        finally:
            self.out.close()
            self.err.close()

    @property
    def stderr(self):
        return (self.folder / "stderr.txt").read_text()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.wait()

    def pause_at(self, save_dir, wanted):
        """Poll checkpoint-last.pth of the (only) run under save_dir until `wanted(checkpoint, run)` holds, then stop
        the process (SIGSTOP) and confirm on the now frozen files; returns (run, checkpoint) with the process stopped.
        Saves are atomic renames, so a file that exists is complete."""
        deadline = time.monotonic() + TIMEOUT_S
        seen = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"train.py ended (exit code {self.proc.returncode}) before the wanted checkpoint; "
                            f"make the run longer\n{self.stderr}")
            runs = run_dirs(save_dir)
            last = runs[0] / "checkpoint-last.pth" if runs else None
            stamp = last.stat().st_mtime_ns if last is not None and last.exists() else None
            if stamp is not None and stamp != seen:
                seen = stamp
                if wanted(load(last), runs[0]):
                    self.proc.send_signal(signal.SIGSTOP)
                    checkpoint = load(last)
                    if wanted(checkpoint, runs[0]):
                        return runs[0], checkpoint
                    self.proc.send_signal(signal.SIGCONT)
            time.sleep(0.01)
        pytest.fail("no wanted checkpoint appeared in time")


def mid_epoch_and_consistent(checkpoint, run_dir):
    """A checkpoint taken inside an epoch, with history.csv holding exactly the epochs before it."""
    history = run_dir / "history.csv"
    rows = len(read_history(run_dir)) if history.exists() else 0
    return checkpoint["batches_done"] > 0 and rows == checkpoint["epoch"] - 1


def assert_same_run(run_dir, reference):
    """Final weights bitwise equal to the uninterrupted run's, and history.csv equal row for row."""
    mine, theirs = load(run_dir / "checkpoint-last.pth"), load(reference.run / "checkpoint-last.pth")
    assert mine["epoch"] == theirs["epoch"] == EPOCHS and mine["global_step"] == theirs["global_step"]
    assert mine["state_dict"].keys() == theirs["state_dict"].keys()
    different = [k for k in mine["state_dict"] if not torch.equal(mine["state_dict"][k], theirs["state_dict"][k])]
    assert not different, f"tensors differ from the uninterrupted run: {different}"
    mine, theirs = read_history(run_dir), read_history(reference.run)
    assert len(mine) == len(theirs), f"history.csv has {len(mine)} rows, the uninterrupted run's {len(theirs)}"
    different = [(row["epoch"], key, row[key], other.get(key)) for row, other in zip(mine, theirs)
                 for key in row if row[key] != other.get(key)]
    assert not different, f"history.csv differs from the uninterrupted run's (epoch, column, mine, theirs): {different}"
    assert list(mine[0]) == list(theirs[0])


def all_finite(state_dict):
    return all(torch.isfinite(t).all() for t in state_dict.values() if t.is_floating_point())


VARIANTS = {
    "workers0": {"num_workers": 0},
    "workers2-accumulate2": {"num_workers": 2, "accumulation_steps": 2},
}


def variant_config(data_dir, save_dir, variant):
    config = small_config(data_dir, save_dir)
    if "accumulation_steps" in VARIANTS[variant]:
        config["trainer"]["accumulation_steps"] = VARIANTS[variant]["accumulation_steps"]
    config["data_loader"]["args"]["num_workers"] = VARIANTS[variant]["num_workers"]
    return config


@pytest.fixture(scope="module")
def reference(data_slice, tmp_path_factory):
    """Uninterrupted runs, one per variant, made on first use: {variant: namespace(run, config)}."""
    made = {}

    def get(variant):
        if variant not in made:
            base = tmp_path_factory.mktemp(f"reference-{variant}")
            config = variant_config(data_slice, base / "saved", variant)
            proc = run("train.py", "-c", write_config(config, base / "config.json"))
            assert proc.returncode == 0, shown(proc)
            (run_dir,) = run_dirs(base / "saved")
            made[variant] = SimpleNamespace(run=run_dir, config=config)
        return made[variant]
    return get


# --- kill -9, Ctrl-C, SIGTERM ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_resume_after_kill_9_mid_epoch_is_exact(variant, reference, data_slice, tmp_path):
    expected = reference(variant)
    config = variant_config(data_slice, tmp_path / "saved", variant)
    training = Training(tmp_path, "-c", write_config(config, tmp_path / "config.json"))
    try:
        run_dir, checkpoint = training.pause_at(tmp_path / "saved", mid_epoch_and_consistent)
        training.proc.send_signal(signal.SIGKILL)
    finally:
        training.kill()
    assert training.proc.returncode == -signal.SIGKILL
    assert 0 < checkpoint["batches_done"] and checkpoint["epoch"] <= EPOCHS

    proc = run("train.py", "-r", run_dir / "checkpoint-last.pth")
    assert proc.returncode == 0, shown(proc)
    assert run_dirs(tmp_path / "saved") == [run_dir]  # the run continued in its own folder
    assert f"resumed at epoch {checkpoint['epoch']}, batch {checkpoint['batches_done']}" in proc.stdout
    assert_same_run(run_dir, expected)


@pytest.mark.parametrize("signum, exit_code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_and_prints_how_to_resume(signum, exit_code, reference, data_slice, tmp_path):
    expected = reference("workers0")
    config = small_config(data_slice, tmp_path / "saved")
    training = Training(tmp_path, "-c", write_config(config, tmp_path / "config.json"))
    try:
        # stop the process at its first checkpoint (epoch 1), queue the signal, let it go: the signal lands
        # early in a 3-epoch run, whatever the load on the machine
        run_dir, _ = training.pause_at(tmp_path / "saved", lambda checkpoint, run_dir: True)
        training.proc.send_signal(signum)
        training.proc.send_signal(signal.SIGCONT)
        code = training.wait()
    finally:
        training.kill()
    stderr = training.stderr
    assert code == exit_code, stderr
    last = run_dir / "checkpoint-last.pth"
    line = the_only_line(stderr)
    assert line.startswith(f"stopped by {signal.Signals(signum).name} at ")
    assert line.endswith(f"resume with: python train.py -r {last}")
    checkpoint = load(last)
    assert checkpoint["epoch"] < EPOCHS or checkpoint["batches_done"] > 0

    # the command it printed, as the user would paste it
    resume_args = line.split("resume with: python train.py ", 1)[1].split()
    proc = run("train.py", *resume_args)
    assert proc.returncode == 0, shown(proc)
    assert run_dirs(tmp_path / "saved") == [run_dir]
    assert_same_run(run_dir, expected)


# --- a crash while a checkpoint is written (in-process) -------------------------------------------------------------

class Crash(Exception):
    """Stands for the process dying in the middle of writing a file."""


@pytest.fixture(scope="module")
def in_process_reference(data_slice, tmp_path_factory):
    """The uninterrupted run, in this process (so with this process's thread settings, as the crashed runs)."""
    base = tmp_path_factory.mktemp("in-process-reference")
    config = small_config(data_slice, base / "saved")
    assert train.main(["-c", str(write_config(config, base / "config.json"))]) == 0
    (run_dir,) = run_dirs(base / "saved")
    return SimpleNamespace(run=run_dir, config=config)


def crash_on_save(monkeypatch, n):
    """Make the n-th torch.save (all of them come from utils.checkpoint.save_checkpoint) write half its bytes
    into the open temporary file, then die."""
    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) != n:
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        f.flush()
        raise Crash(f"killed while writing checkpoint #{n}")

    monkeypatch.setattr(checkpoint_module.torch, "save", save)
    return calls


# With 8 batches an epoch and a save every 3 steps, the saves are: epoch 1 after 3 and 6 batches, end of epoch 1;
# epoch 2 after 1, 4 and 7 batches, end of epoch 2; ...
CRASHES = {
    "mid-epoch save": (5, {"epoch": 2, "batches_done": 1}),
    "end-of-epoch save": (7, {"epoch": 2, "batches_done": 7}),
}


@pytest.mark.parametrize("which", [
    "mid-epoch save",
    "end-of-epoch save",
])
def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(which, in_process_reference, data_slice, tmp_path,
                                                                 monkeypatch):
    n, previous = CRASHES[which]
    config = small_config(data_slice, tmp_path / "saved")
    path = write_config(config, tmp_path / "config.json")
    calls = crash_on_save(monkeypatch, n)
    with pytest.raises(Crash):
        train.main(["-c", str(path)])
    monkeypatch.undo()
    assert len(calls) == n

    (run_dir,) = run_dirs(tmp_path / "saved")
    last = run_dir / "checkpoint-last.pth"
    assert not list(run_dir.glob("*.tmp"))  # the half-written file is removed with the failed save
    checkpoint = load(last)  # the previous checkpoint, intact
    assert {k: checkpoint[k] for k in previous} == previous
    assert all_finite(checkpoint["state_dict"])

    assert train.main(["-r", str(last)]) == 0
    assert run_dirs(tmp_path / "saved") == [run_dir]
    assert_same_run(run_dir, in_process_reference)


def test_history_lr_of_an_epoch_resumed_midway(in_process_reference, data_slice, tmp_path, monkeypatch):
    config = small_config(data_slice, tmp_path / "saved")
    path = write_config(config, tmp_path / "config.json")
    crash_on_save(monkeypatch, CRASHES["mid-epoch save"][0])
    with pytest.raises(Crash):
        train.main(["-c", str(path)])
    monkeypatch.undo()
    (run_dir,) = run_dirs(tmp_path / "saved")
    assert train.main(["-r", str(run_dir / "checkpoint-last.pth")]) == 0
    assert [row["lr"] for row in read_history(run_dir)] == [row["lr"] for row in read_history(in_process_reference.run)]


# --- a loss that becomes NaN ----------------------------------------------------------------------------------------

class NanLossAt(torch.nn.Module):
    """Cross-entropy, except NaN on the `at`-th loss computed with gradients in the process (counted from 1; the
    first is the trial step train.py takes before training, the second the first training batch).

    Configs name it as "tests.test_reliability.NanLossAt" with "import_roots": ["tests"]."""

    def __init__(self, at):
        super().__init__()
        self.at = at
        self.calls = 0

    def forward(self, output, target):
        loss = F.cross_entropy(output, target)
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls == self.at:
                return loss * math.nan
        return loss


def nan_config(data_dir, save_dir, at, **trainer):
    config = small_config(data_dir, save_dir, **trainer)
    config["import_roots"] = ["tests"]
    config["loss"] = {"type": "tests.test_reliability.NanLossAt", "args": {"at": at}}
    return config


def test_nan_loss_stops_with_exit_1_naming_epoch_and_batch(data_slice, tmp_path):
    # the 11th training batch is epoch 2, batch index 2; the last checkpoint before it: epoch 2 after 1 batch
    config = nan_config(data_slice, tmp_path / "saved", at=12)
    proc = run("train.py", "-c", write_config(config, tmp_path / "config.json"))
    assert proc.returncode == 1, shown(proc)
    line = process_error_line(proc)
    assert line.startswith("error: the loss became non-finite at epoch 2, batch 2;"), line
    (run_dir,) = run_dirs(tmp_path / "saved")
    assert str(run_dir) in line

    checkpoint = load(run_dir / "checkpoint-last.pth")
    assert (checkpoint["epoch"], checkpoint["batches_done"]) == (2, 1)
    assert all_finite(checkpoint["state_dict"])
    assert [row["epoch"] for row in read_history(run_dir)] == ["1"]


def test_nan_loss_before_any_checkpoint_says_there_is_none(data_slice, tmp_path):
    config = nan_config(data_slice, tmp_path / "saved", at=3)  # the trial step and batch 1 pass, batch 2 is NaN
    proc = run("train.py", "-c", write_config(config, tmp_path / "config.json"))
    assert proc.returncode == 1, shown(proc)
    assert "no checkpoint was saved yet in" in process_error_line(proc)


def test_exploding_learning_rate_stops_and_keeps_finite_weights(data_slice, tmp_path):
    """No test code in the loop: plain SGD at lr 1e30 blows the model up within a few steps."""
    config = small_config(data_slice, tmp_path / "saved")
    config["optimizer"] = {"type": "SGD", "args": {"lr": 1e30}}
    config["lr_scheduler"] = {}
    config["trainer"]["save_every_n_steps"] = 1
    proc = run("train.py", "-c", write_config(config, tmp_path / "config.json"))
    assert proc.returncode == 1, shown(proc)
    line = process_error_line(proc)
    assert line.startswith("error: the loss became non-finite at epoch "), line
    (run_dir,) = run_dirs(tmp_path / "saved")
    # the first loss comes before any update, so the checkpoint saved after step 1 is kept
    assert all_finite(load(run_dir / "checkpoint-last.pth")["state_dict"]), "the kept checkpoint is not finite"


def test_nan_loss_with_skip_completes_the_run(data_slice, tmp_path):
    config = nan_config(data_slice, tmp_path / "saved", at=12, nonfinite_loss="skip")
    proc = run("train.py", "-c", write_config(config, tmp_path / "config.json"))
    assert proc.returncode == 0, shown(proc)
    assert "non-finite gradients at epoch 2, batch 2: update skipped" in proc.stdout
    (run_dir,) = run_dirs(tmp_path / "saved")
    history = read_history(run_dir)
    assert [row["epoch"] for row in history] == ["1", "2", "3"]
    assert all(math.isfinite(float(row["loss"])) for row in history)
    assert all_finite(load(run_dir / "checkpoint-last.pth")["state_dict"])


# --- untrusted checkpoints and configs ------------------------------------------------------------------------------

class CreatesAFile:
    """Unpickling this calls open(path, "w"), which creates the file: a stand-in for any code a pickle can run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def write_pickle(obj, path, how):
    if how == "torch.save":
        torch.save(obj, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f)


@pytest.mark.parametrize("script", ["train.py", "test.py"])
@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused(script, how, tmp_path):
    pwned = tmp_path / "pwned"
    model = tmp_path / "model.pth"
    write_pickle({"state_dict": CreatesAFile(pwned), "config": {}, "epoch": 1}, model, how)

    # the payload is live: loading the file the unsafe way runs it
    shutil.copyfile(model, tmp_path / "copy.pth")
    try:
        torch.load(tmp_path / "copy.pth", weights_only=False)
    except RuntimeError:
        pass  # a bare pickle: torch.load unpickles it looking for its magic number, then gives up
    assert pwned.exists()
    pwned.unlink()

    proc = run(script, "-r", model)
    assert not pwned.exists(), f"{script} ran code from the checkpoint{shown(proc)}"
    assert proc.returncode == 2, shown(proc)
    assert process_error_line(proc).startswith(f"error: checkpoint {str(model)!r}: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.pth", "model.pth"]


def format_all(value, **fields):
    """`value` with str.format(**fields) applied to every string inside it."""
    if isinstance(value, dict):
        return {k: format_all(v, **fields) for k, v in value.items()}
    if isinstance(value, list):
        return [format_all(v, **fields) for v in value]
    return value.format(**fields)


@pytest.mark.parametrize("dotted, args", [
    ("os.system", {"command": "touch {pwned}"}),
    ("builtins.eval", {"source": "open({pwned!r}, 'w')"}),
    ("subprocess.run", {"args": ["touch", "{pwned}"]}),
], ids=["os.system", "builtins.eval", "subprocess.run"])
def test_config_type_outside_import_roots_is_refused(dotted, args, data_slice, tmp_path):
    pwned = str(tmp_path / "pwned")
    config = small_config(data_slice, tmp_path / "saved")
    config["arch"] = {"type": dotted, "args": format_all(args, pwned=pwned)}
    proc = run("train.py", "-c", write_config(config, tmp_path / "config.json"))
    assert proc.returncode == 2, shown(proc)
    line = process_error_line(proc)
    assert line.startswith(f"error: arch.type: {dotted!r} is outside the allowed import roots"), line
    assert "import_roots" in line
    assert not Path(pwned).exists()
    assert not (tmp_path / "saved").exists()


@pytest.mark.parametrize("script", ["train.py", "test.py"])
def test_a_checkpoint_config_cannot_run_code(script, data_slice, tmp_path):
    pwned = tmp_path / "pwned"
    config = small_config(data_slice, tmp_path / "saved")
    config["import_roots"] = ["subprocess"]
    config["arch"] = {"type": "subprocess.run", "args": {"args": ["touch", str(pwned)]}}
    model = tmp_path / "model.pth"
    torch.save({"state_dict": {}, "config": config, "epoch": 1, "batches_done": 0}, model)
    assert load(model)["config"] == config  # tensors and plain data only: weights_only loading accepts it

    proc = run(script, "-r", model)
    assert not pwned.exists(), f"{script} -r ran a command named in the checkpoint's config{shown(proc)}"
    assert proc.returncode == 2, shown(proc)
    process_error_line(proc)


# --- a DataLoader worker that fails ---------------------------------------------------------------------------------

def test_worker_failing_on_a_corrupt_image_is_one_line_without_hanging(tmp_path):
    """cache=false: images are decoded in the two worker processes, during training, not up front."""
    rows = read_csv_rows(DATA / "train.csv")[:40]
    images = tmp_path / "data" / "train"
    images.mkdir(parents=True)
    (tmp_path / "data" / "train.csv").write_text("id,label\n" + "".join(f"{r['id']},{r['label']}\n" for r in rows))
    for row in rows:
        shutil.copy(DATA / "train" / f"{row['id']}.png", images / f"{row['id']}.png")
    corrupt = images / f"{rows[12]['id']}.png"
    corrupt.write_bytes(bytes(random.Random(0).randrange(256) for _ in range(300)))

    config = make_config(tmp_path / "data", tmp_path / "saved", epochs=1)
    config["data_loader"]["args"].update(train_images="train", cache=False, num_workers=2, batch_size=8)
    proc = run("train.py", "-c", write_config(config, tmp_path / "config.json"), timeout=300)  # a hang fails here
    assert proc.returncode == 2, shown(proc)
    line = process_error_line(proc)
    assert line.startswith(f"error: image {str(corrupt)!r}: cannot be decoded"), line


def test_a_dataloader_worker_that_dies_is_one_line_not_a_hang(data_slice, tmp_path):
    """A worker killed from outside (the OOM killer, say): the run ends with one line and exit code 1."""
    config = make_config(data_slice, tmp_path / "saved", epochs=200)
    config["data_loader"]["args"]["num_workers"] = 2
    proc = subprocess.Popen(command("train.py", "-c", write_config(config, tmp_path / "config.json")), cwd=REPO,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    deadline = time.monotonic() + TIMEOUT_S
    # an epoch has ended, so the (persistent) workers are up and serving, not still being started
    while proc.poll() is None and not list(tmp_path.glob("saved/*/*/checkpoint-last.pth")) and (
            time.monotonic() < deadline):
        time.sleep(0.2)
    assert proc.poll() is None and children.read_text().split(), "the run ended before a worker could be killed"
    os.kill(int(children.read_text().split()[0]), signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    finished = SimpleNamespace(returncode=proc.returncode, stdout=stdout, stderr=stderr)
    assert proc.returncode == 1, shown(finished)
    line = process_error_line(finished)
    assert line.startswith("error: DataLoader worker") and "resume with" in line


class BuggyDataset(torch.utils.data.Dataset):
    """A dataset with a bug in its own code. Configs name its loader as "tests.test_reliability.BuggyLoader" with
    "import_roots": ["tests"]."""

    def __len__(self):
        return 64

    def __getitem__(self, index):
        return torch.stack([torch.zeros(1, 28, 28), torch.zeros(1, 14, 14)]), index % 10


class BuggyLoader(BaseDataLoader):
    def __init__(self, num_workers):
        super().__init__(BuggyDataset(), batch_size=8, shuffle=True, validation_split=0.25, num_workers=num_workers)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_bug_in_the_dataset_code_shows_its_traceback_with_or_without_workers(data_slice, tmp_path, num_workers):
    """Only a worker that dies is reported in one line; the user's own bug keeps the traceback that finds it."""
    config = make_config(data_slice, tmp_path / "saved")
    config["import_roots"] = ["tests"]
    config["data_loader"] = {"type": "tests.test_reliability.BuggyLoader", "args": {"num_workers": num_workers}}
    proc = run("train.py", "-c", write_config(config, tmp_path / "config.json"))
    assert proc.returncode == 1, shown(proc)
    assert "DataLoader worker failed" not in proc.stderr, shown(proc)
    assert "Traceback" in proc.stderr and "in __getitem__\n    return torch.stack(" in proc.stderr, shown(proc)
    assert proc.stderr.strip().splitlines()[-1].startswith("RuntimeError: stack expects each tensor"), shown(proc)


def break_a_batch_handover():
    """What a worker killed while handing over a batch's shared memory does to the main process's sharer thread."""
    read_end, write_end = os.pipe()
    broken, served = resource_sharer.DupFd(read_end), resource_sharer.DupFd(write_end)
    os.close(read_end)
    os.close(write_end)
    connection.SocketClient(broken._id[0]).close()
    os.close(served.detach())  # the sharer serves in order, so the broken handover has been dealt with by now


def test_a_worker_dying_mid_handover_adds_no_thread_traceback(capfd, monkeypatch):
    """The sharer thread reports a broken handover through sys.excepthook as a traceback, which would stand beside
    train.py's one-line error; train.py silences exactly that report."""
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)  # as in a fresh process
    break_a_batch_handover()
    assert "Traceback" in capfd.readouterr().err  # the scenario is real: unsilenced, it prints
    assert train.main([]) == 2 and "nothing to do" in capfd.readouterr().err
    break_a_batch_handover()
    assert capfd.readouterr().err == ""
    sys.excepthook(ValueError, ValueError("shown"), None)  # anything else still reaches the previous hook
    assert "ValueError: shown" in capfd.readouterr().err


@pytest.mark.parametrize("fault, words", [
    (OSError(errno.ENOSPC, "No space left on device"), "No space left on device; free some space"),
    (OSError(errno.EROFS, "Read-only file system", "saved/x.pth"), "Read-only file system on 'saved/x.pth'"),
    (MemoryError(), "out of memory"),
    (RecursionError(), "nested too deeply"),
], ids=["disk-full", "read-only", "memory", "recursion"])
def test_a_fault_while_training_is_one_line_and_exit_2(fault, words, data_slice, tmp_path, monkeypatch, capsys):
    def save(obj, f, *args, **kwargs):
        raise fault

    monkeypatch.setattr(checkpoint_module.torch, "save", save)
    config = small_config(data_slice, tmp_path / "saved")
    assert train.main(["-c", str(write_config(config, tmp_path / "config.json"))]) == 2
    assert words in error_line(capsys)


def test_test_py_on_a_full_disk_writes_none_of_its_files(in_process_reference, tmp_path, monkeypatch, capsys):
    """The second file fails to write: the first is not left behind, and an earlier result in --out stays whole."""
    import pandas as pd

    out = tmp_path / "out"
    best = best_checkpoint(in_process_reference.run)
    assert evaluate(["-r", best, "--out", out]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_to_csv, calls = pd.DataFrame.to_csv, []

    def to_csv(frame, path, *args, **kwargs):
        calls.append(path)
        if len(calls) % 2 == 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_to_csv(frame, path, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_csv", to_csv)
    assert evaluate(["-r", best, "--out", out, "-o", 'inference.tta=[{"type": "Identity"}]']) == 2
    assert "No space left on device" in error_line(capsys)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert evaluate(["-r", best, "--out", tmp_path / "new" / "out"]) == 2
    assert not (tmp_path / "new").exists()
