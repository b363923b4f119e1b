"""AsyncLLMEngine: drives an LLMEngine from a background thread and streams outputs to asyncio callers.

The model never runs on the event loop: one daemon thread loops ``engine.step()`` while there is work and
hands each output to the asyncio queue of its request with ``loop.call_soon_threadsafe``. Validation and adapter
reads of ``add_request`` run in the default executor, so a slow disk read never blocks the loop either.
A caller that stops iterating (cancelled, deadline, disconnect) aborts its request in ``finally``.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Sequence

from engine.chat import ChatPrompt
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.scheduling.errors import DuplicateRequestError
from engine.scheduling.sampling_params import SamplingParams

log = logging.getLogger("aspen.engine")


class EngineDeadError(RuntimeError):
    """The engine loop stopped; no new requests are accepted."""


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, idle_wait_s: float = 0.05) -> None:
        self.engine = engine
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle_wait_s = idle_wait_s
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> AsyncLLMEngine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="aspen-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self, timeout: float | None = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    @property
    def num_in_flight(self) -> int:
        return len(self._queues)

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self.engine.has_work():
                self._wake.wait(self._idle_wait_s)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception:  # the step contains model failures itself; this is a bookkeeping bug
                log.exception("engine step crashed; stopping the engine loop")
                self._fail_all(EngineDeadError("the engine loop crashed; see the server log"))
                self._stop.set()
                return
            for out in outputs:
                self._deliver(out.request_id, out)

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        with self._lock:
            target = self._queues.get(request_id)
        if target is not None:
            loop, queue = target
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the caller's loop is closed: nobody listens any more
                pass

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            ids = list(self._queues)
        for rid in ids:
            self._deliver(rid, error)

    # ------------------------------------------------------------------ requests
    async def generate(self, prompt: str | Sequence[int] | ChatPrompt, params: SamplingParams | None = None,
                       adapter_id: str | None = None, request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs (each carries the delta since the previous one; the last is finished).

        Raises the engine's validation errors before the first output. Leaving the iteration early aborts the
        request and frees its KV blocks and adapter pin."""
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        rid = request_id or uuid.uuid4().hex
        with self._lock:
            if rid in self._queues:
                raise DuplicateRequestError(rid)
            self._queues[rid] = (loop, queue)
        finished = False
        # validation and adapter reads run off the loop
        add = loop.run_in_executor(None, self._add, prompt, params, adapter_id, rid)
        try:
            await add
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            with self._lock:
                self._queues.pop(rid, None)
            if not finished:
                if add.done():
                    self.engine.abort(rid)
                else:  # cancelled while the add still runs: abort once it has queued the request
                    add.add_done_callback(lambda f: f.cancelled() or f.exception() or self.engine.abort(rid))
                self._wake.set()

    def _add(self, prompt, params, adapter_id, rid: str) -> None:
        self.engine.add_request(prompt, params, adapter_id, rid)
        self._wake.set()

    async def run_blocking(self, fn, *args):
        """Run a blocking engine call (adapter load/unload, tokenize) off the event loop."""
        def call():
            try:
                return fn(*args)
            except StopIteration as e:  # cannot be set on an asyncio future: the awaiting call would hang
                raise RuntimeError(f"{getattr(fn, '__name__', fn)} raised StopIteration") from e

        return await asyncio.get_running_loop().run_in_executor(None, call)
