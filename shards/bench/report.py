"""What ``ucc bench`` shows: a progress line while it runs, a table, and the ``--json`` object.

Owns: percentiles of the latency histograms, the progress display (stderr; rewritten in place
on a terminal, one line per phase otherwise), the table (metric, ucc, reference, ratio) and the
JSON document. Must never write anything but the one JSON object to stdout when ``--json`` is
given (the table then goes to stderr), and never round a figure that a check reads.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

from shards.bench.loadclient import bucket_ms

PERCENTILES = (("p50", 0.50), ("p90", 0.90), ("p99", 0.99))


def percentiles(hist: Mapping[int, int], max_ns: int | None = None) -> dict[str, float] | None:
    """``{p50, p90, p99, max}`` in milliseconds from a bucket histogram (None when empty)."""
    total = sum(hist.values())
    if total == 0:
        return None
    result: dict[str, float] = {}
    ordered = sorted(hist.items())
    for name, q in PERCENTILES:
        rank = q * total
        seen = 0
        for index, count in ordered:
            seen += count
            if seen >= rank:
                result[name] = bucket_ms(index)
                break
    last = bucket_ms(ordered[-1][0])
    result["max"] = round(max_ns / 1e6, 3) if max_ns is not None else last
    return result


class Progress:
    """One status line on stderr, rewritten in place on a terminal, throttled otherwise."""

    def __init__(self, stream: TextIO = sys.stderr, quiet: bool = False) -> None:
        self.stream = stream
        self.quiet = quiet
        self.tty = stream.isatty()
        self._last = 0.0
        self._width = 0

    def phase(self, text: str) -> None:
        """A new phase: always shown, on its own line."""
        if self.quiet:
            return
        self._clear()
        print(f"ucc bench: {text}", file=self.stream, flush=True)

    def update(self, text: str) -> None:
        """A progress figure: in place on a terminal, else at most every 2 s."""
        if self.quiet:
            return
        now = time.monotonic()
        if self.tty:
            line = f"  {text}"
            self.stream.write("\r" + line.ljust(self._width))
            self.stream.flush()
            self._width = len(line)
        elif now - self._last >= 2.0:
            self._last = now
            print(f"  {text}", file=self.stream, flush=True)

    def _clear(self) -> None:
        if self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self._width = 0

    def done(self) -> None:
        self._clear()


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0 or abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, dict):
        return " ".join(f"{k}={_cell(v)}" for k, v in value.items())
    return str(value)


SKIP = {"reference", "scenario", "points", "server", "errors"}


def table(result: Mapping[str, Any]) -> str:
    """The result as aligned text: one row per figure, with the reference's when there is one."""
    reference = result.get("reference") or {}
    rows = [("figure", "ucc", "reference" if reference else "")]
    for key, value in result.items():
        if key in SKIP:
            continue
        rows.append((key, _cell(value), _cell(reference.get(key)) if reference else ""))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"scenario: {result.get('scenario')}  server: {result.get('server', '-')}"]
    for row in rows:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    for error in result.get("errors") or ():
        lines.append(f"error: {error}")
    return "\n".join(line.rstrip() for line in lines)


def sweep_table(result: Mapping[str, Any]) -> str:
    """A sweep: one row per point (members or connections), then the fitted line."""
    columns = [
        "members",
        "connections",
        "delivered_per_s",
        "delivery_ratio",
        "server_cpu_us_per_frame",
        "server_cpu_us_per_broadcast",
        "server_rss_bytes_per_conn",
        "connects_per_s",
    ]
    points = result.get("points") or []
    present = [c for c in columns if any(p.get(c) is not None for p in points)]
    rows = [present]
    for point in points:
        p99 = (point.get("latency_ms") or {}).get("p99")
        rows.append([_cell(point.get(c)) for c in present] + [_cell(p99)])
    rows[0] = [*present, "p99_ms"]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [f"sweep: {result.get('scenario')}"]
    for row in rows:
        lines.append("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
    fit = result.get("fit")
    if fit:
        lines.append(
            f"fit: server CPU per broadcast = {fit['per_broadcast_us']:.1f} µs"
            f" + {fit['per_recipient_us']:.2f} µs x recipients"
        )
    return "\n".join(lines)


def emit(result: Mapping[str, Any], as_json: bool) -> None:
    """Print the result: JSON on stdout (table on stderr), or the table on stdout."""
    text = sweep_table(result) if "points" in result else table(result)
    if as_json:
        print(text, file=sys.stderr)
        print(json.dumps(result), flush=True)
    else:
        print(text, flush=True)
