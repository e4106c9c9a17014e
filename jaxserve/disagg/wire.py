"""Cross-process transport of KV-cache pages (prefill process -> decode process) on `jax.experimental.transfer`.

The wire format is one single-device array per side: `KVSender.offer` puts each array on the sender's
own `device` and offers it under a transfer id; `KVReceiver.pull` validates the offered `WireSpec`s and
pulls into `SingleDeviceSharding(receiver.device)`; the caller reshards locally afterwards. A multi-shard
source, or a destination sharded differently from the source, is never pulled: mismatched layouts
either fail or return wrong data with no error (see below), so `num_shards != 1` is refused up front.

Measured on jax/jaxlib 0.10.2, XLA:CPU, 2-core host, `--xla_force_host_platform_device_count=4`:

* No `jax.distributed.initialize` in either process: two independent processes each start a server
  with `start_transfer_server(device.client, "host:0", ["host:0"], transfer_size=...)`; the receiver
  needs one too (`connect` is a server method). BOTH must pass `transport_addresses`: with the default
  `[]` (a "local" bulk transport, per the XLA source) a cross-process pull SIGSEGVs the *sender*
  (socket-server.cc CHECK `num_sys_refs_ != 0`), or, if only the receiver lacks it, the pull hangs
  until the sender exits. Each side advertises its transport address to the other: `host` must be one
  the peer can reach. The sender's `transfer_size` must be <= the receiver's, else the pull fails
  ("UNIMPLEMENTED: implement frame segmenting"): both use `TRANSFER_SIZE`. The default 256 MiB reserves
  ~6.7 GB of address space per server; 16 MiB reserves ~0.9 GB, at the same throughput.
* `pull` is asynchronous: it returns in < 1 ms (13 ms for 256 MB) with `is_ready()` False. Device 2 ->
  device 3, bit-exact: 8 MB ready in 10-20 ms (first pull of a connection 30-80 ms), 64 MB ~120 ms,
  256 MB ~0.5-0.9 s.
* Sender SIGKILLed: after the connection exists (before or during a pull, e.g. 0.3 s into 1 GB), the
  arrays become ready at once with an error ("SocketServer: Connection closed recv() == 0") that
  `block_until_ready`/`np.asarray` raise; the connection stays poisoned, so every later pull on it
  fails the same way (reconnect: `disconnect`). Sender dead before the first connect: `connect` and
  `pull` return at once, the arrays NEVER become ready (the source retries the connect every 2 s);
  `block_until_ready` hangs (and the `timeout=` argument of `pull` does not fire, in 2 tries). So
  callers wait with `KVReceiver.wait` (polls `is_ready()` up to a deadline). Dropping never-ready
  arrays (`del` + `gc.collect()`) took 75 ms and nothing else; a pull from a new sender then works.
* Offers never pulled stay alive in the sender forever: 20 offers of 32 MB with their Python arrays
  dropped took its RSS from 180 MB to 820 MB. `await_pull(..., timeout=)` does not free them (RSS the
  same 12 s after a 4 s timeout; a pull after it never completes). The private
  `TransferServer._reset_rendevous_table()` frees all offers at once (820 -> 180 MB) but pulls of them
  then hang. What works per offer: `array.delete()` frees it at once (4 x 32 MB: 339 -> 211 MB), and a
  later pull of it gets a clean error ("Buffer has been deleted or donated"), the connection stays
  usable. Deleting 0 / 0.05 / 0.3 / 1 s into a 512 MB pull gave an error, then correct data 3 times:
  never wrong data. So `KVSender` keeps the offered arrays, bounded (`max_offers`, `max_bytes`,
  `ttl_s`), and `release` deletes them: the sender is not told when a pull completes, so the caller
  releases once the receiver reports its arrays ready.
* Dropping the sender's `TransferServer` stops it listening, yet existing connections still serve
  pending offers: `close` deletes the arrays.
* Pulling a transfer id a second time stays pending, and a later offer of the same id serves it;
  offering an id twice silently replaces the first offer. Ids must be unique (across sender restarts
  too: `new_transfer_id()`); both sides refuse repeats they know of.
* Wrong destination specs: a same-size dtype (int32 for float32) returns the bits reinterpreted with
  NO error; smaller or bigger shape, a 2-shard source pulled into one device, or more arrays than
  offered fail with an error. A zero-size array never becomes ready: refused on both sides.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import secrets
import threading
import time

import jax
import jax.numpy as jnp
from jax.experimental import transfer

TRANSFER_SIZE = 16 << 20  # chunk size; must be identical (sender <= receiver) in both processes
DTYPES = frozenset({"float32", "bfloat16", "float16", "int8", "uint8", "int32", "float8_e4m3fn", "float8_e5m2"})


def new_transfer_id() -> int:
    """A random 63-bit id: unique across sender restarts, which a counter from 0 is not."""
    return secrets.randbits(63)


@dataclasses.dataclass(frozen=True)
class WireSpec:
    shape: tuple[int, ...]
    dtype: str
    num_shards: int = 1

    def validate(self) -> "WireSpec":
        if not isinstance(self.shape, tuple) or not all(type(d) is int and d > 0 for d in self.shape):
            raise ValueError(f"wire shape must be a tuple of positive ints (no zero-size arrays), got {self.shape!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"wire dtype {self.dtype!r} not in {sorted(DTYPES)}")
        if type(self.num_shards) is not int or self.num_shards != 1:
            raise ValueError(f"refusing a {self.num_shards!r}-shard source: the wire carries single-device arrays")
        return self

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * jnp.dtype(self.dtype).itemsize

    def to_dict(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype, "num_shards": self.num_shards}

    @classmethod
    def from_dict(cls, d) -> "WireSpec":
        if (not isinstance(d, dict) or not {"shape", "dtype"} <= d.keys() <= {"shape", "dtype", "num_shards"}
                or not isinstance(d["shape"], (list, tuple)) or not isinstance(d["dtype"], str)):
            raise ValueError(f"not a wire spec: {d!r}")
        return cls(tuple(d["shape"]), d["dtype"], d.get("num_shards", 1)).validate()

    @classmethod
    def of(cls, x: jax.Array) -> "WireSpec":
        return cls(tuple(int(d) for d in x.shape), jnp.dtype(x.dtype).name, len(x.sharding.device_set))


def _local_device(device):
    if (device := jax.local_devices()[0] if device is None else device) not in jax.local_devices():
        raise ValueError(f"{device} is not a local device of this process")
    return device


def _start_server(device, host: str):
    bind = f"[{host}]:0" if ":" in host else f"{host}:0"
    return transfer.start_transfer_server(device.client, bind, [bind], transfer_size=TRANSFER_SIZE)


class OfferLimitError(RuntimeError):
    """The sender already holds `max_offers` offers or `max_bytes` bytes; release some first."""


class KVSender:
    """Offers arrays for pulling; lives in the prefill process; thread-safe. `offer` takes ownership of
    the arrays: they are deleted when the offer is released (by `release`, after `ttl_s` at the next
    `offer`/`expire`, or by `close`), so pass fresh arrays (e.g. a gather), not ones still in use."""

    def __init__(self, host: str = "127.0.0.1", device=None, *, max_offers: int = 256, max_bytes: int = 4 << 30,
                 ttl_s: float | None = 120.0):
        self.device = _local_device(device)
        self.max_offers, self.max_bytes, self.ttl_s = max_offers, max_bytes, ttl_s
        self._server = _start_server(self.device, host)
        self.address: str = self._server.address()
        self._offers: dict[int, tuple[float, int, list]] = {}  # id -> (offered at, bytes, arrays)
        self._lock = threading.Lock()

    @property
    def outstanding(self) -> tuple[int, int]:  # (offers, bytes) held until released
        with self._lock:
            return len(self._offers), sum(n for _, n, _ in self._offers.values())

    def offer(self, transfer_id: int, arrays: list[jax.Array]) -> list[WireSpec]:
        if self._server is None:
            raise RuntimeError("KVSender is closed")
        if type(transfer_id) is not int or not 0 <= transfer_id < 1 << 64:
            raise ValueError(f"transfer id must be an int in [0, 2**64), got {transfer_id!r}")
        if not arrays:
            raise ValueError("nothing to offer")
        here = lambda x: isinstance(x, jax.Array) and x.sharding.device_set == {self.device}  # noqa: E731
        moved = [x if here(x) else jax.device_put(x, self.device) for x in arrays]
        specs = [WireSpec.of(x).validate() for x in moved]
        nbytes = sum(s.nbytes for s in specs)
        self.expire()
        with self._lock:
            if transfer_id in self._offers:
                raise ValueError(f"transfer id {transfer_id} is already on offer")
            held = sum(n for _, n, _ in self._offers.values())
            if len(self._offers) + 1 > self.max_offers or held + nbytes > self.max_bytes:
                raise OfferLimitError(f"refusing offer {transfer_id} of {nbytes} bytes: {len(self._offers)} offers "
                                      f"of {held} bytes outstanding (limits {self.max_offers}, {self.max_bytes})")
            self._server.await_pull(transfer_id, moved)
            self._offers[transfer_id] = (time.monotonic(), nbytes, moved)
        return specs

    def release(self, transfer_id: int) -> bool:
        """Drops an offer and deletes its arrays, pulled or not. A pull of it still to come fails with
        an error on the receiver; one in progress completes or fails, never yields wrong data."""
        with self._lock:
            entry = self._offers.pop(transfer_id, None)
        if entry is not None:
            for x in entry[2]:
                x.delete()
        return entry is not None

    def expire(self) -> int:
        """Releases offers older than `ttl_s`; returns how many."""
        if self.ttl_s is None:
            return 0
        cutoff = time.monotonic() - self.ttl_s
        with self._lock:
            old = [t for t, (at, _, _) in self._offers.items() if at < cutoff]
        return sum(self.release(t) for t in old)

    def close(self):
        for t in list(self._offers):
            self.release(t)
        self._server = None  # stops listening; existing connections could still serve, hence the deletes


class KVReceiver:
    """Pulls offered arrays onto one local device; lives in the decode process. Thread-safe."""

    def __init__(self, device=None, host: str = "127.0.0.1", *, remember: int = 65536):
        self.device = _local_device(device)
        self._sharding = jax.sharding.SingleDeviceSharding(self.device)
        self._server = _start_server(self.device, host)
        self._conns: dict[str, object] = {}
        self._pulled: collections.OrderedDict = collections.OrderedDict()  # (address, id), the last `remember`
        self._remember = remember
        self._lock = threading.Lock()

    def pull(self, address: str, transfer_id: int, specs: list[WireSpec]) -> list[jax.Array]:
        """Starts pulling; the arrays may still be in flight (see `wait`). Validates first: ValueError,
        before any network activity, for a bad spec, id or address, or an id already pulled."""
        if self._server is None:
            raise RuntimeError("KVReceiver is closed")
        if not isinstance(address, str) or ":" not in address:
            raise ValueError(f"not a host:port address: {address!r}")
        if type(transfer_id) is not int or not 0 <= transfer_id < 1 << 64:
            raise ValueError(f"transfer id must be an int in [0, 2**64), got {transfer_id!r}")
        if not specs or not all(isinstance(s, WireSpec) and s.validate() for s in specs):
            raise ValueError(f"specs must be a non-empty list of WireSpec, got {specs!r}")
        avals = [jax.ShapeDtypeStruct(s.shape, jnp.dtype(s.dtype), sharding=self._sharding) for s in specs]
        with self._lock:
            if (address, transfer_id) in self._pulled:
                raise ValueError(f"transfer {transfer_id} from {address} was already pulled")
            self._pulled[(address, transfer_id)] = None
            while len(self._pulled) > self._remember:
                self._pulled.popitem(last=False)
            conn = self._conns.get(address)
            if conn is None:
                conn = self._conns[address] = self._server.connect(address)
        return conn.pull(transfer_id, avals)

    def wait(self, address: str, arrays: list[jax.Array], timeout_s: float) -> list[jax.Array]:
        """Waits for pulled arrays. TimeoutError if they are not ready by the deadline (e.g. the sender
        died before the connection was made: they never will be); RuntimeError if the transfer failed.
        Either way the cached connection to `address` is dropped and the caller should drop the arrays."""
        deadline = time.monotonic() + timeout_s
        while not all(x.is_ready() for x in arrays):
            if time.monotonic() >= deadline:
                self.disconnect(address)
                raise TimeoutError(f"pull from {address} not complete after {timeout_s} s")
            time.sleep(0.002)
        try:
            return jax.block_until_ready(arrays)  # ready: returns or raises at once
        except Exception as e:
            self.disconnect(address)
            raise RuntimeError(f"pull from {address} failed: {e}") from e

    def disconnect(self, address: str):
        """Forgets the connection to `address` (poisoned once its sender died); the next pull reconnects.
        Pulls in flight on it still complete (measured: 3 x 32 MB)."""
        with self._lock:
            self._conns.pop(address, None)

    def close(self):
        with self._lock:
            self._conns.clear()
        self._server = None
