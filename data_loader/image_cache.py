"""A dataset's decoded images, kept once per machine: one file of pixels that every process maps into memory.

Whether to keep them is decided up front from their decoded size and the memory available. A set that decodes
quickly is decoded before training, in parallel, each image appended to the file as it comes (never held twice),
which also surfaces a missing or corrupt image before anything is written. A set whose decoding would keep the
first batch waiting is decoded as its images are first read instead: each into its own slot of a file created at
full size, mapped shared so that what a DataLoader worker or another `torchrun` process decodes serves them all; once
every image is in, the file is kept in `cache_dir` like one decoded up front. Either way the processes of a machine
share the file's pages instead of holding copies.

A kept file is data like the images: its index holds a SHA-256 digest of its bytes, checked when a later run maps it,
and a few of its images are decoded again and compared, so a cache that does not hold the pixels (or shapes and
sample type) of the files it stands for is decoded again, with a warning, never used.
"""
import atexit
import collections
import glob
import hashlib
import logging
import math
import multiprocessing
import os
import sys
import tempfile
import time
import uuid
import weakref
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from data_loader.images import MAX_PIXELS, read_image
from utils import dist
from utils.util import atomic_write, link_or_copy

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, so files left by a killed run stay
    fcntl = None

MEMORY_SHARE = 0.5  # of the memory available, the most that decoded images may take
CHUNK = 64  # images a decoding process reads per task
PARALLEL_FROM = 1024  # images: below this, decoding in this process is quicker than starting others
UPFRONT_SECONDS = 2.0  # estimated decoding time above which images are decoded as first read instead of up front
PROBE = 3  # images timed to estimate the decoding time
CHECKED = 3  # images of a kept cache decoded again and compared when it is loaded
EMPTY, FILLED, OTHER = 0, 1, 2  # a slot of a filling file: not read yet, holding its image, or its image does not fit


class DecodedImages:
    """Images stored back to back in one 1-D tensor (usually a memory-mapped file), with their shapes."""

    def __init__(self, block, shapes):
        self.block = block
        self.shapes = shapes
        sizes = [c * h * w for c, h, w in shapes.tolist()]
        self.views = [part.view(shape) for part, shape in zip(block.split(sizes), shapes.tolist())]
        same = len(self) and bool((shapes == shapes[0]).all())
        self.batched = block.view(len(self), *shapes[0].tolist()) if same else None

    def __len__(self):
        return len(self.views)

    def __getitem__(self, index):
        return self.views[index]

    def get(self, index, read):
        return self.views[index]

    def stacked(self):
        """All images as one (N, C, H, W) view of the block when they share one shape, else None."""
        return self.batched


class FillingImages:
    """Images decoded when first read (through `read(index)`), each into its slot of a file that every process of
    the machine maps shared, with a byte per image saying whether its slot holds it. A slot is written (through the
    file: quicker than through the mapping, whose every new page would fault) before its byte, so a process that
    sees the byte set sees the pixels. An image of another shape or type than the slots is returned as decoded and
    read from its file every time."""

    def __init__(self, data, flags, count, shape, dtype):
        self.data, self.flags_file = Path(data), Path(flags)
        self.shape, self.dtype = tuple(shape), dtype
        size = count * math.prod(self.shape)
        self.slots = torch.from_file(str(data), shared=True, size=size, dtype=dtype).view(count, *self.shape)
        self.slot_bytes = size // count * dtype.itemsize
        self.fd = os.open(data, os.O_RDWR)
        weakref.finalize(self, os.close, self.fd)
        self.flags_tensor = torch.from_file(str(flags), shared=True, size=count, dtype=torch.uint8)
        self.flags = self.flags_tensor.numpy()  # indexed once per sample: quicker than a tensor
        self.complete = False

    def handle(self):
        """What another process of the machine needs to map the same files (`FillingImages(*handle)`)."""
        return str(self.data), str(self.flags_file), len(self), self.shape, self.dtype

    def __len__(self):
        return len(self.slots)

    def get(self, index, read):
        if self.flags[index] == FILLED:
            return self.slots[index]
        image = read(index)
        if self.flags[index] == EMPTY:
            if image.shape != self.shape or image.dtype != self.dtype:
                self.flags[index] = OTHER
            elif self.write(index, image):
                self.flags[index] = FILLED
        return image

    def write(self, index, image):
        """Whether `image` went into its slot (a failed write leaves it to be read from its file again)."""
        try:
            return os.pwrite(self.fd, pixel_bytes(image), index * self.slot_bytes) == self.slot_bytes
        except OSError:
            return False

    def stacked(self):
        """All images as one (N, C, H, W) view of the slots once every slot holds its image, else None."""
        if not self.complete:
            self.complete = bool((self.flags == FILLED).all())
        return self.slots if self.complete else None


class ImageCache:
    """Finds, builds and keeps the decoded images of `paths` (read in `mode`), in `cache_dir` when given.

    A file built for `cache_dir` becomes visible there only through `commit()`, once a run has passed its checks
    (under torchrun, where the other processes wait for it, at once); a file being filled, once it is complete."""

    def __init__(self, paths, mode, cache_dir, name, max_pixels=MAX_PIXELS):
        self.paths, self.mode, self.max_pixels = paths, mode, max_pixels
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        place = hashlib.sha256(f"{Path(paths[0]).parent.resolve() if paths else ''}|{mode}".encode()).hexdigest()
        self.name = f"{name}-{mode}-{place[:16]}"
        self.pending = None  # (data file, index contents) built for cache_dir, not yet committed
        self.filling = None  # (FillingImages, index contents) being filled for cache_dir
        self.approved = False  # whether this process may write to cache_dir (the run has passed its checks)
        self.scratch = []  # files to unlink once every process of the machine has mapped them

    def images(self, signature):
        """The decoded images (DecodedImages or FillingImages), or None when they would take too much memory (then
        read the files every epoch). Under torchrun, local rank 0 finds or builds them and the machine's other
        processes follow its choice: they map the same file."""
        if not dist.is_distributed():
            images = self.open(signature)
        elif dist.local_rank() == 0:
            images = self.open(signature)
            self.commit()  # the others wait for a decoded file; a filling one is kept once complete
            from_machine_leader(plan(images))
        else:
            images = self.follow(from_machine_leader(None), signature)
        dist.barrier()
        for path in self.scratch:
            path.unlink(missing_ok=True)  # the mappings stay valid
        self.scratch = []
        return images

    def open(self, signature):
        return (self.load(signature) if self.cache_dir is not None else None) or self.build(signature)

    def follow(self, leader_plan, signature):
        """The images local rank 0 chose (`plan`): its file being filled, none, or a decoded file of one's own."""
        kind, handle = leader_plan
        if kind == "fill":
            return FillingImages(*handle)
        if kind == "none":
            return None
        return (self.load(signature) if self.cache_dir is not None else None) or self.build(signature, may_fill=False)

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
            self.verify(images, saved.get("digest"))
        except Exception as e:  # an unreadable cache is rebuilt, never trusted
            warn(f"decoded-image cache {index}: unreadable ({str(e).splitlines()[0] or type(e).__name__}); "
                 f"decoding again")
            return None
        log(f"decoded images: {len(images):,} ({human(images.block.nbytes)}) memory-mapped from {index.parent}")
        return images

    def verify(self, images, digest):
        """ValueError unless the mapped pixels have the digest the index recorded, every image is within max_pixels,
        and the first, middle and last images decode to the pixels, shape and type the cache holds for them."""
        if digest != block_digest(images.block):
            raise ValueError("its pixels do not match the digest recorded when it was written")
        if len(images) and int((images.shapes[:, 1] * images.shapes[:, 2]).max()) > self.max_pixels:
            raise ValueError(f"it holds images of more than {self.max_pixels:,} pixels")
        for i in sorted({0, len(images) // 2, len(images) - 1} if len(images) else ())[:CHECKED]:
            image = read_image(self.paths[i], self.mode, max_pixels=self.max_pixels)
            if image.dtype != images[i].dtype or image.shape != images[i].shape or not torch.equal(image, images[i]):
                raise ValueError(f"it does not hold the pixels of {self.paths[i]}")

    def build(self, signature, may_fill=True):
        """Decode the images into a new file, up front or as they are first read; None when they would not fit in
        memory."""
        first = read_image(self.paths[0], self.mode, max_pixels=self.max_pixels) if self.paths else \
            torch.empty(0, dtype=torch.uint8)
        seconds = upfront_seconds(self.paths, self.mode, self.max_pixels) if may_fill and workers_inherit_mappings() \
            else 0.0
        fill = seconds > UPFRONT_SECONDS
        estimate = first.nbytes * len(self.paths)
        copies = 1 if fill or self.cache_dir is not None else dist.local_world_size()
        budget = MEMORY_SHARE * memory_available() / copies
        if estimate > budget:
            log(f"decoded images: about {human(estimate)} for {len(self.paths):,} images like the first "
                f"({'x'.join(map(str, first.shape))}), more than {MEMORY_SHARE:.0%} of the memory available to "
                f"{copies} process(es): the image files are read every epoch instead")
            return None
        return self.fill(signature, first, seconds) if fill else self.decode(signature)

    def decode(self, signature):
        """Decode every image now into a new file and map it."""
        data = self.new_data_file(0)
        try:
            with open(data, "r+b") as f:
                shapes, dtype = decode_all(self.paths, self.mode, self.max_pixels, f)
            if dtype is None:
                warn("decoded-image cache: not kept (the images have different sample types)")
                return None
            images = map_images(data, shapes, dtype)
        finally:
            if self.cache_dir is None:
                os.unlink(data)  # the mapping stays valid; nothing is left on disk
        if self.cache_dir is not None:
            self.pending = (Path(data), contents(signature, shapes, dtype))
        log(f"decoded images: {len(images):,} ({human(images.block.nbytes)}) decoded")
        return images

    def fill(self, signature, first, seconds):
        """A file with a slot of the first image's shape per image, filled as they are read; None when the disk
        has no room for it."""
        count = len(self.paths)
        try:
            data = self.new_data_file(first.nbytes * count)
        except OSError as e:
            warn(f"decoded-image cache: no room for {human(first.nbytes * count)} in {self.folder() or 'the temporary'}"
                 f" folder ({e.strerror or e}): the image files are read every epoch instead")
            return None
        fd, flags = tempfile.mkstemp(prefix=f"{self.name}.", suffix=".filled")
        os.ftruncate(fd, count)
        os.close(fd)
        images = FillingImages(data, flags, count, first.shape, first.dtype)
        images.get(0, lambda index: first)
        self.scratch.append(Path(flags))
        if self.cache_dir is None:
            self.scratch.append(Path(data))
        else:
            shapes = torch.tensor([list(first.shape)] * count, dtype=torch.int64).view(-1, 3)
            self.filling = (images, contents(signature, shapes, first.dtype))
            atexit.register(settle_at_exit, weakref.ref(self))  # registered last, so run before the finalizers
        log(f"decoded images: {count:,} ({human(first.nbytes * count)}) decoded as they are first read (decoding "
            f"them all first would take about {seconds:.0f} s)")
        return images

    def new_data_file(self, n_bytes):
        """A new file of `n_bytes` zeros in `folder()`, its blocks reserved (a write into a mapped file the disk has
        no room for would kill the process), held by this process (and its children) until it ends or drops this
        cache, then removed unless committed; first, the files that killed runs left there for this cache go."""
        remove_abandoned(self.folder(), self.name)
        fd, path = tempfile.mkstemp(dir=self.folder(), prefix=f"{self.name}.", suffix=".partial")
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_SH)
        weakref.finalize(self, discard, Path(path), fd)
        try:
            if n_bytes:
                os.posix_fallocate(fd, 0, n_bytes)
        except OSError:
            os.unlink(path)
            raise
        return path

    def folder(self):
        """Where a new file is built: cache_dir when it exists (nothing is created before a run has begun)."""
        return self.cache_dir if self.cache_dir is not None and self.cache_dir.is_dir() else None

    def commit(self):
        """Make a built file the cache of cache_dir (once the run may write there): a decoded one now, a filling one
        once complete."""
        self.approved = True
        if self.pending is not None:
            data, index = self.pending
            self.pending = None
            keep(self.cache_dir, self.name, data, index)
        self.settle()

    def settle(self):
        """Commit a filling file once every image is in it; True when nothing is left to keep from this process."""
        if self.filling is None or not self.approved:
            return True
        images, index = self.filling
        if (images.flags == FILLED).all():
            self.filling = None
            keep(self.cache_dir, self.name, images.data, index)
            return True
        if (images.flags == EMPTY).any():
            return False
        self.filling = None
        images.data.unlink(missing_ok=True)
        warn(f"decoded-image cache: not kept (images differ in shape or sample type from the first, "
             f"{list(images.shape)} {str(images.dtype).split('.')[-1]}: {int((images.flags == OTHER).sum()):,} of "
             f"them, read from their files every epoch)")
        return True


def settle_at_exit(cache_ref):
    """At the end of the process: keep a file the machine's other processes completed after this one's last look."""
    cache = cache_ref()
    if cache is not None:
        cache.settle()


def keep(cache_dir, name, data, index):
    """Make `data` the cache of cache_dir: the data under a new name, then the index that names it, last."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        target = cache_dir / f"{name}-{uuid.uuid4().hex[:12]}.u8"
        atomic_write(target, lambda tmp: link_or_copy(data, tmp))
        with open(data, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        atomic_write(cache_dir / f"{name}.pt", lambda tmp: torch.save({**index, "data": target.name, "digest": digest},
                                                                      tmp))
        for old in cache_dir.glob(f"{name}-*.u8"):
            if old != target:
                old.unlink(missing_ok=True)  # a process still mapping it keeps its pages
        log(f"decoded images kept for later runs in {cache_dir}")
    except OSError as e:
        warn(f"decoded-image cache {cache_dir}: not written ({e.strerror or e})")
    finally:
        Path(data).unlink(missing_ok=True)


def contents(signature, shapes, dtype):
    return {"signature": signature, "shapes": shapes, "dtype": str(dtype).split(".")[-1]}


def plan(images):
    """What the machine's other processes do after local rank 0 found or built `images`."""
    if isinstance(images, FillingImages):
        return "fill", images.handle()
    return ("none" if images is None else "decoded"), None


def from_machine_leader(value):
    """Local rank 0's `value` on every process of its machine (torchrun numbers a machine's processes in a row)."""
    gathered = [None] * dist.world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered[dist.rank() - dist.local_rank()]


def discard(path, fd):
    """Remove a data file that was not committed (a run that never began leaves nothing) and let go of it."""
    path.unlink(missing_ok=True)
    os.close(fd)


def remove_abandoned(folder, name):
    """Delete the data files of cache `name` in `folder` that no process holds: those of a run that was killed."""
    if fcntl is None:
        return
    for path in Path(folder or tempfile.gettempdir()).glob(f"{glob.escape(name)}.*.partial"):
        try:
            with open(path, "rb") as f:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                path.unlink()
        except OSError:  # held by a running process, or gone already
            continue


def block_digest(block):
    """The SHA-256 of a block's bytes, as `keep` records it for the file."""
    return hashlib.sha256(memoryview(block.numpy()).cast("B")).hexdigest() if block.numel() else \
        hashlib.sha256().hexdigest()


def upfront_seconds(paths, mode, max_pixels):
    """About how long decoding every image before the first batch would take: the processor time a few of them
    take, times their number (as in one process: cautious, since several pay for moving the pixels between them)."""
    probe = paths[1:1 + PROBE]
    if not probe:
        return 0.0
    began = time.process_time()  # the decoding's own work, not the time other programs take from it
    for path in probe:
        read_image(path, mode, max_pixels=max_pixels)
    return (time.process_time() - began) / len(probe) * len(paths)


def workers_inherit_mappings():
    """Whether DataLoader workers start by fork (Linux's default before Python 3.14), so that they share the file
    this process maps; elsewhere each would fill a copy of its own, and images are decoded up front instead."""
    method = multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]
    return sys.platform == "linux" and method == "fork"


def decode_all(paths, mode, max_pixels, out):
    """Decode `paths` in order (in parallel for many), appending each image's pixels to the open file `out`;
    returns their shapes (N, 3) and common dtype (None when they differ)."""
    chunks = [paths[i:i + CHUNK] for i in range(0, len(paths), CHUNK)]
    shapes, dtypes = [], set()
    for batch in decoded_chunks(chunks, mode, max_pixels):
        for image in batch:
            shapes.append(list(image.shape))
            dtypes.add(image.dtype)
            out.write(pixel_bytes(image))
    return torch.tensor(shapes, dtype=torch.int64).view(-1, 3), (dtypes.pop() if len(dtypes) == 1 else None)


def decoded_chunks(chunks, mode, max_pixels):
    """The decoded images of each chunk, in order; several processes decode when there are many."""
    workers = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 8)
    if sys.platform != "linux" or workers < 2 or sum(map(len, chunks)) < PARALLEL_FROM:
        yield from (decode_chunk(chunk, mode, max_pixels) for chunk in chunks)
        return
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        window = collections.deque()  # a few chunks ahead of the one written, never the whole set
        for chunk in chunks:
            window.append(pool.submit(decode_chunk, chunk, mode, max_pixels))
            if len(window) > 2 * workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def pixel_bytes(image):
    """The image's pixels in (C, H, W) order, as bytes to write (NumPy lays out a decoder's (H, W, C) memory this
    way several times quicker than torch's `contiguous`)."""
    return memoryview(np.ascontiguousarray(image.numpy())).cast("B")


def decode_chunk(paths, mode, max_pixels):
    return [read_image(path, mode, max_pixels=max_pixels) for path in paths]


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
