"""200 `start` commands from 10 clients inside one second: exactly one run, every other one refused."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

from homeiq_trainer.app import TrainerApp
from homeiq_trainer.history import HistoryStore

from ..conftest import Broker, record
from .conftest import CMD, RESP, STATE, Client, is_done

CLIENTS = 10
PER_CLIENT = 20


def test_burst_of_starts_gives_exactly_one_run(app: TrainerApp, broker: Broker) -> None:
    clients = [Client(broker.port, (RESP, STATE)) for _ in range(CLIENTS)]
    observer = clients[0]
    sent: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(CLIENTS)
    try:

        def fire(index: int, client: Client) -> None:
            ids = [f"c{index}-r{n}" for n in range(PER_CLIENT - 2)]
            # Two repeats per client: an automation retrying the same request must not start anything new.
            ids += [ids[0], ids[1]]
            barrier.wait()
            infos = [
                client.client.publish(CMD, json.dumps({"action": "start", "request_id": rid}), qos=1) for rid in ids
            ]
            for info in infos:
                info.wait_for_publish(5)
            with lock:
                sent.extend(ids)

        threads = [threading.Thread(target=fire, args=(i, c)) for i, c in enumerate(clients)]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - started
        assert len(sent) == CLIENTS * PER_CLIENT and elapsed < 1.0, elapsed

        deadline = time.monotonic() + 30
        while observer.count(RESP) < len(sent) and time.monotonic() < deadline:
            time.sleep(0.05)
        # Commands are answered in order: once a later one is answered, nothing more may arrive.
        marker = observer.request(CMD, RESP, {"action": "status", "request_id": "burst-marker"})
        responses = [json.loads(p) for p in observer.messages(RESP) if json.loads(p)["request_id"] != "burst-marker"]
        assert marker["status"] == "ok"
        assert len(responses) == len(sent)  # one answer per command, no more
        assert Counter(r["request_id"] for r in responses) == Counter(sent)
        accepted = {r["request_id"]: r for r in responses if r["status"] == "ok"}
        run_ids = {r["data"]["run_id"] for r in accepted.values()}
        assert len(run_ids) == 1 and len(accepted) == 1, accepted
        (winner,) = accepted
        by_id: dict[str, list[dict]] = {}
        for r in responses:
            by_id.setdefault(r["request_id"], []).append(r)
        for rid, answers in by_id.items():
            if rid == winner:
                continue
            # A repeat of a refused id is refused again, not replayed: `busy` is never remembered.
            assert all(a["error"]["code"] == "busy" and a["data"]["run_id"] in run_ids for a in answers), answers
        replays = len(by_id[winner]) - 1
        assert all(a == accepted[winner] for a in by_id[winner])  # a retry of the accepted one: same answer
        busy = len(sent) - 1 - replays

        state = observer.wait_for(STATE, is_done, timeout=120)
        assert state["state"] == "completed" and state["run_id"] in run_ids
        rows = HistoryStore(app.settings.storage.history_db).recent(50)
        assert [(r.status, r.run_identifier, r.request_id) for r in rows] == [("completed", *run_ids, winner)]
        record(
            "burst",
            f"{len(sent)} starts from {CLIENTS} clients in {elapsed:.2f} s: 1 run, "
            f"{busy} busy (repeats of a refused id included), {replays} replays of the accepted one",
        )
    finally:
        for c in clients:
            c.close()
