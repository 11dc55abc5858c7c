"""The life of a long task, without Qt: its run state (after napari's `Status`) and the words
the studio and the CLI use to tell it.

A task is idle until it starts; it runs; a stop asked for makes it `STOPPING` until the work
notices; it then ends exactly once, as finished, failed or cancelled. `ui/task.py` drives the
studio's panels with this enum; nothing here knows who is watching.
"""

from __future__ import annotations

from enum import Enum


class TaskStatus(str, Enum):
    IDLE = "idle"  # never run in this panel
    RUNNING = "running"
    STOPPING = "stopping"  # a pause or cancel was asked for; the work has not noticed yet
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"  # stopped on request (a pause is a cancel that keeps its checkpoint)

    @property
    def active(self) -> bool:
        """Work is under way on a worker thread."""
        return self in (TaskStatus.RUNNING, TaskStatus.STOPPING)

    @property
    def ended(self) -> bool:
        return self in (TaskStatus.FINISHED, TaskStatus.FAILED, TaskStatus.CANCELLED)


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """'1 round', '2 rounds', '0 rounds'."""
    return f"{count} {noun if count == 1 else (nouns or noun + 's')}"


__all__ = ["TaskStatus", "plural"]
