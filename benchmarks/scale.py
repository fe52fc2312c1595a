"""train.py on a competition-sized JPEG set, with and without the decoded-image cache. Not part of the test suite.

    python -m benchmarks.scale --count 2800 --folder /tmp/scale-2800 [--batches 40] [--json PATH]

A row is one unmodified `python train.py`: one epoch of `--batches` training batches of 32 (RandomResizedCrop to 224,
flip), 2 validation batches. cold: cache on, cache_dir a fresh folder; warm: the same again; off: cache false.
first batch: process start to the train.log line `training on`, plus one batch (epoch line - `training on`, over the
batches: includes the 2 validation batches and the workers' start). img/s: training images over that same span.
RSS: ru_maxrss from wait4 (the largest single process of the run, file pages included). RssAnon, Pss_Anon, Pss_File:
peaks of their sums over the process and its children, sampled every 0.2 s (Pss: shared pages counted once).
"""
import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from multiprocessing import Pool
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLASSES = 18
STAMP = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ "
STARTED, EPOCH = re.compile(STAMP + "training on ", re.M), re.compile(STAMP + r"epoch 1/\d+ ", re.M)
KEYS = ("RssAnon", "Pss_Anon", "Pss_File")
LOADER = {"extension": ".jpg", "image_mode": "rgb", "mean": [0.5] * 3, "std": [0.25] * 3, "test_csv": "train.csv",
          "batch_size": 32, "eval_transforms": [{"type": "Resize", "args": {"size": [224, 224], "antialias": True}}],
          "train_transforms": [{"type": "RandomResizedCrop", "args": {"size": [224, 224], "antialias": True}},
                               {"type": "RandomHorizontalFlip", "args": {}}]}


def make_image(args):
    """A gradient, a few shapes and mild noise, from the id alone, written as a JPEG."""
    import numpy as np
    from PIL import Image, ImageDraw

    path, index, height, width, quality = args
    rng = random.Random(index)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = (rng.uniform(-1, 1) * x / width + rng.uniform(-1, 1) * y / height) * 120
    image = Image.fromarray(np.stack([ramp + rng.uniform(60, 190) for _ in range(3)], -1).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(3, 8)):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        box = [x0, y0, x0 + rng.randint(20, 200), y0 + rng.randint(20, 200)]
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=tuple(rng.randrange(256) for _ in range(3)))
    noisy = np.asarray(image) + np.random.default_rng(index).normal(0, 12, (height, width, 3))
    Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(path, "JPEG", quality=quality)


def generate(folder, count, height=384, width=512, quality=90):
    """`folder/train.csv` (id, label; 18 classes) and `folder/train/<id>.jpg`; kept when already complete."""
    images = Path(folder) / "train"
    if images.is_dir() and len(list(images.glob("*.jpg"))) == count and (images.parent / "train.csv").is_file():
        return
    images.mkdir(parents=True, exist_ok=True)
    ids = [f"img{i:06d}" for i in range(count)]
    with Pool() as pool:
        pool.map(make_image, [(images / f"{id_}.jpg", i, height, width, quality) for i, id_ in enumerate(ids)], 64)
    rows = "".join(f"{id_},class{i % CLASSES:02d}\n" for i, id_ in enumerate(ids))
    (images.parent / "train.csv").write_text("id,label\n" + rows)


def tree(pid):
    """`pid` and its descendants."""
    children = [Path(f"/proc/{pid}/task/{tid}/children").read_text().split() for tid in os.listdir(f"/proc/{pid}/task")]
    return [pid] + [p for some in children for child in some for p in tree(int(child))]


def sample(pid, peaks, done):
    """Keep in `peaks` the largest sums (kB) of KEYS over `pid`'s tree until `done` is set."""
    while not done.wait(0.2):
        sums = dict.fromkeys(KEYS, 0)
        try:
            for p in tree(pid):
                fields = {}
                for name in ("status", "smaps_rollup"):
                    with open(f"/proc/{p}/{name}") as f:
                        fields.update(line.split(":", 1) for line in f if ":" in line)
                for key in KEYS:
                    sums[key] += int(fields.get(key, "0").split()[0])  # none for a process that has ended
        except (OSError, ValueError):
            continue  # a process ended while being read
        peaks.update({key: max(peaks.get(key, 0), sums[key]) for key in KEYS})


def measure(folder, save_dir, batches, workers, cache_dir=None, config="config.json"):
    """One train.py process on `folder`; cache off when `cache_dir` is None. Returns its figures."""
    loader = {**LOADER, "data_dir": str(folder), "num_workers": workers, "cache": cache_dir is not None,
              "cache_dir": cache_dir}
    overrides = [f"data_loader.args.{k}={json.dumps(v)}" for k, v in loader.items()] + [
        f"arch.args.num_classes={CLASSES}", "arch.args.in_channels=3", "trainer.epochs=1", "trainer.tensorboard=false",
        f"trainer.save_dir={save_dir}", f"trainer.limit_train_batches={batches}", "trainer.limit_val_batches=2"]
    command = [sys.executable, "train.py", "-c", config] + [a for o in overrides for a in ("-o", o)]
    start, peaks, done = datetime.now(), {}, threading.Event()
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    sampler = threading.Thread(target=sample, args=(proc.pid, peaks, done))
    sampler.start()
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    sampler.join()
    logs = list(Path(save_dir).glob("**/train.log"))
    if status or len(logs) != 1:
        raise RuntimeError(f"train.py failed (wait status {status}; 9: killed, say for memory):\n{output[-3000:]}")
    text = logs[0].read_text()
    began, ended = (datetime.strptime(p.search(text).group(1), "%Y-%m-%d %H:%M:%S,%f") for p in (STARTED, EPOCH))
    epoch = (ended - began).total_seconds()
    decoded = [line for line in output.splitlines() if line.startswith("decoded images:")] or ["(none)"]
    return {"workers": workers, "first_batch_s": (began - start).total_seconds() + epoch / batches,
            "peak_rss_mib": usage.ru_maxrss / 1024, **{k: peaks.get(k, 0) / 1024 for k in KEYS},
            "images_s": batches * 32 / epoch, "decoded": decoded[0]}


def run_all(folder, batches):
    rows = []
    for workers in (0, 2):
        with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
            for name, cache_dir in (("cold", f"{tmp}/cache"), ("warm", f"{tmp}/cache"), ("off", None)):
                try:
                    row = measure(folder, tempfile.mkdtemp(dir=tmp), batches, workers, cache_dir)
                except RuntimeError as e:  # one failed run (say, killed for memory) leaves the others' figures
                    row = {"workers": workers, "error": str(e)[-2000:]}
                rows.append({"setting": name, **row})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description="train.py on many JPEGs, with and without the decoded-image cache.")
    parser.add_argument("--count", type=int, default=2800)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/scale-2800"))
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    began = time.time()
    generate(args.folder, args.count)
    print(f"{args.count:,} images in {args.folder} ({time.time() - began:.0f} s); load {os.getloadavg()}")
    rows = run_all(args.folder.resolve(), args.batches)
    print(f"load {os.getloadavg()}\nsetting  workers  first batch s  RSS MiB  " + "  ".join(f"{k} MiB" for k in KEYS)
          + "  img/s")
    for r in rows:
        if "error" in r:
            print(f"{r['setting']:7} {r['workers']:>8} failed: {r['error'].splitlines()[0]}")
            continue
        print(f"{r['setting']:7} {r['workers']:>8} {r['first_batch_s']:>14.1f} {r['peak_rss_mib']:>8.0f} "
              f"{r['RssAnon']:>11.0f} {r['Pss_Anon']:>12.0f} {r['Pss_File']:>12.0f} {r['images_s']:>6.1f}")
    print("\n".join(f"{r['setting']}/{r['workers']}: {r.get('decoded') or r['error'].splitlines()[0]}" for r in rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
