"""``cbir query --preview`` (issue 24): the terminal's image protocol told from its
environment, the exact escape framing of kitty, iTerm2 and sixel for tiny images,
and the command end to end on a pseudo-terminal (and where it cannot draw)."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys

import pytest
from PIL import Image
from typer.testing import CliRunner

from cbir_cli.cli import app
from cbir_cli.imageio.terminal_preview import (
    KITTY_CHUNK,
    detect_protocol,
    encode_iterm2,
    encode_kitty,
    encode_sixel,
    inline_image,
)


@pytest.mark.parametrize(("env", "expected"), [
    ({"TERM": "xterm-kitty"}, "kitty"),
    ({"TERM": "xterm-256color", "KITTY_WINDOW_ID": "3"}, "kitty"),
    ({"TERM": "xterm-ghostty", "TERM_PROGRAM": "ghostty"}, "kitty"),
    ({"TERM": "xterm-256color", "KONSOLE_VERSION": "230804"}, "kitty"),
    ({"TERM": "xterm-256color", "TERM_PROGRAM": "iTerm.app"}, "iterm2"),
    ({"TERM": "xterm-256color", "LC_TERMINAL": "iTerm2"}, "iterm2"),  # iTerm2 over ssh
    ({"TERM": "xterm-256color", "TERM_PROGRAM": "WezTerm"}, "iterm2"),
    ({"TERM": "xterm-256color", "TERM_PROGRAM": "mintty"}, "iterm2"),
    ({"TERM": "foot"}, "sixel"),
    ({"TERM": "mlterm"}, "sixel"),
    ({"TERM": "xterm-256color"}, None),
    ({"TERM": "xterm-256color", "TERM_PROGRAM": "Apple_Terminal"}, None),
    ({}, None),
    ({"TERM": "xterm-kitty", "TMUX": "/tmp/tmux-1000/default,1,0"}, None),  # tmux drops the escapes
    ({"TERM": "screen-256color", "TERM_PROGRAM": "iTerm.app"}, None),
    ({"TERM": "xterm-256color", "CBIR_PREVIEW": "sixel"}, "sixel"),  # the override wins
    ({"TERM": "xterm-kitty", "CBIR_PREVIEW": "none"}, None),
    ({"TERM": "xterm-kitty", "CBIR_PREVIEW": "png"}, None),
])
def test_the_protocol_is_told_from_the_environment(env, expected):
    protocol, why = detect_protocol(env, is_tty=True)
    assert protocol == expected, why
    assert why and "\n" not in why


def test_no_protocol_when_stdout_is_not_a_terminal():
    assert detect_protocol({"TERM": "xterm-kitty", "CBIR_PREVIEW": "kitty"}, is_tty=False) == (
        None, "stdout is not a terminal")


def test_an_unknown_override_is_named_with_the_choices():
    why = detect_protocol({"CBIR_PREVIEW": "png"}, True)[1]
    assert why == "CBIR_PREVIEW=png is not one of kitty, iterm2, sixel, none"


def test_kitty_framing_one_chunk_and_several():
    assert encode_kitty(b"abc") == "\x1b_Ga=T,f=100,q=2,m=0;YWJj\x1b\\"
    data = bytes(range(256)) * 20  # 5120 bytes: 6828 base64 characters, two chunks
    encoded = base64.standard_b64encode(data).decode()
    assert encode_kitty(data) == (f"\x1b_Ga=T,f=100,q=2,m=1;{encoded[:KITTY_CHUNK]}\x1b\\"
                                  f"\x1b_Gm=0;{encoded[KITTY_CHUNK:]}\x1b\\")


def test_iterm2_framing():
    assert encode_iterm2(b"abc") == "\x1b]1337;File=inline=1;size=3;preserveAspectRatio=1:YWJj\x07"


def test_sixel_framing_palette_bands_and_run_lengths():
    two = Image.new("RGB", (2, 1))
    two.putpixel((0, 0), (255, 0, 0))
    two.putpixel((1, 0), (0, 0, 255))
    # colours sorted (blue #0, red #1), in percent; one band: each colour's columns
    # as 63 + (bit of row 0); '$' back to the band's start, '-' the next band.
    assert encode_sixel(two) == '\x1bPq"1;1;2;1#0;2;0;0;100#1;2;100;0;0#0?@$#1@?$-\x1b\\'
    # 8 columns x 7 rows of one colour: runs of more than 3 as !N; two bands (6 rows, then 1).
    assert encode_sixel(Image.new("RGB", (8, 7), (0, 128, 0))) == (
        '\x1bPq"1;1;8;7#0;2;0;50;0#0!8~$-#0!8@$-\x1b\\')


def test_sixel_of_a_many_coloured_image_uses_a_255_colour_palette():
    noisy = Image.new("RGB", (40, 13))
    noisy.putdata([(i % 256, (7 * i) % 256, (13 * i) % 256) for i in range(40 * 13)])
    out = encode_sixel(noisy)
    assert out.startswith('\x1bPq"1;1;40;13#0;2;') and out.endswith("-\x1b\\")
    assert out.count("-") == 3  # bands of 6 rows: 13 rows are 3
    assert "#254;2;" in out and "#255;2;" not in out


def test_inline_image_carries_the_picture_as_png():
    picture = Image.new("RGB", (5, 3), (10, 20, 30))
    for protocol, start, end in [("kitty", "\x1b_Ga=T,f=100,q=2,m=0;", "\x1b\\\n"),
                                 ("iterm2", "\x1b]1337;File=inline=1;size=", "\x07\n")]:
        out = inline_image(picture, protocol)
        assert out.startswith(start) and out.endswith(end)
        payload = out[:-len(end)].rsplit(";" if protocol == "kitty" else ":", 1)[1]
        with Image.open(io.BytesIO(base64.b64decode(payload))) as decoded:
            assert decoded.size == (5, 3) and decoded.getpixel((0, 0)) == (10, 20, 30)


def _index(image_folder, n: int = 6):
    result = CliRunner().invoke(app, ["index", str(image_folder(n)), "--model", "test_tiny", "--workers", "0"])
    assert result.exit_code == 0, result.output


def test_preview_when_stdout_is_not_a_terminal_says_so_and_prints_the_results(image_folder, index_env):
    _index(image_folder)
    folder = index_env.parent / "images"
    result = CliRunner().invoke(app, ["query", str(folder / "img_002.jpg"), "-k", "3", "--preview"])
    assert result.exit_code == 0, result.output
    assert "note: --preview draws nothing: stdout is not a terminal; the results follow as text" in result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 3 and lines[0].split("\t")[1:3] == ["1", "1.0000"] and "\x1b" not in result.stdout


def test_preview_draws_the_top_hits_on_a_kitty_terminal(image_folder, index_env):
    """End to end on a pseudo-terminal that says it is kitty: the table, then one
    kitty image (query + 3 hits, captioned) per query."""
    import pty

    _index(image_folder)
    folder = index_env.parent / "images"
    leader, follower = pty.openpty()
    env = {**os.environ, "TERM": "xterm-kitty", "COLUMNS": "120", "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("TMUX", None)
    process = subprocess.Popen([sys.executable, "-m", "cbir_cli", "query", str(folder / "img_002.jpg"), "-k", "3",
                                "--preview", "--no-rerank"], stdout=follower, stderr=subprocess.PIPE, env=env)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert process.wait(120) == 0, process.stderr.read().decode()
    os.close(leader)
    out = b"".join(chunks).decode()
    assert "img_002.jpg" in out and out.count("\x1b_Ga=T,f=100,q=2,") == 1
    start = out.index("\x1b_G")
    payload = "".join(part.split(";", 1)[1] for part in out[start:].split("\x1b\\")[:-1] if part.startswith("\x1b_G"))
    with Image.open(io.BytesIO(base64.b64decode(payload))) as drawn:
        assert drawn.format == "PNG" and drawn.width > 4 * 96 > drawn.height
