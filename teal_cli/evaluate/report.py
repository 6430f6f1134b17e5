"""``--report DIR``: the pictures behind the numbers, as PNGs and one ``index.html``.

- ``recon``: originals beside their reconstructions (``recon.png``);
- ``gen``: generations per prompt class, one row each, wrong ones framed red (``gen.png``);
- ``classify`` and ``gen``: the confusion matrix (``confusion.png``);
- training curves from a model directory's ``metrics.jsonl`` (``curves.png``): every
  numeric field against ``step``, losses on one panel (from 20 points on, a smoothed curve over
  the faint raw one), the learning rate on another.

The files written are listed in ``teal-report.json``; writing a report again into the same
folder first removes the files the previous report listed, so no stale picture stays beside
the new ones (other files in the folder are left alone).

Matplotlib's Agg backend (no display needed). Every file is written atomically;
``index.html`` also lists the metrics and the settings.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import DataError

if TYPE_CHECKING:
    from .result import EvalResult


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    from ..runtime.files import atomic_output

    with atomic_output(path, binary=True) as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)


def confusion_png(labels: list[str], matrix: list[list[int]], path: Path, title: str) -> None:
    """A confusion matrix: rows the true class, columns the predicted one, counts in the cells."""
    import numpy as np

    plt = _pyplot()
    m = np.asarray(matrix, dtype=float)
    n = len(labels)
    rows_shown = list(labels)
    if labels and labels[-1] == "(none)" and not m[-1].any():
        m, rows_shown = m[:-1], rows_shown[:-1]  # no true class is "(none)": only its column says something
    side = max(3.5, 0.55 * n + 1.8)
    fig, ax = plt.subplots(figsize=(side + 0.8, side))
    rows = m.sum(axis=1, keepdims=True)
    share = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)  # colour: share of the true class
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(rows_shown)):
        for j in range(n):
            if m[i, j]:
                ax.text(j, i, str(int(m[i, j])), ha="center", va="center", fontsize=9,
                        color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(n), labels, rotation=45 if max(map(len, labels), default=0) > 3 else 0, ha="right" if max(map(len, labels), default=0) > 3 else "center")
    ax.set_yticks(range(len(rows_shown)), rows_shown)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    _save(fig, path)


def recon_png(pairs: list, path: Path) -> None:
    """Originals (top row) above their reconstructions (bottom row)."""
    plt = _pyplot()
    n = len(pairs)
    fig, axes = plt.subplots(2, n, figsize=(2.2 * n, 4.8), squeeze=False)
    for j, (rid, original, recon) in enumerate(pairs):
        for i, (img, label) in enumerate(((original, "original"), (recon, "reconstruction"))):
            ax = axes[i][j]
            ax.imshow(img, interpolation="nearest" if max(img.shape[:2]) <= 64 else "antialiased")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(label, fontsize=11)
        name = Path(rid).name
        axes[0][j].set_title(name if len(name) <= 18 else name[:8] + "…" + name[-8:], fontsize=9)
    _save(fig, path)


def gen_png(grid: dict[str, list], path: Path) -> None:
    """One row per prompt class; each generation framed green (judged right) or red (wrong,
    with the judge's class above it)."""
    plt = _pyplot()
    rows = list(grid)
    cols = max((len(v) for v in grid.values()), default=1)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.25 * cols + 0.6, 1.4 * len(rows) + 0.5), squeeze=False,
                             layout="constrained")
    for i, cls in enumerate(rows):
        for j in range(cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(grid[cls]):
                image, judged = grid[cls][j]
                ok = judged == cls
                ax.imshow(image, interpolation="nearest")
                for spine in ax.spines.values():
                    spine.set_edgecolor("tab:green" if ok else "tab:red")
                    spine.set_linewidth(3)
                if not ok:
                    ax.set_title(f"judged {judged}", fontsize=8, color="tab:red", pad=2)
            else:
                ax.axis("off")
            if j == 0:
                ax.set_ylabel(cls, rotation=0, ha="right", va="center", fontsize=13, labelpad=8)
    fig.suptitle("generations per prompt class (green: judged right, red: wrong)", fontsize=10)
    _save(fig, path)


def read_curves(path: Path) -> list[dict]:
    """The lines of a ``metrics.jsonl`` (JSON objects with a ``step``); errors name the line.

    A torn last line (a run killed while writing it) is left out, as ``teal train --resume``
    does; a bad line before the last is a :class:`DataError`."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    rows = []
    for i, (n, line) in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if i == len(lines) - 1:
                break
            raise DataError(f"{path}:{n}: invalid JSON ({exc.msg})") from None
        if isinstance(row, dict) and isinstance(row.get("step"), (int, float)):
            rows.append(row)
    return rows


def smoothed(values: list[float]) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average (weight 0.9, about the last ten
    values) with its start-up bias removed, so the first points are not pulled to 0."""
    out, ema, norm = [], 0.0, 0.0
    for v in values:
        ema = 0.9 * ema + 0.1 * v
        norm = 0.9 * norm + 0.1
        out.append(ema / norm)
    return out


def _runs_end_to_end(rows: list[dict]) -> list[list[tuple[float, dict]]]:
    """Rows split by training run (``run`` key, else a step that goes back), each run's steps
    shifted to follow the previous run's last step: stage 2 is drawn after stage 1."""
    runs: list[list[dict]] = []
    for r in rows:
        if not runs or r.get("run", runs[-1][-1].get("run")) != runs[-1][-1].get("run") or r["step"] < runs[-1][-1]["step"]:
            runs.append([])
        runs[-1].append(r)
    out, offset = [], 0.0
    for run in runs:
        out.append([(offset + r["step"], r) for r in run])
        offset += max(r["step"] for r in run)
    return out


def curves_png(rows: list[dict], path: Path) -> bool:
    """Losses (every field with ``loss`` in its name) and the learning rate against step,
    successive runs (stage 1, stage 2, ...) end to end with a dashed line between them;
    False when there is nothing to draw."""
    plt = _pyplot()
    fields = sorted({k for r in rows for k, v in r.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)})
    losses = [k for k in fields if "loss" in k]
    lr = [k for k in fields if k in ("lr", "learning_rate")]
    if not losses and not lr:
        return False
    runs = _runs_end_to_end(rows)
    panels = [p for p in (losses, lr) if p]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.8), squeeze=False, layout="constrained")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, keys in zip(axes[0], panels):
        for i, k in enumerate(keys):
            for j, run in enumerate(runs):
                pts = [(x, r[k]) for x, r in run if isinstance(r.get(k), (int, float))]
                if not pts:
                    continue
                xs, ys = [p[0] for p in pts], [p[1] for p in pts]
                color, label = colors[i % len(colors)], k if j == 0 or not ax.get_legend_handles_labels()[1].count(k) else None
                if keys is losses and len(pts) >= 20:
                    # Per-step losses are noisy: the raw values faint, a smoothed curve over them.
                    ax.plot(xs, ys, color=color, alpha=0.25, lw=0.8)
                    ax.plot(xs, smoothed(ys), color=color, lw=1.6, label=label)
                else:
                    ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, ms=3, color=color, label=label)
        for run in runs[1:]:
            ax.axvline(run[0][0], color="grey", ls="--", lw=0.8)
        ax.set_xlabel("step (runs end to end)" if len(runs) > 1 else "step")
        ax.set_ylabel("learning rate" if keys is lr else "loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_title("training curves")
    _save(fig, path)
    return True


def write_report(result: "EvalResult", folder: str | Path, curves: str | Path | None = None) -> list[Path]:
    """Draw what ``result`` has to show into ``folder`` (created) plus ``index.html``;
    ``curves`` is a ``metrics.jsonl`` or a model directory holding one (ignored when absent).
    Returns the files written."""
    from ..runtime.files import atomic_output

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _remove_previous(folder)
    written: list[tuple[Path, str]] = []
    if result.task == "recon" and result.figures.get("pairs"):
        recon_png(result.figures["pairs"], folder / "recon.png")
        written.append((folder / "recon.png", "Originals (top) and their reconstructions (bottom)"))
    if result.task == "gen" and result.figures.get("grid"):
        gen_png(result.figures["grid"], folder / "gen.png")
        written.append((folder / "gen.png", "Generations per prompt class"))
    extra_html: list[str] = []
    if result.task == "speech-gen":
        from .speech import speech_report

        figures, extra_html = speech_report(result, folder)
        written += figures
    if result.confusion is not None and result.confusion["labels"]:
        acc = result.metrics.get("accuracy")
        title = f"{result.task}: confusion matrix" + (f" (accuracy {acc:.1%})" if acc is not None else "")
        confusion_png(result.confusion["labels"], result.confusion["matrix"], folder / "confusion.png", title)
        written.append((folder / "confusion.png", "Confusion matrix (rows: true class, columns: predicted)"))
    if curves is not None:
        path = Path(curves)
        path = path / "metrics.jsonl" if path.is_dir() else path
        if path.is_file():
            rows = read_curves(path)
            if rows and curves_png(rows, folder / "curves.png"):
                written.append((folder / "curves.png", f"Training curves ({path})"))
    body = [f"<h1>teal eval {html.escape(result.task)}</h1>", "<h2>Metrics</h2>", "<table>"]
    for k, v in result.metrics.items():
        body.append(f"<tr><td>{html.escape(k)}</td><td>{v:.6g}</td></tr>" if isinstance(v, float) else f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>")
    body.append("</table>")
    body.append("<p>" + ", ".join(f"{html.escape(k)}: {v}" for k, v in result.counts.items()) + "</p>")
    for path, caption in written:
        body.append(f"<figure><img src=\"{html.escape(path.name)}\" alt=\"{html.escape(caption)}\"><figcaption>{html.escape(caption)}</figcaption></figure>")
    body += extra_html
    body.append("<h2>Settings</h2><pre>" + html.escape(json.dumps(result.settings, indent=2, ensure_ascii=False)) + "</pre>")
    page = ("<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>teal eval " + html.escape(result.task) + "</title>"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}td{padding:2px 12px}"
            "img{max-width:100%}figure{margin:1.5em 0}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    with atomic_output(folder / "index.html") as f:
        f.write(page)
    files = [p for p, _ in written] + [folder / "index.html"]
    with atomic_output(folder / MANIFEST) as f:
        json.dump({"written_by": "teal eval --report", "files": [p.name for p in files]}, f, indent=1)
        f.write("\n")
    return files


MANIFEST = "teal-report.json"


def _remove_previous(folder: Path) -> None:
    """Remove the files an earlier report listed in its manifest (names only, inside ``folder``)."""
    import contextlib

    manifest = folder / MANIFEST
    try:
        names = json.loads(manifest.read_text(encoding="utf-8")).get("files", [])
    except (OSError, ValueError, AttributeError):
        return
    for name in names:
        if isinstance(name, str) and name == Path(name).name and name not in ("", ".", ".."):
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                (folder / name).unlink()
    with contextlib.suppress(FileNotFoundError):
        manifest.unlink()
