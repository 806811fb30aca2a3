"""Fault injection inside Ray workers, steered by the test through a controller actor.

`install` is the workers' `worker_process_setup_hook` (see `fault_runtime_env`). It wraps
`PartWriter.write`, so after a shard's first row group is written (its part half-done, in a
temporary file) the worker checks in with the `FaultController` actor (and `ShardWorker.load`,
which checks in with the url `LOAD` before the model loads); the controller answers:

- "continue": go on;
- "block": report (pid, node) to the test and wait to be killed: the test SIGKILLs the process
  or removes its node, mid-shard;
- "pause": wait until the test calls `release()`, then go on (a job that stays running);
- "die": SIGKILL itself (a crash or an out-of-memory kill, every time the shard is tried);
- "raise": raise TransientStorageError (a storage outage that outlasted the worker's retries).

Without a controller (or with nothing armed) every shard goes on untouched.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from dataclasses import dataclass
from typing import Any

import ray

CONTROLLER = "faults-controller"
LOAD = "<loading the model>"  # the `url` a worker reports while it loads the model
NAMESPACE = "faults"


@dataclass
class Rule:
    action: str
    match: str  # substring of the shard's file URL ("" = any shard)
    times: int | None  # None = every time


@ray.remote(num_cpus=0)
class FaultController:
    """Decides what each worker does at its checkpoint; tells the test who is blocked."""

    def __init__(self) -> None:
        self.rules: list[Rule] = []
        self.history: list[dict[str, Any]] = []
        self.blocked: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.released = asyncio.Event()

    def arm(self, action: str, match: str = "", times: int | None = 1) -> None:
        self.rules.append(Rule(action, match, times))

    def disarm(self) -> None:
        """Forget every rule, let paused workers go on, and start the next test clean."""
        self.rules.clear()
        self.released.set()
        self.released = asyncio.Event()
        self.blocked = asyncio.Queue()
        self.history.clear()

    async def checkpoint(self, info: dict[str, Any]) -> str:
        action = "continue"
        for rule in self.rules:
            # Only rules that name LOAD act while a worker loads its model.
            if (info["url"] == LOAD) != (rule.match == LOAD):
                continue
            if rule.match in info["url"] and (rule.times is None or rule.times > 0):
                if rule.times is not None:
                    rule.times -= 1
                action = rule.action
                break
        self.history.append({**info, "action": action})
        if action in ("block", "pause"):
            await self.blocked.put(info)
        return action

    async def wait_blocked(self, timeout: float) -> dict[str, Any]:
        """The next worker that blocked or paused: its pid, node id, shard part and URL."""
        return await asyncio.wait_for(self.blocked.get(), timeout)

    async def wait_released(self) -> None:
        await self.released.wait()

    def release(self) -> None:
        self.released.set()

    def get_history(self) -> list[dict[str, Any]]:
        return list(self.history)


_controller: Any = None


def _checkpoint(writer: Any) -> None:
    part = writer.final_path.rsplit("/", 1)[-1]
    _ask({"part": part, "url": _shard_url.get(part, ""), "tmp": writer.tmp_path})


def _ask(info: dict[str, Any]) -> None:
    """Check in with the controller and do what it says."""
    global _controller
    if _controller is None:
        try:
            _controller = ray.get_actor(CONTROLLER, namespace=NAMESPACE)
        except ValueError:
            return  # no controller: this test injects nothing into workers
    info = {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(), **info}
    action = ray.get(_controller.checkpoint.remote(info))
    if action == "block":
        # Wait to be killed; if the test never does, fail the shard instead of hanging.
        threading.Event().wait(300)
        raise RuntimeError("fault hook: blocked worker was never killed")
    if action == "pause":
        ray.get(_controller.wait_released.remote(), timeout=300)
    elif action == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "raise":
        from workers.errors import TransientStorageError

        raise TransientStorageError(f"cannot read '{info['url']}': OSError: [Errno 121] "
                                    "injected outage; still failing after 5 attempt(s)")


_shard_url: dict[Any, str] = {}


def install() -> None:
    """Wrap PartWriter.write and process_shard in this worker process (the setup hook)."""
    import workers.actor
    import workers.commit
    import workers.pipeline

    original_load = workers.actor.ShardWorker.load
    original_write = workers.commit.PartWriter.write
    original_process = workers.pipeline.process_shard
    def write(self: Any, table: Any) -> None:
        original_write(self, table)
        # Marked on the writer itself: ids of collected writers are reused by new ones.
        if not getattr(self, "_fault_checked", False):
            self._fault_checked = True
            _checkpoint(self)

    def process_shard(shard: Any, *args: Any, **kwargs: Any) -> Any:
        # Remember which file the part being written belongs to, for the rules' `match`.
        _shard_url[shard.part_name] = shard.url
        return original_process(shard, *args, **kwargs)

    def load(self: Any) -> Any:
        _ask({"part": "", "url": LOAD})  # rules matching LOAD act while the model loads
        return original_load(self)

    workers.commit.PartWriter.write = write  # type: ignore[method-assign]
    workers.pipeline.process_shard = process_shard
    workers.actor.process_shard = process_shard  # the actor imported the name directly
    workers.actor.ShardWorker.load = load  # type: ignore[method-assign]


def fault_runtime_env(repo: str) -> dict[str, Any]:
    """The Ray runtime env that installs the hook in every worker of the test's cluster."""
    return {"worker_process_setup_hook": "tests.faults.hooks.install",
            # The hook imports `tests`, which is only on the path from the repository root.
            "env_vars": {"PYTHONPATH": repo}}
