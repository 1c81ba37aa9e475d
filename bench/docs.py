"""The README's reference tables, generated from the code: the CLI (every command's usage and
summary, from click) and the built-in plugins (kind, name, description, options with their
defaults and docs). `python -m bench.docs --write` rewrites the blocks between the markers in
README.md; without `--write` it only checks, and exits 1 (as a test fails) when they are stale."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import click

BLOCK = re.compile(r"(<!-- generated: (\w+) -->\n)(.*?)(<!-- end generated -->)", re.S)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def cli_table() -> str:
    from bench.cli import main

    rows = ["| command | what it does |", "|---|---|"]

    def walk(command: click.Command, path: list[str]) -> None:
        if isinstance(command, click.Group):
            for name in sorted(command.commands):
                walk(command.commands[name], [*path, name])
            return
        ctx = click.Context(command, info_name=" ".join(path))
        usage = " ".join(command.collect_usage_pieces(ctx))
        options = [
            "/".join(p.opts) + ("" if p.is_flag or p.count else f" {p.metavar or p.type.name.upper()}")
            for p in command.params
            if isinstance(p, click.Option) and p.name != "help"
        ]
        summary = (command.help or "").split("\n\n")[0]
        rows.append(f"| `{' '.join(path)} {usage}` {_cell(', '.join(f'`{o}`' for o in options))} | {_cell(summary)} |")

    walk(main, ["bench"])
    return "\n".join(rows) + "\n"


def plugin_table() -> str:
    from bench.options import describe
    from bench.registry import BUILTIN_PACKAGE, load_plugins

    rows = ["| kind | name | what it is | options (default) |", "|---|---|---|---|"]
    for info in load_plugins().all():
        if info.package != BUILTIN_PACKAGE:
            continue
        options = []
        for o in describe(info.cls.Options):
            default = getattr(o["default"], "value", o["default"])
            options.append(f"`{o['name']}` ({default!r}): {o['doc']}")
        rows.append(f"| {info.kind} | `{info.name}` | {_cell(info.description)} | {_cell('; '.join(options))} |")
    return "\n".join(rows) + "\n"


GENERATORS = {"cli": cli_table, "plugins": plugin_table}


def updated(readme: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + GENERATORS[m.group(2)]() + m.group(4), readme)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite the generated blocks of README.md")
    parser.add_argument("--readme", type=Path, default=Path("README.md"))
    args = parser.parse_args(argv)
    text = args.readme.read_text(encoding="utf-8")
    fresh = updated(text)
    if args.write:
        args.readme.write_text(fresh, encoding="utf-8")
        return 0
    if fresh != text:
        print(f"{args.readme}: the generated tables are stale; run python -m bench.docs --write", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
