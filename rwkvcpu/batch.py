"""Several sequences stepping together: a pool of state slots and the batch a step runs.

A server keeps the states of its live sequences in one StatePool (llama-server's
slots): one (capacity, state_floats) float32 array whose rows the engine advances
in place, so a step copies no state in or out. `Model.step(pool, batch)` runs one
step: each entry of the batch is (slot, tokens), one token for a sequence that
decodes, a chunk of its prompt for one that prefills.

Example:
    >>> pool = model.state_pool(4)
    >>> a, b = pool.acquire(), pool.acquire()
    >>> logits = model.step(pool, [(a, [510, 1563]), (b, [310])])    # (2, vocab) float32
    >>> logits = model.step(pool, [(a, [int(logits[0].argmax())])])
    >>> saved = pool.snapshot(a)                                     # a State (a copy)
    >>> pool.release(a)
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .errors import InvalidArgumentError
from .state import State, state_size


class StatePool:
    """Fixed-capacity slots for the states of sequences that step together.

    Attributes:
        data: (capacity, state_floats) float32; row s is slot s's state.
        capacity: the number of slots.

    Slots are taken with `acquire` and given back with `release`; `state(slot)`
    is a State viewing the slot's row (no copy), which `Model.step` advances in place.
    """

    def __init__(self, model, capacity: int):
        if not isinstance(capacity, int) or capacity < 1:
            raise InvalidArgumentError(f"a state pool needs at least one slot, got capacity={capacity!r}")
        self.model = model
        self.capacity = capacity
        self.data = np.empty((capacity, state_size(model.config)), np.float32)
        self._free = list(range(capacity - 1, -1, -1))
        self._used = set()
        self._views = [State(model.config, self.data[s], model.fingerprint) for s in range(capacity)]

    @property
    def free(self) -> int:
        """How many slots are free."""
        return len(self._free)

    def acquire(self, state: Optional[State] = None) -> int:
        """Take a free slot, holding `state` (copied in) or the model's initial state.

        Raises:
            InvalidArgumentError: every slot is in use.
        """
        if not self._free:
            raise InvalidArgumentError(f"all {self.capacity} slots of the state pool are in use")
        slot = self._free.pop()
        self._used.add(slot)
        self.load(slot, self.model.initial_state() if state is None else state)
        return slot

    def release(self, slot: int) -> None:
        """Give a slot back; its contents are forgotten."""
        self._check(slot)
        self._used.discard(slot)
        self._free.append(slot)

    def load(self, slot: int, state: State) -> None:
        """Copy `state` into a slot."""
        self._check(slot)
        self.data[slot] = self.model._check_state(state).data

    def snapshot(self, slot: int) -> State:
        """A copy of a slot's state (for a cache, a fork, or State.save)."""
        self._check(slot)
        return State(self.model.config, self.data[slot].copy(), self.model.fingerprint)

    def state(self, slot: int) -> State:
        """The slot's state as a State viewing the pool (no copy): changing one changes the other."""
        self._check(slot)
        return self._views[slot]

    def _check(self, slot):
        if slot not in self._used:
            raise InvalidArgumentError(f"slot {slot!r} is not in use in this state pool")
