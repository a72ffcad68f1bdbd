"""The history store's pruning: the newest rows stay, and so does the served run's, however old."""

from __future__ import annotations

from pathlib import Path

from homeiq_trainer.history import HistoryStore
from homeiq_trainer.messages import RunStatus


def test_prune_keeps_the_newest_rows_and_the_served_run(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path / "history.db")
    names = []
    for i in range(15):
        run = store.create(f"run_20250101_0000{i:02d}", "m", str(tmp_path), "test", {})
        store.finish(run.id, RunStatus.COMPLETED)  # type: ignore[arg-type]
        names.append(run.run_identifier)
    open_run = store.create("run_20250101_000099", "m", str(tmp_path), "test", {})
    assert store.prune(10, protect=names[0]) == 5
    # The newest ten (the open one among them), and the served run although it is the oldest.
    assert store.identifiers() == {names[0], *names[6:], open_run.run_identifier}
    assert store.prune(10, protect=names[0]) == 0
    store.close()
