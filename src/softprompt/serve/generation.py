"""The generation service: one :class:`GenerationEngine` stepped in a worker thread, fed by the event loop.

Requests from every client and adapter join the same decoding batch (iteration-level batching, see
``softprompt.multi.generation``). The worker thread owns the engine; the event loop hands it requests through a
thread-safe queue and receives each new token on the request's own asyncio queue, so streaming responses and
non-streaming ones are the same loop. Text is decoded incrementally: a delta is released once it can no longer be
part of a stop string or of an unfinished UTF-8 character.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass, field

from ..multi.generation import GenerationEngine, SamplingParams, TokenEvent

log = logging.getLogger("softprompt.serve")


@dataclass
class Completion:
    """What a finished request produced."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class _Pending:
    prompt_ids: list[int]
    adapter: str | None
    params: SamplingParams
    events: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    tokens: list[int] = field(default_factory=list)


class GenerationService:
    """Owns the engine and its thread. ``stream()`` yields text deltas; ``complete()`` returns the whole text."""

    def __init__(self, model, *, max_rows: int = 32, decoding: str = "auto", max_context: int = 2048):
        self.model = model
        # Kept to rebuild the engine after a failed step.
        self._engine_args = {"max_rows": max_rows, "decoding": decoding, "max_context": max_context}
        self.engine = GenerationEngine(model, **self._engine_args)
        self._engine_args["decoding"] = self.engine.decoding  # a rebuilt engine keeps what "auto" chose at startup
        self.tokenizer = model.tokenizer
        self._inbox: queue.Queue = queue.Queue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pending: dict[int, _Pending] = {}

    # ---- lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="softprompt-generate", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the worker thread; requests still running end with finish_reason "abort"."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    @property
    def outstanding(self) -> int:
        """Requests queued or decoding."""
        return self._inbox.qsize() + len(self._pending)

    # ---- requests ------------------------------------------------------------------------------------------
    def check(self, prompt_ids: list[int], adapter: str | None, params: SamplingParams) -> None:
        """Validate a request in the caller's thread (errors become 4xx before anything is queued)."""
        self.engine.check(prompt_ids, adapter, params)

    async def stream(self, prompt_ids: list[int], adapter: str | None, params: SamplingParams):
        """Yield ``(delta_text, finish_reason, completion_tokens)``; the last one carries the finish reason
        ("stop", "length", or "abort" when the service stopped or failed under the request)."""
        pending = _Pending(list(prompt_ids), adapter, params, asyncio.Queue(), asyncio.get_running_loop())
        self._inbox.put(pending)
        self._wake.set()
        released = ""
        while True:
            event: TokenEvent | None = await pending.events.get()
            if event is None:  # the service stopped or failed under this request
                yield "", "abort", len(pending.tokens)
                return
            pending.tokens.append(event.token_id)
            text, done = self._text(pending, event)
            safe = text if done else self._releasable(text, params.stop)
            if len(safe) > len(released) or done:
                delta, released = safe[len(released):], safe
                yield delta, event.finish_reason if done else None, len(pending.tokens)
            if done:
                return

    async def complete(self, prompt_ids: list[int], adapter: str | None, params: SamplingParams) -> Completion:
        """Run one request to the end."""
        parts, reason, tokens = [], "abort", 0
        async for delta, finish, count in self.stream(prompt_ids, adapter, params):
            parts.append(delta)
            reason, tokens = finish or reason, count
        return Completion("".join(parts), reason, len(prompt_ids), tokens)

    # ---- text --------------------------------------------------------------------------------------------------
    def _text(self, pending: _Pending, event: TokenEvent) -> tuple[str, bool]:
        done = event.finish_reason is not None
        tokens = pending.tokens
        if done and tokens and tokens[-1] in self.engine.stop_ids(pending.params):
            tokens = tokens[:-1]  # the stop token is not part of the text (OpenAI's convention)
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        if done:
            cut = [i for i in (text.find(s) for s in pending.params.stop) if i >= 0]
            if cut:
                text = text[: min(cut)]
        return text, done

    @staticmethod
    def _releasable(text: str, stops: list[str]) -> str:
        """The part of ``text`` no later token can change: not a partial UTF-8 character, not a possible start of a
        stop string."""
        end = len(text)
        while end and text[end - 1] == "\ufffd":
            end -= 1
        for stop in stops:
            found = text.find(stop)
            if found >= 0:
                end = min(end, found)
            for k in range(min(len(stop) - 1, end), 0, -1):
                if text[:end].endswith(stop[:k]):
                    end -= k
                    break
        return text[:end]

    # ---- the worker thread -------------------------------------------------------------------------------------
    def _work(self) -> None:
        engine = self.engine
        while not self._stop.is_set():
            while True:
                try:
                    pending = self._inbox.get_nowait()
                except queue.Empty:
                    break
                try:
                    rid = engine.submit(pending.prompt_ids, pending.adapter, pending.params)
                except Exception:  # checked before queueing; an adapter removed since then ends the request
                    pending.loop.call_soon_threadsafe(pending.events.put_nowait, None)
                    continue
                self._pending[rid] = pending
            if not engine.busy:
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                with self.model.lock:
                    events = engine.step()
            except Exception:  # e.g. out of memory: end the running requests, keep serving new ones
                log.exception("generation step failed; %d running requests end with finish_reason 'abort'",
                              len(self._pending))
                self._abort_all()
                self.engine = engine = GenerationEngine(self.model, **self._engine_args)
                continue
            for event in events:
                pending = self._pending.get(event.request_id)
                if pending is None:
                    continue
                pending.loop.call_soon_threadsafe(pending.events.put_nowait, event)
                if event.finish_reason is not None:
                    del self._pending[event.request_id]
                    engine.forget(event.request_id)
        self._abort_all()

    def _abort_all(self) -> None:
        for pending in self._pending.values():
            pending.loop.call_soon_threadsafe(pending.events.put_nowait, None)
        self._pending.clear()
