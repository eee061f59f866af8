"""What items and bakes can be: item kinds, item statuses, bake statuses.

str enums (StrEnum): a member is the plain string SQLite rows, JSON and the CLI hold ("pending"),
so a row read back compares equal to it, and an f-string shows the value. The life of an item:

    pending -> baking -> baked | rejected (the gate) | pending again (a bake that could not finish,
                         or went live without learning it) | failed or rejected (after
                         bake.max_attempts such bakes); any of them -> forgotten

A bake: queued -> claiming -> training -> composing -> swapping -> checking -> live, or it stops
at one of the other final states (FINISHED_BAKE_STATES).
"""

from __future__ import annotations

from enum import StrEnum


class ItemKind(StrEnum):
    """What an item is (the `kind` column). str-valued: rows and JSON hold the plain strings."""

    HEADLINE = "headline"
    FACT = "fact"
    CONVERSATION = "conversation"  # a chat transcript, stored whole (ingest.py)
    PROMPT = "prompt"  # an instruction or persona: baked as behaviour, not as knowledge

    @classmethod
    def remembered(cls) -> tuple[ItemKind, ...]:
        """The kinds `remember` takes one text of (a conversation comes with its messages)."""
        return cls.FACT, cls.HEADLINE, cls.PROMPT


class ItemStatus(StrEnum):
    """Where an item is in its life (the `status` column): see the module docstring."""

    PENDING = "pending"
    BAKING = "baking"
    BAKED = "baked"
    FAILED = "failed"  # in `bake.max_attempts` bakes that could not finish; `retry` takes it back
    # The gate's verdict, not learnt by `bake.max_attempts` live bakes, or a rollback; `retry --rejected`
    # takes it back.
    REJECTED = "rejected"
    FORGOTTEN = "forgotten"


class BakeStatus(StrEnum):
    """Where a bake is (the `status` column of bakes): queued, then one stage after the other, then
    one final state. The `verdict` column holds the final state, "passed" for live."""

    QUEUED = "queued"
    CLAIMING = "claiming"
    TRAINING = "training"  # the trainer subprocess: teacher, train, the gate's probes
    PROBING = "probing"  # the stage of bakes before the gate moved into the trainer (older databases)
    COMPOSING = "composing"
    SWAPPING = "swapping"
    CHECKING = "checking"  # asking the served `memory` a few item probes after the swap
    LIVE = "live"
    REJECTED = "rejected"  # by the gate; live untouched
    FAILED = "failed"  # infrastructure: the items went back to the queue
    EMPTY = "empty"  # nothing was pending
    SKIPPED = "skipped"  # another process held the model lease
    CANCELLED = "cancelled"  # the daemon stopped mid-bake
    ABANDONED = "abandoned"  # found unfinished at start (a kill): see Bakery.recover

    @property
    def verdict(self) -> str:
        """What the `verdict` column says of a bake that ended in this state."""
        return PASSED if self is BakeStatus.LIVE else self.value


PASSED = "passed"  # the verdict of a bake that went live
FINISHED_BAKE_STATES = frozenset({BakeStatus.LIVE, BakeStatus.REJECTED, BakeStatus.FAILED, BakeStatus.EMPTY,
                                  BakeStatus.SKIPPED, BakeStatus.CANCELLED, BakeStatus.ABANDONED})
# A bake in one of these when the daemon starts was cut off (see Bakery.recover).
UNFINISHED_BAKE_STATES = (BakeStatus.QUEUED, BakeStatus.CLAIMING, BakeStatus.TRAINING, BakeStatus.COMPOSING,
                          BakeStatus.PROBING, BakeStatus.SWAPPING, BakeStatus.CHECKING)
RETRYABLE = (ItemStatus.FAILED, ItemStatus.REJECTED)  # the statuses `retry` takes items back from
