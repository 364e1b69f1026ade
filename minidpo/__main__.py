"""`python -m minidpo COMMAND ...`: each command lives in the module that does the work."""
import importlib
import sys

# command -> module whose `cli(argv)` runs it; imported lazily so `--help` stays fast.
COMMANDS = {
    "train": "minidpo.train",
    "sft": "minidpo.train",
    "generate": "minidpo.generate",
    "judge": "minidpo.judge",
    "demo": "minidpo.experiment",
}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print("usage: python -m minidpo {%s} ..." % ",".join(COMMANDS), file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    module = importlib.import_module(COMMANDS[command])
    return module.cli(rest, command=command) or 0


if __name__ == "__main__":
    sys.exit(main())
