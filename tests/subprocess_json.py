"""Run a test's script in a fresh Python (the caller's XLA_FLAGS dropped: the script forces its own
host device count before it imports JAX) and read the JSON it prints last."""
import json
import os
import subprocess
import sys


def run_json(script: str, *args: str, timeout: int = 600):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
