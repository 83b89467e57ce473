"""Hand-made image bytes for the bad-input tests (shared by unit and server tests)."""
import io
import struct
import zlib

from PIL import Image


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height but carries one tiny (wrong) IDAT chunk."""
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def iptc_declaring(width: int, height: int, embedded: Image.Image) -> bytes:
    """An IPTC/NAA file whose records declare a grey width x height image and carry `embedded` (mode L) as
    its JPEG data: Pillow decodes the embedded image at its own size."""
    def field(record, dataset, payload):
        return bytes([0x1C, record, dataset]) + struct.pack(">H", len(payload)) + payload
    jpeg = encode(embedded, "JPEG")
    head = (field(3, 60, b"\x01\x00") + field(3, 20, struct.pack(">H", width))
            + field(3, 30, struct.pack(">H", height)) + field(3, 120, b"\x05"))
    return head + b"".join(field(8, 10, jpeg[i : i + 32_000]) for i in range(0, len(jpeg), 32_000)) + bytes(5)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()
