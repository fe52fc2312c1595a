"""Small helpers shared by train.py, test.py and the trainer: errors, JSON files, seeding, devices, run folders."""
import argparse
import contextlib
import ctypes
import difflib
import json
import os
import random
import re
import shutil
import sys
import tempfile
import traceback
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from utils.files import open_regular
from utils.withheld import shown


class UserError(Exception):
    """A mistake in the user's config, command line or files: reported as one line, exit code 2, no traceback."""


class Outcome(int):
    """A command's exit status that also carries what it made (`run_dir` of train.py, `out` and `files` of test.py),
    so a script can chain commands: `run_dir = train.main([...]).run_dir`. What it did not make is None."""

    def __new__(cls, code, **made):
        outcome = super().__new__(cls, code)
        outcome.__dict__.update(made)
        return outcome

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return None


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes are one `error:` line and a pointer to --help, exit code 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def quiet_handover_errors():
    """Silence the traceback multiprocessing's resource-sharer thread prints when a DataLoader worker dies while
    handing a batch over: the main thread then reports the dead worker in one line."""
    previous = sys.excepthook
    if getattr(previous, "quiet_handover", False):
        return

    def hook(kind, value, tb):
        frames = traceback.extract_tb(tb)
        from_sharer = bool(frames) and Path(frames[0].filename).name == "resource_sharer.py"
        if not (from_sharer and issubclass(kind, (ConnectionError, EOFError))):
            previous(kind, value, tb)

    hook.quiet_handover = True
    sys.excepthook = hook


def worker_died(error):
    """Whether `error` means a DataLoader worker process died (the OOM killer, say). An exception raised by the
    dataset's own code arrives as "Caught ... in DataLoader worker ..." instead, and is not one."""
    if isinstance(error, RuntimeError):
        return str(error).startswith("DataLoader worker (pid")
    frames = traceback.extract_tb(error.__traceback__)
    # a batch whose sender died arrives as a broken connection inside multiprocessing
    return isinstance(error, (ConnectionError, EOFError)) and bool(frames) and (
        Path(frames[-1].filename).parent.name == "multiprocessing")


def error_line(error):
    """A UserError as the one line the scripts print. One raised in a DataLoader worker arrives wrapped in that
    worker's traceback: its last line is the message."""
    text = str(error).strip()
    if "Traceback" in text:
        text = text.splitlines()[-1].split("UserError: ", 1)[-1]
    return printable("error: " + shown(" ".join(text.split())))


def printable(line):
    """A line with every character a terminal would act on (escape sequences, NUL, a byte-order mark) written as
    its escape, so text from a file can neither hide nor forge what is printed around it."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in line)


def fault_line(error):
    """An OSError (a full disk, a read-only folder), a RecursionError or a MemoryError as the one line the scripts
    print: what failed and on which file, never a traceback."""
    if isinstance(error, MemoryError):
        return "error: out of memory (MemoryError); try a smaller data_loader.args.batch_size or fewer images"
    if isinstance(error, RecursionError):
        return "error: an input is nested too deeply to process (RecursionError)"
    reason = error.strerror or first_line(error)
    where = f" on {str(error.filename)!r}" if error.filename else ""
    hint = "; free some space or point trainer.save_dir, --out or TMPDIR elsewhere" if error.errno == 28 else ""
    return printable(shown(f"error: {reason}{where}{hint}"))


def first_line(error):
    """An exception as one line: its type and first line, or the original last line of one raised in a worker."""
    text = str(error).strip()
    if "Original Traceback" in text:
        return text.splitlines()[-1]
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def listed(names, most=20):
    """Names joined by commas for a message, at most `most` of them: a file of 40,000 columns stays one short line."""
    names = [str(name) for name in names]
    more = f", ... ({len(names):,} in all)" if len(names) > most else ""
    return ", ".join(names[:most]) + more


def did_you_mean(name, candidates):
    """"; did you mean 'x'?" for close matches of a misspelt name, else ""."""
    close = difflib.get_close_matches(str(name), list(candidates), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def read_json(path):
    """A JSON file as Python values; a repeated key, NaN or Infinity is refused rather than silently taken."""
    path = Path(path)
    try:
        with open_regular(path, "r", encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    if nesting_depth_over(text, MAX_NESTING):
        raise UserError(f"{path}: nested more than {MAX_NESTING} levels deep")
    try:
        return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}:{e.colno}: malformed JSON: {e.msg}") from None
    except ValueError as e:
        raise UserError(f"{path}: {e}") from None


MAX_NESTING = 100  # levels of objects and lists in a config or a checkpoint; real ones use fewer than 10


def nesting_depth_over(text, limit):
    """Whether JSON text opens more than `limit` brackets at once (counted outside strings, without parsing)."""
    opening = re.sub(r'"(?:[^"\\]|\\.)*"', "", text)
    depth = deepest = 0
    for char in re.findall(r"[\[\]{}]", opening):
        depth += 1 if char in "[{" else -1
        deepest = max(deepest, depth)
        if deepest > limit:
            return True
    return False


def _unique_keys(pairs):
    result = dict(pairs)
    if len(result) < len(pairs):
        seen = set()
        repeated = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"the key {repeated!r} appears twice in one object")
    return result


def _no_constant(name):
    raise ValueError(f"{name} is not a JSON number")


def write_json(content, path):
    write_text(json.dumps(content, indent=4) + "\n", path)


def write_text(text, path):
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write(path, write):
    """Create `path` through `write(tmp)` on a temporary name beside it, flushed to disk, then renamed: a reader or
    a crash sees the old file or the new one, never part of one. Concurrent writers of one path are safe."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


@contextlib.contextmanager
def no_new_folders_on_failure(path):
    """Remove the folders on the way to `path` that a failing block created and left empty (a failed download's)."""
    path = Path(path)
    created = [p for p in (path, *path.parents) if not p.exists()]
    try:
        yield
    except BaseException:
        for folder in created:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


@contextlib.contextmanager
def offline(what, allow=()):
    """Refuse every connection to another machine inside the block, naming `what` asked for it: reading data that
    came from elsewhere never reaches the network. Local (Unix) sockets, which DataLoader workers use, stay open, and
    so do the hosts in `allow` (the servers the user named, such as a tracker's)."""
    import socket

    allowed = set(allow)

    def refuse(host, *_, **__):
        raise UserError(f"{what} would reach the network ({str(host)[:100]}); give what it needs as local files")

    def resolve(host, *args, **kwargs):
        if host not in allowed:
            refuse(host)
        found = saved[0](host, *args, **kwargs)
        allowed.update(entry[4][0] for entry in found)
        return found

    def guarded(connect):
        def connect_local(sock, address):
            if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in allowed:
                refuse(address[0])
            return connect(sock, address)
        return connect_local

    saved = socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex
    socket.getaddrinfo = resolve
    socket.socket.connect, socket.socket.connect_ex = guarded(saved[1]), guarded(saved[2])
    try:
        yield
    finally:
        socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex = saved


def link_or_copy(source, tmp):
    """Make `tmp` a hard link to `source` (a copy where the file system has none): for `atomic_write`."""
    os.unlink(tmp)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)


def epoch_seed(seed, epoch):
    """The seed of one epoch of a run: its data order, sample seeds and the training loop's random state."""
    return seed + 1_000_003 * epoch


def steady_allocator():
    """Fix glibc's malloc thresholds for this process (and its DataLoader workers) unless the environment sets them.
    glibc otherwise adapts them to the allocation history, which decides whether each step's large tensors reuse
    heap memory or take fresh pages from the kernel: the same loop then runs at different speeds from run to run
    (docs/measured.md)."""
    if sys.platform != "linux" or any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl, say): nothing to fix
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 32 * 2**20)  # glibc's largest: tensors below it come from the heap and are reused
    mallopt(m_trim_threshold, 2**30)  # freed heap memory is kept for the next step instead of returned


def seed_everything(seed, deterministic=False):
    """Seed Python, NumPy and torch; `deterministic` also asks torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def get_rng_state():
    """Every random generator the training loop may draw from, in a form `weights_only` loading accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(_as_tuples(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


def _as_tuples(value):
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def resolve_device(requested, n_gpu, logger):
    """The torch device to train on: `requested` (from --device) wins, else CUDA when n_gpu > 0 and present."""
    if requested is None:
        if n_gpu > 0 and torch.cuda.is_available():
            return torch.device("cuda")
        if n_gpu > 0:
            logger.info("n_gpu is %d but no CUDA device is available: using the CPU", n_gpu)
        return torch.device("cpu")
    name = f"cuda:{requested}" if requested.isdigit() else requested
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {requested!r}: expected cpu, cuda, cuda:N or a GPU index N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count or count == 0:
            raise UserError(f"--device {requested!r}: this machine has {count} CUDA device(s)")
    elif device.type != "cpu":
        raise UserError(f"--device {requested!r}: expected cpu, cuda, cuda:N or a GPU index N")
    return device


def new_run_dir(save_dir, name):
    """An unused folder name save_dir/name/<month-day_time>[_n] for a new run; created by create_run_dir."""
    parent = Path(save_dir) / name
    stamp = datetime.now().strftime("%m%d_%H%M%S")
    return next(parent / (stamp if n == 0 else f"{stamp}_{n}") for n in range(10**6)
                if not (parent / (stamp if n == 0 else f"{stamp}_{n}")).exists())


def create_run_dir(run_dir, continuing):
    """Create the run folder once everything is built and checked, and hold it for this process: a new run takes
    the next free name if another run took this one meanwhile; a run folder another process trains in is refused.
    Returns the folder."""
    first = run_dir
    for n in range(1, 10**6):
        try:
            run_dir.mkdir(parents=True, exist_ok=continuing)
            break
        except FileExistsError:
            run_dir = first.with_name(f"{first.name}_{n}")
        except OSError as e:
            raise UserError(f"trainer.save_dir: cannot create {str(run_dir)!r} ({e.strerror})") from None
    hold_folder(run_dir)
    for stale in run_dir.glob("*.tmp"):  # a save cut short by a kill; no other process writes here
        stale.unlink()
    return run_dir


_held = {}  # folder -> open descriptor holding its lock


def hold_folder(folder):
    """An exclusive lock on `folder` while this process trains in it (released by release_folders, or when the
    process exits, however it exits)."""
    import fcntl

    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"run folder {str(folder)!r} is in use: another process is training in it") from None
    _held[folder] = fd


def release_folders():
    while _held:
        os.close(_held.popitem()[1])
