"""What the tests measure: the server's Prometheus endpoint, resident memory, and the figures the reliability
suite reports."""
from __future__ import annotations

import ctypes
import gc
import json
import os
import re
import urllib.request

import psutil

#: Metric names shared with vLLM (``aspen:`` prefix).
VLLM_NAMES = ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "time_to_first_token_seconds",
              "inter_token_latency_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
              "prompt_tokens_total", "generation_tokens_total", "lora_requests_info")


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def gauge(text: str, name: str) -> float:
    return float(re.search(rf"^aspen:{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE).group(1))


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size of ``pid`` (default: this process, after a full garbage collection and, with glibc,
    ``malloc_trim(0)`` so that freed heap pages do not count)."""
    if pid is None:
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass
    return psutil.Process(pid or os.getpid()).memory_info().rss


def report(name: str, **figures) -> None:
    """Print one line of figures (shown with ``pytest -s``) and append it, as JSON, to the file named by
    ``$ASPEN_RELIABILITY_REPORT`` when set (RELIABILITY.md quotes them)."""
    line = {"check": name, **figures}
    print(f"\nRELIABILITY {json.dumps(line)}")
    path = os.environ.get("ASPEN_RELIABILITY_REPORT")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
