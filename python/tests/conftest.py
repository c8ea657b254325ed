import sys


def pytest_terminal_summary(terminalreporter):
    parity = sys.modules.get("test_reference_parity")
    if parity is not None and (parity.STATS["compared"] or parity.STATS["tie_redraws"]):
        s = parity.STATS
        terminalreporter.write_line(
            f"reference parity: {s['compared']} random configurations compared (float64), "
            f"{s['tie_redraws']} draws redrawn for ties in the reference's top-k, "
            f"largest difference {s['worst']:.2e} (tolerance {parity.TOL:.0e})")
