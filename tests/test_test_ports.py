"""The suite's own port helper: each pytest-xdist worker's ports come from a block of its own, so two workers
never get the same port (a port probed free by one worker could be taken by another before it was bound)."""
import socket

import tests.conftest as conftest


def _ports_of_worker(monkeypatch, worker: str, count: int) -> list[int]:
    monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
    return [conftest.free_port() for _ in range(count)]


def test_two_workers_get_disjoint_ports_from_their_own_blocks_below_the_ephemeral_range(monkeypatch):
    first, second = _ports_of_worker(monkeypatch, "gw0", 30), _ports_of_worker(monkeypatch, "gw1", 30)
    assert all(20000 <= port < 21000 for port in first) and all(21000 <= port < 22000 for port in second)
    assert len(set(first)) == 30 and len(set(second)) == 30


def test_a_port_someone_listens_on_is_skipped_and_none_is_handed_out_twice(monkeypatch):
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw3")
    monkeypatch.setattr(conftest, "_next_port_offset", 0)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 23000))  # the first port of gw3's block
        taken.listen()
        ports = [conftest.free_port() for _ in range(3)]
    assert 23000 not in ports and ports == sorted(ports) and ports[0] > 23000
    monkeypatch.setattr(conftest, "_next_port_offset", 0)  # back to the start: 23000 is free now, the others given
    assert conftest.free_port() == 23000 and conftest.free_port() == ports[-1] + 1


def test_without_xdist_the_first_block_is_used(monkeypatch):
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    assert 20000 <= conftest.free_port() < 21000


def test_sixteen_workers_get_sixteen_blocks_below_the_ephemeral_range(monkeypatch):
    """Blocks of 1,000 hold 12 workers; more (-n 16 on a 16-core machine) get smaller blocks, never a shared one."""
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "16")
    blocks = {}
    for index in range(16):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", f"gw{index}")
        blocks[index] = {conftest.free_port() for _ in range(5)}
    ranges = [conftest._port_block() for _ in range(1)]  # the last worker's
    assert ranges == [(20000 + 15 * 750, 750)]
    assert all(20000 <= port < 32000 for ports in blocks.values() for port in ports)
    assert all(not (blocks[a] & blocks[b]) for a in blocks for b in blocks if a < b)
    assert all(20000 + index * 750 <= min(ports) and max(ports) < 20000 + (index + 1) * 750
               for index, ports in blocks.items())
