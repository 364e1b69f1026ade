"""`python -m minidpo COMMAND ...`: each command lives in the module that does the work."""
import importlib
import sys

# command -> (module whose `cli(argv, command=...)` runs it, what it does); imported lazily so
# `--help` stays fast.
COMMANDS = {
    "train": ("minidpo.train", "DPO and its variants on preference pairs"),
    "sft": ("minidpo.train", "supervised fine-tuning on the chosen replies (or ::sft demonstrations)"),
    "generate": ("minidpo.generate", "answer MT-Bench-format questions; writes FastChat answers JSONL"),
    "judge": ("minidpo.judge", "judge two models' answers pairwise, MT-Bench's protocol"),
    "demo": ("minidpo.experiment", "the offline tiny-world volume and type experiments (make demo; --help: its flags)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: python -m minidpo COMMAND [--help] ...", "", "commands:"]
    lines += [f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items()]
    lines += ["", "`python -m minidpo COMMAND --help` lists a command's flags."]
    return "\n".join(lines)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(usage())
        return 0
    if not argv or argv[0] not in COMMANDS:
        problem = f"unknown command {argv[0]!r}\n\n" if argv else ""
        print(problem + usage(), file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    module = importlib.import_module(COMMANDS[command][0])
    return module.cli(rest, command=command) or 0


if __name__ == "__main__":
    sys.exit(main())
