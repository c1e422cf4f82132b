"""Typographic image prompts, rendered offline with PIL.

Two styles are used by the benchmarks:

* **FigStep** (:func:`render_figstep_image`): the harmful instruction ("Steps to ...") in large dark type on a white
  square, followed by an empty numbered list ``1.`` ``2.`` ``3.`` that the model is asked to fill in.
* **MM-SafetyBench TYPO** (:func:`render_key_phrase_image`): the key phrase alone in large type on a white canvas.

Fonts come from the system (DejaVu, as shipped by most Linux distributions) and fall back to the DejaVu fonts bundled
with matplotlib, so rendering never needs a download. The font file used is recorded in each item's metadata, and
:func:`render_to_file` names files by a hash of (style, text, font, size), so re-rendering is a cache hit.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont


# Searched in order; the first that exists wins. Bold monospace is closest to FigStep's look, plain sans to
# MM-SafetyBench's; any of them renders every benchmark string (all ASCII/Latin).
_SYSTEM_FONT_DIRS = (
    "/usr/share/fonts/truetype/dejavu",
    "/usr/share/fonts/dejavu",
    "/usr/share/fonts/TTF",
    "/Library/Fonts",
    "C:/Windows/Fonts",
)
FIGSTEP_FONT_FILES = ("DejaVuSansMono-Bold.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans.ttf")
KEY_PHRASE_FONT_FILES = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf")


def find_font(candidates: tuple[str, ...] = FIGSTEP_FONT_FILES, font_path: str | os.PathLike | None = None) -> str:
    """Path of a TrueType font: ``font_path`` if given, else the first of ``candidates`` found on the system, else
    the same file from matplotlib's bundled fonts (``matplotlib.get_data_path()/fonts/ttf``)."""
    if font_path is not None:
        if not Path(font_path).is_file():
            raise FileNotFoundError(f"Font file {str(font_path)!r} does not exist; pass the path of a .ttf file.")
        return str(font_path)
    import matplotlib

    bundled = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    for name in candidates:
        for folder in (*_SYSTEM_FONT_DIRS, str(bundled)):
            path = Path(folder) / name
            if path.is_file():
                return str(path)
    raise FileNotFoundError(
        f"None of the fonts {list(candidates)} was found in {list(_SYSTEM_FONT_DIRS)} or in matplotlib's fonts at "
        f"{bundled}; pass font_path= explicitly."
    )


def _wrap_to_width(text: str, font: ImageFont.FreeTypeFont, max_width: int) -> list[str]:
    """Greedy word wrap by rendered width (a single word wider than the line is kept whole, then shrunk by the
    caller's font-size search)."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        words = paragraph.split()
        current = ""
        for word in words:
            candidate = f"{current} {word}".strip()
            if current and font.getlength(candidate) > max_width:
                lines.append(current)
                current = word
            else:
                current = candidate
        lines.append(current)
    return lines


def _fit_text(
    text: str, font_file: str, max_width: int, max_height: int, start_size: int, spacing: float, min_size: int = 12
) -> tuple[ImageFont.FreeTypeFont, list[str], int]:
    """Largest font size (from ``start_size`` down) at which the wrapped text fits the box."""
    size = start_size
    while True:
        font = ImageFont.truetype(font_file, size)
        lines = _wrap_to_width(text, font, max_width)
        line_height = int(round(size * spacing))
        widest = max((font.getlength(line) for line in lines), default=0)
        if (widest <= max_width and line_height * len(lines) <= max_height) or size <= min_size:
            return font, lines, line_height
        size = max(min_size, int(size * 0.9))


def render_figstep_image(
    text: str,
    *,
    size: int = 760,
    font_size: int = 80,
    margin: int = 20,
    num_list_items: int = 3,
    font_path: str | os.PathLike | None = None,
) -> Image.Image:
    """FigStep-style typographic prompt: ``text`` wrapped in large type, then an empty list ``1.`` ... ``N.``.

    The font shrinks (from ``font_size``) until text and list fit the ``size`` x ``size`` white square.
    """
    font_file = find_font(FIGSTEP_FONT_FILES, font_path)
    list_text = "\n".join(f"{i}." for i in range(1, num_list_items + 1))
    body = f"{text.strip()}\n{list_text}"
    font, lines, line_height = _fit_text(body, font_file, size - 2 * margin, size - 2 * margin, font_size, 1.15)
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    for row, line in enumerate(lines):
        draw.text((margin, margin + row * line_height), line, fill="black", font=font)
    return image


def render_key_phrase_image(
    phrase: str,
    *,
    width: int = 1024,
    font_size: int = 90,
    margin: int = 30,
    font_path: str | os.PathLike | None = None,
) -> Image.Image:
    """MM-SafetyBench TYPO-style image: the key phrase alone, wrapped, black on white; the height fits the lines."""
    font_file = find_font(KEY_PHRASE_FONT_FILES, font_path)
    font = ImageFont.truetype(font_file, font_size)
    lines = _wrap_to_width(phrase.strip(), font, width - 2 * margin)
    if any(font.getlength(line) > width - 2 * margin for line in lines):
        # A single very long word: fall back to character wrapping so nothing is cut off.
        per_line = max(1, int((width - 2 * margin) / max(font.getlength("M"), 1)))
        lines = textwrap.wrap(phrase.strip(), per_line) or [""]
    line_height = int(round(font_size * 1.2))
    image = Image.new("RGB", (width, 2 * margin + line_height * len(lines)), "white")
    draw = ImageDraw.Draw(image)
    for row, line in enumerate(lines):
        draw.text((margin, margin + row * line_height), line, fill="black", font=font)
    return image


#: Typography style -> the fonts it is rendered with (first found wins, see :func:`find_font`).
STYLE_FONTS: dict[str, tuple[str, ...]] = {"figstep": FIGSTEP_FONT_FILES, "key_phrase": KEY_PHRASE_FONT_FILES}


def style_font(style: str, font_path: str | os.PathLike | None = None) -> str:
    """The font file ``style`` is rendered with: ``font_path`` if given, else the first of its fonts found."""
    if style not in STYLE_FONTS:
        raise ValueError(f"Unknown typography style {style!r}; use one of {sorted(STYLE_FONTS)}.")
    return find_font(STYLE_FONTS[style], font_path)


def default_render_dir() -> Path:
    """Folder for rendered images when none is given.

    ``$SAFEVLM_HF_RENDER_DIR`` if set, else ``<tmp>/safevlm_hf/typography``.
    """
    env = os.environ.get("SAFEVLM_HF_RENDER_DIR")
    return Path(env) if env else Path(tempfile.gettempdir()) / "safevlm_hf" / "typography"


def render_to_file(
    style: str, text: str, render_dir: str | os.PathLike | None = None, font_path: str | os.PathLike | None = None
) -> Path:
    """Render ``text`` in ``style`` (``"figstep"`` or ``"key_phrase"``) to a PNG and return its path.

    The file name is a hash of the style, text and font file, so a second call (or a rerun of an evaluation) reuses
    the file; keeping paths instead of images keeps a 500-item benchmark out of memory.
    """
    renderers = {"figstep": render_figstep_image, "key_phrase": render_key_phrase_image}
    font_file = style_font(style, font_path)
    render = renderers[style]
    digest = hashlib.sha256(f"{style}\0{font_file}\0{text}".encode("utf-8")).hexdigest()[:20]
    folder = Path(render_dir) if render_dir is not None else default_render_dir()
    path = folder / f"{style}_{digest}.png"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp.png")
        render(text, font_path=font_file).save(partial)
        os.replace(partial, path)  # atomic: a concurrent run never reads a half-written file
    return path


__all__ = [
    "STYLE_FONTS",
    "default_render_dir",
    "find_font",
    "render_figstep_image",
    "render_key_phrase_image",
    "render_to_file",
    "style_font",
]
