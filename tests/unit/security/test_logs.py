"""Exception tracebacks in logs never carry the frames' local variables (which may hold tokens)."""

import io
import json
import sys

from deltazip.logs import configure_logging, get_logger


def test_logged_tracebacks_leave_out_local_variables(capsys):
    configure_logging("info", service="test")
    secret = "dz_super-secret-token-value"

    def fail(token: str) -> None:
        raise RuntimeError("boom")

    try:
        fail(secret)
    except RuntimeError:
        get_logger("test").exception("it_failed")
    line = capsys.readouterr().err.strip().splitlines()[-1]
    event = json.loads(line)
    assert event["event"] == "it_failed" and "boom" in line and "exception" in event
    assert secret not in line


def test_lines_go_to_the_stderr_of_the_moment(monkeypatch):
    """The stream is looked up per line, not bound at configure time: after stderr is replaced (a test capture
    that closes, a service that redirects it), lines go to the new one and never to a closed stream."""
    configure_logging("info", service="test")
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    get_logger("test").info("to_first")
    assert json.loads(first.getvalue().strip())["event"] == "to_first"
    first.close()
    monkeypatch.setattr(sys, "stderr", second)
    get_logger("test").info("to_second")
    assert json.loads(second.getvalue().strip())["event"] == "to_second"


def test_each_line_is_one_write(monkeypatch):
    """Processes writing one log file must not interleave inside a line: message and newline go in one write."""
    writes = []

    class Recorder(io.StringIO):
        def write(self, text: str) -> int:
            writes.append(text)
            return super().write(text)

    monkeypatch.setattr(sys, "stderr", Recorder())
    configure_logging("info", service="test")
    get_logger("test").info("one_line", n=1)
    get_logger("test").info("another_line", n=2)
    assert len(writes) == 2 and all(w.endswith("\n") and w.count("\n") == 1 for w in writes)
    assert [json.loads(w)["event"] for w in writes] == ["one_line", "another_line"]
