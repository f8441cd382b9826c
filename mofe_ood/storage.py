"""S3-compatible storage (SeaweedFS locally, MinIO or S3 on a cluster): where it is, and is it usable.

Every setting comes from the environment, so the same code runs against
`infra/services.sh` on a workstation and against the cluster's Secret in a
Kubeflow step. boto3 is imported inside functions: the ML core imports without it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from mofe_ood.errors import UserError

DEFAULT_ENDPOINT = "http://127.0.0.1:8333"
DEFAULT_BUCKET = "mofe-ood"
DEFAULT_REGION = "us-east-1"


class StorageError(UserError):
    """The object store cannot be used; the message names the endpoint, the bucket and the fix."""


# The fix for missing or wrong credentials against the local server: boto3's and DVC's own
# message ("Unable to locate credentials") names neither the server nor the command.
LOCAL_HINT = "for the local server: make services && eval \"$(infra/services.sh env)\""


def no_credentials(where: str) -> StorageError:
    return StorageError(f"no S3 credentials for {where}: set AWS_ACCESS_KEY_ID and "
                        f"AWS_SECRET_ACCESS_KEY ({LOCAL_HINT})")


@dataclass(frozen=True)
class S3Settings:
    endpoint_url: str
    bucket: str
    access_key_id: str | None = None
    secret_access_key: str | None = field(default=None, repr=False)
    region: str = DEFAULT_REGION

    def where(self) -> str:
        return f"bucket {self.bucket!r} at {self.endpoint_url}"


def _env(env: Mapping[str, str], *names: str) -> str | None:
    for name in names:
        if env.get(name):
            return env[name]
    return None


def s3_settings(endpoint: str | None = None, bucket: str | None = None,
                env: Mapping[str, str] | None = None) -> S3Settings:
    """Endpoint, bucket and credentials: explicit arguments, then the environment, then the local defaults.

    Endpoint: S3_ENDPOINT_URL, else MLFLOW_S3_ENDPOINT_URL (what MLflow reads), else
    the local SeaweedFS. Bucket: S3_BUCKET. Credentials: AWS_ACCESS_KEY_ID /
    AWS_SECRET_ACCESS_KEY (never a file in the repository).
    """
    env = os.environ if env is None else env
    return S3Settings(
        endpoint_url=endpoint or _env(env, "S3_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL") or DEFAULT_ENDPOINT,
        bucket=bucket or _env(env, "S3_BUCKET") or DEFAULT_BUCKET,
        access_key_id=_env(env, "AWS_ACCESS_KEY_ID"),
        secret_access_key=_env(env, "AWS_SECRET_ACCESS_KEY"),
        region=_env(env, "AWS_REGION", "AWS_DEFAULT_REGION") or DEFAULT_REGION,
    )


def s3_client(settings: S3Settings | None = None, *, connect_timeout: float = 5.0,
              read_timeout: float = 60.0, max_attempts: int = 3):
    """A boto3 S3 client for `settings` (default: the environment's), path-style as SeaweedFS and MinIO want."""
    import boto3
    from botocore.config import Config

    settings = settings or s3_settings()
    config = Config(connect_timeout=connect_timeout, read_timeout=read_timeout,
                    retries={"max_attempts": max_attempts, "mode": "standard"},
                    s3={"addressing_style": "path"})
    try:
        return boto3.client("s3", endpoint_url=settings.endpoint_url, region_name=settings.region,
                            aws_access_key_id=settings.access_key_id,
                            aws_secret_access_key=settings.secret_access_key, config=config)
    except ValueError as err:  # botocore rejects a malformed endpoint URL here
        raise StorageError(f"S3 endpoint {settings.endpoint_url!r} is not a valid URL "
                           f"(bucket {settings.bucket!r}): {err}") from None


_BAD_CREDENTIALS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
                    "ExpiredToken", "AuthorizationHeaderMalformed"}
_NO_BUCKET = {"NoSuchBucket"}
_DENIED = {"AccessDenied", "AllAccessDisabled"}


def check_s3(endpoint: str | None = None, bucket: str | None = None, *,
             timeout: float = 5.0) -> S3Settings:
    """Fail in seconds with one clear line if the bucket cannot be listed; return the settings used.

    Raises StorageError for a server that is down or unreachable, missing or wrong
    credentials, a bucket that does not exist, or access denied.
    """
    from botocore.exceptions import (BotoCoreError, ClientError, ConnectTimeoutError,
                                     EndpointConnectionError, NoCredentialsError,
                                     ReadTimeoutError)

    settings = s3_settings(endpoint, bucket)
    where = settings.where()
    local_hint = LOCAL_HINT
    if not (settings.access_key_id and settings.secret_access_key):
        raise no_credentials(where)
    # One attempt with short timeouts: a health check must not spend minutes retrying.
    client = s3_client(settings, connect_timeout=timeout, read_timeout=timeout, max_attempts=1)
    try:
        # Listing (not HEAD) because its error body says *why* (bad key vs. no bucket).
        client.list_objects_v2(Bucket=settings.bucket, MaxKeys=1)
    except (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError) as err:
        raise StorageError(f"S3 server for {where} is not reachable ({type(err).__name__}); "
                           f"is it running? ({local_hint}; elsewhere set S3_ENDPOINT_URL)") from None
    except NoCredentialsError:
        raise no_credentials(where) from None
    except ClientError as err:
        code = str(err.response.get("Error", {}).get("Code", ""))
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if not code or code.isdigit():
            # No S3 error document: something other than an S3 server answered (a proxy, a web app).
            raise StorageError(f"the server at {settings.endpoint_url} answered HTTP {status} for bucket "
                               f"{settings.bucket!r} without an S3 error: is S3_ENDPOINT_URL an S3 "
                               f"endpoint?") from None
        if code in _BAD_CREDENTIALS:
            raise StorageError(f"S3 server rejected the credentials for {where} ({code}): check "
                               f"AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY ({local_hint})") from None
        if code in _NO_BUCKET:
            raise StorageError(f"{where} does not exist: create it or set S3_BUCKET to an existing "
                               f"bucket (infra/services.sh creates $S3_BUCKET on start)") from None
        if code in _DENIED:
            raise StorageError(f"access denied to {where} ({code}): the credentials in "
                               f"AWS_ACCESS_KEY_ID lack permission to list it") from None
        message = err.response.get("Error", {}).get("Message") or "no message"
        raise StorageError(f"S3 request to {where} failed: {code} (HTTP {status}): {message}") from None
    except BotoCoreError as err:
        raise StorageError(f"S3 request to {where} failed: {err}") from None
    return settings


# ---------------------------------------------------------------- s3:// URIs (raw data for `prepare`)

def is_s3(uri: object) -> bool:
    return isinstance(uri, str) and uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/key` -> ("bucket", "some/key"); the key may be empty (the whole bucket)."""
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not is_s3(uri) or not bucket:
        raise StorageError(f"{uri!r} is not an s3:// URI with a bucket (s3://BUCKET/KEY)")
    return bucket, key


def download(uri: str, dest: str | Path, what: str = "") -> Path:
    """Copy the object `uri`, or every object under the prefix `uri/`, into the folder `dest`.

    The endpoint and credentials are the environment's (s3_settings). A prefix keeps its
    layout below `dest` (an ImageFolder arrives as an ImageFolder). Raises StorageError
    naming the bucket and key when nothing is there; returns `dest`.
    """
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    bucket, key = split_s3(uri)
    settings = s3_settings(bucket=bucket)
    client = s3_client(settings)
    dest = Path(dest)
    label = f"{what}: " if what else ""
    prefix = key.rstrip("/") + "/" if key else ""
    try:
        keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
                for o in page.get("Contents", []) if not o["Key"].endswith("/")]
        if not keys and key:  # not a prefix: one object
            client.head_object(Bucket=bucket, Key=key)
            keys, prefix = [key], key[:key.rfind("/") + 1]
        if not keys:
            raise StorageError(f"{label}nothing under s3://{bucket}/{key} (bucket {bucket!r}, "
                               f"key {key!r}) at {settings.endpoint_url}")
        for name in keys:
            target = dest / name[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, name, str(target))
    except ClientError as err:
        code = str(err.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchKey", "NotFound"):
            raise StorageError(f"{label}no object s3://{bucket}/{key} (bucket {bucket!r}, key {key!r}) "
                               f"at {settings.endpoint_url}") from None
        if code in _NO_BUCKET:
            raise StorageError(f"{label}bucket {bucket!r} does not exist at {settings.endpoint_url} "
                               f"(key {key!r})") from None
        raise StorageError(f"{label}reading s3://{bucket}/{key} at {settings.endpoint_url} failed: "
                           f"{code or err}") from None
    except NoCredentialsError:
        raise StorageError(f"{label}reading s3://{bucket}/{key}: {no_credentials(settings.where())}") from None
    except BotoCoreError as err:
        raise StorageError(f"{label}reading s3://{bucket}/{key} at {settings.endpoint_url} failed: {err}") from None
    return dest


def upload(src: str | Path, uri: str) -> list[str]:
    """Copy the file `src`, or every file below the folder `src`, to `uri` (a key or prefix)."""
    bucket, key = split_s3(uri)
    client = s3_client(s3_settings(bucket=bucket))
    src = Path(src)
    files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
    if not files:
        raise FileNotFoundError(f"nothing to upload in {str(src)!r}")
    keys = []
    for path in files:
        name = key if src.is_file() else f"{key.rstrip('/')}/{path.relative_to(src).as_posix()}".lstrip("/")
        client.upload_file(str(path), bucket, name)
        keys.append(f"s3://{bucket}/{name}")
    return keys
