"""The etcd client's own promises: store URLs, prefix ranges, watches that end with an
error when etcd cancels them, and one-line errors for what etcd refuses."""

from __future__ import annotations

import pytest
import trio

from skr8tr.conductor.etcd_client import (
    Compare,
    EtcdClient,
    EtcdError,
    Put,
    _prefix_end,
    endpoints_from_url,
)
from tests.etcd import Etcd, etcd_fixture  # noqa: F401 - the fixture

DEADLINE_S = 20


@pytest.mark.parametrize(("url", "expected"), [
    ("etcd://127.0.0.1:2379", ["http://127.0.0.1:2379"]),
    ("etcd://a:1,b:2", ["http://a:1", "http://b:2"]),
    ("etcd://[::1]:2379", ["http://[::1]:2379"]),
])
def test_store_urls_name_the_endpoints(url, expected):
    assert endpoints_from_url(url) == expected


@pytest.mark.parametrize("url", ["http://a:1", "etcd://", "etcd://a", "etcd://a:0",
                                 "etcd://a:1,", "etcd://:1", "etcd://a:x"])
def test_other_urls_are_refused(url):
    with pytest.raises(ValueError, match="etcd"):
        endpoints_from_url(url)


@pytest.mark.parametrize(("prefix", "end"), [(b"/a/", b"/a0"), (b"a\xff", b"b"),
                                             (b"\xff", b"\x00")])
def test_a_prefix_ends_at_the_first_key_after_it(prefix, end):
    assert _prefix_end(prefix) == end


async def test_etcd_refusals_are_one_line_errors_with_their_code(etcd: Etcd):
    with trio.fail_after(DEADLINE_S):
        async with EtcdClient([etcd.url]) as client:
            with pytest.raises(EtcdError, match="duplicate key") as caught:
                await client.txn([], [Put("/k", b"1"), Put("/k", b"2")])
            assert caught.value.code == 3 and "\n" not in str(caught.value)
            await client.revoke(12345)  # a lease that is gone is no error
            assert await client.keepalive(12345) == 0


async def test_a_watch_from_a_compacted_revision_ends_with_an_error(etcd: Etcd):
    with trio.fail_after(DEADLINE_S):
        async with EtcdClient([etcd.url]) as client:
            for i in range(3):
                revision = await client.put("/k", str(i).encode())
            await client._call("/v3/kv/compaction", {"revision": str(revision)})
            with pytest.raises(EtcdError, match="compacted"):
                async with client.watch("/k", start_revision=1) as batches:
                    async for _ in batches:
                        continue  # drained until the error the compaction causes
            async with client.watch("/k", start_revision=revision) as batches:
                async for events in batches:
                    assert [e.kv.value for e in events] == [b"2"]
                    break
            result = await client.txn([Compare.value("/k", b"2")], [Put("/k", b"3")])
            assert result.succeeded and result.revision == revision + 1
