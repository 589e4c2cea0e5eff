"""Run oracle scripts in forks of one process that has imported the reference library once.

Started by tests/oracle.py with an oracle environment's interpreter as ``python tests/oracles/serve.py MODULE...``:
imports the MODULEs (``fairseq`` takes seconds to import, and every test module asks for an oracle run), then reads
one JSON request per line on stdin, ``{"argv": [SCRIPT, OUT_DIR, JSON_PARAMS], "log": PATH}``, and for each forks a
child that runs SCRIPT as ``__main__`` with that ``sys.argv``, exactly as ``python SCRIPT OUT_DIR JSON_PARAMS`` would
(its directory first on ``sys.path``), its stdout and stderr going to PATH. It answers ``{"returncode": N}`` on
stdout when the child is done, and exits at the end of stdin. Children run one at a time and share nothing but the
imported modules: what one script does cannot change the next one.
"""

from __future__ import annotations

import importlib
import json
import os
import runpy
import sys
import traceback


def _child(argv: list[str], log: str) -> None:
    """In the forked child: run the script, and leave with its exit status (never return)."""
    code = 1
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        sys.stdout = os.fdopen(1, "w", buffering=1)
        sys.stderr = os.fdopen(2, "w", buffering=1)
        sys.stdin.close()
        sys.argv = list(argv)
        sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
        try:
            runpy.run_path(argv[0], run_name="__main__")
            code = 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:  # sys.exit("message")
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def main() -> None:
    for module in sys.argv[1:]:
        importlib.import_module(module)
    replies = sys.stdout
    sys.stdout = sys.stderr  # nothing but replies on the channel
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request["argv"], request["log"])
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")
        replies.flush()


if __name__ == "__main__":
    main()
