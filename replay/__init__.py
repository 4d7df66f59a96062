"""Replay: the durable, bounded buffer of labelled windows between labelers and learners.

Storage (``storage.py``: memory or SQLite, checksummed) + Sampler (``sampler.py``) +
RateLimiter (``rate_limiter.py``) + near-duplicate filter (``dedup.py``), put together by
``buffer.ReplayBuffer``; ``service.py`` serves it over ZeroMQ and ``client.py`` talks to it.
"""
