"""docs/operations.md's configuration reference matches the services' Config dataclasses and flags."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_operations_doc_config_reference_is_up_to_date():
    done = subprocess.run([sys.executable, "scripts/gen_config_docs.py", "--check"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr + "\nrun: python scripts/gen_config_docs.py"
