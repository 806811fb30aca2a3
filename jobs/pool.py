"""The actor pool on Ray core: bounded shards in flight, retries, dead actors replaced.

Failure handling, shard by shard:
- a task error that cannot pass on another try (bad data, a missing or forbidden object, a bad
  spec) fails the shard at once; any other error (a transient storage failure that outlasted the
  worker's own retries, a backend failure, an unexpected exception) is retried up to
  `max_retries` times, then fails the shard;
- an actor death (SIGKILL, out of memory, a lost node) is blamed on one shard: the actor's
  oldest unfinished call, the one it was executing (Ray runs a default actor's calls in order;
  were calls to overlap, the oldest is still the likeliest culprit, and a poison shard requeued
  first is the oldest on its next actor). A call whose part is already in OUTPUT finished
  (its reply died with the actor) and is not blamed. That shard is requeued until it has killed
  `max_actor_deaths` workers, and is then reported as doing so; the other calls of the dead
  actor are requeued without blame. The actor is replaced and gets shards again once its model
  is loaded;
- when no worker can be started at all (the cluster lost the nodes it needs) for
  `start_timeout` seconds, the remaining shards fail with that reason instead of waiting forever.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, OutOfMemoryError, RayActorError, RayTaskError

from jobs.plan_share import PlanRefs, PlanWorker
from workers.actor import ShardWorker
from workers.errors import (
    BackendError,
    DataError,
    MissingDependencyError,
    RunnerError,
    SpecError,
    StorageError,
    TransientStorageError,
)
from workers.types import Shard, ShardResult, WorkerConfig


@dataclass
class ShardFailure:
    """A shard given up on, with the reason the user reads."""

    shard: Shard
    reason: str
    attempts: int
    actor_deaths: int
    #: data | storage | spec | backend | error | actor_died | no_workers
    kind: str = "error"


@dataclass
class PoolOutcome:
    results: dict[str, ShardResult] = field(default_factory=dict)
    failures: dict[str, ShardFailure] = field(default_factory=dict)
    worker_stats: list[dict[str, Any]] = field(default_factory=list)
    actors_replaced: int = 0
    worker_info: dict[str, Any] = field(default_factory=dict)
    #: Per shard id, task errors and actor deaths it went through (committed shards too).
    errors: dict[str, int] = field(default_factory=dict)
    deaths: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class PoolConfig:
    workers: int
    num_gpus: float
    num_cpus: float
    shards_in_flight: int
    max_retries: int
    max_actor_deaths: int = 3
    #: Seconds to wait for a replacement worker when no worker is running, before giving up.
    start_timeout: float = 600.0


#: The Ray concurrency group of the driver's progress polls: a thread of its own in every
#: actor, so `ShardWorker.progress` answers while `process` calls run (a CPU actor runs one at
#: a time, in the default group).
PROGRESS_GROUP = "progress"


class RowsPoll:
    """Rows written so far by shards still running, asked of every ready actor once per tick.

    Workers never import Ray, so they cannot push; the driver asks instead, without waiting:
    a tick collects the answers that have come and sends a new question to each actor that
    has none outstanding, so a slow or dying actor never stalls the driver's loop.
    """

    def __init__(self) -> None:
        self.pending: dict[ray.ObjectRef, int] = {}
        self.latest: dict[int, dict[str, int]] = {}

    def forget(self, index: int) -> None:
        """Actor `index` was replaced: its counts are gone with it (its shards run again)."""
        self.latest.pop(index, None)
        self.pending = {ref: i for ref, i in self.pending.items() if i != index}

    def tick(self, actors: Sequence[Any], ready: Sequence[bool], finished: Collection[str]
             ) -> dict[str, int]:
        """Collect the answers that came; ask again; rows of each shard not in `finished`."""
        if self.pending:
            done, _ = ray.wait(list(self.pending), num_returns=len(self.pending), timeout=0)
            for ref in done:
                index = self.pending.pop(ref)
                try:
                    self.latest[index] = ray.get(ref)
                except (RayActorError, RayTaskError, OutOfMemoryError):
                    self.latest[index] = {}
        asked = set(self.pending.values())
        for index, actor in enumerate(actors):
            if ready[index] and index not in asked:
                ref = actor.progress.options(concurrency_group=PROGRESS_GROUP).remote()
                self.pending[ref] = index
        return {sid: rows for counts in self.latest.values() for sid, rows in counts.items()
                if sid not in finished}


def error_text(exc: BaseException) -> str:
    """The user-facing message of a task error: our own exception's text, without Ray's traceback."""
    if isinstance(exc, RayTaskError):
        cause = exc.cause
        if isinstance(cause, RunnerError):
            return str(cause)
        if cause is not None:
            return f"{cause.__class__.__name__}: {cause}"
    return f"{exc.__class__.__name__}: {str(exc).strip().splitlines()[-1] if str(exc) else ''}"


def failure_kind(exc: BaseException) -> str:
    """What a task error was about: data, storage, spec, backend or error (anything else)."""
    cause = exc.cause if isinstance(exc, RayTaskError) else exc
    if isinstance(cause, DataError):
        return "data"
    if isinstance(cause, StorageError):
        return "storage"
    if isinstance(cause, SpecError | MissingDependencyError):
        return "spec"
    if isinstance(cause, BackendError):
        return "backend"
    return "error"


def is_retryable(exc: BaseException) -> bool:
    """False for task errors that fail the same way every time, so retrying only wastes time."""
    cause = exc.cause if isinstance(exc, RayTaskError) else exc
    if isinstance(cause, TransientStorageError):
        return True
    return not isinstance(cause, DataError | StorageError | SpecError | MissingDependencyError)


def death_reason(deaths: int, exc: BaseException) -> str:
    """Why a shard is given up after its workers died `deaths` times."""
    last = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
    if isinstance(exc, OutOfMemoryError):
        return (f"Ray's memory monitor killed its worker {deaths} times while processing it (out "
                "of memory); lower --batch-size or --shards-in-flight, cut smaller shards with "
                f"--rows-per-shard, or give the workers more memory; last: {last}")
    return (f"its worker process died {deaths} times while processing it (killed, out of "
            f"memory, a crash in the backend, or its node was lost); last: {last}")


class ShardPool:
    """Runs shards on a pool of `ShardWorker` actors.

    Each actor has at most `shards_in_flight` shards queued (Ray runs an actor's calls in order),
    so the next shard goes to whichever actor frees a slot first. Failures: see the module doc.
    """

    def __init__(self, config: PoolConfig, worker_config: WorkerConfig,
                 model_ref: ray.ObjectRef | PlanRefs,
                 is_committed: Callable[[Shard], bool] | None = None) -> None:
        self.config = config
        # Whether a shard's part is in OUTPUT: tells a call that finished (its reply lost with
        # its dead actor) from the one the actor died executing.
        self.is_committed = is_committed
        self.worker_config = worker_config
        self.model_ref = model_ref
        # TensorRT: every actor gets all plans' refs and fetches the one for its own GPU.
        worker_class = PlanWorker if isinstance(model_ref, PlanRefs) else ShardWorker
        # A GPU actor runs its queued shards' calls concurrently, so the next shard reads ahead
        # and fills the device slots while the last batches of the one before are on the GPU
        # (`SlotPool` turns keep their order); synchronous backends serialize in the worker.
        # Ray's typing of `ray.remote` lacks concurrency_groups, which it documents and takes.
        remote = ray.remote(concurrency_groups={PROGRESS_GROUP: 1})  # type: ignore[call-overload]
        self._remote = remote(worker_class).options(
            num_gpus=config.num_gpus, num_cpus=config.num_cpus, max_restarts=0,
            max_task_retries=0,
            max_concurrency=config.shards_in_flight if config.num_gpus else 1)
        self.actors: list[Any] = []
        self.replaced = 0
        self._poll = RowsPoll()

    def _new_actor(self) -> Any:
        return self._remote.remote(self.worker_config, self.model_ref)

    def start(self, count: int) -> dict[str, Any]:
        """Start `count` actors and load the model in each; a load failure stops the job here.

        A worker that dies while loading (its node just went away, say) is replaced, up to
        `max_actor_deaths` times in a row; a model that fails to load fails the job at once.
        """
        self.actors = [self._new_actor() for _ in range(count)]
        infos: dict[int, Any] = {}
        pending = list(range(count))
        last: BaseException | None = None
        for _ in range(self.config.max_actor_deaths):
            refs = [self.actors[i].load.remote() for i in pending]
            died: list[int] = []
            for index, ref in zip(pending, refs, strict=True):
                try:
                    infos[index] = ray.get(ref)
                except RayTaskError as exc:
                    self.shutdown()
                    raise BackendError(f"the workers could not load the model: "
                                       f"{error_text(exc)}") from exc
                except RayActorError as exc:
                    died.append(index)
                    last = exc
            if not died:
                return dict(infos[min(infos)])
            for index in died:
                ray.kill(self.actors[index], no_restart=True)
                self.actors[index] = self._new_actor()
                self.replaced += 1
            pending = died
        self.shutdown()
        raise BackendError(f"workers kept dying while loading the model "
                           f"({self.config.max_actor_deaths} times): {last}") from last

    def run(self, shards: list[Shard],
            on_result: Callable[[ShardResult | None, ShardFailure | None], None],
            on_tick: Callable[[], None] | None = None, tick_seconds: float = 1.0,
            on_progress: Callable[[dict[str, int]], None] | None = None) -> PoolOutcome:
        """Process every shard; returns committed results and failures (never raises for a shard).

        `on_tick` runs at least every `tick_seconds`; an exception it raises stops the run.
        `on_progress(rows)` runs as often, with the rows the actors have written of each shard
        still running (see `RowsPoll`: the answers of the tick before).
        """
        outcome = PoolOutcome()
        self._poll = RowsPoll()
        queue = collections.deque(shards)
        attempts: collections.Counter[str] = collections.Counter()
        deaths: collections.Counter[str] = collections.Counter()
        inflight: dict[ray.ObjectRef, tuple[int, Any, Shard]] = {}
        # Per actor, its unfinished calls in submission order: the first is the one executing.
        calls: list[list[ray.ObjectRef]] = [[] for _ in self.actors]
        load: list[int] = [0] * len(self.actors)
        self._ready = [True] * len(self.actors)
        self._starting: dict[ray.ObjectRef, int] = {}
        waiting_since: float | None = None

        def fill() -> None:
            # One shard at a time to the least loaded actor: with few shards, each actor gets
            # one before any gets a second (a queue of two on one actor idles another).
            while queue:
                open_ = [i for i in range(len(self.actors))
                         if self._ready[i] and load[i] < self.config.shards_in_flight]
                if not open_:
                    return
                index = min(open_, key=lambda i: load[i])
                shard = queue.popleft()
                actor = self.actors[index]
                ref = actor.process.remote(shard)
                inflight[ref] = (index, actor, shard)
                calls[index].append(ref)
                load[index] += 1

        def give_up(shard: Shard, reason: str, kind: str) -> None:
            failure = ShardFailure(shard, reason, attempts[shard.id], deaths[shard.id], kind)
            outcome.failures[shard.id] = failure
            on_result(None, failure)

        def finish(ref: ray.ObjectRef) -> tuple[int, Any, Shard]:
            index, actor, shard = inflight.pop(ref)
            if ref in calls[index]:
                calls[index].remove(ref)
                load[index] -= 1
            return index, actor, shard

        def succeeded(shard: Shard, result: ShardResult) -> None:
            outcome.results[shard.id] = result
            on_result(result, None)

        def actor_died(index: int, actor: Any, dead: ray.ObjectRef, exc: BaseException) -> None:
            """Settle every call of a dead actor: blame the executing one, requeue the rest."""
            # An actor already replaced had its other calls settled when it died.
            refs = ([r for r in calls[index] if r in inflight] if self.actors[index] is actor
                    else [dead])
            # Once an actor is dead its calls resolve quickly; don't hang on a straggler.
            ray.wait(refs, num_returns=len(refs), timeout=30)
            blamed = False
            for ref in refs:
                _, _, shard = finish(ref)
                try:
                    result = ray.get(ref, timeout=0)
                except (RayActorError, OutOfMemoryError, GetTimeoutError) as err:
                    done = (not blamed and self.is_committed is not None
                            and not isinstance(err, OutOfMemoryError)
                            and self.is_committed(shard))
                    if not blamed and not done and not isinstance(err, GetTimeoutError):
                        blamed = True
                        deaths[shard.id] += 1
                        if deaths[shard.id] >= self.config.max_actor_deaths:
                            give_up(shard, death_reason(deaths[shard.id], err), "actor_died")
                            continue
                    queue.appendleft(shard)
                except RayTaskError as err:  # finished (with an error) before the actor died
                    task_error(shard, err)
                else:
                    succeeded(shard, result)
            if self.actors[index] is actor:
                self._replace(index)
                calls[index] = []
                load[index] = 0

        def task_error(shard: Shard, exc: RayTaskError) -> None:
            attempts[shard.id] += 1
            if not is_retryable(exc) or attempts[shard.id] > self.config.max_retries:
                give_up(shard, error_text(exc), failure_kind(exc))
            else:
                queue.append(shard)

        start_failures: collections.Counter[int] = collections.Counter()
        last_start_error = ""

        def started(ref: ray.ObjectRef) -> None:
            nonlocal last_start_error
            index = self._starting.pop(ref)
            try:
                ray.get(ref)
            except (RayActorError, RayTaskError, OutOfMemoryError) as exc:
                # It died or failed to load while starting (its node went away, say): try
                # again, a bounded number of times in a row.
                last_start_error = error_text(exc)
                start_failures[index] += 1
                if start_failures[index] < self.config.max_actor_deaths:
                    self._replace(index)
            else:
                start_failures[index] = 0
                self._ready[index] = True

        fill()
        while inflight or (queue and self._starting):
            ready, _ = ray.wait([*inflight, *self._starting], num_returns=1, timeout=tick_seconds)
            if on_tick is not None:
                on_tick()
            if on_progress is not None:
                on_progress(self._poll.tick(self.actors, self._ready,
                                            outcome.results.keys() | outcome.failures.keys()))
            for ref in ready:
                if ref in self._starting:
                    started(ref)
                    continue
                if ref not in inflight:  # settled with its dead actor's other calls
                    continue
                index, actor, shard = inflight[ref]
                try:
                    result: ShardResult = ray.get(ref)
                except RayTaskError as exc:
                    finish(ref)
                    task_error(shard, exc)
                except (RayActorError, OutOfMemoryError) as exc:
                    actor_died(index, actor, ref, exc)  # settles it with the actor's others
                else:
                    finish(ref)
                    succeeded(shard, result)
            fill()
            if queue and not inflight and self._starting:
                # Nothing runs: every worker is waiting to be scheduled. Bounded wait.
                waiting_since = waiting_since or time.monotonic()
                if time.monotonic() - waiting_since > self.config.start_timeout:
                    reason = (f"no worker could be started for {self.config.start_timeout:.0f}s "
                              f"(each needs {self.config.num_cpus:g} CPU, "
                              f"{self.config.num_gpus:g} GPU; the cluster lost the nodes that "
                              "had them?); rerun the job when the cluster has room")
                    while queue:
                        give_up(queue.popleft(), reason, "no_workers")
            else:
                waiting_since = None
        while queue:  # every worker is gone and none could be started again
            give_up(queue.popleft(), "no worker left to run it: replacement workers failed to "
                    f"start; last: {last_start_error}", "no_workers")
        outcome.actors_replaced = self.replaced
        outcome.errors, outcome.deaths = dict(attempts), dict(deaths)
        return outcome

    def _replace(self, index: int) -> None:
        """Swap a dead actor for a new one, which gets shards once its model is loaded."""
        ray.kill(self.actors[index], no_restart=True)
        self.actors[index] = self._new_actor()
        self.replaced += 1
        self._poll.forget(index)
        ready = getattr(self, "_ready", None)
        if ready is not None:
            ready[index] = False
            self._starting[self.actors[index].load.remote()] = index

    def stats(self) -> list[dict[str, Any]]:
        """Per-actor totals from every live actor."""
        ready = getattr(self, "_ready", [True] * len(self.actors))
        # An actor still waiting to be scheduled would only time out here.
        refs = [a.stats.remote() for a, ok in zip(self.actors, ready, strict=True) if ok]
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
