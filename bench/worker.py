"""Run one workload of one system in this fresh process and write its figures as JSON.

    python bench/worker.py ENV_JSON SYSTEM WORKLOAD PARAMS_JSON OUT_JSON

Started by bench.py (the orchestrator), which bounds it in time and kills what it leaves.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
import traceback
from pathlib import Path


def main() -> int:
    env_path, system, workload, params, out_path = sys.argv[1:6]
    import tasks
    from harness import Env

    tasks.by_value()
    env = Env.load(env_path)
    p = json.loads(params)
    p["system"] = system
    module, _, func = p.pop("function").partition(":")
    fn = getattr(importlib.import_module(module), func)
    t0 = time.perf_counter()
    try:
        figures = fn(env, p)
    except BaseException as exc:  # noqa: BLE001 - the reason goes into the results table
        traceback.print_exc()
        lines = [ln.strip() for ln in f"{type(exc).__name__}: {exc}".splitlines() if ln.strip()]
        reason = " / ".join(lines)[:400]
        Path(out_path).write_text(json.dumps({"ok": False, "reason": reason}))
        return 1
    figures["worker_s"] = time.perf_counter() - t0
    Path(out_path).write_text(json.dumps({"ok": True, "figures": figures}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
