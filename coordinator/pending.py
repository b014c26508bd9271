"""The scheduler's queue of tasks waiting for an agent, indexed by device.

A task runs only on its own device, so the queue is one ordered map per device:
finding work for an idle agent looks at its device's tasks alone, and adding,
re-queueing (at the front) and removing a task cost the same whatever the size of the
fleet or of the queue.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

from results.records import TaskRecord


class PendingQueue:
    """Tasks waiting for an agent: first in, first out per device; re-queued tasks first."""

    def __init__(self) -> None:
        self._by_device: dict[str, OrderedDict[str, TaskRecord]] = {}
        self._count = 0

    def append(self, task: TaskRecord) -> None:
        """Queue ``task`` behind its device's other tasks."""
        queue = self._by_device.setdefault(task.device_id, OrderedDict())
        if task.task_id not in queue:
            self._count += 1
        queue[task.task_id] = task

    def push_front(self, task: TaskRecord) -> None:
        """Queue ``task`` ahead of its device's other tasks (a task handed back)."""
        self.append(task)
        self._by_device[task.device_id].move_to_end(task.task_id, last=False)

    def remove(self, task: TaskRecord) -> bool:
        """Take ``task`` out of the queue; False if it was not queued."""
        queue = self._by_device.get(task.device_id)
        if queue is None or queue.pop(task.task_id, None) is None:
            return False
        self._count -= 1
        if not queue:
            del self._by_device[task.device_id]
        return True

    def for_device(self, device_id: str) -> Iterator[TaskRecord]:
        """The device's queued tasks, in order (change the queue only after the loop)."""
        return iter(self._by_device.get(device_id, {}).values())

    def devices(self) -> list[str]:
        """The devices with queued tasks."""
        return list(self._by_device)

    def __contains__(self, task: object) -> bool:
        if not isinstance(task, TaskRecord):
            return False
        return task.task_id in self._by_device.get(task.device_id, {})

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[TaskRecord]:
        """Every queued task, device by device."""
        for queue in list(self._by_device.values()):
            yield from list(queue.values())
