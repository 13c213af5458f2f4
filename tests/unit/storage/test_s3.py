"""The S3 backend: SigV4 against AWS's published example; URL shapes.  (moto: functional tests.)"""

from __future__ import annotations

from nydus_vfs.config import S3Config
from nydus_vfs.storage.backend.s3 import EMPTY_SHA256, S3Backend, sigv4_authorization


def test_sigv4_matches_the_aws_get_object_example():
    # AWS S3 API reference, "Signature Calculations for the Authorization Header", Example: GET Object.
    auth = sigv4_authorization(
        method="GET", canonical_uri="/test.txt", canonical_query="",
        headers={"Host": "examplebucket.s3.amazonaws.com", "Range": "bytes=0-9",
                 "x-amz-content-sha256": EMPTY_SHA256, "x-amz-date": "20130524T000000Z"},
        payload_hash=EMPTY_SHA256, access_key_id="AKIAIOSFODNN7EXAMPLE",
        secret="wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", region="us-east-1", amz_date="20130524T000000Z")
    assert auth == ("AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
                    "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, "
                    "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41")


def test_urls_metrics_type_and_signed_headers():
    b = S3Backend(S3Config(endpoint="", region="eu-west-1", bucket_name="bkt", object_prefix="p/x y/",
                           access_key_id="AK", access_key_secret="SK-secret"))
    assert b._url("abc") == "https://s3.eu-west-1.amazonaws.com/bkt/p/x%20y/abc"
    assert b.metrics.backend_type == "oss"
    h = b._sign("GET", "abc", b._url("abc"), {"Range": "bytes=0-9"})
    assert h["Host"] == "s3.eu-west-1.amazonaws.com" and h["Range"] == "bytes=0-9"
    assert "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date" in h["Authorization"]
    assert "SK-secret" not in repr(b)
    anon = S3Backend(S3Config(scheme="http", endpoint="127.0.0.1:9000", region="us-east-1", bucket_name="b"))
    assert anon._url("abc") == "http://127.0.0.1:9000/b/abc"
    assert "Authorization" not in anon._sign("GET", "abc", anon._url("abc"), {})
    b.close()
    anon.close()
