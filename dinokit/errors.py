"""The errors that mean "the input or the environment is wrong, not the code".

They derive from `UserError`, defined in a module no script runs as `__main__`: a script that
defines its own error class is `__main__` when run, and `except model.SomeError` would not match
its `__main__.SomeError`; a shared base class matches either way. Scripts report them as one
`error:` line and exit 1 (cli.run_cli).
"""

from __future__ import annotations


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
