"""Chinese labels on matplotlib plots: use an installed CJK font, or fall back to English.

matplotlib's default font (DejaVu Sans) has no Chinese glyphs: Chinese labels come out as empty
boxes. Colab ships no CJK font (``apt-get install -y fonts-noto-cjk`` adds one); Windows and
macOS have one. Imports nothing from the package.
"""

from __future__ import annotations

from functools import cache

# Common CJK fonts by platform: Linux (Noto, WenQuanYi), Windows (YaHei, SimHei), macOS (PingFang).
CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "WenQuanYi Micro Hei",
             "WenQuanYi Zen Hei", "Microsoft YaHei", "SimHei", "PingFang SC", "Heiti SC",
             "Hiragino Sans GB", "AR PL UMing CN")


@cache
def _installed_cjk_font() -> str | None:
    from matplotlib import font_manager

    installed = {f.name for f in font_manager.fontManager.ttflist}
    return next((n for n in CJK_FONTS if n in installed), None)


def cjk_font() -> str | None:
    """The first installed CJK font matplotlib knows, after making it the default sans-serif."""
    import matplotlib

    name = _installed_cjk_font()
    if name is not None:
        sans = [n for n in matplotlib.rcParams["font.sans-serif"] if n != name]
        matplotlib.rcParams["font.sans-serif"] = [name, *sans]
        matplotlib.rcParams["font.family"] = "sans-serif"
        matplotlib.rcParams["axes.unicode_minus"] = False  # CJK fonts often lack U+2212
    return name


def label(zh: str, en: str) -> str:
    """``zh`` when a CJK font is installed (and now the default), else ``en``."""
    return zh if cjk_font() else en
