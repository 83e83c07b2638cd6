"""Shard downloads against a local fake hub: only a shard's files (of a GGUF, only its layers'
byte ranges), resume, integrity, errors, one download for concurrent callers, offline mode, the
Hugging Face cache, seeding, progress."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import gguf
import numpy as np
import pytest

from exo.download.download_progress import RepoProgressEvent
from exo.download.new_shard_download import (
    HfShardDownloader,
    delete_model,
    ensure_downloads_dir,
    ensure_exo_home,
    new_shard_downloader,
    seed_models,
)
from exo.download.shard_download import NoopShardDownloader, ShardDownloader
from exo.errors import (
    HubConnectionError,
    IntegrityError,
    InvalidModelError,
    ModelNotFoundError,
    OfflineError,
    UnauthorizedError,
)
from exo.helpers import AsyncCallbackSystem
from exo.inference.candle import CandleInferenceEngine
from exo.inference.shard import Shard
from exo.inference.tokenizers import resolve_tokenizer
from exo.models import build_base_shard_async
from exo.testing.synth import write_model
from exo.testing.synth_gguf import write_gguf
from support.cluster import running_cluster
from support.fake_hub import COMMIT, FakeHub, FakeHubServer

TIED = "synth/tiny-llama"
UNTIED = "synth/tiny-llama-untied"
FILES = [f"model-{i:05d}-of-00004.safetensors" for i in range(1, 5)]
METADATA = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("synth")
    return {
        TIED: write_model("tiny-llama", root / "tied", dtype="f32", num_shards=4),
        UNTIED: write_model("tiny-llama-untied", root / "untied", dtype="f32", num_shards=4),
    }


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private EXO_HOME and an empty Hugging Face cache; no token, online. The downloads directory in it."""
    monkeypatch.setenv("EXO_HOME", str(tmp_path / "exo"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    for name in ("HF_TOKEN", "HF_HUB_OFFLINE", "HF_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "exo" / "downloads"


@pytest.fixture
def hub(models: dict[str, Path], env: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    server = FakeHubServer()
    with server as hub:
        for repo, path in models.items():
            hub.add_repo(repo, path)
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield hub


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("repo", "start", "end", "expected"),
    [
        (TIED, 0, 0, {FILES[0]}),
        (TIED, 1, 2, {FILES[1], FILES[2]}),
        (TIED, 3, 3, {FILES[3], FILES[0]}),  # the tied head needs the embeddings from the first file
        (UNTIED, 3, 3, {FILES[3]}),
        (UNTIED, 0, 3, set(FILES)),
    ],
)
async def test_a_shard_fetches_only_its_files(
    hub: FakeHub, models: dict[str, Path], env: Path, repo: str, start: int, end: int, expected: set[str]
) -> None:
    path = await HfShardDownloader().ensure_shard(Shard(repo, start, end, 4), "CandleInferenceEngine")
    assert path == env / repo.replace("/", "--")
    assert hub.fetched_weights() == expected
    assert {p.name for p in path.iterdir()} == METADATA | {"model.safetensors.index.json"} | expected
    for name in expected:
        assert _sha256(path / name) == _sha256(models[repo] / name)
    assert not list(path.glob("*.partial"))


async def test_an_interrupted_transfer_resumes_with_a_range_request(hub: FakeHub, models: dict[str, Path]) -> None:
    hub.cut_once.add(FILES[1])
    path = await HfShardDownloader().ensure_shard(Shard(TIED, 1, 1, 4), "candle")
    gets = hub.file_gets(FILES[1])
    assert len(gets) == 2 and gets[0].range is None
    size = (models[TIED] / FILES[1]).stat().st_size
    assert gets[1].range == f"bytes={size // 2}-"
    assert _sha256(path / FILES[1]) == _sha256(models[TIED] / FILES[1])


async def test_a_partial_file_left_by_an_earlier_run_is_resumed(
    hub: FakeHub, models: dict[str, Path], env: Path
) -> None:
    target = env / "synth--tiny-llama"
    target.mkdir(parents=True)
    data = (models[TIED] / FILES[2]).read_bytes()
    (target / f"{FILES[2]}.partial").write_bytes(data[:1000])
    await HfShardDownloader().ensure_shard(Shard(TIED, 2, 2, 4), "candle")
    assert [g.range for g in hub.file_gets(FILES[2])] == ["bytes=1000-"]
    assert (target / FILES[2]).read_bytes() == data


async def test_a_corrupted_download_is_detected_and_not_kept(hub: FakeHub, env: Path) -> None:
    hub.corrupt.add(FILES[0])
    with pytest.raises(IntegrityError, match=f"{FILES[0]}.*SHA-256"):
        await HfShardDownloader().ensure_shard(Shard(TIED, 0, 0, 4), "candle")
    target = env / "synth--tiny-llama"
    assert not (target / FILES[0]).exists() and not (target / f"{FILES[0]}.partial").exists()
    hub.corrupt.clear()
    await HfShardDownloader().ensure_shard(Shard(TIED, 0, 0, 4), "candle")
    assert (target / FILES[0]).exists()


async def test_a_bare_listing_takes_sizes_and_hashes_from_head(hub: FakeHub, models: dict[str, Path]) -> None:
    hub.bare_listing = True
    path = await HfShardDownloader().ensure_shard(Shard(UNTIED, 0, 0, 4), "candle")
    heads = {r.path.rsplit("/", 1)[-1] for r in hub.requests if r.method == "HEAD"}
    assert {FILES[0], "config.json", "tokenizer.json"} <= heads
    assert _sha256(path / FILES[0]) == _sha256(models[UNTIED] / FILES[0])
    # The hashes from HEAD are checked too.
    hub.corrupt.add(FILES[1])
    with pytest.raises(IntegrityError, match=FILES[1]):
        await HfShardDownloader().ensure_shard(Shard(UNTIED, 1, 1, 4), "candle")


async def test_missing_repositories_and_files_give_not_found(hub: FakeHub) -> None:
    with pytest.raises(ModelNotFoundError, match="synth/nope"):
        await HfShardDownloader().ensure_shard(Shard("synth/nope", 0, 0, 1), "candle")
    hub.missing_files.add(FILES[0])
    with pytest.raises(ModelNotFoundError, match=FILES[0]):
        await HfShardDownloader().ensure_shard(Shard(TIED, 0, 0, 4), "candle")
    with pytest.raises(InvalidModelError, match="no-such-model"):
        await HfShardDownloader().ensure_shard(Shard("no-such-model", 0, 0, 1), "candle")
    with pytest.raises(InvalidModelError, match="'deepseek-v3' is a deepseek_v3 model, and the candle engine"):
        await HfShardDownloader().ensure_shard(Shard("deepseek-v3", 0, 0, 61), "candle")


async def test_a_gated_repository_needs_the_token(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    hub.token = "secret-token"
    with pytest.raises(UnauthorizedError, match="HF_TOKEN"):
        await HfShardDownloader().ensure_shard(Shard(TIED, 0, 0, 4), "candle")
    monkeypatch.setenv("HF_TOKEN", "wrong")
    with pytest.raises(UnauthorizedError, match="no access"):
        await HfShardDownloader().ensure_shard(Shard(TIED, 0, 0, 4), "candle")
    monkeypatch.setenv("HF_TOKEN", "secret-token")
    await HfShardDownloader().ensure_shard(Shard(TIED, 0, 0, 4), "candle")
    resolves = [r for r in hub.requests if "/resolve/" in r.path]
    assert resolves and all(r.authorization == "Bearer secret-token" for r in resolves[-3:])


async def test_an_unreachable_hub_is_a_connection_error(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    with pytest.raises(HubConnectionError, match=f"cannot reach {endpoint}"):
        await HfShardDownloader().ensure_shard(Shard(TIED, 0, 0, 4), "candle")


async def test_concurrent_calls_for_one_shard_download_once(hub: FakeHub) -> None:
    downloader = HfShardDownloader(max_parallel_downloads=2)
    shard = Shard(TIED, 0, 3, 4)
    paths = await asyncio.gather(*(downloader.ensure_shard(shard, "candle") for _ in range(5)))
    assert len(set(paths)) == 1
    for name in FILES:
        assert len(hub.file_gets(name)) == 1, name
    listings = [r for r in hub.requests if r.path.startswith("/api/models/")]
    assert len(listings) == 1
    # Another downloader on the same node finds everything in place.
    hub.clear_log()
    await HfShardDownloader().ensure_shard(shard, "candle")
    assert hub.requests == []


async def test_offline_mode_uses_local_files_and_names_what_is_missing(
    hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OfflineError, match=r"config\.json of synth/tiny-llama"):
        await HfShardDownloader().ensure_shard(Shard(TIED, 0, 0, 4), "candle")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    await HfShardDownloader().ensure_shard(Shard(TIED, 0, 0, 4), "candle")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.clear_log()
    path = await HfShardDownloader().ensure_shard(Shard(TIED, 0, 0, 4), "candle")
    assert (path / FILES[0]).exists()
    with pytest.raises(OfflineError, match=FILES[1]):
        await HfShardDownloader().ensure_shard(Shard(TIED, 1, 1, 4), "candle")
    assert hub.requests == []


def _fill_hf_cache(cache: Path, repo: str, model: Path) -> Path:
    """Lays `model` out as huggingface_hub does: blobs named by hash, snapshot symlinks, refs/main."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / COMMIT
    (root / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)
    for file in model.iterdir():
        blob = root / "blobs" / _sha256(file)
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(blob)
    return snapshot


async def test_files_in_the_hugging_face_cache_are_reused(
    hub: FakeHub, models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fill_hf_cache(tmp_path / "hf-cache", TIED, models[TIED])
    path = await HfShardDownloader().ensure_shard(Shard(TIED, 1, 2, 4), "candle")
    assert hub.requests == []
    assert (path / FILES[1]).read_bytes() == (models[TIED] / FILES[1]).read_bytes()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    await HfShardDownloader().ensure_shard(Shard(TIED, 3, 3, 4), "candle")
    assert hub.requests == []


async def test_a_partial_hugging_face_cache_fills_the_rest_from_the_hub(
    hub: FakeHub, models: dict[str, Path], tmp_path: Path
) -> None:
    snapshot = _fill_hf_cache(tmp_path / "hf-cache", TIED, models[TIED])
    (snapshot / FILES[2]).unlink()
    await HfShardDownloader().ensure_shard(Shard(TIED, 0, 3, 4), "candle")
    assert hub.fetched_weights() == {FILES[2]}


async def test_seeded_models_are_used_without_network(
    models: dict[str, Path], env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    seed = tmp_path / "seed"
    shutil.copytree(models[UNTIED], seed / "synth--tiny-llama-untied")
    _fill_hf_cache(seed, TIED, models[TIED])
    assert await seed_models(seed) == ["synth--tiny-llama", "synth--tiny-llama-untied"]
    for repo in (TIED, UNTIED):
        path = await HfShardDownloader().ensure_shard(Shard(repo, 0, 3, 4), "candle")
        assert path == env / repo.replace("/", "--") and (path / FILES[3]).exists()


async def test_progress_reaches_on_progress_on_the_event_loop(hub: FakeHub) -> None:
    downloader = new_shard_downloader()
    events: list[tuple[Shard, RepoProgressEvent]] = []
    loop = asyncio.get_running_loop()

    def record(shard: Shard, event: RepoProgressEvent) -> None:
        assert asyncio.get_running_loop() is loop
        events.append((shard, event))

    downloader.on_progress.register("test").on_next(record)
    shard = Shard(TIED, 0, 3, 4)
    await downloader.ensure_shard(shard, "candle")
    await asyncio.sleep(0)
    assert events and all(s == shard for s, _ in events)
    final = events[-1][1]
    assert isinstance(final, RepoProgressEvent) and final.status == "complete"
    assert final.repo_id == TIED and final.repo_revision == COMMIT
    assert final.downloaded_bytes == final.total_bytes == final.downloaded_bytes_this_session > 0
    assert final.completed_files == final.total_files == len(METADATA) + 1 + len(FILES)
    assert set(final.file_progress) == METADATA | {"model.safetensors.index.json", *FILES}
    assert RepoProgressEvent.from_dict(final.to_dict()) == final
    assert events[0][1].status in ("not_started", "in_progress")


async def test_download_status_lists_registry_models(hub: FakeHub, models: dict[str, Path]) -> None:
    hub.add_repo("mlx-community/Llama-3.2-1B-Instruct-8bit", models[TIED])
    downloader = HfShardDownloader()
    await downloader.ensure_shard(Shard("llama-3.2-1b-8bit", 0, 0, 16), "CandleInferenceEngine")
    statuses = {
        event.shard.model_id: (path, event)
        async for path, event in downloader.get_shard_download_status("CandleInferenceEngine")
    }
    # The registry id backed by this repository; every other repository is unknown to the fake hub.
    assert set(statuses) == {"llama-3.2-1b-8bit"}
    path, event = statuses["llama-3.2-1b-8bit"]
    assert path.name == "mlx-community--Llama-3.2-1B-Instruct-8bit"
    assert event.status == "in_progress" and 0 < event.downloaded_bytes < event.total_bytes
    assert event.file_progress[FILES[0]].status == "complete"
    assert event.file_progress[FILES[1]].status == "not_started"


async def test_delete_model_removes_the_download(hub: FakeHub, env: Path, models: dict[str, Path]) -> None:
    hub.add_repo("mlx-community/Qwen3-0.6B-4bit", models[UNTIED])
    downloader = HfShardDownloader()
    await downloader.ensure_shard(Shard("qwen-3-0.6b", 0, 27, 28), "CandleInferenceEngine")
    assert (env / "mlx-community--Qwen3-0.6B-4bit" / FILES[0]).exists()
    assert await delete_model("qwen-3-0.6b", "CandleInferenceEngine")
    assert not (env / "mlx-community--Qwen3-0.6B-4bit").exists()
    assert not await delete_model("qwen-3-0.6b", "CandleInferenceEngine")
    # The downloader fetches it again rather than trusting what it remembered.
    hub.clear_log()
    await downloader.ensure_shard(Shard("qwen-3-0.6b", 0, 27, 28), "CandleInferenceEngine")
    assert hub.fetched_weights() == set(FILES)


async def test_a_local_directory_is_used_in_place(models: dict[str, Path], env: Path) -> None:
    path = await HfShardDownloader().ensure_shard(Shard(str(models[TIED]), 0, 1, 4), "candle")
    assert path == models[TIED] and not await asyncio.to_thread(env.exists)


async def test_helpers_and_interfaces(env: Path) -> None:
    assert await ensure_exo_home() == env.parent and await asyncio.to_thread(env.parent.is_dir)
    assert await ensure_downloads_dir() == env and await asyncio.to_thread(env.is_dir)
    assert isinstance(new_shard_downloader(3), ShardDownloader)
    noop = NoopShardDownloader()
    assert await noop.ensure_shard(Shard("m", 0, 0, 1), "candle") == Path("/tmp/noop_shard")
    assert [x async for x in noop.get_shard_download_status("candle")] == []


async def test_repo_ids_work_without_a_registry_entry(hub: FakeHub) -> None:
    shard = await build_base_shard_async(UNTIED, "CandleInferenceEngine")
    assert shard == Shard(UNTIED, 0, 0, 4)
    assert hub.fetched_weights() == set()
    tokenizer = await resolve_tokenizer(TIED)
    assert tokenizer.decode(tokenizer.encode("hello world", add_special_tokens=False)) == "hello world"
    with pytest.raises(ModelNotFoundError):
        await build_base_shard_async("synth/absent", "CandleInferenceEngine")


async def test_the_candle_engine_runs_shards_it_downloaded(hub: FakeHub, models: dict[str, Path]) -> None:
    prompt = np.array([[1, 2, 3, 4]])
    local = CandleInferenceEngine()
    expected, _ = await local.infer_tensor("r", Shard(str(models[TIED]), 0, 3, 4), prompt)
    first = CandleInferenceEngine(HfShardDownloader())
    hidden, _ = await first.infer_tensor("r", Shard(TIED, 0, 1, 4), prompt)
    assert hub.fetched_weights() == {FILES[0], FILES[1]}
    last = CandleInferenceEngine(new_shard_downloader())
    logits, _ = await last.infer_tensor("r", Shard(TIED, 2, 3, 4), hidden)
    np.testing.assert_allclose(logits, expected, atol=1e-5)


class _PythonDownloader(ShardDownloader):
    """A downloader written in Python: the engine awaits its `ensure_shard`."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self.calls: list[tuple[Shard, str]] = []
        self._on_progress = NoopShardDownloader().on_progress

    async def ensure_shard(self, shard: Shard, inference_engine_name: str) -> Path:
        self.calls.append((shard, inference_engine_name))
        return self.model_dir

    @property
    def on_progress(self) -> AsyncCallbackSystem[str, tuple[Shard, RepoProgressEvent]]:
        return self._on_progress

    async def get_shard_download_status(
        self, inference_engine_name: str
    ) -> AsyncIterator[tuple[Path, RepoProgressEvent]]:
        for item in ():
            yield item


async def test_the_candle_engine_still_takes_python_downloaders(models: dict[str, Path]) -> None:
    downloader = _PythonDownloader(models[UNTIED])
    engine = CandleInferenceEngine(downloader)
    shard = Shard("some/model", 0, 3, 4)
    logits, _ = await engine.infer_tensor("r", shard, np.array([[1, 2]]))
    assert logits.shape == (1, 1, 512)
    assert downloader.calls == [(shard, "CandleInferenceEngine")]


# A 16-layer Q8_0 GGUF, whole and split in three, in one repository; ids name the file.
GGUF_REPO = "synth/tiny-llama-16-GGUF"
GGUF_FILE = "tiny-llama-16-q8_0.gguf"
GGUF_PARTS = [f"tiny-llama-16-q8_0-{i:05d}-of-00003.gguf" for i in range(1, 4)]
GGUF_ID = f"{GGUF_REPO}/{GGUF_FILE}"
SPLIT_ID = f"{GGUF_REPO}/{GGUF_PARTS[0]}"


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gguf")
    write_gguf("tiny-llama-16", root / GGUF_FILE, "q8_0")
    write_gguf("tiny-llama-16", root / GGUF_FILE, "q8_0", split=3)
    assert sorted(p.name for p in root.iterdir()) == sorted([GGUF_FILE, *GGUF_PARTS])
    return root


@pytest.fixture
def gguf_hub(hub: FakeHub, gguf_dir: Path) -> FakeHub:
    hub.add_repo(GGUF_REPO, gguf_dir)
    return hub


def _tensor_bytes(path: Path) -> dict[str, tuple[int, int]]:
    """Each tensor's (offset, length) in the GGUF file at `path`."""
    return {t.name: (int(t.data_offset), int(t.n_bytes)) for t in gguf.GGUFReader(path).tensors}


def _recorded_bytes(path: Path) -> int:
    """The bytes the `.ranges` record beside a GGUF fetched in ranges lists as present."""
    return sum(end - start for start, end in json.loads(Path(f"{path}.ranges").read_text())["present"])


def _layer(name: str) -> int | None:
    return int(name.split(".")[1]) if name.startswith("blk.") else None


async def test_a_gguf_shard_fetches_only_its_layers(gguf_hub: FakeHub, gguf_dir: Path, env: Path) -> None:
    path = await HfShardDownloader().ensure_shard(Shard(GGUF_ID, 8, 15, 16), "candle")
    assert path == env / "synth--tiny-llama-16-GGUF" / GGUF_FILE
    original = gguf_dir / GGUF_FILE
    size = original.stat().st_size
    served = gguf_hub.served_bytes(GGUF_FILE)
    assert 0.4 * size < served < 0.6 * size, (served, size)
    assert path.stat().st_size == size
    data, local = original.read_bytes(), path.read_bytes()
    for name, (offset, length) in _tensor_bytes(original).items():
        layer = _layer(name)
        if layer is None or layer >= 8:  # the shard's layers, the tied embeddings, norm, rope factors
            assert local[offset : offset + length] == data[offset : offset + length], name
        else:
            assert local[offset : offset + length] == bytes(length), f"{name} was fetched"
    assert (path.parent / f"{GGUF_FILE}.ranges").is_file()


async def test_two_nodes_each_fetch_their_half_and_run_the_model(
    gguf_hub: FakeHub, gguf_dir: Path, tmp_path: Path
) -> None:
    prompt = np.array([[1, 2, 3, 4, 5]])
    expected, _ = await CandleInferenceEngine().infer_tensor("r", Shard(str(gguf_dir / GGUF_FILE), 0, 15, 16), prompt)
    size = (gguf_dir / GGUF_FILE).stat().st_size
    first = CandleInferenceEngine(HfShardDownloader(exo_home=tmp_path / "node-a"))
    hidden, _ = await first.infer_tensor("r", Shard(GGUF_ID, 0, 7, 16), prompt)
    first_bytes = gguf_hub.served_bytes(GGUF_FILE)
    gguf_hub.clear_log()
    last = CandleInferenceEngine(HfShardDownloader(exo_home=tmp_path / "node-b"))
    logits, _ = await last.infer_tensor("r", Shard(GGUF_ID, 8, 15, 16), hidden)
    last_bytes = gguf_hub.served_bytes(GGUF_FILE)
    np.testing.assert_allclose(logits, expected, atol=1e-5)
    for served in (first_bytes, last_bytes):
        assert 0.4 * size < served < 0.6 * size, (first_bytes, last_bytes, size)


async def test_a_two_node_cluster_on_a_gguf_downloads_each_nodes_layers_only(
    gguf_hub: FakeHub, gguf_dir: Path, tmp_path: Path
) -> None:
    local = Shard(str(gguf_dir / GGUF_FILE), 0, 0, 16)
    async with running_cluster(["solo"], CandleInferenceEngine) as (solo,):
        expected = [t async for t in solo.generate(local, "Hello there", max_tokens=6)]
    homes = iter([tmp_path / "node-a", tmp_path / "node-b"])
    async with running_cluster(
        ["a", "b"], lambda: CandleInferenceEngine(HfShardDownloader(exo_home=next(homes)))
    ) as nodes:
        tokens = [t async for t in nodes[0].generate(Shard(GGUF_ID, 0, 0, 16), "Hello there", max_tokens=6)]
        layers = sorted((n.inference_engine.shard.start_layer, n.inference_engine.shard.end_layer) for n in nodes)
    assert tokens == expected
    assert layers[0][0] == 0 and layers[0][1] + 1 == layers[1][0] and layers[1][1] == 15
    size = (gguf_dir / GGUF_FILE).stat().st_size
    downloaded = [tmp_path / f"node-{n}" / "synth--tiny-llama-16-GGUF" / GGUF_FILE for n in "ab"]
    present = [_recorded_bytes(p) for p in downloaded]
    # Each node holds about its share of the layers (and the embeddings or the head), and the
    # hub served nothing else.
    assert all(0.35 * size < p < 0.65 * size for p in present), (present, size)
    assert gguf_hub.served_bytes(GGUF_FILE) == sum(present)


async def test_an_interrupted_gguf_range_resumes_where_it_broke_off(
    gguf_hub: FakeHub, gguf_dir: Path, env: Path
) -> None:
    downloader = HfShardDownloader()
    await downloader.ensure_metadata(GGUF_ID)
    header_bytes = gguf_hub.served_bytes(GGUF_FILE)
    assert header_bytes < 0.1 * (gguf_dir / GGUF_FILE).stat().st_size
    gguf_hub.clear_log()
    gguf_hub.cut_once.add(GGUF_FILE)
    path = await downloader.ensure_shard(Shard(GGUF_ID, 12, 15, 16), "candle")
    cut, resumed = gguf_hub.file_gets(GGUF_FILE)[:2]
    assert cut.range is not None and resumed.range is not None
    start, end = (int(n) for n in cut.range.removeprefix("bytes=").split("-"))
    assert resumed.range == f"bytes={start + cut.served}-{end}" and cut.served == (end - start + 1) // 2
    data = (gguf_dir / GGUF_FILE).read_bytes()
    offset, length = _tensor_bytes(gguf_dir / GGUF_FILE)["blk.12.ffn_down.weight"]
    assert path.read_bytes()[offset : offset + length] == data[offset : offset + length]


async def test_a_later_gguf_shard_fetches_only_the_missing_ranges(
    gguf_hub: FakeHub, gguf_dir: Path, env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await HfShardDownloader().ensure_shard(Shard(GGUF_ID, 8, 15, 16), "candle")
    first = gguf_hub.served_bytes(GGUF_FILE)
    gguf_hub.clear_log()
    # Offline, the shard it has is served from the cache and the one it lacks is named.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    await HfShardDownloader().ensure_shard(Shard(GGUF_ID, 8, 15, 16), "candle")
    with pytest.raises(OfflineError, match=GGUF_FILE):
        await HfShardDownloader().ensure_shard(Shard(GGUF_ID, 0, 15, 16), "candle")
    assert gguf_hub.requests == []
    monkeypatch.delenv("HF_HUB_OFFLINE")
    # A new downloader (a restarted node) fetches the rest: no byte twice, then the whole
    # file is checked against the hub's SHA-256 and its record of ranges goes.
    path = await HfShardDownloader().ensure_shard(Shard(GGUF_ID, 0, 15, 16), "candle")
    original = gguf_dir / GGUF_FILE
    assert first + gguf_hub.served_bytes(GGUF_FILE) == original.stat().st_size
    assert _sha256(path) == _sha256(original)
    assert not (path.parent / f"{GGUF_FILE}.ranges").exists()
    assert await delete_model(GGUF_ID, "candle")
    assert not path.exists()


async def test_a_split_gguf_fetches_each_parts_share_of_the_layers(
    gguf_hub: FakeHub, gguf_dir: Path, env: Path
) -> None:
    path = await HfShardDownloader().ensure_shard(Shard(SPLIT_ID, 8, 15, 16), "candle")
    assert path == env / "synth--tiny-llama-16-GGUF" / GGUF_PARTS[0]
    total = sum((gguf_dir / p).stat().st_size for p in GGUF_PARTS)
    served = sum(gguf_hub.served_bytes(p) for p in GGUF_PARTS)
    assert 0.4 * total < served < 0.65 * total, (served, total)
    for part in GGUF_PARTS:
        assert (path.parent / part).stat().st_size == (gguf_dir / part).stat().st_size
    prompt = np.array([[3, 1, 4]])
    local = Shard(str(gguf_dir / GGUF_PARTS[0]), 0, 7, 16)
    hidden, _ = await CandleInferenceEngine().infer_tensor("r", local, prompt)
    whole, _ = await CandleInferenceEngine().infer_tensor("r", Shard(str(gguf_dir / GGUF_FILE), 0, 15, 16), prompt)
    logits, _ = await CandleInferenceEngine(HfShardDownloader()).infer_tensor("r", Shard(SPLIT_ID, 8, 15, 16), hidden)
    np.testing.assert_allclose(logits, whole, atol=1e-5)


async def test_a_gguf_id_gives_layers_and_tokenizer_from_the_header(gguf_hub: FakeHub, gguf_dir: Path) -> None:
    assert await build_base_shard_async(GGUF_ID, "CandleInferenceEngine") == Shard(GGUF_ID, 0, 0, 16)
    tokenizer = await resolve_tokenizer(GGUF_ID)
    assert tokenizer.decode(tokenizer.encode("hello world", add_special_tokens=False)) == "hello world"
    assert gguf_hub.served_bytes(GGUF_FILE) < 0.1 * (gguf_dir / GGUF_FILE).stat().st_size


async def test_a_gguf_repository_named_without_a_file_says_how_to_name_one(gguf_hub: FakeHub) -> None:
    with pytest.raises(InvalidModelError, match=f"{GGUF_REPO}/FILE.gguf") as error:
        await HfShardDownloader().ensure_shard(Shard(GGUF_REPO, 0, 15, 16), "candle")
    named = str(error.value).rsplit(": ", 1)[1].split(", ")
    assert sorted(named) == sorted([GGUF_FILE, GGUF_PARTS[0]])
    assert gguf_hub.fetched_weights() == set()


async def test_a_gguf_whose_bytes_all_arrived_is_checked_against_the_hubs_hash(
    gguf_hub: FakeHub, gguf_dir: Path, env: Path
) -> None:
    gguf_hub.corrupt.add(GGUF_FILE)
    # A shard's ranges alone cannot be hashed: the corrupted bytes go unnoticed until the
    # whole file is present, which is checked and, failing, not kept.
    await HfShardDownloader().ensure_shard(Shard(GGUF_ID, 12, 15, 16), "candle")
    with pytest.raises(IntegrityError, match=f"{GGUF_FILE}.*SHA-256"):
        await HfShardDownloader().ensure_shard(Shard(GGUF_ID, 0, 15, 16), "candle")
    path = env / "synth--tiny-llama-16-GGUF" / GGUF_FILE
    assert not path.exists() and not (path.parent / f"{GGUF_FILE}.ranges").exists()
    gguf_hub.corrupt.clear()
    await HfShardDownloader().ensure_shard(Shard(GGUF_ID, 0, 15, 16), "candle")
    assert _sha256(path) == _sha256(gguf_dir / GGUF_FILE)


async def test_gguf_progress_counts_the_shards_bytes(gguf_hub: FakeHub, gguf_dir: Path) -> None:
    downloader = new_shard_downloader()
    events: list[RepoProgressEvent] = []
    downloader.on_progress.register("test").on_next(lambda _shard, event: events.append(event))
    await downloader.ensure_shard(Shard(GGUF_ID, 8, 15, 16), "candle")
    await asyncio.sleep(0)
    final = events[-1]
    assert final.status == "complete" and final.repo_id == GGUF_REPO and set(final.file_progress) == {GGUF_FILE}
    # The shard's bytes: what the hub served, less the few bytes fetched along between ranges.
    served = gguf_hub.served_bytes(GGUF_FILE)
    assert final.downloaded_bytes == final.total_bytes <= served < (gguf_dir / GGUF_FILE).stat().st_size
    assert final.total_bytes > 0.95 * served


async def test_a_bare_listing_gives_a_ggufs_size_and_hash_from_head(gguf_hub: FakeHub, gguf_dir: Path) -> None:
    gguf_hub.bare_listing = True
    gguf_hub.corrupt.add(GGUF_FILE)
    with pytest.raises(IntegrityError, match=GGUF_FILE):
        await HfShardDownloader().ensure_shard(Shard(GGUF_ID, 0, 15, 16), "candle")
    heads = [r for r in gguf_hub.requests if r.method == "HEAD"]
    assert [r.path.rsplit("/", 1)[-1] for r in heads] == [GGUF_FILE]
    gguf_hub.corrupt.clear()
    path = await HfShardDownloader().ensure_shard(Shard(GGUF_ID, 0, 15, 16), "candle")
    assert _sha256(path) == _sha256(gguf_dir / GGUF_FILE)


async def test_a_gguf_in_the_hugging_face_cache_is_linked_without_network(
    gguf_hub: FakeHub, gguf_dir: Path, tmp_path: Path
) -> None:
    _fill_hf_cache(tmp_path / "hf-cache", GGUF_REPO, gguf_dir)
    path = await HfShardDownloader().ensure_shard(Shard(SPLIT_ID, 8, 15, 16), "candle")
    assert gguf_hub.requests == []
    for part in GGUF_PARTS:
        assert _sha256(path.parent / part) == _sha256(gguf_dir / part)
        assert not (path.parent / f"{part}.ranges").exists()
