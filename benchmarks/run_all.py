"""Run every benchmark script in this folder, one after the other."""

import runpy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    for script in sorted(HERE.glob("[a-z]*.py")):
        if script.name == "run_all.py":
            continue
        print(f"\n===== {script.name} =====", flush=True)
        runpy.run_path(str(script), run_name="__main__")
