"""The health server's HTML dashboard: SVG charts drawn on the server, no script, no
external resources; the page reloads itself every few seconds."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from typing import Any

from tops_job.delivery.outcomes import Outcome

REFRESH_S = 5
WIDTH, HEIGHT, PAD = 560, 200, 36


def render(*, health: dict[str, Any], seed: dict[str, Any], series: list[tuple[float, float, float]],
           product_buckets: list[tuple[str, int]], outcomes: dict[str, float]) -> str:
    m = seed["metrics"]
    cards = [("status", health["status"]), ("uptime", f"{health['uptime_seconds']} s"),
             ("attempts", f"{m['successful_attempts']} ok / {m['failed_attempts']} failed"),
             ("average product", f"{m['average_time_ms']} ms"), ("attempts/s", m["attempts_per_second"]),
             ("breaker", health.get("breaker", "?")), ("outbox", health.get("outbox_depth", 0))]
    card_html = "".join(f'<div class="card"><div class="k">{escape(str(k))}</div><div class="v">{escape(str(v))}</div></div>'
                        for k, v in cards)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH_S}">
<title>tops-job {escape(str(health.get('run_id', '')))}</title>
<style>
body{{font-family:system-ui,sans-serif;margin:1.5em;background:#fafafa;color:#222}}
.cards{{display:flex;flex-wrap:wrap;gap:.6em;margin-bottom:1em}}
.card{{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.5em .8em;min-width:8em}}
.k{{font-size:.75em;color:#666;text-transform:uppercase}} .v{{font-size:1.2em}}
section{{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.6em;margin:.6em 0;display:inline-block;vertical-align:top}}
h2{{font-size:1em;margin:.2em 0 .4em}} svg text{{font-size:10px;fill:#555}}
</style></head><body>
<h1>tops-job <small>run {escape(str(health.get('run_id', '')))} · v{escape(str(health.get('version', '')))}</small></h1>
<div class="cards">{card_html}</div>
<section><h2>Throughput over time (GFLOP/s per product)</h2>{throughput_chart(series)}</section>
<section><h2>Product time distribution</h2>{histogram_chart(product_buckets)}</section>
<section><h2>Outcomes</h2>{outcomes_chart(outcomes)}</section>
<p><a href="/health">/health</a> · <a href="/metrics">/metrics</a> · <a href="/metrics.json">/metrics.json</a>
 · refreshed every {REFRESH_S} s · {escape(str(health.get('timestamp', '')))}</p>
</body></html>
"""


def _svg(chart_id: str, points: int, body: str) -> str:
    return (f'<svg id="{chart_id}" class="chart" data-points="{points}" width="{WIDTH}" height="{HEIGHT}" '
            f'viewBox="0 0 {WIDTH} {HEIGHT}" xmlns="http://www.w3.org/2000/svg" role="img">'
            f'<line x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH - 8}" y2="{HEIGHT - PAD}" stroke="#999"/>'
            f'<line x1="{PAD}" y1="8" x2="{PAD}" y2="{HEIGHT - PAD}" stroke="#999"/>{body}</svg>')


def _empty(chart_id: str) -> str:
    return _svg(chart_id, 0, f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle">no data yet</text>')


def throughput_chart(series: list[tuple[float, float, float]]) -> str:
    if not series:
        return _empty("throughput")
    t0, t1 = series[0][0], series[-1][0]
    peak = max(rate for _, rate, _ in series) / 1e9 or 1.0
    span = (t1 - t0) or 1.0
    plot_w, plot_h = WIDTH - PAD - 16, HEIGHT - PAD - 16

    def xy(t: float, rate: float) -> tuple[float, float]:
        x = PAD + ((t - t0) / span * plot_w if len(series) > 1 else plot_w / 2)
        return round(x, 1), round(HEIGHT - PAD - rate / 1e9 / peak * plot_h, 1)

    coords = [xy(t, rate) for t, rate, _ in series]
    line = " ".join(f"{x},{y}" for x, y in coords)
    dots = "".join(f'<circle cx="{x}" cy="{y}" r="2.5" fill="#1f77b4"/>' for x, y in coords[-100:])
    labels = (f'<text x="{PAD - 4}" y="16" text-anchor="end">{peak:.3g}</text>'
              f'<text x="{PAD - 4}" y="{HEIGHT - PAD}" text-anchor="end">0</text>'
              f'<text x="{WIDTH - 8}" y="{HEIGHT - PAD + 14}" text-anchor="end">{span:.0f} s</text>')
    return _svg("throughput", len(series),
                f'<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{line}"/>{dots}{labels}')


def _bars(chart_id: str, items: Sequence[tuple[str, float, str]]) -> str:
    points = sum(1 for _, value, _ in items if value)
    if not points:
        return _empty(chart_id)
    peak = max(value for _, value, _ in items) or 1.0
    plot_w, plot_h = WIDTH - PAD - 16, HEIGHT - PAD - 16
    width = plot_w / len(items)
    body = []
    for i, (label, value, colour) in enumerate(items):
        h = value / peak * plot_h
        x = PAD + i * width
        body.append(f'<rect class="bar" x="{x + 2:.1f}" y="{HEIGHT - PAD - h:.1f}" width="{max(width - 4, 1):.1f}" '
                    f'height="{h:.1f}" fill="{colour}" data-value="{value:g}"><title>{escape(label)}: {value:g}</title></rect>')
        if value:
            body.append(f'<text x="{x + width / 2:.1f}" y="{HEIGHT - PAD - h - 3:.1f}" text-anchor="middle">{value:g}</text>')
        body.append(f'<text x="{x + width / 2:.1f}" y="{HEIGHT - PAD + 12}" text-anchor="middle">{escape(label)}</text>')
    return _svg(chart_id, points, "".join(body))


def histogram_chart(buckets: list[tuple[str, int]]) -> str:
    """Bars per bucket of the product-duration histogram, trimmed to the occupied range."""
    used = [i for i, (_, count) in enumerate(buckets) if count]
    if not used:
        return _empty("product-time")
    lo, hi = max(used[0] - 1, 0), min(used[-1] + 1, len(buckets) - 1)
    items = [(_bound_label(bound), count, "#2ca02c") for bound, count in buckets[lo:hi + 1]]
    return _bars("product-time", items)


def outcomes_chart(outcomes: dict[str, float]) -> str:
    colours = {"ok": "#2ca02c", Outcome.ACCEPTED.value: "#2ca02c", Outcome.DUPLICATE.value: "#98df8a",
               Outcome.PENDING.value: "#ff7f0e"}
    return _bars("outcomes", [(name, value, colours.get(name.split(":")[-1], "#d62728"))
                              for name, value in outcomes.items()])


def _bound_label(bound: str) -> str:
    if bound == "+Inf":
        return "≤∞"
    seconds = float(bound)
    return f"≤{seconds * 1000:g}ms" if seconds < 1 else f"≤{seconds:g}s"
