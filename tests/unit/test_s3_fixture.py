"""The moto S3 server fixture (tests/s3.py) answers pyarrow's S3 client through the standard AWS variables."""

from tests.s3 import list_keys, make_bucket, s3_env


def test_moto_server_serves_pyarrow(s3_endpoint, monkeypatch):
    import pyarrow.fs as pafs

    for k, v in s3_env(s3_endpoint).items():
        monkeypatch.setenv(k, v)
    make_bucket(s3_endpoint, "fixture-bucket")
    fs, path = pafs.FileSystem.from_uri("s3://fixture-bucket/dir")
    with fs.open_output_stream(f"{path}/a.txt") as f:
        f.write(b"hello")
    assert list_keys(s3_endpoint, "fixture-bucket") == ["dir/a.txt"]
