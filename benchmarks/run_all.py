"""Run every benchmark script in this folder, one after another (``make bench``)."""

import pathlib
import subprocess
import sys

here = pathlib.Path(__file__).parent
failed = []
# gpu_check.py is the one-lease GPU programme with its own target (`make gpu-check`); the others
# are modules that the scripts import (the shared helpers, the TRL task, the workloads), not
# benchmarks.
MODULES = ("run_all.py", "gpu_check.py", "harness.py", "trl_task.py", "workload_suite.py")
for script in sorted(here.glob("*.py")):
    if script.name in MODULES:
        continue
    print(f"\n===== {script.name} =====", flush=True)
    if subprocess.run([sys.executable, str(script), *sys.argv[1:]]).returncode != 0:
        failed.append(script.name)
if failed:
    sys.exit(f"benchmarks failed: {', '.join(failed)}")
