"""The advisor's report beyond its table: a bar chart as PNG, and records for the dashboard."""

from __future__ import annotations

import json
from pathlib import Path

from slipstream._core.extras import require
from slipstream.tune._advisor import TuneResult

_W, _ROW, _LEFT, _PAD = 760, 26, 300, 12


def plot_png(result: TuneResult, path: Path) -> Path:
    """A horizontal bar per trial (samples/s), the chosen one highlighted (needs Pillow)."""
    image = require("PIL.Image", feature="the advisor's plot")
    draw_mod = require("PIL.ImageDraw", feature="the advisor's plot")
    rows = result.trials
    height = _PAD * 3 + _ROW * (len(rows) + 1)
    img = image.new("RGB", (_W, height), "white")
    draw = draw_mod.Draw(img)
    draw.text((_PAD, _PAD), str(result.probes)[:120], fill="#334155")
    top = max((t.rate for t in rows), default=1.0) or 1.0
    for i, t in enumerate(rows):
        y = _PAD * 2 + _ROW * (i + 1)
        width = int((_W - _LEFT - 90) * t.rate / top)
        colour = (
            "#16a34a" if t.setting == result.best.setting else "#94a3b8" if t.error else "#2563eb"
        )
        draw.text((_PAD, y + 6), result.label(t)[:44], fill="#0f172a")
        draw.rectangle((_LEFT, y + 3, _LEFT + max(width, 1), y + _ROW - 5), fill=colour)
        ratio = t.rate / result.start.rate if result.start.rate > 0 else 0.0
        draw.text((_LEFT + width + 6, y + 6), f"{t.rate:,.0f}/s  {ratio:.2f}×", fill="#0f172a")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def write_records(result: TuneResult, directory: Path) -> Path:
    """``events.jsonl`` of ``"trial"`` records, for ``slipstream dashboard DIRECTORY``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "events.jsonl"
    with path.open("w") as f:
        for i, t in enumerate(result.trials):
            record = {
                "run": directory.parent.name or "tune",
                "time": result.created + i,
                "kind": "trial",
                "step": i,
                "samples_per_s": t.rate,
                "stall": t.stall,
                "label": result.label(t),
                "chosen": t.setting == result.best.setting,
            }
            f.write(json.dumps(record) + "\n")
    return path
