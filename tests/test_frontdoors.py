"""Every front door is a FrontDoor (bastion/doors), and the drain goes through that interface."""

from __future__ import annotations

import asyncio
import inspect
import socket
from types import SimpleNamespace
from typing import Any

import asyncssh
import pytest

from bastion import lifecycle
from bastion.doors import FrontDoor
from bastion.doors.kube.frontdoor import KubeFrontDoor
from bastion.doors.mcp.http import McpHttpDoor
from bastion.doors.ssh.frontdoor import SshFrontDoor
from bastion.http.api import HttpApi
from bastion.pipeline import FrontDoor as PipelineFrontDoor


@pytest.mark.parametrize("door", [SshFrontDoor, KubeFrontDoor, McpHttpDoor, HttpApi])
def test_every_door_implements_the_protocol(door: type) -> None:
    assert issubclass(door, FrontDoor)
    for name in ("start", "stop_accepting", "stop"):
        assert inspect.iscoroutinefunction(getattr(door, name)), f"{door.__name__}.{name} is not async"


def test_the_pipeline_names_the_same_protocol() -> None:
    assert PipelineFrontDoor is FrontDoor


class RecordingDoor:
    def __init__(self, name: str, calls: list[str]) -> None:
        self.name, self.calls = name, calls

    async def start(self) -> None:
        self.calls.append(f"{self.name}.start")

    async def stop_accepting(self) -> None:
        self.calls.append(f"{self.name}.stop_accepting")

    async def stop(self) -> None:
        self.calls.append(f"{self.name}.stop")


def _services(doors: list[FrontDoor], live: list[Any]) -> Any:
    return SimpleNamespace(draining=False, doors=doors, live=live, hurry=asyncio.Event(),
                           config=SimpleNamespace(drain_grace=0), audit=SimpleNamespace(emit=lambda *a, **k: None))


def test_the_drain_stops_every_door_accepting_and_stops_none() -> None:
    calls: list[str] = []
    doors: list[FrontDoor] = [RecordingDoor("ssh", calls), RecordingDoor("kube", calls)]
    gw = _services(doors, [])
    asyncio.run(lifecycle.drain(gw))
    assert gw.draining is True
    assert calls == ["ssh.stop_accepting", "kube.stop_accepting"]


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def test_the_ssh_door_listens_then_stops_accepting() -> None:
    async def run() -> None:
        gw = SimpleNamespace(config=SimpleNamespace(ssh_listen=("127.0.0.1", 0)),
                             host_key=asyncssh.generate_private_key("ssh-ed25519"))
        ssh = SshFrontDoor(gw)
        door: FrontDoor = ssh
        await door.start()
        port = ssh.port
        assert port and not await asyncio.to_thread(_refused, port)
        await door.stop_accepting()
        assert await asyncio.to_thread(_refused, port)
        await door.stop()  # idempotent after stop_accepting
        await door.stop()

    asyncio.run(run())
