"""Exceptions specific to the paging bookkeeping.

Both subclass :class:`kvcl.errors.KvclError`, so ``except kvcl.KvclError`` catches them too.
Running out of blocks is :class:`kvcl.errors.OutOfBlocks` (shared with the rest of kvcl).
"""

from __future__ import annotations

from ..errors import KvclError, OutOfRangeError


class UnknownSequence(OutOfRangeError, KeyError):
    """A sequence id that was never handed out, or that has been freed.

    Subclasses :class:`kvcl.errors.OutOfRangeError` (an ``IndexError``) and ``KeyError``,
    so either ``except`` clause catches it. ``seq_id`` holds the offending id.
    """

    def __init__(self, seq_id: int, *, freed: bool = False):
        self.seq_id = seq_id
        self.freed = freed
        why = "has been freed" if freed else "was never added"
        super().__init__(f"unknown sequence id {seq_id}: it {why} (use add_sequence() or fork())")

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class InvariantViolation(KvclError, AssertionError):
    """The bookkeeping is inconsistent (raised by ``check_invariants`` and ``from_state_dict``).

    Seeing this outside a corrupted saved state means a bug in :mod:`kvcl.paging`.
    """
