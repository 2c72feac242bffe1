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
import os
import re
import sys
from typing import NoReturn

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


# torch.distributed failures that a peer causes: gloo reports them as plain RuntimeErrors.
_PEER_FAILURE = re.compile(r"/gloo/|NCCL|HCCL|Timed out|Connection (closed|reset) by peer")


def _peer_failure(e: BaseException) -> str | None:
    """The message of a rendezvous or collective that failed because of another process (it died, or it
    stalled past `--distributed_timeout_minutes`), or None for any other error."""
    dist = sys.modules.get("torch.distributed")  # not imported: no collective ran
    if dist is None or not isinstance(e, RuntimeError):
        return None
    text = " ".join(str(e).split())
    if not (isinstance(e, dist.DistError) or _PEER_FAILURE.search(text)):
        return None
    text = re.sub(r"^\[[^\]]*\] |\. This is typically caused.*", "", text)  # gloo's "[file.cc:line]", advice
    rank = dist.get_rank() if dist.is_initialized() else os.environ.get("RANK", "0")
    return (f"rank {rank}: waiting for the other processes failed ({text}); another process failed or stalled "
            "(see its log; --distributed_timeout_minutes bounds the wait)")


def main_guard(main):
    """Wrap an absl `main(argv)`: project errors, OS errors (disk full, permissions, missing files),
    undecodable text, malformed JSON and a peer process that failed or stalled print `error: <message>`
    on one line and exit with status 1."""

    @functools.wraps(main)
    def wrapped(argv):
        try:
            return main(argv)
        except (MistralFnError, OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            _exit_with(_one_line(e))
        except RuntimeError as e:
            message = _peer_failure(e)
            if message is None:
                raise
            _exit_with(message)

    return wrapped


def run(main) -> None:
    """`absl.app.run(main)` over the normalised command line (see `normalize_argv`); a bad command line (a
    --flagfile that does not exist, an unknown flag, a malformed value, a missing required flag) is one
    `error:` line and exit status 1, like the errors `main_guard` reports."""
    try:
        argv = normalize_argv(sys.argv)
    except flags.Error as e:
        _exit_with(_flag_error(e))
    app.run(main, argv=argv, flags_parser=_parse_flags)


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _exit_with(f"{_flag_error(e)} (--helpshort lists the flags)")


def _flag_error(e: flags.Error) -> str:
    return _one_line(e).removeprefix("ERROR:: ")


def _exit_with(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)
