"""What guarita keeps of what the agent sends, masked under the session's masking policy.

Output is not the only place personal data shows: an agent types a CPF at a prompt, or
runs ``ssh target 'grep 529.982.247-25 clientes.csv'``. The gateway passes both on to the
target unchanged (that is the agent's own work), but every copy it *keeps* is masked like
output wherever masking applies (``live``, ``recording`` or ``both``):

* the input events of the recording (:class:`MaskedInput`, a stand-in for the recording
  that the session's input goes through), with each value's keyed hash in a ``masking``
  marker of stream ``i``;
* every copy of a command line: the session's metadata (manifest, ``replay ls``), the
  commands index (``replay search``), the audit log, approval requests and what
  approvers are shown (:func:`mask_text`, through ``Session.mask_command``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from bastion.masking.stream import Masked, StreamMasker

if TYPE_CHECKING:
    from bastion.masking.config import MaskingConfig


def masking_apply(masking: MaskingConfig | None, secret: bytes | None, front_door: str, target: str,
                  groups: Sequence[str], kind: str) -> str:
    """Where masking applies to a session: ``live``, ``recording``, ``both`` or ``none``.
    Binary channels (sftp and other subsystems) are never masked."""
    if masking is None or secret is None or kind == "subsystem":
        return "none"
    kube = front_door == "kube"
    return masking.where(None if kube else target, target if kube else None, groups)


def mask_text(masker: StreamMasker, text: str) -> tuple[str, list[Masked]]:
    """``text`` masked as one whole stream by a fresh ``masker``, and the values found."""
    out, found = masker.feed(text.encode("utf-8", "surrogateescape"))
    tail, more = masker.flush()
    return (out + tail).decode("utf-8", "surrogateescape"), found + more


def shown_command(masking: MaskingConfig | None, secret: bytes | None, front_door: str, target: str,
                  groups: Sequence[str], command: str | None) -> str | None:
    """A command line as the gateway keeps it where no Session holds it yet (a refused
    session's audit event): masked wherever masking would apply to the session."""
    if command is None or masking is None or secret is None:
        return command
    if masking_apply(masking, secret, front_door, target, groups, "exec") == "none":
        return command
    return mask_text(masking.masker(secret), command)[0]


class _Recording(Protocol):
    def now(self) -> float: ...
    def input_at(self, t: float, data: bytes) -> None: ...
    def marker(self, kind: str, **fields: Any) -> None: ...


class MaskedInput:
    """The agent's input on its way into the recording: masked like output, held while the
    bytes after it can still turn it into a value (a typed CPF is recorded once Enter or
    a space decides it), recorded at the time its first held byte was typed.

    It stands in for the recording where input is recorded (``now``, ``input``,
    ``input_at``, ``marker``); ``note_masked(found, "i")`` logs the values masked."""

    def __init__(self, recording: _Recording, masker: StreamMasker,
                 note_masked: Callable[[list[Masked], str], None]) -> None:
        self.rec = recording
        self.masker = masker
        self.note_masked = note_masked
        self._held_since: float | None = None

    def now(self) -> float:
        return self.rec.now()

    def marker(self, kind: str, **fields: Any) -> None:
        self.rec.marker(kind, **fields)

    def input(self, data: bytes) -> None:
        self.input_at(self.rec.now(), data)

    def input_at(self, t: float, data: bytes) -> None:
        out, found = self.masker.feed(data)
        self._record(t, out, found)

    def close(self) -> None:
        """The end of the session: what is still held is decided and recorded."""
        out, found = self.masker.flush()
        self._record(self.rec.now(), out, found)

    def _record(self, t: float, out: bytes, found: list[Masked]) -> None:
        since = self._held_since if self._held_since is not None else t
        if found:
            self.note_masked(found, "i")
        if out:
            self.rec.input_at(since, out)
        self._held_since = (t if self._held_since is None or out else self._held_since) if self.masker.holding else None
