"""The actor pool on Ray core: bounded shards in flight, retries, dead actors replaced."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, OutOfMemoryError, RayActorError, RayTaskError

from workers.actor import ShardWorker
from workers.errors import BackendError, RunnerError
from workers.types import Shard, ShardResult, WorkerConfig


@dataclass
class ShardFailure:
    """A shard given up on, with the reason the user reads."""

    shard: Shard
    reason: str
    attempts: int
    actor_deaths: int


@dataclass
class PoolOutcome:
    results: dict[str, ShardResult] = field(default_factory=dict)
    failures: dict[str, ShardFailure] = field(default_factory=dict)
    worker_stats: list[dict[str, Any]] = field(default_factory=list)
    actors_replaced: int = 0
    worker_info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PoolConfig:
    workers: int
    num_gpus: float
    num_cpus: float
    shards_in_flight: int
    max_retries: int
    max_actor_deaths: int = 3


def error_text(exc: BaseException) -> str:
    """The user-facing message of a task error: our own exception's text, without Ray's traceback."""
    if isinstance(exc, RayTaskError):
        cause = exc.cause
        if isinstance(cause, RunnerError):
            return str(cause)
        if cause is not None:
            return f"{cause.__class__.__name__}: {cause}"
    return f"{exc.__class__.__name__}: {str(exc).strip().splitlines()[-1] if str(exc) else ''}"


class ShardPool:
    """Runs shards on a pool of `ShardWorker` actors.

    Each actor has at most `shards_in_flight` shards queued (Ray runs an actor's calls in order),
    so the next shard goes to whichever actor frees a slot first. A shard whose call raised is
    retried up to `max_retries` times; a shard whose actor died is requeued (up to
    `max_actor_deaths` times) and the actor replaced.
    """

    def __init__(self, config: PoolConfig, worker_config: WorkerConfig, model_ref: ray.ObjectRef,
                 ) -> None:
        self.config = config
        self.worker_config = worker_config
        self.model_ref = model_ref
        self._remote = ray.remote(ShardWorker).options(
            num_gpus=config.num_gpus, num_cpus=config.num_cpus, max_restarts=0,
            max_task_retries=0)
        self.actors: list[Any] = []
        self.replaced = 0

    def _new_actor(self) -> Any:
        return self._remote.remote(self.worker_config, self.model_ref)

    def start(self, count: int) -> dict[str, Any]:
        """Start `count` actors and load the model in each; a load failure stops the job here."""
        self.actors = [self._new_actor() for _ in range(count)]
        try:
            infos = ray.get([a.load.remote() for a in self.actors])
        except RayTaskError as exc:
            self.shutdown()
            raise BackendError(f"the workers could not load the model: {error_text(exc)}") from exc
        except RayActorError as exc:
            self.shutdown()
            raise BackendError(f"a worker died while loading the model: {exc}") from exc
        return dict(infos[0])

    def run(self, shards: list[Shard],
            on_result: Callable[[ShardResult | None, ShardFailure | None], None],
            on_tick: Callable[[], None] | None = None, tick_seconds: float = 1.0) -> PoolOutcome:
        """Process every shard; returns committed results and failures (never raises for a shard)."""
        outcome = PoolOutcome()
        queue = collections.deque(shards)
        attempts: collections.Counter[str] = collections.Counter()
        deaths: collections.Counter[str] = collections.Counter()
        errors: dict[str, str] = {}
        inflight: dict[ray.ObjectRef, tuple[int, Any, Shard]] = {}
        load: list[int] = [0] * len(self.actors)

        def fill() -> None:
            for index in sorted(range(len(self.actors)), key=lambda i: load[i]):
                while queue and load[index] < self.config.shards_in_flight:
                    shard = queue.popleft()
                    actor = self.actors[index]
                    inflight[actor.process.remote(shard)] = (index, actor, shard)
                    load[index] += 1

        def give_up(shard: Shard, reason: str) -> None:
            failure = ShardFailure(shard, reason, attempts[shard.id], deaths[shard.id])
            outcome.failures[shard.id] = failure
            on_result(None, failure)

        fill()
        while inflight:
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=tick_seconds)
            if on_tick is not None:
                on_tick()
            for ref in ready:
                index, actor, shard = inflight.pop(ref)
                load[index] -= 1
                try:
                    result: ShardResult = ray.get(ref)
                except RayTaskError as exc:
                    attempts[shard.id] += 1
                    errors[shard.id] = error_text(exc)
                    if attempts[shard.id] > self.config.max_retries:
                        give_up(shard, errors[shard.id])
                    else:
                        queue.append(shard)
                except (RayActorError, OutOfMemoryError) as exc:
                    deaths[shard.id] += 1
                    if self.actors[index] is actor:  # its other calls fail too: replace once
                        self._replace(index)
                    if deaths[shard.id] >= self.config.max_actor_deaths:
                        give_up(shard, f"its worker process died {deaths[shard.id]} times while "
                                f"processing it (out of memory, or a crash in the backend?); "
                                f"last: {str(exc).strip().splitlines()[0]}")
                    else:
                        queue.appendleft(shard)
                else:
                    outcome.results[shard.id] = result
                    on_result(result, None)
            fill()
        outcome.actors_replaced = self.replaced
        return outcome

    def _replace(self, index: int) -> None:
        """Swap a dead actor for a new one; the new one loads the model on its first shard."""
        ray.kill(self.actors[index], no_restart=True)
        self.actors[index] = self._new_actor()
        self.replaced += 1

    def stats(self) -> list[dict[str, Any]]:
        """Per-actor totals from every live actor."""
        refs = [a.stats.remote() for a in self.actors]
        stats = []
        deadline = time.monotonic() + 30
        for ref in refs:
            try:
                stats.append(ray.get(ref, timeout=max(0.1, deadline - time.monotonic())))
            except (RayActorError, GetTimeoutError):
                continue
        return stats

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
