"""The one exception type for user mistakes (bad arguments, files, search spaces).

CLIs catch it and print its message on one line with a non-zero exit; anything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the user's input; the message names the file, key or value at fault."""

    exit_code = 2


def run_cli(main, argv=None) -> int:
    """Runs a CLI main; a UserError becomes one line on stderr and a non-zero exit code."""
    import sys

    try:
        return main(argv) or 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def exit_cli(main) -> None:
    """Runs a CLI main with run_cli and exits with its code.

    Everything is frozen out of the garbage collector first: the interpreter's last collections at exit
    would walk every object torch, timm and smp created at import (over a second on a small CPU), and
    nothing that is left needs collecting.
    """
    import gc
    import sys

    code = run_cli(main)
    gc.freeze()
    sys.exit(code)


def short_reason(exc: BaseException) -> str:
    """The first line of an exception's message (at most 200 characters), or where it was raised when
    it has no message: what a one-line error quotes from a library's exception."""
    import traceback
    from pathlib import Path

    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if lines:
        return lines[0] if len(lines[0]) <= 200 else lines[0][:197] + "..."
    where = traceback.extract_tb(exc.__traceback__)[-1]
    return f"{type(exc).__name__} at {'/'.join(Path(where.filename).parts[-3:])}:{where.lineno}"
