"""Summaries, the printed table, the JSON report and the PNG plots of load-test runs.

Definitions (per run):

* ``request_throughput`` = successful requests / wall time; ``output_token_throughput`` = output tokens of
  successful requests / wall time; wall time = first send -> last completion.
* latency statistics (mean, p50, p90, p99, max; seconds) over successful requests: ``ttft`` (send -> first
  token message), ``tpot`` ((last token - first token) / (output tokens - 1)), ``e2e`` (send -> end).
* ``slo.attainment`` = requests that succeeded and met every given target (TTFT <= ``ttft_s``, TPOT <=
  ``tpot_s``) / requests sent. A unary run has no TTFT/TPOT: only successes count then.
* ``errors``: failed requests by gRPC status code name (``FINISH_REASON_ERROR``: an engine error reported
  inside a stream; ``CLIENT_ERROR``: the load tester itself failed to send).

:func:`write_outputs` puts the measurements on disk before it derives anything from them: ``report.json`` first
holds the configuration and every request's record, then gains each run's summary, then the plots are drawn. A
later step that fails leaves the file of an earlier one (every write is atomic) and is reported, not raised; the
plots are skipped, with the reason, when matplotlib is not installed.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from clients.loadtest.driver import RunResult

STAT_KEYS = ("mean", "p50", "p90", "p99", "max")


def stats(values: Sequence[float]) -> dict[str, float | None]:
    """mean / p50 / p90 / p99 / max of ``values`` (None for each when empty)."""
    if not len(values):
        return dict.fromkeys(STAT_KEYS)
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max())}


def summarize(run: RunResult, slo_ttft: float | None = None, slo_tpot: float | None = None) -> dict:
    """The summary dict of one run (see the module docstring)."""
    ok = [r for r in run.results if r.ok]
    wall = run.wall_s if run.wall_s > 0 else float("nan")
    out_tokens = sum(r.output_tokens for r in ok)
    ttft = [r.ttft for r in ok if r.ttft is not None]
    tpot = [r.tpot for r in ok if r.tpot is not None]

    def meets(r) -> bool:
        if not r.ok:
            return False
        if slo_ttft is not None and r.ttft is not None and r.ttft > slo_ttft:
            return False
        return not (slo_tpot is not None and r.tpot is not None and r.tpot > slo_tpot)

    sent = len(run.results)
    return {
        "label": run.label, "offered_rate": None if run.offered_rate is None or math.isinf(run.offered_rate)
        else run.offered_rate,
        "sent": sent, "ok": len(ok), "failed": sent - len(ok), "not_sent": run.not_sent,
        "errors": dict(sorted(Counter(r.code for r in run.results if not r.ok).items())),
        "wall_s": run.wall_s,
        "request_throughput": len(ok) / wall if ok else 0.0,
        "output_token_throughput": out_tokens / wall if ok else 0.0,
        "prompt_tokens": sum(r.prompt_tokens or r.prompt_len for r in ok), "output_tokens": out_tokens,
        "distinct_adapters": len({r.adapter for r in run.results if r.adapter is not None}),
        "ttft": stats(ttft), "tpot": stats(tpot), "e2e": stats([r.e2e for r in ok]),
        "slo": {"ttft_s": slo_ttft, "tpot_s": slo_tpot,
                "attainment": sum(map(meets, run.results)) / sent if sent else None},
    }


def _ms(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x * 1e3:.0f}"


def format_table(summaries: Sequence[dict]) -> str:
    """A compact fixed-width table, one line per run (latencies in milliseconds)."""
    head = ("run", "sent", "ok", "err", "req/s", "tok/s", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99",
            "E2E p50", "E2E p99", "SLO")
    rows = [head]
    for s in summaries:
        slo = s["slo"]["attainment"]
        rows.append((s["label"], str(s["sent"]), str(s["ok"]), str(s["failed"]), f"{s['request_throughput']:.2f}",
                     f"{s['output_token_throughput']:.1f}", _ms(s["ttft"]["p50"]), _ms(s["ttft"]["p99"]),
                     _ms(s["tpot"]["p50"]), _ms(s["tpot"]["p99"]), _ms(s["e2e"]["p50"]), _ms(s["e2e"]["p99"]),
                     "-" if slo is None else f"{100 * slo:.0f}%"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    errors = [f"{s['label']}: " + ", ".join(f"{k} x{v}" for k, v in s["errors"].items())
              for s in summaries if s["errors"]]
    return "\n".join(lines + (["errors by status code: " + "; ".join(errors)] if errors else []))


def build_report(runs: Sequence[RunResult], config: dict, slo_ttft: float | None = None,
                 slo_tpot: float | None = None, include_requests: bool = True, summaries: bool = True) -> dict:
    """The JSON-able report: the configuration, and per run its summary (unless ``summaries`` is false) and its
    per-request records (unless ``include_requests`` is false)."""
    out = []
    for run in runs:
        entry = {"summary": summarize(run, slo_ttft, slo_tpot)} if summaries else {}
        if include_requests:
            entry["requests"] = [r.to_dict() for r in run.results]
        out.append(entry)
    return {"config": config, "runs": out}


def write_json(path: str, report: dict) -> str:
    """Write ``report`` to ``path`` atomically: a reader (or a crash) never sees a half-written file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, default=_json_default)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def _json_default(o):
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_cdfs(runs: Sequence[RunResult], path: str) -> str:
    """One PNG with the empirical CDFs of TTFT, TPOT and end-to-end latency, one line per run."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (title, getter) in zip(axes, (("time to first token", lambda r: r.ttft),
                                          ("time per output token", lambda r: r.tpot),
                                          ("end-to-end latency", lambda r: r.e2e))):
        for run in runs:
            xs = np.sort([v for v in (getter(r) for r in run.results if r.ok) if v is not None])
            if len(xs):
                ax.step(xs * 1e3, np.arange(1, len(xs) + 1) / len(xs), where="post", label=run.label)
        ax.set_title(title)
        ax.set_xlabel("milliseconds")
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    if any(r.ok for run in runs for r in run.results):
        axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_sweep(summaries: Sequence[dict], path: str) -> str:
    """Throughput and p99 TTFT against the offered load (runs with an offered rate only)."""
    plt = _plt()
    pts = sorted((s for s in summaries if s["offered_rate"] is not None), key=lambda s: s["offered_rate"])
    rates = [s["offered_rate"] for s in pts]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax1.plot(rates, [s["output_token_throughput"] for s in pts], "o-", label="output tokens/s")
    ax1b = ax1.twinx()
    ax1b.plot(rates, [s["request_throughput"] for s in pts], "s--", color="tab:orange", label="requests/s")
    ax1.set_xlabel("offered load (requests/s)")
    ax1.set_ylabel("output tokens/s")
    ax1b.set_ylabel("requests/s")
    ax1.set_title("throughput")
    ax1.grid(alpha=0.3)
    ax2.plot(rates, [1e3 * (s["ttft"]["p99"] or float("nan")) for s in pts], "o-", color="tab:red")
    ax2.set_xlabel("offered load (requests/s)")
    ax2.set_ylabel("p99 TTFT (ms)")
    ax2.set_title("p99 time to first token")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@dataclass
class Outputs:
    """What :func:`write_outputs` wrote (``files``: ``json``, ``cdf``, ``sweep``), and what it did not: ``skipped``
    (a step left out, with why) and ``failed`` (a step that raised after ``report.json`` was written)."""

    report: dict
    files: dict[str, str]
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    @property
    def summaries(self) -> list[dict]:
        return [r["summary"] for r in self.report["runs"] if "summary" in r]


def plotting_unavailable() -> str | None:
    """Why the plots cannot be drawn here (matplotlib not installed), or None; found without importing it."""
    if importlib.util.find_spec("matplotlib") is None:
        return "matplotlib is not installed (pip install matplotlib; the aspen-serve package depends on it)"
    return None


def write_outputs(runs: Sequence[RunResult], config: dict, out_dir: str, slo_ttft: float | None = None,
                  slo_tpot: float | None = None) -> Outputs:
    """Write ``report.json`` (the measurements, then with the summaries), then ``latency_cdf.png`` and (two or more
    distinct rates) ``sweep.png`` into ``out_dir``; see the module docstring for what happens when a step fails."""
    measurements = build_report(runs, config, summaries=False)
    path = write_json(os.path.join(out_dir, "report.json"), measurements)
    out = Outputs(report=measurements, files={"json": path})
    try:
        report = build_report(runs, config, slo_ttft, slo_tpot)
        write_json(path, report)
    except Exception as e:  # noqa: BLE001 -- the measurements are on disk; the caller says what failed
        out.failed.append(f"summarizing failed ({type(e).__name__}: {e})")
        return out
    out.report = report
    reason = plotting_unavailable()
    if reason is not None:
        out.skipped.append(f"plots skipped: {reason}")
        return out
    plots: list[tuple[str, str, Callable[[], str]]] = [
        ("cdf", "latency_cdf.png", lambda: plot_cdfs(runs, os.path.join(out_dir, "latency_cdf.png")))]
    if len({s["offered_rate"] for s in out.summaries if s["offered_rate"] is not None}) >= 2:
        plots.append(("sweep", "sweep.png", lambda: plot_sweep(out.summaries, os.path.join(out_dir, "sweep.png"))))
    for key, name, draw in plots:
        try:
            out.files[key] = draw()
        except Exception as e:  # noqa: BLE001 -- one plot failing leaves the report and the other plots
            out.failed.append(f"{name} not written ({type(e).__name__}: {e})")
    return out
