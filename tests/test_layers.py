"""Architecture: the core imports no adapter, simulator or optional heavy dependency."""

import subprocess
import sys

CHECK = """
import sys
import compressed_comm
import compressed_comm.kernels, compressed_comm.codecs, compressed_comm.session
bad = sorted(m for m in sys.modules
             if m.split('.')[0] in {'adapters', 'simulator', 'diffusers', 'xfuser', 'yunchang', 'cupy'})
print(','.join(bad))
"""


def test_core_imports_only_core_dependencies():
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


def test_adapters_import_without_optional_dependencies():
    code = "import adapters, sys; print(any(m.startswith(('diffusers', 'xfuser')) for m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
