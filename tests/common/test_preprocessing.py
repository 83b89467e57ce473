"""The one preprocessing definition: formats, colour modes, orientation, torchvision parity, bad input."""
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image, features

from common import preprocessing
from common.contract import ImageLimits
from common.preprocessing import (IMAGE_FORMATS, ImageError, PreprocessConfig, decode_image, image_to_uint8,
                                  load_batch, normalize, preprocess_requests, resize_and_crop)
from common.samples import sample_photos
from tests.images import encode, iptc_declaring, png_declaring, tiff_grey

CONFIG = PreprocessConfig()
ROOT = Path(__file__).resolve().parents[2]
REFUSED = r"not a recognised image format \(.*; accepted: JPEG, PNG, WEBP, GIF, BMP, TIFF\)"


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.open(sample_photos(["chelsea"])["chelsea"]).convert("RGB")  # 451x300


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "WEBP"])
def test_lossless_formats_decode_to_the_same_pixels(photo, fmt):
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    decoded = decode_image(encode(photo, fmt, **kwargs))
    assert decoded.mode == "RGB" and decoded.size == photo.size
    assert np.array_equal(np.asarray(decoded), np.asarray(photo))


def test_jpeg_and_draft_mode(photo):
    big = photo.resize((photo.width * 4, photo.height * 4))  # 1804x1200
    data = encode(big, "JPEG", quality=95)
    full = decode_image(data)
    draft = decode_image(data, draft_size=256)
    assert full.size == big.size
    # DCT scaling by 4: both sides still >= 256, far fewer pixels decoded.
    assert draft.size == (451, 300)
    a = image_to_uint8(data, CONFIG).astype(float)
    b = resize_and_crop(full, CONFIG).astype(float)
    assert np.abs(a - b).mean() < 4.0  # same picture, slightly different downsampling


def test_a_jpeg_with_more_images_after_it_is_drafted_too(photo):
    """Pillow names a JPEG carrying further images (MPF: a phone's gain map or preview) MPO; it is a JPEG
    all the same, decoded at reduced size like any other."""
    big = photo.resize((photo.width * 4, photo.height * 4))
    data = encode(big, "MPO", save_all=True, append_images=[photo], quality=95)
    assert Image.open(io.BytesIO(data)).format == "MPO"
    assert decode_image(data, draft_size=256).size == (451, 300)
    assert np.array_equal(image_to_uint8(data, CONFIG), image_to_uint8(encode(big, "JPEG", quality=95), CONFIG))


def test_gif_first_frame_and_palette(photo):
    frames = [photo.quantize(64), Image.new("RGB", photo.size, (255, 0, 0)).quantize(8)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    decoded = np.asarray(decode_image(buffer.getvalue()), dtype=float)
    assert decoded.shape == (300, 451, 3)
    assert np.abs(decoded - np.asarray(photo, dtype=float)).mean() < 12  # the cat, not the red frame


def test_only_the_first_frame_is_read(photo):
    """A multi-page TIFF whose second page is cut off decodes to its first page: the pages after it are
    not walked (counting a GIF's frames reads every one of them)."""
    first = encode(photo, "TIFF")
    pages = encode(photo, "TIFF", save_all=True, append_images=[photo.rotate(180)])
    decoded = decode_image(pages[: len(first) + 40])
    assert np.array_equal(np.asarray(decoded), np.asarray(photo))


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "RGBA", "LA", "I;16"])
def test_colour_modes_become_rgb(photo, mode):
    if mode == "I;16":
        gray = np.asarray(photo.convert("L"), dtype=np.uint16) * 257
        image, fmt = Image.fromarray(gray), "PNG"
    else:
        image, fmt = photo.convert(mode), ("JPEG" if mode == "CMYK" else "PNG")
    decoded = decode_image(encode(image, fmt))
    assert decoded.mode == "RGB" and decoded.size == photo.size
    if mode in ("L", "I;16"):
        expected = np.asarray(photo.convert("L"), dtype=float)
        assert np.abs(np.asarray(decoded, dtype=float)[..., 0] - expected).max() <= 1


@pytest.mark.parametrize("value", [255, 256, 4095, 65535])
def test_16_bit_grey_is_scaled_by_its_depth_not_by_the_image(value):
    """A uniform 16-bit image decodes to value / 257 whatever else is in it: 255 and 256 are both near black
    (a per-image scale made 255 white and 256 black), 12-bit data's 4095 is dark grey."""
    image = Image.fromarray(np.full((32, 32), value, dtype=np.uint16))
    assert image.mode == "I;16"
    decoded = np.asarray(decode_image(encode(image, "PNG")))
    assert np.abs(decoded.astype(int) - int(value * 255 / 65535)).max() <= 1



DEEP_GREY = {  # mode -> (format, values): every 16-bit value; 32-bit and float ones outside the range, fractions
    "I;16": ("PNG", np.arange(65536, dtype=np.uint16).reshape(256, 256)),
    "I;16B": ("TIFF", np.arange(65536, dtype=">u2").reshape(256, 256)),
    "I": ("TIFF", (np.arange(65536, dtype=np.int32).reshape(256, 256) - 20_000) * 3),
    "F": ("TIFF", np.linspace(-10, 300, 65536, dtype=np.float32).reshape(256, 256)),
}


@pytest.mark.parametrize("mode", sorted(DEEP_GREY))
def test_16_bit_and_float_grey_decode_to_the_same_pixels_in_their_own_type(mode):
    """The pixels of v * 255 / 65535 (or of v, for "F") in float64, truncated and clipped to 0-255, as ever;
    computed in the image's own type, without the float64 copies that cost 24 bytes a pixel (8-bit grey: none)."""
    import tracemalloc

    fmt, values = DEEP_GREY[mode]
    data = encode(Image.fromarray(values), fmt)
    assert Image.open(io.BytesIO(data)).mode == mode
    expected = np.clip(values.astype(np.float64) * (1.0 if mode == "F" else 255.0 / 65535.0), 0, 255).astype(np.uint8)
    tracemalloc.start()
    try:
        decoded = decode_image(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.array_equal(np.asarray(decoded), np.repeat(expected[..., None], 3, axis=-1))
    assert peak < 12 * values.size, f"{peak / values.size:.1f} bytes a pixel"

def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    image.paste((255, 0, 0, 255), (0, 0, 16, 32))
    pixels = np.asarray(decode_image(encode(image, "PNG")))
    assert tuple(pixels[0, 0]) == (255, 0, 0) and tuple(pixels[0, 31]) == (255, 255, 255)


@pytest.mark.parametrize("mode, background", [("1", 0), ("L", 0), ("RGB", (0, 0, 0)), ("I;16", 0), ("P", 0)])
def test_a_transparent_colour_becomes_white(mode, background):
    """PNG's tRNS (one grey or RGB colour transparent, as optimisers write binary alpha) is alpha like any
    other: composited onto white, not decoded as the colour under it."""
    ink = {"1": 255, "L": 200, "RGB": (200, 200, 200), "I;16": 200 * 257, "P": 1}[mode]
    seen = 255 if mode == "1" else 200
    image = Image.new(mode, (32, 32), background)
    if mode == "P":
        image.putpalette([0, 0, 0, 200, 200, 200])
    image.paste(ink, (0, 0, 16, 32))
    pixels = np.asarray(decode_image(encode(image, "PNG", transparency=background)))
    assert tuple(pixels[0, 0]) == (seen, seen, seen) and tuple(pixels[0, 31]) == (255, 255, 255)


def test_exif_orientation_is_applied(photo):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    decoded = decode_image(encode(photo, "JPEG", exif=exif.tobytes()))
    assert decoded.size == (photo.height, photo.width)


def test_matches_torchvision_eval_transform(photo):
    from torchvision import transforms as T

    reference = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                           T.Normalize(CONFIG.mean, CONFIG.std)])
    for image in (photo, photo.transpose(Image.Transpose.TRANSPOSE), photo.resize((300, 300))):
        ours = load_batch([encode(image, "PNG")], CONFIG)[0]
        theirs = reference(image).numpy()
        assert ours.shape == theirs.shape == (3, 224, 224)
        # Pillow resize on both sides; the only difference is float rounding of the normalisation.
        assert np.abs(ours - theirs).max() < 1e-5


def test_nhwc_layout_and_config_round_trip(tmp_path):
    config = PreprocessConfig(resize=80, crop=64, layout="NHWC")
    config.save(tmp_path / "preprocess.json")
    assert PreprocessConfig.load(tmp_path / "preprocess.json") == config
    batch = normalize(np.zeros((2, 64, 64, 3), np.uint8), config)
    assert batch.shape == (2, 64, 64, 3) and batch.dtype == np.float32
    with pytest.raises(ValueError, match="layout"):
        PreprocessConfig(layout="CHW")
    with pytest.raises(ValueError, match="unknown preprocess keys"):
        PreprocessConfig.from_dict({"resize": 256, "colour": "blue"})



BAD_PREPROCESS = [  # each loaded before, then failed every batch it preprocessed (or answered NaN)
    ({"resize": 256.5}, "preprocess resize must be an integer >= 1, got 256.5"),
    ({"resize": 256.0}, "preprocess resize must be an integer >= 1, got 256.0"),
    ({"resize": 0, "crop": 0}, "preprocess resize must be an integer >= 1, got 0"),
    ({"crop": -5}, "preprocess crop must be an integer >= 1, got -5"),
    ({"resize": True, "crop": True}, "preprocess resize must be an integer >= 1, got True"),
    ({"std": [float("nan")] * 3}, "preprocess std must be 3 finite numbers, each > 0, got [nan, nan, nan]"),
    ({"std": [0.2, 0, 0.2]}, "preprocess std must be 3 finite numbers, each > 0, got [0.2, 0, 0.2]"),
    ({"std": ["0.2", "0.2", "0.2"]}, "preprocess std must be 3 finite numbers, each > 0, got ['0.2', '0.2', '0.2']"),
    ({"mean": [float("inf"), 0.4, 0.4]}, "preprocess mean must be 3 finite numbers, got [inf, 0.4, 0.4]"),
    ({"mean": [0.5, 0.5]}, "preprocess mean must be 3 finite numbers, got [0.5, 0.5]"),
]


@pytest.mark.parametrize("changes, message", BAD_PREPROCESS, ids=[repr(c) for c, _ in BAD_PREPROCESS])
def test_a_bad_preprocess_json_fails_its_load_in_one_line_naming_the_key(tmp_path, changes, message):
    path = tmp_path / "preprocess.json"
    path.write_text(json.dumps({**CONFIG.to_dict(), **changes}))  # NaN and Infinity as Python's json writes them
    with pytest.raises(ValueError) as info:
        PreprocessConfig.load(path)
    assert str(info.value) == message


def test_an_item_that_fails_otherwise_than_as_bad_input_fails_its_request_alone(photo):
    """Anything but an ImageError raised for one item (here a 2-element array where a 0-d one is expected: its
    .item() raises ValueError) fails that item's request as a fault of the server, never its batch."""
    good = encode(photo, "JPEG")
    odd = np.array([good, good], dtype=object)
    batch, outcomes = preprocess_requests([[good], [good, odd], [b""]], CONFIG, ImageLimits())
    assert batch.shape == (1, *CONFIG.input_shape) and outcomes[0] == (0, 1)
    assert isinstance(outcomes[1], preprocessing.PreprocessFault) and not isinstance(outcomes[1], ImageError)
    assert str(outcomes[1]) == "internal error preprocessing image 1: ValueError: can only convert an array of size 1 to a Python scalar"
    assert outcomes[1].__traceback__ is None and outcomes[1].__context__ is None
    assert isinstance(outcomes[2], ImageError) and "image 0: empty input" in str(outcomes[2])

@pytest.mark.parametrize("data, message", [
    (b"", "empty input"),
    (b"this is not an image at all", "not a recognised image format"),
    (png_declaring(1, 1), "both sides must be at least"),
    (png_declaring(9_000, 9_000), "refused before decoding"),  # 81 MP: over our 50 MP limit
    (png_declaring(100_000, 100_000), "refused before decoding"),  # 10 GP: Pillow's own guard
    # 48 MP, inside the pixel limit, but resizing its 16 px side to 256 would make it 256 x 48,000,000
    (png_declaring(16, 3_000_000), r"aspect ratio of 187500:1; the limit is 100:1 \(refused before decoding"),
])
def test_bad_inputs_raise_clear_errors(data, message):
    with pytest.raises(ImageError, match=message):
        decode_image(data)


def test_truncated_jpeg_and_size_limit(photo):
    data = encode(photo, "JPEG")
    with pytest.raises(ImageError, match="truncated"):
        decode_image(data[: len(data) // 2])
    with pytest.raises(ImageError, match="limit is 1000 bytes"):
        decode_image(data, ImageLimits(max_image_bytes=1000))



def test_a_tiff_tile_far_larger_than_its_image_is_refused_before_decoding():
    """libtiff inflates a whole tile whatever the image's size: a 64x64 image in one 16384x16384 tile (255 KB
    of deflate) cost 256 MB and a second of CPU, inside every size limit. A tile overhanging a small image as
    encoders write them (256x256) decodes, and so does a strip that says it has more rows than the image."""
    bomb = tiff_grey(64, 64, 128, tile=(16384, 16384))
    assert len(bomb) < 300_000 and Image.open(io.BytesIO(bomb)).size == (64, 64)
    with pytest.raises(ImageError, match=r"^TIFF tiles of 16384x16384 for a 64x64 image; a tile may be at most "
                                         r"1024x1024 for it \(refused before decoding\)$"):
        decode_image(bomb)
    for fine in (tiff_grey(64, 64, 128, tile=(256, 256)), tiff_grey(64, 64, 128, rows_per_strip=4_000_000)):
        assert np.array_equal(np.asarray(decode_image(fine)), np.full((64, 64, 3), 128, np.uint8))

def test_limits_hold_for_an_embedded_image_of_another_size_than_its_header_says(monkeypatch):
    """IPTC's records declare the size; the JPEG inside decodes at its own. The limits hold for what decodes,
    should such a format be accepted (IPTC is not: test_other_formats_are_refused_unread)."""
    monkeypatch.setattr(preprocessing, "IMAGE_FORMATS", {**IMAGE_FORMATS, "IPTC": "IptcImagePlugin"})
    strip = iptc_declaring(16, 16, Image.new("L", (16, 2_000), 128))
    assert Image.open(io.BytesIO(strip)).size == (16, 16)
    with pytest.raises(ImageError, match=r"16x2000, an aspect ratio of 125:1; the limit is 100:1 \(decoded; its header"):
        decode_image(strip)
    big = iptc_declaring(64, 64, Image.new("L", (2_000, 2_000), 128))
    with pytest.raises(ImageError, match="image is 2000x2000 = 4000000 pixels; the limit is 1000000"):
        decode_image(big, ImageLimits(max_image_pixels=1_000_000))
    assert decode_image(iptc_declaring(64, 64, Image.new("L", (64, 64), 128))).size == (64, 64)


def _icns(photo):
    return encode(photo.resize((64, 64)), "ICNS")


OTHER_FORMATS = {  # Pillow decodes each of these; the service accepts none
    "ICNS": _icns,
    "IPTC": lambda photo: iptc_declaring(64, 64, photo.convert("L").resize((64, 64))),
    "ICO": lambda photo: encode(photo, "ICO"),
    "TGA": lambda photo: encode(photo, "TGA"),  # no magic number: Pillow tries its opener on any bytes
    "PPM": lambda photo: encode(photo, "PPM"),
    "JPEG2000": lambda photo: encode(photo, "JPEG2000"),
    "AVIF": lambda photo: encode(photo, "AVIF"),
}


@pytest.mark.parametrize("fmt", sorted(OTHER_FORMATS))
def test_other_formats_are_refused_unread(photo, fmt):
    """A real file in a format Pillow decodes but IMAGE_FORMATS does not list is a client error; in a
    server's batch it fails its own request only."""
    codec = {"JPEG2000": "jpg_2000", "AVIF": "avif"}.get(fmt)
    if codec and not features.check(codec):
        pytest.skip(f"this Pillow has no {codec} codec")
    data = OTHER_FORMATS[fmt](photo)
    assert Image.open(io.BytesIO(data)).format == fmt
    with pytest.raises(ImageError, match=REFUSED):
        decode_image(data)
    good = encode(photo, "JPEG")
    batch, outcomes = preprocess_requests([[good], [data], [good, data]], CONFIG, ImageLimits())
    assert batch.shape == (1, *CONFIG.input_shape) and outcomes[0] == (0, 1)
    assert str(outcomes[1]).startswith("bad input: image 0: not a recognised image format")
    assert str(outcomes[2]).startswith("bad input: image 1: not a recognised image format")


def test_eps_is_refused_without_starting_ghostscript(photo, monkeypatch):
    """Pillow decodes EPS by running Ghostscript (`gs`) in a subprocess: an upload must never start one.
    Here Ghostscript counts as installed and any process started is recorded (and fails)."""
    started = []

    def tripwire(args, *rest, **kwargs):
        started.append(args)
        raise OSError("tripwire: decoding an image started a process")

    monkeypatch.setattr(subprocess, "Popen", tripwire)
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", "gs")
    data = encode(photo, "EPS")
    assert Image.open(io.BytesIO(data)).format == "EPS"
    with pytest.raises(ImageError) as refused:
        decode_image(data)
    assert started == []
    assert re.match(REFUSED, str(refused.value))


def test_decoding_imports_and_registers_no_plugin(photo, tmp_path):
    """Pillow imports and registers its plugins on the first Image.open that needs them, which decoding
    threads race on; common.preprocessing registers the ones it accepts at import. In a fresh interpreter,
    decoding every accepted format (and MPO) at once on threads adds no Pillow plugin and no opener."""
    images = {fmt: encode(photo, fmt) for fmt in IMAGE_FORMATS}
    images["MPO"] = encode(photo, "MPO", save_all=True, append_images=[photo])
    for fmt, data in images.items():
        (tmp_path / fmt).write_bytes(data)
    script = f"""
import json, pathlib, sys
from concurrent.futures import ThreadPoolExecutor
from PIL import Image
from common.preprocessing import decode_image

def registered():
    return sorted(m for m in sys.modules if m.endswith("ImagePlugin")), sorted(Image.OPEN)

before = registered()
files = sorted(pathlib.Path({str(tmp_path)!r}).iterdir())
with ThreadPoolExecutor(len(files)) as pool:
    sizes = list(pool.map(lambda f: decode_image(f.read_bytes()).size, files))
print(json.dumps({{"sizes": dict(zip([f.name for f in files], sizes)), "before": before, "after": registered()}}))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["sizes"] == {fmt: list(photo.size) for fmt in images}
    assert result["after"] == result["before"]


def test_load_batch_names_the_bad_item(photo):
    with pytest.raises(ImageError, match="image 1: empty input"):
        load_batch([encode(photo, "PNG"), b""], CONFIG)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_normalize_table_is_bit_identical_to_the_formula(layout):
    """normalize() looks values up in a 256-entry table per channel; every byte value in every channel
    must give exactly the float32 of (v - 255 mean) / (255 std), the formula it replaces."""
    config = PreprocessConfig(resize=64, crop=16, mean=(0.5, 0.41, 0.3), std=(0.2, 0.27, 0.33), layout=layout)
    values = np.arange(256, dtype=np.uint8)
    batch = np.stack([np.roll(values, k).reshape(16, 16) for k in range(3)], axis=-1)[None]  # every v per channel
    batch = np.concatenate([batch, batch[:, ::-1]])  # a non-trivial second image
    expected = (batch.astype(np.float32) - np.asarray(config.mean, np.float32) * 255.0) / (
        np.asarray(config.std, np.float32) * 255.0)
    if layout == "NCHW":
        expected = expected.transpose(0, 3, 1, 2)
    got = normalize(batch, config)
    assert got.dtype == np.float32 and got.flags["C_CONTIGUOUS"] and got.shape == expected.shape
    assert np.array_equal(got, expected)
    with pytest.raises(ValueError, match="uint8"):
        normalize(batch.astype(np.float32), config)



def test_a_request_of_no_images_is_its_own_bad_input(photo):
    """Triton refuses an IMAGE of shape [0, 1] itself (tests/serving/test_bad_input.py); should one come, it fails
    its own request: it had (0, 0) rows and, alone in its batch, no batch at all, which the models sliced."""
    good = encode(photo, "PNG")
    nothing = np.empty(0, dtype=np.object_)  # as the models pass each request's IMAGE on
    for requests, rows in (([[]], 0), ([nothing], 0), ([nothing, np.array([good], dtype=np.object_)], 1)):
        batch, outcomes = preprocess_requests(requests, CONFIG, ImageLimits())
        assert (batch is None) if rows == 0 else batch.shape == (1, *CONFIG.input_shape)
        assert isinstance(outcomes[0], ImageError) and "the request holds no images" in str(outcomes[0])
        assert outcomes[1:] == ([(0, 1)] if rows else [])

def test_a_servers_batch_keeps_no_traceback_of_its_bad_items(photo):
    """preprocess_requests, the stubs' path: each bad request's error is its message alone. A raised error
    keeps the failed decode's frames (the image bytes, Pillow's objects) in reference cycles that only the
    cyclic collector frees: under a stream of bad images the preprocess stubs' memory swung by tens of MB."""
    import gc
    import types

    good = encode(photo, "JPEG")
    requests = [[good], [good[: len(good) // 8]], [b"not an image", good], [b""]]
    batch, outcomes = preprocess_requests(requests, CONFIG, ImageLimits())
    assert batch.shape == (1, *CONFIG.input_shape) and outcomes[0] == (0, 1)
    errors = outcomes[1:]
    assert all(isinstance(e, ImageError) for e in errors) and "image 0: corrupt or truncated" in str(errors[0])
    for error in errors:
        assert error.__traceback__ is None and error.__context__ is None and error.__cause__ is None
    # nothing of the decodes it refused is left in a reference cycle (other threads' garbage is not counted)
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        preprocess_requests([[good[: len(good) // 8]] for _ in range(50)], CONFIG, ImageLimits())
        gc.collect()
        ours = [o for o in gc.garbage if isinstance(o, ImageError) or (
            isinstance(o, types.FrameType) and o.f_code.co_filename.endswith("preprocessing.py"))]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert ours == []
