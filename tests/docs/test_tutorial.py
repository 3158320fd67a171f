"""docs/tutorial.md works as written: each code block runs, in order, from an empty folder.

The runner (tests/docs/tutorial.py) writes each ``title="FILE"`` block to its
file, runs each ``console`` command (``rtcore serve`` in the background,
``python`` and ``pytest`` to the end) and compares what each prints with the
page. The tests the tutorial writes run on asyncio and on trio.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.docs.tutorial import TUTORIAL, Block, Tutorial, TutorialError, read_blocks


def run(blocks: list[Block], folder: Path) -> Tutorial:
    tutorial = Tutorial(folder)
    try:
        tutorial.run(blocks)
        tutorial.close()
    finally:
        tutorial.kill()
    return tutorial


def test_every_block_of_the_tutorial_runs(tmp_path: Path) -> None:
    """The whole tutorial, as a reader follows it.

    Mutation: rename ``join_or_create`` to ``join_or_craete`` in the page's
    play.py -> this test fails at ``$ python play.py`` (AttributeError);
    change an expected output line -> it fails showing both outputs.
    """
    blocks = read_blocks(TUTORIAL.read_text())
    tutorial = run(blocks, tmp_path)
    assert tutorial.executed == len(blocks)
    # The page builds what it says it builds: a served game, a client, tests.
    titles = {b.title for b in blocks if b.title}
    assert {"game.py", "chat.py", "play.py", "conftest.py", "test_game.py", "test_rooms.py"} <= titles
    commands = "\n".join(b.body for b in blocks if b.lang == "console")
    assert "$ rtcore serve game.py:app" in commands and "$ pytest -q" in commands
    assert (tmp_path / "rps" / "game.py").read_text() == next(b.body for b in reversed(blocks) if b.title == "game.py")


@pytest.mark.parametrize(
    ("old", "new"),
    [
        # a wrong API name in a code block
        ("rtcore.client.connect(", "rtcore.client.open("),
        # an output line the code does not print
        ("ada: hello\n", "ada: hullo\n"),
    ],
)
def test_the_runner_catches_a_wrong_tutorial(tmp_path: Path, old: str, new: str) -> None:
    """The runner does fail on a broken page (so the test above is not vacuous).

    Mutation: make ``Tutorial.check_output`` ignore the exit status or the
    output -> the matching case of this test fails (no TutorialError).
    """
    text = TUTORIAL.read_text()
    assert old in text
    blocks = read_blocks(text.replace(old, new, 1))
    with pytest.raises(TutorialError, match=r"\$ python chat\.py ada hello"):
        run(blocks, tmp_path)


def test_a_block_the_runner_cannot_run_is_an_error(tmp_path: Path) -> None:
    """A block without a file name (or an unknown command) fails instead of being skipped.

    Mutation: make ``Tutorial.run`` skip unknown blocks -> this test fails.
    """
    with pytest.raises(TutorialError, match="cannot run"):
        run(read_blocks("```python\nprint(1)\n```\n"), tmp_path)
    with pytest.raises(TutorialError, match="does not know"):
        run(read_blocks("```console\n$ curl http://example.invalid\n```\n"), tmp_path)
