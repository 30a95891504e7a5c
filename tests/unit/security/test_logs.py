"""Exception tracebacks in logs never carry the frames' local variables (which may hold tokens)."""

import json

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
