"""The ``robkit`` command line: thin click commands over the library.

Sub-commands are imported only when used, so ``robkit --help`` stays fast. Every
:class:`~robkit.utils.errors.RobkitError` (a user's mistake: a missing path, a file that is not a
checkpoint, an unknown name, a bad setting) ends as one ``Error: ...`` message and exit status 1;
``--debug`` or ``ROBKIT_DEBUG=1`` shows the traceback instead. Any other exception is a bug and keeps
its traceback.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import click

from robkit import __version__
from robkit.utils.errors import RobkitError

# command name -> "module:attribute"; each module holds the click command of one area.
COMMANDS = {
    "pretrain": "robkit.cli.train:pretrain",
    "distill": "robkit.cli.train:distill",
    "finetune": "robkit.cli.finetune:finetune",
    "recipes": "robkit.cli.train:recipes",
    "eval": "robkit.cli.evaluate:eval_group",
    "teachers": "robkit.cli.teachers:teachers",
    "export": "robkit.cli.export:export",
    "bench": "robkit.cli.export:bench",
    "demo": "robkit.demo:demo",
}


class LazyGroup(click.Group):
    """A click group that imports each sub-command's module only when the command is used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        """The names of every sub-command, sorted."""
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        """The command ``name`` imported from its module, a stand-in that explains why it is unavailable
        when a third-party package is missing, or ``None`` for an unknown name.
        """
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except ModuleNotFoundError as e:
            if (e.name or "").split(".")[0] in ("robkit", ""):
                raise  # a robkit module is missing or broken: a bug, keep the traceback
            reason = f"it needs the Python package {e.name!r} ({e}); install it, e.g. pip install {e.name}"

            @click.command(name, help=f"(unavailable: {reason})")
            def unavailable() -> None:
                raise click.ClickException(f"`robkit {name}` is unavailable: {reason}")

            return unavailable

    def invoke(self, ctx: click.Context) -> Any:
        """Run the group, turning a :class:`RobkitError` into a one-line ``click`` error unless --debug."""
        try:
            return super().invoke(ctx)
        except RobkitError as e:
            if debug_enabled(ctx):
                raise
            raise click.ClickException(str(e)) from None


def clean_error(e: BaseException) -> BaseException:
    """What a command raises for a user's mistake ``e``: a one-line ``click`` error, or ``e`` under --debug."""
    if debug_enabled(click.get_current_context(silent=True)):
        return e
    return click.ClickException(str(e))


def debug_enabled(ctx: click.Context | None = None) -> bool:
    """``--debug`` on the command line or ``ROBKIT_DEBUG`` set to a true value."""
    if ctx is not None and (ctx.find_root().params or {}).get("debug"):
        return True
    return os.environ.get("ROBKIT_DEBUG", "").lower() in ("1", "true", "yes", "on")


@click.group(
    cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110}
)
@click.version_option(__version__, prog_name="robkit")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error (also: ROBKIT_DEBUG=1).")
def main(debug: bool) -> None:
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
