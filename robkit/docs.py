"""Generated README sections: catalog tables and the CLI reference.

``python -m robkit.docs`` rewrites the blocks between ``<!-- generated:NAME -->`` and
``<!-- /generated:NAME -->`` in README.md; a test fails when they are out of date.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import click

from robkit.catalog import registry

BLOCK = re.compile(r"(<!-- generated:(\w+) -->\n)(.*?)(<!-- /generated:\2 -->)", re.S)


def teachers_table() -> str:
    """Markdown table of the teacher catalog, by family and name."""
    rows = [
        "| name | family | architecture | params (M) | GFLOPs | prototypes | reported kNN / linear |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(registry("teachers"), key=lambda r: (r.family, r.name)):
        arch = r.get("arch") or {}
        rep = r.get("reported") or {}
        rows.append(
            f"| `{r.name}` | {r.family} | {arch.get('name', '?')} | {r.get('params_m', '–')} | "
            f"{r.get('gflops', '–')} | {r.get('num_prototypes', '–')} | "
            f"{rep.get('knn') or '–'} / {rep.get('linear') or '–'} |"
        )
    return "\n".join(rows)


def recipes_table() -> str:
    """Markdown table of every training recipe, fully resolved."""
    from robkit.engine.config import load_recipe

    rows = [
        "| name | method | views (global + local) | scales g / l | optimiser | epochs × batch | source |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in registry("recipes").names():
        r = load_recipe(name)
        v, o, t = r["views"], r["optim"], r["train"]
        rows.append(
            f"| `{name}` | {r.get('method')} | {v['n_global']}×{v['global_size_px']} + "
            f"{v['n_local']}×{v['local_size_px']} | {tuple(v['global_scale'])} / {tuple(v['local_scale'])} | "
            f"{o['name']} | {t['epochs']} × {t['batch_size']} | {r.get('source', '')} |"
        )
    return "\n".join(rows)


def targets_table() -> str:
    """Markdown table of the export targets, by format and name."""
    rows = [
        "| target | format | precision | layout | input | default for format | description |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(registry("export"), key=lambda r: (r.get("format", ""), r.name)):
        if not r.get("format"):
            continue
        rows.append(
            f"| `{r.name}` | {r['format']} | {r.get('precision')} | {r.get('layout')} | "
            f"{r.get('input_dtype')} {r.get('input', '')} | {'yes' if r.get('default') else ''} | "
            f"{r.get('description', '')} |"
        )
    return "\n".join(rows)


def cli_reference() -> str:
    """The ``--help`` text of every ``robkit`` sub-command, as Markdown sections."""
    from robkit.cli import main

    out: list[str] = []

    def walk(cmd: click.Command, path: list[str], parent: click.Context | None) -> None:
        ctx = click.Context(
            cmd,
            info_name=path[-1],
            parent=parent,
            max_content_width=100,
            terminal_width=100,
            help_option_names=["-h", "--help"],
        )  # as the real CLI (click caches it per command)
        if path != ["robkit"]:
            out.append(f"#### `{' '.join(path)}`\n\n```\n{cmd.get_help(ctx).strip()}\n```\n")
        if isinstance(cmd, click.Group):
            for name in cmd.list_commands(ctx):
                sub = cmd.get_command(ctx, name)
                assert sub is not None  # list_commands names only existing commands
                walk(sub, [*path, name], ctx)

    walk(main, ["robkit"], None)
    return "\n".join(out).rstrip()


GENERATORS = {
    "teachers": teachers_table,
    "recipes": recipes_table,
    "targets": targets_table,
    "cli": cli_reference,
}


def render(text: str) -> str:
    """``text`` with every generated block replaced by its current content."""

    def sub(m: re.Match) -> str:
        return f"{m.group(1)}{GENERATORS[m.group(2)]()}\n{m.group(4)}"

    return BLOCK.sub(sub, text)


def main() -> None:
    """Regenerate the blocks of README.md (or the file given as the first argument) in place."""
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "README.md")
    text = path.read_text(encoding="utf-8")
    new = render(text)
    if new != text:
        path.write_text(new, encoding="utf-8")
        print(f"updated {path}")
    else:
        print(f"{path} is up to date")


if __name__ == "__main__":
    main()
