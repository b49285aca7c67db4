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


def test_no_module_outside_the_core_imports_its_private_names():
    import ast
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    found = []
    for folder in ("adapters", "simulator", "bench", "examples"):
        for path in (root / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                        "compressed_comm")):
                    found += [f"{path.relative_to(root)}: {alias.name}" for alias in node.names
                              if alias.name.startswith("_")]
    assert found == []


def test_collectives_protocol_is_what_both_groups_offer():
    import inspect

    from compressed_comm import Collectives, CompressedGroup, RawGroup

    def after_self(fn):
        sig = inspect.signature(fn)
        return list(sig.parameters.values())[1:], sig.return_annotation

    members = [n for n, v in vars(Collectives).items()
               if inspect.isfunction(v) and not n.startswith("_")]
    assert {"all_gather_async", "ring_iter", "all_to_all", "all_reduce"} <= set(members)
    for group in (CompressedGroup, RawGroup):
        for name in members:
            assert after_self(getattr(group, name)) == after_self(getattr(Collectives, name)), name


def test_hook_installers_import_no_handle():
    code = ("import sys, adapters.hooks; "
            "print(sorted(m for m in sys.modules if m.startswith('adapters.xdit')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
