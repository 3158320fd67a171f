"""Epoch ids: 12 hex characters, not repeated by a forked process.

Epochs come from a seeded generator (no system call per epoch, see
``rtcore.backends.memory.new_epoch``); a forked child would otherwise draw
exactly the epochs its parent draws next, so two processes on one Redis or
SQLite file could create streams with the same epoch.
"""

from __future__ import annotations

import os
import re

from rtcore.backends.memory import new_epoch


def test_epochs_are_12_hex_characters_and_differ() -> None:
    epochs = [new_epoch() for _ in range(1000)]
    assert all(re.fullmatch(r"[0-9a-f]{12}", e) for e in epochs)
    assert len(set(epochs)) == len(epochs)


def test_a_forked_child_does_not_repeat_its_parents_epochs() -> None:
    """Mutation seen caught: dropping the ``os.register_at_fork`` reseed → the
    child's first epochs equal the parent's next ones."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next epochs and leave at once
        os.write(w, "".join(new_epoch() for _ in range(4)).encode())
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r, "rb") as f:
        child = f.read().decode()
    parent = "".join(new_epoch() for _ in range(4))
    assert len(child) == 48
    assert child != parent
