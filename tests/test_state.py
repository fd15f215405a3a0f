import json
import os

from pool.state import Deployed, StateStore, file_digest


def test_digest_follows_content_even_with_mtime_restored(tmp_path) -> None:  # type: ignore[no-untyped-def]
    p = tmp_path / "m.pt"
    p.write_bytes(b"a" * 1000)
    first = file_digest(str(p))
    assert first == file_digest(str(p))  # cached
    st = os.stat(p)
    p.write_bytes(b"b" * 1000)  # same size, in place
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # like cp -p
    assert file_digest(str(p)) != first


def test_history_and_current_survive_a_new_store(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = StateStore(str(tmp_path))
    state = store.load("m")
    assert state.current is None and state.history == []
    d1, d2 = Deployed("1", "/m/1.pt", "sha256:aa"), Deployed("2", "/m/2.pt", "sha256:bb")
    store.record(state, d1, "start", "committed")
    store.record(state, d2, "upgrade", "rolled_back", reason="warmup: boom")
    store.record(state, d2, "upgrade", "committed")
    again = StateStore(str(tmp_path)).load("m")
    assert again.current == d2
    assert [h["seq"] for h in again.history] == [1, 2, 3]
    assert again.history[1]["reason"] == "warmup: boom"
    assert again.versions() == [d2, d1]  # committed only, newest first
    assert not [f for f in os.listdir(tmp_path / "models") if f.startswith(".tmp")]
    assert oct(os.stat(tmp_path / "models").st_mode & 0o777) == "0o700"


def test_unreadable_state_starts_fresh(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = StateStore(str(tmp_path))
    with open(tmp_path / "models" / "m.json", "w") as f:
        f.write("{not json")
    assert store.load("m").current is None
    store.save(store.load("m"))
    with open(tmp_path / "models" / "m.json") as f:
        assert json.load(f)["model"] == "m"
