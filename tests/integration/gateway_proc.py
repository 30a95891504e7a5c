"""Start `python -m services.gateway` as a real process for tests (HTTP: waited on via GET /health)."""

import json
import os
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from deltazip.rpc.ports import free_port
from deltazip.stack import REPO_ROOT, Proc

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def add_chat_template(base_dir: Path) -> None:
    """Give the tiny base a chat template (tokenizer_config.json), as real instruct models have."""
    path = base_dir / "tokenizer_config.json"
    cfg = json.loads(path.read_text()) if path.exists() else {}
    cfg["chat_template"] = CHAT_TEMPLATE
    path.write_text(json.dumps(cfg))


def start_gateway(scheduler: str, log_dir: Path, *args: str, timeout_s: float = 20.0, https_ca: str = "") -> Proc:
    """The gateway on a free loopback port, in front of `scheduler`; raises with its log if it does not come up.

    With `https_ca` the gateway serves HTTPS (pass --https-cert/--https-key in `args`) and is probed over it.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = log_dir / f"gateway-{port}.log"
    cmd = [sys.executable, "-m", "services.gateway", "--host", "127.0.0.1", "--port", str(port), "--scheduler", scheduler, *args]
    with open(log_path, "wb") as log_file:
        popen = subprocess.Popen(cmd, cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                                 stdout=log_file, stderr=subprocess.STDOUT)
    proc = Proc("gateway", popen, f"127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and popen.poll() is None:
        try:
            scheme, context = ("https", ssl.create_default_context(cafile=https_ca)) if https_ca else ("http", None)
            with urllib.request.urlopen(f"{scheme}://{proc.address}/health", timeout=1, context=context) as reply:
                if reply.status == 200:
                    return proc
        except OSError:
            time.sleep(0.1)
    popen.kill()
    raise RuntimeError(f"gateway did not start; its log:\n{proc.log_tail()}")
