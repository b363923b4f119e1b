"""LLMEngine: many concurrent requests, each for its own adapter, turned into one stream of flat steps.

    step() = apply queued adds/aborts -> scheduler.schedule() -> runner.run() -> scheduler.on_step_done()
             -> per sampled token: detokenize, check stop conditions, finish -> outputs

``add_request`` and ``abort`` may be called from any thread: ``add_request`` checks every rule of a request at
once, its response format's grammar included (so bad input fails in the caller, with a typed error naming the
field at fault, and no compile ever runs on the engine thread), and both queue a command that the next ``step``
applies. A front end only maps those errors to its own statuses. ``generate`` drives ``step`` itself; the server
uses :class:`engine.async_engine.AsyncLLMEngine`, which drives it from a background thread.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Sequence

import aspen
from aspen.errors import AdapterNotFoundError, AdapterPathError
from aspen.language_model import parse_dtype
from aspen.lora.pool import LoraPool
from aspen.model.kv_cache import KVCache
from engine import capacity
from engine.adapters.cache import AdapterCache, AdapterInfo
from engine.adapters.paths import list_adapter_dirs
from engine.chat import ChatPrompt, ChatTemplates, check_unicode
from engine.config import EngineConfig
from engine.lora_backend import LoraBackend
from engine.model_runner import ModelRunner
from engine.outputs import RequestOutput
from engine.request_state import RequestState
from engine.scheduling.block_manager import BlockManager
from engine.scheduling.errors import DuplicateRequestError, RequestError
from engine.scheduling.request import FinishReason, Request
from engine.scheduling.sampling_params import SamplingParams, SamplingParamsError
from engine.scheduling.scheduler import QueueFullError, Scheduler
from engine.structured.compiler import GrammarCompiler

log = logging.getLogger("aspen.engine")

#: Longest request id accepted (ids are echoed in outputs, logs and metrics).
MAX_REQUEST_ID_CHARS = 256
#: A text prompt longer than max_model_len * (longest token in characters) * this can never fit the context; it
#: is refused before tokenizing (tokenizing megabytes of text holds a worker for tens of seconds). The slack
#: covers normalizers that merge characters (NFC).
PROMPT_CHARS_SLACK = 4


class LLMEngine:
    def __init__(self, model: str = "demo", adapter_dir: str | None = None, quantize: str | None = None,
                 dtype: str = "float32", device: str = "cpu", config: EngineConfig | None = None,
                 progress: bool = True, **options) -> None:
        cfg = config or EngineConfig(**options)
        if config is not None and options:
            raise TypeError("pass either config=EngineConfig(...) or keyword options, not both")
        self.config = cfg
        if model == "demo":
            from aspen.demo import ensure_demo_base

            model = ensure_demo_base()
        self.model = aspen.load_model(model, dtype=dtype, quantize=quantize, device=device, progress=progress)
        self.kernels = self.model.build_kernels(cfg.packed_gemm)  # compiled before the first request, not in it
        if cfg.packed_gemm:
            packed = self.model.pack_for_inference()
            log.info("packed GEMM: %d weight matrices packed", packed)
        self.tokenizer = self.model.tokenizer
        mc = self.model.config
        self.max_model_len = min(cfg.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        self.max_prompt_chars = self.max_model_len * _longest_token_chars(self.tokenizer) * PROMPT_CHARS_SLACK
        pool_dtype = self.model.dtype if cfg.adapter_dtype == "auto" else parse_dtype(cfg.adapter_dtype)
        self.adapter_dir = os.path.realpath(adapter_dir) if adapter_dir else None
        if self.adapter_dir is not None and not os.path.isdir(self.adapter_dir):
            raise AdapterNotFoundError(f"adapter directory {adapter_dir!r} does not exist")
        self.capacity = self._plan_capacity(pool_dtype)
        num_blocks, pages = self.capacity.kv_blocks, self.capacity.pool_pages
        pool = LoraPool(mc, pages, dtype=pool_dtype, device=self.model.device)
        self.adapter_cache: AdapterCache | None = None
        if self.adapter_dir is not None:
            backend = LoraBackend(self.model, pool, allow_pickle=cfg.allow_pickle_adapters)
            self.adapter_cache = AdapterCache(self.adapter_dir, backend, self.capacity.host_bytes, pages)
        self.block_manager = BlockManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(cfg.scheduler_config(self.max_model_len), self.block_manager, self.adapter_cache)
        kv = self.model.new_kv_cache(num_blocks, cfg.block_size)
        self.runner = ModelRunner(self.model, kv, pool, seed=cfg.seed)
        self.grammars = GrammarCompiler(self.tokenizer, mc.vocab_size, mc.eos_token_ids,
                                        cache_size=cfg.grammar_cache_size, timeout_s=cfg.grammar_compile_timeout_s)
        self.chat_templates = ChatTemplates(self.tokenizer)
        self._states: dict[str, RequestState] = {}
        self._commands: deque[tuple[str, object]] = deque()
        self._lock = threading.Lock()  # guards _commands and _states membership
        self._step_lock = threading.Lock()  # one step at a time

    def _plan_capacity(self, pool_dtype) -> capacity.Capacity:
        """Size the KV pool, device adapter pool and host tier (explicit options win, the rest from
        ``memory_utilization``: see :mod:`engine.capacity`) and log the capacity in user terms."""
        cfg, mc = self.config, self.model.config
        bpb = KVCache.bytes_per_block(mc, cfg.block_size, self.model.dtype)
        page = LoraPool.bytes_per_page(mc, pool_dtype)
        adapter_pages, shape = capacity.largest_adapter_pages(self.adapter_dir, mc)
        # explicit sizes (None: derived from memory_utilization)
        kv_blocks = cfg.num_kv_blocks or (cfg.kv_cache_bytes // bpb if cfg.kv_cache_bytes else None)
        pool_pages = cfg.lora_pool_pages or (max(1, cfg.lora_pool_bytes // page) if cfg.lora_pool_bytes else None)
        needs_host = self.adapter_dir is not None and cfg.host_adapter_bytes is None
        derived = kv_blocks is None or pool_pages is None or needs_host
        plan = capacity.plan_capacity(capacity.CapacityRequest(
            available_bytes=capacity.available_memory(self.model.device) if derived else 0,
            utilization=cfg.memory_utilization, kv_bytes_per_block=bpb, block_size=cfg.block_size,
            page_bytes=page, adapter_pages=adapter_pages, max_num_seqs=cfg.max_num_seqs,
            max_model_len=self.max_model_len, adapters=self.adapter_dir is not None,
            kv_blocks=kv_blocks, pool_pages=pool_pages, host_bytes=cfg.host_adapter_bytes))
        adapters = (f"; {plan.device_adapters} adapters of the largest shape ({shape}) in the device pool "
                    f"({plan.pool_pages} pages), ~{plan.host_adapters} in the host tier "
                    f"({plan.host_bytes / capacity.GiB:.2f} GiB)") if self.adapter_dir is not None else ""
        log.info("capacity: %d tokens of KV (%d sequences of max_model_len=%d, %.2f GiB)%s", plan.kv_tokens,
                 plan.full_sequences, self.max_model_len, plan.kv_blocks * bpb / capacity.GiB, adapters)
        return plan

    # ------------------------------------------------------------------ requests
    def tokenize(self, text: str) -> list[int]:
        """The token ids of ``text``; RequestError("prompt") without tokenizing a text too long to ever fit the
        context (:data:`PROMPT_CHARS_SLACK`) or one that is not Unicode text (a lone surrogate)."""
        if len(text) > self.max_prompt_chars:
            raise RequestError("prompt", f"{len(text)} characters can never fit the context of "
                                         f"{self.max_model_len} tokens (at most {self.max_prompt_chars} characters)")
        check_unicode("prompt", text)
        return list(self.tokenizer(text).input_ids)

    def add_request(self, prompt: str | Sequence[int] | ChatPrompt, params: SamplingParams | None = None,
                    adapter_id: str | None = None, request_id: str | None = None) -> str:
        """Validate and queue a request; returns its id. Every rule of a request is checked here, once; a refusal
        raises before anything is queued.

        ``prompt`` is a text, token ids, or a :class:`~engine.chat.ChatPrompt` rendered with the chat template
        of the adapter (if its directory has one) or of the checkpoint, generation prompt added; a chat request
        also ends at the template's end-of-turn token (finish reason ``eos``). Refusals:

        * :class:`RequestError` naming ``prompt`` (empty, a text too long to ever fit the context, token ids
          outside ``[0, vocab)``, more KV than the pool holds), ``messages`` (see :mod:`engine.chat`: none, an
          unknown role, no chat template) or ``request_id`` (not a non-empty string of at most
          :data:`MAX_REQUEST_ID_CHARS` characters); :class:`DuplicateRequestError` for an id in use;
        * :class:`SamplingParamsError` for parameters that do not fit this model (context, vocabulary, a stop
          mask covering the whole vocabulary; ``SamplingParams`` refuses its own out-of-range values itself);
        * :class:`ResponseFormatError` (a :class:`RequestError` naming ``response_format.<kind>``) for a response
          format that does not compile for this tokenizer, or not within ``grammar_compile_timeout_s`` (compiled
          here, on the caller's thread and the compiler's workers, never on the engine thread; cached by content);
        * an ``AdapterError`` subclass for the adapter (malformed id, not found, unreadable or incompatible);
        * :class:`QueueFullError` when ``max_waiting`` requests already wait.
        """
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        rid = self._request_id(request_id)
        end_of_turn: tuple[int, ...] = ()
        chat = isinstance(prompt, ChatPrompt)
        if chat:  # the adapter first: its directory may hold the template
            if adapter_id is not None:
                self._require_adapter(adapter_id)
            adapter_dir = self.adapter_cache.path(adapter_id) if adapter_id is not None else None
            rendered = self.chat_templates.render(prompt, self.max_prompt_chars, adapter_dir)
            ids, end_of_turn = self._prompt_ids(rendered.prompt_token_ids), rendered.end_of_turn_ids
        else:
            ids = self._prompt_ids(prompt)
        params.check_context(len(ids), self.max_model_len)
        params.check_vocab(self.model.config.vocab_size)
        self._check_stop_mask(params)
        fmt = params.response_format
        matcher = self.grammars.matcher(fmt) if fmt is not None else None
        if adapter_id is not None and not chat:
            self._require_adapter(adapter_id)
        request = Request(rid, ids, params, adapter_id)
        self.scheduler.check(request)  # KV pool and batch limits: fail here, never inside a step
        state = RequestState(request, self.tokenizer, self.model.device, matcher, end_of_turn)
        with self._lock:
            if rid in self._states:
                raise DuplicateRequestError(rid)
            # the one queue cap: it counts adds not applied yet, so a step never refuses what was accepted here
            queued = self.scheduler.num_waiting + sum(1 for c, _ in self._commands if c == "add")
            if self.config.max_waiting and queued >= self.config.max_waiting:
                raise QueueFullError(self.config.max_waiting)
            self._states[rid] = state
            self._commands.append(("add", state.request))
        return rid

    def abort(self, request_id: str) -> None:
        """Cancel a request; its KV blocks and adapter pin are freed at the next step boundary."""
        with self._lock:
            self._commands.append(("abort", request_id))

    def has_work(self) -> bool:
        return bool(self._commands) or self.scheduler.has_unfinished()

    @staticmethod
    def _request_id(request_id: str | None) -> str:
        if request_id is None:
            return uuid.uuid4().hex
        if not isinstance(request_id, str) or not request_id:
            raise RequestError("request_id", f"expected a non-empty string, got {request_id!r:.80}")
        if len(request_id) > MAX_REQUEST_ID_CHARS:
            raise RequestError("request_id", f"expected at most {MAX_REQUEST_ID_CHARS} characters, got "
                                             f"{len(request_id)}")
        return request_id

    def _check_stop_mask(self, p: SamplingParams) -> None:
        """Refuse a ``min_new_tokens`` whose masked tokens (stop ids, and EOS unless ignored) leave nothing to
        sample: every row of the step would have no finite logit."""
        if p.min_new_tokens > 0:
            vocab = self.model.config.vocab_size
            banned = set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.model.config.eos_token_ids))
            if len({t for t in banned if 0 <= t < vocab}) >= vocab:
                raise SamplingParamsError("stop_token_ids", "with min_new_tokens > 0 these stop token ids (and EOS "
                                                            "unless ignore_eos) mask the whole vocabulary")

    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError("prompt", "the prompt is empty")
            ids = self.tokenize(prompt)
            if not ids:
                raise RequestError("prompt", "the prompt is empty after tokenization")
            return ids
        if isinstance(prompt, (bytes, bytearray)) or not isinstance(prompt, Sequence):
            raise RequestError("prompt", f"expected a string or a sequence of token ids, got "
                                         f"{type(prompt).__name__}")
        ids = list(prompt)
        if not ids:
            raise RequestError("prompt", "the prompt is empty")
        vocab = self.model.config.vocab_size
        bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise RequestError("prompt", f"token ids must be ints in [0, {vocab}), got {bad[:5]}")
        return ids

    def _require_adapter(self, adapter_id: str) -> None:
        if self.adapter_cache is None:
            raise AdapterNotFoundError(f"adapter {adapter_id!r:.80}: this engine has no adapter directory")
        # the cache checks the id, registers it just in time, reads and validates the adapter (raises if bad)
        # and counts the request's hit or miss
        self.adapter_cache.prefetch(adapter_id, request=True)

    # ------------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        with self._step_lock:
            outputs = self._apply_commands()
            out = self.scheduler.schedule()
            for req in out.failed:
                outputs.append(self._pop(req.request_id).output(error=req.error))
            if not out.chunks:
                return outputs
            try:
                sampled, result = self.runner.run(out.chunks, lambda rid: self._states[rid].sampling)
            except Exception as e:  # contain a failing step: fail its requests, keep serving the rest
                log.exception("step failed; failing its %d requests", len(out.chunks))
                for c in out.chunks:
                    if not c.request.is_finished:
                        self.scheduler.finish(c.request, FinishReason.ERROR)
                        outputs.append(self._pop(c.request.request_id).output(error=e))
                return outputs
            tokens = {c.request.request_id: t for c, t in zip(sampled, result.token_ids if result else [])}
            self.scheduler.on_step_done(out, tokens)
            now = time.monotonic()
            for i, c in enumerate(sampled):
                state = self._states[c.request.request_id]
                try:
                    reason = state.on_token(result, i, self.model.config.eos_token_ids, self.max_model_len, now)
                    if reason is not None:
                        self.scheduler.finish(c.request, reason)
                        self._pop(c.request.request_id)
                    outputs.append(state.output())
                except Exception as e:  # e.g. detokenizing this request's tokens: fail it alone
                    log.exception("request %r failed after its step; failing it", c.request.request_id)
                    self.scheduler.finish(c.request, FinishReason.ERROR)  # no-op if already finished
                    with self._lock:
                        self._states.pop(c.request.request_id, None)
                    outputs.append(state.output(error=e))
            return outputs

    def _apply_commands(self) -> list[RequestOutput]:
        outputs = []
        with self._lock:
            commands = list(self._commands)
            self._commands.clear()
        for kind, arg in commands:
            if kind == "add":
                try:
                    self.scheduler.add(arg)
                except Exception as e:  # noqa: BLE001 -- validated in add_request; a late refusal fails only it
                    arg.finish_reason = FinishReason.ERROR
                    outputs.append(self._pop(arg.request_id).output(error=e))
            elif kind == "abort":
                req = self.scheduler.abort(arg)
                if req is not None and arg in self._states:
                    outputs.append(self._pop(arg).output())
        return outputs

    def _pop(self, request_id: str) -> RequestState:
        with self._lock:
            return self._states.pop(request_id)

    # ------------------------------------------------------------------ offline API
    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 adapters: Sequence[str | None] | str | None = None, use_tqdm: bool = False) -> list[RequestOutput]:
        """Run prompts to completion; outputs in prompt order. ``adapters[i]`` None = base model."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        n = len(prompts)
        params = list(sampling_params) if isinstance(sampling_params, (list, tuple)) else [sampling_params] * n
        chosen = list(adapters) if isinstance(adapters, (list, tuple)) else [adapters] * n
        if len(params) != n or len(chosen) != n:
            raise ValueError(f"{n} prompts need {n} sampling params and adapters, got {len(params)} and {len(chosen)}")
        ids = [self.add_request(p, sp, a) for p, sp, a in zip(prompts, params, chosen)]
        final: dict[str, RequestOutput] = {}
        from tqdm import tqdm

        with tqdm(total=n, desc="generating", unit="req", disable=not use_tqdm) as bar:
            while len(final) < n:
                for o in self.step():
                    if o.finished and o.request_id in ids:
                        final[o.request_id] = o
                        bar.update(1)
        return [final[i] for i in ids]

    # ------------------------------------------------------------------ adapters
    def load_adapter(self, adapter_id: str, path: str | None = None) -> AdapterInfo:
        """Register ``adapter_id`` for the directory ``path`` (inside the adapter root; default: the id itself)
        and read it now so a bad adapter fails here. Nothing stays registered if it fails."""
        if self.adapter_cache is None:
            raise AdapterNotFoundError(f"adapter {adapter_id!r:.80}: this engine has no adapter directory")
        if path is not None and "\x00" in path:  # realpath would raise a bare ValueError
            raise AdapterPathError(f"adapter path {path[:80]!r} contains a NUL character")
        if path is not None and os.path.isabs(path):
            real = os.path.realpath(path)
            if os.path.commonpath([real, self.adapter_dir]) == self.adapter_dir:
                path = os.path.relpath(real, self.adapter_dir)
        # one atomic cache call (checks the id and the path): an unload of the same id racing with this one
        # cannot slip in between the read and the info lookup
        return self.adapter_cache.load(adapter_id, path)

    def unload_adapter(self, adapter_id: str) -> None:
        """Forget an adapter; raises AdapterBusyError while running requests use it."""
        if self.adapter_cache is None:
            raise AdapterNotFoundError(f"adapter {adapter_id!r:.80}: this engine has no adapter directory")
        self.adapter_cache.unregister(adapter_id)

    def list_adapters(self) -> list[AdapterInfo]:
        """Registered adapters (any tier) plus adapter directories on disk not loaded yet."""
        if self.adapter_cache is None:
            return []
        known = self.adapter_cache.info()
        seen = {i.adapter_id for i in known}
        on_disk = [AdapterInfo(adapter_id=a, path=os.path.join(self.adapter_dir, a), tier="disk", pins=0,
                               num_pages=None, nbytes=None, generation=0)
                   for a in list_adapter_dirs(self.adapter_dir) if a not in seen]
        return known + on_disk

    # ------------------------------------------------------------------ invariants
    def check_invariants(self) -> dict[str, int]:
        """Check every bookkeeping invariant; returns the resources still in use."""
        self.block_manager.check_invariants()
        self.scheduler.check_invariants()
        if self.adapter_cache is not None:
            self.adapter_cache.check_invariants()
        return {"kv_blocks_used": self.block_manager.num_used_blocks,
                "adapter_pins": self.adapter_cache.pinned_count() if self.adapter_cache else 0,
                "running": self.scheduler.num_running, "waiting": self.scheduler.num_waiting,
                "tracked": len(self._states)}


def _longest_token_chars(tokenizer) -> int:
    """Characters of the longest token string in the vocabulary (special tokens included); 1 if unknown."""
    try:
        tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    except Exception:  # noqa: BLE001 -- a tokenizer without these methods: no character limit worth having
        log.warning("cannot list the tokenizer's vocabulary; text prompts are limited by message size only")
        return 1 << 20
    return max((len(t) for t in tokens if isinstance(t, str)), default=1) or 1
