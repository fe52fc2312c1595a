"""What the template costs over a hand-written loop, as users run it. Not part of the test suite.

    python -m benchmarks.benchmark                    train.py -c config.json against benchmarks/plain_loop.py
    python -m benchmarks.benchmark --model resnet18   torchvision resnet18 on 3x64x64 inputs, epochs cut short
    python -m benchmarks.benchmark --device cuda --pairs 5 --json /tmp/bench.json
    python -m benchmarks.benchmark --smoke            a short run of everything (CI): fails on errors, not timings

Overhead: unmodified `python train.py` processes and plain-loop processes in turns; an epoch's time is the gap
between consecutive epoch lines (train.log timestamps; the plain loop prints its own), so epoch 1 with its start-up
is left out. Start-up: wall time of `train.py --fast-dev-run` against a script that only builds the model and
optimizer and takes one step. Loader: samples/s of the template's training DataLoader against indexing one tensor.
"""
import argparse
import json
import math
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

REPO = Path(__file__).resolve().parents[1]
LOG_EPOCH = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ epoch (\d+)/\d+ ", re.M)
PLAIN_EPOCH = re.compile(r"^epoch (\d+)/\d+ .*\((\d+\.\d+) s\)$", re.M)
DIGIT_SIZE = 28
RESIZE_64 = [{"type": "Resize", "args": {"size": [64, 64], "antialias": True}}]
BUILD_MODEL = {
    "config": "import model.model\nmodel = getattr(model.model, config['arch']['type'])(**config['arch']['args'])",
    "resnet18": "import torchvision\nmodel = torchvision.models.resnet18(num_classes=10)",
}
FLOOR = """
import json, torch
import torch.nn.functional as F
config = json.load(open({config!r}))
{build_model}
model = model.to({device!r})
optimizer = torch.optim.AdamW(model.parameters(), **config["optimizer"]["args"])
x = torch.randn({batch}, *{shape}, device={device!r})
F.cross_entropy(model(x), torch.zeros({batch}, dtype=torch.long, device={device!r})).backward()
optimizer.step()
"""


class BenchmarkError(Exception):
    pass


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Time train.py against a plain PyTorch loop.")
    parser.add_argument("-c", "--config", default="config.json")
    parser.add_argument("--model", choices=("config", "resnet18"), default="config",
                        help="config: the config's arch; resnet18: torchvision resnet18 on 3x64x64 inputs")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--pairs", type=int, default=3, help="plain/template process pairs")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per run (the first is not timed)")
    parser.add_argument("--train-batches", type=int, help="batches per epoch (default: all; resnet18: 6)")
    parser.add_argument("--val-batches", type=int, help="validation batches per epoch (default: all; resnet18: 2)")
    parser.add_argument("--startup-repeats", type=int, default=3)
    parser.add_argument("--skip", nargs="*", default=[], choices=("overhead", "startup", "loader"))
    parser.add_argument("--smoke", action="store_true", help="1 pair, 2 short epochs, 1 start-up: checks it all runs")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    resnet = args.model == "resnet18"
    if args.smoke:
        args.pairs, args.epochs, args.startup_repeats, args.train_batches, args.val_batches = 1, 2, 1, 3, 1
    args.train_batches = args.train_batches if args.train_batches is not None else (6 if resnet else 0)
    args.val_batches = args.val_batches if args.val_batches is not None else (2 if resnet else 0)
    return args


def model_overrides(args):
    """The -o overrides that give train.py the model and input size the plain loop uses."""
    if args.model != "resnet18":
        return []
    loader = json.loads((REPO / args.config).read_text())["data_loader"]["args"]
    arch = {"type": "TorchvisionClassifier", "args": {"name": "resnet18", "num_classes": 10}}
    return [f"arch={json.dumps(arch)}", "data_loader.args.image_mode=rgb",
            f"data_loader.args.train_transforms={json.dumps(RESIZE_64)}",
            f"data_loader.args.eval_transforms={json.dumps(RESIZE_64)}",
            f"data_loader.args.mean={json.dumps(loader['mean'] * 3)}",
            f"data_loader.args.std={json.dumps(loader['std'] * 3)}"]


def template_overrides(args):
    limits = [f"trainer.limit_train_batches={args.train_batches}", f"trainer.limit_val_batches={args.val_batches}"]
    return model_overrides(args) + limits


def run(cmd):
    """Run `cmd` from the repository root; its stdout, or BenchmarkError with the tail of its stderr."""
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise BenchmarkError(f"{' '.join(cmd[:4])} ... exited with {done.returncode}:\n{tail}")
    return done.stdout


def train_py(args, *extra):
    """The train.py command line for the benchmark's config, model and device."""
    overrides = [x for o in template_overrides(args) for x in ("-o", o)]
    return [sys.executable, "train.py", "-c", args.config, "-d", args.device, *overrides, *extra]


def template_epoch_times(args):
    """Seconds between consecutive epoch lines of one train.py run's train.log."""
    with tempfile.TemporaryDirectory(prefix="bench-template-") as save_dir:
        run(train_py(args, "-o", f"trainer.save_dir={save_dir}", "-o", f"trainer.epochs={args.epochs}"))
        logs = list(Path(save_dir).glob("**/train.log"))
        if len(logs) != 1:
            raise BenchmarkError(f"expected one train.log under the run's save_dir, found {len(logs)}")
        lines = LOG_EPOCH.findall(logs[0].read_text())
    if [int(n) for _, n in lines] != list(range(1, args.epochs + 1)):
        raise BenchmarkError(f"train.log: expected epoch lines 1..{args.epochs}, found {[n for _, n in lines]}")
    stamps = [datetime.strptime(t, "%Y-%m-%d %H:%M:%S,%f").timestamp() for t, _ in lines]
    return [b - a for a, b in zip(stamps, stamps[1:])]


def plain_epoch_times(args):
    """Seconds between consecutive epoch ends of one plain-loop run, as it prints them."""
    out = run([sys.executable, "-m", "benchmarks.plain_loop", "-c", args.config, "--model", args.model,
               "--epochs", str(args.epochs), "--train-batches", str(args.train_batches),
               "--val-batches", str(args.val_batches), "--device", args.device])
    lines = PLAIN_EPOCH.findall(out)
    if [int(n) for n, _ in lines] != list(range(1, args.epochs + 1)):
        raise BenchmarkError(f"plain loop: expected epoch lines 1..{args.epochs}, found {[n for n, _ in lines]}")
    return [float(t) for _, t in lines[1:]]


def train_samples_per_epoch(args):
    loader = json.loads((REPO / args.config).read_text())["data_loader"]["args"]
    n_train = len((REPO / loader["data_dir"] / "train.csv").read_text().splitlines()) - 1
    n_train -= round(n_train * loader["validation_split"])
    return min(n_train, (args.train_batches or math.inf) * loader["batch_size"])


def measure_overhead(args):
    """Interleaved plain/template runs (who goes first alternates); per-pair and overall epoch medians and ratios."""
    pairs = []
    for i in range(args.pairs):
        sides = ("plain", "template") if i % 2 == 0 else ("template", "plain")
        times = {side: (plain_epoch_times if side == "plain" else template_epoch_times)(args) for side in sides}
        pair = {side: statistics.median(times[side]) for side in ("plain", "template")}
        pair["ratio"] = pair["template"] / pair["plain"]
        pair["epochs"] = times
        pairs.append(pair)
        print(f"  pair {i + 1} ({sides[0]} first): plain {pair['plain']:.3f} s/epoch, template "
              f"{pair['template']:.3f} s/epoch, ratio {pair['ratio']:.3f}", flush=True)
    ratios = [p["ratio"] for p in pairs]
    samples = train_samples_per_epoch(args)
    result = {"pairs": pairs, "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
              "ratio_max": max(ratios), "train_samples_per_epoch": samples}
    for side in ("plain", "template"):
        epochs = [t for p in pairs for t in p["epochs"][side]]
        median, result[f"{side}_fastest_epoch_s"] = statistics.median(epochs), min(epochs)
        result[f"{side}_epoch_s"], result[f"{side}_samples_per_s"] = median, samples / median
        print(f"  {side:8} median epoch {median:.3f} s  ({samples / median:.0f} training samples/s, whole epoch), "
              f"fastest {min(epochs):.3f} s")
    result["fastest_ratio"] = result["template_fastest_epoch_s"] / result["plain_fastest_epoch_s"]
    print(f"  ratio template/plain: median {result['ratio_median']:.3f} (min {result['ratio_min']:.3f}, "
          f"max {result['ratio_max']:.3f}); fastest epochs {result['fastest_ratio']:.3f} (least disturbed by load)")
    return result


def wall_times(cmd, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(cmd)
        times.append(time.perf_counter() - start)
    return times


def measure_startup(args):
    """Wall time of train.py --fast-dev-run against a floor: import torch, build the model and AdamW, one step."""
    loader = json.loads((REPO / args.config).read_text())["data_loader"]["args"]
    shape = [3, 64, 64] if args.model == "resnet18" else [len(loader["mean"]), DIGIT_SIZE, DIGIT_SIZE]
    floor = FLOOR.format(config=args.config, build_model=BUILD_MODEL[args.model], device=args.device,
                         batch=loader["batch_size"], shape=shape)
    fast_dev_run = wall_times(train_py(args, "--fast-dev-run"), args.startup_repeats)
    floor_times = wall_times([sys.executable, "-c", floor], args.startup_repeats)
    result = {"fast_dev_run_s": statistics.median(fast_dev_run), "floor_s": statistics.median(floor_times)}
    print(f"  train.py --fast-dev-run {result['fast_dev_run_s']:.2f} s, floor (model + AdamW + one step) "
          f"{result['floor_s']:.2f} s  (medians of {args.startup_repeats})")
    return result


def template_train_loader(args):
    """The training DataLoader exactly as train.py builds it from the config (the only use of project internals)."""
    from utils.config import build, load_config

    return build(load_config(REPO / args.config, model_overrides(args)), "data_loader")


def samples_per_s(batches, n_batches):
    """Samples per second taken to draw up to `n_batches` batches (inputs, targets) from the iterable."""
    start, n = time.perf_counter(), 0
    for i, (inputs, _) in enumerate(batches):
        if i == n_batches:
            break
        n += len(inputs)
    return n / (time.perf_counter() - start)


def tensor_batches(images, labels, batch_size, mean, std):
    """Shuffled batches taken by indexing one uint8 tensor, scaled and normalised: the plain loop's input."""
    for idx in torch.randperm(len(images)).split(batch_size):
        yield (images[idx].float().div_(255) - mean) / std, labels[idx]


def measure_loader(args):
    """The template's training DataLoader alone (no model) against indexing one tensor, in samples/s."""
    from benchmarks.plain_loop import per_channel, prepare_images

    loader = json.loads((REPO / args.config).read_text())["data_loader"]["args"]
    n_batches = args.train_batches or math.inf
    template = samples_per_s(template_train_loader(args), n_batches)
    images, labels = prepare_images(REPO / loader["data_dir"], args.model)
    mean, std = (per_channel(loader[key], images.shape[1]) for key in ("mean", "std"))
    plain = samples_per_s(tensor_batches(images, labels, loader["batch_size"], mean, std), n_batches)
    print(f"  template DataLoader {template:.0f} samples/s, indexing one tensor {plain:.0f} samples/s")
    return {"template_samples_per_s": template, "tensor_samples_per_s": plain}


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA GPU is available", file=sys.stderr)
        return 2
    figures = {"model": args.model, "device": args.device, "epochs": args.epochs, "pairs": args.pairs,
               "train_batches": args.train_batches, "val_batches": args.val_batches,
               "load_average_before": os.getloadavg()}
    print(f"benchmark: {args.config}, model {args.model}, {args.device}, {args.pairs} pair(s) of {args.epochs} "
          f"epochs, batches per epoch {args.train_batches or 'all'} (validation {args.val_batches or 'all'})")
    if args.model == "resnet18":
        print("  the plain loop resizes the in-memory images to 64x64 once; train.py resizes every sample every epoch")
    try:
        for name, measure in (("overhead", measure_overhead), ("startup", measure_startup),
                              ("loader", measure_loader)):
            if name not in args.skip:
                print(f"{name}:", flush=True)
                figures[name] = measure(args)
    except BenchmarkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    figures["load_average_after"] = os.getloadavg()
    print("load average (1, 5, 15 min): {:.1f} {:.1f} {:.1f} before, {:.1f} {:.1f} {:.1f} after".format(
        *figures["load_average_before"], *figures["load_average_after"]))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
