"""The S3 backend against moto in server mode with authentication on (SigV4 checked by moto)."""

from __future__ import annotations

import asyncio
import os

import pytest

from nydus_vfs.config import S3Config
from nydus_vfs.errors import BackendError, BackendNotFoundError
from nydus_vfs.storage.backend.base import RetryPolicy
from nydus_vfs.storage.backend.s3 import S3Backend
from tests.functional.registry_helpers import MotoS3

DATA = os.urandom(200_000)
BLOB = "5" * 64


def _run(cfg: S3Config, body):
    async def main():
        b = S3Backend(cfg, retry=RetryPolicy(retry_limit=1, base_delay=0.05))
        try:
            return await body(b)
        finally:
            await b.aclose()

    return asyncio.run(main())


def test_signed_reads_from_moto(tmp_path):
    with MotoS3(tmp_path) as moto:
        s3 = moto.client("s3", moto.key_id, moto.secret)
        s3.create_bucket(Bucket="nydus")
        s3.put_object(Bucket="nydus", Key=f"blobs/{BLOB}", Body=DATA)
        cfg = S3Config(scheme="http", endpoint=moto.endpoint, region="us-east-1", bucket_name="nydus",
                       object_prefix="blobs/", access_key_id=moto.key_id, access_key_secret=moto.secret,
                       timeout=10)

        async def reads(b):
            assert await b.read(BLOB, 0, 4096) == DATA[:4096]
            assert await b.read(BLOB, 150_000, 50_000) == DATA[150_000:]
            assert await b.blob_size(BLOB) == len(DATA)
            with pytest.raises(BackendNotFoundError):
                await b.read("6" * 64, 0, 10)
            with pytest.raises(BackendError, match="past the end|416"):
                await b.read(BLOB, len(DATA) - 5, 10)
            assert b.metrics.backend_type == "oss" and b.metrics.read_count == 2

        _run(cfg, reads)

        async def refused(b):
            with pytest.raises(BackendError, match="HTTP 403") as info:
                await b.read(BLOB, 0, 10)
            assert not info.value.retryable

        bad = S3Config(scheme="http", endpoint=moto.endpoint, region="us-east-1", bucket_name="nydus",
                       object_prefix="blobs/", access_key_id=moto.key_id, access_key_secret="wrong-secret")
        _run(bad, refused)
        anonymous = S3Config(scheme="http", endpoint=moto.endpoint, region="us-east-1", bucket_name="nydus",
                             object_prefix="blobs/")
        _run(anonymous, refused)
