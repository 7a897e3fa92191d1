"""The demo's output: a per-turn table in the terminal and an HTML report with PNG plots."""

from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class ArmResult:
    """One arm's model after a turn: its test metric overall and per condition on the held-out test set
    (``accuracy`` holds top-1 accuracy for a classifier, COCO mAP@[.5:.95] for a detector: see METRICS)."""

    accuracy: float
    per_condition: dict[str, float]
    labels: int  # labels spent so far by this arm (cumulative, seed set excluded)
    model_version: str | None = None


@dataclass
class TurnResult:
    turn: int
    flywheel: ArmResult
    random: ArmResult
    frames_seen: int = 0
    uploads: int = 0
    model_errors: int = 0  # frames the deployed model got wrong this turn
    errors_captured: int = 0  # ... of which the fleet uploaded
    seconds: float = 0.0
    parts: dict[str, float] = field(default_factory=dict)  # wall time per part of the turn
    gate: str = ""  # the flywheel candidate's gate decision
    spent: int = 0  # labels the flywheel arm spent this turn
    budget: int = 0  # ... of this budget
    short: str = ""  # why it spent less than the budget ("" when it spent it all)
    short_fault: bool = False  # the shortfall was a fault (labeling broke), not the pool's supply
    launched: dict[str, float] = field(default_factory=dict)  # trainer run (rnd-1, fw-1) -> when the demo launched it

    @property
    def error_capture(self) -> float:
        return self.errors_captured / self.model_errors if self.model_errors else 0.0


METRICS = {"classify": "accuracy", "detect": "mAP"}  # each arm's test metric, by task
METRIC_NOTES = {
    "accuracy": "Accuracy is top-1 on held-out test images under every condition, each condition weighing the same.",
    "mAP": "mAP is COCO's mAP@[.5:.95] (pycocotools) of the exported model, run as the devices run it, on held-out "
           "test scenes under every condition, each condition weighing the same.",
}


def render_table(turns: list[TurnResult], *, labeler: str, metric: str = "accuracy") -> Any:
    """A rich Table of the turns so far (per-condition detail: :func:`render_conditions`); ``metric`` names what
    ``ArmResult.accuracy`` holds (accuracy, or mAP for a detector)."""
    from rich.table import Table

    table = Table(title=f"Flywheel vs random labeling, test {metric} (labels: {labeler})")
    for col in ("turn", "labels", "flywheel", "random", "weakest (fw / rnd)", "errors uploaded", "uploads", "time"):
        table.add_column(col, justify="right")
    for t in turns:
        weakest = min(t.flywheel.per_condition, key=t.flywheel.per_condition.__getitem__, default="")
        labels = str(t.flywheel.labels)
        if t.short:
            labels += f" [{'red' if t.short_fault else 'yellow'}](short {t.spent}/{t.budget})[/]"
        table.add_row(
            str(t.turn), labels, f"{t.flywheel.accuracy:.3f}", f"{t.random.accuracy:.3f}",
            f"{weakest} {t.flywheel.per_condition.get(weakest, 0):.2f} / {t.random.per_condition.get(weakest, 0):.2f}"
            if weakest else "-",
            f"{t.error_capture:.0%}" if t.model_errors else "-", str(t.uploads), f"{t.seconds:.0f}s",
        )
    return table


def render_conditions(turn: TurnResult, *, metric: str = "accuracy") -> Any:
    """The test metric per condition for both arms after one turn."""
    from rich.table import Table

    table = Table(title=f"Test {metric} per condition after turn {turn.turn} "
                        f"({turn.flywheel.labels} labels each)")
    for col in ("condition", "flywheel", "random"):
        table.add_column(col, justify="right")
    for c in sorted(turn.flywheel.per_condition):
        table.add_row(c, f"{turn.flywheel.per_condition[c]:.3f}", f"{turn.random.per_condition.get(c, 0):.3f}")
    return table


def write_report(turns: list[TurnResult], out_dir: Path, *, title: str, settings: dict[str, Any],
                 labeler: str, error: str | None = None, metric: str = "accuracy",
                 examples: list[tuple[Path, str]] | None = None) -> Path:
    """Write ``results.json``, PNG plots and ``index.html`` into ``out_dir``; return the HTML path. ``error``:
    why the run stopped early (the report then shows the turns before it). ``metric`` names the arms' test
    metric; ``examples``: pictures already in ``out_dir`` with their captions (a detector's boxes before and
    after)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(
        {"settings": settings, "labeler": labeler, "error": error, "metric": metric,
         "turns": [{**asdict(t), "error_capture": t.error_capture} for t in turns]}, indent=2))
    plots = _plots(turns, out_dir, metric=metric) if turns else []
    rows = "".join(
        f"<tr{_SHORT_ROW if t.short else ''}><td>{t.turn}</td><td>{t.flywheel.labels}"
        f"{_short_note(t)}</td><td>{t.flywheel.accuracy:.3f}</td>"
        f"<td>{t.random.accuracy:.3f}</td><td>{_capture(t)}</td><td>{t.uploads}</td>"
        f"<td>{html.escape(t.gate)}</td><td>{t.seconds:.1f}s</td></tr>"
        for t in turns
    )
    imgs = "".join(f'<figure><img src="{p.name}" alt="{p.stem}"><figcaption>{p.stem}</figcaption></figure>'
                   for p in plots)
    imgs += "".join(f'<figure><img src="{p.name}" alt="{p.stem}" class="example"><figcaption>'
                    f'{html.escape(caption)}</figcaption></figure>' for p, caption in examples or [])
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}tr.short{{background:#fde8e8}}
figure{{display:inline-block;margin:1em}}
img{{max-width:500px}}img.example{{max-width:1000px}}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Labels from: <b>{html.escape(labeler)}</b>. Both arms spend the same labels per turn with the same trainer and
seeds; the flywheel's come from the hub's selection among what the fleet uploaded, the random arm's uniformly from
everything the fleet saw. {METRIC_NOTES.get(metric, "")} "Errors captured" is the share of the deployed model's
wrong answers on the fleet's frames (for a detector: its missed and wrong boxes) that the devices uploaded.</p>
<p>Settings: <code>{html.escape(json.dumps(settings))}</code></p>
{f'<p style="color:#b00"><b>The run stopped early:</b> {html.escape(error)}</p>' if error else ''}
{_short_banner(turns)}
<table><tr><th>turn</th><th>labels</th><th>{metric} (flywheel)</th><th>{metric} (random)</th>
<th>errors captured</th><th>uploads</th><th>gate</th><th>time</th></tr>{rows}</table>
{imgs}
</body></html>"""
    path = out_dir / "index.html"
    path.write_text(doc)
    return path


_SHORT_ROW = ' class="short"'


def _short_banner(turns: list[TurnResult]) -> str:
    short = [t for t in turns if t.short]
    if not short:
        return ""
    items = "".join(f"<li>turn {t.turn}: {html.escape(t.short)}</li>" for t in short)
    return f"<p><b>Turns that spent less than their label budget:</b></p><ul>{items}</ul>"


def _short_note(t: TurnResult) -> str:
    if not t.short:
        return ""
    kind = "fault" if t.short_fault else "supply"
    return f' <span title="{html.escape(t.short)}">(short, {kind}: {t.spent}/{t.budget})</span>'


def _capture(t: TurnResult) -> str:
    return f"{t.error_capture:.0%}" if t.model_errors else "-"


def _plots(turns: list[TurnResult], out_dir: Path, *, metric: str = "accuracy") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths: list[Path] = []
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([t.flywheel.labels for t in turns], [t.flywheel.accuracy for t in turns], "o-", label="flywheel")
    ax.plot([t.random.labels for t in turns], [t.random.accuracy for t in turns], "s--", label="random")
    ax.set_xlabel("labels spent")
    ax.set_ylabel(f"test {metric}")
    ax.set_title(f"Test {metric} per label spent")
    ax.grid(alpha=0.3)
    ax.legend()
    paths.append(out_dir / f"{metric.lower()}_vs_labels.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    last = turns[-1]
    conditions = sorted(last.flywheel.per_condition)
    if conditions:
        fig, ax = plt.subplots(figsize=(7, 4))
        xs = range(len(conditions))
        ax.bar([x - 0.2 for x in xs], [last.flywheel.per_condition[c] for c in conditions], 0.4, label="flywheel")
        ax.bar([x + 0.2 for x in xs], [last.random.per_condition.get(c, 0.0) for c in conditions], 0.4,
               label="random")
        ax.set_xticks(list(xs), conditions, rotation=20)
        ax.set_ylim(0, 1)
        ax.set_ylabel(f"test {metric}")
        ax.set_title(f"Per condition after turn {last.turn}")
        ax.legend()
        paths.append(out_dir / "per_condition.png")
        fig.tight_layout()
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)

    captured = [t for t in turns if t.model_errors]
    if captured:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.bar([t.turn for t in captured], [t.error_capture for t in captured])
        ax.set_xticks([t.turn for t in captured])
        ax.set_xlabel("turn")
        ax.set_ylabel("share of the model's errors uploaded")
        ax.set_ylim(0, 1)
        ax.set_title("Error capture by the fleet's triggers")
        paths.append(out_dir / "error_capture.png")
        fig.tight_layout()
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths
