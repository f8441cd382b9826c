"""history.csv: one row per epoch of a variant (DVC plot data), and its Markdown view (the KFP UI)."""

from __future__ import annotations

import csv
from pathlib import Path


def write_history(path: Path, history: list[dict]) -> None:
    """One row per epoch; columns in first-seen order (phases add alpha columns)."""
    columns = list(dict.fromkeys(k for row in history for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)


def history_markdown(models_dir: str | Path) -> str:
    """Every variant's history.csv as one Markdown table each (epoch, phase, loss, val accuracy)."""
    parts = []
    for path in sorted(Path(models_dir).glob("*/history.csv")):
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        columns = [c for c in ("epoch", "phase", "loss", "val_accuracy") if rows and c in rows[0]]
        parts += [f"## {path.parent.name}", "", "| " + " | ".join(columns) + " |",
                  "|" + "---|" * len(columns)]
        for row in rows:
            parts.append("| " + " | ".join(_short(row[c]) for c in columns) + " |")
        parts.append("")
    return "\n".join(parts) or "no history.csv under the models folder\n"


def _short(text: str) -> str:
    try:
        return f"{float(text):.4f}".rstrip("0").rstrip(".")
    except ValueError:
        return text
