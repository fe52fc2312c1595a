"""Scaling up and debugging: torchrun, gradient accumulation, clipping, mixed precision, EMA, channels_last,
top-k checkpoints, --fast-dev-run and overfit_batches, checked through the files a user looks at (or, where only
the arithmetic can tell, through a Trainer built by hand around a linear model)."""
import json
import logging
import math
import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import train
from base import BaseDataLoader
from data_loader import image_cache
from logger.logger import setup_logging
from tests.helpers import (
    BATCH_SIZE,
    N_TRAIN,
    REPO,
    VALIDATION_SPLIT,
    assert_same_tensors,
    evaluate,
    load,
    make_config,
    read_history,
    run_dirs,
    write_config,
)
from trainer.trainer import Trainer
from utils.config import validate

N_VALID = round(N_TRAIN * VALIDATION_SPLIT)
BATCHES_PER_EPOCH = math.ceil((N_TRAIN - N_VALID) / BATCH_SIZE)
METRICS = ("loss", "accuracy", "top_k_acc", "macro_f1")


def run(config, tmp_path, *extra):
    """train.py -c <config> EXTRA in-process; returns the run folder (the only one under save_dir)."""
    path = write_config(config, tmp_path / f"config-{len(list(tmp_path.glob('config-*.json')))}.json")
    assert train.main(["-c", str(path), *extra]) == 0
    (run_dir,) = run_dirs(config["trainer"]["save_dir"])
    return run_dir


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- torchrun ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_processes(data_slice, tmp_path_factory):
    """A 2-process gloo run started the way a user would: torchrun train.py -c config.json."""
    base = tmp_path_factory.mktemp("torchrun")
    config = make_config(data_slice, base / "saved", epochs=2, save_period=1, tensorboard=True)
    path = write_config(config, base / "config.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               "train.py", "-c", str(path)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return SimpleNamespace(config=config, save_dir=base / "saved", runs=run_dirs(base / "saved"),
                           output=result.stdout + result.stderr)


@pytest.mark.slow
def test_torchrun_writes_one_run_folder(two_processes):
    (run_dir,) = two_processes.runs
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "checkpoint-epoch1.pth", "checkpoint-epoch2.pth", "checkpoint-last.pth", "config.json", "history.csv",
        "model_best.pth", "tensorboard", "train.log"]
    assert [row["epoch"] for row in read_history(run_dir)] == ["1", "2"]  # one row per epoch, not one per process
    assert len(list((run_dir / "tensorboard").iterdir())) == 1  # one events file
    log = (run_dir / "train.log").read_text()
    assert log.count("epoch 2/2") == 1
    assert "x 2 process(es)" in log
    assert two_processes.output.count("epoch 1/2 ") == 1  # rank 1 stays quiet on the console too

    last = load(run_dir / "checkpoint-last.pth")
    assert last["epoch"] == 2
    # the 240 training samples are split between the processes: each takes half of them per epoch
    assert last["global_step"] == 2 * math.ceil((N_TRAIN - N_VALID) / 2 / BATCH_SIZE)
    assert not [k for k in last["state_dict"] if k.startswith("module.")]


@pytest.mark.slow
def test_torchrun_validation_equals_a_single_process_evaluation(two_processes, tmp_path):
    (run_dir,) = two_processes.runs
    out = tmp_path / "valid"
    assert evaluate(["-r", run_dir / "checkpoint-last.pth", "--split", "valid", "--out", out]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_samples"] == N_VALID
    last_epoch = read_history(run_dir)[-1]
    for name in METRICS:
        assert float(last_epoch["val_" + name]) == pytest.approx(metrics[name], rel=1e-6, abs=1e-6), name


FAILING_HOOK = """
import sys

import train
from base.hooks import Hook


class Down(Hook):
    def on_epoch_end(self, trainer, epoch, log):
        raise RuntimeError("the tracker's server is down")


sys.exit(train.main(["-c", sys.argv[1]], hooks=[Down()]))
"""


@pytest.mark.slow
def test_a_hook_failing_under_torchrun_ends_every_process(data_slice, tmp_path):
    """Hooks run in the main process; the others stop with it instead of waiting for it forever."""
    config = write_config(make_config(data_slice, tmp_path / "saved", epochs=2), tmp_path / "config.json")
    (tmp_path / "team.py").write_text(FAILING_HOOK)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               str(tmp_path / "team.py"), str(config)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "the tracker's server is down" in result.stderr
    assert "error: a hook failed in the main process during on_epoch_end" in result.stdout + result.stderr


@pytest.mark.slow
def test_torchrun_checkpoint_resumes_in_one_process_with_more_epochs(two_processes, tmp_path):
    """Another process count: 8 batches per epoch instead of 4 per process. OneCycleLR's schedule was sized for
    the torchrun run, so this resume drops the scheduler (the next test resumes with it)."""
    (run_dir,) = two_processes.runs
    copy = tmp_path / "run"
    copy.mkdir()
    for name in ("checkpoint-last.pth", "config.json", "history.csv"):
        (copy / name).write_bytes((run_dir / name).read_bytes())
    code = train.main(["-r", str(copy / "checkpoint-last.pth"), "-o", "trainer.epochs=3", "-o", "lr_scheduler={}"])
    assert code == 0
    last = load(copy / "checkpoint-last.pth")
    assert last["epoch"] == 3
    assert last["global_step"] == load(run_dir / "checkpoint-last.pth")["global_step"] + BATCHES_PER_EPOCH
    history = read_history(copy)
    assert [row["epoch"] for row in history] == ["1", "2", "3"]
    assert math.isfinite(float(history[-1]["loss"]))


@pytest.mark.slow
def test_torchrun_checkpoint_resumes_in_one_process_unchanged(two_processes, tmp_path):
    (run_dir,) = two_processes.runs
    copy = tmp_path / "run"
    copy.mkdir()
    (copy / "checkpoint-epoch1.pth").write_bytes((run_dir / "checkpoint-epoch1.pth").read_bytes())
    assert train.main(["-r", str(copy / "checkpoint-epoch1.pth"), "-o", f"trainer.save_dir={tmp_path / 'saved'}"]) == 0
    (resumed,) = run_dirs(tmp_path / "saved")
    assert load(resumed / "checkpoint-last.pth")["epoch"] == 2


# --- a Trainer built by hand around a linear model -----------------------------------------------------------------

N_FEATURES, N_CLASSES = 12, 3


def linear_data(n):
    generator = torch.Generator().manual_seed(0)
    return torch.randn(n, N_FEATURES, generator=generator), torch.randint(N_CLASSES, (n,), generator=generator)


def linear_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(N_FEATURES, N_CLASSES))


def hand_built_trainer(tmp_path, model, x, y, batch_size, lr, **trainer):
    """An unshuffled loader over (x, y), plain SGD, no scheduler, no validation, one epoch."""
    setup_logging(1)  # console only: no train.log of an earlier run in this process
    config = make_config(tmp_path, tmp_path / "saved", epochs=1, monitor="off", **trainer)
    config.update(metrics=[], lr_scheduler={})
    config = validate(config)
    loader = BaseDataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False, validation_split=0.0,
                            num_workers=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    return Trainer(model, F.cross_entropy, {}, optimizer, config, torch.device("cpu"), run_dir, loader)


def sgd_step(model, x, y, lr):
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad


def test_accumulated_micro_batches_equal_one_large_batch(tmp_path):
    """Six batches of 4 with accumulation_steps=4: one update from samples 0-15, then one from 16-23 (the short
    last group is averaged over its own 2 batches)."""
    x, y = linear_data(24)
    model, reference, per_batch = linear_model(), linear_model(), linear_model()
    trainer = hand_built_trainer(tmp_path, model, x, y, batch_size=4, lr=0.5, accumulation_steps=4,
                                 limit_train_batches=6)
    trainer.train()

    sgd_step(reference, x[:16], y[:16], lr=0.5)
    sgd_step(reference, x[16:], y[16:], lr=0.5)
    assert_close_parameters(model, reference)
    assert load(tmp_path / "run" / "checkpoint-last.pth")["global_step"] == 2

    for start in range(0, 24, 4):  # an update per micro-batch ends elsewhere, so the comparison above can fail
        sgd_step(per_batch, x[start:start + 4], y[start:start + 4], lr=0.5)
    assert (per_batch[1].weight - reference[1].weight).abs().max() > 1e-3


def assert_close_parameters(model, reference):
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"{name} differs")


def test_clipping_caps_the_gradient_norm(tmp_path):
    x, y = linear_data(8)
    model, reference = linear_model(), linear_model()
    clip, lr = 0.01, 0.5
    trainer = hand_built_trainer(tmp_path, model, x, y, batch_size=8, lr=lr, clip_grad_norm=clip,
                                 limit_train_batches=1)
    trainer.train()

    reference.zero_grad()
    F.cross_entropy(reference(x), y).backward()
    raw_norm = torch.nn.utils.get_total_norm([p.grad for p in reference.parameters()])
    assert raw_norm > 10 * clip  # clipping had work to do

    clipped_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    assert clipped_norm <= clip * (1 + 1e-5)
    assert clipped_norm == pytest.approx(clip, rel=1e-4)
    with torch.no_grad():  # the update used the clipped gradient: the raw one scaled down to norm `clip`
        for p in reference.parameters():
            p -= lr * p.grad * clip / raw_norm
    assert_close_parameters(model, reference)


def test_grad_norm_in_tensorboard(data_slice, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = make_config(data_slice, tmp_path / "saved", epochs=1, tensorboard=True, log_step=1, clip_grad_norm=1.0,
                         limit_train_batches=3)
    run_dir = run(config, tmp_path)
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    norms = events.Scalars("train/grad_norm")
    assert [e.step for e in norms] == [1, 2, 3]
    assert all(math.isfinite(e.value) and e.value > 0 for e in norms)  # the norm before clipping


# --- mixed precision, channels_last --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def float32_run(data_slice, tmp_path_factory):
    base = tmp_path_factory.mktemp("float32")
    config = make_config(data_slice, base / "saved", epochs=1, limit_train_batches=3)
    assert train.main(["-c", str(write_config(config, base / "config.json"))]) == 0
    (run_dir,) = run_dirs(base / "saved")
    return read_history(run_dir)


def test_bf16_trains_and_resumes_exactly(data_slice, tmp_path, float32_run):
    config = make_config(data_slice, tmp_path / "saved", epochs=2, save_period=1, amp="bf16", limit_train_batches=3)
    run_dir = run(config, tmp_path)
    history = read_history(run_dir)
    assert [row["epoch"] for row in history] == ["1", "2"]
    assert all(math.isfinite(float(row["loss"])) for row in history)
    assert history[0]["loss"] != float32_run[0]["loss"]  # autocast was on: bfloat16 rounds differently

    last = load(run_dir / "checkpoint-last.pth")
    assert {v.dtype for k, v in last["state_dict"].items() if v.is_floating_point()} == {torch.float32}
    assert train.main(["-r", str(run_dir / "checkpoint-epoch1.pth")]) == 0
    (resumed,) = run_dirs(tmp_path / "saved")[1:]
    assert_same_tensors(load(resumed / "checkpoint-last.pth")["state_dict"], last["state_dict"])
    assert read_history(resumed) == history[1:]


def test_fp16_on_the_cpu_warns_and_trains_in_float32(data_slice, tmp_path, capsys, float32_run):
    config = make_config(data_slice, tmp_path / "saved", epochs=1, amp="fp16", limit_train_batches=3)
    run_dir = run(config, tmp_path)
    warning = [line for line in capsys.readouterr().out.splitlines() if "fp16" in line]
    assert warning and "float32" in warning[0]
    assert "fp16" in (run_dir / "train.log").read_text()
    assert read_history(run_dir) == float32_run  # exactly the float32 run


def test_channels_last_trains(data_slice, tmp_path, float32_run):
    config = make_config(data_slice, tmp_path / "saved", epochs=1, channels_last=True, limit_train_batches=3)
    run_dir = run(config, tmp_path)
    (row,) = read_history(run_dir)
    assert float(row["loss"]) == pytest.approx(float(float32_run[0]["loss"]), rel=1e-3)  # same maths, other layout
    weight = load(run_dir / "checkpoint-last.pth")["state_dict"]["features.4.weight"]  # 16 x 8 x 3 x 3
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    assert evaluate(["-r", run_dir / "checkpoint-last.pth"]) == 0  # loads into a model in the default layout


# --- EMA ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ema_run(data_slice, tmp_path_factory):
    base = tmp_path_factory.mktemp("ema")
    config = make_config(data_slice, base / "saved", epochs=2, save_period=1, ema_decay=0.9,
                         monitor="min val_ema_loss")
    assert train.main(["-c", str(write_config(config, base / "config.json"))]) == 0
    (run_dir,) = run_dirs(base / "saved")
    return SimpleNamespace(run=run_dir, save_dir=base / "saved", history=read_history(run_dir),
                           last=load(run_dir / "checkpoint-last.pth"))


def test_ema_weights_are_saved_and_evaluated(ema_run):
    ema, raw = ema_run.last["ema_state_dict"], ema_run.last["state_dict"]
    assert ema.keys() == raw.keys()
    assert not torch.equal(ema["classifier.3.weight"], raw["classifier.3.weight"])
    for row in ema_run.history:
        for name in METRICS:
            assert math.isfinite(float(row["val_ema_" + name])), name
        assert row["val_ema_loss"] != row["val_loss"]


def test_resume_restores_the_ema_weights(ema_run):
    assert train.main(["-r", str(ema_run.run / "checkpoint-epoch1.pth")]) == 0
    (resumed,) = run_dirs(ema_run.save_dir)[1:]
    mine = load(resumed / "checkpoint-last.pth")
    assert mine["epoch"] == 2
    assert_same_tensors(mine["ema_state_dict"], ema_run.last["ema_state_dict"])
    assert read_history(resumed) == ema_run.history[1:]


def test_test_script_evaluates_the_ema_weights(ema_run, tmp_path):
    last = ema_run.run / "checkpoint-last.pth"
    assert evaluate(["-r", last, "--ema", "--split", "valid", "--out", tmp_path / "ema"]) == 0
    metrics = json.loads((tmp_path / "ema" / "metrics.json").read_text())
    assert metrics["ema"] is True
    for name in METRICS:  # the same numbers training logged for the averaged weights
        assert metrics[name] == pytest.approx(float(ema_run.history[-1]["val_ema_" + name]), rel=1e-6, abs=1e-6), name

    assert evaluate(["-r", last]) == 0 and evaluate(["-r", last, "--ema"]) == 0
    plain = json.loads((ema_run.run / "test-checkpoint-last" / "metrics.json").read_text())
    averaged = json.loads((ema_run.run / "test-checkpoint-last-ema" / "metrics.json").read_text())
    assert averaged["ema"] and not plain["ema"]
    assert averaged["loss"] != plain["loss"]


# --- checkpoints kept, quick checks --------------------------------------------------------------------------------

def test_save_top_k_keeps_the_two_best_epochs(data_slice, tmp_path):
    config = make_config(data_slice, tmp_path / "saved", epochs=4, save_top_k=2, monitor="min val_loss",
                         limit_train_batches=3)
    run_dir = run(config, tmp_path)
    history = read_history(run_dir)
    assert len(history) == 4
    best_two = sorted(history, key=lambda row: float(row["val_loss"]))[:2]
    kept = sorted(p.name for p in run_dir.glob("top-epoch*.pth"))
    assert kept == sorted(f"top-epoch{row['epoch']}.pth" for row in best_two)
    for row in best_two:
        assert load(run_dir / f"top-epoch{row['epoch']}.pth")["epoch"] == int(row["epoch"])
    assert not list(run_dir.glob("*.tmp"))


def test_fast_dev_run_writes_nothing(data_slice, tmp_path, capsys):
    config = make_config(data_slice, tmp_path / "saved", epochs=5, tensorboard=True, save_period=1)
    config["data_loader"]["args"]["cache_dir"] = str(tmp_path / "saved" / "cache")
    path = write_config(config, tmp_path / "config.json")
    assert train.main(["-c", str(path), "--fast-dev-run"]) == 0
    assert not (tmp_path / "saved").exists()
    out = capsys.readouterr().out
    assert "epoch 1/1" in out and "epoch 2/" not in out


def test_overfit_one_batch_drives_its_loss_to_zero(data_slice, tmp_path):
    config = make_config(data_slice, tmp_path / "saved", epochs=50, overfit_batches=1, monitor="min val_loss",
                         verbosity=0)
    config.update(lr_scheduler={}, optimizer={"type": "AdamW", "args": {"lr": 3e-3}})
    config["arch"]["args"]["dropout"] = 0.0
    run_dir = run(config, tmp_path)
    history = read_history(run_dir)
    assert float(history[0]["loss"]) > 1.0
    assert float(history[-1]["loss"]) < 0.05
    assert load(run_dir / "checkpoint-last.pth")["global_step"] == 50  # one batch per epoch
    assert float(history[-1]["val_loss"]) < 0.5  # validated on that same batch, not on unseen samples


# --- large image sets: the decoded-image cache filled as images are first read -------------------------------------

N_IMAGES = 24


@pytest.fixture
def image_set(tmp_path):
    """24 RGB PNGs of 12x10 pixels and their train.csv (4 classes), in a folder tests may change."""
    import numpy as np
    from PIL import Image

    folder = tmp_path / "data"
    (folder / "train").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(folder / "train" / f"{i:03d}.png")
    (folder / "train.csv").write_text("id,label\n" + "".join(f"{i:03d},{i % 4}\n" for i in range(N_IMAGES)))
    return folder


@pytest.fixture
def fill_on_read(monkeypatch):
    """Every set counts as slow to decode up front, so its cache is filled as its images are first read."""
    from data_loader import image_cache

    monkeypatch.setattr(image_cache, "UPFRONT_SECONDS", 0.0)


@pytest.fixture
def reads(monkeypatch):
    """The names of the image files this process reads, in order."""
    from data_loader import datasets, image_cache, images

    names = []

    def read_image(path, mode, **kwargs):
        names.append(path.name)
        return images.read_image(path, mode, **kwargs)

    for module in (datasets, image_cache):
        monkeypatch.setattr(module, "read_image", read_image)
    return names


def image_loader(folder, **args):
    from data_loader.data_loaders import CsvImageDataLoader

    defaults = {"batch_size": 4, "validation_split": 0.0, "extension": ".png", "mean": [0.5] * 3, "std": [0.25] * 3}
    return CsvImageDataLoader(folder, **{**defaults, **args})


def epochs(loader, *numbers):
    """The batches of these epochs, each with what dropout would draw after it (the random state loading left)."""
    batches = []
    for epoch in numbers:
        loader.set_epoch(epoch)
        batches += [(data, target, torch.rand(4)) for data, target in loader]
    return batches


@pytest.mark.parametrize("transforms", [[], [{"type": "RandomResizedCrop", "args": {"size": [8, 8]}},
                                             {"type": "RandomHorizontalFlip", "args": {}}]], ids=["batched", "random"])
def test_batches_are_the_same_from_the_files_a_filling_cache_and_a_kept_one(image_set, tmp_path, fill_on_read,
                                                                          transforms):
    """Epoch 1 fills the cache sample by sample; epoch 2 takes the images from it (whole batches at once without
    random steps); a later loader maps the kept file: bit for bit the batches of cache false, and the same random
    state after each (a resumed run may load batches otherwise than the run it continues)."""
    streamed = epochs(image_loader(image_set, cache=False, train_transforms=transforms), 1, 2)
    loader = image_loader(image_set, cache_dir=str(tmp_path / "cache"), train_transforms=transforms)
    loader.write_caches()
    assert loader.dataset.stacked is None
    filled = epochs(loader, 1)
    assert loader.dataset.stacked is not None and loader.dataset.serves_batches == (not transforms)
    filled += epochs(loader, 2)
    kept = epochs(image_loader(image_set, cache_dir=str(tmp_path / "cache"), train_transforms=transforms), 1, 2)
    for batches in (filled, kept):
        assert len(batches) == len(streamed) == 12
        for batch, expected in zip(batches, streamed):
            assert all(torch.equal(a, b) for a, b in zip(batch, expected))


def test_the_first_batch_of_a_large_set_reads_only_its_own_images(image_set, tmp_path, fill_on_read, reads):
    loader = image_loader(image_set, cache_dir=str(tmp_path / "cache"), shuffle=True)
    assert reads[0] == "000.png" and len(reads) < 5  # the first image gives the slots' shape; a few more are timed
    before = len(reads)
    loader.set_epoch(1)
    next(iter(loader))
    first_batch = [index for index, _ in loader.sampler][:4]
    assert reads[before:] == [f"{i:03d}.png" for i in first_batch if i != 0]  # the first image is in its slot


def test_after_a_full_pass_the_cache_is_kept_and_a_later_loader_reads_only_the_images_it_checks(image_set, tmp_path,
                                                                                             fill_on_read, reads):
    cache = tmp_path / "cache"
    loader = image_loader(image_set, cache_dir=str(cache), validation_split=0.25)
    loader.write_caches()
    epochs(loader, 1)
    assert not cache.exists()  # the validation images are not in yet
    list(loader.split_validation())
    (index,) = cache.glob("*.pt")
    assert [p.name for p in cache.iterdir() if p.suffix == ".u8"] == [torch.load(index, weights_only=True)["data"]]

    reads.clear()
    tested = image_loader(image_set, cache_dir=str(cache), training=False, test_csv="train.csv",
                          test_images="train")  # as test.py builds it
    assert len(list(tested.evaluation_loader())) == 6
    assert 0 < len(reads) <= image_cache.CHECKED  # compared with the cache, which serves every batch


def test_an_image_of_another_shape_is_read_from_its_file_every_time(image_set, tmp_path, fill_on_read, reads,
                                                                    caplog):
    from PIL import Image

    from data_loader.datasets import CsvImageDataset
    from data_loader.images import read_image

    Image.new("RGB", (6, 8), (10, 20, 30)).save(image_set / "train" / "005.png")
    cache = tmp_path / "cache"
    dataset = CsvImageDataset(image_set / "train.csv", image_set / "train", classes=[0, 1, 2, 3], extension=".png",
                              cache_dir=str(cache))
    dataset.write_cache()
    expected = [read_image(path, "unchanged") for path in dataset.paths]
    for read_now in ([f"{i:03d}.png" for i in range(1, N_IMAGES)], ["005.png"]):  # 000.png went in when built
        reads.clear()
        assert all(torch.equal(dataset[i][0], image) for i, image in enumerate(expected))
        assert reads == read_now  # the second pass reads only the odd one out
    assert dataset[5][0].shape == (3, 8, 6)

    logger = logging.getLogger("template")
    logger.addHandler(caplog.handler)
    try:
        assert dataset.settle_cache()
    finally:
        logger.removeHandler(caplog.handler)
    assert not cache.exists()
    assert [m for m in caplog.messages if "not kept (images differ in shape" in m and ": 1 of them" in m]


@pytest.mark.slow
def test_dataloader_workers_fill_the_one_shared_file(image_set, tmp_path, fill_on_read, reads):
    cache = tmp_path / "cache"
    loader = image_loader(image_set, cache_dir=str(cache), num_workers=2)
    loader.write_caches()
    assert loader.dataset.stacked is None  # not all in the file yet
    read_here = len(reads)
    epochs(loader, 1)
    assert len(reads) == read_here  # every image was read in a worker
    assert loader.dataset.stacked is not None  # and every one is in the file this process maps
    assert len(list(cache.glob("*.pt"))) == 1


def test_a_data_file_left_by_a_killed_run_is_removed_by_the_next_but_not_one_in_use(image_set, tmp_path,
                                                                                     fill_on_read):
    cache = tmp_path / "cache"
    cache.mkdir()
    running = image_loader(image_set, cache_dir=str(cache))  # holds its data file while it lives
    (in_use,) = cache.glob("*.partial")
    left = cache / f"{in_use.name.split('.')[0]}.killed.partial"
    left.write_bytes(in_use.read_bytes())  # as a killed run leaves it: nothing holds it any more
    image_loader(image_set, cache_dir=str(cache))
    assert in_use.exists() and not left.exists()
    assert running.dataset.stacked is None  # the first loader, alive and filling all along
