"""Quiet command-line output: our own progress and results, not TensorFlow's C++ chatter.

TensorFlow's native logging writes straight to file descriptor 2, before and regardless
of `TF_CPP_MIN_LOG_LEVEL` in this version: start-up notes ("oneDNN custom operations are
on", "Could not find cuda drivers") and graph-optimiser lines such as
"E0000 ... tfg_optimizer ... failed: INVALID_ARGUMENT ... has an empty op name", which
read as errors to a new user and are harmless. The command-line entry points route
descriptor 2 through a filter that drops exactly those native log lines and passes
everything else (Python's own stderr, tracebacks) through unchanged.
`TF_CPP_MIN_LOG_LEVEL=0` (any value but the default 3) turns the filter off.
"""

import atexit
import os
import re
import sys
import threading

# absl's prefix: severity I/W/E, MMDD, time, thread id, file:line]
NATIVE_LOG = re.compile(
    rb"^(WARNING: All log messages before absl::InitializeLog\(\) is called"
    rb"|[IWE]\d{4} [\d:.]+ +\d+ [\w./-]+:\d+\] )"
)


def quiet_native_logs() -> None:
    """Filter TensorFlow's native log lines out of this process's stderr (call before
    TensorFlow is imported). Once per process; child processes inherit the filter."""
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3") != "3" or getattr(quiet_native_logs, "on", 0):
        return
    quiet_native_logs.on = 1
    sys.stderr.flush()
    original = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def forward() -> None:
        with os.fdopen(read_end, "rb") as lines, os.fdopen(original, "wb", buffering=0) as out:
            for line in lines:
                if not NATIVE_LOG.match(line):
                    out.write(line)

    thread = threading.Thread(target=forward, name="stderr-filter", daemon=True)
    thread.start()

    def drain() -> None:
        sys.stderr.flush()
        os.dup2(os.dup(original), 2)  # close the pipe's last writer: the thread reaches EOF
        thread.join(timeout=5)

    atexit.register(drain)
