"""TrainConfig's command line: every flag's help comes from its field's metadata."""
import dataclasses

from minidpo.config import CLI_HIDDEN, TrainConfig, build_parser


def test_every_flag_has_its_fields_help():
    text = " ".join(build_parser().format_help().split())
    for f in dataclasses.fields(TrainConfig):
        if f.name in CLI_HIDDEN:
            continue
        help_ = f.metadata.get("help")
        assert help_, f"TrainConfig.{f.name} has no help"
        assert " ".join(help_.split()) in text, f.name
