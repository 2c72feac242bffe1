"""Shared edge of the absl experiment scripts.

`run(main)` replaces `absl.app.run(main)` in every app. It reads ModelLink/Megatron command lines
unchanged: `--foo-bar` is `--foo_bar`, `--flag value` is `--flag=value`, and a list flag takes
argparse-style space-separated values (`--lora-target-modules dense mlp` -> `--lora_target_modules=dense,mlp`),
also inside `--flagfile`s. `main_guard` turns the failures a user can cause into one line
`error: <message>` and exit status 1.
"""

from __future__ import annotations

import functools
import json
import sys

from absl import app, flags

from mistral_fn.errors import MistralFnError


def normalize_argv(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
    """`argv` (program name first) with flagfiles expanded and ModelLink spellings turned into absl's.

    Only flag names change (`-` -> `_`); values are kept byte for byte. Everything after a bare `--`
    is left alone.
    """
    program, args = argv[0], flag_values.read_flags_from_files(argv[1:], force_gnu=False)
    out: list[str] = [program]
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            out += args[i - 1:]
            break
        if not arg.startswith("--") or len(arg) == 2:
            out.append(arg)
            continue
        name, eq, value = arg[2:].partition("=")
        name = name.replace("-", "_")
        flag = flag_values[name] if name in flag_values else None
        if eq or flag is None or not _takes_many(flag):
            out.append(f"--{name}{eq}{value}")
            continue
        values = []
        while i < len(args) and not args[i].startswith("--"):
            values.append(args[i])
            i += 1
        if isinstance(flag, flags.MultiFlag):
            out += [f"--{name}={v}" for v in values] or [f"--{name}"]
        else:
            out.append(f"--{name}={','.join(values)}" if values else f"--{name}")
    return out


def _takes_many(flag) -> bool:
    return isinstance(flag, flags.MultiFlag) or isinstance(flag.parser, flags.BaseListParser)


def _one_line(e: BaseException) -> str:
    """The message of an error a user can cause: names the file or value at fault."""
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.filename}: {e.strerror or e}"
    if isinstance(e, UnicodeDecodeError):
        return f"input is not UTF-8 text ({e.reason} at byte {e.start})"
    return " ".join(str(e).split())


def main_guard(main):
    """Wrap an absl `main(argv)`: project errors, OS errors (disk full, permissions, missing files),
    undecodable text and malformed JSON print `error: <message>` on one line and exit with status 1."""

    @functools.wraps(main)
    def wrapped(argv):
        try:
            return main(argv)
        except (MistralFnError, OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            print(f"error: {_one_line(e)}", file=sys.stderr)
            sys.exit(1)

    return wrapped


def run(main) -> None:
    """`absl.app.run(main)` over the normalised command line (see `normalize_argv`)."""
    try:
        argv = normalize_argv(sys.argv)
    except flags.Error as e:  # e.g. a --flagfile that does not exist
        print(f"error: {_one_line(e).removeprefix('ERROR:: ')}", file=sys.stderr)
        sys.exit(1)
    app.run(main, argv=argv)
