"""Run many CLI command lines in one process (imports paid once) and report what each did, as JSON on stdout.

Used by test_hostile_inputs: ``python hostile_worker.py cases.json``. A command that raises anything instead of
returning an exit code is recorded with its traceback; the process's peak resident memory is reported last.
"""

from __future__ import annotations

import contextlib
import io
import json
import resource
import sys
import traceback
import warnings

from hashdistill.app.cli import main


def run_case(argv: list[str]) -> dict:
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            code = main(argv)
        return {"code": code, "stderr": stderr.getvalue(), "traceback": None}
    except BaseException:  # noqa: BLE001 - the point is to see anything escape
        return {"code": None, "stderr": stderr.getvalue(), "traceback": traceback.format_exc()[-2000:]}


def main_worker(cases_path: str) -> None:
    with open(cases_path) as fh:
        cases = json.load(fh)
    results = [run_case(argv) for argv in cases]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    json.dump({"results": results, "peak_rss_mb": peak}, sys.stdout)


if __name__ == "__main__":
    main_worker(sys.argv[1])
