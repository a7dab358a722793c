"""The report every benchmark writes: tests/bench/results/<date>-<host>[-<name>].json,
opening with the date and the machine, and printed."""

import datetime
import json
import os
import platform
import socket


def header(cores):
    """The report's first keys: today's date and the machine the figures come from."""
    return {"date": datetime.date.today().isoformat(),
            "machine": f"{_host()} {platform.machine()}, {cores} cores, no GPU"}


def save(report, name=""):
    out = os.path.join(os.path.dirname(__file__), "results", f"{report['date']}-{_host()}{'-' + name if name else ''}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))


def _host():
    return socket.gethostname().split(".")[0]
