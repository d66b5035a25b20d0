"""A node's place in the registry: its beat and record, the leader's lease, and the
reaper that removes silent nodes and answers what they held (see ``_node``)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Final

from .._errors import MeshError, WorkerLost
from .._wire import _codec
from ._mail import CALL, REQUEST, Mail

__all__ = ["BEAT_S", "ID_BLOCK", "LAPSE_S", "Registry"]

log = logging.getLogger("mpmesh.redis")

BEAT_S: Final = 1.0     # how often a node beats
LAPSE_S: Final = 5.0    # a node silent this long is gone
# Instance ids a host's broker hands out, taken from the mesh's counter in one block.
ID_BLOCK: Final = 1_000_000

# Beat: refresh this node's score and record (and the alive keys of what it runs);
# keep the id counter past every id handed out (a Redis that lost its data starts it
# again from 0). Returns Redis's time in ms.
_BEAT = """
local p, me = ARGV[1], ARGV[2]
local t = redis.call('TIME')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', p .. 'nodes', ms, me)
redis.call('SET', p .. 'node:' .. me, ARGV[3], 'PX', ARGV[4])
if ARGV[5] == '1' then redis.call('SADD', p .. 'hosts', me) end
local ids = tonumber(redis.call('GET', p .. 'ids') or '0')
if ids < tonumber(ARGV[6]) then redis.call('SET', p .. 'ids', ARGV[6]) end
for i = 7, #ARGV do redis.call('SET', p .. 'alive:' .. ARGV[i], '1', 'PX', ARGV[4]) end
return ms
"""

# The leader's lease: take it if free, keep it if ours. 1: we lead.
_LEASE = """
local k = ARGV[1] .. 'leader'
if redis.call('SET', k, ARGV[2], 'NX', 'PX', ARGV[3]) then return 1 end
if redis.call('GET', k) == ARGV[2] then redis.call('PEXPIRE', k, ARGV[3]) return 1 end
return 0
"""

# Remove every node whose last beat is at or before ARGV[2]; return, per node, its id
# and the requests it held (taken, then still queued) for the leader to answer.
_REAP = """
local p = ARGV[1]
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', p .. 'nodes', '-inf', ARGV[2])) do
  redis.call('ZREM', p .. 'nodes', id)
  local info = redis.call('GET', p .. 'node:' .. id)
  local announce = redis.call('SREM', p .. 'hosts', id) == 1
  local held = redis.call('LRANGE', p .. 'taken:' .. id, 0, -1)
  for _, e in ipairs(redis.call('LRANGE', p .. 'inbox:' .. id, 0, -1)) do table.insert(held, e) end
  redis.call('DEL', p .. 'node:' .. id, p .. 'taken:' .. id, p .. 'inbox:' .. id)
  for _, name in ipairs(redis.call('SMEMBERS', p .. 'rpcnames:' .. id)) do
    redis.call('ZREM', p .. 'rpc:' .. name, id)
  end
  redis.call('DEL', p .. 'rpcnames:' .. id)
  if announce and info then
    for _, other in ipairs(redis.call('SMEMBERS', p .. 'hosts')) do
      redis.call('LPUSH', p .. 'inbox:' .. other, 'L' .. info)
    end
  end
  table.insert(out, id)
  table.insert(out, held)
end
return out
"""


class Registry:
    """One node's beat (its score, record and the alive keys of what it runs), and, while
    it holds the leader's lease, the reaper.

    ``record()`` says what the node stands for; ``alive()`` lists the requests it runs;
    ``on_beat()`` runs after each beat.
    """

    def __init__(self, mail: Mail, *, record: Callable[[], dict[str, Any]], announce: bool,
                 alive: Callable[[], list[str]], on_beat: Callable[[], None] | None,
                 id_floor: int, beat_s: float, lapse_s: float) -> None:
        self._mail, self.link, self.iid = mail, mail.link, mail.iid
        self._record, self._announce, self._alive, self._on_beat = record, announce, alive, on_beat
        self._id_floor = id_floor
        self.beat_s, self.lapse_s = beat_s, lapse_s
        self.nudged = threading.Event()
        self._beat_script = self.link.script(_BEAT)
        self._lease = self.link.script(_LEASE)
        self._reap = self.link.script(_REAP)
        self.leader = False
        self.redis_ok = True

    def beat(self) -> None:
        alive = self._alive()
        info = self.link.seal(_codec.dumps(self._record()))
        px = int(self.lapse_s * 2000)
        with self.link.errors("a beat"):
            self._beat_script(args=[self.link.prefix, self.iid, info, px, int(self._announce),
                                    self._id_floor, *alive])

    def beat_loop(self) -> None:
        while True:
            self.nudged.wait(self.beat_s)
            self.nudged.clear()
            if self._mail.closed.is_set():
                return
            try:
                self.beat()
                self._lead()
                self.redis_ok = True
                if self._on_beat is not None:
                    self._on_beat()
            except MeshError as exc:
                if self.redis_ok:
                    log.warning("node %d cannot reach Redis: %s", self.iid, exc)
                self.redis_ok = False
            except Exception:  # a bug must not stop the beat: this node would be reaped
                log.exception("node %d: beat failed", self.iid)

    def _lead(self) -> None:
        with self.link.errors("the leader's lease"):
            self.leader = bool(self._lease(args=[self.link.prefix, self.iid, int(self.lapse_s * 1000)]))
        if self.leader:
            self.reap(self.link.now_ms() - int(self.lapse_s * 1000))

    def reap(self, cutoff_ms: int) -> list[int]:
        """Remove the nodes silent since ``cutoff_ms`` (Redis time); answer what they held."""
        with self.link.errors("removing silent nodes"):
            found = self._reap(args=[self.link.prefix, cutoff_ms])
        gone = []
        for i in range(0, len(found), 2):
            iid, held = int(found[i]), found[i + 1]
            gone.append(iid)
            log.info("node %d stopped beating; %d request(s) it held fail", iid, len(held))
            for envelope in held:
                if envelope[:1] in (REQUEST, CALL):
                    rid, reply_to = self._mail.open(envelope)[:2]
                    self._mail.reply(reply_to, rid, False, WorkerLost(f"node {iid} left the mesh"))
        return gone
