"""Whether bytes are a whole image, cheaply, before they cost the service a request or the line its deadline.

A half-written or corrupt file must fail its own part (failed/, Error to the PLC), not a request later: PNG's
chunks are read and their checksums checked up to IEND, a JPEG must end with its end-of-image marker, and any
other format must at least open in Pillow. The service decodes the image itself and refuses whatever slips
through (422), which the station also treats as this part's failure.
"""

from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError

JPEG_END = b"\xff\xd9"


def image_problem(data: bytes) -> str | None:
    """None for an image that looks whole; else what is wrong with it, for the part's reason."""
    if not data:
        return "empty or unreadable file"
    fmt = "image"
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format or fmt
            if fmt == "PNG":
                img.verify()  # every chunk's CRC, and the file must reach IEND
            width, height = img.size
    except UnidentifiedImageError:
        return "not an image Pillow can read"
    except (OSError, SyntaxError, ValueError) as exc:  # Pillow reports broken files with these
        return f"broken {fmt} file: {exc}"
    if fmt == "JPEG" and JPEG_END not in data[-64:].rstrip(b"\x00"):
        return "truncated JPEG (no end-of-image marker): half-written?"
    if width < 2 or height < 2:
        return f"image of {width}x{height} pixels (the service needs at least 2x2)"
    return None
