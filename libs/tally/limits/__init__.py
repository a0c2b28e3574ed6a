"""Quota and rate limiting: one `Limiter` interface, two backends that pass one test suite.

`InProcessLimiter` (one replica, the default) and `RedisLimiter` (atomic Lua, shared by many
replicas, with an explicit outage policy). See `model.py` for what a limit means.
"""

from .memory import InProcessLimiter
from .model import DAY_US, MINUTE_US, SECOND_US, Limit, Limiter, Verdict, Window
from .redis_limiter import OutagePolicy, RedisLimiter, hash_tag

__all__ = ["DAY_US", "MINUTE_US", "SECOND_US", "InProcessLimiter", "Limit", "Limiter",
           "OutagePolicy", "RedisLimiter", "Verdict", "Window", "hash_tag"]
