"""``keyledger audit report``: one self-contained HTML file with usage-over-time charts
(matplotlib, embedded as inline SVG), a lifecycle timeline and the tables behind them.

The page fetches nothing: no scripts, no style sheets, no fonts, no images from
anywhere; charts are inline ``<svg>`` whose data series carry ids
(``series-<name>``) so a test can count the points the browser rendered. Only what
the usage index holds appears (no key material, plaintext or ciphertext exists there).
"""

from __future__ import annotations

import html
import io
from datetime import date, datetime, timedelta
from typing import Any

from projections.usage import Filters, UsageIndex

STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: left; }
th { background: #eee; } td.n { text-align: right; }
.chart svg { max-width: 100%; height: auto; }
"""
MAX_SERIES = 8


def _svg(fig: Any) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    text = buf.getvalue()
    return text[text.index("<svg") :]


def _safe_id(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)


def _all_days(days: list[str]) -> list[str]:
    """Every day from the first to the last of ``days`` (YYYY-MM-DD), in order."""
    if not days:
        return []
    first, last = date.fromisoformat(min(days)), date.fromisoformat(max(days))
    return [(first + timedelta(days=i)).isoformat() for i in range((last - first).days + 1)]


def _num(mdates: Any, iso: str) -> float:
    return float(mdates.date2num(datetime.fromisoformat(iso)))


def _date_axis(ax: Any, mdates: Any) -> None:
    locator = mdates.AutoDateLocator()
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))


def usage_chart(rows: list[dict[str, Any]], title: str) -> str:
    """A line per group over days (``stats(..., per="day")`` rows), points marked.

    At most MAX_SERIES groups are drawn (the largest); the rest are summed as "other".
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    matplotlib.rcParams["svg.fonttype"] = "none"
    totals: dict[str, int] = {}
    for r in rows:
        totals[str(r["grp"])] = totals.get(str(r["grp"]), 0) + int(r["n"])
    top = [g for g, _ in sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))[:MAX_SERIES]]
    series: dict[str, dict[str, int]] = {}
    for r in rows:
        g = str(r["grp"]) if str(r["grp"]) in top else "other"
        day = series.setdefault(g, {})
        day[r["period"]] = day.get(r["period"], 0) + int(r["n"])
    fig, ax = plt.subplots(figsize=(10, 3.6))
    days = _all_days([str(r["period"]) for r in rows])
    for name in [*top, *(["other"] if "other" in series else [])]:
        xs = [_num(mdates, d) for d in days]
        ys = [series[name].get(d, 0) for d in days]  # days without calls are zeros
        label = name.rsplit("/", 1)[-1] if name.startswith("arn:") else name
        (line,) = ax.plot(xs, ys, marker="o", markersize=3, linewidth=1, label=label)
        line.set_gid(f"series-{_safe_id(label)}")
    ax.set_title(title)
    ax.set_ylabel("calls per day")
    _date_axis(ax, mdates)
    if series:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(alpha=0.3)
    svg = _svg(fig)
    plt.close(fig)
    return svg


def timeline_chart(events: list[dict[str, Any]], title: str) -> str:
    """Lifecycle events as labelled points on a time axis, one row per operation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    matplotlib.rcParams["svg.fonttype"] = "none"
    ops = sorted({str(e["operation"]) for e in events})
    fig, ax = plt.subplots(figsize=(10, max(1.6, 0.35 * len(ops) + 0.8)))
    for i, op in enumerate(ops):
        xs = [_num(mdates, e["time"]) for e in events if e["operation"] == op]
        (line,) = ax.plot(xs, [i] * len(xs), linestyle="none", marker="D", markersize=5)
        line.set_gid(f"series-lifecycle-{_safe_id(op)}")
    ax.set_yticks(range(len(ops)), ops, fontsize=7)
    ax.set_title(title)
    _date_axis(ax, mdates)
    ax.grid(alpha=0.3, axis="x")
    svg = _svg(fig)
    plt.close(fig)
    return svg


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title in columns)
    body = []
    for r in rows:
        cells = []
        for col, _ in columns:
            v = r.get(col)
            cls = ' class="n"' if isinstance(v, int) else ""
            cells.append(f"<td{cls}>{html.escape('' if v is None else str(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


STAT_COLUMNS = [("grp", "group"), ("n", "calls"), ("first", "first"), ("last", "last")]
ROW_COLUMNS = [
    ("seq", "seq"),
    ("time", "time"),
    ("operation", "operation"),
    ("error_code", "error"),
    ("principal", "principal"),
    ("source_ip", "source IP"),
    ("key_arn", "key"),
    ("key_sent", "KeyId as sent"),
]


#: Lifecycle events a report shows at most (the newest).
LIFECYCLE_LIMIT = 500


def build_report(index: UsageIndex, title: str, f: Filters, *, by: str) -> str:
    """The HTML page for the calls ``f`` selects; charts group by ``by`` (operation
    for one key, key for a principal or everything)."""
    daily = index.stats(f, by, "day")
    lifecycle = index.trail(Filters(**{**f.__dict__, "lifecycle": True, "limit": LIFECYCLE_LIMIT}))
    # Say so when the limit cut the history short
    cut = len(lifecycle) == LIFECYCLE_LIMIT
    changes = f"the last {LIFECYCLE_LIMIT} state changes" if cut else "state changes"
    count = f"the last {LIFECYCLE_LIMIT}" if cut else str(len(lifecycle))
    denied = index.trail(
        Filters(**{**f.__dict__, "error_code": "AccessDeniedException", "limit": 100})
    )
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{sum(int(r['n']) for r in daily)} calls; generated from the usage index at "
        f"seq {index.position}.</p>",
        "<h2>Usage over time</h2>",
        f"<div class='chart' id='usage-chart'>{usage_chart(daily, f'calls per day by {by}')}</div>",
        "<h2>Lifecycle timeline</h2>",
        f"<div class='chart' id='lifecycle-chart'>{timeline_chart(lifecycle, changes)}</div>",
        f"<h2>Calls by {html.escape(by)}</h2>",
        table(index.stats(f, by), STAT_COLUMNS),
        "<h2>Calls by principal</h2>",
        table(index.stats(f, "principal", top=50), STAT_COLUMNS),
        f"<h2>Lifecycle events ({count})</h2>",
        table(lifecycle, ROW_COLUMNS),
        f"<h2>Denied attempts (last {len(denied)})</h2>",
        table(denied, ROW_COLUMNS),
        "</body></html>",
    ]
    return "\n".join(parts)
