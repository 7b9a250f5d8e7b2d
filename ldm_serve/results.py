"""Where image bytes (outputs and inpainting inputs) live.

The gateway and the worker only see :class:`ResultStore`; :class:`RedisResultStore`
keeps blobs in Redis with a TTL. A filesystem or S3-compatible store can replace
it by implementing the same four methods.
"""

from __future__ import annotations

from typing import Protocol

import redis

from ldm_serve.contract import Keys, is_job_id


class ResultStore(Protocol):
    """Blob storage keyed by job id."""

    def put_image(self, job_id: str, index: int, data: bytes, ttl_s: int) -> None:
        """Store output image ``index`` of a job (encoded bytes)."""

    def get_image(self, job_id: str, index: int) -> bytes | None:
        """Encoded bytes of output image ``index``, or None if absent or expired."""

    def put_input(self, job_id: str, name: str, data: bytes, ttl_s: int) -> None:
        """Store an uploaded input (``image`` / ``mask``) of a job."""

    def get_input(self, job_id: str, name: str) -> bytes | None:
        """The bytes stored by :meth:`put_input`, or None."""

    def expire_job(self, job_id: str, n_images: int, ttl_s: int) -> None:
        """Make every blob of a finished job expire after ``ttl_s`` seconds."""


class RedisResultStore:
    """:class:`ResultStore` on a Redis connection; every blob has a TTL."""

    def __init__(self, connection: redis.Redis, keys: Keys) -> None:
        self._redis = connection
        self._keys = keys

    def put_image(self, job_id: str, index: int, data: bytes, ttl_s: int) -> None:
        self._redis.set(self._keys.image(job_id, index), data, ex=ttl_s)

    def get_image(self, job_id: str, index: int) -> bytes | None:
        if not is_job_id(job_id):
            return None
        return self._redis.get(self._keys.image(job_id, index))

    def put_input(self, job_id: str, name: str, data: bytes, ttl_s: int) -> None:
        self._redis.set(self._keys.input(job_id, name), data, ex=ttl_s)

    def get_input(self, job_id: str, name: str) -> bytes | None:
        if not is_job_id(job_id):
            return None
        return self._redis.get(self._keys.input(job_id, name))

    def expire_job(self, job_id: str, n_images: int, ttl_s: int) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for i in range(n_images):
            pipe.expire(self._keys.image(job_id, i), ttl_s)
        for name in ("image", "mask"):
            pipe.expire(self._keys.input(job_id, name), ttl_s)
        pipe.execute()
