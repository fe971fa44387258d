"""The ``thread-store`` group: the --store option, one-line errors, and the console script."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

import thread_store
from thread_store import ThreadStoreError

from ._import_codex import import_codex_command
from ._managing import archive, backup, delete, reindex, rename, unarchive
from ._output import example, fail
from ._reading import export, list_threads, show, status
from ._workloads import bench, demo

DEFAULT_STORE = "thread-store-data"


class _Group(click.Group):
    """A group whose errors are one line on stderr, in the console script and in CliRunner."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:
            exc.show()  # the group's help, not an error message
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            fail(exc.format_message(), exc.exit_code)
        except click.Abort:
            fail("aborted", 1)
        except ThreadStoreError as exc:
            fail(str(exc), 1)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=_Group, epilog=example("thread-store --store ~/agent-threads list --search flaky"))
@click.option("--store", "store_path", type=click.Path(path_type=Path), envvar="THREAD_STORE",
              default=DEFAULT_STORE, show_default=True,
              help="Store directory; $THREAD_STORE when the option is not given.")
@click.version_option(thread_store.__version__, prog_name="thread-store")
@click.pass_context
def cli(ctx: click.Context, store_path: Path) -> None:
    """Durable conversation threads with a listable metadata index."""
    ctx.obj = store_path


for _command in (list_threads, show, status, export, rename, archive, unarchive, delete, backup, reindex,
                 import_codex_command, demo, bench):
    cli.add_command(_command)


def main() -> None:
    """The ``thread-store`` console script."""
    logging.basicConfig(format="warning: %(message)s", level=logging.WARNING)
    cli(prog_name="thread-store")
