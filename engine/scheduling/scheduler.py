"""Continuous-batching scheduler for multi-LoRA serving (pure Python, no torch).

Every step the engine calls :meth:`Scheduler.schedule`, runs the model on the returned chunks (one
flat batch, each chunk with its own adapter), then calls :meth:`Scheduler.on_step_done` with the
sampled tokens, checks the returned requests for stop conditions and calls
:meth:`Scheduler.finish` on those that are done (the scheduler never decides EOS / stop strings /
``max_new_tokens``, but it never schedules nor re-admits a request that has ``max_new_tokens`` outputs).
Call ``on_step_done`` for each output before the next ``schedule``.

Rules of one :meth:`Scheduler.schedule` call (token budget ``max_num_batched_tokens``):

1. **Running requests first, in admission order.** A decode takes 1 token (its last sampled one);
   a partially prefilled request takes its next chunk ``min(remaining, budget)``. The KV slots
   for ``[start, end)`` come from ``block_manager.append_slots(request_id, end)``. When that fails,
   the *newest* running request is preempted (recompute): its blocks are freed, its adapter pin
   released, ``num_computed_tokens`` reset to 0 (outputs kept), and it goes to the *front* of the
   waiting queue. This repeats until the append succeeds or the newest request is the one that
   needs the block (then it is itself preempted). Victims always come later in admission order
   than every request already scheduled in this step, so no emitted chunk is invalidated.
2. **Then waiting requests, FCFS**, unless this step preempted (admitting would only thrash),
   while the budget and ``max_num_seqs`` allow. Admission pins the adapter
   (``adapter_pins.acquire``; the pinned handle travels with the request's chunks to the runner
   and is dropped when the pin is released), then allocates blocks for all of ``all_token_ids`` (so a resumed
   request gets the same prefix-cache hit), sets ``num_computed_tokens`` to the cached prefix
   and schedules the first chunk. With ``chunked_prefill=False`` a request is admitted only if
   its whole uncached prompt fits the budget left (a resumed request longer than
   ``max_num_batched_tokens`` is admitted with the whole budget and finishes in chunks).
   If ``acquire`` raises (missing / corrupt adapter) the request is finished with
   ``FinishReason.ERROR`` and reported in ``SchedulerOutput.failed``; others are unaffected.
3. **Fairness.** Blocks and budget are FCFS: a request that cannot get its blocks (or, with
   chunked prefill off, its budget) stops admission at once. An adapter pin is the exception:
   when the first not-admitted request (the *head*) gets ``CACHE_FULL``, later requests may be
   admitted past it and each one increments ``head.skipped``. Once ``head.skipped >=
   max_head_skips`` nothing more is admitted past it, so running requests drain, release their
   pins, and the head gets in. A head thus waits at most ``max_head_skips`` bypasses plus the
   time the requests running then take to finish. ``max_head_skips=0`` is strict FCFS.

``add`` refuses (:class:`~engine.scheduling.errors.RequestError`) requests that could never run:
prompt + ``max_new_tokens`` over ``max_model_len`` or over the KV pool, a prompt over the budget
with chunked prefill off, an adapter request without an adapter cache, or an id already live. The
waiting queue has no cap here: the engine owns it (it also counts adds it has not applied yet).
No leaks: once every request is finished or aborted the block manager has no used blocks and the
scheduler holds no adapter pins.

Waits are counted (:class:`SchedulerStats` ``num_adapter_waits``, ``num_kv_waits``) and, when there are any, a
warning names them and the options that add room, at most once per :data:`WAIT_WARNING_INTERVAL_S`.

The config, step output, stats, adapter-pin protocol and :class:`QueueFullError` live in
:mod:`engine.scheduling.types` and are re-exported here.
"""
from __future__ import annotations

import enum
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping

from engine.scheduling.block_manager import BlockManager
from engine.scheduling.errors import DuplicateRequestError, RequestError
from engine.scheduling.request import FinishReason, Request, RequestStatus
from engine.scheduling.types import (  # noqa: F401 -- re-exported: the scheduler's interface
    AdapterPin,
    AdapterPins,
    QueueFullError,
    ScheduledChunk,
    SchedulerConfig,
    SchedulerOutput,
    SchedulerStats,
)

log = logging.getLogger("aspen.engine")
#: Seconds between two warnings that requests wait for adapter pages or KV blocks.
WAIT_WARNING_INTERVAL_S = 60.0


class _Admit(enum.Enum):
    ADMITTED = enum.auto()
    FAILED = enum.auto()
    NO_PIN = enum.auto()  # adapter pages held by pinned adapters (CACHE_FULL): may be bypassed
    NO_ROOM = enum.auto()  # not enough blocks, or budget with chunked prefill off: stop admitting


class Scheduler:
    """FCFS continuous batching with chunked prefill, recompute preemption and adapter pins."""

    def __init__(
        self,
        config: SchedulerConfig,
        block_manager: BlockManager,
        adapter_pins: AdapterPins | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.block_manager = block_manager
        self.adapter_pins = adapter_pins
        self.clock = clock
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []  # admission order, newest last
        self._live: dict[str, Request] = {}
        self._pins: Counter[str] = Counter()  # adapter id -> pins held by running requests
        self._num_steps = 0
        self._num_preemptions = 0
        self._num_prefix_cached_tokens = 0
        self._num_failed = 0
        self._num_adapter_waits = 0
        self._num_kv_waits = 0
        self._warned: tuple[float, int, int] | None = None  # (when, adapter waits, KV waits) of the last warning

    # ------------------------------------------------------------------ queries
    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> tuple[Request, ...]:
        return tuple(self._running)

    @property
    def waiting(self) -> tuple[Request, ...]:
        return tuple(self._waiting)

    def has_unfinished(self) -> bool:
        return bool(self._live)

    def get(self, request_id: str) -> Request | None:
        """The live (waiting or running) request with this id, else None."""
        return self._live.get(request_id)

    def stats(self) -> SchedulerStats:
        return SchedulerStats(self._num_steps, self._num_preemptions, self._num_prefix_cached_tokens,
                              self._num_failed, self._num_adapter_waits, self._num_kv_waits)

    # -------------------------------------------------------- request lifecycle
    def add(self, request: Request) -> None:
        """Queue a new request; raises as :meth:`check` does."""
        self.check(request)
        if request.arrival_time is None:
            request.arrival_time = self.clock()
        self._live[request.request_id] = request
        self._waiting.append(request)

    def check(self, request: Request) -> None:
        """Raise if ``request`` could never run here: :class:`DuplicateRequestError` for a live id, else a
        :class:`RequestError` naming the field at fault (ValueError for a request that is not fresh). Changes
        nothing."""
        cfg, rid = self.config, request.request_id
        if request.status is not RequestStatus.WAITING or request.num_computed_tokens or request.output_token_ids:
            raise ValueError(f"request {rid!r} is not a fresh request ({request!r})")
        if rid in self._live:
            raise DuplicateRequestError(rid)
        prompt_len, max_new = request.num_prompt_tokens, request.params.max_new_tokens
        if prompt_len + max_new > cfg.max_model_len:
            raise RequestError("prompt", f"request {rid!r}: prompt of {prompt_len} tokens + max_new_tokens="
                                         f"{max_new} exceeds max_model_len={cfg.max_model_len}")
        if not cfg.chunked_prefill and prompt_len > cfg.max_num_batched_tokens:
            raise RequestError("prompt", f"request {rid!r}: prompt of {prompt_len} tokens exceeds "
                                         f"max_num_batched_tokens={cfg.max_num_batched_tokens} and chunked "
                                         "prefill is off")
        # The largest table a request ever needs: it is never scheduled with max_new outputs.
        needed = self.block_manager.blocks_needed(prompt_len + max_new - 1)
        if needed > self.block_manager.num_blocks:
            raise RequestError("prompt", f"request {rid!r} needs {needed} KV blocks (prompt + max_new_tokens) "
                                         f"but the pool has num_blocks={self.block_manager.num_blocks}")
        if request.adapter_id is not None and self.adapter_pins is None:
            raise RequestError("adapter_id", f"request {rid!r} names adapter {request.adapter_id!r} but no "
                                             "adapter cache is set")

    def abort(self, request_id: str) -> Request | None:
        """Finish a live request as ABORTED, freeing its blocks and pin now; None if not live."""
        request = self._live.get(request_id)
        if request is not None:
            self.finish(request, FinishReason.ABORTED)
        return request

    def finish(self, request: Request, reason: FinishReason) -> None:
        """Free the request's blocks and adapter pin and mark it FINISHED. No-op if already finished."""
        if request.is_finished:
            return
        if self._live.get(request.request_id) is not request:
            raise ValueError(f"request {request.request_id!r} is not managed by this scheduler")
        if request.status is RequestStatus.RUNNING:
            self._running.remove(request)
            self._release(request)
        else:
            self._waiting.remove(request)
        self._mark_finished(request, reason)

    def _mark_finished(self, request: Request, reason: FinishReason) -> None:
        """Final bookkeeping of a request already out of both queues and holding nothing."""
        del self._live[request.request_id]
        request.status = RequestStatus.FINISHED
        request.finish_reason = FinishReason(reason)
        request.finished_time = self.clock()

    # ----------------------------------------------------------------- schedule
    def schedule(self) -> SchedulerOutput:
        """Pick this step's chunks (see the module docstring for the rules)."""
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[Request] = []
        failed: list[Request] = []

        index = 0
        while index < len(self._running) and budget > 0:
            request = self._running[index]
            index += 1
            if request.reached_max_new_tokens:  # awaiting finish() from the engine
                continue
            end = min(request.num_tokens, request.num_computed_tokens + budget)
            while not self.block_manager.append_slots(request.request_id, end):
                victim = self._running[-1]  # the newest running request
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    break
            else:
                budget = self._schedule_chunk(request, budget, chunks)

        if not preempted:
            budget = self._admit_waiting(budget, chunks, failed)

        if chunks:
            self._num_steps += 1
        self._warn_waits()
        return SchedulerOutput(tuple(chunks), tuple(preempted), tuple(failed),
                               self.config.max_num_batched_tokens - budget)

    def _admit_waiting(self, budget: int, chunks: list[ScheduledChunk], failed: list[Request]) -> int:
        """Admit waiting requests FCFS with bounded bypass of an adapter-blocked head; returns the budget left."""
        head: Request | None = None  # first request this pass that could not get its adapter pin
        index = 0
        while index < len(self._waiting) and budget > 0 and len(self._running) < self.config.max_num_seqs:
            if head is not None and head.skipped >= self.config.max_head_skips:
                break  # the head has been bypassed enough: let running requests drain
            request = self._waiting[index]
            if request.reached_max_new_tokens:  # preempted while awaiting finish(): never recompute
                index += 1
                continue
            outcome = self._try_admit(request, budget)
            if outcome is _Admit.NO_ROOM:
                break
            if outcome is _Admit.NO_PIN:
                self._num_adapter_waits += 1
                head = head or request
                index += 1
                continue
            del self._waiting[index]
            if outcome is _Admit.FAILED:
                self._mark_finished(request, FinishReason.ERROR)
                self._num_failed += 1
                failed.append(request)
                continue
            self._running.append(request)
            if head is not None:
                head.skipped += 1
            budget = self._schedule_chunk(request, budget, chunks)
        return budget

    def _try_admit(self, request: Request, budget: int) -> _Admit:
        """Pin the adapter and allocate blocks; on success the request is RUNNING (not yet listed) and holds
        the pinned adapter's handle."""
        rid, adapter_id, key, handle = request.request_id, request.adapter_id, None, None
        if adapter_id is not None:
            assert self.adapter_pins is not None
            try:
                if not self.adapter_pins.can_acquire(adapter_id):
                    return _Admit.NO_PIN
                pin = self.adapter_pins.acquire(adapter_id)
            except Exception as exc:  # noqa: BLE001 -- a bad adapter fails its request, not the scheduler
                request.error = exc
                return _Admit.FAILED
            if not pin.ok:
                return _Admit.NO_PIN
            key, handle = (adapter_id, pin.generation), pin.handle
        tokens = request.all_token_ids
        if not self.config.chunked_prefill:
            uncached = len(tokens) - self.block_manager.cached_prefix_len(tokens, key)
            if min(uncached, self.config.max_num_batched_tokens) > budget:
                self._unpin(adapter_id)
                return _Admit.NO_ROOM
        allocation = self.block_manager.allocate(rid, tokens, key)
        if allocation is None:
            self._num_kv_waits += 1
            self._unpin(adapter_id)
            return _Admit.NO_ROOM
        if adapter_id is not None:
            self._pins[adapter_id] += 1
        request.status = RequestStatus.RUNNING
        request.adapter_key = key
        request.adapter_handle = handle
        request.num_computed_tokens = allocation.num_cached_tokens
        if request.first_scheduled_time is None:
            request.first_scheduled_time = self.clock()
            request.num_cached_tokens = allocation.num_cached_tokens
        self._num_prefix_cached_tokens += allocation.num_cached_tokens
        return _Admit.ADMITTED

    def _warn_waits(self) -> None:
        """Warn, at most once per :data:`WAIT_WARNING_INTERVAL_S`, when admissions waited since the last
        warning."""
        now = self.clock()
        since, adapter_before, kv_before = self._warned or (None, 0, 0)
        adapter, kv = self._num_adapter_waits - adapter_before, self._num_kv_waits - kv_before
        if not adapter and not kv or since is not None and now - since < WAIT_WARNING_INTERVAL_S:
            return
        self._warned = (now, self._num_adapter_waits, self._num_kv_waits)
        log.warning("requests waited for memory: %d admissions for adapter pages (the device adapter pool is "
                    "held by running requests' adapters; raise --lora-pool-mb or --memory-utilization), %d for "
                    "KV blocks (raise --kv-cache-mb or --memory-utilization)%s", adapter, kv,
                    "" if since is None else f" in the last {now - since:.0f} s")

    def _schedule_chunk(self, request: Request, budget: int, chunks: list[ScheduledChunk]) -> int:
        """Append the request's next chunk (its slots are allocated); returns the budget left."""
        start = request.num_computed_tokens
        end = min(request.num_tokens, start + budget)
        table = self.block_manager.block_table(request.request_id)
        chunks.append(ScheduledChunk(request, start, end, end == request.num_tokens, table, request.adapter_handle))
        return budget - (end - start)

    def _preempt(self, request: Request) -> None:
        """Recompute preemption: drop KV and pin, keep outputs, requeue at the front."""
        self._running.remove(request)
        self._release(request)
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self._waiting.appendleft(request)
        self._num_preemptions += 1

    def _release(self, request: Request) -> None:
        self.block_manager.free(request.request_id)
        request.adapter_handle = None  # valid only while pinned; re-admission acquires it again
        if request.adapter_id is not None:
            self._pins[request.adapter_id] -= 1  # zero counts compare equal to missing ones
            self._unpin(request.adapter_id)

    def _unpin(self, adapter_id: str | None) -> None:
        if adapter_id is not None:
            assert self.adapter_pins is not None
            self.adapter_pins.release(adapter_id)

    # ------------------------------------------------------------- step result
    def on_step_done(self, out: SchedulerOutput, sampled: Mapping[str, int]) -> list[Request]:
        """Record that the model ran ``out``: advance ``num_computed_tokens``, cache full blocks,
        append ``sampled[request_id]`` for chunks with ``sample``. Returns those requests, due for
        a stop check. Chunks of requests finished or aborted meanwhile are ignored."""
        due: list[Request] = []
        for chunk in out.chunks:
            request = chunk.request
            if request.status is not RequestStatus.RUNNING:
                continue
            if request.num_computed_tokens != chunk.start:
                raise RuntimeError(f"stale output for {request.request_id!r}: chunk starts at {chunk.start} but "
                                   f"{request.num_computed_tokens} tokens are computed")
            request.num_computed_tokens = chunk.end
            self.block_manager.commit_full_blocks(
                request.request_id, request.all_token_ids, request.adapter_key, chunk.end)
            if chunk.sample:
                if request.request_id not in sampled:
                    raise KeyError(f"no sampled token for request {request.request_id!r}")
                request.output_token_ids.append(int(sampled[request.request_id]))
                if request.first_token_time is None:
                    request.first_token_time = self.clock()
                due.append(request)
        return due

    # --------------------------------------------------------------- invariants
    def check_invariants(self) -> None:
        """AssertionError on the first inconsistency between queues, blocks and pins."""
        bm = self.block_manager
        bm.check_invariants()
        assert len(self._running) <= self.config.max_num_seqs, "more running requests than max_num_seqs"
        ids = [r.request_id for r in self._running] + [r.request_id for r in self._waiting]
        assert sorted(ids) == sorted(self._live), f"queues {sorted(ids)} != live {sorted(self._live)}"
        used: set[int] = set()
        pins: Counter[str] = Counter()
        for r in self._running:
            assert r.status is RequestStatus.RUNNING and r.request_id in bm, f"{r!r} is running without blocks"
            table = bm.block_table(r.request_id)
            assert len(table) * bm.block_size >= r.num_computed_tokens, f"{r!r}: table {table} too short"
            assert r.num_computed_tokens < r.num_tokens, f"{r!r} has no uncomputed token"
            key_ok = r.adapter_key is None if r.adapter_id is None else r.adapter_key[0] == r.adapter_id
            assert key_ok, f"{r!r} has adapter_key {r.adapter_key!r}"
            assert (r.adapter_handle is None) == (r.adapter_id is None), f"{r!r} runs without its pinned handle"
            used.update(table)
            if r.adapter_id is not None:
                pins[r.adapter_id] += 1
        for r in self._waiting:
            assert r.status is RequestStatus.WAITING and r.request_id not in bm, f"{r!r} waits holding blocks"
            assert r.num_computed_tokens == 0, f"{r!r} waits with computed tokens"
            assert r.adapter_handle is None, f"{r!r} waits holding an adapter handle"
        assert len(used) == bm.num_used_blocks, f"running tables hold {len(used)} blocks, {bm.num_used_blocks} used"
        assert pins == self._pins, f"running requests pin {dict(pins)}, tracked {dict(self._pins)}"
        pinned_count = getattr(self.adapter_pins, "pinned_count", None)
        if pinned_count is not None:
            assert pinned_count() >= sum(pins.values()), "the adapter cache holds fewer pins than running requests"

