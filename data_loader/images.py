"""Image files to uint8 tensors (channels, height, width): TorchCodec's decoders when they load, else Pillow.

torchvision's decoders are deprecated in favour of TorchCodec's; Pillow serves where TorchCodec has no build for
the installed torch. Both give the same pixels (tests/test_data.py compares them on PNG and JPEG).
"""
import contextlib
import functools
import io

import torch

from utils.util import UserError

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


def read_image(path, mode):
    """The image file at `path`, decoded; a missing, empty or undecodable file is one line naming it."""
    with image_file(path):
        data = path.read_bytes()
    if not data:
        raise UserError(f"image {str(path)!r}: the file is empty")
    try:
        return decode(data, mode)
    except ValueError as e:
        raise UserError(f"image {str(path)!r}: cannot be decoded ({e})") from None


def decode(data, mode, reader=None):
    """The image in `data` (the file's bytes) as a uint8 (uint16 for 16-bit files read unchanged) tensor of shape
    (C, H, W); ValueError when the bytes are no readable image."""
    return READERS[reader or default_reader()](data, mode)


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
                             output_dtype="auto" if mode == "unchanged" else torch.uint8)
    except (RuntimeError, ValueError) as e:
        raise ValueError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    return image[0] if image.dim() == 4 else image  # an animated file: its first frame


def _pillow(data, mode):
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(str(e) or type(e).__name__) from None
    wanted = MODES[mode][1] or _own_mode(image)
    if image.mode != wanted:
        image = image.convert(wanted)
    array = np.array(image)
    tensor = torch.from_numpy(array.astype(np.uint16) if array.dtype.kind in "iu" and array.itemsize == 2 else array)
    return tensor.unsqueeze(0) if tensor.dim() == 2 else tensor.permute(2, 0, 1).contiguous()


def _own_mode(image):
    """The Pillow mode that keeps a file's own channels and depth, as TorchCodec's "UNCHANGED" does."""
    if image.mode in ("L", "LA", "RGB", "RGBA") or image.mode.startswith("I;16"):
        return image.mode
    if image.mode == "P":
        return "RGBA" if "transparency" in image.info else "RGB"
    return {"1": "L", "PA": "RGBA", "La": "LA", "RGBa": "RGBA"}.get(image.mode, "RGB")


READERS = {"torchcodec": _torchcodec, "pillow": _pillow}
