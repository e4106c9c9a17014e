"""jaxserve.disagg.wire between real processes: a sender subprocess offers known arrays, this process
pulls them with KVReceiver and compares bytes; spec refusals; a SIGKILLed sender."""
import gc
import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxserve.disagg.wire import KVReceiver, KVSender, OfferLimitError, WireSpec, new_transfer_id

WIRE_PY = Path(__file__).resolve().parents[1] / "jaxserve" / "disagg" / "wire.py"


def make_array(shape, dtype, seed):
    """Deterministic test data, numpy only: the sender subprocess runs this same source."""
    import ml_dtypes
    import numpy as np

    rng = np.random.default_rng(seed)
    if dtype in ("int8", "uint8"):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)
    return rng.standard_normal(shape, dtype=np.float32).astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)


# Loads wire.py by path (importing the jaxserve.disagg package would pull in the engine: +1.5 s), offers
# the transfers of argv[2], prints {"address", "specs": {id: [spec dicts]}} and serves until stdin closes.
SENDER = inspect.getsource(make_array) + textwrap.dedent("""
    import importlib.util, json, sys
    spec = importlib.util.spec_from_file_location("wire_under_test", sys.argv[1])
    wire = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = wire
    spec.loader.exec_module(wire)
    import jax
    cfg = json.loads(sys.argv[2])
    sender = wire.KVSender(device=jax.local_devices()[cfg["device"]])
    out = {"address": sender.address, "pid": __import__("os").getpid(), "specs": {}}
    for tid, arrays in cfg["transfers"].items():
        xs = [jax.device_put(make_array(*a)) for a in arrays]  # on device 0: offer moves them
        out["specs"][tid] = [s.to_dict() for s in sender.offer(int(tid), xs)]
    print(json.dumps(out), flush=True)
    sys.stdin.read()
""")

KV = [((2, 3, 16, 2, 8), "float32", 1), ((2, 3, 16, 2, 8), "bfloat16", 2), ((2, 3, 16, 2, 8), "int8", 3),
      ((2, 3, 16, 2), "float32", 4), ((5, 7), "uint8", 5), ((4, 512, 1024), "float32", 6)]  # the last: 8 MiB


class Sender:
    """A sender subprocess (4 host devices, offering from device 2)."""

    def __init__(self, transfers):
        self.transfers = transfers
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
        self.proc = subprocess.Popen([sys.executable, "-c", SENDER, str(WIRE_PY),
                                      json.dumps({"device": 2, "transfers": transfers})],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)

    def ready(self):
        line = self.proc.stdout.readline()
        assert line, f"sender exited with {self.proc.wait()}"
        info = json.loads(line)
        self.address = info["address"]
        self.specs = {int(t): [WireSpec.from_dict(d) for d in json.loads(json.dumps(ss))]  # as it travels
                      for t, ss in info["specs"].items()}
        return self

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture(scope="module")
def receiver():
    r = KVReceiver(device=jax.local_devices()[-1])
    yield r
    r.close()


def assert_received(receiver, sender, tid, arrays):
    assert len(arrays) == len(sender.transfers[str(tid)])
    for x, (shape, dtype, seed) in zip(arrays, sender.transfers[str(tid)]):
        assert x.sharding == jax.sharding.SingleDeviceSharding(receiver.device)
        assert (x.shape, x.dtype.name) == (tuple(shape), dtype)
        assert np.asarray(x).tobytes() == make_array(shape, dtype, seed).tobytes()


def test_roundtrip_between_processes(receiver):
    tids = [new_transfer_id() for _ in range(3)]
    sender = Sender({str(tids[0]): KV[:2], str(tids[1]): KV[2:5], str(tids[2]): KV[5:]}).ready()
    try:
        assert {t: [s.dtype for s in ss] for t, ss in sender.specs.items()} == {
            tids[0]: ["float32", "bfloat16"], tids[1]: ["int8", "float32", "uint8"], tids[2]: ["float32"]}
        pulls = {t: receiver.pull(sender.address, t, sender.specs[t]) for t in tids}  # all in flight at once
        for t in tids:
            assert_received(receiver, sender, t, receiver.wait(sender.address, pulls[t], timeout_s=20))
        with pytest.raises(ValueError, match="already pulled"):  # it would hang, or take a re-offer's data
            receiver.pull(sender.address, tids[0], sender.specs[tids[0]])
    finally:
        sender.close()


@pytest.mark.parametrize("bad", [
    dict(shape=[2, 3], dtype="float32", num_shards=2),
    dict(shape=[2, 3], dtype="float33"),
    dict(shape=[2, 3], dtype="f4"),  # numpy accepts it; the wire takes canonical names only
    dict(shape=[2, 3], dtype="float64"),
    dict(shape=[2, 0], dtype="float32"),  # a zero-size pull never becomes ready
    dict(shape=[2, True], dtype="float32"),
    dict(shape="23", dtype="float32"),
    dict(shape=[2, 3], dtype="float32", device=1),
])
def test_bad_specs_are_refused_before_any_network_activity(receiver, bad):
    with pytest.raises(ValueError):
        WireSpec.from_dict(bad)
    if "device" in bad:
        return  # a spec names no device: the receiver always pulls onto its own
    shape = tuple(bad["shape"]) if isinstance(bad["shape"], list) else bad["shape"]
    spec = WireSpec(shape, bad["dtype"], bad.get("num_shards", 1))
    with socket.create_server(("127.0.0.1", 0)) as peer:
        peer.settimeout(0.3)
        address = "127.0.0.1:%d" % peer.getsockname()[1]
        for specs in ([spec], [WireSpec((2,), "float32"), spec], [bad]):
            with pytest.raises(ValueError):
                receiver.pull(address, new_transfer_id(), specs)
        with pytest.raises(TimeoutError):
            peer.accept()  # nobody connected


def test_a_valid_spec_does_connect():
    """The positive control of the test above: the listener there would have seen a pull."""
    r = KVReceiver()
    with socket.create_server(("127.0.0.1", 0)) as peer:
        peer.settimeout(5)
        address = "127.0.0.1:%d" % peer.getsockname()[1]
        arrays = r.pull(address, new_transfer_id(), [WireSpec((2, 3), "float32")])
        conn, _ = peer.accept()
        conn.close()  # a peer that is not a transfer server hangs up: the pull fails, nothing crashes
    with pytest.raises(RuntimeError, match="failed"):  # "Connection closed" or "recv() failed"
        r.wait(address, arrays, timeout_s=5)
    r.close()


def test_sender_limits_release_and_refusals():
    sender, r = KVSender(max_offers=2, max_bytes=1 << 20, ttl_s=None), KVReceiver()
    d = jax.local_devices()[0]
    a, b = jax.device_put(np.ones((64, 64), np.float32), d), jax.device_put(np.arange(8, dtype=np.int8), d)
    assert sender.offer(1, [a, b]) == [WireSpec((64, 64), "float32"), WireSpec((8,), "int8")]
    assert sender.outstanding == (1, 64 * 64 * 4 + 8)
    with pytest.raises(ValueError, match="already on offer"):
        sender.offer(1, [jax.numpy.zeros(4)])
    with pytest.raises(OfferLimitError):
        sender.offer(2, [jax.numpy.zeros((512, 512))])  # 1 MiB more
    sender.offer(2, [jax.numpy.zeros(4)])
    with pytest.raises(OfferLimitError):
        sender.offer(3, [jax.numpy.zeros(4)])  # a third offer
    for bad in ([jax.numpy.zeros((3, 0))], [jax.numpy.zeros(3, jax.numpy.int16)], []):
        with pytest.raises(ValueError):
            sender.offer(4, bad)
    # Released, never pulled: its memory is freed and a pull of it later fails cleanly.
    assert sender.release(1) and a.is_deleted() and not sender.release(1)
    assert sender.outstanding == (1, 16)
    with pytest.raises(RuntimeError, match="deleted"):
        r.wait(sender.address, r.pull(sender.address, 1, [WireSpec((64, 64), "float32"), WireSpec((8,), "int8")]), 5)
    (x,) = r.wait(sender.address, r.pull(sender.address, 2, [WireSpec((4,), "float32")]), 5)
    assert np.asarray(x).tolist() == [0] * 4
    sender.close()
    r.close()


def test_ttl_expires_offers():
    sender = KVSender(ttl_s=0.05)
    x = jax.numpy.ones(16)
    sender.offer(1, [x])
    time.sleep(0.1)
    assert sender.expire() == 1 and x.is_deleted() and sender.outstanding == (0, 0)
    sender.close()


def test_killed_sender_fails_or_times_out_and_the_receiver_recovers(receiver):
    t1, t2, t3, t4 = (new_transfer_id() for _ in range(4))
    live = Sender({str(t1): KV[:1], str(t2): KV[:1]})  # killed after a first pull: connection exists
    dead = Sender({str(t3): KV[2:3]})  # killed before any connection to it
    fresh = Sender({str(t4): KV[:3]})
    live.ready(), dead.ready(), fresh.ready()
    try:
        assert_received(receiver, live, t1, receiver.wait(live.address, receiver.pull(live.address, t1,
                                                                                      live.specs[t1]), 20))
        live.kill()
        dead.kill()
        arrays = receiver.pull(live.address, t2, live.specs[t2])  # does not raise: fails asynchronously
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="Connection closed"):
            receiver.wait(live.address, arrays, timeout_s=10)
        assert time.monotonic() - start < 5
        arrays = receiver.pull(dead.address, t3, dead.specs[t3])
        with pytest.raises(TimeoutError):  # never ready: block_until_ready would hang
            receiver.wait(dead.address, arrays, timeout_s=1)
        del arrays
        gc.collect()
        assert_received(receiver, fresh, t4, receiver.wait(fresh.address, receiver.pull(fresh.address, t4,
                                                                                        fresh.specs[t4]), 20))
    finally:
        for s in (live, dead, fresh):
            s.close()
