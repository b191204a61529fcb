"""A real S3-compatible server for the tests that read object storage: moto's
server mode (``moto[server]``, the test extra) on a free 127.0.0.1 port, one per
test session, and a fresh bucket per test, reached the way a user's is (the AWS
variables and ``AWS_ENDPOINT_URL``). Import the fixtures into a test module (after
``pytest.importorskip`` of s3fs, moto.server and boto3)."""

from __future__ import annotations

import io
import socket
import uuid
from dataclasses import dataclass

import pytest
from conftest import make_image

AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """One server for the session: s3fs caches its filesystem objects, endpoint
    included, so a second server on another port would not be reached."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@dataclass
class Bucket:
    client: object
    name: str
    env: dict[str, str]

    def uri(self, key: str = "") -> str:
        return f"s3://{self.name}/{key}"

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.name, Key=key, Body=data)

    def put_image(self, key: str, seed: int, size: tuple[int, int] = (160, 120)) -> bytes:
        buf = io.BytesIO()
        make_image(seed, size).save(buf, format="JPEG", quality=90)
        self.put(key, buf.getvalue())
        return buf.getvalue()

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.name, Key=key)


@pytest.fixture
def bucket(s3_endpoint, monkeypatch) -> Bucket:
    """A fresh bucket on the local server; the AWS variables point s3fs at it."""
    env = {**AWS_ENV, "AWS_ENDPOINT_URL": s3_endpoint}
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    name = f"cbir-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=name)
    return Bucket(client, name, env)
