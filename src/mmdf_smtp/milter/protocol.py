"""The MTA side of one milter conversation, as a sans-IO state machine.

Theory of operation
-------------------
One :class:`MilterProtocol` per milter per SMTP session.  It knows what was
negotiated and where the conversation is; it never touches a socket or a
clock (the driver in :mod:`.client` does, and owns the timeouts).

1. :meth:`MilterProtocol.negotiate` gives the OPTNEG packet: version 6, every
   action this MTA can carry out and every protocol step it can leave out
   (:data:`MTA_ACTIONS`, :data:`MTA_PROTOCOL`).  The driver writes it, feeds
   what comes back to :meth:`~MilterProtocol.receive_data` and calls
   :meth:`~MilterProtocol.next_event` until it returns the
   :class:`Negotiated` result.
2. For each SMTP stage the driver calls :meth:`~MilterProtocol.begin` with the
   command and the macro values it knows.  The returned :class:`Step` holds
   the octets to write (macros, then the command, or nothing) and, when no
   reply is to be awaited, the :class:`Verdict` at once: the milter asked
   not to see this stage, or not to answer it, or it has already accepted or
   refused.  Otherwise the driver reads, feeding octets in, until
   :meth:`~MilterProtocol.next_event` returns a :class:`Verdict`;
   :data:`PROGRESS` means "still working, restart the timer".
3. A protocol violation raises :class:`~.codec.MilterProtocolError`; the
   driver then calls :meth:`~MilterProtocol.fail` and the conversation is
   over: every later stage gets the default action's verdict, as with
   Postfix's ``milter_default_action``.

States::

    NEW --negotiate()--> NEGOTIATING --OPTNEG reply--> READY
    READY --begin(stage)--> WAITING --final reply--> READY
    any --ACCEPT at CONNECT/HELO--> ACCEPTED (CONTINUE for the rest of the session)
    any --refusal at CONNECT/HELO--> REFUSED (the same refusal for the rest)
    any --fail()--> FAILED (the default action for the rest)

Pipelined content: with ``begin(..., pipelined=True)`` the driver may begin
the content stages of a message (each header, end of headers, body, end of
message) while answers to earlier ones are still awaited, write them in one
go and read the answers in order.  An answer other than CONTINUE (or SKIP)
with stages still unanswered leaves the conversation out of step (how many
of the packets after it a milter answers is its own affair: libmilter
answers none): the conversation is then CLOSED with :attr:`desynchronised`
set, and the driver opens a new connection for the next transaction.

Within READY, an ACCEPT or DISCARD after MAIL excuses the milter until the
transaction ends (end of message or :meth:`~MilterProtocol.abort`); a SKIP
stops further events of the same stage until another stage begins.
"""

from __future__ import annotations

import collections
import enum
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..protocol.replies import Reply
from . import codec
from .codec import ActionFlag, MacroStage, MilterProtocolError, ProtocolFlag


class UnexpectedResponse(MilterProtocolError):
    """A well-formed response that the protocol does not allow at this point."""


class NegotiationError(MilterProtocolError):
    """The milter's OPTNEG answer asks for more than this MTA offered."""


class Stage(enum.Enum):
    """An SMTP-side event a milter may be told about."""

    CONNECT = "connect"
    HELO = "helo"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"
    HEADER = "header"
    END_OF_HEADERS = "eoh"
    BODY = "body"
    END_OF_MESSAGE = "eom"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class _StageRule:
    code: bytes
    skip_flag: ProtocolFlag  # the milter does not want this stage
    no_reply_flag: ProtocolFlag  # the milter will not answer this stage
    macro_stage: MacroStage | None  # whose macro list goes with it
    since_version: int  # first protocol version that has the event


_NONE = ProtocolFlag(0)
_RULES: dict[Stage, _StageRule] = {
    Stage.CONNECT: _StageRule(
        b"C", ProtocolFlag.NOCONNECT, ProtocolFlag.NR_CONN, MacroStage.CONNECT, 2
    ),
    Stage.HELO: _StageRule(b"H", ProtocolFlag.NOHELO, ProtocolFlag.NR_HELO, MacroStage.HELO, 2),
    Stage.MAIL: _StageRule(b"M", ProtocolFlag.NOMAIL, ProtocolFlag.NR_MAIL, MacroStage.ENVFROM, 2),
    Stage.RCPT: _StageRule(b"R", ProtocolFlag.NORCPT, ProtocolFlag.NR_RCPT, MacroStage.ENVRCPT, 2),
    Stage.DATA: _StageRule(b"T", ProtocolFlag.NODATA, ProtocolFlag.NR_DATA, MacroStage.DATA, 4),
    # Postfix sends the end-of-header macros with each header, and the
    # end-of-message macros with each body chunk.
    Stage.HEADER: _StageRule(b"L", ProtocolFlag.NOHDRS, ProtocolFlag.NR_HDR, MacroStage.EOH, 2),
    Stage.END_OF_HEADERS: _StageRule(
        b"N", ProtocolFlag.NOEOH, ProtocolFlag.NR_EOH, MacroStage.EOH, 2
    ),
    Stage.BODY: _StageRule(b"B", ProtocolFlag.NOBODY, ProtocolFlag.NR_BODY, MacroStage.EOM, 2),
    Stage.END_OF_MESSAGE: _StageRule(b"E", _NONE, _NONE, MacroStage.EOM, 2),
    # Sendmail sends no macros with UNKNOWN; neither does Postfix by default.
    Stage.UNKNOWN: _StageRule(b"U", ProtocolFlag.NOUNKNOWN, ProtocolFlag.NR_UNKN, None, 3),
}

_COMMAND_STAGE: dict[type[codec.Command], Stage] = {
    codec.Connect: Stage.CONNECT,
    codec.Helo: Stage.HELO,
    codec.MailFrom: Stage.MAIL,
    codec.RcptTo: Stage.RCPT,
    codec.Data: Stage.DATA,
    codec.Header: Stage.HEADER,
    codec.EndOfHeaders: Stage.END_OF_HEADERS,
    codec.BodyChunk: Stage.BODY,
    codec.EndOfMessage: Stage.END_OF_MESSAGE,
    codec.Unknown: Stage.UNKNOWN,
}

#: Everything this MTA can carry out at end of message.
MTA_ACTIONS = (
    ActionFlag.ADDHDRS
    | ActionFlag.CHGBODY
    | ActionFlag.ADDRCPT
    | ActionFlag.DELRCPT
    | ActionFlag.CHGHDRS
    | ActionFlag.QUARANTINE
    | ActionFlag.CHGFROM
    | ActionFlag.ADDRCPT_PAR
    | ActionFlag.SETSYMLIST
)
#: Every step a milter may ask to leave out or not to answer, and the v6 extensions.
MTA_PROTOCOL = ProtocolFlag(0x1FFFFF)

#: Postfix's defaults (``milter_*_macros``), in its order.
DEFAULT_MACROS: Mapping[MacroStage, tuple[str, ...]] = {
    MacroStage.CONNECT: (
        "j",
        "{daemon_name}",
        "{daemon_addr}",
        "v",
        "_",
        "{client_addr}",
        "{client_name}",
        "{client_port}",
        "{client_ptr}",
    ),
    MacroStage.HELO: (
        "{tls_version}",
        "{cipher}",
        "{cipher_bits}",
        "{cert_subject}",
        "{cert_issuer}",
    ),
    MacroStage.ENVFROM: (
        "i",
        "{auth_type}",
        "{auth_authen}",
        "{auth_author}",
        "{mail_addr}",
        "{mail_host}",
        "{mail_mailer}",
    ),
    MacroStage.ENVRCPT: ("{rcpt_addr}", "{rcpt_host}", "{rcpt_mailer}"),
    MacroStage.DATA: ("i",),
    MacroStage.EOH: ("i",),
    MacroStage.EOM: ("i",),
}

# Protocol steps each older version knows (Postfix's MILTER8_V*_PROTO_MASK):
# events outside them are never sent to such a milter.
_V2_STEPS = (
    ProtocolFlag.NOCONNECT
    | ProtocolFlag.NOHELO
    | ProtocolFlag.NOMAIL
    | ProtocolFlag.NORCPT
    | ProtocolFlag.NOBODY
    | ProtocolFlag.NOHDRS
    | ProtocolFlag.NOEOH
)


@functools.lru_cache(maxsize=512)
def macro_name(name: str) -> str:
    """The wire form of a macro name: one character bare, longer ones in braces."""
    name = name.strip()
    if len(name) > 1 and not (name.startswith("{") and name.endswith("}")):
        return "{" + name + "}"
    return name


# --- replies -----------------------------------------------------------------------

# Postfix's texts for the replies that carry none of their own (milter8.c).
REJECTED = Reply(code=550, enhanced="5.7.1", text="Command rejected")
TEMPORARILY_REFUSED = Reply(
    code=451, enhanced="4.7.1", text="Service unavailable - try again later"
)
SHUTTING_DOWN = Reply(code=421, enhanced="4.7.0", text="Server closing connection")
# milter_default_action = reject (Postfix says 5.5.0; 5.7.1 is "delivery not
# authorized", which is what the client learns).
DEFAULT_REJECT = Reply(code=550, enhanced="5.7.1", text="Service unavailable")
DEFAULT_TEMPFAIL = TEMPORARILY_REFUSED


def reply_from_text(text: str) -> Reply:
    """A checked SMFIR_REPLYCODE text as a :class:`Reply`, lines kept as sent.

    The enhanced code of the first line becomes the reply's; a later line
    that repeats it is stored without it (the reply adds it back to every
    line).  Sendmail treats the text as a format string, so milters double
    their ``%``; as Postfix does, ``%%`` becomes ``%`` and a lone ``%`` goes.
    """
    codec.check_reply_text(text)
    text = _unpercent(text)
    lines = text.split("\r\n")
    code = int(lines[0][:3])
    first = lines[0][4:]
    enhanced = ""
    head, _, _ = first.partition(" ")
    parts = head.split(".")
    if len(parts) == 3 and all(p.isdigit() and p.isascii() for p in parts):
        enhanced = head
    texts = []
    for line in lines:
        rest = line[4:]
        if enhanced and (rest == enhanced or rest.startswith(enhanced + " ")):
            rest = rest[len(enhanced) + 1 :]
        texts.append(rest)
    return Reply(code=code, enhanced=enhanced, text="\n".join(texts))


def _unpercent(text: str) -> str:
    out = []
    i = 0
    while i < len(text):
        if text[i] == "%":
            if i + 1 < len(text) and text[i + 1] == "%":
                out.append("%")
            i += 2
            continue
        out.append(text[i])
        i += 1
    return "".join(out)


class Action(enum.Enum):
    """What a stage's answer means for the SMTP session."""

    CONTINUE = "continue"  # go on (also: the milter skipped, or was not asked)
    ACCEPT = "accept"  # this milter wants nothing more of this message (or session)
    DISCARD = "discard"  # say 250 to the client, queue nothing
    REJECT = "reject"  # refuse with the 5xx in Verdict.reply
    TEMPFAIL = "tempfail"  # refuse with the 4xx in Verdict.reply
    SHUTDOWN = "shutdown"  # say 421 (Verdict.reply) and close the SMTP session


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    """A milter's answer to one stage.

    ``reply`` is set for REJECT, TEMPFAIL and SHUTDOWN: the SMTP reply to
    send, a milter's own REPLYCODE exactly, or Postfix's text for a plain
    REJECT/TEMPFAIL.  ``modifications`` and ``quarantine`` are only set at
    end of message: the changes in the order the milter sent them, header
    values already in message form (see :func:`message_header_value`).
    """

    action: Action
    reply: Reply | None = None
    modifications: tuple[codec.Modification, ...] = ()
    quarantine: str | None = None

    @property
    def is_continue(self) -> bool:
        return self.action is Action.CONTINUE


CONTINUE = Verdict(action=Action.CONTINUE)
ACCEPT = Verdict(action=Action.ACCEPT)


def message_header_value(value: str, *, leading_space: bool) -> str:
    """A milter's header value as it goes into the message after the colon.

    Without SMFIP_HDR_LEADSPC the MTA puts one space after the colon, as
    Sendmail and Postfix do (``MILTER8_HDR_SPACE``); with it, the milter's
    value is used as sent.  Folded lines arrive separated by LF (Sendmail's
    form); they become CRLF.
    """
    value = value.replace("\r\n", "\n").replace("\n", "\r\n")
    return value if leading_space else " " + value


def milter_header_value(value: str, *, leading_space: bool) -> str:
    """A header value from the message (after the colon) as a milter is sent it.

    Folded lines are separated by LF, as Sendmail sends them; without
    SMFIP_HDR_LEADSPC the one space after the colon is left out.
    """
    value = value.replace("\r\n", "\n")
    if not leading_space and value.startswith(" "):
        value = value[1:]
    return value


# --- negotiation ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class StagePlan:
    """What the negotiated flags mean for one stage."""

    code: bytes
    sends: bool  # the command goes to the milter (its macros go even when it does not)
    expects_reply: bool
    macro_names: tuple[str, ...]
    # Each name as a caller's mapping may have it: in wire form, then bare
    # ("{client_addr}", "client_addr"), so that no mapping is rebuilt a packet.
    macro_keys: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Negotiated:
    """The outcome of OPTNEG: what to send this milter and what to wait for."""

    version: int
    actions: ActionFlag
    protocol: ProtocolFlag
    macro_lists: Mapping[MacroStage, tuple[str, ...]] = field(
        default_factory=lambda: dict(DEFAULT_MACROS)
    )
    # Each stage's flag tests, worked out once here rather than with
    # enum.Flag arithmetic on every packet of every message.
    plan: Mapping[Stage, StagePlan] = field(init=False, repr=False, compare=False)
    leading_space: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        protocol = int(self.protocol)
        plan = {}
        for stage, rule in _RULES.items():
            sends = not protocol & rule.skip_flag
            macro_stage = rule.macro_stage
            names = () if macro_stage is None else tuple(self.macro_lists.get(macro_stage, ()))
            plan[stage] = StagePlan(
                code=rule.code,
                sends=sends,
                expects_reply=sends and not protocol & rule.no_reply_flag,
                macro_names=names,
                macro_keys=tuple((n, n[1:-1] if n.startswith("{") else n) for n in names),
            )
        object.__setattr__(self, "plan", plan)
        object.__setattr__(self, "leading_space", bool(protocol & ProtocolFlag.HDR_LEADSPC))

    @classmethod
    def from_reply(
        cls,
        reply: codec.Negotiate,
        *,
        offered_version: int = codec.VERSION,
        offered_actions: ActionFlag = MTA_ACTIONS,
        offered_protocol: ProtocolFlag = MTA_PROTOCOL,
    ) -> Negotiated:
        """Check a milter's OPTNEG answer against the offer, as milter8.c does."""
        if reply.version > offered_version or reply.version < 2:
            raise NegotiationError(
                f"milter protocol version {reply.version}, this MTA speaks 2 to {offered_version}"
            )
        if int(reply.actions) & ~int(offered_actions):
            raise NegotiationError(
                f"milter asks for actions {reply.actions!r} beyond {offered_actions!r}"
            )
        # Steps the milter's version does not know are never sent to it.
        steps = _V2_STEPS
        if reply.version >= 3:
            steps |= ProtocolFlag.NOUNKNOWN
        if reply.version >= 4:
            steps |= ProtocolFlag.NODATA
        absent = ProtocolFlag(0)
        if reply.version < 3:
            absent |= ProtocolFlag.NOUNKNOWN
        if reply.version < 4:
            absent |= ProtocolFlag.NODATA
        # A flag we did not offer is ignored, as Postfix does; the milter
        # cannot have meant to rely on it.
        protocol = (reply.protocol & offered_protocol) | absent
        lists: Mapping[MacroStage, tuple[str, ...]] = dict(DEFAULT_MACROS)
        if reply.macro_lists:
            # Postfix: once a milter sends any list, stages it leaves out get none.
            lists = {
                stage: tuple(macro_name(n) for n in names) for stage, names in reply.macro_lists
            }
        return cls(
            version=reply.version, actions=reply.actions, protocol=protocol, macro_lists=lists
        )

    def sends(self, stage: Stage) -> bool:
        """Whether the stage's command is sent (its macros are, even when it is not)."""
        return self.plan[stage].sends

    def expects_reply(self, stage: Stage) -> bool:
        return self.plan[stage].expects_reply

    def macro_names(self, stage: Stage) -> tuple[str, ...]:
        return self.plan[stage].macro_names

    @property
    def wants_rejected_recipients(self) -> bool:
        """SMFIP_RCPT_REJ: also tell the milter about recipients the MTA refused."""
        return bool(self.protocol & ProtocolFlag.RCPT_REJ)


# --- the conversation ----------------------------------------------------------------


class State(enum.Enum):
    NEW = "new"
    NEGOTIATING = "negotiating"
    READY = "ready"
    WAITING = "waiting"
    ACCEPTED = "accepted"  # ACCEPT at CONNECT/HELO: nothing more this session
    REFUSED = "refused"  # refusal at CONNECT/HELO: the same answer to everything
    FAILED = "failed"  # broken or unreachable: the default action
    CLOSED = "closed"


class Progress(enum.Enum):
    PROGRESS = "PROGRESS"


PROGRESS = Progress.PROGRESS


@dataclass(frozen=True, slots=True)
class Step:
    """What :meth:`MilterProtocol.begin` asks of the driver.

    Write ``data`` (it may be empty); if ``verdict`` is None, then read
    until :meth:`MilterProtocol.next_event` gives one.
    """

    data: bytes
    verdict: Verdict | None


_MODIFICATION_ACTION: dict[type[codec.Modification], ActionFlag] = {
    codec.AddHeader: ActionFlag.ADDHDRS,
    codec.InsertHeader: ActionFlag.ADDHDRS,
    codec.ChangeHeader: ActionFlag.CHGHDRS,
    codec.ChangeSender: ActionFlag.CHGFROM,
    codec.AddRecipient: ActionFlag.ADDRCPT,
    codec.AddRecipientWithArguments: ActionFlag.ADDRCPT_PAR,
    codec.DeleteRecipient: ActionFlag.DELRCPT,
    codec.ReplaceBody: ActionFlag.CHGBODY,
    codec.Quarantine: ActionFlag.QUARANTINE,
}

# What a milter may answer an UNKNOWN with and still take the QUIT_NC after it.
_UNKNOWN_ANSWERS = (
    codec.Continue,
    codec.Accept,
    codec.Reject,
    codec.TempFail,
    codec.ReplyCode,
    codec.Discard,
    codec.Skip,
)
_CONNECTION_STAGES = (Stage.CONNECT, Stage.HELO)
_CONTENT_STAGES = (Stage.HEADER, Stage.END_OF_HEADERS, Stage.BODY)
_PIPELINED_STAGES = (*_CONTENT_STAGES, Stage.END_OF_MESSAGE)


class MilterProtocol:
    """The MTA side of one milter conversation; see the module's theory of operation."""

    def __init__(self, *, max_packet: int = codec.MAX_PACKET) -> None:
        self._reader = codec.response_reader(max_packet=max_packet)
        self.state = State.NEW
        self.negotiated: Negotiated | None = None
        self._sticky: Verdict = CONTINUE
        self._stage: Stage | None = None
        # Stages begun pipelined behind _stage, awaiting their answers in order.
        self._queued: collections.deque[Stage] = collections.deque()
        self.desynchronised = False
        self._skipping: Stage | None = None
        self._in_transaction = False
        self._message_done = False  # ACCEPT or DISCARD for this transaction
        self._modifications: list[codec.Modification] = []
        self._quarantine: str | None = None
        self._body_replaced = False
        self._body_closed = False
        # The last thing the milter was sent is an end of message it answered
        # CONTINUE: the one point where libmilter takes QUIT_NC at once (its
        # engine.c allows ST_Q_NC only after ST_ENDM or ST_UNKN; after a
        # refusal or an ACCEPT it would ignore QUIT_NC and the CONNECT after
        # it, unless an UNKNOWN comes first: see quit_new_connection).
        self._clean_end = False
        # Answers still due to the UNKNOWN that ended the connection's last
        # conversation (see quit_new_connection); read and dropped first.
        self.owed = 0

    # -- negotiation

    def negotiate(self) -> bytes:
        if self.state is not State.NEW:
            raise RuntimeError(f"negotiate() in state {self.state}")
        self.state = State.NEGOTIATING
        return codec.encode(
            codec.Negotiate(version=codec.VERSION, actions=MTA_ACTIONS, protocol=MTA_PROTOCOL)
        )

    def resume(self, negotiated: Negotiated, *, owed: int = 0) -> None:
        """Go on over a connection kept with QUIT_NC: negotiated already, no OPTNEG.

        ``owed``: the answers the last conversation left due (its
        :attr:`owed`), dropped before this conversation's first.
        """
        if self.state is not State.NEW:
            raise RuntimeError(f"resume() in state {self.state}")
        self.negotiated = negotiated
        self.state = State.READY
        self.owed = owed

    @property
    def reusable(self) -> bool:
        """Whether QUIT_NC may end this conversation and keep its connection.

        SMFIC_QUIT_NC came with protocol version 6.  libmilter (engine.c,
        its next_states table) takes it in two states only: right after an
        end of message it answered CONTINUE (ST_ENDM), and right after an
        UNKNOWN command (ST_UNKN); anywhere else it ignores QUIT_NC and then
        the next CONNECT too.  UNKNOWN itself is legal from every state
        outside a transaction's content, the state an ACCEPT, a refusal or
        an ABORT leaves (ST_HELO) included.  So a conversation is reusable
        after a clean end of message, or, out of a transaction, when the
        milter asked not to be told of unknown commands (SMFIP_NOUNKNOWN:
        for libmilter, it has no callback for them, and libmilter answers
        the UNKNOWN with CONTINUE itself, st_unknown), so that the UNKNOWN
        that makes QUIT_NC legal reaches none of the milter's own code.
        """
        negotiated = self.negotiated
        if (
            negotiated is None
            or negotiated.version < 6
            or self.state is not State.READY
            or self._in_transaction
        ):
            return False
        return self._clean_end or not negotiated.plan[Stage.UNKNOWN].sends

    def quit_new_connection(self) -> bytes:
        """QUIT_NC: this SMTP session is over, the milter's connection goes on.

        Unless the conversation ended cleanly, UNKNOWN goes first (see
        :attr:`reusable`); its answer, unless the milter negotiated
        SMFIP_NR_UNKN, is then :attr:`owed`, to pass to :meth:`resume` of
        the next conversation on the connection.
        """
        if not self.reusable:
            raise RuntimeError("quit_new_connection() when the connection cannot be reused")
        negotiated = self.negotiated
        assert negotiated is not None
        data = b""
        if not self._clean_end:
            data = codec.encode(codec.Unknown(line="QUIT"))
            self.owed += not negotiated.protocol & ProtocolFlag.NR_UNKN
        self.state = State.CLOSED
        return data + codec.encode(codec.QuitNewConnection())

    # -- input

    def receive_data(self, data: bytes) -> None:
        """Octets from the milter; ``b""`` at end of file."""
        self._reader.receive_data(data)

    def next_event(self) -> Negotiated | Verdict | Progress | codec.Signal:
        """The negotiation's result, a stage's verdict, PROGRESS or NEED_DATA.

        A milter that closes the connection while an answer is awaited is a
        protocol error (:class:`~.codec.TruncatedPacket`), not CLOSED.
        """
        while True:
            response = self._reader.next_event()
            if response is codec.CLOSED:
                raise codec.TruncatedPacket("the milter closed the connection")
            if response is codec.NEED_DATA:
                return codec.NEED_DATA
            assert not isinstance(response, codec.Signal)
            if self.owed:
                self._drop_owed(response)
                continue
            if self.state is State.NEGOTIATING:
                return self._negotiated(response)
            if self.state is not State.WAITING:
                raise UnexpectedResponse(f"{type(response).__name__} when no answer was awaited")
            if isinstance(response, codec.Progress):
                return PROGRESS
            verdict = self._answer(response)
            if verdict is not None:
                return verdict

    def _drop_owed(self, response: codec.Response) -> None:
        """An answer to the UNKNOWN that came before QUIT_NC: whatever it says, it is past."""
        if isinstance(response, codec.Progress):
            return
        if not isinstance(response, _UNKNOWN_ANSWERS):
            # SHUTDOWN, or a modification: not a connection to go on with.
            raise UnexpectedResponse(f"{type(response).__name__} as the answer to UNKNOWN")
        self.owed -= 1

    def _negotiated(self, response: codec.Response) -> Negotiated:
        if not isinstance(response, codec.Negotiate):
            raise UnexpectedResponse(f"{type(response).__name__} instead of the OPTNEG answer")
        self.negotiated = Negotiated.from_reply(response)
        self.state = State.READY
        return self.negotiated

    # -- stages

    def begin(
        self, command: codec.Command, macros: Mapping[str, str] = {}, *, pipelined: bool = False
    ) -> Step:
        """Start a stage: the octets to write, and the verdict if none is to be awaited.

        ``pipelined``: a content stage may begin while earlier ones await
        their answers (see the module's theory of operation).
        """
        stage = _COMMAND_STAGE[type(command)]
        if self.state is State.WAITING and not (pipelined and stage in _PIPELINED_STAGES):
            raise RuntimeError(f"begin({stage}) while an answer to {self._stage} is awaited")
        if self.state in (State.ACCEPTED, State.REFUSED, State.FAILED, State.CLOSED):
            return Step(b"", self._sticky)
        negotiated = self.negotiated
        if negotiated is None:
            raise RuntimeError(f"begin({stage}) before negotiation")
        if stage is Stage.MAIL:
            self._start_transaction()
        if self._skipping is not None and stage is not self._skipping:
            self._skipping = None
        if self._message_done and stage not in (*_CONNECTION_STAGES, Stage.UNKNOWN):
            if stage is Stage.END_OF_MESSAGE:
                self._end_transaction()
            return Step(b"", CONTINUE)
        if stage is self._skipping:
            return Step(b"", CONTINUE)
        if stage is Stage.UNKNOWN and negotiated.version < 3:
            return Step(b"", CONTINUE)
        if stage is Stage.DATA and negotiated.version < 4:
            return Step(b"", CONTINUE)
        if stage is Stage.END_OF_MESSAGE:
            self._modifications = []
            self._quarantine = None
            self._body_replaced = self._body_closed = False
        if isinstance(command, codec.Header):
            command = codec.Header(
                name=command.name,
                value=milter_header_value(command.value, leading_space=negotiated.leading_space),
            )
        plan = negotiated.plan[stage]
        if not plan.sends and stage in _CONTENT_STAGES:
            # Postfix does not even look at the content a milter declined,
            # so sends no macros for it either.
            return Step(b"", CONTINUE)
        data = self._macros(plan, macros)
        if not plan.sends:
            return Step(data, CONTINUE)
        data += codec.encode(command)
        self._clean_end = False
        if not plan.expects_reply:
            return Step(data, CONTINUE)
        if self.state is State.WAITING:
            self._queued.append(stage)
        else:
            self._stage = stage
            self.state = State.WAITING
        return Step(data, None)

    def _macros(self, plan: StagePlan, values: Mapping[str, str]) -> bytes:
        if not values or not plan.macro_keys:
            return b""
        pairs = []
        for wire, bare in plan.macro_keys:
            value = values.get(wire)
            if value is None:
                value = values.get(bare)
                if value is None:
                    continue
            pairs.append((wire, value))
        if not pairs:
            return b""
        return codec.encode(codec.DefineMacros(for_code=plan.code, macros=tuple(pairs)))

    def abort(self) -> bytes:
        """ABORT, when a transaction is open: RSET, a refused or failed transaction."""
        if self.state is not State.READY or not self._in_transaction:
            self._in_transaction = self._message_done = False
            return b""
        self._end_transaction()
        self._clean_end = False
        return codec.encode(codec.Abort())

    def quit(self) -> bytes:
        """QUIT (nothing if the connection is already given up); the driver then closes."""
        if not self.usable:
            return b""
        was, self.state = self.state, State.CLOSED
        return codec.encode(codec.Quit()) if was is State.READY else b""

    def fail(self, verdict: Verdict) -> None:
        """The conversation is broken: ``verdict`` answers every later stage."""
        self.state = State.FAILED
        self._sticky = verdict
        self._queued.clear()

    @property
    def usable(self) -> bool:
        """Whether the connection is still wanted (False: the driver closes it)."""
        return self.state in (State.NEW, State.NEGOTIATING, State.READY, State.WAITING)

    @property
    def failed(self) -> bool:
        return self.state is State.FAILED

    @property
    def wants_body(self) -> bool:
        """Whether body chunks would go to the milter now (not skipped, declined or done)."""
        return (
            self.state is State.READY
            and self.negotiated is not None
            and self.negotiated.plan[Stage.BODY].sends
            and not self._message_done
            and self._skipping is not Stage.BODY
        )

    def _start_transaction(self) -> None:
        self._in_transaction = True
        self._message_done = False

    def _end_transaction(self) -> None:
        self._in_transaction = False
        self._message_done = False

    # -- answers

    def _answer(self, response: codec.Response) -> Verdict | None:
        stage = self._stage
        assert stage is not None and self.negotiated is not None
        at_connection = stage in _CONNECTION_STAGES
        match response:
            case codec.Continue():
                return self._finish(CONTINUE)
            case codec.Skip():
                self._skipping = stage
                return self._finish(CONTINUE)
            case codec.Accept():
                if at_connection:
                    self._sticky = CONTINUE
                    return self._finish(ACCEPT, State.ACCEPTED)
                self._message_done = True
                return self._finish(ACCEPT)
            case codec.Discard():
                if at_connection:
                    raise UnexpectedResponse(f"DISCARD is not allowed at {stage.value}")
                self._message_done = True
                return self._finish(Verdict(action=Action.DISCARD))
            case codec.Reject():
                return self._refuse(Verdict(action=Action.REJECT, reply=REJECTED), at_connection)
            case codec.TempFail():
                verdict = Verdict(action=Action.TEMPFAIL, reply=TEMPORARILY_REFUSED)
                return self._refuse(verdict, at_connection)
            case codec.ReplyCode(text=text):
                reply = reply_from_text(text)
                action = Action.REJECT if reply.code >= 500 else Action.TEMPFAIL
                return self._refuse(Verdict(action=action, reply=reply), at_connection)
            case codec.Shutdown() | codec.ConnectionFail():
                verdict = Verdict(action=Action.SHUTDOWN, reply=SHUTTING_DOWN)
                self._sticky = verdict
                return self._finish(verdict, State.REFUSED)
        if stage is not Stage.END_OF_MESSAGE or isinstance(
            response, codec.Negotiate | codec.Progress
        ):
            raise UnexpectedResponse(f"{type(response).__name__} at {stage.value}")
        self._modify(response)
        return None

    def _modify(self, change: codec.Modification) -> None:
        assert self.negotiated is not None
        needed = _MODIFICATION_ACTION[type(change)]
        if not self.negotiated.actions & needed:
            raise UnexpectedResponse(f"{type(change).__name__} without {needed!r} negotiated")
        if isinstance(change, codec.ReplaceBody):
            # milter8.c: body pieces cannot be interleaved with other requests.
            if self._body_closed:
                raise UnexpectedResponse("REPLBODY pieces interleaved with other changes")
            self._body_replaced = True
        elif self._body_replaced:
            self._body_closed = True
        if isinstance(change, codec.ChangeHeader | codec.InsertHeader | codec.AddHeader) and (
            not change.name or ":" in change.name
        ):
            raise UnexpectedResponse(f"header change with a bad name {change.name!r}")
        if isinstance(change, codec.ChangeHeader):
            if change.value:
                value = message_header_value(
                    change.value, leading_space=self.negotiated.leading_space
                )
                change = codec.ChangeHeader(index=change.index, name=change.name, value=value)
        elif isinstance(change, codec.InsertHeader):
            value = message_header_value(change.value, leading_space=self.negotiated.leading_space)
            change = codec.InsertHeader(index=change.index, name=change.name, value=value)
        elif isinstance(change, codec.AddHeader):
            value = message_header_value(change.value, leading_space=self.negotiated.leading_space)
            change = codec.AddHeader(name=change.name, value=value)
        elif isinstance(change, codec.Quarantine):
            self._quarantine = change.reason
        self._modifications.append(change)

    def _refuse(self, verdict: Verdict, at_connection: bool) -> Verdict:
        if at_connection:
            self._sticky = verdict
            return self._finish(verdict, State.REFUSED)
        return self._finish(verdict)

    def _finish(self, verdict: Verdict, state: State = State.READY) -> Verdict:
        stage = self._stage
        self.state = state
        self._stage = None
        if stage is Stage.END_OF_MESSAGE:
            self._end_transaction()
            self._clean_end = state is State.READY and verdict.action is Action.CONTINUE
            verdict = Verdict(
                action=verdict.action,
                reply=verdict.reply,
                modifications=tuple(self._modifications),
                quarantine=self._quarantine,
            )
            self._modifications = []
        if self._queued:
            if state is State.READY and verdict.action is Action.CONTINUE:
                self._stage = self._queued.popleft()
                self.state = State.WAITING
            else:
                self._queued.clear()
                self._in_transaction = self._message_done = False
                self.desynchronised = True
                self.state = State.CLOSED
        return verdict
