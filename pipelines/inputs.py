"""References to what a job names directly (files, keys) and to the datasets the artifacts carry.

Stages put these in their typed requests, so a request's content key is the hash of every input's
identity (its content key or digest), never of where the input happens to lie.
"""

from __future__ import annotations

from pathlib import Path

from graft.fingerprint import DigestCache
from pipelines.artifacts import Datasets
from pipelines.cache import Ref, file_digest, folder_identity
from pipelines.spec import JobSpec


def file_ref(path: str | Path) -> Ref:
    """A file the job names (a JSONL of prompts, a key): identified by its contents."""
    return Ref(str(Path(path).expanduser().resolve()), file_digest(Path(path).expanduser()))


def checkpoint_ref(name: str) -> Ref:
    """A checkpoint the job names: a local folder, or a hub id fetched (weights as safetensors only) into the
    hub cache; identified by its files (`folder_identity`)."""
    folder = Path(name).expanduser()
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]))
    return Ref(str(folder.resolve()), folder_identity(folder))


def replay_ref(data: Datasets, replay_data: str, replay_fraction: float) -> Ref | None:
    """The data replayed in every training batch (a dataset of the job, or a JSONL file), or None without replay."""
    if replay_fraction <= 0:
        return None
    if replay_data in data:
        return data[replay_data].train
    return file_ref(replay_data)


def digest_cache(spec: JobSpec) -> DigestCache:
    """The job's cache of tensor digests (base fingerprints), beside its runs."""
    return DigestCache(spec.output_dir.resolve() / ".cache" / "digests")
