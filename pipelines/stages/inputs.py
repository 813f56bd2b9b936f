"""References (`pipelines.cache.Ref`) to what the testbed stage hands on: the base, its tokenizer, the skills' data.

Stages put these in their typed requests, so a request's content key is the hash of every input's
identity (its content key or digest), never of where the input happens to lie.
"""

from __future__ import annotations

from pathlib import Path

from graft.fingerprint import DigestCache
from pipelines.cache import Ref, file_digest, folder_identity
from pipelines.spec import JobSpec


def base_ref(prep: dict) -> Ref:
    """The base checkpoint the job grafts onto."""
    return Ref(prep["base"], prep["base_key"])


def tokenizer_ref(prep: dict) -> Ref:
    """The tokenizer folder: the base's own, or the job's `tokenizer`."""
    if prep["tokenizer"] == prep["base"]:
        return Ref(prep["tokenizer"], prep["base_key"])
    return Ref(prep["tokenizer"], folder_identity(prep["tokenizer"]))


def data_ref(prep: dict, skill: str, split: str = "train") -> Ref:
    """One split ("train" or "test") of a skill's data, identified by the digest of its dataset."""
    d = prep["data"][skill]
    return Ref(d[split], f"{d['key']}:{split}")


def replay_ref(prep: dict, replay_data: str, replay_fraction: float) -> Ref | None:
    """The data replayed in every training batch (a testbed skill or a JSONL file), or None without replay."""
    if replay_fraction <= 0:
        return None
    if replay_data in prep["data"]:
        return data_ref(prep, replay_data)
    return Ref(str(Path(replay_data).resolve()), file_digest(replay_data))


def file_ref(path: str | Path) -> Ref:
    """A file named by the job (a JSONL of prompts, a key): identified by its contents."""
    return Ref(str(Path(path).expanduser().resolve()), file_digest(Path(path).expanduser()))


def digest_cache(spec: JobSpec) -> DigestCache:
    """The job's cache of tensor digests (base fingerprints), beside its runs."""
    return DigestCache(spec.output_dir.resolve() / ".cache" / "digests")
