"""s3:// artifact store via boto3: s3://BUCKET[/PREFIX], any S3-compatible endpoint."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

from edgefleet.cloud.artifacts.base import ArtifactStore, check_digest
from edgefleet.protos.errors import InvalidArgument, NotFound, Unauthenticated, Unavailable

_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
_AUTH = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"}


class S3ArtifactStore(ArtifactStore):
    def __init__(self, uri: str, *, endpoint_url: str = "", **_: object) -> None:
        import boto3
        from botocore.config import Config

        parsed = urlparse(uri)
        if not parsed.netloc:
            raise InvalidArgument(
                f"artifact store {uri!r}: no bucket; expected s3://BUCKET[/PREFIX]"
            )
        self.uri = uri.rstrip("/")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.endpoint = endpoint_url or "AWS default endpoint"
        self._client: Any = boto3.client(
            "s3",
            endpoint_url=endpoint_url or None,
            config=Config(
                connect_timeout=5, read_timeout=30, retries={"max_attempts": 3, "mode": "standard"}
            ),
        )

    def _key(self, sha256: str) -> str:
        check_digest(sha256)
        key = f"sha256/{sha256[:2]}/{sha256}"
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, what: str, fn: Any, **kw: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        try:
            return fn(Bucket=self.bucket, **kw)
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in _NOT_FOUND:
                raise NotFound(f"{what}: not in artifact store {self.uri}") from None
            if code == "NoSuchBucket":
                raise NotFound(
                    f"artifact store {self.uri}: bucket {self.bucket!r} does not exist at {self.endpoint}"
                ) from None
            if code in _AUTH:
                raise Unauthenticated(
                    f"artifact store {self.uri} at {self.endpoint}: access denied ({code})"
                ) from None
            raise Unavailable(
                f"artifact store {self.uri} at {self.endpoint}: {what}: {code} {e}"
            ) from e
        except NoCredentialsError:
            raise Unauthenticated(
                f"artifact store {self.uri}: no AWS credentials (set AWS_ACCESS_KEY_ID/"
                "AWS_SECRET_ACCESS_KEY or a profile)"
            ) from None
        except BotoCoreError as e:
            raise Unavailable(
                f"artifact store {self.uri}: cannot reach {self.endpoint}: {e}"
            ) from None

    def check(self) -> None:
        try:
            self._call("bucket check", self._client.head_bucket)
        except NotFound:  # head_bucket's 404 carries no code: say what is missing
            raise NotFound(
                f"artifact store {self.uri}: bucket {self.bucket!r} does not exist at {self.endpoint}"
            ) from None

    def exists(self, sha256: str) -> bool:
        try:
            self._call(f"blob {sha256[:16]}…", self._client.head_object, Key=self._key(sha256))
        except NotFound:
            return False
        return True

    def _write(self, sha256: str, data: bytes) -> None:
        import base64
        import hashlib

        self._call(
            f"put blob {sha256[:16]}…",
            self._client.put_object,
            Key=self._key(sha256),
            Body=data,
            ContentType="application/octet-stream",
            ContentMD5=base64.b64encode(hashlib.md5(data).digest()).decode(),
        )

    def _read(self, sha256: str) -> bytes:
        resp = self._call(f"blob {sha256[:16]}…", self._client.get_object, Key=self._key(sha256))
        return bytes(resp["Body"].read())

    def delete(self, sha256: str) -> None:
        self._call(f"delete blob {sha256[:16]}…", self._client.delete_object, Key=self._key(sha256))
