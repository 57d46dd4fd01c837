"""The public surface stays honest: __all__ lists exactly the public names, each documented."""

from __future__ import annotations

import subprocess
import sys
from types import ModuleType

import pytest

import coordkit
import coordkit.testing


@pytest.mark.parametrize("module", [coordkit, coordkit.testing])
def test_all_lists_every_public_name_once(module: ModuleType) -> None:
    public = {
        name for name in vars(module) if not name.startswith("_") and not isinstance(vars(module)[name], ModuleType)
    }
    public -= {"annotations"}
    assert isinstance(module.__all__, tuple)
    assert len(set(module.__all__)) == len(module.__all__)
    assert set(module.__all__) - {"__version__"} == public
    for name in module.__all__:
        if name != "__version__" and name.isidentifier() and not name.isupper():
            assert getattr(module, name).__doc__, f"{name} has no docstring"


def test_import_needs_no_etcd_extra() -> None:
    """import coordkit and MemoryBackend work without aiohttp/etcd3; EtcdBackend then names the extra."""
    code = (
        "import sys; sys.modules['aiohttp'] = None; sys.modules['etcd3'] = None\n"
        "import coordkit\n"
        "assert 'aiohttp' not in sys.modules or sys.modules['aiohttp'] is None\n"
        "coordkit.MemoryBackend()\n"
        "try:\n"
        "    coordkit.EtcdBackend('http://127.0.0.1:1')\n"
        "except ImportError as exc:\n"
        '    assert "coordkit[etcd]" in str(exc), exc\n'
        "else:\n"
        "    raise SystemExit('EtcdBackend must fail without the etcd extra')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
