"""guarita has one NotFound (recorder/objects.py): the stores and the state database raise
subclasses that are also their layer's error, and ``except NotFound`` catches both."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import bastion.state
import recorder.store
from bastion.state import StateError, StateNotFound, open_state
from recorder.objects import NotFound, ObjectNotFound, StoreError
from recorder.store import FileStore


def test_every_layer_names_the_same_not_found() -> None:
    assert bastion.state.NotFound is NotFound
    assert recorder.store.NotFound is NotFound
    assert issubclass(ObjectNotFound, NotFound) and issubclass(ObjectNotFound, StoreError)
    assert issubclass(StateNotFound, NotFound) and issubclass(StateNotFound, StateError)


def test_a_missing_object_is_a_not_found_and_a_store_error(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    with pytest.raises(NotFound) as caught:
        store.get("20260101-000000-00000000/nothing")
    assert isinstance(caught.value, StoreError)


def test_a_missing_lock_is_a_not_found_and_a_state_error(tmp_path: Path) -> None:
    async def run() -> None:
        state = open_state(f"sqlite:///{tmp_path / 'state.db'}")
        await state.start()
        try:
            with pytest.raises(NotFound) as caught:
                await state.remove_lock("nosuchlock")
            assert isinstance(caught.value, StateError)
        finally:
            await state.close()

    asyncio.run(run())
