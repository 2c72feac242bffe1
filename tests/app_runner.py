"""Run many command lines of one absl app in one process, as its console entry point would, and report JSON.

    python -m tests.app_runner experiments.convert_ckpt cases.json results.json

`cases.json` is a list of `{"id", "argv", "env", "fsize", "watch", "scan"}`: each command line goes through
the app's real entry (`cli.run(main)`: flag normalisation, absl parsing, `main_guard`) with the flags reset
to their defaults first, `env` added to the environment, and, with `fsize`, files limited to that many
bytes (`RLIMIT_FSIZE`: a write past it fails like a full disk). stdout and stderr are captured at the file
descriptor level, so log handlers and C code are caught too. Each result holds the exit code (None when
the app returned without exiting), the output, the entries under `watch` whose bytes changed, and the
temporary names (`.partial`, `.old`, `*.tmp*`) found under `scan` afterwards.

One process pays torch's import once for dozens of command lines; the cases run in order and each must
write only to paths of its own.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import json
import os
import re
import resource
import signal
import sys
import threading
import traceback
from pathlib import Path

from absl import flags

from tests.snapshots import contents

TEMP_NAME = re.compile(r"(\.partial$|\.old$|\.tmp)")


def leftovers(root: str) -> list[str]:
    """Paths under `root` named like a temporary of an unfinished write."""
    return sorted(p.relative_to(root).as_posix() for p in Path(root).rglob("*") if TEMP_NAME.search(p.name))


def changed(before: dict, after: dict) -> list[str]:
    return sorted(k for k in before.keys() | after.keys() if before.get(k, b"absent") != after.get(k, b"absent"))


@contextlib.contextmanager
def captured():
    """Redirect fds 1 and 2 into pipes (read by threads: a pipe, unlike a file, is not subject to
    `RLIMIT_FSIZE`); yields a dict that gets `stdout`/`stderr` on exit."""
    out, readers, saved = {}, [], []
    sys.stdout.flush(), sys.stderr.flush()
    for name, fd in (("stdout", 1), ("stderr", 2)):
        read_end, write_end = os.pipe()
        saved.append(os.dup(fd))
        os.dup2(write_end, fd)
        os.close(write_end)
        chunks: list[bytes] = []
        reader = threading.Thread(target=lambda r=read_end, c=chunks: c.extend(iter(lambda: os.read(r, 65536), b"")))
        reader.start()
        readers.append((name, read_end, chunks, reader))
    try:
        yield out
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)  # closes the last write end: the readers see end of file
            os.close(copy)
        for name, read_end, chunks, reader in readers:
            reader.join()
            os.close(read_end)
            out[name] = b"".join(chunks).decode("utf-8", errors="replace")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


_CAP_VERSION_3 = 0x20080522
_DAC_OVERRIDES = 1 << 1 | 1 << 2  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH


@contextlib.contextmanager
def permission_bits_apply():
    """Make permission bits bind this thread even when it runs as root (tests in containers often do):
    its effective capabilities lose the two that override them, until exit. A no-op for other users."""
    if os.geteuid() != 0:
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    header, data = _CapHeader(_CAP_VERSION_3, 0), (_CapData * 2)()

    def call(fn):
        if fn(ctypes.byref(header), data):
            raise OSError(ctypes.get_errno(), f"{fn.__name__} failed")

    call(libc.capget)
    saved = data[0].effective
    data[0].effective &= ~_DAC_OVERRIDES
    call(libc.capset)
    try:
        yield
    finally:
        data[0].effective = saved
        call(libc.capset)


@contextlib.contextmanager
def environment(env: dict, fsize: int | None):
    old_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit raises instead
    if fsize is not None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, old_limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_case(app, case: dict) -> dict:
    from experiments import cli

    watched = {root: contents(root) for root in case.get("watch", []) if Path(root).exists()}
    flags.FLAGS.unparse_flags()
    sys.argv = [app.__name__, *case["argv"]]
    code = None
    permissions = permission_bits_apply() if case.get("permission_bits") else contextlib.nullcontext()
    with environment(case.get("env", {}), case.get("fsize")), permissions, captured() as out:
        try:
            cli.run(app.main)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) or e.code is None else 1
            if not isinstance(e.code, int) and e.code is not None:
                print(e.code, file=sys.stderr)
        except BaseException:  # noqa: BLE001 - what an uncaught error would print, as Python does
            traceback.print_exc()
            code = 1
    return {"code": code, **out,
            "changed": [f"{root}/{p}" for root, before in watched.items() for p in changed(before, contents(root))],
            "leftovers": [f"{root}/{p}" for root in case.get("scan", []) if Path(root).exists()
                          for p in leftovers(root)]}


def main(app_name: str, cases_file: str, results_file: str) -> None:
    app = importlib.import_module(app_name)
    cases = json.loads(Path(cases_file).read_text())
    results = {case["id"]: run_case(app, case) for case in cases}
    Path(results_file).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
