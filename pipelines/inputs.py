"""References to what a job names directly (files, keys) and to the datasets the artifacts carry.

Stages put these in their typed requests, so a request's content key is the hash of every input's
identity (its content key or digest), never of where the input happens to lie.
"""

from __future__ import annotations

from pathlib import Path

from graft.fingerprint import DigestCache
from pipelines.artifacts import Checkpoint, Datasets, Models
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


TESTBED = "testbed:"


def named_model_problems(key: str, name: str, spec: JobSpec) -> list[str]:
    """What is wrong with a model the job names at `key` (`distill.source`, `port.to`): a `testbed:NAME` the job
    does not build, or a local folder that is not there (a hub id is only known when it is fetched)."""
    from graft.testbed.recipes import model_names

    if name.startswith(TESTBED):
        model, known = name.removeprefix(TESTBED), model_names(spec.testbed.versions)
        if spec.base != "testbed":
            return [f"{key}: {name!r} names a testbed model, but base is {spec.base!r}"]
        if model not in known:
            return [f"{key}: unknown testbed model {model!r}; known with testbed.versions={spec.testbed.versions}: {', '.join(known)}"]
        if model not in spec.testbed.models:
            return [f"{key}: {name!r} is not built by this job: add {model!r} to testbed.models"]
        return []
    folder = Path(name).expanduser()
    if (name.startswith(("/", ".", "~")) or folder.exists()) and not folder.is_dir():
        return [f"{key}: {name}: no such checkpoint folder"]
    return []


def named_model(name: str, models: Models) -> Checkpoint:
    """A model the job names: a testbed model the testbed stage built, or a checkpoint folder / hub id (its own tokenizer)."""
    if name.startswith(TESTBED):
        return models[name.removeprefix(TESTBED)]
    ref = checkpoint_ref(name)
    return Checkpoint(ref, ref)


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
