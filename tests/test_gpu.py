"""On a CUDA device: mixed precision (fp16 with its gradient scaler, bf16), channels_last, torch.compile, pinned
batches, resuming and test.py on the GPU, and train.py under a one-process torchrun. Each test is a short run on the
small data slice (seconds on a GPU). All are marked `cuda` and skipped where torch sees no CUDA device, so the CPU
suite and CI skip them; on a GPU machine: python -m pytest -q -m cuda tests/test_gpu.py (or bash
benchmarks/gpu_check.sh: these tests, one line each, and the ResNet-18 benchmark on the GPU)."""
import contextlib
import json
import math
import os
import socket
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn

import train
from model.model import ConvNet
from tests.helpers import (
    N_TEST,
    REPO,
    evaluate,
    load,
    make_config,
    read_csv_rows,
    read_history,
    run_dirs,
    write_config,
)
from utils.config import build, validate
from utils.util import seed_everything

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# cuBLAS reads this when it first makes a handle; deterministic runs below want it set before then
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

LIMIT = 3  # training batches per epoch


def cuda_config(data_slice, save_dir, **trainer):
    """The tests' small config, on the GPU (`n_gpu` 1; every command below also passes -d cuda)."""
    config = make_config(data_slice, save_dir, **{"limit_train_batches": LIMIT, **trainer})
    config["n_gpu"] = 1
    return config


def train_on_cuda(config, folder, *extra):
    """train.py -c <config> -d cuda EXTRA in-process; returns the new run folder."""
    before = set(run_dirs(config["trainer"]["save_dir"]))
    path = write_config(config, folder / f"config-{len(list(folder.glob('config-*.json')))}.json")
    assert train.main(["-c", str(path), "-d", "cuda", *extra]) == 0
    (run_dir,) = set(run_dirs(config["trainer"]["save_dir"])) - before
    return run_dir


def assert_trained_on_cuda(run_dir, epochs):
    """One finite history row per epoch, finite float32 weights, and train.log naming the CUDA device."""
    history = read_history(run_dir)
    assert [row["epoch"] for row in history] == [str(e) for e in range(1, epochs + 1)]
    for row in history:
        for key in ("loss", "val_loss", "val_accuracy"):
            assert math.isfinite(float(row[key])), (key, row)
    last = load(run_dir / "checkpoint-last.pth")
    assert last["epoch"] == epochs
    for key, value in last["state_dict"].items():
        if value.is_floating_point():
            assert value.dtype == torch.float32, key
            assert torch.isfinite(value).all(), key
    assert "training on cuda" in (run_dir / "train.log").read_text()
    return history, last


def evaluate_on_cuda(checkpoint, out):
    """test.py -r <checkpoint> -d cuda --out OUT; checks predictions.csv and metrics.json and returns the metrics."""
    assert evaluate(["-r", checkpoint, "-d", "cuda", "--out", out]) == 0
    predictions = read_csv_rows(out / "predictions.csv")
    assert len(predictions) == N_TEST and list(predictions[0]) == ["id", "label"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_samples"] == N_TEST
    assert math.isfinite(metrics["loss"]) and 0 <= metrics["accuracy"] <= 1
    return metrics, predictions


@contextlib.contextmanager
def deterministic_only_here():
    """`deterministic: true` switches torch to deterministic kernels for the whole process: switch back after."""
    state = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(state[0], warn_only=state[1])
        torch.backends.cudnn.benchmark = state[2]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def float32_run(data_slice, tmp_path_factory):
    """Two epochs in float32 on the GPU (OneCycleLR's schedule as in the mixed-precision runs): their reference."""
    base = tmp_path_factory.mktemp("cuda-float32")
    run_dir = train_on_cuda(cuda_config(data_slice, base / "saved", epochs=2), base)
    history, _ = assert_trained_on_cuda(run_dir, 2)
    return history


@pytest.fixture(scope="module")
def fp16_run(data_slice, tmp_path_factory):
    """Two epochs with fp16 autocast and the gradient scaler, a checkpoint per epoch, deterministic kernels."""
    base = tmp_path_factory.mktemp("cuda-fp16")
    config = cuda_config(data_slice, base / "saved", epochs=2, save_period=1, amp="fp16")
    config["deterministic"] = True
    with deterministic_only_here():
        return train_on_cuda(config, base)


# --- mixed precision ----------------------------------------------------------------------------------------------

def test_fp16_trains_with_a_gradient_scaler(fp16_run, float32_run):
    history, last = assert_trained_on_cuda(fp16_run, 2)
    scaler = last["scaler"]
    assert scaler, "the fp16 run saved no gradient-scaler state: the scaler was not enabled"
    assert math.isfinite(scaler["scale"]) and scaler["scale"] > 0
    assert "needs a CUDA device" not in (fp16_run / "train.log").read_text()  # no fallback to float32
    assert history[0]["loss"] != float32_run[0]["loss"]  # autocast was on: float16 rounds differently
    assert float(history[0]["loss"]) == pytest.approx(float(float32_run[0]["loss"]), rel=5e-2)


def test_fp16_resume_from_the_first_epoch_replays_the_second(fp16_run, tmp_path):
    """Resuming restores the scaler, the CUDA generators and the rest; with deterministic kernels the replayed epoch
    matches the original to rounding (bitwise is promised on the CPU only: a difference is reported, not failed)."""
    save_dir = fp16_run.parent.parent
    before = run_dirs(save_dir)
    with deterministic_only_here():
        assert train.main(["-r", str(fp16_run / "checkpoint-epoch1.pth"), "-d", "cuda"]) == 0
    (resumed,) = set(run_dirs(save_dir)) - set(before)
    original, replayed = read_history(fp16_run), read_history(resumed)
    assert [row["epoch"] for row in replayed] == ["2"]
    mine, reference = load(resumed / "checkpoint-last.pth"), load(fp16_run / "checkpoint-last.pth")
    assert mine["epoch"] == 2 and mine["global_step"] == reference["global_step"]
    assert mine["scaler"]["scale"] == reference["scaler"]["scale"]
    for key in ("loss", "val_loss", "val_accuracy"):
        assert float(replayed[0][key]) == pytest.approx(float(original[1][key]), rel=1e-3, abs=1e-4), key
    for key, value in mine["state_dict"].items():
        assert torch.isfinite(value.float()).all(), key
        assert torch.allclose(value.float(), reference["state_dict"][key].float(), rtol=1e-3, atol=1e-4), key
    if replayed != original[1:] or any(not torch.equal(v, reference["state_dict"][k])
                                       for k, v in mine["state_dict"].items()):
        warnings.warn("CUDA resume from checkpoint-epoch1.pth is close but not bitwise equal to the original run",
                      stacklevel=1)


def test_bf16_trains_without_a_scaler(data_slice, tmp_path, float32_run):
    run_dir = train_on_cuda(cuda_config(data_slice, tmp_path / "saved", epochs=2, amp="bf16"), tmp_path)
    history, last = assert_trained_on_cuda(run_dir, 2)
    assert not last["scaler"]  # bf16 needs no loss scaling
    assert history[0]["loss"] != float32_run[0]["loss"]  # autocast was on
    assert float(history[0]["loss"]) == pytest.approx(float(float32_run[0]["loss"]), rel=5e-2)
    evaluate_on_cuda(run_dir / "model_best.pth", tmp_path / "test")


# --- memory format, torch.compile ---------------------------------------------------------------------------------

def test_channels_last_convolutions_see_channels_last_weights_and_inputs(data_slice, tmp_path):
    """Three-channel input (the digits decoded as RGB): with one channel every layout counts as channels_last, so
    only more channels tell the layouts apart."""
    config = cuda_config(data_slice, tmp_path / "saved", epochs=1, channels_last=True)
    config["arch"]["args"]["in_channels"] = 3
    config["data_loader"]["args"].update(image_mode="rgb", mean=[0.1307] * 3, std=[0.3081] * 3)
    seen = []  # (conv in_channels, training, input on CUDA, input channels_last, weight channels_last) per call

    def record(module, inputs):
        if isinstance(module, nn.Conv2d):
            x = inputs[0]
            seen.append((module.in_channels, module.training, x.is_cuda,
                         x.is_contiguous(memory_format=torch.channels_last),
                         module.weight.is_contiguous(memory_format=torch.channels_last)))

    handle = nn.modules.module.register_module_forward_pre_hook(record)
    try:
        run_dir = train_on_cuda(config, tmp_path)
    finally:
        handle.remove()
    assert len([s for s in seen if s[1]]) >= 3 * LIMIT  # three convolutions per training batch
    assert {s[2:] for s in seen} == {(True, True, True)}, sorted(set(seen))

    assert_trained_on_cuda(run_dir, 1)
    state = load(run_dir / "checkpoint-last.pth")["state_dict"]
    for key in ("features.0.weight", "features.4.weight"):  # 8 x 3 x 3 x 3, 16 x 8 x 3 x 3
        assert state[key].is_contiguous(memory_format=torch.channels_last) and not state[key].is_contiguous(), key
    evaluate_on_cuda(run_dir / "checkpoint-last.pth", tmp_path / "test")  # loads into a model in the default layout


def test_compile_trains_and_saves_bare_keys(data_slice, tmp_path):
    config = cuda_config(data_slice, tmp_path / "saved", epochs=1, compile=True, limit_train_batches=2,
                         limit_val_batches=1)
    run_dir = train_on_cuda(config, tmp_path)
    assert_trained_on_cuda(run_dir, 1)
    assert "OptimizedModule" in (run_dir / "train.log").read_text()  # the model printed at debug level was wrapped
    for name in ("checkpoint-last.pth", "model_best.pth"):
        keys = load(run_dir / name)["state_dict"].keys()
        assert not [k for k in keys if "_orig_mod." in k], name
        assert set(keys) == set(ConvNet(**config["arch"]["args"]).state_dict()), name
    evaluate_on_cuda(run_dir / "model_best.pth", tmp_path / "test")


# --- data, resuming, test.py --------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_workers", [0, 2])
def test_batches_come_pinned(data_slice, tmp_path, num_workers):
    config = validate(cuda_config(data_slice, tmp_path / "saved", epochs=1))
    config["data_loader"]["args"]["num_workers"] = num_workers
    seed_everything(config["seed"])
    loader = build(config, "data_loader", seed=config["seed"])
    for part in (loader, loader.split_validation()):
        assert part.pin_memory
        data, target = next(iter(part))
        assert data.is_pinned() and target.is_pinned()


def test_resume_the_run_folder_on_cuda_continues_in_place(data_slice, tmp_path):
    step_lr = {"type": "StepLR", "args": {"step_size": 1, "gamma": 0.5}}  # OneCycleLR runs cannot be extended
    config = cuda_config(data_slice, tmp_path / "saved", epochs=1)
    config["lr_scheduler"] = step_lr
    run_dir = train_on_cuda(config, tmp_path)
    first = load(run_dir / "checkpoint-last.pth")
    assert train.main(["-r", str(run_dir), "-d", "cuda", "-o", "trainer.epochs=2"]) == 0
    assert run_dirs(tmp_path / "saved") == [run_dir]  # the same folder, no new one
    history, last = assert_trained_on_cuda(run_dir, 2)
    assert last["global_step"] == 2 * first["global_step"]
    assert [float(row["lr"]) for row in history] == pytest.approx([0.003, 0.0015])  # the scheduler was restored
    assert "resumed at epoch 2" in (run_dir / "train.log").read_text()
    metrics, _ = evaluate_on_cuda(run_dir, tmp_path / "test")  # a run folder stands for its model_best.pth
    assert metrics["checkpoints"]


def test_test_script_on_cuda_agrees_with_the_cpu(fp16_run, data_slice, tmp_path):
    best = fp16_run / "model_best.pth"
    metrics, predictions = evaluate_on_cuda(best, tmp_path / "cuda")
    truth = read_csv_rows(data_slice / "test_labels.csv")
    assert [p["id"] for p in predictions] == [t["id"] for t in truth]  # the test CSV's order
    hits = sum(p["label"] == t["label"] for p, t in zip(predictions, truth))
    assert metrics["accuracy"] == pytest.approx(hits / N_TEST)  # metrics.json agrees with predictions.csv

    assert evaluate(["-r", best, "-d", "cpu", "--out", tmp_path / "cpu"]) == 0
    on_cpu = json.loads((tmp_path / "cpu" / "metrics.json").read_text())
    assert metrics["loss"] == pytest.approx(on_cpu["loss"], rel=1e-2, abs=1e-3)
    cpu_predictions = read_csv_rows(tmp_path / "cpu" / "predictions.csv")
    agree = sum(a["label"] == b["label"] for a, b in zip(predictions, cpu_predictions))
    assert agree >= N_TEST - 5  # TF32 convolutions on the GPU may flip a near tie of this barely trained model


# --- torchrun -----------------------------------------------------------------------------------------------------

def test_torchrun_one_process_on_cuda(data_slice, tmp_path):
    """torchrun --nproc_per_node=1 train.py: started the way a user would. Its one process joins an NCCL process
    group and trains through DDP, as each process does with more GPUs."""
    config = cuda_config(data_slice, tmp_path / "saved", epochs=2)
    path = write_config(config, tmp_path / "config.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={free_port()}",
               "train.py", "-c", str(path), "-d", "cuda"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (run_dir,) = run_dirs(tmp_path / "saved")
    assert_trained_on_cuda(run_dir, 2)
    assert "x 1 process(es) (nccl)" in (run_dir / "train.log").read_text()
    evaluate_on_cuda(run_dir / "model_best.pth", tmp_path / "test")
