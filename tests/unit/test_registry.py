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
