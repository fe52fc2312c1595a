"""Image files to uint8 tensors (channels, height, width): TorchCodec's decoders when they load, else Pillow.

torchvision's decoders are deprecated in favour of TorchCodec's; Pillow serves where TorchCodec has no build for
the installed torch. One pixel semantics for both: EXIF orientation applied, CMYK converted to RGB, a palette to RGB
(RGBA when it has transparency), 16 bits scaled to 8 (the high byte), alpha kept by the modes that have it and
dropped (not composited) by the others. TorchCodec decodes the files that need none of this (8-bit gray or RGB,
with or without alpha, upright, read in their own channels); Pillow the rest. The pixel count is read from the
header and checked against `max_pixels` before anything is decoded.
"""
import contextlib
import functools
import io

import torch

from utils.files import open_regular
from utils.util import UserError

MAX_PIXELS = 100_000_000  # default bound on width x height, checked from the header before decoding
PLAIN_MODES = ("L", "LA", "RGB", "RGBA")  # Pillow's modes of files TorchCodec decodes as they are

# image_mode: (TorchCodec's mode, Pillow's mode, or None to keep the file's own channels)
MODES = {
    "unchanged": ("UNCHANGED", None),
    "gray": ("GRAY", "L"),
    "gray_alpha": ("GRAY_ALPHA", "LA"),
    "rgb": ("RGB", "RGB"),
    "rgb_alpha": ("RGB_ALPHA", "RGBA"),
    "rgba": ("RGB_ALPHA", "RGBA"),
}


@contextlib.contextmanager
def image_file(path):
    """A missing or unreadable image file, met inside the block, as one line naming it."""
    try:
        yield
    except FileNotFoundError:
        raise UserError(f"image {str(path)!r}: no such file (listed in the CSV)") from None
    except OSError as e:
        raise UserError(f"image {str(path)!r}: cannot be read ({e.strerror})") from None


def read_image(path, mode, max_pixels=MAX_PIXELS):
    """The image file at `path`, decoded; a missing, empty, undecodable or not regular file, or one of more than
    `max_pixels` pixels, is one line naming it."""
    with image_file(path):
        with open_regular(path) as f:
            data = f.read()
    if not data:
        raise UserError(f"image {str(path)!r}: the file is empty")
    try:
        return decode(data, mode, max_pixels=max_pixels)
    except ValueError as e:
        raise UserError(f"image {str(path)!r}: cannot be decoded ({e})") from None
    except PixelLimit as e:
        raise UserError(f"image {str(path)!r}: {e} (data_loader.args.max_image_pixels raises the bound)") from None


class PixelLimit(Exception):
    """An image whose header gives more pixels than allowed."""


def decode(data, mode, reader=None, max_pixels=MAX_PIXELS):
    """The image in `data` (the file's bytes) as a uint8 tensor of shape (C, H, W); ValueError when the bytes are no
    readable image, PixelLimit when its header gives more than `max_pixels` pixels."""
    header = open_header(data)
    width, height = header.size
    if width * height > max_pixels:
        raise PixelLimit(f"{width}x{height} pixels, more than the {max_pixels:,} allowed")
    plain = header.mode in PLAIN_MODES and MODES[mode][1] in (None, header.mode) and \
        orientation(header, data) == 1 and not (header.format == "PNG" and data[24:25] == b"\x10")
    return READERS[reader or default_reader() if plain else "pillow"](data, mode)


def orientation(header, data):
    """The EXIF orientation from the header (1: upright), None when only decoding would tell (a PNG's eXIf chunk
    after its pixels: Pillow's getexif would decode them to find it)."""
    from PIL import Image

    exif = header.info.get("exif")
    if exif is None:
        return None if header.format == "PNG" and b"eXIf" in data else 1
    tags = Image.Exif()
    tags.load(exif)
    return tags.get(0x0112, 1)


def open_header(data):
    """Pillow's lazily opened image: its header read, no pixels decoded (Pillow's own bound is left to max_pixels)."""
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = None  # decode() checks the pixel count itself, against a bound the user can raise
    try:
        return Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(str(e) or type(e).__name__) from None


@functools.cache
def default_reader():
    """"torchcodec" when its decoders load with the installed torch, else "pillow"."""
    try:
        from torchcodec.decoders import decode_image  # noqa: F401  (loads its compiled library)
    except Exception:  # not installed, or built for another torch
        return "pillow"
    return "torchcodec"


def _torchcodec(data, mode):
    from torchcodec.decoders import decode_image

    codec_mode, _ = MODES[mode]
    try:
        image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=codec_mode,
                             output_dtype=torch.uint8)
    except (RuntimeError, ValueError) as e:
        raise ValueError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    return image[0] if image.dim() == 4 else image  # an animated file: its first frame


def _pillow(data, mode):
    import numpy as np
    from PIL import Image, ImageOps

    try:
        image = open_header(data)
        image.load()
        image = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError) as e:
        raise ValueError(str(e) or type(e).__name__) from None
    if image.mode.startswith("I"):  # 16 (or 32) bits of gray: the high byte of 16
        image = Image.fromarray((np.asarray(image).astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8))
    wanted = MODES[mode][1] or _own_mode(image)
    if image.mode != wanted:
        image = image.convert(wanted)
    tensor = torch.from_numpy(np.array(image))
    return tensor.unsqueeze(0) if tensor.dim() == 2 else tensor.permute(2, 0, 1).contiguous()


def _own_mode(image):
    """The 8-bit Pillow mode that keeps a file's own channels (CMYK and palette become RGB, RGBA with transparency)."""
    if image.mode in PLAIN_MODES:
        return image.mode
    if image.mode == "P":
        return "RGBA" if "transparency" in image.info else "RGB"
    return {"1": "L", "PA": "RGBA", "La": "LA", "RGBa": "RGBA"}.get(image.mode, "RGB")


READERS = {"torchcodec": _torchcodec, "pillow": _pillow}
