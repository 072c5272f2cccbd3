"""A plain HELM Client for stock `helm-run --local-path DIR`: it micro-batches concurrent requests.

HELM calls `make_request` one request at a time from `--num-threads` threads (and may build one
client per thread). Each call queues its request on the one batcher of its engine and waits; the
batcher's worker thread collects whatever arrives within a short window (up to a block of
`policy.block_size` rows), runs the rows that share generation parameters as one engine call and
hands each caller its result. With `-n 32`, stock helm-run reaches batches of up to 32.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from dataclasses import dataclass, field

from helm.clients.client import Client
from helm.common.request import Request, RequestResult

from engine.weights import cache_root
from harness.batching import GenerationParams
from harness.generation import TokenTexts, run_engine_call
from harness.helm.deployment import EngineSpec
from harness.helm.engine_pool import engine_for
from scenarios.nltk_fallback import ensure_punkt_tab

COLLECT_WINDOW_S = 0.05


@dataclass
class _Pending:
    request: Request
    done: threading.Event = field(default_factory=threading.Event)
    result: RequestResult | None = None
    error: BaseException | None = None


class MicroBatcher:
    """Collects concurrent requests for one engine and runs them in shared engine calls."""

    def __init__(self, spec: EngineSpec):
        self.spec = spec
        self._queue: queue.Queue[_Pending] = queue.Queue()
        threading.Thread(target=self._serve, name="engine-batcher", daemon=True).start()

    def submit(self, request: Request) -> _Pending:
        pending = _Pending(request)
        self._queue.put(pending)
        pending.done.wait()
        return pending

    def _collect(self, limit: int) -> list[_Pending]:
        batch = [self._queue.get()]
        deadline = time.monotonic() + COLLECT_WINDOW_S
        while len(batch) < limit:
            try:
                batch.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        return batch

    def _serve(self) -> None:
        engine = texts = None
        while True:
            groups: dict[GenerationParams, list[_Pending]] = {}
            for item in self._collect(self.spec.policy_obj.block_size):
                groups.setdefault(GenerationParams.of(item.request), []).append(item)
            for items in groups.values():
                try:
                    if engine is None:
                        engine = engine_for(self.spec)
                        texts = TokenTexts(engine.tokenizer)
                    results, _ = run_engine_call(engine, texts, [i.request for i in items], self.spec.seed)
                    for item, result in zip(items, results, strict=True):
                        item.result = result
                except Exception as err:  # reported to every waiting caller as a failed request
                    for item in items:
                        item.error = err
                for item in items:
                    item.done.set()


_lock = threading.Lock()
_batchers: dict[str, MicroBatcher] = {}


def _batcher_for(spec: EngineSpec) -> MicroBatcher:
    key = json.dumps(spec.to_args(), sort_keys=True)
    with _lock:
        if key not in _batchers:
            _batchers[key] = MicroBatcher(spec)
        return _batchers[key]


class EngineClient(Client):
    def __init__(self, model: str, weights: str | None = None, policy: dict | None = None, seed: int = 0,
                 load: dict | None = None):
        ensure_punkt_tab(cache_root() / "nltk_data")  # stock helm-run scores BLEU offline too
        self._batcher = _batcher_for(EngineSpec(model=model, weights=weights, policy=policy or {}, seed=seed,
                                                load=load or {}))

    def make_request(self, request: Request) -> RequestResult:
        pending = self._batcher.submit(request)
        if pending.error is not None:
            return RequestResult(success=False, cached=False, error=f"engine error: {pending.error}",
                                 completions=[], embedding=[])
        assert pending.result is not None
        return pending.result
