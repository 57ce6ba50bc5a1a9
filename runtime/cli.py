"""Command-line conventions shared by train.py, eval_linear.py, tools/visualize.py and tools/bench.py.

- `--help` shows each default (or, for options whose default depends on the arch or dataset,
  says so in words);
- a bad value ends the program with one line `error: <what is wrong and what is allowed>`
  on stderr and a non-zero exit status, before anything is written;
- exit statuses: 0 done, 1 error, 2 bad command line, 143 (128 + SIGTERM) or 130 (128 +
  SIGINT, Ctrl-C) stopped by that signal after saving a checkpoint to resume from, so
  `train.py ... && eval_linear.py ...` does not evaluate a half-trained model.
"""
import argparse
import math
import os
import sys

EXIT_ERROR, EXIT_USAGE = 1, 2  # a signal: 128 + its number (signals.preempted)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None: those options explain their arch-dependent default in words."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (argparse's own prints the whole usage first), printed by
    rank 0 alone under torchrun (every rank parses the same command line)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _number(kind, low, strict: bool):
    """An argparse type: a finite `kind` that is > low (strict) or >= low."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be a finite number {'>' if strict else '>='} {low}, "
                                             f"got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


positive_int = _number(int, 0, strict=True)
nonneg_int = _number(int, 0, strict=False)
positive_float = _number(float, 0.0, strict=True)
nonneg_float = _number(float, 0.0, strict=False)


def one_line(error: BaseException) -> str:
    """The message of an error as one line. An error raised in a DataLoader worker arrives
    wrapped with the worker's traceback; its last line is `module.Class: message`."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    last = lines[-1] if lines else type(error).__name__
    if len(lines) > 1 and ": " in last and last.split(": ", 1)[0].split(".")[-1] == type(error).__name__:
        last = last.split(": ", 1)[1]
    return last


def fail(error: BaseException, show: bool = True, rank: int = None) -> None:
    """Print `error: <message>` and exit 1. show=False keeps a rank quiet (an error every rank
    has alike is printed by rank 0 alone); rank, when given, names the rank that hit it."""
    if show:
        where = f"rank {rank}: " if rank is not None else ""
        print(f"error: {where}{one_line(error)}", file=sys.stderr)
    sys.exit(EXIT_ERROR)
