"""Reading images: paths, stdin and URLs load; every kind of bad input is a one-line InputError naming it."""

from __future__ import annotations

import hashlib
import io
import re
import socket
import struct
import zlib

import pytest
from PIL import Image

from llavacli.errors import InputError, LlavaError
from llavacli.images import MAX_IMAGE_PIXELS, load_image, read_image_list
from localhub import LocalHub


def picture(fmt: str, size=(48, 32), exif: Image.Exif | None = None) -> bytes:
    """A small image whose left half is red and right half blue, encoded as `fmt`."""
    img = Image.new("RGB", size, (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, size[0] // 2, size[1]))
    out = io.BytesIO()
    img.save(out, fmt, **({"exif": exif} if exif is not None else {}))
    return out.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny, valid-looking PNG whose header claims width x height pixels: how a decompression bomb starts."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


class FakeStdin(io.BytesIO):
    def __init__(self, data: bytes = b"", tty: bool = False):
        super().__init__(data)
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_good_image_file_loads_as_rgb_with_the_hash_of_its_bytes(tmp_path, fmt):
    data = picture(fmt)
    path = tmp_path / f"photo.{fmt.lower()}"
    path.write_bytes(data)
    loaded = load_image(str(path))
    assert loaded.image.mode == "RGB" and loaded.image.size == (48, 32)
    assert loaded.format == fmt and loaded.source == str(path)
    assert loaded.sha256 == hashlib.sha256(data).hexdigest()


def test_same_bytes_give_the_same_key_whatever_the_source(tmp_path):
    data = picture("PNG")
    (tmp_path / "a.png").write_bytes(data)
    (tmp_path / "b.png").write_bytes(data)
    assert load_image(str(tmp_path / "a.png")).sha256 == load_image(str(tmp_path / "b.png")).sha256


def test_dash_reads_the_image_bytes_from_stdin():
    data = picture("JPEG")
    loaded = load_image("-", stdin=FakeStdin(data))
    assert loaded.image.size == (48, 32) and loaded.label == "<stdin>"
    assert loaded.sha256 == hashlib.sha256(data).hexdigest()


def test_dash_with_nothing_piped_is_an_error():
    with pytest.raises(InputError, match=r"^image <stdin>: no bytes on standard input$"):
        load_image("-", stdin=FakeStdin(b""))
    with pytest.raises(InputError, match=r"^image <stdin>: standard input is a terminal"):
        load_image("-", stdin=FakeStdin(tty=True))


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was turned; display rotated 90 degrees clockwise
    loaded = load_image("-", stdin=FakeStdin(picture("JPEG", exif=exif)))
    img = loaded.image
    assert img.size == (32, 48)
    top, bottom = img.getpixel((16, 4)), img.getpixel((16, 44))
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]  # red went to the top, blue to the bottom


# --- URLs ---------------------------------------------------------------------------------------------------


@pytest.fixture
def server():
    with LocalHub() as server:
        yield server


def test_url_is_fetched_and_loaded(server):
    data = picture("PNG")
    server.pages["/cat.png"] = (200, data)
    loaded = load_image(server.url + "/cat.png")
    assert loaded.image.size == (48, 32) and loaded.sha256 == hashlib.sha256(data).hexdigest()


def test_url_answering_404_is_an_error_naming_the_url(server):
    url = server.url + "/missing.png"
    with pytest.raises(InputError, match=rf"^image {url}: HTTP 404 "):
        load_image(url)


def test_unreachable_url_is_an_error_naming_the_url():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/cat.png"
    with pytest.raises(InputError, match=rf"^image {url}: cannot fetch \(.*refused"):
        load_image(url, timeout=5)


def test_url_that_is_not_an_image_is_an_error(server):
    server.pages["/page.html"] = (200, b"<html><body>hello</body></html>")
    with pytest.raises(InputError, match=r"page.html: not an image \(it is a text file\)"):
        load_image(server.url + "/page.html")


# --- bad input ------------------------------------------------------------------------------------------------


def cut(data: bytes) -> bytes:
    return data[: len(data) // 2]


BAD_FILES = {
    "text file named .jpg": ("notes.jpg", b"shopping list:\n- eggs\n", "not an image (it is a text file)"),
    "truncated PNG": ("cut.png", cut(picture("PNG", (200, 200))), "truncated or damaged PNG image"),
    "PNG missing its end": ("end.png", picture("PNG")[:-6], "truncated PNG image"),
    "truncated JPEG": ("cut.jpg", cut(picture("JPEG", (200, 200))), "truncated or damaged JPEG image"),
    "empty file": ("empty.png", b"", "empty (0 bytes)"),
    "too many pixels": ("big.png", png_claiming(9000, 9000), "9000x9000 is 81.0 megapixels, over the limit"),
    "decompression bomb": ("bomb.png", png_claiming(30000, 30000), "too many pixels"),
    "PDF": ("doc.jpg", b"%PDF-1.7\n%...", "unsupported format: a PDF document"),
    "HEIC": ("phone.heic", b"\x00\x00\x00\x18ftypheic" + bytes(16), "unsupported format: a HEIC/HEIF photo"),
    "SVG": ("logo.png", b'<svg xmlns="http://www.w3.org/2000/svg"/>', "unsupported format: SVG"),
    "ICO": ("icon.ico", None, "unsupported format: an icon (ICO) file"),
    "random bytes": ("noise.png", bytes(range(256)) * 4, "not an image, or a format we do not read"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_image_file_is_a_one_line_error_naming_it(tmp_path, case):
    name, data, reason = BAD_FILES[case]
    if data is None:  # ICO: a format PIL can write but we do not read
        out = io.BytesIO()
        Image.new("RGB", (16, 16)).save(out, "ICO")
        data = out.getvalue()
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(InputError) as err:
        load_image(str(path))
    message = str(err.value)
    assert message.startswith(f"image {path}: ") and reason in message
    assert "\n" not in message
    assert isinstance(err.value, LlavaError)


def test_missing_file_is_an_error_naming_it(tmp_path):
    path = tmp_path / "nope.jpg"
    with pytest.raises(InputError, match=rf"^image {path}: no such file$"):
        load_image(str(path))


def test_directory_is_an_error_naming_it(tmp_path):
    with pytest.raises(InputError, match=rf"^image {tmp_path}: is a directory, not an image$"):
        load_image(str(tmp_path))


def test_pixel_limit_is_64_megapixels():
    assert MAX_IMAGE_PIXELS == 64_000_000
    load_image("-", stdin=FakeStdin(picture("PNG", (8000, 1))))  # wide but small: fine


# --- --images-from ------------------------------------------------------------------------------------------


def test_image_list_skips_blank_lines_and_comments(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("# holiday\n\na.jpg\n  b dir/c.png  \r\n# done\nhttps://example.com/d.webp\n")
    assert read_image_list(str(listing)) == ["a.jpg", "b dir/c.png", "https://example.com/d.webp"]


def test_image_list_from_stdin():
    stdin = FakeStdin(b"./x.png\n./y.png\n")
    assert read_image_list("-", stdin=stdin) == ["./x.png", "./y.png"]


@pytest.mark.parametrize(
    "content, reason",
    [(b"# nothing\n\n", "no image paths in it"), (b"a.png\n-\n", "line 2: '-' (stdin) cannot be listed")],
)
def test_unusable_image_list_is_an_error_naming_it(tmp_path, content, reason):
    listing = tmp_path / "list.txt"
    listing.write_bytes(content)
    with pytest.raises(InputError, match=rf"^--images-from {listing}: {re.escape(reason)}"):
        read_image_list(str(listing))


def test_missing_image_list_is_an_error_naming_it(tmp_path):
    with pytest.raises(InputError, match=r"^--images-from .*nope.txt: no such file$"):
        read_image_list(str(tmp_path / "nope.txt"))
