"""Pools over the wire: join, slaves, replication, failover, eject, designate."""

from __future__ import annotations

import pytest
import XenAPI
from xsim_helpers import NODE_TEMPLATE, failure, join_all, new_vm

from xapisim import SimConfig, SimServer


def test_hosts_start_standalone(sim: SimServer) -> None:
    for h in sim.hosts:
        x = sim.session(h.name).xenapi
        pools = x.pool.get_all()
        assert len(pools) == 1 and len(x.host.get_all()) == 1
        master = x.pool.get_master(pools[0])
        assert x.host.get_address(master) == h.address
        assert x.host.get_uuid(master) == h.uuid


def test_three_host_pool_join_and_slaves_refuse_with_master_address(sim: SimServer) -> None:
    join_all(sim)
    master = sim.hosts[0]
    x = sim.session(master.name).xenapi
    hosts = x.host.get_all()
    assert sorted(x.host.get_name_label(h) for h in hosts) == ["host-1", "host-2", "host-3"]
    assert len(x.pool.get_all()) == 1
    # networks merged by bridge; the shared NFS SR got a PBD on every host
    assert len([n for n in x.network.get_all() if x.network.get_bridge(n) == "xenbr0"]) == 1
    nfs = x.SR.get_by_name_label("NFS shared storage")[0]
    assert len(x.SR.get_PBDs(nfs)) == 3
    # the joiners' local SRs are in the pool DB, one per host
    assert len(x.SR.get_by_name_label("Local storage")) == 3
    for slave in sim.hosts[1:]:
        s = sim.session(slave.name, login=False)
        assert failure(s.xenapi.login_with_password, sim.username, sim.password, "", "") == [
            "HOST_IS_SLAVE", master.address]


def test_join_checks(sim: SimServer) -> None:
    x2 = sim.session("host-2").xenapi
    # joining itself
    assert failure(x2.pool.join, sim.hosts[1].address, sim.username, sim.password) == [
        "OPERATION_NOT_ALLOWED", "Host cannot become slave of itself"]
    # bad credentials for the master propagate
    assert failure(x2.pool.join, sim.hosts[0].address, sim.username, "nope")[0] == \
        "SESSION_AUTHENTICATION_FAILED"
    # nobody there
    assert failure(x2.pool.join, "127.0.0.254", sim.username, sim.password) == [
        "JOINING_HOST_CONNECTION_FAILED"]
    # a joiner with shared storage is refused (host-1 has the NFS SR)
    x1 = sim.session("host-1").xenapi
    assert failure(x1.pool.join, sim.hosts[1].address, sim.username, sim.password) == [
        "JOINING_HOST_CANNOT_CONTAIN_SHARED_SRS"]
    # a joiner with a running VM is refused
    x3 = sim.session("host-3").xenapi
    tmpl = x3.VM.get_by_name_label("CentOS 7")[0]
    # default templates carry sr="" in their provision spec: provision refuses like xapi
    bare = x3.VM.clone(tmpl, "bare")
    assert failure(x3.VM.provision, bare) == ["UUID_INVALID", "sr", ""]
    vm = x3.VM.clone(tmpl, "busy")
    sr_uuid = x3.SR.get_uuid(x3.SR.get_by_name_label("Local storage")[0])
    disks = x3.VM.get_other_config(vm)["disks"].replace('sr=""', f'sr="{sr_uuid}"')
    x3.VM.remove_from_other_config(vm, "disks")
    x3.VM.add_to_other_config(vm, "disks", disks)
    x3.VM.provision(vm)
    assert x3.VM.get_is_a_template(vm) is False
    assert "disks" not in x3.VM.get_other_config(vm)
    vbd = x3.VM.get_VBDs(vm)[0]
    assert x3.VDI.get_name_description(x3.VBD.get_VDI(vbd)) == "Created by template provisioner"
    x3.VM.start(vm, False, False)
    assert failure(x3.pool.join, sim.hosts[0].address, sim.username, sim.password) == [
        "JOINING_HOST_CANNOT_HAVE_RUNNING_VMS"]
    # a master of others cannot join
    x2.pool.join(sim.hosts[0].address, sim.username, sim.password)
    x1 = sim.session("host-1").xenapi
    x3.VM.hard_shutdown(vm)
    assert failure(x1.pool.join, sim.hosts[2].address, sim.username, sim.password) == [
        "JOINING_HOST_CANNOT_BE_MASTER_OF_OTHER_HOSTS"]
    # pointing at a slave
    assert failure(x3.pool.join, sim.hosts[1].address, sim.username, sim.password) == [
        "HOST_IS_SLAVE", sim.hosts[0].address]


def test_slave_local_login_reads_replica_and_sync(sim: SimServer) -> None:
    join_all(sim)
    x = sim.session("host-1").xenapi
    tmpl = x.VM.get_by_name_label(NODE_TEMPLATE)[0]
    x.VM.clone(tmpl, "after-join")
    local = sim.session("host-2", login=False)
    local.slave_local_login_with_password(sim.username, sim.password)
    # sync_interval=0 in the fixture: only pool.sync_database replicates
    assert local.xenapi.VM.get_by_name_label("after-join") == []
    x.pool.sync_database()
    assert len(local.xenapi.VM.get_by_name_label("after-join")) == 1
    # writes through a local session on a slave are refused
    pool = local.xenapi.pool.get_all()[0]
    assert failure(local.xenapi.pool.set_name_label, pool, "x") == ["HOST_IS_SLAVE", sim.hosts[0].address]
    assert local.xenapi.pool.get_master(pool) == x.pool.get_master(pool)
    local.xenapi.session.logout()


def test_periodic_sync() -> None:
    with SimServer(SimConfig(hosts=2, sync_interval=0.2)) as sim:
        join_all(sim)
        x = sim.session("host-1").xenapi
        tmpl = x.VM.get_by_name_label(NODE_TEMPLATE)[0]
        x.VM.clone(tmpl, "periodic")
        node = sim.model.nodes["host-2"]
        import time
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with sim.model.lock:
                assert node.replica is not None
                if node.replica.find("VM", name_label="periodic"):
                    break
            time.sleep(0.05)
        else:
            pytest.fail("the slave's replica never caught up")


def test_master_killed_slave_promoted_unsynced_changes_lost(sim: SimServer) -> None:
    join_all(sim)
    x = sim.session("host-1").xenapi
    tmpl = x.VM.get_by_name_label(NODE_TEMPLATE)[0]
    x.VM.clone(tmpl, "synced")
    x.pool.sync_database()
    x.VM.clone(tmpl, "unsynced")
    sim.kill_host("host-1")
    with pytest.raises(OSError):
        x.pool.get_all()
    # host-2 still points at the dead master
    s2 = sim.session("host-2", login=False)
    assert failure(s2.xenapi.login_with_password, sim.username, sim.password, "", "") == [
        "HOST_IS_SLAVE", sim.hosts[0].address]
    s2.slave_local_login_with_password(sim.username, sim.password)
    assert s2.xenapi.host.is_in_emergency_mode() is True
    s2.xenapi.pool.emergency_transition_to_master()
    x2 = sim.session("host-2").xenapi
    pool = x2.pool.get_all()[0]
    assert x2.host.get_address(x2.pool.get_master(pool)) == sim.hosts[1].address
    assert len(x2.VM.get_by_name_label("synced")) == 1
    assert x2.VM.get_by_name_label("unsynced") == []
    # the dead master is not live; host-3 still follows host-1 until recovered
    dead = [h for h in x2.host.get_all() if x2.host.get_address(h) == sim.hosts[0].address][0]
    assert x2.host_metrics.get_live(x2.host.get_metrics(dead)) is False
    assert failure(sim.session("host-3", login=False).xenapi.login_with_password,
                   sim.username, sim.password, "", "")[1] == sim.hosts[0].address
    recovered = x2.pool.recover_slaves()
    assert [x2.host.get_name_label(h) for h in recovered] == ["host-3"]
    assert failure(sim.session("host-3", login=False).xenapi.login_with_password,
                   sim.username, sim.password, "", "") == ["HOST_IS_SLAVE", sim.hosts[1].address]
    # the old master comes back believing it is master; recover_slaves brings it in line
    sim.revive_host("host-1")
    assert [x2.host.get_name_label(h) for h in x2.pool.recover_slaves()] == ["host-1"]
    assert x2.host_metrics.get_live(x2.host.get_metrics(dead)) is True


def test_killed_slave_is_not_live_and_not_chosen(sim: SimServer) -> None:
    join_all(sim)
    x = sim.session("host-1").xenapi
    sim.kill_host("host-3")
    h3 = [h for h in x.host.get_all() if x.host.get_name_label(h) == "host-3"][0]
    assert x.host_metrics.get_live(x.host.get_metrics(h3)) is False
    vm = new_vm(x, "n")
    assert failure(x.VM.start_on, vm, h3, False, False) == ["HOST_NOT_LIVE"]
    assert h3 not in x.VM.get_possible_hosts(vm)
    with pytest.raises(OSError):
        sim.session("host-3")
    sim.revive_host("host-3")
    assert x.host_metrics.get_live(x.host.get_metrics(h3)) is True
    x.VM.start_on(vm, h3, False, False)
    assert x.VM.get_resident_on(vm) == h3


def test_eject_and_designate_new_master(sim: SimServer) -> None:
    join_all(sim)
    x = sim.session("host-1").xenapi
    hosts = {x.host.get_name_label(h): h for h in x.host.get_all()}
    assert failure(x.pool.eject, hosts["host-1"]) == ["INTERNAL_ERROR", "Cannot_eject_master"]
    vm = new_vm(x, "pinned")
    x.VM.start_on(vm, hosts["host-3"], False, False)
    assert failure(x.pool.eject, hosts["host-3"]) == ["OPERATION_NOT_ALLOWED", "VM resident on host"]
    x.VM.hard_shutdown(vm)
    x.pool.eject(hosts["host-3"])
    assert sorted(x.host.get_name_label(h) for h in x.host.get_all()) == ["host-1", "host-2"]
    x3 = sim.session("host-3").xenapi  # standalone again
    assert len(x3.host.get_all()) == 1
    # designate host-2: the old master becomes a slave of it
    x.pool.designate_new_master(hosts["host-2"])
    with pytest.raises(XenAPI.Failure) as info:
        sim.session("host-1")
    assert info.value.details == ["HOST_IS_SLAVE", sim.hosts[1].address]
    x2 = sim.session("host-2").xenapi
    pool = x2.pool.get_all()[0]
    assert x2.pool.get_master(pool) == hosts["host-2"]
    assert len(x2.VM.get_by_name_label("pinned")) == 1


def test_reset_returns_to_standalone_hosts(sim: SimServer) -> None:
    join_all(sim)
    x = sim.session("host-1").xenapi
    vm = new_vm(x, "gone")
    x.VM.start(vm, False, False)
    sim.faults.fail("VM.start", "HOST_NOT_LIVE", [])
    sim.kill_host("host-3")
    sim.reset()
    assert not sim.backend.running  # type: ignore[attr-defined]
    for h in sim.hosts:
        xs = sim.session(h.name).xenapi
        assert len(xs.host.get_all()) == 1
        assert xs.VM.get_by_name_label("gone") == []
    assert sim.faults.rules == []


def test_slave_checks_the_session_before_refusing(sim: SimServer) -> None:
    """session_check.ml: unknown session -> SESSION_INVALID; a master session -> HOST_IS_SLAVE."""
    join_all(sim)
    master = sim.session("host-1")
    slave = sim.session("host-2", login=False)
    raw = getattr(slave, "VM.get_all")
    assert raw("OpaqueRef:bogus")["ErrorDescription"] == ["SESSION_INVALID", "OpaqueRef:bogus"]
    assert raw(master.handle)["ErrorDescription"] == ["HOST_IS_SLAVE", sim.hosts[0].address]


def test_join_homogeneity_and_version_checks(sim: SimServer) -> None:
    def tweak(name: str, **fields: object) -> None:
        with sim.model.lock:
            node = sim.model.nodes[name]
            assert node.db is not None
            host = node.db.by_uuid("host", node.uuid)
            for key, value in fields.items():
                if key == "software":
                    node.db.set("host", host, "software_version",
                                dict(node.db.get("host", host)["software_version"], **value))  # type: ignore[arg-type]
                else:
                    node.db.set("host", host, key, value)

    x2 = sim.session("host-2").xenapi
    master = sim.hosts[0].address
    tweak("host-2", software={"build_number": "other"})
    assert failure(x2.pool.join, master, sim.username, sim.password) == [
        "HOSTS_NOT_HOMOGENEOUS", "Software version differs"]
    tweak("host-2", API_version_minor=15)
    # join_force skips the homogeneity check; the API version check still applies
    assert failure(x2.pool.join_force, master, sim.username, sim.password) == [
        "POOL_JOINING_HOST_MUST_HAVE_SAME_API_VERSION", "2.15", "2.21"]
    tweak("host-2", API_version_minor=21, software={"platform_version": "9.9.9"})
    assert failure(x2.pool.join_force, master, sim.username, sim.password) == ["HOSTS_NOT_COMPATIBLE"]
    tweak("host-2", software={"platform_version": "3.4.0"})
    x2.pool.join_force(master, sim.username, sim.password)
    assert len(sim.session("host-1").xenapi.host.get_all()) == 2
