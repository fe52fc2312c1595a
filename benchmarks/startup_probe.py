"""Start-up probe: `python train.py ARGS` from process start to the first training batch, phase by phase.

Run by benchmarks/benchmark.py as `python -m benchmarks.startup_probe ARGS` with BENCH_SPAWN_TIME (the parent's
time.time() just before it started this process) and BENCH_PROBE_OUT (where to write the JSON result). It imports
what train.py imports, in the same order, wraps train.main's steps with timers (nothing in the project is
edited), and exits the moment the model receives its first training batch.

Only the standard library is imported before the clock's first reading, so "python start-up" is the interpreter
alone, and each import is charged to the phase that first needs it.
"""
import time

_T0_WALL = time.time()
_T0 = time.perf_counter()

import functools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

GLUE = "(between steps)"


class Timeline:
    """Consecutive spans; each records the top-level packages first imported during it."""

    def __init__(self):
        self.last = _T0
        self.known = set(sys.modules)
        self.spans = []
        self.counters = {}

    def mark(self, label):
        now = time.perf_counter()
        current = set(sys.modules)
        new = sorted({name.split(".")[0] for name in current - self.known})
        self.known = current
        self.spans.append({"phase": label, "s": now - self.last, "new_packages": new})
        self.last = now

    def count(self, key, seconds):
        total, n = self.counters.get(key, (0.0, 0))
        self.counters[key] = (total + seconds, n + 1)


TL = Timeline()


def _wrap(owner, name, label):
    """Replace owner.name with a timed version; `label` is a string or a function of the call's arguments."""
    original = getattr(owner, name, None)
    if original is None:
        return

    @functools.wraps(original)
    def timed(*args, **kwargs):
        TL.mark(GLUE)
        try:
            return original(*args, **kwargs)
        finally:
            TL.mark(label(*args, **kwargs) if callable(label) else label)

    setattr(owner, name, timed)


def _accumulate(owner, name, key):
    """Add the time spent in owner.name to a counter (for steps inside a wrapped step, e.g. image decoding)."""
    original = getattr(owner, name, None)
    if original is None or getattr(original, "_probe_counted", False):
        return

    @functools.wraps(original)
    def counted(*args, **kwargs):
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            TL.count(key, time.perf_counter() - started)

    counted._probe_counted = True
    setattr(owner, name, counted)


def _finish(status, rc=None):
    spawn = float(os.environ.get("BENCH_SPAWN_TIME", _T0_WALL))
    end_wall = _T0_WALL + (time.perf_counter() - _T0)
    result = {
        "status": status,
        "rc": rc,
        "python_startup_s": _T0_WALL - spawn,
        "total_s": end_wall - spawn,
        "spans": TL.spans,
        "counters": {k: {"s": s, "n": n} for k, (s, n) in TL.counters.items()},
    }
    path = os.environ.get("BENCH_PROBE_OUT")
    if path:
        with open(path, "w") as f:
            json.dump(result, f)
    else:
        print(json.dumps(result, indent=1))


def main(argv):
    import torch  # noqa: F401  (the first heavy import of train.py)

    TL.mark("import torch")
    import train

    TL.mark("import train.py (project modules, numpy, ...)")
    from trainer import trainer as trainer_module

    def on_build(section):
        if section == "data_loader":
            datasets = sys.modules.get("data_loader.datasets")
            if datasets is not None:
                _accumulate(datasets.CsvImageDataset, "read", "decode one image (CsvImageDataset.read)")
                _accumulate(datasets, "read_csv", "read a CSV")
        return f"build {section}"

    for name in ("load_config", "validate", "resolve_device", "seed_everything", "build_loss", "build_metrics",
                 "build_scheduler", "choose_run_dir", "save_run_config", "load_checkpoint", "setup_logging",
                 "add_log_file"):
        _wrap(train, name, name)
    original_build = getattr(train, "build", None)
    if original_build is not None:
        def build(config, section, *args, **kwargs):
            TL.mark(GLUE)
            label = on_build(section)
            try:
                return original_build(config, section, *args, **kwargs)
            finally:
                TL.mark(label)

        train.build = build
    Trainer = trainer_module.Trainer
    visualization = sys.modules.get("logger.visualization")
    if visualization is not None:
        _wrap(visualization.TensorboardWriter, "__init__", "TensorBoard writer (import + event file)")
    _wrap(Trainer, "__init__", "Trainer.__init__ (rest)")
    _wrap(Trainer, "train", "train() returned")  # only reached if no batch was ever trained

    original_init = Trainer.__init__

    @functools.wraps(original_init)
    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)

        def first_batch(module, inputs):
            TL.mark("Trainer.train() until the first batch reaches the model")
            _finish("first batch")
            sys.stdout.flush()
            os._exit(0)

        self.model.register_forward_pre_hook(first_batch)

    Trainer.__init__ = init
    TL.mark("probe set-up")
    rc = train.main(argv)
    _finish("no training batch", rc)
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
