"""Every entry point's front: `--config FILE`, `--set a.b=c` overrides and `--verbose`, parsed and validated
before anything heavy starts."""

from __future__ import annotations

import argparse

from ldm_core.config import ConfigError
from pipelines.config import PipelineConfig, load_config
from pipelines.platform.runtime import add_verbose_arg, one_line, set_verbose


def add_config_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    def one_line_error(message: str):  # argparse's own prints the whole usage first
        raise SystemExit(f"error: {message} ({parser.prog} --help lists the arguments)")

    parser.error = one_line_error
    parser.add_argument("--config", default="configs/quickstart.yaml", help="pipeline YAML (default: %(default)s)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one config value by its dotted path, e.g. --set stage_a.train.max_steps=20 (repeatable)",
    )
    return add_verbose_arg(parser)


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    set_verbose(getattr(args, "verbose", False))
    return load_config(args.config, args.overrides)


def parse_cli(argv: list[str] | None, parser: argparse.ArgumentParser) -> tuple[PipelineConfig, argparse.Namespace]:
    """Every entry point's front: `--config` and `--set` added to `parser`, parsed and validated. A bad config
    exits with one "error: ..." message naming the field, before anything starts."""
    args = add_config_args(parser).parse_args(argv)
    try:
        return config_from_args(args), args
    except ConfigError as e:  # one line: every problem, separated by "; "
        raise SystemExit(f"error: {one_line(str(e))}") from None
