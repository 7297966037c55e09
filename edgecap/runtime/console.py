"""What every command line shares: user errors become one line on stderr and a non-zero exit."""

from __future__ import annotations

import difflib
import sys
import warnings
from collections.abc import Callable, Sequence

from .errors import EdgecapError, ImageWarning

EXIT_ERROR, EXIT_INTERRUPTED = 2, 130


def run_main(main: Callable[[], int | None], prog: str) -> int:
    """Run a command's body; EdgecapError/ValueError/OSError print `prog: error: ...` and exit 2, and an
    ImageWarning prints `prog: warning: ...`."""
    def warning_line(message, category, *_: object, **__: object) -> None:
        print(f"{prog}: warning: {message}", file=sys.stderr)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", ImageWarning)
            warnings.showwarning = warning_line
            return main() or 0
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (EdgecapError, ValueError, OSError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        return EXIT_ERROR


def choice_error(kind: str, value: str, choices: Sequence[str]) -> ValueError:
    """`unknown engine 'ortt' (did you mean 'ort'?); choose from ort, trt`."""
    close = difflib.get_close_matches(value, choices, n=2)
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    return ValueError(f"unknown {kind} {value!r}{hint}; choose from {', '.join(choices)}")
