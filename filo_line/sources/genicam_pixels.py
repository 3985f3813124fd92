"""A GenICam camera frame (raw pixels in one of the GenICam pixel formats) to the PNG the service is sent.

Kept apart from the camera code so that it needs neither Aravis nor a camera, and so that the formats a line can
use are listed in one place. Mono16 stays 16-bit in the PNG (the service reads it whole); Bayer frames are
demosaiced to RGB here, since a raw mosaic would look like a checkered grey image to the model.
"""

from __future__ import annotations

import cv2
import numpy as np

# the Pixel Format Naming Convention's codes, as a GigE Vision buffer reports its format
PFNC_CODES = {
    0x01080001: "Mono8",
    0x01100007: "Mono16",
    0x02180014: "RGB8",
    0x02180015: "BGR8",
    0x01080008: "BayerGR8",
    0x01080009: "BayerRG8",
    0x0108000A: "BayerGB8",
    0x0108000B: "BayerBG8",
}
SUPPORTED = tuple(PFNC_CODES.values())

# GenICam names a Bayer mosaic by its first row's two pixels then the second row's first; OpenCV's four-letter
# constants spell the 2x2 tile the same way (its two-letter ones are shifted by one pixel and read backwards)
_BAYER = {
    "BayerRG8": cv2.COLOR_BayerRGGB2BGR,
    "BayerGR8": cv2.COLOR_BayerGRBG2BGR,
    "BayerGB8": cv2.COLOR_BayerGBRG2BGR,
    "BayerBG8": cv2.COLOR_BayerBGGR2BGR,
}
_BYTES_PER_PIXEL = {"Mono8": 1, "Mono16": 2, "RGB8": 3, "BGR8": 3, **dict.fromkeys(_BAYER, 1)}


class PixelFormatError(ValueError):
    """A pixel format this connector does not convert, or a frame whose size does not match its format."""


def pixel_format_name(code: int) -> str:
    """The GenICam name of a PFNC code (an unknown code as hex, so that the error names it)."""
    return PFNC_CODES.get(code, f"0x{code:08X}")


def frame_to_png(data: bytes, width: int, height: int, pixel_format: str) -> bytes:
    """Encodes one frame as PNG: grey 8-bit (Mono8), grey 16-bit (Mono16) or RGB 8-bit (RGB8, BGR8, Bayer*8).
    Raises PixelFormatError for another format or a frame shorter than width x height pixels."""
    if pixel_format not in _BYTES_PER_PIXEL:
        raise PixelFormatError(f"pixel format {pixel_format} is not supported; set the camera to one of "
                               f"{', '.join(SUPPORTED)}")
    size = width * height * _BYTES_PER_PIXEL[pixel_format]
    if len(data) < size:
        raise PixelFormatError(f"a {width}x{height} {pixel_format} frame needs {size} bytes, got {len(data)}")
    raw = memoryview(data)[:size]
    if pixel_format == "Mono8":
        image = np.frombuffer(raw, np.uint8).reshape(height, width)
    elif pixel_format == "Mono16":  # GigE Vision sends pixels little-endian
        image = np.frombuffer(raw, "<u2").reshape(height, width).astype(np.uint16)
    elif pixel_format in ("RGB8", "BGR8"):
        image = np.frombuffer(raw, np.uint8).reshape(height, width, 3)
        if pixel_format == "RGB8":
            image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)  # OpenCV writes BGR arrays as RGB PNGs
    else:
        image = cv2.cvtColor(np.frombuffer(raw, np.uint8).reshape(height, width), _BAYER[pixel_format])
    ok, png = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise PixelFormatError(f"OpenCV could not encode a {width}x{height} {pixel_format} frame as PNG")
    return png.tobytes()
