"""A dataset's decoded images, kept once per machine: one file of pixels that every process maps into memory.

Whether to keep them is decided up front from their decoded size and the memory available. They are decoded in
parallel and appended to the file as they come, so they are never held twice; the DataLoader workers and every
`torchrun` process of the machine then share the file's pages instead of holding copies.
"""
import collections
import hashlib
import logging
import multiprocessing
import os
import sys
import tempfile
import uuid
import weakref
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from data_loader.images import read_image
from utils import dist
from utils.util import atomic_write, link_or_copy

MEMORY_SHARE = 0.5  # of the memory available, the most that decoded images may take
CHUNK = 64  # images a decoding process reads per task
PARALLEL_FROM = 1024  # images: below this, decoding in this process is quicker than starting others


class DecodedImages:
    """Images stored back to back in one 1-D tensor (usually a memory-mapped file), with their shapes."""

    def __init__(self, block, shapes):
        self.block = block
        self.shapes = shapes
        sizes = [c * h * w for c, h, w in shapes.tolist()]
        self.views = [part.view(shape) for part, shape in zip(block.split(sizes), shapes.tolist())]

    def __len__(self):
        return len(self.views)

    def __getitem__(self, index):
        return self.views[index]

    def stacked(self):
        """All images as one (N, C, H, W) view of the block when they share one shape, else None."""
        if not len(self) or not bool((self.shapes == self.shapes[0]).all()):
            return None
        return self.block.view(len(self), *self.shapes[0].tolist())


class ImageCache:
    """Finds, builds and keeps the decoded images of `paths` (read in `mode`), in `cache_dir` when given.

    A file built for `cache_dir` becomes visible there only through `commit()`, once a run has passed its checks
    (under torchrun, where the other processes wait for it, at once)."""

    def __init__(self, paths, mode, cache_dir, name):
        self.paths, self.mode = paths, mode
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        place = hashlib.sha256(f"{Path(paths[0]).parent.resolve() if paths else ''}|{mode}".encode()).hexdigest()
        self.name = f"{name}-{mode}-{place[:16]}"
        self.pending = None  # (data file, index contents) built for cache_dir, not yet committed

    def images(self, signature):
        """The decoded images, or None when they would take too much memory (then read the files every epoch)."""
        shared_run = dist.is_distributed() and self.cache_dir is not None
        if shared_run and dist.local_rank() != 0:
            dist.barrier()  # local rank 0 builds and commits the file
            return self.load(signature) or self.build(signature)
        found = self.load(signature) if self.cache_dir is not None else None
        images = found or self.build(signature)
        if shared_run:
            self.commit()
            dist.barrier()
        return images

    def load(self, signature):
        index = self.cache_dir / f"{self.name}.pt"
        if not index.is_file():
            return None
        try:
            if not zipfile.is_zipfile(index):
                raise ValueError("not a file written by torch.save, or a truncated one")
            saved = torch.load(index, weights_only=True)
            if saved["signature"] != signature:
                return None
            images = map_images(self.cache_dir / saved["data"], saved["shapes"], getattr(torch, saved["dtype"]))
        except Exception as e:  # an unreadable cache is rebuilt, never trusted
            warn(f"decoded-image cache {index}: unreadable ({str(e).splitlines()[0] or type(e).__name__}); "
                 f"decoding again")
            return None
        log(f"decoded images: {len(images):,} ({human(images.block.nbytes)}) memory-mapped from {index.parent}")
        return images

    def build(self, signature):
        """Decode every image into a new file and map it; None when they would not fit in memory."""
        first = read_image(self.paths[0], self.mode) if self.paths else torch.empty(0, dtype=torch.uint8)
        estimate = first.nbytes * len(self.paths)
        copies = 1 if self.cache_dir is not None else dist.local_world_size()
        budget = MEMORY_SHARE * memory_available() / copies
        if estimate > budget:
            log(f"decoded images: about {human(estimate)} for {len(self.paths):,} images like the first "
                f"({'x'.join(map(str, first.shape))}), more than {MEMORY_SHARE:.0%} of the memory available to "
                f"{copies} process(es): the image files are read every epoch instead")
            return None
        folder = self.cache_dir if self.cache_dir is not None and self.cache_dir.is_dir() else None
        fd, data = tempfile.mkstemp(dir=folder, prefix=f"{self.name}.", suffix=".partial")
        try:
            with os.fdopen(fd, "wb") as f:
                shapes, dtype = decode_all(self.paths, self.mode, f)
            if dtype is None:
                warn("decoded-image cache: not kept (the images have different sample types)")
                return None
            images = map_images(data, shapes, dtype)
        finally:
            if self.cache_dir is None:
                os.unlink(data)  # the mapping stays valid; nothing is left on disk
        if self.cache_dir is not None:
            self.pending = (Path(data), {"signature": signature, "shapes": shapes, "dtype": str(dtype).split(".")[-1]})
            weakref.finalize(self, Path(data).unlink, missing_ok=True)  # a run that never began leaves nothing
        log(f"decoded images: {len(images):,} ({human(images.block.nbytes)}) decoded")
        return images

    def commit(self):
        """Make a built file the cache of cache_dir: the data under a new name, then the index that names it."""
        if self.pending is None:
            return
        data, contents = self.pending
        self.pending = None
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            target = self.cache_dir / f"{self.name}-{uuid.uuid4().hex[:12]}.u8"
            atomic_write(target, lambda tmp: link_or_copy(data, tmp))
            atomic_write(self.cache_dir / f"{self.name}.pt", lambda tmp: torch.save({**contents, "data": target.name},
                                                                                 tmp))
            for old in self.cache_dir.glob(f"{self.name}-*.u8"):
                if old != target:
                    old.unlink(missing_ok=True)  # a process still mapping it keeps its pages
            log(f"decoded images kept for later runs in {self.cache_dir}")
        except OSError as e:
            warn(f"decoded-image cache {self.cache_dir}: not written ({e.strerror or e})")
        finally:
            Path(data).unlink(missing_ok=True)


def decode_all(paths, mode, out):
    """Decode `paths` in order (in parallel for many), appending each image's pixels to the open file `out`;
    returns their shapes (N, 3) and common dtype (None when they differ)."""
    chunks = [paths[i:i + CHUNK] for i in range(0, len(paths), CHUNK)]
    shapes, dtypes = [], set()
    for batch in decoded_chunks(chunks, mode):
        for image in batch:
            shapes.append(list(image.shape))
            dtypes.add(image.dtype)
            out.write(memoryview(image.contiguous().numpy()).cast("B"))
    return torch.tensor(shapes, dtype=torch.int64).view(-1, 3), (dtypes.pop() if len(dtypes) == 1 else None)


def decoded_chunks(chunks, mode):
    """The decoded images of each chunk, in order; several processes decode when there are many."""
    workers = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 8)
    if sys.platform != "linux" or workers < 2 or sum(map(len, chunks)) < PARALLEL_FROM:
        yield from (decode_chunk(chunk, mode) for chunk in chunks)
        return
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        window = collections.deque()  # a few chunks ahead of the one written, never the whole set
        for chunk in chunks:
            window.append(pool.submit(decode_chunk, chunk, mode))
            if len(window) > 2 * workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def decode_chunk(paths, mode):
    return [read_image(path, mode) for path in paths]


def map_images(path, shapes, dtype):
    """The pixels in `path` as DecodedImages, mapped privately (shared pages, never written back)."""
    count = int(shapes.prod(dim=1).sum()) if len(shapes) else 0
    if Path(path).stat().st_size != count * dtype.itemsize:
        raise ValueError(f"{path} holds {Path(path).stat().st_size} bytes, expected {count * dtype.itemsize}")
    block = torch.from_file(str(path), shared=False, size=count, dtype=dtype) if count else torch.empty(0, dtype=dtype)
    return DecodedImages(block, shapes)


def memory_available():
    """Bytes of memory the kernel could give this machine's processes now (MemAvailable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def human(n_bytes):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n_bytes < 1024 or unit == "GiB":
            return f"{n_bytes:.1f} {unit}" if unit != "B" else f"{n_bytes} B"
        n_bytes /= 1024


def log(message):
    logging.getLogger("template").info(message)


def warn(message):
    logging.getLogger("template").warning(message)
