"""Pictures drawn inline in a terminal (``cbir query --preview``): which image
protocol the terminal speaks, told from its environment, and the escape sequences
of the three in use.

- kitty graphics protocol (kitty, Ghostty, Konsole): a PNG, base64, in APC
  escapes ``ESC _ G <keys> ; <data> ESC \\``, at most 4096 base64 bytes each
  (``m=1``: more follow); ``a=T`` transmits and shows it, ``f=100`` says PNG,
  ``q=2`` keeps the terminal from answering into our stdin.
  https://sw.kovidgoyal.net/kitty/graphics-protocol/
- iTerm2 inline images (iTerm2, WezTerm, mintty): ``ESC ] 1337 ; File=inline=1;
  size=<bytes>:<base64> BEL``. https://iterm2.com/documentation-images.html
- sixel (foot, mlterm, yaft, contour): a palette and six-pixel-high bands of
  one character per column and colour, ``ESC P q ... ESC \\``.

The environment is read the way presenterm, chafa and timg do: ``KITTY_WINDOW_ID``
and ``TERM=xterm-kitty`` (kitty), ``TERM_PROGRAM`` (iTerm.app, WezTerm, mintty,
ghostty), ``LC_TERMINAL=iTerm2`` (iTerm2 over ssh), ``KONSOLE_VERSION``, and
``TERM`` for the sixel terminals. Inside tmux or screen none is assumed (they drop
these escapes unless configured to pass them). ``CBIR_PREVIEW=kitty|iterm2|sixel|none``
overrides the guess, for a terminal it misses (an xterm started with ``-ti vt340``).
No library: term-image, the maintained one on PyPI, pins Pillow < 11.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping
from itertools import groupby
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image as PILImage

PROTOCOLS = ("kitty", "iterm2", "sixel")
OVERRIDE = "CBIR_PREVIEW"
KITTY_CHUNK = 4096  # base64 bytes per escape: the protocol's limit
SIXEL_COLOURS = 255
_ITERM2_PROGRAMS = {"iTerm.app", "WezTerm", "mintty"}
_KITTY_PROGRAMS = {"ghostty"}
_KITTY_TERMS = {"xterm-kitty", "xterm-ghostty"}
_SIXEL_TERMS = {"foot", "foot-extra", "mlterm", "yaft", "yaft-256color", "contour"}


def detect_protocol(env: Mapping[str, str], is_tty: bool) -> tuple[str | None, str]:
    """(protocol or None, why): the image protocol this terminal speaks, from its
    environment; the reason says which variable decided, or why there is none."""
    if not is_tty:
        return None, "stdout is not a terminal"
    override = env.get(OVERRIDE, "").strip().lower()
    if override:
        if override in PROTOCOLS:
            return override, f"{OVERRIDE}={override}"
        if override == "none":
            return None, f"{OVERRIDE}=none"
        return None, f"{OVERRIDE}={override} is not one of {', '.join(PROTOCOLS)}, none"
    term, program = env.get("TERM", ""), env.get("TERM_PROGRAM", "")
    if env.get("TMUX") or program == "tmux" or term.startswith(("screen", "tmux")):
        return None, "inside tmux/screen, which do not pass images through by default"
    if env.get("KITTY_WINDOW_ID") or term in _KITTY_TERMS or program in _KITTY_PROGRAMS or env.get("KONSOLE_VERSION"):
        return "kitty", "kitty graphics protocol"
    if program in _ITERM2_PROGRAMS or env.get("LC_TERMINAL") == "iTerm2":
        return "iterm2", f"iTerm2 inline images ({program or 'iTerm2'})"
    if term in _SIXEL_TERMS:
        return "sixel", f"sixel ({term})"
    name = program or term or "unknown"
    return None, f"this terminal ({name}) shows no inline images as far as its environment tells"


def encode_kitty(png: bytes) -> str:
    """A PNG as kitty graphics escapes, shown at the cursor."""
    data = base64.standard_b64encode(png).decode("ascii")
    chunks = [data[i:i + KITTY_CHUNK] for i in range(0, len(data), KITTY_CHUNK)] or [""]
    out = []
    for i, chunk in enumerate(chunks):
        more = int(i < len(chunks) - 1)
        keys = f"a=T,f=100,q=2,m={more}" if i == 0 else f"m={more}"
        out.append(f"\x1b_G{keys};{chunk}\x1b\\")
    return "".join(out)


def encode_iterm2(png: bytes) -> str:
    """A PNG (any format iTerm2 decodes) as one iTerm2 inline-image escape."""
    data = base64.standard_b64encode(png).decode("ascii")
    return f"\x1b]1337;File=inline=1;size={len(png)};preserveAspectRatio=1:{data}\x07"


def _run_length(values: list[int]) -> str:
    out = []
    for value, run in groupby(values):
        n, char = len(list(run)), chr(63 + value)
        out.append(f"!{n}{char}" if n > 3 else char * n)
    return "".join(out)


def encode_sixel(image: PILImage.Image) -> str:
    """An image as sixel: its own colours where there are at most 255 (sorted, so
    the output is exact), else a 255-colour palette."""
    import numpy as np
    from PIL import Image

    rgb = image.convert("RGB")
    colours = rgb.getcolors(SIXEL_COLOURS)
    if colours is not None:
        palette = sorted(c for _, c in colours)
        lookup = {c: i for i, c in enumerate(palette)}
        pixels = np.asarray(rgb).reshape(-1, 3)
        index = np.array([lookup[tuple(p)] for p in pixels.tolist()], dtype=np.int32).reshape(rgb.height, rgb.width)
    else:
        quantised = rgb.quantize(SIXEL_COLOURS, dither=Image.Dither.NONE)
        flat = quantised.getpalette() or []
        palette = [tuple(flat[i:i + 3]) for i in range(0, 3 * SIXEL_COLOURS, 3)]
        index = np.asarray(quantised, dtype=np.int32)
    out = [f'\x1bPq"1;1;{rgb.width};{rgb.height}']
    # Sixel colours are percentages.
    out += [f"#{i};2;" + ";".join(str(round(v * 100 / 255)) for v in colour) for i, colour in enumerate(palette)]
    bit = (1 << np.arange(6))[:, None]
    for top in range(0, rgb.height, 6):
        band = index[top:top + 6]
        for colour in np.unique(band).tolist():
            mask = ((band == colour) * bit[:len(band)]).sum(axis=0)
            out.append(f"#{colour}{_run_length(mask.tolist())}$")
        out.append("-")
    out.append("\x1b\\")
    return "".join(out)


def inline_image(image: PILImage.Image, protocol: str) -> str:
    """The escapes that draw ``image`` at the cursor in ``protocol``, then a newline."""
    if protocol == "sixel":
        return encode_sixel(image) + "\n"
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    encode = encode_kitty if protocol == "kitty" else encode_iterm2
    return encode(buffer.getvalue()) + "\n"
