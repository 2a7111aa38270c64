"""Server-to-server forwarding (proto/RPC.md, "Forwarding"): where a
session's step inputs come from (its client, or the previous hop's
server), the ``push`` RPC, and pushing an output on to the next hop.

A step's input may come from the client (its tensor, or a "pushed" step
message with none) or from a push, in either order, and a step must run
exactly once. ``StepInputs`` decides, synchronously, for both sources
(the push RPC and the session's handler run on the same trio thread):
there is no race between two waiting tasks to get wrong.

A push is accepted (queued or matched) or refused with a typed error;
the pusher learns nothing else, and the client stays the one who decides
what runs: a push only ever supplies the tensor of a step the client
announced.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass

import trio
from torch import Tensor

from ..errors import BusyError, InvalidRequestError, LibpipeError, SessionError
from ..net import CallContext, ConnectionPool, Message, short_peer_id
from ..swarm import GossipNode
from . import _validate

logger = logging.getLogger("libpipe.server")

# Pushes queued at once per session. A pusher is one step ahead at most
# (the client waits for each step), so a few cover a cancelled step's
# leftovers; more is a flood, refused with ``busy``.
MAX_QUEUED_PUSHES = 4
# Bytes of entropy in a push token: unguessable by any other peer.
TOKEN_BYTES = 16
# Seconds a hop spends pushing one output (dial included) before it gives
# up and tells the client, who then sends the input itself.
PUSH_TIMEOUT = 1.0


@dataclass(frozen=True)
class Pushed:
    """A step's input pushed by the previous hop."""

    step: int
    hidden: Tensor


class StepInputs:
    """Decides which arrival runs which step of one session, so that each
    runs exactly once.

    Step ids grow within a session (the client numbers every message it
    sends). A client message with ``pushed: true`` and no tensor announces
    a step whose input comes by push: it runs when that push arrives, or
    when the client sends the tensor itself (same step id), whichever comes
    first; the other is then a duplicate and dropped. A push that comes
    before its announcement waits (at most ``MAX_QUEUED_PUSHES``, more is
    ``busy``); one for a step already run or given up is dropped. A newer
    client message gives up an announced step still waiting (its caller
    was cancelled)."""

    def __init__(self, batch: int, hidden_size: int) -> None:
        self.batch = batch
        self.hidden_size = hidden_size
        self.last_step = -1
        self.awaiting: Message | None = None
        self.early: dict[int, Tensor] = {}
        self.ready: Message | None = None
        # Wakes the handler from its wait for its client's next message
        # when a push makes an announced step ready (None: nobody waits).
        self.wake: Callable[[], object] | None = None
        self.closed = False

    def offer(self, step: int, hidden: Tensor) -> None:
        """A push (the ``push`` RPC): queued, matched, dropped or refused."""
        if self.closed:
            raise SessionError("the session this push is for has ended")
        _validate.hidden_states(hidden, self.hidden_size, batch=self.batch)
        if self.awaiting is not None and _step_of(self.awaiting) == step:
            self.ready = self._run(Message(self.awaiting.meta, (hidden,)))
            self.awaiting = None
            if self.wake is not None:
                self.wake()
            return
        newest = self.last_step if self.awaiting is None else _step_of(self.awaiting)
        if newest is not None and step <= newest:
            return  # its step ran on the client's copy, or was given up
        if len(self.early) >= MAX_QUEUED_PUSHES:
            raise BusyError(
                f"{MAX_QUEUED_PUSHES} pushes already wait for this session",
                limit=MAX_QUEUED_PUSHES,
            )
        self.early[step] = hidden

    def take_ready(self) -> Message | None:
        """An announced step whose push has come, to run now."""
        ready, self.ready = self.ready, None
        return ready

    def arrive(self, item: Message) -> Message | None:
        """A client message: the step to run now, if any."""
        step = _step_of(item)
        if step is None:
            return item  # a client that numbers nothing: no push can match
        if step <= self.last_step:
            return None  # the client's own copy of an input a push already gave
        self.awaiting = None  # given up, or sent by the client itself now
        self.early = {s: h for s, h in self.early.items() if s >= step}
        if item.meta.get("pushed") is not True:
            return self._run(item)
        if item.tensors:
            raise InvalidRequestError("a step announced as pushed carries no tensor")
        early = self.early.pop(step, None)
        if early is not None:
            return self._run(Message(item.meta, (early,)))
        self.awaiting = item
        return None

    def close(self) -> None:
        self.closed = True

    def _run(self, message: Message) -> Message:
        step = _step_of(message)
        if step is not None:
            self.last_step = step
        return message


class PushTable:
    """Open sessions by push token, and the ``push`` RPC."""

    def __init__(self) -> None:
        self._sessions: dict[str, StepInputs] = {}

    def open(self, inputs: StepInputs) -> str:
        token = secrets.token_hex(TOKEN_BYTES)
        self._sessions[token] = inputs
        return token

    def close(self, token: str) -> None:
        inputs = self._sessions.pop(token, None)
        if inputs is not None:
            inputs.close()

    def push(self, ctx: CallContext, msg: Message) -> Message:
        """``push`` (unary, answered inline: it only queues)."""
        token = msg.meta.get("token")
        if not isinstance(token, str):
            raise InvalidRequestError("push needs a string 'token'")
        step = _validate.meta_int(msg.meta, "step", minimum=0)
        _validate.tensor_count(msg.tensors, (1,), "a push")
        inputs = self._sessions.get(token)
        if inputs is None:
            raise SessionError("no open session has this push token (closed, or never opened)")
        inputs.offer(step, msg.tensors[0])
        return Message()


def _step_of(message: Message) -> int | None:
    return _validate.optional_int(message.meta, "step")


@dataclass(frozen=True)
class PushTarget:
    """Where a step's output goes next (the client's ``push_to``)."""

    address: str
    peer_id: str
    token: str
    step: int

    @staticmethod
    def from_meta(meta: dict[str, object]) -> PushTarget | None:
        target = meta.get("push_to")
        if target is None:
            return None
        if not isinstance(target, dict):
            raise InvalidRequestError("'push_to' must be a map")
        fields = {k: target.get(k) for k in ("address", "peer_id", "token")}
        if not all(isinstance(v, str) and v for v in fields.values()):
            raise InvalidRequestError("'push_to' needs string address, peer_id and token")
        step = _validate.meta_int(target, "step", minimum=0)
        return PushTarget(step=step, **fields)  # type: ignore[arg-type]


class KnownServers:
    """The push targets a server may dial: servers of its model in its
    gossip view (docs/security.md, "A client chooses where a server
    forwards").

    A client names the next hop; without this check a server would dial
    any address a client gave it. With a view (the node knows any member
    besides itself), a target must be a live member whose signed record
    is unexpired, serves this model and lists the target's address;
    anything else is refused before any dial. The session loses nothing:
    the step runs and is answered, and the ``pushed: false`` notice says
    why, so the client carries that input itself, as after any failed
    push (a client whose view is ahead of this server's, a peer that
    joined a moment ago, just misses one push). A server alone in its
    view (started without ``--peers``, nobody joined yet) has nothing to
    check against and pushes as before."""

    def __init__(self, node: GossipNode, model_id: str) -> None:
        self.node = node
        self.model_id = model_id

    def refusal(self, target: PushTarget) -> InvalidRequestError | None:
        """Why ``target`` may not be dialed, or None."""
        node = self.node
        if len(node.members) < 2:
            return None
        member = node.members.get(target.peer_id)
        who = short_peer_id(target.peer_id)
        if (
            member is None
            or not member.state.is_live
            or (member.peer_id != node.peer_id and node.record_expired(member))
        ):
            return InvalidRequestError(
                f"push_to names peer {who}, not a live server in this server's gossip view",
                peer_id=target.peer_id,
            )
        record = member.record.record
        if record.model_id != self.model_id:
            return InvalidRequestError(
                f"push_to names peer {who}, a server of another model ({record.model_id!r})",
                peer_id=target.peer_id,
            )
        if target.address not in record.addresses:
            return InvalidRequestError(
                f"push_to names {target.address!r} for peer {who}, which announces "
                f"{', '.join(record.addresses)}",
                peer_id=target.peer_id,
                address=target.address,
            )
        return None


async def push(
    connections: ConnectionPool | None,
    target: PushTarget,
    out: Tensor,
    sending: Callable[[], None] | None = None,
) -> bool:
    """Send ``out`` to the next hop; whether it was queued there. Any
    failure is only a False: the client then sends the input itself.
    ``sending()`` is called once connected, just before the push's frame
    is written (in the same task step, unless another send holds the
    connection)."""
    if connections is None:
        return False
    with trio.move_on_after(PUSH_TIMEOUT):
        try:
            connection = await connections.get(target.address, target.peer_id)
            if sending is not None:
                sending()
            await connection.call("push", {"token": target.token, "step": target.step}, (out,))
        except (LibpipeError, OSError, trio.BrokenResourceError) as exc:
            logger.debug("push to %s failed: %s", target.address, exc)
            return False
        return True
    return False
