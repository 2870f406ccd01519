"""Every entry point's front: `--config FILE`, `--set a.b=c` overrides and `--verbose`, parsed and validated
before anything heavy starts. This module and `pipelines.config` import no torch, Ray or MLflow
(tests/test_layering.py checks), so an entry point that parses first refuses a bad argument or config in about
a second (`pipelines/run.py` does)."""

from __future__ import annotations

import argparse

from ldm_core.config import ConfigError, one_line
from pipelines.config import PipelineConfig, load_config


def add_config_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    def one_line_error(message: str):  # argparse's own prints the whole usage first
        raise SystemExit(f"error: {message} ({parser.prog} --help lists the arguments)")

    parser.error = one_line_error
    parser.add_argument("--config", default="configs/quickstart.yaml", help="pipeline YAML (default: %(default)s)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one config value by its dotted path, e.g. --set stage_a.train.max_steps=20 (repeatable)",
    )
    parser.add_argument("--verbose", action="store_true",
                        help="also print Ray's own logs (Train reports, Data progress bars and stats) to the console")
    return parser


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    if getattr(args, "verbose", False):
        from pipelines.platform.runtime import set_verbose  # imports Ray: only when asked for

        set_verbose(True)
    return load_config(args.config, args.overrides)


def parse_cli(argv: list[str] | None, parser: argparse.ArgumentParser) -> tuple[PipelineConfig, argparse.Namespace]:
    """Every entry point's front: `--config` and `--set` added to `parser`, parsed and validated. A bad config
    exits with one "error: ..." message naming the field, before anything starts."""
    args = add_config_args(parser).parse_args(argv)
    try:
        return config_from_args(args), args
    except ConfigError as e:  # one line: every problem, separated by "; "
        raise SystemExit(f"error: {one_line(str(e))}") from None

