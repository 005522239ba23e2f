"""`bagel-titan-from-lmms`: convert, check that the TOML loads, print it and the summary."""

from __future__ import annotations

import argparse
import sys

import yaml

from bagel_titan.config.fields import tomllib

from .convert import convert
from .emit import summary, to_toml
from .record import Conversion, LmmsConfigError


class ConvertedConfigError(ValueError):
    """The converted values do not form a valid bagel-titan config (e.g. NSA sizes that do not
    divide each other): the loader's message names the key."""


def check_loads(toml_text: str) -> None:
    """Build the config from the TOML with bagel-titan's own loader (every plugin section)."""
    from bagel_titan.config.manager import build_job_config, split_command_line
    from bagel_titan.plugins import get_plugin_manager

    plugins = get_plugin_manager()
    sections = {name: plugins.config_sections.get(name) for name in plugins.config_sections.names()}
    try:
        build_job_config(tomllib.loads(toml_text), split_command_line([]), sections)
    except (ValueError, TypeError, KeyError) as exc:  # ConfigError and section validation errors
        raise ConvertedConfigError(f"the converted config does not load: {exc}") from exc


def convert_file(path: str) -> tuple[str, Conversion]:
    """(TOML text, conversion record) for the LMMS YAML at `path`, checked to load."""
    with open(path) as f:
        document = yaml.safe_load(f)
    conv = convert(document)
    text = to_toml(conv, path)
    check_loads(text)
    return text, conv


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bagel-titan-from-lmms",
        description="Convert an LMMS Engine BAGEL training YAML into a bagel-titan "
        "TOML (printed on stdout; a summary goes to stderr).",
    )
    parser.add_argument("config", help="the LMMS Engine YAML (list form or plain mapping)")
    parser.add_argument("-o", "--output", help="write the TOML here instead of stdout")
    args = parser.parse_args(argv)
    try:
        text, conv = convert_file(args.config)
    except (OSError, yaml.YAMLError, LmmsConfigError, ConvertedConfigError) as exc:
        print(f"bagel-titan-from-lmms: error: {exc}", file=sys.stderr)
        return 2
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    sys.stderr.write(summary(conv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
