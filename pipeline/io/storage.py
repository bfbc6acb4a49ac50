"""file:// and s3:// storage with atomic writes (no Ray here).

A local write goes to a temporary file in the same folder, is fsynced and then
renamed over the target, so a reader never sees a partial file. An S3 PUT is
atomic by itself.
"""

from __future__ import annotations

import io
import os
import uuid
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

__all__ = ["Location", "open_location"]


@dataclass
class Location:
    """A folder on the local disk or in S3, addressed by a URI."""

    uri: str
    fs: pafs.FileSystem
    root: str
    local: bool
    s3_client: object = None

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def write_parquet(self, relative: str, table: pa.Table) -> str:
        """Write ``table`` to ``relative`` atomically (see ``write_bytes``); returns the full path."""
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        return self.write_bytes(relative, buf.getvalue())

    def write_bytes(self, relative: str, data: bytes) -> str:
        """Write ``data`` to ``relative`` atomically (temp + fsync + rename, or one PUT)."""
        target = self.path(relative)
        if self.local:
            folder = os.path.dirname(target)
            os.makedirs(folder, exist_ok=True)
            tmp = os.path.join(folder, f".{os.path.basename(target)}.{uuid.uuid4().hex}.tmp")
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:
            bucket, _, key = target.partition("/")
            self.s3_client.put_object(Bucket=bucket, Key=key, Body=data)
        return target

    def read_bytes(self, relative: str) -> bytes | None:
        """Contents of ``relative``; None when it does not exist."""
        target = self.path(relative)
        if self.local:
            try:
                with open(target, "rb") as f:
                    return f.read()
            except FileNotFoundError:
                return None
        bucket, _, key = target.partition("/")
        try:
            return self.s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except self.s3_client.exceptions.NoSuchKey:
            return None

    def list(self, relative: str) -> list[str]:
        """Paths (relative to this location) of every file under ``relative``."""
        base = self.path(relative)
        if self.local:
            out = []
            for folder, _, names in os.walk(base):
                out.extend(os.path.relpath(os.path.join(folder, n), self.root) for n in names if not n.startswith("."))
            return sorted(out)
        bucket, _, prefix = base.partition("/")
        root_prefix = self.root.partition("/")[2]
        out = []
        for page in self.s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/"):
            for obj in page.get("Contents", []):
                out.append(obj["Key"][len(root_prefix):].lstrip("/") if root_prefix else obj["Key"])
        return sorted(out)

    def delete(self, relative: str) -> None:
        """Delete every file under ``relative`` (a folder) and the folder."""
        base = self.path(relative)
        if self.local:
            import shutil

            shutil.rmtree(base, ignore_errors=True)
            return
        bucket = base.partition("/")[0]
        keys = [self.path(r).partition("/")[2] for r in self.list(relative)]
        for i in range(0, len(keys), 1000):
            self.s3_client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]]})

    def read_parquet(self, relative: str = "") -> pa.Table | None:
        """Read every Parquet file under ``relative`` (None when there is none)."""
        base = self.path(relative) if relative else self.root
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        except FileNotFoundError:
            return None
        files = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet")
                       and not os.path.basename(i.path).startswith("."))
        if not files:
            return None
        return pa.concat_tables([pq.read_table(f, filesystem=self.fs) for f in files], promote_options="default")


def open_location(uri: str, s3_endpoint_url: str | None = None, s3_region: str | None = None) -> Location:
    """Open ``file://path`` (relative paths are taken from the working directory) or ``s3://bucket/prefix``."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        path = (parsed.netloc + parsed.path) if parsed.netloc not in ("", "localhost") else parsed.path
        path = os.path.abspath(path)
        os.makedirs(path, exist_ok=True)
        return Location(uri, pafs.LocalFileSystem(), path, True)
    if parsed.scheme == "s3":
        endpoint = s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = s3_region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        kwargs = {"region": region}
        if endpoint:
            ep = urlparse(endpoint)
            kwargs["endpoint_override"] = ep.netloc or ep.path
            kwargs["scheme"] = ep.scheme or "https"
        fs = pafs.S3FileSystem(**kwargs)
        import boto3
        from botocore.config import Config

        # bounded: a store that is down must fail a write in seconds, not hang a worker
        cfg = Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 3, "mode": "standard"})
        client = boto3.client("s3", endpoint_url=endpoint, region_name=region, config=cfg)
        return Location(uri, fs, f"{parsed.netloc}{parsed.path}".rstrip("/"), False, client)
    raise ValueError(f"{uri!r}: storage URIs start with file:// or s3://")
