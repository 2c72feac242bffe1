"""Shared edge of the absl experiment scripts: project errors become one line and exit status 1."""

from __future__ import annotations

import functools
import sys

from mistral_fn.errors import MistralFnError


def main_guard(main):
    """Wrap an absl `main(argv)` so a `MistralFnError` prints `error: <message>` and exits 1."""

    @functools.wraps(main)
    def wrapped(argv):
        try:
            return main(argv)
        except MistralFnError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)

    return wrapped
