"""The public API as a type checker sees it.

``wiretun`` and ``wiretun.wireguard`` import their heavy names on first use (module ``__getattr__``);
type checkers see them through ``if TYPE_CHECKING:`` imports. These tests check that the two lists
agree, and run mypy --strict on small programs using the public API: the names are real types (not
``Any``), sessions, batches, headers and async iterators are typed, and a misspelt keyword is an error.
"""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import wiretun
import wiretun.wireguard

ROOT = Path(__file__).resolve().parents[2]


def _type_checking_imports(module: object) -> dict[str, str]:
    """{name: defining module} of the imports under ``if TYPE_CHECKING:`` in a package's __init__."""
    source = Path(module.__file__).read_text()  # type: ignore[attr-defined]
    names: dict[str, str] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for stmt in node.body:
                assert isinstance(stmt, ast.ImportFrom) and stmt.level == 1, ast.dump(stmt)
                for alias in stmt.names:
                    names[alias.asname or alias.name] = str(stmt.module)
    return names


@pytest.mark.parametrize("package", [wiretun, wiretun.wireguard], ids=lambda p: p.__name__)
def test_lazy_names_are_the_type_checked_names(package: object) -> None:
    seen = _type_checking_imports(package)
    lazy = package._LAZY  # type: ignore[attr-defined]
    assert seen == lazy, "the TYPE_CHECKING imports and _LAZY must name the same objects"
    for name, module in lazy.items():
        defining = importlib.import_module(f"{package.__name__}.{module}")  # type: ignore[attr-defined]
        assert getattr(package, name) is getattr(defining, name)
    for name in package.__all__:  # type: ignore[attr-defined]
        assert getattr(package, name) is not None


def _mypy(tmp_path: Path, program: str) -> tuple[int, str]:
    pytest.importorskip("mypy")
    path = tmp_path / "client.py"
    path.write_text(textwrap.dedent(program))
    # Run from the repository so that pyproject's [tool.mypy] (strict, pyroute2 without stubs) applies.
    env = dict(os.environ, MYPYPATH=str(ROOT / "src"))
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "cache"), "--no-error-summary",
         "--hide-error-context", "--no-pretty", str(path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    return proc.returncode, proc.stdout + proc.stderr


def test_public_names_are_typed(tmp_path: Path) -> None:
    rc, out = _mypy(tmp_path, """
        import wiretun
        import wiretun.wireguard

        reveal_type(wiretun.Adapter.create)
        reveal_type(wiretun.Session)
        reveal_type(wiretun.get_running_driver_version)
        reveal_type(wiretun.delete_driver)
        reveal_type(wiretun.wireguard.Device)
        reveal_type(wiretun.wireguard.WireGuard)
        reveal_type(wiretun.wireguard.Peer)
        reveal_type(wiretun.wireguard.UAPIServer)
        reveal_type(wiretun.wireguard.UAPIError)
    """)
    assert rc == 0, out
    revealed = [line for line in out.splitlines() if "Revealed type is" in line]
    assert len(revealed) == 9, out
    for line in revealed:
        assert '"Any"' not in line, line
    assert "-> wiretun.adapter.Adapter" in revealed[0], revealed[0]
    assert "wiretun.session.Session" in revealed[1], revealed[1]
    assert "wiretun.wireguard.device.Device" in revealed[4], revealed[4]
    assert "wiretun.wireguard.core.WireGuard" in revealed[5], revealed[5]


def test_session_api_is_typed(tmp_path: Path) -> None:
    rc, out = _mypy(tmp_path, """
        import wiretun
        from wiretun.offload import VirtioNetHeader

        async def forward(adapter: wiretun.Adapter, other: wiretun.Session) -> None:
            with adapter.start_session(0x20000, offload=True) as session:
                reveal_type(session)
                headers: list[bytes] = []
                batch = session.receive_packets(64, headers=headers)
                reveal_type(batch)
                other.send_packets(batch, headers=headers)
                other.send_packets(batch, headers=[VirtioNetHeader(), None])
                reveal_type(session.packets())
                async for packet in session.packets():
                    reveal_type(packet)
                    await other.send(packet, session.packet_header(packet))
                    session.release_receive_packet(packet)
    """)
    assert rc == 0, out
    revealed = [line.split("Revealed type is ", 1)[1].replace("builtins.", "")
                for line in out.splitlines() if "Revealed type is" in line]
    assert revealed == [
        '"wiretun.session.Session"',
        '"list[memoryview[int]]"',
        '"typing.AsyncIterator[memoryview[int]]"',
        '"memoryview[int]"',
    ], out


def test_misuse_is_a_type_error(tmp_path: Path) -> None:
    rc, out = _mypy(tmp_path, """
        import wiretun
        import wiretun.wireguard

        def use(adapter: wiretun.Adapter, session: wiretun.Session) -> None:
            wiretun.Adapter.create("wt0", "wiretun", persistant=True)
            adapter.start_session(0x20000, multiqueue=True)
            adapter.start_session(0x20000, True)
            session.send_packet(session.allocate_send_packet(20), header=10)
            wiretun.wireguard.Device(adapter, capacity="big")
            counters = wiretun.wireguard.WireGuard().stats
            counters.rx_bad_tagg += 1
    """)
    assert rc == 1, out
    assert 'Unexpected keyword argument "persistant"' in out, out
    assert 'Unexpected keyword argument "multiqueue" for "start_session"' in out, out
    assert 'Too many positional arguments for "start_session"' in out, out
    assert 'Argument "header" to "send_packet" of "Session" has incompatible type "int"' in out, out
    assert 'Argument "capacity" to "Device" has incompatible type "str"' in out, out
    assert '"Counters" has no attribute "rx_bad_tagg"' in out, out
