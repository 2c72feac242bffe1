"""Helpers for the bad-input tests: a directory's exact contents, and the one-line error check."""

from __future__ import annotations

from pathlib import Path


def contents(root) -> dict[str, bytes | None]:
    """Every entry under `root`, hidden ones included: `{relative path: file bytes, or None for a directory}`."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def one_line(error: BaseException) -> str:
    """The message of `error`, asserted to be a single non-empty line."""
    message = str(error)
    assert message and "\n" not in message, f"not one line: {message!r}"
    return message
