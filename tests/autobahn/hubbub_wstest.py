# -*- coding: utf-8 -*-
"""wstest for a chat endpoint: the Autobahn testsuite, run against hubbub's real /ws.

Run it with the Python of the virtualenv that tests/autobahn/setup.sh made, with
wstest's own arguments:

    <venv>/bin/python tests/autobahn/hubbub_wstest.py -m fuzzingclient -s spec.json

The fuzzing cases expect an echo server; /ws is a chat endpoint: it greets with a
`welcome`, answers each protocol message (one per non-blank line of a text frame, one
per binary frame) with an `ok` or an `error`, and pings now and then. Everything that
happens at the WebSocket level (framing, fragmentation, control frames, close codes,
UTF-8 checks, who closes and how) is judged by wstest unchanged. Only the application
level is translated, in one place (the comparison of events):

- the `welcome` and the server's own heartbeat pings are left out of the events;
- each answer of the server (a JSON frame of type `error` or `ok`) stands for one
  answered protocol message, and an expected echo of a message stands for as many
  answers as the message holds protocol messages (blank lines are none).

So an "echo" case passes when the server received each message whole, answered it
and kept the connection; what the payload said is not compared (there is no echo).
"""

import json
import sys

from autobahntestsuite import wstest
from autobahntestsuite.case.case import Case

# One answered protocol message, as wstest's reports can show it.
ANSWER = ("message", "<answered by hubbub>", False)


def _is_blank(line):
    # hubbub skips lines that are empty once whitespace is trimmed.
    try:
        return line.decode("utf-8").strip() == u""
    except (UnicodeDecodeError, AttributeError):
        return line.strip() == ""


def _answers(payload, binary):
    """How many answers a data message gets from hubbub."""
    if binary:
        return 1
    return sum(1 for line in payload.split("\n") if not _is_blank(line.rstrip("\r")))


def _frame_type(msg, binary):
    if binary:
        return None
    try:
        frame = json.loads(msg)
    except ValueError:
        return None
    return frame.get("type") if isinstance(frame, dict) else None


def _translate(expected):
    out = []
    for event in expected:
        if event[0] == "message":
            out.extend([ANSWER] * _answers(event[1], event[2]))
        else:
            out.append(event)
    return out


_compare = Case.compare


def compare(self, received, expected):
    if received is self.received:
        expected = _translate(expected)
    return _compare(self, received, expected)


def on_message(self, msg, binary):
    kind = _frame_type(msg, binary)
    if kind == "welcome":
        return
    if kind in ("error", "ok"):
        self.received.append(ANSWER)
    else:
        # Anything else is compared as it is (and fails the case).
        self.received.append(("message", msg, binary))
    self.finishWhenDone()


def on_ping(self, payload):
    # The server's heartbeat; no case expects pings from the server.
    pass


Case.compare = compare
Case.onMessage = on_message
Case.onPing = on_ping

from autobahntestsuite import fuzzing  # noqa: E402

_on_open = fuzzing.FuzzingProtocol.onOpen


def on_open(self):
    _on_open(self)
    case = getattr(self, "runCase", None)
    if case is None:
        return
    # A case that expects only echoes of blank messages (which get no answer) is
    # complete once it has sent them.
    outcomes = list(case.expected.values())
    echoes = any(event[0] == "message" for e in outcomes for event in e)
    if echoes and all(_translate(e) == [] for e in outcomes):
        case.finishWhenDone()


fuzzing.FuzzingProtocol.onOpen = on_open

if __name__ == "__main__":
    sys.argv[0] = "wstest"
    wstest.run()
