"""``index --ray``: decode and encode on a local Ray cluster give the catalog a plain run gives."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from mmsearch.errors import SharedMountError
from mmsearch.home import Home
from mmsearch.indexer import index_paths
from mmsearch.library import Library
from mmsearch.settings import resolve

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'mmsearch[ray]')") \
    if not os.environ.get("MMSEARCH_REQUIRE_RAY") else __import__("ray")

from mmsearch import raypipe  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def cluster():
    """One local Ray cluster for the session; its workers import this checkout and this module."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


def _home(home: Path, model: Path) -> Home:
    return Home.open(resolve(home=home, model=str(model), workers=2, batch_size=2))


def _catalog(h: Home) -> dict[str, np.ndarray]:
    states = h.catalog.image_states()
    by_id = h.catalog.vectors("image", [s.id for s in states.values()], h.dim)
    return {Path(p).name: by_id[s.id][0] if isinstance(by_id[s.id], tuple) else by_id[s.id] for p, s in states.items()}


def test_ray_run_gives_the_catalog_and_results_of_a_plain_run(cluster, photo_dir, tmp_path, tiny_model):
    (photo_dir / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    skipped: dict[str, list[str]] = {"plain": [], "ray": []}
    reports, catalogs, hits = {}, {}, {}
    for how in ("plain", "ray"):
        with _home(tmp_path / how, tiny_model) as h:
            reports[how] = index_paths(h, [photo_dir], progress=False, ray=how == "ray",
                                       on_skip=lambda p, r, how=how: skipped[how].append(f"{Path(p).name}: {r}"))
            catalogs[how] = _catalog(h)
            query = catalogs[how]["red.jpg"].astype(np.float32)  # ids follow the order batches finish in
            _, ids = h.index("image").search(query, 3)
            names = {s.id: Path(p).name for p, s in h.catalog.image_states().items()}
            hits[how] = [names[int(i)] for i in ids[0]]
    assert (reports["ray"].added, reports["ray"].skipped) == (reports["plain"].added, reports["plain"].skipped) == (6, 1)
    assert skipped["ray"] == skipped["plain"]
    assert catalogs["ray"].keys() == catalogs["plain"].keys()
    for name in catalogs["plain"]:
        np.testing.assert_allclose(catalogs["ray"][name], catalogs["plain"][name], atol=2e-3)
    assert hits["ray"] == hits["plain"]
    (photo_dir / "broken.jpg").unlink()
    (photo_dir / "red.jpg").rename(photo_dir / "renamed.jpg")
    with Library(_home(tmp_path / "ray", tiny_model)) as lib:  # the library's call, the same pipeline
        again = lib.add_images([photo_dir], ray=True)
        assert (again.added, again.reused, again.unchanged, again.removed) == (1, 1, 5, 1)  # a rename
        names = {Path(p).name for p in lib.home.catalog.image_states()}
        assert len(names) == 6 and "renamed.jpg" in names and "red.jpg" not in names


class DyingActor(raypipe.EncodeActor):
    """Kills its own process on its first batch, once per marker file: Ray must restart it and retry."""

    marker = ""

    def __call__(self, batch):
        if self.marker and not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))
            os._exit(1)
        return super().__call__(batch)


def test_killed_worker_is_retried_and_nothing_is_indexed_twice(cluster, photo_dir, tmp_path, tiny_model, monkeypatch):
    marker = tmp_path / "died"
    dying = type("Dying", (DyingActor,), {"marker": str(marker)})
    real_steps = raypipe.steps
    monkeypatch.setattr(raypipe, "steps", lambda *a, **k: real_steps(*a, **k, encoder_cls=dying))
    with _home(tmp_path / "home", tiny_model) as h:
        report = index_paths(h, [photo_dir], progress=False, ray=True)
        assert marker.exists()  # a worker did die
        assert report.added == 6 and h.catalog.count("image") == 6
        assert len(h.index("image").ids()) == 6


class BlindDecoder(raypipe.Decoder):
    """A worker on a node where the folders are not mounted: no file is there."""

    def __call__(self, batch):
        batch = dict(batch)
        batch["path"] = np.array([f"/not/mounted{p}" for p in batch["path"]])
        out = super().__call__(batch)
        out["path"] = [p.removeprefix("/not/mounted") for p in out["path"]]
        return out


def test_worker_that_cannot_read_a_file_is_a_clear_error(cluster, photo_dir, tmp_path, tiny_model, monkeypatch):
    real_steps = raypipe.steps
    monkeypatch.setattr(raypipe, "steps", lambda *a, **k: real_steps(*a, **k, decoder_cls=BlindDecoder))
    with _home(tmp_path / "home", tiny_model) as h:
        with pytest.raises(SharedMountError, match="same path on every node"):
            index_paths(h, [photo_dir], progress=False, ray=True)
        assert h.catalog.count("image") == 0


def test_ray_run_stores_the_re_rankers_token_states_a_plain_run_stores(cluster, photo_dir, tmp_path,
                                                                       untrained_rerank_model):
    from mmsearch.rerank import TokenStore

    stored = {}
    for how in ("plain", "ray"):
        with _home(tmp_path / how, untrained_rerank_model) as h:
            assert index_paths(h, [photo_dir], progress=False, ray=how == "ray").added == 6
            hashes = sorted(s.content_hash for s in h.catalog.image_states().values())
            store = TokenStore.open(h.settings.home, h.spec.canonical)
            assert store is not None
            stored[how] = dict(zip(hashes, store.get(hashes)))
    assert stored["ray"].keys() == stored["plain"].keys()
    for content_hash, plain in stored["plain"].items():
        assert plain is not None and stored["ray"][content_hash] is not None
        np.testing.assert_allclose(stored["ray"][content_hash].astype(np.float32), plain.astype(np.float32), atol=2e-3)


def test_the_pool_follows_the_cluster():
    two_cores = raypipe.plan([2.0], gpus=0)  # this machine: two lanes of one thread, as a plain run
    assert (two_cores.actors, two_cores.threads) == (2, 1)
    assert two_cores.actors * two_cores.actor_cpus + two_cores.actors * two_cores.decode_cpus <= 2
    big = raypipe.plan([64.0, 32.0], gpus=0)
    assert (big.actors, big.threads, big.gpus) == (8, 8, False)
    assert raypipe.plan([8.0], gpus=3) == raypipe.Plan(actors=3, gpus=True, actor_cpus=0, threads=0, decode_cpus=1)
