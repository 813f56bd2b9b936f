"""Human-facing outputs: the accuracy chart and the end-of-run summary table."""

from __future__ import annotations

from pathlib import Path


def columns(table: dict[str, dict[str, float]]) -> list[str]:
    """The skills of a models × skills table, in order, `general` last."""
    return sorted({s for row in table.values() for s in row}, key=lambda s: (s == "general", s))


def accuracy_chart(table: dict[str, dict[str, float]], path: Path, title: str) -> Path:
    """Grouped bars: one group per skill, one bar per model, each labelled with its value; exact-match accuracy 0..1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(table)
    skills = columns(table)
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(min(18, max(7, 0.45 * len(skills) * max(1, len(models)) + 2.5)), 4))
    for i, m in enumerate(models):
        xs = [j + i * width for j in range(len(skills))]
        values = [table[m].get(s, 0.0) for s in skills]
        # a zero is drawn as a sliver, so a model that scores nothing still shows as a bar
        bars = ax.bar(xs, [max(v, 0.006) for v in values], width, label=m)
        ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], fontsize=6, rotation=90, padding=2)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(skills))], skills)
    ax.set_ylim(0, 1.18)
    ax.set_ylabel("exact-match accuracy")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # beside the bars, not over them
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def general_drops(table: dict[str, dict[str, float]], column: str = "general") -> dict[str, float]:
    """Each model's general ability against the base's, in points lost (positive: worse than the base); {} without it."""
    if column not in table.get("base", {}):
        return {}
    base = table["base"][column]
    return {m: round(100 * (base - row[column]), 2) for m, row in table.items() if m != "base" and column in row}


def accuracy_table(table: dict[str, dict[str, float]], general_drops: dict[str, float] | None = None) -> str:
    """Models × skills, `general` last; with `general_drops`, each model's general ability lost against the base in points."""
    skills = columns(table)
    drop = ["general drop (points)"] if general_drops else []
    return format_table(["model", *skills, *drop],
                        [[m, *(f"{table[m].get(s, float('nan')):.3f}" for s in skills),
                          *([f"{general_drops[m]:+.1f}" if m in general_drops else "-"] if general_drops else [])] for m in table])


def table_rows(table: dict[str, dict[str, float]], general_drops: dict[str, float] | None = None) -> list[dict[str, object]]:
    """The models × skills matrix as rows (`model`, each skill, and the general drop when given, 0 for the base it is
    measured against), for an MLflow table."""
    skills = columns(table)
    drops = {"base": 0.0, **general_drops} if general_drops else {}
    return [{"model": m, **{s: table[m].get(s) for s in skills}, **({"general_drop_points": drops.get(m)} if drops else {})}
            for m in table]
