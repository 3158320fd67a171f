"""The how-to guides with complete examples work as written (see tests/docs/tutorial.py).

Each page's ``title="FILE"`` blocks are written to an empty folder and its
``console`` commands run there (``pytest -q``: the page's own tests, on
asyncio and trio, must print what the page shows).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.docs.tutorial import DOCS, RUNNABLE, Tutorial, read_blocks

HOWTOS = [page for page in RUNNABLE if page.startswith("howto/")]


@pytest.mark.parametrize("page", HOWTOS)
def test_the_examples_of_a_howto_run(page: str, tmp_path: Path) -> None:
    """Mutation: make authenticate in howto/authentication.md accept any
    signature (``options={"verify_signature": False}``) -> this test fails
    (``test_a_bad_token_is_refused`` passes no more, so pytest's output differs).
    """
    if page == "howto/authentication.md":
        pytest.importorskip("jwt", reason="PyJWT comes with the docs extra (pip install -e '.[docs]')")
    blocks = read_blocks((DOCS / page).read_text(), f"docs/{page}")
    assert any(b.title for b in blocks) and any(b.lang == "console" for b in blocks), f"{page} has nothing to run"
    tutorial = Tutorial(tmp_path, strict=False)
    try:
        tutorial.run(blocks)
        tutorial.close()
    finally:
        tutorial.kill()
    assert tutorial.executed == sum(1 for b in blocks if b.title or b.lang == "console")
