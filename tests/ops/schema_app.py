"""An app whose commands cover the result shapes the schema generators must describe.

Used by tests/ops/test_schema_cli.py (in-process and as ``rtcore schema
tests/ops/schema_app.py:app``).
"""

from __future__ import annotations

import enum
from typing import Any, Literal

import msgspec

import rtcore

app = rtcore.App("shapes")


class Move(msgspec.Struct):
    """Arguments of ``game:move``."""

    game: str
    x: int
    y: int
    note: str | None = None


class Board(msgspec.Struct):
    """The board after a move."""

    game: str
    cells: list[list[Literal["x", "o", ""]]]
    turn: int
    winner: str | None = None


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Team(msgspec.Struct):
    name: str
    colour: Colour
    scores: dict[str, float] = {}


class Circle(msgspec.Struct, tag="circle"):
    r: float


class Square(msgspec.Struct, tag="square"):
    side: float


@app.authenticate
async def authenticate(token: str | None) -> rtcore.Principal | None:
    return rtcore.Principal(token) if token else None


@app.command("game:move")
async def move(ctx: rtcore.Context, args: Move) -> Board:
    cells: list[list[Literal["x", "o", ""]]] = [["", "", ""] for _ in range(3)]
    cells[args.y][args.x] = "x"
    return Board(game=args.game, cells=cells, turn=1)


@app.command("teams")
async def teams(ctx: rtcore.Context) -> list[Team]:
    return [Team("reds", Colour.RED, {"ada": 1.5})]


@app.command("boards")
async def boards(ctx: rtcore.Context) -> list[Board | None]:
    return [None]


@app.command("pair")
async def pair(ctx: rtcore.Context, args: tuple[int, str]) -> tuple[str, int]:
    return args[1], args[0]


@app.command("forget")
async def forget(ctx: rtcore.Context, args: dict[str, int]) -> None:
    return None


@app.command("shape")
async def shape(ctx: rtcore.Context, args: int) -> Circle | Square:
    return Circle(float(args)) if args % 2 else Square(float(args))


@app.command("anything")
async def anything(ctx: rtcore.Context, args: Any) -> Any:
    return args


@app.command("unannotated")
async def unannotated(ctx, args):  # type: ignore[no-untyped-def]
    return {"echo": args}
