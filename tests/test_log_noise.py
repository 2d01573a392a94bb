"""Failure reports carry captured log records from WARNING up only (log_level in pyproject.toml): torch's DEBUG
tracing (the torch.__trace logger) stays out of them, a real warning stays in."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_debug_tracing_stays_out_of_failure_reports(tmp_path):
    (tmp_path / "test_noisy.py").write_text(
        "import logging\n"
        "def test_fails():\n"
        "    trace = logging.getLogger('torch.__trace')\n"
        "    trace.setLevel(logging.DEBUG)\n"
        "    trace.debug('%s-%s', 'TRACE', 'NOISE')\n"  # the joined text appears only if the record is shown
        "    logging.getLogger('fusedres').info('%s-%s', 'INFO', 'LINE')\n"
        "    logging.getLogger('fusedres').warning('%s-%s', 'WARNING', 'LINE')\n"
        "    assert False\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"), "--rootdir",
                           str(tmp_path), "-p", "no:cacheprovider", str(tmp_path / "test_noisy.py")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout
    assert "WARNING-LINE" in proc.stdout and "Captured log call" in proc.stdout
    assert "TRACE-NOISE" not in proc.stdout and "INFO-LINE" not in proc.stdout
