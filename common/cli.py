"""How the harness's entry points fail: one line on stderr, `error: <what and where>`, and
a non-zero exit status; the traceback only with CLIPBENCH_TRACEBACK=1 (common/env.py).

Every `python -m ...` entry point of the harness (and train_coop.py, benchmarks/) ends in

    if __name__ == "__main__":
        cli.run(main)

Also the readers of the harness's own input files (YAML), whose errors are one line
naming the file. Imports nothing heavy."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, NoReturn, Optional, Sequence

from common import env

HARNESS_PACKAGES = ("algorithms", "clipworld", "common", "domainbed_adapter", "pretraining",
                    "results", "sweeps", "trainers", "benchmarks")


class InputError(ValueError):
    """Bad input: the message names what is wrong and where (file, folder, key), one line."""


def one_line(error: BaseException) -> str:
    """An exception as one line: its message's lines joined (YAML errors put the file and
    line on a second line), a KeyError's message without repr quotes, and the type's name
    unless the harness defined the exception (its messages say what happened)."""
    if isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
        message = error.args[0]
    else:
        message = str(error)
    if message.startswith("Caught ") and "Original Traceback" in message:
        # re-raised from a DataLoader worker: the original error is the message's last line
        return [line for line in message.splitlines() if line.strip()][-1].strip()
    message = " ".join(part.strip() for part in message.splitlines() if part.strip())
    own = type(error).__module__.split(".")[0] in HARNESS_PACKAGES + ("__main__",)
    if own and message:
        return message
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def guarded(main: Callable, argv: Optional[Sequence[str]] = None) -> int:
    """Call main(argv) (main() when argv is None) and return its exit status; an
    exception becomes one `error:` line on stderr and status 1 (130 on Ctrl-C).
    SystemExit (argparse's usage errors, exit codes) passes through."""
    try:
        code = main() if argv is None else main(list(argv))
    except KeyboardInterrupt:
        if env.flag(env.TRACEBACK):
            raise
        sys.stdout.flush()
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001  (the one place that turns any failure into a line)
        if env.flag(env.TRACEBACK):
            raise
        sys.stdout.flush()
        print(f"error: {one_line(e)} ({env.TRACEBACK}=1 shows the traceback)", file=sys.stderr)
        return 1
    return 0 if code is None else code


def run(main: Callable, argv: Optional[Sequence[str]] = None) -> NoReturn:
    """`if __name__ == "__main__": cli.run(main)`: exit with guarded(main)'s status."""
    sys.exit(guarded(main, argv))


def image_problem(path, error: BaseException) -> str:
    """Why an image file could not be read, in a few words (PIL's own messages may not
    say: 'cannot identify image file <_io.BufferedReader ...>', 'image file is truncated')."""
    import os
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
    except OSError:
        pass
    if type(error).__name__ == "UnidentifiedImageError":
        return "not an image file PIL can read (corrupt, or another format)"
    if isinstance(error, FileNotFoundError):
        return "no such file"
    return f"corrupt or truncated image ({error})"


def read_yaml(path, what: str = "YAML file"):
    """A YAML file's content; a missing or malformed file is an InputError naming the file,
    the line and the problem."""
    import yaml
    path = Path(path)
    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file ({what})") from None
    except yaml.YAMLError as e:
        raise InputError(f"{path}: malformed YAML ({what}): {yaml_problem(e)}") from None


def yaml_problem(error) -> str:
    """'<problem> at line L, column C' of a YAML parse error."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    if mark is None:
        return problem
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"


def read_yaml_mapping(path, what: str = "YAML file") -> dict:
    """read_yaml for files whose top level must be a mapping (empty file: {})."""
    content = read_yaml(path, what)
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise InputError(f"{path}: expected a mapping of keys at the top level ({what}), "
                         f"got a {type(content).__name__}")
    return content
