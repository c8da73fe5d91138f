"""The interface variables a worker gets (distrib_ft/runtime/netif.py), on this machine's real interfaces."""

import pytest

from distrib_ft.runtime import netif


@pytest.fixture
def clean(monkeypatch):
    for var in netif.VARS:  # unset, and restored after the test (configure_worker sets them)
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    return monkeypatch


def test_the_interface_of_the_node_ip_when_the_workers_span_nodes(clean):
    assert netif.interface_of("127.0.0.1") == "lo"
    assert netif.choose("127.0.0.1", {}, detect=True) == {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}
    assert netif.choose("127.0.0.1", {}, detect=False) == {}  # one node: nothing is set
    with pytest.raises(ValueError, match=r"GLOO_SOCKET_IFNAME: node 192\.0\.2\.77 has no interface with its Ray addr"):
        netif.choose("192.0.2.77", {}, detect=True)


def test_the_nodes_value_wins_over_the_drivers_and_a_missing_interface_is_one_line(clean):
    clean.setenv("GLOO_SOCKET_IFNAME", "lo")
    chosen = netif.choose("127.0.0.1", {"GLOO_SOCKET_IFNAME": "nosuch0", "NCCL_SOCKET_IFNAME": "lo"}, detect=True)
    assert chosen == {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}
    clean.delenv("GLOO_SOCKET_IFNAME")
    with pytest.raises(ValueError) as e:
        netif.choose("127.0.0.1", {"GLOO_SOCKET_IFNAME": "nosuch0"}, detect=False)
    line = str(e.value)
    assert "\n" not in line and line.startswith("GLOO_SOCKET_IFNAME=nosuch0 (from the driver's environment): node "
                                                "127.0.0.1 has no network interface nosuch0 (it has ")
    # NCCL's values are prefixes ("l" matches lo), "=name" exact, "^name" exclusions
    assert netif.choose("127.0.0.1", {"NCCL_SOCKET_IFNAME": "l"}, detect=False) == {"NCCL_SOCKET_IFNAME": "l"}
    assert netif.choose("127.0.0.1", {"NCCL_SOCKET_IFNAME": "^docker"}, detect=False) == \
        {"NCCL_SOCKET_IFNAME": "^docker"}
    with pytest.raises(ValueError, match="NCCL_SOCKET_IFNAME==l "):
        netif.choose("127.0.0.1", {"NCCL_SOCKET_IFNAME": "=l"}, detect=False)


def test_configure_worker_sets_the_variables_and_the_record_shows_them(clean):
    assert netif.configure_worker({"GLOO_SOCKET_IFNAME": "lo"}, detect=False) == {"GLOO_SOCKET_IFNAME": "lo"}
    record = netif.worker_record()
    assert record["gloo_socket_ifname"] == "lo" and "nccl_socket_ifname" not in record
    assert record["node_ip"] and record["pid"] > 0
