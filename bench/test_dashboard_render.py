"""What one frame of the live --dashboard costs (docs/behaviour.md §5.4): the view is
drawn four times a second on the broker's own thread, so its drawing time is time
the broker does not spend on events.

A frame here is mbroker.render_dashboard of a busy snapshot (a connected source,
counters, 100 client rows) printed in colour to an in-memory rich Console of a
132x60 terminal. The snapshot is made by hand (tests.harness.busy_snapshot), so
the frame is the same every round. The median milliseconds per frame go into
extra_info; the benchmark measures and asserts only that the frame was drawn and
fits the terminal.
"""

from __future__ import annotations

import re

import pytest

import mbroker
from tests.harness import busy_snapshot, dashboard_console

pytest.importorskip("rich")

WIDTH, HEIGHT = 132, 60
CLIENT_ROWS = 100


@pytest.mark.benchmark(group="dashboard")
def test_dashboard_frame_of_a_busy_broker(benchmark):
    snapshot = busy_snapshot(client_count=CLIENT_ROWS)
    console = dashboard_console(WIDTH, HEIGHT, color=True)
    screen = console.file

    def draw_frame() -> str:
        screen.seek(0)
        screen.truncate()
        console.print(mbroker.render_dashboard(snapshot, width=WIDTH, height=HEIGHT))
        return screen.getvalue()

    frame = benchmark(draw_frame)

    assert frame, "nothing was drawn"
    # The same frame without colour codes, to read it as the operator would.
    plain = dashboard_console(WIDTH, HEIGHT)
    plain.print(mbroker.render_dashboard(snapshot, width=WIDTH, height=HEIGHT))
    lines = plain.file.getvalue().splitlines()
    assert len(lines) <= HEIGHT and all(len(line) <= WIDTH for line in lines)
    assert any(f"of {CLIENT_ROWS} connections" in line for line in lines)
    assert sum(bool(re.match(r"10\d\d ", line)) for line in lines) > 10  # client rows
    benchmark.extra_info.update({"client_rows": CLIENT_ROWS, "terminal": f"{WIDTH}x{HEIGHT}"})
    if benchmark.stats is not None:  # None in the smoke run (--benchmark-disable)
        benchmark.extra_info["ms_per_frame"] = round(benchmark.stats.stats.median * 1000, 3)
