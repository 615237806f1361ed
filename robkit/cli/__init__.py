"""The ``robkit`` command line: thin click commands over the library.

Sub-commands are imported only when used, so ``robkit --help`` stays fast.
"""

from __future__ import annotations

import importlib

import click

from robkit import __version__

# command name -> "module:attribute"; each module holds the click command of one area.
COMMANDS = {
    "pretrain": "robkit.engine.commands:pretrain",
    "distill": "robkit.engine.commands:distill",
    "recipes": "robkit.engine.commands:recipes",
    "eval": "robkit.evaluation.commands:eval_group",
    "teachers": "robkit.teachers.commands:teachers",
    "export": "robkit.export.commands:export",
    "bench": "robkit.export.commands:bench",
    "demo": "robkit.demo:demo",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:  # an optional area whose dependencies are missing
            reason = str(e)

            @click.command(name, help=f"(unavailable: {reason})")
            def unavailable() -> None:
                raise click.ClickException(f"`robkit {name}` is unavailable: {reason}")

            return unavailable


@click.group(
    cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110}
)
@click.version_option(__version__, prog_name="robkit")
def main() -> None:
    """Distil self-supervised vision teachers into small students that ship in mobile apps.

    \b
    Typical flow:
      robkit pretrain --method dino --student resnet18 --recipe sslight   (no teacher)
      robkit distill --teacher dino_vits8 --student mobilenet_v3           (RoB)
      robkit eval knn RUN/checkpoint.pt
      robkit export RUN/checkpoint.pt --format tflite
      robkit bench RUN/export/*.tflite
    """


if __name__ == "__main__":
    main()
