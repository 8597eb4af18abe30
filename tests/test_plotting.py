"""Chinese plot labels: a CJK font when one is installed, English otherwise, never empty boxes."""

from __future__ import annotations

import warnings

import matplotlib

matplotlib.use("Agg")

from helpers.plotting import cjk_font, label  # noqa: E402


def test_label_follows_the_installed_fonts() -> None:
    font = cjk_font()
    assert label("并发请求数", "concurrent requests") == ("并发请求数" if font else "concurrent requests")


def test_the_chosen_label_renders_without_missing_glyphs() -> None:
    import matplotlib.pyplot as plt

    text = label("首个音频的等待（毫秒）", "time to first audio (ms)")
    fig, ax = plt.subplots()
    ax.set_xlabel(text)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig.canvas.draw()
    plt.close(fig)
    assert not [w for w in caught if "missing from font" in str(w.message)], text
