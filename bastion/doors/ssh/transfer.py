"""File transfer started by exec rather than the sftp subsystem.

Legacy scp (``scp -O``, and every scp before OpenSSH 9) runs ``scp -t PATH`` (upload) or
``scp -f PATH`` (download) on the target as an exec command; rsync runs
``rsync --server …``; a client can also exec the sftp server itself. Where policy does not
allow file transfer (``access[].sftp = false``), these execs are refused like the sftp
subsystem is. Matching is on the command's simple commands with wrappers and paths
removed (``sudo /usr/bin/scp -t x`` too), as the approval rules read them.
"""

from __future__ import annotations

from bastion.approvals.rules import CommandForms

_SFTP_SERVERS = {"sftp-server", "internal-sftp"}


def transfer_kind(command: str | None) -> str | None:
    """``"scp"``, ``"rsync"`` or ``"sftp"`` when ``command`` is a file transfer's server side, else None."""
    if not command:
        return None
    for argv in CommandForms.of(command).simple_commands:
        name = argv[0].rsplit("/", 1)[-1]
        flags = "".join(a[1:] for a in argv[1:] if a.startswith("-") and not a.startswith("--"))
        if name == "scp" and ("t" in flags or "f" in flags):
            return "scp"
        if name == "rsync" and "--server" in argv:
            return "rsync"
        if name in _SFTP_SERVERS:
            return "sftp"
    return None
