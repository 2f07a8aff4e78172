"""Images in: reading them from a path, stdin or a URL, and LLaVA's preprocessing, the one place that decides
which pixels the vision tower sees.

The engine hands libmtmd an RGB bitmap already at the tower's input size, so mtmd's own resize is a no-op
and only its mean/std normalisation (read from the mmproj) remains: the same arithmetic as CLIP's
image processor applied to the same pixels.

Reading refuses anything doubtful (missing, empty, truncated, not an image, too many pixels) with an
InputError that names the source, before the model is loaded.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from PIL import Image, ImageOps, UnidentifiedImageError

from llavacli.errors import InputError

# CLIP's mean in 0-255, the colour LLaVA-1.5 pads with (llava/mm_utils.py expand2square).
MEAN_COLOR = (122, 116, 104)

PAD = "pad"  # LLaVA-1.5 fine-tuning and inference: pad to a square, then resize
CROP = "crop"  # LLaVA v1 and stage-1 pre-training: resize the shortest side, centre-crop
MODES = (PAD, CROP)


def expand2square(img: Image.Image, fill: tuple[int, int, int] = MEAN_COLOR) -> Image.Image:
    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    square = Image.new(img.mode, (side, side), fill)
    square.paste(img, ((side - width) // 2, (side - height) // 2))
    return square


def preprocess(img: Image.Image, size: int, mode: str = PAD) -> Image.Image:
    """An RGB image of size x size, as CLIPImageProcessor would resize and crop it for LLaVA."""
    img = img.convert("RGB")
    if mode == PAD:
        img = expand2square(img)
    elif mode != CROP:
        raise ValueError(f"unknown preprocessing mode {mode!r}; choose one of: {', '.join(MODES)}")
    # CLIPImageProcessor: shortest edge to `size` (bicubic), the other edge truncated, then a centre crop.
    width, height = img.size
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    if (new_w, new_h) != img.size:
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    if (new_w, new_h) != (size, size):
        img = img.crop((left, top, left + size, top + size))
    return img


# --- Reading: a path, `-` for bytes on stdin, or an http(s) URL ---

# Larger images are refused before decoding (a decompression bomb is a few KB that decode to gigabytes).
# 64 MP is above any camera's output; the vision tower sees 336 x 336 anyway.
MAX_IMAGE_PIXELS = 64_000_000
# Raw bytes read from any source: an uncompressed RGBA image at the pixel limit.
MAX_IMAGE_BYTES = MAX_IMAGE_PIXELS * 4
URL_TIMEOUT = 30.0  # seconds to connect and between reads

# The decoders we let PIL run on untrusted bytes (many cameras' JPEGs come back as format "MPO").
_DECODERS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")
SUPPORTED_FORMATS = "PNG, JPEG, WebP, GIF, BMP, TIFF, AVIF"

STDIN = "-"


@dataclass(frozen=True)
class LoadedImage:
    source: str  # as the user wrote it: a path, "-" or a URL
    image: Image.Image  # RGB, fully decoded, EXIF orientation applied
    sha256: str  # of the raw bytes: the same file always gives the same key
    format: str  # PIL's name of the file format, e.g. "PNG"

    @property
    def label(self) -> str:
        return _label(self.source)


def is_url(source: str) -> bool:
    return source.lower().startswith(("http://", "https://"))


def load_image(source: str, *, stdin: BinaryIO | None = None, timeout: float = URL_TIMEOUT) -> LoadedImage:
    """Read, validate and decode one image; any problem is an InputError naming the source."""
    if source == STDIN:
        data = _read_stdin(stdin if stdin is not None else sys.stdin.buffer)
    elif is_url(source):
        data = _fetch(source, timeout)
    else:
        data = _read_file(source)
    return decode_image(data, source)


def decode_image(data: bytes, source: str) -> LoadedImage:
    """Decode raw image bytes read from `source` (used in messages only)."""
    where = f"image {_label(source)}"
    if not data:
        raise InputError(f"{where}: empty (0 bytes)")
    digest = hashlib.sha256(data).hexdigest()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "Corrupt EXIF data": not worth a line on the user's terminal
        # PIL only warns between its own limit and twice that; make it an error like the rest.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=_DECODERS)
        except UnidentifiedImageError:
            raise InputError(f"{where}: {_not_an_image(data)}") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise InputError(f"{where}: {_too_large(None)}") from None
        except Exception as e:  # PIL raises assorted errors on a damaged header
            kind = " ".join(filter(None, [_sniff(data), "image"]))
            raise InputError(f"{where}: truncated or damaged {kind} ({_reason(e)})") from None
        if img.width * img.height > MAX_IMAGE_PIXELS:
            raise InputError(f"{where}: {_too_large(img.size)}")
        try:
            img.load()  # opening reads the header only; a truncated file fails here
        except Exception as e:
            raise InputError(f"{where}: truncated or damaged {img.format} image ({_reason(e)})") from None
        # PIL stops reading after the pixel data, so a PNG cut inside its end chunk decodes fine.
        if img.format == "PNG" and _PNG_END not in data[-4096:]:
            raise InputError(f"{where}: truncated PNG image (no end chunk)")
        fmt = img.format or "unknown"
        try:
            img = ImageOps.exif_transpose(img)
        except Exception:  # damaged EXIF: keep the pixels as stored
            pass
        rgb = img.convert("RGB")  # as LLaVA reads images; inside the block to silence palette warnings
    return LoadedImage(source, rgb, digest, fmt)


def read_image_list(source: str, *, stdin: BinaryIO | None = None) -> list[str]:
    """The image paths or URLs in a list file (or `-` for stdin): one a line, blank lines and #-comments skipped."""
    where = f"--images-from {_label(source)}"
    if source == STDIN:
        stream = stdin if stdin is not None else sys.stdin.buffer
        if _isatty(stream):
            raise InputError(
                f"{where}: standard input is a terminal; pipe the list in, e.g. "
                "find . -name '*.jpg' | llava ask --images-from - ..."
            )
        data = stream.read()
    else:
        try:
            data = Path(source).read_bytes()
        except FileNotFoundError:
            raise InputError(f"{where}: no such file") from None
        except IsADirectoryError:
            raise InputError(f"{where}: is a directory, not a list of images") from None
        except OSError as e:
            raise InputError(f"{where}: cannot read ({_reason(e)})") from None
    entries = []
    for number, raw in enumerate(data.splitlines(), 1):
        line = os.fsdecode(raw).strip()  # fsdecode: keep file names that are not valid UTF-8
        if not line or line.startswith("#"):
            continue
        if line == STDIN:
            raise InputError(f"{where}: line {number}: '-' (stdin) cannot be listed; give a path or URL")
        entries.append(line)
    if not entries:
        raise InputError(f"{where}: no image paths in it")
    return entries


def _label(source: str) -> str:
    return "<stdin>" if source == STDIN else source


def _read_file(source: str) -> bytes:
    where = f"image {source}"
    path = Path(source)
    try:
        if path.is_dir():
            raise InputError(f"{where}: is a directory, not an image")
        with open(path, "rb") as f:
            data = f.read(MAX_IMAGE_BYTES + 1)
    except FileNotFoundError:
        raise InputError(f"{where}: no such file") from None
    except PermissionError:
        raise InputError(f"{where}: permission denied") from None
    except OSError as e:
        raise InputError(f"{where}: cannot read ({_reason(e)})") from None
    _check_byte_size(data, where)
    return data


def _read_stdin(stream: BinaryIO) -> bytes:
    where = "image <stdin>"
    if _isatty(stream):
        raise InputError(
            f"{where}: standard input is a terminal; pipe the image in, e.g. cat photo.jpg | llava ask - ..."
        )
    data = stream.read(MAX_IMAGE_BYTES + 1)
    if not data:
        raise InputError(f"{where}: no bytes on standard input")
    _check_byte_size(data, where)
    return data


def _fetch(url: str, timeout: float) -> bytes:
    import http.client  # here, not at the top: most images are files, and these imports cost 20 ms
    import urllib.error
    import urllib.request

    where = f"image {url}"
    request = urllib.request.Request(url, headers={"User-Agent": "llava-cli"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            if response.status != 200:
                raise InputError(f"{where}: HTTP {response.status} {response.reason}")
            data = response.read(MAX_IMAGE_BYTES + 1)
    except urllib.error.HTTPError as e:
        raise InputError(f"{where}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise InputError(f"{where}: cannot fetch ({_reason(e.reason)})") from None
    except TimeoutError:
        raise InputError(f"{where}: no answer within {timeout:g} s") from None
    except (OSError, http.client.HTTPException) as e:  # e.g. the connection dropped mid-body
        raise InputError(f"{where}: cannot fetch ({_reason(e)})") from None
    _check_byte_size(data, where)
    return data


def _check_byte_size(data: bytes, where: str) -> None:
    if len(data) > MAX_IMAGE_BYTES:
        raise InputError(f"{where}: larger than {MAX_IMAGE_BYTES // 2**20} MiB, too large to be an image we accept")


def _too_large(size: tuple[int, int] | None) -> str:
    limit = f"the limit of {MAX_IMAGE_PIXELS / 1e6:g} megapixels"
    if size is None:
        return f"too many pixels (over {limit}; a decompression bomb?)"
    width, height = size
    return f"{width}x{height} is {width * height / 1e6:.1f} megapixels, over {limit}"


_PNG_END = b"IEND\xae\x42\x60\x82"  # the end chunk's type and its (constant) CRC

# The formats we decode, by their first bytes: names a file too damaged for PIL to open.
_OUR_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def _sniff(data: bytes) -> str | None:
    for magic, name in _OUR_SIGNATURES:
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if data[4:8] == b"ftyp" and data[8:12] in (b"avif", b"avis"):
        return "AVIF"
    return None


# Formats PIL can name but we do not decode, told apart by their first bytes.
_SIGNATURES = (
    (b"%PDF", "a PDF document"),
    (b"8BPS", "a Photoshop (PSD) file"),
    (b"\x00\x00\x01\x00", "an icon (ICO) file"),
    (b"\xff\x4f\xff\x51", "a JPEG 2000 file"),
    (b"\x00\x00\x00\x0cjP  ", "a JPEG 2000 file"),
    (b"qoif", "a QOI image"),
)


def _not_an_image(data: bytes) -> str:
    if fmt := _sniff(data):
        return f"truncated or damaged {fmt} image"
    head = data[:64]
    for magic, name in _SIGNATURES:
        if head.startswith(magic):
            return f"unsupported format: {name} (supported: {SUPPORTED_FORMATS})"
    if head[4:8] == b"ftyp":  # ISO media: HEIC photos from phones, or video
        if head[8:12] in (b"heic", b"heix", b"heim", b"heis", b"hevc", b"mif1", b"msf1"):
            return f"unsupported format: a HEIC/HEIF photo; convert it to JPEG (supported: {SUPPORTED_FORMATS})"
        brand = head[8:12].decode("ascii", "replace").strip()
        return f"unsupported format: ISO media '{brand}', e.g. a video (supported: {SUPPORTED_FORMATS})"
    if head.lstrip().startswith((b"<svg", b"<?xml")):
        return f"unsupported format: SVG, a vector drawing; convert it to PNG (supported: {SUPPORTED_FORMATS})"
    if _looks_like_text(data[:4096]):
        return "not an image (it is a text file)"
    return f"not an image, or a format we do not read (supported: {SUPPORTED_FORMATS})"


def _looks_like_text(sample: bytes) -> bool:
    if b"\x00" in sample:
        return False
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start >= len(sample) - 3  # a multi-byte character cut off at the end of the sample
    return True


def _isatty(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _reason(e: BaseException | str) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]
