"""The fleet view: what the aggregator has accepted, per did and per run.

GET /dids             every did: accepted receipts, verified ops, runs, last seen, its best
                      current rate floor and its rejections by reason (JSON); a page of
                      ?limit= (default 200, at most 1000) dids after ?after=, with `next`
GET /dids/<did>       one did, with each of its runs and their rate floors (JSON)
GET /fleet            the same drawn as a page (server-side HTML and SVG; no script, no
                      external resource; refreshes itself)

Rate floors (spec §8, §9): for a run challenge, Σ ops / interval, where the interval runs
from the challenge's issue to the last acceptance and is measured on a clock that does not
step. A challenge whose interval is not positive has no floor and is flagged.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs, unquote

_DID_PATH = re.compile(r"/dids/(.{1,256})", re.S)


def challenge_floors(rows: Iterable[tuple[Any, ...]], lookup: Callable[[str], dict[str, Any] | None]) -> list[dict[str, Any]]:
    """Per challenge: receipts, Σ ops, the interval and the floor. `rows` are
    (ops, accepted_ms, challenge, challenge_elapsed_ms) of challenged receipts."""
    groups: dict[str, list[tuple[int, int, int | None]]] = {}
    for ops, accepted_ms, challenge, elapsed_ms in rows:
        if challenge:
            groups.setdefault(challenge, []).append((int(ops), int(accepted_ms), elapsed_ms))
    out = []
    for challenge, items in groups.items():
        issued = lookup(challenge)
        if issued is None:
            continue
        ops_total = sum(ops for ops, _, _ in items)
        last = max(accepted for _, accepted, _ in items)
        elapsed = [e for _, _, e in items]
        if all(e is not None for e in elapsed):
            interval_ms, clock = max(int(e) for e in elapsed if e is not None), "monotonic"
        else:  # receipts stored before intervals were measured: the wall clock is all there is
            interval_ms, clock = last - int(issued["issued_ms"]), "wall"
        entry: dict[str, Any] = {"challenge": challenge, "issued_ms": issued["issued_ms"], "last_accepted_ms": last,
                                 "receipts": len(items), "ops_total": ops_total, "interval_ms": interval_ms,
                                 "interval_clock": clock, "rate_floor_ops_per_s": None}
        if interval_ms > 0:
            entry["rate_floor_ops_per_s"] = ops_total / (interval_ms / 1000.0)
        else:
            entry["flag"] = "interval_not_positive"
        out.append(entry)
    return out


def run_report(run_id: str, rows: list[tuple[Any, ...]], lookup: Callable[[str], dict[str, Any] | None]) -> dict[str, Any]:
    """/runs/<id>: rows are (did, ops, accepted_ms, challenge, challenge_elapsed_ms)."""
    challenges = challenge_floors([row[1:] for row in rows], lookup)
    report: dict[str, Any] = {
        "run_id": run_id, "dids": sorted({row[0] for row in rows}), "receipts": len(rows),
        "ops_total": sum(int(row[1]) for row in rows), "first_accepted_ms": min(row[2] for row in rows),
        "last_accepted_ms": max(row[2] for row in rows), "challenges": challenges,
        "rate_floor_ops_per_s": None,
    }
    if len(challenges) == 1:
        report["challenge_issued_ms"] = challenges[0]["issued_ms"]
        report["rate_floor_ops_per_s"] = challenges[0]["rate_floor_ops_per_s"]
        if challenges[0]["rate_floor_ops_per_s"] is not None:
            report["rate_floor_tflops"] = challenges[0]["rate_floor_ops_per_s"] / 1e12
        else:
            report["flag"] = challenges[0]["flag"]
    return report


def did_report(store: Any, did: str) -> dict[str, Any] | None:
    rows = store.did_rows(did)
    if not rows:
        return None
    runs: dict[str, list[tuple[Any, ...]]] = {}
    for run_id, ops, accepted_ms, challenge, elapsed in rows:
        runs.setdefault(run_id, []).append((ops, accepted_ms, challenge, elapsed))
    run_list: list[dict[str, Any]] = []
    for run_id, items in runs.items():
        floors = challenge_floors(items, store.challenge)
        run_list.append({"run_id": run_id, "receipts": len(items), "ops_total": sum(int(i[0]) for i in items),
                         "last_accepted_ms": max(i[1] for i in items), "challenges": floors})
    run_list.sort(key=lambda run: run["last_accepted_ms"])
    latest_floor: float | None = None
    for run in reversed(run_list):
        rates: list[float] = [c["rate_floor_ops_per_s"] for c in run["challenges"] if c["rate_floor_ops_per_s"] is not None]
        if rates:
            latest_floor = max(rates)
            break
    return {"did": did, "receipts": len(rows), "ops_total": sum(int(row[1]) for row in rows),
            "first_accepted_ms": rows[0][2], "last_seen_ms": rows[-1][2], "runs": run_list,
            "rate_floor_ops_per_s": latest_floor,
            "rejections": {reason: count for _, reason, count, _ in store.rejections(did)}}


DEFAULT_PAGE, MAX_PAGE = 200, 1000


def fleet_report(store: Any, after: str = "", limit: int = DEFAULT_PAGE) -> dict[str, Any]:
    rows = store.fleet_rows(after, limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    dids = []
    for did, receipts, ops, first, last, runs in rows:
        report = did_report(store, did) or {}
        dids.append({"did": did, "receipts": int(receipts), "ops_total": int(ops or 0), "runs": int(runs),
                     "first_accepted_ms": first, "last_seen_ms": last,
                     "rate_floor_ops_per_s": report.get("rate_floor_ops_per_s"),
                     "rejections": report.get("rejections", {})})
    return {"dids": dids, "receipts": sum(d["receipts"] for d in dids), "ops_total": sum(d["ops_total"] for d in dids),
            "next": rows[-1][0] if more else None}


class FleetViews:
    """WSGI middleware: /dids, /dids/<did> and /fleet; everything else goes to `app`."""

    def __init__(self, app: Callable[..., Iterable[bytes]], store: Any):
        self.app = app
        self.store = store

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "") or "/"
        if path not in ("/dids", "/fleet") and not path.startswith("/dids/"):
            return self.app(environ, start_response)
        if environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD"):
            return _send(start_response, 405, {"ok": False, "error": "method_not_allowed", "detail": f"{path} answers GET"},
                         [("Allow", "GET")])
        try:
            if path in ("/dids", "/fleet"):
                query = parse_qs(str(environ.get("QUERY_STRING", "")), max_num_fields=10)
                after = query.get("after", [""])[0][:256]
                try:
                    limit = min(MAX_PAGE, max(1, int(query.get("limit", [DEFAULT_PAGE])[0])))
                except ValueError:
                    return _send(start_response, 400, {"ok": False, "error": "bad_limit", "detail": "limit is a number"})
                report = fleet_report(self.store, after, limit)
            if path == "/dids":
                return _send(start_response, 200, report)
            if path == "/fleet":
                page = render_page(report).encode("utf-8")
                start_response("200 OK", [("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(page))),
                                          ("Cache-Control", "no-store")])
                return [page]
            match = _DID_PATH.fullmatch(path)
            did = unquote(match.group(1)) if match else ""
            one = did_report(self.store, did) if did else None
            if one is None:
                return _send(start_response, 404, {"ok": False, "error": "unknown_did", "detail": "no accepted receipts for this did"})
            return _send(start_response, 200, one)
        except Exception as exc:  # the database failed: the same transient answer as the API's
            from tops_job.aggregator.app import _storage_errors

            if not isinstance(exc, _storage_errors()):
                raise
            return _send(start_response, 503, {"ok": False, "error": "storage_unavailable", "detail": "the database failed; retry later"},
                         [("Retry-After", "1")])


def _send(start_response: Callable[..., Any], status: int, body: dict[str, Any],
          headers: list[tuple[str, str]] | None = None) -> list[bytes]:
    from tops_job.aggregator.app import REASONS

    data = json.dumps(body, separators=(",", ":")).encode("utf-8")
    start_response(f"{status} {REASONS.get(status, 'Unknown')}",
                   [("Content-Type", "application/json"), ("Content-Length", str(len(data))), *(headers or [])])
    return [data]


def _rate(value: float | None) -> str:
    if value is None:
        return "–"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}ops/s"
    return f"{value:.0f} ops/s"


def render_page(report: dict[str, Any]) -> str:
    """The fleet as HTML: a table of dids and an SVG bar chart of verified ops per did."""
    dids = report["dids"]
    esc = html.escape
    width, bar_h = 720, 22
    top = max((d["ops_total"] for d in dids), default=0) or 1
    bars = []
    for i, d in enumerate(dids):
        w = max(1, int((width - 260) * d["ops_total"] / top))
        y = 10 + i * (bar_h + 6)
        bars.append(f'<text x="0" y="{y + 15}" font-size="12">{esc(d["did"][:34])}</text>'
                    f'<rect x="250" y="{y}" width="{w}" height="{bar_h}" fill="#3b7dd8"><title>{d["ops_total"]} ops</title></rect>')
    height = 20 + len(dids) * (bar_h + 6)
    rows = []
    for d in dids:
        rejected = ", ".join(f"{esc(reason)}: {count}" for reason, count in sorted(d["rejections"].items())) or "none"
        rows.append(f'<tr class="did"><td>{esc(d["did"])}</td><td>{d["receipts"]}</td><td>{d["ops_total"]:.3e}</td>'
                    f'<td>{d["runs"]}</td><td>{_rate(d["rate_floor_ops_per_s"])}</td>'
                    f'<td data-ms="{d["last_seen_ms"]}">{d["last_seen_ms"]}</td><td>{rejected}</td></tr>')
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="10">
<title>tops-job aggregator: fleet</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child{{text-align:left}}</style></head>
<body><h1>Fleet</h1>
<p id="totals">{len(dids)} dids, {report["receipts"]} accepted receipts, {report["ops_total"]:.3e} verified ops
{f'(first page; <a href="?after={html.escape(report["next"], quote=True)}">next</a>)' if report.get("next") else ""}</p>
<svg id="ops-by-did" class="chart" data-points="{len(dids)}" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">
{"".join(bars)}</svg>
<table id="dids"><thead><tr><th>did</th><th>receipts</th><th>verified ops</th><th>runs</th><th>rate floor</th>
<th>last seen (ms)</th><th>rejections</th></tr></thead><tbody>
{"".join(rows)}</tbody></table></body></html>
"""
