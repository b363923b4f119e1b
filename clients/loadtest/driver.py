"""Load tester for ASPEN serve: a synthetic multi-adapter workload driven over gRPC (grpc.aio) or the
OpenAI-compatible HTTP API (:mod:`clients.loadtest.http_driver`), the same requests either way.

Workload (pure functions of a seed, so they are unit-testable and every run of a sweep sends the same requests):

* arrivals: open loop with Poisson arrivals at ``rate`` requests/s, or gamma inter-arrival gaps with coefficient
  of variation ``cv`` (S-LoRA's bursty traces: cv 1..8; cv = 1 is Poisson); ``rate = inf`` sends everything at
  once. Closed loop: ``concurrency`` users, each sending its next request when the previous one ends.
* adapter popularity over ``num_adapters`` adapters: ``uniform``; ``power`` as in S-LoRA, index =
  floor(n * X) with X ~ numpy ``power(alpha)`` (density alpha * x^(alpha-1) on [0, 1]: alpha = 1 is uniform,
  small alpha piles the load on the first indices); ``zipf``: P(index k) proportional to 1 / (k + 1)^alpha.
  ``num_adapters = 0`` sends every request to the base model.
* input / output lengths: fixed (``32``) or uniform integers in a closed range (``8-512``); prompts are random
  token ids of the exact input length, or come from a JSONL file (``{"prompt": "..."}`` or ``{"token_ids": [...]}``
  per line, optional ``"output_len"``).

Per request the driver records, from the arrival times of the stream messages: time to first token (TTFT),
time per output token after the first (TPOT), end-to-end latency, and the status of failures: the gRPC code (or
``FINISH_REASON_ERROR`` for an engine error inside an OK stream), or over HTTP ``HTTP_<status>`` (or
``STREAM_ERROR``). Unary calls have only end-to-end latency.
Summaries, tables, JSON and plots: :mod:`clients.loadtest.report`.
"""
from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

POPULARITIES = ("uniform", "power", "zipf")
MODES = ("open", "closed")  # open loop: an arrival process; closed loop: ``concurrency`` users
PROTOCOLS = ("grpc", "http")  # the gRPC API, or the OpenAI-compatible HTTP API (``address`` is its HOST:PORT)
#: Adapter ids of ``--num-adapters N``: f"{prefix}{i:04d}" for i < N, the ids ``aspen loadtest make-adapters``
#: writes (both sides keep this naming; tests/clients checks they agree).
DEFAULT_PREFIX = "adapter-"
MIN_TOKEN_ID = 4  # keep clear of the usual special ids (unk, bos, eos, pad) in synthetic prompts


# ---------------------------------------------------------------------------------------------- workload
def adapter_name(index: int, prefix: str = DEFAULT_PREFIX) -> str:
    """The id of adapter ``index`` of a ``num_adapters`` workload."""
    return f"{prefix}{index:04d}"


@dataclass(frozen=True)
class LengthSpec:
    """A length distribution: ``lo == hi`` is fixed, else uniform integers in [lo, hi] (both included)."""

    lo: int
    hi: int

    def __post_init__(self) -> None:
        if self.lo < 1 or self.hi < self.lo:
            raise ValueError(f"a length range needs 1 <= lo <= hi, got {self.lo}-{self.hi}")

    @classmethod
    def parse(cls, text: str | int) -> LengthSpec:
        """``"32"`` (fixed) or ``"8-512"`` / ``"8:512"`` (uniform, inclusive)."""
        s = str(text).strip().replace(":", "-")
        lo, sep, hi = s.partition("-")
        try:
            return cls(int(lo), int(hi) if sep else int(lo))
        except ValueError:
            raise ValueError(f"bad length {text!r}: expected N or LO-HI") from None

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        if self.lo == self.hi:
            return np.full(n, self.lo, dtype=np.int64)
        return rng.integers(self.lo, self.hi + 1, size=n)

    def __str__(self) -> str:
        return str(self.lo) if self.lo == self.hi else f"{self.lo}-{self.hi}"


def interarrival_gaps(n: int, rate: float, cv: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` gaps with mean 1/rate: exponential (Poisson process) for cv = 1, gamma(shape 1/cv^2) otherwise."""
    if rate <= 0 or cv <= 0:
        raise ValueError(f"rate and cv must be > 0, got rate={rate}, cv={cv}")
    if math.isinf(rate):
        return np.zeros(n)
    if cv == 1.0:
        return rng.exponential(1.0 / rate, size=n)
    shape = 1.0 / (cv * cv)
    return rng.gamma(shape, 1.0 / (rate * shape), size=n)


def arrival_times(n: int, rate: float, cv: float, rng: np.random.Generator) -> np.ndarray:
    """Send times in seconds after the start; the first request goes at 0."""
    gaps = interarrival_gaps(n, rate, cv, rng)
    return np.concatenate([[0.0], np.cumsum(gaps[:-1])]) if n else np.zeros(0)


def adapter_indices(n: int, num_adapters: int, popularity: str, alpha: float,
                    rng: np.random.Generator) -> np.ndarray:
    """The adapter index (0 .. num_adapters-1) of each of ``n`` requests; see the module docstring."""
    if num_adapters <= 0:
        raise ValueError(f"num_adapters must be > 0, got {num_adapters}")
    if popularity == "uniform":
        return rng.integers(0, num_adapters, size=n)
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if popularity == "power":
        return np.minimum(np.floor(num_adapters * rng.power(alpha, size=n)).astype(np.int64), num_adapters - 1)
    if popularity == "zipf":
        weights = 1.0 / np.arange(1, num_adapters + 1, dtype=np.float64) ** alpha
        return rng.choice(num_adapters, size=n, p=weights / weights.sum())
    raise ValueError(f"popularity must be one of {POPULARITIES}, got {popularity!r}")


def synthetic_prompt(length: int, vocab_size: int, rng: np.random.Generator) -> list[int]:
    """Random token ids of exactly ``length`` tokens."""
    low = MIN_TOKEN_ID if vocab_size > MIN_TOKEN_ID + 1 else 0
    return rng.integers(low, vocab_size, size=length).tolist()


def load_prompt_file(path: str) -> list[dict]:
    """JSONL lines ``{"prompt": str}`` or ``{"token_ids": [int, ...]}``, each with an optional ``output_len``."""
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            obj = json.loads(line)
            good = isinstance(obj, dict) and (isinstance(obj.get("prompt"), str) or
                                              isinstance(obj.get("token_ids"), list))
            if not good:
                raise ValueError(f"{path}:{lineno}: expected an object with 'prompt' (text) or 'token_ids'")
            items.append(obj)
    if not items:
        raise ValueError(f"{path}: no prompts")
    return items


@dataclass(frozen=True)
class RequestSpec:
    """One request of a workload."""

    index: int
    arrival: float  # seconds after the start (open loop)
    adapter: str | None  # None = base model
    prompt: list[int] | str
    prompt_len: int  # tokens (for text prompts: characters // 4, an estimate; the server reports the truth)
    max_new_tokens: int


@dataclass(frozen=True)
class WorkloadConfig:
    """What to send. See the module docstring for each distribution."""

    num_requests: int = 100
    rate: float = math.inf  # requests/s (open loop)
    cv: float = 1.0
    num_adapters: int = 0
    adapter_prefix: str = DEFAULT_PREFIX
    adapter_ids: tuple[str, ...] | None = None  # explicit ids (index i -> adapter_ids[i]); overrides the prefix
    popularity: str = "uniform"
    alpha: float = 1.0
    input_len: LengthSpec = LengthSpec(32, 32)
    output_len: LengthSpec = LengthSpec(32, 32)
    prompt_file: str | None = None
    seed: int = 0

    def adapter_names(self) -> list[str]:
        if self.adapter_ids:
            return list(self.adapter_ids)
        return [adapter_name(i, self.adapter_prefix) for i in range(self.num_adapters)]


def build_workload(cfg: WorkloadConfig, vocab_size: int, max_context: int | None = None) -> list[RequestSpec]:
    """The requests of ``cfg``. Independent random streams per aspect: changing the rate keeps the adapters,
    prompts and lengths of every request. Prompts are cut so prompt + output fits ``max_context``."""
    arr_rng, ad_rng, len_rng, prompt_rng = (np.random.default_rng(s)
                                            for s in np.random.SeedSequence(cfg.seed).spawn(4))
    n = cfg.num_requests
    arrivals = arrival_times(n, cfg.rate, cfg.cv, arr_rng)
    names = cfg.adapter_names()
    adapters: list[str | None] = [None] * n
    if names:
        adapters = [names[i] for i in adapter_indices(n, len(names), cfg.popularity, cfg.alpha, ad_rng)]
    out_lens = cfg.output_len.sample(n, len_rng)
    file_items = load_prompt_file(cfg.prompt_file) if cfg.prompt_file else None
    in_lens = cfg.input_len.sample(n, len_rng)
    specs = []
    for i in range(n):
        max_new = int(out_lens[i])
        if file_items is not None:
            item = file_items[i % len(file_items)]
            max_new = int(item.get("output_len", max_new))
            prompt: list[int] | str = item["prompt"] if "prompt" in item else [int(t) for t in item["token_ids"]]
        else:
            prompt = synthetic_prompt(int(in_lens[i]), vocab_size, prompt_rng)
        if max_context is not None:
            max_new = min(max_new, max_context - 1)
            if isinstance(prompt, list):
                prompt = prompt[:max(1, max_context - max_new)]
        plen = len(prompt) if isinstance(prompt, list) else max(1, len(prompt) // 4)
        specs.append(RequestSpec(i, float(arrivals[i]), adapters[i], prompt, plen, max_new))
    return specs


# ---------------------------------------------------------------------------------------------- driver
@dataclass
class RequestResult:
    """What one request did; times are seconds since the start of its run."""

    index: int
    adapter: str | None
    prompt_len: int
    max_new_tokens: int
    scheduled: float  # intended send time (open loop)
    start: float = 0.0
    end: float = 0.0
    first_token: float | None = None
    last_token: float | None = None
    output_tokens: int = 0
    prompt_tokens: int = 0  # as the server counted them (0 when unknown)
    code: str = "OK"  # gRPC status code name, or FINISH_REASON_ERROR
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.code == "OK"

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.start

    @property
    def tpot(self) -> float | None:
        if self.first_token is None or self.last_token is None or self.output_tokens < 2:
            return None
        return (self.last_token - self.first_token) / (self.output_tokens - 1)

    @property
    def e2e(self) -> float:
        return self.end - self.start

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("index", "adapter", "prompt_len", "prompt_tokens", "max_new_tokens",
                                           "scheduled", "start", "end", "output_tokens", "code", "error")}
        d.update(ttft=self.ttft, tpot=self.tpot, e2e=self.e2e)
        return d


@dataclass(frozen=True)
class DriverConfig:
    """How to send: where and over which protocol, open or closed loop, stream or unary, and the bounds of the
    run."""

    address: str = "127.0.0.1:50051"
    protocol: str = "grpc"  # one of PROTOCOLS
    mode: str = "open"  # one of MODES
    concurrency: int = 8  # closed-loop users
    stream: bool = True
    duration_s: float | None = None  # no request is sent after this many seconds
    timeout_s: float = 300.0  # per-request deadline (DEADLINE_EXCEEDED beyond it)
    temperature: float = 0.0
    ignore_eos: bool = True
    progress: bool = True
    token: str | None = None
    tls_ca: str | None = None
    request_id_prefix: str = "lt"


@dataclass
class RunResult:
    label: str
    offered_rate: float | None  # requests/s (open loop), None for closed loop
    results: list[RequestResult] = field(default_factory=list)
    not_sent: int = 0  # left unsent when the duration bound was reached
    wall_s: float = 0.0  # first send -> last completion


async def _one(client, spec: RequestSpec, cfg: DriverConfig, t0: float, rid: str,
               model: str | None = None) -> RequestResult:
    """Send one request (over HTTP: ``model`` is the base model's served name) and record what it did."""
    import grpc

    from clients.aspen.v1 import aspen_pb2 as pb
    from clients.loadtest import http_driver

    res = RequestResult(spec.index, spec.adapter, spec.prompt_len, spec.max_new_tokens, spec.arrival)
    params = {"max_new_tokens": spec.max_new_tokens, "temperature": cfg.temperature, "ignore_eos": cfg.ignore_eos}
    res.start = time.perf_counter() - t0
    try:
        if cfg.protocol == "http":
            await http_driver.send(client, res, spec, model, cfg, t0)
        elif cfg.stream:
            async for msg in client.stream(spec.prompt, spec.adapter, request_id=rid, timeout=cfg.timeout_s,
                                           **params):
                if msg.token_ids:
                    now = time.perf_counter() - t0
                    if res.first_token is None:
                        res.first_token = now
                    res.last_token = now
                    res.output_tokens += len(msg.token_ids)
                if msg.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                    res.prompt_tokens = msg.usage.prompt_tokens
                    if msg.finish_reason == pb.FINISH_REASON_ERROR:
                        res.code, res.error = "FINISH_REASON_ERROR", msg.error
        else:
            resp = await client.generate(spec.prompt, spec.adapter, request_id=rid, timeout=cfg.timeout_s, **params)
            res.output_tokens, res.prompt_tokens = len(resp.token_ids), resp.usage.prompt_tokens
    except grpc.aio.AioRpcError as e:
        res.code, res.error = e.code().name, e.details() or ""
    except asyncio.CancelledError:
        res.code, res.error = "CANCELLED", "cancelled by the load tester"
        raise
    except Exception as e:  # noqa: BLE001 -- a client-side failure is counted, not fatal to the run
        res.code, res.error = "CLIENT_ERROR", f"{type(e).__name__}: {e}"
    finally:
        res.end = time.perf_counter() - t0
    return res


async def drive(requests: Sequence[RequestSpec], cfg: DriverConfig, label: str = "run",
                offered_rate: float | None = None) -> RunResult:
    """Send ``requests`` to the server and wait for every answer (bounded by ``duration_s`` + ``timeout_s``)."""
    from tqdm import tqdm

    from clients.client import AsyncAspenClient
    from clients.loadtest import http_driver

    if cfg.mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {cfg.mode!r}")
    if cfg.protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {cfg.protocol!r}")
    run = RunResult(label, offered_rate if cfg.mode == "open" else None)
    stamp = f"{cfg.request_id_prefix}-{time.time_ns():x}"
    bar = tqdm(total=len(requests), desc=label, unit="req", disable=not cfg.progress, leave=False)
    errors = 0

    def done(res: RequestResult) -> RequestResult:
        nonlocal errors
        errors += not res.ok
        bar.update(1)
        if errors:
            bar.set_postfix(errors=errors, refresh=False)
        return res

    model = None
    if cfg.protocol == "http":
        client = http_driver.http_client(cfg.address, cfg.token, cfg.tls_ca, cfg.timeout_s)
        try:
            model = await http_driver.base_model(client)
        except BaseException:
            await client.aclose()
            raise
    else:
        client = AsyncAspenClient(cfg.address, token=cfg.token, tls_ca=cfg.tls_ca)
    t0 = time.perf_counter()
    try:
        if cfg.mode == "open":
            tasks = []
            for spec in requests:
                if cfg.duration_s is not None and spec.arrival > cfg.duration_s:
                    break
                delay = spec.arrival - (time.perf_counter() - t0)
                if delay > 0:
                    await asyncio.sleep(delay)
                task = asyncio.ensure_future(_one(client, spec, cfg, t0, f"{stamp}-{spec.index}", model))
                task.add_done_callback(lambda t: t.cancelled() or done(t.result()))
                tasks.append(task)
            run.results = list(await asyncio.gather(*tasks))
        else:
            queue = list(requests)[::-1]

            async def user() -> list[RequestResult]:
                mine = []
                while queue and (cfg.duration_s is None or time.perf_counter() - t0 < cfg.duration_s):
                    spec = queue.pop()
                    mine.append(done(await _one(client, spec, cfg, t0, f"{stamp}-{spec.index}", model)))
                return mine

            per_user = await asyncio.gather(*(user() for _ in range(max(1, cfg.concurrency))))
            run.results = sorted((r for rs in per_user for r in rs), key=lambda r: r.index)
    finally:
        bar.close()
        await (client.aclose() if cfg.protocol == "http" else client.channel.close())
    run.not_sent = len(requests) - len(run.results)
    if run.results:
        run.wall_s = max(r.end for r in run.results) - min(r.start for r in run.results)
    return run


def run_sweep(workload: WorkloadConfig, driver: DriverConfig, rates: Sequence[float] | None = None,
              vocab_size: int | None = None, max_context: int | None = None) -> list[RunResult]:
    """One run per offered rate (open loop; the same requests each time, re-timed), or one run at
    ``workload.rate`` / closed loop. ``vocab_size`` / ``max_context`` default to the server's model info."""
    if vocab_size is None or max_context is None:
        info = model_info(driver)
        vocab_size = vocab_size or info.vocab_size
        max_context = max_context or info.max_context_tokens
    runs = []
    for rate in (rates if rates and driver.mode == "open" else [workload.rate]):
        cfg = WorkloadConfig(**{**workload.__dict__, "rate": rate})
        specs = build_workload(cfg, vocab_size, max_context)
        label = f"rate={rate:g}" if driver.mode == "open" else f"closed x{driver.concurrency}"
        runs.append(asyncio.run(drive(specs, driver, label, rate)))
    return runs


def model_info(driver: DriverConfig):
    """The server's GetModelInfo answer (vocab size, context length, ...); over HTTP the same facts from
    ``GET /v1/models`` (:class:`~clients.loadtest.http_driver.ServerFacts`)."""
    from clients.client import AspenClient

    if driver.protocol == "http":
        from clients.loadtest.http_driver import server_facts

        return server_facts(driver.address, driver.token, driver.tls_ca)
    with AspenClient(driver.address, token=driver.token, tls_ca=driver.tls_ca, timeout=30) as c:
        return c.model_info()
