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


def tiff_grey(width: int, height: int, value: int, *, tile: tuple[int, int] | None = None,
              rows_per_strip: int | None = None) -> bytes:
    """A deflate 8-bit grey TIFF of `value`, in one tile of tile[0] x tile[1] pixels or one strip of
    `rows_per_strip` rows, each as large as its tags say, whatever the image's own size."""
    pixels = tile[0] * tile[1] if tile else width * rows_per_strip
    deflate = zlib.compressobj(9)
    data = b"".join(deflate.compress(bytes([value]) * min(1 << 20, pixels - i)) for i in range(0, pixels, 1 << 20))
    data += deflate.flush()
    LONG, SHORT = 4, 3
    tags = {256: (LONG, width), 257: (LONG, height), 258: (SHORT, 8), 259: (SHORT, 8), 262: (SHORT, 1), 277: (SHORT, 1)}
    if tile:  # TileWidth, TileLength, TileOffsets, TileByteCounts
        tags.update({322: (LONG, tile[0]), 323: (LONG, tile[1]), 324: (LONG, None), 325: (LONG, len(data))})
    else:  # StripOffsets, RowsPerStrip, StripByteCounts
        tags.update({273: (LONG, None), 278: (LONG, rows_per_strip), 279: (LONG, len(data))})
    offset = 8 + 2 + 12 * len(tags) + 4  # the data follows the one IFD
    ifd = struct.pack("<H", len(tags))
    for tag, (kind, value_) in sorted(tags.items()):
        value_ = offset if value_ is None else value_
        ifd += struct.pack("<HHI", tag, kind, 1) + (struct.pack("<HH", value_, 0) if kind == SHORT else struct.pack("<I", value_))
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\x00\x00\x00\x00" + data
