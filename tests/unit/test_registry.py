from glm_ray.router.registry import ReplicaRegistry, Snapshot


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_register_heartbeat_expire():
    clock = Clock()
    reg = ReplicaRegistry(num_groups=2, ttl_s=3.0, clock=clock)
    reg.register(0, "127.0.0.1:1", "a")
    reg.register(0, "127.0.0.1:2", "b")
    reg.register(1, "127.0.0.1:3", "c")
    snap = reg.snapshot()
    assert snap.replicas == {0: ["127.0.0.1:1", "127.0.0.1:2"], 1: ["127.0.0.1:3"]}
    clock.t = 2.0
    assert reg.heartbeat("127.0.0.1:1", in_flight=4)
    assert reg.heartbeat("127.0.0.1:3")
    clock.t = 4.0  # b has been silent for 4 s > ttl
    snap2 = reg.snapshot()
    assert snap2.replicas == {0: ["127.0.0.1:1"], 1: ["127.0.0.1:3"]}
    assert snap2.version > snap.version and snap2.load["127.0.0.1:1"] == 4
    assert not reg.heartbeat("127.0.0.1:2")  # told to re-register
    reg.unregister("127.0.0.1:3")
    assert reg.missing_groups() == [1]


def test_snapshot_round_trips_through_plain_dicts():
    reg = ReplicaRegistry(num_groups=3)
    reg.register(2, "h:9", "x")
    snap = reg.snapshot()
    assert Snapshot.from_dict(snap.to_dict()) == snap


def test_bad_group_is_rejected():
    reg = ReplicaRegistry(num_groups=2)
    try:
        reg.register(2, "h:1", "z")
    except ValueError as e:
        assert "group 2 out of range 0..1" in str(e)
    else:
        raise AssertionError("expected ValueError")


def test_heartbeats_carry_load_and_groups_sum_it():
    clock = Clock()
    reg = ReplicaRegistry(num_groups=3, ttl_s=3.0, clock=clock)
    reg.register(0, "h:1", "a")
    reg.register(0, "h:2", "b")
    reg.register(1, "h:3", "c")
    assert reg.heartbeat("h:1", in_flight=1, busy_fraction=0.5, tokens_per_s=100.0)
    assert reg.heartbeat("h:2", busy_fraction=0.3, tokens_per_s=60.0)
    load = reg.group_load()
    assert load[0]["replicas"] == 2 and load[0]["busy_sum"] == 0.8 and load[0]["tokens_per_s"] == 160.0
    assert abs(load[0]["busy_fraction"] - 0.4) < 1e-12
    assert load[1] == {"replicas": 1, "busy_sum": 0.0, "tokens_per_s": 0.0, "busy_fraction": 0.0}
    assert load[2]["replicas"] == 0 and load[2]["busy_fraction"] == 0.0
    clock.t = 5.0  # all silent past the TTL: nothing is counted
    assert all(g["replicas"] == 0 for g in reg.group_load().values())


def test_a_restarted_router_s_empty_groups_keep_the_cached_addresses():
    from glm_ray.serving.attention import keep_known

    cached = Snapshot(7, {0: ["a:1"], 1: ["b:1", "b:2"]})
    fresh = Snapshot(1, {0: ["a:9"], 1: []})  # a new router: group 0 re-registered, group 1 not yet
    merged = keep_known(cached, fresh)
    assert merged.replicas == {0: ["a:9"], 1: ["b:1", "b:2"]} and merged.version == 1
    assert keep_known(Snapshot(-1, {}), fresh).replicas == {0: ["a:9"], 1: []}  # nothing cached: nothing kept
