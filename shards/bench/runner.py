"""One ``ucc bench`` invocation: options, client processes, servers, scenario, reference, sweep.

Owns: turning the parsed flags into :class:`~shards.bench.scenarios.Options` (with each
scenario's defaults), raising the open-files limit, forking the client processes before any
event loop exists, starting a fresh server per measured point (or attaching to ``--target``),
the reference run and its ratios, the sweep and its least-squares line, and the exit code
(0: measured; 1: the server could not be started or reached). Must never leave a process behind:
servers are closed in ``finally``, client processes too.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import secrets
import sys
from typing import Any

from shards.bench import probes
from shards.bench.fleet import Fleet
from shards.bench.report import Progress, emit
from shards.bench.scenarios import Options, Run, layout
from shards.bench.servers import Server, ServerError, attach, start_reference, start_ucc
from shards.config import resolve_secret

# scenario -> (connections, members, rate (None: max), duration)
DEFAULTS: dict[str, tuple[int | None, int, float | None, float]] = {
    "idle": (1000, 10, None, 3.0),
    "connect": (1000, 10, None, 0.0),
    "fanout": (None, 1000, 10.0, 5.0),  # connections: as many as members
    "rooms": (1000, 10, 1000.0, 5.0),
    "direct": (1000, 1, None, 5.0),
}


def options(args: argparse.Namespace, sweep_value: int | None = None) -> Options:
    """The scenario's options from the flags (``sweep_value`` replaces M, or N for scenarios
    without channels of interest)."""
    connections, members, rate, duration = DEFAULTS[args.scenario]
    if args.members is not None:
        members = args.members
    if sweep_value is not None and args.scenario in ("fanout", "rooms"):
        members = sweep_value
    if args.rate is not None:
        rate = None if args.rate == "max" else float(args.rate)
    if args.duration is not None:
        duration = args.duration
    count = args.connections or connections or members
    if sweep_value is not None and args.scenario == "fanout":
        count = max(members, args.connections or 0)
    elif sweep_value is not None and args.scenario != "rooms":
        count = sweep_value
    return Options(
        scenario=args.scenario,
        connections=count,
        members=members,
        rate=rate,
        messages=args.messages,
        duration=duration,
        payload=args.payload,
        concurrency=args.concurrency,
        arrivals=args.arrivals,
        backends=args.backends,
    )


def client_processes(args: argparse.Namespace, largest: int) -> int:
    if args.client_procs:
        return int(args.client_procs)
    if largest <= 2000:
        return 1
    return min(4, max(2, math.ceil(largest / 12_500)))


def run(args: argparse.Namespace) -> int:
    """The ``ucc bench`` handler."""
    points: list[int | None] = list(args.sweep) if args.sweep else [None]
    opts = options(args)  # with the scenario's defaults (direct publishes flat out)
    if opts.backends > 1 and (opts.scenario not in ("rooms", "direct") or opts.rate is not None):
        print("ucc: error: --backends is for rooms and direct at --rate max", file=sys.stderr)
        return 2
    largest = max(options(args, point).connections for point in points)
    probes.raise_open_files_limit()
    fleet = Fleet(client_processes(args, largest))  # fork before any loop or ZeroMQ context
    try:
        import uvloop  # noqa: PLC0415 - a dependency of ucc; only the bench needs it here

        code: int = uvloop.run(_main(args, points, fleet))
        return code
    finally:
        fleet.close()


async def _main(args: argparse.Namespace, points: list[int | None], fleet: Fleet) -> int:
    fleet.attach(asyncio.get_running_loop())
    progress = Progress(quiet=args.quiet)
    results: list[dict[str, Any]] = []
    try:
        for point in points:
            opts = options(args, point)
            ours = await _measure(args, opts, fleet, progress, "ucc")
            ours["cache_bytes_per_conn"] = _cache_bytes(opts, ours)
            if args.reference:
                reference = await _measure(args, opts, fleet, progress, "reference")
                reference["cache_bytes_per_conn"] = None
                ours["reference"] = reference
                ours.update(_ratios(ours, reference, opts))
            results.append(ours)
    except ServerError as exc:
        progress.done()
        print(f"ucc: error: bench: {exc}", file=sys.stderr)
        return 1
    progress.done()
    if args.sweep:
        emit(_sweep_result(args.scenario, results), args.json)
    else:
        emit(results[0], args.json)
    return 0


async def _measure(
    args: argparse.Namespace, opts: Options, fleet: Fleet, progress: Progress, kind: str
) -> dict[str, Any]:
    server = await asyncio.to_thread(_server, args, kind)
    try:
        return await Run(server, fleet, opts, progress).execute()
    finally:
        server.close()


def _server(args: argparse.Namespace, kind: str) -> Server:
    if kind == "reference":
        return start_reference(secrets.token_hex(32))
    if args.target:
        secret, _ = resolve_secret(args.secret, create=False)  # --secret, $UCC_SECRET, file
        return attach(args.target, args.command, secret)
    extra = ["--write-buffer-limit", str(args.write_buffer_limit), *(args.serve_arg or [])]
    return start_ucc(secrets.token_hex(32), args.shards or (os.cpu_count() or 1), extra)


def _cache_bytes(opts: Options, result: dict[str, Any]) -> float | None:
    plans = layout(opts)
    if not plans:
        return None
    used = probes.cache_bytes(plans, int(result.get("shards") or 1))
    return round(used / len(plans), 1)


def _ratios(ours: dict[str, Any], reference: dict[str, Any], opts: Options) -> dict[str, Any]:
    """Ratios measured in the same run (None when a side was too small to measure: CPU time
    has a 10 ms resolution)."""
    ratios: dict[str, Any] = {}
    mine, theirs = ours.get("server_cpu_us_per_frame"), reference.get("server_cpu_us_per_frame")
    ratios["cpu_ratio_vs_reference"] = round(theirs / mine, 3) if mine and theirs else None
    if opts.rate is None and opts.scenario in ("fanout", "rooms", "direct"):
        mine, theirs = ours.get("delivered_per_s"), reference.get("delivered_per_s")
        ratios["throughput_ratio_vs_reference"] = (
            round(mine / theirs, 3) if mine and theirs else None
        )
    if opts.scenario in ("idle", "connect"):
        mine = ours.get("server_rss_bytes_per_conn")
        theirs = reference.get("server_rss_bytes_per_conn")
        if mine and theirs:
            ratios["memory_ratio_vs_reference"] = round(theirs / mine, 3)
    return ratios


def _sweep_result(scenario: str, results: list[dict[str, Any]]) -> dict[str, Any]:
    """The points, and server CPU per broadcast = a + b x recipients (least squares)."""
    out: dict[str, Any] = {"scenario": scenario, "points": results, "fit": None}
    measured = [r for r in results if r.get("server_cpu_us_per_broadcast")]
    xs = [float(r["expected_frames"]) / max(1, r["commands_acked"]) for r in measured]
    ys = [float(r["server_cpu_us_per_broadcast"]) for r in measured]
    if scenario == "fanout" and len(xs) >= 2:
        mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
        var = sum((x - mean_x) ** 2 for x in xs)
        if var > 0:
            slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / var
            out["fit"] = {
                "per_recipient_us": round(slope, 3),
                "per_broadcast_us": round(mean_y - slope * mean_x, 1),
            }
    return out
