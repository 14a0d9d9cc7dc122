"""Base shards from the Hub, downloaded as the merge reaches them.

A pass asks for each base shard before it reads it. The shard is downloaded into the Hub
cache then (or found there), and the next one is downloaded in the background meanwhile, so
the download overlaps the merge and at most two base shards wait on disk. In disk-bounded
mode (every job of the pass deletes its output after uploading it) each shard this run
downloaded is deleted from the cache once every job has written it; shards that were in the
cache before the run stay.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from ..inputs import hub
from ..planning.model import Plan, ShardPlan


class Fetcher:
    """Nothing to fetch: a local base."""

    def fetch(self, shard: ShardPlan) -> Path:
        return Path(shard.source)

    def done(self, shard: ShardPlan) -> None:
        return None

    def close(self) -> None:
        return None


class HubFetcher(Fetcher):
    """Base shards by the names of their files in the repo; several output shards may be read
    from one (``--max-shard-size``), which is dropped after the last of them."""

    def __init__(self, plan: Plan, repo_id: str, drop: bool) -> None:
        self.repo_id = repo_id
        self.commit = str(plan.base_commit)
        sources = [Path(shard.source).name for shard in plan.shards]
        self.order = list(dict.fromkeys(sources))
        self.left = {name: sources.count(name) for name in self.order}  # output shards still to write
        self.drop = drop
        self.before = {name for name in self.order if hub.cached(repo_id, self.commit, name) is not None}
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shardmerge-fetch")
        self.pending: dict[str, Future[Path]] = {}

    def fetch(self, shard: ShardPlan) -> Path:
        """Have ``shard``'s base shard on disk before it is read (where this machine's cache
        holds it); start downloading the next one."""
        name = Path(shard.source).name
        path = self._start(name).result()
        position = self.order.index(name)
        if position + 1 < len(self.order):
            self._start(self.order[position + 1])
        return path

    def done(self, shard: ShardPlan) -> None:
        """Every job has written ``shard``: once that is so of every output shard read from its
        base shard, drop that from the cache when this run fetched it."""
        name = Path(shard.source).name
        self.left[name] -= 1
        if self.left[name] > 0:
            return
        fetched = self.pending.pop(name, None)
        if not self.drop or name in self.before or fetched is None:
            return
        link = fetched.result()
        blob = link.resolve()
        link.unlink(missing_ok=True)
        if blob != link:
            blob.unlink(missing_ok=True)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def _start(self, name: str) -> Future[Path]:
        if name not in self.pending:
            self.pending[name] = self.pool.submit(hub.download, self.repo_id, self.commit, name)
        return self.pending[name]


def fetcher_for(plan: Plan, drop: bool) -> Fetcher:
    """The fetcher for a pass over ``plan``'s base; ``drop``: every job of the pass deletes its
    output after uploading it, so the shards this run downloads are deleted once written."""
    if plan.base_repo is None or hub.offline():
        return Fetcher()
    return HubFetcher(plan, plan.base_repo, drop)
