"""What the template costs over a hand-written loop, as users run it. Not part of the test suite.

    python -m benchmarks.benchmark [-c config.json] [--model resnet18] [-d cuda] [--pairs 3] [--smoke]
    python -m benchmarks.benchmark --plain [--epochs 8]    the plain loop alone, as the benchmark runs it

overhead: unmodified `python train.py -c CONFIG` processes and plain-loop processes take turns; an epoch's time is the
gap between consecutive epoch lines (train.log's, and the plain loop's in the same format), so epoch 1 is left out;
start-up: from process start to the `training on` line. loader: the training DataLoader alone against indexing one
tensor. --smoke (CI): all of it briefly; it fails on errors, not on timings.
"""
import argparse
import csv
import itertools
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torchvision.transforms.v2.functional import resize

from data_loader.images import read_image

REPO = Path(__file__).resolve().parents[1]
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO (?:training on |epoch (\d+)/\d+ )", re.M)
RESNET18 = json.dumps({"type": "TorchvisionClassifier", "args": {"name": "resnet18", "num_classes": 10}})


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Time train.py against a plain PyTorch loop.")
    parser.add_argument("-c", "--config", default="config.json")
    parser.add_argument("--model", choices=("config", "resnet18"), default="config",
                        help="config: the config's arch; resnet18: torchvision's resnet18 on 3x64x64 inputs")
    parser.add_argument("-d", "--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--pairs", type=int, default=3, help="plain/template pairs of runs")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per run (the first is not timed)")
    parser.add_argument("--train-batches", type=int, help="batches per epoch (default: all; resnet18: 6)")
    parser.add_argument("--val-batches", type=int, help="validation batches per epoch (default: all; resnet18: 2)")
    parser.add_argument("--smoke", action="store_true", help="1 pair of 2 epochs of 3 batches: checks that it runs")
    parser.add_argument("--plain", action="store_true", help="run the plain loop (one process) instead")
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)  # the 64x64 copy made for resnet18
    args = parser.parse_args(argv)
    if args.smoke:
        args.pairs, args.epochs, args.train_batches, args.val_batches = 1, 2, 3, 1
    resnet = args.model == "resnet18"
    args.train_batches = (6 if resnet else 0) if args.train_batches is None else args.train_batches
    args.val_batches = (2 if resnet else 0) if args.val_batches is None else args.val_batches
    args.loader = json.loads((REPO / args.config).read_text())["data_loader"]["args"]
    args.data_dir = args.data_dir or REPO / args.loader["data_dir"]
    return args


def load_images(args):
    """The training images as one uint8 tensor (N, C, H, W) and their labels."""
    with open(args.data_dir / "train.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    mode = "rgb" if args.model == "resnet18" else "unchanged"
    images = torch.stack([read_image(args.data_dir / "train" / f"{r['id']}.png", mode) for r in rows])
    classes = sorted({r["label"] for r in rows})
    return images, torch.tensor([classes.index(r["label"]) for r in rows])


def enlarged_copy(args, folder):
    """The training images as 3x64x64 PNGs in `folder`, so that both sides read ResNet-18's input size as stored."""
    from PIL import Image

    (folder / "train").mkdir()
    (folder / "train.csv").write_bytes((args.data_dir / "train.csv").read_bytes())
    images, _ = load_images(args)
    with open(args.data_dir / "train.csv", newline="") as f:
        for row, image in zip(csv.DictReader(f), resize(images, [64, 64], antialias=True)):
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / "train" / f"{row['id']}.png")
    args.data_dir = folder


def normaliser(loader_args, channels, device="cpu"):
    """uint8 batches to floats in [0, 1] normalised by the config's mean and std (one value serves every channel)."""
    mean, std = (torch.tensor(loader_args[k] * (channels // len(loader_args[k])), device=device).view(1, -1, 1, 1)
                 for k in ("mean", "std"))
    return lambda batch: (batch.float().div_(255) - mean) / std


def plain_loop(args):
    """The baseline: the config's model (or resnet18), AdamW, OneCycleLR, batch size and split on images held in one
    tensor, batches by indexing; validation and a checkpoint every epoch, then a line like train.log's."""
    import model.model as models

    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO, stream=sys.stdout)
    config, device = json.loads((REPO / args.config).read_text()), torch.device(args.device)
    torch.manual_seed(config.get("seed", 0))
    images, labels = (t.to(device) for t in load_images(args))
    normalise, batch_size = normaliser(args.loader, images.shape[1], device), args.loader["batch_size"]
    order, n_valid = torch.randperm(len(images), device=device), round(len(images) * args.loader["validation_split"])
    valid_batches, train_idx = order[:n_valid].split(batch_size)[:args.val_batches or None], order[n_valid:]
    n_batches = len(train_idx.split(batch_size)[:args.train_batches or None])
    model = (torchvision.models.resnet18(num_classes=10) if args.model == "resnet18"
             else getattr(models, config["arch"]["type"])(**config["arch"]["args"])).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), **config["optimizer"]["args"])
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, total_steps=args.epochs * n_batches,
                                                    **config["lr_scheduler"]["args"])
    logging.info(f"training on {device}")
    with tempfile.TemporaryDirectory(prefix="plain-loop-") as save_dir:
        for epoch in range(1, args.epochs + 1):
            model.train()
            loss_sum = 0
            for idx in train_idx[torch.randperm(len(train_idx), device=device)].split(batch_size)[:n_batches]:
                loss = F.cross_entropy(model(normalise(images[idx])), labels[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                loss_sum += loss.detach()
            model.eval()
            with torch.no_grad():
                output = torch.cat([model(normalise(images[idx])) for idx in valid_batches])
            target = labels[torch.cat(valid_batches)]
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, f"{save_dir}/last.pth")
            logging.info(f"epoch {epoch}/{args.epochs}  loss {loss_sum.item() / n_batches:.4f}  val_loss "
                         f"{F.cross_entropy(output, target).item():.4f}  val_accuracy "
                         f"{(output.argmax(1) == target).float().mean().item():.4f}")


def model_overrides(args):
    """The -o overrides that give train.py the plain loop's model and inputs."""
    if args.model != "resnet18":
        return []
    return [f"arch={RESNET18}", "data_loader.args.image_mode=rgb", f"data_loader.args.data_dir={args.data_dir}",
            f"data_loader.args.cache_dir={args.data_dir / 'cache'}",
            f"data_loader.args.mean={args.loader['mean'] * 3}", f"data_loader.args.std={args.loader['std'] * 3}"]


def command(args, side, save_dir):
    """Python's arguments for one run of the plain loop or of train.py, with the same model, epochs and batches."""
    if side == "plain":
        return ["-m", "benchmarks.benchmark", "--plain", "-c", args.config, "--model", args.model, "-d", args.device,
                "--epochs", str(args.epochs), "--train-batches", str(args.train_batches), "--val-batches",
                str(args.val_batches), "--data-dir", str(args.data_dir)]
    overrides = [*model_overrides(args), f"trainer.epochs={args.epochs}", f"trainer.save_dir={save_dir}",
                 f"trainer.limit_train_batches={args.train_batches}", f"trainer.limit_val_batches={args.val_batches}"]
    return ["train.py", "-c", args.config, "-d", args.device, *(x for o in overrides for x in ("-o", o))]


def timed_run(args, side):
    """One run of `side`: seconds from its start to its `training on` line, and between consecutive epoch lines
    (train.log's timestamps, or the plain loop's own lines in the same format; so epoch 1 is not counted)."""
    with tempfile.TemporaryDirectory(prefix="bench-") as save_dir:
        start = time.time()
        cmd = [sys.executable, *command(args, side, save_dir)]
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit("\n".join([f"error: {side} run exited with {done.returncode}:", *done.stderr.splitlines()[-5:]]))
        lines = LOG_LINE.findall(done.stdout + "".join(p.read_text() for p in Path(save_dir).glob("**/train.log")))
    if [n for _, n in lines] != ["", *map(str, range(1, args.epochs + 1))]:
        sys.exit(f"error: {side} run: expected a `training on` line, then epoch lines 1..{args.epochs}: {lines}")
    stamps = [datetime.strptime(t, "%Y-%m-%d %H:%M:%S,%f").timestamp() for t, _ in lines]
    return stamps[0] - start, [b - a for a, b in zip(stamps[1:], stamps[2:])]


def measure_overhead(args):
    """Interleaved plain/template runs (who goes first alternates): per-pair ratios of their median epochs."""
    ratios, epochs, startups = [], {"plain": [], "template": []}, {"plain": [], "template": []}
    for i in range(args.pairs):
        sides = ("plain", "template") if i % 2 == 0 else ("template", "plain")
        runs = {side: timed_run(args, side) for side in sides}
        median = {side: statistics.median(runs[side][1]) for side in epochs}
        ratios.append(median["template"] / median["plain"])
        print(f"  pair {i + 1} ({sides[0]} first): plain {median['plain']:.3f} s/epoch, template "
              f"{median['template']:.3f} s/epoch, ratio {ratios[-1]:.3f}", flush=True)
        for side, (startup, times) in runs.items():
            startups[side].append(startup)
            epochs[side] += times
    n = len((args.data_dir / "train.csv").read_text().splitlines()) - 1
    samples = min(n - round(n * args.loader["validation_split"]), (args.train_batches or n) * args.loader["batch_size"])
    for side, times in epochs.items():
        print(f"  {side:8} median epoch {statistics.median(times):.3f} s  ({samples / statistics.median(times):.0f} "
              f"training samples/s, whole epoch), fastest {min(times):.3f} s; start-up (process start to "
              f"`training on`) {statistics.median(startups[side]):.2f} s")
    print(f"  ratio template/plain: median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max "
          f"{max(ratios):.3f}); fastest epochs {min(epochs['template']) / min(epochs['plain']):.3f}")


def measure_loader(args):
    """The training DataLoader as train.py builds it (no model) against indexing one tensor, in samples/s."""
    from utils.config import build, load_config

    images, labels = load_images(args)
    normalise, rates = normaliser(args.loader, images.shape[1]), []
    indexed = ((normalise(images[i]), labels[i]) for i in torch.randperm(len(images)).split(args.loader["batch_size"]))
    for batches in (build(load_config(REPO / args.config, model_overrides(args)), "data_loader"), indexed):
        start = time.perf_counter()
        n = sum(len(inputs) for inputs, _ in itertools.islice(batches, args.train_batches or None))
        rates.append(n / (time.perf_counter() - start))
    print(f"  template DataLoader {rates[0]:.0f} samples/s, indexing one tensor {rates[1]:.0f} samples/s")


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda: no CUDA GPU is available")
    if args.plain:
        return plain_loop(args)
    load = os.getloadavg()
    print(f"benchmark: {args.config}, model {args.model}, {args.device}, {args.pairs} pair(s) of {args.epochs} "
          f"epochs, batches per epoch {args.train_batches or 'all'} (validation {args.val_batches or 'all'})")
    with tempfile.TemporaryDirectory(prefix="bench-64x64-") as folder:
        if args.model == "resnet18":
            enlarged_copy(args, Path(folder))
            print(f"  both sides read the sample images enlarged to 3x64x64 PNGs in {folder}")
        for name, measure in (("overhead", measure_overhead), ("loader", measure_loader)):
            print(f"{name}:", flush=True)
            measure(args)
    print("load average (1, 5, 15 min): {:.1f} {:.1f} {:.1f} before, {:.1f} {:.1f} {:.1f} after".format(
        *load, *os.getloadavg()))


if __name__ == "__main__":
    main()
