"""The PNGs metalforge writes (tuning history, benchmarks): matplotlib without a display, and a
benchmark's figures saved next to its numbers."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")   # files only: no window, and no failure on a machine without a display
import matplotlib.pyplot as plt  # noqa: E402  (the backend is chosen before pyplot loads)


def figure(rows: int = 1, cols: int = 1, **kw):
    return plt.subplots(rows, cols, **kw)


def save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(out, data: dict, fig) -> None:
    """A benchmark's numbers as OUT.json and its figure as OUT.png, side by side."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(data, indent=2))
    save(fig, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
