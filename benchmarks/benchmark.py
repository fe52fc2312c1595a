"""How much the template costs over a hand-written PyTorch loop, how fast it starts, whether its memory stays flat,
and whether the data loader keeps up. Not part of the test suite (pytest collects tests/ only).

    python -m benchmarks.benchmark                      ConvNet on data/mnist5k (config.json), CPU: ~3-5 min, 2 cores
    python -m benchmarks.benchmark --model resnet18     torchvision resnet18 (num_classes=10) on 3x64x64 inputs
    python -m benchmarks.benchmark --device cuda        on the GPU (exits with an error when there is none)
    python -m benchmarks.benchmark --only throughput --pairs 5 --json /tmp/bench.json
    python -m benchmarks.benchmark --only throughput --aa          A/A check: the plain loop against itself

Phases (one invocation; every measurement runs in fresh subprocesses, so each one's peak memory is its own):

  throughput  Two worker processes built from the same config, seed, data and batch size. "plain" is the loop a user
              writes by hand (zero_grad, forward, loss, backward, step and the config's LR scheduler; then the
              validation split's loss and accuracy, read once per epoch; then torch.save of model + optimizer).
              "template" is train.main(["-c", config, ...]) itself: the Trainer exactly as train.py builds it, with
              its default metrics, logging, progress bar (its stdout/stderr are a pseudo-terminal, so tqdm draws as
              in a terminal), TensorBoard and checkpoints, its run folder in a temporary directory. Both iterate the
              template's own DataLoader (CsvImageDataLoader, decoded images cached in memory, num_workers 0), so the
              difference is the Trainer's overhead. The two take turns every --chunk training batches (who goes
              first alternates), and only a worker's active time is counted, so load from other processes hits
              both alike; --pairs fresh pairs of processes average out the few per cent by which one process's
              speed differs from the next one's. Reported: the training loop (wall and CPU time, plus the sum over
              chunks of each chunk's fastest repeat, the figure least disturbed by load), the validation pass, the
              checkpoint write, the rest of the epoch's bookkeeping, the whole epoch, and peak RSS.
  startup     `python train.py -c config.json` from process start to the first training batch reaching the model
              (benchmarks/startup_probe.py wraps train.main's steps with timers): one cold run (an empty
              decoded-image cache_dir), then the median of --startup-repeats warm runs,
              plus one run under `python -X importtime` to price each imported package, and a floor: a minimal
              hand-written script (import torch, an AdamW, one forward), which any PyTorch training script pays.
  memory      The template for --drift-epochs short epochs (limit_train_batches): resident memory after each epoch.
  loader      The training DataLoader alone (no model), with num_workers 0 and 2, and for reference a plain
              DataLoader over the same decoded dataset without per-sample seeding. Reported beside the training
              throughput: the share of a training epoch that loading takes when it runs in the training process
              (num_workers 0), and so the rate at which the model alone consumes samples, which a loader must beat.

On the CPU the workers run with one torch thread (--threads): with two OpenMP threads on a busy 2-core machine a
training step's time swings by 5x with other processes' load; a per-batch overhead is then a larger share of a
faster step with more threads, so the ratio measured with one thread is a lower bound for an idle machine.
The throughput and loader workers also run with fixed glibc malloc thresholds (MALLOC_MMAP_THRESHOLD_,
MALLOC_TRIM_THRESHOLD_; --malloc-default leaves glibc's self-adjusting ones): otherwise a process's allocation
history decides whether each step's large tensors reuse heap memory or take fresh pages, and the same loop runs
up to ~30% faster or slower from one process to the next (an A/A check gave pair ratios of 0.79-1.05 without,
0.98-1.02 with them).

--model resnet18 replaces the architecture by torchvision's resnet18(num_classes=10) and feeds it the same mnist5k
digits decoded as RGB (three identical channels) and resized to 64x64 by the loader's transforms (v2.Resize, every
sample, every epoch, as a user of the template would configure it), normalised with the MNIST mean/std per
channel. To stay within minutes on a CPU its epochs are cut to --train-batches 6 and --val-batches 2, which makes
the per-epoch costs (image grid, metrics read-out) weigh ~10x more than in a full 57-batch epoch.
"""
import argparse
import itertools
import json
import os
import resource
import select
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESIZE_64 = [{"type": "Resize", "args": {"size": [64, 64], "antialias": True}}]
MODELS = {
    "convnet": {
        "describe": "config.json as is (ConvNet on 1x28x28 digits)",
        "overrides": [],
        "train_batches": 0,  # 0: the whole epoch
        "val_batches": 0,
        "chunk": 8,
        "drift_batches": 10,
        "drift_val_batches": 2,
        "phases": ("startup", "loader", "throughput", "memory"),
    },
    "resnet18": {
        "describe": "torchvision resnet18(num_classes=10); digits decoded as RGB, resized to 3x64x64 by the loader",
        "overrides": [
            'arch={"type": "resnet18", "args": {"num_classes": 10}}',
            "data_loader.args.image_mode=rgb",
            "data_loader.args.train_transforms=" + json.dumps(RESIZE_64),
            "data_loader.args.eval_transforms=" + json.dumps(RESIZE_64),
            "data_loader.args.mean=[0.1307, 0.1307, 0.1307]",
            "data_loader.args.std=[0.3081, 0.3081, 0.3081]",
        ],
        "train_batches": 6,
        "val_batches": 2,
        "chunk": 2,
        "drift_batches": 2,
        "drift_val_batches": 1,
        "phases": ("loader", "throughput", "memory"),
    },
}
PHASES = ("startup", "loader", "throughput", "memory")
TARGETS = {"train_ratio": 1.03, "startup_s": 3.0, "drift": 0.05}
MESSAGE_TIMEOUT_S = 1800


# ----------------------------------------------------------------------------------------------------------------
# helpers shared by the parent and the workers


def rss_kb():
    """Current resident set size of this process, in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def maxrss_kb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def load_text():
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores"


# ----------------------------------------------------------------------------------------------------------------
# workers (run in subprocesses: python -m benchmarks.benchmark --worker KIND --spec JSON)


class Channel:
    """The worker's side: JSON lines out on BENCH_RESULT_FD, commands ("go", "stop") in on stdin."""

    def __init__(self):
        self.fd = int(os.environ["BENCH_RESULT_FD"])

    def send(self, **message):
        os.write(self.fd, (json.dumps(message) + "\n").encode())

    def wait_go(self):
        return sys.stdin.readline().strip() == "go"


def clock():
    return time.perf_counter(), time.process_time()


class Gate:
    """Times the parts of an epoch (train, val, ckpt, other) and, in lock-step mode, pauses the worker every `chunk`
    training batches and at each epoch's end until the parent says "go". Only active time is counted, so two
    workers run alternately chunk by chunk, and a change in machine load hits both alike. The plain and the
    template worker use the same gate, called from a forward pre-hook on the model (which runs outside the data
    loader's stack) and at the same points of the epoch."""

    PARTS = ("train", "val", "ckpt", "other")

    def __init__(self, channel, lockstep, chunk, count_objects, sync):
        self.channel, self.lockstep, self.chunk, self.count_objects = channel, lockstep, chunk, count_objects
        self.sync = sync  # waits for queued GPU work (a no-op on the CPU)
        self.part = None
        self.epoch = None
        self.gc = {"s": 0.0, "collections": [0, 0, 0], "started": None}
        import gc

        gc.callbacks.append(self._gc_callback)

    def _gc_callback(self, phase, info):
        if phase == "start":
            self.gc["started"] = time.perf_counter()
        elif self.gc["started"] is not None:
            self.gc["s"] += time.perf_counter() - self.gc["started"]
            self.gc["collections"][info["generation"]] += 1

    def start_epoch(self, epoch):
        self.epoch, self.forwards, self.pauses = epoch, 0, 0
        self.acc = {f"{p}_{c}": 0.0 for p in self.PARTS for c in ("s", "cpu_s")}
        self.chunks, self.chunks_cpu, self.mark = [], [], (0.0, 0.0)  # training time of each chunk
        self.gc.update(s=0.0, collections=[0, 0, 0])
        self.part, self.last = "train", clock()

    def switch(self, part):
        if self.part is None:
            return
        now = clock()
        self.acc[f"{self.part}_s"] += now[0] - self.last[0]
        self.acc[f"{self.part}_cpu_s"] += now[1] - self.last[1]
        if self.part == "train" and part != "train":
            self._close_chunk()
        self.part, self.last = part, now

    def _close_chunk(self):
        self.chunks.append(self.acc["train_s"] - self.mark[0])
        self.chunks_cpu.append(self.acc["train_cpu_s"] - self.mark[1])
        self.mark = (self.acc["train_s"], self.acc["train_cpu_s"])

    def _pause(self, result=None, close_chunk=False):
        self.sync()  # queued GPU work belongs to the time before the pause
        self.switch(self.part)
        if close_chunk:
            self._close_chunk()
        self.channel.send(event="paused", result=result)
        go = self.channel.wait_go()
        self.last = clock()
        return go

    def forward_pre_hook(self, module, inputs):
        if module.training and self.part == "train":
            self.forwards += 1
            if self.lockstep and self.chunk and self.forwards > 1 and (self.forwards - 1) % self.chunk == 0:
                self.pauses += 1
                self._pause(close_chunk=True)

    def end_epoch(self, **extra):
        """Close the epoch and report it; returns False when the parent said stop (lock-step mode)."""
        self.switch(None)
        result = dict(self.acc, epoch=self.epoch, batches=self.forwards, pauses=self.pauses, rss_kb=rss_kb(),
                      chunks=self.chunks, chunks_cpu=self.chunks_cpu, gc_s=self.gc["s"],
                      gc_collections=list(self.gc["collections"]), **extra)
        result["total_s"] = sum(result[f"{p}_s"] for p in self.PARTS)
        result["total_cpu_s"] = sum(result[f"{p}_cpu_s"] for p in self.PARTS)
        if self.count_objects:
            import gc

            result["python_objects"] = len(gc.get_objects())
        if self.lockstep:
            return self._pause(result)
        self.channel.send(event="epoch", result=result)
        return True


def _setup_torch(spec):
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    if spec["device"].startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: this machine has no CUDA device (torch.cuda.is_available() is False)")
    return torch


def _device_sync(torch, spec):
    """A function that waits for the device's queued work."""
    return torch.cuda.synchronize if spec["device"].startswith("cuda") else (lambda: None)


def _counts(loader, limit):
    """(batches, samples) of one pass over `loader` limited to `limit` batches (0: no limit)."""
    from trainer.trainer import batches_per_epoch

    n_batches = batches_per_epoch(len(loader), limit)
    return n_batches, min(n_batches * loader.batch_size, len(loader.sampler))


def _overrides(spec):
    extra = [f"trainer.save_dir={json.dumps(spec['save_dir'])}", f"trainer.epochs={spec['total_epochs']}",
             f"trainer.limit_train_batches={spec['train_batches']}", f"trainer.limit_val_batches={spec['val_batches']}"]
    return spec["overrides"] + extra


def _cuda_peak(torch):
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return {"cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20}
    return {}


def worker_plain(spec):
    """The baseline: what a user would write by hand around the same DataLoader, model, optimizer and scheduler."""
    started = time.perf_counter()
    torch = _setup_torch(spec)
    from torch.optim.lr_scheduler import ReduceLROnPlateau

    import train as train_script
    from utils.config import build, build_loss, load_config
    from utils.util import seed_everything

    channel = Channel()
    gate = Gate(channel, spec["lockstep"], spec["chunk"], spec.get("count_objects", False), _device_sync(torch, spec))
    config = load_config(spec["config"], _overrides(spec))
    device = torch.device(spec["device"])
    seed_everything(config["seed"], config["deterministic"])
    loader = build(config, "data_loader")
    valid_loader = loader.split_validation()
    model = build(config, "arch").to(device)
    model.register_forward_pre_hook(gate.forward_pre_hook)
    criterion = build_loss(config)
    optimizer = build(config, "optimizer", [p for p in model.parameters() if p.requires_grad])
    scheduler = train_script.build_scheduler(config, optimizer, len(loader)) if config["lr_scheduler"] else None
    per_batch = scheduler is not None and config["lr_scheduler"].get("step_every") == "batch"
    n_train, train_samples = _counts(loader, spec["train_batches"])
    n_val, val_samples = _counts(valid_loader, spec["val_batches"]) if valid_loader else (0, 0)
    checkpoint = Path(spec["run_dir"]) / "plain-checkpoint.pth"
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    channel.send(event="ready", setup_s=time.perf_counter() - started, train_batches=n_train,
                 train_samples=train_samples, val_batches=n_val, val_samples=val_samples,
                 batch_size=loader.batch_size, threads=torch.get_num_threads(), rss_kb=rss_kb(),
                 progress_bar=False)
    if spec["lockstep"] and not channel.wait_go():
        return channel.send(event="done", rc=0, maxrss_kb=maxrss_kb())

    for epoch in range(1, spec["total_epochs"] + 1):
        gate.start_epoch(epoch)
        model.train()
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        for data, target in itertools.islice(loader, n_train):
            data, target = data.to(device, non_blocking=True), target.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(data), target)
            loss.backward()
            optimizer.step()
            if per_batch:
                scheduler.step()
        gate.sync()

        gate.switch("val")
        model.eval()
        val_loss = val_accuracy = float("nan")
        if valid_loader is not None:
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            correct = torch.zeros((), dtype=torch.int64, device=device)
            count = 0
            with torch.inference_mode():
                for data, target in itertools.islice(valid_loader, n_val):
                    data, target = data.to(device, non_blocking=True), target.to(device, non_blocking=True)
                    output = model(data)
                    loss_sum += criterion(output, target).double() * len(target)
                    correct += (output.argmax(dim=1) == target).sum()
                    count += len(target)
            val_loss, val_accuracy = loss_sum.item() / count, correct.item() / count
        if scheduler is not None and not per_batch:
            if isinstance(scheduler, ReduceLROnPlateau):
                scheduler.step(val_loss)
            else:
                scheduler.step()

        gate.switch("ckpt")
        torch.save({"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "lr_scheduler": scheduler.state_dict() if scheduler is not None else None}, checkpoint)
        gate.switch("other")
        print(f"epoch {epoch}  val_loss {val_loss:.4f}  val_accuracy {val_accuracy:.4f}", flush=True)
        if not gate.end_epoch(val_accuracy=val_accuracy):
            break
    channel.send(event="done", rc=0, maxrss_kb=maxrss_kb(), **_cuda_peak(torch))


def worker_template(spec):
    """train.main() as a user runs it, with the gate hooked into the Trainer in this process only: _train_epoch
    starts an epoch, a forward pre-hook on the model counts training batches, _valid_epoch starts the validation
    part, _update_monitor the bookkeeping ("other": monitor, epoch report, history.csv, TensorBoard scalars), and
    _save_checkpoint the checkpoint part; the end of _save_checkpoint ends the epoch."""
    started = time.perf_counter()
    torch = _setup_torch(spec)
    import train as train_script
    from trainer import trainer as trainer_module

    channel = Channel()
    gate = Gate(channel, spec["lockstep"], spec["chunk"], spec.get("count_objects", False), _device_sync(torch, spec))
    Trainer = trainer_module.Trainer
    state = {"ready": False, "val_accuracy": None}

    original_train_epoch = Trainer._train_epoch

    def train_epoch(self, epoch):
        if not state["ready"]:
            state["ready"] = True
            self.model.register_forward_pre_hook(gate.forward_pre_hook)
            n_train, train_samples = _counts(self.data_loader, self.limit_train_batches)
            valid = self.valid_data_loader
            n_val, val_samples = _counts(valid, self.limit_val_batches) if valid else (0, 0)
            channel.send(event="ready", setup_s=time.perf_counter() - started, train_batches=n_train,
                         train_samples=train_samples, val_batches=n_val, val_samples=val_samples,
                         batch_size=self.data_loader.batch_size, threads=torch.get_num_threads(),
                         rss_kb=rss_kb(), progress_bar=sys.stderr.isatty())
            if spec["lockstep"] and not channel.wait_go():
                raise SystemExit(0)
        gate.start_epoch(epoch)
        return original_train_epoch(self, epoch)

    Trainer._train_epoch = train_epoch
    original_valid_epoch = Trainer._valid_epoch

    def valid_epoch(self):
        gate.switch("val")
        return original_valid_epoch(self)

    Trainer._valid_epoch = valid_epoch
    original_update_monitor = Trainer._update_monitor

    def update_monitor(self, log):
        gate.switch("other")
        state["val_accuracy"] = log.get("val_accuracy")
        return original_update_monitor(self, log)

    Trainer._update_monitor = update_monitor
    original_save = Trainer._save_checkpoint

    def save_checkpoint(self, *args, **kwargs):
        previous = gate.part
        gate.switch("ckpt")
        try:
            return original_save(self, *args, **kwargs)
        finally:
            if kwargs.get("batches_done"):
                gate.switch(previous)
            elif gate.part is not None:
                gate.end_epoch(val_accuracy=state["val_accuracy"])

    Trainer._save_checkpoint = save_checkpoint
    argv = ["-c", spec["config"], "-d", spec["device"]]
    for item in _overrides(spec):
        argv += ["-o", item]
    rc = train_script.main(argv)
    channel.send(event="done", rc=rc, maxrss_kb=maxrss_kb(), **_cuda_peak(torch))


def worker_loader(spec):
    """Iterate the training DataLoader without a model: epochs per second for each variant."""
    torch = _setup_torch(spec)

    from utils.config import build, load_config
    from utils.util import seed_everything

    channel = Channel()
    results = []

    def time_epochs(label, loader, n_batches, samples, set_epoch=True):
        times = []
        for epoch in range(1, spec["loader_warmup"] + spec["loader_epochs"] + 1):
            if set_epoch and hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch)
            t = time.perf_counter()
            for _ in itertools.islice(loader, n_batches):
                pass
            times.append(time.perf_counter() - t)
        timed = times[spec["loader_warmup"]:]
        results.append({"label": label, "epoch_s": median(timed), "samples": samples,
                        "samples_per_s": samples / median(timed), "runs": timed})
        channel.send(event="progress", **results[-1])

    def make(num_workers):
        config = load_config(spec["config"], spec["overrides"] + [f"data_loader.args.num_workers={num_workers}"])
        seed_everything(config["seed"], config["deterministic"])
        loader = build(config, "data_loader")
        return loader, *_counts(loader, spec["train_batches"])

    loader, n_batches, samples = make(0)
    default_workers = load_config(spec["config"], spec["overrides"])["data_loader"]["args"].get("num_workers", 0)
    time_epochs(f"template loader, num_workers={loader.num_workers} (config default {default_workers})", loader,
                n_batches, samples)

    dataset = loader.dataset.dataset if hasattr(loader.dataset, "dataset") else loader.dataset
    indices = getattr(loader, "train_indices", range(len(dataset)))
    plain = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, list(map(int, indices))),
                                        batch_size=loader.batch_size, shuffle=True)
    time_epochs("  plain DataLoader, same decoded dataset, no per-sample seeding", plain, n_batches, samples,
                set_epoch=False)
    del loader, plain

    loader, n_batches, samples = make(2)
    time_epochs("template loader, num_workers=2 (persistent workers)", loader, n_batches, samples)
    channel.send(event="done", rc=0, results=results, maxrss_kb=maxrss_kb())


WORKERS = {"plain": worker_plain, "template": worker_template, "loader": worker_loader}


# ----------------------------------------------------------------------------------------------------------------
# the parent: spawning workers and reading their messages


class Worker:
    """A worker subprocess; its stdout and stderr go to a pseudo-terminal (or a pipe) drained by a thread."""

    def __init__(self, kind, spec, tty=True):
        self.kind = kind
        result_r, result_w = os.pipe()
        env = dict(os.environ, BENCH_RESULT_FD=str(result_w), **spec.get("env", {}))
        if tty:
            import fcntl
            import pty
            import struct
            import termios

            master, slave = pty.openpty()
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
            out = slave
        else:
            master, out = os.pipe()
            slave = out
        cmd = [sys.executable, "-m", "benchmarks.benchmark", "--worker", kind, "--spec", json.dumps(spec)]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=out, stderr=out,
                                     pass_fds=(result_w,))
        os.close(result_w)
        os.close(slave)
        self.result_fd = result_r
        self.buffer = b""
        self.tail = bytearray()
        self.drain = threading.Thread(target=self._drain, args=(master,), daemon=True)
        self.drain.start()

    def _drain(self, fd):
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            self.tail += chunk
            del self.tail[:-20000]
        os.close(fd)

    def output_tail(self, n=3000):
        self.drain.join(timeout=2)
        text = self.tail.decode(errors="replace").replace("\r", "\n")
        return "\n".join(line for line in text.splitlines() if line.strip())[-n:]

    def send(self, command):
        self.proc.stdin.write((command + "\n").encode())
        self.proc.stdin.flush()

    def receive(self, timeout=MESSAGE_TIMEOUT_S):
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.result_fd], [], [], max(left, 0))
            if not ready:
                self.kill()
                raise RuntimeError(f"{self.kind} worker: no message for {timeout} s\n{self.output_tail()}")
            chunk = os.read(self.result_fd, 65536)
            if not chunk:
                self.proc.wait(timeout=30)
                raise RuntimeError(f"{self.kind} worker exited (status {self.proc.returncode}) "
                                   f"without a message:\n{self.output_tail()}")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def expect(self, event):
        while True:
            message = self.receive()
            if message["event"] == event:
                return message
            if message["event"] == "progress":
                print(f"   {message['label']}: {message['samples_per_s']:.0f} samples/s "
                      f"({message['epoch_s']:.2f} s per pass)")
            else:
                raise RuntimeError(f"{self.kind} worker: expected {event!r}, got {message}")

    def finish(self):
        """Send stop, read the final message, reap the process."""
        if self.proc.poll() is None:
            try:
                self.send("stop")
            except (BrokenPipeError, OSError):
                pass
        done = self.expect("done")
        self.proc.wait(timeout=120)
        os.close(self.result_fd)
        if done.get("rc"):
            raise RuntimeError(f"{self.kind} worker: train.main returned {done['rc']}\n{self.output_tail()}")
        return done

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def cache_override(args, scratch):
    """Points the config's decoded-image cache_dir, if it has one, into the scratch folder: every benchmark
    starts with an empty cache and leaves none behind."""
    data_args = json.loads(Path(args.config).read_text()).get("data_loader", {}).get("args", {})
    return [f"data_loader.args.cache_dir={scratch / 'decoded-cache'}"] if "cache_dir" in data_args else []


def malloc_env(args):
    """glibc raises its mmap threshold each time it frees a large mmapped block, so whether a step's activations
    come from the heap (fast) or from fresh pages (page faults) depends on the process's allocation history: the
    same loop runs up to ~30% faster or slower from one process to the next, and systematically differently in
    two programs that allocate differently before training. Fixed thresholds take the allocator out of the ratio."""
    if args.malloc_default:
        return {}
    return {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**30)}


def base_spec(args, model, scratch, **extra):
    spec = {
        "config": str(Path(args.config).resolve()),
        "device": args.device,
        "threads": args.threads,
        "overrides": MODELS[model]["overrides"] + cache_override(args, scratch) + args.override,
        "train_batches": args.train_batches if args.train_batches is not None else MODELS[model]["train_batches"],
        "val_batches": args.val_batches if args.val_batches is not None else MODELS[model]["val_batches"],
        "save_dir": str(scratch / "saved") + "/",
        "run_dir": str(scratch / "plain"),
        "total_epochs": 1,
        "lockstep": True,
        "chunk": 0,
    }
    spec.update(extra)
    return spec


# ----------------------------------------------------------------------------------------------------------------
# phases


def phase_throughput(args, model, scratch):
    """--pairs pairs of fresh plain/template workers (a process's own speed varies by several per cent from one
    start to the next on a shared machine: new pairs average that out), each running in lock-step."""
    chunk = args.chunk if args.chunk is not None else MODELS[model]["chunk"]
    result = {"repeats": [], "measured": {"plain": [], "template": []}, "pair_ratios": [], "done": {},
              "chunk": chunk, "aa": args.aa, "pairs": args.pairs}
    for pair in range(args.pairs):
        print(f"   pair {pair + 1}/{args.pairs}", flush=True)
        ready, epochs, done = _run_pair(args, model, scratch / f"throughput{pair}", chunk, pair)
        result["ready"] = ready
        ratios = []
        for r in range(args.repeats):
            start = args.warmup + r * args.epochs
            repeat = {label: _mean_epochs(epochs[label][start:start + args.epochs]) for label in epochs}
            repeat["pair"] = pair
            result["repeats"].append(repeat)
            ratios.append((repeat["template"]["train_s"] / repeat["plain"]["train_s"],
                           repeat["template"]["train_cpu_s"] / repeat["plain"]["train_cpu_s"]))
        result["pair_ratios"].append([median([w for w, _ in ratios]), median([c for _, c in ratios])])
        for label in epochs:
            result["measured"][label] += epochs[label][args.warmup:]
            peak = result["done"].setdefault(label, {"maxrss_kb": 0})
            peak["maxrss_kb"] = max(peak["maxrss_kb"], done[label]["maxrss_kb"])
            if done[label].get("cuda_peak_mb") is not None:
                peak["cuda_peak_mb"] = max(peak.get("cuda_peak_mb", 0), done[label]["cuda_peak_mb"])
    return result


def _run_pair(args, model, scratch, chunk, pair):
    total_epochs = args.warmup + args.repeats * args.epochs
    spec = base_spec(args, model, scratch, total_epochs=total_epochs, chunk=chunk, env=malloc_env(args))
    kinds = {"plain": "plain", "template": "plain" if args.aa else "template"}
    labels = list(kinds) if pair % 2 == 0 else list(kinds)[::-1]  # who starts first alternates between pairs
    workers = {}
    try:
        for label in labels:
            workers[label] = Worker(kinds[label], dict(spec, run_dir=str(scratch / label)), tty=not args.no_tty)
        ready = {label: workers[label].expect("ready") for label in labels}
        for label, r in ready.items():
            print(f"   {label}: ready after {r['setup_s']:.1f} s, {r['train_batches']} train batches "
                  f"({r['train_samples']} samples), {r['val_batches']} val batches ({r['val_samples']} samples), "
                  f"{r['threads']} threads" + (", progress bar on" if r.get("progress_bar") else ""))
        if ready["plain"]["train_samples"] != ready["template"]["train_samples"]:
            raise RuntimeError(f"plain and template disagree on the epoch: {ready}")
        epochs = {label: [] for label in labels}
        rounds = 0
        while any(len(epochs[label]) < total_epochs for label in labels):
            for label in labels if rounds % 2 == 0 else labels[::-1]:
                if len(epochs[label]) >= total_epochs:
                    continue
                workers[label].send("go")
                result = workers[label].expect("paused")["result"]
                if result is not None:
                    epochs[label].append(result)
            rounds += 1
            n = min(len(epochs[label]) for label in labels)
            if n and all(len(epochs[label]) == n for label in labels) and "printed" not in epochs["plain"][n - 1]:
                p, t = epochs["plain"][n - 1], epochs["template"][n - 1]
                p["printed"] = True
                what = "warm-up" if n <= args.warmup else f"epoch {n - args.warmup}/{args.repeats * args.epochs}"
                print(f"   {what}: train plain {p['train_s']:.2f} s, template {t['train_s']:.2f} s "
                      f"(x{t['train_s'] / p['train_s']:.3f}, CPU x{t['train_cpu_s'] / p['train_cpu_s']:.3f}); "
                      f"val {p['val_s']:.2f} / {t['val_s']:.2f} s; {t['pauses'] + 1} chunks; {load_text()}",
                      flush=True)
        done = {label: w.finish() for label, w in workers.items()}
    finally:
        for w in workers.values():
            w.kill()
    return ready, epochs, done


def _mean_epochs(epochs):
    keys = [f"{p}_{c}" for p in Gate.PARTS + ("total",) for c in ("s", "cpu_s")]
    out = {k: sum(e[k] for e in epochs) / len(epochs) for k in keys}
    out["rss_kb"] = epochs[-1]["rss_kb"]
    return out


def phase_memory(args, model, scratch):
    batches = args.drift_batches if args.drift_batches is not None else MODELS[model]["drift_batches"]
    spec = base_spec(args, model, scratch / "memory", total_epochs=args.drift_epochs, lockstep=False,
                     train_batches=batches, val_batches=MODELS[model]["drift_val_batches"], count_objects=True)
    worker = Worker("template", spec, tty=not args.no_tty)
    try:
        worker.expect("ready")
        epochs = []
        for _ in range(args.drift_epochs):
            epochs.append(worker.expect("epoch")["result"])
            e = epochs[-1]
            print(f"   epoch {e['epoch']}: RSS {e['rss_kb'] / 1024:.1f} MiB, {e['python_objects']} Python objects, "
                  f"{e['total_s']:.2f} s")
        done = worker.finish()
    finally:
        worker.kill()
    return {"batches": batches, "epochs": epochs, "done": done}


def phase_loader(args, model, scratch):
    spec = base_spec(args, model, scratch / "loader", env=malloc_env(args), loader_warmup=1,
                     loader_epochs=args.loader_epochs)
    worker = Worker("loader", spec, tty=False)
    try:
        done = worker.finish()
    finally:
        worker.kill()
    return done["results"]


# The floor: what any hand-written PyTorch training script pays before its first batch on this machine (the
# interpreter, `import torch`, and a torch.optim constructor, which imports torch._dynamo on first use).
FLOOR_CODE = """
import os, time
import torch
model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
optimizer.zero_grad(set_to_none=True)
model(torch.zeros(64, 1, 28, 28))
print(time.time() - float(os.environ["BENCH_SPAWN_TIME"]))
"""


def phase_startup(args, model, scratch):
    """`python train.py -c CONFIG` (with the model's and the command line's overrides) to the first batch: one cold
    run (the data loader's cache_dir, when the config has one, points at an empty folder), then --startup-repeats
    warm runs interleaved with runs of FLOOR_CODE, then one warm run under -X importtime."""
    runs = []
    floor = []
    cold = importtime = None
    cache = cache_override(args, scratch)
    uses_cache_dir = bool(cache)
    overrides = MODELS[model]["overrides"] + cache + args.override
    for i in range(args.startup_repeats + 2):
        if 0 < i <= args.startup_repeats:
            env = dict(os.environ, BENCH_SPAWN_TIME=repr(time.time()))
            proc = subprocess.run([sys.executable, "-c", FLOOR_CODE], cwd=scratch, env=env, stdout=subprocess.PIPE,
                                  check=True, timeout=600)
            floor.append(float(proc.stdout.decode().split()[-1]))
        with_importtime = i == args.startup_repeats + 1
        out = scratch / f"startup{i}.json"
        save_dir = scratch / f"startup{i}"
        cmd = [sys.executable] + (["-X", "importtime"] if with_importtime else []) + [
            "-m", "benchmarks.startup_probe", "-c", str(Path(args.config).resolve()),
            "-o", f"trainer.save_dir={save_dir}/"]
        for override in overrides:
            cmd += ["-o", override]
        if args.device != "cpu":
            cmd += ["-d", args.device]
        env = dict(os.environ, BENCH_PROBE_OUT=str(out))
        env["BENCH_SPAWN_TIME"] = repr(time.time())
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=600)
        if not out.exists():
            raise RuntimeError(f"startup probe failed (status {proc.returncode}):\n{proc.stderr.decode()[-3000:]}")
        result = json.loads(out.read_text())
        if result["status"] != "first batch":
            raise RuntimeError(f"startup probe: {result['status']} (rc {result['rc']})\n{proc.stderr.decode()[-3000:]}")
        if with_importtime:
            importtime = {"total_s": result["total_s"], "packages": parse_importtime(proc.stderr.decode())}
        elif i == 0:
            cold = result
            print(f"   cold run{' (empty decoded-image cache)' if uses_cache_dir else ''}: {result['total_s']:.2f} s "
                  f"to the first batch; {load_text()}")
        else:
            runs.append(result)
            print(f"   run {i}: {result['total_s']:.2f} s to the first batch (floor: {floor[-1]:.2f} s); "
                  f"{load_text()}")
    return {"runs": runs, "cold": cold, "uses_cache_dir": uses_cache_dir, "importtime": importtime, "floor": floor}


def parse_importtime(text):
    """Cumulative import time per top-level package, counting each package's outermost imports only."""
    entries = []
    for line in text.splitlines():
        if not line.startswith("import time:"):
            continue
        parts = line[len("import time:"):].split("|")
        if len(parts) != 3 or not parts[1].strip().isdigit():
            continue
        name = parts[2].rstrip()
        depth = len(name) - len(name.lstrip())
        entries.append((depth, int(parts[1]), name.strip().split(".")[0]))
    totals = {}
    stack = []  # the output is post-order: walk it backwards so ancestors come before their children
    for depth, cumulative_us, root in reversed(entries):
        while stack and stack[-1][0] >= depth:
            stack.pop()
        if root not in {r for _, r in stack}:
            totals[root] = totals.get(root, 0) + cumulative_us / 1e6
        stack.append((depth, root))
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


# ----------------------------------------------------------------------------------------------------------------
# the report


def summarise_throughput(result):
    repeats = result["repeats"]
    labels = ("plain", "template")
    out = {}
    for part in Gate.PARTS + ("total",):
        for clock_name in ("s", "cpu_s"):
            key = f"{part}_{clock_name}"
            plain = [r["plain"][key] for r in repeats]
            template = [r["template"][key] for r in repeats]
            ratios = [t / p for t, p in zip(template, plain, strict=True) if p > 1e-4]
            out[key] = {"plain": median(plain), "template": median(template), "ratio": median(ratios),
                        "ratio_min": min(ratios) if ratios else None, "ratio_max": max(ratios) if ratios else None}
    measured = result["measured"]
    for key in ("chunks", "chunks_cpu"):
        best = {k: _sum_of_chunk_minima([e[key] for e in measured[k]]) for k in labels}
        out["best_" + key] = {"plain": best["plain"], "template": best["template"],
                              "ratio": best["template"] / best["plain"] if best["plain"] else None}
    out["train_samples"] = result["ready"]["plain"]["train_samples"]
    out["val_samples"] = result["ready"]["plain"]["val_samples"]
    out["maxrss_mb"] = {k: result["done"][k]["maxrss_kb"] / 1024 for k in labels}
    out["cuda_peak_mb"] = {k: result["done"][k].get("cuda_peak_mb") for k in labels}
    out["val_accuracy"] = {k: measured[k][-1].get("val_accuracy") for k in labels}
    out["pair_ratios"] = result["pair_ratios"]
    return out


def _sum_of_chunk_minima(epochs):
    """An epoch's training time with the load's interference filtered out: each chunk's fastest run, summed."""
    n = min(len(chunks) for chunks in epochs)
    return sum(min(chunks[i] for chunks in epochs) for i in range(n))


def verdict(value, target, low=None, high=None):
    """PASS/FAIL on the median; flagged when the repeats' range straddles the target."""
    if value is None:
        return "n/a"
    text = "PASS" if value <= target else "FAIL"
    if low is not None and low <= target <= high:
        text += " (repeats straddle the target)"
    return text


def report(args, model, results, load_start, started):
    w = 30
    print()
    print("=" * 110)
    print(f"SUMMARY  model {model} ({MODELS[model]['describe']}), device {args.device}, config {args.config}")
    print(f"         {load_start} at start; {load_text()} at the end; {time.perf_counter() - started:.0f} s in all")
    th = results.get("throughput")
    if th:
        s = th["summary"]
        ready = th["raw"]["ready"]["plain"]
        chunk = th["raw"]["chunk"]
        n_repeats = len(th["raw"]["repeats"])
        print(f"         batch {ready['batch_size']}, {s['train_samples']} training samples "
              f"({ready['train_batches']} batches), {s['val_samples']} validation samples ({ready['val_batches']} "
              f"batches) per epoch; {ready['threads']} torch thread(s)")
        print(f"         median of {n_repeats} repeats ({args.pairs} fresh process pairs x {args.repeats}) of "
              f"{args.epochs} epoch(s), each pair after {args.warmup} warm-up epoch(s); the two loops take turns "
              "every " + (f"{chunk} batches" if chunk else "epoch") + " (order alternating)")
        if th["raw"]["aa"]:
            print("         A/A CHECK: both columns run the plain loop; every ratio should be close to 1.00")
        print("-" * 110)
        print(f"{'':{w}} {'plain':>10} {'template':>10} {'ratio':>7}  {'repeats':>13}  {'target':>7}  verdict")

        def row(label, key, target=None, note=""):
            d = s[key]
            if d["ratio"] is None:
                print(f"{label:{w}} {d['plain']:>8.3f} s {d['template']:>8.3f} s{note}")
                return
            line = (f"{label:{w}} {d['plain']:>8.3f} s {d['template']:>8.3f} s {d['ratio']:>7.3f}  "
                    f"{d['ratio_min']:>6.3f}-{d['ratio_max']:<6.3f}")
            if target:
                line += f"  {'<=' + str(target):>7}  {verdict(d['ratio'], target, d['ratio_min'], d['ratio_max'])}"
            print(line + note)

        row("training epoch (wall)", "train_s", TARGETS["train_ratio"])
        row("training epoch (CPU time)", "train_cpu_s", TARGETS["train_ratio"])
        for key, label in (("best_chunks", "wall"), ("best_chunks_cpu", "CPU")):
            b = s[key]
            print(f"{'training, best-of-repeats (' + label + ')':{w}} {b['plain']:>8.3f} s {b['template']:>8.3f} s "
                  f"{b['ratio']:>7.3f}  {'':13}  {'<=' + str(TARGETS['train_ratio']):>7}  "
                  f"{verdict(b['ratio'], TARGETS['train_ratio'])}   (each chunk's fastest repeat, summed)")
        print(f"{'training samples/s':{w}} {s['train_samples'] / s['train_s']['plain']:>10.0f} "
              f"{s['train_samples'] / s['train_s']['template']:>10.0f}")
        if s["val_samples"]:
            row("validation pass (wall)", "val_s")
            row("validation pass (CPU time)", "val_cpu_s")
            print(f"{'validation samples/s':{w}} {s['val_samples'] / s['val_s']['plain']:>10.0f} "
                  f"{s['val_samples'] / s['val_s']['template']:>10.0f}")
        row("checkpoint write", "ckpt_s",
            note="   plain: torch.save; template: fsync'd checkpoint-last (+ model_best copy when improved)")
        row("other per-epoch work", "other_s",
            note="   plain: one print; template: monitor, epoch log line, history.csv, TensorBoard scalars")
        row("whole epoch (wall)", "total_s")
        rss = s["maxrss_mb"]
        print(f"{'peak RSS (ru_maxrss)':{w}} {rss['plain']:>6.0f} MiB {rss['template']:>6.0f} MiB "
              f"{rss['template'] / rss['plain']:>7.3f}")
        if s["cuda_peak_mb"]["plain"] is not None:
            print(f"{'peak CUDA memory allocated':{w}} {s['cuda_peak_mb']['plain']:>6.0f} MiB "
                  f"{s['cuda_peak_mb']['template']:>6.0f} MiB")
        print(f"{'training ratio per process pair':{w}} "
              + ", ".join(f"{wall:.3f} (CPU {cpu:.3f})" for wall, cpu in s["pair_ratios"]))
        acc = s["val_accuracy"]
        print(f"{'last val_accuracy (sanity)':{w}} {acc['plain'] or 0:>10.4f} {acc['template'] or 0:>10.4f}")
    lo = results.get("loader")
    if lo:
        print("-" * 110)
        train_rate = th["summary"]["train_samples"] / th["summary"]["train_s"]["plain"] if th else None
        print("loader only (no model), samples/s" + (f"; training runs at {train_rate:.0f} samples/s (plain loop)"
                                                      if train_rate else ""))
        for r in lo:
            extra = ""
            if train_rate:
                extra = (f"  {r['samples_per_s'] / train_rate:>5.1f}x training speed; "
                         f"{train_rate / r['samples_per_s'] * 100:4.1f}% of a training epoch if serial")
            print(f"  {r['label']:<70} {r['samples_per_s']:>8.0f}{extra}")
        if train_rate:
            # the plain loop loads in its own process (num_workers 0): its time per sample is the loader's
            # (lo[0], the same loader) plus the model's
            model_s = 1 / train_rate - 1 / lo[0]["samples_per_s"]
            model_rate = 1 / model_s if model_s > 0 else float("inf")
            template_loaders = [r for r in lo if r["label"].startswith("template loader")]
            fastest = max(template_loaders, key=lambda r: r["samples_per_s"])
            print(f"  model alone (training without its loading time): {model_rate:.0f} samples/s")
            print(f"  {'target: a template loader faster than the model alone':<70} "
                  f"{fastest['samples_per_s']:>8.0f}  {'PASS' if fastest['samples_per_s'] > model_rate else 'FAIL'}")
    st = results.get("startup")
    if st:
        print("-" * 110)
        total = median([r["total_s"] for r in st["runs"]])
        print(f"start-up, `python train.py -c {args.config}` ({model}) to the first training batch (median of "
              f"{len(st['runs'])}): {total:.2f} s   target < {TARGETS['startup_s']:.0f} s: "
              f"{'PASS' if total < TARGETS['startup_s'] else 'FAIL'}")
        floor = median(st["floor"])
        print(f"  floor: a minimal hand-written script (import torch, AdamW, first forward), median of "
              f"{len(st['floor'])}: {floor:.2f} s; the template adds {total - floor:.2f} s")
        if st["cold"]:
            print(f"  cold run, {'the decoded-image cache still empty' if st['uses_cache_dir'] else 'the first one'}: "
                  f"{st['cold']['total_s']:.2f} s (phases of the cold run below the warm ones)")
        for label, seconds, packages in startup_breakdown(st["runs"]):
            pk = f"  [first imports: {', '.join(packages[:8])}]" if packages else ""
            print(f"  {label:<62} {seconds:>6.2f} s{pk}")
        if st["cold"]:
            print("  cold run:")
            for label, seconds, packages in startup_breakdown([st["cold"]]):
                pk = f"  [first imports: {', '.join(packages[:8])}]" if packages else ""
                print(f"    {label:<60} {seconds:>6.2f} s{pk}")
        if st["importtime"]:
            top = [(k, v) for k, v in st["importtime"]["packages"].items() if v >= 0.02][:12]
            print("  import cost by package (-X importtime, cumulative, nested packages overlap): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in top))
    mem = results.get("memory")
    if mem:
        print("-" * 110)
        e = mem["epochs"]
        i2, i10 = min(1, len(e) - 1), len(e) - 1
        drift = e[i10]["rss_kb"] / e[i2]["rss_kb"] - 1
        print(f"memory, template over {len(e)} epochs of {mem['batches']} batches: RSS after epoch {e[i2]['epoch']} "
              f"{e[i2]['rss_kb'] / 1024:.1f} MiB, after epoch {e[i10]['epoch']} {e[i10]['rss_kb'] / 1024:.1f} MiB: "
              f"{drift * 100:+.2f}%   target within {TARGETS['drift'] * 100:.0f}%: "
              f"{'PASS' if abs(drift) <= TARGETS['drift'] else 'FAIL'}")
        print("  RSS per epoch (MiB): " + " ".join(f"{x['rss_kb'] / 1024:.0f}" for x in e)
              + f"; Python objects: {e[i2]['python_objects']} -> {e[i10]['python_objects']}; "
              f"peak {mem['done']['maxrss_kb'] / 1024:.0f} MiB")
    print("=" * 110)


def startup_breakdown(runs):
    """Median seconds per phase over the runs, in the order of the first run; glue spans are summed."""
    merged = {}
    order = []
    for run in runs:
        seen = {}
        python = ("python interpreter start-up (to the probe's first line)", run["python_startup_s"], [])
        for label, seconds, packages in [python] + [(s["phase"], s["s"], s["new_packages"]) for s in run["spans"]]:
            if label.startswith("(") or label in ("probe set-up",):
                label = "other (glue between steps, probe set-up)"
            entry = seen.setdefault(label, [0.0, set()])
            entry[0] += seconds
            entry[1].update(p for p in packages if not p.startswith("_") and p not in sys.stdlib_module_names)
        for label, (seconds, packages) in seen.items():
            if label not in merged:
                merged[label] = ([], set())
                order.append(label)
            merged[label][0].append(seconds)
            merged[label][1].update(packages)
    rows = []
    for label in order:
        seconds = median(merged[label][0])
        if seconds >= 0.005:
            rows.append((label, seconds, sorted(merged[label][1], key=str.lower)))
    counters = {}
    for run in runs:
        for key, value in run.get("counters", {}).items():
            counters.setdefault(key, []).append(value)
    for key, values in counters.items():
        rows.append((f"  of which {key}, {values[0]['n']} calls", median([v["s"] for v in values]), []))
    return rows


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="config.json", help="the config both loops are built from")
    parser.add_argument("--model", choices=sorted(MODELS), default="convnet")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--pairs", type=int, default=3,
                        help="fresh plain/template worker pairs; a process's speed varies by a few per cent from "
                             "one start to the next, which more pairs average out (default 3)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="timed repeats per pair, after the warm-up (default 2: 6 repeats in all)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per repeat (default 1)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up epochs per loop (default 1)")
    parser.add_argument("--chunk", type=int,
                        help="the two loops take turns every CHUNK training batches (0: whole epochs; default 8, "
                             "resnet18: 2)")
    parser.add_argument("--train-batches", type=int, help="training batches per epoch (default: all; resnet18: 6)")
    parser.add_argument("--val-batches", type=int, help="validation batches per pass (default: all; resnet18: 2)")
    parser.add_argument("--threads", type=int,
                        help="torch.set_num_threads in the training and loader workers; 0: torch's default (the core "
                             "count). Default: 1 on the CPU (two OpenMP threads on a shared 2-core machine make "
                             "timings swing 5x), 0 on CUDA")
    parser.add_argument("--malloc-default", action="store_true",
                        help="run the throughput and loader workers with glibc's default, self-adjusting mmap "
                             "threshold instead of fixed thresholds (see malloc_env)")
    parser.add_argument("--startup-repeats", type=int, default=3)
    parser.add_argument("--drift-epochs", type=int, default=10)
    parser.add_argument("--drift-batches", type=int, help="batches per epoch of the memory run (default 10)")
    parser.add_argument("--loader-epochs", type=int, default=3, help="timed passes per loader variant")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(PHASES)} (default: the model's set)")
    parser.add_argument("-o", "--override", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="extra config override for every run (as train.py -o)")
    parser.add_argument("--no-tty", action="store_true", help="workers write to pipes (no progress bar)")
    parser.add_argument("--json", help="also write every measurement to this JSON file")
    parser.add_argument("--aa", action="store_true",
                        help="A/A check of the harness: both columns run the plain loop (ratios should be ~1.00)")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        WORKERS[args.worker](json.loads(args.spec))
        return 0
    if args.threads is None:
        args.threads = 0 if args.device.startswith("cuda") else 1
    model = args.model
    phases = args.only.split(",") if args.only else MODELS[model]["phases"]
    unknown = set(phases) - set(PHASES)
    if unknown:
        raise SystemExit(f"--only: unknown phase(s) {', '.join(sorted(unknown))}; choose from {', '.join(PHASES)}")
    started = time.perf_counter()
    load_start = load_text()
    print(f"benchmark: model {model}, device {args.device}, phases {', '.join(phases)}; {load_start}", flush=True)
    results = {}
    try:
        run_phases(args, model, phases, results)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    report(args, model, results, load_start, started)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1, default=str))
    return 0


def run_phases(args, model, phases, results):
    with tempfile.TemporaryDirectory(prefix="template-bench-") as scratch:
        scratch = Path(scratch)
        for phase in PHASES:
            if phase not in phases:
                continue
            print(f"== {phase} ({load_text()})", flush=True)
            t = time.perf_counter()
            if phase == "startup":
                results["startup"] = phase_startup(args, model, scratch)
            elif phase == "loader":
                results["loader"] = phase_loader(args, model, scratch)
            elif phase == "throughput":
                raw = phase_throughput(args, model, scratch)
                results["throughput"] = {"raw": raw, "summary": summarise_throughput(raw)}
            elif phase == "memory":
                results["memory"] = phase_memory(args, model, scratch)
            print(f"   ({time.perf_counter() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
