"""exo.helpers keeps exo classic's helper behaviour (the names it re-exports, tested at their classic path)."""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from exo import helpers, settings
from exo.helpers import (
    AsyncCallback,
    AsyncCallbackSystem,
    PrefixDict,
    find_available_port,
    get_all_ip_addresses_and_interfaces,
    get_interface_priority_and_type,
    get_or_create_node_id,
    is_valid_uuid,
    pretty_print_bytes,
    pretty_print_bytes_per_second,
    shutdown,
    terminal_link,
)
from exo.networking import interfaces

# ---------------------------------------------------------------------------
# Environment parsing
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, 0), ("", 0), ("2", 2), (" 3 ", 3), ("-1", -1), ("abc", 0), ("1.5", 0)],
)
def test_env_int(monkeypatch: pytest.MonkeyPatch, value: str | None, expected: int) -> None:
    if value is None:
        monkeypatch.delenv("EXO_TEST_LEVEL", raising=False)
    else:
        monkeypatch.setenv("EXO_TEST_LEVEL", value)
    assert settings._env_int("EXO_TEST_LEVEL") == expected


def _import_levels(env_overrides: dict[str, str]) -> list[str]:
    python_root = str(Path(helpers.__file__).resolve().parent.parent)
    env = {k: v for k, v in os.environ.items() if k not in ("DEBUG", "DEBUG_DISCOVERY")}
    env.update(env_overrides)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [python_root, env.get("PYTHONPATH")]))
    out = subprocess.run(
        [sys.executable, "-c", "import exo.helpers as h; print(h.DEBUG, h.DEBUG_DISCOVERY, h.VERSION)"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.split()


def test_debug_levels_from_environment() -> None:
    assert _import_levels({}) == ["0", "0", helpers.VERSION]
    assert _import_levels({"DEBUG": "2", "DEBUG_DISCOVERY": "7"}) == ["2", "7", helpers.VERSION]


def test_non_integer_debug_does_not_break_import() -> None:
    assert _import_levels({"DEBUG": "yes", "DEBUG_DISCOVERY": "verbose"}) == ["0", "0", helpers.VERSION]


# ---------------------------------------------------------------------------
# AsyncCallback / AsyncCallbackSystem
# ---------------------------------------------------------------------------


def test_register_returns_same_callback_and_deregister_removes_it() -> None:
    system: AsyncCallbackSystem[str, int] = AsyncCallbackSystem()
    first = system.register("a")
    assert isinstance(first, AsyncCallback)
    assert system.register("a") is first
    assert system.register("b") is not first
    system.deregister("a")
    assert "a" not in system.callbacks
    assert system.register("a") is not first
    system.deregister("missing")  # no error


def test_trigger_calls_only_the_named_observers() -> None:
    system: AsyncCallbackSystem[str, int] = AsyncCallbackSystem()
    seen: list[tuple[str, tuple[int, ...]]] = []
    system.register("a").on_next(lambda *args: seen.append(("a", args)))
    system.register("b").on_next(lambda *args: seen.append(("b", args)))

    system.trigger("a", 1, 2)  # no running loop: must still work
    assert seen == [("a", (1, 2))]
    assert system.callbacks["a"].result == (1, 2)
    assert system.callbacks["b"].result is None

    system.trigger("missing", 3)  # ignored
    assert seen == [("a", (1, 2))]


def test_trigger_all_and_deregister() -> None:
    system: AsyncCallbackSystem[str, int] = AsyncCallbackSystem()
    seen: list[tuple[str, tuple[int, ...]]] = []
    for name in ("a", "b", "c"):
        system.register(name).on_next(lambda *args, name=name: seen.append((name, args)))
    system.deregister("b")
    system.trigger_all(5)
    assert sorted(seen) == [("a", (5,)), ("c", (5,))]


def test_multiple_observers_called_in_order() -> None:
    callback: AsyncCallback[int] = AsyncCallback()
    calls: list[str] = []
    callback.on_next(lambda x: calls.append(f"first {x}"))
    callback.on_next(lambda x: calls.append(f"second {x}"))
    callback.set(9)
    assert calls == ["first 9", "second 9"]


def test_wait_is_satisfied_by_a_later_set() -> None:
    async def main() -> tuple[int, ...]:
        system: AsyncCallbackSystem[str, int] = AsyncCallbackSystem()
        callback = system.register("req")
        waiter = asyncio.create_task(callback.wait(lambda x, done: done, timeout=2))
        await asyncio.sleep(0)
        system.trigger("req", 1, False)
        await asyncio.sleep(0.01)
        assert not waiter.done()
        system.trigger("req", 2, True)
        return await waiter

    assert asyncio.run(main()) == (2, True)


def test_wait_returns_current_result_immediately() -> None:
    async def main() -> tuple[int, ...]:
        callback: AsyncCallback[int] = AsyncCallback()
        callback.set(4)
        return await callback.wait(lambda x: x == 4, timeout=0.5)

    assert asyncio.run(main()) == (4,)


def test_wait_sees_each_result_even_if_overwritten_quickly() -> None:
    async def main() -> tuple[int, ...]:
        callback: AsyncCallback[int] = AsyncCallback()
        waiter = asyncio.create_task(callback.wait(lambda x: x == 1, timeout=1))
        await asyncio.sleep(0)
        callback.set(1)
        callback.set(2)
        return await waiter

    assert asyncio.run(main()) == (1,)


def test_wait_times_out() -> None:
    async def main() -> None:
        callback: AsyncCallback[int] = AsyncCallback()
        callback.set(1)
        with pytest.raises(asyncio.TimeoutError):
            await callback.wait(lambda x: x == 2, timeout=0.05)
        assert callback._waiters == []

    asyncio.run(main())


def test_set_from_another_thread_wakes_waiter() -> None:
    observer_threads: list[int] = []

    async def main() -> tuple[int, ...]:
        callback: AsyncCallback[int] = AsyncCallback()
        callback.on_next(lambda _x: observer_threads.append(threading.get_ident()))

        def producer() -> None:
            callback.set(1)
            callback.set(42)

        waiter = asyncio.create_task(callback.wait(lambda x: x == 42, timeout=2))
        await asyncio.sleep(0)
        thread = threading.Thread(target=producer)
        thread.start()
        try:
            return await waiter
        finally:
            thread.join()

    main_thread = threading.get_ident()
    assert asyncio.run(main()) == (42,)
    assert len(observer_threads) == 2
    assert all(ident != main_thread for ident in observer_threads)


def test_set_after_waiter_loop_closed_does_not_raise() -> None:
    callback: AsyncCallback[int] = AsyncCallback()
    loop = asyncio.new_event_loop()
    loop.close()
    # A waiter left behind on a loop that has since been closed.
    callback._waiters.append((loop, asyncio.Queue()))
    callback.set(1)
    assert callback.result == (1,)


def test_observer_exception_still_wakes_waiters() -> None:
    async def main() -> tuple[int, ...]:
        callback: AsyncCallback[int] = AsyncCallback()

        def bad_observer(_x: int) -> None:
            raise ValueError("boom")

        callback.on_next(bad_observer)
        waiter = asyncio.create_task(callback.wait(lambda x: x == 3, timeout=1))
        await asyncio.sleep(0)
        with pytest.raises(ValueError):
            callback.set(3)
        return await waiter

    assert asyncio.run(main()) == (3,)


# ---------------------------------------------------------------------------
# Node id and ports
# ---------------------------------------------------------------------------


@pytest.fixture
def tmp_tempdir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    return tmp_path


def test_is_valid_uuid() -> None:
    assert is_valid_uuid(str(uuid.uuid4()))
    assert is_valid_uuid(uuid.uuid4())
    assert not is_valid_uuid("not-a-uuid")
    assert not is_valid_uuid("")


def test_node_id_is_persisted(tmp_tempdir: Path) -> None:
    node_id = get_or_create_node_id()
    assert is_valid_uuid(node_id)
    assert (tmp_tempdir / ".exo_node_id").read_text().strip() == node_id
    assert get_or_create_node_id() == node_id


def test_existing_node_id_is_reused(tmp_tempdir: Path) -> None:
    stored = str(uuid.uuid4())
    (tmp_tempdir / ".exo_node_id").write_text(stored + "\n")
    assert get_or_create_node_id() == stored


@pytest.mark.parametrize("content", [b"garbage", b"", b"\xff\xfe\x00"])
def test_invalid_node_id_file_is_regenerated(tmp_tempdir: Path, content: bytes) -> None:
    (tmp_tempdir / ".exo_node_id").write_bytes(content)
    node_id = get_or_create_node_id()
    assert is_valid_uuid(node_id)
    assert (tmp_tempdir / ".exo_node_id").read_text() == node_id


def test_node_id_falls_back_on_io_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A tempdir that does not exist: the id file cannot be written.
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path / "missing"))
    first = get_or_create_node_id()
    second = get_or_create_node_id()
    assert is_valid_uuid(first) and is_valid_uuid(second)
    assert first != second


def _can_bind(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def test_find_available_port_is_bindable_in_range_and_recorded(tmp_tempdir: Path) -> None:
    port = find_available_port(min_port=50000, max_port=50100)
    assert 50000 <= port <= 50100
    assert _can_bind(port)
    assert (tmp_tempdir / "exo_used_ports").read_text().split() == [str(port)]

    second = find_available_port(min_port=50000, max_port=50100)
    assert second != port
    assert (tmp_tempdir / "exo_used_ports").read_text().split() == [str(port), str(second)]


def test_find_available_port_skips_recently_used_ports(tmp_tempdir: Path) -> None:
    # Above Linux's ephemeral range (32768-60999), so no earlier test's connection holds these.
    low = 61200
    (tmp_tempdir / "exo_used_ports").write_text("".join(f"{p}\n" for p in range(low, low + 4)) + "junk\n")
    assert find_available_port(min_port=low, max_port=low + 4) == low + 4


def test_find_available_port_keeps_last_twenty(tmp_tempdir: Path) -> None:
    old = list(range(51000, 51030))
    (tmp_tempdir / "exo_used_ports").write_text("".join(f"{p}\n" for p in old))
    port = find_available_port(min_port=52000, max_port=52100)
    recorded = [int(p) for p in (tmp_tempdir / "exo_used_ports").read_text().split()]
    assert recorded == [*old[-19:], port]


def test_find_available_port_raises_when_nothing_binds(tmp_tempdir: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        with pytest.raises(RuntimeError):
            find_available_port(min_port=taken, max_port=taken)
    assert not (tmp_tempdir / "exo_used_ports").exists()


# ---------------------------------------------------------------------------
# Network interfaces
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ifname", "expected"),
    [
        ("docker0", (7, "Container Virtual")),
        ("br-1a2b3c", (7, "Container Virtual")),
        ("veth12ab", (7, "Container Virtual")),
        ("cni0", (7, "Container Virtual")),
        ("flannel.1", (7, "Container Virtual")),
        ("calico123", (7, "Container Virtual")),
        ("weave", (7, "Container Virtual")),
        ("bridge0", (7, "Container Virtual")),
        ("lo", (6, "Loopback")),
        ("lo0", (6, "Loopback")),
        ("tb0", (5, "Thunderbolt")),
        ("nx0", (5, "Thunderbolt")),
        ("ten0", (5, "Thunderbolt")),
        ("eth0", (4, "Ethernet")),
        ("enp3s0", (4, "Ethernet")),
        ("en2", (4, "Ethernet")),
        ("en0", (3, "WiFi")),
        ("en1", (3, "WiFi")),
        ("wlan0", (3, "WiFi")),
        ("wlp2s0", (3, "WiFi")),
        ("wifi0", (3, "WiFi")),
        ("tun0", (1, "External Virtual")),
        ("tap1", (1, "External Virtual")),
        ("utun3", (1, "External Virtual")),
        ("awdl0", (1, "External Virtual")),
        ("llw0", (1, "External Virtual")),
        ("gif0", (1, "External Virtual")),
        ("stf0", (1, "External Virtual")),
        ("ib0", (2, "Other")),
        ("virbr0", (2, "Other")),
    ],
)
def test_interface_priority_rules(monkeypatch: pytest.MonkeyPatch, ifname: str, expected: tuple[int, str]) -> None:
    monkeypatch.setattr(psutil, "MACOS", False)
    assert asyncio.run(get_interface_priority_and_type(ifname)) == expected


def test_macos_lookup_takes_precedence_and_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(psutil, "MACOS", True)
    answers: dict[str, tuple[int, str] | None] = {"bridge0": (5, "Thunderbolt"), "en5": None}

    async def fake_lookup(ifname: str) -> tuple[int, str] | None:
        return answers[ifname]

    monkeypatch.setattr(interfaces, "get_macos_interface_type", fake_lookup)
    assert asyncio.run(get_interface_priority_and_type("bridge0")) == (5, "Thunderbolt")
    assert asyncio.run(get_interface_priority_and_type("en5")) == (4, "Ethernet")


def test_macos_system_profiler_classification() -> None:
    data = {
        "SPNetworkDataType": [
            {"interface": "bridge0", "_name": "Thunderbolt Bridge", "hardware": "bridge", "type": "bridge"},
            {"interface": "en0", "_name": "Wi-Fi", "hardware": "AirPort", "type": "AirPort"},
            {"interface": "en5", "_name": "USB 10/100/1000 LAN", "hardware": "Ethernet", "type": "Ethernet"},
            {"interface": "en7", "_name": "Ethernet", "hardware": "Ethernet", "type": "Ethernet"},
            {"interface": "utun4", "_name": "Corp VPN", "type": "VPN"},
            {"interface": "en9", "_name": "Mystery", "hardware": "x", "type": "y"},
        ]
    }
    classify = interfaces._classify_macos_interface
    assert classify(data, "bridge0") == (5, "Thunderbolt")
    assert classify(data, "en0") == (3, "WiFi")
    assert classify(data, "en5") == (4, "Ethernet [USB]")
    assert classify(data, "en7") == (4, "Ethernet")
    assert classify(data, "utun4") == (1, "External Virtual")
    assert classify(data, "en9") is None
    assert classify(data, "absent") is None
    assert classify({}, "en0") is None


def _addr(family: int, address: str) -> SimpleNamespace:
    return SimpleNamespace(family=family, address=address, netmask=None, broadcast=None, ptp=None)


def test_ip_addresses_from_psutil(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = {
        "lo": [_addr(socket.AF_INET, "127.0.0.1"), _addr(socket.AF_INET6, "::1")],
        "eth0": [_addr(socket.AF_INET, "192.168.1.5"), _addr(socket.AF_INET, "192.168.1.5")],
        "wlan0": [_addr(socket.AF_INET, "0.0.0.0")],
        "\\Device\\NPF_{ABC}": [_addr(socket.AF_INET, "10.0.0.2")],
    }
    monkeypatch.setattr(psutil, "net_if_addrs", lambda: fake)
    result = get_all_ip_addresses_and_interfaces()
    assert sorted(result) == [("10.0.0.2", "{ABC}"), ("127.0.0.1", "lo"), ("192.168.1.5", "eth0")]


def test_ip_addresses_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(psutil, "net_if_addrs", lambda: {"eth0": [_addr(socket.AF_INET6, "fe80::1")]})
    assert get_all_ip_addresses_and_interfaces() == [("localhost", "lo")]

    def broken() -> dict[str, list[SimpleNamespace]]:
        raise OSError("no interfaces")

    monkeypatch.setattr(psutil, "net_if_addrs", broken)
    assert get_all_ip_addresses_and_interfaces() == [("localhost", "lo")]


def test_ip_addresses_on_this_host() -> None:
    result = get_all_ip_addresses_and_interfaces()
    assert result
    assert all(isinstance(ip, str) and isinstance(name, str) for ip, name in result)
    assert len(result) == len(set(result))


# ---------------------------------------------------------------------------
# Formatting and misc
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.00 KB"),
        (1536, "1.50 KB"),
        (1024**2 - 1, "1024.00 KB"),
        (1024**2, "1.00 MB"),
        (5 * 1024**3, "5.00 GB"),
        (1024**4, "1.00 TB"),
        (1024**5, "1024.00 TB"),
    ],
)
def test_pretty_print_bytes(size: int, expected: str) -> None:
    assert pretty_print_bytes(size) == expected
    assert pretty_print_bytes_per_second(size) == expected + "/s"


def test_terminal_link() -> None:
    assert terminal_link("http://x") == "\033]8;;http://x\033\\http://x\033]8;;\033\\"
    assert terminal_link("http://x", "X") == "\033]8;;http://x\033\\X\033]8;;\033\\"


def test_prefix_dict() -> None:
    d: PrefixDict[str, int] = PrefixDict()
    d.add("a", 1)
    d.add("ab", 2)
    d.add("xyz", 3)
    assert sorted(d.find_prefix("abc")) == [("a", 1), ("ab", 2)]
    assert d.find_longest_prefix("abc") == ("ab", 2)
    assert d.find_longest_prefix("azz") == ("a", 1)
    assert d.find_longest_prefix("q") is None


def test_system_info_is_a_known_label() -> None:
    assert helpers.get_system_info() in {
        "Apple Silicon Mac",
        "Intel Mac",
        "Unknown Mac architecture",
        "Linux",
        "Non-Mac, non-Linux system",
    }


def test_print_yellow_exo(capsys: pytest.CaptureFixture[str]) -> None:
    helpers.print_yellow_exo()
    out = capsys.readouterr().out
    assert out.startswith("\033[93m") and helpers.exo_text in out and "\033[0m" in out


def test_shutdown_cancels_tasks_then_stops_server(capsys: pytest.CaptureFixture[str]) -> None:
    events: list[str] = []

    class FakeServer:
        async def stop(self) -> None:
            events.append("stopped")

    async def worker() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            events.append("cancelled")
            raise

    async def main() -> bool:
        task = asyncio.create_task(worker())
        await asyncio.sleep(0)
        await shutdown(signal.SIGTERM, asyncio.get_running_loop(), FakeServer())
        return task.cancelled()

    assert asyncio.run(main())
    assert events == ["cancelled", "stopped"]
    assert helpers.exo_text in capsys.readouterr().out
