"""Shared fixtures: a tiny random Llama with a locally trained tokenizer (built once per session)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import logging  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from toss_core.config import TinyModelConfig
    from toss_core.models import build_tiny_model

    return build_tiny_model(TinyModelConfig(seed=0), tmp_path_factory.mktemp("tiny") / "model")


# ---- S3 through a local moto server (the way s3fs tests itself) --------------------------------------

@pytest.fixture(scope="module")
def s3_endpoint():
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    import s3fs

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            endpoint = f"http://{host}:{port}"
            # moto keeps its buckets in the process: a later module's server already has it
            s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}).makedirs("bucket", exist_ok=True)
            yield endpoint
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
            server.stop()


@pytest.fixture
def s3_store(s3_endpoint, request, tmp_path):
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    from toss_core.store import ArtifactStore

    url = f"s3://bucket/{request.node.name.replace('[', '-').rstrip(']')}"
    return ArtifactStore(url, {"client_kwargs": {"endpoint_url": s3_endpoint}}, cache_dir=tmp_path / "cache")
