"""Model repository: versions, atomic writes, discovery without restart, safe loading."""

import json
import threading

import pytest

from latentedit.errors import FailedPrecondition, InvalidArgument, NotFound
from latentedit.models.registry import load_generator
from latentedit.repository import MANIFEST, ModelRepository


def _write(repo, name, payload="x", kind="artifact"):
    return repo.write(name, {"kind": kind, "files": {"data": "data.txt"}}, lambda d: (d / "data.txt").write_text(payload))


def test_versions_count_up_and_zero_means_newest(tmp_path):
    repo = ModelRepository(tmp_path)
    first, second = _write(repo, "thing", "a"), _write(repo, "thing", "b")
    assert (first.version, second.version) == (1, 2)
    assert repo.resolve("thing").version == 2
    assert repo.resolve("thing", 1).file("data").read_text() == "a"
    assert repo.versions("thing") == [1, 2]
    manifest = json.loads((second.path / MANIFEST).read_text())
    assert manifest["name"] == "thing" and manifest["version"] == 2 and len(manifest["sha256"]["data"]) == 64


def test_a_failed_write_leaves_nothing_behind(tmp_path):
    repo = ModelRepository(tmp_path)

    def explode(folder):
        (folder / "partial").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        repo.write("thing", {"kind": "artifact"}, explode)
    assert repo.versions("thing") == []
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_concurrent_writers_get_distinct_versions(tmp_path):
    repo = ModelRepository(tmp_path)
    threads = [threading.Thread(target=_write, args=(repo, "thing", str(i))) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert repo.versions("thing") == list(range(1, 9))
    assert sorted(repo.resolve("thing", v).file("data").read_text() for v in range(1, 9)) == [str(i) for i in range(8)]


def test_a_second_repository_object_sees_new_versions(tmp_path):
    reader, writer = ModelRepository(tmp_path), ModelRepository(tmp_path)
    _write(writer, "thing")
    assert reader.resolve("thing").version == 1
    _write(writer, "thing")
    assert reader.resolve("thing").version == 2


def test_lookup_errors_name_what_exists(tmp_path):
    repo = ModelRepository(tmp_path)
    _write(repo, "thing")
    with pytest.raises(NotFound, match="no model named 'other'; available: thing"):
        repo.resolve("other")
    with pytest.raises(NotFound, match=r"has no version 7; versions: \[1\]"):
        repo.resolve("thing", 7)
    with pytest.raises(NotFound, match="not a generator"):
        repo.resolve("thing", kind="generator")
    with pytest.raises(InvalidArgument):
        repo.resolve("thing", -1)
    with pytest.raises(InvalidArgument, match="not valid"):
        _write(repo, "../escape")


def test_generator_weights_must_be_safetensors(tmp_path):
    repo = ModelRepository(tmp_path)
    entry = repo.write(
        "pickled",
        {"kind": "generator", "architecture": "dcgan", "files": {"weights": "weights.pt"}},
        lambda d: (d / "weights.pt").write_bytes(b"not loaded"),
    )
    with pytest.raises(FailedPrecondition, match="safetensors"):
        load_generator(entry)


def test_install_is_idempotent(installed_repo):
    from latentedit.install import install_defaults

    before = installed_repo.versions("dcgan-faces")
    install_defaults(installed_repo, log=lambda _m: None)
    assert installed_repo.versions("dcgan-faces") == before == [1]


@pytest.mark.parametrize("name", ["./thing", "thing/", "..", "../thing", "a/../thing", "/abs/thing", "thing\0", "thing\n",
                                  "Thing", " thing", ".thing", "", "t" * 65, "t" * (1 << 20)])
def test_one_name_pattern_for_reads_and_writes(tmp_path, name):
    """Paths, '..', NUL, a trailing newline (which `$` lets through), upper case and over-long
    names are INVALID_ARGUMENT for reading, listing versions and writing; the message stays short."""
    repo = ModelRepository(tmp_path / "repo")
    _write(repo, "thing")
    (tmp_path / "thing" / "1").mkdir(parents=True)  # an entry outside the repository, one '..' away
    (tmp_path / "thing" / "1" / MANIFEST).write_text('{"kind": "artifact"}')
    for action in (lambda: repo.resolve(name), lambda: repo.versions(name), lambda: _write(repo, name),
                   lambda: repo.check_writable(name, "artifact")):
        with pytest.raises(InvalidArgument) as info:
            action()
        assert len(info.value.message) < 400
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["thing"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo", "thing"]


def test_a_name_holds_one_kind_and_reads_by_kind_are_never_shadowed(tmp_path):
    from latentedit.errors import AlreadyExists

    repo = ModelRepository(tmp_path)
    _write(repo, "gen", kind="generator")
    with pytest.raises(AlreadyExists, match="'gen' already holds a generator; a boundary cannot be written"):
        _write(repo, "gen", kind="boundary")
    assert repo.versions("gen") == [1] and repo.kinds("gen") == {"generator"}
    assert _write(repo, "gen", kind="generator").version == 2  # the same kind: a new version
    # A repository written before kinds were checked: v3 is a boundary.
    (tmp_path / "gen" / "3").mkdir()
    (tmp_path / "gen" / "3" / MANIFEST).write_text('{"kind": "boundary", "files": {}}')
    assert repo.resolve("gen", kind="generator").version == 2
    assert repo.resolve("gen", kind="boundary").version == 3
    assert repo.resolve("gen").version == 3
    assert "gen" in repo.names("generator") and "gen" in repo.names("boundary")
    assert [e.version for e in repo.entries("generator")] == [2]
    with pytest.raises(NotFound, match="v3 is a boundary, not a generator"):
        repo.resolve("gen", 3, kind="generator")
    with pytest.raises(NotFound, match="is a boundary, not a mapping"):
        repo.resolve("gen", kind="mapping")
    with pytest.raises(AlreadyExists):
        _write(repo, "gen", kind="generator")  # the name is mixed now: neither kind may add to it


def test_folders_outside_the_pattern_are_not_listed(tmp_path):
    repo = ModelRepository(tmp_path)
    _write(repo, "thing")
    (tmp_path / "Odd Name" / "1").mkdir(parents=True)
    (tmp_path / "Odd Name" / "1" / MANIFEST).write_text('{"kind": "artifact"}')
    assert repo.names() == ["thing"]
