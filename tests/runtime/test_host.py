"""Process settings of the fast runtimes, and the CLI's import cost."""
import gc
import subprocess
import sys

from atoll.runtime.host import freeze_heap


def test_freeze_heap_moves_start_up_objects_out_of_the_collector_once():
    keep = [[i] for i in range(1000)]  # objects alive "at start-up"
    first = freeze_heap()
    frozen = gc.get_freeze_count()
    assert frozen >= len(keep) and "frozen" in first
    assert freeze_heap() == first and gc.get_freeze_count() == frozen  # once per process


def test_cli_and_privacy_package_do_not_import_the_accountant():
    code = ("import sys, atoll.cli, atoll.privacy, atoll.privacy.cli; "
            "print(any(m.startswith(('dp_accounting', 'scipy')) for m in sys.modules)); "
            "from atoll.privacy import Accountant, KINDS; print(Accountant.__name__, KINDS)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["False", "Accountant ('pld', 'rdp', 'rdp_classic')"]
