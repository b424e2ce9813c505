"""How every script ends: a user's mistake as one `error:` line and exit 1, Ctrl-C as exit 130.

Exceptions that mean "the input or the environment is wrong, not the code" derive from
`UserError`, defined here, in a module no script runs as `__main__`: a script that defines its
own error class (model.py) is `__main__` when run, and `except model.SomeError` would not match
its `__main__.SomeError`; a shared base class matches either way.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

import torch

from utils import distributed, rank


class UserError(Exception):
    """Bad input, a missing file, an unusable environment: reported as one line, exit 1."""


def one_line(err: BaseException) -> str:
    """The message of `err` on one line; errors raised in DataLoader workers arrive wrapped in a
    traceback, of which the last line is the original message."""
    text = str(err).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split())


def _peer_failure(err: BaseException) -> bool:
    """A collective that failed because another process died or stopped answering."""
    dist_error = getattr(torch.distributed, "DistError", ())
    text = str(err)
    return isinstance(err, dist_error) or any(marker in text for marker in (
        "Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out waiting",
        "gloo", "NCCL", "ProcessGroup"))


def run_cli(main: Callable[[argparse.Namespace], None], parser: argparse.ArgumentParser) -> None:
    """Run a script's main: a user's mistake ends as one line on stderr and exit code 1, not a traceback.

    Under torchrun each rank reports its own error; only a rank whose collective failed because a
    peer went away says so instead."""
    try:
        main(parser.parse_args())
    except KeyboardInterrupt as err:
        print(f"\ninterrupted{': ' + one_line(err) if str(err) else ''}", file=sys.stderr)
        sys.exit(130)
    except (UserError, ValueError, OSError, FloatingPointError) as err:
        sys.exit(f"error{_rank_tag()}: {one_line(err)}")
    except torch.cuda.OutOfMemoryError as err:
        sys.exit(f"error{_rank_tag()}: out of memory: {one_line(err)[:200]}; lower --batch or --imgsz, "
                 "or use --amp / --grad-checkpointing")
    except RuntimeError as err:
        if not distributed():
            raise
        if _peer_failure(err):
            sys.exit(f"error{_rank_tag()}: a collective operation failed, most likely because another process "
                     f"failed first (see its error above): {one_line(err)[:300]}")
        sys.exit(f"error{_rank_tag()}: {one_line(err)[:500]}")
    finally:
        if distributed():
            torch.distributed.destroy_process_group()


def _rank_tag() -> str:
    return f" (rank {rank()})" if distributed() else ""
