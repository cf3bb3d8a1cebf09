"""The replica records' writer: off the event loop, in order, latest version wins."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import trio

from skr8tr.node.records import RecordWriter, read_records, write_record


def on_disk(folder: Path) -> dict[str, dict]:
    return {replica: record for replica, record in read_records(str(folder))}


async def test_put_then_flush_writes_the_latest_version_and_removals(tmp_path: Path) -> None:
    writer = RecordWriter(str(tmp_path))
    record = {"replica": "r1", "state": "running"}
    writer.put("r1", record)
    record["state"] = "mutated after put"  # the writer encoded it at put() time
    writer.put("r2", {"replica": "r2", "state": "running"})
    writer.put("r2", {"replica": "r2", "state": "ready"})  # replaces the queued one
    assert on_disk(tmp_path) == {}  # nothing happens before the writer runs
    await writer.flush()
    assert on_disk(tmp_path) == {"r1": {"replica": "r1", "state": "running"},
                                 "r2": {"replica": "r2", "state": "ready"}}
    writer.put("r1", None)
    writer.put("gone", None)  # removing a record that was never written is fine
    await writer.flush()
    assert on_disk(tmp_path) == {"r2": {"replica": "r2", "state": "ready"}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r2.json"]  # no temporary files


async def test_the_writer_task_writes_without_being_asked(tmp_path: Path) -> None:
    writer = RecordWriter(str(tmp_path))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run)
        writer.put("r1", {"n": 1})
        with trio.fail_after(10):
            while not (tmp_path / "r1.json").exists():
                await trio.sleep(0.005)
        # A put right after another one and a flush: flush also waits for the batch
        # the task may have under way, so the last version is on disk when it returns.
        for n in range(2, 50):
            writer.put("r1", {"n": n})
            if n % 7 == 0:
                await trio.sleep(0)
        await writer.flush()
        assert json.loads((tmp_path / "r1.json").read_text()) == {"n": 49}
        nursery.cancel_scope.cancel()


async def test_a_failed_write_is_logged_and_the_writer_goes_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="skr8tr.node")
    missing = tmp_path / "missing"
    writer = RecordWriter(str(missing))
    writer.put("r1", {"n": 1})
    await writer.flush()
    assert any("r1: cannot write its record" in r.getMessage() for r in caplog.records)
    missing.mkdir()
    writer.put("r2", {"n": 2})
    await writer.flush()
    assert on_disk(missing) == {"r2": {"n": 2}}


def test_write_record_replaces_atomically(tmp_path: Path) -> None:
    write_record(str(tmp_path), "r1", {"n": 1})
    write_record(str(tmp_path), "r1", {"n": 2})
    assert on_disk(tmp_path) == {"r1": {"n": 2}}
    assert [p.name for p in tmp_path.iterdir()] == ["r1.json"]


@pytest.mark.parametrize("rounds", range(6))
async def test_a_record_queued_when_the_writer_is_cancelled_is_still_written(
        tmp_path: Path, rounds: int) -> None:
    """The agent shutting down cancels the writer task at any point of a batch (sweep
    it across the first scheduling rounds); the flush that follows still writes."""
    writer = RecordWriter(str(tmp_path))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run)
        await trio.sleep(0)
        writer.put("r1", {"n": 1})
        for _ in range(rounds):
            await trio.sleep(0)
        nursery.cancel_scope.cancel()
    await writer.flush()
    assert on_disk(tmp_path) == {"r1": {"n": 1}}

