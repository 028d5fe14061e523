"""Plot functions draw without pyplot: the caller's matplotlib backend and pyplot's figures stay as they were."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

from personalign.eval.generate import plot_generate
from personalign.eval.rewrite import plot_rewrite

IMG = Path(__file__).resolve().parents[1] / "docs" / "img"


def test_plots_leave_the_callers_backend_alone(tmp_path):
    import matplotlib.pyplot as plt

    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        plot_generate(json.loads((IMG / "generation_personal.json").read_text()), tmp_path / "g.png")
        plot_rewrite(json.loads((IMG / "rewrite.json").read_text()), tmp_path / "r.png")
        assert matplotlib.get_backend() == "svg" and plt.get_fignums() == []
    finally:
        matplotlib.use(before)
    for name in ("g.png", "r.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
