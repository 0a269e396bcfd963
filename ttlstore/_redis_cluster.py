"""A throwaway Redis Cluster for tests (public through :mod:`ttlstore.testing`)."""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import time
from types import TracebackType

from ttlstore._redis_server import RedisServer, RedisServerError, call, free_port, pipeline

__all__ = ["RedisCluster"]


_SLOTS = 16384  # hash slots in every Redis Cluster
_BUS_OFFSET = 10000  # a node's cluster bus listens on its port + 10000


class RedisCluster:
    """A throwaway Redis Cluster on loopback: ``masters`` masters with ``replicas`` replicas each.

    Every node is a :class:`RedisServer` (no persistence, its own folder) started with
    ``--cluster-enabled yes`` on a free port whose bus port (+10000) is free too; ``redis-cli
    --cluster create`` joins them. :meth:`start` returns once every node reports
    ``cluster_state:ok``, all nodes agree on who serves all 16384 slots and every replica is in
    sync with its master. :meth:`kill_master` crashes a master (SIGKILL): its replica takes over
    after about ``node_timeout`` plus an election (about a second). :meth:`restart` brings a
    killed node back; it rejoins as a replica. Use it as a context manager, or :meth:`start` and
    :meth:`close`. Needs ``redis-server`` and ``redis-cli`` (Debian: ``apt-get install
    redis-server``, which brings redis-tools).

    :param masters: masters to create (at least 3, as ``redis-cli --cluster create`` requires).
    :param replicas: replicas per master.
    :param binary: the ``redis-server`` executable; found on ``PATH`` when None.
    :param cli: the ``redis-cli`` executable; found beside ``binary`` or on ``PATH`` when None.
    :param node_timeout: seconds a node may go unanswered before it counts as failing
        (``cluster-node-timeout``). Shorter fails over sooner; too short lets a loaded machine
        fail over a healthy node.
    :param start_timeout: seconds to wait for the cluster to be ready, at start and restart.
    :param args: extra ``redis-server`` arguments for every node.
    """

    def __init__(
        self,
        masters: int = 3,
        replicas: int = 1,
        *,
        binary: str | None = None,
        cli: str | None = None,
        node_timeout: float = 2.0,
        start_timeout: float = 60.0,
        args: tuple[str, ...] = (),
    ) -> None:
        if isinstance(masters, bool) or not isinstance(masters, int):
            raise TypeError(f"masters must be an int, got {masters!r}")
        if masters < 3:
            raise ValueError(f"masters must be at least 3 (redis-cli requires it), got {masters}")
        if isinstance(replicas, bool) or not isinstance(replicas, int):
            raise TypeError(f"replicas must be an int, got {replicas!r}")
        if replicas < 0:
            raise ValueError(f"replicas must be >= 0, got {replicas}")
        if not (isinstance(node_timeout, (int, float)) and 0.1 <= node_timeout <= 3600):
            raise ValueError(f"node_timeout must be 0.1 to 3600 seconds, got {node_timeout!r}")
        self.binary = binary if binary is not None else shutil.which("redis-server")
        if self.binary is None:
            raise RedisServerError("redis-server is not on PATH (apt-get install redis-server)")
        beside = os.path.join(os.path.dirname(self.binary), "redis-cli")
        self.cli = cli or (beside if os.access(beside, os.X_OK) else shutil.which("redis-cli"))
        if self.cli is None:
            raise RedisServerError(
                "redis-cli is not on PATH (apt-get install redis-tools; redis-server brings it)"
            )
        self.masters = masters
        self.replicas = replicas
        self.node_timeout = node_timeout
        self.start_timeout = start_timeout
        self.args = args
        self.nodes: list[RedisServer] = []

    # ------------------------------------------------------------------ life cycle

    def node_args(self) -> tuple[str, ...]:
        """The ``redis-server`` arguments of every node."""
        return (
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            str(max(1, round(self.node_timeout * 1000))),
            # A replica may take over however long ago it last heard from its master.
            "--cluster-replica-validity-factor",
            "0",
            # Replicas sync at once, without a 5 s wait for more replicas to batch.
            "--repl-diskless-sync",
            "yes",
            "--repl-diskless-sync-delay",
            "0",
            *self.args,
        )

    def start(self) -> RedisCluster:
        """Start the nodes, create the cluster and wait until it is ready; retried twice."""
        error = ""
        for _ in range(3):
            self.nodes = [
                _ClusterNode(self.binary, *self.node_args(), start_timeout=self.start_timeout)
                for _ in range(self.masters * (1 + self.replicas))
            ]
            try:
                for node in self.nodes:
                    node.start()
                self._create()
                self.wait_ok()
                return self
            except (RedisServerError, OSError, subprocess.SubprocessError) as failure:
                error = str(failure)
                self.close()
        raise RedisServerError(f"the Redis Cluster did not start: {error}")

    def _create(self) -> None:
        run = subprocess.run(
            [
                str(self.cli),
                "--cluster",
                "create",
                *(f"127.0.0.1:{node.port}" for node in self.nodes),
                "--cluster-replicas",
                str(self.replicas),
                "--cluster-yes",
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=self.start_timeout,
            check=False,
        )
        if run.returncode != 0:
            output = (run.stdout + run.stderr).decode(errors="replace")
            raise RedisServerError(f"redis-cli --cluster create failed: {output[-2000:]}")

    def kill_master(self, node: RedisServer | None = None) -> RedisServer:
        """Crash a master (SIGKILL), the given one or the first; returns it for :meth:`restart`."""
        masters = self.master_nodes()
        if node is None:
            if not masters:
                raise RedisServerError("no running master to kill")
            node = masters[0]
        elif node not in masters:
            raise ValueError(f"node on port {node.port} is not a running master")
        node.kill()
        return node

    def restart(self, node: RedisServer) -> None:
        """Start a killed or stopped node again; it rejoins (as a replica if it was failed
        over) and this returns once the cluster is whole again."""
        if node not in self.nodes:
            raise ValueError(f"node on port {node.port} is not part of this cluster")
        node.restart()
        self.wait_ok()

    def close(self) -> None:
        """Stop every node and remove their folders."""
        nodes, self.nodes = self.nodes, []
        for node in nodes:
            node.close()

    def __enter__(self) -> RedisCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ what the cluster says

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>`` of a running node, for ``RedisCluster.from_url``."""
        port = next((node.port for node in self.nodes if node.running), None)
        if port is None:
            raise RedisServerError("no node of the cluster is running")
        return f"redis://127.0.0.1:{port}"

    def keyslot(self, key: str | bytes) -> int:
        """The hash slot of ``key``, as the cluster computes it (``CLUSTER KEYSLOT``)."""
        slot = call(self._any_port(), "CLUSTER", "KEYSLOT", key)
        assert isinstance(slot, int)
        return slot

    def master_nodes(self) -> list[RedisServer]:
        """The running nodes that are masters serving slots, in port order."""
        view = _cluster_view(self._any_port())
        ports = {port for port, (master, slots, _) in view.items() if master is None and slots}
        return sorted((n for n in self.nodes if n.running and n.port in ports), key=_port)

    def slot_ranges(self, node: RedisServer) -> tuple[tuple[int, int], ...]:
        """The slots ``node`` serves now, as inclusive ``(first, last)`` ranges."""
        view = _cluster_view(self._any_port())
        master, _, ranges = view.get(node.port, (None, 0, ()))
        return ranges if master is None else ()

    def master_for(self, key: str | bytes) -> RedisServer:
        """The node that serves ``key``'s slot now."""
        slot = self.keyslot(key)
        view = _cluster_view(self._any_port())
        for port, (master, _, ranges) in view.items():
            if master is None and any(low <= slot <= high for low, high in ranges):
                return next(node for node in self.nodes if node.port == port)
        raise RedisServerError(f"no node serves slot {slot}")

    def wait_ok(self, timeout: float | None = None) -> None:
        """Wait until the running nodes agree that all is well: ``cluster_state:ok``, every slot
        served by a live master, and (if every node runs) each master with its replicas in sync.
        """
        deadline = time.monotonic() + (self.start_timeout if timeout is None else timeout)
        pause = 0.02
        while True:
            problem = self._problem()
            if not problem:
                return
            if time.monotonic() > deadline:
                raise RedisServerError(f"the Redis Cluster is not ready: {problem}")
            time.sleep(pause)
            pause = min(pause * 2, 0.25)

    def _any_port(self) -> int:
        for node in self.nodes:
            if node.running:
                return node.port
        raise RedisServerError("no node of the cluster is running")

    def _problem(self) -> str:
        """What is not (yet) well with the cluster; empty when all is."""
        running = [node for node in self.nodes if node.running]
        if not running:
            return "no node is running"
        views = []
        try:
            for node in running:
                info = _info(call(node.port, "CLUSTER", "INFO"))
                if info.get("cluster_state") != "ok":
                    return f"port {node.port}: cluster_state {info.get('cluster_state')}"
                if info.get("cluster_slots_ok") != str(_SLOTS):
                    return f"port {node.port}: {info.get('cluster_slots_ok')} slots ok"
                views.append(_cluster_view(node.port))
            if any(view != views[0] for view in views):
                return "the nodes do not agree on the topology yet"
            view = views[0]
            live = {node.port for node in running}
            masters = [port for port, (up, slots, _) in view.items() if up is None and slots]
            if sum(view[port][1] for port in masters) != _SLOTS or not set(masters) <= live:
                return "a slot is served by a node that is down"
            if len(running) < len(self.nodes):
                return ""  # degraded but serving: the replicas of a dead master are gone
            for port in masters:
                replicas = [p for p, (master, _, _) in view.items() if master == port]
                if len(replicas) < self.replicas:
                    return f"master on port {port} has {len(replicas)} replica(s)"
                for replica in replicas:
                    status = _info(call(replica, "INFO", "replication"))
                    if status.get("master_link_status") != "up":
                        return f"replica on port {replica} is not in sync"
                if self.replicas and not self._replicated(port, view[port][2]):
                    return f"the replicas of the master on port {port} acknowledge no write yet"
        except (OSError, RedisServerError) as error:
            return str(error)
        return ""

    def _replicated(self, port: int, ranges: tuple[tuple[int, int], ...]) -> bool:
        """Whether a write to the master on ``port`` reaches all its replicas (``WAIT``).

        A replica that has just loaded its master's snapshot says its link is up, but after a
        diskless sync the master streams it nothing until its first acknowledgement (up to a
        second later): a master killed meanwhile loses every write since. So a probe key in
        the master's slots is written, waited for and deleted, on one connection.
        """
        for n in itertools.count():
            probe = f"ttlstore-testing-probe:{{{n}}}"
            slot = call(port, "CLUSTER", "KEYSLOT", probe)
            assert isinstance(slot, int)
            if any(low <= slot <= high for low, high in ranges):
                break
        replies = pipeline(
            port, ("SET", probe, "1", "PX", "5000"), ("WAIT", self.replicas, 1000), ("DEL", probe)
        )
        acknowledged = replies[1]
        return isinstance(acknowledged, int) and acknowledged >= self.replicas

    def __repr__(self) -> str:
        ports = ",".join(str(node.port) for node in self.nodes)
        return f"<RedisCluster masters={self.masters} replicas={self.replicas} ports={ports}>"


class _ClusterNode(RedisServer):
    """A cluster node: its port and its bus port (+10000) must both be free."""

    def choose_port(self) -> int:
        """A free port whose bus port is free too."""
        for _ in range(200):
            port = free_port()
            if port + _BUS_OFFSET > 65535:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind(("127.0.0.1", port + _BUS_OFFSET))
                except OSError:
                    continue
            return port
        raise RedisServerError("found no free port whose bus port (+10000) is free too")


def _port(node: RedisServer) -> int:
    return node.port


def _info(reply: object) -> dict[str, str]:
    """An INFO-style reply (``name:value`` lines) as a dict."""
    text = reply.decode() if isinstance(reply, bytes) else str(reply)
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


# port -> (its master's port or None for a master, slots served, slot ranges), as one node sees
# the cluster; nodes flagged as failing are left out.
_View = dict[int, tuple[int | None, int, tuple[tuple[int, int], ...]]]


def _cluster_view(port: int) -> _View:
    reply = call(port, "CLUSTER", "NODES")
    lines = (reply.decode() if isinstance(reply, bytes) else str(reply)).splitlines()
    ids: dict[str, int] = {}
    rows = []
    for line in lines:
        fields = line.split()
        if len(fields) < 8:
            continue
        address = fields[1].split("@", 1)[0]
        ids[fields[0]] = int(address.rsplit(":", 1)[1])
        rows.append(fields)
    view: _View = {}
    for fields in rows:
        flags = set(fields[2].split(","))
        if flags & {"fail", "fail?", "handshake", "noaddr"}:
            continue
        ranges = []
        for item in fields[8:]:
            if item.startswith("["):
                continue  # a slot being migrated: not served by this entry yet
            low, _, high = item.partition("-")
            ranges.append((int(low), int(high or low)))
        master = None if "master" in flags else ids.get(fields[3], -1)
        view[ids[fields[0]]] = (master, sum(h - lo + 1 for lo, h in ranges), tuple(ranges))
    return view
