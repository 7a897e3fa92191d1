"""The root ``flywheel`` command: subcommands are imported only when they are invoked."""

from __future__ import annotations

import importlib
import sys
from typing import Any

try:
    import typer
    from typer.core import TyperCommand, TyperGroup
except ImportError:  # pragma: no cover - the core install has numpy only
    typer = None  # type: ignore[assignment]

# name -> (module, attribute, extra that provides its dependencies, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str, str, str]] = {
    "agent": ("fleet.edge.cli", "app", "edge", "Run the shadow-mode edge agent on a device."),
    "hub": ("fleet.hub.cli", "app", "hub", "Serve the hub and manage its tokens."),
    "models": ("fleet.hub.admin_cli", "models_app", "hub", "List, promote and roll back model versions."),
    "campaigns": ("fleet.hub.admin_cli", "campaigns_app", "hub", "Apply and list trigger campaigns."),
    "devices": ("fleet.hub.admin_cli", "devices_app", "hub", "List, find and revoke enrolled devices."),
    "label": ("labeling.cli", "app", "labeling", "Keep Label Studio and the hub in step."),
    "train": ("training.cli", "train_app", "train", "Retrain, gate, export and publish a model."),
    "export": ("training.cli", "export_app", "train", "Export a checkpoint to signed ONNX."),
    "evaluate": ("training.cli", "evaluate_app", "train", "Evaluate an exported model on labeled images."),
    "keys": ("fleet.keys_cli", "app", "edge", "Generate the fleet's ed25519 signing keys."),
    "demo": ("fleet.sim.cli", "app", "all", "Run the whole loop on one machine, against random labeling."),
}

# loggers whose INFO lines (one per HTTP request, one per alembic plugin, where boto3 found its credentials and
# endpoint) show only with --verbose
QUIET_LOGGERS = ("httpx", "httpcore", "alembic.runtime.plugins", "botocore")
# alembic's lines on every database opened, which --verbose brings back; the migrations it runs are always said
MIGRATION_LOGGER = "alembic.runtime.migration"
QUIET_MIGRATION_LINES = ("Context impl ", "Will assume ")


def quiet_migration_line(record: Any) -> bool:
    """A logging filter: False (drop) for alembic's note of the database kind, which comes each time a hub command
    opens its database, not only when a migration runs."""
    return not str(record.msg).startswith(QUIET_MIGRATION_LINES)


def with_received(message: str, cause: BaseException | None) -> str:
    """A bad option's message naming the value received: typer checks an option's type and range with pydantic, whose
    first error says what was expected ("Input should be greater than or equal to 1") but not what came."""
    errors = getattr(cause, "errors", None)
    try:
        found = errors()[0] if callable(errors) else None
    except (IndexError, TypeError):
        found = None
    if not isinstance(found, dict) or not isinstance(found.get("input"), str) or "received" in message:
        return message  # what came on a command line is text; anything else is not typer's check of an option
    return f"{message}; received {found['input']!r:.200}"


def _load(name: str) -> Any:
    module, attr, extra, _ = SUBCOMMANDS[name]
    try:
        obj = getattr(importlib.import_module(module), attr)
    except ModuleNotFoundError as exc:
        if exc.name and (exc.name == module or module.startswith(exc.name + ".")):
            message = f"'flywheel {name}' is not available in this build ({module} is missing)"
        else:
            message = f"'flywheel {name}' needs {exc.name!r}: pip install 'edge-flywheel[{extra}]'"
        sys.stderr.write(f"Error: {message}\n")
        raise typer.Exit(2) from exc
    return typer.main.get_command(obj) if isinstance(obj, typer.Typer) else obj


if typer is not None:

    class LazyGroup(TyperGroup):
        """A group whose subcommands are imported on first use, so ``flywheel agent`` never loads torch."""

        def list_commands(self, ctx: Any) -> list[str]:
            return list(SUBCOMMANDS)

        def get_command(self, ctx: Any, cmd_name: str) -> Any:
            """A light placeholder for help listings: names and one-line help, nothing imported."""
            if cmd_name not in SUBCOMMANDS:
                return None
            return TyperCommand(cmd_name, help=SUBCOMMANDS[cmd_name][3])

        def _click_resolve_command(self, ctx: Any, args: list[str]) -> tuple[str | None, Any, list[str]]:
            """Resolve the invoked subcommand for real: only now is its module imported."""
            if args and args[0] in SUBCOMMANDS:
                cmd = _load(args[0])
                cmd.name = args[0]
                return args[0], cmd, args[1:]
            return super()._click_resolve_command(ctx, args)  # type: ignore[no-any-return]

        def invoke(self, ctx: Any) -> Any:
            try:
                return super().invoke(ctx)
            except typer.BadParameter as exc:
                exc.message = with_received(exc.message, exc.__cause__)
                raise

    app = typer.Typer(
        cls=LazyGroup,
        name="flywheel",
        help="Flywheel: active-learning edge-case mining, from edge devices to signed model rollouts.",
        no_args_is_help=True,
        add_completion=False,
    )

    @app.callback()
    def _root(
        verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at DEBUG level."),
    ) -> None:
        import logging

        logging.basicConfig(
            level=logging.DEBUG if verbose else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        if not verbose:  # a line per HTTP request and per alembic plugin is --verbose's detail, not news
            for chatty in QUIET_LOGGERS:
                logging.getLogger(chatty).setLevel(logging.WARNING)
            logging.getLogger(MIGRATION_LOGGER).addFilter(quiet_migration_line)


def main() -> None:
    if typer is None:
        sys.stderr.write("the flywheel command needs typer: pip install 'edge-flywheel[cli]'\n")
        raise SystemExit(2)
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
