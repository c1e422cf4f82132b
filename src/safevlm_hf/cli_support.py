# Copyright 2026 The safevlm-hf developers. Licensed under the Apache License, Version 2.0.
"""What every ``safevlm`` sub-command shares: its exit codes and how it reports an error.

A command that cannot do what it was asked prints ONE line on stderr, ``safevlm COMMAND: error: MESSAGE`` (the message
names the culprit and what to do), writes nothing, and exits with :data:`EXIT_BAD_INPUT`.
"""

from __future__ import annotations

import sys


EXIT_OK = 0
#: A service the command talks to refused it (e.g. the Hub refused an upload); the input itself was fine.
EXIT_SERVICE_ERROR = 1
#: Bad input: data, model folder, options. Nothing was written.
EXIT_BAD_INPUT = 2


def fail(command: str, message: str, exit_code: int = EXIT_BAD_INPUT) -> int:
    """Print ``safevlm COMMAND: error: MESSAGE`` as one line on stderr and return ``exit_code`` (2: bad input).

    A message that spans lines (e.g. a library's error text) is joined into one line, so that the error stays one
    line a script can grep and a person can read in a log.
    """
    text = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
    print(f"safevlm {command}: error: {text}", file=sys.stderr)
    return exit_code


__all__ = ["EXIT_BAD_INPUT", "EXIT_OK", "EXIT_SERVICE_ERROR", "fail"]
