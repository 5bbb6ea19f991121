"""How long `fedge check` takes to refuse a bad config (issue 18: "non-zero in under 2 s").

Printed as one JSON object on stdout. `--repeats` times each of

- `fedge_check_s`: `python -m fedge.cli check <repo> --run-config "lr='fast'"`, a fresh
  interpreter each time, as a user or CI runs it (exit status recorded);
- `bare_python_s`: `python -c pass`, the interpreter's own start-up on this machine,

and, in one fresh interpreter, `import_ms` (importing fedge.check) and `check_ms` (one
`check_run_config`). Wall times on a shared machine vary with its load (recorded).

Usage: `python benchmarks/check.py [--repeats 10] [--out result.json]`
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from report import finish, parse_with_common_options, start

REPO = Path(__file__).resolve().parents[1]
BAD = "lr='fast'"
INNER = f"""
import json, sys, time
begin = time.perf_counter()
from pathlib import Path
from fedge.check import check_run_config
from fedge.config import ConfigError
imported = time.perf_counter()
try:
    check_run_config(Path(sys.argv[1]), [{BAD!r}])
except ConfigError:
    pass
checked = time.perf_counter()
print(json.dumps({{"import_ms": round(1000 * (imported - begin), 1),
                  "check_ms": round(1000 * (checked - imported), 2)}}))
"""


def wall(argv: list[str]) -> tuple[float, int]:
    started = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, check=False, cwd=REPO)
    return time.perf_counter() - started, result.returncode


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parse_with_common_options(parser, argv)
    report, started = start("check", "flwr")
    check_argv = [sys.executable, "-m", "fedge.cli", "check", str(REPO), "--run-config", BAD]
    checks = [wall(check_argv) for _ in range(args.repeats)]
    bare = [wall([sys.executable, "-c", "pass"])[0] for _ in range(args.repeats)]

    inner = json.loads(
        subprocess.run(
            [sys.executable, "-c", INNER, str(REPO)], capture_output=True, text=True, check=True
        ).stdout
    )
    report.update(
        repeats=args.repeats,
        exit_statuses=sorted({code for _, code in checks}),
        fedge_check_s={
            "median": round(statistics.median(s for s, _ in checks), 3),
            "max": round(max(s for s, _ in checks), 3),
        },
        bare_python_s={"median": round(statistics.median(bare), 3), "max": round(max(bare), 3)},
        **inner,
    )
    finish(report, started, args.out)


if __name__ == "__main__":
    main()
