"""The click group both CLIs (``bastion``, ``replay``) use: ``ls`` and ``list`` name the same
command wherever one of them exists, in every subgroup too."""

from __future__ import annotations

import click

# Each name also answers to its partner when the group has only one of them.
ALIASES = {"ls": "list", "list": "ls"}


class AliasGroup(click.Group):
    # Subgroups made with @group.group() are AliasGroups too.
    group_class = type

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is None and cmd_name in ALIASES:
            command = super().get_command(ctx, ALIASES[cmd_name])
        return command

    def resolve_command(self, ctx: click.Context,
                        args: list[str]) -> tuple[str | None, click.Command | None, list[str]]:
        name, command, rest = super().resolve_command(ctx, args)
        # The canonical name, so that usage lines and errors name the command as listed.
        return (command.name if command is not None else name), command, rest
