"""The one way this service opens Redis: binary-safe, failing fast when Redis is down, retrying where asked."""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff


def redis_client(url: str, longest_block_s: float = 1.0, retries: int = 0) -> Redis:
    """Binary-safe client; connects fail fast (503) instead of hanging a request when Redis is down.

    The read timeout must outlast the longest blocking command sent on it (BLPOP up to the request
    deadline, XREADGROUP BLOCK), or redis-py reports a healthy wait as a timeout. `retries` retries a
    command on a fresh connection after a connection error: after Redis restarts, every pooled
    connection is stale and fails once (workers use it; the API answers 503 at once instead).
    """
    retry = Retry(ExponentialBackoff(cap=0.5, base=0.05), retries) if retries else None
    return Redis.from_url(url, decode_responses=False, socket_connect_timeout=2.0, socket_keepalive=True,
                          socket_timeout=longest_block_s + 5.0, retry=retry)
