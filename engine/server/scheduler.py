"""The bridge between HTTP handlers and the engine: one thread owns the engine and every MLX call
(it loads the engine too: MLX's streams belong to the thread that made them); handlers hand it
jobs through a thread-safe queue and read each job's events from an asyncio queue on their own
event loop, so neither side ever blocks the other.

All requests share one `Engine.batch()`: a job joins at the next step and leaves when it finishes
or is cancelled (its blocks are free before the next step). Admission is by reservation: a job
joins when the pool has room for its prompt and its whole token budget (block counts, with the
prefix cache's blocks, evicted first when a job needs them); otherwise it waits in a bounded queue,
and beyond that bound `submit` refuses it. The batch has its own waiting queue, but it knows
neither the prefix cache (whose entries must be evicted for a job, not the job kept waiting or
ended for want of blocks) nor --max-concurrency; a job this admission lets in also fits the
batch's rule, so the batch admits it at the next step."""
from __future__ import annotations

import asyncio
import queue
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field

from metalforge.engine.server.prefix_cache import PrefixCache
from metalforge.engine.scheduler import run_blocks
from metalforge.errors import MetalforgeError


class Refused(MetalforgeError):
    """The server cannot take a request now: `status` 429 (queue full) or 503 (not running)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(eq=False)
class Job:
    """One request as the engine thread sees it. Its events, in order: ("token", Token) for each
    token, then ("done", Stats) or ("error", status, message)."""
    ids: list[int]
    max_tokens: int
    sampling: dict                 # temperature, top_p, top_k, seed, stop (Batch.add's names)
    logprobs: int | None
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    submitted: float = field(default_factory=time.perf_counter)
    blocks: int = 0                # reserved while in the batch
    rid: int | None = None
    generated: int = 0

    def post(self, *event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:       # the handler's loop is closed: nobody is listening any more
            pass


class Scheduler:
    def __init__(self, metrics, max_concurrency: int = 32, max_queue: int = 128, cache_tokens: int | None = None):
        """cache_tokens: the prefix cache's budget (default a quarter of the pool; 0: off)."""
        self.metrics, self.cache_tokens = metrics, cache_tokens
        self.max_concurrency, self.max_queue = max_concurrency, max_queue
        self.engine = None
        self._loaded = threading.Event()
        self._load_error: BaseException | None = None
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self.queued = 0                       # submitted and not yet in the batch (under _lock)
        self.failure: str | None = None       # why the engine thread stopped, once it has
        self.waiting: deque[Job] = deque()    # the engine thread's own from here on
        self.running: dict[int, Job] = {}
        self.reserved = 0
        self.thread: threading.Thread | None = None
        for name in ("prompt_tokens_total", "cached_prompt_tokens_total", "generation_tokens_total",
                     "engine_steps_total"):
            metrics.count(name, 0)               # present from the start, as Prometheus expects

    # ---- the HTTP side --------------------------------------------------------------------------
    def start(self, load):
        """Start the engine thread, which calls `load()` for its engine; return the engine once
        loaded (a failure to load is raised here)."""
        self.thread = threading.Thread(target=self._run, args=(load,), name="metalforge-engine", daemon=True)
        self.thread.start()
        self._loaded.wait()
        if self._load_error is not None:
            self.thread.join()
            raise self._load_error
        return self.engine

    def stop(self, timeout: float = 10.0) -> None:
        """End every request (each gets a 503) and the engine thread, waiting up to `timeout` s for it."""
        with self._lock:
            self.failure = self.failure or "the server is shutting down"
        self.inbox.put(("stop",))
        self.thread.join(timeout)

    def submit(self, job: Job) -> None:
        """Queue a job, or refuse it at once (Refused) when the queue is full or the engine stopped."""
        with self._lock:
            if self.failure:
                raise Refused(503, self.failure)
            if self.queued >= self.max_queue:
                raise Refused(429, f"the server is busy: {self.queued} requests are waiting, the queue holds "
                                   f"{self.max_queue}; retry later")
            self.queued += 1
            job.blocks = run_blocks(self.engine.pool, len(job.ids), job.max_tokens)   # the batch's own figure
            self.inbox.put(("submit", job))       # under the lock: never after the engine thread's last look

    def cancel(self, job: Job) -> None:
        """The client went away: drop the job (waiting or running) at the next step."""
        self.inbox.put(("cancel", job))

    # ---- the engine thread ----------------------------------------------------------------------
    def _run(self, load) -> None:
        try:
            self.engine = load()
            pool = self.engine.pool
            self.num_blocks = pool.num_blocks
            # the longest sequence one request may make: the engine's limit, and the pool's size
            self.context = min(pool.max_seq_len, pool.capacity_tokens)
            cache_tokens = pool.capacity_tokens // 4 if self.cache_tokens is None else self.cache_tokens
            self.cache = PrefixCache(self.engine, cache_tokens // pool.block_size)
            self._publish()
        except BaseException as e:
            self._load_error = e
            return
        finally:
            self._loaded.set()
        try:
            self._loop()
        except BaseException as e:   # the engine itself failed: say so to every request and stop
            traceback.print_exc(file=sys.stderr)
            with self._lock:
                self.failure = f"the engine stopped: {type(e).__name__}: {e}"
            for job in [*self.waiting, *self.running.values()]:
                job.post("error", 503, self.failure)
        finally:
            with self._lock:
                self.failure = self.failure or "the server is shutting down"
                while not self.inbox.empty():     # submitted after the last step: answered, not stranded
                    kind, *args = self.inbox.get_nowait()
                    if kind == "submit":
                        args[0].post("error", 503, self.failure)
            self._publish()
            self.engine.close()

    def _loop(self) -> None:
        batch = self.engine.batch(max_waiting=self.max_concurrency)
        while True:
            if not self._drain(batch, block=not self.running):
                break
            self._admit(batch)
            if self.running:
                batch = self._step(batch)
            self._publish()
        for rid, job in list(self.running.items()):
            batch.cancel(rid)
            self._leave(batch, rid, "cancelled")
            job.post("error", 503, self.failure)
        for job in self.waiting:
            job.post("error", 503, self.failure)
        self.cache.clear()

    def _drain(self, batch, block: bool) -> bool:
        """Take the inbox's messages (waiting for one when idle); False on stop."""
        try:
            message = self.inbox.get() if block else self.inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            kind, *args = message
            if kind == "stop":
                return False
            if kind == "submit":
                self.waiting.append(args[0])
            elif kind == "cancel":
                job = args[0]
                if job in self.waiting:
                    self.waiting.remove(job)
                    self._dequeued()
                    self.metrics.count("requests_finished_total", reason="cancelled")
                elif job.rid in self.running and self.running[job.rid] is job:
                    batch.cancel(job.rid)
                    self._leave(batch, job.rid, "cancelled")
            try:
                message = self.inbox.get_nowait()
            except queue.Empty:
                return True

    def _dequeued(self) -> None:
        with self._lock:
            self.queued -= 1

    def _fits(self, job: Job) -> bool:
        return self.reserved + job.blocks + self.cache.blocks <= self.num_blocks

    def _admit(self, batch) -> None:
        """Move waiting jobs into the batch, oldest first, while they fit (evicting cached prefixes
        for them) and the batch is under its concurrency."""
        while self.waiting and len(self.running) < self.max_concurrency:
            job = self.waiting[0]
            while not self._fits(job) and self.cache.evict():
                pass
            if not self._fits(job):
                return
            self.waiting.popleft()
            self._dequeued()
            self.cache.prepare(job.ids)
            try:
                job.rid = batch.add(job.ids, job.max_tokens, logprobs=job.logprobs, keep=self.cache.budget > 0,
                                    **job.sampling)
            except MetalforgeError as e:      # settings the HTTP side could not check: refused alone
                job.post("error", 400, str(e))
                continue
            self.running[job.rid] = job
            self.reserved += job.blocks

    def _step(self, batch):
        """One step of the batch; its tokens to their jobs. A failing step (a bug, not a request)
        ends the requests it held with an error and the server goes on with a new batch."""
        start = time.perf_counter()
        try:
            events = batch.step()
        except Exception as e:
            traceback.print_exc(file=sys.stderr)
            for rid, job in list(self.running.items()):
                job.post("error", 500, f"the engine failed during this request: {type(e).__name__}: {e}")
                if rid in batch.requests:
                    batch.cancel(rid)
                self._leave(batch, rid, "error")
            return self.engine.batch(max_waiting=self.max_concurrency)
        elapsed = time.perf_counter() - start
        decoded = 0
        for rid, token in events:
            job = self.running[rid]
            decoded += job.generated > 0
            if job.generated == 0:
                self.metrics.observe_ttft(time.perf_counter() - job.submitted)
            job.generated += 1
            job.post("token", token)
            if rid not in batch.requests:
                self._leave(batch, rid, None)
        self.metrics.count("engine_steps_total")
        if decoded:
            self.metrics.set(decode_tokens_per_second=decoded / max(elapsed, 1e-9))
        return batch

    def _leave(self, batch, rid: int, reason: str | None) -> None:
        """A request left the batch (finished, or `reason`): its reservation ends, its stats go to
        its job, its kept sequence to the prefix cache (a request that failed leaves nothing)."""
        job = self.running.pop(rid)
        self.reserved -= job.blocks
        stats = batch.finished[rid]
        kept = batch.sequence(rid) if self.cache.budget else None
        batch.forget(rid)
        if kept is not None and kept in self.engine.pool.seqs and reason == "error":
            self.engine.remove(kept)
        elif kept is not None and kept in self.engine.pool.seqs:
            self.cache.keep(kept)
        m = self.metrics
        m.count("requests_finished_total", reason=reason or stats.stop_reason)
        m.count("prompt_tokens_total", stats.prompt_tokens)
        m.count("cached_prompt_tokens_total", stats.cached_tokens)
        m.count("generation_tokens_total", stats.generated_tokens)
        if reason is None:
            job.post("done", stats)

    def _publish(self) -> None:
        pool = self.engine.pool
        with self._lock:
            queued = self.queued
        self.metrics.set(queue_length=queued, requests_running=len(self.running), kv_blocks_used=pool.used_blocks,
                         kv_blocks_free=pool.free_blocks, prefix_cache_blocks=self.cache.blocks)
